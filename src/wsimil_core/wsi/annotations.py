"""Slide annotations as GeoJSON, the format QuPath reads and writes ("Export objects as GeoJSON").

Coordinates are **level-0 pixels** ``(x, y)`` of the slide, as in QuPath (and in the stored patch coords, which
already include the OpenSlide bounds offset, so nothing is shifted). Accepted input: a ``FeatureCollection``, a
JSON array of ``Feature`` objects (older QuPath exports), one ``Feature`` or a bare geometry; geometries
``Polygon``, ``MultiPolygon``, ``LineString``, ``MultiLineString``, ``Point``, ``MultiPoint`` and
``GeometryCollection``. A multi-geometry becomes one :class:`Annotation` per part, sharing the feature's name and
classification. Written files carry QuPath's properties (``objectType``, ``name``, ``classification`` with
``name`` and ``color``), so QuPath opens them as annotations (File > Import objects, or drag and drop).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wsimil_core._io import write_json_atomic
from wsimil_core.errors import DataError

GEOMETRIES = ("polygon", "line", "point")


@dataclass
class Annotation:
    """One annotation object in level-0 pixel coordinates.

    Attributes:
        geometry: ``"polygon"``, ``"line"`` or ``"point"``.
        rings: float64 ``[M, 2]`` arrays of level-0 ``(x, y)``: a polygon's exterior ring then its holes (not
            repeating the first vertex at the end), a line's path, or the point(s) ``[P, 2]``.
        name: the object's name (QuPath's ``name``), or None.
        classification: the class name (QuPath's ``classification.name``), or None.
        color: RGB 0-255 of the class (QuPath's ``classification.color``), or None.
        object_type: QuPath's ``objectType`` (``annotation``, ``detection``, ``tile``...).
        properties: the feature's other properties (measurements, metadata...), unchanged.
    """

    geometry: str
    rings: list[np.ndarray]
    name: str | None = None
    classification: str | None = None
    color: tuple[int, int, int] | None = None
    object_type: str = "annotation"
    properties: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.geometry not in GEOMETRIES:
            raise ValueError(f"annotation geometry must be one of {GEOMETRIES}, got {self.geometry!r}")
        self.rings = [np.asarray(r, dtype=np.float64).reshape(-1, 2) for r in self.rings]

    @property
    def exterior(self) -> np.ndarray:
        """``[M, 2]`` the first ring (a polygon's outline, a line's path, the points)."""
        return self.rings[0]


def _ring(coords: Any, where: str, closed: bool) -> np.ndarray:
    ring = np.asarray(coords, dtype=np.float64)
    if ring.ndim != 2 or ring.shape[1] < 2 or not np.isfinite(ring[:, :2]).all():
        raise DataError(f"{where}: coordinates must be a list of finite [x, y] pairs")
    ring = ring[:, :2]
    if closed and len(ring) > 1 and np.array_equal(ring[0], ring[-1]):
        ring = ring[:-1]
    if closed and len(ring) < 3:
        raise DataError(f"{where}: a polygon ring needs at least 3 distinct vertices, got {len(ring)}")
    return ring


def _parts(geom: Mapping[str, Any], where: str) -> list[tuple[str, list[np.ndarray]]]:
    """``[(geometry, rings)]`` of one GeoJSON geometry (a multi-geometry gives several parts)."""
    kind, coords = geom.get("type"), geom.get("coordinates")
    if kind == "GeometryCollection":
        return [p for i, g in enumerate(geom.get("geometries") or []) for p in _parts(g, f"{where} part {i}")]
    if coords is None:
        raise DataError(f"{where}: a {kind} geometry without coordinates")
    if kind == "Polygon":
        return [("polygon", [_ring(r, where, True) for r in coords])]
    if kind == "MultiPolygon":
        return [("polygon", [_ring(r, where, True) for r in poly]) for poly in coords]
    if kind == "LineString":
        return [("line", [_ring(coords, where, False)])]
    if kind == "MultiLineString":
        return [("line", [_ring(line, where, False)]) for line in coords]
    if kind == "Point":
        return [("point", [_ring([coords], where, False)])]
    if kind == "MultiPoint":
        return [("point", [_ring(coords, where, False)])]
    raise DataError(f"{where}: unsupported geometry type {kind!r}")


def _color(value: Any) -> tuple[int, int, int] | None:
    """QuPath writes a class colour as ``[r, g, b]`` (0-255); older versions as a packed ARGB int."""
    if isinstance(value, (list, tuple)) and len(value) >= 3:
        return (int(value[0]), int(value[1]), int(value[2]))
    if isinstance(value, int) and not isinstance(value, bool):
        return ((value >> 16) & 255, (value >> 8) & 255, value & 255)
    return None


def parse_geojson_annotations(data: Any, where: str = "GeoJSON") -> list[Annotation]:
    """The annotations of a parsed GeoJSON document (see the module docstring); ``where`` names it in errors.

    Raises:
        DataError: not GeoJSON, or a feature with bad coordinates (naming the feature's index).
    """
    if isinstance(data, list):
        features = data
    elif isinstance(data, dict) and data.get("type") == "FeatureCollection":
        features = data.get("features") or []
    elif isinstance(data, dict) and data.get("type") == "Feature":
        features = [data]
    elif isinstance(data, dict) and "coordinates" in data or isinstance(data, dict) and "geometries" in data:
        features = [{"type": "Feature", "geometry": data, "properties": {}}]
    else:
        raise DataError(f"{where}: not a GeoJSON FeatureCollection, Feature or geometry")
    out: list[Annotation] = []
    for i, feat in enumerate(features):
        if not isinstance(feat, dict) or not isinstance(feat.get("geometry"), dict):
            if isinstance(feat, dict) and feat.get("geometry") is None:
                continue  # a feature without geometry (allowed by GeoJSON) has nothing to draw
            raise DataError(f"{where}: feature {i} is not a GeoJSON Feature with a geometry")
        props = dict(feat.get("properties") or {})
        cls = props.pop("classification", None)
        cls_name = cls.get("name") if isinstance(cls, dict) else (cls if isinstance(cls, str) else None)
        color = _color(cls.get("color") or cls.get("colorRGB")) if isinstance(cls, dict) else None
        name = props.pop("name", None)
        object_type = str(props.pop("objectType", props.pop("object_type", "annotation")))
        for geometry, rings in _parts(feat["geometry"], f"{where}: feature {i}"):
            out.append(
                Annotation(
                    geometry,
                    rings,
                    name=None if name is None else str(name),
                    classification=None if cls_name is None else str(cls_name),
                    color=color,
                    object_type=object_type,
                    properties=props,
                )
            )
    return out


def read_geojson_annotations(path: str | os.PathLike) -> list[Annotation]:
    """The annotations of a GeoJSON file (QuPath export, the demo's ``*.lesions.geojson``...), in level-0 px.

    Raises:
        DataError: the file is missing, not JSON or not GeoJSON (naming the file).
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise DataError(f"{path}: cannot read the GeoJSON file: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise DataError(f"{path}: not valid JSON: {exc}") from None
    return parse_geojson_annotations(data, str(path))


def _closed(ring: np.ndarray) -> list[list[float]]:
    pts = [[float(x), float(y)] for x, y in np.asarray(ring, dtype=np.float64)]
    return [*pts, pts[0]] if pts else pts


def annotations_to_geojson(
    annotations: Iterable[Annotation], properties: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """A GeoJSON ``FeatureCollection`` QuPath imports as annotations (level-0 px; polygon rings closed as GeoJSON
    requires); ``properties`` (e.g. ``slide_id``, ``slide_mpp``) go into the collection's properties."""
    features = []
    for ann in annotations:
        if ann.geometry == "polygon":
            geom: dict[str, Any] = {"type": "Polygon", "coordinates": [_closed(r) for r in ann.rings]}
        elif ann.geometry == "line":
            geom = {"type": "LineString", "coordinates": [[float(x), float(y)] for x, y in ann.exterior]}
        else:
            pts = [[float(x), float(y)] for x, y in ann.exterior]
            geom = (
                {"type": "Point", "coordinates": pts[0]}
                if len(pts) == 1
                else {"type": "MultiPoint", "coordinates": pts}
            )
        props: dict[str, Any] = {**ann.properties, "objectType": ann.object_type}
        if ann.name is not None:
            props["name"] = ann.name
        if ann.classification is not None:
            cls: dict[str, Any] = {"name": ann.classification}
            if ann.color is not None:
                cls["color"] = [int(c) for c in ann.color]
            props["classification"] = cls
        features.append({"type": "Feature", "geometry": geom, "properties": props})
    out: dict[str, Any] = {"type": "FeatureCollection", "features": features}
    if properties:
        out["properties"] = dict(properties)
    return out


def write_geojson_annotations(
    annotations: Iterable[Annotation], path: str | os.PathLike, properties: Mapping[str, Any] | None = None
) -> Path:
    """Write :func:`annotations_to_geojson` to ``path`` atomically; returns the path."""
    path = Path(path)
    write_json_atomic(annotations_to_geojson(annotations, properties), path)
    return path


def points_in_polygons(points: np.ndarray, polygons: Sequence[Annotation | np.ndarray]) -> np.ndarray:
    """bool ``[N]``: whether each level-0 ``(x, y)`` point lies inside any of ``polygons``.

    ``polygons``: polygon :class:`Annotation` objects (a point inside one of its holes is outside it; line and
    point annotations are ignored) or plain ``[M, 2]`` rings. Uses ``skimage.measure.points_in_poly``
    (a point exactly on an edge may fall either way).
    """
    from skimage.measure import points_in_poly

    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    inside = np.zeros(len(pts), dtype=bool)
    for poly in polygons:
        if isinstance(poly, Annotation):
            if poly.geometry != "polygon":
                continue
            rings = poly.rings
        else:
            rings = [np.asarray(poly, dtype=np.float64).reshape(-1, 2)]
        if not len(pts) or len(rings[0]) < 3:
            continue
        hit = points_in_poly(pts, rings[0])
        for hole in rings[1:]:
            hit &= ~points_in_poly(pts, hole)
        inside |= hit
    return inside


__all__ = [
    "Annotation",
    "annotations_to_geojson",
    "parse_geojson_annotations",
    "points_in_polygons",
    "read_geojson_annotations",
    "write_geojson_annotations",
]
