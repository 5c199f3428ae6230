"""A strip at the top of the Inference dock about the slides in the viewer (Qt).

* A slide another reader opened (napari's builtin reader: a plain, non-lazy image in pixels, which the docks
  ignore) gets "Reopen with wsimil" (a lazy µm pyramid); the box under it makes wsimil napari's reader for slide
  files (``_reader_preference.set_reader_preference``), so the next one opens without the "Choose reader" dialog.
* A wsimil slide whose µm per pixel is missing or implausible (``_reader_preference.mpp_problem``, e.g. a 72-dpi
  TIFF tag read as 352.78 µm/px) gets a warning, a µm/px box and "Reopen with this mpp" (``open_slide(...,
  slide_mpp=...)``); the reopened layer's mpp is what inference then uses.

Opening the strip also offers once to set the reader preference (``offer_reader_preference``).
"""

from __future__ import annotations

import html
from typing import Any

from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QCheckBox,
    QDoubleSpinBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from napari_wsimil._grid import META_KEY
from napari_wsimil._reader import slide_layers
from napari_wsimil._reader_preference import (
    foreign_slide_path,
    missing_preferences,
    mpp_problem,
    offer_reader_preference,
    set_reader_preference,
)
from napari_wsimil._viewer import add_layers, slide_layers_of
from wsimil_core.errors import WsimilError

WARN = "#e0a030"


def _replace_layer(viewer: Any, old: Any, layer_data: list[Any]) -> Any:
    """Put the first of ``layer_data`` where ``old`` was (same place in the layer list, same name)."""
    index = list(viewer.layers).index(old)
    name = old.name
    viewer.layers.remove(old)
    data, kwargs, kind = layer_data[0]
    (new,) = add_layers(viewer, [(data, {**kwargs, "name": name}, kind)])
    viewer.layers.move(list(viewer.layers).index(new), index)
    return new


def reopen_with_wsimil(viewer: Any, layer: Any, slide_mpp: float | None = None) -> Any:
    """Replace ``layer`` (a slide opened by another reader, or a wsimil slide) by wsimil's lazy slide layer of the
    same file, with ``slide_mpp`` overriding the file's µm per pixel when given; returns the new layer.

    Raises:
        SlideError: the file cannot be opened by wsimil (the message names it).
    """
    path = foreign_slide_path(layer)
    if path is None:
        path = layer.metadata[META_KEY]["slide_path"]
    return _replace_layer(viewer, layer, slide_layers(path, slide_mpp=slide_mpp))


