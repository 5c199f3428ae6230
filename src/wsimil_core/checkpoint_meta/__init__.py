"""Typed, versioned checkpoint metadata (DESIGN.md "Checkpoints"): :class:`CheckpointMeta` and its one reader.

A checkpoint's safetensors header holds ``"wsimil_format": "checkpoint/<n>"`` and one JSON string per field of
:class:`CheckpointMeta`. :meth:`CheckpointMeta.parse` is the only reader: it migrates older layouts first
(``checkpoint/1``, the flat dict today's trainer still passes to ``save_checkpoint``), then validates.

This module is a base layer (pydantic and ``errors`` only, no torch) so that methods, the engine, inference and
the plugin all use the same type; ``engine.checkpoint`` reads and writes the files. The parts (thresholds, tasks,
encoder, grid, store) are in ``parts``, the ``checkpoint/1`` migration in ``legacy``.

Validation refuses corrupt metadata with one ``CheckpointError`` naming the file and the key: a threshold that is
not a finite number (also in ``checkpoint/1`` files: never replaced by 0.5), and class names whose count differs
from the model's classes for a task. :meth:`CheckpointMeta.make_id` hashes the weights and the metadata that
changes predictions, so an edited checkpoint never shares its maps group with the original.

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
from typing import Any

from pydantic import ConfigDict, Field, ValidationError

from wsimil_core.checkpoint_meta.legacy import migrate_v1
from wsimil_core.checkpoint_meta.parts import (
    CHECKPOINT_FORMAT,
    DEFAULT_TARGET,
    DEFAULT_THRESHOLD,
    FORMAT_PREFIX,
    LEGACY_FORMATS,
    THRESHOLD_DEFAULT,
    THRESHOLD_EXTENSION,
    THRESHOLD_FEW_SLIDES,
    THRESHOLD_FIXED,
    THRESHOLD_YOUDEN_VAL,
    EncoderMeta,
    FeatureStatsMeta,
    GridMeta,
    StoreRef,
    TaskMeta,
    ThresholdMeta,
    _Meta,
    default_class_names,
    safe_method_name,
)
from wsimil_core.errors import CheckpointError


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
        feature_stats: per-feature standardisation of the model's input (None: raw features).
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
    feature_stats: FeatureStatsMeta | None = None
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
        whose count differs from the model's classes for that task (``model_config["tasks"][task]``, or
        ``n_classes`` of a single-task model).

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
            else:  # a single-task model: ``n_classes`` (ambiguous when several tasks share one config: not checked)
                n = self.model_kwargs.get("n_classes") if len(self.tasks) == 1 else None
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
        ``tasks`` (class names and threshold values), ``encoder`` (without the informational ``weights_path``),
        ``grid`` and ``feature_stats`` (only when set, so ids of checkpoints without it are unchanged). Metrics, paths, the train config, versions, map specs and extras are left out."""
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
            **({"feature_stats": f["feature_stats"]} if f["feature_stats"] is not None else {}),
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
        tasks = {t: TaskMeta(class_names=default_class_names(self.model_kwargs, t, None)) for t in names}
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
        return default_class_names(self.model_kwargs, task, n_classes)

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


__all__ = [
    "FORMAT_PREFIX",
    "CHECKPOINT_FORMAT",
    "LEGACY_FORMATS",
    "DEFAULT_TARGET",
    "DEFAULT_THRESHOLD",
    "THRESHOLD_DEFAULT",
    "THRESHOLD_YOUDEN_VAL",
    "THRESHOLD_FIXED",
    "THRESHOLD_EXTENSION",
    "THRESHOLD_FEW_SLIDES",
    "CheckpointMeta",
    "EncoderMeta",
    "FeatureStatsMeta",
    "GridMeta",
    "StoreRef",
    "TaskMeta",
    "ThresholdMeta",
    "migrate_v1",
    "safe_method_name",
]
