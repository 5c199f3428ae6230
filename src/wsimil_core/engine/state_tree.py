"""Nested training state (optimizer/scheduler ``state_dict``, RNG states, counters) <-> ``{path: Tensor}`` plus a
JSON skeleton, so resume files need no pickle (``engine.checkpoint.save_state`` writes them)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from wsimil_core.errors import CheckpointError

_TENSOR = "__tensor__"
_NDARRAY = "__ndarray__"
_TUPLE = "__tuple__"
_DICT = "__dict__"
_FLOAT = "__float__"


def flatten_state(obj: Any, prefix: str = "state") -> tuple[dict[str, Tensor], Any]:
    """Split nested state into ``({path: Tensor}, JSON skeleton)`` with no pickle.

    Tensors and numpy arrays go to the tensor dict under slash paths (``state/param_groups/0/...``) and are
    replaced by markers in the skeleton; dicts with non-string keys (optimizer state is keyed by int), tuples and
    non-finite floats are tagged so ``unflatten_state`` restores them exactly. Supports dict, list, tuple,
    str, int, float, bool, None, Tensor and numpy arrays/scalars (e.g. ``np.random.get_state()``).
    """
    tensors: dict[str, Tensor] = {}

    def walk(value: Any, path: str) -> Any:
        if isinstance(value, Tensor):
            tensors[path] = value
            return {_TENSOR: path}
        if isinstance(value, np.ndarray):
            tensors[path] = torch.from_numpy(np.ascontiguousarray(value))
            return {_NDARRAY: path}
        if isinstance(value, np.generic):
            value = value.item()
        if isinstance(value, float) and not math.isfinite(value):
            return {_FLOAT: repr(value)}
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, dict):
            if all(isinstance(k, str) for k in value) and not any(k.startswith("__") for k in value):
                return {k: walk(v, f"{path}/{k}") for k, v in value.items()}
            items = []
            for k, v in value.items():
                if not isinstance(k, (str, int, float, bool)) and k is not None:
                    raise TypeError(f"{path}: dict key {k!r} of type {type(k).__name__} cannot be stored")
                items.append([k, walk(v, f"{path}/{k}")])
            return {_DICT: items}
        if isinstance(value, tuple):
            return {_TUPLE: [walk(v, f"{path}/{i}") for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [walk(v, f"{path}/{i}") for i, v in enumerate(value)]
        raise TypeError(f"{path}: values of type {type(value).__name__} cannot be stored without pickle")

    skeleton = walk(obj, prefix)
    return tensors, skeleton


def unflatten_state(tensors: dict[str, Tensor], skeleton: Any) -> Any:
    """Inverse of ``flatten_state``: rebuild the nested state from the tensors and the JSON skeleton."""

    def walk(value: Any) -> Any:
        if isinstance(value, list):
            return [walk(v) for v in value]
        if isinstance(value, dict):
            if len(value) == 1:
                ((key, inner),) = value.items()
                if key in (_TENSOR, _NDARRAY):
                    if inner not in tensors:
                        raise CheckpointError(f"resume file lacks tensor {inner!r}")
                    t = tensors[inner]
                    return t.numpy() if key == _NDARRAY else t
                if key == _TUPLE:
                    return tuple(walk(v) for v in inner)
                if key == _DICT:
                    return {k: walk(v) for k, v in inner}
                if key == _FLOAT:
                    return float(inner)
            return {k: walk(v) for k, v in value.items()}
        return value

    return walk(skeleton)


def flatten_optimizer_state(state_dict: dict[str, Any], prefix: str = "optimizer") -> tuple[dict[str, Tensor], Any]:
    """``optimizer.state_dict()`` -> ``(tensors, JSON skeleton)`` (int parameter ids and tuples preserved)."""
    return flatten_state(state_dict, prefix)


def unflatten_optimizer_state(tensors: dict[str, Tensor], skeleton: Any) -> dict[str, Any]:
    """Inverse of ``flatten_optimizer_state``; the result can be passed to ``optimizer.load_state_dict``."""
    return unflatten_state(tensors, skeleton)


__all__ = ["flatten_state", "unflatten_state", "flatten_optimizer_state", "unflatten_optimizer_state"]
