"""ASMIL model: FEAT tokens with multi-head attention over patches, token dropping, CLS aggregation.

Paper: "ASMIL: Attention-Stabilized Multiple Instance Learning for Whole Slide Imaging".

Pipeline for a bag ``x [B, N, in_dim]``::

    h      = ReLU(x W_r)                              [B, N, D]     feature reduction (no bias)
    s_t    = (T_t W_q,t) (h W_k,t)^T / sqrt(D / H)    [B, H, T, N]  attention logits of FEAT token t, H heads
    a      = softmax_N(s)                             [B, H, T, N]  online attention (Eq. 1, 2)
    f_t    = W_o,t concat_h(a_t,h (h W_v,t)_h)        [B, T, D]     one aggregated feature per FEAT token
    f_keep = f[:, kept]                               [B, K, D]     token random dropping (Sec. 4.3, training only)
    z      = LN(c + MHA(c, f_keep, f_keep))           [B, D]        a CLS token attends over the kept features
    logits = z W_c                                    [B, C]

Each FEAT token t has its own multi-head attention (``W_q,t``, ``W_k,t``, ``W_v,t``, ``W_o,t``), as in the paper
and the authors' code (one attention module per token); ``share_attention: true`` shares one set of projections
across the tokens (the layout of wsimil <= 0.x checkpoints, which load with it). Per-token keys and values are
never materialised: the query of (t, h) is folded into ``W_k,t`` (``u_th = W_k,t,h^T q_th``, so
``s = h u^T``) and the attention pools ``h`` before ``W_v,t`` is applied (exact, as each distribution sums to 1).

The attention branch (``reduce`` + ``scores``: x -> logits) is what the ASMIL anchor copies (``attention_branch``).
Memory is linear in N: the largest per-bag tensors are ``[B, H, T, N]`` and ``[B, N, D]``; no ``[N, N]`` matrix
and no ``[T, N, D]`` tensor exists.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsimil_core.errors import DataError
from wsimil_core.functional.attention import nsf
from wsimil_core.models.base import MapSpec, MILOutput, ModelConfig, bag_dims, check_in_dim, register_model


@dataclass
class ASMILConfig(ModelConfig):
    """ASMIL hyper-parameters.

    Attributes:
        in_dim: patch feature dimension.
        n_classes: number of slide classes.
        dim: reduced dimension D; 0 picks the paper's default (128 for 384-dim inputs, in_dim / 2 otherwise,
            rounded down to a multiple of ``n_heads``).
        n_tokens: number of FEAT tokens T (2-16; paper default 8).
        n_heads: attention heads H of both attention stages (D must be divisible by it).
        token_drop: FEAT-token drop rate r at training time (0 <= r < 1; Sec. 4.3, best around 0.4-0.7).
        token_drop_mode: "bernoulli" (paper Sec. 4.3: each FEAT token dropped independently with probability
            r; if every token is dropped one drawn at random is kept) or "fixed" (drop round(r T) tokens, at
            least one kept: the authors' code and wsimil 0.x).
        share_attention: false (paper) gives every FEAT token its own multi-head attention; true shares one
            set of q/k/v/out projections across the tokens (wsimil 0.x checkpoints).
        online_norm: "softmax" (paper Eq. 2) or "nsf" (normalised sigmoid in the online model: the ablation of
            App. G, Table 6, which the paper reports as worse).
        dropout: dropout on the reduced patch features (training only).
    """

    #: Values of fields that checkpoints written before the field existed were trained with: a checkpoint whose
    #: config lacks the field loads with this value (its old meaning), not the paper default.
    checkpoint_defaults: ClassVar[dict[str, Any]] = {"share_attention": True, "token_drop_mode": "fixed"}

    in_dim: int = 1024
    n_classes: int = 2
    dim: int = 0
    n_tokens: int = 8
    n_heads: int = 8
    token_drop: float = 0.5
    token_drop_mode: str = "bernoulli"
    share_attention: bool = False
    online_norm: str = "softmax"
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.in_dim < 1:
            raise ValueError(f"in_dim must be >= 1, got {self.in_dim}")
        if self.n_classes < 2:
            raise ValueError(f"n_classes must be >= 2, got {self.n_classes}")
        if not 2 <= self.n_tokens <= 16:
            raise ValueError(f"n_tokens must be between 2 and 16, got {self.n_tokens}")
        if self.n_heads < 1:
            raise ValueError(f"n_heads must be >= 1, got {self.n_heads}")
        if not 0.0 <= self.token_drop < 1.0:
            raise ValueError(f"token_drop must be in [0, 1), got {self.token_drop}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.token_drop_mode not in ("bernoulli", "fixed"):
            raise ValueError(f"token_drop_mode must be 'bernoulli' or 'fixed', got {self.token_drop_mode!r}")
        if self.online_norm not in ("softmax", "nsf"):
            raise ValueError(f"online_norm must be 'softmax' or 'nsf', got {self.online_norm!r}")
        if not isinstance(self.share_attention, bool):
            raise ValueError(f"share_attention must be true or false, got {self.share_attention!r}")
        if self.dim == 0:
            wanted = 128 if self.in_dim == 384 else max(self.in_dim // 2, 1)
            self.dim = max(self.n_heads, (wanted // self.n_heads) * self.n_heads)
        if self.dim < 1 or self.dim % self.n_heads:
            raise ValueError(f"dim ({self.dim}) must be a positive multiple of n_heads ({self.n_heads})")

    def n_kept(self) -> int:
        """FEAT tokens kept at training time by ``token_drop_mode="fixed"``: ``max(1, T - round(r * T))``."""
        return max(1, self.n_tokens - int(round(self.token_drop * self.n_tokens)))


class TokenAttentionScores(nn.Module):
    """Attention logits of T learnable FEAT tokens over N patches with H heads (ASMIL Eq. 1 before softmax).

    ``forward(h [B, N, D]) -> s [B, H, T, N]`` with ``s = (T W_q)_h (h W_k)_h^T / sqrt(D / H)``.
    This is the module the EMA anchor copies.
    """

    def __init__(self, dim: int, n_tokens: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = dim // n_heads
        self.tokens = nn.Parameter(torch.randn(n_tokens, dim) * 0.02)
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)

    def forward(self, h: Tensor) -> Tensor:
        b, n, d = h.shape
        t = self.tokens.shape[0]
        q = self.q_proj(self.tokens).view(t, self.n_heads, self.head_dim).transpose(0, 1)  # [H, T, dh]
        k = self.k_proj(h).view(b, n, self.n_heads, self.head_dim).permute(0, 2, 3, 1)  # [B, H, dh, N]
        return torch.matmul(q.unsqueeze(0), k) / math.sqrt(self.head_dim)  # [B, H, T, N]


def _linear_init(weight: Tensor, bias: Tensor) -> None:
    """``nn.Linear``'s default initialisation, per token: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(weight.shape[-1])
    nn.init.uniform_(weight, -bound, bound)
    nn.init.uniform_(bias, -bound, bound)


class PerTokenScores(nn.Module):
    """Attention logits of T FEAT tokens, each with its own ``W_q,t``, ``W_k,t`` (ASMIL Eq. 1, Sec. 4.3).

    ``forward(h [B, N, D]) -> s [B, H, T, N]`` with ``s[:, h, t] = (W_q,t T_t + b_q,t)_h . (W_k,t h_n + b_k,t)_h
    / sqrt(D / H)``, computed as ``h . u_th + beta_th`` (``u_th = W_k,t,h^T q_th``): no ``[T, N, D]`` key tensor.
    """

    def __init__(self, dim: int, n_tokens: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = dim // n_heads
        self.tokens = nn.Parameter(torch.randn(n_tokens, dim) * 0.02)
        self.q_weight = nn.Parameter(torch.empty(n_tokens, dim, dim))  # [T, out, in]
        self.q_bias = nn.Parameter(torch.empty(n_tokens, dim))
        self.k_weight = nn.Parameter(torch.empty(n_tokens, dim, dim))
        self.k_bias = nn.Parameter(torch.empty(n_tokens, dim))
        for t in range(n_tokens):
            _linear_init(self.q_weight.data[t], self.q_bias.data[t])
            _linear_init(self.k_weight.data[t], self.k_bias.data[t])

    def forward(self, h: Tensor) -> Tensor:
        t, d = self.tokens.shape
        hh, dh = self.n_heads, self.head_dim
        q = torch.einsum("ti,toi->to", self.tokens, self.q_weight) + self.q_bias  # [T, D]
        q = q.view(t, hh, dh)
        u = torch.einsum("thc,thci->thi", q, self.k_weight.view(t, hh, dh, d))  # [T, H, D]
        beta = (q * self.k_bias.view(t, hh, dh)).sum(-1)  # [T, H]
        s = torch.einsum("bni,thi->bhtn", h, u) + beta.transpose(0, 1)[None, :, :, None]
        return s / math.sqrt(dh)


class PerTokenValues(nn.Module):
    """Per-token value and output projections: ``f_t = W_o,t concat_h(sum_n a[h, t, n] (W_v,t h_n + b_v,t)_h)
    + b_o,t``; ``forward(a [B, H, T, N], h [B, N, D]) -> f [B, T, D]`` (h is pooled first: no ``[T, N, D]``)."""

    def __init__(self, dim: int, n_tokens: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = dim // n_heads
        self.v_weight = nn.Parameter(torch.empty(n_tokens, dim, dim))
        self.v_bias = nn.Parameter(torch.empty(n_tokens, dim))
        self.o_weight = nn.Parameter(torch.empty(n_tokens, dim, dim))
        self.o_bias = nn.Parameter(torch.empty(n_tokens, dim))
        for t in range(n_tokens):
            _linear_init(self.v_weight.data[t], self.v_bias.data[t])
            _linear_init(self.o_weight.data[t], self.o_bias.data[t])

    def forward(self, a: Tensor, h: Tensor) -> Tensor:
        b = h.shape[0]
        t, d, _ = self.v_weight.shape
        hh, dh = self.n_heads, self.head_dim
        pooled = torch.einsum("bhtn,bni->bthi", a, h)  # [B, T, H, D]
        mass = a.sum(-1).transpose(1, 2)  # [B, T, H]: 1 for a distribution
        v = torch.einsum("bthi,thci->bthc", pooled, self.v_weight.view(t, hh, dh, d))
        v = v + self.v_bias.view(t, hh, dh)[None] * mass[..., None]
        return torch.einsum("bti,toi->bto", v.reshape(b, t, d), self.o_weight) + self.o_bias


class AttentionBranch(nn.Module):
    """The model's attention branch ``x [B, N, in_dim] -> logits [B, H, T, N]`` (``reduce`` then ``scores``).

    Holds references to the model's own modules (it is not a submodule of the model): the ASMIL anchor is an
    EMA copy of it, input projection included, and reads the anchor's own reduction of the input features.
    """

    def __init__(self, reduce: nn.Module, scores: nn.Module):
        super().__init__()
        self.reduce = reduce
        self.scores = scores

    def forward(self, x: Tensor) -> Tensor:
        return self.scores(self.reduce(x))


class ClsAttention(nn.Module):
    """Second stage: a learnable CLS token attends over the kept FEAT features (multi-head, SDPA).

    ``forward(f [B, K, D]) -> z [B, D]`` with ``z = LayerNorm(c + W_o MHA(c W_q, f W_k, f W_v))``.
    """

    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = dim // n_heads
        self.cls = nn.Parameter(torch.randn(1, dim) * 0.02)
        self.q_proj = nn.Linear(dim, dim)
        self.kv_proj = nn.Linear(dim, 2 * dim)
        self.out_proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, f: Tensor) -> Tensor:
        b, k, d = f.shape
        q = self.q_proj(self.cls).view(1, 1, self.n_heads, self.head_dim).transpose(1, 2).expand(b, -1, -1, -1)
        kv = self.kv_proj(f).view(b, k, 2, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # [2, B, H, K, dh]
        z = F.scaled_dot_product_attention(q, kv[0], kv[1])  # [B, H, 1, dh]
        z = self.out_proj(z.transpose(1, 2).reshape(b, d))
        return self.norm(self.cls + z)


@register_model("asmil", ASMILConfig)
class ASMIL(nn.Module):
    """ASMIL slide classifier (online attention Eq. 1, see the module docstring).
    ``model(x [N, D] or [B, N, D], coords=None) -> MILOutput``.

    Output:
        logits ``[B, C]``;
        maps (B == 1 only): ``attention`` ``[N]`` = online attention averaged over FEAT tokens and heads (the
        paper's localisation map), ``attention/token<k>`` ``[N]`` = token k's attention averaged over heads;
        extras: ``attention_logits`` ``[B, H, T, N]``, ``instance_features`` ``[B, N, D]`` (reduced),
        ``token_features`` ``[B, T, D]``, ``kept_tokens`` ``LongTensor[K]``, ``embedding`` ``[B, D]``.
    """

    def __init__(self, config: ASMILConfig):
        super().__init__()
        self.config = config
        d = config.dim
        self.reduce = nn.Sequential(nn.Linear(config.in_dim, d, bias=False), nn.ReLU(), nn.Dropout(config.dropout))
        self.scores: nn.Module
        if config.share_attention:
            self.scores = TokenAttentionScores(d, config.n_tokens, config.n_heads)
            self.v_proj = nn.Linear(d, d)
            self.token_out = nn.Linear(d, d)
        else:
            self.scores = PerTokenScores(d, config.n_tokens, config.n_heads)
            self.token_values = PerTokenValues(d, config.n_tokens, config.n_heads)
        self.cls_attention = ClsAttention(d, config.n_heads)
        self.classifier = nn.Linear(d, config.n_classes)

    def map_specs(self) -> list[MapSpec]:
        """The maps of one bag, each ``[N]``: ``attention`` and ``attention/token<k>`` (k < n_tokens)."""
        specs = [
            MapSpec(
                "attention",
                "scalar",
                "online attention of the patch, mean over FEAT tokens and heads (sums to 1 over the bag)",
                primary=True,
            )
        ]
        specs += [
            MapSpec(
                f"attention/token{k}",
                "scalar",
                f"attention of FEAT token {k} on the patch, mean over heads (sums to 1 over the bag)",
            )
            for k in range(self.config.n_tokens)
        ]
        return specs

    def attention_branch(self) -> AttentionBranch:
        """``reduce`` + ``scores`` as one module ``x -> attention logits`` (what the anchor copies)."""
        return AttentionBranch(self.reduce, self.scores)

    def kept_tokens(self, device: torch.device) -> Tensor:
        """Indices of the FEAT tokens kept in this forward (sorted): all in eval; in training each token is kept
        with probability 1 - r (``bernoulli``, Sec. 4.3; one random token when none survives) or a random subset of
        ``n_kept()`` tokens (``fixed``)."""
        t = self.config.n_tokens
        if not self.training or self.config.token_drop == 0.0:
            return torch.arange(t, device=device)
        if self.config.token_drop_mode == "fixed":
            return torch.randperm(t)[: self.config.n_kept()].sort().values.to(device)
        keep = torch.rand(t) >= self.config.token_drop
        if not bool(keep.any()):
            keep[int(torch.randint(t, (1,)))] = True
        return torch.nonzero(keep).flatten().to(device)

    def forward(self, x: Tensor, coords: Tensor | None = None, **extras: object) -> MILOutput:
        check_in_dim(x, self.config.in_dim, "asmil")
        single = x.dim() == 2
        x = bag_dims(x)
        b, n, _ = x.shape
        if n == 0:
            raise DataError("asmil: the bag has no patches")
        h = self.reduce(x)  # [B, N, D]
        logits_att = self.scores(h)  # [B, H, T, N]
        att = nsf(logits_att, dim=-1) if self.config.online_norm == "nsf" else torch.softmax(logits_att, dim=-1)
        heads, t = self.config.n_heads, self.config.n_tokens
        if self.config.share_attention:
            v = self.v_proj(h).view(b, n, heads, -1).transpose(1, 2)  # [B, H, N, dh]
            f = torch.matmul(att, v)  # [B, H, T, dh]
            f = self.token_out(f.transpose(1, 2).reshape(b, t, -1))  # [B, T, D]
        else:
            f = self.token_values(att, h)  # [B, T, D]
        kept = self.kept_tokens(x.device)
        z = self.cls_attention(f.index_select(1, kept))  # [B, D]
        logits = self.classifier(z)

        maps: dict[str, Tensor] = {}
        if b == 1 or single:
            a0 = att[0].detach()  # [H, T, N]
            maps["attention"] = a0.mean(dim=(0, 1))
            per_token = a0.mean(dim=0)  # [T, N]
            for k in range(t):
                maps[f"attention/token{k}"] = per_token[k]
        return MILOutput(
            logits=logits,
            maps=maps,
            extras={
                "attention_logits": logits_att,
                "instance_features": h,
                "token_features": f,
                "kept_tokens": kept,
                "embedding": z,
            },
        )


__all__ = [
    "ASMIL",
    "ASMILConfig",
    "AttentionBranch",
    "ClsAttention",
    "PerTokenScores",
    "PerTokenValues",
    "TokenAttentionScores",
]
