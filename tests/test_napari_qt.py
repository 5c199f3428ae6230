"""The ``[napari]`` extra's Qt binding: napari starts on it without a deprecation warning (issue 12).

napari warns on every start that PyQt5 is deprecated ("System theme detection requires a Qt6 backend"). With
PyQt5 and PyQt6 both installed (an environment upgraded from 0.1), qtpy picks PyQt5: uninstall PyQt5 or set
``QT_API=pyqt6``. Skipped cleanly when Qt or a display (or Xvfb through pytest-xvfb) is not available.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from _helpers import NO_DISPLAY_REASON, display_available  # noqa: E402

pytestmark = [
    pytest.mark.gui,
    pytest.mark.skipif(not display_available(), reason=NO_DISPLAY_REASON),
]


def test_napari_runs_on_qt6_without_a_binding_warning(qtbot):
    qtpy = pytest.importorskip("qtpy")
    import napari

    assert qtpy.QT6, f"napari runs on {qtpy.API_NAME}; the [napari] extra installs PyQt6 (uninstall PyQt5)"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        viewer = napari.Viewer(show=False)
        qtbot.wait(50)
        viewer.close()
    about_qt = [str(w.message) for w in caught if "Qt6" in str(w.message) or "PyQt5" in str(w.message)]
    assert about_qt == []


def test_browse_row_puts_the_chosen_path_where_asked(qtbot, monkeypatch):
    from qtpy.QtWidgets import QFileDialog, QLineEdit, QPushButton

    from napari_wsimil._run_dock import browse_row
    from wsimil_core.errors import DataError

    monkeypatch.setattr(QFileDialog, "getOpenFileName", lambda *a, **k: ("/data/model.safetensors", ""))
    monkeypatch.setattr(QFileDialog, "getExistingDirectory", lambda *a, **k: "/data/store")
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, **k: ("", ""))  # the dialog was cancelled

    rows = []  # the rows own their edits: keep them alive

    def click(row):
        rows.append(row)
        qtbot.addWidget(row)
        row.findChild(QPushButton).click()

    edit = QLineEdit("old")
    click(browse_row(edit, "Store", mode="dir"))
    assert edit.text() == "/data/store"  # default: into the edit
    chosen, errors = [], []
    click(browse_row(QLineEdit(), "Checkpoint", on_chosen=chosen.append))
    assert chosen == ["/data/model.safetensors"]

    def refuse(path):
        raise DataError(f"{path}: not a checkpoint")

    click(browse_row(QLineEdit(), "Checkpoint", on_chosen=refuse, on_error=errors.append))
    assert errors == ["/data/model.safetensors: not a checkpoint"]
    click(browse_row(QLineEdit(), "Checkpoint", on_chosen=refuse))  # no on_error: the callback shows its own
    saved = QLineEdit("keep.safetensors")
    click(browse_row(saved, "Output", mode="save"))
    assert saved.text() == "keep.safetensors"  # cancelled: unchanged
