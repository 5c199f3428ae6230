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
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qtpy.QtCore import QSize, Qt, QTimer
from qtpy.QtWidgets import (
    QDoubleSpinBox,
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QVBoxLayout,
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


def browse_row(
    edit: QLineEdit,
    title: str,
    *,
    mode: str = "open",
    file_filter: str = "All files (*)",
    on_chosen: Callable[[str], Any] | None = None,
    on_error: Callable[[str], None] | None = None,
) -> QWidget:
    """:func:`path_row` whose button opens a file dialog titled ``title``: ``mode`` ``"open"`` (an existing file
    matching ``file_filter``), ``"save"`` (a file to write, starting at the edit's text) or ``"dir"`` (a folder).
    The chosen path goes to ``on_chosen`` (default: into ``edit``); a ``WsimilError`` it raises goes to
    ``on_error`` (default: dropped, for callbacks that show their own errors)."""

    def browse() -> None:
        if mode == "dir":
            path = QFileDialog.getExistingDirectory(edit, title)
        elif mode == "save":
            path, _ = QFileDialog.getSaveFileName(edit, title, edit.text(), file_filter)
        else:
            path, _ = QFileDialog.getOpenFileName(edit, title, "", file_filter)
        if not path:
            return
        try:
            (on_chosen or edit.setText)(path)
        except WsimilError as exc:
            if on_error is not None:
                on_error(str(exc))

    return path_row(edit, browse)


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


#: widest a dock asks to be (px): wider content scrolls sideways instead of widening the window
MAX_DOCK_MIN_WIDTH = 420


class _DockScrollArea(QScrollArea):
    """A scroll area that asks for its content's width (up to ``MAX_DOCK_MIN_WIDTH``) but hardly any height."""

    def minimumSizeHint(self) -> QSize:  # noqa: N802 (Qt name)
        hint = super().minimumSizeHint()
        inner = self.widget()
        if inner is not None:
            width = inner.minimumSizeHint().width() + self.verticalScrollBar().sizeHint().width()
            hint.setWidth(min(max(hint.width(), width), MAX_DOCK_MIN_WIDTH))
        return hint


def scroll_layout(widget: QWidget) -> QVBoxLayout:
    """Make ``widget`` a scrollable dock: its only child is a frameless scroll area; returns the layout of the
    scrolled content (add the dock's rows there). A dock then never forces the window taller (or wider) than the
    screen: its minimum size is the scroll area's, not the sum of its rows."""
    inner = QWidget()
    layout = QVBoxLayout(inner)
    area = _DockScrollArea()
    area.setWidgetResizable(True)
    area.setFrameShape(QScrollArea.Shape.NoFrame)
    area.setWidget(inner)
    outer = QVBoxLayout(widget)
    outer.setContentsMargins(0, 0, 0, 0)
    outer.addWidget(area)
    widget.scroll_area = area  # type: ignore[attr-defined]
    return layout


#: a leading file path followed by ": cause" (POSIX, ~, relative or Windows drive paths)
_LEADING_PATH = re.compile(
    r"^(?P<head>error:\s*)?(?P<path>(?:[A-Za-z]:[\\/]|[/~]|\.{1,2}[\\/])[^:\n]*?):\s+(?P<cause>\S.*)$"
)
#: longest message a dock shows (the whole text stays in the status tooltip)
MAX_ERROR_CHARS = 300


def concise_error(text: str) -> str:
    """One line, cause first: ``"/long/path/slide.tiff: cannot read tile"`` -> ``"cannot read tile (slide.tiff)"``;
    only the first line of a multi-line message, at most ``MAX_ERROR_CHARS`` characters."""
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    line = lines[0] if lines else str(text).strip()
    m = _LEADING_PATH.match(line)
    if m:
        line = f"{m['head'] or ''}{m['cause']} ({Path(m['path'].rstrip('/')).name or m['path']})"
    return line if len(line) <= MAX_ERROR_CHARS else line[: MAX_ERROR_CHARS - 3] + "..."


def activity_progress(total: int, desc: str, cancel: Callable[[], None]) -> Any:
    """A progress bar in napari's activity dock (``napari.utils.cancelable_progress``: its cancel button calls
    ``cancel``); the caller updates it and closes it when the work ends."""
    from napari.utils import cancelable_progress

    return cancelable_progress(total=total, desc=desc, cancel_callback=cancel)


def dock_worker(generator_function: Callable[..., Any], *args: Any, on_error: Callable[[Exception], None]) -> Any:
    """A napari thread worker (not started) running ``generator_function(*args)`` whose errors reach ``on_error``
    only: no traceback toast beside the dock's message (napari's worker class adds one) and no re-raise in the GUI
    thread (a worker without an ``errored`` slot given at creation re-raises, which aborts a script that has no
    napari exception hook). Warnings still become napari notifications."""
    from napari.qt.threading import create_worker
    from napari.utils.notifications import notification_manager
    from superqt.utils import GeneratorWorker

    worker = create_worker(
        generator_function, *args, _start_thread=False, _connect={"errored": on_error}, _worker_class=GeneratorWorker
    )
    worker.warned.connect(lambda warning: notification_manager.receive_warning(*warning))
    return worker


def error_html(text: str) -> str:
    """``text`` escaped and shown in red (for a rich-text label)."""
    return f"<span style='color:#e04040'>{html.escape(text)}</span>"


class RunnerDockMixin:
    """Child-process plumbing of a dock widget; put it before ``QWidget`` in the bases.

    The widget provides: ``runner`` (``ProcessRunner | None``), ``timer`` (a QTimer calling ``_tick``),
    ``state``, ``error``, ``status`` (QLabel), ``progress`` (QProgressBar), ``log`` (QPlainTextEdit),
    ``stop_button``, ``stop()``, ``viewer``,
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
            self._close_activity()
        else:
            self._sync_activity()

    def _start_activity(self, desc: str) -> None:
        """List the run in napari's activity dock (its cancel button calls ``stop``); ``_tick`` keeps it in step
        with the dock's progress bar and closes it when the child has exited."""
        self._close_activity()
        self.activity = activity_progress(max(0, self.progress.maximum()), desc, self.stop)

    def _sync_activity(self) -> None:
        bar = getattr(self, "activity", None)
        if bar is not None:
            if bar.total != self.progress.maximum():
                bar.total = self.progress.maximum()
            if self.progress.value() > bar.n:
                bar.update(self.progress.value() - bar.n)

    def _close_activity(self) -> None:
        bar = getattr(self, "activity", None)
        if bar is not None:
            self._sync_activity()
            bar.close()
            self.activity = None

    def _on_metrics(self, reset: bool, rows: list[dict[str, Any]]) -> None:
        """Hook: new rows of the run's metrics file (``reset``: the rows shown before are void)."""

    def labels_row(self) -> QWidget:
        """The labels CSV path with its browse button (the chosen file goes to ``set_labels``)."""
        return browse_row(
            self.labels_edit,
            "Labels CSV",
            file_filter="CSV (*.csv *.tsv);;All files (*)",
            on_chosen=self.set_labels,
            on_error=self._show_error,
        )

    def _load_clicked(self) -> None:
        try:
            self.load_into_inference()
        except WsimilError as exc:
            self._show_error(str(exc))

    def _show_error(self, text: str) -> None:
        """One concise line in red, cause first (the whole text is the status line's tooltip)."""
        self.error = text
        self.status.setText(error_html(concise_error(text)))
        self.status.setToolTip(str(text))

    def shutdown(self, grace: float = 10.0) -> None:
        """Stop a running child (SIGINT, then SIGTERM/SIGKILL) and wait for it: call before discarding."""
        self.timer.stop()
        if self.runner is not None and self.runner.returncode is None:
            self.runner.stop(grace=grace)
        self._close_activity()

    def closeEvent(self, event: Any) -> None:  # noqa: N802 (Qt name)
        self.shutdown()
        super().closeEvent(event)


__all__ = [
    "RunnerDockMixin",
    "path_row",
    "learning_rate_spin",
    "progress_and_status",
    "error_html",
    "concise_error",
    "activity_progress",
    "dock_worker",
    "scroll_layout",
    "MAX_DOCK_MIN_WIDTH",
    "MAX_ERROR_CHARS",
    "read_csv_header",
    "target_columns",
    "find_inference_widget",
    "NON_TARGET_COLUMNS",
    "DEVICE_CHOICES",
    "POLL_MS",
]
