"""Where layers lie: world units, the patch-grid geometry of per-patch maps, and the hovered patch (no Qt).

World coordinates (DESIGN.md "Coordinates"): micrometres in (row, col) = (y, x) order, such that the continuous
level-0 position ``u`` (pixel ``x`` spans ``[x, x + 1)``) sits at world ``u * mpp``. napari draws array pixel
``i`` centred on ``translate + i * scale``, so every layer here gets a half-cell translate:

* slide, level 0: ``scale = (mpp, mpp)``, ``translate = (mpp / 2, mpp / 2)``; napari derives the lower levels'
  scale from the shape ratios (``downsample_factors``) and draws level-k pixel ``j`` over level-0 pixels
  ``[j * ds_k, (j + 1) * ds_k)``, which is the file's own geometry (tests check every level);
* a per-patch map: one pixel per grid cell, ``scale = stride * mpp`` and ``translate = (origin + size / 2) * mpp``,
  so the pixel of the patch at level-0 ``(x, y)`` is centred on the patch centre and, when stride == patch size,
  covers exactly ``[x, x + size) x [y, y + size)``. With overlapping patches (stride < size) it covers the
  stride-sized cell centred on the patch centre;
* the tissue mask: mask pixel (i, j) covers level-0 ``[x0 + j * ds, x0 + (j + 1) * ds)``, so
  ``scale = ds * mpp`` and ``translate = (origin + ds / 2) * mpp``.

Coordinates stored in the store already include the OpenSlide bounds offset (``openslide.bounds-x/y``), and the
slide pyramid starts at level-0 pixel (0, 0), so no extra shift is ever applied. A slide without mpp is shown in
level-0 pixels (``unit = 1``) and its metadata says ``"units": "px"``.

Layer-data tuples are ``(data, kwargs, layer_type)`` as napari readers return them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from wsimil_core.api import DataError

LayerData = tuple[Any, dict[str, Any], str]

#: metadata key under which every layer made here keeps its wsimil information
META_KEY = "wsimil"


# --------------------------------------------------------------------------------------------------------------
# world units
# --------------------------------------------------------------------------------------------------------------
def world_unit(mpp: float | None) -> tuple[float, str]:
    """World units per level-0 pixel and their name: ``(mpp, "µm")``, or ``(1.0, "px")`` without mpp."""
    if mpp is None or not math.isfinite(float(mpp)) or float(mpp) <= 0:
        return 1.0, "px"
    return float(mpp), "µm"


def layer_units(units: str, ndim: int = 2) -> tuple[str, ...]:
    """napari ``units`` of a layer: ``um`` (or ``pixel`` without mpp) on the two spatial axes, ``pixel`` before."""
    unit = "um" if units == "µm" else "pixel"
    return ("pixel",) * (ndim - 2) + (unit, unit)


# --------------------------------------------------------------------------------------------------------------
# patch grids
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GridGeometry:
    """Where a slide's patch grid lies, in level-0 pixels, and how it maps to world units.

    Attributes:
        origin: level-0 (x, y) of grid cell (0, 0) (bounds offset included).
        stride: grid step in level-0 px.
        size: patch side in level-0 px.
        shape: (rows, cols) of the grid image.
        unit: world units per level-0 px (µm/px, or 1.0 without mpp).
        units: ``"µm"`` or ``"px"``.
    """

    origin: tuple[int, int]
    stride: int
    size: int
    shape: tuple[int, int]
    unit: float = 1.0
    units: str = "px"

    def __post_init__(self) -> None:
        if self.stride < 1 or self.size < 1:
            raise DataError(f"patch grid: stride ({self.stride}) and patch size ({self.size}) must be >= 1 px")

    @classmethod
    def from_coords(
        cls,
        coords: np.ndarray,
        size: int,
        stride: int | None = None,
        origin: Sequence[int] | None = None,
        mpp: float | None = None,
        shape: Sequence[int] | None = None,
    ) -> GridGeometry:
        """Geometry of patches at ``coords`` (int ``[N, 2]`` level-0 x, y).

        ``origin`` defaults to the smallest coordinate (moved down to the nearest multiple of the stride, so that
        grids of CLAM-style imports without a ``grid_origin`` stay aligned); ``shape`` defaults to the extent of
        the coords.
        """
        coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
        size = int(size)
        stride = int(stride) if stride else size
        if origin is None:
            if len(coords):
                lo = coords.min(axis=0)
                origin = (int(lo[0] % stride), int(lo[1] % stride))
            else:
                origin = (0, 0)
        ox, oy = int(origin[0]), int(origin[1])
        if shape is None:
            if len(coords):
                idx = (coords - np.array([ox, oy])) // stride
                shape = (int(idx[:, 1].max()) + 1, int(idx[:, 0].max()) + 1)
            else:
                shape = (1, 1)
        unit, units = world_unit(mpp)
        return cls((ox, oy), stride, size, (int(shape[0]), int(shape[1])), unit, units)

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any], coords: np.ndarray, where: str = "store") -> GridGeometry:
        """Geometry from a store's slide attrs (``patch_size_level0``, ``stride_level0``, ``grid_origin``,
        ``slide_mpp``, ``grid_shape``) and its coords."""
        size = attrs.get("patch_size_level0") or attrs.get("stride_level0")
        if not size:
            raise DataError(f"{where}: slide attrs have no patch_size_level0, so the patch grid cannot be drawn")
        stride = attrs.get("stride_level0") or size
        origin = attrs.get("grid_origin")
        geo = cls.from_coords(coords, int(size), int(stride), origin, attrs.get("slide_mpp"))
        return geo

    @classmethod
    def from_patch_grid(cls, grid: Any) -> GridGeometry:
        """Geometry of a :class:`wsimil_core.wsi.tiling.PatchGrid`."""
        return cls.from_coords(grid.coords, grid.size_level0, grid.stride_level0, grid.origin, grid.slide_mpp)

    def with_coords(self, coords: np.ndarray) -> GridGeometry:
        """The same geometry with ``shape`` grown to hold every cell of ``coords``."""
        idx = self.cell_index(coords)
        if not len(idx):
            return self
        rows = max(self.shape[0], int(idx[:, 1].max()) + 1)
        cols = max(self.shape[1], int(idx[:, 0].max()) + 1)
        return GridGeometry(self.origin, self.stride, self.size, (rows, cols), self.unit, self.units)

    # --- transforms ---------------------------------------------------------------------------------------
    @property
    def scale(self) -> tuple[float, float]:
        """World size (row, col) of one grid pixel: the stride in world units."""
        s = self.stride * self.unit
        return (s, s)

    @property
    def translate(self) -> tuple[float, float]:
        """World (row, col) of the centre of cell (0, 0): the centre of a patch at the grid origin."""
        half = self.size / 2
        return ((self.origin[1] + half) * self.unit, (self.origin[0] + half) * self.unit)

    def cell_index(self, coords: np.ndarray) -> np.ndarray:
        """int64 ``[N, 2]`` (col, row) cell of each patch: ``(coords - origin) // stride``.

        Raises:
            DataError: a patch lies before the grid origin (the coords do not belong to this grid).
        """
        coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
        idx = (coords - np.asarray(self.origin, dtype=np.int64)) // np.int64(self.stride)
        if len(idx) and idx.min() < 0:
            raise DataError(f"patch grid: coords lie before the grid origin {self.origin}")
        return idx

    def world_to_level0(self, world_yx: Sequence[float]) -> tuple[float, float]:
        """Level-0 (x, y) of a world (row, col) position."""
        return (float(world_yx[-1]) / self.unit, float(world_yx[-2]) / self.unit)

    def to_dict(self) -> dict[str, Any]:
        return {
            "origin": list(self.origin),
            "stride": self.stride,
            "size": self.size,
            "shape": list(self.shape),
            "unit": self.unit,
            "units": self.units,
        }


class PatchLookup:
    """Find the patch under a world position (hover) and describe its map values.

    Args:
        geometry: the grid geometry.
        coords: int ``[N, 2]`` level-0 (x, y) of the patches.
    """

    def __init__(self, geometry: GridGeometry, coords: np.ndarray):
        self.geometry = geometry.with_coords(coords)
        self.coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
        idx = self.geometry.cell_index(self.coords)
        # cell keys (row * cols + col) sorted stably: a binary search finds a cell's patches, the last one wins
        # (vectorised: a dict of 100k cells took over a second to build)
        keys = idx[:, 1] * np.int64(self.geometry.shape[1]) + idx[:, 0]
        self._order = np.argsort(keys, kind="stable")
        self._keys = keys[self._order]
        self.maps: dict[str, np.ndarray] = {}
        #: ``{map name: MapSpec}``: categorical values are described by their category name
        self.specs: dict[str, Any] = {}

    def patch_at(self, world_yx: Sequence[float]) -> int | None:
        """Row of the patch whose square contains the world position (the most recent cell when patches
        overlap), or None."""
        g = self.geometry
        x, y = g.world_to_level0(world_yx)
        col = math.floor((x - g.origin[0] - (g.size - g.stride) / 2) / g.stride)
        row = math.floor((y - g.origin[1] - (g.size - g.stride) / 2) / g.stride)
        rows, cols = self.geometry.shape
        if not (0 <= col < cols and 0 <= row < rows):
            return None
        pos = int(np.searchsorted(self._keys, row * cols + col, side="right")) - 1
        if pos < 0 or self._keys[pos] != row * cols + col:
            return None
        return int(self._order[pos])

    def describe(self, i: int, maps: Mapping[str, np.ndarray] | None = None, max_channels: int = 4) -> str:
        """``"patch x, y = X, Y px: name=value, ..."`` for patch ``i`` (its level-0 pixel corner; ``[N, K]`` maps: the
        first channels; categorical maps: the category name)."""
        maps = self.maps if maps is None else maps
        x, y = (int(v) for v in self.coords[i])
        parts = []
        for name, values in maps.items():
            if i >= len(values):
                continue
            v = np.asarray(values[i], dtype=np.float64)
            spec = self.specs.get(name)
            if v.ndim == 0 and spec is not None and spec.is_categorical:
                parts.append(f"{name}={spec.category_of(float(v)) or _fmt(float(v))}")
            elif v.ndim == 0:
                parts.append(f"{name}={_fmt(float(v))}")
            else:
                shown = ", ".join(_fmt(float(a)) for a in v[:max_channels])
                more = ", ..." if v.shape[0] > max_channels else ""
                parts.append(f"{name}=[{shown}{more}]")
        return f"patch x, y = {x}, {y} px: " + ("; ".join(parts) if parts else "no map values")

    def position_text(self, world_yx: Sequence[float]) -> str:
        """A world (row, col) position as ``"x, y = 12.50, 3.00 µm"`` (x first, like the patch corners; ``px``
        for slides without mpp)."""
        y, x = float(world_yx[-2]), float(world_yx[-1])
        digits = 2 if self.geometry.units == "µm" else 0
        return f"x, y = {x:.{digits}f}, {y:.{digits}f} {self.geometry.units}"

    def status_at(self, world_yx: Sequence[float]) -> str | None:
        """The status text for a hovered world position, or None outside every patch."""
        i = self.patch_at(world_yx)
        return None if i is None else self.describe(i)


def _fmt(v: float) -> str:
    if not math.isfinite(v):
        return "nan"
    if v == int(v) and abs(v) < 1e6:
        return str(int(v))
    return f"{v:.4g}"


def attach_patch_status(layer: Any, lookup: PatchLookup) -> None:
    """Make ``layer``'s status (the status bar while hovering) say where the pointer is and the hovered patch's
    map values, every position in (x, y) order with its unit: ``"x, y = 130.00, 32.00 µm: <value>  |  patch x, y =
    256, 0 px: attention=0.3"`` (napari's own ``[row col]`` world position is replaced, so (y, x) µm and (x, y) px
    are never mixed).

    Wraps the layer's ``get_status`` (napari calls it with world coordinates); idempotent: attaching again only
    replaces the lookup.
    """
    if getattr(layer, "_wsimil_lookup", None) is not None:
        layer._wsimil_lookup = lookup
        return
    original: Callable[..., dict] = layer.get_status
    layer._wsimil_lookup = lookup

    def get_status(position=None, *, view_direction=None, dims_displayed=None, world=False, value=None):
        status = original(
            position, view_direction=view_direction, dims_displayed=dims_displayed, world=world, value=value
        )
        if position is None or not isinstance(status, dict):
            return status
        pos = np.asarray(position, dtype=np.float64)
        if not world:
            pos = np.asarray(layer.data_to_world(pos), dtype=np.float64)
        lookup = layer._wsimil_lookup
        where = lookup.position_text(pos[-2:])
        status["coords"] = where
        status["coordinates"] = f"{where}: {status.get('value', '')}"
        text = lookup.status_at(pos[-2:])
        if text:
            status["coordinates"] = f"{status['coordinates']}  |  {text}"
            status["value"] = f"{status.get('value', '')}  |  {text}"
        return status

    layer.get_status = get_status


__all__ = [
    "GridGeometry",
    "LayerData",
    "META_KEY",
    "PatchLookup",
    "attach_patch_status",
    "layer_units",
    "world_unit",
]
