"""Attention plus (A+) of ABMILX (Tang, Qin et al., "Revisiting End-to-End Learning with Slide-level
Supervision in Computational Pathology", Eq. 4), and the attention mass share (a sparsity proxy).

A+ refines the per-head local attention logits ``A^j`` with a global message passing step::

    U^j    = Softmax(Q^j K^j^T / sqrt(d_h))          (Eq. 4)
    G(A^j) = A^j + alpha * U^j A^j                   (Eq. 4)

``U^j A^j`` is ordinary attention whose *value* is the column ``A^j``. It is computed with
``torch.nn.functional.scaled_dot_product_attention`` so that no ``[N, N]`` matrix is ever materialised
(memory linear in N). The fused kernels need the value to have the same last dimension as the query, so the
single value column is zero-padded to ``d_h`` and column 0 of the result is kept (the padded columns cost
compute, not memory beyond ``[N, d_h]``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def attention_plus(q: Tensor, k: Tensor, a: Tensor, alpha: Tensor | float) -> Tensor:
    """G(A) = A + alpha * Softmax(Q K^T / sqrt(d_h)) A (paper Eq. 4), in memory linear in N.

    Args:
        q: ``[..., N, d_h]`` queries (e.g. ``[B, m, N, d_h]`` for m heads).
        k: ``[..., N, d_h]`` keys, same shape as ``q``.
        a: ``[..., N, 1]`` (or ``[..., N]``) attention logits A, one column per head.
        alpha: learnable scalar (tensor) or float.

    Returns:
        ``G(A)`` with the shape of ``a``.
    """
    squeeze = a.dim() == q.dim() - 1
    a_col = a.unsqueeze(-1) if squeeze else a
    if q.shape != k.shape or a_col.shape[:-1] != q.shape[:-1] or a_col.shape[-1] != 1:
        raise ValueError(
            f"attention_plus: q {tuple(q.shape)} and k {tuple(k.shape)} must match and a {tuple(a.shape)} "
            "must be [..., N, 1] with the same leading dims"
        )
    d_h = q.shape[-1]
    value = F.pad(a_col, (0, d_h - 1)) if d_h > 1 else a_col
    ua = F.scaled_dot_product_attention(q, k, value.to(q.dtype))[..., :1].to(a_col.dtype)
    out = a_col + alpha * ua
    return out.squeeze(-1) if squeeze else out


def attention_plus_reference(q: Tensor, k: Tensor, a: Tensor, alpha: Tensor | float) -> Tensor:
    """The same formula with ``U`` materialised as an ``[..., N, N]`` matrix (for tests and benchmarks only)."""
    squeeze = a.dim() == q.dim() - 1
    a_col = a.unsqueeze(-1) if squeeze else a
    u = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)  # Eq. 4
    out = a_col + alpha * (u @ a_col)  # Eq. 4
    return out.squeeze(-1) if squeeze else out


def attention_mass_share(weights: Tensor, mass: float = 0.9) -> Tensor:
    """Share of patches holding ``mass`` of the attention: smallest k/N with top-k weights summing to ``mass``.

    A *proxy* of the "sparsity" of ABMILX's Sec. 3.3 table: the paper measures "the proportion of activated
    patches" without defining when a patch counts as activated, so its figure cannot be reproduced exactly.
    Small values mean peaked (sparse) attention.

    Args:
        weights: ``[..., N]`` non-negative attention weights summing to 1 over the last dim.
        mass: the cumulative mass to reach (0 < mass <= 1).

    Returns:
        ``[...]`` values in [1/N, 1].
    """
    if not 0.0 < mass <= 1.0:
        raise ValueError(f"attention_mass_share: mass must be in (0, 1], got {mass}")
    n = weights.shape[-1]
    w = weights.detach().float()
    w = w / w.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    cum = torch.sort(w, dim=-1, descending=True).values.cumsum(dim=-1)
    k = (cum < mass - 1e-6).sum(dim=-1) + 1
    return k.clamp(max=n).float() / n


#: Old name of :func:`attention_mass_share` (the figure is a proxy of the paper's sparsity, not its definition).
attention_sparsity = attention_mass_share


__all__ = ["attention_plus", "attention_plus_reference", "attention_mass_share", "attention_sparsity"]
