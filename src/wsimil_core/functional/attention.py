"""Attention normalisation and comparison blocks from ASMIL.

Paper: "ASMIL: Attention-Stabilized Multiple Instance Learning for Whole Slide Imaging".

- ``nsf``: the normalised sigmoid function (Eq. 5) used for the anchor's attention.
- ``anchor_kl``: the stabilisation term KL(a_anchor || a_online) of Eq. 7 / 9 (per-patch mean or sum).
- ``attention_jsd``: the Jensen-Shannon divergence used as the attention-instability metric (Eq. 3, App. H).

All functions are pure and work on any leading shape; the distribution axis is ``dim``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
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


def anchor_kl(
    anchor_logits: Tensor,
    online_logits: Tensor,
    temperature: float = 1.0,
    dim: int = -1,
    *,
    reduction: Literal["mean", "sum"] = "mean",
    anchor_norm: Literal["nsf", "softmax"] = "nsf",
    online_norm: Literal["softmax", "nsf"] = "softmax",
) -> Tensor:
    """Attention stabilisation term of ASMIL (Eq. 7, 9): ``KL(a_anchor || a_online)``.

    ``a_online = softmax(online_logits)`` and ``a_anchor = NSF(anchor_logits / temperature)`` (Eq. 5) with a
    stop-gradient on the anchor. Per distribution (one bag, head and FEAT token) over the ``N`` patches::

        KL = sum_n a_anchor[n] * (log a_anchor[n] - log a_online[n])

    ``reduction="mean"`` (default) divides it by ``N`` (the per-patch mean, as the authors' code takes the mean
    over every element of the ``[H, T, N]`` attention tensor: the paper's lambda was tuned with it);
    ``reduction="sum"`` keeps the textbook sum over patches (N times stronger on N-patch bags). Either is then
    averaged over every other axis (batch, heads, FEAT tokens). Its gradient with respect to ``online_logits``
    is ``(a_online - a_anchor) / (M * N)`` for ``"mean"`` and ``(a_online - a_anchor) / M`` for ``"sum"``
    (``M`` = number of distributions), so gradient descent moves the online attention toward the anchor.

    Ablations (paper Table 3 "NSF", App. G): ``anchor_norm="softmax"`` normalises the anchor with a softmax
    (of ``anchor_logits / temperature``) instead of NSF; ``online_norm="nsf"`` takes the online attention as
    ``NSF(online_logits)`` (the model then also pools with NSF).

    Args:
        anchor_logits: ``[..., N]`` anchor attention logits (detached here).
        online_logits: ``[..., N]`` online attention logits, same shape.
        temperature: divides the anchor logits before normalisation (> 0; the paper has none, i.e. 1).
        dim: the patch axis.
        reduction: ``"mean"`` (KL / N) or ``"sum"`` over the patches.
        anchor_norm: ``"nsf"`` (Eq. 5, the paper) or ``"softmax"`` for the anchor distribution.
        online_norm: ``"softmax"`` (Eq. 2, the paper) or ``"nsf"`` for the online distribution.

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
    if reduction not in ("mean", "sum"):
        raise ValueError(f"anchor_kl: reduction must be 'mean' or 'sum', got {reduction!r}")
    scaled = anchor_logits.detach().float() / temperature
    if anchor_norm == "nsf":
        a_anchor = nsf(scaled, dim=dim)
    elif anchor_norm == "softmax":
        a_anchor = torch.softmax(scaled, dim=dim)
    else:
        raise ValueError(f"anchor_kl: anchor_norm must be 'nsf' or 'softmax', got {anchor_norm!r}")
    if online_norm == "softmax":
        log_online = torch.log_softmax(online_logits.float(), dim=dim)
    elif online_norm == "nsf":
        # log NSF(s)_n = log sigmoid(s_n) - log sum_j sigmoid(s_j), computed stably
        log_sig = F.logsigmoid(online_logits.float())
        log_online = log_sig - torch.logsumexp(log_sig, dim=dim, keepdim=True)
    else:
        raise ValueError(f"anchor_kl: online_norm must be 'softmax' or 'nsf', got {online_norm!r}")
    log_anchor = torch.log(a_anchor.clamp_min(torch.finfo(torch.float32).tiny))
    kl = (a_anchor * (log_anchor - log_online)).sum(dim=dim)
    if reduction == "mean":
        kl = kl / online_logits.shape[dim]
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
