"""MECDS' MFA module (Sec. 2.1-2.2): task-isolated self-attention (TSA), FFN and dynamic feature routing (DFR).

Shapes: patch features ``F`` ``[B, N, C]``, task tokens ``T`` ``[B, M, C]`` (M tasks). One module runs
``TSA -> TSA -> FFN -> DFR``; :class:`TaskIsolatedAttention` never builds an ``[N, N]`` matrix, and
:meth:`MFAModule.dfr` routes each task's top-p patches through its expert (see ``methods.mecds.model`` for the
equations of the whole forward pass).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsimil_core.functional.routing import top_p_route
from wsimil_core.methods.mecds.config import MECDSConfig


class FeedForward(nn.Module):
    """Pre-norm residual MLP: ``x + W_2 GELU(W_1 LN(x))`` on ``[..., C]``."""

    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.drop(self.net(self.norm(x)))


class TaskIsolatedAttention(nn.Module):
    """One TSA layer (MECDS Sec. 2.1), pre-norm, residual.

    ``forward(f [B, N, C], t [B, M, C]) -> (f' [B, N, C], t' [B, M, C], attn [B, M, N])`` where ``attn`` is each
    task token's attention over the patches (head mean; the token's weight on itself is left out, so a row sums
    to at most 1). No ``[N, N]`` or ``[(N+M), (N+M)]`` tensor is created.
    """

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)

    def _split(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``[B, L, C] -> 3 x [B, heads, L, head_dim]``."""
        b, n, _ = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return q, k, v

    def forward(self, f: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, n, c = f.shape
        m = t.shape[1]
        qf, kf, vf = self._split(f)  # [B, h, N, d]
        # patch stream: patches attend to patches only (flash SDPA, memory linear in N)
        of = F.scaled_dot_product_attention(qf, kf, vf)
        f = f + self.drop(self.proj(of.transpose(1, 2).reshape(b, n, c)))
        # token stream: token m attends to [T_m; F] only; scores [B, h, M, N] and [B, h, M, 1]
        qt, kt, vt = self._split(t)  # [B, h, M, d]
        scale = 1.0 / math.sqrt(self.head_dim)
        s_patch = torch.matmul(qt, kf.transpose(-1, -2)) * scale  # [B, h, M, N]
        s_self = (qt * kt).sum(-1, keepdim=True) * scale  # [B, h, M, 1]
        a = torch.softmax(torch.cat([s_self, s_patch], dim=-1), dim=-1)
        ot = a[..., :1] * vt + torch.matmul(a[..., 1:], vf)  # [B, h, M, d]
        t = t + self.drop(self.proj(ot.transpose(1, 2).reshape(b, m, c)))
        return f, t, a[..., 1:].mean(dim=1)


class Expert(nn.Module):
    """A task's expert: one pre-norm transformer block on ``[B, 1 + K, C]`` (the task token then K patches)."""

    def __init__(self, dim: int, heads: int, hidden: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)
        self.ffn = FeedForward(dim, hidden, dropout)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v)
        x = x + self.drop(self.proj(o.transpose(1, 2).reshape(b, n, c)))
        return self.ffn(x)


def make_router(dim: int, hidden: int) -> nn.Module:
    """One task's router MLP: ``[.., C] -> [.., 1]`` routing logit per patch."""
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, 1))


