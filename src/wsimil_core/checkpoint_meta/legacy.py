"""Migration of ``checkpoint/1`` metadata (and the flat dict the trainer passes to ``save_checkpoint``) to the
``checkpoint/2`` fields of :class:`wsimil_core.checkpoint_meta.CheckpointMeta` (the key mapping is in that
module's docstring)."""

from __future__ import annotations

from typing import Any

from wsimil_core.checkpoint_meta.parts import (
    DEFAULT_TARGET,
    THRESHOLD_DEFAULT,
    THRESHOLD_FIXED,
    THRESHOLD_YOUDEN_VAL,
    EncoderMeta,
    GridMeta,
    default_class_names,
    finite_number,
)
from wsimil_core.errors import CheckpointError


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
    if finite_number(train.get("threshold")) is not None:
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
        value = finite_number(v)
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
        classes = [str(n) for n in listed] if isinstance(listed, list) else default_class_names(cfg, task, None)
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
    for key in (
        "method",
        "model_name",
        "model_config",
        "map_specs",
        "train_config",
        "metrics",
        "version",
        "feature_stats",
    ):
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


__all__ = ["migrate_v1"]
