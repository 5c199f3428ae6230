"""Bag samplers: seeded shuffling or class-balanced sampling, reproducible per epoch, shardable for DDP.

The order of epoch ``e`` depends only on ``(seed, e)``, so a resumed run sees the same bags in the same order
as an uninterrupted one.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Mapping
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Sampler

BalanceMode = Literal["rake", "product", "mean"]
BALANCE_MODES: tuple[str, ...] = ("rake", "product", "mean")


def _class_masses(weights: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Sum of ``weights`` per class of ``y`` (``float64[C]``, classes 0..max(y))."""
    return np.bincount(y, weights=weights, minlength=int(y.max()) + 1)


def balanced_weights(labels: Mapping[str, np.ndarray], mode: BalanceMode = "rake") -> np.ndarray:
    """Per-bag sampling weights that balance the classes of every target.

    For one target every mode gives bag ``i`` of class ``c`` the weight ``1 / (K n_c)`` (``K`` classes present),
    so every class is drawn equally often. For several targets (MECDS' teacher phase, Sec. 2.3 / 3.1: "a
    class-balanced subset created through dataset resampling", one balanced subset for all tasks):

    * ``rake`` (default): iterative proportional fitting (raking) from uniform weights, one target after the
      other, until every target's classes carry equal mass ``1 / K_t`` (tolerance 1e-9; 1e-3 when the balance needs
      some bags at weight 0, which raking approaches slowly). The result is the
      balanced distribution closest to uniform (minimum KL divergence), so no bag gets more weight than the
      balance needs. When the label combinations make exact balance impossible (e.g. three mutually exclusive
      positive classes that cannot all reach 1/2) it warns with the masses reached.
    * ``product``: ``w_i = prod_t 1 / n_{t, y_ti}``: exact when the targets' labels are independent, otherwise
      approximate.
    * ``mean``: the per-target weights (each normalised to sum 1) averaged, the behaviour of wsimil 0.1. A rare
      target's positives then get far less than half the mass (about 18-21% with the MECDS paper's positive
      counts 14,387 / 589 / 1,838 of 29,774 slides).

    Args:
        labels: ``{target: int[B]}`` class index per bag (every array of the same length B).
        mode: ``rake``, ``product`` or ``mean``.

    Returns:
        ``float64[B]`` weights summing to 1 (bags may get weight 0 under ``rake``).
    """
    if mode not in BALANCE_MODES:
        raise ValueError(f"balanced_weights: mode must be one of {BALANCE_MODES}, got {mode!r}")
    arrays = [np.asarray(v, dtype=np.int64).reshape(-1) for v in labels.values()]
    if not arrays:
        raise ValueError("balanced_weights needs at least one target")
    n = len(arrays[0])
    if n == 0 or any(len(y) != n for y in arrays):
        raise ValueError(
            f"balanced_weights: every target needs the same non-zero number of bags, got {[len(y) for y in arrays]}"
        )
    if mode == "mean":
        total = np.zeros(n, dtype=np.float64)
        for y in arrays:
            w = 1.0 / np.bincount(y).astype(np.float64)[y]
            total += w / w.sum()
        return total / total.sum()
    if mode == "product":
        total = np.ones(n, dtype=np.float64)
        for y in arrays:
            total *= 1.0 / np.bincount(y).astype(np.float64)[y]
        return total / total.sum()
    return _rake(arrays, n)


def _rake(arrays: list[np.ndarray], n: int, tol: float = 1e-9, max_sweeps: int = 2000) -> np.ndarray:
    """Iterative proportional fitting of uniform weights to equal class masses for every target (see
    ``balanced_weights``)."""
    w = np.full(n, 1.0 / n)
    targets = []
    for y in arrays:
        present = np.bincount(y) > 0
        targets.append(np.where(present, 1.0 / present.sum(), 0.0))
    for _ in range(max_sweeps):
        for y, goal in zip(arrays, targets, strict=True):
            mass = _class_masses(w, y)
            scale = np.divide(goal, mass, out=np.zeros_like(goal), where=mass > 0)
            w = w * scale[y]
        w = w / w.sum()
        worst = max(np.abs(_class_masses(w, y) - goal).max() for y, goal in zip(arrays, targets, strict=True))
        if worst < tol:
            return w
    if worst < 1e-3:  # a balance on the boundary (some bags at weight 0) is approached slowly; close enough
        return w
    reached = [np.round(_class_masses(w, y), 3).tolist() for y in arrays]
    warnings.warn(
        f"balanced sampling: the label combinations do not allow every target's classes equal mass; class masses "
        f"reached per target: {reached}",
        stacklevel=3,
    )
    return w


class BagSampler(Sampler[int]):
    """Indices of one epoch: a seeded permutation, or ``n`` draws with replacement from ``weights``.

    Call ``set_epoch(e)`` before iterating. With ``world_size > 1`` the epoch's indices are padded to a multiple
    of ``world_size`` and rank ``r`` takes every ``world_size``-th one starting at ``r`` (as DistributedSampler).
    """

    def __init__(
        self,
        n: int,
        weights: np.ndarray | None = None,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        if n <= 0:
            raise ValueError("BagSampler needs at least one bag")
        self.n = n
        self.weights = None if weights is None else torch.as_tensor(np.asarray(weights), dtype=torch.float64)
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _epoch_indices(self) -> list[int]:
        gen = torch.Generator()
        gen.manual_seed(self.seed * 100_003 + self.epoch)
        if self.weights is not None:
            return torch.multinomial(self.weights, self.n, replacement=True, generator=gen).tolist()
        if self.shuffle:
            return torch.randperm(self.n, generator=gen).tolist()
        return list(range(self.n))

    def __iter__(self) -> Iterator[int]:
        indices = self._epoch_indices()
        if self.world_size > 1:
            total = math.ceil(self.n / self.world_size) * self.world_size
            indices = (indices * math.ceil(total / len(indices)))[:total]
            indices = indices[self.rank :: self.world_size]
        return iter(indices)

    def __len__(self) -> int:
        return math.ceil(self.n / self.world_size) if self.world_size > 1 else self.n


def make_sampler(
    labels: Mapping[str, np.ndarray] | None,
    n: int,
    balanced: bool,
    seed: int,
    shuffle: bool = True,
    rank: int = 0,
    world_size: int = 1,
    mode: BalanceMode = "rake",
) -> BagSampler:
    """The sampler the engine uses for training bags (balanced when asked, by ``balanced_weights(labels, mode)``)."""
    weights = balanced_weights(labels, mode) if balanced and labels else None
    return BagSampler(n, weights=weights, shuffle=shuffle, seed=seed, rank=rank, world_size=world_size)


__all__ = ["BALANCE_MODES", "BalanceMode", "balanced_weights", "BagSampler", "make_sampler"]
