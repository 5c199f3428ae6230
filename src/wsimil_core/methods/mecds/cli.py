"""``wsimil mecds extend``: add a task to a trained MECDS checkpoint (MECDS Sec. 3.4, task extension).

The extension is a run of the ordinary engine: :func:`extend_checkpoint` builds a ``mecds`` run config with one
``extend`` phase (``method.options.extend``: the checkpoint and the new task), on the checkpoint's cohort and split
(``data`` of its training config, the old targets first so a random split is the same), and trains it with the
engine's sampler, optimiser, epochs, early stopping (on the new task's validation AUC), checkpoints and metrics.
Every old parameter is frozen (checked bit for bit afterwards); the old tasks' metrics are reported before and
after on the same split. The engine's run directory (``<output stem>_run``: metrics.jsonl/csv, best checkpoint)
stays beside the output; the output is a normal checkpoint with M+1 tasks whose meta keeps the source's and adds
``extension``. Progress lines start with ``extend:``.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import typer

from wsimil_core._io import atomic_write_text
from wsimil_core.checkpoint_meta import (
    THRESHOLD_EXTENSION,
    THRESHOLD_YOUDEN_VAL,
    CheckpointMeta,
    TaskMeta,
    ThresholdMeta,
)
from wsimil_core.data.tables import read_table
from wsimil_core.engine.checkpoint import load_checkpoint, save_checkpoint
from wsimil_core.engine.config import validate_config
from wsimil_core.errors import CheckpointError, ConfigError, DataError
from wsimil_core.models.base import model_config_dict

app = typer.Typer(name="mecds", help="MECDS commands: add a task to a trained checkpoint.", no_args_is_help=True)


@dataclass
class ExtendResult:
    """Outcome of ``extend_checkpoint``.

    Attributes:
        checkpoint: the written checkpoint (M+1 tasks).
        task: the new task's name; ``target`` its labels column.
        eval_split: the split the metrics are computed on (test, else val, else train).
        before / after: ``{old task: metrics}`` of the old tasks on ``eval_split`` (same thresholds).
        new_task: metrics of the new task on ``eval_split``.
        frozen_identical: every old parameter and buffer is bit-identical after training.
        n_frozen: number of old tensors checked; ``n_new_params`` trainable scalars added.
        skipped_tasks: old tasks without a column in the labels CSV (not evaluated).
        history: one dict per epoch (``epoch``, ``loss``, ``val_auc`` of the new task when defined).
        run_dir: the engine's run directory of the extension.
        n_eval: slides in ``eval_split``; eval_classes: ``{task: classes present in eval_split}`` (AUC needs 2).
    """

    checkpoint: Path
    task: str
    target: str
    eval_split: str
    before: dict[str, dict[str, float]]
    after: dict[str, dict[str, float]]
    new_task: dict[str, float]
    frozen_identical: bool
    n_frozen: int
    n_new_params: int
    skipped_tasks: list[str] = field(default_factory=list)
    history: list[dict[str, float]] = field(default_factory=list)
    run_dir: Path | None = None
    n_eval: int | None = None
    eval_classes: dict[str, int] = field(default_factory=dict)


def extension_config(
    checkpoint: Path,
    meta: CheckpointMeta,
    labels: Path,
    targets: list[str],
    task: str,
    store: str | Path | None,
    run_dir: Path,
    *,
    epochs: int,
    lr: float,
    weight_decay: float,
    seed: int,
    device: str,
    balanced: bool,
    isolated: bool,
    progress: bool,
) -> Any:
    """The engine run config of an extension: the checkpoint's data section (store, split...) on ``labels`` with
    ``targets`` (old evaluable tasks, then ``task``), one ``extend`` phase, constant learning rate, early
    stopping on the new task's AUC."""
    data_cfg = dict((meta.train_config or {}).get("data") or {})
    store = store if store is not None else data_cfg.get("store")
    if store is None:
        raise ConfigError(f"{checkpoint}: the checkpoint names no feature store; pass --store")
    data_cfg.update(
        store=str(store),
        labels=str(labels),
        targets=targets,
        encoder=meta.encoder_id or data_cfg.get("encoder"),
        omics=None,
        missing_labels="skip",
    )
    extend = {"checkpoint": str(checkpoint), "task": task, "isolated": isolated, "balanced": balanced}
    return validate_config(
        {
            "method": {"name": "mecds", "options": {"phases": ["extend"], "extend": extend}},
            "data": data_cfg,
            "train": {
                "epochs": epochs,
                "lr": lr,
                "weight_decay": weight_decay,
                "scheduler": "none",
                "seed": seed,
                "device": device,
                "early_stopping": {"metric": f"{task}/auc" if len(targets) > 1 else "auc"},
            },
            "output": {"dir": str(run_dir), "progress": progress, "overwrite": True, "keep": ["best"]},
        },
        f"{checkpoint} (train_config)",
    )


