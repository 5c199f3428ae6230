"""What a slide prediction becomes: one predictions-table row and the attrs stored beside its maps."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from wsimil_core.checkpoint_meta import CheckpointMeta


def prediction_columns(task: str, class_names: Sequence[str]) -> list[str]:
    """Column names of one task in the predictions table: ``<task>_pred`` then ``<task>_prob_<class>``."""
    return [f"{task}_pred", *[f"{task}_prob_{c}" for c in class_names]]


def class_probabilities(meta: CheckpointMeta, probs: Mapping[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """``{task: {class name: probability}}`` of one slide."""
    out = {}
    for task, p in probs.items():
        names = meta.class_names(task, len(p))
        out[task] = {n: float(v) for n, v in zip(names, p)}
    return out


def predictions(meta: CheckpointMeta, probs: Mapping[str, np.ndarray]) -> dict[str, str]:
    """``{task: predicted class name}`` (binary tasks use the checkpoint's threshold, others the arg-max)."""
    return {task: meta.predicted_class(task, p) for task, p in probs.items()}


def prediction_row(
    meta: CheckpointMeta,
    slide_id: str,
    n_patches: int,
    probs: Mapping[str, np.ndarray] | None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One row of the predictions table: ``slide_id``, ``n_patches``, ``extra`` columns (e.g. AHDMIL's
    ``n_encoded``), then per task :func:`prediction_columns`. ``probs=None`` (a slide without patches) gives an
    empty prediction and NaN probabilities for the checkpoint's tasks."""
    row: dict[str, Any] = {"slide_id": slide_id, "n_patches": int(n_patches), **(extra or {})}
    if probs is None:
        for task in meta.task_names:
            names = meta.class_names(task)
            row.update(dict(zip(prediction_columns(task, names), ["", *[math.nan] * len(names)])))
        return row
    for task, p in probs.items():
        names = meta.class_names(task, len(p))
        row.update(dict(zip(prediction_columns(task, names), [meta.predicted_class(task, p), *map(float, p)])))
    return row


def maps_attrs(
    meta: CheckpointMeta,
    source: str,
    probs: Mapping[str, np.ndarray],
    encoder_id: str | None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The attrs of a slide's ``maps/<checkpoint_id>`` group: which checkpoint (id, file, method, model), which
    features (``encoder_id``), the class names, probabilities and prediction per task, plus ``extra`` (e.g.
    AHDMIL's ``prescreen``, ``kept_fraction``, ``timings``)."""
    return {
        "checkpoint_id": meta.checkpoint_id,
        "checkpoint": source,
        "method": meta.method,
        "model_name": meta.model_name,
        "encoder_id": encoder_id,
        "class_names": {task: meta.class_names(task, len(p)) for task, p in probs.items()},
        "probs": {task: [float(v) for v in p] for task, p in probs.items()},
        "prediction": predictions(meta, probs),
        **(extra or {}),
    }


def specs_by_name(specs: Sequence[Mapping[str, Any]], names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``{map name: MapSpec dict}`` of the maps ``names`` among ``specs`` (``MapSpec.to_dict()`` forms; maps
    without a declared spec are left out)."""
    wanted = set(names)
    return {str(s["name"]): dict(s) for s in specs if s.get("name") in wanted}


__all__ = [
    "class_probabilities",
    "maps_attrs",
    "prediction_columns",
    "prediction_row",
    "predictions",
    "specs_by_name",
]
