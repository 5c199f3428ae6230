"""Qt-free parts of the extend-task dock: the options of ``wsimil mecds extend`` as a schema, and its JSON report.

``ExtendOptions`` is the pydantic schema the dock's magicgui form is built from (names, defaults and help of the
``wsimil mecds extend`` CLI options; ``cli_args()`` gives the flags). ``load_report`` / ``report_rows`` read the report
``wsimil mecds extend --json`` writes (format of ``methods/mecds/cli.py``: ``task``, ``eval_split``, ``before`` /
``after`` ``{old task: metrics}``, ``new_task`` metrics, ``frozen_identical``, ``skipped_tasks``, ``history``).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from wsimil_core.api import DataError

#: metrics shown in the table, in this order (those present in the report).
TABLE_METRICS = ("auc", "balanced_accuracy", "sensitivity", "specificity", "f1_macro", "accuracy")
TABLE_COLUMNS = ("task", "metric", "before", "after", "change")
METRIC_LABELS = {
    "auc": "AUC",
    "balanced_accuracy": "bal. acc.",
    "sensitivity": "sensitivity",
    "specificity": "specificity",
    "f1_macro": "F1 macro",
    "accuracy": "accuracy",
}
REPORT_KEYS = ("task", "before", "after", "new_task")
MIN_EVAL_SLIDES = 20  # metrics on fewer evaluation slides get a warning
AUC_NA = "n/a (one class in the split)"


class ExtendOptions(BaseModel):
    """The training options of ``wsimil mecds extend`` (names, defaults and help as its CLI declares them)."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(10, ge=1, description="Training epochs of the new components.")
    lr: float = Field(1e-3, gt=0, description="Learning rate of the new components (AdamW).")
    seed: int = Field(0, description="Random seed (initialisation and bag order).")
    balanced: bool = Field(True, description="Class-balanced bag sampling.")
    isolated: bool = Field(
        True,
        description="Keep the new experts' patch updates out of the shared patch stream (old tasks' predictions "
        "stay exactly the same); off: the paper's shared-stream extension (Sec. 3.4), adding them back as DFR does.",
    )

    def cli_args(self) -> list[str]:
        """The ``wsimil mecds extend`` flags of these options."""
        return [
            "--epochs",
            str(self.epochs),
            "--lr",
            repr(float(self.lr)),
            "--seed",
            str(self.seed),
            "--balanced" if self.balanced else "--no-balanced",
            "--isolated" if self.isolated else "--shared-stream",
        ]


def load_report(path: str | os.PathLike) -> dict[str, Any]:
    """Read the JSON report ``wsimil mecds extend --json`` writes; ``DataError`` naming the file when it is not one."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: extension report not found")
    try:
        report = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{p}: not a JSON extension report ({exc})") from None
    missing = [k for k in REPORT_KEYS if not isinstance(report, dict) or k not in report]
    if missing:
        raise DataError(f"{p}: not a wsimil extend report (missing {', '.join(missing)})")
    return report


def report_rows(report: dict[str, Any]) -> list[tuple[str, str, float | None, float | None]]:
    """Table rows ``(task, metric, before, after)``: old tasks first (before and after), then the new task
    (``"<name> (new)"``, before None)."""
    rows: list[tuple[str, str, float | None, float | None]] = []
    before, after = report.get("before") or {}, report.get("after") or {}
    for task in list(before) + [t for t in after if t not in before]:
        b, a = before.get(task) or {}, after.get(task) or {}
        for metric in TABLE_METRICS:
            if metric in b or metric in a:
                rows.append((task, metric, _num(b.get(metric)), _num(a.get(metric))))
    new = report.get("new_task") or {}
    for metric in TABLE_METRICS:
        if metric in new:
            rows.append((f"{report['task']} (new)", metric, None, _num(new[metric])))
    return rows


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def fmt_metric(v: float | None) -> str:
    if v is None:
        return "—"
    return "nan" if not math.isfinite(v) else f"{v:.4f}"


def one_class(report: dict[str, Any], row_task: str) -> bool:
    """The evaluation split holds one class of ``row_task`` (a table row's task; ``"<new> (new)"`` included)."""
    task = report.get("task") if row_task.endswith(" (new)") else row_task
    n = (report.get("eval_classes") or {}).get(task)
    return isinstance(n, int) and n < 2


def cell_text(metric: str, value: float | None, single_class: bool) -> str:
    """A table cell: ``fmt_metric``, except an AUC that cannot be computed (one class, or NaN) reads ``AUC_NA``."""
    if value is not None and metric == "auc" and (single_class or not math.isfinite(value)):
        return AUC_NA
    return fmt_metric(value)


def split_warning(report: dict[str, Any]) -> str | None:
    """Why the report's metrics are not meaningful (too few slides, one class of a task), or None."""
    notes = []
    n, split = report.get("n_eval"), report.get("eval_split", "?")
    if isinstance(n, int) and n < MIN_EVAL_SLIDES:
        notes.append(
            f"only {n} slides in the {split} split (fewer than {MIN_EVAL_SLIDES}): these metrics are not meaningful"
        )
    single = [t for t, k in (report.get("eval_classes") or {}).items() if isinstance(k, int) and k < 2]
    if single:
        notes.append(f"one class only in the {split} split for {', '.join(single)}: AUC n/a")
    return "; ".join(notes) or None


def default_output(checkpoint: str | os.PathLike, name: str) -> Path:
    """``<checkpoint>_ext_<name>.safetensors`` next to the checkpoint (the CLI's default)."""
    p = Path(checkpoint)
    return p.with_name(f"{p.stem}_ext_{name}.safetensors")


def report_path_for(output: str | os.PathLike) -> Path:
    """Where the widget asks ``wsimil mecds extend`` to write its JSON report: ``<output stem>.extend.json``."""
    return Path(output).with_suffix(".extend.json")


def run_dir_for(output: str | os.PathLike) -> Path:
    """The extension's engine run directory (checkpoints, ``metrics.jsonl``): ``<output stem>_run`` beside it."""
    p = Path(output)
    return p.with_name(f"{p.stem}_run")


__all__ = [
    "ExtendOptions",
    "run_dir_for",
    "load_report",
    "report_rows",
    "default_output",
    "report_path_for",
    "fmt_metric",
    "cell_text",
    "one_class",
    "split_warning",
    "MIN_EVAL_SLIDES",
    "AUC_NA",
    "TABLE_METRICS",
    "TABLE_COLUMNS",
    "METRIC_LABELS",
]
