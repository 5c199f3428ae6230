"""Validation and test of a method on a ``BagDataset``: probabilities, per-task metrics and thresholds.

Every bag goes through ``method.eval_forward(bag, model)`` in eval mode without gradients, so a method validates
the pipeline it deploys (AHDMIL with pre-screening, ABMILX E2E from pixels). Probabilities are the softmax of
each task's logits; binary thresholds are chosen on the data (Youden's J) unless given. A survival task gives its
output vector instead (``engine.survival``: the curve ``S_k``, or ``[risk]`` for Cox), Harrell's C-index and its
loss; its "threshold" is the median risk (the high/low split of the Kaplan-Meier plot).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from wsimil_core.data.dataset import BagDataset, collate_single
from wsimil_core.devices import single_thread_worker
from wsimil_core.engine.distributed import amp_context
from wsimil_core.engine.metrics import choose_threshold, compute_metrics, summarize_tasks
from wsimil_core.engine.survival import risk_scores, survival_loss, survival_metrics, survival_output
from wsimil_core.errors import ConfigError
from wsimil_core.methods.base import Method


def task_logits(logits: Any, targets: list[str]) -> dict[str, torch.Tensor]:
    """``{task: logits}`` of a model output: a multi-task dict (must hold every target) or one tensor."""
    if isinstance(logits, dict):
        missing = [t for t in targets if t not in logits]
        if missing:
            raise ConfigError(f"model returns logits for tasks {sorted(logits)} but data.targets is {targets}")
        return {t: logits[t] for t in targets}
    return {targets[0]: logits}


class Evaluator:
    """Runs a method's evaluation forward over datasets.

    Args:
        method: the method (its ``eval_forward`` and ``inference_model``).
        device: where bags go.
        targets: the run's tasks (default of every call).
        num_workers: DataLoader workers.
        amp_dtype: autocast dtype on CUDA (None: full precision).
    """

    def __init__(
        self,
        method: Method,
        device: torch.device,
        targets: Sequence[str],
        num_workers: int = 0,
        amp_dtype: torch.dtype | None = None,
    ):
        self.method = method
        self.device = device
        self.targets = list(targets)
        self.num_workers = num_workers
        self.amp_dtype = amp_dtype

    def loader(self, ds: BagDataset) -> DataLoader:
        """Bags of ``ds`` in order, batch size 1 (no workers once every bag is cached: ``data/cache.py``)."""
        return DataLoader(
            ds,
            batch_size=1,
            shuffle=False,
            num_workers=ds.loader_workers(self.num_workers),
            collate_fn=collate_single,
            worker_init_fn=single_thread_worker,
        )

    @torch.no_grad()
    def predict(
        self, ds: BagDataset, model: nn.Module | None = None, targets: Sequence[str] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Softmax probabilities ``{task: [B, C]}`` and labels ``{task: [B]}`` of ``ds`` (eval mode).

        Each bag goes through ``method.eval_forward(bag, model)`` (``model`` None: the inference model).
        ``targets``: the tasks to read (default: the run's targets).
        """
        tasks = list(targets or self.targets)
        model = model if model is not None else self.method.inference_model()
        inner = getattr(model, "module", None)  # a DDP wrapper's module
        if isinstance(inner, nn.Module):
            model = inner
        was = model.training
        model.eval()
        probs: dict[str, list[np.ndarray]] = {t: [] for t in tasks}
        try:
            for bag in self.loader(ds):
                bag = bag.to(self.device)
                with amp_context(self.device, self.amp_dtype):
                    out = self.method.eval_forward(bag, model)
                for t, lg in task_logits(out.logits, tasks).items():
                    lg = lg.float().reshape(-1, lg.shape[-1])[:1]
                    if t in ds.survival:
                        probs[t].append(survival_output(lg, ds.survival[t].loss))
                        continue
                    probs[t].append(torch.softmax(lg, dim=-1).cpu().numpy()[0])
        finally:
            model.train(was)
        return {t: np.stack(v) for t, v in probs.items()}, {t: ds.labels(t) for t in tasks}

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
        tasks = list(targets or self.targets)
        probs, labels = self.predict(ds, model, tasks)
        per_task: dict[str, dict[str, float]] = {}
        used: dict[str, float] = {}
        losses = []
        for t in tasks:
            p, y = probs[t], labels[t]
            if t in ds.survival:
                kind = ds.survival[t].loss
                times, events = ds.survival_data(t)
                risks = risk_scores(p, kind)
                given = thresholds is not None and t in thresholds
                used[t] = float(thresholds[t]) if thresholds is not None and given else float(np.median(risks))
                per_task[t] = survival_metrics(times, events, p, kind, ds.survival_cuts[t], full=False)
                per_task[t]["threshold"] = used[t]
                losses.append(survival_loss(p, kind, times, events, ds.survival_cuts[t]))
                continue
            if thresholds is not None and t in thresholds:
                thr = thresholds[t]
            else:
                thr = choose_threshold(y, p)
            used[t] = float(thr)
            per_task[t] = compute_metrics(y, p, thr)
            for fixed in self.method.report_thresholds() if p.shape[1] == 2 else ():
                at = compute_metrics(y, p, fixed)
                per_task[t].update(
                    {f"sensitivity@{fixed:g}": at["sensitivity"], f"specificity@{fixed:g}": at["specificity"]}
                )
            losses.append(float(-np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None)).mean()))
        return per_task, used, float(np.mean(losses))

    def evaluate(
        self, ds: BagDataset, thresholds: dict[str, float] | None = None, model: nn.Module | None = None
    ) -> tuple[dict[str, float], dict[str, float]]:
        """Metrics of ``ds`` (with ``loss``) and the thresholds used (``None``: chosen on ``ds``).

        Single-task keys are plain (``auc``); multi-task keys are ``task/auc`` and ``mean/auc``.
        """
        per_task, used, loss = self.task_metrics(ds, thresholds, model)
        if len(self.targets) == 1:
            metrics = dict(per_task[self.targets[0]])
        else:
            metrics = summarize_tasks(per_task)
        metrics["loss"] = loss
        return metrics, used

    def side_by_side(
        self,
        ds: BagDataset,
        thresholds: dict[str, float],
        models: dict[str, nn.Module] | None = None,
        prefix: str = "val",
    ) -> dict[str, float]:
        """Metrics of the method's other evaluation models (e.g. an EMA copy; ``models`` instead when given) on
        ``ds`` at the same thresholds, as ``{"<prefix>_<name>/<metric>": value}``."""
        main = self.method.inference_model()
        logs: dict[str, float] = {}
        for name, model in (self.method.evaluation_models() if models is None else models).items():
            if model is main:
                continue
            metrics, _ = self.evaluate(ds, thresholds, model=model)
            logs.update({f"{prefix}_{name}/{k}": v for k, v in metrics.items()})
        return logs
