"""The per-slide step of feature extraction and the checks around it.

One slide: :func:`prepare_slide` (tissue mask -> patch grid) -> features -> :func:`write_slide` (float16/float32 ->
``FeatureStore.write_bag``, one atomic group write). :func:`extract_slide` chains them with a DataLoader of its own
(``patches.encode_slide_patches``): the cluster driver's task (``distributed.extract_cohort_distributed``). The
local driver (``extract.extract_cohort``) runs the same prepare and write steps around one DataLoader for the
whole cohort (``stream``), so both resume and fail the same way. Also here: slide ids, the slide-group attrs and
the same-grid / same-file checks the inference pipeline reuses.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

import wsimil_core
from wsimil_core._io import jsonable
from wsimil_core.errors import DataError, SlideError, StoreError, WsimilError
from wsimil_core.features.encoders import EncoderSpec
from wsimil_core.features.patches import encode_slide_patches
from wsimil_core.store.layout import slide_fingerprint
from wsimil_core.wsi.slide import open_slide
from wsimil_core.wsi.tiling import EmptyTissueWarning, detect_tissue, make_grid

__all__ = [
    "NoTissueWarning",
    "PreparedSlide",
    "check_store_grid",
    "extract_slide",
    "failure_line",
    "grid_difference",
    "prepare_slide",
    "same_slide_file",
    "slide_group_attrs",
    "to_store_dtype",
    "write_slide",
]

# The messages of the per-slide step belong to the extraction run (one logger for local and cluster runs).
log = logging.getLogger("wsimil_core.features.extract")

_FLOAT16_MAX = float(np.finfo(np.float16).max)


class NoTissueWarning(UserWarning):
    """A slide has no patch above the tissue threshold; it is skipped (nothing written)."""


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


def check_store_grid(store: Any, slide_ids: Sequence[str], grid_spec: Any) -> None:
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
        "tissue": jsonable(tissue_params),
        "version": wsimil_core.__version__,
    }


def failure_line(exc: BaseException) -> str:
    """One summary line for a slide's failure (a DataLoader worker's error carries its traceback: keep its end)."""
    text = str(exc).strip()
    if "Traceback" in text:  # torch re-raises worker errors as "Caught X in DataLoader worker ...\n<traceback>"
        text = [ln for ln in text.splitlines() if ln.strip()][-1].strip()
        prefix = f"{type(exc).__module__}.{type(exc).__name__}: "
        return text[len(prefix) :] if isinstance(exc, WsimilError) and text.startswith(prefix) else text
    return text if isinstance(exc, WsimilError) else f"{type(exc).__name__}: {text}"


def to_store_dtype(features: np.ndarray, dtype: str, where: str) -> np.ndarray:
    """Features ``[N, D]`` in the store's dtype (``DataError`` when values exceed float16's range)."""
    if dtype == "float32":
        return features.astype(np.float32, copy=False)
    peak = float(np.abs(features).max()) if features.size else 0.0
    if not math.isfinite(peak) or peak > _FLOAT16_MAX:
        raise DataError(f"{where}: feature values reach {peak:g}, beyond float16's range; use --dtype float32")
    return features.astype(np.float16)


@dataclass(frozen=True)
class PreparedSlide:
    """A slide ready to encode: what :func:`prepare_slide` found (the patches to read and the group attrs).

    Attributes:
        path, sid: the slide file and its id in the store.
        coords: int64 ``[N, 2]`` level-0 top-left corners of the patches (``N == 0``: no tissue).
        size_level0: level-0 side of a patch region; ``patch_px``: side of the patch given to the encoder.
        mpp: µm per pixel of the patches; ``attrs``: the slide-group attrs to write.
    """

    path: Path
    sid: str
    coords: np.ndarray
    size_level0: int
    patch_px: int
    mpp: float
    attrs: dict[str, Any]


def prepare_slide(
    path: Path,
    sid: str,
    fs: Any,
    grid_spec: Any,
    tissue_params: Any,
    *,
    slide_mpp: float | None,
    backend: str,
    warn_empty: bool = True,
) -> PreparedSlide:
    """Tissue -> grid of one slide (or the coords another encoder already stored for it). A slide without tissue
    gives ``coords`` of length 0 and a :class:`NoTissueWarning` (only a log line with ``warn_empty=False``).

    Raises ``SlideError`` (missing/unreadable file, no mpp) and ``StoreError`` (the store's slide of this id was
    made from another file)."""
    if not path.is_file() and not path.is_dir():
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
    return PreparedSlide(path, sid, coords, int(grid.size_level0), int(grid.patch_px), float(grid.mpp), attrs)


def write_slide(prepared: PreparedSlide, features: np.ndarray, fs: Any, spec: EncoderSpec, dtype: str) -> int:
    """Float32 ``features [N, spec.dim]`` of ``prepared`` cast to ``dtype`` and written as the slide's group (one
    atomic write). Returns ``N``."""
    feats = to_store_dtype(features, dtype, str(prepared.path))
    enc_attrs = spec.with_grid(prepared.mpp, prepared.patch_px).to_attrs()
    enc_attrs["dtype"] = dtype
    fs.write_bag(prepared.sid, feats, prepared.coords, spec.encoder_id, encoder_attrs=enc_attrs, **prepared.attrs)
    return len(prepared.coords)


def extract_slide(
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
    """Tissue -> grid -> features -> atomic write of one slide, with a DataLoader of its own. Returns the number
    of patches (0 = no tissue). The cluster driver's step; ``extract_cohort`` streams a whole cohort through one
    DataLoader instead (``features.stream``), with the same prepare and write steps.

    ``warn_empty=False`` only logs a slide without tissue (cluster workers: the client warns instead; a thread
    must not touch the process-wide warning filters with ``warnings.catch_warnings``)."""
    prepared = prepare_slide(
        path, sid, fs, grid_spec, tissue_params, slide_mpp=slide_mpp, backend=backend, warn_empty=warn_empty
    )
    if len(prepared.coords) == 0:
        return 0
    feats = encode_slide_patches(
        path,
        prepared.coords,
        prepared.size_level0,
        prepared.patch_px,
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
    return write_slide(prepared, feats, fs, spec, dtype)


def same_slide_file(fs: Any, sid: str, path: Path) -> bool:
    """False only when both the stored and the current fingerprint are known and differ."""
    stored = fs.slide_attrs(sid)
    if not path.is_file() or "slide_sha256_1mib" not in stored:
        return True
    now = slide_fingerprint(path)
    return stored["slide_sha256_1mib"] == now["slide_sha256_1mib"] and stored.get("slide_size") in (
        None,
        now["slide_size"],
    )
