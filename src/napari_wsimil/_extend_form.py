"""The extend dock's inputs (Qt): what ``wsimil mecds extend`` will run, as a mixin of ``ExtendWidget``.

Load a ``mecds`` checkpoint (its tasks and classes are shown), name the new task, pick the labels CSV and the
column holding its labels, the store (default: the one the checkpoint was trained on) and the device; the
extension's options (epochs, learning rate, seed, balanced sampling, isolated experts) are a magicgui form built
from ``ExtendOptions``, the pydantic schema of the ``wsimil mecds extend`` options; unticking ``isolated`` selects
the paper's shared-stream extension, and the "Mode" line says which mode the form describes. ``command()`` gives the CLI
arguments the form describes.
"""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Any

from qtpy.QtCore import Qt
from qtpy.QtWidgets import QComboBox, QFormLayout, QLabel, QLineEdit

from napari_wsimil._extend_report import ExtendOptions, default_output, report_path_for, run_dir_for
from napari_wsimil._options_form import OptionsForm
from napari_wsimil._run_dock import DEVICE_CHOICES, browse_row, error_html, read_csv_header, target_columns
from wsimil_core.api import CheckpointError, CheckpointMeta, ConfigError, WsimilError, read_checkpoint_meta

MODE_TEXT = {
    True: "isolated: the new experts refine only the new task's token; old tasks' predictions stay bit-identical",
    False: "shared stream (the paper's Sec. 3.4): the new experts' patch updates join the shared patch stream, as "
    "DFR does for the original tasks; old tasks' predictions may move (their parameters stay frozen)",
}


