"""The training loop shared by every method (the ``Method`` contract in ``methods/base.py``).

``train(config) -> RunResult`` runs, for each of ``method.phases``: ``setup_phase``, an AdamW/Adam optimiser
over ``trainable_parameters(phase)`` with linear warm-up + cosine decay, bags of batch size 1 with gradient
accumulation, gradient clipping, AMP (bf16/fp16, CUDA only), ``after_optimizer_step`` after every optimiser
step, ``epoch_end`` figures, per-epoch validation (``method.eval_forward`` on each bag -> softmax probabilities
per task -> metrics, for the inference model and side by side for every ``evaluation_models()`` entry), early stopping,
best/last checkpoints and an atomic resume file. Under ``torchrun`` (``WORLD_SIZE > 1``) the trainable modules
are wrapped in ``DistributedDataParallel``, the bags are sharded, and only rank 0 writes.

Run directory (``output.dir``): ``best.safetensors``, ``last.safetensors``, ``metrics.csv``, ``metrics.jsonl``,
``resume.safetensors`` (full method + optimiser + scheduler + RNG state, rewritten each epoch),
``result.json`` (when finished), ``config.yaml``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from wsimil_core._io import atomic_write_text
from wsimil_core.data.dataset import BagDataset, collate_single
from wsimil_core.data.sampling import make_sampler
from wsimil_core.data.splits import Split, column_split, kfold_split, random_split
from wsimil_core.engine.checkpoint import load_checkpoint
from wsimil_core.engine.config import TrainConfig, as_config, fill_model_options
from wsimil_core.errors import CheckpointError, ConfigError

RESUME_FILE = "resume.safetensors"
BEST_FILE = "best.safetensors"
LAST_FILE = "last.safetensors"

Callback = Callable[[dict[str, Any]], None]


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


# --- small helpers -------------------------------------------------------------------------------------------


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed ``random``, numpy and torch (CPU and CUDA); optionally force deterministic algorithms."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed numpy and random from the worker's torch seed."""
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


def rng_state() -> dict[str, Any]:
    """Every RNG state the loop depends on (torch CPU/CUDA, numpy, random)."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "random": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(tuple(state["numpy"]))
    rnd = state["random"]
    random.setstate((rnd[0], tuple(rnd[1]), rnd[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


def _dist_info() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from the torchrun environment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), world


def resolve_train_device(device: str, local_rank: int = 0) -> torch.device:
    from wsimil_core.devices import resolve_device

    dev = resolve_device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    return dev


def lr_factor(step: int, total: int, warmup: int, scheduler: str, min_ratio: float) -> float:
    """Learning-rate multiplier of optimiser step ``step``: linear warm-up, then cosine decay to ``min_ratio``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if scheduler == "none":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class EarlyStopping:
    """Tracks the best value of a validation metric; ``should_stop`` after ``patience`` epochs without gain."""

    def __init__(self, mode: str, patience: int | None, min_delta: float = 0.0):
        self.mode = mode
        self.patience = patience
        self.min_delta = min_delta
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.bad_epochs = 0
        self.best_tiebreak: float | None = None

    def _key(self, value: float) -> float:
        if value is None or not math.isfinite(value):
            return -math.inf
        return value if self.mode == "max" else -value

    def update(self, value: float, epoch: int, tiebreak: float | None = None) -> bool:
        """Record ``value``; True when it is the best so far (the first epoch always is).

        A value equal to the best counts as better when ``tiebreak`` (the validation loss) is lower: small
        validation sets often saturate AUC, and the loss then picks the better-fitted epoch.
        """
        better = self.best is None or self._key(value) > self._key(self.best) + self.min_delta
        tie = (
            not better
            and tiebreak is not None
            and self.best_tiebreak is not None
            and self._key(value) == self._key(self.best)
            and tiebreak < self.best_tiebreak
        )
        if better or tie:
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
            self.best_tiebreak = tiebreak
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.bad_epochs >= self.patience

    def state(self) -> dict[str, Any]:
        return {
            "best": self.best,
            "best_epoch": self.best_epoch,
            "bad_epochs": self.bad_epochs,
            "best_tiebreak": self.best_tiebreak,
        }

    def load(self, state: dict[str, Any]) -> None:
        self.best, self.best_epoch, self.bad_epochs = state["best"], state["best_epoch"], state["bad_epochs"]
        self.best_tiebreak = state.get("best_tiebreak")