class SlideBanner(QWidget):
    """Offers to reopen a slide lazily with wsimil, and to set a slide's mpp; hidden when there is nothing to say.

    Public API (tests): ``foreign`` (the layers opened by another reader), ``bad_mpp`` (wsimil slide layers with a
    missing or implausible mpp), ``reopen(layer)``, ``apply_mpp(layer, mpp)``; widgets ``reader_box``,
    ``mpp_spin``, ``mpp_button``, ``reopen_button``.
    """

    def __init__(self, viewer: Any, parent: QWidget | None = None):
        super().__init__(parent)
        self.viewer = viewer
        self.foreign: list[Any] = []
        self.bad_mpp: list[Any] = []
        self.error: str | None = None

        self.reopen_label = QLabel("")
        self.reopen_label.setWordWrap(True)
        self.reopen_label.setTextFormat(Qt.TextFormat.RichText)
        self.reopen_button = QPushButton("Reopen with wsimil")
        self.reopen_button.setToolTip("replace the layer by wsimil's lazy slide pyramid in µm, which the docks use")
        self.reopen_button.clicked.connect(self._reopen_clicked)
        self.reader_box = QCheckBox("always open slide files with wsimil (no reader dialog)")
        self.reader_box.setToolTip(
            "sets napari's Preferences > Plugins > File extension readers for .svs, .tif, .ndpi, .mrxs, .dcm..."
        )
        self.mpp_label = QLabel("")
        self.mpp_label.setWordWrap(True)
        self.mpp_label.setTextFormat(Qt.TextFormat.RichText)
        self.mpp_spin = QDoubleSpinBox()
        self.mpp_spin.setDecimals(4)
        self.mpp_spin.setRange(0.01, 100.0)
        self.mpp_spin.setSingleStep(0.05)
        self.mpp_spin.setValue(0.5)
        self.mpp_spin.setSuffix(" µm/px")
        self.mpp_button = QPushButton("Reopen with this mpp")
        self.mpp_button.clicked.connect(self._mpp_clicked)

        self.reopen_row = QWidget()
        lay = QVBoxLayout(self.reopen_row)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.reopen_label)
        lay.addWidget(self.reopen_button)
        lay.addWidget(self.reader_box)
        self.mpp_row = QWidget()
        lay = QVBoxLayout(self.mpp_row)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.mpp_label)
        row = QHBoxLayout()
        row.addWidget(self.mpp_spin, 1)
        row.addWidget(self.mpp_button)
        lay.addLayout(row)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.reopen_row)
        layout.addWidget(self.mpp_row)

        self.viewer.layers.events.inserted.connect(self.refresh)
        self.viewer.layers.events.removed.connect(self.refresh)
        self.refresh()
        offer_reader_preference()

    def refresh(self, event: Any = None) -> None:
        """Re-read the viewer's layers and show what applies."""
        try:
            self.isVisible()
        except RuntimeError:  # the Qt widget was deleted: stop listening to the viewer
            self.viewer.layers.events.inserted.disconnect(self.refresh)
            self.viewer.layers.events.removed.disconnect(self.refresh)
            return
        self.foreign = [lyr for lyr in self.viewer.layers if foreign_slide_path(lyr)]
        self.bad_mpp = [lyr for lyr in slide_layers_of(self.viewer) if mpp_problem(lyr.metadata[META_KEY]["mpp"])]
        if self.foreign:
            names = ", ".join(html.escape(lyr.name) for lyr in self.foreign)
            plugin = getattr(self.foreign[0].source, "reader_plugin", None) or "another reader"
            self.reopen_label.setText(
                f"<span style='color:{WARN}'>{names}: opened by {html.escape(str(plugin))} (whole image in pixels, "
                "not lazy); the wsimil docks use slides opened by wsimil.</span>"
            )
            self.reader_box.setVisible(bool(missing_preferences()))
            self.reader_box.setChecked(True)
        self.reopen_row.setVisible(bool(self.foreign))
        if self.bad_mpp:
            layer = self.bad_mpp[0]
            problem = mpp_problem(layer.metadata[META_KEY]["mpp"])
            self.mpp_label.setText(
                f"<span style='color:{WARN}'>{html.escape(layer.name)}: {html.escape(str(problem))}. "
                "Set the slide's µm per pixel (e.g. 0.25 at 40x, 0.5 at 20x):</span>"
            )
        self.mpp_row.setVisible(bool(self.bad_mpp))

    def reopen(self, layer: Any, *, set_preference: bool | None = None) -> Any:
        """Reopen a foreign slide layer with wsimil (and make wsimil the slide reader when the box is ticked)."""
        if set_preference if set_preference is not None else self.reader_box.isChecked():
            set_reader_preference()
        return reopen_with_wsimil(self.viewer, layer)

    def apply_mpp(self, layer: Any, mpp: float) -> Any:
        """Reopen a wsimil slide layer with ``mpp`` µm per level-0 pixel (``open_slide(slide_mpp=mpp)``)."""
        return reopen_with_wsimil(self.viewer, layer, slide_mpp=float(mpp))

    def _reopen_clicked(self) -> None:
        self._guard(lambda: [self.reopen(lyr) for lyr in list(self.foreign)])

    def _mpp_clicked(self) -> None:
        if self.bad_mpp:
            self._guard(lambda: self.apply_mpp(self.bad_mpp[0], self.mpp_spin.value()))

    def _guard(self, action: Any) -> None:
        try:
            action()
            self.error = None
        except (WsimilError, OSError) as exc:
            self.error = str(exc)
            self.reopen_label.setText(f"<span style='color:#e04040'>{html.escape(self.error)}</span>")
            self.reopen_row.setVisible(True)


__all__ = ["SlideBanner", "reopen_with_wsimil"]
