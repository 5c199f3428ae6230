"""DMIN's straight-through Gumbel-sigmoid masks and masked attention pooling (AHDMIL, authors' code).

Masks may be shared by the classes (``[B, N]`` or ``[B, N, 1]``) or one per class (``[B, N, C]``, the authors'
DMIN: the mask of class ``c`` acts on class ``c``'s attention logits).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def gumbel_sigmoid_mask(logits: Tensor, tau: float, threshold: float, sample: bool) -> tuple[Tensor, Tensor]:
    """Hard 0/1 mask with straight-through gradients.

    ``soft = sigmoid((logits + l) / tau)`` with logistic noise ``l = log u - log(1 - u)`` (the difference of two
    Gumbel variables) when ``sample``, else ``l = 0``; ``hard = 1[soft > threshold]``.

    Returns:
        ``(mask, soft)``: ``mask = hard - soft.detach() + soft`` (value = hard, gradient = d soft), same shape as
        ``logits``.
    """
    if sample:
        u = torch.rand_like(logits).clamp_(1e-6, 1.0 - 1e-6)
        logits = logits + (torch.log(u) - torch.log1p(-u))
    soft = torch.sigmoid(logits / tau)
    hard = (soft > threshold).to(soft.dtype)
    return hard - soft.detach() + soft, soft


def masked_attention(scores: Tensor, weights: Tensor) -> Tensor:
    """Softmax over patches weighted by a (straight-through) mask: ``a_kc = w_kc e^{s_kc} / sum_j w_jc e^{s_jc}``.

    Args:
        scores: ``[B, N, C]`` attention logits.
        weights: ``[B, N]`` (one mask for every class), ``[B, N, 1]`` or ``[B, N, C]`` (one mask per class)
            mask values in [0, 1] (at least one non-zero per bag and class).

    Returns:
        ``[B, N, C]`` attention; zero where ``weights`` is zero. Differentiable in ``scores`` and ``weights``.
    """
    w = weights.unsqueeze(-1) if weights.dim() == 2 else weights
    on = (w.detach() > 0).expand_as(scores)
    ref = scores.detach().masked_fill(~on, float("-inf")).amax(dim=1, keepdim=True)
    ref = torch.nan_to_num(ref, neginf=0.0)
    e = torch.exp((scores - ref).clamp(max=30.0)) * w
    return e / e.sum(dim=1, keepdim=True).clamp_min(1e-12)


def ensure_one(mask: Tensor, logits: Tensor, allowed: Tensor | None = None) -> Tensor:
    """Keep at least one patch per bag (and per mask column): where ``mask`` (``[B, N]`` or ``[B, N, M]``) is
    all zero over the patches, switch on the patch of highest ``logits`` (same shape) among ``allowed``
    (``[B, N]`` bool)."""
    if mask.dim() == 3:
        cols = [ensure_one(mask[..., m], logits[..., m], allowed) for m in range(mask.shape[-1])]
        return torch.stack(cols, dim=-1)
    empty = mask.detach().sum(dim=1) <= 0
    if not bool(empty.any()):
        return mask
    ranked = logits.detach()
    if allowed is not None:
        ranked = ranked.masked_fill(~allowed, float("-inf"))
    top = nn.functional.one_hot(ranked.argmax(dim=1), mask.shape[1]).to(mask.dtype)
    return mask + top * empty.unsqueeze(1).to(mask.dtype)


__all__ = ["gumbel_sigmoid_mask", "masked_attention", "ensure_one"]
