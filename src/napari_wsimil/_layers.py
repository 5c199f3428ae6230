"""Pure layer construction: slides, tissue masks and per-patch maps as napari layer-data tuples (no Qt).

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

from wsimil_core.errors import DataError

LayerData = tuple[Any, dict[str, Any], str]

#: metadata key under which every layer made here keeps its wsimil information
META_KEY = "wsimil"

#: colormaps of scalar maps
SCALAR_COLORMAP = "inferno"
DEFAULT_OPACITY = 0.6

#: maps whose value is a category (shown as a Labels layer), per DESIGN.md and issue 9
_CATEGORICAL_EXACT = ("memory/component", "prescreen/keep")
_CATEGORICAL_PREFIXES = ("routing/",)
_NOT_CATEGORICAL_SUFFIXES = ("/weight", "/weights")
#: at most this many categories for a Labels layer (more: shown as a scalar image)
MAX_CATEGORIES = 256


# --------------------------------------------------------------------------------------------------------------
# slides
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


def slide_metadata(slide: Any) -> dict[str, Any]:
    """The metadata of a slide layer (``layer.metadata["wsimil"]``)."""
    unit, units = world_unit(slide.mpp)
    return {
        "kind": "slide",
        "slide_path": str(slide.path),
        "mpp": None if slide.mpp is None else float(slide.mpp),
        "units": units,
        "unit_per_level0_px": unit,
        "levels": int(slide.level_count),
        "level_dimensions": [list(map(int, d)) for d in slide.level_dimensions],
        "level_downsamples": [float(d) for d in slide.level_downsamples],
        "vendor": slide.vendor,
        "backend": slide.backend,
        "bounds": [int(v) for v in slide.bounds],
        "objective_power": slide.objective_power,
    }


def slide_layer_data(slide: Any, name: str | None = None, min_level_side: int = 1) -> LayerData:
    """A multiscale RGB image layer of ``slide`` built from its lazy dask pyramid (reads no pixels).

    Args:
        slide: an open :class:`wsimil_core.wsi.slide.Slide` (it must stay open while the layer is shown).
        name: layer name (default: the file name).
        min_level_side: drop pyramid levels whose shorter side is below this many pixels (napari needs
            each level at least 1 px).

    Returns:
        ``(levels [h_k, w_k, 3] uint8 dask arrays, kwargs, "image")``.
    """
    levels = [lv for lv in slide.dask_pyramid() if min(lv.shape[:2]) >= min_level_side]
    unit, units = world_unit(slide.mpp)
    meta = slide_metadata(slide)
    kwargs = {
        "name": name or slide.path.name,
        "rgb": True,
        "multiscale": len(levels) > 1,
        "scale": (unit, unit),
        "translate": (unit / 2, unit / 2),
        "units": layer_units(units),
        "metadata": {META_KEY: meta, "slide": slide},
        "contrast_limits": (0, 255),
    }
    data = levels if len(levels) > 1 else levels[0]
    return data, kwargs, "image"


def tissue_layer_data(mask: Any, mpp: float | None, name: str = "tissue mask") -> LayerData:
    """A Labels layer (1 = tissue) of a :class:`wsimil_core.wsi.tiling.TissueMask`, aligned with the slide."""
    unit, units = world_unit(mpp)
    ds = float(mask.downsample)
    x0, y0 = mask.origin
    kwargs = {
        "name": name,
        "scale": (ds * unit, ds * unit),
        "translate": ((y0 + ds / 2) * unit, (x0 + ds / 2) * unit),
        "opacity": 0.3,
        "visible": False,
        "units": layer_units(units),
        "metadata": {
            META_KEY: {
                "kind": "tissue",
                "downsample": ds,
                "origin": [int(x0), int(y0)],
                "units": units,
                "threshold": float(mask.threshold),
            }
        },
    }
    return np.asarray(mask.mask, dtype=np.uint8), kwargs, "labels"


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
        self._cells = {(int(c), int(r)): i for i, (c, r) in enumerate(idx)}
        self.maps: dict[str, np.ndarray] = {}

    def patch_at(self, world_yx: Sequence[float]) -> int | None:
        """Row of the patch whose square contains the world position (the most recent cell when patches
        overlap), or None."""
        g = self.geometry
        x, y = g.world_to_level0(world_yx)
        col = math.floor((x - g.origin[0] - (g.size - g.stride) / 2) / g.stride)
        row = math.floor((y - g.origin[1] - (g.size - g.stride) / 2) / g.stride)
        return self._cells.get((col, row))

    def describe(self, i: int, maps: Mapping[str, np.ndarray] | None = None, max_channels: int = 4) -> str:
        """``"patch (x, y): name=value, ..."`` for patch ``i`` (``[N, K]`` maps: the first channels)."""
        maps = self.maps if maps is None else maps
        x, y = (int(v) for v in self.coords[i])
        parts = []
        for name, values in maps.items():
            if i >= len(values):
                continue
            v = np.asarray(values[i], dtype=np.float64)
            if v.ndim == 0:
                parts.append(f"{name}={_fmt(float(v))}")
            else:
                shown = ", ".join(_fmt(float(a)) for a in v[:max_channels])
                more = ", ..." if v.shape[0] > max_channels else ""
                parts.append(f"{name}=[{shown}{more}]")
        return f"patch ({x}, {y}): " + ("; ".join(parts) if parts else "no map values")

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
    """Make ``layer``'s status (the status bar while hovering) end with the hovered patch's map values.

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
        text = layer._wsimil_lookup.status_at(pos[-2:])
        if text:
            status["coordinates"] = f"{status.get('coordinates', '')}  |  {text}"
            status["value"] = f"{status.get('value', '')}  |  {text}"
        return status

    layer.get_status = get_status


