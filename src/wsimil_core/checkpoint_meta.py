"""Typed, versioned checkpoint metadata (DESIGN.md "Checkpoints"): :class:`CheckpointMeta` and its one reader.

A checkpoint's safetensors header holds ``"wsimil_format": "checkpoint/<n>"`` and one JSON string per field of
:class:`CheckpointMeta`. :meth:`CheckpointMeta.parse` is the only reader: it migrates older layouts first
(``checkpoint/1``, the flat dict today's trainer still passes to ``save_checkpoint``), then validates.

This module is a base layer (pydantic and ``errors`` only, no torch) so that methods, the engine, inference and
the plugin all use the same type; ``engine.checkpoint`` reads and writes the files.

``checkpoint/1`` keys and how they migrate:

- ``targets`` (list or one name), ``class_names`` (``{task: [names]}`` or one list), ``threshold`` (a float or
  ``{task: float}``), ``thresholds`` (``{task: float}``) -> ``tasks {task: TaskMeta}``; task names come from
  ``targets``, else ``class_names``' keys, else ``model_config["tasks"]``' keys, else ``["label"]``;
- ``encoder`` (the store's encoder attrs + ``patch_mpp``/``mpp``, ``patch_size``/``patch``,
  ``patch_size_level0``, ``stride_level0``) -> ``encoder`` (:class:`EncoderMeta`) and ``grid``
  (:class:`GridMeta`);
- ``train_config["data"]["store"]`` + the encoder id -> ``store`` (:class:`StoreRef`);
- any other key (e.g. MECDS' ``extension``) -> ``extras``.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from wsimil_core.errors import CheckpointError

FORMAT_PREFIX = "checkpoint/"
CHECKPOINT_FORMAT = "checkpoint/2"
LEGACY_FORMATS = ("checkpoint/1",)
DEFAULT_TARGET = "label"
DEFAULT_THRESHOLD = 0.5

# how a threshold was chosen (ThresholdMeta.method)
THRESHOLD_DEFAULT = "default 0.5"
THRESHOLD_YOUDEN_VAL = "youden on validation"
THRESHOLD_FIXED = "fixed by train.threshold"
THRESHOLD_EXTENSION = "youden on validation (task extension)"


class _Meta(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ThresholdMeta(_Meta):
    """Decision threshold on P(class 1) of a binary task, and how it was chosen.

    Attributes:
        value: the threshold (unused by tasks with more than two classes: they predict the arg-max).
        method: how it was chosen: ``"youden on validation"``, ``"fixed by train.threshold"``, ``"default 0.5"``...
        n_slides: number of validation slides it was chosen on (None when not known).
    """

    value: float = DEFAULT_THRESHOLD
    method: str = THRESHOLD_DEFAULT
    n_slides: int | None = None

    @field_validator("value", mode="before")
    @classmethod
    def _finite_number(cls, v: Any) -> float:
        """A finite number (a string such as ``"abc"`` or ``"0.3"``, a bool or NaN is corrupt metadata)."""
        if _number(v) is None:
            raise ValueError(f"must be a finite number, got {v!r}")
        return float(v)


class TaskMeta(_Meta):
    """One classification task of the model: its class names (index order of the logits) and threshold."""

    class_names: list[str]
    threshold: ThresholdMeta = Field(default_factory=ThresholdMeta)


class EncoderMeta(BaseModel):
    """The patch encoder the features were extracted with (``features.encoders.EncoderSpec`` attrs).

    Unknown keys (e.g. the store's ``dtype``) are kept. ``weights_path`` is informational: the encoder is rebuilt
    from ``name`` and checked against ``weights_sha256``.
    """

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    name: str | None = None
    encoder_id: str | None = None
    dim: int | None = None
    input_size: int | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    weights_sha256: str | None = None
    weights_path: str | None = None
    mpp: float | None = None
    patch: int | None = None

    def attrs(self) -> dict[str, Any]:
        """The plain dict (``EncoderSpec.from_attrs`` accepts it)."""
        return self.model_dump(mode="json", exclude_none=True)


class GridMeta(_Meta):
    """The patch grid the model was trained on.

    Attributes:
        patch_mpp: µm per pixel of the patches; patch_px: patch side in px at that mpp; stride_px: grid step in
            px at that mpp (None = ``patch_px``).
        patch_size_level0, stride_level0: the same in level-0 px of the training slides (informational: it
            depends on each slide's mpp).
        min_tissue: tissue fraction a cell needed; tissue: ``TissueParams`` as a dict (None = defaults).
    """

    patch_mpp: float
    patch_px: int
    stride_px: int | None = None
    patch_size_level0: int | None = None
    stride_level0: int | None = None
    min_tissue: float | None = None
    tissue: dict[str, Any] | None = None

    @property
    def stride(self) -> int:
        """Grid step in px at ``patch_mpp``."""
        return int(self.stride_px if self.stride_px is not None else self.patch_px)

    @classmethod
    def from_slide_attrs(cls, attrs: dict[str, Any]) -> GridMeta | None:
        """The grid of a feature-store slide group's attrs (``patch_mpp``, ``patch_size``, ``patch_size_level0``,
        ``stride_level0``, ``min_tissue``, ``tissue``); None when the patch mpp or size is missing."""
        mpp, px = _number(attrs.get("patch_mpp")), _number(attrs.get("patch_size"))
        if mpp is None or px is None:
            return None
        fields: dict[str, Any] = {"patch_mpp": mpp, "patch_px": int(px), "min_tissue": _number(attrs.get("min_tissue"))}
        s0, p0 = _number(attrs.get("stride_level0")), _number(attrs.get("patch_size_level0"))
        if s0 and p0:
            fields.update(stride_px=int(round(s0 / p0 * int(px))), patch_size_level0=int(p0), stride_level0=int(s0))
        tissue = attrs.get("tissue")
        if isinstance(tissue, dict):
            fields["tissue"] = dict(tissue)
        return cls(**fields)


class StoreRef(_Meta):
    """The feature store a checkpoint was trained on (its directory and the features' encoder id)."""

    path: str | None = None
    encoder_id: str | None = None


class CheckpointMeta(_Meta):
    """Everything a checkpoint says besides its weights (DESIGN.md "Checkpoints").

    Attributes:
        format: ``checkpoint/2`` (the header's ``wsimil_format``).
        method, model_name: the training method and the registered model; ``model_kwargs`` (``model_config``
            in the file): the model's constructor config, so ``create_model(model_name, **model_kwargs)``
            rebuilds it.
        tasks: ``{task: TaskMeta}`` in the model's output order (single-task models: one entry).
        encoder, grid: how patch features were made (None when unknown, e.g. a model saved by hand).
        map_specs: ``MapSpec.to_dict()`` of every map the model can emit.
        train_config, metrics: the run's validated config and the best epoch's validation metrics.
        store: the feature store it was trained on.
        version: wsimil version that wrote it; checkpoint_id: ``<method>-<10 hex>`` of the weights and the
            metadata that changes predictions (``make_id``; filled on save and load).
        extras: method-specific provenance (e.g. MECDS' ``extension``).
    """

    format: str = CHECKPOINT_FORMAT
    method: str
    model_name: str
    model_kwargs: dict[str, Any] = Field(alias="model_config")
    tasks: dict[str, TaskMeta] = Field(default_factory=dict)
    encoder: EncoderMeta | None = None
    grid: GridMeta | None = None
    map_specs: list[dict[str, Any]] = Field(default_factory=list)
    train_config: dict[str, Any] | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)
    store: StoreRef | None = None
    version: str = ""
    checkpoint_id: str | None = None
    extras: dict[str, Any] = Field(default_factory=dict)

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), populate_by_name=True)

    # --- reading -----------------------------------------------------------------------------------------
    @classmethod
    def parse(cls, raw: dict[str, Any], fmt: str | None = None, where: str = "checkpoint") -> CheckpointMeta:
        """The one reader: migrate ``raw`` (decoded header fields) from ``fmt`` and validate it.

        ``fmt=None`` (a dict given to ``save_checkpoint``, e.g. the trainer's) accepts both layouts in one dict:
        legacy keys are migrated, keys of the current layout are kept.

        Raises:
            CheckpointError: an unknown format, or fields of the wrong type / missing (naming ``where``).
        """
        raw = dict(raw)
        raw.pop("format", None)
        if fmt is None or fmt in LEGACY_FORMATS:
            raw = migrate_v1(raw, where)
        elif fmt != CHECKPOINT_FORMAT:
            raise CheckpointError(
                f"{where}: checkpoint format {fmt!r} is newer than this wsimil reads ({CHECKPOINT_FORMAT}); "
                "upgrade wsimil"
            )
        try:
            meta = cls.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            key = ".".join(str(p) for p in first["loc"])
            raise CheckpointError(f"{where}: metadata field {key!r}: {first['msg']}") from None
        meta = meta.with_tasks_filled()
        meta.check_tasks(where)
        return meta

    def check_tasks(self, where: str = "checkpoint") -> None:
        """Refuse tasks that contradict the model config: a task a multi-task model does not have, or class names
        whose count differs from the model's classes for that task (``model_config`` ``tasks`` / ``n_classes``).

        Raises:
            CheckpointError: naming ``where``, the task and both counts.
        """
        cfg_tasks = self.model_kwargs.get("tasks")
        for task, info in self.tasks.items():
            if isinstance(cfg_tasks, dict) and cfg_tasks:
                if task not in cfg_tasks:
                    raise CheckpointError(
                        f"{where}: metadata field 'tasks': task {task!r} is not one of the model's tasks "
                        f"{sorted(cfg_tasks)}"
                    )
                n = cfg_tasks[task]
            else:
                n = self.model_kwargs.get("n_classes")
            if isinstance(n, int) and not isinstance(n, bool) and len(info.class_names) != n:
                raise CheckpointError(
                    f"{where}: metadata field 'tasks.{task}.class_names': {len(info.class_names)} class names "
                    f"{info.class_names} for a model with {n} classes in task {task!r}"
                )

    def fields(self) -> dict[str, Any]:
        """JSON-serialisable field dict (``model_config`` under its file name), as written to the header."""
        out = self.model_dump(mode="json", by_alias=True)
        out.pop("format")
        return out

    # --- identity ----------------------------------------------------------------------------------------
    def prediction_fields(self) -> dict[str, Any]:
        """The metadata that changes predictions or maps, as JSON: ``method``, ``model_name``, ``model_config``,
        ``tasks`` (class names and threshold values), ``encoder`` (without the informational ``weights_path``) and
        ``grid``. Metrics, paths, the train config, versions, map specs and extras are left out."""
        f = self.fields()
        enc = f["encoder"]
        return {
            "method": f["method"],
            "model_name": f["model_name"],
            "model_config": f["model_config"],
            "tasks": {
                t: {"class_names": i["class_names"], "threshold": i["threshold"]["value"]}
                for t, i in f["tasks"].items()
            },
            "encoder": None if enc is None else {k: v for k, v in enc.items() if k != "weights_path"},
            "grid": f["grid"],
        }

    def make_id(self, weights_sha256: str) -> str:
        """Checkpoint id ``<method>-<10 hex>`` of weights (their sha256, ``engine.checkpoint``) + this metadata.

        The hash covers ``weights_sha256`` and ``prediction_fields()`` (canonical JSON), so an edited threshold,
        class name or model config gives another id (and its own ``maps/<id>/`` group), while metrics or paths do
        not change it.
        """
        blob = json.dumps(self.prediction_fields(), sort_keys=True, separators=(",", ":"), allow_nan=True)
        digest = hashlib.sha256(f"{weights_sha256}|{blob}".encode()).hexdigest()[:10]
        return f"{safe_method_name(self.method)}-{digest}"

    # --- tasks -------------------------------------------------------------------------------------------
    def with_tasks_filled(self) -> CheckpointMeta:
        """A copy whose ``tasks`` is not empty: task names from ``model_kwargs["tasks"]`` (multi-task models),
        else ``["label"]``, with class names ``"0".."C-1"`` and the default threshold."""
        if self.tasks:
            return self
        cfg_tasks = self.model_kwargs.get("tasks")
        names = [str(t) for t in cfg_tasks] if isinstance(cfg_tasks, dict) and cfg_tasks else [DEFAULT_TARGET]
        tasks = {t: TaskMeta(class_names=_default_names(self.model_kwargs, t, None)) for t in names}
        return self.model_copy(update={"tasks": tasks})

    @property
    def task_names(self) -> list[str]:
        """Task names in the model's output order."""
        return list(self.tasks) or [DEFAULT_TARGET]

    def class_names(self, task: str, n_classes: int | None = None) -> list[str]:
        """Class names of ``task``; ``"0".."C-1"`` when unknown or when ``n_classes`` (from an output) differs."""
        info = self.tasks.get(task)
        if info is not None and (n_classes is None or len(info.class_names) == n_classes):
            return list(info.class_names)
        return _default_names(self.model_kwargs, task, n_classes)

    def threshold(self, task: str) -> float:
        """Decision threshold on P(class 1) of binary ``task`` (0.5 when none was recorded)."""
        info = self.tasks.get(task)
        return float(info.threshold.value) if info is not None else DEFAULT_THRESHOLD

    def predicted_class(self, task: str, probs: Any) -> str:
        """Class name predicted from ``probs [C]``: binary tasks use the threshold on P(class 1), others arg-max."""
        p = [float(v) for v in probs]
        names = self.class_names(task, len(p))
        if len(p) == 2:
            return names[int(p[1] >= self.threshold(task))]
        return names[max(range(len(p)), key=p.__getitem__)]

    @property
    def encoder_id(self) -> str | None:
        """Store key of the features the model was trained on (None when not recorded)."""
        return self.encoder.encoder_id if self.encoder is not None else None

    @property
    def in_dim(self) -> int | None:
        """Feature dimension the model expects (``model_config["in_dim"]``)."""
        v = self.model_kwargs.get("in_dim")
        return None if v is None else int(v)


