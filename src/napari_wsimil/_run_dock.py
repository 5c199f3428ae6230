"""Qt plumbing shared by the dock widgets that run a ``wsimil`` command in a child process.

``TrainingWidget`` (``wsimil train``) and ``ExtendWidget`` (``wsimil mecds extend``) both own a ``ProcessRunner``,
a poll timer, a progress bar, a rich-text status label, a log box and a "Load into inference widget" button.
``RunnerDockMixin`` holds what they do alike: draining the child's output into the log and the rows its tail
thread read from the run's metrics file (all file and pipe reading happens in the runner's threads; the GUI
timer only drains queues), stopping it (SIGINT, then SIGTERM and SIGKILL on timers), showing errors, handing a
checkpoint to the Inference widget and stopping the child when the widget closes. ``path_row`` (a line edit
with a browse button) and ``error_html`` also serve the Inference and store docks; ``read_csv_header`` /
``target_columns`` (labels CSVs) and ``find_inference_widget`` serve both run docks.
"""

from __future__ import annotations

import csv
import html
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (
    QDoubleSpinBox,
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QWidget,
)

from wsimil_core.api import ConfigError, DataError, WsimilError

#: label-CSV columns that are never targets.
NON_TARGET_COLUMNS = ("slide_id", "patient_id", "split", "case_id")
DEVICE_CHOICES = ("auto", "cpu", "cuda")
#: milliseconds between two polls of a child's output and metrics queues.
POLL_MS = 200


def read_csv_header(path: str | os.PathLike) -> list[str]:
    """Column names of a CSV file (its first line). ``DataError`` naming the file when missing or empty."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: labels CSV not found")
    try:
        with p.open(newline="", encoding="utf-8-sig") as fh:
            header = next(csv.reader(fh), None)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{p}: cannot read the CSV header ({exc})") from None
    if not header:
        raise DataError(f"{p}: the CSV is empty (expected a header with slide_id and target columns)")
    return [h.strip() for h in header]


def target_columns(header: list[str]) -> list[str]:
    """Columns of a labels CSV that can be targets (all but slide_id, patient_id, split)."""
    return [c for c in header if c and c not in NON_TARGET_COLUMNS]


def find_inference_widget(viewer: Any) -> Any:
    """The viewer's Inference dock widget (opened when it is not yet): ``(dock, InferenceWidget)[1]``."""
    window = getattr(viewer, "window", None)
    if window is None or not hasattr(window, "add_plugin_dock_widget"):
        raise ConfigError("no napari window to open the Inference widget in; pass an inference widget instead")
    _, widget = window.add_plugin_dock_widget("napari-wsimil", "Inference")
    return widget


def path_row(edit: QLineEdit, on_click: Callable[[], None], button_text: str = "...") -> QWidget:
    """``edit`` stretched, followed by a button calling ``on_click`` (a file/folder browser)."""
    row = QWidget()
    lay = QHBoxLayout(row)
    lay.setContentsMargins(0, 0, 0, 0)
    lay.addWidget(edit, 1)
    btn = QPushButton(button_text)
    btn.clicked.connect(on_click)
    lay.addWidget(btn)
    return row


def learning_rate_spin(value: float) -> QDoubleSpinBox:
    """A learning-rate spin box: 6 decimals, range [1e-6, 10], step 1e-4, set to ``value``."""
    spin = QDoubleSpinBox()
    spin.setDecimals(6)
    spin.setRange(1e-6, 10.0)
    spin.setSingleStep(1e-4)
    spin.setValue(value)
    return spin


def progress_and_status() -> tuple[QProgressBar, QLabel]:
    """An empty progress bar (range 0..1) and a word-wrapped rich-text status label."""
    progress = QProgressBar()
    progress.setRange(0, 1)
    progress.setValue(0)
    status = QLabel("")
    status.setWordWrap(True)
    status.setTextFormat(Qt.TextFormat.RichText)
    return progress, status


def error_html(text: str) -> str:
    """``text`` escaped and shown in red (for a rich-text label)."""
    return f"<span style='color:#e04040'>{html.escape(text)}</span>"


class RunnerDockMixin:
    """Child-process plumbing of a dock widget; put it before ``QWidget`` in the bases.

    The widget provides: ``runner`` (``ProcessRunner | None``), ``timer`` (a QTimer calling ``_tick``),
    ``state``, ``error``, ``status`` (QLabel), ``log`` (QPlainTextEdit), ``stop_button``, ``viewer``,
    ``inference_widget``, ``set_labels(path)``, ``load_into_inference()`` and ``_finished()`` (called once the
    child has exited and its output is read). It may override ``_on_metrics(reset, rows)`` (new rows of the run's
    metrics file; see ``ProcessRunner.poll_metrics``).
    """

    @property
    def running(self) -> bool:
        return self.runner is not None and self.runner.running

    def _stop_runner(self, message: str, terminate_after_ms: int, kill_after_ms: int) -> None:
        """Send SIGINT to a running child; SIGTERM after ``terminate_after_ms``, SIGKILL after ``kill_after_ms``."""
        if not self.running or self.runner is None:
            return
        self.runner.interrupt()
        self.state = "stopping"
        self.stop_button.setEnabled(False)
        self.status.setText(message)
        runner = self.runner
        QTimer.singleShot(terminate_after_ms, lambda: runner.terminate() if runner.returncode is None else None)
        QTimer.singleShot(kill_after_ms, lambda: runner.kill() if runner.returncode is None else None)

    def _tick(self) -> None:
        runner = self.runner
        if runner is None:
            self.timer.stop()
            return
        lines = runner.poll()
        if lines:
            self.log.appendPlainText("\n".join(lines))
        reset, rows = runner.poll_metrics()
        if reset or rows:
            self._on_metrics(reset, rows)
        if not runner.running:
            self.timer.stop()
            self._finished()

    def _on_metrics(self, reset: bool, rows: list[dict[str, Any]]) -> None:
        """Hook: new rows of the run's metrics file (``reset``: the rows shown before are void)."""

    def _browse_labels(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Labels CSV", "", "CSV (*.csv *.tsv);;All files (*)")
        if path:
            try:
                self.set_labels(path)
            except WsimilError as exc:
                self._show_error(str(exc))

    def _load_clicked(self) -> None:
        try:
            self.load_into_inference()
        except WsimilError as exc:
            self._show_error(str(exc))

    def _show_error(self, text: str) -> None:
        self.error = text
        self.status.setText(error_html(text))

    def shutdown(self, grace: float = 10.0) -> None:
        """Stop a running child (SIGINT, then SIGTERM/SIGKILL) and wait for it: call before discarding."""
        self.timer.stop()
        if self.runner is not None and self.runner.returncode is None:
            self.runner.stop(grace=grace)

    def closeEvent(self, event: Any) -> None:  # noqa: N802 (Qt name)
        self.shutdown()
        super().closeEvent(event)


__all__ = [
    "RunnerDockMixin",
    "path_row",
    "learning_rate_spin",
    "progress_and_status",
    "error_html",
    "read_csv_header",
    "target_columns",
    "find_inference_widget",
    "NON_TARGET_COLUMNS",
    "DEVICE_CHOICES",
    "POLL_MS",
]
