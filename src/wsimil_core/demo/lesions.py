"""The planted regions of a demo slide: their outlines from the GeoJSON, and each patch's fraction inside them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from wsimil_core.errors import DataError


def load_lesions(geojson_path: str | os.PathLike, kind: str | None = "lesion") -> list[np.ndarray]:
    """Outer rings ``[M, 2]`` (level-0 x, y) of the regions of ``kind`` (None: every region) in a GeoJSON file.

    Accepts a FeatureCollection (or a single Feature) of Polygon / MultiPolygon geometries; holes are ignored.
    """
    path = Path(geojson_path)
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise DataError(f"{path}: cannot read the lesion GeoJSON: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise DataError(f"{path}: not valid JSON: {exc}") from None
    feats = data.get("features", [data]) if isinstance(data, dict) else None
    if not isinstance(feats, list):
        raise DataError(f"{path}: not a GeoJSON FeatureCollection")
    rings = []
    for f in feats:
        props = (f or {}).get("properties") or {}
        name = (props.get("classification") or {}).get("name")
        if kind is not None and name != kind:
            continue
        geom = (f or {}).get("geometry") or {}
        if geom.get("type") == "Polygon":
            polys = [geom["coordinates"]]
        elif geom.get("type") == "MultiPolygon":
            polys = geom["coordinates"]
        else:
            continue
        for poly in polys:
            ring = np.asarray(poly[0], dtype=np.float64)
            if ring.ndim != 2 or ring.shape[1] != 2 or len(ring) < 3:
                raise DataError(f"{path}: a polygon ring is not a list of >= 3 (x, y) points")
            rings.append(ring)
    return rings


def lesion_fraction(
    geojson_path: str | os.PathLike,
    coords: np.ndarray,
    patch_size_level0: int | float,
    kind: str | None = "lesion",
    samples: int = 8,
) -> np.ndarray:
    """Fraction of each patch that lies inside a region of ``kind`` (default: the label-defining lesions).

    Each patch is sampled at ``samples x samples`` evenly spaced points (cell centres) tested against every
    polygon with ``matplotlib.path.Path.contains_points``.

    Args:
        geojson_path: ``<slide_id>.lesions.geojson`` (level-0 pixel coordinates).
        coords: ``[N, 2]`` level-0 (x, y) top-left corners.
        patch_size_level0: patch side in level-0 pixels.
        kind: region kind (``lesion``, ``pattern_b``, ``pattern_c``) or None for any region.
        samples: points per patch side.

    Returns:
        ``[N]`` float64 in [0, 1].
    """
    from matplotlib.path import Path as MplPath

    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    rings = load_lesions(geojson_path, kind)
    n = coords.shape[0]
    if n == 0 or not rings:
        return np.zeros(n)
    offs = (np.arange(samples) + 0.5) / samples * float(patch_size_level0)
    ox, oy = np.meshgrid(offs, offs)
    pts = (coords[:, None, :] + np.stack([ox.ravel(), oy.ravel()], -1)[None]).reshape(-1, 2)
    inside = np.zeros(pts.shape[0], bool)
    for ring in rings:
        inside |= MplPath(ring).contains_points(pts)
    return inside.reshape(n, -1).mean(axis=1)