def safe_method_name(method: str) -> str:
    """``method`` with every character but letters, digits, ``-`` and ``_`` replaced by ``_`` (id prefix)."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in (method or "model"))


def _default_names(model_kwargs: dict[str, Any], task: str, n_classes: int | None) -> list[str]:
    if n_classes is None:
        tasks = model_kwargs.get("tasks")
        if isinstance(tasks, dict) and task in tasks:
            n_classes = int(tasks[task])
        else:
            n_classes = int(model_kwargs.get("n_classes", 2))
    return [str(i) for i in range(n_classes)]


# --- migration from checkpoint/1 -----------------------------------------------------------------------------


def _number(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _legacy_task_names(raw: dict[str, Any]) -> list[str]:
    targets = raw.get("targets")
    if isinstance(targets, str):
        return [targets]
    if targets:
        return [str(t) for t in targets]
    names = raw.get("class_names")
    if isinstance(names, dict) and names:
        return [str(t) for t in names]
    cfg_tasks = (raw.get("model_config") or {}).get("tasks")
    if isinstance(cfg_tasks, dict) and cfg_tasks:
        return [str(t) for t in cfg_tasks]
    return [DEFAULT_TARGET]


def _legacy_threshold_method(raw: dict[str, Any]) -> str:
    """How today's trainer chose a recorded threshold: a number in ``train.threshold`` fixes it; otherwise Youden's
    J on validation when validation metrics were recorded (without a validation split it writes 0.5)."""
    train = ((raw.get("train_config") or {}).get("train")) or {}
    if _number(train.get("threshold")) is not None:
        return THRESHOLD_FIXED
    metrics = raw.get("metrics") or {}
    if any(k != "epoch" for k in metrics):
        return THRESHOLD_YOUDEN_VAL
    return THRESHOLD_DEFAULT


def _legacy_threshold(raw: dict[str, Any], task: str, where: str) -> float | None:
    """The recorded threshold of ``task`` (``threshold`` or ``thresholds``); None when none is recorded.

    Raises:
        CheckpointError: a recorded value that is not a finite number (e.g. ``"abc"``), naming the key.
    """
    for key in ("threshold", "thresholds"):
        v = raw.get(key)
        v = v.get(task) if isinstance(v, dict) else v
        if v is None:
            continue
        value = _number(v)
        if value is None:
            raise CheckpointError(f"{where}: metadata key {key!r} (task {task!r}): {v!r} is not a finite number")
        return value
    return None


def _legacy_tasks(raw: dict[str, Any], where: str) -> dict[str, Any]:
    names = raw.get("class_names")
    cfg = raw.get("model_config") or {}
    how = _legacy_threshold_method(raw)
    tasks = {}
    for task in _legacy_task_names(raw):
        listed = names.get(task) if isinstance(names, dict) else names
        classes = [str(n) for n in listed] if isinstance(listed, list) else _default_names(cfg, task, None)
        value = _legacy_threshold(raw, task, where)
        thr = {"value": value, "method": how} if value is not None else {}
        tasks[task] = {"class_names": classes, "threshold": thr}
    return tasks


def _legacy_grid(enc: dict[str, Any]) -> dict[str, Any] | None:
    attrs = {
        "patch_mpp": enc.get("patch_mpp", enc.get("mpp")),
        "patch_size": enc.get("patch_size", enc.get("patch")),
        "patch_size_level0": enc.get("patch_size_level0"),
        "stride_level0": enc.get("stride_level0"),
    }
    grid = GridMeta.from_slide_attrs(attrs)
    return None if grid is None else grid.model_dump(exclude_none=True)


def migrate_v1(raw: dict[str, Any], where: str = "checkpoint") -> dict[str, Any]:
    """``checkpoint/1`` fields (or today's trainer dict) -> ``checkpoint/2`` fields (see the module docstring).

    Keys of the new layout already present (``tasks``, ``grid``, ``store``...) win over what is derived.

    Raises:
        CheckpointError: a recorded threshold that is not a number (naming ``where`` and the key).
    """
    raw = dict(raw)
    out: dict[str, Any] = {}
    if "model_kwargs" in raw and "model_config" not in raw:
        raw["model_config"] = raw.pop("model_kwargs")
    for key in ("method", "model_name", "model_config", "map_specs", "train_config", "metrics", "version"):
        if key in raw:
            out[key] = raw.pop(key)
    if raw.get("checkpoint_id") is not None:
        out["checkpoint_id"] = raw.pop("checkpoint_id")
    raw.pop("checkpoint_id", None)
    legacy: dict[str, Any] = {k: raw.pop(k) for k in ("targets", "class_names", "threshold", "thresholds") if k in raw}
    out["tasks"] = raw.pop("tasks", None) or _legacy_tasks({**legacy, **out}, where)
    enc = raw.pop("encoder", None)
    enc = dict(enc) if isinstance(enc, dict) else (enc.attrs() if isinstance(enc, EncoderMeta) else None)
    grid = raw.pop("grid", None)
    if enc is not None:
        derived = _legacy_grid(enc)
        for key in ("patch_mpp", "patch_size", "patch_size_level0", "stride_level0"):
            enc.pop(key, None)
        out["encoder"] = enc
        grid = grid if grid is not None else derived
    out["grid"] = grid
    store = raw.pop("store", None)
    if store is None:
        data = ((out.get("train_config") or {}).get("data")) or {}
        if data.get("store"):
            store = {"path": str(data["store"]), "encoder_id": (enc or {}).get("encoder_id") or data.get("encoder")}
    out["store"] = store
    extras = dict(raw.pop("extras", None) or {})
    extras.update(raw)  # every other legacy key (e.g. MECDS' "extension")
    out["extras"] = extras
    return out


__all__ = [
    "CHECKPOINT_FORMAT",
    "LEGACY_FORMATS",
    "DEFAULT_TARGET",
    "DEFAULT_THRESHOLD",
    "THRESHOLD_DEFAULT",
    "THRESHOLD_YOUDEN_VAL",
    "THRESHOLD_FIXED",
    "THRESHOLD_EXTENSION",
    "CheckpointMeta",
    "EncoderMeta",
    "GridMeta",
    "StoreRef",
    "TaskMeta",
    "ThresholdMeta",
    "migrate_v1",
    "safe_method_name",
]
