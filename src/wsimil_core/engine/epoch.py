"""One training epoch: the bag loader (seeded, balanced or sharded) and the optimiser steps over it.

Bags have batch size 1; the loss is divided by ``train.accumulate`` and an optimiser step (with gradient
clipping, the AMP scaler, one scheduler step and ``method.after_optimizer_step``) runs every ``accumulate``
bags and after the last one. A non-finite loss stops the run with the slide's name.

With ``train.bags_per_step = B > 1`` the losses of ``B`` bags are averaged before one backward, and the Cox
partial likelihood of their risks (left by ``methods.base.task_loss``) is added: a Cox risk set needs several
slides in one step. ``accumulate`` then counts such groups.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler
from torch.utils.data.distributed import DistributedSampler
from tqdm.auto import tqdm

from wsimil_core.data.bag import BagBatch
from wsimil_core.data.dataset import BagDataset, collate_single
from wsimil_core.data.sampling import make_sampler
from wsimil_core.engine.config import TrainConfig
from wsimil_core.engine.distributed import amp_context
from wsimil_core.engine.seeding import seed_worker
from wsimil_core.errors import ConfigError
from wsimil_core.functional.survival import cox_partial_nll
from wsimil_core.methods.base import COX_RISKS, Method


def group_cox_loss(bags: list[BagBatch]) -> torch.Tensor | None:
    """Cox partial NLL (Breslow ties) of the risks the bags of one step left in ``extras["cox_risk"]``, summed
    over Cox tasks; None when no bag has one."""
    by_task: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for bag in bags:
        for task, risk in bag.extras.get(COX_RISKS, {}).items():
            by_task.setdefault(task, []).append((risk.reshape(-1)[:1], bag.survival[task].reshape(-1)))
    if not by_task:
        return None
    losses = []
    for items in by_task.values():
        risk = torch.cat([r for r, _ in items])
        time_event = torch.stack([te for _, te in items]).to(risk.device)
        losses.append(cox_partial_nll(risk, time_event[:, 0], time_event[:, 1]))
    return torch.stack(losses).sum()


class EpochRunner:
    """Trains ``method`` for one epoch at a time on the training split.

    Args:
        config: the run's config (``train`` and ``data.num_workers``).
        method: the method (its ``training_step``, ``after_optimizer_step`` and ``balanced_sampling`` hooks).
        dataset: the training split.
        device: where bags go; amp_dtype: autocast dtype on CUDA (None: full precision).
        rank, world_size: this process in a ``torchrun`` launch.
        progress: show a progress bar (rank 0 with ``output.progress``).
    """

    def __init__(
        self,
        config: TrainConfig,
        method: Method,
        dataset: BagDataset,
        device: torch.device,
        amp_dtype: torch.dtype | None = None,
        rank: int = 0,
        world_size: int = 1,
        progress: bool = False,
    ):
        self.config = config
        self.method = method
        self.dataset = dataset
        self.device = device
        self.amp_dtype = amp_dtype
        self.rank = rank
        self.world_size = world_size
        self.progress = progress

    def loader(self, phase: str, epoch: int) -> DataLoader:
        """The training bags of ``epoch`` (global epoch index): class-balanced when ``train.balanced`` or the
        method's ``balanced_sampling(phase)`` asks, sharded across ranks, seeded by ``train.seed`` and the epoch."""
        cfg = self.config
        train = self.dataset
        asked = self.method.balanced_sampling(phase)
        balanced = bool(cfg.train.balanced or asked)
        labels = train.all_labels()
        if isinstance(asked, (list, tuple)) and not cfg.train.balanced:
            labels = {t: labels[t] for t in asked}
        sampler: Sampler[int]
        if self.world_size > 1 and not balanced:
            dist_sampler: DistributedSampler[int] = DistributedSampler(
                train, num_replicas=self.world_size, rank=self.rank, shuffle=True, seed=cfg.train.seed
            )
            dist_sampler.set_epoch(epoch)
            sampler = dist_sampler
        else:
            bag_sampler = make_sampler(
                labels, len(train), balanced, cfg.train.seed, rank=self.rank, world_size=self.world_size
            )
            bag_sampler.set_epoch(epoch)
            sampler = bag_sampler
        train.set_epoch(epoch)
        gen = torch.Generator()
        gen.manual_seed(cfg.train.seed * 7919 + epoch)
        return DataLoader(
            train,
            batch_size=1,
            sampler=sampler,
            num_workers=train.loader_workers(cfg.data.num_workers),  # 0 once every bag is cached (data/cache.py)
            collate_fn=collate_single,
            worker_init_fn=seed_worker,
            generator=gen,
            pin_memory=self.device.type == "cuda",
        )

    def run(
        self,
        phase: str,
        epoch: int,
        params: list[nn.Parameter],
        opt: torch.optim.Optimizer,
        sched: torch.optim.lr_scheduler.LRScheduler,
        scaler: torch.amp.GradScaler,
    ) -> dict[str, float]:
        """Train one epoch; returns the epoch means of every scalar the method's ``training_step`` returned."""
        cfg = self.config.train
        self.method.train()
        loader = self.loader(phase, epoch)
        n = len(loader)
        per_step = max(1, cfg.bags_per_step)
        group: list[BagBatch] = []
        group_losses: list[torch.Tensor] = []
        n_groups = 0
        sums: dict[str, float] = {}
        scaled = scaler.is_enabled()
        opt.zero_grad(set_to_none=True)
        bags: Iterable[BagBatch]
        bar = None
        if loader.num_workers == 0 and self.device.type != "cuda":
            # the same bags in the same order, without the DataLoader's per-bag cost (CUDA keeps its pinned memory)
            dataset = self.dataset
            bags = (dataset[i] for i in loader.sampler)
        else:
            bags = loader
        if self.progress:
            bags = bar = tqdm(
                bags, total=n, desc=f"{phase} epoch {epoch + 1}", leave=False, disable=None, dynamic_ncols=True
            )
        for i, bag in enumerate(bags):
            bag = bag.to(self.device)
            with amp_context(self.device, self.amp_dtype):
                step: dict[str, Any] = self.method.training_step(bag, phase)
            loss = step["loss"]
            if not torch.isfinite(loss.detach()).all():
                raise ConfigError(
                    f"non-finite training loss on slide {bag.slide_id!r} (phase {phase}, epoch {epoch + 1}); "
                    "lower train.lr or enable train.grad_clip"
                )
            if per_step == 1 and COX_RISKS not in bag.extras:
                backward = loss
                n_groups += 1
            else:
                group.append(bag)
                group_losses.append(loss)
                if len(group) < per_step and i + 1 < n:
                    self._log(step, sums)
                    continue
                backward = torch.stack(group_losses).mean()
                cox = group_cox_loss(group)
                if cox is not None:
                    backward = backward + cox
                    step["cox"] = cox.detach()
                group, group_losses = [], []
                n_groups += 1
            if cfg.accumulate > 1:
                backward = backward / cfg.accumulate
            (scaler.scale(backward) if scaled else backward).backward()
            if n_groups % cfg.accumulate == 0 or i + 1 == n:
                if cfg.grad_clip is not None:
                    if scaled:
                        scaler.unscale_(opt)
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                if scaled:
                    scaler.step(opt)
                    scaler.update()
                else:
                    opt.step()
                opt.zero_grad(set_to_none=True)
                sched.step()
                self.method.after_optimizer_step(phase)
            self._log(step, sums)
            if bar is not None and i % 10 == 0:
                bar.set_postfix(loss=f"{sums['loss'] / (i + 1):.4f}")
        if bar is not None:
            bar.close()
        out = {k: v / max(1, n) for k, v in sums.items()}
        if "cox" in sums:  # logged once per group
            out["cox"] = sums["cox"] / max(1, n_groups)
        return out

    @staticmethod
    def _log(step: dict[str, Any], sums: dict[str, float]) -> None:
        """Add the step's scalars to the epoch sums."""
        for k, v in step.items():
            if isinstance(v, torch.Tensor) and v.numel() == 1:
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            elif isinstance(v, (int, float)):
                sums[k] = sums.get(k, 0.0) + float(v)
