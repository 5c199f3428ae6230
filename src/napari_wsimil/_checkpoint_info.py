"""What the inference dock shows about a checkpoint before running it (reads only the file's header)."""

from __future__ import annotations

import html
import os
from typing import Any


def checkpoint_summary(path: str | os.PathLike) -> dict[str, Any]:
    """What the widget shows about a checkpoint before running it (reads only the header).

    Returns ``{"checkpoint_id", "method", "model_name", "tasks": {task: [classes]}, "encoder": name,
    "encoder_id", "patch_mpp", "patch_size", "store", "thresholds"}`` (``store``: the training store's directory,
    or None; ``thresholds``: ``{task: {"value", "method", "n_slides"}}`` of the binary tasks).
    """
    from wsimil_core.api import read_checkpoint_meta

    meta = read_checkpoint_meta(path)
    grid = meta.grid
    return {
        "checkpoint_id": meta.checkpoint_id,
        "method": meta.method,
        "model_name": meta.model_name,
        "tasks": {t: meta.class_names(t) for t in meta.task_names},
        "encoder": meta.encoder.name if meta.encoder is not None else None,
        "encoder_id": meta.encoder_id,
        "patch_mpp": grid.patch_mpp if grid is not None else None,
        "patch_size": grid.patch_px if grid is not None else None,
        "store": meta.store.path if meta.store is not None else None,
        "thresholds": {t: info.threshold.model_dump() for t, info in meta.tasks.items() if len(info.class_names) == 2},
    }


def checkpoint_info_html(summary: dict[str, Any]) -> str:
    """The dock's rich-text lines for a :func:`checkpoint_summary`: method, id, tasks, tuned thresholds, encoder
    and grid, training store."""
    tasks = "; ".join(f"{t}: {', '.join(c) or '?'}" for t, c in summary["tasks"].items())
    thresholds = "; ".join(
        f"{t}: {v['value']:.3f} ({v['method']}" + (f", {v['n_slides']} slides)" if v["n_slides"] else ")")
        for t, v in summary.get("thresholds", {}).items()
    )
    thresholds = f"<br>threshold {html.escape(thresholds)}" if thresholds else ""
    trained_on = f"<br>trained on store {html.escape(str(summary['store']))}" if summary.get("store") else ""
    return (
        f"{summary['method']} ({summary['model_name']}), id {summary['checkpoint_id']}<br>"
        f"tasks {html.escape(tasks)}{thresholds}<br>encoder {summary['encoder']} at {summary['patch_mpp']} µm/px, "
        f"{summary['patch_size']} px{trained_on}"
    )


__all__ = ["checkpoint_info_html", "checkpoint_summary"]