class ExtendFormMixin:
    """The inputs of the extend dock; put it first in the widget's bases.

    ``_init_form()`` creates the inputs (``checkpoint_edit`` + ``checkpoint_info``, ``name_edit``,
    ``labels_edit``, ``column_combo``, ``store_edit``, ``device_combo``, ``output_edit``, ``options_form`` and its
    ``options_error`` label) and returns their form layout; ``meta`` is the loaded checkpoint's header. The widget
    provides ``_show_error(text)`` and calls ``_check_options()`` once everything is laid out.
    """

    def _init_form(self) -> QFormLayout:
        self.meta: CheckpointMeta | None = None
        self._output_auto = True
        self._loaded_path = ""

        self.checkpoint_edit = QLineEdit()
        self.checkpoint_edit.setPlaceholderText("trained mecds checkpoint (*.safetensors)")
        self.checkpoint_edit.editingFinished.connect(self._checkpoint_edited)
        self.checkpoint_info = QLabel("no checkpoint")
        self.checkpoint_info.setWordWrap(True)
        self.checkpoint_info.setTextFormat(Qt.TextFormat.RichText)
        self.name_edit = QLineEdit()
        self.name_edit.setPlaceholderText("new task name (default: the column name)")
        self.name_edit.textChanged.connect(self._update_default_output)
        self.labels_edit = QLineEdit()
        self.labels_edit.setPlaceholderText("labels CSV with slide_id and the new task's column")
        self.labels_edit.editingFinished.connect(self._labels_edited)
        self.column_combo = QComboBox()
        self.column_combo.currentTextChanged.connect(self._update_default_output)
        self.store_edit = QLineEdit()
        self.store_edit.setPlaceholderText("feature store (default: the checkpoint's training store)")
        self.options_form = OptionsForm(ExtendOptions, "extension")
        self.options_form.on_change(self._check_options)
        self.mode_label = QLabel("")  # which extension mode the "isolated" option selects, in words
        self.mode_label.setWordWrap(True)
        self.options_error = QLabel("")
        self.options_error.setWordWrap(True)
        self.options_error.setTextFormat(Qt.TextFormat.RichText)
        self.device_combo = QComboBox()
        self.device_combo.addItems(list(DEVICE_CHOICES))
        self.output_edit = QLineEdit()
        self.output_edit.textEdited.connect(self._output_edited)

        form = QFormLayout()
        form.addRow(
            "Checkpoint",
            browse_row(
                self.checkpoint_edit,
                "MECDS checkpoint",
                file_filter="Checkpoints (*.safetensors)",
                on_chosen=self.load_checkpoint,
            ),
        )
        form.addRow("", self.checkpoint_info)
        form.addRow("New task", self.name_edit)
        form.addRow("Labels CSV", self.labels_row())
        form.addRow("Label column", self.column_combo)
        form.addRow("Store", browse_row(self.store_edit, "Feature store", mode="dir"))
        form.addRow("Device", self.device_combo)
        form.addRow(
            "Output",
            browse_row(
                self.output_edit,
                "Extended checkpoint",
                mode="save",
                file_filter="Checkpoints (*.safetensors)",
                on_chosen=self._output_chosen,
            ),
        )
        form.addRow(self.options_form.native)
        form.addRow("Mode", self.mode_label)
        form.addRow(self.options_error)
        return form

    def load_checkpoint(self, path: str | os.PathLike) -> dict[str, Any]:
        """Read a checkpoint's header and show its tasks; ``CheckpointError`` unless it is a ``mecds`` model.

        Fills the store and labels CSV from its training config when those fields are empty. Returns
        ``{"method", "model_name", "tasks": {task: [classes]}, "store", "labels"}``.
        """
        self.checkpoint_edit.setText(str(path))
        self.meta = None
        try:
            meta = read_checkpoint_meta(path)
            if meta.model_name != "mecds":
                raise CheckpointError(
                    f"{path}: task extension needs a 'mecds' checkpoint, this one holds a {meta.model_name!r} model"
                )
        except WsimilError as exc:
            self.checkpoint_info.setText(error_html(str(exc)))
            raise
        tasks = {t: meta.class_names(t) for t in meta.task_names}
        data = (meta.train_config or {}).get("data") or {}
        self.meta = meta
        self._loaded_path = str(path)
        rows = "".join(
            f"<li>{html.escape(t)}: {html.escape(', '.join(map(str, c)) or '?')}</li>" for t, c in tasks.items()
        )
        self.checkpoint_info.setText(f"{html.escape(meta.method)} ({len(tasks)} tasks)<ul>{rows}</ul>")
        if not self.store_edit.text().strip() and data.get("store"):
            self.store_edit.setText(str(data["store"]))
        if not self.labels_edit.text().strip() and data.get("labels") and Path(str(data["labels"])).is_file():
            try:
                self.set_labels(data["labels"])
            except WsimilError:
                pass
        else:
            self._select_default_column()
        self._update_default_output()
        return {
            "method": meta.method,
            "model_name": meta.model_name,
            "tasks": tasks,
            "store": data.get("store"),
            "labels": data.get("labels"),
        }

    def tasks(self) -> list[str]:
        """The loaded checkpoint's task names (empty before one is loaded)."""
        if self.meta is None:
            return []
        return self.meta.task_names

    def set_labels(self, path: str | os.PathLike) -> list[str]:
        """Set the labels CSV and list its columns (a new column, not an existing task, is preselected)."""
        self.labels_edit.setText(str(path))
        columns = target_columns(read_csv_header(path))
        self.column_combo.blockSignals(True)
        self.column_combo.clear()
        self.column_combo.addItems(columns)
        self.column_combo.blockSignals(False)
        self._select_default_column()
        self._update_default_output()
        return columns

    def options(self) -> ExtendOptions:
        """The extension options the form shows, validated by ``ExtendOptions`` (``ConfigError`` naming one)."""
        return ExtendOptions.model_validate(self.options_form.validated())

    def _check_options(self) -> None:
        try:
            options = self.options()
            self.mode_label.setText(MODE_TEXT[options.isolated])
        except WsimilError as exc:
            self.options_error.setText(error_html(str(exc)))
            self.options_error.setVisible(True)
            return
        self.options_error.setText("")
        self.options_error.setVisible(False)

    def _select_default_column(self) -> None:
        old = set(self.tasks())
        for i in range(self.column_combo.count()):
            if self.column_combo.itemText(i) not in old:
                self.column_combo.setCurrentIndex(i)
                return

    def task_name(self) -> str:
        return self.name_edit.text().strip() or self.column_combo.currentText()

    def _update_default_output(self, *_: Any) -> None:
        ckpt = self.checkpoint_edit.text().strip()
        if self._output_auto and ckpt and self.task_name():
            self.output_edit.setText(str(default_output(ckpt, self.task_name())))

    def _output_edited(self, text: str) -> None:
        self._output_auto = not text.strip()

    def _checkpoint_edited(self) -> None:
        text = self.checkpoint_edit.text().strip()
        if text and (self.meta is None or text != self._loaded_path):
            try:
                self.load_checkpoint(text)
            except WsimilError:
                pass

    def _labels_edited(self) -> None:
        text = self.labels_edit.text().strip()
        if text:
            try:
                self.set_labels(text)
            except WsimilError as exc:
                self._show_error(str(exc))

    def _output_chosen(self, path: str) -> None:
        self._output_auto = False
        self.output_edit.setText(path)

    def command(self) -> list[str]:
        """The ``wsimil mecds extend`` arguments the form describes (``WsimilError`` naming the missing input)."""
        ckpt = self.checkpoint_edit.text().strip()
        if not ckpt:
            raise ConfigError("choose a mecds checkpoint first")
        if self.meta is None or ckpt != self._loaded_path:
            self.load_checkpoint(ckpt)
        labels = self.labels_edit.text().strip()
        if not labels:
            raise ConfigError("choose the labels CSV holding the new task's column")
        column = self.column_combo.currentText()
        if not column:
            raise ConfigError(f"{labels}: choose the column holding the new task's labels")
        name = self.task_name()
        if name in self.tasks():
            raise ConfigError(f"{ckpt}: the model already has a task {name!r}; choose another name")
        output = Path(self.output_edit.text().strip() or default_output(ckpt, name))
        args = [
            "mecds",
            "extend",
            ckpt,
            "--labels",
            labels,
            "--target",
            column,
            "--name",
            name,
            *self.options().cli_args(),
            "--device",
            self.device_combo.currentText(),
            "--output",
            str(output),
            "--json",
            str(report_path_for(output)),
            "--run-dir",
            str(run_dir_for(output)),
        ]
        store = self.store_edit.text().strip()
        if store:
            args += ["--store", store]
        return args


__all__ = ["ExtendFormMixin"]
