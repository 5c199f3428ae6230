"""The training loop shared by every method (the ``Method`` contract in ``methods/base.py``).

``train(config) -> RunResult`` runs, for each of ``method.phases``: ``setup_phase``, an AdamW/Adam optimiser
over ``trainable_parameters(phase)`` with linear warm-up + cosine decay (``engine.schedule``), one epoch at a
time (``engine.epoch``: bags of batch size 1, gradient accumulation and clipping, AMP on CUDA,
``after_optimizer_step``), ``epoch_end`` figures, per-epoch validation (``engine.evaluation``:
``method.eval_forward`` on each bag, for the inference model and side by side for every ``evaluation_models()``
entry), early stopping, best/last checkpoints and metrics (``engine.run_outputs``) and an atomic resume file
(``engine.resume``). Under ``torchrun`` (``WORLD_SIZE > 1``) the trainable modules are wrapped in
``DistributedDataParallel`` (``engine.distributed``), the bags are sharded, and only rank 0 writes.

Run directory (``output.dir``): ``best.safetensors``, ``last.safetensors``, ``metrics.csv``, ``metrics.jsonl``,
``resume.safetensors`` (full method + optimiser + scheduler + RNG state, rewritten each epoch),
``result.json`` (when finished), ``config.yaml``, ``.wsimil-lock`` (held while the run runs).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from torch import nn

import wsimil_core.methods  # noqa: F401  (fills the registries)
from wsimil_core.checkpoint_meta import CheckpointMeta
from wsimil_core.data.dataset import BagDataset
from wsimil_core.data.splits import Split
from wsimil_core.devices import apply_thread_policy
from wsimil_core.engine.checkpoint import load_checkpoint
from wsimil_core.engine.config import TrainConfig, as_config, fill_model_options
from wsimil_core.engine.datasets import build_datasets, standardize_features
from wsimil_core.engine.distributed import (
    amp_dtype_of,
    dist_info,
    init_distributed,
    plain_modules,
    resolve_train_device,
    unwrap_ddp,
    wrap_ddp,
)
from wsimil_core.engine.epoch import EpochRunner
from wsimil_core.engine.evaluation import Evaluator
from wsimil_core.engine.param_groups import weight_decay_groups
from wsimil_core.engine.resume import RESUME_FILE, ResumePoint, load_resume
from wsimil_core.engine.run_outputs import (
    BEST_FILE,
    LAST_FILE,
    RunResult,
    checkpoint_meta,
    describe_thresholds,
    epoch_line,
    fixed_thresholds,
    lock_run_dir,
    threshold_plan,
    write_config,
    write_result,
)
from wsimil_core.engine.save_points import SavePoints
from wsimil_core.engine.schedule import early_stopping_of, lr_factor, tracked_metric
from wsimil_core.engine.seeding import seed_everything
from wsimil_core.errors import ConfigError
from wsimil_core.methods.base import Method, create_method, method_class

#: what a resumed run repeats: epochs are saved whole (resuming inside one would need the sampler position and the
#: optimiser state part-way through it), so the epoch a stop interrupted runs again from its start
RESUME_NOTE = "the interrupted epoch ({} overall) runs again from its start: an epoch is saved only when it finishes"

Callback = Callable[[dict[str, Any]], None]


class Trainer:
    """Runs one training run described by a ``TrainConfig``.

    Args:
        config: the run's config (``TrainConfig``, dict or YAML path).
        callbacks: called with each epoch's record after it is saved (raise ``KeyboardInterrupt`` to stop;
            the run then resumes from that epoch).
        resume: ``None`` = continue automatically when the run dir holds an unfinished resume file;
            ``True`` = require one; ``False`` = start afresh (an existing resume file is replaced).
        dataset: an opened cohort to reuse (cross-validation).

    After :meth:`build`: ``method``, ``device``, ``full`` (the cohort), ``data`` (``{"train", "val", "test"}``),
    ``split``, ``targets``, ``model_options``, ``amp_dtype``, ``evaluator``.
    """

    method: Method
    device: torch.device
    full: BagDataset
    data: dict[str, BagDataset | None]
    split: Split
    targets: list[str]
    model_options: dict[str, Any]
    amp_dtype: torch.dtype | None
    evaluator: Evaluator
    epoch_runner: EpochRunner

    def __init__(
        self,
        config: TrainConfig | dict | str | Path,
        callbacks: Sequence[Callback] | None = None,
        resume: bool | None = None,
        dataset: BagDataset | None = None,
    ):
        self.config = as_config(config)
        self.callbacks = list(callbacks or [])
        self.resume = resume
        self._full = dataset
        self.rank, self.local_rank, self.world_size = dist_info()
        self.is_main = self.rank == 0
        self.run_dir = Path(self.config.output.dir)
        self._built = False

    # --- setup --------------------------------------------------------------------------------------------
    def build(self) -> None:
        """Open the data, split it and create the method (``fit`` calls it when not done yet).

        After it, ``data`` (``{"train", "val", "test"}`` datasets), ``method``, ``targets`` and ``device`` are
        set, so a caller can evaluate a model on the run's split before training (e.g. task extension).
        """
        if self._built:
            return
        cfg = self.config
        self.device = resolve_train_device(cfg.train.device, self.local_rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        init_distributed(self.device, self.world_size)
        apply_thread_policy(cfg.data.num_workers)
        seed_everything(cfg.train.seed, cfg.train.deterministic)
        self.full, self.data, self.split = build_datasets(cfg, self._full)
        self.targets = list(cfg.data.targets)
        cls = method_class(cfg.method.name)
        if self.full.survival and not cls.supports_survival:
            raise ConfigError(
                f"method {cfg.method.name!r} does not train survival tasks (data.survival); see docs/survival.md"
            )
        self.model_options = fill_model_options(
            cls.model_name, cfg.model, self.full.in_dim, self.full.n_classes(), self.full.omics_dim
        )
        seed_everything(cfg.train.seed, cfg.train.deterministic)
        method = create_method(cfg.method.name, model=self.model_options, options=cfg.method.options)
        loaded: list[tuple[str, CheckpointMeta]] = []

        def read(path: str | Path) -> tuple[nn.Module, CheckpointMeta]:
            model, meta = load_checkpoint(path)
            loaded.append((str(path), meta))
            return model, meta

        method.load_checkpoints(read)
        self.feature_stats, self.standardize_note = standardize_features(cfg, self.full, self.data, loaded)
        method.to(self.device)
        self.method = method
        self.amp_dtype = amp_dtype_of(self.device, cfg.train.amp)
        self.evaluator = Evaluator(method, self.device, self.targets, cfg.data.num_workers, self.amp_dtype)
        self.epoch_runner = EpochRunner(
            cfg,
            method,
            self.train_data,
            self.device,
            self.amp_dtype,
            self.rank,
            self.world_size,
            progress=cfg.output.progress and self.is_main,
        )
        self._built = True

    @property
    def train_data(self) -> BagDataset:
        """The training split (``build_datasets`` always makes one)."""
        ds = self.data["train"]
        assert ds is not None
        return ds

    # --- evaluation (engine.evaluation) -------------------------------------------------------------------
    def predict(
        self, ds: BagDataset, model: nn.Module | None = None, targets: Sequence[str] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Softmax probabilities ``{task: [B, C]}`` and labels ``{task: [B]}`` of ``ds`` (``Evaluator.predict``)."""
        return self.evaluator.predict(ds, model, targets)

    def task_metrics(
        self,
        ds: BagDataset,
        thresholds: dict[str, float] | None = None,
        model: nn.Module | None = None,
        targets: Sequence[str] | None = None,
    ) -> tuple[dict[str, dict[str, float]], dict[str, float], float]:
        """``({task: metrics}, {task: threshold used}, mean loss)`` of ``ds`` (``Evaluator.task_metrics``)."""
        return self.evaluator.task_metrics(ds, thresholds, model, targets)

    def evaluate(
        self, ds: BagDataset, thresholds: dict[str, float] | None = None, model: nn.Module | None = None
    ) -> tuple[dict[str, float], dict[str, float]]:
        """Metrics of ``ds`` (with ``loss``) and the thresholds used (``Evaluator.evaluate``)."""
        return self.evaluator.evaluate(ds, thresholds, model)

    # --- the run ------------------------------------------------------------------------------------------
    def fit(self) -> RunResult:
        """Train every phase, then evaluate the best model on the test split. Returns a ``RunResult``.

        The run folder is locked for the whole run (``LockError`` naming the holder when another run has it)."""
        self.build()
        with lock_run_dir(self.run_dir):
            return self._fit()

    def _fit(self) -> RunResult:
        method = self.method
        cfg = self.config
        console = Console(stderr=True, quiet=not (cfg.output.progress and self.is_main))
        resume = load_resume(self.run_dir, cfg, self.resume)
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] = {"epoch": None, "metrics": {}, "thresholds": {}}
        self.global_epoch = 0
        self.stopped_early = False
        start_phase, start_epoch = 0, 0
        if resume is not None:
            meta = resume.meta
            self.history = list(meta["history"])
            self.best = dict(meta["best"])
            self.global_epoch = int(meta["next_global_epoch"])
            start_phase, start_epoch = int(meta["phase_index"]), int(meta["epoch"]) + 1
            console.print(
                f"[bold]resuming[/] {self.run_dir} after epoch {self.global_epoch}: {RESUME_NOTE.format(self.global_epoch + 1)}"
            )
        self.saver = SavePoints(self.run_dir, cfg, writes=self.is_main)
        if self.is_main:
            write_config(self.run_dir, cfg)
        self.saver.start_history(self.history)
        val_ds, test_ds = self.data["val"], self.data["test"]
        console.print(
            f"method {cfg.method.name}, {len(self.train_data)} train / {len(val_ds) if val_ds else 0} val / "
            f"{len(test_ds) if test_ds else 0} test bags, device {self.device}"
        )
        console.print(self.standardize_note, highlight=False)
        self.threshold_plan = threshold_plan(cfg, val_ds, self.targets, self.full.survival)
        console.print(describe_thresholds(cfg, self.threshold_plan), soft_wrap=True)
        try:
            for phase_index, phase in enumerate(method.phases):
                if phase_index < start_phase:
                    continue
                first = phase_index == start_phase
                self._run_phase(phase_index, phase, resume if first else None, start_epoch if first else 0, console)
                resume = None
        except BaseException as exc:
            self.saver.flush()  # the last finished epoch's staged files (engine.save_points)
            if not isinstance(exc, KeyboardInterrupt):
                raise
            if (self.run_dir / RESUME_FILE).is_file():
                console.print(
                    f"[yellow]interrupted[/]: state after epoch {self.global_epoch} is in {self.run_dir / RESUME_FILE}; "
                    f"run the same command again to resume ({RESUME_NOTE.format(self.global_epoch + 1)})"
                )
            else:
                console.print("[yellow]interrupted[/] before an epoch had finished: nothing to resume")
            raise
        return self._finish(console, resumed=start_phase > 0 or start_epoch > 0)

    def _run_phase(
        self, phase_index: int, phase: str, resume: ResumePoint | None, start_epoch: int, console: Console
    ) -> None:
        cfg = self.config
        method = self.method
        epochs = cfg.train.phase_epochs.get(phase, cfg.train.epochs)
        method.setup_phase(phase, self.train_data)
        params = [p for p in method.trainable_parameters(phase) if p.requires_grad]
        if not params:
            raise ConfigError(f"method {cfg.method.name!r} has no trainable parameters in phase {phase!r}")
        opt_cls = torch.optim.AdamW if cfg.train.optimizer == "adamw" else torch.optim.Adam
        lr = cfg.train.phase_lr.get(phase, method.phase_lr(phase, cfg.train.lr))
        opt = opt_cls(weight_decay_groups(method, params), lr=lr, weight_decay=cfg.train.weight_decay)
        n_batches = math.ceil(len(self.train_data) / self.world_size)
        steps_per_epoch = math.ceil(math.ceil(n_batches / cfg.train.bags_per_step) / cfg.train.accumulate)
        total = epochs * steps_per_epoch
        warmup = int(round(cfg.train.warmup_epochs * steps_per_epoch))
        t = cfg.train
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_factor(s, total, warmup, t.scheduler, t.min_lr_ratio)
        )
        scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        early = early_stopping_of(cfg)
        if not method.stops_early(phase):
            early.patience = None
        if resume is not None:
            resume.restore(method, opt, sched, scaler, early)
            if early.should_stop:
                return
        val_ds = self.data["val"]
        plan = self.threshold_plan
        fixed = fixed_thresholds(cfg, plan)
        wrapped = wrap_ddp(method, self.device, self.world_size)
        try:
            for epoch in range(start_epoch, epochs):
                train_logs = self.epoch_runner.run(phase, self.global_epoch, params, opt, sched, scaler)
                extra = method.epoch_end(phase, epoch)
                record: dict[str, Any] = {
                    "phase": phase,
                    "epoch": epoch,
                    "global_epoch": self.global_epoch,
                    "lr": float(opt.param_groups[0]["lr"]),
                }
                record.update({f"train/{k}": v for k, v in train_logs.items()})
                record.update({f"train/{k}": float(v) for k, v in (extra or {}).items()})
                with plain_modules(method, wrapped):
                    val: dict[str, float]
                    tiebreak: float | None
                    if val_ds is not None:
                        val, thresholds = self.evaluator.evaluate(val_ds, fixed)
                        value, tiebreak = tracked_metric(cfg, val), val["loss"]
                    else:
                        val, thresholds = {}, {t: fixed.get(t, 0.5) for t in self.targets}
                        value, tiebreak = float(self.global_epoch), None
                    record.update({f"val/{k}": v for k, v in val.items()})
                    if val_ds is not None:
                        record.update(self.evaluator.side_by_side(val_ds, thresholds))
                    improved = early.update(value, self.global_epoch, tiebreak)
                    record["best"] = improved
                    if improved:
                        self.best = {"epoch": self.global_epoch, "metrics": val, "thresholds": thresholds}
                        method.on_best_epoch(phase, epoch)
                    self.history.append(record)
                    if self.is_main:
                        model = method.inference_model()
                        meta = checkpoint_meta(
                            cfg, model, self.full, val, thresholds, plan, self.global_epoch, self.feature_stats
                        )
                        self.stopped_early = early.should_stop
                        position = {
                            "phase_index": phase_index,
                            "epoch": epoch,
                            "next_global_epoch": self.global_epoch + 1,  # saved before the loop's increment
                            "best": self.best,
                            "history": self.history,
                            "stopped_early": self.stopped_early,
                            "completed": False,
                        }
                        state = (method, opt, sched, scaler, early)
                        self.saver.epoch(record, self.history, model, meta, improved, state, position)
                console.print(epoch_line(record, cfg.train.early_stopping.metric), soft_wrap=True, highlight=False)
                self.global_epoch += 1
                for cb in self.callbacks:
                    cb(record)
                if early.should_stop:
                    self.stopped_early = True
                    console.print(f"early stopping after {epoch + 1} epochs of phase {phase}")
                    break
            self.saver.flush()
        finally:
            unwrap_ddp(method, wrapped)

    def _finish(self, console: Console, resumed: bool) -> RunResult:
        cfg = self.config
        best_path = self.run_dir / BEST_FILE if "best" in cfg.output.keep else None
        last_path = self.run_dir / LAST_FILE if "last" in cfg.output.keep else None
        thresholds = dict(self.best.get("thresholds") or {t: 0.5 for t in self.targets})
        test_metrics: dict[str, float] = {}
        test_ds = self.data["test"]
        if test_ds is not None and self.is_main:
            model = None
            if best_path is not None and best_path.exists():
                model, _ = load_checkpoint(best_path, device=self.device)
            test_metrics, _ = self.evaluator.evaluate(test_ds, thresholds, model=model)
            beside = self.method.test_models(model if model is not None else self.method.inference_model())
            test_metrics.update(self.evaluator.side_by_side(test_ds, thresholds, models=beside, prefix="test"))
            shown = {k: v for k, v in test_metrics.items() if "/" not in k or k.startswith("mean/")}
            console.print("test: " + ", ".join(f"{k} {v:.4f}" for k, v in shown.items()), soft_wrap=True)
        result = RunResult(
            run_dir=self.run_dir,
            best_checkpoint=best_path,
            last_checkpoint=last_path,
            best_epoch=self.best.get("epoch"),
            val_metrics=dict(self.best.get("metrics") or {}),
            test_metrics=test_metrics,
            thresholds=thresholds,
            history=self.history,
            stopped_early=self.stopped_early,
            resumed=resumed,
        )
        if self.is_main:
            self.saver.complete()
            write_result(self.run_dir, result)
        return result


def train(
    config: TrainConfig | dict | str | Path,
    callbacks: Iterable[Callback] | None = None,
    resume: bool | None = None,
    dataset: BagDataset | None = None,
) -> RunResult:
    """Train one run (Python API of ``wsimil train``). See ``Trainer`` for the arguments."""
    return Trainer(config, callbacks=list(callbacks or []), resume=resume, dataset=dataset).fit()


__all__ = ["Callback", "RunResult", "Trainer", "train"]
