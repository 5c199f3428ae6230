"""Training dock widget: a form for a training config, run by ``wsimil train`` in a child process.

The form holds the method (``list_methods()``), the store, the labels CSV and its target column(s), the
method's options (generated from its pydantic ``options_cls``: bool -> checkbox, int/float -> spin box,
Literal -> combo, anything else -> a YAML line edit), model options (YAML), epochs, learning rate, device and
the run directory. "Load config YAML" fills the form; keys the form does not show (split, early stopping...)
are kept from that file. "Train" validates the config (``engine.config.validate_config``), writes it to
``<run dir>/train.yaml`` and runs ``python -m wsimil_core train`` through ``ProcessRunner``: the GUI stays
responsive, a crash in the child only shows its last error line. The log streams into a text box and
``metrics.jsonl`` (rewritten by the trainer after each epoch) feeds live loss and validation-metric curves.
"Stop" sends SIGINT: the trainer keeps the checkpoints and the resume file of the last finished epoch, and
pressing "Train" again with the same form resumes. "Load into inference widget" hands the best checkpoint
to the Inference widget (``InferenceWidget.load_checkpoint``).
"""

from __future__ import annotations

import csv
import html
import json
import math
import os
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from qtpy.QtCore import Qt, QTimer, Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QPlainTextEdit,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from napari_wsimil._run_dock import RunnerDockMixin, learning_rate_spin, path_row, progress_and_status
from napari_wsimil._subprocess import ProcessRunner, parse_epoch_metrics, wsimil_command
from wsimil_core._io import atomic_write_text as write_text_atomic  # (path, text) -> Path; public here
from wsimil_core.errors import CheckpointError, ConfigError, DataError, WsimilError

#: label-CSV columns that are never targets.
NON_TARGET_COLUMNS = ("slide_id", "patient_id", "split", "case_id")
DEVICE_CHOICES = ("auto", "cpu", "cuda")
POLL_MS = 200
STOP_GRACE_MS = 30_000


# --- Qt-free helpers --------------------------------------------------------------------------------------------


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


def read_metrics_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The epoch records of a run's ``metrics.jsonl`` (empty when absent); bad lines are skipped."""
    p = Path(path)
    if not p.is_file():
        return []
    records = []
    for line in p.read_text(encoding="utf-8", errors="replace").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            records.append(rec)
    return records


def total_epochs(config: dict[str, Any]) -> int:
    """Epochs a run will train in all: ``train.epochs`` per phase, ``train.phase_epochs`` overrides."""
    import wsimil_core.methods  # noqa: F401
    from wsimil_core.methods.base import method_class, parse_options

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


# --- form fields from a pydantic options schema ------------------------------------------------------------------


