"""Extend-task dock widget: add a task to a trained MECDS checkpoint with ``wsimil mecds extend`` in a child process.

Load a ``mecds`` checkpoint (its tasks and classes are shown), name the new task, pick the labels CSV and the
column holding its labels, the store (default: the one the checkpoint was trained on) and the device; the
extension's options (epochs, learning rate, seed, balanced sampling, isolated experts) are a magicgui form built
from ``ExtendOptions``, the pydantic schema of the ``wsimil mecds extend`` options. "Extend" runs::

    python -m wsimil_core extend CKPT --labels CSV --target COL --name NAME --store STORE --device D \\
        --epochs E --lr LR --seed S --balanced|--no-balanced --isolated|--shared-stream \\
        --output OUT --json OUT.extend.json

through ``ProcessRunner``. ``wsimil mecds extend`` writes no metrics file, so the progress bar follows its
``extend: epoch k/N`` lines (the console is otherwise only shown in the log); "Stop" sends SIGINT, nothing is
written then. When it finishes the JSON report (format of ``cli/mecds.py``: ``task``, ``eval_split``,
``before`` / ``after`` ``{old task: metrics}``, ``new_task`` metrics, ``frozen_identical``, ``skipped_tasks``,
``history``) fills a table of the old tasks' metrics before / after and the new task's metrics;
"Load into inference widget" hands the extended checkpoint over.
"""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Any

from qtpy.QtCore import Qt, QTimer, Signal
from qtpy.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from napari_wsimil._extend_report import (
    METRIC_LABELS,
    TABLE_COLUMNS,
    ExtendOptions,
    default_output,
    fmt_metric,
    load_report,
    report_path_for,
    report_rows,
    run_dir_for,
)
from napari_wsimil._metrics_plot import epoch_summary
from napari_wsimil._options_form import OptionsForm
from napari_wsimil._run_dock import (
    DEVICE_CHOICES,
    POLL_MS,
    RunnerDockMixin,
    error_html,
    find_inference_widget,
    path_row,
    progress_and_status,
    read_csv_header,
    target_columns,
)
from napari_wsimil._subprocess import METRICS_FILE, ProcessRunner, wsimil_command
from wsimil_core.api import (
    CheckpointError,
    CheckpointMeta,
    ConfigError,
    WsimilError,
    read_checkpoint_meta,
)

# --- the widget -------------------------------------------------------------------------------------------------


