"""Grid and features of one slide for the pipeline: the store's when they fit the checkpoint, else from pixels.

- :func:`grid_from_store` / :func:`grid_from_slide`: the patch grid (``PatchGrid``) of a store slide, or of a slide
  file tiled at the checkpoint's grid (``meta.grid``);
- :func:`store_encoder_id` and :func:`check_store_features`: whether the store's features are those the checkpoint
  was trained on (encoder id, dimension, weights hash), with one clear ``StoreError`` otherwise;
- :class:`CachedFeatures` (read from the store) and :class:`EncodedFeatures` (read and encoded from the slide,
  only the rows asked for, each once): the two ``FeatureSource`` kinds a predictor sees.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from wsimil_core.checkpoint_meta import CheckpointMeta, FeatureStatsMeta
from wsimil_core.errors import CheckpointError, DataError, SlideError, StoreError
from wsimil_core.features.encoders import EncoderSpec
from wsimil_core.features.extract import encode_slide_patches, same_slide_file, slide_group_attrs, to_store_dtype
from wsimil_core.methods.predictor import FeatureSource
from wsimil_core.store.zarr_store import FeatureStore, slide_fingerprint
from wsimil_core.wsi.slide import open_slide
from wsimil_core.wsi.tiling import EmptyTissueWarning, GridSpec, PatchGrid, TissueParams, detect_tissue, make_grid


def _where(fs: Any, slide_id: str) -> str:
    return f"store {getattr(fs, 'root', fs)}: slide {slide_id!r}"


# --- grids ---------------------------------------------------------------------------------------------------


def grid_spec_of(meta: CheckpointMeta, min_tissue: float = 0.25, source: str = "checkpoint") -> GridSpec:
    """The checkpoint's patch grid as a ``GridSpec`` (``CheckpointError`` when it records none)."""
    if meta.grid is None:
        raise CheckpointError(
            f"{source}: the checkpoint records no patch grid (patch mpp / size), so the slide cannot be tiled; "
            "give a store that holds this slide's features"
        )
    g = meta.grid
    tissue = g.min_tissue if g.min_tissue is not None else min_tissue
    return GridSpec(mpp=g.patch_mpp, patch=g.patch_px, stride=g.stride, min_tissue=float(tissue))


def grid_from_store(fs: FeatureStore, slide_id: str) -> PatchGrid:
    """The patch grid of a store slide (its coords and slide attrs)."""
    attrs = fs.slide_attrs(slide_id)
    coords = np.asarray(fs.read_coords(slide_id), dtype=np.int64).reshape(-1, 2)
    size = attrs.get("patch_size_level0") or attrs.get("stride_level0")
    if not size:
        raise StoreError(f"{_where(fs, slide_id)} has no patch_size_level0 attr, so its patch grid is unknown")
    stride = int(attrs.get("stride_level0") or size)
    origin = attrs.get("grid_origin")
    if origin is None:
        lo = coords.min(axis=0) if len(coords) else np.zeros(2, np.int64)
        origin = (int(lo[0] % stride), int(lo[1] % stride))
    slide_mpp = attrs.get("slide_mpp")
    patch_mpp = attrs.get("patch_mpp")
    if patch_mpp is None and slide_mpp:
        patch_mpp = float(slide_mpp) * int(size) / int(attrs.get("patch_size") or size)
    return PatchGrid(
        coords=coords,
        size_level0=int(size),
        stride_level0=stride,
        patch_px=int(attrs.get("patch_size") or size),
        mpp=float(patch_mpp) if patch_mpp else float("nan"),
        origin=(int(origin[0]), int(origin[1])),
        slide_mpp=None if slide_mpp is None else float(slide_mpp),
        level0_size=tuple(attrs["level0_size"]) if attrs.get("level0_size") else None,
        grid_shape=tuple(attrs["grid_shape"]) if attrs.get("grid_shape") else None,
    )


def grid_from_slide(
    path: Path, spec: GridSpec, tissue: TissueParams | None = None, slide_mpp: float | None = None
) -> tuple[PatchGrid, dict[str, Any]]:
    """Tile a slide file: tissue mask + the grid ``spec``. Returns ``(grid, slide-group attrs for the store)``.

    Raises:
        SlideError: the file is missing, unreadable or has no mpp.
    """
    if not path.is_file():
        raise SlideError(f"{path}: slide file not found")
    tissue = tissue or TissueParams()
    with open_slide(path, slide_mpp=slide_mpp) as slide:
        slide.require_mpp()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", EmptyTissueWarning)
            mask = detect_tissue(slide, tissue)
            grid = make_grid(slide, mask, spec)
        attrs = slide_group_attrs(slide, path, grid, tissue, slide_fingerprint(path))
    return grid, attrs


