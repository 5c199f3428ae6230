"""The docks in a real napari window (Qt under Xvfb): slides dropped on the viewer open through wsimil without a
dialog once the preference is set, a slide another reader opened is reopened lazily, an implausible mpp is
set in the dock, the window with the Training and Inference docks fits 1280 x 800, worker errors appear once
and long work shows in napari's activity dock.

Skipped cleanly when Qt or a display (or Xvfb through pytest-xvfb) is not available.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from _helpers import NO_DISPLAY_REASON, display_available  # noqa: E402

pytestmark = [
    pytest.mark.gui,
    pytest.mark.skipif(not display_available(), reason=NO_DISPLAY_REASON),
]


@pytest.fixture
def settings(tmp_path, monkeypatch):
    """napari settings without a file (nothing is saved; the user's settings are never touched)."""
    pytest.importorskip("qtpy")
    import napari.settings as napari_settings

    from napari_wsimil import _reader_preference as rp

    fresh = napari_settings.NapariSettings(config_path=None)
    monkeypatch.setattr(napari_settings, "_SETTINGS", fresh)
    monkeypatch.delenv(rp.NO_OFFER_ENV, raising=False)
    rp._reset_session()
    yield fresh
    rp._reset_session()


@pytest.fixture
def viewer(qtbot, settings):
    import napari

    v = napari.Viewer(show=True)
    yield v
    v.close()


@pytest.fixture
def slide(tmp_path, fixtures_dir) -> Path:
    path = tmp_path / "boxes.tiff"
    shutil.copy(fixtures_dir / "openslide" / "boxes.tiff", path)
    return path


def _drop(viewer, path: Path, monkeypatch) -> list[str]:
    """Drop ``path`` on the canvas as a file manager does; returns the reader dialogs napari would have shown."""
    import napari._qt.qt_viewer as qt_viewer_module
    from qtpy.QtCore import QMimeData, QPointF, Qt, QUrl
    from qtpy.QtGui import QDropEvent

    dialogs: list[str] = []
    monkeypatch.setattr(qt_viewer_module, "handle_gui_reading", lambda *a, **k: dialogs.append("choose reader"))
    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(path))])
    event = QDropEvent(
        QPointF(10, 10),
        Qt.DropAction.CopyAction,
        mime,
        Qt.MouseButton.NoButton,
        Qt.KeyboardModifier.NoModifier,
    )
    viewer.window._qt_viewer.dropEvent(event)
    return dialogs


def test_a_dropped_tiff_opens_through_wsimil_once_the_preference_is_set(viewer, slide, monkeypatch):
    from napari_wsimil._reader_preference import set_reader_preference

    # without the preference napari asks which reader to use (its builtin one also takes *.tiff)
    assert _drop(viewer, slide, monkeypatch) == ["choose reader"]
    assert len(viewer.layers) == 0
    set_reader_preference()
    assert _drop(viewer, slide, monkeypatch) == []
    (layer,) = viewer.layers
    meta = layer.metadata["wsimil"]
    assert meta["kind"] == "slide" and layer.multiscale and meta["units"] == "µm"


def test_the_dock_offers_the_preference_once(viewer, qtbot):
    from napari.utils.notifications import notification_manager

    from napari_wsimil._inference_widget import InferenceWidget

    shown = []
    notification_manager.notification_ready.connect(shown.append)
    try:
        InferenceWidget(viewer)
        InferenceWidget(viewer)
    finally:
        notification_manager.notification_ready.disconnect(shown.append)
    offers = [n for n in shown if "Choose reader" in n.message]
    assert len(offers) == 1 and [a for a, _ in offers[0].actions] == ["Open slides with wsimil", "No"]


def test_a_slide_opened_by_the_builtin_reader_is_reopened_lazily(viewer, slide, qtbot):
    from napari_wsimil._inference_widget import InferenceWidget
    from napari_wsimil._reader_preference import foreign_slide_path, missing_preferences

    widget = InferenceWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Inference")
    (plain,) = viewer.open(str(slide), plugin="napari")  # what choosing napari's reader in the dialog gives
    assert foreign_slide_path(plain) == str(slide) and not plain.multiscale
    banner = widget.banner
    assert banner.foreign == [plain] and not banner.reopen_row.isHidden()
    assert widget.slide_combo.count() == 0  # the dock cannot use it
    assert not banner.reader_box.isHidden() and banner.reader_box.isChecked()
    banner.reopen_button.click()
    (layer,) = viewer.layers
    assert layer is not plain and layer.multiscale and layer.metadata["wsimil"]["kind"] == "slide"
    assert layer.name == plain.name
    assert widget.slide_combo.count() == 1 and widget.slide_layer() is layer
    assert banner.reopen_row.isHidden()
    assert missing_preferences() == []  # the box was ticked: the next slide opens through wsimil


