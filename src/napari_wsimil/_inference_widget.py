"""Inference dock widget (Qt): run a checkpoint on a slide layer, one layer per map, refined progressively.

The heavy work runs in a napari ``thread_worker`` (``_inference.run_inference``); this widget only collects
inputs, shows progress and turns results into layers (``_viewer.MapLayerSet``).
"""

from __future__ import annotations

import dataclasses
import html
from pathlib import Path
from typing import Any

from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QWidget,
)

from napari_wsimil._checkpoint_info import checkpoint_info_html, checkpoint_summary
from napari_wsimil._decision import TaskDecision, decide, probs_html, warnings_html
from napari_wsimil._grid import META_KEY
from napari_wsimil._inference import (
    DEVICES,
    InferenceRequest,
    InferenceResult,
    InferenceUpdate,
    default_cache_dir,
    export_geojson_file,
    preload,
    run_inference,
)
from napari_wsimil._map_layers import legend_text
from napari_wsimil._map_picker import MapPicker
from napari_wsimil._region_picker import RegionPicker, widget_row
from napari_wsimil._run_dock import activity_progress, browse_row, concise_error, dock_worker, error_html, scroll_layout
from napari_wsimil._slide_banner import SlideBanner
from napari_wsimil._survival import split_survival, survival_html
from napari_wsimil._viewer import MapLayerSet, add_layers, legend_colors, run_layer_set, slide_layers_of
from wsimil_core.errors import ConfigError, DataError, WsimilError


