"""Top-p routing of dynamic feature routing (DFR), MECDS Sec. 2.2.

For task m, the router scores ``phi[:, m]`` (a softmax over the N patches) are ranked and the *minimal* number of
top-ranked patches whose cumulative ``phi`` reaches ``p`` are sent to that task's expert.
"""

from __future__ import annotations

import torch
from torch import Tensor


def top_p_route(probs: Tensor, p: float = 0.5, dim: int = 0) -> Tensor:
    """Boolean mask of the minimal set of largest entries whose cumulative sum reaches ``p`` (MECDS Sec. 2.2).

    Along ``dim``, entries are ranked by decreasing value; ties are ranked by increasing index (the earlier
    patch first). Entry ``k`` of the ranking is selected when the cumulative sum of the entries ranked before it
    is still below ``p``, so the selection is the shortest prefix of the ranking with sum ``>= p``. At least one
    entry is always selected; when the whole slice sums to less than ``p`` every entry is selected.

    Args:
        probs: non-negative scores, e.g. ``phi`` ``[N, M]`` (softmax over the N patches per task).
        p: cumulative mass to reach, in ``(0, 1]`` (the paper uses 0.5).
        dim: the dimension to rank along (the patches).

    Returns:
        bool tensor of the shape of ``probs``; True = routed.
    """
    if not 0.0 < float(p) <= 1.0:
        raise ValueError(f"top_p_route: p must be in (0, 1], got {p!r}")
    if probs.dim() == 0:
        raise ValueError("top_p_route: probs must have at least one dimension")
    x = probs.detach().movedim(dim, -1)
    if x.shape[-1] == 0:
        return torch.zeros_like(probs, dtype=torch.bool)
    # stable descending sort: equal values keep their index order (ties broken by index)
    values, order = torch.sort(x, dim=-1, descending=True, stable=True)
    total = torch.cumsum(values, dim=-1)
    before = torch.cat([torch.zeros_like(total[..., :1]), total[..., :-1]], dim=-1)  # mass ranked before each
    keep_sorted = before < p
    keep_sorted[..., 0] = True
    mask = torch.zeros_like(keep_sorted)
    mask.scatter_(-1, order, keep_sorted)
    return mask.movedim(-1, dim)


__all__ = ["top_p_route"]