# --------------------------------------------------------------------------------------------------------------
# maps
# --------------------------------------------------------------------------------------------------------------
def is_categorical_name(name: str) -> bool:
    """Whether a map name denotes categories (``memory/component``, ``routing/*`` except ``*/weight``,
    ``prescreen/keep``)."""
    if name.endswith(_NOT_CATEGORICAL_SUFFIXES):
        return False
    return name in _CATEGORICAL_EXACT or name.startswith(_CATEGORICAL_PREFIXES) or name.endswith("/component")


def map_kind(name: str, values: np.ndarray) -> str:
    """``"categorical"`` (a categorical name whose finite values are small non-negative integers),
    ``"channels"`` (``[N, K]`` with K > 1) or ``"scalar"``."""
    v = np.asarray(values)
    if v.ndim not in (1, 2):
        raise DataError(f"map {name!r} has shape {v.shape}; expected [N] or [N, K]")
    if is_categorical_name(name):
        finite = v[np.isfinite(v)] if np.issubdtype(v.dtype, np.floating) else v
        if finite.size == 0 or (
            np.all(finite >= 0) and np.all(finite == np.round(finite)) and finite.max() < MAX_CATEGORIES
        ):
            return "categorical"
    if v.ndim == 2 and v.shape[1] > 1:
        return "channels"
    return "scalar"


def rasterize(values: np.ndarray, cells: np.ndarray, shape: tuple[int, int], fill: float = np.nan) -> np.ndarray:
    """Scatter per-patch values onto the grid image.

    Args:
        values: ``[n]`` or ``[n, K]`` values of the first ``n`` patches.
        cells: int ``[>= n, 2]`` (col, row) cell of each patch (only the first ``n`` rows are used).
        shape: (rows, cols) of the grid.
        fill: value of cells without a patch (NaN: no tissue).

    Returns:
        float32 ``[rows, cols]``, or ``[K, rows, cols]`` for ``[n, K]`` values.
    """
    v = np.asarray(values, dtype=np.float32)
    n = v.shape[0]
    c = np.asarray(cells)[:n]
    rows, cols = int(shape[0]), int(shape[1])
    if v.ndim == 1:
        out = np.full((rows, cols), fill, dtype=np.float32)
        out[c[:, 1], c[:, 0]] = v
        return out
    k = v.shape[1]
    out = np.full((k, rows, cols), fill, dtype=np.float32)
    out[:, c[:, 1], c[:, 0]] = v.T
    return out


