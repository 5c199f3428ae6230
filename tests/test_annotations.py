"""QuPath / GeoJSON annotations (``wsi/annotations.py``) and inference restricted to a region (headless)."""

import json

import numpy as np
import pytest
import torch

from wsimil_core.api import (
    Annotation,
    annotations_to_geojson,
    create_model,
    load_lesions,
    points_in_polygons,
    read_geojson_annotations,
    write_geojson_annotations,
)
from wsimil_core.engine.checkpoint import save_checkpoint
from wsimil_core.errors import DataError, SlideError
from wsimil_core.inference.loaded import LoadedCheckpoint
from wsimil_core.inference.pipeline import PipelineOptions, predict_slide
from wsimil_core.store.zarr_store import FeatureStore

SQUARE = [[0, 0], [100, 0], [100, 100], [0, 100], [0, 0]]
HOLE = [[40, 40], [60, 40], [60, 60], [40, 60], [40, 40]]
QUPATH = {  # the shape of QuPath 0.5's "Export objects as GeoJSON" (FeatureCollection, ids, classification)
    "type": "FeatureCollection",
    "features": [
        {
            "type": "Feature",
            "id": "3f0c...",
            "geometry": {"type": "Polygon", "coordinates": [SQUARE, HOLE]},
            "properties": {
                "objectType": "annotation",
                "name": "tumour area",
                "classification": {"name": "Tumor", "color": [200, 0, 0]},
                "measurements": {"Area": 9600.0},
            },
        },
        {
            "type": "Feature",
            "geometry": {
                "type": "MultiPolygon",
                "coordinates": [[[[200, 0], [300, 0], [300, 50], [200, 0]]], [[[400, 0], [500, 0], [450, 80]]]],
            },
            "properties": {"objectType": "annotation", "classification": {"name": "Stroma", "colorRGB": -16744448}},
        },
        {"type": "Feature", "geometry": {"type": "LineString", "coordinates": [[0, 200], [50, 250]]}, "properties": {}},
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [7, 9]}, "properties": {"name": "p"}},
        {"type": "Feature", "geometry": None, "properties": {}},
    ],
}


def test_reads_a_qupath_export_with_holes_multipolygons_lines_points(tmp_path):
    path = tmp_path / "slide.geojson"
    path.write_text(json.dumps(QUPATH))
    anns = read_geojson_annotations(path)
    assert [a.geometry for a in anns] == ["polygon", "polygon", "polygon", "line", "point"]
    tumour = anns[0]
    assert tumour.name == "tumour area" and tumour.classification == "Tumor" and tumour.color == (200, 0, 0)
    assert len(tumour.rings) == 2 and tumour.rings[0].shape == (4, 2)  # the closing vertex is dropped
    np.testing.assert_array_equal(tumour.rings[1][0], [40, 40])
    assert tumour.properties["measurements"] == {"Area": 9600.0}
    # a MultiPolygon gives one annotation per part with the same class; a packed ARGB int colour is decoded
    assert anns[1].classification == anns[2].classification == "Stroma"
    assert anns[1].color == (0, 128, 0)  # -16744448 = 0xFF008000
    np.testing.assert_array_equal(anns[4].exterior, [[7, 9]])
    # the older QuPath form: a bare JSON array of features
    path.write_text(json.dumps(QUPATH["features"][:1]))
    assert [a.name for a in read_geojson_annotations(path)] == ["tumour area"]


def test_bad_geojson_is_one_error_naming_the_file_and_feature(tmp_path):
    bad = tmp_path / "bad.geojson"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="bad.geojson: not valid JSON"):
        read_geojson_annotations(bad)
    bad.write_text(json.dumps({"type": "Topology"}))
    with pytest.raises(DataError, match="not a GeoJSON"):
        read_geojson_annotations(bad)
    two = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1, 1], [0, 0]]]}}
    bad.write_text(json.dumps({"type": "FeatureCollection", "features": [QUPATH["features"][0], two]}))
    with pytest.raises(DataError, match="feature 1: a polygon ring needs at least 3"):
        read_geojson_annotations(bad)
    with pytest.raises(DataError, match="missing.geojson"):
        read_geojson_annotations(tmp_path / "missing.geojson")


def test_written_annotations_read_back_and_follow_qupath_conventions(tmp_path):
    anns = read_geojson_annotations_from(QUPATH, tmp_path)
    out = write_geojson_annotations(anns, tmp_path / "out.geojson", {"slide_mpp": 0.5})
    data = json.loads(out.read_text())
    assert data["properties"] == {"slide_mpp": 0.5}
    first = data["features"][0]
    assert first["geometry"]["type"] == "Polygon" and first["geometry"]["coordinates"][0] == SQUARE  # closed ring
    assert first["properties"]["objectType"] == "annotation"
    assert first["properties"]["classification"] == {"name": "Tumor", "color": [200, 0, 0]}
    back = read_geojson_annotations(out)
    assert [(a.geometry, a.name, a.classification, a.color) for a in back] == [
        (a.geometry, a.name, a.classification, a.color) for a in anns
    ]
    for a, b in zip(anns, back, strict=True):
        assert len(a.rings) == len(b.rings)
        for ra, rb in zip(a.rings, b.rings, strict=True):
            np.testing.assert_array_equal(ra, rb)
    assert annotations_to_geojson([Annotation("point", [[[1, 2], [3, 4]]])])["features"][0]["geometry"] == {
        "type": "MultiPoint",
        "coordinates": [[1.0, 2.0], [3.0, 4.0]],
    }


