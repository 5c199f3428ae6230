"""MoMKD training recipe: genomics-to-histology distillation through a class-conditional memory
(Guo et al. 2026, "Momentum Memory for Knowledge Distillation in Computational Pathology").

Total loss (Eq. 9), per slide::

    L = w_ce CE(g(F_C-wsi), y) + w_rec MSE(omics_hat, omics) + w_aw L_align(F_N-wsi) + w_ao L_align(F_N-omics)
        + w_mem L_mem(F_P-wsi)

with L_align from Eq. 3-5 and L_mem from Eq. 10 (``wsimil_core.functional.memory``); the omics terms are skipped
for slides without an omics row (``BagBatch.omics is None``). Gradient decoupling (Sec. 3.3.2): the omics and
histology branches share no parameter, the attention path reads a detached memory (CE never reaches it), and the
memory moves only through the two alignment terms and the diversity term of L_mem.

Before training, ``setup_phase`` initialises C+ / C- by K-means on about ``kmeans_samples`` randomly sampled patch
projections of positive / negative training slides. Memory health (active ratio and perplexity of component
usage, Fig. 3; each slide's patches count toward its own-class memory) is logged by ``epoch_end``. The raw memory is
excluded from weight decay (``MoMKD.no_weight_decay``; ``memory_weight_decay`` brings it back). ``fixed_memory`` freezes the memory after K-means (Table 4 ablation).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sized
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor
from tqdm.auto import tqdm

from wsimil_core.data.bag import BagBatch
from wsimil_core.errors import DataError
from wsimil_core.functional.memory import memory_alignment_loss, memory_loss, usage_stats
from wsimil_core.methods.base import Method, MethodOptions, register_method
from wsimil_core.methods.momkd.model import MoMKD  # importing it registers the "momkd" model


class MoMKDOptions(MethodOptions):
    """MoMKD options (the model's own hyper-parameters, e.g. ``n_components``, ``tau``, go under ``model``)."""

    ce_weight: float = Field(0.5, ge=0, description="Weight of the cross-entropy on the slide logits (Eq. 9).")
    recon_weight: float = Field(0.01, ge=0, description="Weight of the omics reconstruction MSE (Eq. 9).")
    align_wsi_weight: float = Field(0.2, ge=0, description="Weight of the memory alignment of F_N-wsi (Eq. 9).")
    align_omics_weight: float = Field(0.05, ge=0, description="Weight of the memory alignment of F_N-omics (Eq. 9).")
    mem_weight: float = Field(0.1, ge=0, description="Weight of the memory loss L_mem (Eq. 9, 10).")
    ortho_weight: float = Field(1.0, ge=0, description="Weight of the component-diversity term inside L_mem (Eq. 10).")
    mem_commit: Literal["own_class", "joint"] = Field(
        "own_class",
        description="L_mem commitment (Eq. 10): to the nearest component of the slide's own-class memory (the "
        "class-conditional memory of Sec. 3.3.1) or of C+ and C- together (joint; wsimil 0.x).",
    )
    memory_weight_decay: bool = Field(
        False,
        description="Apply train.weight_decay to the raw memory too (the authors' code does; off by default: the "
        "memory is used only row-normalised, so decay only shrinks its norm and raises its effective step size).",
    )
    tau_agg: float = Field(5.0, gt=0, description="Sharpness of the soft maximum phi over components (Eq. 3).")
    beta: float = Field(20.0, gt=0, description="Slope of the softplus in the alignment loss (Eq. 5).")
    margin: float = Field(0.3, description="Required class margin Delta of the alignment loss (Eq. 5).")
    use_omics: bool = Field(
        True, description="Train the omics branch and its losses; false gives the same WSI model without omics."
    )
    fixed_memory: bool = Field(False, description="Freeze the memory after K-means initialisation (Table 4 ablation).")
    kmeans_init: bool = Field(True, description="Initialise C+ / C- by K-means on patch projections before training.")
    kmeans_samples: int = Field(
        10000, ge=1, description="Patch projections sampled over the training slides for the K-means initialisation."
    )
    kmeans_max_bag_patches: int = Field(
        20000, ge=1, description="Larger bags are randomly subsampled to this many patches before projecting them."
    )
    seed: int = Field(0, description="Seed of the K-means initialisation and of its patch sampling.")
    reseed_dead: bool = Field(
        False,
        description="At each epoch end, move every component that no patch chose in the epoch onto a random recent "
        "patch projection of a slide of its class (a VQ dead-code restart; not in the paper).",
    )


@register_method
class MoMKDMethod(Method):
    """MoMKD: a ``momkd`` model trained with Eq. 9; only the histology branch is needed at inference."""

    name = "momkd"
    supports_survival = False  # its losses are written for class labels (docs/survival.md)
    cli = "wsimil_core.methods.momkd.cli:app"
    model_name = "momkd"
    options_cls = MoMKDOptions
    options: MoMKDOptions
    model: MoMKD
    usage_pos: Tensor  # [n_components] nearest-component counts of the epoch (buffers, not saved)
    usage_neg: Tensor

    def __init__(self, model: dict[str, Any], options: dict[str, Any] | MoMKDOptions | None = None):
        super().__init__(model, options)
        if not self.options.use_omics and self.model.omics is not None:
            # The same WSI model without omics: no omics branch in the model, its config or its checkpoints.
            self.model.omics = None
            self.model.config.omics_dim = 0
        self.model.decay_memory = self.options.memory_weight_decay
        n = self.model.config.n_components
        self.register_buffer("usage_pos", torch.zeros(n, dtype=torch.long), persistent=False)
        self.register_buffer("usage_neg", torch.zeros(n, dtype=torch.long), persistent=False)
        # Recent detached patch projections per slide class (reseed_dead): {1: [k, D_N] tensors, 0: [...]}.
        self._recent: dict[int, list[Tensor]] = {0: [], 1: []}
        self._rng = torch.Generator().manual_seed(self.options.seed)
        self._apply_fixed_memory()

    def _apply_fixed_memory(self) -> None:
        frozen = self.options.fixed_memory
        self.model.memory_pos.requires_grad_(not frozen)
        self.model.memory_neg.requires_grad_(not frozen)

    # --- phases -------------------------------------------------------------------------------------------
    def setup_phase(self, phase: str, train_data: Any) -> None:
        """Build the omics branch from the data when needed, then K-means-initialise the memory."""
        if self.options.use_omics and self.model.omics is None:
            dim = getattr(train_data, "omics_dim", None)
            if dim is None:
                dim = next((int(b.omics.numel()) for b in _iter_bags(train_data, 8) if b.omics is not None), None)
            if dim and getattr(train_data, "n_with_omics", None) == 0:
                raise DataError(
                    f"{getattr(train_data, 'omics_source', 'the omics table')}: no training slide has a row "
                    "(matched on its 'slide_id' column); MoMKD needs omics to train. Fix the slide ids, or set "
                    "method.options.use_omics: false to train the histology branch only"
                )
            if dim:
                self.model.build_omics_branch(int(dim))
            else:
                warnings.warn(
                    "momkd: the training data has no omics table; training the histology branch only", stacklevel=2
                )
        if self.options.kmeans_init:
            self.init_memory(train_data)
        self._apply_fixed_memory()

    @torch.no_grad()
    def init_memory(self, train_data: Iterable[BagBatch]) -> dict[str, int]:
        """K-means (sklearn, seeded) on sampled patch projections: positive slides -> C+, negative -> C-.

        Returns the number of projections used per memory, ``{"pos": ..., "neg": ...}``.
        """
        from sklearn.cluster import KMeans  # heavy to import; only this initialisation needs it

        model = self.model
        n_comp = model.config.n_components
        dev = model.proj.weight.device
        n_slides = len(train_data) if isinstance(train_data, Sized) else None
        quota = math.ceil(self.options.kmeans_samples / max(1, n_slides or 1)) if n_slides else 512
        rng = np.random.default_rng(self.options.seed)
        samples: dict[int, list[np.ndarray]] = {0: [], 1: []}
        was_training = model.training
        model.eval()
        try:
            for bag in _progress(_iter_bags(train_data), n_slides, "momkd: K-means memory init"):
                y = int(bag.label.view(-1)[0])
                if y not in (0, 1):
                    raise DataError(f"momkd: slide {bag.slide_id!r} has label {y}; momkd needs binary labels 0/1")
                if bag.coords is None:
                    raise DataError(f"momkd: slide {bag.slide_id!r} has no patch coordinates (needed by the graph)")
                x, c = bag.features, bag.coords
                if x.shape[0] > self.options.kmeans_max_bag_patches:
                    keep = torch.from_numpy(
                        np.sort(rng.choice(x.shape[0], self.options.kmeans_max_bag_patches, replace=False))
                    )
                    x, c = x[keep], c[keep]
                _, fp = model.project(x.to(dev, torch.float32), c.to(dev))
                proj = fp.float().cpu().numpy()
                if proj.shape[0] > quota:
                    proj = proj[rng.choice(proj.shape[0], quota, replace=False)]
                samples[y].append(proj)
        finally:
            model.train(was_training)
        centers = {}
        counts = {}
        for y, name in ((1, "positive"), (0, "negative")):
            pts = np.concatenate(samples[y]) if samples[y] else np.zeros((0, model.config.memory_dim), np.float32)
            counts["pos" if y else "neg"] = int(pts.shape[0])
            current = (model.memory_pos if y else model.memory_neg).detach().float().cpu().numpy()
            if pts.shape[0] < n_comp:
                warnings.warn(
                    f"momkd: only {pts.shape[0]} patch projections from {name} slides for {n_comp} components; "
                    f"the {name} memory keeps its random initialisation",
                    stacklevel=2,
                )
                centers[y] = current
                continue
            km = KMeans(n_clusters=n_comp, n_init=3, random_state=self.options.seed).fit(pts.astype(np.float64))
            centers[y] = km.cluster_centers_.astype(np.float32)
        model.set_memory(torch.from_numpy(centers[1]), torch.from_numpy(centers[0]))
        return counts

    # --- steps ----------------------------------------------------------------------------------------------
    def loss_terms(self, batch: BagBatch) -> dict[str, Tensor]:
        """The unweighted terms of Eq. 9 for one slide, with their autograd graphs.

        Keys: ``ce``, ``align_wsi`` (Eq. 5 on F_N-wsi), ``mem`` (Eq. 10) and, when ``batch.omics`` is present and
        ``use_omics`` is on, ``recon`` (MSE) and ``align_omics`` (Eq. 5 on F_N-omics). Also updates the memory
        usage counters of the epoch.
        """
        o = self.options
        omics = batch.omics if (o.use_omics and self.model.omics is not None) else None
        out = self.model(batch.features, coords=batch.coords, omics=omics)
        y = batch.label.view(-1).to(out.logits.device)
        ex = out.extras
        mem_pos, mem_neg = ex["mem_pos"], ex["mem_neg"]
        f_proj = ex["f_proj"].reshape(-1, ex["f_proj"].shape[-1])
        terms = {
            "ce": F.cross_entropy(out.logits, y),
            "align_wsi": memory_alignment_loss(ex["f_n_wsi"], mem_pos, mem_neg, y, o.tau_agg, o.beta, o.margin),
            "mem": memory_loss(f_proj, mem_pos, mem_neg, o.ortho_weight, y=y, search=o.mem_commit),
        }
        if omics is not None:
            recon = ex["omics_recon"].float()
            terms["recon"] = F.mse_loss(recon, omics.to(recon).reshape(recon.shape))
            terms["align_omics"] = memory_alignment_loss(
                ex["f_n_omics"], mem_pos, mem_neg, y, o.tau_agg, o.beta, o.margin
            )
        n = self.model.config.n_components
        if o.reseed_dead:
            self._remember(f_proj.detach(), int(y[0]))
        with torch.no_grad():  # Fig. 3: a slide's patches count toward its own-class memory only
            if int(y[0]) == 1:
                self.usage_pos += torch.bincount(ex["nearest_pos"].reshape(-1), minlength=n).to(self.usage_pos)
            else:
                self.usage_neg += torch.bincount(ex["nearest_neg"].reshape(-1), minlength=n).to(self.usage_neg)
        return terms

    def training_step(self, batch: BagBatch, phase: str) -> dict[str, Tensor]:
        """Eq. 9 for one slide; omics terms only when ``batch.omics`` is present and ``use_omics`` is on."""
        o = self.options
        weights = {
            "ce": o.ce_weight,
            "recon": o.recon_weight,
            "align_wsi": o.align_wsi_weight,
            "align_omics": o.align_omics_weight,
            "mem": o.mem_weight,
        }
        terms = self.loss_terms(batch)
        # "ce" is always the first term: the same left-to-right sum, typed as a Tensor
        loss = sum((weights[k] * v for k, v in terms.items() if k != "ce"), o.ce_weight * terms["ce"])
        return {"loss": loss, **{k: v.detach() for k, v in terms.items()}}

    def memory_health(self) -> dict[str, float]:
        """Active ratio and perplexity of each memory's usage since the last reset (Fig. 3): ``C+`` counts the
        nearest ``C+`` component of every patch of the positive slides, ``C-`` that of the negative slides."""
        act_p, ppl_p = usage_stats(self.usage_pos)
        act_n, ppl_n = usage_stats(self.usage_neg)
        return {
            "mem_pos_active": act_p,
            "mem_pos_perplexity": ppl_p,
            "mem_neg_active": act_n,
            "mem_neg_perplexity": ppl_n,
        }

    def epoch_end(self, phase: str, epoch: int) -> dict[str, float]:
        """Memory health of the epoch (usage of the nearest own-class component over the training patches).

        With ``reseed_dead`` the dead components are then moved onto recent patch projections
        (``mem_reseeded`` counts them); the health figures describe the epoch before that move.
        """
        logs = self.memory_health()
        if self.options.reseed_dead and not self.options.fixed_memory:
            logs["mem_reseeded"] = float(self.reseed_dead_components())
        self.usage_pos.zero_()
        self.usage_neg.zero_()
        self._recent = {0: [], 1: []}
        return logs

    _RECENT_PER_BAG = 16
    _RECENT_MAX = 4096

    def _remember(self, f_proj: Tensor, y: int) -> None:
        """Keep a few projections of this bag for ``reseed_dead`` (bounded reservoir per class)."""
        k = min(self._RECENT_PER_BAG, f_proj.shape[0])
        idx = torch.randperm(f_proj.shape[0], generator=self._rng)[:k].to(f_proj.device)
        bucket = self._recent.setdefault(y, [])
        bucket.append(f_proj[idx].float())
        while sum(t.shape[0] for t in bucket) > self._RECENT_MAX:
            bucket.pop(0)

    @torch.no_grad()
    def reseed_dead_components(self) -> int:
        """Move every unused component of C+ (C-) onto a random recent projection of a positive (negative) slide.

        Returns the number of components moved.
        """
        moved = 0
        for y, usage, param in ((1, self.usage_pos, self.model.memory_pos), (0, self.usage_neg, self.model.memory_neg)):
            dead = torch.nonzero(usage == 0).flatten().tolist()
            if not dead or not self._recent.get(y):
                continue
            pool = torch.cat(self._recent[y])
            pick = torch.randint(pool.shape[0], (len(dead),), generator=self._rng)
            param[dead] = F.normalize(pool[pick.to(pool.device)], dim=-1).to(param)
            moved += len(dead)
        return moved


def _iter_bags(data: Any, limit: int | None = None) -> Iterable[BagBatch]:
    """Bags of a dataset (indexable) or any iterable of ``BagBatch``; at most ``limit``."""
    if hasattr(data, "__len__") and hasattr(data, "__getitem__"):
        n = len(data) if limit is None else min(limit, len(data))
        for i in range(n):
            yield data[i]
        return
    for i, bag in enumerate(data):
        if limit is not None and i >= limit:
            return
        yield bag


def _progress(it: Iterable, total: int | None, desc: str) -> Iterable:
    return tqdm(it, total=total, desc=desc, leave=False, disable=None)


__all__ = ["MoMKDMethod", "MoMKDOptions"]
