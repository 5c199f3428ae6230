"""Batched, resumable patch-feature extraction into the feature store.

Per slide: tissue mask -> patch grid -> a ``DataLoader`` whose worker processes read patches with
``Slide.read_patch`` (each worker opens its own slide handle) -> the encoder on batches (CUDA + float16 autocast
when present, float32 on the CPU) -> features cast to float16 (or float32) -> ``FeatureStore.write_bag``, which
writes the slide's group atomically.

Resuming: a slide whose group already holds complete features for this ``encoder_id`` is skipped, so an
interrupted run re-run with the same arguments finishes the remaining slides and ends in the same store as an
uninterrupted run. A slide that fails (missing, corrupt, no mpp...) is reported by name and the run continues;
:class:`ExtractSummary` lists what happened and the CLI exits non-zero when any slide failed.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from wsimil_core._io import jsonable
from wsimil_core.devices import resolve_device
from wsimil_core.errors import ConfigError, DataError, StoreError, WsimilError
from wsimil_core.features.encoders import EncoderSpec, create_encoder, encode_tensor, module_device, preprocess_batch

log = logging.getLogger(__name__)

_FLOAT16_MAX = float(np.finfo(np.float16).max)
_DOUBLE_SUFFIXES = (".ome.tiff", ".ome.tif", ".ome.zarr")


class NoTissueWarning(UserWarning):
    """A slide has no patch above the tissue threshold; it is skipped (nothing written)."""


# ------------------------------------------------------------------------------------------------------------
# Small helpers
# ------------------------------------------------------------------------------------------------------------
def slide_id_from_path(path: str | Path) -> str:
    """The store group name of a slide: its file name without the extension (``a.ome.tiff`` -> ``a``), made
    safe with ``store.safe_slide_id`` (characters other than letters, digits, ``._-`` become ``_``)."""
    from wsimil_core.store.zarr_store import safe_slide_id

    name = Path(path).name
    for suffix in _DOUBLE_SUFFIXES:
        if name.lower().endswith(suffix):
            return safe_slide_id(name[: -len(suffix)])
    return safe_slide_id(Path(name).stem or name)


_jsonable = jsonable  # dataclasses, tuples, numpy values and paths -> JSON-friendly values (store attrs)


# ------------------------------------------------------------------------------------------------------------
# Reading patches in worker processes
# ------------------------------------------------------------------------------------------------------------
class PatchDataset(torch.utils.data.Dataset):
    """Patches of one slide at level-0 coordinates, read with ``Slide.read_patch``.

    The slide is opened lazily in whichever process calls ``__getitem__`` first, so every DataLoader worker
    opens its own handle (handles are never pickled or shared across processes).

    Item ``i``: uint8 tensor ``[patch_px, patch_px, 3]`` (RGB) of the region ``coords[i]`` .. ``+ size_level0``.
    """

    def __init__(
        self,
        path: str | Path,
        coords: np.ndarray,
        size_level0: int,
        patch_px: int,
        slide_mpp: float | None = None,
        backend: str = "auto",
    ):
        self.path = Path(path)
        self.coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
        self.size_level0 = int(size_level0)
        self.patch_px = int(patch_px)
        self.slide_mpp = slide_mpp
        self.backend = backend
        self._slide: Any = None

    def __len__(self) -> int:
        return len(self.coords)

    def __getitem__(self, i: int) -> torch.Tensor:
        if self._slide is None:
            from wsimil_core.wsi.slide import open_slide

            self._slide = open_slide(self.path, backend=self.backend, slide_mpp=self.slide_mpp)
        x, y = (int(v) for v in self.coords[i])
        patch = self._slide.read_patch(x, y, self.size_level0, self.patch_px)
        arr = np.ascontiguousarray(patch, dtype=np.uint8)
        if not arr.flags.writeable:  # e.g. a read-only view of a decoded tile
            arr = arr.copy()
        return torch.from_numpy(arr)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_slide"] = None
        return state

    def close(self) -> None:
        if self._slide is not None:
            close = getattr(self._slide, "close", None)
            if close is not None:
                close()
            self._slide = None


def _worker_init(worker_id: int) -> None:
    """Worker processes only read pixels: keep their torch single-threaded (no core oversubscription)."""
    torch.set_num_threads(1)


@torch.inference_mode()
def encode_slide_patches(
    path: str | Path,
    coords: np.ndarray,
    size_level0: int,
    patch_px: int,
    model: nn.Module,
    spec: EncoderSpec,
    *,
    batch_size: int = 64,
    num_workers: int = 2,
    amp: bool = True,
    slide_mpp: float | None = None,
    backend: str = "auto",
    progress: bool = True,
    desc: str | None = None,
) -> np.ndarray:
    """Encode the patches of one slide in batches; returns float32 features ``[N, spec.dim]`` (CPU numpy).

    ``num_workers`` worker processes read patches (0 = read in this process); the encoder runs on the model's
    device (float16 autocast on CUDA when ``amp``).
    """
    from tqdm.auto import tqdm

    dataset = PatchDataset(path, coords, size_level0, patch_px, slide_mpp=slide_mpp, backend=backend)
    device = module_device(model)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=max(1, int(batch_size)),
        shuffle=False,
        num_workers=max(0, int(num_workers)),
        pin_memory=device.type == "cuda",
        drop_last=False,
        worker_init_fn=_worker_init if num_workers > 0 else None,
    )
    out = np.empty((len(dataset), spec.dim), dtype=np.float32)
    start = 0
    bar = tqdm(total=len(dataset), desc=desc or Path(path).name, unit="patch", leave=False, disable=not progress)
    try:
        for batch in loader:
            x = preprocess_batch(spec, batch, device)
            feats = encode_tensor(model, x, amp=amp).float().cpu().numpy()
            out[start : start + len(feats)] = feats
            start += len(feats)
            bar.update(len(feats))
    finally:
        bar.close()
        dataset.close()
    if start != len(dataset):  # pragma: no cover - DataLoader contract
        raise RuntimeError(f"{path}: encoded {start} of {len(dataset)} patches")
    return out


# ------------------------------------------------------------------------------------------------------------
# The cohort driver
# ------------------------------------------------------------------------------------------------------------
@dataclass
class ExtractSummary:
    """What :func:`extract_cohort` did.

    Attributes:
        encoder_id: the ``features/<encoder_id>`` key written.
        done: slide ids extracted in this run.
        skipped: slide ids already complete in the store (not recomputed).
        empty: slide ids with zero tissue patches (warned about, nothing written).
        failed: ``{slide file name: one-line error}`` for slides that could not be extracted.
        n_patches: patches encoded in this run.
    """

    encoder_id: str
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    empty: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    n_patches: int = 0

    @property
    def ok(self) -> bool:
        return not self.failed

    def lines(self) -> list[str]:
        """Human-readable summary, one line per fact."""
        out = [f"extracted {len(self.done)} slide(s), {self.n_patches} patches, features/{self.encoder_id}"]
        if self.skipped:
            out.append(f"skipped {len(self.skipped)} already done")
        if self.empty:
            out.append(f"skipped {len(self.empty)} without tissue: {', '.join(self.empty)}")
        for name, err in self.failed.items():
            out.append(f"FAILED {name}: {err}")
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())


def _open_store(store: Any) -> Any:
    from wsimil_core.store.zarr_store import FeatureStore

    if isinstance(store, FeatureStore):
        return store
    return FeatureStore(Path(store), create=True)


def grid_difference(attrs: dict[str, Any], grid_spec: Any) -> str | None:
    """None when the stored slide attrs were tiled with ``grid_spec``; else a description of the difference."""
    want_stride = grid_spec.stride if grid_spec.stride is not None else grid_spec.patch
    have_mpp = attrs.get("patch_mpp")
    have_patch = attrs.get("patch_size")
    diffs = []
    if have_mpp is not None and not math.isclose(float(have_mpp), float(grid_spec.mpp), rel_tol=1e-6):
        diffs.append(f"mpp {have_mpp} (asked {grid_spec.mpp})")
    if have_patch is not None and int(have_patch) != int(grid_spec.patch):
        diffs.append(f"patch {have_patch} px (asked {grid_spec.patch})")
    size0, stride0 = attrs.get("patch_size_level0"), attrs.get("stride_level0")
    if size0 and stride0 is not None and have_patch:
        have_stride = round(float(stride0) / float(size0) * int(have_patch))
        if int(have_stride) != int(want_stride):
            diffs.append(f"stride {have_stride} px (asked {want_stride})")
    return "; ".join(diffs) or None


def _check_store_grid(store: Any, slide_ids: Sequence[str], grid_spec: Any) -> None:
    """A clear ``StoreError`` before any work when the store holds a slide tiled with another grid."""
    present = set(store.slide_ids())
    for sid in slide_ids:
        if sid not in present:
            continue
        diff = grid_difference(store.slide_attrs(sid), grid_spec)
        if diff:
            raise StoreError(
                f"{Path(str(store.root)) / sid}: this store was tiled with a different patch grid: {diff}; "
                "use the same --mpp/--patch/--stride as before or another --store"
            )


def slide_group_attrs(slide: Any, path: Path, grid: Any, tissue_params: Any, fingerprint: dict[str, Any]) -> dict:
    """The slide-group attrs DESIGN.md lists."""
    from wsimil_core import __version__

    w, h = slide.level_dimensions[0]
    return {
        "slide_path": str(path.resolve()),
        "slide_sha256_1mib": fingerprint["slide_sha256_1mib"],
        "slide_size": int(fingerprint["slide_size"]),
        "level0_size": [int(w), int(h)],
        "slide_mpp": float(slide.require_mpp()),
        "patch_mpp": float(grid.mpp),
        "patch_size": int(grid.patch_px),
        "patch_size_level0": int(grid.size_level0),
        "stride_level0": int(grid.stride_level0),
        "grid_origin": [int(v) for v in grid.origin],
        "tissue": _jsonable(tissue_params),
        "version": __version__,
    }


def _one_line(exc: BaseException) -> str:
    """One summary line for a slide's failure (a DataLoader worker's error carries its traceback: keep its end)."""
    text = str(exc).strip()
    if "Traceback" in text:  # torch re-raises worker errors as "Caught X in DataLoader worker ...\n<traceback>"
        text = [ln for ln in text.splitlines() if ln.strip()][-1].strip()
        prefix = f"{type(exc).__module__}.{type(exc).__name__}: "
        return text[len(prefix) :] if isinstance(exc, WsimilError) and text.startswith(prefix) else text
    return text if isinstance(exc, WsimilError) else f"{type(exc).__name__}: {text}"


def to_store_dtype(features: np.ndarray, dtype: str, where: str) -> np.ndarray:
    if dtype == "float32":
        return features.astype(np.float32, copy=False)
    peak = float(np.abs(features).max()) if features.size else 0.0
    if not math.isfinite(peak) or peak > _FLOAT16_MAX:
        raise DataError(f"{where}: feature values reach {peak:g}, beyond float16's range; use --dtype float32")
    return features.astype(np.float16)


def extract_cohort(
    slides: Sequence[str | Path],
    store: Any,
    encoder_name: str,
    grid_spec: Any,
    tissue_params: Any,
    weights: str | Path | None = None,
    device: str = "auto",
    batch_size: int = 64,
    num_workers: int = 2,
    *,
    dtype: str = "float16",
    slide_mpp: float | None = None,
    backend: str = "auto",
    amp: bool = True,
    progress: bool = True,
    encoder: tuple[nn.Module, EncoderSpec] | None = None,
    on_slide_done: Callable[[str], None] | None = None,
) -> ExtractSummary:
    """Extract features of ``slides`` into ``store`` (resumable; one atomic group write per slide).

    Args:
        slides: slide files; their ids in the store are :func:`slide_id_from_path` (must be unique).
        store: a ``FeatureStore`` or a directory (created when missing).
        encoder_name: see :func:`wsimil_core.features.encoders.create_encoder`.
        grid_spec: ``tiling.GridSpec`` (patch mpp, size, stride, min tissue fraction).
        tissue_params: ``tiling.TissueParams``.
        weights: local weights file of the encoder (None = random init, with a loud warning).
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``...
        batch_size, num_workers: DataLoader settings (workers read patches in their own processes).
        dtype: ``"float16"`` (default) or ``"float32"`` features in the store.
        slide_mpp: µm per level-0 pixel for slides without mpp metadata.
        backend: slide reader backend (``"auto"``, ``"openslide"``, ``"tifffile"``).
        amp: float16 autocast on CUDA.
        progress: tqdm bars (overall and per slide).
        encoder: an already built ``(module, spec)`` (then ``encoder_name``/``weights`` are not used).
        on_slide_done: called with each slide id right after its group is written (progress hooks, tests).

    Returns:
        ExtractSummary. Per-slide failures are collected, not raised; a store tiled with another grid raises
        ``StoreError`` before any work.
    """
    from tqdm.auto import tqdm

    if dtype not in ("float16", "float32"):
        raise ConfigError(f"dtype must be 'float16' or 'float32', got {dtype!r}")
    paths = [Path(p) for p in slides]
    ids = [slide_id_from_path(p) for p in paths]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise ConfigError(f"several slides map to the same store id(s) {dupes}; rename them")
    fs = _open_store(store)
    _check_store_grid(fs, ids, grid_spec)

    if encoder is None:
        model, spec = create_encoder(encoder_name, weights=weights, device=resolve_device(device))
    else:
        model, spec = encoder
    summary = ExtractSummary(encoder_id=spec.encoder_id)
    todo = _plan(fs, paths, ids, summary, progress=progress)

    overall = tqdm(total=len(todo), desc="slides", unit="slide", disable=not progress)
    try:
        for path, sid in todo:
            overall.set_postfix_str(sid)
            try:
                n = _extract_one(
                    path,
                    sid,
                    fs,
                    model,
                    spec,
                    grid_spec,
                    tissue_params,
                    dtype=dtype,
                    slide_mpp=slide_mpp,
                    backend=backend,
                    amp=amp,
                    batch_size=batch_size,
                    num_workers=num_workers,
                    progress=progress,
                )
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as exc:  # noqa: BLE001 - one bad slide never stops the cohort
                line = _one_line(exc)
                log.debug("%s: traceback", path.name, exc_info=True)
                summary.failed[path.name] = line
                log.error("%s: extraction failed: %s", path.name, line)
                if progress:
                    tqdm.write(f"FAILED {path.name}: {line}")
                overall.update(1)
                continue
            overall.update(1)
            if n == 0:
                summary.empty.append(sid)
                continue
            summary.done.append(sid)
            summary.n_patches += n
            if on_slide_done is not None:
                on_slide_done(sid)
    finally:
        overall.close()
    return summary


def _plan(
    fs: Any, paths: Sequence[Path], ids: Sequence[str], summary: ExtractSummary, *, progress: bool
) -> list[tuple[Path, str]]:
    """The ``(path, slide_id)`` pairs still to extract. Slides complete in the store for ``summary.encoder_id``
    go to ``summary.skipped``; a complete slide made from another file goes to ``summary.failed``.
    Shared by :func:`extract_cohort` and ``extract_distributed.extract_cohort_distributed`` (same resuming)."""
    from tqdm.auto import tqdm

    todo = []
    for path, sid in zip(paths, ids):
        if not fs.has_bag(sid, summary.encoder_id):
            todo.append((path, sid))
        elif same_slide_file(fs, sid, path):
            summary.skipped.append(sid)
        else:
            summary.failed[path.name] = (
                f"{Path(str(fs.root)) / sid}: the store's slide {sid!r} was made from another file than {path}; "
                "rename the slide or use another --store"
            )
    if summary.skipped:
        msg = f"skipped {len(summary.skipped)} already done (features/{summary.encoder_id})"
        log.info(msg)
        if progress:
            tqdm.write(msg)
    return todo


def _extract_one(
    path: Path,
    sid: str,
    fs: Any,
    model: nn.Module,
    spec: EncoderSpec,
    grid_spec: Any,
    tissue_params: Any,
    *,
    dtype: str,
    slide_mpp: float | None,
    backend: str,
    amp: bool,
    batch_size: int,
    num_workers: int,
    progress: bool,
    warn_empty: bool = True,
) -> int:
    """Tissue -> grid -> features -> atomic write of one slide. Returns the number of patches (0 = no tissue).

    ``warn_empty=False`` only logs a slide without tissue (cluster workers: the client warns instead; a thread
    must not touch the process-wide warning filters with ``warnings.catch_warnings``)."""
    from wsimil_core.store.zarr_store import slide_fingerprint
    from wsimil_core.wsi.slide import open_slide
    from wsimil_core.wsi.tiling import EmptyTissueWarning, detect_tissue, make_grid

    if not path.is_file() and not path.is_dir():
        from wsimil_core.errors import SlideError

        raise SlideError(f"{path}: file not found")
    fingerprint = slide_fingerprint(path)
    with open_slide(path, backend=backend, slide_mpp=slide_mpp) as slide:
        slide.require_mpp()
        with warnings.catch_warnings():  # tiling's EmptyTissueWarning is replaced by one NoTissueWarning below
            warnings.simplefilter("ignore", EmptyTissueWarning)
            mask = detect_tissue(slide, tissue_params)
            grid = make_grid(slide, mask, grid_spec)
        attrs = slide_group_attrs(slide, path, grid, tissue_params, fingerprint)
    coords = np.asarray(grid.coords, dtype=np.int64).reshape(-1, 2)
    if sid in fs.slide_ids():
        # Another encoder already wrote this slide with the same grid (checked up front): reuse its coords so
        # the encoders' features align row by row, and keep the tissue parameters those coords came from.
        if not same_slide_file(fs, sid, path):
            raise StoreError(
                f"{Path(str(fs.root)) / sid}: the store's slide {sid!r} was made from another file than {path}; "
                "rename the slide or use another --store"
            )
        coords = np.asarray(fs.read_coords(sid), dtype=np.int64).reshape(-1, 2)
        attrs = {k: v for k, v in attrs.items() if k not in ("tissue", "grid_origin")}
    if len(coords) == 0:
        msg = f"{path.name}: no tissue patch (min tissue {getattr(grid_spec, 'min_tissue', '?')}); skipped"
        if warn_empty:
            warnings.warn(msg, NoTissueWarning, stacklevel=3)
        log.warning(msg)
        return 0
    feats = encode_slide_patches(
        path,
        coords,
        grid.size_level0,
        grid.patch_px,
        model,
        spec,
        batch_size=batch_size,
        num_workers=num_workers,
        amp=amp,
        slide_mpp=slide_mpp,
        backend=backend,
        progress=progress,
        desc=sid,
    )
    feats = to_store_dtype(feats, dtype, str(path))
    enc_attrs = spec.with_grid(grid.mpp, grid.patch_px).to_attrs()
    enc_attrs["dtype"] = dtype
    fs.write_bag(sid, feats, coords, spec.encoder_id, encoder_attrs=enc_attrs, **attrs)
    return len(coords)


def same_slide_file(fs: Any, sid: str, path: Path) -> bool:
    """False only when both the stored and the current fingerprint are known and differ."""
    from wsimil_core.store.zarr_store import slide_fingerprint

    stored = fs.slide_attrs(sid)
    if not path.is_file() or "slide_sha256_1mib" not in stored:
        return True
    now = slide_fingerprint(path)
    return stored["slide_sha256_1mib"] == now["slide_sha256_1mib"] and stored.get("slide_size") in (
        None,
        now["slide_size"],
    )


__all__ = [
    "ExtractSummary",
    "NoTissueWarning",
    "PatchDataset",
    "encode_slide_patches",
    "extract_cohort",
    "grid_difference",
    "same_slide_file",
    "slide_group_attrs",
    "slide_id_from_path",
    "to_store_dtype",
]
