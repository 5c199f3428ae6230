"""AHDMIL training recipe: self-distillation (step 1), asymmetric distillation (step 2), DMIN fine-tuning.

Phases (``train.phase_epochs`` sets the epochs of each; ``train.epochs`` is the default):

``self_distill`` (step 1, SD)
    DMIN trains on the full bag's features. With ``p = softmax(logits)``, full bag ``F`` and selected patches ``S``
    (the hard Gumbel-sigmoid masks ``m_{k,c}``, straight-through; one per class, or one shared)::

        L_SD = w_ce CE(p_F, y) + w_instance L_inst + w_kl T^2 KL(p_F^T || p_S^T) + w_feat MSE(z_S, z_F)
               + w_rate mean_c (mean_k m_{k,c} - rho)^2

    with the authors' weights 0.7 / 0.3 / 0.5 / 0.5 / 2. ``L_inst`` is CLAM's instance loss (smooth top-1 SVM,
    :mod:`wsimil_core.methods.ahdmil.instance`). ``p^T`` are temperature-``T`` softmaxes; the full-bag teacher
    terms (``p_F``, ``z_F``) are detached inside the KL and MSE, so the selected-only prediction is distilled
    toward the full-bag one and not the reverse. ``S`` uses the noise-sampled masks; the rate term uses the
    noise-free masks ``1[s0_{k,c} > 0]`` (straight-through on ``sigmoid(s0 / tau)``), the ones inference applies,
    so the kept fraction at inference converges to ``rho`` = ``target_keep`` (0.6).
``prescreen`` (step 2, AD)
    DMIN is frozen (eval mode, deterministic masks at threshold 0.5; ``m_k`` = 1 when any class keeps patch ``k``,
    ``r_k`` its largest mask logit). DB-LIPN scores the low-resolution twin of every patch, ``q_k``, and learns
    DMIN's relevance::

        L_AD = w_mask |sigmoid(q) - m|_1 + [u < p] w_logit |q - r|_1 + w_prescreen_rate (mean_k sigmoid(q_k) - rho)^2

    (``|.|_1`` averaged over patches; ``u ~ U(0, 1)`` drawn per step, ``p`` = ``logit_prob``.)
``finetune``
    DB-LIPN is frozen; DMIN is fine-tuned with ``L_SD`` on the sub-bag of patches DB-LIPN keeps
    (``sigmoid(q_k) > prescreen_threshold``; at least one). The rate term then counts DMIN's kept patches over
    the whole bag, so DMIN is not pushed to prune the already pre-screened sub-bag by another ``rho``.

Low-resolution patch images come from the slide files: the bag's ``slide_path`` and slide attrs
(``patch_size_level0``, ``patch_size``, ``slide_mpp``, from the store) give the companion grid (same level-0
squares, ``patch_size / prescreen_factor`` px); the training slides' twins are read once in ``setup_phase`` and
kept in memory (uint8, ``cache_lowres``). A bag may also carry them itself as ``batch.extras["lowres"]`` (uint8
``[N, h, w, 3]``, aligned with the bag's patches).

Validation and test (:meth:`AHDMILMethod.eval_forward`) measure the deployed pipeline of
:func:`wsimil_core.methods.ahdmil.predictor.predict_slide`: DB-LIPN on the bag's low-resolution twins (read from
``batch.slide_path`` at ``batch.coords``) -> keep mask -> DMIN on the kept patches' features. During
``self_distill`` DB-LIPN is not trained yet, so validation runs DMIN on every patch; from ``prescreen`` on the
pre-screened pipeline is validated and DMIN on every patch is logged beside it (``val_all_patches/...``). Each
phase starts its own early stopping (patience never stops ``prescreen``: :meth:`AHDMILMethod.stops_early`) and
the best checkpoint is the best epoch of the last phase run, so it is always chosen on the pre-screened
pipeline; the test split runs the best checkpoint's pipeline with its DMIN on every patch beside it
(``test_all_patches/...``, :meth:`AHDMILMethod.test_models`). Fine-tuning runs at ``train.lr *
finetune_lr_scale``. Bags without a slide file (feature-only cohorts) fall back to DMIN
on every patch, with a warning.
"""

from __future__ import annotations

