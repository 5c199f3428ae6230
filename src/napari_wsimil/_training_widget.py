"""Training dock widget: a form for a training config, run by ``wsimil train`` in a child process.

The form holds the method (``list_methods()``), the store, the labels CSV and its target column(s), epochs,
learning rate, device and the run directory; the method's options and the model's options are magicgui forms
built from their schemas (the method's pydantic ``options_cls``, the model's config dataclass; see
``_options_form``), validated by the same schemas. "Load config YAML" fills the form; keys the form does not
show (split, early stopping...) are kept from that file. "Train" validates the config (``validate_config``),
writes it to ``<run dir>/train.yaml`` and runs ``python -m wsimil_core train`` through ``ProcessRunner``: the
GUI stays responsive, a crash in the child only shows its last error line. The console streams into the log
tab; the numbers come from the run's ``metrics.jsonl`` (one row per epoch, rewritten by the trainer after each
epoch), tailed by the runner's thread: live loss and validation-metric curves, the best epoch, progress.
"Stop" sends SIGINT: the trainer keeps the checkpoints and the resume file of the last finished epoch, and
pressing "Train" again with the same form resumes. "Load into inference widget" hands the best checkpoint
to the Inference widget (``InferenceWidget.load_checkpoint``).
"""

from __future__ import annotations

import copy
import html
import os
from pathlib import Path
from typing import Any

import yaml
from qtpy.QtCore import Qt, QTimer, Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QPlainTextEdit,
    QPushButton,
    QScrollArea,
    QSpinBox,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from napari_wsimil._metrics_plot import MetricsPlot, best_row, epoch_number, epoch_summary
from napari_wsimil._options_form import OptionsForm
from napari_wsimil._run_dock import (
    DEVICE_CHOICES,
    POLL_MS,
    RunnerDockMixin,
    error_html,
    find_inference_widget,
    learning_rate_spin,
    path_row,
    progress_and_status,
    read_csv_header,
    target_columns,
)
from napari_wsimil._subprocess import METRICS_FILE, ProcessRunner, wsimil_command
from wsimil_core.api import (
    CheckpointError,
    ConfigError,
    WsimilError,
    atomic_write_text,
    list_methods,
    load_config,
    method_class,
    model_config_class,
    parse_options,
    validate_config,
)

#: model config fields the engine fills from the data (not shown in the model options form).
DATA_MODEL_FIELDS = ("in_dim", "n_classes", "tasks")
STOP_GRACE_MS = 30_000
#: files of a run directory (written by the trainer).
RESUME_FILE = "resume.safetensors"


# --- Qt-free helpers --------------------------------------------------------------------------------------------


def total_epochs(config: dict[str, Any]) -> int:
    """Epochs a run will train in all: ``train.epochs`` per phase, ``train.phase_epochs`` overrides."""
    method = config.get("method", {})
    name = method.get("name", "abmil") if isinstance(method, dict) else str(method)
    cls = method_class(name)
    opts = parse_options(cls.options_cls, (method.get("options") if isinstance(method, dict) else None) or {}, name)
    phases = list(getattr(opts, "phases", None) or cls.phases)
    train = config.get("train", {})
    epochs = int(train.get("epochs", 20))
    overrides = train.get("phase_epochs") or {}
    return sum(int(overrides.get(p, epochs)) for p in phases)


def _resolve_paths(data: dict[str, Any], base: Path) -> dict[str, Any]:
    """Make the relative paths of a loaded config absolute (relative to the YAML's folder when they exist there)."""

    def fix(value: Any) -> Any:
        if value in (None, ""):
            return value
        p = Path(str(value)).expanduser()
        if p.is_absolute():
            return str(p)
        return str((base / p) if (base / p).exists() else p.resolve())

    d = data.get("data") or {}
    for key in ("store", "labels", "omics"):
        if key in d:
            d[key] = fix(d[key])
    out = data.get("output") or {}
    if "dir" in out:
        p = Path(str(out["dir"])).expanduser()
        out["dir"] = str(p if p.is_absolute() else (base / p))
    return data