class MFAModule(nn.Module):
    """One MFA module: TSA, TSA, FFN, DFR (MECDS Sec. 2.1-2.2). Per-task parts are indexed by task position.

    ``forward(f [B, N, C], t [B, M, C]) -> (f', t', info)`` with ``info`` ``{"attention": [B, M, N], "phi":
    [B, N, M], "mask": [B, N, M]}`` (no ``phi`` / ``mask`` when ``config.dfr`` is off: TSA, TSA, FFN only)."""

    def __init__(self, config: MECDSConfig):
        super().__init__()
        c = config
        self.tsa = nn.ModuleList([TaskIsolatedAttention(c.dim, c.n_heads, c.dropout) for _ in range(2)])
        self.ffn = FeedForward(c.dim, c.hidden_ffn, c.dropout)
        self.routers = nn.ModuleList()
        self.experts = nn.ModuleList()
        self.config = config
        for _ in c.task_classes:
            self.add_task()

    def add_task(self) -> list[nn.Module]:
        """Append a router and an expert for a new task; returns the new modules (none when ``dfr`` is off)."""
        c = self.config
        if not c.dfr:
            return []
        router = make_router(c.dim, c.router_dim)
        expert = Expert(c.dim, c.n_heads, c.hidden_ffn, c.dropout)
        self.routers.append(router)
        self.experts.append(expert)
        return [router, expert]

    def route(self, f: Tensor) -> tuple[Tensor, Tensor]:
        """``phi`` ``[B, N, M]`` (softmax over patches of each router's logits) and the routed mask ``[B, N, M]``."""
        logits = torch.cat([r(f) for r in self.routers], dim=-1)  # [B, N, M]
        phi = torch.softmax(logits.float(), dim=1)  # float32 also under AMP (cumulative sums of top-p)
        if self.config.routing:
            mask = torch.stack([top_p_route(phi[i], self.config.top_p, dim=0) for i in range(f.shape[0])])
        else:
            mask = torch.ones_like(phi, dtype=torch.bool)
        return phi.to(f.dtype), mask

    def _expert_input(self, sel: Tensor, w: Tensor) -> Tensor:
        """The routed patches ``sel`` ``[K, C]`` as their expert reads them, given their routing scores ``w``
        ``[K]`` (``config.expert_weight``): ``sel * (1 + w - sg(w))`` (forward value exactly ``sel``, gradient
        ``sel`` to ``w``) or ``sel * |S| w / sg(sum w)`` (``scaled``). With ``routing`` off: ``sel``."""
        if not self.config.routing:
            return sel
        if self.config.expert_weight == "scaled":
            w = w * (w.numel() / w.detach().sum().clamp_min(1e-12))  # routing weight, mean 1 over S_m
            return sel * w.unsqueeze(1).to(sel.dtype)
        zero = (w - w.detach()).unsqueeze(1).to(sel.dtype)  # exactly 0 forward, d/dw = 1
        return sel + sel * zero

    def dfr(self, f: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Dynamic feature routing: ``(F' [B, N, C], T' [B, M, C], phi [B, N, M], mask [B, N, M])``.

        Every expert reads the same input ``F``; the routed updates of all tasks are summed (see module doc).
        """
        phi, mask = self.route(f)
        isolated = set(self.config.isolated_tasks)
        names = list(self.config.task_classes)
        out_f, out_t = [], []
        for b in range(f.shape[0]):
            fb = f[b]
            updated = fb
            tokens = []
            for m, expert in enumerate(self.experts):
                idx = torch.nonzero(mask[b, :, m], as_tuple=False).squeeze(1)  # [K] routed patches
                sel = fb[idx]  # [K, C]
                routed = self._expert_input(sel, phi[b, idx, m])
                y = expert(torch.cat([t[b, m : m + 1], routed], dim=0).unsqueeze(0))[0]  # [1 + K, C]
                tokens.append(y[0])
                if names[m] not in isolated:  # F[i] + (F'_m[i] - F[i]) at the routed positions
                    updated = updated.index_add(0, idx, y[1:] - sel)
            out_f.append(updated)
            out_t.append(torch.stack(tokens))
        return torch.stack(out_f), torch.stack(out_t), phi, mask

    def forward(self, f: Tensor, t: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        attn: Tensor | None = None
        for layer in self.tsa:
            f, t, attn = layer(f, t)
        if attn is None:
            raise RuntimeError("mecds: an MFA module needs at least one TSA layer")
        f = self.ffn(f)
        t = self.ffn(t)
        if not self.config.dfr:  # ablation "no DFRM": the tokens read the shared stream only
            return f, t, {"attention": attn}
        f, t, phi, mask = self.dfr(f, t)
        return f, t, {"attention": attn, "phi": phi, "mask": mask}


__all__ = ["MFAModule", "TaskIsolatedAttention", "Expert", "FeedForward", "make_router"]
