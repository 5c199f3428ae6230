"""Metrics against scikit-learn on hand-made cases; thresholds; bootstrap CIs; task summaries."""

import math

import numpy as np
import pytest
from sklearn import metrics as skm

from wsimil_core.engine.metrics import (
    binary_auc,
    bootstrap_ci,
    choose_threshold,
    compute_metrics,
    summarize_tasks,
)
from wsimil_core.errors import DataError


def _binary_case():
    y = np.array([0, 0, 1, 1, 0, 1, 1, 0, 1, 0])
    p1 = np.array([0.1, 0.4, 0.35, 0.8, 0.4, 0.9, 0.4, 0.65, 0.55, 0.2])  # ties at 0.4 across classes
    return y, np.stack([1 - p1, p1], axis=1)


def test_binary_matches_sklearn():
    y, probs = _binary_case()
    m = compute_metrics(y, probs, threshold=0.5)
    pred = (probs[:, 1] >= 0.5).astype(int)
    tn, fp, fn, tp = skm.confusion_matrix(y, pred).ravel()
    assert m["auc"] == pytest.approx(skm.roc_auc_score(y, probs[:, 1]))
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["f1_macro"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["sensitivity"] == pytest.approx(tp / (tp + fn))
    assert m["specificity"] == pytest.approx(tn / (tn + fp))
    assert m["threshold"] == 0.5


def test_threshold_changes_predictions_and_1d_probs():
    y, probs = _binary_case()
    m = compute_metrics(y, probs[:, 1], threshold=0.3)  # [B] = P(class 1)
    pred = (probs[:, 1] >= 0.3).astype(int)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["threshold"] == 0.3
    assert compute_metrics(y, probs)["threshold"] == 0.5  # default


def test_multiclass_matches_sklearn():
    rng = np.random.default_rng(3)
    y = np.array([0, 1, 2, 2, 1, 0, 2, 1, 0, 2, 1, 1])
    logits = rng.normal(size=(len(y), 3)) + np.eye(3)[y] * 1.5
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    m = compute_metrics(y, probs)
    pred = probs.argmax(1)
    assert m["auc"] == pytest.approx(skm.roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    assert m["f1_macro"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["sensitivity"] == pytest.approx(skm.recall_score(y, pred, average="macro"))
    assert math.isnan(m["threshold"])


def test_single_class_gives_nan_auc_without_crash():
    y = np.array([1, 1, 1])
    probs = np.array([[0.2, 0.8], [0.6, 0.4], [0.1, 0.9]])
    m = compute_metrics(y, probs)
    assert math.isnan(m["auc"])
    assert m["accuracy"] == pytest.approx(2 / 3)
    assert math.isnan(m["specificity"])  # no negatives
    assert choose_threshold(y, probs) == 0.5
    ci = bootstrap_ci(y, probs, n_boot=50)
    assert all(math.isnan(v) for v in ci["auc"])


def test_binary_auc_ties_equal_half():
    assert binary_auc(np.array([True, False]), np.array([0.5, 0.5])) == 0.5


def test_bad_input_is_a_clear_error():
    with pytest.raises(DataError, match="out of range"):
        compute_metrics([0, 3], [[0.5, 0.5], [0.5, 0.5]])
    with pytest.raises(DataError, match=r"\[B\]"):
        compute_metrics([0, 1, 1], [[0.5, 0.5], [0.5, 0.5]])
    with pytest.raises(DataError, match="NaN"):
        compute_metrics([0, 1], [[0.5, 0.5], [np.nan, 0.5]])


def test_choose_threshold_is_youden_optimum():
    y, probs = _binary_case()
    t = choose_threshold(y, probs)
    fpr, tpr, thr = skm.roc_curve(y, probs[:, 1])
    best_j = np.max(tpr - fpr)
    pred = probs[:, 1] >= t
    j = pred[y == 1].mean() - pred[y == 0].mean()
    assert j == pytest.approx(best_j)
    assert t in set(probs[:, 1])


def test_bootstrap_ci_brackets_point_estimate():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, size=80)
    p1 = np.clip(0.5 + 0.3 * (y - 0.5) + rng.normal(scale=0.2, size=80), 0, 1)
    probs = np.stack([1 - p1, p1], 1)
    point = compute_metrics(y, probs)
    ci = bootstrap_ci(y, probs, n_boot=300, seed=1)
    for name in ("auc", "accuracy", "f1_macro", "balanced_accuracy", "sensitivity", "specificity"):
        lo, hi = ci[name]
        assert lo <= point[name] <= hi, name
        assert hi - lo > 0
    assert bootstrap_ci(y, probs, n_boot=100, seed=1) == bootstrap_ci(y, probs, n_boot=100, seed=1)


def test_summarize_tasks():
    flat = summarize_tasks({"a": {"auc": 0.8, "accuracy": 0.5}, "b": {"auc": float("nan"), "accuracy": 0.7}})
    assert flat["a/auc"] == 0.8 and math.isnan(flat["b/auc"])
    assert flat["mean/auc"] == pytest.approx(0.8)  # NaN tasks ignored
    assert flat["mean/accuracy"] == pytest.approx(0.6)


def test_brier_score_against_hand_computation():
    from wsimil_core.engine.metrics import brier_score

    y = np.array([0, 1, 1, 0])
    p1 = np.array([0.1, 0.8, 0.4, 0.5])
    want = ((0.1 - 0) ** 2 + (0.8 - 1) ** 2 + (0.4 - 1) ** 2 + (0.5 - 0) ** 2) / 4
    assert brier_score(y, p1) == pytest.approx(want)
    assert compute_metrics(y, np.stack([1 - p1, p1], 1))["brier"] == pytest.approx(want)
    y3 = np.array([0, 2])
    p3 = np.array([[0.7, 0.2, 0.1], [0.2, 0.2, 0.6]])
    want3 = ((0.3**2 + 0.2**2 + 0.1**2) + (0.2**2 + 0.2**2 + 0.4**2)) / 2  # Brier 1950: sum over classes
    assert brier_score(y3, p3) == pytest.approx(want3)
    assert brier_score([1, 1], [1.0, 1.0]) == 0.0
