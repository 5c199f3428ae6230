"""What a slide prediction becomes: one predictions-table row and the attrs stored beside its maps.

A survival task (``meta.extras["survival"]``) has, instead of class probabilities, its output vector (the curve
``S_k`` at the end of each time bin, or ``[risk]`` for Cox; ``engine.survival``), and its row columns are
``<task>_pred`` (``high``/``low`` risk: risk >= the checkpoint's median validation risk), ``<task>_risk`` and, for
the discrete-time loss, ``<task>_S_<bin end>`` per bin.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from wsimil_core.checkpoint_meta import CheckpointMeta
from wsimil_core.data.survival import bin_names
from wsimil_core.engine.survival import risk_scores, survival_output


def survival_tasks(meta: CheckpointMeta) -> dict[str, dict[str, Any]]:
    """``{task: {"loss", "time", "event", "cuts", ...}}`` of the checkpoint's survival tasks (empty: none)."""
    info = meta.extras.get("survival") if isinstance(meta.extras, dict) else None
    return {str(k): dict(v) for k, v in (info or {}).items()}


def task_outputs(
    meta: CheckpointMeta, probs: Mapping[str, np.ndarray], logits: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """``probs`` with each survival task's softmax replaced by its output vector (from the raw ``logits``)."""
    surv = survival_tasks(meta)
    out = dict(probs)
    for task, info in surv.items():
        if task in logits:
            out[task] = survival_output(torch.as_tensor(np.asarray(logits[task])), str(info["loss"]))
    return out


def survival_columns(task: str, info: Mapping[str, Any]) -> list[str]:
    """Row columns of a survival task: ``<task>_pred``, ``<task>_risk`` [, ``<task>_S_<bin end>`` ...]."""
    if info.get("loss") == "cox":
        return [f"{task}_pred", f"{task}_risk"]
    return [f"{task}_pred", f"{task}_risk", *[f"{task}_S_{e}" for e in bin_names(info.get("cuts", []))]]


def survival_risk(info: Mapping[str, Any], output: np.ndarray) -> float:
    """Risk of one slide's survival output vector."""
    return float(risk_scores(np.asarray(output, dtype=np.float64).reshape(1, -1), str(info.get("loss")))[0])


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
    surv = survival_tasks(meta)
    return {
        task: ("high" if survival_risk(surv[task], p) >= meta.threshold(task) else "low")
        if task in surv
        else meta.predicted_class(task, p)
        for task, p in probs.items()
    }


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
    surv = survival_tasks(meta)
    if probs is None:
        for task in meta.task_names:
            names = meta.class_names(task)
            cols = survival_columns(task, surv[task]) if task in surv else prediction_columns(task, names)
            row.update(dict(zip(cols, ["", *[math.nan] * (len(cols) - 1)])))
        return row
    labels = predictions(meta, probs)
    for task, p in probs.items():
        if task in surv:
            values = [labels[task], survival_risk(surv[task], p)]
            values += [] if surv[task].get("loss") == "cox" else [float(v) for v in p]
            row.update(dict(zip(survival_columns(task, surv[task]), values)))
            continue
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
    AHDMIL's ``prescreen``, ``kept_fraction``, ``timings``); survival tasks add ``risk`` ``{task: value}``."""
    surv = survival_tasks(meta)
    return {
        "checkpoint_id": meta.checkpoint_id,
        "checkpoint": source,
        "method": meta.method,
        "model_name": meta.model_name,
        "encoder_id": encoder_id,
        "class_names": {task: meta.class_names(task, len(p)) for task, p in probs.items()},
        "probs": {task: [float(v) for v in p] for task, p in probs.items()},
        "prediction": predictions(meta, probs),
        **({"risk": {t: survival_risk(i, probs[t]) for t, i in surv.items() if t in probs}} if surv else {}),
        **(extra or {}),
    }


def specs_by_name(specs: Sequence[Mapping[str, Any]], names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``{map name: MapSpec dict}`` of the maps ``names`` among ``specs`` (``MapSpec.to_dict()`` forms; maps
    without a declared spec are left out)."""
    wanted = set(names)
    return {str(s["name"]): dict(s) for s in specs if s.get("name") in wanted}


__all__ = [
    "survival_columns",
    "survival_risk",
    "survival_tasks",
    "task_outputs",
    "class_probabilities",
    "maps_attrs",
    "prediction_columns",
    "prediction_row",
    "predictions",
    "specs_by_name",
]
