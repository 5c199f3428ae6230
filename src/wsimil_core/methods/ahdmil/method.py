"""AHDMIL training recipe: self-distillation (step 1), asymmetric distillation (step 2), DMIN fine-tuning.

Phases (``train.phase_epochs`` sets the epochs of each; ``train.epochs`` is the default):

``self_distill`` (step 1, SD)
    DMIN trains on the full bag's features. With ``p = softmax(logits)``, full bag ``F`` and selected patches ``S``
    (the hard Gumbel-sigmoid mask ``m``, straight-through)::

        L_SD = w_ce CE(p_F, y) + w_kl T^2 KL(p_F^T || p_S^T) + w_feat MSE(z_S, z_F) + w_rate (mean_k m_k - rho)^2

    ``p^T`` are temperature-``T`` softmaxes; the full-bag teacher terms (``p_F``, ``z_F``) are detached inside the
    KL and MSE, so the selected-only prediction is distilled toward the full-bag one and not the reverse. ``S`` uses
    the noise-sampled mask; the rate term uses the noise-free mask ``1[r_k > 0]`` (straight-through on
    ``sigmoid(r_k / tau)``), the one inference applies, so the kept fraction at inference converges to ``rho``.
    ``rho`` = ``target_keep`` (0.6).
``prescreen`` (step 2, AD)
    DMIN is frozen (eval mode, deterministic mask ``m_k = 1[r_k > 0]`` at threshold 0.5). DB-LIPN scores the
    low-resolution twin of every patch, ``q_k``, and learns DMIN's relevance::

        L_AD = w_mask |sigmoid(q) - m|_1 + [u < p] w_logit |q - r|_1 + w_prescreen_rate (mean_k sigmoid(q_k) - rho)^2

    (``|.|_1`` averaged over patches; ``u ~ U(0, 1)`` drawn per step, ``p`` = ``logit_prob``.)
``finetune``
    DB-LIPN is frozen; DMIN is fine-tuned with ``L_SD`` on the sub-bag of patches DB-LIPN keeps
    (``sigmoid(q_k) > prescreen_threshold``; at least one). The rate term then counts DMIN's kept patches over
    the whole bag, so DMIN is not pushed to prune the already pre-screened sub-bag by another ``rho``.

Low-resolution patch images come from the slide files: the store's slide attrs (``slide_path``,
``patch_size_level0``, ``patch_size``) give the companion grid (same level-0 squares, ``patch_size /
prescreen_factor`` px); they are read once per slide in ``setup_phase`` and kept in memory (uint8). A bag may
also carry them itself as ``batch.extras["lowres"]`` (uint8 ``[N, h, w, 3]``, aligned with the bag's patches).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from pydantic import Field
from torch import Tensor, nn

import wsimil_core.methods.ahdmil.model  # noqa: F401  (registers "ahdmil")
from wsimil_core.checkpoint_meta import CheckpointMeta
from wsimil_core.data.bag import BagBatch
from wsimil_core.errors import DataError
from wsimil_core.methods.ahdmil.predictor import AHDMILPredictor
from wsimil_core.methods.base import Method, MethodOptions, register_method

log = logging.getLogger(__name__)

PHASES = ("self_distill", "prescreen", "finetune")


class AHDMILOptions(MethodOptions):
    """Options of the ``ahdmil`` method (DMIN / DB-LIPN architecture options go under ``model``)."""

    target_keep: float = Field(0.6, gt=0.0, le=1.0, description="Target fraction of patches kept (rho), steps 1-3.")
    w_ce: float = Field(1.0, ge=0.0, description="Step 1/3: weight of the cross-entropy on the full-bag prediction.")
    w_ce_selected: float = Field(
        0.0, ge=0.0, description="Step 1/3: weight of a cross-entropy on the selected-only prediction (0 = off)."
    )
    w_kl: float = Field(1.0, ge=0.0, description="Step 1/3: weight of KL(full || selected) on the predictions.")
    kl_temperature: float = Field(1.0, gt=0.0, description="Step 1/3: softmax temperature T of the KL term.")
    w_feat: float = Field(1.0, ge=0.0, description="Step 1/3: weight of the MSE between selected and full features.")
    w_rate: float = Field(4.0, ge=0.0, description="Step 1/3: weight of the rate term (kept fraction - rho)^2.")
    w_mask: float = Field(1.0, ge=0.0, description="Step 2: weight of the L1 loss between DB-LIPN and DMIN's mask.")
    w_logit: float = Field(0.1, ge=0.0, description="Step 2: weight of the L1 loss on DMIN's relevance logits.")
    logit_prob: float = Field(
        0.5, ge=0.0, le=1.0, description="Step 2: probability p of adding the relevance-logit L1 term at a step."
    )
    w_prescreen_rate: float = Field(1.0, ge=0.0, description="Step 2: weight of DB-LIPN's rate term.")
    prescreen_max_patches: int = Field(
        512, ge=1, description="Step 2: at most this many low-resolution patches per bag and step (random subset)."
    )
    num_workers: int = Field(0, ge=0, description="DataLoader workers reading low-resolution patches.")
    cache_lowres: bool = Field(
        True,
        description="Steps 2-3: keep every training slide's low-resolution patches in memory (uint8) after "
        "one read; false re-reads a bag's patches at each step (bounded memory for big cohorts).",
    )
    seed: int = Field(0, description="Seed of the step-2 patch subsets and logit-term draws.")


@register_method
class AHDMILMethod(Method):
    """AHDMIL: self-distilled DMIN with a hard relevance mask, DB-LIPN pre-screening, DMIN fine-tuning."""

    name = "ahdmil"
    model_name = "ahdmil"
    options_cls = AHDMILOptions
    phases = PHASES

    def __init__(self, model: dict[str, Any], options: dict[str, Any] | AHDMILOptions | None = None):
        super().__init__(model, options)
        self._lowres: dict[str, np.ndarray] = {}
        self._slides: dict[str, tuple[str, int, int, float | None]] = {}  # id -> (path, size0, lowres px, mpp)
        self._rng = random.Random(self.options.seed)
        self._np_rng = np.random.default_rng(self.options.seed)

    @classmethod
    def predictor(cls, model: nn.Module, meta: CheckpointMeta, prescreen: bool | None = None) -> AHDMILPredictor:
        """DB-LIPN pre-screening on low-resolution pixels, then DMIN on the kept patches (``AHDMILPredictor``)."""
        return AHDMILPredictor(model, meta, prescreen=prescreen)

    # --- phases -------------------------------------------------------------------------------------------
    def setup_phase(self, phase: str, train_data: Any) -> None:
        """Freeze what the phase does not train; steps 2-3 read the low-resolution patches of the training slides."""
        if phase not in PHASES:
            raise DataError(f"ahdmil: unknown phase {phase!r}; phases are {PHASES}")
        dmin, pre = self.model.dmin, self.model.prescreen
        for p in dmin.parameters():
            p.requires_grad_(phase != "prescreen")
        for p in pre.parameters():
            p.requires_grad_(phase == "prescreen")
        if phase in ("prescreen", "finetune"):
            self._load_lowres(train_data)

    def _load_lowres(self, train_data: Any) -> None:
        store = getattr(train_data, "store", None)
        ids = list(getattr(train_data, "slide_ids", []) or [])
        if store is None or not ids:
            return  # bags must then carry extras["lowres"]
        from tqdm.auto import tqdm

        from wsimil_core.methods.ahdmil.predictor import lowres_px_for, read_patches

        todo = [s for s in ids if s not in self._lowres and s not in self._slides]
        cache = self.options.cache_lowres
        for sid in tqdm(todo, desc="ahdmil: low-res patches", unit="slide", leave=False, disable=not (todo and cache)):
            attrs = store.slide_attrs(sid)
            path, size0, px = attrs.get("slide_path"), attrs.get("patch_size_level0"), attrs.get("patch_size")
            if not path or size0 is None or px is None:
                raise DataError(
                    f"{getattr(store, 'root', store)}: slide {sid!r} has no slide_path / patch_size_level0 / "
                    "patch_size attrs; AHDMIL steps 2-3 read low-resolution patches from the slide files, so use a "
                    "store written by `wsimil extract`"
                )
            lr_px = lowres_px_for(int(px), self.model.config.prescreen_factor)
            self._slides[sid] = (str(path), int(size0), lr_px, attrs.get("slide_mpp"))
            if cache:
                self._lowres[sid] = read_patches(
                    path,
                    store.read_coords(sid),
                    int(size0),
                    lr_px,
                    num_workers=self.options.num_workers,
                    slide_mpp=attrs.get("slide_mpp"),
                    progress=False,
                )

    def lowres_images(self, batch: BagBatch) -> Tensor:
        """uint8 ``[N, h, w, 3]`` low-resolution twins of the bag's patches (from extras or the slide cache)."""
        if "lowres" in batch.extras:
            images = torch.as_tensor(batch.extras["lowres"])
        elif batch.slide_id in self._lowres:
            images = torch.from_numpy(self._lowres[batch.slide_id])
            idx = batch.extras.get("patch_index")
            if idx is not None:
                images = images[torch.as_tensor(idx).cpu().long()]
        elif batch.slide_id in self._slides and batch.coords is not None:
            from wsimil_core.methods.ahdmil.predictor import read_patches

            path, size0, lr_px, mpp = self._slides[batch.slide_id]
            images = torch.from_numpy(
                read_patches(
                    path, batch.coords.cpu().numpy(), size0, lr_px, num_workers=self.options.num_workers, slide_mpp=mpp
                )
            )
        else:
            raise DataError(
                f"ahdmil: no low-resolution patches for bag {batch.slide_id!r}; train through `wsimil train` on a "
                "store written from the slide files, or pass extras['lowres']"
            )
        if images.shape[0] != batch.features.shape[0]:
            raise DataError(
                f"ahdmil: bag {batch.slide_id!r} has {batch.features.shape[0]} patches but "
                f"{images.shape[0]} low-resolution images"
            )
        return images

    def trainable_parameters(self, phase: str) -> Iterable[nn.Parameter]:
        module = self.model.prescreen if phase == "prescreen" else self.model.dmin
        return [p for p in module.parameters() if p.requires_grad]

    # --- losses -------------------------------------------------------------------------------------------
    def self_distillation_loss(self, features: Tensor, label: Tensor, keep: Tensor | None = None) -> dict[str, Tensor]:
        """``L_SD`` of one bag ``[N, D]`` (optionally restricted to ``keep`` ``[N]`` bool). See the module docstring."""
        o = self.options
        out = self.model.dmin(
            features.unsqueeze(0) if features.dim() == 2 else features, keep=None if keep is None else keep.view(1, -1)
        )
        y = label.view(-1)
        lf, ls = out["logits_full"].float(), out["logits_selected"].float()
        ce = nn.functional.cross_entropy(lf, y)
        t = o.kl_temperature
        teacher = torch.softmax(lf.detach() / t, dim=-1)
        kl = nn.functional.kl_div(torch.log_softmax(ls / t, dim=-1), teacher, reduction="batchmean") * t * t
        feat = nn.functional.mse_loss(out["features_selected"].float(), out["features_full"].detach().float())
        # The rate term acts on the noise-free mask (the one inference uses), so the kept fraction at inference
        # converges to rho; the sampled mask drives the selected-only prediction.
        # On a pre-screened sub-bag (step 3) the fraction is of the whole bag, so DMIN does not prune again a
        # sub-bag DB-LIPN already cut to about rho.
        mask = out["mask_deterministic"][0]
        kept_fraction = mask.mean() if keep is None else (mask * keep.float()).sum() / keep.numel()
        rate = (kept_fraction - o.target_keep) ** 2
        loss = o.w_ce * ce + o.w_kl * kl + o.w_feat * feat + o.w_rate * rate
        ce_sel = nn.functional.cross_entropy(ls, y)
        if o.w_ce_selected > 0:
            loss = loss + o.w_ce_selected * ce_sel
        return {
            "loss": loss,
            "ce": ce.detach(),
            "ce_selected": ce_sel.detach(),
            "kl": kl.detach(),
            "feat_mse": feat.detach(),
            "rate": rate.detach(),
            "keep_fraction": kept_fraction.detach(),
        }

    def asymmetric_distillation_loss(self, features: Tensor, images: Tensor) -> dict[str, Tensor]:
        """``L_AD`` of one bag: DB-LIPN on ``images`` ``[N, h, w, 3]`` learns frozen DMIN's mask on ``features``."""
        o = self.options
        n = features.shape[0]
        if n > o.prescreen_max_patches:
            idx = torch.from_numpy(np.sort(self._np_rng.choice(n, o.prescreen_max_patches, replace=False)))
            features, images = features[idx.to(features.device)], images[idx]
        dmin = self.model.dmin
        was = dmin.training
        dmin.eval()
        with torch.no_grad():
            out = dmin(features.unsqueeze(0), sample=False)
        dmin.train(was)
        target = (out["mask"][0] > 0).float()
        r = out["relevance_logits"][0].float()
        q = self.model.prescreen(images.to(features.device)).float()
        prob = torch.sigmoid(q)
        l_mask = (prob - target).abs().mean()
        use_logit = self._rng.random() < o.logit_prob
        l_logit = (q - r).abs().mean()
        rate = (prob.mean() - o.target_keep) ** 2
        loss = o.w_mask * l_mask + o.w_prescreen_rate * rate + (o.w_logit * l_logit if use_logit else 0.0)
        keep = prob.detach() > self.model.config.prescreen_threshold
        agreement = (keep.float() == target).float().mean()
        return {
            "loss": loss,
            "l1_mask": l_mask.detach(),
            "l1_logit": l_logit.detach(),
            "rate": rate.detach(),
            "prescreen_keep_fraction": keep.float().mean(),
            "dmin_keep_fraction": target.mean(),
            "agreement": agreement,
        }

    def prescreen_keep(self, images: Tensor, device: torch.device) -> Tensor:
        """Frozen DB-LIPN's keep mask ``[N]`` bool (at least one patch)."""
        pre = self.model.prescreen
        was = pre.training
        pre.eval()
        with torch.no_grad():
            q = pre(images.to(device)).float()
        pre.train(was)
        keep = torch.sigmoid(q) > self.model.config.prescreen_threshold
        if not bool(keep.any()):
            keep[q.argmax()] = True
        return keep

    # --- steps --------------------------------------------------------------------------------------------
    def training_step(self, batch: BagBatch, phase: str) -> dict[str, Tensor]:
        """One bag's loss for ``phase`` (``self_distill``, ``prescreen`` or ``finetune``)."""
        if isinstance(self.model, nn.parallel.DistributedDataParallel):
            from wsimil_core.errors import ConfigError

            raise ConfigError(
                "method 'ahdmil' calls DMIN and DB-LIPN separately and does not support multi-GPU "
                "(DDP) training yet; train on one device"
            )
        x = batch.features.float()
        if phase == "self_distill":
            step = self.self_distillation_loss(x, batch.label)
        elif phase == "prescreen":
            step = self.asymmetric_distillation_loss(x, self.lowres_images(batch))
        elif phase == "finetune":
            keep = self.prescreen_keep(self.lowres_images(batch), x.device)
            step = self.self_distillation_loss(x, batch.label, keep=keep)
            step["prescreen_keep_fraction"] = keep.float().mean()
        else:
            raise DataError(f"ahdmil: unknown phase {phase!r}; phases are {PHASES}")
        return step


__all__ = ["AHDMILMethod", "AHDMILOptions", "PHASES"]