def test_an_implausible_mpp_is_set_in_the_dock(viewer, tmp_path, qtbot):
    from napari_wsimil._inference_widget import InferenceWidget
    from test_napari_inference import make_tiny_checkpoint
    from wsimil_core.wsi.writer import write_pyramid_tiff

    path = write_pyramid_tiff(
        tmp_path / "dpi72.tiff", np.full((512, 512, 3), 180, np.uint8), mpp=25400 / 72, levels=2, tile=128
    )
    with pytest.warns(UserWarning, match="implausible"):
        viewer.open(str(path), plugin="napari-wsimil")
    widget = InferenceWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Inference")
    banner = widget.banner
    assert not banner.mpp_row.isHidden() and "352.8 µm/px is implausible" in banner.mpp_label.text()
    banner.mpp_spin.setValue(0.25)
    banner.mpp_button.click()
    (layer,) = viewer.layers
    assert layer.metadata["wsimil"]["mpp"] == pytest.approx(0.25)
    assert layer.scale[-1] == pytest.approx(0.25)
    assert banner.mpp_row.isHidden()
    # inference uses the mpp that was set
    widget.load_checkpoint(make_tiny_checkpoint(tmp_path / "tiny.safetensors"))
    assert widget.request().slide_mpp == pytest.approx(0.25)


def test_the_window_with_training_and_inference_docks_fits_1280_x_800(viewer, qtbot):
    window = viewer.window._qt_window
    _, inference = viewer.window.add_plugin_dock_widget("napari-wsimil", "Inference")
    _, training = viewer.window.add_plugin_dock_widget("napari-wsimil", "Training")
    qtbot.wait(100)
    hint = window.minimumSizeHint()
    assert hint.width() <= 1280 and hint.height() <= 800, hint
    assert window.minimumSize().height() <= 800
    window.resize(1280, 800)
    qtbot.wait(100)
    assert window.height() <= 800 and window.width() <= 1280
    for dock in (inference, training):
        assert dock.isVisible() and dock.height() > 0
        assert dock.scroll_area.widget().minimumSizeHint().height() > dock.minimumSizeHint().height()


def test_a_worker_error_is_shown_once_cause_first_and_does_not_raise(viewer, tmp_path, qtbot, monkeypatch):
    from napari.utils.notifications import notification_manager

    import napari_wsimil._inference_widget as inference_widget
    from napari_wsimil._inference_widget import InferenceWidget
    from test_napari_inference import make_tiny_checkpoint, write_tissue_slide
    from wsimil_core.errors import SlideError

    slide = write_tissue_slide(tmp_path / "tissue.tiff")
    viewer.open(str(slide), plugin="napari-wsimil")
    long_path = "/" + "/".join(["a-rather-long-folder-name"] * 8) + "/tissue.tiff"

    def failing(request):
        yield inference_widget.InferenceUpdate("load", message="loading")
        raise SlideError(f"{long_path}: cannot read tile (3, 4) at level 1")

    monkeypatch.setattr(inference_widget, "run_inference", failing)
    toasts = []
    monkeypatch.setattr(notification_manager, "receive_error", lambda *args, **kw: toasts.append(args))
    widget = InferenceWidget(viewer)
    widget.load_checkpoint(make_tiny_checkpoint(tmp_path / "tiny.safetensors"))
    widget.store_edit.setText("")
    widget.run()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
    # pytest-qt fails the test if the error is re-raised in the Qt event loop
    assert toasts == []  # no traceback toast beside the dock's message
    assert widget.error == "cannot read tile (3, 4) at level 1 (tissue.tiff)"
    assert widget.status.text().count("cannot read tile") == 1 and long_path not in widget.status.text()
    assert long_path in widget.status.toolTip()
    assert widget.run_button.isEnabled() and widget.activity is None


def test_inference_reports_in_napari_activity_dock(viewer, tmp_path, qtbot, monkeypatch):
    from napari.utils import progress

    from napari_wsimil._inference_widget import InferenceWidget
    from test_napari_inference import make_tiny_checkpoint, write_tissue_slide

    monkeypatch.setenv("WSIMIL_CACHE", str(tmp_path / "cache"))
    slide = write_tissue_slide(tmp_path / "tissue.tiff")
    viewer.open(str(slide), plugin="napari-wsimil")
    widget = InferenceWidget(viewer)
    widget.load_checkpoint(make_tiny_checkpoint(tmp_path / "tiny.safetensors"))
    widget.store_edit.setText("")
    widget.device_combo.setCurrentText("cpu")
    seen: list[tuple[int, int, bool]] = []
    widget.run()
    bar = widget.activity
    assert bar is not None and "tissue.tiff" in bar.desc
    widget.worker.yielded.connect(lambda _: seen.append((bar.n, bar.total, bar in progress._all_instances)))
    qtbot.waitUntil(lambda: widget.worker is None, timeout=120_000)
    assert widget.error is None, widget.error
    n = len(widget.result.coords)
    assert seen and all(listed for *_, listed in seen)  # listed in the activity dock while running
    assert seen[-1][:2] == (n, n)  # counts patches, like the dock's own bar
    assert bar not in progress._all_instances and widget.activity is None  # closed when done
