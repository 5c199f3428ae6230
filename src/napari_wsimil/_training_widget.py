"""Training dock widget: a form for a training config, run by ``wsimil train`` in a child process.

The form (method, data, epochs, options built from the schemas...) is ``_training_form.TrainingFormMixin``.
"Train" validates the config, writes it to ``<run dir>/train.yaml`` and runs ``python -m wsimil_core train``
through ``ProcessRunner``: the GUI stays responsive, a crash in the child only shows its last error line. The
console streams into the log tab; the numbers come from the run's ``metrics.jsonl`` (one row per epoch,
rewritten by the trainer after each epoch), tailed by the runner's thread: live loss and validation-metric
curves, the best epoch, progress. "Stop" sends SIGINT: the trainer keeps the checkpoints and
the resume file of the last finished epoch, and pressing "Train" again with the same form resumes. "Load into
inference widget" hands the best checkpoint to the Inference widget (``InferenceWidget.load_checkpoint``).
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import yaml
from qtpy.QtCore import QTimer, Signal
from qtpy.QtWidgets import (
    QHBoxLayout,
    QPlainTextEdit,
    QPushButton,
    QTabWidget,
    QWidget,
)

from napari_wsimil._metrics_plot import MetricsPlot, best_row, epoch_number, epoch_summary
from napari_wsimil._metrics_tail import METRICS_FILE
from napari_wsimil._process_runner import ProcessRunner, wsimil_command
from napari_wsimil._run_dock import (
    POLL_MS,
    RunnerDockMixin,
    concise_error,
    find_inference_widget,
    progress_and_status,
    scroll_layout,
)
from napari_wsimil._training_config import total_epochs
from napari_wsimil._training_form import TrainingFormMixin, scrolled
from wsimil_core.api import CheckpointError, WsimilError, atomic_write_text

STOP_GRACE_MS = 30_000
#: what "Train" after "Stop" repeats (the trainer saves an epoch only when it has finished)
RESUME_REPEATS = "the stopped epoch runs again from its start (an epoch is saved only when it finishes)"
#: files of a run directory (written by the trainer).
RESUME_FILE = "resume.safetensors"


class TrainingWidget(TrainingFormMixin, RunnerDockMixin, QWidget):
    """Configure and run ``wsimil train`` in a child process; live log, curves, stop, hand over the checkpoint.

    Public API (tests and scripts):
        ``set_method(name)``, ``set_store(path)``, ``set_labels(path)``, ``set_targets([...])``,
        ``targets()``, ``set_option_values({...})``, ``option_values()`` (validated),
        ``set_model_values({...})``, ``model_values()`` (validated; only what differs from the defaults),
        ``load_config_yaml(path)``, ``config_dict() -> dict`` (validated), ``write_config() -> Path``,
        ``train() -> ProcessRunner | None``, ``stop()``, ``best_checkpoint() -> Path | None``,
        ``load_into_inference(widget=None)``.
        Forms: ``options_form`` / ``model_form`` (``OptionsForm``; ``.widgets[name]`` are magicgui widgets).
        State: ``state`` ("idle", "running", "stopping", "finished", "stopped", "failed"), ``runner``,
        ``run_dir``, ``history`` (the rows of the run's metrics.jsonl), ``error`` (the child's last error line).
        Signal ``run_finished(str)`` carries the final state.
    """

    run_finished = Signal(str)

    def __init__(self, napari_viewer: Any = None, inference_widget: Any = None):
        super().__init__()
        self.viewer = napari_viewer
        self.inference_widget = inference_widget
        self.runner: ProcessRunner | None = None
        self.run_dir: Path | None = None
        self.config_path: Path | None = None
        self.history: list[dict[str, Any]] = []
        self.error: str | None = None
        self.state = "idle"
        self.activity: Any = None  # the run's progress bar in napari's activity dock
        self._metric_name = "auc"
        self._total_epochs = 1
        form = self._init_form()

        self.load_yaml_button = QPushButton("Load config YAML...")
        self.load_yaml_button.clicked.connect(self._load_yaml_clicked)
        self.train_button = QPushButton("Train")
        self.train_button.clicked.connect(self.train)
        self.stop_button = QPushButton("Stop")
        self.stop_button.setEnabled(False)
        self.stop_button.clicked.connect(self.stop)
        self.progress, self.status = progress_and_status()
        self.log = QPlainTextEdit()
        self.log.setReadOnly(True)
        self.log.setMaximumBlockCount(3000)
        self.plot = MetricsPlot()
        self.load_button = QPushButton("Load into inference widget")
        self.load_button.setEnabled(False)
        self.load_button.clicked.connect(self._load_clicked)

        self.tabs = QTabWidget()
        self.tabs.addTab(scrolled(self.options_page), "Method options")
        self.tabs.addTab(scrolled(self.model_page), "Model options")
        self.tabs.addTab(self.plot, "Curves")
        self.tabs.addTab(self.log, "Log")
        buttons = QHBoxLayout()
        buttons.addWidget(self.load_yaml_button)
        buttons.addWidget(self.train_button)
        buttons.addWidget(self.stop_button)
        layout = scroll_layout(self)
        layout.addLayout(form)
        layout.addWidget(self.tabs, 1)
        layout.addWidget(self.options_error)
        layout.addLayout(buttons)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        layout.addWidget(self.load_button)

        self.timer = QTimer(self)
        self.timer.setInterval(POLL_MS)
        self.timer.timeout.connect(self._tick)
        self._method_changed(self.method_combo.currentText())

    def write_config(self) -> Path:
        """Validate the form and write it to ``<run dir>/train.yaml`` (atomic). Returns the path."""
        cfg = self.config_dict()
        run_dir = Path(cfg["output"]["dir"])
        text = "# written by the wsimil napari training widget; run: wsimil train THIS.yaml\n"
        text += yaml.safe_dump(cfg, sort_keys=False)
        self.config_path = atomic_write_text(run_dir / "train.yaml", text)
        self.run_dir = run_dir
        self._metric_name = cfg["train"]["early_stopping"]["metric"]
        self._total_epochs = max(1, total_epochs(cfg))
        return self.config_path

    # --- running ------------------------------------------------------------------------------------------
    def train(self) -> ProcessRunner | None:
        """Write the config and start ``wsimil train`` in a child process (None when the form is invalid)."""
        if self.running:
            return self.runner
        try:
            config_path = self.write_config()
        except WsimilError as exc:
            self._show_error(str(exc))
            return None
        assert self.run_dir is not None
        self.error = None
        self.history = []
        self.log.clear()
        self.log.appendPlainText(f"$ wsimil train {config_path}")
        # A run that will resume rewrites its metrics file with the earlier epochs: show them at once. Any other
        # run's old file is stale until the trainer rewrites it after its first epoch.
        fresh = self.overwrite_box.isChecked() or not (self.run_dir / RESUME_FILE).is_file()
        self.runner = ProcessRunner(
            wsimil_command("train", str(config_path)),
            cwd=self.run_dir,
            metrics=self.run_dir / METRICS_FILE,
            skip_existing_metrics=fresh,
        ).start()
        self.state = "running"
        self.progress.setRange(0, self._total_epochs)
        self.progress.setValue(0)
        self._start_activity(f"wsimil train: {self.run_dir.name}")
        start = f"training in {self.run_dir} (pid {self.runner.pid})"
        if not fresh:
            start = f"resuming the stopped run in {self.run_dir}: {RESUME_REPEATS}"
            self.log.appendPlainText(f"note: {RESUME_REPEATS}")
        self.status.setText(html.escape(start))
        self.train_button.setEnabled(False)
        self.stop_button.setEnabled(True)
        self.load_button.setEnabled(False)
        self.plot.update_records(self.history, self._metric_name)
        self.tabs.setCurrentWidget(self.plot)
        self.timer.start()
        return self.runner

    def stop(self) -> None:
        """Ask the trainer to stop (SIGINT): it keeps the last finished epoch; escalates after 30 s."""
        self._stop_runner(
            "stopping: the trainer keeps the checkpoints of the last finished epoch...",
            STOP_GRACE_MS,
            STOP_GRACE_MS + 5000,
        )

    def _on_metrics(self, reset: bool, rows: list[dict[str, Any]]) -> None:
        assert self.runner is not None
        self.history = list(self.runner.metrics)
        self.progress.setValue(min(len(self.history), self._total_epochs))
        self.plot.update_records(self.history, self._metric_name)
        if self.history and self.state == "running":
            self.status.setText(html.escape(epoch_summary(self.history[-1], self._metric_name)))

    def best_epoch_text(self) -> str:
        """``best: <phase> epoch k (global epoch n), val/<metric> x`` from the rows ('' before any best epoch)."""
        row = best_row(self.history)
        if row is None:
            return ""
        text = epoch_summary(row, self._metric_name).removesuffix(" (best)")
        return f"best: {text} (epoch {epoch_number(row)} overall)"

    def _finished(self) -> None:
        runner = self.runner
        assert runner is not None
        rc = runner.returncode
        best = self.best_checkpoint()
        if rc == 0:
            self.state = "finished"
            self.progress.setValue(self._total_epochs)
            text = f"finished: {best}" if best else "finished (no checkpoint kept)"
            self.status.setText(html.escape("; ".join(t for t in (text, self.best_epoch_text()) if t)))
        elif runner.interrupted:
            self.state = "stopped"
            done = len(self.history)
            if best:
                text = (
                    f"stopped during epoch {done + 1} overall: epochs 1-{done} are saved (checkpoint kept: {best}). "
                    f"Train again with the same form to resume; {RESUME_REPEATS}"
                )
            else:
                text = "stopped during the first epoch: no epoch had finished, so there is no checkpoint yet"
            self.status.setText(html.escape(text))
        else:
            self.state = "failed"
            line = runner.error_line()
            self._show_error(f"training failed (exit {rc}): {concise_error(line)}")
            self.error = line
        self.train_button.setEnabled(True)
        self.stop_button.setEnabled(False)
        self.load_button.setEnabled(best is not None)
        self.run_finished.emit(self.state)

    def best_checkpoint(self) -> Path | None:
        """``best.safetensors`` of the run directory (else ``last.safetensors``); None when neither exists."""
        if self.run_dir is None:
            out = self.output_edit.text().strip()
            if not out:
                return None
            self.run_dir = Path(out)
        for name in ("best.safetensors", "last.safetensors"):
            p = self.run_dir / name
            if p.is_file():
                return p
        return None

    def load_into_inference(self, widget: Any = None) -> Any:
        """Load the best checkpoint into the Inference widget (opened in the viewer when not given).

        Returns the inference widget. ``CheckpointError`` when the run has no checkpoint yet.
        """
        ckpt = self.best_checkpoint()
        if ckpt is None:
            raise CheckpointError(f"{self.run_dir}: no best.safetensors or last.safetensors yet; train first")
        widget = widget or self.inference_widget or find_inference_widget(self.viewer)
        widget.load_checkpoint(ckpt)
        self.inference_widget = widget
        self.status.setText(html.escape(f"loaded {ckpt} into the Inference widget"))
        return widget


__all__ = ["TrainingWidget"]
