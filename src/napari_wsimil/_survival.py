"""The inference dock's survival display: a slide's predicted risk, its risk group and its survival curve.

A checkpoint's survival tasks (``wsimil_core.api.survival_tasks``) give, instead of class probabilities, the
survival curve ``S(t)`` at the end of each time bin (or the Cox risk); see docs/survival.md.
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from typing import Any

from wsimil_core.api import survival_risk, survival_tasks

BAR_WIDTH = 20  # characters of a full (S = 1) bar


def split_survival(
    probs: Mapping[str, Mapping[str, float]], meta: Any
) -> tuple[dict[str, Mapping[str, float]], dict[str, Mapping[str, float]]]:
    """``(classification tasks, survival tasks)`` of a ``{task: {name: value}}`` table."""
    surv = survival_tasks(meta) if meta is not None else {}
    classes = {t: v for t, v in probs.items() if t not in surv}
    return classes, {t: v for t, v in probs.items() if t in surv}


def survival_html(tables: Mapping[str, Mapping[str, float]], meta: Any, partial: bool = False) -> str:
    """Risk, risk group (vs the checkpoint's median validation risk) and the curve as bars, per survival task."""
    surv = survival_tasks(meta)
    parts = []
    for task, table in tables.items():
        info = surv[task]
        values = [float(v) for v in table.values()]
        risk = survival_risk(info, values)
        threshold = float(meta.threshold(task))
        group = "high" if risk >= threshold else "low"
        lines = [
            f"<i>{html.escape(task)}</i>: risk <b>{risk:.3f}</b> → <b>{group} risk</b> "
            f"<small>(split at the median validation risk {threshold:.3f})</small>"
        ]
        if info.get("loss") != "cox":
            ends = [f"{c:.4g}" for c in info.get("cuts", [])] + ["end"]
            for end, s in zip(ends, values):
                bar = "█" * int(round(max(0.0, min(1.0, s)) * BAR_WIDTH))
                label = f"S(t ≤ {end})" if end != "end" else "S(after)"
                lines.append(f"<tt>{html.escape(label):>14} {bar:<{BAR_WIDTH}} {s:.2f}</tt>")
        parts.append("<br>".join(lines))
    head = "<p>(so far)</p>" if partial and parts else ""
    return head + "<br>".join(parts)


__all__ = ["split_survival", "survival_html"]
