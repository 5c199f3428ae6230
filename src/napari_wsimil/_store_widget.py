"""Store browser dock widget (Qt): a feature store's slides, their encoders and map sets; open a slide with its maps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFormLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QWidget,
)

from napari_wsimil._grid import GridGeometry
from napari_wsimil._run_dock import browse_row, error_html, scroll_layout
from napari_wsimil._viewer import MapLayerSet, add_layers
from wsimil_core.errors import WsimilError


class StoreWidget(QWidget):
    """Browse a feature store: its slides, their encoders and map sets; open a slide with its maps."""

    COLUMNS = ("slide_id", "n_patches", "encoders", "maps", "slide file")

    def __init__(self, napari_viewer: Any):
        super().__init__()
        self.viewer = napari_viewer
        self.rows: list[dict[str, Any]] = []
        self.map_layers: list[MapLayerSet] = []
        self.store_edit = QLineEdit()
        self.store_edit.setPlaceholderText("store directory (zarr)")
        self.store_edit.returnPressed.connect(self.refresh)
        self.table = QTableWidget(0, len(self.COLUMNS))
        self.table.setHorizontalHeaderLabels(list(self.COLUMNS))
        self.table.setSelectionBehavior(QTableWidget.SelectRows)
        self.table.setEditTriggers(QTableWidget.NoEditTriggers)
        self.table.itemSelectionChanged.connect(self._selection_changed)
        self.checkpoint_combo = QComboBox()
        self.tissue_box = QCheckBox("tissue mask")
        self.open_button = QPushButton("Open slide + maps")
        self.open_button.clicked.connect(self._open_clicked)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        layout = scroll_layout(self)
        layout.addWidget(browse_row(self.store_edit, "Feature store", mode="dir", on_chosen=self.set_store))
        refresh = QPushButton("Refresh")
        refresh.clicked.connect(self.refresh)
        layout.addWidget(refresh)
        layout.addWidget(self.table, 1)
        form = QFormLayout()
        form.addRow("Maps of", self.checkpoint_combo)
        form.addRow("", self.tissue_box)
        layout.addLayout(form)
        layout.addWidget(self.open_button)
        layout.addWidget(self.status)

    def set_store(self, path: str | Path) -> list[dict[str, Any]]:
        """Show the slides of the store at ``path``."""
        self.store_edit.setText(str(path))
        return self.refresh()

    def refresh(self) -> list[dict[str, Any]]:
        from napari_wsimil._reader import store_summary

        path = self.store_edit.text().strip()
        self.table.setRowCount(0)
        self.rows = []
        if not path:
            return self.rows
        try:
            self.rows = store_summary(path)
        except WsimilError as exc:
            self.status.setText(error_html(str(exc)))
            return self.rows
        self.table.setRowCount(len(self.rows))
        for r, row in enumerate(self.rows):
            values = (
                row["slide_id"],
                str(row["n_patches"]),
                ", ".join(row["encoders"]),
                ", ".join(row["maps"]),
                "found" if row["slide_found"] else "missing",
            )
            for c, value in enumerate(values):
                self.table.setItem(r, c, QTableWidgetItem(value))
        self.status.setText(f"{len(self.rows)} slides")
        if self.rows:
            self.table.selectRow(0)
        return self.rows

    def _selection_changed(self) -> None:
        self.checkpoint_combo.clear()
        row = self.selected_row()
        if row is not None:
            self.checkpoint_combo.addItems(row["maps"])

    def selected_row(self) -> dict[str, Any] | None:
        items = self.table.selectionModel().selectedRows() if self.table.selectionModel() else []
        if not items:
            return None
        return self.rows[items[0].row()]

    def open_slide(self, slide_id: str, checkpoint_id: str | None = None, tissue: bool = False) -> list[Any]:
        """Add the slide (when its file exists) and the maps of ``checkpoint_id`` (if any) as layers."""
        from napari_wsimil._reader import store_slide_layers

        store = self.store_edit.text().strip()
        image_layers = store_slide_layers(store, slide_id, [], tissue=tissue)
        added = add_layers(self.viewer, image_layers)
        if checkpoint_id:
            from wsimil_core.api import FeatureStore

            fs = FeatureStore(store)
            coords = fs.read_coords(slide_id)
            attrs = fs.slide_attrs(slide_id)
            geometry = GridGeometry.from_attrs(attrs, coords, where=f"store {store}: slide {slide_id!r}")
            maps = fs.read_maps(slide_id, checkpoint_id)
            mls = MapLayerSet(
                self.viewer,
                prefix=f"{slide_id} · ",  # the inference dock's names: the same map is the same layer name
                extra_meta={
                    "slide_id": slide_id,
                    "checkpoint_id": checkpoint_id,
                    "store": store,
                    "slide_path": attrs.get("slide_path"),
                },
            )
            added.extend(mls.update(maps, geometry, coords, specs=fs.read_map_specs(slide_id, checkpoint_id)))
            self.map_layers.append(mls)
        notes = []
        if checkpoint_id:
            pred = fs.maps_attrs(slide_id, checkpoint_id).get("prediction")
            if isinstance(pred, dict) and pred:
                notes.append("prediction: " + ", ".join(f"{t}={c}" for t, c in pred.items()))
        if not any(ld[2] == "image" and ld[1].get("rgb") for ld in image_layers):
            notes.append("the slide file is not found; showing the maps only")
        self.status.setText(f"{slide_id}: " + ("; ".join(notes) or "opened"))
        return added

    def _open_clicked(self) -> None:
        row = self.selected_row()
        if row is None:
            self.status.setText("select a slide first")
            return
        try:
            self.open_slide(row["slide_id"], self.checkpoint_combo.currentText() or None, self.tissue_box.isChecked())
        except WsimilError as exc:
            self.status.setText(error_html(str(exc)))


__all__ = ["StoreWidget"]
