"""The resume file of a run (``resume.safetensors``): full method, optimiser, scheduler, scaler and RNG state plus
the loop's position, rewritten atomically after every epoch and marked completed when the run finishes.

A run directory with an unfinished resume file continues where it stopped (bit-identical to an uninterrupted
run); one with a completed run, or one started with a different config, is refused with a clear error.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from wsimil_core.engine.checkpoint import load_state, save_state
from wsimil_core.engine.config import TrainConfig
from wsimil_core.engine.schedule import EarlyStopping
from wsimil_core.engine.seeding import rng_state, set_rng_state
from wsimil_core.engine.state_tree import flatten_state, unflatten_state
from wsimil_core.errors import CheckpointError, ConfigError
from wsimil_core.methods.base import Method

RESUME_FILE = "resume.safetensors"
#: the two ways out of a damaged resume file (added to ``load_state``'s error)
DAMAGED_REMEDY = "start afresh with `wsimil train --no-resume` (or delete the file), or restore a copy of the file"


@dataclass
class ResumePoint:
    """A loaded resume file: its tensors and its meta (``phase_index``, ``epoch``, ``next_global_epoch``,
    ``early``, ``best``, ``history``, ``stopped_early``, ``completed``, ``config``, ``skeleton``)."""

    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]

    def restore(
        self,
        method: Method,
        opt: torch.optim.Optimizer,
        sched: torch.optim.lr_scheduler.LRScheduler,
        scaler: torch.amp.GradScaler,
        early: EarlyStopping,
    ) -> None:
        """Load the saved state into the phase's objects and restore every RNG."""
        state = unflatten_state(self.tensors, self.meta["skeleton"])
        method.load_state_dict(state["method"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        early.load(self.meta["early"])
        set_rng_state(state["rng"])


def comparable_config(config: TrainConfig) -> dict[str, Any]:
    """The config as JSON without the keys that may change between a run and its resumption."""
    cfg = config.to_json()
    cfg["output"].pop("progress", None)
    cfg["output"].pop("overwrite", None)
    cfg["output"].pop("save_interval_s", None)
    return cfg


def resume_snapshot(
    config: TrainConfig,
    method: Method,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    early: EarlyStopping,
    position: dict[str, Any],
    copy: bool = True,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The resume file's contents now: ``(tensors, meta)`` for ``save_state``.

    ``position``: the loop's JSON state (``phase_index``, ``epoch``, ``next_global_epoch``, ``best``, ``history``,
    ``stopped_early``, ``completed``). ``copy``: clone the tensors (to CPU) so later training steps do not change
    the snapshot (False when it is written at once).
    """
    state = {
        "method": dict(method.state_dict()),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": rng_state(),
    }
    tensors, skeleton = flatten_state(state, "s")
    if copy:
        tensors = {k: t.detach().to("cpu", copy=True) for k, t in tensors.items()}
        position = {**position, "history": list(position.get("history", [])), "best": dict(position.get("best", {}))}
    meta = {"skeleton": skeleton, **position, "early": early.state(), "config": comparable_config(config)}
    return tensors, meta


def save_resume(
    run_dir: Path,
    config: TrainConfig,
    method: Method,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    early: EarlyStopping,
    position: dict[str, Any],
) -> None:
    """Write ``run_dir/resume.safetensors`` (atomic) with :func:`resume_snapshot`'s contents."""
    tensors, meta = resume_snapshot(config, method, opt, sched, scaler, early, position, copy=False)
    save_state(run_dir / RESUME_FILE, tensors, meta)


def load_resume(run_dir: Path, config: TrainConfig, resume: bool | None) -> ResumePoint | None:
    """The resume point of ``run_dir``, or None to start afresh.

    ``resume``: None = continue when an unfinished resume file exists; True = require one; False = start afresh.

    Raises:
        CheckpointError: ``resume=True`` without a resume file, or a damaged one (its contents do not match the
            hash written with it; the message names the ways out).
        ConfigError: the directory holds a finished run (unless ``output.overwrite``), or the run was started
            with a different config.
    """
    path = run_dir / RESUME_FILE
    if not path.exists():
        if resume is True:
            raise CheckpointError(f"{path}: no resume file to continue from")
        return None
    if resume is False:
        return None
    tensors, meta = load_state(path, DAMAGED_REMEDY)
    if meta.get("completed"):
        if config.output.overwrite:
            return None
        raise ConfigError(f"{run_dir}: holds a finished run; choose another output.dir or set output.overwrite: true")
    saved = meta.get("config", {})
    now = comparable_config(config)
    if saved != now:
        raise ConfigError(
            f"{path}: the run was started with a different config ({first_difference(saved, now)}); use another "
            "output.dir, the original config, or start afresh with --no-resume"
        )
    return ResumePoint(tensors, meta)


def mark_completed(run_dir: Path) -> None:
    """Mark the resume file of ``run_dir`` (when there is one) as a finished run."""
    path = run_dir / RESUME_FILE
    if path.exists():
        tensors, meta = load_state(path, DAMAGED_REMEDY)
        meta["completed"] = True
        save_state(path, tensors, meta)


def first_difference(a: Any, b: Any, path: str = "") -> str:
    """``"train.lr: 0.005 -> 0.01"``: the first key (dotted path) where two JSON values differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return first_difference(a.get(k), b.get(k), f"{path}.{k}" if path else k)
    return f"{path}: {a!r} -> {b!r}"
