"""ASMIL model: FEAT tokens with multi-head attention over patches, token dropping, CLS aggregation.

Paper: "ASMIL: Attention-Stabilized Multiple Instance Learning for Whole Slide Imaging".

Pipeline for a bag ``x [B, N, in_dim]``::

    h      = ReLU(x W_r)                              [B, N, D]     feature reduction (no bias)
    s      = (T W_q) (h W_k)^T / sqrt(D / H)          [B, H, T, N]  attention logits, T FEAT tokens, H heads
    a      = softmax_N(s)                             [B, H, T, N]  online attention (Eq. 1)
    f      = W_o concat_h(a_h (h W_v)_h)              [B, T, D]     one aggregated feature per FEAT token
    f_keep = f[:, kept]                               [B, K, D]     token random dropping (training only)
    z      = LN(c + MHA(c, f_keep, f_keep))           [B, D]        a CLS token attends over the kept features
    logits = z W_c                                    [B, C]

The attention-scoring part (FEAT tokens, ``W_q``, ``W_k``) is the submodule ``scores``: the ASMIL method keeps
an EMA anchor copy of it (``wsimil_core.methods.asmil.method``). Memory is linear in N: the largest per-bag tensors
are ``[B, H, T, N]`` and ``[B, N, D]``; no ``[N, N]`` matrix exists.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsimil_core.errors import DataError
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
        token_drop: fraction r of FEAT-token outputs dropped at training time (0 <= r < 1; at least one kept).
        dropout: dropout on the reduced patch features (training only).
    """

    in_dim: int = 1024
    n_classes: int = 2
    dim: int = 0
    n_tokens: int = 8
    n_heads: int = 8
    token_drop: float = 0.5
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
        if self.dim == 0:
            wanted = 128 if self.in_dim == 384 else max(self.in_dim // 2, 1)
            self.dim = max(self.n_heads, (wanted // self.n_heads) * self.n_heads)
        if self.dim < 1 or self.dim % self.n_heads:
            raise ValueError(f"dim ({self.dim}) must be a positive multiple of n_heads ({self.n_heads})")

    def n_kept(self) -> int:
        """FEAT tokens kept at training time: ``max(1, T - round(r * T))``."""
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
        self.scores = TokenAttentionScores(d, config.n_tokens, config.n_heads)
        self.v_proj = nn.Linear(d, d)
        self.token_out = nn.Linear(d, d)
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
            for k in range(self.scores.tokens.shape[0])
        ]
        return specs

    def kept_tokens(self, device: torch.device) -> Tensor:
        """Indices of the FEAT tokens kept in this forward: a random subset in training, all in eval."""
        t = self.config.n_tokens
        if not self.training or self.config.token_drop == 0.0:
            return torch.arange(t, device=device)
        keep = torch.randperm(t)[: self.config.n_kept()]
        return keep.sort().values.to(device)

    def forward(self, x: Tensor, coords: Tensor | None = None, **extras: object) -> MILOutput:
        check_in_dim(x, self.config.in_dim, "asmil")
        single = x.dim() == 2
        x = bag_dims(x)
        b, n, _ = x.shape
        if n == 0:
            raise DataError("asmil: the bag has no patches")
        h = self.reduce(x)  # [B, N, D]
        logits_att = self.scores(h)  # [B, H, T, N]
        att = torch.softmax(logits_att, dim=-1)
        heads, t = self.config.n_heads, self.config.n_tokens
        v = self.v_proj(h).view(b, n, heads, -1).transpose(1, 2)  # [B, H, N, dh]
        f = torch.matmul(att, v)  # [B, H, T, dh]
        f = self.token_out(f.transpose(1, 2).reshape(b, t, -1))  # [B, T, D]
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


__all__ = ["ASMIL", "ASMILConfig", "TokenAttentionScores", "ClsAttention"]
