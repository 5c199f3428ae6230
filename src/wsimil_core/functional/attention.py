"""Attention normalisation and comparison blocks from ASMIL.

Paper: "ASMIL: Attention-Stabilized Multiple Instance Learning for Whole Slide Imaging".

- ``nsf``: the normalised sigmoid function (Eq. 5) used for the anchor's attention.
- ``anchor_kl``: the stabilisation term KL(a_anchor || a_online) of Eq. 7 / 9.
- ``attention_jsd``: the Jensen-Shannon divergence used as the attention-instability metric (Eq. 3, App. H).

All functions are pure and work on any leading shape; the distribution axis is ``dim``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def nsf(scores: Tensor, dim: int = -1) -> Tensor:
    """Normalised sigmoid function (ASMIL Eq. 5): ``NSF(s)_i = sigmoid(s_i) / sum_j sigmoid(s_j)``.

    Unlike softmax, NSF saturates for large scores, so a few patches cannot take all the mass.

    Args:
        scores: attention logits of any shape, e.g. ``[B, H, T, N]``.
        dim: the axis that is normalised (patches).

    Returns:
        A tensor of the same shape whose entries along ``dim`` are positive and sum to 1.
    """
    if scores.shape[dim] == 0:
        raise ValueError("nsf: cannot normalise over an empty axis (a bag with no patches)")
    sig = torch.sigmoid(scores.float())
    return (sig / sig.sum(dim=dim, keepdim=True)).to(scores.dtype)


def anchor_kl(anchor_logits: Tensor, online_logits: Tensor, temperature: float = 0.5, dim: int = -1) -> Tensor:
    """Attention stabilisation term of ASMIL (Eq. 7, 9): ``KL(a_anchor || a_online)``.

    ``a_online = softmax(online_logits)`` and ``a_anchor = NSF(anchor_logits / temperature)`` (Eq. 5) with a
    stop-gradient on the anchor. The KL divergence is summed over ``dim`` (patches) and averaged over every
    other axis (batch, heads, FEAT tokens)::

        KL = mean_{b,h,t} sum_n a_anchor[n] * (log a_anchor[n] - log a_online[n])

    Its gradient with respect to ``online_logits`` is ``(a_online - a_anchor) / M`` (``M`` = number of
    distributions), so gradient descent moves the online attention toward the anchor.

    Args:
        anchor_logits: ``[..., N]`` anchor attention logits (detached here).
        online_logits: ``[..., N]`` online attention logits, same shape.
        temperature: divides the anchor logits before NSF (> 0).
        dim: the patch axis.

    Returns:
        A scalar tensor (float32).
    """
    if anchor_logits.shape != online_logits.shape:
        raise ValueError(
            f"anchor_kl: anchor logits {tuple(anchor_logits.shape)} and online logits "
            f"{tuple(online_logits.shape)} differ in shape"
        )
    if temperature <= 0:
        raise ValueError(f"anchor_kl: temperature must be > 0, got {temperature}")
    a_anchor = nsf(anchor_logits.detach().float() / temperature, dim=dim)
    log_online = torch.log_softmax(online_logits.float(), dim=dim)
    log_anchor = torch.log(a_anchor.clamp_min(torch.finfo(torch.float32).tiny))
    kl = (a_anchor * (log_anchor - log_online)).sum(dim=dim)
    return kl.mean()


def attention_jsd(p: Tensor, q: Tensor, dim: int = -1, eps: float = 1e-12) -> Tensor:
    """Jensen-Shannon divergence (natural log) between two attention distributions (ASMIL Eq. 3, App. H).

    ``JSD(p, q) = 1/2 KL(p || m) + 1/2 KL(q || m)`` with ``m = (p + q) / 2``; ``0 <= JSD <= ln 2``.
    Inputs are renormalised along ``dim`` (negative entries are an error); terms with zero mass count 0.

    Args:
        p, q: ``[..., N]`` non-negative attention weights of the same shape (e.g. a slide's attention at two
            consecutive epochs).
        dim: the patch axis.

    Returns:
        ``[...]`` the divergence per distribution (a 0-d tensor for 1-D inputs).
    """
    if p.shape != q.shape:
        raise ValueError(f"attention_jsd: shapes {tuple(p.shape)} and {tuple(q.shape)} differ")
    p = p.double()
    q = q.double()
    if (p < 0).any() or (q < 0).any():
        raise ValueError("attention_jsd: attention weights must be non-negative")
    p = p / p.sum(dim=dim, keepdim=True).clamp_min(eps)
    q = q / q.sum(dim=dim, keepdim=True).clamp_min(eps)
    m = 0.5 * (p + q)

    def kl(a: Tensor, b: Tensor) -> Tensor:
        terms = torch.where(a > 0, a * (torch.log(a.clamp_min(eps)) - torch.log(b.clamp_min(eps))), 0.0)
        return terms.sum(dim=dim)

    jsd = 0.5 * kl(p, m) + 0.5 * kl(q, m)
    return jsd.clamp(0.0, math.log(2.0)).float()


__all__ = ["nsf", "anchor_kl", "attention_jsd"]
