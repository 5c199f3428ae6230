"""Survival outputs, metrics (scikit-survival) with bootstrap 95% CIs, and the Kaplan-Meier plot.

A survival task's output vector per slide (where a classification task has its class probabilities):
``nll``: the survival curve ``S_k`` ``[K]`` (P(alive at the end of time bin k)); ``cox``: ``[risk]``. The risk
score is ``-sum_k S_k`` (``nll``) or the log relative risk (``cox``); higher = earlier events.

Metrics (``SURVIVAL_METRIC_NAMES``), from scikit-survival (``docs/survival.md`` says why this library):
``c_index`` Harrell's concordance; ``c_index_uno`` Uno's IPCW concordance; ``auc_td`` the mean cumulative/dynamic
time-dependent AUC at the 25/50/75 % quantiles of the event times; ``ibs`` the integrated Brier score of the
survival curve (``nll`` only; NaN for ``cox``, whose checkpoints hold no baseline hazard). The censoring
distribution of Uno's C, the AUC and the IBS is the Kaplan-Meier estimate of the evaluated slides themselves.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsimil_core._io import atomic_path
from wsimil_core.errors import DataError
from wsimil_core.functional.survival import cox_risk, curve_risk, incidence_curve, survival_curve

SURVIVAL_METRIC_NAMES = ("c_index", "c_index_uno", "auc_td", "ibs")


def survival_output(logits: torch.Tensor, kind: str) -> np.ndarray:
    """Output vector of one slide from its logits ``[1, C]`` (``[C]`` also accepted): the curve ``S`` ``[C]``
    (``nll``: hazards; ``incidence``: softmax) or ``[risk]`` (``cox``)."""
    lg = logits.detach().float().reshape(-1, logits.shape[-1])[:1]
    if kind == "cox":
        return cox_risk(lg).cpu().numpy().astype(np.float64)
    curve = incidence_curve(lg) if kind == "incidence" else survival_curve(lg)
    return curve[0].cpu().numpy().astype(np.float64)


def risk_scores(outputs: np.ndarray, kind: str) -> np.ndarray:
    """``[B]`` risk of output vectors ``[B, C]`` (higher = earlier events)."""
    out = np.asarray(outputs, dtype=np.float64).reshape(len(outputs), -1)
    if kind == "cox":
        return out[:, 0]
    return curve_risk(torch.from_numpy(out.copy())).numpy()


def curve_at(curves: np.ndarray, cuts: Sequence[float], times: np.ndarray) -> np.ndarray:
    """``S(t)`` ``[B, T]`` of step curves ``[B, K]`` at ``times`` ``[T]``: ``S_{k-1}`` inside bin ``k``, 1 in the
    first (a bin's survival is read at its end)."""
    k = np.searchsorted(np.asarray(cuts, dtype=np.float64), times, side="right")
    padded = np.concatenate([np.ones((len(curves), 1)), np.asarray(curves, dtype=np.float64)], axis=1)
    return padded[:, k]


def survival_loss(
    outputs: np.ndarray, kind: str, times: np.ndarray, events: np.ndarray, cuts: Sequence[float]
) -> float:
    """Mean validation loss of the outputs: the discrete-time NLL from the curves (``nll``: censored slides alive at
    the end of their bin; ``incidence``: at its start), or the Cox partial NLL (Breslow ties) of all the slides'
    risks (``cox``)."""
    e = np.asarray(events) == 1
    if kind == "cox":
        r = np.asarray(outputs, dtype=np.float64).reshape(len(outputs), -1)[:, 0]
        if not e.any():
            return float("nan")
        at_risk = times[None, :] >= times[:, None]
        log_den = np.array([np.logaddexp.reduce(r[row]) for row in at_risk])
        return float(-(r - log_den)[e].mean())
    s = np.clip(np.asarray(outputs, dtype=np.float64), 0.0, 1.0)
    s_prev = np.concatenate([np.ones((len(s), 1)), s[:, :-1]], axis=1)
    y = np.searchsorted(np.asarray(cuts, dtype=np.float64), times, side="right")
    rows = np.arange(len(s))
    event_ll = np.log(np.clip(s_prev[rows, y] - s[rows, y], 1e-12, None))
    alive = s_prev[rows, y] if kind == "incidence" else s[rows, y]
    return float(-np.where(e, event_ll, np.log(np.clip(alive, 1e-12, None))).mean())


def _structured(times: np.ndarray, events: np.ndarray) -> np.ndarray:
    from sksurv.util import Surv

    return Surv.from_arrays(event=np.asarray(events) == 1, time=np.asarray(times, dtype=np.float64))


def _safe(fn: Any) -> float:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return float(fn())
    except (ValueError, ZeroDivisionError, IndexError):
        return float("nan")


def harrell_c(times: np.ndarray, events: np.ndarray, risks: np.ndarray) -> float:
    """Harrell's C-index of ``risks`` (NaN without an event or a comparable pair)."""
    from sksurv.metrics import concordance_index_censored

    return _safe(lambda: concordance_index_censored(np.asarray(events) == 1, times, risks)[0])


def survival_metrics(
    times: np.ndarray,
    events: np.ndarray,
    outputs: np.ndarray,
    kind: str,
    cuts: Sequence[float],
    full: bool = True,
) -> dict[str, float]:
    """Survival metrics of one task: ``c_index`` (always) and, with ``full``, ``c_index_uno``, ``auc_td``,
    ``ibs`` (see the module docstring). ``outputs``: ``[B, C]`` output vectors."""
    times = np.asarray(times, dtype=np.float64)
    events = np.asarray(events, dtype=np.int64)
    risks = risk_scores(outputs, kind)
    out = {"c_index": harrell_c(times, events, risks)}
    if not full:
        return out
    from sksurv.metrics import concordance_index_ipcw, cumulative_dynamic_auc, integrated_brier_score

    y = _structured(times, events)
    out["c_index_uno"] = _safe(lambda: concordance_index_ipcw(y, y, risks)[0])
    event_times = times[events == 1]
    eval_times = np.unique(np.quantile(event_times, [0.25, 0.5, 0.75])) if len(event_times) else np.array([])
    eval_times = eval_times[(eval_times >= times.min()) & (eval_times < times.max())]
    out["auc_td"] = _safe(lambda: cumulative_dynamic_auc(y, y, risks, eval_times)[1]) if len(eval_times) else math.nan
    out["ibs"] = math.nan
    if kind != "cox":
        grid = np.unique(np.quantile(times, np.linspace(0.1, 0.9, 20)))
        grid = grid[(grid >= times.min()) & (grid < times.max())]
        if len(grid) >= 2:
            est = curve_at(np.asarray(outputs), cuts, grid)
            out["ibs"] = _safe(lambda: integrated_brier_score(y, y, est, grid))
    return out


def survival_bootstrap(
    times: np.ndarray,
    events: np.ndarray,
    outputs: np.ndarray,
    kind: str,
    cuts: Sequence[float],
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap ``(1 - alpha)`` CIs of every survival metric (slides resampled with replacement;
    resamples where a metric is undefined, e.g. without an event, are left out of it)."""
    if n_boot < 1:
        raise DataError(f"metrics: n_boot must be at least 1, got {n_boot}")
    rng = np.random.default_rng(seed)
    outputs = np.asarray(outputs)
    samples: dict[str, list[float]] = {m: [] for m in SURVIVAL_METRIC_NAMES}
    for _ in range(n_boot):
        idx = rng.integers(0, len(times), size=len(times))
        m = survival_metrics(times[idx], events[idx], outputs[idx], kind, cuts)
        for name in SURVIVAL_METRIC_NAMES:
            samples[name].append(m[name])
    ci: dict[str, tuple[float, float]] = {}
    for name, values in samples.items():
        v = np.asarray(values)
        v = v[np.isfinite(v)]
        if len(v) == 0:
            ci[name] = (math.nan, math.nan)
        else:
            lo, hi = np.percentile(v, [100 * alpha / 2, 100 * (1 - alpha / 2)])
            ci[name] = (float(lo), float(hi))
    return ci


def logrank_p(times: np.ndarray, events: np.ndarray, high: np.ndarray) -> float:
    """Log-rank test p-value of two groups (``high`` bool ``[B]``); NaN when a group is empty or has no event."""
    from sksurv.compare import compare_survival

    if high.all() or not high.any() or not np.any(events == 1):
        return math.nan
    return _safe(lambda: compare_survival(_structured(times, events), high.astype(int))[1])


def km_plot(
    path: str | Path, times: np.ndarray, events: np.ndarray, risks: np.ndarray, threshold: float, title: str = ""
) -> dict[str, Any]:
    """Write a Kaplan-Meier plot (PNG) of high (``risk >= threshold``) vs low predicted risk, with the log-rank p.

    ``threshold`` is the checkpoint's: the median of the validation risks. Returns ``{"path", "p_value",
    "n_high", "n_low"}``.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from sksurv.nonparametric import kaplan_meier_estimator

    high = np.asarray(risks) >= threshold
    p = logrank_p(times, events, high)
    fig, ax = plt.subplots(figsize=(5.5, 4.0), dpi=120)
    for mask, name, colour in ((~high, "low risk", "tab:blue"), (high, "high risk", "tab:red")):
        if mask.any():
            t, s = kaplan_meier_estimator(np.asarray(events)[mask] == 1, np.asarray(times)[mask])
            ax.step(np.r_[0.0, t], np.r_[1.0, s], where="post", color=colour, label=f"{name} (n={int(mask.sum())})")
    ax.set_xlabel("time")
    ax.set_ylabel("survival probability")
    ax.set_ylim(0.0, 1.05)
    p_text = "n/a" if math.isnan(p) else f"{p:.3g}"
    ax.set_title(f"{title}  log-rank p = {p_text}".strip())
    ax.legend(loc="lower left")
    fig.tight_layout()
    out = Path(path)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return {"path": str(out), "p_value": p, "n_high": int(high.sum()), "n_low": int((~high).sum())}


__all__ = [
    "SURVIVAL_METRIC_NAMES",
    "curve_at",
    "harrell_c",
    "km_plot",
    "logrank_p",
    "risk_scores",
    "survival_bootstrap",
    "survival_loss",
    "survival_metrics",
    "survival_output",
]