def training_store(meta: CheckpointMeta, slide_id: str, slide_path: Path | None = None) -> FeatureStore | None:
    """The store the checkpoint was trained on (``meta.store``) when it holds this slide (same file, when the
    path is given) with the checkpoint's features; else None."""
    ref = meta.store
    if ref is None or not ref.path or not Path(ref.path).is_dir():
        return None
    try:
        fs = FeatureStore(ref.path)
        if slide_id not in fs.slide_ids():
            return None
        if slide_path is not None and not same_slide_file(fs, slide_id, slide_path):
            return None
        store_encoder_id(fs, slide_id, meta, "checkpoint")
    except (StoreError, DataError):
        return None
    return fs


# --- does the store hold the checkpoint's features? -----------------------------------------------------------


def store_encoder_id(fs: FeatureStore, slide_id: str, meta: CheckpointMeta, source: str) -> str:
    """The encoder id to read for ``slide_id``: the checkpoint's (``StoreError`` when the store lacks it), or
    the slide's only encoder when the checkpoint names none."""
    want = meta.encoder_id
    have = fs.encoder_ids(slide_id)
    if want:
        if want not in have:
            name = meta.encoder.name if meta.encoder is not None else "?"
            raise StoreError(
                f"{_where(fs, slide_id)} has features of {have or 'no encoder'}, but checkpoint {source} was "
                f"trained on encoder {want!r} ({name}); extract features with that encoder first"
            )
        return want
    if len(have) != 1:
        raise StoreError(
            f"{_where(fs, slide_id)} has features of {have or 'no encoder'} and checkpoint {source} names no "
            "encoder; keep one encoder per store or retrain with an encoder spec"
        )
    return have[0]


def check_store_features(
    dim: int, encoder_attrs: dict[str, Any] | None, meta: CheckpointMeta, source: str, where: str
) -> None:
    """``StoreError`` unless features of dimension ``dim`` with ``encoder_attrs`` fit the checkpoint (its
    ``in_dim``, its encoder's ``dim`` and weights hash)."""
    in_dim = meta.in_dim
    if in_dim is not None and dim != in_dim:
        raise StoreError(
            f"{where} has {dim}-dimensional features but checkpoint {source} expects in_dim={in_dim}; "
            "use the encoder the model was trained with"
        )
    enc = meta.encoder
    if enc is None:
        return
    if enc.dim is not None and int(enc.dim) != dim:
        raise StoreError(f"{where} has dimension {dim}, checkpoint {source} encoder has dim={enc.dim}")
    got = (encoder_attrs or {}).get("weights_sha256")
    if enc.weights_sha256 and got and enc.weights_sha256 != got:
        raise StoreError(
            f"{where} was extracted with weights {str(got)[:12]}..., but checkpoint {source} expects "
            f"{enc.weights_sha256[:12]}... (a different encoder)"
        )


# --- feature sources -----------------------------------------------------------------------------------------


def take_rows(values: np.ndarray, index: np.ndarray | None) -> np.ndarray:
    """``values`` ``[N, D]`` itself when ``index`` is None, else its rows ``index`` (a copy, gathered by torch on
    every intra-op thread: numpy's fancy indexing of 100k x 1024 floats took as long as half a model's forward)."""
    if index is None:
        return values
    rows = torch.from_numpy(np.asarray(index, dtype=np.int64).reshape(-1))
    return torch.from_numpy(values).index_select(0, rows).numpy()


class CachedFeatures:
    """Features of a store slide (read once, on first use, and checked against the checkpoint)."""

    cached = True

    def __init__(self, fs: FeatureStore, slide_id: str, encoder_id: str, meta: CheckpointMeta, source: str):
        self.fs, self.slide_id, self.encoder_id = fs, slide_id, encoder_id
        self.meta, self.source = meta, source
        self._values: np.ndarray | None = None

    def __call__(self, index: np.ndarray | None = None) -> np.ndarray:
        """float32 ``[N, D]`` (or the rows ``index``)."""
        if self._values is None:
            bag = self.fs.read_bag(self.slide_id, self.encoder_id)
            where = f"{_where(self.fs, self.slide_id)} (encoder {self.encoder_id!r})"
            check_store_features(int(bag.features.shape[1]), bag.encoder_attrs, self.meta, self.source, where)
            # float16 -> float32 through torch (vectorised; numpy's conversion took ~3x the model's forward)
            self._values = torch.from_numpy(np.ascontiguousarray(bag.features)).float().numpy()
        return take_rows(self._values, index)


