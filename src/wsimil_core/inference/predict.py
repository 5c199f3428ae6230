"""Inference: one bag (``predict_bag``), a whole store (``predict_store``) and labelled evaluation (``evaluate_store``).

``predict_store`` writes each slide's per-patch maps into the store under ``maps/<checkpoint_id>/`` and returns
(and optionally writes) a table of slide predictions. Before predicting it checks that the store's features
come from the encoder the checkpoint was trained on (``meta["encoder"]``): a different encoder id, weights hash
or feature dimension is a ``StoreError``.

Checkpoint meta keys read here (see docs/inference.md): ``targets`` (task names; single-task default ``label``),
``class_names`` ``{task: [names]}``, ``threshold`` (float, or ``{task: float}``: the decision threshold on
P(class 1) of binary tasks, chosen on validation; 0.5 when absent), ``encoder`` (``encoder_id``, ``dim``,
``weights_sha256``, ...), ``checkpoint_id``.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from wsimil_core._io import atomic_path
from wsimil_core.devices import resolve_device
from wsimil_core.errors import CheckpointError, DataError, StoreError

DEFAULT_TARGET = "label"


# --- devices and checkpoint meta helpers ---------------------------------------------------------------------


def task_names(meta: dict[str, Any]) -> list[str]:
    """Task (target) names of a checkpoint: ``meta["targets"]``, else ``class_names`` keys, else ``["label"]``."""
    targets = meta.get("targets")
    if isinstance(targets, str):
        return [targets]
    if targets:
        return [str(t) for t in targets]
    names = meta.get("class_names")
    if isinstance(names, dict) and names:
        return [str(t) for t in names]
    return [DEFAULT_TARGET]


def class_names_for(meta: dict[str, Any], task: str, n_classes: int | None) -> list[str]:
    """Class names of ``task`` from the meta (``class_names`` per task, or one list), else ``"0".."C-1"``.

    ``n_classes=None`` (not known from an output) takes the meta's names, else the model config's class count
    (``n_classes``, or ``tasks[task]`` for multi-task configs).
    """
    names = meta.get("class_names")
    if isinstance(names, dict):
        names = names.get(task)
    if isinstance(names, list) and (n_classes is None or len(names) == n_classes):
        return [str(n) for n in names]
    if n_classes is None:
        cfg = meta.get("model_config") or {}
        tasks = cfg.get("tasks")
        n_classes = int(tasks[task]) if isinstance(tasks, dict) and task in tasks else int(cfg.get("n_classes", 2))
    return [str(i) for i in range(n_classes)]


def threshold_for(meta: dict[str, Any], task: str) -> float:
    """Decision threshold of a binary ``task``: ``meta["threshold"]`` (float or per task) or
    ``meta["thresholds"][task]``; 0.5 when absent."""
    for key in ("threshold", "thresholds"):
        value = meta.get(key)
        if isinstance(value, dict):
            value = value.get(task)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    return 0.5


def _predicted_class(probs: np.ndarray, threshold: float) -> int:
    if len(probs) == 2:
        return int(probs[1] >= threshold)
    return int(np.argmax(probs))


# --- one bag ------------------------------------------------------------------------------------------------


@dataclass
class BagPrediction:
    """Prediction for one bag.

    Attributes:
        probs: ``{task: float [C]}`` softmax probabilities (single-task models: one entry named after the target).
        maps: ``{name: float32 [N] or [N, K]}`` per-patch values in the input patch order.
        logits: ``{task: float [C]}`` raw logits.
    """

    probs: dict[str, np.ndarray]
    maps: dict[str, np.ndarray] = field(default_factory=dict)
    logits: dict[str, np.ndarray] = field(default_factory=dict)


def _to_numpy(t: Any) -> np.ndarray:
    if isinstance(t, Tensor):
        return t.detach().float().cpu().numpy()
    return np.asarray(t, dtype=np.float32)


@torch.no_grad()
def predict_bag(
    model: nn.Module,
    features: Tensor | np.ndarray,
    coords: Tensor | np.ndarray | None = None,
    device: str | torch.device = "cpu",
    target: str | None = None,
) -> BagPrediction:
    """Run ``model`` on one whole bag (no chunking), in eval mode and without gradients.

    Args:
        model: a registered model (e.g. from ``load_checkpoint``).
        features: ``[N, D]`` patch features (float16/32; cast to float32).
        coords: ``[N, 2]`` level-0 (x, y), passed to models that use them.
        device: ``"cpu"``, ``"cuda"``, ``"auto"``...
        target: name of the single task (default: ``model.checkpoint_meta["targets"][0]`` or ``"label"``).

    Returns:
        ``BagPrediction`` whose maps are aligned with the rows of ``features``.
    """
    dev = resolve_device(device)
    x = torch.as_tensor(np.asarray(features) if not isinstance(features, Tensor) else features)
    if x.dim() == 3 and x.shape[0] == 1:
        x = x[0]
    if x.dim() != 2:
        raise DataError(f"predict_bag: features must be [N, D], got shape {tuple(x.shape)}")
    n = x.shape[0]
    x = x.to(dev, dtype=torch.float32)
    c = None
    if coords is not None:
        c = torch.as_tensor(np.asarray(coords) if not isinstance(coords, Tensor) else coords).to(dev, torch.long)
    was_training = model.training
    model.eval()
    try:
        out = model(x, coords=c)
    finally:
        model.train(was_training)

    if isinstance(out.logits, dict):
        logits = {str(k): v for k, v in out.logits.items()}
    else:
        if target is None:
            meta = getattr(model, "checkpoint_meta", None) or {}
            target = task_names(meta)[0]
        logits = {target: out.logits}
    probs: dict[str, np.ndarray] = {}
    raw: dict[str, np.ndarray] = {}
    for task, lg in logits.items():
        lg = lg.float().reshape(-1, lg.shape[-1])[0]
        raw[task] = lg.cpu().numpy()
        probs[task] = torch.softmax(lg, dim=-1).cpu().numpy()

    maps: dict[str, np.ndarray] = {}
    for name, value in (out.maps or {}).items():
        m = _to_numpy(value).astype(np.float32, copy=False)
        if m.ndim >= 2 and m.shape[0] == 1 and n != 1:
            m = m[0]
        if m.ndim not in (1, 2) or m.shape[0] != n:
            warnings.warn(f"map {name!r} has shape {m.shape}, not [N={n}] or [N, K]; it is left out", stacklevel=2)
            continue
        maps[name] = m
    return BagPrediction(probs=probs, maps=maps, logits=raw)


# --- a store ------------------------------------------------------------------------------------------------


def _open_store(store: Any):
    if isinstance(store, (str, os.PathLike)):
        from wsimil_core.store.zarr_store import FeatureStore

        return FeatureStore(store)
    return store


def _load(checkpoint: Any, device: torch.device) -> tuple[nn.Module, dict[str, Any], str]:
    """Accept a checkpoint path or a ``(model, meta)`` pair; return ``(model, meta, source)``."""
    if isinstance(checkpoint, (str, os.PathLike)):
        from wsimil_core.engine.checkpoint import load_checkpoint

        model, meta = load_checkpoint(checkpoint, device=device)
        return model, meta, str(checkpoint)
    if isinstance(checkpoint, tuple) and len(checkpoint) == 2:
        model, meta = checkpoint
        model.to(device)
        if "checkpoint_id" not in meta:
            from wsimil_core.engine.checkpoint import checkpoint_id

            meta = {**meta, "checkpoint_id": checkpoint_id(model.state_dict(), meta.get("method", "model"))}
        model.checkpoint_meta = meta
        return model, meta, "<in-memory model>"
    raise TypeError("checkpoint must be a path or a (model, meta) pair")


def _encoder_for(store: Any, slide_id: str, meta: dict[str, Any], source: str) -> str | None:
    """The encoder id to read for ``slide_id``; ``StoreError`` when the store lacks the checkpoint's encoder."""
    enc = meta.get("encoder") or {}
    want = enc.get("encoder_id") if isinstance(enc, dict) else None
    have = store.encoder_ids(slide_id)
    if want:
        if want not in have:
            raise StoreError(
                f"store {getattr(store, 'root', store)}: slide {slide_id!r} has features of {have or 'no encoder'}, "
                f"but checkpoint {source} was trained on encoder {want!r} ({enc.get('name', '?')}); "
                "extract features with that encoder first"
            )
        return want
    if len(have) != 1:
        raise StoreError(
            f"store {getattr(store, 'root', store)}: slide {slide_id!r} has features of {have or 'no encoder'} and "
            f"checkpoint {source} names no encoder; keep one encoder per store or retrain with an encoder spec"
        )
    return have[0]


