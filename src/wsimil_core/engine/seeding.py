"""Seeds and RNG states of a training run: every random source the loop depends on, saved and restored by resume."""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch

from wsimil_core.devices import single_thread_worker


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
    """DataLoader ``worker_init_fn``: 1 torch thread (``devices.single_thread_worker``, the thread policy), then
    seed numpy and random from the worker's torch seed."""
    single_thread_worker(worker_id)
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
    """Restore what :func:`rng_state` returned (after a JSON round trip: lists where tuples were)."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(tuple(state["numpy"]))
    rnd = state["random"]
    random.setstate((rnd[0], tuple(rnd[1]), rnd[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))
