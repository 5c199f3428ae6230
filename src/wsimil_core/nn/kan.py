"""Chebyshev Kolmogorov-Arnold (CKA) layers: a drop-in replacement of ``nn.Linear`` as a classifier head.

AHDMIL (2025) classifies each class-wise pooled slide feature with a CKA layer instead of a linear layer:

    u_i = tanh(x_i)                                  # squash into (-1, 1), the domain of T_k
    y_o = sum_i sum_{k=0..K} c[i, o, k] T_k(u_i)     # T_k: Chebyshev polynomials (functional.chebyshev_basis)

Every input-output edge carries its own learnable univariate function (a degree-K Chebyshev series), as in a
Kolmogorov-Arnold network. Memory is ``[..., in_features, K + 1]`` per input row.

Using it as the head of another model: replace ``nn.Linear(d, c)`` by ``ChebyshevKAN(d, c, degree)``; both map
``[..., d] -> [..., c]``. ``make_head("linear" | "cka", d, c, degree)`` builds either, so a model config can
expose a ``head: linear|cka`` switch the way the ``ahdmil`` model does. Inputs far from zero saturate ``tanh``
near +-1, where ``|T_k'| = k^2``: put a ``LayerNorm`` before the layer when the features are not standardised
(``ClasswiseHead(layernorm=True)`` does).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from wsimil_core.functional.kan import chebyshev_basis

HEADS = ("linear", "cka")


class ChebyshevKAN(nn.Module):
    """``[..., in_features] -> [..., out_features]``: ``y_o = sum_i sum_k c[i, o, k] T_k(tanh(x_i))``.

    Args:
        in_features: input size ``D``.
        out_features: output size ``O``.
        degree: highest Chebyshev degree ``K`` (AHDMIL uses 12).
        bias: add a learnable bias per output (redundant with ``T_0`` but kept for parity with ``nn.Linear``;
            off by default).

    Coefficients are initialised with std ``1 / (D * (K + 1))**0.5`` so the output variance at init does not
    grow with ``D`` or ``K``.
    """

    def __init__(self, in_features: int, out_features: int, degree: int = 12, bias: bool = False):
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"ChebyshevKAN: {name} must be a positive integer, got {v!r}")
        if isinstance(degree, bool) or not isinstance(degree, int) or degree < 1:
            raise ValueError(f"ChebyshevKAN: degree must be a positive integer, got {degree!r}")
        self.in_features, self.out_features, self.degree = in_features, out_features, degree
        self.coeffs = nn.Parameter(torch.empty(in_features, out_features, degree + 1))
        nn.init.normal_(self.coeffs, std=1.0 / math.sqrt(in_features * (degree + 1)))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        """``x`` ``[..., D]`` -> ``[..., O]``."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"ChebyshevKAN: expected last dim {self.in_features}, got shape {tuple(x.shape)}")
        basis = chebyshev_basis(torch.tanh(x), self.degree)  # [..., D, K+1]
        y = torch.einsum("...ik,iok->...o", basis, self.coeffs.to(basis.dtype))
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, degree={self.degree}"


class ClasswiseHead(nn.Module):
    """One scalar classifier per class on class-wise pooled features: ``[B, C, D] -> [B, C]``.

    ``logit_c = f_c(z_c)`` with ``f_c`` a linear map (``head="linear"``: ``w_c . z_c + b_c``) or a CKA layer
    (``head="cka"``: ``sum_i sum_k c[c, i, k] T_k(tanh(z_c,i))``, no bias), as DMIN's per-class classifiers:
    class ``c``'s coefficients ``coeffs[c]`` ``[D, K+1]`` are those of a ``ChebyshevKAN(D, 1, K)`` (shape
    ``(in, out, degree + 1)`` with ``out = 1``), the CLAM-MB per-class classifier with ``nn.Linear(D, 1)``
    replaced by a CKA layer.

    ``layernorm=True`` first standardises each pooled feature with a LayerNorm (over D, shared by the classes):
    pooled ReLU features are non-negative and can be large, so ``tanh`` may push them to the edge of [-1, 1]
    where ``|T_k'| = k^2`` (144 at K = 12); AHDMIL's head has no LayerNorm, so it is off by default.
    """

    def __init__(self, dim: int, n_classes: int, head: str = "cka", degree: int = 12, layernorm: bool = False):
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        self.head, self.degree = head, degree
        self.norm: nn.Module = nn.Identity()
        if head == "linear":
            self.weight = nn.Parameter(torch.empty(n_classes, dim))
            nn.init.normal_(self.weight, std=1.0 / math.sqrt(dim))
            self.bias = nn.Parameter(torch.zeros(n_classes))
        else:
            if layernorm:
                self.norm = nn.LayerNorm(dim)
            self.coeffs = nn.Parameter(torch.empty(n_classes, dim, degree + 1))
            nn.init.normal_(self.coeffs, std=1.0 / math.sqrt(dim * (degree + 1)))

    def forward(self, z: Tensor) -> Tensor:
        """``z`` ``[B, C, D]`` -> logits ``[B, C]``."""
        if self.head == "linear":
            return (z * self.weight).sum(-1) + self.bias
        basis = chebyshev_basis(torch.tanh(self.norm(z)), self.degree)  # [B, C, D, K+1]
        return torch.einsum("bcik,cik->bc", basis, self.coeffs.to(basis.dtype))


def make_head(head: str, in_features: int, out_features: int, degree: int = 12) -> nn.Module:
    """``nn.Linear`` (``head="linear"``) or :class:`ChebyshevKAN` (``head="cka"``) mapping ``[..., D] -> [..., O]``."""
    if head == "linear":
        return nn.Linear(in_features, out_features)
    if head == "cka":
        return ChebyshevKAN(in_features, out_features, degree)
    raise ValueError(f"head must be one of {HEADS}, got {head!r}")


__all__ = ["ChebyshevKAN", "ClasswiseHead", "make_head", "HEADS"]
