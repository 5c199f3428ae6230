"""MoMKD model: graph WSI encoder + class-conditional memory + memory-guided attention (Guo et al. 2026,
"Momentum Memory for Knowledge Distillation in Computational Pathology").

Histology branch (the only one used at inference), one bag of ``N`` patches:

* graph        kNN graph, k = 8 nearest patch centres (``functional.knn_neighbors``: scipy ``cKDTree``,
               O(N log N)), kept as a neighbour matrix ``[N, k]``; every patch also attends to itself
* encoder      ``h0 = ReLU(W_in x)``; ``h_{l+1} = LayerNorm(h_l + ELU(GATv2_l(h_l)))`` for two layers
               (``nn.GATv2Layer``)
               -> ``F_wsi`` ``[N, D]`` (Sec. 3.2, D = 256)
* projection   ``F_P-wsi = normalise(W_proj F_wsi)`` ``[N, D_N]`` (unit rows, so dot products are cosines)
* memory       ``C+``, ``C-`` ``[n, D_N]`` unit-norm components (Sec. 3.3.1)
* score        ``Score_i = max_j F_P,i . c+_j - max_j F_P,i . c-_j``          (Eq. 6, memory detached)
* attention    ``alpha = softmax(Score / tau)``                                 (Eq. 7)
* pooling      ``F_C-wsi = sum_i alpha_i F_wsi,i``                              (Eq. 8)
* prediction   ``logits = g(F_C-wsi)``; ``F_N-wsi = normalise(W_C F_C-wsi)``    (Eq. 1)

Omics branch (training only, ``omics`` ``[G]`` given): ``F_omics = MLP(omics)`` ``[D]``, a decoder
reconstructing the omics vector, ``F_N-omics = normalise(W_omics F_omics)`` ``[D_N]`` (Eq. 2). The two
branches share no parameter; they meet only through the memory (losses in ``methods/momkd.py``).

Memory use is linear in N: the graph has ``N * (k + 1)`` edges, attention is per edge, and the memory
similarities are ``[N, n]``. No ``[N, N]`` tensor exists.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsimil_core.errors import DataError
from wsimil_core.functional.graph import knn_neighbors
from wsimil_core.functional.memory import memory_attention, memory_pool
from wsimil_core.models.base import (
    MapSpec,
    MILOutput,
    ModelConfig,
    check_dropout,
    check_positive_ints,
    prepare_bag,
    register_model,
)
from wsimil_core.nn.gatv2 import GATv2Layer


@dataclass
class MoMKDConfig(ModelConfig):
    """MoMKD hyper-parameters (paper defaults).

    Attributes:
        in_dim: patch feature dimension.
        n_classes: must be 2 (class 1 is the positive class of the memory ``C+``).
        dim: D, width of the graph encoder and of ``F_wsi`` (256).
        memory_dim: D_N, width of the projections, the memory and ``F_N`` (128).
        n_components: n, components per memory (16).
        k_neighbors: k of the kNN patch graph (8).
        n_heads: attention heads of each GATv2 layer (``dim`` must divide by it).
        gat_layers: number of GATv2 layers (2).
        tau: temperature of the memory-guided attention, Eq. 7 (0.2, fixed in the paper; the initial value
            with ``learn_tau``).
        learn_tau: learn the attention temperature (the authors' code: ``tau = exp(log_tau)`` clamped to
            [0.01, 2], initialised at ``tau``); false keeps the paper's fixed tau.
        dropout: dropout on the embeddings and the GATv2 attention.
        omics_dim: G, length of the omics vector; 0 builds no omics branch (the ``momkd`` method sets it from
            the omics table).
        omics_hidden: hidden width of the omics encoder and decoder.
    """

    renamed: ClassVar[dict[str, str]] = {"embed_dim": "dim", "gat_heads": "n_heads"}

    in_dim: int = 1024
    n_classes: int = 2
    dim: int = 256
    memory_dim: int = 128
    n_components: int = 16
    k_neighbors: int = 8
    n_heads: int = 4
    gat_layers: int = 2
    tau: float = 0.2
    learn_tau: bool = False
    dropout: float = 0.1
    omics_dim: int = 0
    omics_hidden: int = 256

    def __post_init__(self) -> None:
        check_positive_ints(
            self,
            (
                "in_dim",
                "dim",
                "memory_dim",
                "n_components",
                "k_neighbors",
                "n_heads",
                "gat_layers",
                "omics_hidden",
            ),
        )
        if isinstance(self.n_classes, bool) or self.n_classes != 2:
            raise ValueError(
                f"n_classes must be 2 for momkd (a positive and a negative memory), got {self.n_classes!r}"
            )
        if isinstance(self.omics_dim, bool) or not isinstance(self.omics_dim, int) or self.omics_dim < 0:
            raise ValueError(f"omics_dim must be an integer >= 0 (0 = no omics branch), got {self.omics_dim!r}")
        if self.dim % self.n_heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if not isinstance(self.tau, (int, float)) or isinstance(self.tau, bool) or self.tau <= 0:
            raise ValueError(f"tau must be > 0, got {self.tau!r}")
        if not isinstance(self.learn_tau, bool):
            raise ValueError(f"learn_tau must be true or false, got {self.learn_tau!r}")
        check_dropout(self.dropout)


class GraphEncoder(nn.Module):
    """Two (``gat_layers``) GATv2 layers with residuals: ``[N, in_dim] -> F_wsi [N, dim]`` (Sec. 3.2)."""

    def __init__(self, cfg: MoMKDConfig):
        super().__init__()
        d = cfg.dim
        self.inp = nn.Sequential(nn.Linear(cfg.in_dim, d), nn.ReLU(), nn.Dropout(cfg.dropout))
        self.convs = nn.ModuleList(
            GATv2Layer(d, d // cfg.n_heads, n_heads=cfg.n_heads, dropout=cfg.dropout) for _ in range(cfg.gat_layers)
        )
        self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(cfg.gat_layers))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, neighbors: Tensor) -> Tensor:
        """``x`` ``[N, in_dim]``, ``neighbors`` ``[N, k]`` (:func:`knn_neighbors`) -> ``[N, dim]``."""
        h = self.inp(x)
        for conv, norm in zip(self.convs, self.norms):
            h = norm(h + self.drop(F.elu(conv(h, neighbors))))
        return h


class OmicsBranch(nn.Module):
    """Omics encoder, decoder and ``F_N-omics`` head (Eq. 2); used in training only."""

    def __init__(self, omics_dim: int, hidden: int, embed_dim: int, memory_dim: int, dropout: float):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Linear(omics_dim, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, embed_dim), nn.ReLU()
        )
        self.decoder = nn.Sequential(nn.Linear(embed_dim, hidden), nn.ReLU(), nn.Linear(hidden, omics_dim))
        self.head = nn.Linear(embed_dim, memory_dim)

    def forward(self, omics: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``omics`` ``[B, G]`` -> ``(F_omics [B, D], reconstruction [B, G], F_N-omics [B, D_N] unit rows)``."""
        f = self.encoder(omics)
        return f, self.decoder(f), F.normalize(self.head(f), dim=-1)