def _check_bag(bag: Any, meta: dict[str, Any], source: str, store: Any) -> None:
    """Feature dimension and weights hash of the stored features must match the checkpoint."""
    in_dim = (meta.get("model_config") or {}).get("in_dim")
    enc = meta.get("encoder") or {}
    where = f"store {getattr(store, 'root', store)}: slide {bag.slide_id!r} (encoder {bag.encoder_id!r})"
    dim = int(bag.features.shape[1])
    if in_dim is not None and dim != int(in_dim):
        raise StoreError(
            f"{where} has {dim}-dimensional features but checkpoint {source} expects in_dim={in_dim}; "
            "use the encoder the model was trained with"
        )
    if isinstance(enc, dict):
        want_dim = enc.get("dim")
        if want_dim is not None and int(want_dim) != dim:
            raise StoreError(f"{where} has dimension {dim}, checkpoint {source} encoder has dim={want_dim}")
        want_hash = enc.get("weights_sha256")
        got_hash = (bag.encoder_attrs or {}).get("weights_sha256")
        if want_hash and got_hash and want_hash != got_hash:
            raise StoreError(
                f"{where} was extracted with weights {str(got_hash)[:12]}..., but checkpoint {source} expects "
                f"{str(want_hash)[:12]}... (a different encoder)"
            )


