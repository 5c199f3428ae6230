"""Options of the ``ahdmil`` training recipe (``method.options``); defaults are the authors' recipe (issue 13)."""

from __future__ import annotations

from pydantic import Field

from wsimil_core.methods.base import MethodOptions


class AHDMILOptions(MethodOptions):
    """Options of the ``ahdmil`` method (DMIN / DB-LIPN architecture options go under ``model``)."""

    target_keep: float = Field(
        0.6, gt=0.0, le=1.0, description="Target fraction of patches kept (rho; per class with per-class masks)."
    )
    w_ce: float = Field(0.7, ge=0.0, description="Step 1/3: weight of the cross-entropy on the full-bag prediction.")
    w_instance: float = Field(
        0.3, ge=0.0, description="Step 1/3: weight of the CLAM-style instance loss (smooth top-1 SVM; 0 = off)."
    )
    instance_k: int = Field(8, ge=1, description="Step 1/3: top / bottom attended patches per instance label set.")
    instance_subtyping: bool = Field(
        False, description="Step 1/3: also label the top patches of the other classes' branches negative (CLAM)."
    )
    w_ce_selected: float = Field(
        0.0, ge=0.0, description="Step 1/3: weight of a cross-entropy on the selected-only prediction (0 = off)."
    )
    w_kl: float = Field(0.5, ge=0.0, description="Step 1/3: weight of KL(full || selected) on the predictions.")
    kl_temperature: float = Field(1.0, gt=0.0, description="Step 1/3: softmax temperature T of the KL term.")
    w_feat: float = Field(0.5, ge=0.0, description="Step 1/3: weight of the MSE between selected and full features.")
    w_rate: float = Field(
        2.0, ge=0.0, description="Step 1/3: weight of the rate term: MSE of the masks' kept fractions and rho."
    )
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
        description="Steps 2-3: keep every training and validation slide's low-resolution patches in memory "
        "(uint8) after one read; false re-reads a bag's patches at each step (bounded memory for big cohorts).",
    )
    seed: int = Field(0, description="Seed of the step-2 patch subsets and logit-term draws.")
    cross_ema_momentum: float = Field(
        0.99,
        ge=0.0,
        le=1.0,
        description="Step 2: after each optimiser step each DB-LIPN branch becomes m * itself + (1 - m) * the other "
        "(twin timm branches only; 1 = off).",
    )
    prescreen_weights: str | None = Field(
        None,
        description="Step 2: local weights file (.safetensors / .pth, e.g. timm's ImageNet MobileNetV4) loaded into "
        "both DB-LIPN branches before training, except their one-logit classifiers (nothing is downloaded).",
    )
    finetune_lr_scale: float = Field(
        0.1,
        gt=0.0,
        description="Step 3: the fine-tuning learning rate is train.lr times this (the authors fine-tune with a "
        "lower lr; train.phase_lr.finetune overrides it).",
    )


__all__ = ["AHDMILOptions"]
