"""MECDS training recipe: teacher on balanced data, then a student distilled with asymmetric KD (Sec. 2.3).

Phases (``options.phases``, default both, in this order):

* ``teacher``: a ``mecds`` model trained on a class-balanced resampling of the training bags (the engine's
  balanced sampler balances every task's classes), loss ``sum_m CE_m``.
* ``student``: a second ``mecds`` model of the same architecture trained on the full (imbalanced) set with the
  teacher frozen at its best validation epoch (``on_best_epoch`` keeps those weights), loss ``sum_m (CE_m + distill_weight * L_KD,m)`` where ``L_KD`` is AKD (Eq. 1-2,
  ``functional.akd_loss``) for binary tasks, its label-gated variant (``distill: akd_gated``,
  ``functional.akd_gated_loss``), plain KL distillation (``distill: kl``, the paper's Table 2 ablation; also
  used for tasks with more than two classes, where AKD is undefined) or nothing (``distill: none``).

One run does both phases; ``phases: [teacher]`` trains a teacher only (its checkpoint is the teacher), and
``phases: [student]`` with ``teacher_checkpoint`` distils from a teacher trained earlier. The inference model
(validation, checkpoints) is the model of the current phase.

* ``extend`` (task extension, Sec. 3.4; ``phases: [extend]`` with ``extend: {checkpoint, task}``): the model is
  the trained checkpoint's (loaded through the engine's reader, :meth:`MECDSMethod.load_checkpoints`); the phase
  adds the task (a task token, a head, and a router + expert in every MFA module, see :func:`extend_model`),
  freezes every old parameter (``requires_grad`` False, so the engine's optimiser never sees them; frozen parts
  run in eval mode) and trains the new ones with the new task's CE. Sampler, optimiser, epochs, early
  stopping, checkpoints and metrics are the engine's. ``isolated`` (default) keeps the new experts' updates out
  of the shared patch stream, so the old tasks' predictions stay bit-identical. ``wsimil mecds extend``
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

from wsimil_core.data.bag import BagBatch
from wsimil_core.errors import CheckpointError, ConfigError, DataError
from wsimil_core.functional.distill import akd_gated_loss, akd_loss, kd_kl_loss
from wsimil_core.methods.base import (
    CheckpointReader,
    Method,
    MethodOptions,
    parse_options,
    register_method,
    task_loss,
    unwrap_model,
)
from wsimil_core.methods.mecds.model import MECDS  # importing it registers the "mecds" model
from wsimil_core.models.base import MILOutput, create_model_as

PhaseName = Literal["teacher", "student", "extend"]


def _both_phases() -> list[PhaseName]:
    return ["teacher", "student"]


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
        default_factory=_both_phases,
        description="Phases to run, in order: [teacher, student] (both), [teacher], [student] "
        "(student alone needs teacher_checkpoint) or [extend] (task extension, needs extend).",
    )
    distill: Literal["akd", "akd_gated", "kl", "none"] = Field(
        "akd",
        description="Student distillation loss: akd (asymmetric KD, Eq. 1-2 as written, the paper's default), "
        "akd_gated (the Eq. 1 weight of each bag chosen by its ground-truth label, applied to the whole binary KL), "
        "kl (plain KD, Table 2 'KL') or none (CE only, Table 2's teacher-alone row).",
    )
    distill_weight: float = Field(1.0, ge=0, description="Weight of the distillation term added to the student CE.")
    temperature: float = Field(2.0, gt=0, description="Distillation temperature T (Eq. 1).")
    gamma_pos: float = Field(1.0, ge=0, description="AKD exponent of the positive weight (1 - p)^gamma_pos (Eq. 2).")
    gamma_neg: float = Field(4.0, ge=0, description="AKD exponent of the negative weight max(p_hat - m, 0)^gamma_neg.")
    margin: float = Field(0.2, ge=0, lt=1, description="AKD teacher-probability margin m of the negative weight.")
    report_threshold: float | None = Field(
        0.5,
        gt=0,
        lt=1,
        description="Also report each binary task's sensitivity and specificity at this fixed threshold on P(positive) "
        "(sensitivity@0.5 ...), the paper's SEN (Tables 1-3), beside those at the run's threshold; null: off.",
    )
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


def _loaded_mecds(model: nn.Module, path: str, what: str) -> MECDS:
    """A model read from ``path`` (option ``what``), checked to be a ``mecds`` model."""
    if not isinstance(model, MECDS):
        name = getattr(model, "model_name", type(model).__name__)
        raise CheckpointError(f"{path}: {what} holds a {name!r} model, not 'mecds'")
    return model


@register_method
class MECDSMethod(Method):
    """MECDS: teacher (balanced CE) then student (CE + asymmetric KD, Sec. 2.3, Eq. 1-2); one ``mecds`` model per
    role.

    ``model`` is the student (or, with ``phases: [extend]``, the checkpoint's model: set by
    :meth:`load_checkpoints`, absent before); ``teacher`` the teacher (None in an extend run).
    """

    name = "mecds"
    cli = "wsimil_core.methods.mecds.cli:app"
    model_name = "mecds"
    options_cls = MECDSOptions
    options: MECDSOptions
    model: MECDS
    teacher: MECDS | None

    def __init__(self, model: dict[str, Any], options: dict[str, Any] | MECDSOptions | None = None):
        o = parse_options(self.options_cls, options, self.name)
        self._phase: str = o.phases[0]
        self._routed: dict[str, list[float]] = {}
        self._best_teacher: dict[str, Tensor] = {}  # the teacher's weights at its best validation epoch
        self._best_teacher_epoch = -1
        if o.extend is None:
            super().__init__(model, o)
            self.teacher = create_model_as(MECDS, self.model_name, **model)
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
            self.teacher = None  # and no self.model until load_checkpoints reads the checkpoint's
        self.phases = tuple(o.phases)  # instance attribute read by the engine

    def load_checkpoints(self, read: CheckpointReader) -> None:
        """``teacher_checkpoint``: the frozen teacher of a student-only run. ``extend.checkpoint``: the model the
        task is added to. Both are checked against the data (tasks, class counts, feature dimension)."""
        o = self.options
        if o.teacher_checkpoint:
            teacher = _loaded_mecds(read(o.teacher_checkpoint)[0], o.teacher_checkpoint, "teacher_checkpoint")
            t_cfg, cfg = teacher.config, self.model.config
            if t_cfg.task_classes != cfg.task_classes or t_cfg.in_dim != cfg.in_dim:
                raise CheckpointError(
                    f"{o.teacher_checkpoint}: the teacher has tasks {t_cfg.task_classes} and in_dim "
                    f"{t_cfg.in_dim}, but the student has tasks {cfg.task_classes} and in_dim {cfg.in_dim}"
                )
            self.teacher = teacher.requires_grad_(False)
        if o.extend is not None:
            path, task = o.extend.checkpoint, o.extend.task
            base = _loaded_mecds(read(path)[0], path, "extend.checkpoint")
            old = base.config.task_classes
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
        """The model of ``phase`` as the engine holds it (a DDP wrapper in multi-GPU runs): forwards call this."""
        if phase == "teacher":
            if self.teacher is None:
                raise ConfigError(f"method 'mecds': phases {list(self.phases)} have no teacher")
            return self.teacher
        model = self._modules.get("model")
        if model is None:
            raise ConfigError(
                "method 'mecds': the extend phase needs the checkpoint loaded (the engine calls load_checkpoints "
                "before the first phase)"
            )
        return model

    def _mecds(self, phase: str) -> MECDS:
        """The ``mecds`` model of ``phase`` itself (unwrapped): its config, tasks and modules."""
        model = unwrap_model(self._net(phase))
        if not isinstance(model, MECDS):
            raise ConfigError(f"method 'mecds': the {phase} model is a {type(model).__name__}, not a mecds model")
        return model

    def _extend(self) -> ExtendOptions:
        if self.options.extend is None:
            raise ConfigError("method 'mecds': the extend phase needs extend: {checkpoint, task}")
        return self.options.extend

    def setup_phase(self, phase: str, train_data: Any) -> None:
        """Teacher: train the teacher. Student: freeze the teacher (optionally copy it into the student).
        Extend: add the new task to the loaded model and freeze every old parameter."""
        if phase not in ("teacher", "student", "extend"):
            raise ConfigError(f"method 'mecds': unknown phase {phase!r}")
        self._phase = phase
        if phase == "extend":
            o = self._extend()
            model = self._mecds("extend")
            if o.task not in model.config.task_classes:
                extend_model(model, o.task, int(self._data_model["tasks"][o.task]), isolated=o.isolated)
        elif phase == "student":
            teacher = self._mecds("teacher")
            if self._best_teacher:  # distil from the teacher's best epoch (by validation), not its last
                teacher.load_state_dict(self._best_teacher)
            teacher.requires_grad_(False)
            teacher.eval()
            if self.options.init_student_from_teacher:
                self._mecds("student").load_state_dict(teacher.state_dict())
        else:
            self._net("teacher").requires_grad_(True)

    def report_thresholds(self) -> tuple[float, ...]:
        """``report_threshold`` (0.5): validation and test report ``sensitivity@0.5`` as the paper's SEN."""
        t = self.options.report_threshold
        return () if t is None else (float(t),)

    def on_best_epoch(self, phase: str, epoch: int) -> None:
        """Keep the teacher's weights of its best validation epoch: the student distils from them (a copy on the
        CPU; it travels in the resume file through ``get_extra_state``)."""
        if phase == "teacher":
            teacher = self._mecds("teacher")
            self._best_teacher = {k: v.detach().to("cpu", copy=True) for k, v in teacher.state_dict().items()}
            self._best_teacher_epoch = epoch

    @property
    def best_teacher_epoch(self) -> int | None:
        """The teacher-phase epoch (0-based) whose weights the student distils from; None before any."""
        return self._best_teacher_epoch if self._best_teacher else None

    def get_extra_state(self) -> dict[str, Any]:
        return {"best_teacher_epoch": self._best_teacher_epoch, "best_teacher": dict(self._best_teacher)}

    def set_extra_state(self, state: Any) -> None:
        state = state if isinstance(state, dict) else {}
        self._best_teacher = dict(state.get("best_teacher") or {})
        self._best_teacher_epoch = int(state.get("best_teacher_epoch", -1))

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """As ``nn.Module.load_state_dict``; a state without the best-teacher copy (a resume file written before
        it existed) loads with none."""
        if "_extra_state" not in state_dict:
            state_dict = {**state_dict, "_extra_state": {}}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

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
        if mode and self._phase == "extend" and self._modules.get("model") is not None:
            model = self._mecds("extend")
            model.eval()
            for module in model.task_modules(self._extend().task):
                module.train()
        return self

    def inference_model(self) -> nn.Module:
        """The model of the current phase (the teacher during the teacher phase, then the student)."""
        return self._net(self._phase)

    # --- steps --------------------------------------------------------------------------------------------
    def _distill(self, student: Tensor, teacher: Tensor, y: Tensor) -> Tensor:
        """The distillation term of one task: ``[B, C]`` logits of student and teacher, ``[B]`` labels."""
        o = self.options
        if o.distill == "akd" and student.shape[-1] == 2:
            return akd_loss(student, teacher, o.temperature, o.gamma_pos, o.gamma_neg, o.margin)
        if o.distill == "akd_gated" and student.shape[-1] == 2:
            return akd_gated_loss(student, teacher, y, o.temperature, o.gamma_pos, o.gamma_neg, o.margin)
        return kd_kl_loss(student, teacher, o.temperature)

    def _log_routing(self, out: MILOutput) -> None:
        for t, frac in out.extras.get("routed_fraction", {}).items():
            self._routed.setdefault(t, []).append(float(frac.mean()))

    def training_step(self, batch: BagBatch, phase: str) -> dict[str, Tensor]:
        """``sum_m CE_m`` (teacher), ``sum_m CE_m + distill_weight * L_KD,m`` (student) or the new task's CE
        (extend) for one bag."""
        out = self._net(phase)(batch.features, coords=batch.coords)
        logits = out.task_logits("mecds")
        if phase == "extend":
            task = self._extend().task
            if task not in batch.targets:
                raise DataError(f"mecds extend: bag {batch.slide_id!r} has no label of the new task {task!r}")
            y = batch.targets[task].view(-1).to(logits[task].device)
            ce = F.cross_entropy(logits[task].float(), y)
            self._log_routing(out)
            return {"loss": ce, "ce": ce.detach(), f"ce_{task}": ce.detach()}
        tasks = [t for t in batch.targets if t in logits]
        if not tasks:
            raise DataError(
                f"mecds: bag {batch.slide_id!r} has targets {sorted(batch.targets)} but the model's tasks are "
                f"{sorted(logits)}"
            )
        logs: dict[str, Tensor] = {}
        ces = []
        for t in tasks:
            ce = task_loss(logits[t], batch, t)
            ces.append(ce)
            logs[f"ce_{t}"] = ce.detach()
        ce_total = torch.stack(ces).sum()
        loss = ce_total
        if phase == "student" and self.options.distill != "none" and self.options.distill_weight > 0:
            teacher = self._net("teacher")
            teacher.eval()
            with torch.no_grad():
                t_logits = teacher(batch.features, coords=batch.coords).task_logits("mecds teacher")
            kds = []
            for t in tasks:
                y = batch.targets[t].view(-1).to(logits[t].device)
                kd = self._distill(logits[t], t_logits[t], y)
                kds.append(kd)
                logs[f"kd_{t}"] = kd.detach()
            kd_total = torch.stack(kds).sum()
            loss = loss + self.options.distill_weight * kd_total
            logs["kd"] = kd_total.detach()
        self._log_routing(out)
        return {"loss": loss, "ce": ce_total.detach(), **logs}

    def epoch_end(self, phase: str, epoch: int) -> dict[str, float]:
        """Mean fraction of patches each task's experts processed this epoch (DFR's saving)."""
        logs = {f"routed_{t}": float(np.mean(v)) for t, v in self._routed.items() if v}
        self._routed = {}
        return logs


# --- task extension (Sec. 3.4) ---------------------------------------------------------------------------------


def extend_model(model: MECDS, name: str, n_classes: int, isolated: bool = True) -> list[nn.Parameter]:
    """Add task ``name`` to a ``mecds`` model and freeze every existing parameter; returns the new parameters.

    ``isolated`` (default) keeps the new experts' patch updates out of the shared patch stream, so the old tasks'
    outputs stay exactly the same (see ``MECDS.add_task``).
    """
    model.requires_grad_(False)
    new = model.add_task(name, n_classes, isolated=isolated)
    for p in new:
        p.requires_grad_(True)
    return new


__all__ = ["MECDSMethod", "MECDSOptions", "ExtendOptions", "extend_model"]
