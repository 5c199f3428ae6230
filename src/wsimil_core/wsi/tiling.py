"""Patch grids: square patches at a physical resolution over a slide's tissue.

Pipeline (DESIGN.md "Coordinates"): slide -> low-resolution thumbnail of the ``bounds`` region -> tissue mask
(``wsimil_core.wsi.tissue``: Otsu threshold in saturation or optical-density space, hole filling, minimum-area
filtering) -> a grid of square patches at a physical resolution (``mpp``, ``patch``, ``stride``) keeping the
cells whose tissue fraction is at least ``min_tissue``. Coordinates are int64 ``[N, 2]`` level-0 (x, y) of each
patch's top-left corner, the slide's bounds offset included.

The tissue names (``TissueParams``, ``TissueMask``, ``detect_tissue``, ...) are importable from here too.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from wsimil_core._io import atomic_write
from wsimil_core.errors import ConfigError, DataError
from wsimil_core.wsi.base import Slide
from wsimil_core.wsi.tissue import (
    EmptyTissueWarning,
    TissueMask,
    TissueParams,
    detect_tissue,
    otsu_threshold,
    tissue_image,
)

__all__ = [
    "TissueParams",
    "TissueMask",
    "GridSpec",
    "PatchGrid",
    "EmptyTissueWarning",
    "detect_tissue",
    "make_grid",
    "tissue_image",
    "otsu_threshold",
]


@dataclass
class GridSpec:
    """Patch grid at a physical resolution.

    Attributes:
        mpp: µm per pixel of the patches (e.g. 0.5 ~ 20x).
        patch: patch side in pixels at ``mpp``.
        stride: step between patches in pixels at ``mpp`` (None = ``patch``, no overlap).
        min_tissue: keep cells whose tissue fraction is >= this (0..1); 0 keeps cells touching any tissue.
    """

    mpp: float = 0.5
    patch: int = 256
    stride: int | None = None
    min_tissue: float = 0.25

    def __post_init__(self) -> None:
        if not (math.isfinite(self.mpp) and self.mpp > 0):
            raise ConfigError(f"grid mpp must be a positive number, got {self.mpp!r}")
        if int(self.patch) != self.patch or self.patch < 1:
            raise ConfigError(f"grid patch must be a positive integer, got {self.patch!r}")
        if self.stride is not None and (int(self.stride) != self.stride or self.stride < 1):
            raise ConfigError(f"grid stride must be a positive integer or None, got {self.stride!r}")
        if not (0.0 <= self.min_tissue <= 1.0):
            raise ConfigError(f"grid min_tissue must be in [0, 1], got {self.min_tissue!r}")

    @property
    def stride_px(self) -> int:
        return int(self.stride if self.stride is not None else self.patch)


@dataclass
class PatchGrid:
    """Kept patches of a slide.

    Attributes:
        coords: int64 ``[N, 2]`` level-0 (x, y) of each patch's top-left corner (bounds offset included).
        size_level0: patch side in level-0 pixels.
        stride_level0: grid step in level-0 pixels.
        patch_px: output patch side in pixels (read at ``mpp``).
        mpp: patch mpp (µm per output pixel).
        origin: level-0 (x, y) of grid cell (0, 0).
        slide_mpp: µm per level-0 pixel used to build the grid.
        level0_size: level-0 (width, height) of the slide.
        tissue_fraction: float32 ``[N]`` tissue fraction of each kept cell, or None.
        grid_shape: (rows, cols) of the full grid (kept and dropped cells).
    """

    coords: np.ndarray
    size_level0: int
    stride_level0: int
    patch_px: int
    mpp: float
    origin: tuple[int, int]
    slide_mpp: float | None = None
    level0_size: tuple[int, int] | None = None
    tissue_fraction: np.ndarray | None = None
    grid_shape: tuple[int, int] | None = None

    def __len__(self) -> int:
        return int(self.coords.shape[0])

    def grid_index(self) -> np.ndarray:
        """int64 ``[N, 2]`` (col, row) cell index = ``(coords - origin) // stride_level0``."""
        return (self.coords - np.asarray(self.origin, dtype=np.int64)) // np.int64(self.stride_level0)

    def companion(self, factor: float = 4.0) -> PatchGrid:
        """The same regions read at a coarser resolution: ``mpp * factor``, ``patch_px / factor`` pixels.

        Coordinates, sizes and strides in level-0 pixels are unchanged, so patch i of both grids covers the
        same tissue (low-magnification pre-screening).
        """
        if not (math.isfinite(factor) and factor > 0):
            raise ConfigError(f"companion factor must be a positive number, got {factor!r}")
        px = int(round(self.patch_px / factor))
        if px < 1:
            raise ConfigError(f"companion factor {factor} leaves patches of {self.patch_px / factor:.2f} px (< 1)")
        return replace(self, coords=self.coords.copy(), patch_px=px, mpp=self.mpp * self.patch_px / px)

    def attrs(self) -> dict[str, Any]:
        """JSON-serialisable grid attributes (names as in the store's slide attrs)."""
        return {
            "patch_mpp": float(self.mpp),
            "patch_size": int(self.patch_px),
            "patch_size_level0": int(self.size_level0),
            "stride_level0": int(self.stride_level0),
            "grid_origin": [int(self.origin[0]), int(self.origin[1])],
            "slide_mpp": None if self.slide_mpp is None else float(self.slide_mpp),
            "level0_size": None if self.level0_size is None else [int(v) for v in self.level0_size],
            "grid_shape": None if self.grid_shape is None else [int(v) for v in self.grid_shape],
            "n_patches": len(self),
        }

    def save(self, coords_path: str | os.PathLike, extra_attrs: dict[str, Any] | None = None) -> tuple[Path, Path]:
        """Write ``<stem>.coords.npy`` (int64 [N, 2]) and ``<stem>.grid.json`` (attrs) atomically.

        Args:
            coords_path: path of the ``.coords.npy`` file.
            extra_attrs: more JSON-able attributes for the JSON file (slide path, tissue params, ...).

        Returns:
            (coords path, JSON path).
        """
        coords_path = Path(coords_path)
        json_path = _grid_json_path(coords_path)
        coords_path.parent.mkdir(parents=True, exist_ok=True)
        meta = self.attrs() | (extra_attrs or {})
        if self.tissue_fraction is not None:
            meta["tissue_fraction_mean"] = float(self.tissue_fraction.mean()) if len(self) else None
        atomic_write(coords_path, lambda f: np.save(f, np.ascontiguousarray(self.coords, dtype=np.int64)))
        atomic_write(json_path, lambda f: f.write(json.dumps(meta, indent=2).encode()))
        return coords_path, json_path

    @classmethod
    def load(cls, coords_path: str | os.PathLike) -> PatchGrid:
        """Read a grid written by :meth:`save`; ``DataError`` naming the file when missing or inconsistent."""
        coords_path = Path(coords_path)
        json_path = _grid_json_path(coords_path)
        try:
            coords = np.load(coords_path, allow_pickle=False)
            meta = json.loads(json_path.read_text())
        except (OSError, ValueError) as exc:
            raise DataError(f"{coords_path}: cannot read the patch grid: {exc}") from None
        if coords.ndim != 2 or coords.shape[1] != 2 or coords.dtype != np.int64:
            raise DataError(f"{coords_path}: coords must be int64 [N, 2], got {coords.dtype} {coords.shape}")
        if meta.get("n_patches", len(coords)) != len(coords):
            raise DataError(f"{coords_path}: {len(coords)} coords but {json_path.name} says {meta['n_patches']}")
        try:
            return cls(
                coords=coords,
                size_level0=int(meta["patch_size_level0"]),
                stride_level0=int(meta["stride_level0"]),
                patch_px=int(meta["patch_size"]),
                mpp=float(meta["patch_mpp"]),
                origin=(int(meta["grid_origin"][0]), int(meta["grid_origin"][1])),
                slide_mpp=meta.get("slide_mpp"),
                level0_size=tuple(meta["level0_size"]) if meta.get("level0_size") else None,
                grid_shape=tuple(meta["grid_shape"]) if meta.get("grid_shape") else None,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{json_path}: missing or invalid grid attribute: {exc}") from None


def _grid_json_path(coords_path: Path) -> Path:
    name = coords_path.name
    stem = name[: -len(".coords.npy")] if name.endswith(".coords.npy") else coords_path.stem
    return coords_path.with_name(f"{stem}.grid.json")


# ------------------------------------------------------------------------------------------------------
# Patch grid
# ------------------------------------------------------------------------------------------------------
def _cell_tissue_fraction(mask: TissueMask, x: np.ndarray, y: np.ndarray, size: int) -> np.ndarray:
    """Area-weighted tissue fraction of level-0 squares ``[x, x+size) x [y, y+size)`` on the mask.

    Uses a summed-area table over the mask with fractional coverage of border mask pixels, so the result
    is exact for the mask's piecewise-constant model.
    """
    m = mask.mask.astype(np.float64)
    h, w = m.shape
    sat = np.zeros((h + 1, w + 1))
    sat[1:, 1:] = m.cumsum(0).cumsum(1)

    def integral(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Integral of the mask over [0, u) x [0, v) in (col, row) mask units (bilinear in the table)."""
        u = np.clip(u, 0, w)
        v = np.clip(v, 0, h)
        u0 = np.floor(u).astype(np.int64)
        v0 = np.floor(v).astype(np.int64)
        fu, fv = u - u0, v - v0
        u1 = np.minimum(u0 + 1, w)
        v1 = np.minimum(v0 + 1, h)
        return (
            sat[v0, u0] * (1 - fu) * (1 - fv)
            + sat[v0, u1] * fu * (1 - fv)
            + sat[v1, u0] * (1 - fu) * fv
            + sat[v1, u1] * fu * fv
        )

    ds = mask.downsample
    ox, oy = mask.origin
    a = (x - ox) / ds
    b = (y - oy) / ds
    c = (x - ox + size) / ds
    d = (y - oy + size) / ds
    total = integral(c, d) - integral(a, d) - integral(c, b) + integral(a, b)
    return total / ((size / ds) ** 2)


def make_grid(slide: Slide, mask: TissueMask | None, spec: GridSpec | None = None) -> PatchGrid:
    """Patch grid over the slide's bounds at ``spec.mpp``, keeping cells with tissue fraction >= min_tissue.

    Cells are placed from the bounds origin with step ``stride_level0`` and must lie fully inside the bounds
    region. ``mask=None`` keeps every cell (tissue fraction 1).

    Raises:
        SlideError: the slide has no mpp (open it with ``slide_mpp``).
        ConfigError: the patch is smaller than one level-0 pixel.

    An implausible mpp was already warned about by ``open_slide`` (``wsi/mpp.py``).
    """
    spec = spec or GridSpec()
    slide_mpp = slide.require_mpp()
    size0 = int(round(spec.patch * spec.mpp / slide_mpp))
    stride0 = int(round(spec.stride_px * spec.mpp / slide_mpp))
    if size0 < 1 or stride0 < 1:
        raise ConfigError(
            f"{slide.path}: patch {spec.patch} px / stride {spec.stride_px} px at {spec.mpp} µm/px is below one "
            f"level-0 pixel of this slide ({slide_mpp} µm/px)"
        )
    bx, by, bw, bh = slide.bounds
    n_cols = max(0, (bw - size0) // stride0 + 1) if bw >= size0 else 0
    n_rows = max(0, (bh - size0) // stride0 + 1) if bh >= size0 else 0
    cols, rows = np.meshgrid(np.arange(n_cols, dtype=np.int64), np.arange(n_rows, dtype=np.int64))
    xs = bx + cols.ravel() * stride0
    ys = by + rows.ravel() * stride0
    if mask is None:
        frac = np.ones(xs.shape, dtype=np.float64)
    else:
        frac = _cell_tissue_fraction(mask, xs.astype(np.float64), ys.astype(np.float64), size0)
    # min_tissue = 0 keeps the cells that touch tissue at all (every cell when mask is None).
    keep = frac >= spec.min_tissue - 1e-9 if spec.min_tissue > 0 else frac > 0
    coords = np.stack([xs[keep], ys[keep]], axis=1).astype(np.int64).reshape(-1, 2)
    if coords.shape[0] == 0 and (mask is None or mask.mask.any()):
        warnings.warn(
            f"{slide.path}: no patch of {spec.patch} px at {spec.mpp} µm/px reaches min_tissue={spec.min_tissue}",
            EmptyTissueWarning,
            stacklevel=2,
        )
    return PatchGrid(
        coords=coords,
        size_level0=size0,
        stride_level0=stride0,
        patch_px=int(spec.patch),
        mpp=float(spec.mpp),
        origin=(int(bx), int(by)),
        slide_mpp=float(slide_mpp),
        level0_size=(int(slide.dimensions[0]), int(slide.dimensions[1])),
        tissue_fraction=frac[keep].astype(np.float32),
        grid_shape=(int(n_rows), int(n_cols)),
    )
