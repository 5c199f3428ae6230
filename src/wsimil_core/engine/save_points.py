"""When a run's files reach the disk: each epoch's checkpoints and resume state are staged in memory and written
together at save points, so small, fast epochs do not spend most of their time in ``os.replace``.

Replacing a file through a rename flushes the new file to the disk on most Linux file systems (ext4's
``auto_da_alloc``): about 2-10 ms per file, which is as long as a whole training epoch of ABMIL on a MUSK-sized
cohort, and a run wrote four such files per epoch (``best``, ``last``, ``metrics.csv``, ``resume``). Now:

* ``metrics.jsonl`` gets one appended line per epoch (no rename, no flush; the napari docks tail it live); it is
  rewritten whole when a run starts or resumes;
* ``best.safetensors``, ``last.safetensors``, ``metrics.csv`` and ``resume.safetensors`` are written at a save
  point: after the run's first epoch, after an epoch when ``output.save_interval_s`` seconds have passed since the
  last one (``0``: after every epoch), at the end of each phase, and when the run stops on an exception (Ctrl-C, a non-finite loss):
  the staged state is that of the last finished epoch, so an interrupted run still loses at most the epoch it
  was in. Only a process killed outright (SIGKILL, power loss) loses up to ``save_interval_s`` seconds more.

Staging copies the state (``state_dict`` clones; a copy of the inference model kept per role and refreshed with
``load_state_dict``), which costs a memory copy (about 1 ms for ABMIL) instead of a disk flush.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wsimil_core.checkpoint_meta import CheckpointMeta
from wsimil_core.engine.checkpoint import save_state
from wsimil_core.engine.config import TrainConfig
from wsimil_core.engine.resume import RESUME_FILE, mark_completed, resume_snapshot
from wsimil_core.engine.run_outputs import BEST_FILE, LAST_FILE, save_run_checkpoint, write_history
from wsimil_core.engine.schedule import EarlyStopping
from wsimil_core.methods.base import Method

METRICS_JSONL = "metrics.jsonl"


class SavePoints:
    """Stages a run's per-epoch files and writes them at save points (see the module docstring).

    Args:
        run_dir: the run directory; config: the run's config (``output.keep``, ``output.save_interval_s``).
        writes: False on the ranks of a ``torchrun`` launch that write nothing (every call is then a no-op).
    """

    def __init__(self, run_dir: Path, config: TrainConfig, writes: bool = True):
        self.run_dir = run_dir
        self.config = config
        self.writes = writes
        self.interval = float(config.output.save_interval_s)
        self.last_flush = -float("inf")  # the first epoch is always written: a checkpoint to load exists early
        self._best: tuple[nn.Module, CheckpointMeta] | None = None
        self._last: tuple[nn.Module, CheckpointMeta] | None = None
        self._history: list[dict[str, Any]] | None = None
        self._resume: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None
        self._final_resume: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None
        self._copies: dict[str, tuple[nn.Module, nn.Module]] = {}  # role -> (source model, its frozen copy)
        self._broken = False  # a write failed: nothing more is written

    def start_history(self, history: list[dict[str, Any]]) -> None:
        """Rewrite ``metrics.jsonl`` with ``history`` (empty for a fresh run; the resume file's for a resumed one)."""
        if self.writes:
            from wsimil_core._io import atomic_write_text

            lines = "".join(json.dumps(r, allow_nan=True) + "\n" for r in history)
            atomic_write_text(self.run_dir / METRICS_JSONL, lines)

    def epoch(
        self,
        record: dict[str, Any],
        history: list[dict[str, Any]],
        model: nn.Module,
        meta: CheckpointMeta,
        improved: bool,
        resume: tuple[
            Method, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler, torch.amp.GradScaler, EarlyStopping
        ],
        position: dict[str, Any],
    ) -> None:
        """Stage one finished epoch: append its ``record`` to ``metrics.jsonl``, stage the checkpoints of the
        inference ``model`` (``best`` when ``improved``) and the resume state, and write them all when the save
        interval has passed."""
        if not self.writes:
            return
        with open(self.run_dir / METRICS_JSONL, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, allow_nan=True) + "\n")
        keep = self.config.output.keep
        due = time.monotonic() - self.last_flush >= self.interval
        if improved and "best" in keep:
            self._best = (model if due else self._frozen("best", model), meta)
        if "last" in keep:
            self._last = (model if due else self._frozen("last", model), meta)
        self._history = history
        method, opt, sched, scaler, early = resume
        self._resume = resume_snapshot(self.config, method, opt, sched, scaler, early, position, copy=not due)
        if due:
            self.flush()

    def _frozen(self, role: str, model: nn.Module) -> nn.Module:
        """A copy of ``model`` as it is now that later training steps leave alone: one deep copy per role and
        source model, refreshed with ``load_state_dict`` (a tensor copy) on later epochs."""
        held = self._copies.get(role)
        if held is None or held[0] is not model:
            held = (model, copy.deepcopy(model))
            self._copies[role] = held
        else:
            held[1].load_state_dict(model.state_dict())
        return held[1]

    def flush(self) -> None:
        """Write whatever is staged: best, last, ``metrics.csv``, then the resume file (each atomic). An item leaves
        the stage once written, so a flush cut short by Ctrl-C is finished by the next call (the run's exception
        handler); after a failed write (a full disk) later calls write nothing, so the error is reported once."""
        if not self.writes or self._broken:
            return
        self.last_flush = time.monotonic()
        try:
            if self._best is not None:
                save_run_checkpoint(self.run_dir, BEST_FILE, *self._best)
                self._best = None
            if self._last is not None:
                save_run_checkpoint(self.run_dir, LAST_FILE, *self._last)
                self._last = None
            if self._history is not None:
                write_history(self.run_dir, self._history, jsonl=False)
                self._history = None
            if self._resume is not None:
                save_state(self.run_dir / RESUME_FILE, *self._resume)
                self._final_resume, self._resume = self._resume, None
        except Exception:
            self._broken = True
            raise

    def complete(self) -> None:
        """Mark the resume file as a finished run (from the state written last, without reading it back)."""
        if not self.writes:
            return
        if self._final_resume is None:
            mark_completed(self.run_dir)
            return
        tensors, meta = self._final_resume
        save_state(self.run_dir / RESUME_FILE, tensors, {**meta, "completed": True})


__all__ = ["SavePoints", "METRICS_JSONL"]