# --- data ----------------------------------------------------------------------------------------------------


def make_split(config: TrainConfig, dataset: BagDataset) -> Split:
    """The train/val/test split the config asks for."""
    s = config.data.split
    if s.kind == "column":
        values = dataset.split_values() if s.column == "split" else None
        if values is None:
            from wsimil_core.data.dataset import read_table

            frame, source = read_table(config.data.labels, "labels")
            if s.column not in frame.columns:
                raise ConfigError(f"data.split.column: {source} has no column {s.column!r}")
            by_id = dict(zip(frame["slide_id"], frame[s.column]))
            values = [by_id[sid] for sid in dataset.slide_ids]
        return column_split(dataset.slide_ids, values, dataset.labels_source)
    if s.kind == "random":
        return random_split(dataset.slide_ids, dataset.labels(), dataset.groups(), s.val_frac, s.test_frac, s.seed)
    return kfold_split(dataset.slide_ids, dataset.labels(), dataset.groups(), s.folds, s.fold, s.val_frac, s.seed)


def build_datasets(
    config: TrainConfig, full: BagDataset | None = None
) -> tuple[BagDataset, dict[str, BagDataset | None], Split]:
    """Open the cohort and cut it into ``{"train", "val", "test"}`` datasets (val/test None when empty).

    Omics vectors are standardised with the training split's statistics. ``full`` reuses an opened cohort
    (cross-validation shares one bag cache across folds).
    """
    d = config.data
    if full is None:
        if d.store is None or d.labels is None:
            raise ConfigError("data.store and data.labels are required")
        full = BagDataset(
            d.store,
            d.labels,
            targets=d.targets,
            encoder_id=d.encoder,
            omics_csv=d.omics,
            seed=config.train.seed,
            missing_labels=d.missing_labels,
            cache_gb=d.cache_gb,
        )
    split = make_split(config, full)
    train = full.subset(split.train, max_patches=d.max_patches)
    stats = train.fit_omics_stats() if full.omics_dim else None
    parts: dict[str, BagDataset | None] = {"train": train}
    for name in ("val", "test"):
        ids = getattr(split, name)
        parts[name] = full.subset(ids) if ids else None
    for ds in parts.values():
        if ds is not None:
            ds.set_omics_stats(stats)
    return full, parts, split


# --- the trainer ---------------------------------------------------------------------------------------------


