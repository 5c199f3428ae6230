"""MECDS training recipe: teacher on balanced data, then a student distilled with asymmetric KD (Sec. 2.3).

Phases (``options.phases``, default both, in this order):

* ``teacher``: a ``mecds`` model trained on a class-balanced resampling of the training bags (the engine's
  balanced sampler balances every task's classes), loss ``sum_m CE_m``.
* ``student``: a second ``mecds`` model of the same architecture trained on the full (imbalanced) set with the
  teacher frozen, loss ``sum_m (CE_m + distill_weight * L_KD,m)`` where ``L_KD`` is AKD (Eq. 1-2,
  ``functional.akd_loss``) for binary tasks, or plain KL distillation (``distill: kl``, the paper's Table 2
  ablation; also used for tasks with more than two classes, where AKD is undefined).

One run does both phases; ``phases: [teacher]`` trains a teacher only (its checkpoint is the teacher), and
``phases: [student]`` with ``teacher_checkpoint`` distils from a teacher trained earlier. The inference model
(validation, checkpoints) is the model of the current phase.

Task extension (Sec. 3.4): ``extend_checkpoint`` (CLI ``wsimil extend``) adds a task to a trained checkpoint
(a task token, a head, and a router + expert in every MFA module), trains only the new parameters, proves every
old parameter bit-identical, and reports the old tasks' metrics before and after on the same split.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator
from torch import Tensor, nn

import wsimil_core.methods.mecds.model  # noqa: F401  (registers the "mecds" model)
from wsimil_core.checkpoint_meta import THRESHOLD_DEFAULT, THRESHOLD_EXTENSION, TaskMeta, ThresholdMeta
from wsimil_core.data.bag import BagBatch
from wsimil_core.errors import CheckpointError, ConfigError, DataError
from wsimil_core.functional.distill import akd_loss, kd_kl_loss
from wsimil_core.methods.base import Method, MethodOptions, register_method
from wsimil_core.models.base import create_model

PhaseName = Literal["teacher", "student"]


class MECDSOptions(MethodOptions):
    """MECDS options (model hyper-parameters such as ``dim``, ``n_modules``, ``top_p`` go under ``model``)."""

    phases: list[PhaseName] = Field(
        default_factory=lambda: ["teacher", "student"],
        description="Phases to run, in order: [teacher, student] (both), [teacher] or [student] "
        "(student alone needs teacher_checkpoint).",
    )
    distill: Literal["akd", "kl", "none"] = Field(
        "akd", description="Student distillation loss: akd (asymmetric KD, Eq. 1-2), kl (plain KD) or none."
    )
    distill_weight: float = Field(1.0, ge=0, description="Weight of the distillation term added to the student CE.")
    temperature: float = Field(2.0, gt=0, description="Distillation temperature T (Eq. 1).")
    gamma_pos: float = Field(1.0, ge=0, description="AKD exponent of the positive weight (1 - p)^gamma_pos (Eq. 2).")
    gamma_neg: float = Field(4.0, ge=0, description="AKD exponent of the negative weight max(p_hat - m, 0)^gamma_neg.")
    margin: float = Field(0.2, ge=0, lt=1, description="AKD teacher-probability margin m of the negative weight.")
    teacher_checkpoint: str | None = Field(
        None, description="Checkpoint of a trained mecds teacher (required when phases is [student])."
    )
    init_student_from_teacher: bool = Field(
        False, description="Start the student from the teacher's weights instead of a random initialisation."
    )

    @field_validator("phases")
    @classmethod
    def _phases(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("at least one phase is needed")
        if len(set(v)) != len(v) or (v != ["teacher", "student"] and len(v) == 2):
            raise ValueError("phases must be [teacher, student], [teacher] or [student]")
        return v

    @model_validator(mode="after")
    def _teacher_source(self) -> MECDSOptions:
        if self.phases == ["student"] and not self.teacher_checkpoint:
            raise ValueError("phases [student] needs teacher_checkpoint (a teacher trained with phases [teacher])")
        if "teacher" in self.phases and self.teacher_checkpoint:
            raise ValueError("teacher_checkpoint is only used with phases [student]; remove one of them")
        return self


def load_teacher(path: str | Path, tasks: dict[str, int], in_dim: int) -> nn.Module:
    """Load a ``mecds`` teacher checkpoint and check that it fits the student's tasks and feature dimension."""
    from wsimil_core.engine.checkpoint import load_checkpoint

    model, meta = load_checkpoint(path)
    if meta.model_name != "mecds":
        raise CheckpointError(f"{path}: teacher_checkpoint holds a {meta.model_name!r} model, not 'mecds'")
    if dict(model.config.tasks) != dict(tasks) or model.config.in_dim != in_dim:
        raise CheckpointError(
            f"{path}: the teacher has tasks {model.config.tasks} and in_dim {model.config.in_dim}, but the "
            f"student has tasks {tasks} and in_dim {in_dim}"
        )
    return model


