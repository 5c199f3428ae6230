"""Slide, tissue-mask and annotation layers (no Qt) as napari layer-data tuples ``(data, kwargs, layer_type)``.

Where each layer lies in world units is :mod:`napari_wsimil._grid`; per-patch maps are
:mod:`napari_wsimil._map_layers`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from napari_wsimil._grid import META_KEY, LayerData, layer_units, world_unit
from wsimil_core.api import load_lesions


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


def lesion_shapes_data(
    geojson_path: Any, mpp: float | None, kind: str | None = None, name: str = "lesions"
) -> LayerData:
    """A Shapes layer of the demo's region outlines (GeoJSON in level-0 px) in world units, (y, x) vertices."""
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


__all__ = ["lesion_shapes_data", "slide_layer_data", "slide_metadata", "tissue_layer_data"]
