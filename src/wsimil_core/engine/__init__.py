"""Training engine: config schema, training loop, metrics, checkpoints, inference, cross-validation.

Python API (imported lazily, so ``import wsimil_core.engine`` stays light)::

    from wsimil_core.engine import load_config, train, crossval
    result = train(load_config("run.yaml", overrides=["train.epochs=3"]))   # RunResult
    cv = crossval("run.yaml", folds=5)                                      # CrossvalResult

Submodules can also be imported directly (``from wsimil_core.engine.metrics import compute_metrics``).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_LAZY = {
    "TrainConfig": "config",
    "load_config": "config",
    "default_config_yaml": "config",
    "train": "trainer",
    "Trainer": "trainer",
    "RunResult": "trainer",
    "crossval": "crossval",
    "CrossvalResult": "crossval",
    "compute_metrics": "metrics",
    "choose_threshold": "metrics",
    "summarize_tasks": "metrics",
    "save_checkpoint": "checkpoint",
    "load_checkpoint": "checkpoint",
    "save_state": "checkpoint",
    "load_state": "checkpoint",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f"wsimil_core.engine.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'wsimil_core.engine' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))


__all__ = list(_LAZY)
