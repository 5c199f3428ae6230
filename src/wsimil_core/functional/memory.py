"""Class-conditional memory blocks of MoMKD (Guo et al., "Momentum Memory for Knowledge Distillation in
Computational Pathology", 2026).

A memory is a set of ``n`` unit-norm components ``C in R^{n x D}``; MoMKD keeps one for the positive class
(``C+``) and one for the negative class (``C-``). Every function here is pure (no parameters, no state) and
works on any device. Shapes: ``N`` patches, ``B`` slides, ``D`` embedding dimension, ``n`` components.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor


def memory_phi(z: Tensor, memory: Tensor, tau_agg: float = 5.0) -> Tensor:
    """Soft-max similarity of embeddings to a memory (Eq. 3).

    ``phi(F, C) = (1 / tau_agg) * ln sum_j exp(tau_agg * F . c_j)``, a smooth maximum over components.

    Args:
        z: ``[B, D]`` embeddings.
        memory: ``[n, D]`` components.
        tau_agg: sharpness of the aggregation (larger -> closer to the hard maximum).

    Returns:
        ``[B]``.
    """
    if tau_agg <= 0:
        raise ValueError(f"tau_agg must be > 0, got {tau_agg}")
    return torch.logsumexp(tau_agg * (z @ memory.t()), dim=-1) / tau_agg


def memory_delta(z: Tensor, mem_pos: Tensor, mem_neg: Tensor, tau_agg: float = 5.0) -> Tensor:
    """Class margin of embeddings (Eq. 4): ``Delta = phi(F, C+) - phi(F, C-)``, shape ``[B]``."""
    return memory_phi(z, mem_pos, tau_agg) - memory_phi(z, mem_neg, tau_agg)


def memory_alignment_loss(
    z: Tensor,
    mem_pos: Tensor,
    mem_neg: Tensor,
    y: Tensor,
    tau_agg: float = 5.0,
    beta: float = 20.0,
    margin: float = 0.3,
) -> Tensor:
    """Memory alignment loss (Eq. 3-5), the mean over the batch of

    ``softplus(beta * (margin - Delta))`` for positive slides (``y = 1``) and
    ``softplus(beta * (margin + Delta))`` for negative slides (``y = 0``),
    with ``Delta`` from :func:`memory_delta`. It pulls a positive slide's embedding at least ``margin`` closer
    to ``C+`` than to ``C-`` (and the reverse for negatives). Gradients reach ``z`` and both memories.

    Args:
        z: ``[B, D]`` (or ``[D]``) slide embeddings (``F_N-wsi`` or ``F_N-omics``, unit-norm).
        mem_pos: ``[n, D]`` positive memory ``C+``.
        mem_neg: ``[m, D]`` negative memory ``C-``.
        y: ``[B]`` binary labels (1 positive, 0 negative).
        tau_agg, beta, margin: Eq. 3 sharpness, Eq. 5 slope and margin.

    Returns:
        scalar loss.
    """
    if z.dim() == 1:
        z = z.unsqueeze(0)
    y = y.reshape(-1)
    if y.numel() != z.shape[0]:
        raise ValueError(f"memory_alignment_loss: {z.shape[0]} embeddings but {y.numel()} labels")
    if bool(((y != 0) & (y != 1)).any()):
        raise ValueError("memory_alignment_loss: labels must be 0 (negative) or 1 (positive)")
    delta = memory_delta(z, mem_pos, mem_neg, tau_agg)
    sign = 2.0 * y.to(delta.dtype) - 1.0  # +1 for positives, -1 for negatives
    return F.softplus(beta * (margin - sign * delta)).mean()


def memory_nearest(f: Tensor, memory: Tensor) -> tuple[Tensor, Tensor]:
    """Best similarity and index of the nearest component for each row of ``f``.

    Args:
        f: ``[N, D]``; memory: ``[n, D]``.

    Returns:
        ``(similarity [N], index [N] int64)`` with ``similarity_i = max_j f_i . c_j``.
    """
    sim = f @ memory.t()
    best, idx = sim.max(dim=-1)
    return best, idx


def memory_score(f: Tensor, mem_pos: Tensor, mem_neg: Tensor) -> Tensor:
    """Memory score of each patch (Eq. 6): ``Score_i = max_j(F_P,i . c+_j) - max_j(F_P,i . c-_j)``.

    Args:
        f: ``[N, D]`` patch projections ``F_P-wsi``.
        mem_pos: ``[n, D]``; mem_neg: ``[m, D]``.

    Returns:
        ``[N]``; positive where the patch resembles the positive memory more.
    """
    return memory_nearest(f, mem_pos)[0] - memory_nearest(f, mem_neg)[0]


def memory_attention(score: Tensor, tau: float | Tensor = 0.2) -> Tensor:
    """Memory-guided attention weights (Eq. 7): ``alpha = softmax(Score / tau)`` over the patches.

    Args:
        score: ``[N]`` from :func:`memory_score`.
        tau: temperature (> 0): a number, or a 0-d tensor (a learnable temperature; gradients flow to it).

    Returns:
        ``[N]`` non-negative weights summing to 1.
    """
    if not isinstance(tau, Tensor) and tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    return torch.softmax(score / tau, dim=-1)


def memory_pool(alpha: Tensor, features: Tensor) -> Tensor:
    """Memory-guided pooling (Eq. 8): ``F_C-wsi = sum_i alpha_i F_wsi,i``; ``[N]`` x ``[N, D]`` -> ``[D]``."""
    return alpha @ features


def memory_orthogonality(memory: Tensor) -> Tensor:
    """Diversity term of Eq. 10: ``sum_{i != j} cos(c_i, c_j)^2`` over one memory ``[n, D]`` -> scalar."""
    c = F.normalize(memory, dim=-1)
    gram = c @ c.t()
    off = gram - torch.diag_embed(torch.diagonal(gram))
    return (off**2).sum()


def memory_commitment(f: Tensor, memory: Tensor) -> Tensor:
    """Commitment term of Eq. 10: mean over rows of ``||f_i - sg(c_k*(i))||^2``, ``c_k*`` the nearest component.

    The memory is detached (stop-gradient), so this term moves the patch projections, never the memory.

    Args:
        f: ``[N, D]``; memory: ``[n, D]``.

    Returns:
        scalar.
    """
    mem = memory.detach()
    _, idx = memory_nearest(f, mem)
    return ((f - mem[idx]) ** 2).sum(dim=-1).mean()


def memory_loss(
    f: Tensor,
    mem_pos: Tensor,
    mem_neg: Tensor,
    ortho_weight: float = 1.0,
    y: Tensor | int | None = None,
    search: Literal["own_class", "joint"] = "own_class",
) -> Tensor:
    """Memory loss (Eq. 10):
    ``mean_i ||F_i - sg(c_k*(i))||^2 + ortho_weight * (sum_{i!=j} cos(c+_i, c+_j)^2 + sum_{i!=j} cos(c-_i, c-_j)^2)``.

    ``search="own_class"`` (default; the memory is class-conditional, Sec. 3.3.1, and the authors' code runs
    the vector quantiser of the slide's own class only) looks for the nearest component ``c_k*(i)`` in the
    memory of the slide's class: ``C+`` for a positive slide (``y = 1``), ``C-`` for a negative one.
    ``search="joint"`` searches ``C+ u C-`` together (wsimil 0.x). The first term moves the patch projections only
    (stop-gradient on the memory); the second moves only the memory.

    Args:
        f: ``[N, D]`` patch projections ``F_P-wsi`` of one slide.
        mem_pos: ``[n, D]``; mem_neg: ``[m, D]``.
        ortho_weight: weight of the diversity term (1 in the paper).
        y: the slide's label (0 or 1; a 1-element tensor or int); required for ``"own_class"``.
        search: ``"own_class"`` or ``"joint"``.

    Returns:
        scalar.
    """
    if search == "own_class":
        if y is None:
            raise ValueError("memory_loss: the slide label y is needed to commit to the own-class memory")
        label = int(y.reshape(-1)[0]) if isinstance(y, Tensor) else int(y)
        if label not in (0, 1):
            raise ValueError(f"memory_loss: labels must be 0 (negative) or 1 (positive), got {label}")
        commit = memory_commitment(f, mem_pos if label == 1 else mem_neg)
    elif search == "joint":
        commit = memory_commitment(f, torch.cat([mem_pos, mem_neg], dim=0))
    else:
        raise ValueError(f"memory_loss: search must be 'own_class' or 'joint', got {search!r}")
    ortho = memory_orthogonality(mem_pos) + memory_orthogonality(mem_neg)
    return commit + ortho_weight * ortho


def usage_stats(counts: Tensor) -> tuple[float, float]:
    """Memory health (Fig. 3) from per-component usage counts ``[n]``.

    Returns:
        ``(active_ratio, perplexity)``: the share of components used at least once, and
        ``exp(-sum_k p_k ln p_k)`` with ``p = counts / sum(counts)`` (``n`` when usage is uniform, 1 when one
        component takes every patch). Both are NaN-free: with no usage at all they are ``(0.0, 0.0)``.
    """
    counts = counts.double()
    total = float(counts.sum())
    if total <= 0:
        return 0.0, 0.0
    p = counts / total
    nz = p[p > 0]
    entropy = float(-(nz * nz.log()).sum())
    return float((counts > 0).double().mean()), math.exp(entropy)


__all__ = [
    "memory_phi",
    "memory_delta",
    "memory_alignment_loss",
    "memory_nearest",
    "memory_score",
    "memory_attention",
    "memory_pool",
    "memory_orthogonality",
    "memory_commitment",
    "memory_loss",
    "usage_stats",
]