def _unwrap_optional(annotation: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1 and len(args) < len(typing.get_args(annotation)):
            return args[0], True
    return annotation, False


def _bounds(metadata: list[Any], step: float) -> tuple[float | None, float | None]:
    lo = hi = None
    for m in metadata:
        if getattr(m, "ge", None) is not None:
            lo = float(m.ge)
        if getattr(m, "gt", None) is not None:
            lo = float(m.gt) + step
        if getattr(m, "le", None) is not None:
            hi = float(m.le)
        if getattr(m, "lt", None) is not None:
            hi = float(m.lt) - step
    return lo, hi


class OptionField:
    """One form field for one option: a Qt widget with ``value()`` / ``set_value(v)``.

    ``kind`` is ``bool`` (QCheckBox), ``int`` (QSpinBox), ``float`` (QDoubleSpinBox), ``choice`` (QComboBox of
    a Literal's values), ``str`` (QLineEdit) or ``yaml`` (QLineEdit holding a YAML value: lists, optional
    values; empty = null).
    """

    FLOAT_DECIMALS = 6

    def __init__(self, name: str, annotation: Any, default: Any, metadata: list[Any], description: str = ""):
        self.name = name
        self.default = default
        inner, optional = _unwrap_optional(annotation)
        self.choices: list[Any] = []
        if optional:
            self.kind = "yaml"
        elif inner is bool:
            self.kind = "bool"
        elif inner is int:
            self.kind = "int"
        elif inner is float:
            self.kind = "float"
        elif typing.get_origin(inner) is typing.Literal:
            self.kind = "choice"
            self.choices = list(typing.get_args(inner))
        elif inner is str:
            self.kind = "str"
        else:
            self.kind = "yaml"
        self.widget = self._make_widget(metadata)
        if description:
            self.widget.setToolTip(description)
        self.widget.setObjectName(f"option_{name}")
        self.set_value(default)

    def _make_widget(self, metadata: list[Any]) -> QWidget:
        if self.kind == "bool":
            return QCheckBox()
        if self.kind == "int":
            w = QSpinBox()
            lo, hi = _bounds(metadata, 1)
            w.setRange(int(lo) if lo is not None else -(2**31 - 1), int(hi) if hi is not None else 2**31 - 1)
            return w
        if self.kind == "float":
            w = QDoubleSpinBox()
            w.setDecimals(self.FLOAT_DECIMALS)
            step = 10.0**-self.FLOAT_DECIMALS
            lo, hi = _bounds(metadata, step)
            w.setRange(lo if lo is not None else -1e9, hi if hi is not None else 1e9)
            d = abs(float(self.default)) if isinstance(self.default, (int, float)) else 0.0
            w.setSingleStep(10 ** math.floor(math.log10(d)) / 10 if d > 0 else 0.01)
            return w
        if self.kind == "choice":
            w = QComboBox()
            w.addItems([str(c) for c in self.choices])
            return w
        w = QLineEdit()
        if self.kind == "yaml":
            w.setPlaceholderText("YAML value (empty = null)")
        return w

    def value(self) -> Any:
        w = self.widget
        if self.kind == "bool":
            return w.isChecked()
        if self.kind == "int":
            return int(w.value())
        if self.kind == "float":
            return float(w.value())
        if self.kind == "choice":
            return self.choices[w.currentIndex()]
        text = w.text()
        if self.kind == "str":
            return text
        if not text.strip():
            return None
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"option {self.name!r}: {text!r} is not valid YAML ({exc})") from None

    def set_value(self, value: Any) -> None:
        w = self.widget
        if value is None and self.kind in ("bool", "int", "float", "choice"):
            return  # a required field without a default: the widget keeps its initial value
        if self.kind == "bool":
            w.setChecked(bool(value))
        elif self.kind == "int":
            w.setValue(int(value))
        elif self.kind == "float":
            w.setValue(float(value))
        elif self.kind == "choice":
            idx = [str(c) for c in self.choices].index(str(value)) if str(value) in map(str, self.choices) else 0
            w.setCurrentIndex(idx)
        elif self.kind == "str":
            w.setText("" if value is None else str(value))
        else:
            w.setText(
                ""
                if value is None
                else yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
            )


def option_fields(options_cls: type) -> dict[str, OptionField]:
    """One ``OptionField`` per field of a method's pydantic options model, in schema order."""
    fields = {}
    for name, info in options_cls.model_fields.items():
        default = None if info.is_required() else info.get_default(call_default_factory=True)
        fields[name] = OptionField(name, info.annotation, default, list(info.metadata), info.description or "")
    return fields


# --- live curves ------------------------------------------------------------------------------------------------


