"""AHDMIL fast slide inference: DB-LIPN pre-screens low-resolution patches, only kept patches are encoded.

Pipeline of :func:`predict_slide` for one slide file (every stage is timed):

1. ``tissue``: tissue mask and the checkpoint's patch grid (``patch_mpp``, ``patch_size``, stride), or the
   coordinates given (e.g. the store's);
2. ``prescreen_read``: the low-resolution twin of every patch -- the companion grid: same level-0 square read at
   ``patch_size / prescreen_factor`` px;
3. ``prescreen``: DB-LIPN logits ``q``; ``keep = sigmoid(q) > prescreen_threshold`` (at least one patch);
4. ``read_encode``: only kept patches are read at high resolution and encoded (the checkpoint's encoder);
5. ``classify``: DMIN on the kept patches' features.

With ``prescreen=False`` stages 2-3 are skipped and every patch is encoded (the baseline the benchmark compares
with). Maps cover every patch of the grid: ``prescreen/score``, ``prescreen/keep``, ``attention``,
``attention/class<c>``, ``relevance``, ``dmin/keep`` (NaN where a patch was pruned, i.e. never encoded).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from wsimil_core.errors import CheckpointError, ConfigError


def lowres_px_for(patch_px: int, factor: float) -> int:
    """Side in px of a low-resolution twin (as ``PatchGrid.companion(factor)``): ``round(patch_px / factor)``."""
    px = int(round(int(patch_px) / float(factor)))
    if px < 1:
        raise ConfigError(f"ahdmil prescreen_factor {factor} leaves low-resolution patches under 1 px")
    return px


def read_patches(
    path: str | Path,
    coords: np.ndarray,
    size_level0: int,
    out_px: int,
    *,
    num_workers: int = 0,
    batch_size: int = 256,
    slide_mpp: float | None = None,
    progress: bool = False,
) -> np.ndarray:
    """Read the level-0 squares ``coords [N, 2]`` x ``size_level0`` at ``out_px`` px -> uint8 ``[N, out_px, out_px, 3]``."""
    from tqdm.auto import tqdm

    from wsimil_core.features.extract import PatchDataset

    ds = PatchDataset(path, coords, size_level0, out_px, slide_mpp=slide_mpp)
    out = np.empty((len(ds), out_px, out_px, 3), dtype=np.uint8)
    if len(ds) == 0:
        return out
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    start = 0
    try:
        for batch in tqdm(loader, desc=f"{Path(path).name} @ {out_px}px", leave=False, disable=not progress):
            out[start : start + len(batch)] = batch.numpy()
            start += len(batch)
    finally:
        ds.close()
    return out


@dataclass
class SlidePrediction:
    """Fast-inference result of one slide.

    Attributes:
        slide_path: the slide file.
        probs: ``{task: float [C]}`` softmax probabilities.
        coords: int64 ``[N, 2]`` level-0 (x, y) of every grid patch.
        maps: ``{name: float32 [N]}`` aligned with ``coords`` (NaN where a patch was not encoded).
        keep: bool ``[N]`` patches DB-LIPN kept (all True without pre-screening).
        timings: seconds per stage (``tissue``, ``prescreen_read``, ``prescreen``, ``read_encode``, ``classify``,
            ``total``).
        n_encoded: patches read at high resolution and encoded.
    """

    slide_path: Path
    probs: dict[str, np.ndarray]
    coords: np.ndarray
    maps: dict[str, np.ndarray]
    keep: np.ndarray
    timings: dict[str, float] = field(default_factory=dict)
    n_encoded: int = 0

    @property
    def n_patches(self) -> int:
        return int(len(self.coords))

    @property
    def kept_fraction(self) -> float:
        return float(self.keep.mean()) if len(self.keep) else float("nan")


def load_ahdmil(checkpoint: Any, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """``(model, meta)`` of an ``ahdmil`` checkpoint path (or pass-through of a ``(model, meta)`` pair)."""
    from wsimil_core.devices import resolve_device

    dev = resolve_device(device)
    if isinstance(checkpoint, tuple):
        model, meta = checkpoint
        model.to(dev)
    else:
        from wsimil_core.engine.checkpoint import load_checkpoint

        model, meta = load_checkpoint(checkpoint, device=dev)
    if meta.get("model_name") != "ahdmil":
        raise CheckpointError(
            f"{checkpoint if not isinstance(checkpoint, tuple) else '<model>'}: predict-slide needs an ahdmil "
            f"checkpoint, this one holds model {meta.get('model_name')!r}"
        )
    model.eval()
    return model, meta


def encoder_from_meta(
    meta: dict[str, Any], weights: str | Path | None = None, device: str | torch.device = "cpu"
) -> tuple[nn.Module, Any]:
    """Rebuild the checkpoint's patch encoder (``meta["encoder"]``) and check its weights hash.

    ``weights`` overrides the weights file recorded in the checkpoint. A checkpoint trained on random-init
    features rebuilds the same deterministic random encoder (with the usual loud warning).
    """
    from wsimil_core.features.encoders import RANDOM_INIT, create_encoder

    enc = meta.get("encoder") or {}
    name = enc.get("name")
    if not name:
        raise CheckpointError("checkpoint has no encoder name in its metadata; cannot encode slide pixels")
    want = enc.get("weights_sha256") or RANDOM_INIT
    path = weights if weights is not None else enc.get("weights_path")
    if want == RANDOM_INIT:
        path = None
    elif path is None or not Path(path).is_file():
        raise CheckpointError(
            f"the checkpoint's encoder {name!r} was trained with weights {want[:12]}... "
            f"({enc.get('weights_path') or 'no path recorded'}); pass that file with --encoder-weights"
        )
    module, spec = create_encoder(name, weights=path, device=device)
    if spec.weights_sha256 != want:
        raise CheckpointError(
            f"{path}: encoder weights {spec.weights_sha256[:12]}... differ from the checkpoint's {want[:12]}..."
        )
    if enc.get("dim") is not None and int(enc["dim"]) != int(spec.dim):
        raise CheckpointError(f"encoder {name!r} gives {spec.dim} dims, the checkpoint expects {enc['dim']}")
    return module, spec


def grid_from_meta(meta: dict[str, Any]) -> tuple[float, int, int]:
    """``(patch_mpp, patch_px, stride_px)`` the checkpoint was trained on (``meta["encoder"]``)."""
    enc = meta.get("encoder") or {}
    mpp = enc.get("patch_mpp", enc.get("mpp"))
    px = enc.get("patch_size", enc.get("patch"))
    if mpp is None or px is None:
        raise CheckpointError("checkpoint metadata lacks the patch grid (encoder patch_mpp / patch_size)")
    stride = int(px)
    s0, p0 = enc.get("stride_level0"), enc.get("patch_size_level0")
    if s0 and p0:
        stride = int(round(float(s0) / float(p0) * int(px)))
    return float(mpp), int(px), stride


def _timed(timings: dict[str, float], key: str, t0: float) -> float:
    t = time.perf_counter()
    timings[key] = timings.get(key, 0.0) + (t - t0)
    return t


@torch.no_grad()
def predict_slide(
    checkpoint: Any,
    slide_path: str | Path,
    *,
    encoder: tuple[nn.Module, Any] | None = None,
    encoder_weights: str | Path | None = None,
    prescreen: bool = True,
    coords: np.ndarray | None = None,
    size_level0: int | None = None,
    device: str | torch.device = "auto",
    batch_size: int = 64,
    num_workers: int = 0,
    slide_mpp: float | None = None,
    tissue: Any = None,
    min_tissue: float = 0.25,
    progress: bool = False,
) -> SlidePrediction:
    """AHDMIL inference from a slide file (see the module docstring).

    Args:
        checkpoint: an ``ahdmil`` checkpoint path or ``(model, meta)``.
        slide_path: the slide file.
        encoder: an already built ``(module, EncoderSpec)`` (else rebuilt from the checkpoint's metadata).
        encoder_weights: weights file of the checkpoint's encoder (when it is not at the recorded path).
        prescreen: run DB-LIPN and encode only kept patches (False: encode every patch, the baseline).
        coords, size_level0: patch grid to use (e.g. the store's); default: tissue detection + the checkpoint's
            grid.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``...
        batch_size, num_workers: patch reading / encoding batches and DataLoader workers.
        slide_mpp: µm per level-0 pixel for slides without mpp metadata.
        tissue: ``TissueParams`` (default parameters when None); min_tissue: grid cell tissue fraction.
    """
    from wsimil_core.devices import resolve_device
    from wsimil_core.features.extract import encode_slide_patches
    from wsimil_core.inference.predict import task_names

    dev = resolve_device(device)
    model, meta = load_ahdmil(checkpoint, dev)
    cfg = model.config
    if encoder is None:
        encoder = encoder_from_meta(meta, encoder_weights, dev)
    enc_module, spec = encoder
    path = Path(slide_path)
    timings: dict[str, float] = {}
    t_start = t0 = time.perf_counter()
    mpp, patch_px, stride_px = grid_from_meta(meta)
    if coords is None:
        import warnings

        from wsimil_core.wsi.slide import open_slide
        from wsimil_core.wsi.tiling import EmptyTissueWarning, GridSpec, TissueParams, detect_tissue, make_grid

        with open_slide(path, slide_mpp=slide_mpp) as slide:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", EmptyTissueWarning)
                mask = detect_tissue(slide, tissue or TissueParams())
                grid = make_grid(
                    slide, mask, GridSpec(mpp=mpp, patch=patch_px, stride=stride_px, min_tissue=min_tissue)
                )
        coords, size_level0 = grid.coords, grid.size_level0
    elif size_level0 is None:
        raise ConfigError("predict_slide: coords given without size_level0")
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    n = len(coords)
    if n == 0:
        from wsimil_core.errors import SlideError

        raise SlideError(f"{path}: no tissue patch on the checkpoint's grid ({patch_px} px at {mpp} µm/px)")
    t0 = _timed(timings, "tissue", t0)

    score = np.full(n, np.nan, dtype=np.float32)
    if prescreen:
        lr_px = lowres_px_for(patch_px, cfg.prescreen_factor)
        images = read_patches(
            path,
            coords,
            int(size_level0),
            lr_px,
            num_workers=num_workers,
            batch_size=max(batch_size, 256),
            slide_mpp=slide_mpp,
            progress=progress,
        )
        t0 = _timed(timings, "prescreen_read", t0)
        q = model.prescreen(torch.from_numpy(images)).float()
        prob = torch.sigmoid(q).cpu().numpy()
        keep = prob > cfg.prescreen_threshold
        if not keep.any():
            keep[int(np.argmax(prob))] = True
        score = prob.astype(np.float32)
        t0 = _timed(timings, "prescreen", t0)
    else:
        keep = np.ones(n, dtype=bool)
        timings["prescreen_read"] = timings["prescreen"] = 0.0
    kept_idx = np.flatnonzero(keep)
    feats = encode_slide_patches(
        path,
        coords[kept_idx],
        int(size_level0),
        patch_px,
        enc_module,
        spec,
        batch_size=batch_size,
        num_workers=num_workers,
        slide_mpp=slide_mpp,
        progress=progress,
    )
    t0 = _timed(timings, "read_encode", t0)
    x = torch.from_numpy(feats).to(dev)
    out = model(x, coords=torch.from_numpy(coords[kept_idx]).to(dev))
    lg = out.logits.float().reshape(-1, out.logits.shape[-1])[0]
    probs = torch.softmax(lg, dim=-1).cpu().numpy()
    t0 = _timed(timings, "classify", t0)
    timings["total"] = time.perf_counter() - t_start

    maps: dict[str, np.ndarray] = {"prescreen/score": score, "prescreen/keep": keep.astype(np.float32)}
    for name, value in out.maps.items():
        full = np.full(n, np.nan, dtype=np.float32)
        full[kept_idx] = value.detach().float().cpu().numpy()
        maps[name] = full
    task = task_names(meta)[0]
    return SlidePrediction(path, {task: probs}, coords, maps, keep, timings, n_encoded=int(len(kept_idx)))


def write_maps_csv(pred: SlidePrediction, path: str | Path) -> Path:
    """Write ``x, y`` + every map of a slide prediction as a CSV (atomically)."""
    import pandas as pd

    from wsimil_core.inference.predict import _write_csv_atomic

    frame = pd.DataFrame({"x": pred.coords[:, 0], "y": pred.coords[:, 1]})
    for name, value in pred.maps.items():
        frame[name] = value
    _write_csv_atomic(frame, path)
    return Path(path)


__all__ = [
    "SlidePrediction",
    "predict_slide",
    "load_ahdmil",
    "encoder_from_meta",
    "grid_from_meta",
    "lowres_px_for",
    "read_patches",
    "write_maps_csv",
]
