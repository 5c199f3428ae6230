"""MECDS: multi-task screening with task tokens, task-isolated attention and dynamic feature routing.

Paper: "Multi-task Screening for Cervical Diseases via Feature Routing and Asymmetric Distillation" (MECDS).
No public code exists; this follows the paper's Sec. 2.1-2.2.

Notation: ``F`` ``[N, C]`` patch features (after a linear embedding of the cached features), ``T_m`` ``[1, C]``
the token of task ``m`` (M tasks). One forward pass:

* embedding     ``F = GELU(W_e x + b_e)``
* L MFA modules, each: ``TSA -> TSA -> FFN -> DFR``
* **TSA** (task-isolated self-attention, pre-norm, residual): the patch stream attends to patches only
  ``F <- F + MHA(F, F, F)``; task token m attends to itself and the patches only
  ``T_m <- T_m + MHA(T_m, [T_m; F], [T_m; F])`` (Sec. 2.1). Patches never see tokens, so adding a task leaves
  the patch stream of TSA untouched. Memory is linear in N: the patch stream uses
  ``scaled_dot_product_attention`` (flash kernels, no ``[N, N]`` matrix); the token scores are ``[M, N]``.
* **FFN**: position-wise MLP (residual) on patches and tokens.
* **DFR** (dynamic feature routing, Sec. 2.2): ``phi = softmax_over_patches(Routers(F))`` ``[N, M]`` (one MLP
  router per task); ``S_m = top_p_route(phi[:, m], p)`` (minimal top-ranked set with cumulative phi >= p);
  each routed patch is scaled by its routing weight
  ``w_{m,i} = |S_m| phi_{i,m} / sg(sum_{j in S_m} phi_{j,m})`` (mean 1 over S_m; ``sg`` = stop-gradient), as a
  mixture-of-experts gate scales its expert, so every router receives gradients (also in the last module,
  through the task token); the expert of task m (a transformer block) maps ``[T_m; w_m * F[S_m]] -> [T'_m; F'_m]``;
  the processed features of all tasks are added back at their positions,
  ``F'_WSI[i] = F[i] + sum_{m: i in S_m} (F'_m[i] - F[i])`` (one task: the patch is replaced by its processed
  feature);
  unselected patches pass through unchanged; ``T_m <- T'_m``.
* heads: ``logits_m = W_m LN(T_m) + b_m`` per task.

``routing=False`` sends every patch to every expert with weight 1 (the "routing off" baseline of the benchmark).

Task extension (Sec. 3.4, ``add_task``) appends a token, a head and a router + expert per module. By default the
new task is *isolated*: its experts refine its own token but their patch updates are not added to the shared
patch stream, so the old tasks' computation is exactly unchanged (``config.isolated_tasks``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsimil_core.functional.routing import top_p_route
from wsimil_core.models.base import MapSpec, MILOutput, ModelConfig, bag_dims, check_in_dim, register_model


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclass
class MECDSConfig(ModelConfig):
    """MECDS hyper-parameters.

    Attributes:
        in_dim: patch feature dimension D of the cached features.
        n_classes: classes of the single default task ``label`` when ``tasks`` is not given.
        tasks: ``{task name: number of classes}`` in head order (binary screening tasks by default).
        dim: model width C of tokens and patch features.
        n_heads: attention heads (``dim`` must be divisible by it).
        n_modules: number L of MFA modules.
        ffn_ratio: hidden size of the FFNs (and the experts' MLP) as a multiple of ``dim``.
        router_dim: hidden size of each router MLP.
        top_p: cumulative routing mass p that selects each expert's patches (the paper's 0.5).
        routing: False sends every patch to every expert (routing off, for ablations and benchmarks).
        dropout: dropout after the embedding, in attention outputs and FFNs (0 disables it).
        isolated_tasks: tasks whose experts' patch updates stay out of the shared patch stream (their expert still
            refines their own token); task extension adds new tasks this way, so old tasks' predictions are unchanged.
    """

    renamed: ClassVar[dict[str, str]] = {"heads": "n_heads", "router_hidden": "router_dim"}

    in_dim: int = 1024
    n_classes: int = 2
    tasks: dict[str, int] | None = None
    dim: int = 128
    n_heads: int = 4
    n_modules: int = 2
    ffn_ratio: float = 2.0
    router_dim: int = 64
    top_p: float = 0.5
    routing: bool = True
    dropout: float = 0.1
    isolated_tasks: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name in ("in_dim", "n_classes", "dim", "n_heads", "n_modules", "router_dim"):
            _positive_int(name, getattr(self, name))
        if self.n_classes < 2:
            raise ValueError(f"n_classes must be at least 2, got {self.n_classes}")
        if self.tasks is None:
            self.tasks = {"label": self.n_classes}
        if not isinstance(self.tasks, dict) or not self.tasks:
            raise ValueError(f"tasks must be a non-empty mapping of task name to class count, got {self.tasks!r}")
        tasks = {}
        for name, count in self.tasks.items():
            if not isinstance(name, str) or not name.strip():
                raise ValueError(f"task names must be non-empty strings, got {name!r}")
            if isinstance(count, bool) or not isinstance(count, int) or count < 2:
                raise ValueError(f"task {name!r} needs an integer class count >= 2, got {count!r}")
            tasks[name] = count
        self.tasks = tasks
        if self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} must be divisible by n_heads={self.n_heads}")
        if isinstance(self.ffn_ratio, bool) or not isinstance(self.ffn_ratio, (int, float)) or self.ffn_ratio <= 0:
            raise ValueError(f"ffn_ratio must be a positive number, got {self.ffn_ratio!r}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.routing, bool):
            raise ValueError(f"routing must be true or false, got {self.routing!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.isolated_tasks, (list, tuple)) or any(t not in self.tasks for t in self.isolated_tasks):
            raise ValueError(f"isolated_tasks must list task names of {list(self.tasks)}, got {self.isolated_tasks!r}")
        self.isolated_tasks = list(self.isolated_tasks)

    @property
    def task_classes(self) -> dict[str, int]:
        """``tasks`` as validated: ``{task name: class count}`` in head order (``__post_init__`` fills a None)."""
        if self.tasks is None:
            raise ValueError("mecds: config.tasks is None; build MECDSConfig through its constructor")
        return self.tasks

    @property
    def hidden_ffn(self) -> int:
        return max(1, int(round(self.dim * self.ffn_ratio)))


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
    """One MFA module: TSA, TSA, FFN, DFR (MECDS Sec. 2.1-2.2). Per-task parts are indexed by task position."""

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
        """Append a router and an expert for a new task; returns the new modules."""
        c = self.config
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
                if self.config.routing:
                    w = phi[b, idx, m]
                    w = w * (idx.numel() / w.detach().sum().clamp_min(1e-12))  # routing weight, mean 1 over S_m
                    routed = sel * w.unsqueeze(1).to(fb.dtype)  # scaled by the routing weight (router gradient)
                else:
                    routed = sel
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
        f, t, phi, mask = self.dfr(f, t)
        return f, t, {"attention": attn, "phi": phi, "mask": mask}


@register_model("mecds", MECDSConfig)
class MECDS(nn.Module):
    """MECDS multi-task MIL model (task tokens, L MFA modules, one head per task).

    ``multi_task = True``: logits are always a dict, so the engine fills ``tasks`` (not ``n_classes``) from the
    data, also for a single target column.

    Call ``model(x, coords=None)``: ``x`` ``[N, D]`` (one bag) or ``[B, N, D]``.

    Returns ``MILOutput`` with
        logits ``{task: [B, C_task]}``;
        maps (``[N]`` for one bag, ``[B, N]`` for a batch), for every task:
            ``routing/<task>`` 1 where the patch was routed to the task's expert in any MFA module,
            ``routing/<task>/module<l>`` (l = 1..L) the routing of module l,
            ``routing/<task>/weight`` phi of the last MFA module (sums to 1 over patches),
            ``attention/<task>`` the task token's attention over patches in the last TSA layer (head mean);
        extras ``{"tokens": [B, M, C], "routed_fraction": {task: [L] fraction of patches routed per module},
        "phi": [L x [B, N, M]]}``.
    """

    multi_task = True

    def __init__(self, config: MECDSConfig):
        super().__init__()
        self.config = config
        c = config
        self.embed = nn.Sequential(nn.Linear(c.in_dim, c.dim), nn.GELU(), nn.Dropout(c.dropout))
        self.task_tokens = nn.ParameterList()
        self.heads = nn.ModuleList()
        self.mfa = nn.ModuleList([MFAModule(c) for _ in range(c.n_modules)])
        self.norm = nn.LayerNorm(c.dim)
        for n_cls in c.task_classes.values():
            self._new_token_and_head(n_cls)

    @property
    def task_names(self) -> list[str]:
        return list(self.config.task_classes)

    def map_specs(self) -> list[MapSpec]:
        """The maps of one bag, each ``[N]``, for every task (tasks added by ``add_task`` included)."""
        routed = ("not routed", "routed")
        specs: list[MapSpec] = []
        for name in self.task_names:
            specs.append(
                MapSpec(f"routing/{name}", "binary", f"routed to the expert of task {name} in any MFA module", routed)
            )
            specs += [
                MapSpec(
                    f"routing/{name}/module{layer}",
                    "binary",
                    f"routed to the expert of task {name} in MFA module {layer}",
                    routed,
                )
                for layer in range(1, len(self.mfa) + 1)
            ]
            specs.append(
                MapSpec(
                    f"routing/{name}/weight",
                    "scalar",
                    f"routing weight phi of task {name} in the last MFA module (softmax over patches, sums to 1)",
                )
            )
            specs.append(
                MapSpec(
                    f"attention/{name}",
                    "scalar",
                    f"attention of the token of task {name} over the patches in the last TSA layer (head mean)",
                )
            )
        return specs

    def _new_token_and_head(self, n_classes: int, device: torch.device | None = None) -> list[nn.Module]:
        token = nn.Parameter(torch.randn(1, self.config.dim, device=device) * 0.02)
        head = nn.Linear(self.config.dim, n_classes, device=device)
        self.task_tokens.append(token)
        self.heads.append(head)
        return [head]

    def add_task(self, name: str, n_classes: int = 2, isolated: bool = True) -> list[nn.Parameter]:
        """Task extension (Sec. 3.4): append a task token, a head, and a router + expert in every MFA module.

        Updates ``config.tasks`` (so checkpoints describe M+1 tasks) and returns the new parameters. Existing
        parameters are untouched (freezing them is the caller's job, see ``methods.mecds.extend_model``).
        ``isolated=True`` keeps the new expert's patch updates out of the shared patch stream (listed in
        ``config.isolated_tasks``), so every old task's output is unchanged; ``False`` adds them back as DFR does
        for the original tasks (old tasks' later modules then see slightly different patch features).
        """
        if name in self.config.task_classes:
            raise ValueError(f"mecds: task {name!r} already exists (tasks: {self.task_names})")
        if isinstance(n_classes, bool) or not isinstance(n_classes, int) or n_classes < 2:
            raise ValueError(f"mecds: task {name!r} needs an integer class count >= 2, got {n_classes!r}")
        device = self.norm.weight.device
        modules = self._new_token_and_head(n_classes, device)
        for module in self.mfa:
            if not isinstance(module, MFAModule):
                raise TypeError(f"mecds: mfa holds a {type(module).__name__}, not an MFAModule")
            modules += [mod.to(device) for mod in module.add_task()]
        self.config.tasks = {**self.config.task_classes, name: n_classes}
        if isolated:
            self.config.isolated_tasks = [*self.config.isolated_tasks, name]
        params = [self.task_tokens[len(self.task_tokens) - 1]]
        for mod in modules:
            params += list(mod.parameters())
        return params

    def forward(self, x: Tensor, coords: Tensor | None = None, **extras: Any) -> MILOutput:
        single = x.dim() == 2
        x = bag_dims(x)
        check_in_dim(x, self.config.in_dim, "mecds")
        if x.shape[1] == 0:
            from wsimil_core.errors import DataError

            raise DataError("mecds: the bag has no patches")
        b = x.shape[0]
        f = self.embed(x)  # [B, N, C]
        t = torch.cat(list(self.task_tokens), dim=0).unsqueeze(0).expand(b, -1, -1)  # [B, M, C]
        per_module = []
        for module in self.mfa:
            f, t, info = module(f, t)
            per_module.append(info)
        t_out = self.norm(t)
        names = self.task_names
        logits = {name: self.heads[m](t_out[:, m]) for m, name in enumerate(names)}

        def shape(v: Tensor) -> Tensor:
            return v[0] if single else v

        maps: dict[str, Tensor] = {}
        routed_fraction: dict[str, Tensor] = {}
        last = per_module[-1]
        for m, name in enumerate(names):
            masks = torch.stack([info["mask"][..., m] for info in per_module])  # [L, B, N]
            maps[f"routing/{name}"] = shape(masks.any(dim=0).float())
            for layer, mask in enumerate(masks, start=1):
                maps[f"routing/{name}/module{layer}"] = shape(mask.float())
            maps[f"routing/{name}/weight"] = shape(last["phi"][..., m].detach().float())
            maps[f"attention/{name}"] = shape(last["attention"][:, m].detach().float())
            routed_fraction[name] = masks.float().mean(dim=(1, 2))
        return MILOutput(
            logits=logits,
            maps=maps,
            extras={"tokens": t_out, "routed_fraction": routed_fraction, "phi": [i["phi"] for i in per_module]},
        )


__all__ = ["MECDS", "MECDSConfig", "MFAModule", "TaskIsolatedAttention", "Expert", "FeedForward", "make_router"]
