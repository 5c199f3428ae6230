"""Devices, mixed precision and ``torchrun`` data parallelism of the trainer.

Under ``torchrun`` (``WORLD_SIZE > 1``) every child module of the method with trainable parameters is wrapped in
``DistributedDataParallel`` for a phase (:func:`wrap_ddp`); validation and checkpoints see the plain modules
(:func:`plain_modules`), so state dicts carry no ``module.`` prefix.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from wsimil_core.devices import autocast, resolve_device


def dist_info() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from the torchrun environment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), world


def resolve_train_device(device: str, local_rank: int = 0) -> torch.device:
    """``train.device`` as a torch device; a bare ``cuda`` becomes this process' GPU (``cuda:<local_rank>``)."""
    dev = resolve_device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    return dev


def amp_dtype_of(device: torch.device, amp: str) -> torch.dtype | None:
    """The autocast dtype ``train.amp`` asks for (``bf16`` / ``fp16``); None off CUDA or with ``off``."""
    if device.type != "cuda" or amp == "off":
        return None
    return torch.bfloat16 if amp == "bf16" else torch.float16


def amp_context(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    """Autocast to ``dtype`` on CUDA (from :func:`amp_dtype_of`); a no-op context when ``dtype`` is None."""
    return autocast(device, enabled=dtype is not None, dtype=dtype or torch.float16)


def init_distributed(device: torch.device, world_size: int) -> None:
    """Join the process group of a ``torchrun`` launch (NCCL on CUDA, else gloo); nothing for one process."""
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")


class DDP(DistributedDataParallel):
    """DDP that forwards unknown attributes (``self.model.config``...) to the wrapped module."""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


def wrap_ddp(method: nn.Module, device: torch.device, world_size: int) -> dict[str, nn.Module]:
    """Wrap each child module of ``method`` that has trainable parameters in :class:`DDP` (in place).

    Returns ``{child name: the unwrapped child}`` (empty for one process), for :func:`unwrap_ddp`.
    """
    if world_size <= 1:
        return {}
    wrapped = {}
    for name, child in list(method.named_children()):
        if any(p.requires_grad for p in child.parameters()):
            ids = [device.index] if device.type == "cuda" else None
            setattr(method, name, DDP(child, device_ids=ids, find_unused_parameters=True, broadcast_buffers=False))
            wrapped[name] = child
    return wrapped


def unwrap_ddp(method: nn.Module, wrapped: dict[str, nn.Module]) -> None:
    """Put back the children :func:`wrap_ddp` wrapped."""
    for name, child in wrapped.items():
        setattr(method, name, child)


@contextlib.contextmanager
def plain_modules(method: nn.Module, wrapped: dict[str, nn.Module]) -> Iterator[None]:
    """Temporarily restore the unwrapped modules (state dicts without ``module.`` prefixes)."""
    ddp = {name: getattr(method, name) for name in wrapped}
    unwrap_ddp(method, wrapped)
    try:
        yield
    finally:
        for name, module in ddp.items():
            setattr(method, name, module)