class MetricsPlot(QWidget):
    """Loss (train and validation) and one validation metric per epoch (matplotlib in Qt)."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.figure = Figure(figsize=(4.0, 2.6), tight_layout=True)
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.ax_loss = self.figure.add_subplot(1, 2, 1)
        self.ax_metric = self.figure.add_subplot(1, 2, 2)
        self.series: dict[str, list[tuple[int, float]]] = {}
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.canvas)
        self.setMinimumHeight(180)
        self.update_records([], "auc")

    def update_records(self, records: list[dict[str, Any]], metric: str = "auc") -> None:
        """Redraw from the epoch records of ``metrics.jsonl`` (x = global epoch, 1-based)."""
        metric_keys = (f"val/{metric}", f"val/mean/{metric}")
        self.series = {"train/loss": [], "val/loss": [], f"val/{metric}": []}
        phase_starts: list[int] = []
        last_phase = None
        for i, rec in enumerate(records):
            x = int(rec.get("global_epoch", i)) + 1
            if rec.get("phase") != last_phase and last_phase is not None:
                phase_starts.append(x)
            last_phase = rec.get("phase")
            for key in ("train/loss", "val/loss"):
                if _finite(rec.get(key)):
                    self.series[key].append((x, float(rec[key])))
            for key in metric_keys:
                if _finite(rec.get(key)):
                    self.series[f"val/{metric}"].append((x, float(rec[key])))
                    break
        self.ax_loss.clear()
        self.ax_metric.clear()
        for key, style in (("train/loss", "-o"), ("val/loss", "--s")):
            pts = self.series[key]
            if pts:
                self.ax_loss.plot([p[0] for p in pts], [p[1] for p in pts], style, ms=3, label=key)
        pts = self.series[f"val/{metric}"]
        if pts:
            self.ax_metric.plot([p[0] for p in pts], [p[1] for p in pts], "-o", ms=3, color="tab:green")
        for ax in (self.ax_loss, self.ax_metric):
            for x in phase_starts:
                ax.axvline(x - 0.5, color="0.6", lw=0.8, ls=":")
            ax.set_xlabel("epoch", fontsize=8)
            ax.tick_params(labelsize=7)
        self.ax_loss.set_title("loss", fontsize=9)
        self.ax_metric.set_title(f"validation {metric}", fontsize=9)
        if any(self.series[k] for k in ("train/loss", "val/loss")):
            self.ax_loss.legend(fontsize=7)
        self.canvas.draw_idle()


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# --- the widget -------------------------------------------------------------------------------------------------


def find_inference_widget(viewer: Any) -> Any:
    """The viewer's Inference dock widget (opened when it is not yet): ``(dock, InferenceWidget)[1]``."""
    window = getattr(viewer, "window", None)
    if window is None or not hasattr(window, "add_plugin_dock_widget"):
        raise ConfigError("no napari window to open the Inference widget in; pass an inference widget instead")
    _, widget = window.add_plugin_dock_widget("napari-wsimil", "Inference")
    return widget


