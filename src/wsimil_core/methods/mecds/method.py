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

* ``extend`` (task extension, Sec. 3.4; ``phases: [extend]`` with ``extend: {checkpoint, task}``): the model is
  the trained checkpoint's (loaded through the engine's reader, :meth:`MECDSMethod.load_checkpoints`); the phase
  adds the task (a task token, a head, and a router + expert in every MFA module, see :func:`extend_model`),
  freezes every old parameter (``requires_grad`` False, so the engine's optimiser never sees them; frozen parts
  run in eval mode) and trains the new ones with the new task's CE. Sampler, optimiser, epochs, early
  stopping, checkpoints and metrics are the engine's. ``isolated`` (default) keeps the new experts' updates out
  of the shared patch stream, so the old tasks' predictions stay bit-identical. ``wsimil extend``
  (:mod:`wsimil_core.methods.mecds.cli`) builds this run from a checkpoint and reports before/after metrics.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import Tensor, nn

import wsimil_core.methods.mecds.model  # noqa: F401  (registers the "mecds" model)
from wsimil_core.data.bag import BagBatch
from wsimil_core.errors import CheckpointError, ConfigError, DataError
from wsimil_core.functional.distill import akd_loss, kd_kl_loss
from wsimil_core.methods.base import CheckpointReader, Method, MethodOptions, parse_options, register_method
from wsimil_core.models.base import create_model

PhaseName = Literal["teacher", "student", "extend"]


class ExtendOptions(BaseModel):
    """Task extension (``phases: [extend]``): which checkpoint gets which new task."""

    model_config = ConfigDict(extra="forbid")

    checkpoint: str = Field(..., description="Trained mecds checkpoint the task is added to (the run starts from it).")
    task: str = Field(..., description="Name of the new task: one of data.targets (its labels column).")
    isolated: bool = Field(
        True,
        description="Keep the new experts' patch updates out of the shared patch stream (old tasks' predictions "
        "stay bit-identical); false adds them back as the paper's DFR does.",
    )
    balanced: bool = Field(True, description="Sample bags class-balanced on the new task's labels.")


