"""Slide-level classification metrics, validation thresholds and bootstrap confidence intervals.

Implemented with numpy only (no per-call sklearn overhead), so 1000 bootstrap resamples take well under a second;
``tests/test_metrics.py`` checks every figure against scikit-learn on hand-made cases.

Conventions:
    y_true: int ``[B]`` class index per slide.
    probs: float ``[B, C]`` class probabilities (rows sum to 1), or ``[B]`` = P(class 1) for a binary task.
    Binary tasks (C = 2) predict class 1 when ``P(class 1) >= threshold`` (0.5 unless given); tasks with
    C > 2 predict the arg-max and report macro one-vs-rest figures (the threshold is unused, reported as NaN).
    ``compute_metrics`` also reports the Brier score (``brier``, scikit-learn's ``brier_score_loss``; lower is
    better; not bootstrapped).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from wsimil_core.errors import DataError

METRIC_NAMES = ("auc", "f1_macro", "accuracy", "balanced_accuracy", "sensitivity", "specificity", "brier")
DEFAULT_THRESHOLD = 0.5


def _as_arrays(y_true, probs) -> tuple[np.ndarray, np.ndarray]:
    """Validate and return ``(y int64 [B], probs float64 [B, C])``."""
    y = np.asarray(y_true)
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim == 1:
        p = np.stack([1.0 - p, p], axis=1)
    if y.ndim != 1 or p.ndim != 2 or len(y) != len(p):
        raise DataError(f"metrics: y_true must be [B] and probs [B, C]; got {y.shape} and {p.shape}")
    if p.shape[1] < 2:
        raise DataError(f"metrics: probs need at least 2 classes, got shape {p.shape}")
    if len(y) and (not np.issubdtype(y.dtype, np.integer) and not np.all(np.mod(y, 1) == 0)):
        raise DataError("metrics: y_true must hold integer class indices")
    y = y.astype(np.int64)
    if len(y) and (y.min() < 0 or y.max() >= p.shape[1]):
        raise DataError(f"metrics: class index out of range [0, {p.shape[1]}) in y_true")
    if not np.all(np.isfinite(p)):
        raise DataError("metrics: probs contain NaN or infinity")
    return y, p


def binary_auc(pos: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC of ``scores`` for the boolean labels ``pos`` (Mann-Whitney U with tied ranks averaged).

    NaN when only one class is present.
    """
    n_pos = int(pos.sum())
    n_neg = len(pos) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores), dtype=np.float64)
    # average ranks (1-based) over runs of tied scores
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(scores)]])
    avg = (starts + ends + 1) / 2.0  # mean of ranks start+1 .. end
    ranks[order] = np.repeat(avg, ends - starts)
    u = ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def _auc(y: np.ndarray, p: np.ndarray) -> float:
    """Binary AUC on P(class 1), or the macro mean of one-vs-rest AUCs for C > 2 (classes present in y)."""
    if p.shape[1] == 2:
        return binary_auc(y == 1, p[:, 1])
    per_class = [binary_auc(y == c, p[:, c]) for c in range(p.shape[1])]
    per_class = [a for a in per_class if not math.isnan(a)]
    return float(np.mean(per_class)) if per_class else float("nan")


def _predict(p: np.ndarray, threshold: float) -> np.ndarray:
    if p.shape[1] == 2:
        return (p[:, 1] >= threshold).astype(np.int64)
    return p.argmax(axis=1)


def _from_confusion(cm: np.ndarray) -> dict[str, float]:
    """Accuracy, macro F1, balanced accuracy, sensitivity, specificity from a ``[C, C]`` confusion matrix
    (rows = truth, columns = prediction), following scikit-learn's class conventions."""
    n = cm.sum()
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1).astype(np.float64)  # true count per class
    predicted = cm.sum(axis=0).astype(np.float64)
    accuracy = tp.sum() / n if n else float("nan")
    # macro F1 over the labels present in y_true or y_pred (scikit-learn's default label set)
    present = (support + predicted) > 0
    f1 = np.divide(2 * tp, support + predicted, out=np.zeros_like(tp), where=(support + predicted) > 0)
    f1_macro = float(f1[present].mean()) if present.any() else float("nan")
    # balanced accuracy = mean recall over the classes present in y_true
    in_truth = support > 0
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=in_truth)
    balanced = float(recall[in_truth].mean()) if in_truth.any() else float("nan")
    neg = n - support  # true negatives + false positives per class (one-vs-rest)
    tn = n - support - predicted + tp
    spec = np.divide(tn, neg, out=np.full_like(tp, np.nan), where=neg > 0)
    sens = np.divide(tp, support, out=np.full_like(tp, np.nan), where=in_truth)
    if cm.shape[0] == 2:
        sensitivity, specificity = float(sens[1]), float(spec[1])
    else:  # macro one-vs-rest
        sensitivity = float(np.nanmean(sens)) if np.isfinite(sens).any() else float("nan")
        specificity = float(np.nanmean(spec)) if np.isfinite(spec).any() else float("nan")
    return {
        "f1_macro": f1_macro,
        "accuracy": float(accuracy),
        "balanced_accuracy": balanced,
        "sensitivity": sensitivity,
        "specificity": specificity,
    }


def _threshold_value(threshold: float | None, n_classes: int) -> float:
    if n_classes != 2:
        return float("nan")
    if threshold is None or (isinstance(threshold, float) and math.isnan(threshold)):
        return DEFAULT_THRESHOLD
    return float(threshold)


def _metrics_arrays(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, float]:
    n_classes = p.shape[1]
    pred = _predict(p, threshold)
    cm = np.bincount(y * n_classes + pred, minlength=n_classes * n_classes).reshape(n_classes, n_classes)
    out = {"auc": _auc(y, p)}
    out.update(_from_confusion(cm))
    out["threshold"] = threshold
    out["brier"] = brier_score(y, p)
    return out