@register_method
class MECDSMethod(Method):
    """MECDS: teacher (balanced CE) then student (CE + asymmetric KD); one ``mecds`` model per role."""

    name = "mecds"
    model_name = "mecds"
    options_cls = MECDSOptions

    def __init__(self, model: dict[str, Any], options: dict[str, Any] | MECDSOptions | None = None):
        super().__init__(model, options)
        o = self.options
        self.phases = tuple(o.phases)  # instance attribute read by the engine
        cfg = self.model.config
        if o.teacher_checkpoint:
            self.teacher = load_teacher(o.teacher_checkpoint, cfg.tasks, cfg.in_dim)
        else:
            self.teacher = create_model(self.model_name, **model)
        self._phase: str = self.phases[0]
        self._routed: dict[str, list[float]] = {}
        if self.phases == ("student",):
            self.teacher.requires_grad_(False)

    # --- phases -------------------------------------------------------------------------------------------
    def _net(self, phase: str) -> nn.Module:
        return self.teacher if phase == "teacher" else self.model

    def setup_phase(self, phase: str, train_data: Any) -> None:
        """Teacher: train the teacher. Student: freeze the teacher (optionally copy it into the student)."""
        if phase not in ("teacher", "student"):
            raise ConfigError(f"method 'mecds': unknown phase {phase!r}")
        self._phase = phase
        if phase == "student":
            self.teacher.requires_grad_(False)
            self.teacher.eval()
            if self.options.init_student_from_teacher:
                self.model.load_state_dict(self.teacher.state_dict())
        else:
            self.teacher.requires_grad_(True)

    def trainable_parameters(self, phase: str) -> Iterable[nn.Parameter]:
        return [p for p in self._net(phase).parameters() if p.requires_grad]

    def balanced_sampling(self, phase: str) -> bool:
        """The teacher sees a class-balanced resampling of the training set; the student the full set."""
        return phase == "teacher"

    def inference_model(self) -> nn.Module:
        """The model of the current phase (the teacher during the teacher phase, then the student)."""
        return self._net(self._phase)

    # --- steps --------------------------------------------------------------------------------------------
    def _distill(self, student: Tensor, teacher: Tensor) -> Tensor:
        o = self.options
        if o.distill == "akd" and student.shape[-1] == 2:
            return akd_loss(student, teacher, o.temperature, o.gamma_pos, o.gamma_neg, o.margin)
        return kd_kl_loss(student, teacher, o.temperature)

    def training_step(self, batch: BagBatch, phase: str) -> dict[str, Tensor]:
        """``sum_m CE_m`` (teacher) or ``sum_m CE_m + distill_weight * L_KD,m`` (student) for one bag."""
        net = self._net(phase)
        out = net(batch.features, coords=batch.coords)
        tasks = [t for t in batch.targets if t in out.logits]
        if not tasks:
            raise DataError(
                f"mecds: bag {batch.slide_id!r} has targets {sorted(batch.targets)} but the model's tasks are "
                f"{sorted(out.logits)}"
            )
        logs: dict[str, Tensor] = {}
        ce_total = 0.0
        for t in tasks:
            y = batch.targets[t].view(-1).to(out.logits[t].device)
            ce = F.cross_entropy(out.logits[t].float(), y)
            ce_total = ce_total + ce
            logs[f"ce_{t}"] = ce.detach()
        loss = ce_total
        if phase == "student" and self.options.distill != "none" and self.options.distill_weight > 0:
            self.teacher.eval()
            with torch.no_grad():
                t_out = self.teacher(batch.features, coords=batch.coords)
            kd_total = 0.0
            for t in tasks:
                kd = self._distill(out.logits[t], t_out.logits[t])
                kd_total = kd_total + kd
                logs[f"kd_{t}"] = kd.detach()
            loss = loss + self.options.distill_weight * kd_total
            logs["kd"] = kd_total.detach()
        for t, frac in out.extras.get("routed_fraction", {}).items():
            self._routed.setdefault(t, []).append(float(frac.mean()))
        return {"loss": loss, "ce": ce_total.detach(), **logs}

    def epoch_end(self, phase: str, epoch: int) -> dict[str, float]:
        """Mean fraction of patches each task's experts processed this epoch (DFR's saving)."""
        logs = {f"routed_{t}": float(np.mean(v)) for t, v in self._routed.items() if v}
        self._routed = {}
        return logs


