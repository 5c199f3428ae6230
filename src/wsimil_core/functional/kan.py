"""Chebyshev polynomial basis of the Chebyshev Kolmogorov-Arnold (CKA) classifier (AHDMIL, 2025).

AHDMIL's CKA layer maps every input ``x_i`` into ``(-1, 1)`` with ``tanh`` and expands it in Chebyshev
polynomials of the first kind, defined by the three-term recurrence

    T_0(x) = 1,   T_1(x) = x,   T_k(x) = 2 x T_{k-1}(x) - T_{k-2}(x)        (k >= 2)

(equivalently ``T_k(cos t) = cos(k t)`` on [-1, 1]). The layer output is
``y_o = sum_i sum_k c[i, o, k] T_k(tanh(x_i))`` (see :class:`wsimil_core.nn.kan.ChebyshevKAN`).
"""

from __future__ import annotations

import torch
from torch import Tensor


def chebyshev_basis(x: Tensor, degree: int) -> Tensor:
    """Chebyshev polynomials ``T_0 .. T_degree`` of ``x`` stacked on a new last axis.

    Args:
        x: any shape ``[...]``; meaningful on ``[-1, 1]`` (callers squash with ``tanh`` first).
        degree: highest degree ``K >= 0``.

    Returns:
        ``[..., K + 1]`` with ``out[..., k] = T_k(x)`` (recurrence ``T_k = 2 x T_{k-1} - T_{k-2}``).
        Differentiable in ``x``.
    """
    if isinstance(degree, bool) or not isinstance(degree, int) or degree < 0:
        raise ValueError(f"chebyshev_basis: degree must be a non-negative integer, got {degree!r}")
    terms = [torch.ones_like(x)]
    if degree >= 1:
        terms.append(x)
    for _ in range(2, degree + 1):
        terms.append(2.0 * x * terms[-1] - terms[-2])
    return torch.stack(terms, dim=-1)


__all__ = ["chebyshev_basis"]