class Trainer:
    """Runs one training run described by a ``TrainConfig``.

    Args:
        config: the run's config (``TrainConfig``, dict or YAML path).
        callbacks: called with each epoch's record after it is saved (raise ``KeyboardInterrupt`` to stop;
            the run then resumes from that epoch).
        resume: ``None`` = continue automatically when the run dir holds an unfinished resume file;
            ``True`` = require one; ``False`` = start afresh (an existing resume file is replaced).
        dataset: an opened cohort to reuse (cross-validation).
    """

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
        self.rank, self.local_rank, self.world_size = _dist_info()
        self.is_main = self.rank == 0
        self.run_dir = Path(self.config.output.dir)
        self.method: Any = None

    # --- setup --------------------------------------------------------------------------------------------
    def _init_distributed(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                backend = "nccl" if self.device.type == "cuda" else "gloo"
                dist.init_process_group(backend=backend)

    def build(self) -> None:
        """Open the data, split it and create the method (``fit`` calls it when not done yet).

        After it, ``data`` (``{"train", "val", "test"}`` datasets), ``method``, ``targets`` and ``device`` are
        set, so a caller can evaluate a model on the run's split before training (e.g. task extension).
        """
        if getattr(self, "method", None) is not None:
            return
        cfg = self.config
        self.device = resolve_train_device(cfg.train.device, self.local_rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self._init_distributed()
        seed_everything(cfg.train.seed, cfg.train.deterministic)
        self.full, self.data, self.split = build_datasets(cfg, self._full)
        self.targets = list(cfg.data.targets)

        import wsimil_core.methods  # noqa: F401  (fills the registries)
        from wsimil_core.methods.base import create_method, method_class

        cls = method_class(cfg.method.name)
        model_opts = fill_model_options(
            cls.model_name, cfg.model, self.full.in_dim, self.full.n_classes(), self.full.omics_dim
        )
        self.model_options = model_opts
        seed_everything(cfg.train.seed, cfg.train.deterministic)
        self.method = create_method(cfg.method.name, model=model_opts, options=cfg.method.options)
        self.method.load_checkpoints(load_checkpoint)
        self.method.to(self.device)
        self.amp_dtype = None
        if self.device.type == "cuda" and cfg.train.amp != "off":
            self.amp_dtype = torch.bfloat16 if cfg.train.amp == "bf16" else torch.float16

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=self.amp_dtype)

    # --- DDP ----------------------------------------------------------------------------------------------
    def _wrap_ddp(self) -> dict[str, nn.Module]:
        """Wrap each child module of the method that has trainable parameters in DistributedDataParallel."""
        if self.world_size <= 1:
            return {}
        from torch.nn.parallel import DistributedDataParallel

        class DDP(DistributedDataParallel):
            """DDP that forwards unknown attributes (``self.model.config``...) to the wrapped module."""

            def __getattr__(self, name: str) -> Any:
                try:
                    return super().__getattr__(name)
                except AttributeError:
                    return getattr(self.module, name)

        wrapped = {}
        for name, child in list(self.method.named_children()):
            if any(p.requires_grad for p in child.parameters()):
                ids = [self.device.index] if self.device.type == "cuda" else None
                setattr(
                    self.method,
                    name,
                    DDP(child, device_ids=ids, find_unused_parameters=True, broadcast_buffers=False),
                )
                wrapped[name] = child
        return wrapped

    def _unwrap_ddp(self, wrapped: dict[str, nn.Module]) -> None:
        for name, child in wrapped.items():
            setattr(self.method, name, child)

    @contextlib.contextmanager
    def _plain(self, wrapped: dict[str, nn.Module]):
        """Temporarily restore the unwrapped modules (state dicts without ``module.`` prefixes)."""
        ddp = {name: getattr(self.method, name) for name in wrapped}
        self._unwrap_ddp(wrapped)
        try:
            yield
        finally:
            for name, module in ddp.items():
                setattr(self.method, name, module)

    # --- loaders ------------------------------------------------------------------------------------------
    def _train_loader(self, phase: str, epoch: int) -> torch.utils.data.DataLoader:
        cfg = self.config
        train = self.data["train"]
        asked = self.method.balanced_sampling(phase)
        balanced = bool(cfg.train.balanced or asked)
        labels = train.all_labels()
        if isinstance(asked, (list, tuple)) and not cfg.train.balanced:
            labels = {t: labels[t] for t in asked}
        if self.world_size > 1 and not balanced:
            from torch.utils.data.distributed import DistributedSampler

            sampler = DistributedSampler(
                train, num_replicas=self.world_size, rank=self.rank, shuffle=True, seed=cfg.train.seed
            )
        else:
            sampler = make_sampler(
                labels, len(train), balanced, cfg.train.seed, rank=self.rank, world_size=self.world_size
            )
        sampler.set_epoch(epoch)
        train.set_epoch(epoch)
        gen = torch.Generator()
        gen.manual_seed(cfg.train.seed * 7919 + epoch)
        return torch.utils.data.DataLoader(
            train,
            batch_size=1,
            sampler=sampler,
            num_workers=cfg.data.num_workers,
            collate_fn=collate_single,
            worker_init_fn=seed_worker,
            generator=gen,
            pin_memory=self.device.type == "cuda",
        )

    def _eval_loader(self, ds: BagDataset) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(
            ds, batch_size=1, shuffle=False, num_workers=self.config.data.num_workers, collate_fn=collate_single
        )

    # --- one epoch ----------------------------------------------------------------------------------------
    def _train_epoch(self, phase: str, epoch: int, params: list[nn.Parameter], opt, sched, scaler) -> dict[str, float]:
        from tqdm.auto import tqdm

        cfg = self.config.train
        self.method.train()
        loader = self._train_loader(phase, epoch)
        n = len(loader)
        sums: dict[str, float] = {}
        opt.zero_grad(set_to_none=True)
        bar = tqdm(
            loader,
            total=n,
            desc=f"{phase} epoch {epoch + 1}",
            leave=False,
            disable=None if (self.config.output.progress and self.is_main) else True,
            dynamic_ncols=True,
        )
        for i, bag in enumerate(bar):
            bag = bag.to(self.device)
            with self._autocast():
                step = self.method.training_step(bag, phase)
            loss = step["loss"]
            if not torch.isfinite(loss.detach()).all():
                raise ConfigError(
                    f"non-finite training loss on slide {bag.slide_id!r} (phase {phase}, epoch {epoch + 1}); "
                    "lower train.lr or enable train.grad_clip"
                )
            scaler.scale(loss / cfg.accumulate).backward()
            if (i + 1) % cfg.accumulate == 0 or i + 1 == n:
                if cfg.grad_clip is not None:
                    scaler.unscale_(opt)
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                scaler.step(opt)
                scaler.update()
                opt.zero_grad(set_to_none=True)
                sched.step()
                self.method.after_optimizer_step(phase)
            for k, v in step.items():
                if isinstance(v, torch.Tensor) and v.numel() == 1:
                    sums[k] = sums.get(k, 0.0) + float(v.detach())
                elif isinstance(v, (int, float)):
                    sums[k] = sums.get(k, 0.0) + float(v)
            if i % 10 == 0:
                bar.set_postfix(loss=f"{sums['loss'] / (i + 1):.4f}")
        bar.close()
        return {k: v / max(1, n) for k, v in sums.items()}

    # --- evaluation ---------------------------------------------------------------------------------------
    def _task_logits(self, logits: Any, targets: list[str]) -> dict[str, torch.Tensor]:
        if isinstance(logits, dict):
            missing = [t for t in targets if t not in logits]
            if missing:
                raise ConfigError(f"model returns logits for tasks {sorted(logits)} but data.targets is {targets}")
            return {t: logits[t] for t in targets}
        return {targets[0]: logits}

    @torch.no_grad()
    def predict(
        self, ds: BagDataset, model: nn.Module | None = None, targets: Sequence[str] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Softmax probabilities ``{task: [B, C]}`` and labels ``{task: [B]}`` of ``ds`` (eval mode).

        Each bag goes through ``method.eval_forward(bag, model)`` (``model`` None: the inference model).
        ``targets``: the tasks to read (default: the run's targets).
        """
        targets = list(targets or self.targets)
        model = model if model is not None else self.method.inference_model()
        if hasattr(model, "module"):
            model = model.module
        was = model.training
        model.eval()
        probs: dict[str, list[np.ndarray]] = {t: [] for t in targets}
        try:
            for bag in self._eval_loader(ds):
                bag = bag.to(self.device)
                with self._autocast():
                    out = self.method.eval_forward(bag, model)
                for t, lg in self._task_logits(out.logits, targets).items():
                    lg = lg.float().reshape(-1, lg.shape[-1])[:1]
                    probs[t].append(torch.softmax(lg, dim=-1).cpu().numpy()[0])
        finally:
            model.train(was)
        return {t: np.stack(v) for t, v in probs.items()}, {t: ds.labels(t) for t in targets}

    def task_metrics(
        self,
        ds: BagDataset,
        thresholds: dict[str, float] | None = None,
        model: nn.Module | None = None,
        targets: Sequence[str] | None = None,
    ) -> tuple[dict[str, dict[str, float]], dict[str, float], float]:
        """``({task: metrics}, {task: threshold used}, mean loss)`` of ``ds`` for ``targets`` (default: all).

        A task missing from ``thresholds`` (or ``thresholds=None``) gets its threshold chosen on ``ds``.
        """
        from wsimil_core.engine.metrics import choose_threshold, compute_metrics

        targets = list(targets or self.targets)
        probs, labels = self.predict(ds, model, targets)
        per_task: dict[str, dict[str, float]] = {}
        used: dict[str, float] = {}
        losses = []
        for t in targets:
            p, y = probs[t], labels[t]
            if thresholds is not None and t in thresholds:
                thr = thresholds[t]
            else:
                thr = choose_threshold(y, p)
            used[t] = float(thr)
            per_task[t] = compute_metrics(y, p, thr)
            losses.append(float(-np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None)).mean()))
        return per_task, used, float(np.mean(losses))

    def evaluate(
        self, ds: BagDataset, thresholds: dict[str, float] | None = None, model: nn.Module | None = None
    ) -> tuple[dict[str, float], dict[str, float]]:
        """Metrics of ``ds`` (with ``loss``) and the thresholds used.

        ``thresholds=None`` chooses them on ``ds`` (validation) unless ``train.threshold`` fixes one.
        Single-task keys are plain (``auc``); multi-task keys are ``task/auc`` and ``mean/auc``.
        """
        from wsimil_core.engine.metrics import summarize_tasks

        per_task, used, loss = self.task_metrics(ds, thresholds, model)
        if len(self.targets) == 1:
            metrics = dict(per_task[self.targets[0]])
        else:
            metrics = summarize_tasks(per_task)
        metrics["loss"] = loss
        return metrics, used

    def _side_by_side(self, thresholds: dict[str, float]) -> dict[str, float]:
        """Validation metrics of the method's other evaluation models (e.g. an EMA copy), at the same thresholds."""
        main = self.method.inference_model()
        logs: dict[str, float] = {}
        for name, model in self.method.evaluation_models().items():
            if model is main:
                continue
            metrics, _ = self.evaluate(self.data["val"], thresholds, model=model)
            logs.update({f"val_{name}/{k}": v for k, v in metrics.items()})
        return logs

    def _metric_value(self, metrics: dict[str, float]) -> float:
        name = self.config.train.early_stopping.metric
        for key in (name, f"mean/{name}"):
            if key in metrics:
                return float(metrics[key])
        raise ConfigError(
            f"train.early_stopping.metric {name!r} is not a validation metric; choose one of "
            f"{sorted(k for k in metrics if '/' not in k or k.startswith('mean/'))}"
        )

    def _mode(self) -> str:
        es = self.config.train.early_stopping
        if es.mode != "auto":
            return es.mode
        return "min" if es.metric.split("/")[-1] == "loss" else "max"

    # --- checkpoints / state ------------------------------------------------------------------------------
    def _checkpoint_meta(self, metrics: dict[str, float], thresholds: dict[str, float], epoch: int) -> dict:
        from wsimil_core import __version__
        from wsimil_core.models.base import model_config_dict

        model = self.method.inference_model()
        attrs = self.full.first_slide_attrs
        encoder = dict(self.full.encoder_attrs)
        encoder.setdefault("encoder_id", self.full.encoder_id)
        for key in ("patch_mpp", "patch_size", "patch_size_level0", "stride_level0"):
            if key in attrs:
                encoder.setdefault(key, attrs[key])
        return {
            "method": self.config.method.name,
            "model_name": model.model_name,
            "model_config": model_config_dict(model),
            "class_names": self.full.class_names,
            "targets": self.targets,
            "encoder": encoder,
            "train_config": self.config.to_json(),
            "metrics": {**metrics, "epoch": epoch},
            "threshold": thresholds,
            "version": __version__,
        }

    def _save_checkpoint(self, name: str, meta: dict) -> Path:
        from wsimil_core.engine.checkpoint import save_checkpoint

        path = self.run_dir / name
        save_checkpoint(path, self.method.inference_model(), meta)
        return path

    def _write_history(self) -> None:
        import pandas as pd

        lines = "".join(json.dumps(r, allow_nan=True) + "\n" for r in self.history)
        atomic_write_text(self.run_dir / "metrics.jsonl", lines)
        atomic_write_text(self.run_dir / "metrics.csv", pd.DataFrame(self.history).to_csv(index=False))

    def _save_resume(self, phase_index: int, epoch: int, opt, sched, scaler, early: EarlyStopping, done: bool) -> None:
        from wsimil_core.engine.checkpoint import flatten_state, save_state

        state = {
            "method": dict(self.method.state_dict()),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "scaler": scaler.state_dict(),
            "rng": rng_state(),
        }
        tensors, skeleton = flatten_state(state, "s")
        meta = {
            "skeleton": skeleton,
            "phase_index": phase_index,
            "epoch": epoch,
            "next_global_epoch": self.global_epoch + 1,  # saved before the loop's increment
            "early": early.state(),
            "best": self.best,
            "history": self.history,
            "stopped_early": self.stopped_early,
            "completed": done,
            "config": self._comparable_config(),
        }
        save_state(self.run_dir / RESUME_FILE, tensors, meta)

    def _comparable_config(self) -> dict[str, Any]:
        cfg = self.config.to_json()
        cfg["output"].pop("progress", None)
        cfg["output"].pop("overwrite", None)
        return cfg

    def _load_resume(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        from wsimil_core.engine.checkpoint import load_state

        path = self.run_dir / RESUME_FILE
        if not path.exists():
            if self.resume is True:
                raise CheckpointError(f"{path}: no resume file to continue from")
            return None
        if self.resume is False:
            return None
        tensors, meta = load_state(path)
        if meta.get("completed"):
            if self.config.output.overwrite:
                return None
            raise ConfigError(
                f"{self.run_dir}: holds a finished run; choose another output.dir or set output.overwrite: true"
            )
        saved = meta.get("config", {})
        now = self._comparable_config()
        if saved != now:
            diff = _first_difference(saved, now)
            raise ConfigError(
                f"{path}: the run was started with a different config ({diff}); use another output.dir, "
                "the original config, or start afresh with --no-resume"
            )
        return tensors, meta

    # --- the run ------------------------------------------------------------------------------------------
    def fit(self) -> RunResult:
        """Train every phase, then evaluate the best model on the test split. Returns a ``RunResult``."""
        from rich.console import Console

        self.build()
        cfg = self.config
        console = Console(stderr=True, quiet=not (cfg.output.progress and self.is_main))
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        resume = self._load_resume()
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] = {"epoch": None, "metrics": {}, "thresholds": {}}
        self.global_epoch = 0
        self.stopped_early = False
        start_phase, start_epoch = 0, 0
        if resume is not None:
            tensors, meta = resume
            self.history = list(meta["history"])
            self.best = dict(meta["best"])
            self.global_epoch = int(meta["next_global_epoch"])
            start_phase, start_epoch = int(meta["phase_index"]), int(meta["epoch"]) + 1
            console.print(f"[bold]resuming[/] {self.run_dir} after epoch {self.global_epoch}")
        if self.is_main:
            import yaml

            atomic_write_text(self.run_dir / "config.yaml", yaml.safe_dump(cfg.to_json(), sort_keys=False))
        train_ds, val_ds = self.data["train"], self.data["val"]
        console.print(
            f"method {cfg.method.name}, {len(train_ds)} train / {len(val_ds) if val_ds else 0} val / "
            f"{len(self.data['test']) if self.data['test'] else 0} test bags, device {self.device}"
        )
        phases = list(self.method.phases)
        try:
            for phase_index, phase in enumerate(phases):
                if phase_index < start_phase:
                    continue
                self._run_phase(
                    phase_index,
                    phase,
                    resume if phase_index == start_phase else None,
                    start_epoch if phase_index == start_phase else 0,
                    console,
                )
                resume = None
        except KeyboardInterrupt:
            console.print(
                f"[yellow]interrupted[/]: state after epoch {self.global_epoch} is in {self.run_dir / RESUME_FILE}; "
                "run the same command again to resume"
            )
            raise
        return self._finish(console, resumed=start_phase > 0 or start_epoch > 0)

    def _run_phase(self, phase_index: int, phase: str, resume, start_epoch: int, console) -> None:
        from wsimil_core.engine.checkpoint import unflatten_state

        cfg = self.config
        epochs = cfg.train.phase_epochs.get(phase, cfg.train.epochs)
        self.method.setup_phase(phase, self.data["train"])
        params = [p for p in self.method.trainable_parameters(phase) if p.requires_grad]
        if not params:
            raise ConfigError(f"method {cfg.method.name!r} has no trainable parameters in phase {phase!r}")
        opt_cls = torch.optim.AdamW if cfg.train.optimizer == "adamw" else torch.optim.Adam
        opt = opt_cls(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        n_batches = math.ceil(len(self.data["train"]) / self.world_size)
        steps_per_epoch = math.ceil(n_batches / cfg.train.accumulate)
        total = epochs * steps_per_epoch
        warmup = int(round(cfg.train.warmup_epochs * steps_per_epoch))
        t = cfg.train
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_factor(s, total, warmup, t.scheduler, t.min_lr_ratio)
        )
        scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        early = EarlyStopping(self._mode(), cfg.train.early_stopping.patience, cfg.train.early_stopping.min_delta)
        if resume is not None:
            tensors, meta = resume
            state = unflatten_state(tensors, meta["skeleton"])
            self.method.load_state_dict(state["method"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            early.load(meta["early"])
            set_rng_state(state["rng"])
            if early.should_stop:
                return
        wrapped = self._wrap_ddp()
        try:
            for epoch in range(start_epoch, epochs):
                train_logs = self._train_epoch(phase, self.global_epoch, params, opt, sched, scaler)
                extra = self.method.epoch_end(phase, epoch)
                record: dict[str, Any] = {
                    "phase": phase,
                    "epoch": epoch,
                    "global_epoch": self.global_epoch,
                    "lr": float(opt.param_groups[0]["lr"]),
                }
                record.update({f"train/{k}": v for k, v in train_logs.items()})
                record.update({f"train/{k}": float(v) for k, v in (extra or {}).items()})
                with self._plain(wrapped):
                    if self.data["val"] is not None:
                        val, thresholds = self.evaluate(self.data["val"])
                        value, tiebreak = self._metric_value(val), val["loss"]
                    else:
                        val, thresholds = {}, {t: 0.5 for t in self.targets}
                        value, tiebreak = float(self.global_epoch), None
                    if cfg.train.threshold != "val":
                        thresholds = {t: float(cfg.train.threshold) for t in self.targets}
                    record.update({f"val/{k}": v for k, v in val.items()})
                    if self.data["val"] is not None:
                        record.update(self._side_by_side(thresholds))
                    improved = early.update(value, self.global_epoch, tiebreak)
                    record["best"] = improved
                    if improved:
                        self.best = {"epoch": self.global_epoch, "metrics": val, "thresholds": thresholds}
                    self.history.append(record)
                    if self.is_main:
                        meta = self._checkpoint_meta(val, thresholds, self.global_epoch)
                        if improved and "best" in cfg.output.keep:
                            self._save_checkpoint(BEST_FILE, meta)
                        if "last" in cfg.output.keep:
                            self._save_checkpoint(LAST_FILE, meta)
                        self._write_history()
                        self.stopped_early = early.should_stop
                        self._save_resume(phase_index, epoch, opt, sched, scaler, early, done=False)
                console.print(_epoch_line(record, cfg.train.early_stopping.metric), soft_wrap=True, highlight=False)
                self.global_epoch += 1
                for cb in self.callbacks:
                    cb(record)
                if early.should_stop:
                    self.stopped_early = True
                    console.print(f"early stopping after {epoch + 1} epochs of phase {phase}")
                    break
        finally:
            self._unwrap_ddp(wrapped)

    def _finish(self, console, resumed: bool) -> RunResult:
        cfg = self.config
        best_path = self.run_dir / BEST_FILE if "best" in cfg.output.keep else None
        last_path = self.run_dir / LAST_FILE if "last" in cfg.output.keep else None
        thresholds = dict(self.best.get("thresholds") or {t: 0.5 for t in self.targets})
        test_metrics: dict[str, float] = {}
        if self.data["test"] is not None and self.is_main:
            model = None
            if best_path is not None and best_path.exists():
                model, _ = load_checkpoint(best_path, device=self.device)
            test_metrics, _ = self.evaluate(self.data["test"], thresholds, model=model)
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
            from wsimil_core.engine.checkpoint import load_state, save_state

            path = self.run_dir / RESUME_FILE
            if path.exists():
                tensors, meta = load_state(path)
                meta["completed"] = True
                save_state(path, tensors, meta)
            atomic_write_text(self.run_dir / "result.json", json.dumps(result.to_json(), indent=2, allow_nan=True))
        return result


def _first_difference(a: Any, b: Any, path: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{path}.{k}" if path else k)
    return f"{path}: {a!r} -> {b!r}"


def _epoch_line(record: dict[str, Any], metric: str) -> str:
    parts = [f"{record['phase']} epoch {record['epoch'] + 1}", f"loss {record.get('train/loss', float('nan')):.4f}"]
    for key in ("val/loss", f"val/{metric}", f"val/mean/{metric}", "val/auc", "val/accuracy"):
        if key in record and not any(p.startswith(key + " ") for p in parts):
            parts.append(f"{key} {record[key]:.4f}")
    if record.get("best"):
        parts.append("(best)")
    return "  ".join(parts)


def train(
    config: TrainConfig | dict | str | Path,
    callbacks: Iterable[Callback] | None = None,
    resume: bool | None = None,
    dataset: BagDataset | None = None,
) -> RunResult:
    """Train one run (Python API of ``wsimil train``). See ``Trainer`` for the arguments."""
    return Trainer(config, callbacks=list(callbacks or []), resume=resume, dataset=dataset).fit()


__all__ = [
    "RunResult",
    "Trainer",
    "train",
    "build_datasets",
    "make_split",
    "seed_everything",
    "lr_factor",
    "EarlyStopping",
]
