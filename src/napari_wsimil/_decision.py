"""How the inference dock turns a slide's class probabilities into the predicted class it shows (no Qt).

A binary task predicts class 1 when ``p(class 1) >= threshold``; the threshold is the checkpoint's
(``meta.tasks[task].threshold``: value, how it was chosen, on how many validation slides) or 0.5 when the user
asks for it. Tasks with more than two classes predict the arg-max. :func:`decide` returns, per task, the class
and the rule that produced it as one line of text (``"p(tumour) = 0.753 < 0.754 → benign (threshold tuned on 2
validation slides)"``), so the class shown in bold always follows from the rule shown beside it, plus a warning
when the threshold was tuned on too few slides to be trusted.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

HALF = 0.5
MIN_TUNING_SLIDES = 20  # a threshold tuned on fewer validation slides than this gets a warning


@dataclass(frozen=True)
class TaskDecision:
    """The class shown for one task and the rule that gave it.

    Attributes:
        task: the task name.
        classes: class names in the model's output order; probs: their probabilities (same length, C).
        predicted: the predicted class name.
        threshold: the threshold applied on ``p(classes[1])`` (None for tasks with more than two classes).
        source: how the threshold was chosen, in words (``"threshold tuned on 2 validation slides"``).
        rule: the whole rule in one line (see the module docstring).
        warning: why the threshold may not be trusted (None when there is nothing to say).
    """

    task: str
    classes: list[str]
    probs: list[float]
    predicted: str
    threshold: float | None
    source: str
    rule: str
    warning: str | None = None


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _describe(method: str, n_slides: int | None) -> tuple[str, bool]:
    """``(how the threshold was chosen in words, whether it was tuned on data)`` from ``ThresholdMeta``."""
    if method.startswith("default") and "few" in method:
        return "default threshold (too few validation slides to tune one)", False
    tuned = "validation" in method or "youden" in method.lower()
    if tuned and not method.startswith("default"):
        on = (
            f"{_plural(n_slides, 'validation slide')}"
            if n_slides is not None
            else "validation slides (how many: not recorded)"
        )
        extra = " for the task extension" if "extension" in method else ""
        return f"threshold tuned on {on}{extra}", True
    if method.startswith("fixed"):
        return "threshold fixed in the training config", False
    if method.startswith("default"):
        return "default threshold", False
    return f"threshold: {method}", False


def _pair(p: float, t: float) -> tuple[str, str]:
    """``p`` and ``t`` printed with 3 decimals, or more when 3 would print two different numbers alike."""
    for digits in range(3, 9):
        a, b = f"{p:.{digits}f}", f"{t:.{digits}f}"
        if a != b or p == t:
            return a, b
    return f"{p!r}", f"{t!r}"


def _threshold_meta(meta: Any, task: str) -> tuple[float, str, int | None]:
    """``(value, method, n_slides)`` of ``task``'s recorded threshold (0.5, "default 0.5", None when none)."""
    tasks = getattr(meta, "tasks", None) or {}
    info = tasks.get(task)
    if info is None:
        return HALF, "default 0.5", None
    thr = info.threshold
    return float(thr.value), str(thr.method), thr.n_slides


def decide_task(task: str, table: Mapping[str, float], meta: Any = None, use_half: bool = False) -> TaskDecision:
    """The decision for one task from ``table`` (``{class name: probability}`` in output order).

    ``meta`` is the checkpoint's ``CheckpointMeta`` (None = no recorded threshold); ``use_half`` applies 0.5
    instead of the checkpoint's threshold.
    """
    classes = [str(c) for c in table]
    probs = [float(v) for v in table.values()]
    if len(probs) != 2:
        best = max(range(len(probs)), key=probs.__getitem__) if probs else 0
        name = classes[best] if classes else "?"
        rule = f"highest probability → {name}" if probs else "no probabilities"
        return TaskDecision(task, classes, probs, name, None, "arg-max", rule)
    value, method, n_slides = _threshold_meta(meta, task)
    warning = None
    if use_half:
        t = HALF
        source = f"0.5 chosen in the viewer instead of the checkpoint's {value:.3f}"
    else:
        t = value
        source, tuned = _describe(method, n_slides)
        if tuned and (n_slides is None or n_slides < MIN_TUNING_SLIDES):
            few = _plural(n_slides, "slide") if n_slides is not None else "an unknown number of slides"
            warning = (
                f"{task}: the threshold {t:.3f} was tuned on {few} (fewer than {MIN_TUNING_SLIDES}): "
                "it may not generalise; tick 'use 0.5' to compare"
            )
    p1 = probs[1]
    positive = p1 >= t and not math.isnan(p1)
    predicted = classes[1] if positive else classes[0]
    ps, ts = _pair(p1, t)
    sign = "≥" if positive else "<"
    rule = f"p({classes[1]}) = {ps} {sign} {ts} → {predicted} ({source})"
    return TaskDecision(task, classes, probs, predicted, t, source, rule, warning)


def decide(
    probs: Mapping[str, Mapping[str, float]], meta: Any = None, use_half: bool = False
) -> dict[str, TaskDecision]:
    """:func:`decide_task` for every task of ``probs`` (``{task: {class name: probability}}``)."""
    return {task: decide_task(task, table, meta, use_half) for task, table in probs.items()}


def probs_html(
    probs: Mapping[str, Mapping[str, float]],
    decisions: Mapping[str, TaskDecision] | None = None,
    partial: bool = False,
) -> str:
    """Class probabilities per task as a small HTML table; with ``decisions``, the predicted class in bold and,
    under each task, the rule that gave it (so the bold class always follows from the rule shown)."""
    rows = []
    for task, table in probs.items():
        decision = (decisions or {}).get(task)
        cells = []
        for name, p in table.items():
            text = f"{html.escape(str(name))}: {float(p):.3f}"
            if decision is not None and decision.predicted == name:
                text = f"<b>{text}</b>"
            cells.append(text)
        rows.append(f"<tr><td><i>{html.escape(task)}</i></td><td>{' &nbsp; '.join(cells)}</td></tr>")
        if decision is not None:
            rows.append(f"<tr><td></td><td><small>{html.escape(decision.rule)}</small></td></tr>")
    head = "<p>(so far)</p>" if partial else ""
    return head + "<table>" + "".join(rows) + "</table>"


def warnings_html(decisions: Mapping[str, TaskDecision]) -> str:
    """The decisions' warnings as orange HTML lines ("" when there are none)."""
    lines = [f"⚠ {html.escape(d.warning)}" for d in decisions.values() if d.warning]
    return "<span style='color:#e69500'>" + "<br>".join(lines) + "</span>" if lines else ""


__all__ = ["HALF", "MIN_TUNING_SLIDES", "TaskDecision", "decide", "decide_task", "probs_html", "warnings_html"]
