"""Optimiser parameter groups: parameters a model names in ``no_weight_decay()`` get no weight decay.

The timm convention: a module may define ``no_weight_decay() -> set[str]``, the names (relative to that module,
as in its ``named_parameters()``) of parameters that must not be decayed (e.g. MoMKD's raw memory, which is used
only after row normalisation). The engine walks every module of the method (the method itself, its model, an
anchor or teacher), so a name is honoured whichever module declares it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn


def no_weight_decay_names(root: nn.Module) -> set[str]:
    """Full parameter names (relative to ``root``) that some module of ``root`` declares in ``no_weight_decay()``."""
    names: set[str] = set()
    for prefix, module in root.named_modules():
        declare = getattr(module, "no_weight_decay", None)
        if callable(declare):
            names.update(f"{prefix}.{n}" if prefix else str(n) for n in declare())
    return names


def weight_decay_groups(root: nn.Module, params: Iterable[nn.Parameter]) -> list[dict[str, Any]]:
    """``params`` as optimiser groups: ``[{"params": decayed}, {"params": not decayed, "weight_decay": 0.0}]``.

    The first group takes the optimiser's ``weight_decay`` argument; the second (only when not empty) holds the
    parameters named by ``no_weight_decay()`` somewhere in ``root``. The order of ``params`` is kept in each group.
    """
    excluded = no_weight_decay_names(root)
    skip = {id(p) for name, p in root.named_parameters() if name in excluded}
    params = list(params)
    groups: list[dict[str, Any]] = [{"params": [p for p in params if id(p) not in skip]}]
    no_decay = [p for p in params if id(p) in skip]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


__all__ = ["no_weight_decay_names", "weight_decay_groups"]
