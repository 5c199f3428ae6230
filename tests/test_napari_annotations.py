"""napari plugin: QuPath / GeoJSON annotations as Shapes in µm and back, inference on a drawn region, and the
inference dock's layers (primary maps only, the map picker, one layer set per slide).

The first tests need no display (napari's ``ViewerModel``); the dock tests run a real viewer under Xvfb.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from _helpers import NO_DISPLAY_REASON, display_available  # noqa: E402
from test_napari_inference import GRID_MPP, GRID_PATCH, make_tiny_checkpoint, write_tissue_slide  # noqa: E402

pytest.importorskip("napari")

from napari_wsimil._annotations import (  # noqa: E402
    annotation_layers,
    export_shapes_geojson,
    get_geojson_reader,
    region_rings,
    shapes_annotations,
)
from napari_wsimil._inference import InferenceRequest, infer_slide  # noqa: E402
from wsimil_core.api import load_lesions, read_geojson_annotations  # noqa: E402

SQUARE = [[0, 0], [400, 0], [400, 300], [0, 300], [0, 0]]
HOLE = [[100, 100], [200, 100], [200, 200], [100, 200], [100, 100]]


def _qupath_file(path: Path, mpp: float | None = 0.25) -> Path:
    feats = [
        {
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [SQUARE, HOLE]},
            "properties": {
                "objectType": "annotation",
                "name": "t1",
                "classification": {"name": "Tumor", "color": [255, 0, 0]},
            },
        },
        {"type": "Feature", "geometry": {"type": "LineString", "coordinates": [[0, 500], [80, 600]]}, "properties": {}},
        {"type": "Feature", "geometry": {"type": "MultiPoint", "coordinates": [[10, 20], [30, 40]]}, "properties": {}},
    ]
    data = {"type": "FeatureCollection", "features": feats, "properties": {"slide_mpp": mpp} if mpp else {}}
    path.write_text(json.dumps(data))
    return path


def test_qupath_geojson_opens_as_shapes_and_points_in_micrometres(tmp_path):
    path = _qupath_file(tmp_path / "case.geojson", mpp=0.25)
    assert get_geojson_reader(str(path)) is not None and get_geojson_reader(str(tmp_path / "x.tiff")) is None
    (shapes, skw, stype), (points, pkw, ptype) = get_geojson_reader(str(path))(str(path))
    assert (stype, ptype) == ("shapes", "points") and skw["name"] == "case"
    assert skw["shape_type"] == ["polygon", "polygon", "path"]
    # vertex (y, x) in µm = level-0 (y, x) * mpp
    np.testing.assert_allclose(shapes[0], np.asarray(SQUARE[:-1])[:, ::-1] * 0.25)
    np.testing.assert_allclose(shapes[1], np.asarray(HOLE[:-1])[:, ::-1] * 0.25)
    np.testing.assert_allclose(points, [[5.0, 2.5], [10.0, 7.5]])
    assert skw["features"]["classification"][:2] == ["Tumor", "Tumor"] and skw["features"]["hole"] == [
        False,
        True,
        False,
    ]
    assert skw["edge_color"][0] == (1.0, 0.0, 0.0, 1.0) and skw["text"]["string"] == "{classification}"
    meta = skw["metadata"]["wsimil"]
    assert meta["mpp"] == 0.25 and meta["units"] == "µm" and "slide_mpp" in meta["mpp_source"]
    # without any mpp: level-0 pixels, with a warning
    bare = _qupath_file(tmp_path / "bare.geojson", mpp=None)
    with pytest.warns(UserWarning, match="mpp unknown"):
        (px, kw, _), _ = annotation_layers(bare)
    np.testing.assert_allclose(px[0], np.asarray(SQUARE[:-1])[:, ::-1])
    assert kw["metadata"]["wsimil"]["units"] == "px"


def test_demo_lesions_open_over_the_slide_with_the_slides_mpp(tmp_path):
    from napari.components import ViewerModel

    from napari_wsimil._reader import slide_layers
    from napari_wsimil._sample_data import demo_slide_path
    from napari_wsimil._viewer import add_layers

    slide = demo_slide_path(tmp_path / "demo")
    lesions = slide.with_name(slide.name[: -len(".tiff")] + ".lesions.geojson")
    viewer = ViewerModel()
    (slide_layer,) = add_layers(viewer, slide_layers(slide))
    mpp = slide_layer.metadata["wsimil"]["mpp"]
    (shapes_layer,) = add_layers(viewer, get_geojson_reader(str(lesions))(str(lesions)))
    meta = shapes_layer.metadata["wsimil"]
    assert meta["mpp"] == pytest.approx(mpp) and meta["mpp_source"] == f"the slide {slide.name}"
    rings = load_lesions(lesions, kind=None)
    assert len(shapes_layer.data) == len(rings) > 0
    for verts, ring in zip(shapes_layer.data, rings, strict=True):
        np.testing.assert_allclose(verts, np.asarray(ring)[: len(verts), ::-1] * mpp)
    # the same world coordinates as the slide: a lesion vertex is over that level-0 pixel of the slide layer
    y, x = shapes_layer.data[0][0]
    np.testing.assert_allclose(slide_layer.world_to_data((y, x)), (y / mpp - 0.5, x / mpp - 0.5), atol=1e-6)


def test_shapes_export_to_geojson_round_trips_in_level0_pixels(tmp_path):
    from napari.layers import Shapes

    path = _qupath_file(tmp_path / "case.geojson", mpp=0.5)
    (shapes, kwargs, _), _ = annotation_layers(path)
    layer = Shapes(shapes, **{k: v for k, v in kwargs.items() if k != "units"})
    out = export_shapes_geojson(layer, tmp_path / "out.geojson", 0.5, properties={"slide_id": "case"})
    back = read_geojson_annotations(out)
    assert [a.geometry for a in back] == ["polygon", "line"]
    tumour = back[0]
    assert tumour.name == "t1" and tumour.classification == "Tumor" and len(tumour.rings) == 2  # the hole is back
    np.testing.assert_allclose(tumour.rings[0], np.asarray(SQUARE[:-1]))
    np.testing.assert_allclose(tumour.rings[1], np.asarray(HOLE[:-1]))
    props = json.loads(out.read_text())["properties"]
    assert props["slide_mpp"] == 0.5 and props["slide_id"] == "case" and props["coordinates"] == "level-0 px"

    # a user-drawn layer with its own scale and translate: a rectangle and an ellipse, world µm -> level-0 px
    drawn = Shapes(scale=(2.0, 2.0), translate=(10.0, 20.0))
    drawn.add_rectangles(np.array([[0.0, 0.0], [50.0, 100.0]]))  # data (y, x) -> world y 10..110, x 20..220
    drawn.add_ellipses(np.array([[100.0, 100.0], [20.0, 40.0]]))  # centre (y, x) = (100, 100), radii (20, 40)
    anns = shapes_annotations(drawn, mpp=0.5)
    xs, ys = anns[0].exterior[:, 0], anns[0].exterior[:, 1]
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == pytest.approx((40, 440, 20, 220))
    ell = anns[1].exterior  # world centre (210, 220) µm, radii (40, 80) µm -> level-0 (x, y) centre (440, 420)
    assert len(ell) == 64 and ell.mean(axis=0) == pytest.approx((440, 420))
    assert np.ptp(ell[:, 0]) == pytest.approx(320, rel=1e-3) and np.ptp(ell[:, 1]) == pytest.approx(160, rel=1e-3)
    drawn.selected_data = {1}
    assert len(region_rings(drawn, 0.5, selected_only=True)) == 1


def test_inference_on_a_region_predicts_only_the_patches_inside(tmp_path):
    slide = write_tissue_slide(tmp_path / "tissue.tiff")
    ckpt = make_tiny_checkpoint(tmp_path / "tiny.safetensors")
    store = tmp_path / "store"
    whole = infer_slide(InferenceRequest(ckpt, slide, device="cpu", store=None))
    # a rectangle of level-0 px over the left half of the tissue
    rect = np.array([[100.0, 150.0], [520.0, 150.0], [520.0, 620.0], [100.0, 620.0]])
    part = infer_slide(InferenceRequest(ckpt, slide, device="cpu", store=store, region=[rect]))
    size0 = int(round(GRID_PATCH * GRID_MPP / 0.5))
    centres = whole.coords + size0 / 2
    inside = (centres[:, 0] > 100) & (centres[:, 0] < 520) & (centres[:, 1] > 150) & (centres[:, 1] < 620)
    assert 0 < inside.sum() < len(whole.coords)
    np.testing.assert_array_equal(part.coords, whole.coords[inside])
    assert part.maps["attention"].shape == (inside.sum(),)
    assert np.isclose(part.maps["attention"].sum(), 1.0, atol=1e-4)  # normalised over the region's bag
    # nothing of the partial bag is cached: the next whole-slide run still encodes
    from wsimil_core.api import FeatureStore

    assert "tissue" not in FeatureStore(store).slide_ids()


def test_stored_maps_of_a_multitask_model_show_only_each_tasks_primary_map():
    from napari_wsimil._grid import GridGeometry
    from napari_wsimil._map_layers import maps_layer_data
    from wsimil_core.api import create_model

    specs = {s.name: s.to_dict() for s in create_model("mecds", in_dim=8, tasks={"a": 2, "b": 2}).map_specs()}
    coords = np.array([[0, 0], [256, 0], [0, 256]], np.int64)
    maps = {name: np.array([0, 1, 0], np.float32) for name in specs}
    layers = maps_layer_data(maps, GridGeometry.from_coords(coords, 256, 256, (0, 0), 0.5), coords, specs=specs)
    assert len(layers) == 10
    assert [kw["name"] for _, kw, _ in layers if kw.get("visible", True)] == ["attention/a", "attention/b"]
    every = maps_layer_data(
        maps, GridGeometry.from_coords(coords, 256, 256, (0, 0), 0.5), coords, hide_secondary=False, specs=specs
    )
    assert all(kw.get("visible", True) for _, kw, _ in every)


# --- the dock in a real viewer -----------------------------------------------------------------------------------


def make_tiny_mecds_checkpoint(path: Path) -> Path:
    """An untrained two-task MECDS on the tiny grid of ``make_tiny_checkpoint`` (256 random-init features)."""
    import torch

    from wsimil_core.api import create_model
    from wsimil_core.engine.checkpoint import save_checkpoint
    from wsimil_core.features.encoders import EncoderSpec

    spec = EncoderSpec(name="resnet18", encoder_id="resnet18-random", dim=256, input_size=None)
    size0 = int(round(GRID_PATCH * GRID_MPP / 0.5))
    enc = spec.with_grid(GRID_MPP, GRID_PATCH).to_attrs()
    enc.update(patch_mpp=GRID_MPP, patch_size=GRID_PATCH, patch_size_level0=size0, stride_level0=size0)
    torch.manual_seed(0)
    model = create_model(
        "mecds", in_dim=256, tasks={"grade": 2, "subtype": 2}, dim=16, n_heads=2, router_dim=8, dropout=0.0
    )
    classes = {"grade": ["low", "high"], "subtype": ["a", "b"]}
    save_checkpoint(path, model, {"method": "mecds", "class_names": classes, "targets": list(classes), "encoder": enc})
    return path


@pytest.fixture
def viewer(qtbot):
    pytest.importorskip("qtpy")
    import napari

    v = napari.Viewer(show=False)
    yield v
    v.close()


def _run(widget, qtbot):
    assert widget.run() is not None, widget.error
    qtbot.waitUntil(lambda: widget.worker is None, timeout=120_000)
    assert widget.error is None, widget.error


@pytest.mark.gui
@pytest.mark.skipif(not display_available(), reason=NO_DISPLAY_REASON)
def test_mecds_shows_primary_maps_picker_adds_one_and_slide_b_keeps_slide_a(viewer, qtbot, tmp_path):
    from napari_wsimil._inference_widget import InferenceWidget

    slide_a = write_tissue_slide(tmp_path / "slide_a.tiff", seed=0)
    slide_b = write_tissue_slide(tmp_path / "slide_b.tiff", seed=1)
    ckpt = make_tiny_mecds_checkpoint(tmp_path / "mecds.safetensors")
    (layer_a,) = viewer.open(str(slide_a), plugin="napari-wsimil")
    widget = InferenceWidget(viewer)
    widget.load_checkpoint(ckpt)
    widget.device_combo.setCurrentText("cpu")
    widget.store_edit.setText("")
    widget.set_slide_layer(layer_a)
    _run(widget, qtbot)
    maps = [ly for ly in viewer.layers if ly.metadata.get("wsimil", {}).get("kind") == "map"]
    # 2 tasks x 5 maps (routing, routing per module x 2, weight, attention): only each task's attention is a layer
    assert len(widget.result.maps) == 10
    assert sorted(ly.name for ly in maps) == ["slide_a · attention/grade", "slide_a · attention/subtype"]
    assert all(ly.visible for ly in maps)
    meta = maps[0].metadata["wsimil"]
    assert meta["checkpoint"] == str(ckpt) and meta["checkpoint_id"] == widget.result.checkpoint_id
    assert meta["slide_path"] == str(slide_a)
    # the picker offers the 8 others; adding one makes a visible layer drawn from its spec (binary -> labels)
    offered = [widget.map_picker.combo.itemData(i) for i in range(widget.map_picker.combo.count())]
    assert len(offered) == 8 and "routing/grade" in offered
    added = widget.map_picker.add("routing/grade")
    assert added in viewer.layers and added.visible and added.name == "slide_a · routing/grade"
    assert added._type_string == "labels" and widget.map_picker.combo.count() == 7
    assert "routing/grade" in widget.legend_label.text() and "routed" in widget.legend_label.text()
    np.testing.assert_array_equal(added.data.max() > 0, True)

    # a run on slide B adds B's layers and leaves A's
    (layer_b,) = viewer.open(str(slide_b), plugin="napari-wsimil")
    widget.set_slide_layer(layer_b)
    _run(widget, qtbot)
    names = {ly.name for ly in viewer.layers}
    assert {"slide_a · attention/grade", "slide_a · attention/subtype", "slide_a · routing/grade"} <= names
    assert {"slide_b · attention/grade", "slide_b · attention/subtype"} <= names
    assert "slide_b · routing/grade" not in names  # the picker's choice is per run
    # running A again updates A's layers in place (no duplicates)
    widget.set_slide_layer(layer_a)
    _run(widget, qtbot)
    assert len([ly for ly in viewer.layers if ly.name == "slide_a · attention/grade"]) == 1


@pytest.mark.gui
@pytest.mark.skipif(not display_available(), reason=NO_DISPLAY_REASON)
def test_dock_runs_on_a_drawn_region_and_exports_it(viewer, qtbot, tmp_path):
    from napari_wsimil._inference_widget import InferenceWidget

    slide = write_tissue_slide(tmp_path / "tissue.tiff")
    ckpt = make_tiny_checkpoint(tmp_path / "tiny.safetensors")
    (slide_layer,) = viewer.open(str(slide), plugin="napari-wsimil")
    mpp = slide_layer.metadata["wsimil"]["mpp"]
    # the user draws a rectangle (world µm, (y, x)) over part of the tissue
    shapes = viewer.add_shapes(name="my region")
    shapes.add_rectangles(np.array([[150.0, 100.0], [620.0, 520.0]]) * mpp)
    widget = InferenceWidget(viewer)
    widget.load_checkpoint(ckpt)
    widget.device_combo.setCurrentText("cpu")
    widget.store_edit.setText("")
    widget.region_picker.set_region_layer(shapes)
    _run(widget, qtbot)
    centres = widget.result.coords + int(round(GRID_PATCH * GRID_MPP / 0.5)) / 2
    assert len(centres) > 0
    assert ((centres[:, 0] > 100) & (centres[:, 0] < 520) & (centres[:, 1] > 150) & (centres[:, 1] < 620)).all()
    maps = [ly for ly in viewer.layers if ly.name.startswith("tissue · my region · ")]
    assert [ly.name for ly in maps] == ["tissue · my region · attention"]
    out = widget.region_picker.export(tmp_path / "region.geojson")
    (ann,) = read_geojson_annotations(out)
    xs, ys = ann.exterior[:, 0], ann.exterior[:, 1]
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == pytest.approx((100, 520, 150, 620))
