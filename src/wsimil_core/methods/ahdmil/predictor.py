"""AHDMIL fast slide inference: DB-LIPN pre-screens low-resolution patches, only kept patches are encoded.

:class:`AHDMILPredictor` is what ``AHDMILMethod.predictor`` gives the inference pipeline
(``wsimil_core.inference.pipeline``); per slide (every stage is timed):

1. ``tissue`` (the pipeline): the store's patch grid, or tissue mask + the checkpoint's grid;
2. ``prescreen_read``: the low-resolution twin of every patch -- the companion grid: same level-0 square read at
   ``patch_size / prescreen_factor`` px;
3. ``prescreen``: DB-LIPN logits ``q``; ``keep = sigmoid(q) > prescreen_threshold`` (at least one patch);
4. ``read_encode``: the kept patches' features: from the store's cache, or only kept patches are read at high
   resolution and encoded (the checkpoint's encoder, built once by the pipeline);
5. ``classify``: DMIN on the kept patches' features.

With ``prescreen=False`` stages 2-3 are skipped and every patch is encoded (the baseline the benchmark compares
with). Maps cover every patch of the grid: ``prescreen/score``, ``prescreen/keep``, ``attention``,
``attention/class<c>``, ``relevance``, ``dmin/keep`` (NaN where a patch was pruned, i.e. never encoded).
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from wsimil_core._io import atomic_path
from wsimil_core.checkpoint_meta import CheckpointMeta
from wsimil_core.devices import single_thread_worker
from wsimil_core.errors import CheckpointError, ConfigError
from wsimil_core.features.extract import PatchDataset
from wsimil_core.methods.ahdmil.model import AHDMIL
from wsimil_core.methods.predictor import BagPrediction, SlideInput, bag_prediction


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
    ds = PatchDataset(path, coords, size_level0, out_px, slide_mpp=slide_mpp)
    out = np.empty((len(ds), out_px, out_px, 3), dtype=np.uint8)
    if len(ds) == 0:
        return out
    loader = torch.utils.data.DataLoader(
        ds, batch_size=batch_size, shuffle=False, num_workers=num_workers, worker_init_fn=single_thread_worker
    )
    start = 0
    try:
        for batch in tqdm(loader, desc=f"{Path(path).name} @ {out_px}px", leave=False, disable=not progress):
            out[start : start + len(batch)] = batch.numpy()
            start += len(batch)
    finally:
        ds.close()
    return out


class AHDMILPredictor:
    """AHDMIL's slide predictor (``AHDMILMethod.predictor``): DB-LIPN pre-screens the low-resolution twins of the
    grid's patches, DMIN classifies the kept patches' features (the store's, or encoded from the slide by the
    pipeline: only kept patches are then read at high resolution and encoded).

    Args:
        model: an ``ahdmil`` model (``prescreen`` = DB-LIPN, ``dmin``); meta: its checkpoint meta.
        prescreen: True: pre-screen (the slide file must be readable); False: DMIN on every patch (the baseline);
            None: pre-screen when the slide file is readable, else DMIN on every patch with a warning.

    ``info`` of its prediction: ``keep`` bool ``[N]``, ``n_kept``, ``n_encoded`` (patches encoded from pixels),
    ``kept_fraction``, ``prescreen`` (whether it ran) and ``timings`` (``prescreen_read``, ``prescreen``,
    ``read_encode``, ``classify``).
    """

    uses_features = True
    progressive = False

    def __init__(self, model: nn.Module, meta: CheckpointMeta, prescreen: bool | None = None):
        if not isinstance(model, AHDMIL):
            raise CheckpointError(f"the ahdmil predictor needs an ahdmil model, got {meta.model_name!r}")
        self.model, self.meta, self.prescreen = model, meta, prescreen
        self.reads_pixels = prescreen is True

    @torch.no_grad()
    def __call__(self, slide: SlideInput) -> BagPrediction:
        cfg = self.model.config
        coords, n = slide.coords, slide.n_patches
        timings: dict[str, float] = {}
        readable = slide.slide_path is not None and Path(slide.slide_path).is_file()
        screen = self.prescreen if self.prescreen is not None else readable
        if self.prescreen is None and not readable:
            warnings.warn(
                f"slide {slide.slide_id!r}: its file {slide.slide_path} is not found, so AHDMIL runs DMIN on every "
                "patch without pre-screening",
                stacklevel=2,
            )
        t0 = time.perf_counter()
        score = np.full(n, np.nan, dtype=np.float32)
        if screen and slide.slide_path is not None:
            lr_px = lowres_px_for(slide.grid.patch_px, cfg.prescreen_factor)
            images = read_patches(
                slide.slide_path,
                coords,
                int(slide.grid.size_level0),
                lr_px,
                num_workers=slide.num_workers,
                batch_size=max(slide.batch_size, 256),
                slide_mpp=slide.slide_mpp,
                progress=slide.progress,
            )
            t0 = _timed(timings, "prescreen_read", t0)
            prob = torch.sigmoid(self.model.prescreen(torch.from_numpy(images)).float()).cpu().numpy()
            keep = prob > cfg.prescreen_threshold
            if not keep.any():
                keep[int(np.argmax(prob))] = True
            score = prob.astype(np.float32)
            t0 = _timed(timings, "prescreen", t0)
        else:
            keep = np.ones(n, dtype=bool)
            timings["prescreen_read"] = timings["prescreen"] = 0.0
        kept_idx = np.flatnonzero(keep)
        if slide.features is None:
            raise CheckpointError(f"slide {slide.slide_id!r}: the ahdmil predictor needs patch features")
        feats = slide.features(None if len(kept_idx) == n else kept_idx)  # every patch kept: no row copy
        t0 = _timed(timings, "read_encode", t0)
        x = torch.from_numpy(np.asarray(feats, dtype=np.float32)).to(slide.device)
        out = self.model(x, coords=torch.from_numpy(coords[kept_idx]).to(slide.device))
        pred = bag_prediction(out, len(kept_idx), self.meta.task_names[0])
        _timed(timings, "classify", t0)
        maps: dict[str, np.ndarray] = {"prescreen/score": score, "prescreen/keep": keep.astype(np.float32)}
        for name, value in pred.maps.items():
            full = np.full((n, *value.shape[1:]), np.nan, dtype=np.float32)
            full[kept_idx] = value
            maps[name] = full
        n_encoded = 0 if slide.features.cached else int(len(kept_idx))
        kept_fraction = float(keep.mean()) if n else float("nan")
        pred.maps = maps
        pred.info = {
            "keep": keep,
            "n_kept": int(len(kept_idx)),
            "n_encoded": n_encoded,
            "kept_fraction": kept_fraction,
            "prescreen": bool(screen),
            "timings": timings,
            "row": {"n_encoded": n_encoded, "kept_fraction": kept_fraction},
            "attrs": {"prescreen": bool(screen), "kept_fraction": kept_fraction, "timings": dict(timings)},
        }
        return pred


def _timed(timings: dict[str, float], key: str, t0: float) -> float:
    t = time.perf_counter()
    timings[key] = timings.get(key, 0.0) + (t - t0)
    return t


def write_maps_csv(coords: np.ndarray, maps: dict[str, np.ndarray], path: str | Path) -> Path:
    """Write ``x, y`` + every ``[N]`` map of a slide prediction as a CSV (atomically)."""
    import pandas as pd  # heavy to import; only this CSV export needs it

    frame = pd.DataFrame({"x": coords[:, 0], "y": coords[:, 1]})
    for name, value in maps.items():
        if np.ndim(value) == 1:
            frame[name] = value
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
    return Path(path)


__all__ = ["AHDMILPredictor", "lowres_px_for", "read_patches", "write_maps_csv"]