@register_model("momkd", MoMKDConfig)
class MoMKD(nn.Module):
    """MoMKD: graph encoder, memory-guided attention, histology-only inference.

    Call ``model(x, coords, omics=None)``:
        x: ``[N, D]`` (one bag) or ``[B, N, D]``.
        coords: ``[N, 2]`` (or ``[B, N, 2]``) level-0 (x, y) patch positions; **required** (kNN graph).
        omics: optional ``[G]`` / ``[B, G]`` omics vector (training only; ignored without an omics branch).

    Returns ``MILOutput`` with
        logits ``[B, 2]``;
        maps (for B == 1, ``[N]`` each): ``attention`` (alpha, Eq. 7), ``memory/score`` (Eq. 6),
        ``memory/nearest_pos`` / ``memory/nearest_neg`` (index of the most similar component of C+ / C-),
        ``memory/component`` (signed id: ``k+1`` when the best positive similarity wins, ``-(k+1)`` otherwise);
        extras: ``f_wsi`` ``[B, N, D]``, ``f_proj`` ``[B, N, D_N]``, ``f_c`` ``[B, D]``, ``f_n_wsi`` ``[B, D_N]``,
        ``score`` ``[B, N]``, ``sim_pos`` / ``sim_neg`` ``[B, N, n]`` (detached), ``nearest_pos`` /
        ``nearest_neg`` ``[B, N]``, ``mem_pos`` / ``mem_neg`` ``[n, D_N]`` (unit-norm, with gradient), and with
        omics ``f_omics`` ``[B, D]``, ``omics_recon`` ``[B, G]``, ``f_n_omics`` ``[B, D_N]``.
    """

    def __init__(self, config: MoMKDConfig):
        super().__init__()
        self.config = config
        self.encoder = GraphEncoder(config)
        self.proj = nn.Linear(config.dim, config.memory_dim)  # W_proj
        self.classifier = nn.Linear(config.dim, config.n_classes)  # g
        self.wsi_head = nn.Linear(config.dim, config.memory_dim)  # W_C (Eq. 1)
        # Raw memory; the model always uses its row-normalised version (unit-norm components).
        self.memory_pos = nn.Parameter(F.normalize(torch.randn(config.n_components, config.memory_dim), dim=-1))
        self.memory_neg = nn.Parameter(F.normalize(torch.randn(config.n_components, config.memory_dim), dim=-1))
        self.log_tau: nn.Parameter | None = None
        if config.learn_tau:
            self.log_tau = nn.Parameter(torch.tensor(math.log(config.tau)))
        #: Whether the raw memory takes weight decay (``no_weight_decay``); the momkd method sets it.
        self.decay_memory = False
        self.omics: OmicsBranch | None = None
        if config.omics_dim > 0:
            self.build_omics_branch(config.omics_dim)

    def no_weight_decay(self) -> set[str]:
        """Parameter names the optimiser must not decay (timm convention, honoured by the engine): the raw
        memory, which is used only row-normalised (decay would only shrink its norm)."""
        return set() if self.decay_memory else {"memory_pos", "memory_neg"}

    def attention_tau(self) -> Tensor | float:
        """The attention temperature of Eq. 7: ``config.tau``, or ``exp(log_tau)`` clamped to [0.01, 2]."""
        if self.log_tau is None:
            return self.config.tau
        return self.log_tau.exp().clamp(0.01, 2.0)

    def map_specs(self) -> list[MapSpec]:
        """The maps of one bag, each ``[N]``; memory components are named ``C+1..C+n`` / ``C-1..C-n`` (1-based)."""
        n = self.memory_pos.shape[0]
        pos = tuple(f"C+{k + 1}" for k in range(n))
        neg = tuple(f"C-{k + 1}" for k in range(n))
        return [
            MapSpec(
                "attention",
                "scalar",
                "memory-guided attention alpha = softmax(score / tau) (Eq. 7; sums to 1)",
                primary=True,
            ),
            MapSpec(
                "memory/score",
                "signed",
                "Score_i = max cosine to C+ minus max cosine to C- (Eq. 6): > 0 where the patch resembles C+ more",
                colormap="coolwarm",
            ),
            MapSpec("memory/nearest_pos", "categorical", "the most similar component of the positive memory C+", pos),
            MapSpec("memory/nearest_neg", "categorical", "the most similar component of the negative memory C-", neg),
            MapSpec(
                "memory/component",
                "categorical",
                "the most similar component of both memories (C+k when the best C+ similarity wins, else C-k)",
                tuple(reversed(neg)) + pos,
                codes=tuple(range(-n, 0)) + tuple(range(1, n + 1)),
            ),
        ]

    # --- memory ----------------------------------------------------------------------------------------
    def memories(self) -> tuple[Tensor, Tensor]:
        """Unit-norm ``(C+ [n, D_N], C- [n, D_N])`` (differentiable w.r.t. the raw parameters)."""
        return F.normalize(self.memory_pos, dim=-1), F.normalize(self.memory_neg, dim=-1)

    @torch.no_grad()
    def set_memory(self, pos: Tensor, neg: Tensor) -> None:
        """Overwrite the memory (e.g. with K-means centroids), normalising each component."""
        n, d = self.memory_pos.shape
        for name, value in (("positive", pos), ("negative", neg)):
            if tuple(value.shape) != (n, d):
                raise ValueError(f"{name} memory must be [{n}, {d}], got {tuple(value.shape)}")
        self.memory_pos.copy_(F.normalize(pos.to(self.memory_pos), dim=-1))
        self.memory_neg.copy_(F.normalize(neg.to(self.memory_neg), dim=-1))

    def build_omics_branch(self, omics_dim: int) -> None:
        """Create the omics branch for vectors of length ``omics_dim`` and record it in the config."""
        if isinstance(omics_dim, bool) or not isinstance(omics_dim, int) or omics_dim < 1:
            raise ValueError(f"omics_dim must be a positive integer, got {omics_dim!r}")
        c = self.config
        dev = self.proj.weight.device
        self.omics = OmicsBranch(omics_dim, c.omics_hidden, c.dim, c.memory_dim, c.dropout).to(dev)
        c.omics_dim = omics_dim

    # --- histology branch ------------------------------------------------------------------------------
    def project(self, x: Tensor, coords: Tensor) -> tuple[Tensor, Tensor]:
        """One bag: ``x`` ``[N, in_dim]``, ``coords`` ``[N, 2]`` -> ``(F_wsi [N, D], F_P-wsi [N, D_N] unit rows)``."""
        neighbors = knn_neighbors(coords, self.config.k_neighbors).to(x.device)
        f_wsi = self.encoder(x, neighbors)
        return f_wsi, F.normalize(self.proj(f_wsi), dim=-1)

    def _check(self, x: Tensor, coords: Tensor | None) -> tuple[Tensor, Tensor]:
        x = prepare_bag(x, self.config.in_dim, "momkd")
        if coords is None:
            raise DataError(
                "momkd: patch coordinates are required (the graph encoder links each patch to its 8 nearest "
                "neighbours); pass coords=[N, 2] level-0 (x, y), e.g. from the feature store"
            )
        coords = torch.as_tensor(coords)
        if coords.dim() == 2:
            coords = coords.unsqueeze(0).expand(x.shape[0], -1, -1)
        if coords.dim() != 3 or coords.shape[-1] != 2 or coords.shape[:2] != x.shape[:2]:
            raise DataError(
                f"momkd: coords must be [N, 2] matching the {x.shape[1]} patches, got shape {tuple(coords.shape)}"
            )
        return x, coords

    def forward(self, x: Tensor, coords: Tensor | None = None, omics: Tensor | None = None, **extras) -> MILOutput:
        single = x.dim() == 2
        x, coords = self._check(x, coords)
        mem_pos, mem_neg = self.memories()
        mp, mn = mem_pos.detach(), mem_neg.detach()  # the attention path never moves the memory (Sec. 3.3.2)
        f_wsi, f_proj, f_c, scores, alphas = [], [], [], [], []
        sims_pos, sims_neg = [], []
        for b in range(x.shape[0]):
            fw, fp = self.project(x[b], coords[b])
            sp, sn = fp @ mp.t(), fp @ mn.t()  # [N, n]
            score = sp.max(dim=-1).values - sn.max(dim=-1).values  # Eq. 6
            alpha = memory_attention(score, self.attention_tau())  # Eq. 7
            f_c.append(memory_pool(alpha, fw))  # Eq. 8
            f_wsi.append(fw)
            f_proj.append(fp)
            scores.append(score)
            alphas.append(alpha)
            sims_pos.append(sp.detach())
            sims_neg.append(sn.detach())
        f_c_t = torch.stack(f_c)  # [B, D]
        logits = self.classifier(f_c_t)
        f_n_wsi = F.normalize(self.wsi_head(f_c_t), dim=-1)  # Eq. 1
        sim_pos, sim_neg = torch.stack(sims_pos), torch.stack(sims_neg)
        best_pos, nearest_pos = sim_pos.max(dim=-1)
        best_neg, nearest_neg = sim_neg.max(dim=-1)
        component = torch.where(best_pos >= best_neg, nearest_pos + 1, -(nearest_neg + 1))
        score_t, alpha_t = torch.stack(scores), torch.stack(alphas)
        out_extras = {
            "f_wsi": torch.stack(f_wsi),
            "f_proj": torch.stack(f_proj),
            "f_c": f_c_t,
            "f_n_wsi": f_n_wsi,
            "score": score_t,
            "sim_pos": sim_pos,
            "sim_neg": sim_neg,
            "nearest_pos": nearest_pos,
            "nearest_neg": nearest_neg,
            "mem_pos": mem_pos,
            "mem_neg": mem_neg,
        }
        if omics is not None and self.omics is not None:
            om = omics.to(x).reshape(-1, omics.shape[-1])
            if om.shape[-1] != self.config.omics_dim:
                raise DataError(
                    f"momkd: omics vector has {om.shape[-1]} values but the model expects omics_dim="
                    f"{self.config.omics_dim}"
                )
            f_om, recon, f_n_om = self.omics(om)
            out_extras.update(f_omics=f_om, omics_recon=recon, f_n_omics=f_n_om)
        elif omics is not None:
            warnings.warn("momkd: omics given but the model has no omics branch (omics_dim=0); ignored", stacklevel=2)

        def sel(t: Tensor) -> Tensor:
            return t[0] if single or t.shape[0] == 1 else t

        maps = {
            "attention": sel(alpha_t),
            "memory/score": sel(score_t),
            "memory/nearest_pos": sel(nearest_pos).float(),
            "memory/nearest_neg": sel(nearest_neg).float(),
            "memory/component": sel(component).float(),
        }
        return MILOutput(logits=logits, maps=maps, extras=out_extras)


__all__ = ["MoMKD", "MoMKDConfig", "GraphEncoder", "OmicsBranch"]
