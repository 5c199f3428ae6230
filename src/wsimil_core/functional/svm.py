"""Smooth top-1 SVM loss (Berrada, Zisserman, Kumar 2018, "Smooth Loss Functions for Deep Top-k
Classification", Eq. 11 with k = 1), the instance-level loss of CLAM and of AHDMIL's instance classifiers.

For scores ``s`` ``[B, K]`` and labels ``y`` ``[B]``, margin ``alpha`` and temperature ``tau``::

    L_{1,tau}(s, y) = tau * log sum_j exp( (alpha * 1[j != y] + s_j - s_y) / tau )

averaged over the batch. As ``tau -> 0`` it tends to the multi-class hinge loss
``max_j (alpha * 1[j != y] + s_j) - s_y``; at any ``tau`` it is smooth, and it is at least
``max(0, alpha + max_{j != y} s_j - s_y)`` (and at least 0).
"""

from __future__ import annotations

import torch
from torch import Tensor


def smooth_top1_svm_loss(scores: Tensor, target: Tensor, alpha: float = 1.0, tau: float = 1.0) -> Tensor:
    """Smooth top-1 SVM loss averaged over the batch (see the module docstring).

    Args:
        scores: ``[B, K]`` class scores (logits), ``K >= 2``.
        target: ``[B]`` integer labels in ``[0, K)``.
        alpha: margin (1.0 in CLAM's ``SmoothTop1SVM``).
        tau: smoothing temperature, > 0 (1.0 in CLAM).

    Returns:
        A scalar tensor (float32 or the scores' wider dtype), differentiable in ``scores``.
    """
    if scores.dim() != 2 or scores.shape[1] < 2:
        raise ValueError(f"smooth_top1_svm_loss: scores must be [B, K] with K >= 2, got {tuple(scores.shape)}")
    if target.shape != scores.shape[:1]:
        raise ValueError(
            f"smooth_top1_svm_loss: target {tuple(target.shape)} does not match scores {tuple(scores.shape)}"
        )
    if not tau > 0:
        raise ValueError(f"smooth_top1_svm_loss: tau must be > 0, got {tau}")
    s = scores if scores.dtype == torch.float64 else scores.float()
    y = target.long().view(-1, 1)
    margin = torch.full_like(s, float(alpha)).scatter(1, y, 0.0)  # alpha * 1[j != y]
    shifted = (margin + s - s.gather(1, y)) / tau
    return (tau * torch.logsumexp(shifted, dim=1)).mean()


__all__ = ["smooth_top1_svm_loss"]
