"""Export a slide's per-patch maps as GeoJSON that QuPath opens as a measurement map.

Each patch becomes one ``Feature`` whose geometry is the patch square in **level-0 pixels**: the stored coords
already include the OpenSlide bounds offset (``openslide.bounds-x/y``), so they are written as they are, never
shifted. Properties follow QuPath's GeoJSON import::

    {"objectType": "tile", "measurements": {"attention": 0.0123, "routing/task[0]": 0.4, ...}}

A ``[N]`` map gives one measurement named after the map; a ``[N, K]`` map gives ``name[0]`` ... ``name[K-1]``.
NaN values (no value for that patch) are left out of that patch's measurements.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from wsimil_core._io import write_json_atomic  # noqa: F401  (re-exported: cli/predict, the plugin)
from wsimil_core.errors import StoreError
from wsimil_core.store.zarr_store import FeatureStore


def _measurement_columns(maps: dict[str, np.ndarray]) -> list[tuple[str, np.ndarray]]:
    """``[(measurement name, float values [N])]`` for every map channel."""
    cols: list[tuple[str, np.ndarray]] = []
    for name, value in maps.items():
        v = np.asarray(value, dtype=np.float64)
        if v.ndim == 1:
            cols.append((name, v))
        elif v.ndim == 2:
            for k in range(v.shape[1]):
                cols.append((f"{name}[{k}]", v[:, k]))
        else:
            raise StoreError(f"map {name!r} has shape {v.shape}; expected [N] or [N, K]")
    return cols


def patch_size_level0(attrs: dict[str, Any], where: str) -> int:
    """The patch side in level-0 px from the slide attrs (``patch_size_level0``, else ``stride_level0``)."""
    for key in ("patch_size_level0", "stride_level0"):
        value = attrs.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            return int(round(float(value)))
    raise StoreError(f"{where}: slide attrs have no patch_size_level0, so patch squares cannot be drawn")


def maps_to_geojson(
    coords: np.ndarray, size_level0: int, maps: dict[str, np.ndarray], properties: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Build the FeatureCollection.

    Args:
        coords: int64 ``[N, 2]`` level-0 (x, y) of each patch's top-left corner (bounds offset included).
        size_level0: patch side in level-0 px.
        maps: ``{name: [N] or [N, K]}`` aligned with ``coords``.
        properties: extra properties of the collection (checkpoint id, slide id...).

    Returns:
        A GeoJSON ``FeatureCollection`` dict with one closed square ``Polygon`` per patch.
    """
    coords = np.asarray(coords, dtype=np.int64)
    n = coords.shape[0]
    cols = _measurement_columns(maps)
    for name, v in cols:
        if v.shape[0] != n:
            raise StoreError(f"measurement {name!r} has {v.shape[0]} values for {n} patches")
    s = int(size_level0)
    features = []
    for i in range(n):
        x, y = int(coords[i, 0]), int(coords[i, 1])
        measurements = {}
        for name, v in cols:
            value = float(v[i])
            if math.isfinite(value):
                measurements[name] = value
        features.append(
            {
                "type": "Feature",
                "geometry": {
                    "type": "Polygon",
                    "coordinates": [[[x, y], [x + s, y], [x + s, y + s], [x, y + s], [x, y]]],
                },
                "properties": {"objectType": "tile", "measurements": measurements},
            }
        )
    collection: dict[str, Any] = {"type": "FeatureCollection", "features": features}
    if properties:
        collection["properties"] = properties
    return collection


def export_geojson(store: Any, slide_id: str, checkpoint_id: str, out: str | Path | None = None) -> dict[str, Any]:
    """Export ``maps/<checkpoint_id>/`` of ``slide_id`` as GeoJSON (returned, and written to ``out`` if given).

    Raises ``StoreError`` when the slide or its maps are missing (the message lists the checkpoint ids present).
    """
    fs = FeatureStore(store) if isinstance(store, (str, os.PathLike)) else store
    where = f"store {getattr(fs, 'root', fs)}: slide {slide_id!r}"
    have = fs.map_ids(slide_id) if slide_id in fs.slide_ids() else None
    if have is None:
        raise StoreError(f"store {getattr(fs, 'root', fs)}: no complete slide {slide_id!r}")
    if checkpoint_id not in have:
        raise StoreError(
            f"{where} has no maps of checkpoint {checkpoint_id!r} (it has {have or 'none'}); run wsimil predict first"
        )
    maps = fs.read_maps(slide_id, checkpoint_id)
    coords = fs.read_coords(slide_id)
    size = patch_size_level0(fs.slide_attrs(slide_id), where)
    collection = maps_to_geojson(
        coords, size, maps, {"slide_id": slide_id, "checkpoint_id": checkpoint_id, "coordinates": "level-0 px"}
    )
    if out is not None:
        write_json_atomic(collection, out)
    return collection


__all__ = ["export_geojson", "maps_to_geojson", "patch_size_level0", "write_json_atomic"]
