"""The training dock's config form (Qt): what ``wsimil train`` will run, as a mixin of ``TrainingWidget``.

The form holds the method (``list_methods()``), the store, the labels CSV and its target column(s), epochs,
learning rate, device and the run directory; the method's options and the model's options are magicgui forms
built from their schemas (the method's pydantic ``options_cls``, the model's config dataclass; see
``_options_form``), validated by the same schemas. "Load config YAML" fills the form; keys the form does not
show (split, early stopping...) are kept from that file. ``config_dict()`` is the validated config the form
describes (``validate_config``).
"""

from __future__ import annotations

import copy
import html
import os
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
    QListWidget,
    QListWidgetItem,
    QScrollArea,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from napari_wsimil._options_form import OptionsForm
from napari_wsimil._run_dock import (
    DEVICE_CHOICES,
    browse_row,
    error_html,
    learning_rate_spin,
    read_csv_header,
    target_columns,
)
from napari_wsimil._training_config import DATA_MODEL_FIELDS, resolve_config_paths
from wsimil_core.api import (
    ConfigError,
    WsimilError,
    list_methods,
    load_config,
    method_class,
    model_config_class,
    parse_options,
    validate_config,
)

NO_SURVIVAL = "(none)"
SURVIVAL_TASK = "survival"


def scrolled(widget: QWidget) -> QScrollArea:
    """``widget`` in a frameless vertical scroll area (long option forms stay usable in a short dock)."""
    area = QScrollArea()
    area.setWidgetResizable(True)
    area.setFrameShape(QScrollArea.Shape.NoFrame)
    area.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
    area.setWidget(widget)
    return area


class TrainingFormMixin:
    """The config form of the training dock; put it first in the widget's bases.

    ``_init_form()`` creates the inputs (``method_combo``, ``store_edit``, ``labels_edit``, ``targets_list``,
    ``epochs_spin``, ``lr_spin``, ``device_combo``, ``output_edit``, ``overwrite_box``; the option pages
    ``options_page`` / ``model_page`` and the ``options_error`` label, which the widget lays out) and returns
    the form layout; the widget then calls ``_method_changed(method_combo.currentText())`` once everything is
    laid out. The widget provides ``status`` (a QLabel) and ``_show_error(text)``.
    """

    def _init_form(self) -> QFormLayout:
        self.options_form: OptionsForm | None = None
        self.model_form: OptionsForm | None = None
        self._base: dict[str, Any] = {}

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
        # survival (docs/survival.md): the time and event columns of a time-to-event task named "survival"
        self.time_combo, self.event_combo = QComboBox(), QComboBox()
        self.time_combo.setToolTip("time-to-event task: the event or censoring time column (none: no survival task)")
        self.event_combo.setToolTip("time-to-event task: the event column (1 = event, 0 = censored)")
        survival_row = QWidget()
        row = QHBoxLayout(survival_row)
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(QLabel("time"))
        row.addWidget(self.time_combo, 1)
        row.addWidget(QLabel("event"))
        row.addWidget(self.event_combo, 1)
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

        form = QFormLayout()
        form.addRow("Method", self.method_combo)
        form.addRow("Store", browse_row(self.store_edit, "Feature store", mode="dir", on_chosen=self.set_store))
        form.addRow("Labels CSV", self.labels_row())
        form.addRow("Target(s)", self.targets_list)
        form.addRow("Survival", survival_row)
        form.addRow("Epochs", self.epochs_spin)
        form.addRow("Learning rate", self.lr_spin)
        form.addRow("Device", self.device_combo)
        form.addRow("Run directory", browse_row(self.output_edit, "Run directory", mode="dir"))
        form.addRow("", self.overwrite_box)
        return form

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
        self._fill_survival_combos(columns)
        if self.survival_columns() is not None:  # time/event are the survival task's, not class targets
            columns = [c for c in columns if c not in self.survival_columns()]
        if not checked:
            checked = ["label"] if "label" in columns else ([] if self.survival_columns() else columns[:1])
        for col in columns + [c for c in checked if c not in columns]:
            item = QListWidgetItem(col)
            item.setFlags(item.flags() | Qt.ItemFlag.ItemIsUserCheckable)
            item.setCheckState(Qt.CheckState.Checked if col in checked else Qt.CheckState.Unchecked)
            self.targets_list.addItem(item)
        return columns

    def _fill_survival_combos(self, columns: list[str], time: str | None = None, event: str | None = None) -> None:
        """List the CSV's columns in the time/event combos; pick ``time``/``event`` (or columns so named)."""
        for combo, want in ((self.time_combo, time or "time"), (self.event_combo, event or "event")):
            combo.clear()
            combo.addItems([NO_SURVIVAL, *columns])
            combo.setCurrentText(want if want in columns else NO_SURVIVAL)

    def survival_columns(self) -> tuple[str, str] | None:
        """``(time column, event column)`` when both are chosen, else None."""
        time, event = self.time_combo.currentText(), self.event_combo.currentText()
        if time and event and NO_SURVIVAL not in (time, event):
            return time, event
        return None

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
        survival = self.survival_columns()
        if survival is not None:
            targets = [t for t in targets if t not in survival] + [SURVIVAL_TASK]
            old = dict(data.get("data", {}).get("survival") or {})
            data.setdefault("data", {})["survival"] = {
                **old,
                "task": SURVIVAL_TASK,
                "time": survival[0],
                "event": survival[1],
            }
        else:
            data.setdefault("data", {}).pop("survival", None)
        if not targets:
            raise ConfigError(f"tick at least one target column of {labels}, or choose time and event columns")
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
        cfg = resolve_config_paths(cfg, path.resolve().parent)
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
        surv = d.get("survival") or {}
        if surv:
            try:
                columns = target_columns(read_csv_header(d["labels"])) if d.get("labels") else []
            except WsimilError:
                columns = []
            self._fill_survival_combos(columns, surv.get("time"), surv.get("event"))
        self.set_targets([t for t in d.get("targets") or [] if t != surv.get("task")])
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

    def _load_yaml_clicked(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Training config", "", "YAML (*.yaml *.yml)")
        if path:
            try:
                self.load_config_yaml(path)
            except WsimilError as exc:
                self._show_error(str(exc))


__all__ = ["TrainingFormMixin", "scrolled"]
