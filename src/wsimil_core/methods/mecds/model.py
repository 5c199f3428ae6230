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
  the expert of task m (a transformer block) maps ``[T_m; F[S_m] * g] -> [T'_m; F'_m]`` where the gate
  ``g = 1 + phi_{i,m} - sg(phi_{i,m})`` (``sg`` = stop-gradient) is exactly 1 in the forward pass, so the expert
  sees ``F_m`` itself as in the paper, while every router receives the gradient of a mixture-of-experts gate
  (also in the last module, through the task token). ``expert_weight: scaled`` uses
  ``g = |S_m| phi_{i,m} / sg(sum_{j in S_m} phi_{j,m})`` instead (mean 1 over S_m, forward values change; the
  behaviour of checkpoints written before the option existed);
  the processed features of all tasks are added back at their positions,
  ``F'_WSI[i] = F[i] + sum_{m: i in S_m} (F'_m[i] - F[i])`` (one task: the patch is replaced by its processed
  feature);
  unselected patches pass through unchanged; ``T_m <- T'_m``.
* heads: ``logits_m = W_m LN(T_m) + b_m`` per task.

``routing=False`` sends every patch to every expert with weight 1 (the "routing off" baseline of the benchmark).
``dfr=False`` drops DFR (no routers, no experts, no routing maps): each module is TSA -> TSA -> FFN and the task
tokens read the shared patch stream only (the paper's "no DFRM" ablation, Table 2).

Task extension (Sec. 3.4, ``add_task``) appends a token, a head and a router + expert per module. By default the
new task is *isolated*: its experts refine its own token but their patch updates are not added to the shared
patch stream, so the old tasks' computation is exactly unchanged (``config.isolated_tasks``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from wsimil_core.errors import DataError
from wsimil_core.methods.mecds.config import MECDSConfig
from wsimil_core.methods.mecds.mfa import MFAModule
from wsimil_core.models.base import MapSpec, MILOutput, bag_dims, check_in_dim, register_model


@register_model("mecds", MECDSConfig)
class MECDS(nn.Module):
    """MECDS multi-task MIL model (task tokens, L MFA modules, one head per task; Sec. 2.1-2.2, task extension
    Sec. 3.4).

    ``multi_task = True``: logits are always a dict, so the engine fills ``tasks`` (not ``n_classes``) from the
    data, also for a single target column.

    Call ``model(x, coords=None)``: ``x`` ``[N, D]`` (one bag) or ``[B, N, D]``.

    Returns ``MILOutput`` with
        logits ``{task: [B, C_task]}``;
        maps (``[N]`` for one bag, ``[B, N]`` for a batch), for every task (only ``attention/<task>`` when
        ``config.dfr`` is off):
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
            if not self.config.dfr:
                specs.append(
                    MapSpec(
                        f"attention/{name}",
                        "scalar",
                        f"attention of the token of task {name} over the patches in the last TSA layer (head mean)",
                    )
                )
                continue
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
                    primary=True,
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
        for module in self.mfa_modules():
            modules += [mod.to(device) for mod in module.add_task()]
        self.config.tasks = {**self.config.task_classes, name: n_classes}
        if isolated:
            self.config.isolated_tasks = [*self.config.isolated_tasks, name]
        params = [self.task_tokens[len(self.task_tokens) - 1]]
        for mod in modules:
            params += list(mod.parameters())
        return params

    def mfa_modules(self) -> list[MFAModule]:
        """The L MFA modules, in order."""
        modules = []
        for module in self.mfa:
            if not isinstance(module, MFAModule):
                raise TypeError(f"mecds: mfa holds a {type(module).__name__}, not an MFAModule")
            modules.append(module)
        return modules

    def task_modules(self, task: str) -> list[nn.Module]:
        """The modules of one task: its head, and its router and expert in every MFA module (``dfr`` on)."""
        if task not in self.config.task_classes:
            raise ValueError(f"mecds: no task {task!r} (tasks: {self.task_names})")
        k = self.task_names.index(task)
        modules: list[nn.Module] = [self.heads[k]]
        for module in self.mfa_modules() if self.config.dfr else []:
            modules += [module.routers[k], module.experts[k]]
        return modules

    def forward(self, x: Tensor, coords: Tensor | None = None, **extras: Any) -> MILOutput:
        single = x.dim() == 2
        x = bag_dims(x)
        check_in_dim(x, self.config.in_dim, "mecds")
        if x.shape[1] == 0:
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
            maps_attention = shape(last["attention"][:, m].detach().float())
            if not self.config.dfr:
                maps[f"attention/{name}"] = maps_attention
                continue
            masks = torch.stack([info["mask"][..., m] for info in per_module])  # [L, B, N]
            maps[f"routing/{name}"] = shape(masks.any(dim=0).float())
            for layer, mask in enumerate(masks, start=1):
                maps[f"routing/{name}/module{layer}"] = shape(mask.float())
            maps[f"routing/{name}/weight"] = shape(last["phi"][..., m].detach().float())
            maps[f"attention/{name}"] = maps_attention
            routed_fraction[name] = masks.float().mean(dim=(1, 2))
        return MILOutput(
            logits=logits,
            maps=maps,
            extras={
                "tokens": t_out,
                "routed_fraction": routed_fraction,
                "phi": [i["phi"] for i in per_module if "phi" in i],
            },
        )


__all__ = ["MECDS", "MECDSConfig"]
