"""Predicting a store (``predict_store``) and labelled evaluation (``evaluate_store``) through the one pipeline.

``predict_store`` runs :func:`wsimil_core.inference.pipeline.iter_slide_prediction` on each slide of a store
(features from the store, checked against the checkpoint's encoder: a different encoder id, weights hash or
feature dimension is a ``StoreError``; predictors that read pixels, such as ABMILX-E2E or AHDMIL's pre-screening,
read the store's ``slide_path``), writes each slide's per-patch maps under ``maps/<checkpoint_id>/`` and returns
(and optionally writes) the predictions table. ``predict_bag`` (one bag of features) is re-exported from
``wsimil_core.methods.predictor``.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from wsimil_core._io import atomic_path
from wsimil_core.data.tables import read_table
from wsimil_core.engine.metrics import METRIC_NAMES, bootstrap_ci, compute_metrics, summarize_tasks
from wsimil_core.engine.run_outputs import SURVIVAL_THRESHOLD
from wsimil_core.errors import CheckpointError, DataError, SlideError, StoreError, WsimilError
from wsimil_core.inference.features import store_encoder_id
from wsimil_core.inference.loaded import LoadedCheckpoint
from wsimil_core.inference.pipeline import PipelineOptions, predict_slide
from wsimil_core.inference.rows import prediction_columns, survival_tasks
from wsimil_core.inference.survival_eval import survival_task_report
from wsimil_core.methods.predictor import BagPrediction, predict_bag
from wsimil_core.store.zarr_store import FeatureStore


def open_store(store: Any) -> FeatureStore:
    """A ``FeatureStore`` from a store or its directory."""
    return FeatureStore(store) if isinstance(store, (str, os.PathLike)) else store


def load_predictor(checkpoint: Any, device: str | torch.device = "auto", **options: Any) -> LoadedCheckpoint:
    """A checkpoint path, ``(model, meta)`` pair or ``LoadedCheckpoint`` -> ``LoadedCheckpoint`` (see there)."""
    if isinstance(checkpoint, LoadedCheckpoint):
        return checkpoint
    return LoadedCheckpoint(checkpoint, device, **options)


def write_table(frame: pd.DataFrame, path: str | Path) -> Path:
    """Write a table as CSV atomically (temporary file + rename)."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
    return Path(path)


def _check_before_work(
    ckpt: LoadedCheckpoint, fs: FeatureStore, ids: list[str], failed: dict[str, str] | None = None
) -> list[str]:
    """Every slide is in the store, with the checkpoint's features or a readable slide file as its predictor needs.

    Without ``failed`` the first problem raises; with it each bad slide goes into ``failed`` (``{slide id:
    cause}``) and the slides that passed are returned."""
    known = set(fs.slide_ids())
    missing = [s for s in ids if s not in known]
    if missing and failed is None:
        raise StoreError(
            f"store {fs.root}: slides not in the store (or incomplete): {missing[:5]}"
            + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        )
    good = []
    for sid in ids:
        try:
            if sid not in known:
                raise StoreError(f"store {fs.root}: slide {sid!r} is not in the store (or incomplete)")
            if ckpt.predictor.uses_features:
                store_encoder_id(fs, sid, ckpt.meta, ckpt.source)
            if ckpt.predictor.reads_pixels:
                path = fs.slide_attrs(sid).get("slide_path")
                if not path or not Path(path).is_file():
                    raise SlideError(
                        f"store {fs.root}: slide {sid!r}: the {ckpt.meta.method} predictor of {ckpt.source} reads "
                        f"the slide's pixels, but its file {path or '(no slide_path attr)'} is not found"
                    )
        except WsimilError as exc:
            if failed is None:
                raise
            failed[sid] = str(exc)
            continue
        good.append(sid)
    return good


def _cause(exc: BaseException) -> str:
    """One line for a slide's failure: the message of a ``WsimilError``, else the error's type and message."""
    return str(exc) if isinstance(exc, WsimilError) else f"{type(exc).__name__}: {exc}"