def compute_metrics(y_true, probs, threshold: float | None = None) -> dict[str, float]:
    """Slide-level metrics of one task.

    Args:
        y_true: int ``[B]`` class indices.
        probs: float ``[B, C]`` probabilities (or ``[B]`` = P(class 1) for a binary task).
        threshold: decision threshold on P(class 1) for binary tasks (None -> 0.5); unused when C > 2.

    Returns:
        ``{"auc", "f1_macro", "accuracy", "balanced_accuracy", "sensitivity", "specificity", "threshold",
        "brier"}`` (``brier``: :func:`brier_score`).
        AUC is binary (C = 2) or the macro one-vs-rest mean (C > 2); it is NaN when only one class is present.
        Sensitivity/specificity are those of class 1 for binary tasks and macro one-vs-rest means otherwise.
    """
    y, p = _as_arrays(y_true, probs)
    if len(y) == 0:
        raise DataError("metrics: no slides to evaluate")
    return _metrics_arrays(y, p, _threshold_value(threshold, p.shape[1]))


def brier_score(y_true, probs) -> float:
    """Brier score of the probabilities (lower is better), with ``sklearn.metrics.brier_score_loss``.

    Binary tasks: ``mean_i (P_i(class 1) - y_i)^2`` (scikit-learn's convention, in [0, 1]). C > 2 classes:
    Brier's original multi-class score ``mean_i sum_c (P_i(c) - 1[y_i = c])^2`` (in [0, 2]), the sum over the
    classes of each class's one-vs-rest score.
    """
    from sklearn.metrics import brier_score_loss  # heavy to import; only this figure needs it

    y, p = _as_arrays(y_true, probs)
    if len(y) == 0:
        raise DataError("metrics: no slides to evaluate")
    if p.shape[1] == 2:
        return float(brier_score_loss(y, p[:, 1], pos_label=1))
    return float(sum(brier_score_loss((y == c).astype(np.int64), p[:, c], pos_label=1) for c in range(p.shape[1])))


def choose_threshold(y_true, probs) -> float:
    """Threshold on P(class 1) maximising Youden's J = sensitivity + specificity - 1 (binary tasks).

    Chosen on validation predictions and stored in the checkpoint meta; the candidate thresholds are the
    observed scores (predict positive when ``p >= t``); ties in J keep the highest threshold. Returns 0.5 when
    only one class is present or the task has more than two classes (the threshold is then unused).
    """
    y, p = _as_arrays(y_true, probs)
    if p.shape[1] != 2:
        return DEFAULT_THRESHOLD
    pos = y == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return DEFAULT_THRESHOLD
    scores = p[:, 1]
    order = np.argsort(-scores, kind="mergesort")
    s = scores[order]
    tp = np.cumsum(pos[order])
    fp = np.cumsum(~pos[order])
    last_of_run = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # threshold t = s[i] keeps all scores >= t
    j = tp[last_of_run] / n_pos - fp[last_of_run] / n_neg
    best = int(np.argmax(j))  # first maximum = highest threshold among ties
    return float(s[last_of_run[best]])


def bootstrap_ci(
    y_true,
    probs,
    threshold: float | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap ``(1 - alpha)`` confidence intervals (95% by default) of every metric.

    Slides are resampled with replacement ``n_boot`` times at the fixed ``threshold``; resamples where a metric is
    undefined (e.g. AUC with one class) are left out of that metric's interval. Returns
    ``{metric: (low, high)}`` for the names in ``METRIC_NAMES`` (``(nan, nan)`` when never defined).
    """
    y, p = _as_arrays(y_true, probs)
    if len(y) == 0:
        raise DataError("metrics: no slides to evaluate")
    if n_boot < 1:
        raise DataError(f"metrics: n_boot must be at least 1, got {n_boot}")
    t = _threshold_value(threshold, p.shape[1])
    rng = np.random.default_rng(seed)
    samples = {name: np.empty(n_boot) for name in METRIC_NAMES}
    for b in range(n_boot):
        idx = rng.integers(0, len(y), size=len(y))
        m = _metrics_arrays(y[idx], p[idx], t)
        for name in METRIC_NAMES:
            samples[name][b] = m[name]
    out: dict[str, tuple[float, float]] = {}
    for name, values in samples.items():
        values = values[np.isfinite(values)]
        if len(values) == 0:
            out[name] = (float("nan"), float("nan"))
        else:
            lo, hi = np.percentile(values, [100 * alpha / 2, 100 * (1 - alpha / 2)])
            out[name] = (float(lo), float(hi))
    return out


def summarize_tasks(per_task: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Flatten ``{task: {metric: value}}`` into ``{"task/metric": value}`` plus ``"mean/metric"``.

    The mean is over tasks, ignoring NaN (NaN when the metric is undefined for every task).
    """
    flat: dict[str, float] = {}
    names: list[str] = []
    for task, metrics in per_task.items():
        for name, value in metrics.items():
            flat[f"{task}/{name}"] = float(value)
            if name not in names:
                names.append(name)
    for name in names:
        values = np.array([float(m[name]) for m in per_task.values() if name in m], dtype=np.float64)
        finite = values[np.isfinite(values)]
        flat[f"mean/{name}"] = float(finite.mean()) if len(finite) else float("nan")
    return flat


__all__ = [
    "METRIC_NAMES",
    "DEFAULT_THRESHOLD",
    "binary_auc",
    "compute_metrics",
    "brier_score",
    "choose_threshold",
    "bootstrap_ci",
    "summarize_tasks",
]
