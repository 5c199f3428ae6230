"""Devices in one place: ``resolve_device`` (``"auto"`` -> CUDA when present) and ``autocast`` for AMP.

Every module that picks a device calls ``resolve_device``; nothing else parses device strings.
"""

from __future__ import annotations

import contextlib

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


__all__ = ["autocast", "resolve_device"]