class InferenceWidget(QWidget):
    """Run a checkpoint on a slide layer; one layer per map, refined progressively.

    Public API (used by the training widget and tests):
        ``load_checkpoint(path) -> dict``: set the checkpoint and show its summary.
        ``set_slide_layer(layer)``, ``run()``, ``cancel()``, ``export_geojson(path)``;
        ``result`` (the last :class:`InferenceResult`), ``worker`` (the running worker or None),
        ``map_layers`` (the :class:`MapLayerSet` of the last run; each slide / checkpoint / region keeps its own,
        so a run on slide B leaves slide A's layers), ``map_picker`` (adds a non-primary map), ``region_picker``
        (run on a Shapes layer's polygons only; export shapes as GeoJSON), ``decisions`` (``{task: TaskDecision}``
        shown for the last result: the class in bold and the threshold rule that gave it).
    The "use 0.5" box re-labels the last result with threshold 0.5 instead of the checkpoint's (no re-run).
    """

    def __init__(self, napari_viewer: Any):
        super().__init__()
        self.viewer = napari_viewer
        self.worker = None
        self.result: InferenceResult | None = None
        self.error: str | None = None
        self.map_layers: MapLayerSet | None = None
        self.decisions: dict[str, TaskDecision] = {}
        self._slide_layers: list[Any] = []
        self.activity: Any = None  # the run's progress bar in napari's activity dock
        self.banner = SlideBanner(self.viewer)  # reopen a slide another reader opened; set an implausible mpp
        self._map_sets: dict[tuple[str, ...], MapLayerSet] = {}

        self.checkpoint_edit = QLineEdit()
        self.checkpoint_edit.setPlaceholderText("model.safetensors")
        self.checkpoint_edit.editingFinished.connect(self._checkpoint_edited)
        self.checkpoint_info = QLabel("no checkpoint")
        self.checkpoint_info.setWordWrap(True)
        self.device_combo = QComboBox()
        self.device_combo.addItems(list(DEVICES))
        self.slide_combo = QComboBox()
        self.store_edit = QLineEdit(str(default_cache_dir() / "store"))
        self.store_edit.setToolTip(
            "feature store used as a cache (features and maps); empty = no cache. The checkpoint's training "
            "store is used instead when it holds the slide."
        )
        self.weights_edit = QLineEdit()
        self.weights_edit.setPlaceholderText("(optional) the encoder's local weights file")
        self.run_button = QPushButton("Run")
        self.run_button.clicked.connect(self.run)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.probs_label = QLabel("")
        self.probs_label.setTextFormat(Qt.RichText)
        self.probs_label.setWordWrap(True)
        self.threshold_warning = QLabel("")
        self.threshold_warning.setTextFormat(Qt.RichText)
        self.threshold_warning.setWordWrap(True)
        self.threshold_warning.setVisible(False)
        self.half_check = QCheckBox("use 0.5")
        self.half_check.setToolTip(
            "binary tasks: predict class 1 when p(class 1) >= 0.5 instead of the checkpoint's tuned threshold "
            "(re-labels the last result; the model is not re-run)"
        )
        self.half_check.toggled.connect(self._show_prediction)
        self.legend_label = QLabel("")
        self.legend_label.setTextFormat(Qt.RichText)
        self.legend_label.setWordWrap(True)
        self.tissue_button = QPushButton("Show tissue mask")
        self.tissue_button.setToolTip("detect tissue on a thumbnail of the slide layer and add it as a Labels layer")
        self.tissue_button.clicked.connect(self._tissue_clicked)
        self.map_picker = MapPicker(self._show_legend)
        self.region_picker = RegionPicker(self.viewer, self.slide_layer, self.tissue_button)
        self.export_button = QPushButton("Export GeoJSON...")
        self.export_button.setEnabled(False)
        self.export_button.clicked.connect(self._export_clicked)

        form = QFormLayout()
        ckpt_filter = "Checkpoints (*.safetensors)"
        form.addRow(
            "Checkpoint",
            browse_row(self.checkpoint_edit, "Checkpoint", file_filter=ckpt_filter, on_chosen=self.load_checkpoint),
        )
        form.addRow("", self.checkpoint_info)
        form.addRow("Device", self.device_combo)
        form.addRow("Slide layer", self.slide_combo)
        form.addRow(self.region_picker)  # "Region [shapes layer] [Show tissue mask]"
        form.addRow("Store (cache)", browse_row(self.store_edit, "Feature store (cache)", mode="dir"))
        weights_filter = "Weights (*.pth *.pt *.safetensors)"
        form.addRow("Encoder weights", browse_row(self.weights_edit, "Encoder weights", file_filter=weights_filter))
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        layout = scroll_layout(self)
        layout.addWidget(self.banner)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        layout.addWidget(QLabel("<b>Slide prediction</b>"))
        layout.addWidget(self.probs_label)
        layout.addWidget(self.threshold_warning)
        layout.addWidget(self.half_check)
        layout.addWidget(QLabel("<b>Legend</b>"))
        layout.addWidget(self.legend_label)
        layout.addWidget(self.map_picker)
        layout.addWidget(widget_row(self.export_button, self.region_picker.export_button))
        layout.addStretch(1)

        self.viewer.layers.events.inserted.connect(self._refresh_slides)
        self.viewer.layers.events.removed.connect(self._refresh_slides)
        self._refresh_slides()

    # --- inputs -------------------------------------------------------------------------------------------
    def _refresh_slides(self, event: Any = None) -> None:
        try:
            current = self.slide_combo.currentText()
        except RuntimeError:  # the Qt widget was deleted: stop listening to the viewer
            self.viewer.layers.events.inserted.disconnect(self._refresh_slides)
            self.viewer.layers.events.removed.disconnect(self._refresh_slides)
            return
        self._slide_layers = slide_layers_of(self.viewer)
        self.slide_combo.clear()
        self.slide_combo.addItems([lyr.name for lyr in self._slide_layers])
        if current:
            idx = self.slide_combo.findText(current)
            if idx >= 0:
                self.slide_combo.setCurrentIndex(idx)

    def set_slide_layer(self, layer: Any) -> None:
        """Choose the slide layer to run on."""
        self._refresh_slides()
        self.slide_combo.setCurrentIndex(self._slide_layers.index(layer))

    def slide_layer(self) -> Any | None:
        i = self.slide_combo.currentIndex()
        return self._slide_layers[i] if 0 <= i < len(self._slide_layers) else None

    def load_checkpoint(self, path: str | Path) -> dict[str, Any]:
        """Set the checkpoint (e.g. the training widget's result) and show what it predicts.

        Raises:
            CheckpointError: the file is missing or not a wsimil checkpoint (also shown in the widget).
        """
        self.checkpoint_edit.setText(str(path))
        try:
            summary = checkpoint_summary(path)
        except WsimilError as exc:
            self.checkpoint_info.setText(error_html(str(exc)))
            raise
        self.checkpoint_info.setText(checkpoint_info_html(summary))
        return summary

    def _checkpoint_edited(self) -> None:
        text = self.checkpoint_edit.text().strip()
        if text:
            try:
                self.load_checkpoint(text)
            except WsimilError:
                pass

    def add_tissue_mask(self) -> Any:
        """Add the tissue mask of the selected slide layer (``tiling.detect_tissue`` defaults) as a Labels layer."""
        from napari_wsimil._reader import slide_layers

        layer = self.slide_layer()
        if layer is None:
            raise ConfigError("open a slide first")
        meta = layer.metadata[META_KEY]
        layers = slide_layers(meta["slide_path"], slide_mpp=meta.get("mpp"), tissue=True)
        if len(layers) < 2:
            raise ConfigError(f"{meta['slide_path']}: the slide has no mpp, so tissue cannot be detected")
        data, kwargs, kind = layers[1]
        return add_layers(self.viewer, [(data, {**kwargs, "visible": True}, kind)])[0]

    def _tissue_clicked(self) -> None:
        try:
            self.add_tissue_mask()
        except WsimilError as exc:
            self._show_error(str(exc))

    # --- running ------------------------------------------------------------------------------------------
    def request(self) -> InferenceRequest:
        """The request the Run button would start (``WsimilError`` naming the missing input)."""
        checkpoint = self.checkpoint_edit.text().strip()
        if not checkpoint:
            raise ConfigError("choose a checkpoint (*.safetensors) first")
        layer = self.slide_layer()
        if layer is None:
            raise ConfigError("open a slide first (File > Open, or File > Open Sample > wsimil demo slide)")
        meta = layer.metadata[META_KEY]
        store = self.store_edit.text().strip() or None
        weights = self.weights_edit.text().strip() or None
        return InferenceRequest(
            checkpoint=checkpoint,
            slide_path=meta["slide_path"],
            device=self.device_combo.currentText(),
            store=store,
            slide_mpp=meta.get("mpp"),
            encoder_weights=weights,
            region=self.region_picker.region(),
        )

    def run(self) -> Any:
        """Start inference in a worker thread; returns the worker (None when the inputs are incomplete)."""
        if self.worker is not None:
            return self.worker
        try:
            request = self.request()
        except WsimilError as exc:
            self._show_error(str(exc))
            return None
        self.result = None
        self.error = None
        try:
            summary = checkpoint_summary(request.checkpoint) or {}
        except WsimilError as exc:
            self._show_error(str(exc))
            return None
        preload(summary.get("encoder"))
        region = self.region_picker.region_layer()
        region_name = region.name if region is not None else None
        self.map_layers = run_layer_set(self._map_sets, self.viewer, request, summary.get("checkpoint_id"), region_name)
        self.map_picker.set_layer_set(self.map_layers)
        self.status.setText("starting...")
        self.probs_label.setText("")
        self.decisions = {}
        self.threshold_warning.setVisible(False)
        self.legend_label.setText("")
        self.progress.setRange(0, 0)  # busy until the number of patches is known
        self.run_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.export_button.setEnabled(False)
        worker = dock_worker(run_inference, request, on_error=self._on_error)  # errors: once, in the dock
        worker.yielded.connect(self._on_update)
        worker.returned.connect(self._on_result)
        self.activity = activity_progress(0, f"wsimil: {Path(request.slide_path).name}", self.cancel)
        worker.finished.connect(self._on_finished)
        self.worker = worker
        worker.start()
        return worker

    def cancel(self) -> None:
        """Stop the running worker at its next progress step (layers shown so far stay)."""
        if self.worker is not None:
            self.worker.quit()
            self.status.setText("cancelling...")

    def _on_update(self, update: InferenceUpdate) -> None:
        # Labels first, layers and napari's progress last: those may process pending events, so the next update
        # and the result can run inside this call; nothing shown by them may be overwritten afterwards.
        if self.result is not None:  # an update delivered after the run's result: already superseded
            return
        self.status.setText(update.message)
        if update.probs:
            self.probs_label.setText(probs_html(update.probs, partial=not update.final))
        if update.total:
            self.progress.setRange(0, update.total)
            self.progress.setValue(update.done)
        if update.maps and update.geometry is not None and update.coords is not None and self.map_layers:
            specs = {"specs": update.specs} if update.specs else {}  # the models' MapSpecs, when they declare them
            self.map_layers.update(update.maps, update.geometry, update.coords, **specs)
            self.map_picker.refresh()
            self._show_legend()
        if update.total and self.activity is not None:
            if self.activity.total != update.total:
                self.activity.total = update.total
            self.activity.update(update.done - self.activity.n)

    def _on_result(self, result: InferenceResult) -> None:
        self.result = result
        self._show_prediction()
        notes = "; ".join(result.messages)
        where = "cached features" if result.from_cache else "features extracted"
        self.status.setText(f"{result.slide_id}: {len(result.coords)} patches ({where}). {notes}".strip())
        self.export_button.setEnabled(True)

    def _show_prediction(self, *_: Any) -> None:
        """Show the last result's probabilities, the class each task predicts and the rule that gave it."""
        if self.result is None:
            return
        classes, surv = split_survival(self.result.probs, self.result.meta)
        self.decisions = decide(classes, self.result.meta, use_half=self.half_check.isChecked())
        text = probs_html(classes, self.decisions) if classes else ""
        self.probs_label.setText(text + (survival_html(surv, self.result.meta) if surv else ""))
        warning = warnings_html(self.decisions)
        self.threshold_warning.setText(warning)
        self.threshold_warning.setVisible(bool(warning))

    def shown_prediction(self) -> dict[str, str]:
        """``{task: class name}`` as shown in bold (after the "use 0.5" choice)."""
        return {task: d.predicted for task, d in self.decisions.items()}

    def _on_error(self, exc: BaseException) -> None:
        text = str(exc) if isinstance(exc, WsimilError) else f"{type(exc).__name__}: {exc}"
        self._show_error(text)

    def _show_error(self, text: str) -> None:
        """One concise message, cause first (the full text is the status line's tooltip)."""
        self.error = concise_error(text)
        self.status.setText(error_html(self.error))
        self.status.setToolTip(str(text))

    def _on_finished(self) -> None:
        self.worker = None
        if self.activity is not None:
            self.activity.close()
            self.activity = None
        self.run_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        if self.result is None and self.error is None:
            self.status.setText("cancelled")
        self.progress.setRange(0, max(1, self.progress.maximum()))

    def _show_legend(self) -> None:
        parts = []
        for name, layer in (self.map_layers.layers if self.map_layers else {}).items():
            legend = layer.metadata.get(META_KEY, {}).get("legend")
            if legend:
                parts.append(f"<i>{html.escape(name)}</i><br>{legend_text(legend, legend_colors(layer, legend))}")
        self.legend_label.setText("<br>".join(parts) or "(scalar maps: see each layer's colormap)")

    # --- export -------------------------------------------------------------------------------------------
    def export_geojson(self, path: str | Path) -> Path:
        """Write the last result's maps as QuPath GeoJSON (level-0 px squares with measurements)."""
        if self.result is None:
            raise DataError("run inference first: there are no maps to export")
        shown = {**self.result.prediction, **self.shown_prediction()}  # what the dock shows, "use 0.5" included
        return export_geojson_file(dataclasses.replace(self.result, prediction=shown), path)

    def _export_clicked(self) -> None:
        if self.result is None:
            return
        default = str(Path(self.result.slide_path).with_suffix(".geojson"))
        path, _ = QFileDialog.getSaveFileName(self, "Export GeoJSON", default, "GeoJSON (*.geojson *.json)")
        if path:
            try:
                out = self.export_geojson(path)
            except (WsimilError, OSError) as exc:
                self._show_error(str(exc))
                return
            self.status.setText(f"wrote {out}")


__all__ = ["InferenceWidget", "probs_html"]  # probs_html lives in _decision (re-exported for old importers)
