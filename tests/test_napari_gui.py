"""napari plugin in a real viewer (Qt + OpenGL under Xvfb): reader, inference widget, pixels on screen.

Skipped cleanly when Qt or a display (or Xvfb through pytest-xvfb) is not available.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from _helpers import NO_DISPLAY_REASON, display_available  # noqa: E402

# checked at collection: without a display, creating the QApplication (pytest-qt's qtbot) would abort the process
pytestmark = [
    pytest.mark.gui,
    pytest.mark.skipif(not display_available(), reason=NO_DISPLAY_REASON),
]


@pytest.fixture
def viewer(qtbot):
    pytest.importorskip("qtpy")
    import napari

    v = napari.Viewer(show=True)  # a hidden canvas renders black; pytest-xvfb gives a virtual display
    v.window._qt_window.resize(800, 600)
    yield v
    v.close()


def _settle(qtbot, ms: int = 200) -> None:
    qtbot.wait(ms)


def test_reader_opens_a_fixture_slide_in_a_viewer(viewer, fixtures_dir, qtbot):
    layers = viewer.open(str(fixtures_dir / "openslide" / "boxes.tiff"), plugin="napari-wsimil")
    (layer,) = layers
    assert layer.multiscale and len(layer.data) == 4
    meta = layer.metadata["wsimil"]
    assert meta["units"] == "µm" and meta["levels"] == 4
    assert layer.scale[0] == pytest.approx(meta["mpp"])
    viewer.reset_view()
    _settle(qtbot)
    shot = viewer.screenshot(canvas_only=True, flash=False)
    # the boxes image is not blank: the canvas shows more than the background colour
    assert shot.shape[2] == 4 and len(np.unique(shot[..., :3].reshape(-1, 3), axis=0)) > 3


def test_inference_widget_runs_and_the_overlay_is_visible(viewer, qtbot, tmp_path, monkeypatch):
    from napari_wsimil._inference_widget import InferenceWidget
    from test_napari_inference import make_tiny_checkpoint

    monkeypatch.setenv("WSIMIL_CACHE", str(tmp_path / "cache"))
    ckpt = make_tiny_checkpoint(tmp_path / "tiny.safetensors")
    # File > Open Sample > wsimil > wsimil demo slide: the slide and its lesion outlines
    sample = viewer.open_sample("napari-wsimil", "demo_slide")
    slide_layer = sample[0]
    assert slide_layer.metadata["wsimil"]["kind"] == "slide"
    assert [ly.name for ly in sample[1:]][:1] == ["lesions"]
    for ly in sample[1:]:
        ly.visible = False  # only the slide and the heatmap in the pixel comparison
    widget = InferenceWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Inference")
    summary = widget.load_checkpoint(ckpt)
    assert summary["tasks"] == {"label": ["benign", "tumour"]}
    widget.set_slide_layer(slide_layer)
    widget.device_combo.setCurrentText("cpu")
    widget.store_edit.setText(str(tmp_path / "store"))
    # the run reports in napari's activity indicator, which grows the status bar by 1 px the first time it shows
    # (and so shrinks the canvas): show one before the reference screenshot
    from napari.utils import progress

    progress(total=1, desc="settle the status bar").close()
    viewer.reset_view()
    _settle(qtbot)
    before = viewer.screenshot(canvas_only=True, flash=False)

    worker = widget.run()
    assert worker is not None
    qtbot.waitUntil(lambda: widget.worker is None, timeout=120_000)
    assert widget.error is None, widget.error
    result = widget.result
    assert result is not None and not result.from_cache
    layer = widget.map_layers.layers["attention"]
    assert layer in viewer.layers and layer.data.shape == result.geometry.shape
    assert np.isfinite(layer.data).sum() == len(result.coords)
    assert "tumour" in widget.probs_label.text()

    # the heatmap is on screen: inside the tissue the canvas changed, far outside it did not
    viewer.layers.selection.active = layer
    _settle(qtbot)
    after = viewer.screenshot(canvas_only=True, flash=False)
    assert before.shape == after.shape
    diff = np.abs(after[..., :3].astype(int) - before[..., :3].astype(int)).sum(-1)
    h, w = diff.shape
    centre = diff[h // 2 - 10 : h // 2 + 10, w // 2 - 10 : w // 2 + 10]
    assert (centre > 30).mean() > 0.9, "the attention overlay is not visible over the tissue"
    corner = diff[:5, :5]
    assert corner.max() < 30, "the overlay leaks outside the slide"
    # hiding the overlay restores the slide
    layer.visible = False
    _settle(qtbot)
    hidden = viewer.screenshot(canvas_only=True, flash=False)
    assert np.abs(hidden[..., :3].astype(int) - before[..., :3].astype(int)).max() <= 2

    # hovering a patch puts its values in the status
    x, y = (int(v) for v in result.coords[len(result.coords) // 2])
    status = layer.get_status(((y + 64) * 0.5, (x + 64) * 0.5), world=True)
    assert f"patch x, y = {x}, {y} px" in status["coordinates"]
    assert status["coordinates"].startswith(f"x, y = {(x + 64) * 0.5:.2f}, {(y + 64) * 0.5:.2f} µm")

    tissue = widget.add_tissue_mask()
    assert tissue.metadata["wsimil"]["kind"] == "tissue" and tissue.data.any()

    out = widget.export_geojson(tmp_path / "maps.geojson")
    assert out.is_file()

    # second run: cached features
    widget.run()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
    assert widget.result is not None and widget.result.from_cache
    assert len([ly for ly in viewer.layers if ly.name == f"{result.slide_id} · attention"]) == 1  # updated in place


def test_cancel_stops_the_worker(viewer, qtbot, tmp_path):
    from napari_wsimil._inference_widget import InferenceWidget
    from test_napari_inference import make_tiny_checkpoint, write_tissue_slide

    slide = write_tissue_slide(tmp_path / "tissue.tiff")
    ckpt = make_tiny_checkpoint(tmp_path / "tiny.safetensors")
    viewer.open(str(slide), plugin="napari-wsimil")
    widget = InferenceWidget(viewer)
    widget.load_checkpoint(ckpt)
    widget.store_edit.setText("")
    widget.device_combo.setCurrentText("cpu")
    widget.run()
    widget.cancel()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
    assert widget.result is None and widget.error is None
    assert widget.status.text() == "cancelled" and widget.run_button.isEnabled()


def test_store_widget_lists_and_opens_slides(viewer, qtbot, tmp_path):
    from napari_wsimil._inference import InferenceRequest, infer_slide
    from napari_wsimil._store_widget import StoreWidget
    from test_napari_inference import make_tiny_checkpoint, write_tissue_slide

    slide = write_tissue_slide(tmp_path / "tissue.tiff")
    ckpt = make_tiny_checkpoint(tmp_path / "tiny.safetensors")
    result = infer_slide(InferenceRequest(ckpt, slide, device="cpu", store=tmp_path / "store", chunk_size=10_000))
    widget = StoreWidget(viewer)
    rows = widget.set_store(tmp_path / "store")
    assert [r["slide_id"] for r in rows] == ["tissue"] and widget.table.rowCount() == 1
    assert widget.checkpoint_combo.currentText() == result.checkpoint_id
    added = widget.open_slide("tissue", result.checkpoint_id)
    assert [ly.name for ly in added] == ["tissue.tiff", "tissue · attention"]


def test_store_maps_open_with_label_names_and_colorbar(viewer, qtbot, tmp_path):
    """Opening a store slide (File > Open): a categorical map is a Labels layer whose category names show in its
    features and the status bar; a scalar map an Image layer with napari's colorbar drawn."""
    from wsimil_core.api import FeatureStore, MapSpec

    coords = np.array([[x, y] for y in (0, 256) for x in (0, 256, 512)], np.int64)
    fs = FeatureStore(tmp_path / "store", create=True)
    fs.write_bag("s1", np.zeros((6, 4), np.float32), coords, "toy", {"dim": 4}, patch_size_level0=256)
    routed = MapSpec("routing/a", "binary", "routed to task a's expert", ("not routed", "routed"))
    score = MapSpec("attention", "scalar", "attention weight", primary=True)  # the map shown (routing/a: hidden)
    maps = {"routing/a": np.array([0, 1, 1, 0, 0, 1], np.float32), "attention": np.linspace(0, 1, 6)}
    fs.write_maps("s1", "ck", maps, specs={"routing/a": routed.to_dict(), "attention": score.to_dict()})
    layers = viewer.open(str(tmp_path / "store" / "s1"), plugin="napari-wsimil")
    by_name = {ly.name: ly for ly in layers}
    labels, image = by_name["s1 · routing/a"], by_name["s1 · attention"]  # named like the dock's layers
    assert image.visible and not labels.visible  # only the primary map is shown; the user turns the others on
    labels.visible = True
    assert labels._type_string == "labels" and list(labels.features["category"]) == ["", "not routed", "routed"]
    assert labels.metadata["wsimil"]["legend"] == {1: "not routed", 2: "routed"}
    # no slide_mpp: world units are level-0 px; (row 128, col 384) lies in patch (256, 0), which is routed
    assert "category: routed" in labels.get_status((128.0, 384.0), world=True)["coordinates"]
    assert "category: not routed" in labels.get_status((128.0, 128.0), world=True)["coordinates"]
    assert image._type_string == "image" and image.colorbar.visible
    viewer.reset_view()
    _settle(qtbot)
    with_bar = viewer.screenshot(canvas_only=True, flash=False)
    image.colorbar.visible = False
    _settle(qtbot)
    without = viewer.screenshot(canvas_only=True, flash=False)
    assert not np.array_equal(with_bar, without)  # the colorbar is drawn on the canvas
