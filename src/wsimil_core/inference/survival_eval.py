"""``evaluate_store`` for survival tasks: metrics with bootstrap 95% CIs and the Kaplan-Meier plot.

The plot splits the evaluated slides at the checkpoint's threshold of the task, the median of the validation
risks (``high`` = risk >= threshold), and reports the log-rank p of the two groups.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from wsimil_core.data.survival import SurvivalSpec, read_survival
from wsimil_core.engine.survival import SURVIVAL_METRIC_NAMES, km_plot, survival_bootstrap, survival_metrics
from wsimil_core.errors import DataError
from wsimil_core.inference.rows import survival_columns


def survival_task_report(
    task: str,
    info: Mapping[str, Any],
    frame: pd.DataFrame,
    preds: pd.DataFrame,
    label_source: str,
    threshold: float | None,
    n_boot: int = 1000,
    seed: int = 0,
    km_path: str | Path | None = None,
) -> dict[str, Any]:
    """Report of one survival task (the form of a classification task's entry in ``evaluate_store``).

    Args:
        task: the task; info: its ``meta.extras["survival"][task]`` (``loss``, ``time``, ``event``, ``cuts``).
        frame: the labels rows to evaluate (``slide_id`` + the time and event columns).
        preds: ``predict_store``'s table indexed by ``slide_id``.
        threshold: the high/low risk split (the checkpoint's median validation risk); None: the median of the
            evaluated slides' risks (a checkpoint trained without a validation split).
        km_path: where to write the Kaplan-Meier PNG (None: no plot).

    Returns:
        ``{"n", "n_events", "threshold", "metrics": {metric: {"value", "ci_low", "ci_high"}}, "km_plot",
        "logrank_p", "n_high", "n_low"}``.
    """
    spec = SurvivalSpec(task=task, time=str(info.get("time", "time")), event=str(info.get("event", "event")))
    times, events = read_survival(frame, spec, label_source)
    rows = frame["slide_id"].tolist()
    columns = survival_columns(task, info)
    missing = [c for c in columns[1:] if c not in preds.columns]
    if missing:
        raise DataError(f"predictions have no column(s) {missing} for survival task {task!r}")
    kind = str(info.get("loss", "nll"))
    out_cols = [columns[1]] if kind == "cox" else columns[2:]
    outputs = preds.loc[rows, out_cols].to_numpy(dtype=np.float64)
    keep = np.isfinite(outputs).all(axis=1)
    if not keep.all():
        warnings.warn(f"task {task!r}: slides without patches are left out: {np.array(rows)[~keep][:5]}", stacklevel=2)
        outputs, times, events = outputs[keep], times[keep], events[keep]
    if not np.any(events == 1):
        raise DataError(f"{label_source}: column {spec.event!r} has no event among the {len(events)} evaluated slides")
    cuts = list(info.get("cuts", []))
    point = survival_metrics(times, events, outputs, kind, cuts)
    ci = survival_bootstrap(times, events, outputs, kind, cuts, n_boot=n_boot, seed=seed)
    risks = preds.loc[rows, columns[1]].to_numpy(dtype=np.float64)[keep]
    if threshold is None:
        threshold = float(np.median(risks))
    report: dict[str, Any] = {
        "n": int(len(times)),
        "n_events": int(events.sum()),
        "threshold": float(threshold),
        "metrics": {m: {"value": point[m], "ci_low": ci[m][0], "ci_high": ci[m][1]} for m in SURVIVAL_METRIC_NAMES},
    }
    if km_path is not None:
        km = km_plot(km_path, times, events, risks, threshold, title=task)
        report.update({"km_plot": km["path"], "logrank_p": km["p_value"], "n_high": km["n_high"], "n_low": km["n_low"]})
    return report


__all__ = ["survival_task_report"]