class TrainingWidget(RunnerDockMixin, QWidget):
    """Configure and run ``wsimil train`` in a child process; live log, curves, stop, hand over the checkpoint.

    Public API (tests and scripts):
        ``set_method(name)``, ``set_store(path)``, ``set_labels(path)``, ``set_targets([...])``,
        ``targets()``, ``set_option_values({...})``, ``option_values()``, ``load_config_yaml(path)``,
        ``config_dict() -> dict`` (validated), ``write_config() -> Path``, ``train() -> ProcessRunner | None``,
        ``stop()``, ``best_checkpoint() -> Path | None``, ``load_into_inference(widget=None)``.
        State: ``state`` ("idle", "running", "stopping", "finished", "stopped", "failed"), ``runner``,
        ``run_dir``, ``history`` (metrics.jsonl records), ``error`` (the child's last error line).
        Signal ``run_finished(str)`` carries the final state.
    """

    run_finished = Signal(str)

    def __init__(self, napari_viewer: Any = None, inference_widget: Any = None):
        super().__init__()
        import wsimil_core.methods  # noqa: F401  (fills the registry)
        from wsimil_core.methods.base import list_methods

        self.viewer = napari_viewer
        self.inference_widget = inference_widget
        self.runner: ProcessRunner | None = None
        self.run_dir: Path | None = None
        self.config_path: Path | None = None
        self.history: list[dict[str, Any]] = []
        self.error: str | None = None
        self.state = "idle"
        self.fields: dict[str, OptionField] = {}
        self._base: dict[str, Any] = {}
        self._metrics_stamp: tuple[float, int] | None = None
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
        self.targets_list.setMaximumHeight(90)
        self.targets_list.setToolTip("tick the target column(s); several targets need a multi-task method (mecds)")
        self.options_box = QGroupBox("Method options")
        self.options_form = QFormLayout(self.options_box)
        self.model_edit = QLineEdit()
        self.model_edit.setPlaceholderText("{}  e.g. {dim: 64}; in_dim and classes come from the data")
        self.epochs_spin = QSpinBox()
        self.epochs_spin.setRange(1, 100000)
        self.epochs_spin.setValue(20)
        self.lr_spin = learning_rate_spin(2e-4)
        self.device_combo = QComboBox()
        self.device_combo.addItems(list(DEVICE_CHOICES))
        self.output_edit = QLineEdit()
        self.output_edit.setPlaceholderText("run directory (checkpoints, metrics)")
        self.overwrite_box = QCheckBox("overwrite a finished run in this directory")

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
        self.log.setMinimumHeight(100)
        self.plot = MetricsPlot()
        self.load_button = QPushButton("Load into inference widget")
        self.load_button.setEnabled(False)
        self.load_button.clicked.connect(self._load_clicked)

        form = QFormLayout()
        form.addRow("Method", self.method_combo)
        form.addRow("Store", path_row(self.store_edit, self._browse_store))
        form.addRow("Labels CSV", path_row(self.labels_edit, self._browse_labels))
        form.addRow("Target(s)", self.targets_list)
        form.addRow("Model options", self.model_edit)
        form.addRow("Epochs", self.epochs_spin)
        form.addRow("Learning rate", self.lr_spin)
        form.addRow("Device", self.device_combo)
        form.addRow("Run directory", path_row(self.output_edit, self._browse_output))
        form.addRow("", self.overwrite_box)
        buttons = QHBoxLayout()
        buttons.addWidget(self.load_yaml_button)
        buttons.addWidget(self.train_button)
        buttons.addWidget(self.stop_button)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.options_box)
        layout.addLayout(buttons)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        layout.addWidget(self.plot)
        layout.addWidget(self.log, 1)
        layout.addWidget(self.load_button)

        self.timer = QTimer(self)
        self.timer.setInterval(POLL_MS)
        self.timer.timeout.connect(self._tick)
        self._method_changed(self.method_combo.currentText())

    # --- form ---------------------------------------------------------------------------------------------
    def _method_changed(self, name: str) -> None:
        from wsimil_core.methods.base import method_class

        while self.options_form.rowCount():
            self.options_form.removeRow(0)
        self.fields = {}
        if not name:
            return
        self.fields = option_fields(method_class(name).options_cls)
        for fname, f in self.fields.items():
            self.options_form.addRow(fname, f.widget)
        if not self.fields:
            self.options_form.addRow(QLabel(f"method {name!r} has no options"))

    def set_method(self, name: str) -> None:
        """Choose the method (rebuilds the options form with its defaults)."""
        from wsimil_core.methods.base import method_class

        method_class(name)  # ConfigError for an unknown name
        if self.method_combo.currentText() == name:
            self._method_changed(name)
        else:
            self.method_combo.setCurrentText(name)

    def option_values(self) -> dict[str, Any]:
        """The method options as the form shows them (``ConfigError`` for a bad YAML field)."""
        return {name: f.value() for name, f in self.fields.items()}

    def set_option_values(self, values: dict[str, Any]) -> None:
        """Set option fields; unknown names are a ``ConfigError``."""
        unknown = sorted(set(values) - set(self.fields))
        if unknown:
            raise ConfigError(
                f"method {self.method_combo.currentText()!r} has no option(s) {unknown}; it has {sorted(self.fields)}"
            )
        for name, value in values.items():
            self.fields[name].set_value(value)

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
            item.setFlags(item.flags() | Qt.ItemIsUserCheckable)
            item.setCheckState(Qt.Checked if col in checked else Qt.Unchecked)
            self.targets_list.addItem(item)
        return columns

    def targets(self) -> list[str]:
        """The ticked target columns, in CSV order."""
        out = []
        for i in range(self.targets_list.count()):
            item = self.targets_list.item(i)
            if item.checkState() == Qt.Checked:
                out.append(item.text())
        return out

    def set_targets(self, targets: list[str]) -> None:
        """Tick exactly these columns (columns not in the CSV are added, so a config can name them)."""
        have = {self.targets_list.item(i).text() for i in range(self.targets_list.count())}
        for t in targets:
            if t not in have:
                item = QListWidgetItem(t)
                item.setFlags(item.flags() | Qt.ItemIsUserCheckable)
                self.targets_list.addItem(item)
        for i in range(self.targets_list.count()):
            item = self.targets_list.item(i)
            item.setCheckState(Qt.Checked if item.text() in targets else Qt.Unchecked)

    def _model_options(self) -> dict[str, Any]:
        text = self.model_edit.text().strip()
        if not text:
            return {}
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"model options: not valid YAML ({exc})") from None
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"model options: expected a YAML mapping such as {{dim: 64}}, got {text!r}")
        return value

    def config_dict(self) -> dict[str, Any]:
        """The validated training config the form describes (``ConfigError`` naming the bad field)."""
        import copy

        from wsimil_core.engine.config import validate_config
        from wsimil_core.methods.base import method_class, parse_options

        name = self.method_combo.currentText()
        options = self.option_values()
        parse_options(method_class(name).options_cls, options, name)
        data = copy.deepcopy(self._base)
        data["method"] = {"name": name, "options": options}
        data["model"] = self._model_options()
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
        from wsimil_core.engine.config import load_config
        from wsimil_core.methods.base import method_class, parse_options

        path = Path(path)
        cfg = load_config(path).to_json()
        cfg = _resolve_paths(cfg, path.resolve().parent)
        name = cfg["method"]["name"]
        opts = parse_options(method_class(name).options_cls, cfg["method"].get("options") or {}, name)
        self.set_method(name)
        self.set_option_values(opts.model_dump(mode="json"))
        self.model_edit.setText(
            "" if not cfg.get("model") else yaml.safe_dump(cfg["model"], default_flow_style=True).strip()
        )
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
        self._base = cfg
        self.status.setText(f"loaded {html.escape(str(path))}")
        return cfg

    def write_config(self) -> Path:
        """Validate the form and write it to ``<run dir>/train.yaml`` (atomic). Returns the path."""
        cfg = self.config_dict()
        run_dir = Path(cfg["output"]["dir"])
        text = "# written by the wsimil napari training widget; run: wsimil train THIS.yaml\n"
        text += yaml.safe_dump(cfg, sort_keys=False)
        self.config_path = write_text_atomic(run_dir / "train.yaml", text)
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
        self.error = None
        self.history = read_metrics_jsonl(self.run_dir / "metrics.jsonl")
        self._metrics_stamp = None
        self.log.clear()
        self.log.appendPlainText(f"$ wsimil train {config_path}")
        self.runner = ProcessRunner(wsimil_command("train", str(config_path)), cwd=self.run_dir).start()
        self.state = "running"
        self.progress.setRange(0, self._total_epochs)
        self.progress.setValue(min(len(self.history), self._total_epochs))
        self.status.setText(f"training in {html.escape(str(self.run_dir))} (pid {self.runner.pid})")
        self.train_button.setEnabled(False)
        self.stop_button.setEnabled(True)
        self.load_button.setEnabled(False)
        self.plot.update_records(self.history, self._metric_name)
        self.timer.start()
        return self.runner

    def stop(self) -> None:
        """Ask the trainer to stop (SIGINT): it keeps the last finished epoch; escalates after 30 s."""
        self._stop_runner(
            "stopping: the trainer keeps the checkpoints of the last finished epoch...",
            STOP_GRACE_MS,
            STOP_GRACE_MS + 5000,
        )

    def _on_output_line(self, line: str) -> None:
        if parse_epoch_metrics(line) is not None and self.state == "running":
            self.status.setText(html.escape(line))

    def _after_poll(self) -> None:
        self._read_metrics()

    def _read_metrics(self) -> None:
        if self.run_dir is None:
            return
        path = self.run_dir / "metrics.jsonl"
        try:
            st = path.stat()
        except OSError:
            return
        stamp = (st.st_mtime, st.st_size)
        if stamp == self._metrics_stamp:
            return
        self._metrics_stamp = stamp
        self.history = read_metrics_jsonl(path)
        self.progress.setValue(min(len(self.history), self._total_epochs))
        self.plot.update_records(self.history, self._metric_name)

    def _finished(self) -> None:
        runner = self.runner
        assert runner is not None
        rc = runner.returncode
        best = self.best_checkpoint()
        if rc == 0:
            self.state = "finished"
            self.progress.setValue(self._total_epochs)
            text = f"finished: {best}" if best else "finished (no checkpoint kept)"
            self.status.setText(html.escape(text))
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


__all__ = [
    "TrainingWidget",
    "MetricsPlot",
    "OptionField",
    "option_fields",
    "read_csv_header",
    "target_columns",
    "read_metrics_jsonl",
    "total_epochs",
    "write_text_atomic",
    "find_inference_widget",
]
