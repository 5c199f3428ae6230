"""MECDS hyper-parameters (``MECDSConfig``), shared by the model and its MFA modules (``mfa.py``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from wsimil_core.models.base import ModelConfig, check_dropout, check_positive_ints

EXPERT_WEIGHTS = ("straight_through", "scaled")


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
        dfr: False removes dynamic feature routing altogether (no routers, no experts; every task token reads the
            shared patch stream through TSA only): the "no DFRM" row of the paper's Table 2 ablation.
        expert_weight: how routed patches enter their expert. ``straight_through`` (default): ``F_m`` itself, as the
            paper's ``[T'_m, F'_m] = Exp_m([T_m, F_m])`` (Sec. 2.2), times ``1 + phi - sg(phi)`` (forward value
            exactly 1) so the routers get a gradient; ``scaled``: ``F_m`` times ``|S_m| phi / sg(sum_{S_m} phi)``
            (mean 1 over the routed set, forward values change; wsimil 0.1, and checkpoints written before this
            option existed).
        dropout: dropout after the embedding, in attention outputs and FFNs (0 disables it).
        isolated_tasks: tasks whose experts' patch updates stay out of the shared patch stream (their expert still
            refines their own token); task extension adds new tasks this way, so old tasks' predictions are unchanged.
    """

    renamed: ClassVar[dict[str, str]] = {"heads": "n_heads", "router_hidden": "router_dim"}
    checkpoint_defaults: ClassVar[dict[str, Any]] = {
        "expert_weight": "scaled",
        "dfr": True,
    }  # checkpoints of wsimil 0.1 and 0.2

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
    dfr: bool = True
    expert_weight: str = "straight_through"
    dropout: float = 0.1
    isolated_tasks: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_positive_ints(self, ("in_dim", "n_classes", "dim", "n_heads", "n_modules", "router_dim"))
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
        if not isinstance(self.dfr, bool):
            raise ValueError(f"dfr must be true or false, got {self.dfr!r}")
        if self.expert_weight not in EXPERT_WEIGHTS:
            raise ValueError(f"expert_weight must be one of {list(EXPERT_WEIGHTS)}, got {self.expert_weight!r}")
        if isinstance(self.dropout, bool):
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        check_dropout(self.dropout)
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


__all__ = ["EXPERT_WEIGHTS", "MECDSConfig"]
