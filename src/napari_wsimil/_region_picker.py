"""The inference dock's region row (Qt): run on a drawn region only, export shapes to QuPath.

The combo lists "(whole slide)" and the viewer's Shapes layers (a read ``*.geojson``, or one you draw: Layers >
New shapes layer, then a polygon, rectangle or ellipse). With a layer chosen, Run predicts only the patches whose
centre lies inside its polygons (its selected shapes, or all when none is selected). **Export region...** writes
the same shapes as GeoJSON annotations in level-0 px that QuPath imports.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from qtpy.QtWidgets import QComboBox, QFileDialog, QHBoxLayout, QLabel, QPushButton, QWidget

from napari_wsimil._annotations import export_shapes_geojson, region_rings
from napari_wsimil._grid import META_KEY

WHOLE_SLIDE = "(whole slide)"


class RegionPicker(QWidget):
    """A row "Region [combo] [extra widgets]"; ``export_button`` (**Export region...**) is placed by the dock.
    ``slide_layer`` gives the dock's chosen slide layer (for its mpp).

    ``set_region_layer(layer)``, ``region_layer()`` (None: whole slide), ``region()`` (level-0 rings or None),
    ``export(path)``.
    """

    def __init__(self, viewer: Any, slide_layer: Callable[[], Any], *extra: QWidget):
        super().__init__()
        self.viewer, self._slide_layer = viewer, slide_layer
        self._layers: list[Any] = []
        self.combo = QComboBox()
        self.combo.setToolTip(
            "run on the patches inside the polygons of a Shapes layer (its selected shapes, or all of them)"
        )
        self.combo.setMinimumContentsLength(3)  # narrow: the dock must fit small screens
        self.combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.export_button = QPushButton("Export region...")
        self.export_button.setToolTip("write the region's shapes as GeoJSON annotations for QuPath (level-0 px)")
        self.export_button.clicked.connect(self._export_clicked)
        row = QHBoxLayout(self)
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(QLabel("Region"))
        row.addWidget(self.combo, 1)
        for widget in extra:
            row.addWidget(widget)
        viewer.layers.events.inserted.connect(self.refresh)
        viewer.layers.events.removed.connect(self.refresh)
        self.refresh()

    def refresh(self, event: Any = None) -> None:
        try:
            current = self.combo.currentText()
        except RuntimeError:  # the Qt widget was deleted: stop listening to the viewer
            self.viewer.layers.events.inserted.disconnect(self.refresh)
            self.viewer.layers.events.removed.disconnect(self.refresh)
            return
        self._layers = [ly for ly in self.viewer.layers if ly._type_string == "shapes"]
        self.combo.clear()
        self.combo.addItems([WHOLE_SLIDE, *(ly.name for ly in self._layers)])
        idx = self.combo.findText(current) if current else -1
        self.combo.setCurrentIndex(max(idx, 0))
        self.export_button.setEnabled(bool(self._layers))

    def set_region_layer(self, layer: Any | None) -> None:
        self.refresh()
        self.combo.setCurrentIndex(0 if layer is None else 1 + self._layers.index(layer))

    def region_layer(self) -> Any | None:
        i = self.combo.currentIndex() - 1
        return self._layers[i] if 0 <= i < len(self._layers) else None

    def _mpp(self) -> float | None:
        slide = self._slide_layer()
        return slide.metadata[META_KEY].get("mpp") if slide is not None else None

    def region(self) -> list[np.ndarray] | None:
        """Level-0 ``(x, y)`` rings of the chosen layer's polygons (None: whole slide); ``DataError`` without one."""
        layer = self.region_layer()
        if layer is None:
            return None
        return region_rings(layer, self._mpp(), selected_only=bool(layer.selected_data))

    def export(self, path: str | Path) -> Path:
        """Write the chosen layer's shapes (its selected ones, or all) as QuPath GeoJSON."""
        layer = self.region_layer() or (self._layers[0] if self._layers else None)
        if layer is None:
            raise ValueError("no Shapes layer to export")
        slide = self._slide_layer()
        props = {"slide_path": str(slide.metadata[META_KEY]["slide_path"])} if slide is not None else {}
        return export_shapes_geojson(
            layer, path, self._mpp(), selected_only=bool(layer.selected_data), properties=props
        )

    def _export_clicked(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Export shapes as GeoJSON", "", "GeoJSON (*.geojson)")
        if path:
            self.export(path)


def widget_row(*widgets: QWidget) -> QWidget:
    """The widgets side by side in one row (no margins)."""
    row = QWidget()
    box = QHBoxLayout(row)
    box.setContentsMargins(0, 0, 0, 0)
    for widget in widgets:
        box.addWidget(widget)
    return row


__all__ = ["WHOLE_SLIDE", "RegionPicker", "widget_row"]
