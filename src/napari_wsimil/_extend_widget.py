"""Extend-task dock widget: add a task to a trained MECDS checkpoint with ``wsimil mecds extend`` in a child process.

The inputs (checkpoint, new task, labels, store, options) are :class:`~napari_wsimil._extend_form.ExtendFormMixin`.
"Extend" runs::

    python -m wsimil_core mecds extend CKPT --labels CSV --target COL --name NAME --epochs E --lr LR --seed S \\
        --balanced|--no-balanced --isolated|--shared-stream --device D --output OUT --json OUT.extend.json \\
        --run-dir OUT_run [--store STORE]

through ``ProcessRunner``; the progress bar and the status follow the extension run's ``OUT_run/metrics.jsonl``
(one row per epoch; the console is only shown in the log). "Stop" sends SIGINT, nothing is written then. When it
finishes the JSON report (format of ``methods/mecds/cli.py``: ``task``, ``eval_split``, ``before`` / ``after``
``{old task: metrics}``, ``new_task`` metrics, ``frozen_identical``, ``skipped_tasks``, ``history``) fills a
table of the old tasks' metrics before / after and the new task's metrics; "Load into inference widget" hands
the extended checkpoint over.
"""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Any

from qtpy.QtCore import Qt, QTimer, Signal
from qtpy.QtWidgets import (
    QAbstractItemView,
    QHBoxLayout,
    QLabel,
    QPlainTextEdit,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QWidget,
)

from napari_wsimil._extend_form import ExtendFormMixin
from napari_wsimil._extend_report import (
    AUC_NA,
    METRIC_LABELS,
    TABLE_COLUMNS,
    cell_text,
    load_report,
    one_class,
    report_path_for,
    report_rows,
    run_dir_for,
    split_warning,
)
from napari_wsimil._metrics_plot import epoch_summary
from napari_wsimil._metrics_tail import METRICS_FILE
from napari_wsimil._process_runner import ProcessRunner, wsimil_command
from napari_wsimil._run_dock import (
    POLL_MS,
    RunnerDockMixin,
    find_inference_widget,
    progress_and_status,
    scroll_layout,
)
from wsimil_core.api import CheckpointError, WsimilError


class ExtendWidget(ExtendFormMixin, RunnerDockMixin, QWidget):
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
        self.report: dict[str, Any] | None = None
        self.output: Path | None = None
        self.error: str | None = None
        self.state = "idle"
        form = self._init_form()

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
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.stop_button)
        layout = scroll_layout(self)
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

    # --- running ------------------------------------------------------------------------------------------
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
        self._start_activity("wsimil extend")  # napari's activity dock
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
            single = one_class(report, task)
            b_text, a_text = cell_text(metric, before, single), cell_text(metric, after, single)
            change = None if before is None or after is None or AUC_NA in (b_text, a_text) else after - before
            cells = (
                task,
                METRIC_LABELS.get(metric, metric),
                b_text,
                a_text,
                "—" if change is None else f"{change:+.4f}",
            )
            for c, text in enumerate(cells):
                item = QTableWidgetItem(text)
                if c >= 2:
                    item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
                self.table.setItem(r, c, item)
        self.table.resizeColumnsToContents()  # the last column stretches to the dock's width
        parts = [f"metrics on the {report.get('eval_split', '?')} split"]
        warning = split_warning(report)
        if warning:
            parts.insert(0, f"⚠ {warning}")
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
