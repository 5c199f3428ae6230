"""ABMILX: ABMIL with multi-head local attention and attention plus (Tang, Qin et al., "Revisiting End-to-End
Learning with Slide-level Supervision in Computational Pathology").

For a bag ``X`` ``[N, D]``:

* input       ``H = Dropout(GELU(W_in LN(X)))``  ``[N, d]`` (LayerNorm without bias, bias-free Linear)
* MHLA        split ``H`` into m heads ``H^j`` ``[N, d/m]``; one attention MLP shared by all heads
              (``Linear-GELU-Linear``; ``attn_act``) gives the local attention logits ``A^j = MLP(H^j)`` ``[N, 1]``
* A+          ``U^j = Softmax(Q^j K^j^T / sqrt(d/m))`` with ``Q^j = LN(H^j) W^q``, ``K^j = LN(H^j) W^k`` (weights
              shared across heads), ``G(A^j) = A^j + alpha U^j A^j`` (Eq. 4), computed by
              :func:`wsimil_core.functional.attention_plus` without an ``[N, N]`` matrix; ``alpha`` learnable
              (initial value ``alpha_init``) or fixed (``alpha_learnable: false``, the paper's alpha = 1 / 0 ablation)
* pooling     ``Z^j = Softmax_N(G(A^j))^T H^j``; ``Z = concat_j Z^j`` (Eq. 3)
* head        ``logits = W_c LN(W_p Z)``

All fully-connected layers of the MIL part are bias-free by default (``bias=False``), as the paper reports for
end-to-end optimisation.

Maps (for a single bag, B == 1): ``attention`` (mean over heads of the post-A+ softmax) ``[N]``,
``attention/head<j>`` ``[N]``, ``attention/local`` (mean over heads of the softmax of A, before A+) ``[N]``.
Extras: ``attention_logits`` ``[B, m, N]`` (G(A)), ``local_logits`` ``[B, m, N]``, ``embedding`` ``[B, d]``,
``alpha`` (scalar tensor).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from wsimil_core.errors import ConfigError
from wsimil_core.functional.attention_plus import attention_plus
from wsimil_core.models.base import (
    MapSpec,
    MILOutput,
    ModelConfig,
    bag_dims,
    check_in_dim,
    check_positive_ints,
    register_model,
)

#: Activations of the attention MLP (``ABMILXConfig.attn_act``).
ATTN_ACTS: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "tanh": nn.Tanh}


@dataclass
class ABMILXConfig(ModelConfig):
    """ABMILX hyper-parameters.

    Attributes:
        in_dim: patch feature dimension D.
        n_classes: number of classes C.
        dim: inner dimension d (512 by default; 256 suits ResNet-18 layer3 features). Divisible by n_heads.
        n_heads: number of heads m of the multi-head local attention.
        attn_dim: hidden size of the shared attention MLP (``dh -> attn_dim -> 1``); 0 = the head size.
        dropout: dropout after the input projection (the paper uses 0.25).
        bias: use biases in the MIL fully-connected layers (the paper's default, kept here, is bias-free).
        attn_plus: enable attention plus (A+); False gives plain multi-head ABMIL.
        alpha_init: initial value of the A+ scalar alpha (Eq. 4). The paper gives no initial value; the authors'
            code draws it at random (Xavier-normal weight of a 1x1 linear map, about N(0, 1)); 0.5 here.
        alpha_learnable: learn alpha (the paper's default); false keeps it fixed at ``alpha_init`` (the paper's
            ablation "alpha = 1" is ``alpha_init: 1, alpha_learnable: false``; "alpha = 0" is MHLA alone).
        attn_act: activation of the attention MLP, ``gelu`` (the authors' set-up) or ``tanh`` (classic ABMIL;
            checkpoints written before this option existed load with ``tanh``, which they were trained with).
    """

    renamed: ClassVar[dict[str, str]] = {"inner_dim": "dim", "heads": "n_heads", "attn_hidden": "attn_dim"}
    #: Values for fields missing from a checkpoint's stored config (added after it was written).
    checkpoint_defaults: ClassVar[dict[str, object]] = {"attn_act": "tanh"}

    in_dim: int = 1024
    n_classes: int = 2
    dim: int = 512
    n_heads: int = 8
    attn_dim: int = 0
    dropout: float = 0.25
    bias: bool = False
    attn_plus: bool = True
    alpha_init: float = 0.5
    alpha_learnable: bool = True
    attn_act: str = "gelu"

    def __post_init__(self) -> None:
        check_positive_ints(self, ("in_dim", "n_classes", "dim", "n_heads"))
        if self.n_classes < 2:
            raise ValueError(f"n_classes must be at least 2, got {self.n_classes}")
        if self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} must be divisible by n_heads={self.n_heads}")
        if isinstance(self.attn_dim, bool) or not isinstance(self.attn_dim, int) or self.attn_dim < 0:
            raise ValueError(f"attn_dim must be an integer >= 0, got {self.attn_dim!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.attn_act not in ATTN_ACTS:
            raise ValueError(f"attn_act must be one of {sorted(ATTN_ACTS)}, got {self.attn_act!r}")
        for name in ("bias", "attn_plus", "alpha_learnable"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if isinstance(self.alpha_init, bool) or not isinstance(self.alpha_init, (int, float)):
            raise ValueError(f"alpha_init must be a number, got {self.alpha_init!r}")


@register_model("abmilx", ABMILXConfig)
class ABMILX(nn.Module):
    """ABMILX over a bag ``[N, D]`` or a batch of equal-size bags ``[B, N, D]`` -> :class:`MILOutput`.

    MHLA pooling (Eq. 3) with attention plus (Eq. 4); the formulas are in the module docstring."""

    def __init__(self, config: ABMILXConfig):
        super().__init__()
        c = config
        self.config = c
        self.heads = c.n_heads
        self.head_dim = c.dim // c.n_heads
        hidden = c.attn_dim or self.head_dim
        self.norm_in = nn.LayerNorm(c.in_dim, bias=False)
        self.proj_in = nn.Linear(c.in_dim, c.dim, bias=c.bias)
        self.act = nn.GELU()
        self.drop = nn.Dropout(c.dropout)
        # MHLA: one attention MLP shared by all heads (A^j = MLP(H^j)).
        self.attn_mlp = nn.Sequential(
            nn.Linear(self.head_dim, hidden, bias=c.bias), ATTN_ACTS[c.attn_act](), nn.Linear(hidden, 1, bias=c.bias)
        )
        if c.attn_plus:
            self.qk_norm = nn.LayerNorm(self.head_dim, bias=False)
            self.w_q = nn.Linear(self.head_dim, self.head_dim, bias=c.bias)
            self.w_k = nn.Linear(self.head_dim, self.head_dim, bias=c.bias)
            alpha = torch.tensor(float(c.alpha_init))
            if c.alpha_learnable:
                self.alpha = nn.Parameter(alpha)
            else:  # fixed (ablation): a buffer, saved with the weights under the same name
                self.register_buffer("alpha", alpha)
        self.proj_out = nn.Linear(c.dim, c.dim, bias=c.bias)
        self.norm_out = nn.LayerNorm(c.dim, bias=False)
        self.classifier = nn.Linear(c.dim, c.n_classes, bias=c.bias)

    def map_specs(self) -> list[MapSpec]:
        """The maps of one bag, each ``[N]``: ``attention``, ``attention/head<j>`` (j < heads), ``attention/local``."""
        after = "after A+" if self.config.attn_plus else "A+ off"
        specs = [
            MapSpec(
                "attention",
                "scalar",
                f"attention weight of the patch, mean over the {self.heads} heads ({after}; sums to 1 over the bag)",
                primary=True,
            )
        ]
        specs += [
            MapSpec(
                f"attention/head{j}",
                "scalar",
                f"attention weight of the patch in head {j} ({after}; softmax over the bag, sums to 1)",
            )
            for j in range(self.heads)
        ]
        specs.append(
            MapSpec(
                "attention/local",
                "scalar",
                "local attention softmax(A) before A+, mean over heads (sums to 1 over the bag)",
            )
        )
        return specs

    def embed(self, x: Tensor) -> Tensor:
        """``[B, N, D] -> H [B, N, d]`` (LayerNorm, Linear, GELU, Dropout)."""
        return self.drop(self.act(self.proj_in(self.norm_in(x))))

    def forward(self, x: Tensor, coords: Tensor | None = None, **extras: object) -> MILOutput:
        """Args: ``x`` ``[N, D]`` or ``[B, N, D]``; ``coords`` unused. Returns logits ``[B, C]`` and maps."""
        check_in_dim(x, self.config.in_dim, "abmilx")
        xb = bag_dims(x)
        b, n, _ = xb.shape
        h = self.embed(xb)  # [B, N, d]
        hj = h.view(b, n, self.heads, self.head_dim).transpose(1, 2)  # [B, m, N, dh]
        local = self.attn_mlp(hj)  # A^j: [B, m, N, 1]
        if self.config.attn_plus:
            hn = self.qk_norm(hj)
            g = attention_plus(self.w_q(hn), self.w_k(hn), local, self.alpha)  # Eq. 4, [B, m, N, 1]
        else:
            g = local
        weights = torch.softmax(g.float(), dim=2).to(hj.dtype)  # over the N patches
        z = (weights.transpose(-1, -2) @ hj).squeeze(-2)  # Z^j: [B, m, dh]
        z = z.reshape(b, self.heads * self.head_dim)  # Eq. 3: concat over heads
        emb = self.norm_out(self.proj_out(z))
        logits = self.classifier(emb)

        g2, local2, w2 = g.squeeze(-1), local.squeeze(-1), weights.squeeze(-1)  # [B, m, N]
        maps: dict[str, Tensor] = {}
        if b == 1:
            w = w2[0].detach().float()
            maps["attention"] = w.mean(0)
            for j in range(self.heads):
                maps[f"attention/head{j}"] = w[j]
            maps["attention/local"] = torch.softmax(local2[0].detach().float(), dim=-1).mean(0)
        alpha = self.alpha if self.config.attn_plus else torch.zeros((), device=x.device)
        return MILOutput(
            logits=logits,
            maps=maps,
            extras={
                "attention_logits": g2,
                "local_logits": local2,
                "attention_weights": w2,
                "embedding": emb,
                "alpha": alpha,
            },
        )


class ABMILXScores(nn.Module):
    """ABMILX's attention branch as one scorer for the anchor: ``h^j [B, m, N, dh] -> G(A^j) [B, m, N]``.

    Holds the ABMILX model's own attention MLP (and, with A+, ``qk_norm``, ``w_q``, ``w_k``, ``alpha``) and
    applies ``G(A) = A + alpha Softmax(Q K^T / sqrt(dh)) A`` (ABMILX Eq. 4, ``functional.attention_plus``),
    as :class:`ABMILX` does; the ASMIL anchor plug-in (``abmilx-anchor``, ``wsimil_core.methods.asmil.anchor``)
    keeps an EMA copy of it. The anchor's probe is ``attn_mlp`` (its input is ``h^j``).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        if not isinstance(model, ABMILX):
            raise ConfigError(f"the ABMILX anchor scorer needs an abmilx model, got {type(model).__name__}")
        self.attn_mlp = model.attn_mlp
        self.attn_plus = bool(model.config.attn_plus)
        if self.attn_plus:
            self.qk_norm = model.qk_norm
            self.w_q = model.w_q
            self.w_k = model.w_k
            self.alpha = model.alpha

    def forward(self, hj: Tensor) -> Tensor:
        local = self.attn_mlp(hj)  # [B, m, N, 1]
        if self.attn_plus:
            hn = self.qk_norm(hj)
            local = attention_plus(self.w_q(hn), self.w_k(hn), local, self.alpha)
        return local.squeeze(-1)


__all__ = ["ABMILX", "ABMILXConfig", "ABMILXScores"]
