"""ABMIL: attention-based deep MIL (Ilse, Tomczak & Welling, ICML 2018), gated attention by default.

The bag is embedded patch by patch, pooled with learned attention weights and classified:

* embedding    ``h_k = ReLU(W_e x_k + b_e)``                                   (the paper's f_psi)
* attention    ``a_k = exp(w^T tanh(V h_k)) / sum_j exp(w^T tanh(V h_j))``        (Eq. 8)
* gated        ``a_k = softmax_k(w^T (tanh(V h_k) * sigmoid(U h_k)))``           (Eq. 9)
* pooling      ``z = sum_k a_k h_k``                                             (Eq. 7)
* classifier   ``logits = W_c z + b_c``

Memory grows linearly with the number of patches N (one score per patch, no ``[N, N]`` matrix).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from wsimil_core.models.base import (
    MapSpec,
    MILOutput,
    ModelConfig,
    check_dropout,
    check_positive_ints,
    prepare_bag,
    register_model,
)


@dataclass
class ABMILConfig(ModelConfig):
    """ABMIL hyper-parameters.

    Attributes:
        in_dim: patch feature dimension D.
        n_classes: number of classes C.
        dim: embedding size of ``h_k`` (the paper uses 500 on MNIST-bags; 128 to 256 suits WSI features).
        attn_dim: size of the attention projections ``V`` and ``U`` (the paper's L = 128).
        dropout: dropout after the embedding and inside the attention branch (0 disables it).
        gated: gated attention (Eq. 9) when True, plain tanh attention (Eq. 8) when False.
    """

    renamed: ClassVar[dict[str, str]] = {"hidden": "dim"}

    in_dim: int = 1024
    n_classes: int = 2
    dim: int = 256
    attn_dim: int = 128
    dropout: float = 0.25
    gated: bool = True

    def __post_init__(self) -> None:
        check_positive_ints(self, ("in_dim", "n_classes", "dim", "attn_dim"))
        if self.n_classes < 2:
            raise ValueError(f"n_classes must be at least 2, got {self.n_classes}")
        check_dropout(self.dropout)
        if not isinstance(self.gated, bool):
            raise ValueError(f"gated must be true or false, got {self.gated!r}")


class AttentionPool(nn.Module):
    """(Gated) attention scores over patches: ``[B, N, H] -> [B, N]`` un-normalised logits (Eq. 8 / 9)."""

    def __init__(self, dim: int, attn_dim: int, dropout: float, gated: bool):
        super().__init__()
        self.V = nn.Linear(dim, attn_dim)
        self.U = nn.Linear(dim, attn_dim) if gated else None
        self.w = nn.Linear(attn_dim, 1)
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: Tensor) -> Tensor:
        """``h`` ``[B, N, H]`` -> attention logits ``[B, N]`` (before the softmax over patches)."""
        a = torch.tanh(self.V(h))
        if self.U is not None:
            a = a * torch.sigmoid(self.U(h))
        return self.w(self.dropout(a)).squeeze(-1)


@register_model("abmil", ABMILConfig)
class ABMIL(nn.Module):
    """Gated-attention MIL (Ilse et al. 2018, Eq. 7-9); the reference baseline every method is compared with.

    Call ``model(x, coords=None, mask=None)``:
        x: ``[N, D]`` (one bag) or ``[B, N, D]`` (a padded batch of bags).
        mask: optional bool ``[B, N]`` (or ``[N]``), True for real patches; padded patches get zero attention.

    Returns ``MILOutput`` with
        logits ``[B, C]``;
        maps ``{"attention": [N]}`` for one bag (``[B, N]`` for a batch): softmax over patches, sums to 1;
        extras ``{"embedding": [B, dim], "attention_logits": [B, N]}``.
    """

    def __init__(self, config: ABMILConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Sequential(nn.Linear(config.in_dim, config.dim), nn.ReLU(), nn.Dropout(config.dropout))
        self.attention = AttentionPool(config.dim, config.attn_dim, config.dropout, config.gated)
        self.classifier = nn.Linear(config.dim, config.n_classes)

    def map_specs(self) -> list[MapSpec]:
        """The one map ABMIL emits: ``attention`` ``[N]``."""
        return [
            MapSpec(
                "attention",
                "scalar",
                "attention weight a_k of the patch in the pooled bag embedding (softmax over the bag: sums to 1)",
                primary=True,
            )
        ]

    def forward(self, x: Tensor, coords: Tensor | None = None, mask: Tensor | None = None, **extras) -> MILOutput:
        single = x.dim() == 2
        x = prepare_bag(x, self.config.in_dim, "abmil")
        h = self.embed(x)  # [B, N, H]
        scores = self.attention(h)  # [B, N]
        if mask is not None:
            mask = mask.to(device=scores.device, dtype=torch.bool).reshape(scores.shape)
            scores = scores.masked_fill(~mask, float("-inf"))
        attn = torch.softmax(scores, dim=1)  # Eq. 8/9: softmax over the N patches
        z = torch.bmm(attn.unsqueeze(1), h).squeeze(1)  # Eq. 7: [B, H]
        logits = self.classifier(z)  # [B, C]
        return MILOutput(
            logits=logits,
            maps={"attention": attn[0] if single else attn},
            extras={"embedding": z, "attention_logits": scores},
        )


__all__ = ["ABMIL", "ABMILConfig", "AttentionPool"]