# --- the widget -------------------------------------------------------------------------------------------------


def scrolled(widget: QWidget) -> QScrollArea:
    """``widget`` in a frameless vertical scroll area (long option forms stay usable in a short dock)."""
    area = QScrollArea()
    area.setWidgetResizable(True)
    area.setFrameShape(QScrollArea.Shape.NoFrame)
    area.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
    area.setWidget(widget)
    return area


class TrainingWidget(RunnerDockMixin, QWidget):
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
        self.options_form: OptionsForm | None = None
        self.model_form: OptionsForm | None = None
        self._base: dict[str, Any] = {}
        self._metric_name = "auc"
        self._total_epochs = 1

        self.method_combo = QComboBox()
        self.method_combo.addItems(list_methods())
        self.method_combo.currentTextChanged.connect(self._method_changed)
        self.store_edit = QLineEdit()
        self.store_edit.setPlaceholderText("feature store directory (zarr)")
        self.labels_edit = QLineEdit()
        self.labels_edit.setPlaceholderText("labels CSV (slide_id + target columns)")
        self.labels_edit.editingFinished.connect(self._labels_edited)
        self.targets_list = QListWidget()
        self.targets_list.setMaximumHeight(70)
        self.targets_list.setToolTip("tick the target column(s); several targets need a multi-task method (mecds)")
        self.epochs_spin = QSpinBox()
        self.epochs_spin.setRange(1, 100000)
        self.epochs_spin.setValue(20)
        self.lr_spin = learning_rate_spin(2e-4)
        self.device_combo = QComboBox()
        self.device_combo.addItems(list(DEVICE_CHOICES))
        self.output_edit = QLineEdit()
        self.output_edit.setPlaceholderText("run directory (checkpoints, metrics)")
        self.overwrite_box = QCheckBox("overwrite a finished run in this directory")

        self.options_page = QWidget()
        QVBoxLayout(self.options_page).setContentsMargins(0, 0, 0, 0)
        self.model_page = QWidget()
        QVBoxLayout(self.model_page).setContentsMargins(0, 0, 0, 0)
        self.options_error = QLabel("")
        self.options_error.setWordWrap(True)
        self.options_error.setTextFormat(Qt.TextFormat.RichText)

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

        form = QFormLayout()
        form.addRow("Method", self.method_combo)
        form.addRow("Store", path_row(self.store_edit, self._browse_store))
        form.addRow("Labels CSV", path_row(self.labels_edit, self._browse_labels))
        form.addRow("Target(s)", self.targets_list)
        form.addRow("Epochs", self.epochs_spin)
        form.addRow("Learning rate", self.lr_spin)
        form.addRow("Device", self.device_combo)
        form.addRow("Run directory", path_row(self.output_edit, self._browse_output))
        form.addRow("", self.overwrite_box)
        self.tabs = QTabWidget()
        self.tabs.addTab(scrolled(self.options_page), "Method options")
        self.tabs.addTab(scrolled(self.model_page), "Model options")
        self.tabs.addTab(self.plot, "Curves")
        self.tabs.addTab(self.log, "Log")
        buttons = QHBoxLayout()
        buttons.addWidget(self.load_yaml_button)
        buttons.addWidget(self.train_button)
        buttons.addWidget(self.stop_button)
        layout = QVBoxLayout(self)
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

    # --- form ---------------------------------------------------------------------------------------------
    def _method_changed(self, name: str) -> None:
        for page in (self.options_page, self.model_page):
            lay = page.layout()
            while lay.count():
                item = lay.takeAt(0)
                if item.widget() is not None:
                    item.widget().deleteLater()
        self.options_form = self.model_form = None
        self._base.pop("model", None)  # hidden model keys of another method's model
        if not name:
            return
        cls = method_class(name)
        self.options_form = OptionsForm(cls.options_cls, f"method {name!r}")
        self.model_form = OptionsForm(
            model_config_class(cls.model_name), f"model {cls.model_name!r}", exclude=DATA_MODEL_FIELDS
        )
        for form, page, empty in (
            (self.options_form, self.options_page, f"method {name!r} has no options"),
            (self.model_form, self.model_page, f"model {cls.model_name!r} has no options"),
        ):
            page.layout().addWidget(form.native if form.widgets else QLabel(empty))
            page.layout().addStretch(1)
            form.on_change(self._check_options)
        self._check_options()

    def _check_options(self) -> bool:
        """Validate both option forms; show the first problem under them. Returns whether they are valid."""
        try:
            self.option_values()
            self.model_values()
        except WsimilError as exc:
            self.options_error.setText(error_html(str(exc)))
            self.options_error.setVisible(True)
            return False
        self.options_error.setText("")
        self.options_error.setVisible(False)
        return True

    def set_method(self, name: str) -> None:
        """Choose the method (rebuilds the option forms with its defaults)."""
        method_class(name)  # ConfigError for an unknown name
        if self.method_combo.currentText() == name:
            self._method_changed(name)
        else:
            self.method_combo.setCurrentText(name)

    def option_values(self) -> dict[str, Any]:
        """The method options the form shows, validated by the method's schema (``ConfigError`` naming the
        option and the problem)."""
        return self.options_form.validated() if self.options_form is not None else {}

    def set_option_values(self, values: dict[str, Any]) -> None:
        """Set method options; unknown names are a ``ConfigError``."""
        if self.options_form is not None:
            self.options_form.set_values(values)

    def model_values(self) -> dict[str, Any]:
        """The model options that differ from the model's defaults (plus keys of a loaded config the form does
        not show), validated by the model's config dataclass."""
        if self.model_form is None:
            return {}
        return self.model_form.changed(extra=self._base.get("model") or {})

    def set_model_values(self, values: dict[str, Any]) -> None:
        """Set model options; keys the form does not show (``in_dim``...) are kept for the config as given."""
        assert self.model_form is not None
        shown = {k: v for k, v in values.items() if k in self.model_form.widgets}
        self._base["model"] = {k: v for k, v in values.items() if k not in shown}
        self.model_form.set_values(shown)
        self._check_options()

    def set_store(self, path: str | os.PathLike) -> None:
        self.store_edit.setText(str(path))
        if not self.output_edit.text().strip():
            self.output_edit.setText(str(Path(path).resolve().parent / "runs" / self.method_combo.currentText()))

    def set_labels(self, path: str | os.PathLike) -> list[str]:
        """Set the labels CSV and list its target columns (``DataError`` when unreadable). Returns them."""
        self.labels_edit.setText(str(path))
        return self._refresh_targets()

    def _labels_edited(self) -> None:
        try:
            self._refresh_targets()
        except WsimilError as exc:
            self._show_error(str(exc))

    def _refresh_targets(self, keep: list[str] | None = None) -> list[str]:
        checked = keep if keep is not None else self.targets()
        self.targets_list.clear()
        text = self.labels_edit.text().strip()
        if not text:
            return []
        columns = target_columns(read_csv_header(text))
        if not checked:
            checked = ["label"] if "label" in columns else columns[:1]
        for col in columns + [c for c in checked if c not in columns]:
            item = QListWidgetItem(col)
            item.setFlags(item.flags() | Qt.ItemFlag.ItemIsUserCheckable)
            item.setCheckState(Qt.CheckState.Checked if col in checked else Qt.CheckState.Unchecked)
            self.targets_list.addItem(item)
        return columns

    def targets(self) -> list[str]:
        """The ticked target columns, in CSV order."""
        out = []
        for i in range(self.targets_list.count()):
            item = self.targets_list.item(i)
            if item.checkState() == Qt.CheckState.Checked:
                out.append(item.text())
        return out

    def set_targets(self, targets: list[str]) -> None:
        """Tick exactly these columns (columns not in the CSV are added, so a config can name them)."""
        have = {self.targets_list.item(i).text() for i in range(self.targets_list.count())}
        for t in targets:
            if t not in have:
                item = QListWidgetItem(t)
                item.setFlags(item.flags() | Qt.ItemFlag.ItemIsUserCheckable)
                self.targets_list.addItem(item)
        for i in range(self.targets_list.count()):
            item = self.targets_list.item(i)
            item.setCheckState(Qt.CheckState.Checked if item.text() in targets else Qt.CheckState.Unchecked)

    def config_dict(self) -> dict[str, Any]:
        """The validated training config the form describes (``ConfigError`` naming the bad field)."""
        name = self.method_combo.currentText()
        data = copy.deepcopy(self._base)
        data["method"] = {"name": name, "options": self.option_values()}
        data["model"] = self.model_values()
        store, labels = self.store_edit.text().strip(), self.labels_edit.text().strip()
        if not store:
            raise ConfigError("choose a feature store directory")
        if not labels:
            raise ConfigError("choose a labels CSV")
        targets = self.targets()
        if not targets:
            raise ConfigError(f"tick at least one target column of {labels}")
        output = self.output_edit.text().strip()
        if not output:
            raise ConfigError("choose a run directory")
        section = data.setdefault("data", {})
        section.update(store=str(Path(store).expanduser()), labels=str(Path(labels).expanduser()), targets=targets)
        section = data.setdefault("train", {})
        section.update(
            epochs=int(self.epochs_spin.value()), lr=float(self.lr_spin.value()), device=self.device_combo.currentText()
        )
        section = data.setdefault("output", {})
        section.update(dir=str(Path(output).expanduser()), overwrite=self.overwrite_box.isChecked(), progress=True)
        return validate_config(data, "training widget").to_json()

    def load_config_yaml(self, path: str | os.PathLike) -> dict[str, Any]:
        """Fill the form from a training config YAML (validated); keys the form lacks are kept for "Train"."""
        path = Path(path)
        cfg = load_config(path).to_json()
        cfg = _resolve_paths(cfg, path.resolve().parent)
        name = cfg["method"]["name"]
        opts = parse_options(method_class(name).options_cls, cfg["method"].get("options") or {}, name)
        self.set_method(name)
        self.set_option_values(opts.model_dump(mode="json"))
        self._base = cfg
        self.set_model_values(dict(cfg.get("model") or {}))
        d = cfg["data"]
        self.store_edit.setText(d.get("store") or "")
        self.labels_edit.setText(d.get("labels") or "")
        try:
            self._refresh_targets(keep=list(d.get("targets") or []))
        except WsimilError as exc:
            self._show_error(str(exc))
        self.set_targets(list(d.get("targets") or []))
        t = cfg["train"]
        self.epochs_spin.setValue(int(t["epochs"]))
        self.lr_spin.setValue(float(t["lr"]))
        dev = str(t.get("device", "auto"))
        if self.device_combo.findText(dev) < 0:
            self.device_combo.addItem(dev)
        self.device_combo.setCurrentText(dev)
        self.output_edit.setText(str(cfg["output"]["dir"]))
        self.overwrite_box.setChecked(bool(cfg["output"].get("overwrite")))
        self.status.setText(f"loaded {html.escape(str(path))}")
        return cfg

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

    def _browse_store(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Feature store")
        if path:
            self.set_store(path)

    def _browse_output(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Run directory")
        if path:
            self.output_edit.setText(path)

    def _load_yaml_clicked(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Training config", "", "YAML (*.yaml *.yml)")
        if path:
            try:
                self.load_config_yaml(path)
            except WsimilError as exc:
                self._show_error(str(exc))

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
        self.status.setText(f"training in {html.escape(str(self.run_dir))} (pid {self.runner.pid})")
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
            kept = f"checkpoint kept: {best}" if best else "no epoch had finished, so there is no checkpoint yet"
            self.status.setText(
                html.escape(
                    f"stopped after {len(self.history)} epoch(s); {kept}. Train again with the same form to resume."
                )
            )
        else:
            self.state = "failed"
            line = runner.error_line()
            self._show_error(f"training failed (exit {rc}): {line}")
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


__all__ = ["TrainingWidget", "total_epochs", "scrolled"]