# --- task extension (Sec. 3.4) ---------------------------------------------------------------------------------


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
        history: one dict per epoch (loss, validation AUC of the new task).
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


def extend_model(model: nn.Module, name: str, n_classes: int, isolated: bool = True) -> list[nn.Parameter]:
    """Add task ``name`` to a ``mecds`` model and freeze every existing parameter; returns the new parameters.

    ``isolated`` (default) keeps the new experts' patch updates out of the shared patch stream, so the old tasks'
    outputs stay exactly the same (see ``MECDS.add_task``).
    """
    model.requires_grad_(False)
    new = model.add_task(name, n_classes, isolated=isolated)
    for p in new:
        p.requires_grad_(True)
    return new


def _new_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of the last task (head, and the router and expert of every MFA module)."""
    mods = [model.heads[len(model.heads) - 1]]
    for module in model.mfa:
        mods += [module.routers[len(module.routers) - 1], module.experts[len(module.experts) - 1]]
    return mods


@torch.no_grad()
def _predict(model: nn.Module, ds: Any, tasks: dict[str, str], device: torch.device) -> dict[str, np.ndarray]:
    """Softmax probabilities ``{model task: [B, C]}`` of every bag of ``ds`` (eval mode)."""
    was = model.training
    model.eval()
    out: dict[str, list[np.ndarray]] = {t: [] for t in tasks}
    try:
        for i in range(len(ds)):
            bag = ds[i].to(device)
            logits = model(bag.features, coords=bag.coords).logits
            for t in tasks:
                out[t].append(torch.softmax(logits[t].float(), dim=-1)[0].cpu().numpy())
    finally:
        model.train(was)
    return {t: np.stack(v) for t, v in out.items()}


def _metrics(model, ds, tasks: dict[str, str], thresholds: dict[str, float], device) -> dict[str, dict[str, float]]:
    """``{model task: metrics}``; ``tasks`` maps model task -> labels column."""
    from wsimil_core.engine.metrics import compute_metrics

    probs = _predict(model, ds, tasks, device)
    return {t: compute_metrics(ds.labels(col), probs[t], thresholds.get(t, 0.5)) for t, col in tasks.items()}


def _state_snapshot(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


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
) -> ExtendResult:
    """Task extension of a trained ``mecds`` checkpoint (MECDS Sec. 3.4).

    Adds task ``name`` (default: ``target``) with a task token, a head, and a router + expert in every MFA
    module, freezes every existing parameter, and trains only the new ones with CE on the ``target`` column of
    ``labels`` (class-balanced sampling by default). The cohort is split as in the checkpoint's training config
    (``data.split``; the old targets first, so a random split is the same as in training); the new task's
    best epoch is chosen on validation AUC. Old tasks whose columns are in ``labels`` are evaluated before and
    after on the same split (test, else val, else train) with their stored thresholds. Every old tensor is
    compared bit for bit after training. ``isolated`` (default) keeps the new task's expert updates out of the
    shared patch stream so the old tasks' predictions are exactly unchanged; ``isolated=False`` adds them back
    as the paper's DFR does (old tasks may then move slightly).

    Progress lines (``extend: ...``) go to ``log`` (default: stdout, flushed) so a parent process can follow.

    Returns an ``ExtendResult``; the checkpoint (``output``, default ``<ckpt>_ext_<name>.safetensors``) is a
    normal checkpoint with M+1 tasks.
    """
    from tqdm.auto import tqdm

    from wsimil_core.data.sampling import make_sampler
    from wsimil_core.devices import resolve_device
    from wsimil_core.engine.checkpoint import load_checkpoint, save_checkpoint
    from wsimil_core.engine.config import validate_config
    from wsimil_core.engine.metrics import choose_threshold, compute_metrics
    from wsimil_core.engine.trainer import build_datasets, seed_everything
    from wsimil_core.models.base import model_config_dict

    say = log or (lambda s: print(s, flush=True))
    checkpoint = Path(checkpoint)
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"extend: epochs must be a positive integer, got {epochs!r}")
    dev = resolve_device(device)
    model, meta = load_checkpoint(checkpoint, device=dev)
    if meta.model_name != "mecds":
        raise CheckpointError(f"{checkpoint}: task extension needs a 'mecds' checkpoint, not {meta.model_name!r}")
    name = name or target
    old_tasks = list(model.config.tasks)
    if name in old_tasks:
        raise ConfigError(f"{checkpoint}: the model already has a task {name!r}; choose another --name")

    # --- data: the checkpoint's split, old targets first --------------------------------------------------
    from wsimil_core.data.dataset import read_table

    frame, source = read_table(labels, "labels")
    if target not in frame.columns:
        raise DataError(f"{source}: no column {target!r} (columns: {list(frame.columns)})")
    evaluable = [t for t in old_tasks if t in frame.columns and t != target]
    skipped = [t for t in old_tasks if t not in evaluable]
    train_cfg = dict(meta.train_config or {})
    data_cfg = dict(train_cfg.get("data") or {})
    store = store if store is not None else data_cfg.get("store")
    if store is None:
        raise ConfigError(f"{checkpoint}: the checkpoint names no feature store; pass --store")
    data_cfg.update(
        store=str(store),
        labels=str(labels),
        targets=evaluable + [target],
        encoder=meta.encoder_id or data_cfg.get("encoder"),
        omics=None,
        missing_labels="skip",
    )
    cfg = validate_config(
        {"data": data_cfg, "train": {"seed": seed, "device": "cpu"}, "output": {"progress": progress}},
        f"{checkpoint} (train_config)",
    )
    seed_everything(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # slides without a label in some column are skipped
        full, parts, _ = build_datasets(cfg)
    n_classes = len(full.class_names[target])
    train_ds, val_ds = parts["train"], parts["val"]
    eval_name = "test" if parts["test"] is not None else ("val" if val_ds is not None else "train")
    eval_ds = parts[eval_name]
    if eval_name == "train":
        warnings.warn("extend: no val or test split; old-task metrics are computed on the training bags", stacklevel=2)
    columns = {t: t for t in evaluable}
    thresholds = {t: meta.threshold(t) for t in old_tasks}
    say(
        f"extend: {checkpoint.name} tasks {old_tasks} + {name!r} ({n_classes} classes, column {target!r}); "
        f"{len(train_ds)} train / {len(val_ds) if val_ds else 0} val / {len(eval_ds)} {eval_name} bags"
    )
    before = _metrics(model, eval_ds, columns, thresholds, dev)
    for t, m in before.items():
        say(f"extend: before {t}: auc {m['auc']:.4f} sensitivity {m['sensitivity']:.4f}")

    # --- extend and train the new parameters only ----------------------------------------------------------
    old_state = _state_snapshot(model)
    torch.manual_seed(seed)
    new_params = extend_model(model, name, n_classes, isolated=isolated)
    opt = torch.optim.AdamW(new_params, lr=lr, weight_decay=weight_decay)
    new_modules = _new_modules(model)
    labels_y = train_ds.labels(target)
    history: list[dict[str, float]] = []
    best_auc, best_state = -math.inf, None
    val_ok = val_ds is not None and len(set(val_ds.labels(target).tolist())) > 1
    if val_ds is not None and not val_ok:
        say(f"extend: the validation split has one class of {target!r} only; keeping the last epoch")
    new_names = [k for k in model.state_dict() if k not in old_state]
    for epoch in range(epochs):
        model.eval()  # frozen parts without dropout
        for mod in new_modules:
            mod.train()
        sampler = make_sampler({target: labels_y}, len(train_ds), balanced, seed + epoch)
        sampler.set_epoch(epoch)
        train_ds.set_epoch(epoch)
        losses = []
        for i in tqdm(list(sampler), desc=f"extend epoch {epoch + 1}", leave=False, disable=not progress or None):
            bag = train_ds[i].to(dev)
            logits = model(bag.features, coords=bag.coords).logits[name]
            loss = F.cross_entropy(logits.float(), bag.targets[target].view(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        record = {"epoch": epoch + 1, "loss": float(np.mean(losses))}
        if val_ok:
            probs = _predict(model, val_ds, {name: target}, dev)[name]
            record["val_auc"] = compute_metrics(val_ds.labels(target), probs)["auc"]
        score = record.get("val_auc", float(epoch))  # without a usable validation split: the last epoch
        if best_state is None or score > best_auc:
            best_auc = score
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items() if k in new_names}
        history.append(record)
        say(
            f"extend: epoch {epoch + 1}/{epochs} loss {record['loss']:.4f}"
            + (f" val_auc {record['val_auc']:.4f}" if "val_auc" in record else "")
        )
    if best_state is not None:
        model.load_state_dict(best_state, strict=False)

    # --- prove the old parameters untouched, evaluate, save ----------------------------------------------
    now = model.state_dict()
    identical = all(torch.equal(now[k], v) for k, v in old_state.items())
    if not identical:
        changed = [k for k, v in old_state.items() if not torch.equal(now[k], v)]
        raise RuntimeError(f"extend: old parameters changed during training: {changed[:5]}")
    say(f"extend: {len(old_state)} old tensors bit-identical: {identical}")
    if val_ok:
        thresholds[name] = float(
            choose_threshold(val_ds.labels(target), _predict(model, val_ds, {name: target}, dev)[name])
        )
    else:
        thresholds[name] = 0.5
    after = _metrics(model, eval_ds, columns, thresholds, dev)
    new_metrics = _metrics(model, eval_ds, {name: target}, thresholds, dev)[name]
    for t, m in after.items():
        say(f"extend: after {t}: auc {m['auc']:.4f} (before {before[t]['auc']:.4f}) sensitivity {m['sensitivity']:.4f}")
    say(f"extend: new task {name}: auc {new_metrics['auc']:.4f} sensitivity {new_metrics['sensitivity']:.4f}")

    new_threshold = ThresholdMeta(
        value=thresholds[name],
        method=THRESHOLD_EXTENSION if val_ok else THRESHOLD_DEFAULT,
        n_slides=len(val_ds) if val_ok and val_ds is not None else None,
    )
    tasks = {**meta.tasks, name: TaskMeta(class_names=list(full.class_names[target]), threshold=new_threshold)}
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
        "lr": lr,
        "seed": seed,
        "frozen_identical": identical,
        "isolated": isolated,
        "history": history,
    }
    output = Path(output) if output is not None else checkpoint.with_name(f"{checkpoint.stem}_ext_{name}.safetensors")
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
        frozen_identical=identical,
        n_frozen=len(old_state),
        n_new_params=sum(p.numel() for p in new_params),
        skipped_tasks=skipped,
        history=history,
    )


__all__ = ["MECDSMethod", "MECDSOptions", "ExtendResult", "extend_model", "extend_checkpoint", "load_teacher"]