def predict_store(
    checkpoint: Any,
    store: Any,
    slide_ids: Iterable[str] | None = None,
    device: str | torch.device = "auto",
    out_csv: str | Path | None = None,
    write_maps: bool = True,
    progress: bool = True,
    num_workers: int = 0,
    batch_size: int = 64,
    fail_fast: bool = True,
) -> pd.DataFrame:
    """Predict every slide (or ``slide_ids``) of a store and write the per-patch maps into it.

    Args:
        checkpoint: a ``.safetensors`` checkpoint path, a ``(model, meta)`` pair or a ``LoadedCheckpoint``.
        store: a ``FeatureStore`` or its directory.
        slide_ids: slides to predict (default: all complete slides of the store).
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``...
        out_csv: also write the table here (atomically).
        write_maps: write ``maps/<checkpoint_id>/<name>`` for each slide (``evaluate`` turns this off).
        progress: show a progress bar.
        num_workers, batch_size: patch reading for predictors that read pixels.
        fail_fast: raise at the first bad slide (the default). With ``False`` a bad slide (missing, damaged
            data, features of another encoder, unreadable file...) is left out of the table and recorded in
            ``attrs["failed"]``, and the other slides are predicted.

    Returns:
        One row per slide: ``slide_id``, ``n_patches``, the predictor's extra columns, then per task
        ``<task>_pred`` (class name; binary tasks use the checkpoint's threshold) and ``<task>_prob_<class>`` for
        each class. ``DataFrame.attrs`` holds ``checkpoint_id``, ``tasks``, ``class_names``, ``thresholds`` and
        ``failed`` (``{slide id: one-line cause}``, empty unless ``fail_fast=False`` met bad slides).

    Raises:
        StoreError: a slide is missing, or its features come from another encoder (id, weights or dimension),
            or its data are damaged (with ``fail_fast=False``: only when no slide at all could be predicted).
        SlideError: the predictor reads pixels and a slide file is missing.
    """
    ckpt = load_predictor(checkpoint, device)
    meta = ckpt.meta
    fs = open_store(store)
    ids = list(fs.slide_ids()) if slide_ids is None else [str(s) for s in slide_ids]
    if not ids:
        raise StoreError(f"store {fs.root}: no slides to predict")
    failed: dict[str, str] = {}
    asked = ids
    ids = _check_before_work(ckpt, fs, ids, None if fail_fast else failed)
    options = PipelineOptions(
        features="store",
        check_grid=False,
        write_maps=write_maps,
        num_workers=num_workers,
        batch_size=batch_size,
        progress=progress,
    )
    iterator: Iterable[str] = ids
    if progress:
        iterator = tqdm(ids, desc="predict", unit="slide")
    rows = []
    names_by_task: dict[str, list[str]] = {}
    for sid in iterator:
        try:
            result = predict_slide(ckpt, store=fs, slide_id=sid, options=options)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:  # noqa: BLE001 - with fail_fast=False one bad slide never stops the others
            if fail_fast:
                raise
            failed[sid] = _cause(exc)
            continue
        rows.append(result.row)
        for task, p in result.probs.items():
            names_by_task.setdefault(task, meta.class_names(task, len(p)))
    for task in meta.task_names:  # tasks seen only in rows of slides without patches
        if task not in names_by_task and any(f"{task}_pred" in r for r in rows):
            names_by_task[task] = meta.class_names(task)
    failed = {sid: failed[sid] for sid in asked if sid in failed}  # in the order asked
    if failed and not rows:
        causes = "; ".join(f"{sid}: {cause}" for sid, cause in list(failed.items())[:3])
        raise StoreError(f"store {fs.root}: none of the {len(asked)} slide(s) could be predicted ({causes})")
    frame = pd.DataFrame(rows)
    frame.attrs.update(
        {
            "checkpoint_id": ckpt.checkpoint_id,
            "tasks": list(names_by_task),
            "class_names": names_by_task,
            "thresholds": {task: meta.threshold(task) for task in names_by_task},
            "failed": failed,
        }
    )
    if out_csv is not None:
        write_table(frame, out_csv)
    return frame


# --- evaluation -------------------------------------------------------------------------------------------


def _label_name(value: Any) -> str | None:
    """Class name of one CSV label (``1.0`` -> ``"1"``); None for a missing label."""
    if value is None:
        return None
    if isinstance(value, (float, np.floating)):
        if math.isnan(float(value)):
            return None
        if float(value).is_integer():
            return str(int(value))
    if isinstance(value, np.integer):
        return str(int(value))
    text = str(value).strip()
    return text or None


def select_labelled(
    labels: Any, split: str | None = None, slide_ids: Sequence[str] | None = None
) -> tuple[pd.DataFrame, str]:
    """Rows of the labels CSV to evaluate: those of ``split`` (``split`` column) or of ``slide_ids``, else all."""
    frame, source = read_table(labels, "labels")
    if split is not None and slide_ids:
        raise DataError("give either a split or a list of slides, not both")
    if split is not None:
        if "split" not in frame.columns:
            raise DataError(f"{source}: no 'split' column, so --split {split!r} cannot be used (use --slides)")
        frame = frame[frame["split"].astype(str).str.strip() == split]
        if frame.empty:
            raise DataError(f"{source}: no slides with split == {split!r}")
    elif slide_ids:
        wanted = [str(s) for s in slide_ids]
        unknown = sorted(set(wanted) - set(frame["slide_id"]))
        if unknown:
            raise DataError(f"{source}: slides without a label row: {unknown[:5]}")
        frame = frame.set_index("slide_id").loc[wanted].reset_index()
    return frame, source


