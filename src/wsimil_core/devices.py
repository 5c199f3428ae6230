"""Devices in one place: ``resolve_device`` (``"auto"`` -> CUDA when present), ``autocast`` for AMP and the CPU
thread policy (``apply_thread_policy`` in the main process, ``single_thread_worker`` in DataLoader workers).

Every module that picks a device calls ``resolve_device``; nothing else parses device strings or sets torch's
thread count.
"""

from __future__ import annotations

import contextlib
import logging
import os

import torch

from wsimil_core.errors import ConfigError


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` (or None) -> CUDA when available, else CPU; anything else is passed to ``torch.device``.

    Raises:
        ConfigError: an unparsable device string, or ``cuda`` asked for on a machine without CUDA.
    """
    if isinstance(device, torch.device):
        return device
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"invalid device {device!r}: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available (use --device cpu or auto)")
    return dev


def autocast(device: torch.device, enabled: bool = True, dtype: torch.dtype = torch.float16):
    """Mixed precision on CUDA (``dtype``, float16 by default); a no-op context elsewhere or when disabled."""
    if enabled and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=dtype)
    return contextlib.nullcontext()


#: the intra-op thread count torch should have unless someone else changed it: torch's count when this module was
#: imported, then the count the policy last set (a different count means the user chose one: it is kept)
_EXPECTED_THREADS = {"count": torch.get_num_threads()}
_USER_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")

log = logging.getLogger(__name__)


def available_cores() -> int:
    """CPU cores this process may run on: its affinity mask (``os.sched_getaffinity``, Linux) where available,
    else ``os.cpu_count()``; at least 1."""
    getaffinity = getattr(os, "sched_getaffinity", None)
    if getaffinity is not None:
        try:
            return max(1, len(getaffinity(0)))
        except OSError:
            pass
    return max(1, os.cpu_count() or 1)


def user_thread_count() -> int | None:
    """The intra-op thread count the user chose, or None: a positive ``OMP_NUM_THREADS`` (else
    ``MKL_NUM_THREADS``) in the environment, or a ``torch.set_num_threads`` call made after ``wsimil_core.devices``
    was imported (torch's count differs from the one it had then / the policy last set)."""
    for var in _USER_THREAD_VARS:
        value = os.environ.get(var, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    current = torch.get_num_threads()
    return current if current != _EXPECTED_THREADS["count"] else None


def policy_thread_count(num_workers: int = 0, cores: int | None = None) -> int:
    """The policy's arithmetic: ``max(1, cores - num_workers)`` (``cores`` defaults to :func:`available_cores`)."""
    if cores is None:
        cores = available_cores()
    return max(1, int(cores) - max(0, int(num_workers)))


def apply_thread_policy(num_workers: int = 0) -> int:
    """Set torch's intra-op CPU threads of this process; returns the count in force afterwards.

    The rule (the same on CPU and CUDA: on CUDA the CPU threads only run the host side, and oversubscribed
    cores still slow it): the cores this process may use (:func:`available_cores`: the affinity mask, else
    ``os.cpu_count()``) minus its DataLoader worker processes (each one kept at 1 thread by
    :func:`single_thread_worker`), at least 1, so the process and its workers never ask for more threads than
    cores. A count the user chose wins and is left as it is (:func:`user_thread_count`: ``OMP_NUM_THREADS`` /
    ``MKL_NUM_THREADS``, or ``torch.set_num_threads`` called after import). ``torchrun`` and dask worker
    processes set ``OMP_NUM_THREADS=1`` themselves, so several processes on one node stay within the cores.

    Called by the trainer (when it builds the run), ``extract_cohort`` and the inference pipeline.

    Args:
        num_workers: DataLoader worker processes this process starts (0 = it reads its data itself).
    """
    user = user_thread_count()
    if user is not None:
        log.debug("threads: %d (the user's choice)", torch.get_num_threads())
        return torch.get_num_threads()
    count = policy_thread_count(num_workers)
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
    _EXPECTED_THREADS["count"] = count
    log.debug("threads: %d (%d cores, %d DataLoader workers)", count, available_cores(), num_workers)
    return count


def single_thread_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: a worker process runs torch on 1 thread (the policy counts it as 1 core)."""
    torch.set_num_threads(1)


__all__ = [
    "apply_thread_policy",
    "autocast",
    "available_cores",
    "policy_thread_count",
    "resolve_device",
    "single_thread_worker",
    "user_thread_count",
]
