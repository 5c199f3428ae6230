"""What a run writes besides its resume file: checkpoints with their typed metadata, ``metrics.jsonl`` /
``metrics.csv`` (one record per epoch), ``config.yaml``, ``result.json`` (:class:`RunResult`) and the console's
epoch line.

Run directory (``output.dir``): ``best.safetensors``, ``last.safetensors``, ``metrics.csv``, ``metrics.jsonl``,
``resume.safetensors`` (``engine.resume``), ``result.json`` (when finished), ``config.yaml``, and ``.wsimil-lock``
(:func:`lock_run_dir`: the OS lock that keeps a second run out while one runs).
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from torch import nn

import wsimil_core
from wsimil_core._io import atomic_write_text
from wsimil_core.checkpoint_meta import (
    DEFAULT_THRESHOLD,
    THRESHOLD_DEFAULT,
    THRESHOLD_FEW_SLIDES,
    THRESHOLD_FIXED,
    THRESHOLD_YOUDEN_VAL,
    CheckpointMeta,
    EncoderMeta,
    FeatureStatsMeta,
    GridMeta,
    StoreRef,
    TaskMeta,
    ThresholdMeta,
)
from wsimil_core.data.dataset import BagDataset
from wsimil_core.engine.checkpoint import save_checkpoint
from wsimil_core.engine.config import TrainConfig
from wsimil_core.engine.distributed import dist_info
from wsimil_core.locks import hold_folder
from wsimil_core.models.base import model_config_dict

SURVIVAL_THRESHOLD = "median validation risk"
BEST_FILE = "best.safetensors"
LAST_FILE = "last.safetensors"


@dataclass
class RunResult:
    """Outcome of one training run.

    Attributes:
        run_dir: the run directory.
        best_checkpoint / last_checkpoint: checkpoint paths (None when not kept).
        best_epoch: global epoch (0-based) of the best validation metric.
        val_metrics: validation metrics at the best epoch (``"auc"`` ... or ``"task/auc"``, ``"mean/auc"``).
        test_metrics: metrics of the best model on the test split (empty without one), at the validation
            threshold.
        thresholds: ``{task: threshold}`` chosen on validation.
        history: one dict per epoch (also in metrics.csv / metrics.jsonl).
        stopped_early: whether early stopping ended the last phase.
        resumed: whether this run continued from a resume file.
    """

    run_dir: Path
    best_checkpoint: Path | None
    last_checkpoint: Path | None
    best_epoch: int | None
    val_metrics: dict[str, float]
    test_metrics: dict[str, float]
    thresholds: dict[str, float]
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped_early: bool = False
    resumed: bool = False

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        for k in ("run_dir", "best_checkpoint", "last_checkpoint"):
            out[k] = None if out[k] is None else str(out[k])
        return out


# --- the run folder's lock ----------------------------------------------------------------------------------


@contextmanager
def lock_run_dir(run_dir: Path) -> Iterator[None]:
    """Create ``run_dir`` and hold its lock for the body (only rank 0 of a ``torchrun`` launch, the one that
    writes). The OS drops the lock when the process ends, however it ends.

    Raises:
        LockError: another run (of ``wsimil train``, ``crossval`` or the napari dock) holds the folder; the one
            line names its pid, host, start time and command.
    """
    if dist_info()[0] != 0:
        yield
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    with hold_folder(run_dir, "run folder", "wait for that run to end, or choose another output.dir (--output)"):
        yield


# --- checkpoints ---------------------------------------------------------------------------------------------


ThresholdPlan = dict[str, tuple[str, int | None]]


def threshold_plan(
    config: TrainConfig, val: BagDataset | None, targets: list[str], survival: Collection[str] = ()
) -> ThresholdPlan:
    """How each task's threshold is chosen, and on how many validation slides: ``{task: (method, n_slides)}``.

    A number in ``train.threshold`` fixes it; ``val`` tunes Youden's J on the validation split; ``auto`` (the
    default) tunes only when the validation split's smaller class has at least ``train.threshold_min_slides``
    slides, and otherwise keeps 0.5: a threshold tuned on a handful of slides costs accuracy on new data.
    Without a validation split the threshold is 0.5. A survival task (``survival``) splits high from low risk at
    the median validation risk, whatever ``train.threshold`` says.
    """
    choice = config.train.threshold
    plan: ThresholdPlan = {}
    for t in targets:
        if t in survival:
            plan[t] = (SURVIVAL_THRESHOLD, len(val)) if val is not None else (THRESHOLD_DEFAULT, None)
        elif choice not in ("auto", "val"):
            plan[t] = (THRESHOLD_FIXED, None)
        elif val is None:
            plan[t] = (THRESHOLD_DEFAULT, None)
        elif choice == "val" or smaller_class_count(val, t) >= config.train.threshold_min_slides:
            plan[t] = (THRESHOLD_YOUDEN_VAL, len(val))
        else:
            plan[t] = (THRESHOLD_FEW_SLIDES, len(val))
    return plan


def smaller_class_count(ds: BagDataset, target: str) -> int:
    """Slides of the rarer class of ``target`` in ``ds`` (0 when a class is missing; binary tasks)."""
    counts = np.bincount(ds.labels(target), minlength=2)
    return int(counts.min())


def fixed_thresholds(config: TrainConfig, plan: ThresholdPlan) -> dict[str, float]:
    """The thresholds the plan does not tune: ``{task: value}`` (tasks left out are tuned on validation)."""
    value = DEFAULT_THRESHOLD if config.train.threshold in ("auto", "val") else float(config.train.threshold)
    return {t: value for t, (how, _) in plan.items() if how not in (THRESHOLD_YOUDEN_VAL, SURVIVAL_THRESHOLD)}


def describe_thresholds(config: TrainConfig, plan: ThresholdPlan) -> str:
    """One log line saying how the decision thresholds are chosen."""
    parts = []
    for t, (how, n) in plan.items():
        name = "" if len(plan) == 1 else f"{t}: "
        if how == SURVIVAL_THRESHOLD:
            parts.append(f"{name}high/low risk split at the median risk of {n} validation slides")
        elif how == THRESHOLD_YOUDEN_VAL:
            parts.append(f"{name}tuned on {n} validation slides (Youden's J)")
        elif how == THRESHOLD_FEW_SLIDES:
            parts.append(
                f"{name}0.5: the validation split has fewer than {config.train.threshold_min_slides} slides of a "
                "class, too few to tune it (train.threshold: val tunes anyway)"
            )
        elif how == THRESHOLD_FIXED:
            parts.append(f"{name}{float(config.train.threshold):g} (train.threshold)")
        else:
            parts.append(f"{name}0.5 (no validation split)")
    return "decision threshold: " + "; ".join(parts)


def checkpoint_meta(
    config: TrainConfig,
    model: nn.Module,
    cohort: BagDataset,
    metrics: dict[str, float],
    thresholds: dict[str, float],
    plan: ThresholdPlan,
    epoch: int,
    feature_stats: FeatureStatsMeta | None = None,
) -> CheckpointMeta:
    """The metadata of a checkpoint of ``model`` (the inference model) at global epoch ``epoch``.

    Args:
        cohort: the opened cohort (class names, encoder attrs, the first slide's grid attrs, the store).
        metrics: validation metrics of the epoch; thresholds: ``{task: threshold}`` used;
        plan: ``{task: (method, n_slides)}`` of :func:`threshold_plan`;
        feature_stats: the input standardisation the model was trained with (None: raw features).
    """
    tasks = {
        t: TaskMeta(
            class_names=[str(c) for c in cohort.class_names[t]],
            threshold=ThresholdMeta(value=float(thresholds[t]), method=plan[t][0], n_slides=plan[t][1]),
        )
        for t in config.data.targets
    }
    survival = {  # what inference needs to read a survival task's outputs (docs/survival.md)
        t: {**spec.model_dump(), "cuts": list(cohort.survival_cuts.get(t, []))} for t, spec in cohort.survival.items()
    }
    encoder = EncoderMeta.model_validate({"encoder_id": cohort.encoder_id, **cohort.encoder_attrs})
    store_root = Path(cohort.store.root).resolve()
    return CheckpointMeta(
        method=config.method.name,
        model_name=str(getattr(model, "model_name")),  # noqa: B009  (set on every registered model class)
        model_kwargs=model_config_dict(model),
        tasks=tasks,
        encoder=encoder,
        grid=GridMeta.from_slide_attrs(cohort.first_slide_attrs),
        train_config=config.to_json(),
        metrics={**metrics, "epoch": epoch},
        store=StoreRef(path=str(store_root), encoder_id=cohort.encoder_id),
        feature_stats=feature_stats,
        version=wsimil_core.__version__,
        extras={"survival": survival} if survival else {},
    )


def save_run_checkpoint(run_dir: Path, name: str, model: nn.Module, meta: CheckpointMeta) -> Path:
    """Write ``run_dir/name`` (``best.safetensors`` / ``last.safetensors``)."""
    path = run_dir / name
    save_checkpoint(path, model, meta)
    return path


# --- metrics, config, result ---------------------------------------------------------------------------------


def write_history(run_dir: Path, history: list[dict[str, Any]], jsonl: bool = True) -> None:
    """Rewrite ``metrics.jsonl`` (one JSON record per epoch; unless ``jsonl=False``) and ``metrics.csv``
    (atomic)."""
    if jsonl:
        lines = "".join(json.dumps(r, allow_nan=True) + "\n" for r in history)
        atomic_write_text(run_dir / "metrics.jsonl", lines)
    atomic_write_text(run_dir / "metrics.csv", pd.DataFrame(history).to_csv(index=False))


def write_config(run_dir: Path, config: TrainConfig) -> None:
    """``config.yaml``: the validated config of the run."""
    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(config.to_json(), sort_keys=False))


def write_result(run_dir: Path, result: RunResult) -> None:
    """``result.json``: the :class:`RunResult` of a finished run."""
    atomic_write_text(run_dir / "result.json", json.dumps(result.to_json(), indent=2, allow_nan=True))


def epoch_line(record: dict[str, Any], metric: str) -> str:
    """The console line of one epoch record: loss, validation loss and the tracked metric, ``(best)``."""
    parts = [f"{record['phase']} epoch {record['epoch'] + 1}", f"loss {record.get('train/loss', float('nan')):.4f}"]
    for key in ("val/loss", f"val/{metric}", f"val/mean/{metric}", "val/auc", "val/accuracy", "val/c_index"):
        if key in record and not any(p.startswith(key + " ") for p in parts):
            parts.append(f"{key} {record[key]:.4f}")
    if record.get("best"):
        parts.append("(best)")
    return "  ".join(parts)
