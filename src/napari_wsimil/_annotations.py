"""QuPath / GeoJSON annotations <-> napari Shapes in world units (no Qt).

* :func:`get_geojson_reader` (npe2 reader for ``*.geojson``): the file's polygons and lines as one Shapes layer,
  its points as a Points layer, in µm like the slide layers (vertex ``(y, x)`` = level-0 ``(y, x)`` * mpp, see
  ``_slide_layers.slide_layer_data``). The slide's mpp comes from the file's ``slide_mpp`` property (written by
  :func:`export_shapes_geojson`), else the slide file beside it (``demo_000.lesions.geojson`` ->
  ``demo_000.tiff``), else the matching (or only) slide layer of the current viewer; else the layer is in
  level-0 pixels (``units`` "px") like a slide without mpp.
* :func:`shapes_annotations` / :func:`export_shapes_geojson`: a Shapes layer (read, or drawn by the user) back to
  level-0 px annotations / a GeoJSON file QuPath imports; :func:`region_rings`: the polygons of a Shapes layer
  as level-0 rings for inference on a region (``InferenceRequest.region``).

napari shapes have no holes: a polygon's holes are drawn as their own outlines, and the feature column
``object`` (the annotation each shape belongs to) puts them back as holes on export.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from napari_wsimil._grid import META_KEY, LayerData, layer_units, world_unit
from napari_wsimil._reader import SLIDE_SUFFIXES
from napari_wsimil._viewer import slide_layers_of
from wsimil_core.api import Annotation, open_slide, read_geojson_annotations, write_geojson_annotations
from wsimil_core.errors import DataError, WsimilError

#: edge colour of shapes without a class colour
DEFAULT_EDGE = (0.0, 1.0, 1.0, 1.0)
#: sides of the polygon that stands for a napari ellipse on export
ELLIPSE_SIDES = 64


def get_geojson_reader(path: str | list[str]) -> Callable[[Any], list[LayerData]] | None:
    """npe2 reader hook: ``*.geojson`` files; None for anything else."""
    paths = path if isinstance(path, (list, tuple)) else [path]
    if not paths or not all(str(p).lower().endswith(".geojson") and Path(p).is_file() for p in paths):
        return None
    return read_geojson_paths


def read_geojson_paths(path: str | list[str]) -> list[LayerData]:
    """Read one or several GeoJSON files (see :func:`annotation_layers`)."""
    paths = path if isinstance(path, (list, tuple)) else [path]
    return [layer for p in paths for layer in annotation_layers(p)]


def _stem(path: Path) -> str:
    return path.name.split(".")[0]


def _viewer_mpp(path: Path) -> float | None:
    """The mpp of the current viewer's slide layer of the same stem, else of its only slide layer."""
    try:
        import napari

        viewer = napari.current_viewer()
    except Exception:  # noqa: BLE001 - no napari or no viewer: no guess
        return None
    if viewer is None:
        return None
    layers = slide_layers_of(viewer)
    same = [ly for ly in layers if _stem(Path(str(ly.metadata[META_KEY].get("slide_path", "")))) == _stem(path)]
    chosen = same or (layers if len(layers) == 1 else [])
    return chosen[0].metadata[META_KEY].get("mpp") if chosen else None


def annotation_mpp(path: str | os.PathLike, properties: Mapping[str, Any] | None = None) -> tuple[float | None, str]:
    """``(µm per level-0 px or None, where it came from)`` for a GeoJSON file (see the module docstring)."""
    path = Path(path)
    for key in ("slide_mpp", "mpp"):
        value = (properties or {}).get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            return float(value), f"the file's {key} property"
    for suffix in SLIDE_SUFFIXES:
        slide = path.with_name(_stem(path) + suffix)
        if slide.is_file():
            try:
                with open_slide(slide) as s:
                    if s.mpp:
                        return float(s.mpp), f"the slide {slide.name}"
            except WsimilError:
                continue
    mpp = _viewer_mpp(path)
    if mpp:
        return float(mpp), "the open slide layer"
    return None, "unknown: level-0 pixels"


def _collection_properties(path: Path) -> dict[str, Any]:
    import json

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    props = data.get("properties") if isinstance(data, dict) else None
    return dict(props) if isinstance(props, dict) else {}


def _rgba(color: tuple[int, int, int] | None) -> tuple[float, ...]:
    return DEFAULT_EDGE if color is None else (*(c / 255 for c in color), 1.0)