def _write_csv_atomic(frame: pd.DataFrame, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def prediction_columns(task: str, class_names: Sequence[str]) -> list[str]:
    """Column names of one task in the predictions table: ``<task>_pred`` then ``<task>_prob_<class>``."""
    return [f"{task}_pred", *[f"{task}_prob_{c}" for c in class_names]]


def predict_store(
    checkpoint: Any,
    store: Any,
    slide_ids: Iterable[str] | None = None,
    device: str | torch.device = "auto",
    out_csv: str | Path | None = None,
    write_maps: bool = True,
    progress: bool = True,
) -> pd.DataFrame:
    """Predict every slide (or ``slide_ids``) of a store and write the per-patch maps into it.

    Args:
        checkpoint: a ``.safetensors`` checkpoint path, or a ``(model, meta)`` pair.
        store: a ``FeatureStore`` or its directory.
        slide_ids: slides to predict (default: all complete slides of the store).
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``...
        out_csv: also write the table here (atomically).
        write_maps: write ``maps/<checkpoint_id>/<name>`` for each slide (``evaluate`` turns this off).
        progress: show a progress bar.

    Returns:
        One row per slide: ``slide_id``, ``n_patches``, then per task ``<task>_pred`` (class name; binary tasks
        use the checkpoint's threshold) and ``<task>_prob_<class>`` for each class.
        ``DataFrame.attrs`` holds ``checkpoint_id``, ``tasks``, ``class_names`` and ``thresholds``.

    Raises:
        StoreError: a slide is missing, or its features come from another encoder (id, weights or dimension).
    """
    dev = resolve_device(device)
    model, meta, source = _load(checkpoint, dev)
    if meta.get("model_name") == "abmilx_e2e":
        raise CheckpointError(
            f"{source}: an end-to-end ABMILX checkpoint fine-tuned its encoder, so the store's cached features "
            "are stale for it; predict from pixels with `wsimil abmilx-predict CKPT --store DIR`"
        )
    fs = _open_store(store)
    ids = list(fs.slide_ids()) if slide_ids is None else [str(s) for s in slide_ids]
    if not ids:
        raise StoreError(f"store {getattr(fs, 'root', fs)}: no slides to predict")
    known = set(fs.slide_ids())
    missing = [s for s in ids if s not in known]
    if missing:
        raise StoreError(
            f"store {getattr(fs, 'root', fs)}: slides not in the store (or incomplete): {missing[:5]}"
            + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        )
    encoders = {sid: _encoder_for(fs, sid, meta, source) for sid in ids}  # fail before any work
    ckpt_id = meta["checkpoint_id"]

    iterator: Iterable[str] = ids
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(ids, desc="predict", unit="slide")
    rows = []
    names_by_task: dict[str, list[str]] = {}
    thresholds: dict[str, float] = {}
    for sid in iterator:
        bag = fs.read_bag(sid, encoders[sid])
        _check_bag(bag, meta, source, fs)
        row: dict[str, Any] = {"slide_id": sid, "n_patches": int(bag.features.shape[0])}
        if bag.features.shape[0] == 0:
            warnings.warn(f"slide {sid!r} has no patches: no prediction, no maps", stacklevel=2)
            for task in task_names(meta):
                names = names_by_task.setdefault(task, class_names_for(meta, task, None))
                row[f"{task}_pred"] = ""
                row.update({f"{task}_prob_{name}": float("nan") for name in names})
            rows.append(row)
            continue
        pred = predict_bag(model, bag.features, bag.coords, device=dev)
        for task, p in pred.probs.items():
            names = names_by_task.setdefault(task, class_names_for(meta, task, len(p)))
            t = thresholds.setdefault(task, threshold_for(meta, task))
            row[f"{task}_pred"] = names[_predicted_class(p, t)]
            for c, name in enumerate(names):
                row[f"{task}_prob_{name}"] = float(p[c])
        rows.append(row)
        if write_maps:
            attrs = {
                "checkpoint_id": ckpt_id,
                "checkpoint": source,
                "method": meta.get("method"),
                "model_name": meta.get("model_name"),
                "encoder_id": bag.encoder_id,
                "class_names": names_by_task,
                "probs": {task: [float(v) for v in p] for task, p in pred.probs.items()},
                "prediction": {task: row[f"{task}_pred"] for task in pred.probs},
            }
            fs.write_maps(sid, ckpt_id, pred.maps, attrs)
    frame = pd.DataFrame(rows)
    frame.attrs.update(
        {"checkpoint_id": ckpt_id, "tasks": list(names_by_task), "class_names": names_by_task, "thresholds": thresholds}
    )
    if out_csv is not None:
        _write_csv_atomic(frame, out_csv)
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
    from wsimil_core.data.dataset import read_table

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
) -> dict[str, Any]:
    """Metrics with bootstrap 95% CIs of a checkpoint on labelled slides of a store.

    Args:
        checkpoint: checkpoint path or ``(model, meta)``.
        store: ``FeatureStore`` or its directory.
        labels: labels CSV (``slide_id`` + one column per task [+ ``split``]) or DataFrame.
        split: evaluate the rows whose ``split`` column equals this (e.g. ``"test"``).
        slide_ids: or evaluate these slides (default: every labelled slide).
        threshold: decision threshold of binary tasks (default: the checkpoint's, else 0.5).
        n_boot, seed: bootstrap resamples and seed.

    Returns:
        ``{"checkpoint", "checkpoint_id", "labels", "n_slides", "tasks": {task: {"n", "threshold",
        "metrics": {metric: {"value", "ci_low", "ci_high"}}}}, "mean": {metric: value}, "flat": {...}}``
        (``mean`` averages the tasks; ``flat`` is ``summarize_tasks``' ``task/metric`` form).
    """
    from wsimil_core.engine.metrics import METRIC_NAMES, bootstrap_ci, compute_metrics, summarize_tasks

    dev = resolve_device(device)
    model, meta, source = _load(checkpoint, dev)
    frame, label_source = select_labelled(labels, split, slide_ids)
    tasks = task_names(meta)
    missing_cols = [t for t in tasks if t not in frame.columns]
    if missing_cols:
        raise DataError(
            f"{label_source}: no column for task(s) {missing_cols} of checkpoint {source} "
            f"(columns: {list(frame.columns)[:10]})"
        )
    preds = predict_store(
        (model, meta), store, slide_ids=frame["slide_id"].tolist(), device=dev, write_maps=False, progress=progress
    )
    preds = preds.set_index("slide_id")
    report_tasks: dict[str, Any] = {}
    per_task_values: dict[str, dict[str, float]] = {}
    for task in tasks:
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
        probs = preds.loc[rows, [f"{task}_prob_{c}" for c in names]].to_numpy(dtype=np.float64)
        keep = np.isfinite(probs).all(axis=1)
        if not keep.all():
            skipped = [r for r, k in zip(rows, keep) if not k]
            warnings.warn(f"task {task!r}: slides without patches are left out: {skipped[:5]}", stacklevel=2)
            probs, rows, y = probs[keep], [r for r, k in zip(rows, keep) if k], [v for v, k in zip(y, keep) if k]
            if not rows:
                raise DataError(f"{label_source}: no slide with patches for task {task!r}")
        y_arr = np.asarray(y, dtype=np.int64)
        t = threshold if threshold is not None else threshold_for(meta, task)
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
        "checkpoint_id": meta["checkpoint_id"],
        "method": meta.get("method"),
        "labels": label_source,
        "split": split,
        "n_slides": int(len(frame)),
        "n_boot": n_boot,
        "tasks": report_tasks,
        "mean": {m: flat[f"mean/{m}"] for m in METRIC_NAMES},
        "flat": flat,
    }


__all__ = [
    "BagPrediction",
    "predict_bag",
    "predict_store",
    "evaluate_store",
    "select_labelled",
    "task_names",
    "class_names_for",
    "threshold_for",
    "prediction_columns",
]
