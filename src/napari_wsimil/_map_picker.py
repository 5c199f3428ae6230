"""The inference dock's map picker (Qt): the maps of the last run that are not layers yet, one added on demand.

A run adds only each task's primary map (``MapSpec.primary``; a MECDS model would otherwise add ~15 layers);
the picker lists every other map of the result ("routing/a/module2 — binary: routed to ...") and **Add map**
turns the chosen one into a layer (``MapLayerSet.show``), kept up to date like the primary ones.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from qtpy.QtWidgets import QComboBox, QHBoxLayout, QPushButton, QWidget

from napari_wsimil._viewer import MapLayerSet


class MapPicker(QWidget):
    """A combo box of the maps not shown yet and an **Add map** button (hidden while there are none).

    ``set_layer_set(maps)`` binds it to the run's :class:`MapLayerSet` (None: empty), ``refresh()`` re-reads its
    maps (after each update), ``add(name=None)`` adds the chosen (or named) map, calls ``on_added()`` (the dock
    redraws its legend) and returns the layer.
    """

    def __init__(self, on_added: Callable[[], Any] | None = None) -> None:
        super().__init__()
        self.maps: MapLayerSet | None = None
        self._on_added = on_added
        self.combo = QComboBox()
        self.combo.setToolTip("maps of the last run that are not layers yet (each task's primary map is shown)")
        self.combo.setMinimumContentsLength(3)
        self.combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.add_button = QPushButton("Add map")
        self.add_button.clicked.connect(lambda *_: self.add())
        row = QHBoxLayout(self)
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.combo, 1)
        row.addWidget(self.add_button)
        self.refresh()

    def set_layer_set(self, maps: MapLayerSet | None) -> None:
        self.maps = maps
        self.refresh()

    def hidden_maps(self) -> list[str]:
        """The maps of the last result without a layer in the viewer."""
        if self.maps is None:
            return []
        shown = {n for n, layer in self.maps.layers.items() if layer in self.maps.viewer.layers}
        return [n for n in self.maps.available() if n not in shown]

    def refresh(self) -> None:
        names = self.hidden_maps()
        self.setVisible(bool(names))  # shown only when a run has maps that are not layers
        if names == [self.combo.itemData(i) for i in range(self.combo.count())]:
            return
        current = self.combo.currentData()
        self.combo.clear()
        for name in names:
            spec = self.maps.specs.get(name) if self.maps is not None else None
            self.combo.addItem(f"{name} ({spec.kind})" if spec is not None else name, name)
            if spec is not None:
                self.combo.setItemData(self.combo.count() - 1, spec.description, 3)  # Qt.ToolTipRole
        if current in names:
            self.combo.setCurrentIndex(names.index(current))

    def add(self, name: str | None = None) -> Any:
        """Add map ``name`` (default: the chosen one) as a layer; returns it (None when there is nothing)."""
        name = name or self.combo.currentData()
        if self.maps is None or not name:
            return None
        layer = self.maps.show(name)
        self.refresh()
        if self._on_added is not None:
            self._on_added()
        return layer


__all__ = ["MapPicker"]
