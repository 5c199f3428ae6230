"""Live training curves drawn from the rows of a run's ``metrics.jsonl``.

The trainer (``engine/trainer.py``) writes one row per finished epoch: ``phase``, ``epoch`` (0-based within the
phase), ``global_epoch`` (0-based over all phases), ``lr``, ``train/<name>`` (``train/loss`` and the method's
logged figures), ``val/<metric>`` (``val/loss``, ``val/auc`` ... or per task ``val/<task>/<metric>`` and
``val/mean/<metric>``), ``val_<model>/<metric>`` for side-by-side evaluation models, and ``best`` (true when the
early-stopping metric improved, i.e. ``best.safetensors`` was written at that epoch). Rows are in epoch order.

``best_row(rows)``, ``epoch_summary(row, metric)`` and ``metric_value(row, metric)`` are Qt-free;
``MetricsPlot`` draws loss (train and validation) and the validation metric, phase boundaries, and a marker at
the best epoch.
"""

from __future__ import annotations

import math
from typing import Any

from qtpy.QtWidgets import QVBoxLayout, QWidget


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def metric_value(row: dict[str, Any], metric: str) -> float | None:
    """The validation ``metric`` of a row (``val/<metric>``, else the multi-task ``val/mean/<metric>``)."""
    for key in (f"val/{metric}", f"val/mean/{metric}"):
        if _finite(row.get(key)):
            return float(row[key])
    return None


def epoch_number(row: dict[str, Any], index: int = 0) -> int:
    """1-based epoch over all phases (``global_epoch + 1``; ``index + 1`` for a row without it)."""
    value = row.get("global_epoch", index)
    return int(value) + 1 if isinstance(value, (int, float)) else index + 1


def best_row(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The row of the best epoch so far: the last one flagged ``best`` (None when none is)."""
    for row in reversed(rows):
        if row.get("best") is True:
            return row
    return None


def epoch_summary(row: dict[str, Any], metric: str) -> str:
    """One line for a row, e.g. ``train epoch 3: loss 0.6931, val/loss 0.7000, val/auc 0.8125 (best)``."""
    parts = []
    for key in ("train/loss", "val/loss"):
        if _finite(row.get(key)):
            parts.append(f"{key.removeprefix('train/')} {row[key]:.4f}")
    value = metric_value(row, metric)
    if value is not None and metric != "loss":
        parts.append(f"val/{metric} {value:.4f}")
    text = f"{row.get('phase', '?')} epoch {int(row.get('epoch', 0)) + 1}: " + ", ".join(parts)
    return text + (" (best)" if row.get("best") is True else "")


class MetricsPlot(QWidget):
    """Loss (train and validation) and one validation metric per epoch (matplotlib in Qt).

    Attributes:
        series: ``{"train/loss": [(epoch, value)], "val/loss": [...], "val/<metric>": [...]}`` as drawn
            (epoch 1-based over all phases).
        best_epoch: the epoch marked as best (1-based), None when no row is flagged ``best``.
    """

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.figure = Figure(figsize=(4.0, 2.4), tight_layout=True)
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.ax_loss = self.figure.add_subplot(1, 2, 1)
        self.ax_metric = self.figure.add_subplot(1, 2, 2)
        self.series: dict[str, list[tuple[int, float]]] = {}
        self.best_epoch: int | None = None
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.canvas)
        self.setMinimumHeight(160)
        self.update_records([], "auc")

    def update_records(self, records: list[dict[str, Any]], metric: str = "auc") -> None:
        """Redraw from the rows of ``metrics.jsonl``."""
        key_metric = f"val/{metric}"
        self.series = {"train/loss": [], "val/loss": [], key_metric: []}
        phase_starts: list[int] = []
        last_phase = None
        for i, rec in enumerate(records):
            x = epoch_number(rec, i)
            if rec.get("phase") != last_phase and last_phase is not None:
                phase_starts.append(x)
            last_phase = rec.get("phase")
            for key in ("train/loss", "val/loss"):
                if _finite(rec.get(key)):
                    self.series[key].append((x, float(rec[key])))
            value = metric_value(rec, metric)
            if value is not None:
                self.series[key_metric].append((x, value))
        best = best_row(records)
        self.best_epoch = epoch_number(best, records.index(best)) if best is not None else None
        self.ax_loss.clear()
        self.ax_metric.clear()
        for key, style in (("train/loss", "-o"), ("val/loss", "--s")):
            pts = self.series[key]
            if pts:
                self.ax_loss.plot([p[0] for p in pts], [p[1] for p in pts], style, ms=3, label=key)
        pts = self.series[key_metric]
        if pts:
            self.ax_metric.plot([p[0] for p in pts], [p[1] for p in pts], "-o", ms=3, color="tab:green")
        for ax in (self.ax_loss, self.ax_metric):
            for x in phase_starts:
                ax.axvline(x - 0.5, color="0.6", lw=0.8, ls=":")
            if self.best_epoch is not None:
                ax.axvline(self.best_epoch, color="tab:red", lw=0.8, ls="--")
            ax.set_xlabel("epoch", fontsize=8)
            ax.tick_params(labelsize=7)
        best_value = metric_value(best, metric) if best is not None else None
        if best_value is not None:
            label = f"best: epoch {self.best_epoch}"
            self.ax_metric.plot([self.best_epoch], [best_value], "*", ms=11, color="tab:red", label=label)
            self.ax_metric.legend(fontsize=7)
        self.ax_loss.set_title("loss", fontsize=9)
        self.ax_metric.set_title(f"validation {metric}", fontsize=9)
        if any(self.series[k] for k in ("train/loss", "val/loss")):
            self.ax_loss.legend(fontsize=7)
        if self.isVisible():  # a hidden plot (another tab) draws when shown
            self.canvas.draw_idle()

    def showEvent(self, event: Any) -> None:  # noqa: N802 (Qt name)
        super().showEvent(event)
        self.canvas.draw_idle()


__all__ = ["MetricsPlot", "best_row", "epoch_summary", "epoch_number", "metric_value"]