class EncodedFeatures:
    """Features encoded from the slide's pixels with the checkpoint's encoder, row by row as they are asked for.

    Args:
        path: the slide file; grid: its patch grid (rows = ``grid.coords``).
        encoder: returns ``(module, EncoderSpec)`` (built once by the caller and shared across slides).
        batch_size, num_workers, slide_mpp, progress: see ``features.extract.encode_slide_patches``.
    """

    cached = False

    def __init__(
        self,
        path: Path,
        grid: PatchGrid,
        encoder: Callable[[], tuple[nn.Module, EncoderSpec]],
        batch_size: int = 64,
        num_workers: int = 0,
        slide_mpp: float | None = None,
        progress: bool = False,
    ):
        self.path, self.grid, self._encoder = Path(path), grid, encoder
        self.batch_size, self.num_workers = int(batch_size), int(num_workers)
        self.slide_mpp, self.progress = slide_mpp, progress
        self.done = np.zeros(len(grid.coords), dtype=bool)
        self._values: np.ndarray | None = None
        self.spec: EncoderSpec | None = None

    @property
    def encoder_id(self) -> str | None:
        return None if self.spec is None else self.spec.encoder_id

    @property
    def n_encoded(self) -> int:
        return int(self.done.sum())

    @property
    def complete(self) -> bool:
        return bool(self.done.all())

    def __call__(self, index: np.ndarray | None = None) -> np.ndarray:
        """float32 ``[k, D]`` features of the rows ``index`` (all rows when None), encoding those not yet done."""
        idx = np.arange(len(self.done)) if index is None else np.asarray(index, dtype=np.int64).reshape(-1)
        todo = idx[~self.done[idx]]
        if len(todo):
            module, spec = self._encoder()
            self.spec = spec
            if self._values is None:
                self._values = np.zeros((len(self.done), spec.dim), dtype=np.float32)
            if not self.path.is_file():
                raise SlideError(f"{self.path}: slide file not found (its patches must be encoded)")
            self._values[todo] = encode_slide_patches(
                self.path,
                self.grid.coords[todo],
                self.grid.size_level0,
                self.grid.patch_px,
                module,
                spec,
                batch_size=self.batch_size,
                num_workers=self.num_workers,
                slide_mpp=self.slide_mpp,
                progress=self.progress,
            )
            self.done[todo] = True
        if self._values is None:  # nothing asked for: an empty [0, D] array
            return np.zeros((0, 0), dtype=np.float32)
        return take_rows(self._values, index)

    def write_to(self, fs: FeatureStore, slide_id: str, slide_attrs: dict[str, Any]) -> None:
        """Cache the (complete) features in the store: float16 unless beyond its range, attrs of the encoder at
        this grid. ``StoreError`` when the store holds the slide with other coords."""
        if not self.complete or self.spec is None or self._values is None:
            raise DataError(f"{self.path}: only {self.n_encoded}/{len(self.done)} patches are encoded; not cached")
        try:
            stored = to_store_dtype(self._values, "float16", str(self.path))
        except DataError:  # beyond float16's range: keep float32
            stored = self._values
        attrs = self.spec.with_grid(self.grid.mpp, self.grid.patch_px).to_attrs()
        attrs["dtype"] = "float16" if stored.dtype == np.float16 else "float32"
        fs.write_bag(slide_id, stored, self.grid.coords, self.spec.encoder_id, encoder_attrs=attrs, **slide_attrs)


class StandardizedFeatures:
    """A feature source seen through the checkpoint's input standardisation, ``(x - mean) / std`` per feature
    (``CheckpointMeta.feature_stats``: the training split's statistics the model was trained with)."""

    def __init__(self, inner: FeatureSource, stats: FeatureStatsMeta, source: str):
        self.inner = inner
        self.mean = np.asarray(stats.mean, dtype=np.float32)
        self.std = np.asarray(stats.std, dtype=np.float32)
        self.source = source

    @property
    def cached(self) -> bool:
        return self.inner.cached

    @property
    def encoder_id(self) -> str | None:
        return self.inner.encoder_id

    def __call__(self, index: np.ndarray | None = None) -> np.ndarray:
        """float32 ``[N, D]`` (or the rows ``index``), standardised."""
        values = self.inner(index)
        if values.shape[-1] != len(self.mean):
            raise DataError(
                f"checkpoint {self.source} standardises {len(self.mean)} features, but the slide's features have "
                f"{values.shape[-1]}"
            )
        # one output array, computed by torch on every intra-op thread (numpy made two full-size temporaries)
        out = torch.from_numpy(np.asarray(values, dtype=np.float32)).sub(torch.from_numpy(self.mean))
        return out.div_(torch.from_numpy(self.std)).numpy()


__all__ = [
    "CachedFeatures",
    "EncodedFeatures",
    "StandardizedFeatures",
    "check_store_features",
    "grid_from_slide",
    "grid_from_store",
    "grid_spec_of",
    "store_encoder_id",
    "training_store",
]