def read_geojson_annotations_from(data, tmp_path):
    path = tmp_path / "in.geojson"
    path.write_text(json.dumps(data))
    return read_geojson_annotations(path)


def test_points_in_polygons_excludes_holes_against_plain_comparisons():
    rng = np.random.default_rng(0)
    pts = rng.uniform(-20, 120, size=(2000, 2))
    ann = Annotation("polygon", [SQUARE[:-1], HOLE[:-1]])
    x, y = pts[:, 0], pts[:, 1]
    in_square = (x > 0) & (x < 100) & (y > 0) & (y < 100)
    in_hole = (x > 40) & (x < 60) & (y > 40) & (y < 60)
    np.testing.assert_array_equal(points_in_polygons(pts, [ann]), in_square & ~in_hole)
    # a plain ring has no hole; a line annotation covers nothing; several polygons: their union
    np.testing.assert_array_equal(points_in_polygons(pts, [np.asarray(SQUARE)]), in_square)
    assert not points_in_polygons(pts, [Annotation("line", [SQUARE])]).any()
    other = np.array([[110, -10], [118, -10], [118, 0], [110, 0]])
    in_other = (x > 110) & (x < 118) & (y > -10) & (y < 0)
    np.testing.assert_array_equal(points_in_polygons(pts, [np.asarray(SQUARE), other]), in_square | in_other)


def test_the_demo_lesions_file_reads_as_its_rings(demo_cohort):
    files = sorted(demo_cohort.glob("*.lesions.geojson"))
    path = max(files, key=lambda p: len(json.loads(p.read_text())["features"]))
    anns = read_geojson_annotations(path)
    rings = load_lesions(path, kind=None)
    assert len(anns) == len(rings) > 0
    for a, r in zip(anns, rings, strict=True):
        np.testing.assert_allclose(a.exterior, np.asarray(r)[: len(a.exterior)])


# --- inference on a region ----------------------------------------------------------------------------------------
D = 8
ENC = {"name": "resnet18", "encoder_id": "resnet18-abcdef12", "dim": D, "weights_sha256": "ab" * 32}


def _store_and_checkpoint(tmp_path):
    """A 6 x 4 grid of 256-px patches with random features, and an untrained ABMIL checkpoint for them."""
    rng = np.random.default_rng(1)
    cols, rows = np.meshgrid(np.arange(6), np.arange(4))
    coords = np.stack([cols.ravel(), rows.ravel()], 1).astype(np.int64) * 256
    x = rng.normal(size=(len(coords), D)).astype(np.float32)
    fs = FeatureStore(tmp_path / "store", create=True)
    fs.write_bag("s", x, coords, ENC["encoder_id"], ENC, patch_size_level0=256, stride_level0=256, slide_mpp=0.5)
    torch.manual_seed(0)
    model = create_model("abmil", in_dim=D, n_classes=2, dim=8, attn_dim=4, dropout=0.0)
    meta = {"method": "abmil", "targets": ["t"], "class_names": {"t": ["no", "yes"]}, "encoder": ENC}
    save_checkpoint(tmp_path / "m.safetensors", model, meta)
    return fs, x, coords, LoadedCheckpoint(tmp_path / "m.safetensors", "cpu")


def test_region_predicts_only_the_patches_whose_centre_is_inside(tmp_path):
    fs, x, coords, ckpt = _store_and_checkpoint(tmp_path)
    # a triangle: patch centres (128 + 256 i, 128 + 256 j) inside it, by the half-plane test below
    tri = np.array([[0.0, 0.0], [1200.0, 0.0], [0.0, 900.0]])
    region = PipelineOptions(features="store", region=[tri])
    result = predict_slide(ckpt, store=fs, slide_id="s", options=region)
    centres = coords + 128.0
    inside = centres[:, 0] / 1200.0 + centres[:, 1] / 900.0 < 1.0
    assert 0 < inside.sum() < len(coords)
    np.testing.assert_array_equal(result.coords, coords[inside])
    assert result.maps["attention"].shape == (inside.sum(),)
    # the model saw the region's bag only: same probabilities as the model on those rows' features
    with torch.no_grad():
        ref = torch.softmax(ckpt.model(torch.from_numpy(x[inside])).logits, -1)[0].numpy()
    np.testing.assert_allclose(result.probs["t"], ref, rtol=1e-5, atol=1e-6)
    assert result.from_cache and not result.maps_written and ckpt.checkpoint_id not in fs.map_ids("s")
    assert any("region" in m for m in result.messages)
    # the whole slide is different (more patches), and a region without patches is one clear error
    whole = predict_slide(ckpt, store=fs, slide_id="s", options=PipelineOptions(features="store", write_maps=False))
    assert len(whole.coords) == len(coords)
    far = [np.array([[5000.0, 5000.0], [6000.0, 5000.0], [6000.0, 6000.0]])]
    with pytest.raises(SlideError, match="'s'|s: no tissue patch .* inside the region"):
        predict_slide(ckpt, store=fs, slide_id="s", options=PipelineOptions(features="store", region=far))
