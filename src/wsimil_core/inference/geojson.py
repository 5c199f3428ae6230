"""Export a slide's per-patch maps as GeoJSON that QuPath opens as a measurement map.

Each patch becomes one ``Feature`` whose geometry is the patch square in **level-0 pixels**: the stored coords
already include the OpenSlide bounds offset (``openslide.bounds-x/y``), so they are written as they are, never
shifted. Properties follow QuPath's GeoJSON import::

    {"objectType": "tile", "measurements": {"attention": 0.0123, "routing/task[0]": 0.4, ...}}

A ``[N]`` map gives one measurement named after the map; a ``[N, K]`` map gives ``name[0]`` ... ``name[K-1]``.
NaN values (no value for that patch) are left out of that patch's measurements.

Maps are read from their ``MapSpec`` (stored beside the maps, ``FeatureStore.read_map_specs``): a categorical or
binary map keeps its numeric code as the measurement (so QuPath's measurement maps still work) and adds the
category name as a string in ``properties["metadata"]`` (``{"memory/component": "C+3"}``; QuPath 0.5+ imports it
as the object's metadata); the collection's properties list every spec under ``map_specs`` (kind, description,
categories).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from wsimil_core._io import write_json_atomic
from wsimil_core.errors import StoreError
from wsimil_core.models.base import MapSpec
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


def _category_columns(maps: dict[str, np.ndarray], specs: dict[str, MapSpec]) -> list[tuple[str, MapSpec, np.ndarray]]:
    """``[(name, spec, values [N])]`` of the ``[N]`` maps whose spec is categorical or binary."""
    return [
        (name, specs[name], np.asarray(maps[name], dtype=np.float64))
        for name in maps
        if name in specs and specs[name].is_categorical and np.ndim(maps[name]) == 1
    ]


def maps_to_geojson(
    coords: np.ndarray,
    size_level0: int,
    maps: dict[str, np.ndarray],
    properties: dict[str, Any] | None = None,
    *,
    specs: Mapping[str, MapSpec | Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Build the FeatureCollection.

    Args:
        coords: int64 ``[N, 2]`` level-0 (x, y) of each patch's top-left corner (bounds offset included).
        size_level0: patch side in level-0 px.
        maps: ``{name: [N] or [N, K]}`` aligned with ``coords``.
        properties: extra properties of the collection (checkpoint id, slide id...).
        specs: ``{name: MapSpec}`` (or its ``to_dict()`` form) of the maps: categorical maps also get their
            category name per patch in ``properties["metadata"]``; listed in the collection's ``map_specs``.

    Returns:
        A GeoJSON ``FeatureCollection`` dict with one closed square ``Polygon`` per patch.
    """
    coords = np.asarray(coords, dtype=np.int64)
    n = coords.shape[0]
    cols = _measurement_columns(maps)
    for name, v in cols:
        if v.shape[0] != n:
            raise StoreError(f"measurement {name!r} has {v.shape[0]} values for {n} patches")
    spec_of = {
        name: spec if isinstance(spec, MapSpec) else MapSpec.from_dict({"name": name, **dict(spec)})
        for name, spec in (specs or {}).items()
        if name in maps
    }
    categorical = _category_columns(maps, spec_of)
    s = int(size_level0)
    features = []
    for i in range(n):
        x, y = int(coords[i, 0]), int(coords[i, 1])
        measurements = {}
        for name, v in cols:
            value = float(v[i])
            if math.isfinite(value):
                measurements[name] = value
        props: dict[str, Any] = {"objectType": "tile", "measurements": measurements}
        names = {name: spec.category_of(v[i]) for name, spec, v in categorical}
        names = {name: category for name, category in names.items() if category is not None}
        if names:
            props["metadata"] = names
        features.append(
            {
                "type": "Feature",
                "geometry": {
                    "type": "Polygon",
                    "coordinates": [[[x, y], [x + s, y], [x + s, y + s], [x, y + s], [x, y]]],
                },
                "properties": props,
            }
        )
    collection: dict[str, Any] = {"type": "FeatureCollection", "features": features}
    collection_props = dict(properties or {})
    if spec_of:
        collection_props["map_specs"] = {name: spec.to_dict() for name, spec in spec_of.items()}
    if collection_props:
        collection["properties"] = collection_props
    return collection


def export_geojson(store: Any, slide_id: str, checkpoint_id: str, out: str | Path | None = None) -> dict[str, Any]:
    """Export ``maps/<checkpoint_id>/`` of ``slide_id`` as GeoJSON (returned, and written to ``out`` if given),
    with the category names of categorical maps from the specs stored beside the maps.

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
        coords,
        size,
        maps,
        {"slide_id": slide_id, "checkpoint_id": checkpoint_id, "coordinates": "level-0 px"},
        specs=fs.read_map_specs(slide_id, checkpoint_id),
    )
    if out is not None:
        write_json_atomic(collection, out)
    return collection


__all__ = ["export_geojson", "maps_to_geojson", "patch_size_level0"]