def rasterize_labels(values: np.ndarray, cells: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Categorical values as Labels data: int32, category ``c`` -> label ``c + 1``, 0 = no patch or NaN."""
    v = np.asarray(values, dtype=np.float64)
    lab = np.where(np.isfinite(v), v + 1, 0).astype(np.int32)
    out = rasterize(lab.astype(np.float32), cells, shape, fill=0.0)
    return out.astype(np.int32)


def category_names(name: str, values: np.ndarray) -> dict[int, str]:
    """``{label id: text}`` of the categories present in a categorical map (label id = category + 1)."""
    v = np.asarray(values, dtype=np.float64)
    present = sorted({int(a) for a in np.unique(v[np.isfinite(v)])})
    if name == "prescreen/keep":
        names = {0: "dropped", 1: "kept"}
        return {c + 1: names.get(c, str(c)) for c in present}
    base = name.rstrip("/").split("/")[-1] if not name.startswith("routing/") else "expert"
    if name == "memory/component" or name.endswith("/component"):
        base = "component"
    return {c + 1: f"{base} {c}" for c in present}


def contrast_limits(values: np.ndarray) -> tuple[float, float]:
    """Finite (min, max) of ``values``, widened when constant; (0, 1) when nothing is finite."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return (0.0, 1.0)
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        pad = abs(lo) * 0.01 or 1.0
        return (lo - pad, hi + pad)
    return (lo, hi)


def map_layer_name(name: str, prefix: str = "") -> str:
    """Layer name of a map: the map's slash path, after an optional prefix (``"<slide>: "``)."""
    return f"{prefix}{name}"


def map_layer_data(
    name: str,
    values: np.ndarray,
    geometry: GridGeometry,
    coords: np.ndarray,
    *,
    prefix: str = "",
    extra_meta: Mapping[str, Any] | None = None,
    kind: str | None = None,
) -> LayerData:
    """The layer of one per-patch map (values of the first ``len(values)`` patches of ``coords``).

    * scalar ``[N]`` (or ``[N, 1]``): float32 grid image, NaN where there is no patch, ``inferno`` colormap,
      opacity 0.6, contrast limits = finite min/max;
    * channels ``[N, K]``: one ``[K, rows, cols]`` image whose first axis is a channel slider;
    * categorical: int32 Labels (category + 1; 0 = none) with a legend in ``metadata["wsimil"]["legend"]``.

    The layer's ``metadata["wsimil"]`` holds ``kind``, ``map``, the geometry and anything in ``extra_meta``.
    """
    v = np.asarray(values, dtype=np.float32)
    if v.ndim == 2 and v.shape[1] == 1:
        v = v[:, 0]
    kind = kind or map_kind(name, v)
    geometry = geometry.with_coords(coords)
    cells = geometry.cell_index(coords)
    if len(cells) < v.shape[0]:
        raise DataError(f"map {name!r} has {v.shape[0]} values for {len(cells)} patches")
    meta = {"kind": "map", "map_kind": kind, "map": name, "geometry": geometry.to_dict(), **(extra_meta or {})}
    kwargs: dict[str, Any] = {"name": map_layer_name(name, prefix), "metadata": {META_KEY: meta}}
    scale, translate = geometry.scale, geometry.translate
    if kind == "categorical":
        meta["legend"] = category_names(name, v)
        data = rasterize_labels(v, cells, geometry.shape)
        if data.ndim == 3:
            scale, translate = (1.0, *scale), (0.0, *translate)
        kwargs.update(scale=scale, translate=translate, opacity=0.7, units=layer_units(geometry.units, data.ndim))
        return data, kwargs, "labels"
    data = rasterize(v, cells, geometry.shape)
    if data.ndim == 3:
        scale, translate = (1.0, *scale), (0.0, *translate)
        meta["channels"] = int(data.shape[0])
    kwargs.update(
        scale=scale,
        translate=translate,
        units=layer_units(geometry.units, data.ndim),
        colormap=SCALAR_COLORMAP,
        opacity=DEFAULT_OPACITY,
        contrast_limits=contrast_limits(v),
        blending="translucent",
        interpolation2d="nearest",
    )
    return data, kwargs, "image"


def maps_layer_data(
    maps: Mapping[str, np.ndarray],
    geometry: GridGeometry,
    coords: np.ndarray,
    *,
    prefix: str = "",
    extra_meta: Mapping[str, Any] | None = None,
) -> list[LayerData]:
    """One layer per map (see :func:`map_layer_data`), in the maps' order."""
    return [
        map_layer_data(name, values, geometry, coords, prefix=prefix, extra_meta=extra_meta)
        for name, values in maps.items()
    ]


def legend_text(legend: Mapping[int, str], colors: Mapping[int, Sequence[float]] | None = None) -> str:
    """HTML legend ``■ name`` lines (colour swatches when ``colors`` maps label id -> RGBA in [0, 1])."""
    lines = []
    for label, text in sorted(legend.items()):
        rgba = (colors or {}).get(label)
        if rgba is not None:
            r, g, b = (int(round(255 * float(c))) for c in list(rgba)[:3])
            lines.append(f'<span style="color:#{r:02x}{g:02x}{b:02x}">&#9632;</span> {text}')
        else:
            lines.append(f"{label}: {text}")
    return "<br>".join(lines)


def lesion_shapes_data(
    geojson_path: Any, mpp: float | None, kind: str | None = None, name: str = "lesions"
) -> LayerData:
    """A Shapes layer of the demo's region outlines (GeoJSON in level-0 px) in world units, (y, x) vertices."""
    from wsimil_core.demo import load_lesions

    unit, units = world_unit(mpp)
    rings = load_lesions(geojson_path, kind)
    polys = [np.asarray(r, dtype=np.float64)[:, ::-1] * unit for r in rings]
    kwargs = {
        "name": name,
        "shape_type": "polygon",
        "edge_color": "cyan",
        "face_color": "transparent",
        "edge_width": 4 * unit,
        "units": layer_units(units),
        "metadata": {META_KEY: {"kind": "annotations", "source": str(geojson_path)}},
    }
    return polys, kwargs, "shapes"


__all__ = [
    "GridGeometry",
    "LayerData",
    "META_KEY",
    "PatchLookup",
    "attach_patch_status",
    "category_names",
    "contrast_limits",
    "is_categorical_name",
    "layer_units",
    "legend_text",
    "lesion_shapes_data",
    "map_kind",
    "map_layer_data",
    "maps_layer_data",
    "rasterize",
    "rasterize_labels",
    "slide_layer_data",
    "slide_metadata",
    "tissue_layer_data",
    "world_unit",
]