class MECDSOptions(MethodOptions):
    """MECDS options (model hyper-parameters such as ``dim``, ``n_modules``, ``top_p`` go under ``model``)."""

    phases: list[PhaseName] = Field(
        default_factory=lambda: ["teacher", "student"],
        description="Phases to run, in order: [teacher, student] (both), [teacher], [student] "
        "(student alone needs teacher_checkpoint) or [extend] (task extension, needs extend).",
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
    extend: ExtendOptions | None = Field(
        None, description="Task extension (phases [extend]): checkpoint, task, isolated, balanced."
    )

    @field_validator("phases")
    @classmethod
    def _phases(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("at least one phase is needed")
        if len(set(v)) != len(v) or (v != ["teacher", "student"] and len(v) == 2):
            raise ValueError("phases must be [teacher, student], [teacher], [student] or [extend]")
        return v

    @model_validator(mode="after")
    def _teacher_source(self) -> MECDSOptions:
        if self.phases == ["student"] and not self.teacher_checkpoint:
            raise ValueError("phases [student] needs teacher_checkpoint (a teacher trained with phases [teacher])")
        if "teacher" in self.phases and self.teacher_checkpoint:
            raise ValueError("teacher_checkpoint is only used with phases [student]; remove one of them")
        if (self.phases == ["extend"]) != (self.extend is not None):
            raise ValueError("task extension needs both phases [extend] and extend: {checkpoint, task}")
        return self


def _loaded_mecds(model: nn.Module, path: str, what: str) -> nn.Module:
    """A model read from ``path`` (option ``what``), checked to be a ``mecds`` model."""
    name = getattr(model, "model_name", type(model).__name__)
    if name != "mecds":
        raise CheckpointError(f"{path}: {what} holds a {name!r} model, not 'mecds'")
    return model


@register_method
class MECDSMethod(Method):
    """MECDS: teacher (balanced CE) then student (CE + asymmetric KD); one ``mecds`` model per role."""

    name = "mecds"
    cli = "wsimil_core.methods.mecds.cli:app"
    model_name = "mecds"
    options_cls = MECDSOptions

    def __init__(self, model: dict[str, Any], options: dict[str, Any] | MECDSOptions | None = None):
        o = parse_options(self.options_cls, options, self.name)
        self._phase: str = o.phases[0]
        self._routed: dict[str, list[float]] = {}
        if o.extend is None:
            super().__init__(model, o)
            self.teacher: nn.Module | None = create_model(self.model_name, **model)
            if o.phases == ["student"]:  # replaced by teacher_checkpoint in load_checkpoints
                self.teacher.requires_grad_(False)
        else:
            nn.Module.__init__(self)
            self.options = o
            extra = sorted(set(model) - {"in_dim", "tasks", "n_classes", "omics_dim"})
            if extra:
                raise ConfigError(
                    f"method 'mecds' extend: the architecture comes from {o.extend.checkpoint}; remove model "
                    f"option(s) {extra}"
                )
            self._data_model = dict(model)  # in_dim and {task: n_classes} of the data (new task included)
            self.model: nn.Module | None = None  # the checkpoint's model, set by load_checkpoints
            self.teacher = None
        self.phases = tuple(o.phases)  # instance attribute read by the engine

    def load_checkpoints(self, read: CheckpointReader) -> None:
        """``teacher_checkpoint``: the frozen teacher of a student-only run. ``extend.checkpoint``: the model the
        task is added to. Both are checked against the data (tasks, class counts, feature dimension)."""
        o = self.options
        if o.teacher_checkpoint:
            teacher = _loaded_mecds(read(o.teacher_checkpoint)[0], o.teacher_checkpoint, "teacher_checkpoint")
            cfg = self.model.config
            if dict(teacher.config.tasks) != dict(cfg.tasks) or teacher.config.in_dim != cfg.in_dim:
                raise CheckpointError(
                    f"{o.teacher_checkpoint}: the teacher has tasks {teacher.config.tasks} and in_dim "
                    f"{teacher.config.in_dim}, but the student has tasks {cfg.tasks} and in_dim {cfg.in_dim}"
                )
            self.teacher = teacher.requires_grad_(False)
        if o.extend is not None:
            path, task = o.extend.checkpoint, o.extend.task
            base = _loaded_mecds(read(path)[0], path, "extend.checkpoint")
            old = dict(base.config.tasks)
            data = dict(self._data_model.get("tasks") or {})
            if task in old:
                raise ConfigError(f"{path}: the model already has a task {task!r}; choose another name")
            if task not in data:
                raise ConfigError(f"method 'mecds' extend.task {task!r} is not one of data.targets {list(data)}")
            wrong = {t: (old.get(t), c) for t, c in data.items() if t != task and old.get(t) != c}
            if wrong:
                raise ConfigError(f"{path}: data targets {sorted(wrong)} are not tasks of the model with those classes")
            in_dim = self._data_model.get("in_dim", base.config.in_dim)
            if base.config.in_dim != in_dim:
                raise ConfigError(f"{path}: the model takes {base.config.in_dim}-dim features, the data has {in_dim}")
            self.model = base

    # --- phases -------------------------------------------------------------------------------------------
    def _net(self, phase: str) -> nn.Module:
        return self.teacher if phase == "teacher" else self.model

    def setup_phase(self, phase: str, train_data: Any) -> None:
        """Teacher: train the teacher. Student: freeze the teacher (optionally copy it into the student).
        Extend: add the new task to the loaded model and freeze every old parameter."""
        if phase not in ("teacher", "student", "extend"):
            raise ConfigError(f"method 'mecds': unknown phase {phase!r}")
        self._phase = phase
        if phase == "extend":
            o = self.options.extend
            if o is None or self.model is None:
                raise ConfigError(
                    "method 'mecds': the extend phase needs extend: {checkpoint, task} and the checkpoint loaded "
                    "(the engine calls load_checkpoints before the first phase)"
                )
            if o.task not in self.model.config.tasks:
                extend_model(self.model, o.task, int(self._data_model["tasks"][o.task]), isolated=o.isolated)
        elif phase == "student":
            self.teacher.requires_grad_(False)
            self.teacher.eval()
            if self.options.init_student_from_teacher:
                self.model.load_state_dict(self.teacher.state_dict())
        else:
            self.teacher.requires_grad_(True)

    def trainable_parameters(self, phase: str) -> Iterable[nn.Parameter]:
        return [p for p in self._net(phase).parameters() if p.requires_grad]

    def balanced_sampling(self, phase: str) -> bool | list[str]:
        """The teacher sees a class-balanced resampling of the training set; the student the full set; the
        extend phase a resampling balanced on the new task's classes (``extend.balanced``)."""
        if phase == "extend":
            o = self.options.extend
            return [o.task] if o is not None and o.balanced else False
        return phase == "teacher"

    def train(self, mode: bool = True) -> MECDSMethod:
        """As ``nn.Module.train``; in the extend phase the frozen old parts stay in eval mode (no dropout)."""
        super().train(mode)
        if mode and self._phase == "extend" and self.model is not None and self.options.extend is not None:
            self.model.eval()
            for module in _task_modules(self.model, self.options.extend.task):
                module.train()
        return self

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
        """``sum_m CE_m`` (teacher), ``sum_m CE_m + distill_weight * L_KD,m`` (student) or the new task's CE
        (extend) for one bag."""
        net = self._net(phase)
        out = net(batch.features, coords=batch.coords)
        if phase == "extend":
            task = self.options.extend.task
            if task not in batch.targets:
                raise DataError(f"mecds extend: bag {batch.slide_id!r} has no label of the new task {task!r}")
            y = batch.targets[task].view(-1).to(out.logits[task].device)
            ce = F.cross_entropy(out.logits[task].float(), y)
            for t, frac in out.extras.get("routed_fraction", {}).items():
                self._routed.setdefault(t, []).append(float(frac.mean()))
            return {"loss": ce, "ce": ce.detach(), f"ce_{task}": ce.detach()}
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


def _task_modules(model: nn.Module, task: str) -> list[nn.Module]:
    """The modules of one task: its head, and its router and expert in every MFA module."""
    k = list(model.config.tasks).index(task)
    mods = [model.heads[k]]
    for module in model.mfa:
        mods += [module.routers[k], module.experts[k]]
    return mods


__all__ = ["MECDSMethod", "MECDSOptions", "ExtendOptions", "extend_model"]
