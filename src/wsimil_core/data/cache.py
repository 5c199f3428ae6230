"""``BagCache``: decoded bags kept in memory up to a byte budget, shared by every view of one opened cohort.

Why the cache lives in the main process, and what that means for DataLoader workers
------------------------------------------------------------------------------------
A DataLoader worker is a separate process that ends with each pass over the data (each epoch, each validation).
A bag cached inside a worker dies with it, so with ``data.num_workers > 0`` a cache filled by the workers would
be empty again at the next epoch and every epoch would read the store. Persistent workers would keep it, but then
each worker holds its own copy of the bags it happened to read (memory times the worker count), the copies are
not shared by the training and validation loaders, nor across the folds of a cross-validation (one loader per
fold and split).

So the cache is filled in the main process only (``BagDataset.loader_workers``, called before a loader is built):
when a pass would start workers, the bags of the view that are not cached yet are read in the main process, in
the view's order, until one does not fit the budget. A view whose bags are then all cached is served without
workers (a worker would only add inter-process copies to a dictionary lookup); otherwise the workers start from
a copy of the filled cache (forked: the arrays' pages are shared) and read from the store only the bags beyond
the budget. Workers never add to their copy (it would be lost and could multiply the memory used by the worker
count). The cost: the first read of a cohort that fits the budget is done by one process instead of several.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["BagCache"]


class BagCache:
    """Features ``[N, D]`` (as stored) and coords ``[N, 2]`` int64 per slide id, up to ``budget_bytes`` in all.

    Nothing is evicted: a bag that does not fit the bytes left is not kept (and later, smaller bags may be).

    Args:
        budget_bytes: the most bytes of features + coords to keep (0: keep nothing).

    Attributes:
        left: bytes still free.
        overflowed: True once a bag was refused (or when the budget is 0): ``BagDataset.fill_cache`` stops there.
    """

    def __init__(self, budget_bytes: int):
        self.bags: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.left = max(0, int(budget_bytes))
        self.overflowed = self.left == 0

    def __contains__(self, slide_id: object) -> bool:
        return slide_id in self.bags

    def __len__(self) -> int:
        return len(self.bags)

    def get(self, slide_id: str) -> tuple[np.ndarray, np.ndarray] | None:
        """The cached ``(features, coords)`` of ``slide_id``, or None."""
        return self.bags.get(slide_id)

    def put(self, slide_id: str, features: np.ndarray, coords: np.ndarray) -> bool:
        """Keep the bag if it fits the bytes left and this is not a DataLoader worker; returns whether it was kept."""
        if torch.utils.data.get_worker_info() is not None:
            return False
        size = int(features.nbytes) + int(coords.nbytes)
        if size > self.left:
            self.overflowed = True
            return False
        self.bags[slide_id] = (features, coords)
        self.left -= size
        return True

    def holds_all(self, slide_ids: list[str]) -> bool:
        """Whether every one of ``slide_ids`` is cached."""
        return all(s in self.bags for s in slide_ids)