def annotation_layers(path: str | os.PathLike, mpp: float | None = None) -> list[LayerData]:
    """The layers of a GeoJSON file: a Shapes layer (polygons, holes, lines) and a Points layer (points), each
    only when the file has such objects; vertices ``(y, x)`` in µm (``mpp`` given, or :func:`annotation_mpp`).

    Shapes carry the features ``name``, ``classification``, ``object`` (the annotation's index in the file) and
    ``hole``; edges take the class colour and each shape shows its class name. ``metadata["wsimil"]``: ``kind`` "annotations", ``source``, ``mpp``,
    ``mpp_source``, ``units``.

    Raises:
        DataError: the file is not GeoJSON (naming it).
    """
    path = Path(path)
    annotations = read_geojson_annotations(path)
    source = "given"
    if mpp is None:
        mpp, source = annotation_mpp(path, _collection_properties(path))
        if mpp is None:
            warnings.warn(f"{path}: slide mpp unknown; annotations shown in level-0 pixels", stacklevel=2)
    unit, units = world_unit(mpp)
    meta = {"kind": "annotations", "source": str(path), "mpp": mpp, "mpp_source": source, "units": units}
    shapes: list[np.ndarray] = []
    types, edges, rows = [], [], []
    points: list[np.ndarray] = []
    for i, ann in enumerate(annotations):
        if ann.geometry == "point":
            points.append(ann.exterior[:, ::-1] * unit)
            continue
        for j, ring in enumerate(ann.rings):
            shapes.append(ring[:, ::-1] * unit)
            types.append("polygon" if ann.geometry == "polygon" else "path")
            edges.append(_rgba(ann.color))
            rows.append((ann.name or "", ann.classification or "", i, j > 0))
    layers: list[LayerData] = []
    name = path.name[: -len(".geojson")] if path.name.lower().endswith(".geojson") else path.stem
    if shapes:
        features = {key: [r[k] for r in rows] for k, key in enumerate(("name", "classification", "object", "hole"))}
        kwargs = {
            "name": name,
            "shape_type": types,
            "edge_color": edges,
            "face_color": "transparent",
            "edge_width": 4 * unit,
            "features": features,
            "text": {"string": "{classification}", "size": 10, "color": "white", "anchor": "upper_left"},
            "units": layer_units(units),
            "metadata": {META_KEY: meta},
        }
        layers.append((shapes, kwargs, "shapes"))
    if points:
        pts = np.concatenate(points)
        kwargs = {
            "name": f"{name} points",
            "size": 20 * unit,
            "units": layer_units(units),
            "metadata": {META_KEY: meta},
        }
        layers.append((pts, kwargs, "points"))
    return layers


# --- back to level-0 px ------------------------------------------------------------------------------------------
def _world_vertices(layer: Any, data: np.ndarray) -> np.ndarray:
    """World ``(y, x)`` of a shape's data vertices (the layer's scale and translate on the last two axes)."""
    v = np.asarray(data, dtype=np.float64)[:, -2:]
    scale = np.asarray(layer.scale, dtype=np.float64)[-2:]
    translate = np.asarray(layer.translate, dtype=np.float64)[-2:]
    return v * scale + translate


def _ellipse(corners: np.ndarray) -> np.ndarray:
    """A polygon of ``ELLIPSE_SIDES`` vertices on the ellipse inscribed in napari's 4 bounding-box corners."""
    centre = corners.mean(axis=0)
    a = (corners[1] - corners[0]) / 2  # one half-axis (napari orders the corners around the box)
    b = (corners[3] - corners[0]) / 2
    t = np.linspace(0, 2 * np.pi, ELLIPSE_SIDES, endpoint=False)[:, None]
    return centre + np.cos(t) * a + np.sin(t) * b


def shapes_annotations(layer: Any, mpp: float | None, *, selected_only: bool = False) -> list[Annotation]:
    """The shapes of a napari Shapes layer as level-0 px annotations (``(x, y)`` = world ``(x, y)`` / mpp).

    Polygons, rectangles and ellipses (as a 64-gon) give polygons, paths and lines give lines; shapes sharing an
    ``object`` feature (a read GeoJSON's polygon and its holes) give one polygon with holes. The ``name`` and
    ``classification`` features, when present, are kept. ``selected_only``: the layer's selected shapes only.
    """
    unit, _ = world_unit(mpp)
    features = getattr(layer, "features", None)
    cols = set(features.columns) if features is not None else set()

    def feature(col: str, i: int) -> Any:
        return features[col].iloc[i] if col in cols and i < len(features) else None

    picked = sorted(layer.selected_data) if selected_only else range(len(layer.data))
    out: list[Annotation] = []
    by_object: dict[Any, Annotation] = {}
    for i in picked:
        kind = layer.shape_type[i]
        world = _world_vertices(layer, layer.data[i])
        if kind == "ellipse":
            world = _ellipse(world)
        level0 = world[:, ::-1] / unit
        obj, hole = feature("object", i), bool(feature("hole", i) or False)
        if hole and obj in by_object and by_object[obj].geometry == "polygon":
            by_object[obj].rings.append(level0)
            continue
        name, cls = feature("name", i), feature("classification", i)
        ann = Annotation(
            "line" if kind in ("path", "line") else "polygon",
            [level0],
            name=str(name) if name else None,
            classification=str(cls) if cls else None,
        )
        out.append(ann)
        if obj is not None:
            by_object[obj] = ann
    return out


def region_rings(layer: Any, mpp: float | None, *, selected_only: bool = False) -> list[np.ndarray]:
    """The polygons of a Shapes layer as level-0 ``(x, y)`` exterior rings (holes and lines left out).

    Raises:
        DataError: the layer has no polygon (naming it).
    """
    rings = [a.exterior for a in shapes_annotations(layer, mpp, selected_only=selected_only) if a.geometry == "polygon"]
    if not rings:
        raise DataError(f"shapes layer {layer.name!r}: draw a polygon, rectangle or ellipse for the region")
    return rings


def export_shapes_geojson(
    layer: Any,
    path: str | os.PathLike,
    mpp: float | None,
    *,
    selected_only: bool = False,
    properties: Mapping[str, Any] | None = None,
) -> Path:
    """Write a Shapes layer (or its selected shapes) as GeoJSON annotations QuPath imports (level-0 px); the
    collection's properties get ``slide_mpp`` and ``coordinates`` plus ``properties``."""
    annotations = shapes_annotations(layer, mpp, selected_only=selected_only)
    props = {"coordinates": "level-0 px", **({"slide_mpp": float(mpp)} if mpp else {}), **dict(properties or {})}
    return write_geojson_annotations(annotations, path, props)


__all__ = [
    "annotation_layers",
    "annotation_mpp",
    "export_shapes_geojson",
    "get_geojson_reader",
    "read_geojson_paths",
    "region_rings",
    "shapes_annotations",
]
