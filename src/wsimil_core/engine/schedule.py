"""Learning-rate schedule and early stopping of a training phase (and how the config picks the tracked metric)."""

from __future__ import annotations

import math
from typing import Any

from wsimil_core.engine.config import TrainConfig
from wsimil_core.errors import ConfigError


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

    def _key(self, value: float | None) -> float:
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


def early_stopping_of(config: TrainConfig) -> EarlyStopping:
    """A fresh ``EarlyStopping`` for one phase, as ``train.early_stopping`` asks (``mode: auto``: ``min`` for a
    loss, else ``max``)."""
    es = config.train.early_stopping
    mode = es.mode if es.mode != "auto" else ("min" if es.metric.split("/")[-1] == "loss" else "max")
    return EarlyStopping(mode, es.patience, es.min_delta)


def tracked_metric(config: TrainConfig, metrics: dict[str, float]) -> float:
    """The value of ``train.early_stopping.metric`` in validation ``metrics`` (``auc`` or ``mean/auc``).

    Raises:
        ConfigError: the metric is not among ``metrics``.
    """
    name = config.train.early_stopping.metric
    for key in (name, f"mean/{name}"):
        if key in metrics:
            return float(metrics[key])
    if name == "auc" and ("c_index" in metrics or "mean/c_index" in metrics):  # survival tasks only
        return float(metrics.get("c_index", metrics.get("mean/c_index", float("nan"))))
    raise ConfigError(
        f"train.early_stopping.metric {name!r} is not a validation metric; choose one of "
        f"{sorted(k for k in metrics if '/' not in k or k.startswith('mean/'))}"
    )