def extend_checkpoint(
    checkpoint: str | Path,
    labels: str | Path,
    target: str,
    name: str | None = None,
    store: str | Path | None = None,
    output: str | Path | None = None,
    epochs: int = 10,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    seed: int = 0,
    device: str = "auto",
    balanced: bool = True,
    isolated: bool = True,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    run_dir: str | Path | None = None,
) -> ExtendResult:
    """Task extension of a trained ``mecds`` checkpoint (MECDS Sec. 3.4) through the engine.

    Adds task ``name`` (default: ``target``) trained on the ``target`` column of ``labels`` (class-balanced on
    that column by default); old tasks whose columns are in ``labels`` are evaluated before and after on the
    same split (test, else val, else train) with their stored thresholds; the new task's threshold is chosen on
    validation. ``isolated`` (default) keeps the old tasks' predictions exactly unchanged; ``isolated=False``
    adds the new experts' updates to the shared patch stream as the paper's DFR does.

    Progress lines (``extend: ...``) go to ``log`` (default: stdout, flushed) so a parent process can follow.
    Returns an ``ExtendResult``; the checkpoint (``output``, default ``<ckpt>_ext_<name>.safetensors``) is a
    normal checkpoint with M+1 tasks; ``run_dir`` (default ``<output stem>_run``) holds the engine's run.
    """
    # The trainer (and all it imports) loads when a task is added, not when `wsimil --help` imports this module.
    from wsimil_core.engine.trainer import Trainer

    say = log or (lambda s: print(s, flush=True))
    checkpoint = Path(checkpoint)
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"extend: epochs must be a positive integer, got {epochs!r}")
    old_model, meta = load_checkpoint(checkpoint)
    if meta.model_name != "mecds":
        raise CheckpointError(f"{checkpoint}: task extension needs a 'mecds' checkpoint, not {meta.model_name!r}")
    name = name or target
    old_cfg: Any = old_model.config
    old_tasks = list(old_cfg.tasks)
    if name in old_tasks:
        raise ConfigError(f"{checkpoint}: the model already has a task {name!r}; choose another --name")
    frame, source = read_table(labels, "labels")
    if target not in frame.columns:
        raise DataError(f"{source}: no column {target!r} (columns: {list(frame.columns)})")
    evaluable = [t for t in old_tasks if t in frame.columns and t != target]
    skipped = [t for t in old_tasks if t not in evaluable]
    output = Path(output) if output is not None else checkpoint.with_name(f"{checkpoint.stem}_ext_{name}.safetensors")
    run = Path(run_dir) if run_dir is not None else output.with_name(f"{output.stem}_run")
    labels_path = Path(labels)
    if name != target:  # the engine names a task after its column: a copy of the table with the column renamed
        run.mkdir(parents=True, exist_ok=True)
        labels_path = run / "labels.csv"
        renamed = frame.drop(columns=[name], errors="ignore").rename(columns={target: name})
        atomic_write_text(labels_path, renamed.to_csv(index=False))
    cfg = extension_config(
        checkpoint,
        meta,
        labels_path,
        evaluable + [name],
        name,
        store,
        run,
        epochs=epochs,
        lr=lr,
        weight_decay=weight_decay,
        seed=seed,
        device=device,
        balanced=balanced,
        isolated=isolated,
        progress=progress,
    )
    history: list[dict[str, float]] = []
    val_key = f"val/{name}/auc" if evaluable else "val/auc"

    def epoch_line(record: dict[str, Any]) -> None:
        row = {"epoch": record["epoch"] + 1, "loss": float(record["train/loss"])}
        auc = record.get(val_key)
        if auc is not None and math.isfinite(auc):
            row["val_auc"] = float(auc)
        history.append(row)
        say(
            f"extend: epoch {row['epoch']}/{epochs} loss {row['loss']:.4f}"
            + (f" val_auc {row['val_auc']:.4f}" if "val_auc" in row else "")
        )

    trainer = Trainer(cfg, callbacks=[epoch_line], resume=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*has no value in column")  # unlabelled slides are skipped
        trainer.build()
    train_ds, val_ds, test_ds = trainer.data["train"], trainer.data["val"], trainer.data["test"]
    assert train_ds is not None  # build_datasets always returns a training split
    eval_name, eval_ds = ("test", test_ds) if test_ds is not None else ("val", val_ds)
    if eval_ds is None:
        eval_name, eval_ds = "train", train_ds
    if eval_name == "train":
        warnings.warn("extend: no val or test split; old-task metrics are computed on the training bags", stacklevel=2)
    n_classes = len(trainer.full.class_names[name])
    say(
        f"extend: {checkpoint.name} tasks {old_tasks} + {name!r} ({n_classes} classes, column {target!r}); "
        f"{len(train_ds)} train / {len(val_ds) if val_ds else 0} val / {len(eval_ds)} {eval_name} bags"
    )
    if val_ds is not None and len(set(val_ds.labels(name).tolist())) < 2:
        say(f"extend: the validation split has one class of {target!r} only; epochs are compared on validation loss")
    thresholds = {t: meta.threshold(t) for t in old_tasks}
    old_thr = {t: thresholds[t] for t in evaluable}
    before: dict[str, dict[str, float]] = {}
    if evaluable:
        before = trainer.task_metrics(eval_ds, old_thr, trainer.method.inference_model(), evaluable)[0]
    for t, m in before.items():
        say(f"extend: before {t}: auc {m['auc']:.4f} sensitivity {m['sensitivity']:.4f}")

    result = trainer.fit()
    model, best_meta = load_checkpoint(result.best_checkpoint or run / "best.safetensors", device=trainer.device)
    old_state = {k: v.detach().cpu() for k, v in old_model.state_dict().items()}
    now = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    changed = [k for k, v in old_state.items() if now[k].shape != v.shape or not torch.equal(now[k], v)]
    if changed:
        raise RuntimeError(f"extend: old parameters changed during training: {changed[:5]}")
    say(f"extend: {len(old_state)} old tensors bit-identical: True")
    thresholds[name] = float(result.thresholds.get(name, 0.5))
    after: dict[str, dict[str, float]] = {}
    if evaluable:
        after = trainer.task_metrics(eval_ds, old_thr, model, evaluable)[0]
    new_metrics = trainer.task_metrics(eval_ds, thresholds, model, [name])[0][name]
    for t, m in after.items():
        say(f"extend: after {t}: auc {m['auc']:.4f} (before {before[t]['auc']:.4f}) sensitivity {m['sensitivity']:.4f}")
    say(f"extend: new task {name}: auc {new_metrics['auc']:.4f} sensitivity {new_metrics['sensitivity']:.4f}")

    # how the run chose it (train.threshold: tuned only on a large enough validation split), marked as extension
    chosen = best_meta.tasks[name].threshold
    tuned = chosen.method == THRESHOLD_YOUDEN_VAL
    new_threshold = ThresholdMeta(
        value=thresholds[name], method=THRESHOLD_EXTENSION if tuned else chosen.method, n_slides=chosen.n_slides
    )
    tasks = {**meta.tasks, name: TaskMeta(class_names=list(trainer.full.class_names[name]), threshold=new_threshold)}
    metrics = {f"{t}/{k}": v for t, m in after.items() for k, v in m.items()}
    metrics.update({f"{name}/{k}": v for k, v in new_metrics.items()})
    metrics.update({f"before/{t}/{k}": v for t, m in before.items() for k, v in m.items()})
    extension = {
        "task": name,
        "target_column": target,
        "labels": str(labels),
        "source_checkpoint": str(checkpoint),
        "source_checkpoint_id": meta.checkpoint_id,
        "eval_split": eval_name,
        "epochs": epochs,
        "best_epoch": result.best_epoch,
        "lr": lr,
        "seed": seed,
        "frozen_identical": True,
        "isolated": isolated,
        "run_dir": str(run),
        "history": history,
    }
    out_meta = meta.model_copy(
        update={
            "model_kwargs": model_config_dict(model),
            "tasks": tasks,
            "metrics": metrics,
            "map_specs": [],  # refilled from the extended model
            "checkpoint_id": None,
            "extras": {**meta.extras, "extension": extension},
        }
    )
    written = save_checkpoint(output, model, out_meta)
    say(f"extend: wrote {output} (checkpoint {written.checkpoint_id})")
    return ExtendResult(
        checkpoint=output,
        task=name,
        target=target,
        eval_split=eval_name,
        before=before,
        after=after,
        new_task=new_metrics,
        frozen_identical=True,
        n_frozen=len(old_state),
        n_new_params=sum(p.numel() for k, p in model.named_parameters() if k not in old_state),
        skipped_tasks=skipped,
        history=history,
        run_dir=run,
        n_eval=len(eval_ds),
        eval_classes={t: len({int(v) for v in eval_ds.labels(t).tolist() if v >= 0}) for t in [*evaluable, name]},
    )


@app.command("extend")
def extend_command(
    checkpoint: Path = typer.Argument(..., help="Trained mecds checkpoint (*.safetensors)."),
    labels: Path = typer.Option(..., "--labels", help="Labels CSV with slide_id and the new task's column."),
    target: str = typer.Option(..., "--target", help="Column of the labels CSV holding the new task's labels."),
    name: str | None = typer.Option(None, "--name", help="Name of the new task (default: the column name)."),
    store: Path | None = typer.Option(
        None, "--store", help="Feature store (default: the store the checkpoint was trained on)."
    ),
    output: Path | None = typer.Option(
        None, "--output", "-o", help="Output checkpoint (default: <checkpoint>_ext_<name>.safetensors)."
    ),
    run_dir: Path | None = typer.Option(
        None, "--run-dir", help="The engine's run directory (default: <output stem>_run beside the output)."
    ),
    epochs: int = typer.Option(10, "--epochs", min=1, help="Training epochs of the new components."),
    lr: float = typer.Option(1e-3, "--lr", help="Learning rate of the new components (AdamW)."),
    seed: int = typer.Option(0, "--seed", help="Random seed (initialisation and bag order)."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when available), cpu, cuda, cuda:N."),
    balanced: bool = typer.Option(True, "--balanced/--no-balanced", help="Class-balanced bag sampling."),
    isolated: bool = typer.Option(
        True,
        "--isolated/--shared-stream",
        help="Keep the new experts' patch updates out of the shared patch stream (old tasks' predictions stay "
        "exactly the same); --shared-stream adds them back as the paper's DFR does.",
    ),
    json_out: Path | None = typer.Option(None, "--json", help="Also write the before/after report as JSON."),
) -> None:
    """Add a task to a mecds checkpoint; old parameters stay bit-identical; old tasks' metrics before/after."""
    result = extend_checkpoint(
        checkpoint,
        labels,
        target,
        name=name,
        store=store,
        output=output,
        epochs=epochs,
        lr=lr,
        seed=seed,
        device=device,
        balanced=balanced,
        isolated=isolated,
        run_dir=run_dir,
    )
    typer.echo(f"{'task':<16} {'auc before':>10} {'auc after':>10} {'sens before':>11} {'sens after':>10}")
    for task, m in result.after.items():
        b = result.before[task]
        typer.echo(
            f"{task:<16} {b['auc']:>10.4f} {m['auc']:>10.4f} {b['sensitivity']:>11.4f} {m['sensitivity']:>10.4f}"
        )
    n = result.new_task
    typer.echo(f"{result.task + ' (new)':<16} {'':>10} {n['auc']:>10.4f} {'':>11} {n['sensitivity']:>10.4f}")
    if result.skipped_tasks:
        typer.echo(f"not evaluated (no column in {labels.name}): {', '.join(result.skipped_tasks)}")
    typer.echo(f"metrics on the {result.eval_split} split; old parameters bit-identical: {result.frozen_identical}")
    typer.echo(f"wrote {result.checkpoint}")
    if json_out is not None:
        report = {
            "checkpoint": str(result.checkpoint),
            "task": result.task,
            "target": result.target,
            "eval_split": result.eval_split,
            "before": result.before,
            "after": result.after,
            "new_task": result.new_task,
            "frozen_identical": result.frozen_identical,
            "skipped_tasks": result.skipped_tasks,
            "history": result.history,
            "run_dir": str(result.run_dir),
            "n_eval": result.n_eval,
            "eval_classes": result.eval_classes,
        }
        atomic_write_text(Path(json_out), json.dumps(report, indent=2, allow_nan=True))


__all__ = ["ExtendResult", "extend_checkpoint", "extension_config"]