import logging
import random
import warnings
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from wsimil_core.checkpoint_meta import CheckpointMeta
from wsimil_core.data.bag import BagBatch
from wsimil_core.errors import ConfigError, DataError
from wsimil_core.methods.ahdmil.instance import instance_loss
from wsimil_core.methods.ahdmil.model import AHDMIL
from wsimil_core.methods.ahdmil.options import AHDMILOptions
from wsimil_core.methods.ahdmil.predictor import AHDMILPredictor, lowres_px_for, read_patches
from wsimil_core.methods.ahdmil.prescreen import load_backbone_weights
from wsimil_core.methods.base import Method, register_method
from wsimil_core.methods.predictor import Predictor
from wsimil_core.models.base import MILOutput

log = logging.getLogger(__name__)

PHASES = ("self_distill", "prescreen", "finetune")


class AllPatches(nn.Module):
    """DMIN on every patch of the bag, no pre-screening: the figure reported beside the deployed pipeline.

    ``AllPatches(ahdmil)(x [N, D], coords)`` is ``ahdmil(x, coords)``; a distinct module so that
    :meth:`AHDMILMethod.eval_forward` knows not to pre-screen it.
    """

    def __init__(self, ahdmil: nn.Module):
        super().__init__()
        self.ahdmil = ahdmil

    def forward(self, x: Tensor, coords: Tensor | None = None, **extras: Any) -> MILOutput:
        return self.ahdmil(x, coords=coords)


