"""Knowledge-distillation losses of MECDS Sec. 2.3: asymmetric KD (AKD, Eq. 1-2), its label-gated variant and
plain KL distillation.

AKD, for binary logits ``[B, 2]`` (class 1 = positive), with temperature ``T``::

    z_s = softmax(s / T)[:, 1]          z_t = softmax(t / T)[:, 1]           (softened probabilities)
    p   = softmax(s)[:, 1]              p_hat = softmax(t)[:, 1]             (plain probabilities)
    w_pos = (1 - p) ** gamma_pos                                              (Eq. 2, positive weight)
    w_neg = max(p_hat - margin, 0) ** gamma_neg                               (Eq. 2, negative weight)
    L_AKD = mean_b T^2 * ( w_pos * z_t * log(z_t / z_s)
                         + w_neg * (1 - z_t) * log((1 - z_t) / (1 - z_s)) )   (Eq. 1)

The weights are constants (no gradient flows through them). The paper prints ``z-hat`` in the second term; it is
a typo for ``1 - z-hat``: the two terms are the positive- and negative-class parts of the binary KL divergence,
so with ``w_pos = w_neg = 1`` the loss equals ``T^2 * KL(teacher || student)``.

Because the two halves get different weights, ``L_AKD`` is not minimised at ``z_s = z_t``: with ``w_neg = 0``
(teacher ``p_hat <= margin``) only the positive half is left, and it decreases as ``z_s`` grows, so AKD pushes the
student's positive probability up on bags the teacher calls negative: the paper's intended bias toward
sensitivity (Sec. 2.3, Table 2). ``akd_gated_loss`` is the variant gated by the ground-truth label: each bag's whole
binary KL is weighted by ``w_pos`` (positive bag) or ``w_neg`` (negative bag), so it is minimised at
``z_s = z_t`` and focuses on hard bags without that bias (see docs/methods/mecds.md for a figure).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _check_pair(student_logits: Tensor, teacher_logits: Tensor, what: str) -> None:
    if student_logits.dim() != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"{what}: student and teacher logits must both be [B, C] of the same shape, got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )


def akd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    T: float = 2.0,
    gamma_pos: float = 1.0,
    gamma_neg: float = 4.0,
    margin: float = 0.2,
) -> Tensor:
    """Asymmetric knowledge distillation loss (MECDS Eq. 1-2), batch mean.

    Args:
        student_logits: ``[B, 2]`` binary logits of the student.
        teacher_logits: ``[B, 2]`` binary logits of the teacher (no gradient is taken through them).
        T: distillation temperature (> 0).
        gamma_pos: focusing exponent of the positive weight ``w_pos = (1 - p)^gamma_pos``.
        gamma_neg: exponent of the negative weight ``w_neg = max(p_hat - margin, 0)^gamma_neg``.
        margin: teacher-probability margin below which the negative term is switched off.

    Returns:
        scalar tensor.
    """
    _check_pair(student_logits, teacher_logits, "akd_loss")
    if student_logits.shape[1] != 2:
        raise ValueError(f"akd_loss is defined for binary logits [B, 2], got {tuple(student_logits.shape)}")
    if T <= 0:
        raise ValueError(f"akd_loss: T must be > 0, got {T}")
    s = student_logits.float()
    t = teacher_logits.detach().float()
    log_zs = F.log_softmax(s / T, dim=1)  # [:, 1] = log z_s, [:, 0] = log (1 - z_s)
    log_zt = F.log_softmax(t / T, dim=1)
    zt = log_zt.exp()
    with torch.no_grad():  # Eq. 2: the weights are constants
        p = torch.softmax(s, dim=1)[:, 1]
        p_hat = torch.softmax(t, dim=1)[:, 1]
        w_pos = (1.0 - p).clamp_min(0.0) ** gamma_pos
        w_neg = (p_hat - margin).clamp_min(0.0) ** gamma_neg
    # z log(z / z_s) with 0 log 0 = 0 (teacher probabilities may underflow to 0)
    pos = torch.xlogy(zt[:, 1], zt[:, 1]) - zt[:, 1] * log_zs[:, 1]
    neg = torch.xlogy(zt[:, 0], zt[:, 0]) - zt[:, 0] * log_zs[:, 0]
    return (T * T * (w_pos * pos + w_neg * neg)).mean()


def akd_gated_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    T: float = 2.0,
    gamma_pos: float = 1.0,
    gamma_neg: float = 4.0,
    margin: float = 0.2,
) -> Tensor:
    """AKD with the Eq. 1 weights gated by the ground-truth label (an option, not the paper's Eq. 2), batch mean.

    ``L = mean_b T^2 * w_b * KL(z_t || z_s)`` with the binary KL of the softened probabilities and
    ``w_b = (1 - p)^gamma_pos`` for a positive bag (``labels == 1``), ``max(p_hat - margin, 0)^gamma_neg`` for a
    negative one (weights are constants).

    Args:
        student_logits: ``[B, 2]`` binary logits of the student.
        teacher_logits: ``[B, 2]`` binary logits of the teacher (detached).
        labels: ``[B]`` ground-truth class (0 or 1) of each bag.
        T, gamma_pos, gamma_neg, margin: as ``akd_loss``.

    Returns:
        scalar tensor.
    """
    _check_pair(student_logits, teacher_logits, "akd_gated_loss")
    if student_logits.shape[1] != 2:
        raise ValueError(f"akd_gated_loss is defined for binary logits [B, 2], got {tuple(student_logits.shape)}")
    if labels.shape != student_logits.shape[:1]:
        raise ValueError(f"akd_gated_loss: labels must be [B], got {tuple(labels.shape)}")
    if T <= 0:
        raise ValueError(f"akd_gated_loss: T must be > 0, got {T}")
    s = student_logits.float()
    t = teacher_logits.detach().float()
    log_zs = F.log_softmax(s / T, dim=1)
    log_zt = F.log_softmax(t / T, dim=1)
    kl = (torch.xlogy(log_zt.exp(), log_zt.exp()) - log_zt.exp() * log_zs).sum(dim=1)  # [B]
    with torch.no_grad():
        p = torch.softmax(s, dim=1)[:, 1]
        p_hat = torch.softmax(t, dim=1)[:, 1]
        w_pos = (1.0 - p).clamp_min(0.0) ** gamma_pos
        w_neg = (p_hat - margin).clamp_min(0.0) ** gamma_neg
        w = torch.where(labels.to(s.device) == 1, w_pos, w_neg)
    return (T * T * w * kl).mean()


def kd_kl_loss(student_logits: Tensor, teacher_logits: Tensor, T: float = 2.0) -> Tensor:
    """Plain distillation (Hinton et al. 2015; MECDS Table 2 ablation): ``T^2 * KL(softmax(t/T) || softmax(s/T))``.

    Args:
        student_logits: ``[B, C]``.
        teacher_logits: ``[B, C]`` (detached).
        T: temperature (> 0).

    Returns:
        scalar tensor: the batch mean of the per-bag KL divergence times ``T^2``.
    """
    _check_pair(student_logits, teacher_logits, "kd_kl_loss")
    if T <= 0:
        raise ValueError(f"kd_kl_loss: T must be > 0, got {T}")
    log_s = F.log_softmax(student_logits.float() / T, dim=1)
    log_t = F.log_softmax(teacher_logits.detach().float() / T, dim=1)
    kl = (log_t.exp() * (log_t - log_s)).sum(dim=1)
    return T * T * kl.mean()


__all__ = ["akd_loss", "akd_gated_loss", "kd_kl_loss"]