class ExtendWidget(RunnerDockMixin, QWidget):
    """Add a task to a MECDS checkpoint in a child process; old tasks' metrics before/after in a table.

    Public API (tests and scripts):
        ``load_checkpoint(path) -> meta summary``, ``set_labels(path) -> columns``, ``command() -> argv``,
        ``run() -> ProcessRunner | None``, ``stop()``, ``show_report(report | path)``,
        ``load_into_inference(widget=None)``.
        State: ``state`` ("idle", "running", "stopping", "finished", "stopped", "failed"), ``runner``,
        ``report`` (the last report dict), ``output`` (the extended checkpoint), ``error``.
        Signal ``run_finished(str)`` carries the final state.
    """

    run_finished = Signal(str)

    def __init__(self, napari_viewer: Any = None, inference_widget: Any = None):
        super().__init__()
        self.viewer = napari_viewer
        self.inference_widget = inference_widget
        self.runner: ProcessRunner | None = None
        self.meta: CheckpointMeta | None = None
        self.report: dict[str, Any] | None = None
        self.output: Path | None = None
        self.error: str | None = None
        self.state = "idle"
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
        self.options_error = QLabel("")
        self.options_error.setWordWrap(True)
        self.options_error.setTextFormat(Qt.TextFormat.RichText)
        self.device_combo = QComboBox()
        self.device_combo.addItems(list(DEVICE_CHOICES))
        self.output_edit = QLineEdit()
        self.output_edit.textEdited.connect(self._output_edited)
        self.run_button = QPushButton("Extend")
        self.run_button.clicked.connect(self.run)
        self.stop_button = QPushButton("Stop")
        self.stop_button.setEnabled(False)
        self.stop_button.clicked.connect(self.stop)
        self.progress, self.status = progress_and_status()
        self.log = QPlainTextEdit()
        self.log.setReadOnly(True)
        self.log.setMaximumBlockCount(2000)
        self.log.setMaximumHeight(120)
        self.table = QTableWidget(0, len(TABLE_COLUMNS))
        self.table.setHorizontalHeaderLabels(list(TABLE_COLUMNS))
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.verticalHeader().setVisible(False)
        self.table.setMinimumHeight(220)
        self.table.horizontalHeader().setStretchLastSection(True)
        self.summary_label = QLabel("")
        self.summary_label.setWordWrap(True)
        self.load_button = QPushButton("Load into inference widget")
        self.load_button.setEnabled(False)
        self.load_button.clicked.connect(self._load_clicked)

        form = QFormLayout()
        form.addRow("Checkpoint", path_row(self.checkpoint_edit, self._browse_checkpoint))
        form.addRow("", self.checkpoint_info)
        form.addRow("New task", self.name_edit)
        form.addRow("Labels CSV", path_row(self.labels_edit, self._browse_labels))
        form.addRow("Label column", self.column_combo)
        form.addRow("Store", path_row(self.store_edit, self._browse_store))
        form.addRow("Device", self.device_combo)
        form.addRow("Output", path_row(self.output_edit, self._browse_output))
        form.addRow(self.options_form.native)
        form.addRow(self.options_error)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.stop_button)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        layout.addWidget(self.log)
        layout.addWidget(QLabel("<b>Metrics before / after</b>"))
        layout.addWidget(self.table, 1)
        layout.addWidget(self.summary_label)
        layout.addWidget(self.load_button)

        self.timer = QTimer(self)
        self.timer.setInterval(POLL_MS)
        self.timer.timeout.connect(self._tick)
        self._check_options()

    # --- inputs -------------------------------------------------------------------------------------------
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
            self.options()
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

    def _browse_checkpoint(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "MECDS checkpoint", "", "Checkpoints (*.safetensors)")
        if path:
            try:
                self.load_checkpoint(path)
            except WsimilError:
                pass

    def _browse_store(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Feature store")
        if path:
            self.store_edit.setText(path)

    def _browse_output(self) -> None:
        path, _ = QFileDialog.getSaveFileName(
            self, "Extended checkpoint", self.output_edit.text(), "Checkpoints (*.safetensors)"
        )
        if path:
            self._output_auto = False
            self.output_edit.setText(path)

    # --- running ------------------------------------------------------------------------------------------
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

    def run(self) -> ProcessRunner | None:
        """Start ``wsimil mecds extend`` in a child process (None when the form is incomplete)."""
        if self.running:
            return self.runner
        try:
            args = self.command()
        except WsimilError as exc:
            self._show_error(str(exc))
            return None
        self.output = Path(args[args.index("--output") + 1])
        report_path = report_path_for(self.output)
        report_path.unlink(missing_ok=True)  # a stale report must not pass for this run's
        self.error = None
        self.report = None
        self.table.setRowCount(0)
        self.summary_label.setText("")
        self.log.clear()
        self.log.appendPlainText("$ wsimil " + " ".join(args))
        metrics = run_dir_for(self.output) / METRICS_FILE
        self.runner = ProcessRunner(
            wsimil_command(*args), cwd=self.output.parent, metrics=metrics, skip_existing_metrics=True
        ).start()
        self.state = "running"
        self.progress.setRange(0, self.options().epochs)
        self.progress.setValue(0)
        self.status.setText(html.escape(f"extending with task {self.task_name()!r} (pid {self.runner.pid})"))
        self.run_button.setEnabled(False)
        self.stop_button.setEnabled(True)
        self.load_button.setEnabled(False)
        self.timer.start()
        return self.runner

    def stop(self) -> None:
        """Cancel (SIGINT); the extension writes nothing until it has finished."""
        self._stop_runner("stopping...", 10_000, 15_000)

    def _on_metrics(self, reset: bool, rows: list[dict[str, Any]]) -> None:
        """Progress and status from the extension run's metrics.jsonl (one row per epoch of its extend phase)."""
        assert self.runner is not None
        history = list(self.runner.metrics)
        self.progress.setValue(min(len(history), self.progress.maximum()))
        if history and self.state == "running":
            self.status.setText(html.escape(epoch_summary(history[-1], "auc")))

    def _finished(self) -> None:
        runner = self.runner
        assert runner is not None
        rc = runner.returncode
        report_path = report_path_for(self.output) if self.output else None
        if rc == 0 and report_path is not None and report_path.is_file():
            try:
                self.show_report(report_path)
                self.state = "finished"
                self.status.setText(html.escape(f"wrote {self.output}"))
                self.progress.setValue(self.progress.maximum())
            except WsimilError as exc:
                self.state = "failed"
                self._show_error(str(exc))
        elif runner.interrupted:
            self.state = "stopped"
            self.status.setText("stopped: nothing was written")
        else:
            self.state = "failed"
            line = runner.error_line() if rc != 0 else f"{report_path}: the report was not written"
            self._show_error(f"extension failed (exit {rc}): {line}")
            self.error = line
        self.run_button.setEnabled(True)
        self.stop_button.setEnabled(False)
        self.load_button.setEnabled(self.state == "finished" and self.output is not None and self.output.is_file())
        self.run_finished.emit(self.state)

    # --- report -------------------------------------------------------------------------------------------
    def show_report(self, report: dict[str, Any] | str | os.PathLike) -> list[tuple]:
        """Fill the table from a report (dict or JSON path). Returns the rows shown."""
        if not isinstance(report, dict):
            report = load_report(report)
        self.report = report
        rows = report_rows(report)
        self.table.setRowCount(len(rows))
        for r, (task, metric, before, after) in enumerate(rows):
            change = None if before is None or after is None else after - before
            cells = (
                task,
                METRIC_LABELS.get(metric, metric),
                fmt_metric(before),
                fmt_metric(after),
                "—" if change is None else f"{change:+.4f}",
            )
            for c, text in enumerate(cells):
                item = QTableWidgetItem(text)
                if c >= 2:
                    item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
                self.table.setItem(r, c, item)
        self.table.resizeColumnsToContents()  # the last column stretches to the dock's width
        parts = [f"metrics on the {report.get('eval_split', '?')} split"]
        if "frozen_identical" in report:
            parts.append(f"old parameters bit-identical: {report['frozen_identical']}")
        if report.get("skipped_tasks"):
            parts.append(f"not evaluated (no column): {', '.join(report['skipped_tasks'])}")
        if report.get("checkpoint"):
            parts.append(f"checkpoint {report['checkpoint']}")
            if self.output is None:
                self.output = Path(report["checkpoint"])
        self.summary_label.setText("; ".join(parts))
        return rows

    def load_into_inference(self, widget: Any = None) -> Any:
        """Load the extended checkpoint into the Inference widget (opened in the viewer when not given)."""
        if self.output is None or not self.output.is_file():
            raise CheckpointError(f"{self.output or 'the extended checkpoint'}: not written yet; run the extension")
        widget = widget or self.inference_widget or find_inference_widget(self.viewer)
        widget.load_checkpoint(self.output)
        self.inference_widget = widget
        return widget


__all__ = ["ExtendWidget"]
