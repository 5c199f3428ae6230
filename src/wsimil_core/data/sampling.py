"""Bag samplers: seeded shuffling or class-balanced sampling, reproducible per epoch, shardable for DDP.

The order of epoch ``e`` depends only on ``(seed, e)``, so a resumed run sees the same bags in the same order
as an uninterrupted one.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping

import numpy as np
import torch
from torch.utils.data import Sampler


def balanced_weights(labels: Mapping[str, np.ndarray]) -> np.ndarray:
    """Per-bag sampling weights that balance the classes of every target.

    For one target, bag ``i`` of class ``c`` gets ``w_i = 1 / n_c`` (every class is drawn equally often).
    For several targets, the per-target weights (each normalised to sum 1) are averaged, so each task's
    positives and negatives are balanced as far as the cohort allows.

    Args:
        labels: ``{target: int[B]}`` class index per bag.

    Returns:
        ``float64[B]`` weights summing to 1.
    """
    arrays = [np.asarray(v, dtype=np.int64) for v in labels.values()]
    if not arrays:
        raise ValueError("balanced_weights needs at least one target")
    n = len(arrays[0])
    total = np.zeros(n, dtype=np.float64)
    for y in arrays:
        counts = np.bincount(y, minlength=int(y.max()) + 1).astype(np.float64)
        w = 1.0 / counts[y]
        total += w / w.sum()
    return total / total.sum()


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
) -> BagSampler:
    """The sampler the engine uses for training bags (balanced when asked)."""
    weights = balanced_weights(labels) if balanced and labels else None
    return BagSampler(n, weights=weights, shuffle=shuffle, seed=seed, rank=rank, world_size=world_size)


__all__ = ["balanced_weights", "BagSampler", "make_sampler"]