@register_method
class AHDMILMethod(Method):
    """AHDMIL: self-distilled DMIN with a hard relevance mask, DB-LIPN pre-screening, DMIN fine-tuning."""

    name = "ahdmil"
    supports_survival = False  # its losses are written for class labels (docs/survival.md)
    cli = "wsimil_core.methods.ahdmil.cli:app"
    model_name = "ahdmil"
    options_cls = AHDMILOptions
    phases = PHASES
    options: AHDMILOptions
    model: AHDMIL

    def __init__(self, model: dict[str, Any], options: dict[str, Any] | AHDMILOptions | None = None):
        super().__init__(model, options)
        self._lowres: dict[str, np.ndarray] = {}  # slide id -> uint8 [N, h, w, 3] twins of the full grid
        self._phase: str | None = None  # None (never set up, e.g. a loaded model): the deployed pipeline
        self._warned_no_slide = False
        self._rng = random.Random(self.options.seed)
        self._np_rng = np.random.default_rng(self.options.seed)

    @classmethod
    def predictor(
        cls, model: nn.Module, meta: CheckpointMeta, prescreen: bool | None = None, **options: Any
    ) -> Predictor:
        """DB-LIPN pre-screening on low-resolution pixels, then DMIN on the kept patches (``AHDMILPredictor``;
        ``prescreen`` False: DMIN on every patch, None: pre-screen when the slide file is readable)."""
        if options:
            raise ConfigError(f"method 'ahdmil' takes only the predictor option 'prescreen', got {sorted(options)}")
        return AHDMILPredictor(model, meta, prescreen=prescreen)

    # --- phases -------------------------------------------------------------------------------------------
    def setup_phase(self, phase: str, train_data: Any) -> None:
        """Freeze what the phase does not train; steps 2-3 read the low-resolution patches of the training slides."""
        if phase not in PHASES:
            raise DataError(f"ahdmil: unknown phase {phase!r}; phases are {PHASES}")
        self._phase = phase
        dmin, pre = self.model.dmin, self.model.prescreen
        for p in dmin.parameters():
            p.requires_grad_(phase != "prescreen")
        for p in pre.parameters():
            p.requires_grad_(phase == "prescreen")
        if phase == "prescreen" and self.options.prescreen_weights:
            for branch in (pre.branch1, pre.branch2):
                load_backbone_weights(branch, self.options.prescreen_weights)
        if phase in ("prescreen", "finetune"):
            self._load_lowres(train_data)

    def after_optimizer_step(self, phase: str) -> None:
        """Step 2: the cross-EMA between DB-LIPN's twin branches (``cross_ema_momentum``)."""
        m = self.options.cross_ema_momentum
        if phase == "prescreen" and m < 1.0 and self.model.prescreen.twin:
            self.model.prescreen.cross_ema_(m)

    def _load_lowres(self, train_data: Any) -> None:
        """Check the training slides' attrs; with ``cache_lowres`` read their twins once (full grids)."""
        store = getattr(train_data, "store", None)
        ids = list(getattr(train_data, "slide_ids", []) or [])
        if store is None or not ids:
            return  # bags must then carry extras["lowres"]
        todo = [s for s in ids if s not in self._lowres]
        cache = self.options.cache_lowres
        for sid in tqdm(todo, desc="ahdmil: low-res patches", unit="slide", leave=False, disable=not (todo and cache)):
            attrs = store.slide_attrs(sid)
            path, size0, px = self._grid(attrs, sid, getattr(store, "root", store))
            if cache:
                self._lowres[sid] = read_patches(
                    path,
                    store.read_coords(sid),
                    size0,
                    lowres_px_for(px, self.model.config.prescreen_factor),
                    num_workers=self.options.num_workers,
                    slide_mpp=attrs.get("slide_mpp"),
                    progress=False,
                )

    @staticmethod
    def _grid(attrs: dict[str, Any], slide_id: str, where: Any) -> tuple[str, int, int]:
        """``(slide_path, patch_size_level0, patch_size px)`` of a slide's attrs, or a clear ``DataError``."""
        path, size0, px = attrs.get("slide_path"), attrs.get("patch_size_level0"), attrs.get("patch_size")
        if not path or size0 is None or px is None:
            raise DataError(
                f"{where}: slide {slide_id!r} has no slide_path / patch_size_level0 / patch_size attrs; AHDMIL "
                "reads low-resolution patches from the slide files, so use a store written by `wsimil extract`"
            )
        return str(path), int(size0), int(px)

    def _bag_lowres(self, batch: BagBatch, factor: float) -> Tensor | None:
        """uint8 ``[N, h, w, 3]`` twins of the bag's patches: ``extras["lowres"]``, the slide cache, or read from
        ``batch.slide_path`` at ``batch.coords``; None when the bag has no slide file."""
        if "lowres" in batch.extras:
            images = torch.as_tensor(batch.extras["lowres"])
        elif batch.slide_id in self._lowres:
            images = torch.from_numpy(self._lowres[batch.slide_id])
            idx = batch.extras.get("patch_index")
            if idx is not None:
                images = images[torch.as_tensor(idx).cpu().long()]
        elif batch.slide_path and batch.coords is not None:
            attrs = {**batch.slide_attrs, "slide_path": batch.slide_path}
            path, size0, px = self._grid(attrs, batch.slide_id, "ahdmil")
            read = read_patches(
                path,
                batch.coords.cpu().numpy(),
                size0,
                lowres_px_for(px, factor),
                num_workers=self.options.num_workers,
                slide_mpp=attrs.get("slide_mpp"),
            )
            if self.options.cache_lowres and "patch_index" not in batch.extras:
                self._lowres[batch.slide_id] = read
            images = torch.from_numpy(read)
        else:
            return None
        if images.shape[0] != batch.features.shape[0]:
            raise DataError(
                f"ahdmil: bag {batch.slide_id!r} has {batch.features.shape[0]} patches but "
                f"{images.shape[0]} low-resolution images"
            )
        return images

    def lowres_images(self, batch: BagBatch) -> Tensor:
        """uint8 ``[N, h, w, 3]`` low-resolution twins of the bag's patches (from extras, the cache or the slide)."""
        images = self._bag_lowres(batch, self.model.config.prescreen_factor)
        if images is None:
            raise DataError(
                f"ahdmil: no low-resolution patches for bag {batch.slide_id!r}; train through `wsimil train` on a "
                "store written from the slide files, or pass extras['lowres']"
            )
        return images

    def phase_lr(self, phase: str, lr: float) -> float:
        """Fine-tuning (step 3) runs at ``lr * finetune_lr_scale``; steps 1-2 at ``lr``."""
        return lr * self.options.finetune_lr_scale if phase == "finetune" else lr

    def stops_early(self, phase: str) -> bool:
        """Patience never stops step 2: DMIN is frozen there and DB-LIPN learns its mask, not the slide label, so
        the tracked validation metric moves only through DB-LIPN's keep mask (not at all on bags without slide
        files) and patience would end the step before DB-LIPN has learned the mask."""
        return phase != "prescreen"

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
        mask = out["class_mask_deterministic"][0]  # [N, M]: one column per class (per-class masks) or one
        if keep is None:
            rates = mask.mean(dim=0)
        else:
            rates = (mask * keep.float().unsqueeze(-1)).sum(dim=0) / keep.numel()
        rate = ((rates - o.target_keep) ** 2).mean()  # MSE of the kept fractions [M] against rho
        kept_fraction = rates.mean()
        inst = torch.zeros((), device=lf.device)
        classifiers = self.model.dmin.instance_classifiers
        if o.w_instance > 0 and classifiers is not None:
            inst = instance_loss(
                out["embeddings"][0],
                out["attention_logits"][0],
                classifiers,
                int(y[0]),
                o.instance_k,
                o.instance_subtyping,
                allowed=keep,
            )
        loss = o.w_ce * ce + o.w_instance * inst + o.w_kl * kl + o.w_feat * feat + o.w_rate * rate
        ce_sel = nn.functional.cross_entropy(ls, y)
        if o.w_ce_selected > 0:
            loss = loss + o.w_ce_selected * ce_sel
        return {
            "loss": loss,
            "ce": ce.detach(),
            "ce_selected": ce_sel.detach(),
            "instance": inst.detach(),
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

    def prescreen_keep(self, images: Tensor, device: torch.device, model: AHDMIL | None = None) -> Tensor:
        """Frozen DB-LIPN's keep mask ``[N]`` bool (at least one patch) of ``model`` (default: ``self.model``)."""
        model = model if model is not None else self.model
        pre = model.prescreen
        was = pre.training
        pre.eval()
        with torch.no_grad():
            q = pre(images.to(device)).float()
        pre.train(was)
        keep = torch.sigmoid(q) > model.config.prescreen_threshold
        if not bool(keep.any()):
            keep[q.argmax()] = True
        return keep

    # --- evaluation ---------------------------------------------------------------------------------------
    def evaluation_models(self) -> dict[str, nn.Module]:
        """The deployed pipeline (``online``) and, once DB-LIPN is trained, DMIN on every patch (``all_patches``)."""
        models: dict[str, nn.Module] = {"online": self.model}
        if self._phase != "self_distill":
            models["all_patches"] = AllPatches(self.model).train(self.model.training)
        return models

    def test_models(self, model: nn.Module) -> dict[str, nn.Module]:
        """DMIN of the best checkpoint's ``model`` on every patch (``test_all_patches/...``), beside its deployed
        pipeline."""
        return {"all_patches": AllPatches(model)} if isinstance(model, AHDMIL) else {}

    def eval_forward(self, batch: BagBatch, model: nn.Module | None = None) -> MILOutput:
        """The deployed pipeline on one bag (as ``predict_slide``): DB-LIPN on the low-resolution twins read from
        ``batch.slide_path`` at ``batch.coords`` -> keep mask -> DMIN on the kept patches' features.

        DMIN on every patch instead: for an :class:`AllPatches` model, during ``self_distill`` (DB-LIPN not
        trained yet), and for bags without a slide file (a warning, once). Maps cover every patch (NaN where
        pruned).
        """
        model = model if model is not None else self.inference_model()
        if isinstance(model, AllPatches) or not isinstance(model, AHDMIL) or self._phase == "self_distill":
            return model(batch.features, coords=batch.coords)
        images = self._bag_lowres(batch, model.config.prescreen_factor)
        if images is None:
            if not self._warned_no_slide:
                msg = (
                    f"ahdmil: bag {batch.slide_id!r} has no slide file (its store has no slide_path), so validation "
                    "cannot pre-screen it; such bags are validated with DMIN on every patch"
                )
                warnings.warn(msg, stacklevel=2)
                log.warning(msg)
                self._warned_no_slide = True
            return model(batch.features, coords=batch.coords)
        keep = self.prescreen_keep(images, batch.features.device, model)
        return model(batch.features, coords=batch.coords, keep=keep)

    # --- steps --------------------------------------------------------------------------------------------
    def training_step(self, batch: BagBatch, phase: str) -> dict[str, Tensor]:
        """One bag's loss for ``phase`` (``self_distill``, ``prescreen`` or ``finetune``)."""
        if isinstance(self.model, nn.parallel.DistributedDataParallel):
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


__all__ = ["AHDMILMethod", "AHDMILOptions", "AllPatches", "PHASES"]