def evaluate_store(
    checkpoint: Any,
    store: Any,
    labels: Any,
    split: str | None = None,
    slide_ids: Sequence[str] | None = None,
    threshold: float | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    device: str | torch.device = "auto",
    progress: bool = True,
    km_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Metrics with bootstrap 95% CIs of a checkpoint on labelled slides of a store.

    Args:
        checkpoint: checkpoint path, ``(model, meta)`` or ``LoadedCheckpoint``.
        store: ``FeatureStore`` or its directory.
        labels: labels CSV (``slide_id`` + one column per task [+ ``split``]) or DataFrame.
        split: evaluate the rows whose ``split`` column equals this (e.g. ``"test"``).
        slide_ids: or evaluate these slides (default: every labelled slide).
        threshold: decision threshold of binary tasks (default: the checkpoint's, else 0.5).
        n_boot, seed: bootstrap resamples and seed.
        km_dir: survival tasks: write ``km_<task>.png`` (Kaplan-Meier of high vs low predicted risk, log-rank p)
            here (None: no plot). Survival tasks report ``SURVIVAL_METRIC_NAMES`` (``inference.survival_eval``).

    Returns:
        ``{"checkpoint", "checkpoint_id", "labels", "n_slides", "tasks": {task: {"n", "threshold",
        "metrics": {metric: {"value", "ci_low", "ci_high"}}}}, "mean": {metric: value}, "flat": {...}}``
        (``mean`` averages the tasks; ``flat`` is ``summarize_tasks``' ``task/metric`` form).
    """
    ckpt = load_predictor(checkpoint, device)
    meta, source = ckpt.meta, ckpt.source
    frame, label_source = select_labelled(labels, split, slide_ids)
    tasks = meta.task_names
    surv = survival_tasks(meta)
    missing_cols = [t for t in tasks if t not in frame.columns and t not in surv]
    if missing_cols:
        raise DataError(
            f"{label_source}: no column for task(s) {missing_cols} of checkpoint {source} "
            f"(columns: {list(frame.columns)[:10]})"
        )
    preds = predict_store(ckpt, store, slide_ids=frame["slide_id"].tolist(), write_maps=False, progress=progress)
    preds = preds.set_index("slide_id")
    report_tasks: dict[str, Any] = {}
    per_task_values: dict[str, dict[str, float]] = {}
    for task in tasks:
        if task in surv:
            # the median validation risk (else the median of the evaluated risks); --threshold is for binary tasks
            info = meta.tasks.get(task)
            t = meta.threshold(task) if info is not None and info.threshold.method == SURVIVAL_THRESHOLD else None
            km = None if km_dir is None else Path(km_dir) / f"km_{task}.png"
            entry = survival_task_report(task, surv[task], frame, preds, label_source, t, n_boot, seed, km)
            report_tasks[task] = entry
            per_task_values[task] = {m: v["value"] for m, v in entry["metrics"].items()}
            continue
        names = preds.attrs["class_names"].get(task)
        if names is None:
            raise CheckpointError(f"{source}: the model gives no output for task {task!r}")
        index = {name: k for k, name in enumerate(names)}
        y, rows = [], []
        for sid, value in zip(frame["slide_id"], frame[task]):
            name = _label_name(value)
            if name is None:
                continue  # unlabelled for this task
            if name not in index:
                raise DataError(f"{label_source}: slide {sid!r} has {task}={name!r}, not one of the classes {names}")
            y.append(index[name])
            rows.append(sid)
        if not rows:
            raise DataError(f"{label_source}: no labelled slides for task {task!r}")
        probs = preds.loc[rows, prediction_columns(task, names)[1:]].to_numpy(dtype=np.float64)
        keep = np.isfinite(probs).all(axis=1)
        if not keep.all():
            skipped = [r for r, k in zip(rows, keep) if not k]
            warnings.warn(f"task {task!r}: slides without patches are left out: {skipped[:5]}", stacklevel=2)
            probs, rows, y = probs[keep], [r for r, k in zip(rows, keep) if k], [v for v, k in zip(y, keep) if k]
            if not rows:
                raise DataError(f"{label_source}: no slide with patches for task {task!r}")
        y_arr = np.asarray(y, dtype=np.int64)
        t = threshold if threshold is not None else meta.threshold(task)
        point = compute_metrics(y_arr, probs, t)
        ci = bootstrap_ci(y_arr, probs, t, n_boot=n_boot, seed=seed)
        report_tasks[task] = {
            "n": len(rows),
            "n_per_class": {names[c]: int((y_arr == c).sum()) for c in range(len(names))},
            "threshold": point["threshold"],
            "metrics": {m: {"value": point[m], "ci_low": ci[m][0], "ci_high": ci[m][1]} for m in METRIC_NAMES},
        }
        per_task_values[task] = {m: point[m] for m in METRIC_NAMES}
    flat = summarize_tasks(per_task_values)
    return {
        "checkpoint": source,
        "checkpoint_id": meta.checkpoint_id,
        "method": meta.method,
        "labels": label_source,
        "split": split,
        "n_slides": int(len(frame)),
        "n_boot": n_boot,
        "tasks": report_tasks,
        "mean": {k.split("/", 1)[1]: v for k, v in flat.items() if k.startswith("mean/")},
        "flat": flat,
    }


__all__ = [
    "BagPrediction",
    "evaluate_store",
    "load_predictor",
    "predict_bag",
    "predict_store",
    "write_table",
]
