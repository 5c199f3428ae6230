"""AHDMIL (2025): DMIN with a learned hard relevance mask + CKA classifiers, and the DB-LIPN pre-screener.

"AHDMIL: Asymmetric Hierarchical Distillation Multi-Instance Learning for Fast and Accurate Whole-Slide Image
Classification". The registered model ``ahdmil`` is the whole inference pipeline in one module so that a
checkpoint alone runs fast slide inference:

* ``model.dmin`` -- DMIN, the dynamic multi-instance network on high-resolution patch features ``[N, D]``:

  - embedding       ``h_k = Dropout(ReLU(W_e x_k + b_e))``                    (Linear D -> 512)
  - gated attention ``g_k = tanh(V h_k) * sigmoid(U h_k)``; one attention branch per class
                    ``s_{k,c} = w_c^T g_k`` (CLAM-MB style)
  - masks           ``mask_mode: per_class`` (the authors' DMIN): one mask per class on its attention logits,
                    ``m_{k,c} = 1[sigmoid((s0_{k,c} + l_{k,c}) / tau) > 0.5]``; ``mask_mode: shared``: one
                    extra relevance logit ``r_k = w_r^T g_k`` of the same branch and ``m_{k,c} = m_k`` for every
                    class. ``l = log u - log(1-u)`` is logistic noise (Gumbel-sigmoid, tau = 0.7) while
                    training, 0 at inference; the gradient flows through ``sigmoid((. + l) / tau)``
                    (straight-through). The mask logits ``s0`` / ``r`` skip dropout, so the mask is the same in
                    training and inference.
  - pooling         ``a_{k,c} = m_{k,c} exp(s_{k,c}) / sum_j m_{j,c} exp(s_{j,c})``, ``z_c = sum_k a_{k,c} h_k``
                    (class-wise pooled features; the full-bag variant uses ``m = 1``)
  - classifier      ``logit_c = CKA_c(z_c)`` (Chebyshev KAN per class, degree 12, no LayerNorm by default) or a
                    linear map (``head: linear``), see :mod:`wsimil_core.nn.kan`
  - instance        CLAM-style instance classifiers ``inst_c(h_k)`` ``[2]`` per class (``instance_classifiers``),
    classifiers     trained by the method with the smooth top-1 SVM loss on the top / bottom attended patches.

A patch is kept by DMIN (``mask`` ``[B, N]``, the ``dmin/keep`` map, DB-LIPN's target) when any class keeps it;
its relevance logit (``relevance_logits`` ``[B, N]``) is the largest of its mask logits.

* ``model.prescreen`` -- DB-LIPN (:class:`wsimil_core.methods.ahdmil.prescreen.DBLIPN`) on low-resolution patches.

Called on features (``model(x [N, D])``, what the engine does) the model runs DMIN: the prediction uses the
patches DMIN's mask selects (``use_mask``). Slide inference (DB-LIPN, then only the kept patches are read at high
resolution and encoded) is :class:`wsimil_core.methods.ahdmil.predictor.AHDMILPredictor`, run by the inference
pipeline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from wsimil_core.methods.ahdmil.masking import ensure_one, gumbel_sigmoid_mask, masked_attention
from wsimil_core.methods.ahdmil.prescreen import DBLIPN
from wsimil_core.models.base import (
    MapSpec,
    MILOutput,
    ModelConfig,
    check_dropout,
    check_positive_ints,
    prepare_bag,
    register_model,
)
from wsimil_core.nn.kan import HEADS, ClasswiseHead

MASK_MODES = ("per_class", "shared")


@dataclass
class AHDMILConfig(ModelConfig):
    """AHDMIL hyper-parameters.

    Attributes:
        in_dim: patch feature dimension D.
        n_classes: number of classes C.
        dim: DMIN embedding size (512 in the paper).
        attn_dim: size of the gated attention projections V and U.
        dropout: dropout after the embedding and in the attention branch.
        head: per-class classifier, ``cka`` (Chebyshev KAN, the paper) or ``linear``.
        cka_degree: highest Chebyshev degree K of the CKA head (12 in the authors' code; 16 also used).
        cka_layernorm: a LayerNorm before the CKA head's tanh (not in the paper; steadies large pooled features).
        mask_mode: ``per_class`` (the authors' DMIN: one Gumbel-sigmoid mask per class on its attention logits)
            or ``shared`` (one extra relevance logit, one mask for every class).
        instance_classifiers: CLAM-style instance classifiers (one 2-way linear layer per class) for the
            method's instance loss.
        tau: temperature of the Gumbel-sigmoid relevance mask (0.7).
        mask_threshold: a patch is kept when ``sigmoid(r / tau) > mask_threshold`` (0.5).
        use_mask: the prediction on features uses only the patches DMIN's mask keeps (False: the whole bag).
        prescreen_arch: DB-LIPN branches, ``timm:<name>`` (``timm:mobilenetv4_conv_small``, the authors'; built
            with pretrained=False) or ``tiny`` (two small CNNs, fast on CPU).
        prescreen_width: channel width of the ``tiny`` branches.
        prescreen_factor: low-resolution patches are read at ``patch_mpp * prescreen_factor`` (companion grid;
            16 turns 20x patches of 256 px into the paper's 1.25x patches of 16 px).
        prescreen_threshold: DB-LIPN keeps a patch when ``sigmoid(q) > prescreen_threshold``.
    """

    renamed: ClassVar[dict[str, str]] = {"hidden": "dim"}
    # checkpoints written before these fields existed have a shared mask, a LayerNorm before the CKA head and no
    # instance classifiers: their configs keep that meaning when loaded
    checkpoint_defaults: ClassVar[dict[str, Any]] = {
        "mask_mode": "shared",
        "cka_layernorm": True,
        "instance_classifiers": False,
    }

    in_dim: int = 1024
    n_classes: int = 2
    dim: int = 512
    attn_dim: int = 128
    dropout: float = 0.25
    head: str = "cka"
    cka_degree: int = 12
    cka_layernorm: bool = False
    mask_mode: str = "per_class"
    instance_classifiers: bool = True
    tau: float = 0.7
    mask_threshold: float = 0.5
    use_mask: bool = True
    prescreen_arch: str = "timm:mobilenetv4_conv_small"
    prescreen_width: int = 16
    prescreen_factor: float = 16.0
    prescreen_threshold: float = 0.5

    def __post_init__(self) -> None:
        check_positive_ints(self, ("in_dim", "n_classes", "dim", "attn_dim", "cka_degree", "prescreen_width"))
        if self.n_classes < 2:
            raise ValueError(f"n_classes must be at least 2, got {self.n_classes}")
        check_dropout(self.dropout)
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {', '.join(HEADS)}, got {self.head!r}")
        if not isinstance(self.tau, (int, float)) or not math.isfinite(self.tau) or self.tau <= 0:
            raise ValueError(f"tau must be a positive number, got {self.tau!r}")
        for name in ("mask_threshold", "prescreen_threshold"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not 0.0 < float(v) < 1.0:
                raise ValueError(f"{name} must be in (0, 1), got {v!r}")
        for name in ("use_mask", "cka_layernorm", "instance_classifiers"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.mask_mode not in MASK_MODES:
            raise ValueError(f"mask_mode must be one of {', '.join(MASK_MODES)}, got {self.mask_mode!r}")
        if not isinstance(self.prescreen_arch, str) or not (
            self.prescreen_arch == "tiny" or self.prescreen_arch.startswith("timm:")
        ):
            raise ValueError(f"prescreen_arch must be 'tiny' or 'timm:<name>', got {self.prescreen_arch!r}")
        f = self.prescreen_factor
        if not isinstance(f, (int, float)) or not math.isfinite(f) or f < 1:
            raise ValueError(f"prescreen_factor must be a number >= 1, got {f!r}")


class DMIN(nn.Module):
    """Dynamic multi-instance network (see the module docstring for the equations).

    ``forward(x [B, N, D], keep=None, sample=None)``; ``keep`` ``[B, N]`` bool restricts the bag (pre-screening).
    Returns a dict (``M`` = C mask columns per class, or 1 for ``mask_mode: shared``): ``logits_full`` /
    ``logits_selected`` ``[B, C]``, ``features_full`` / ``features_selected`` ``[B, C, H]``, ``attention_full`` /
    ``attention_selected`` ``[B, N, C]``, ``attention_logits`` ``[B, N, C]``, ``embeddings`` ``[B, N, H]``,
    ``mask_logits`` ``[B, N, M]``, ``class_mask`` ``[B, N, M]`` (0/1, straight-through; sampled while training;
    restricted to ``keep``), ``class_mask_deterministic`` ``[B, N, M]`` (the noise-free mask inference uses, also
    straight-through; before the ``keep`` restriction), ``mask_soft`` ``[B, N, M]``, and per patch (kept by any
    class): ``relevance_logits`` ``[B, N]`` (max over M of ``mask_logits``), ``mask`` and ``mask_deterministic``
    ``[B, N]`` (max over M).
    """

    def __init__(self, config: AHDMILConfig):
        super().__init__()
        c = config
        self.config = c
        self.per_class = c.mask_mode == "per_class"
        self.embed = nn.Sequential(nn.Linear(c.in_dim, c.dim), nn.ReLU())
        self.dropout = nn.Dropout(c.dropout)
        self.V = nn.Linear(c.dim, c.attn_dim)
        self.U = nn.Linear(c.dim, c.attn_dim)
        self.attn_dropout = nn.Dropout(c.dropout)
        # C class attention branches (+ 1 shared relevance logit in shared mode)
        self.w = nn.Linear(c.attn_dim, c.n_classes + (0 if self.per_class else 1))
        self.head = ClasswiseHead(c.dim, c.n_classes, c.head, c.cka_degree, layernorm=c.cka_layernorm)
        self.instance_classifiers = (
            nn.ModuleList([nn.Linear(c.dim, 2) for _ in range(c.n_classes)]) if c.instance_classifiers else None
        )
        with torch.no_grad():  # start with every patch kept (mask logits > 0) so distillation starts from the full bag
            if self.per_class:
                self.w.bias.fill_(2.0)  # a common shift: the class softmaxes are unchanged
            else:
                self.w.bias[-1].fill_(2.0)

    def forward(self, x: Tensor, keep: Tensor | None = None, sample: bool | None = None) -> dict[str, Tensor]:
        c = self.config
        sample = self.training if sample is None else sample
        h0 = self.embed(x)  # [B, N, H]
        h = self.dropout(h0)
        g = self.attn_dropout(torch.tanh(self.V(h)) * torch.sigmoid(self.U(h)))
        scores = self.w(g)[..., : c.n_classes]  # [B, N, C]
        # The mask logits skip dropout, so the mask (and its kept fraction) is the same in training and at
        # inference; dropout would otherwise shift them and the rate term would be met only in training mode.
        if self.training and c.dropout > 0:
            g0 = torch.tanh(self.V(h0)) * torch.sigmoid(self.U(h0))
        else:
            g0 = g
        rows = slice(0, c.n_classes) if self.per_class else slice(c.n_classes, c.n_classes + 1)
        r = nn.functional.linear(g0, self.w.weight[rows], self.w.bias[rows])  # [B, N, M]
        allowed = None if keep is None else keep.to(device=x.device, dtype=torch.bool).reshape(r.shape[:2])
        full_w = torch.ones_like(r[..., 0]) if allowed is None else allowed.to(r.dtype)
        mask, soft = gumbel_sigmoid_mask(r, c.tau, c.mask_threshold, sample)
        mask_det, _ = gumbel_sigmoid_mask(r, c.tau, c.mask_threshold, False) if sample else (mask, soft)
        if allowed is not None:
            mask = mask * full_w.unsqueeze(-1)
        mask = ensure_one(mask, r, allowed)
        a_full = masked_attention(scores, full_w)
        a_sel = masked_attention(scores, mask)
        z_full = torch.einsum("bnc,bnh->bch", a_full, h)
        z_sel = torch.einsum("bnc,bnh->bch", a_sel, h)
        return {
            "logits_full": self.head(z_full),
            "logits_selected": self.head(z_sel),
            "features_full": z_full,
            "features_selected": z_sel,
            "attention_full": a_full,
            "attention_selected": a_sel,
            "attention_logits": scores,
            "embeddings": h,
            "mask_logits": r,
            "class_mask": mask,
            "class_mask_deterministic": mask_det,
            "mask_soft": soft,
            "relevance_logits": r.amax(dim=-1),
            "mask": mask.amax(dim=-1),
            "mask_deterministic": mask_det.amax(dim=-1),
        }


@register_model("ahdmil", AHDMILConfig)
class AHDMIL(nn.Module):
    """DMIN + DB-LIPN in one module (one checkpoint). ``model(x [N, D] or [B, N, D], coords=None, keep=None)``.

    Returns ``MILOutput`` with
        logits ``[B, C]``: from the patches DMIN's mask keeps (``use_mask``), else from the whole bag;
        maps (one bag): ``attention`` ``[N]`` (attention of the predicted class), ``attention/class<c>`` ``[N]``
        (NaN where that class's mask or ``keep`` prunes), ``relevance`` ``[N]`` (``sigmoid(r / tau)``, ``r`` the
        largest mask logit of the patch), ``dmin/keep``
        ``[N]`` (0/1);
        extras: everything :class:`DMIN` returns (``logits_full``, ``features_selected``, ``mask``...) and
        ``embedding`` ``[B, C * H]``.
    """

    def __init__(self, config: AHDMILConfig):
        super().__init__()
        self.config = config
        self.dmin = DMIN(config)
        self.prescreen = DBLIPN(config.prescreen_arch, config.prescreen_width)

    def map_specs(self) -> list[MapSpec]:
        """Every map of one bag, each ``[N]``: the model's own, then ``prescreen/score`` and ``prescreen/keep``,
        which only the slide predictor (:func:`wsimil_core.methods.ahdmil.predictor.predict_slide`) adds."""
        where = "NaN where pruned"
        specs = [
            MapSpec(
                "attention",
                "scalar",
                f"DMIN attention of the predicted class (sums to 1 over kept patches; {where})",
                primary=True,
            )
        ]
        specs += [
            MapSpec(f"attention/class{c}", "scalar", f"DMIN attention branch of class {c} (sums to 1; {where})")
            for c in range(self.config.n_classes)
        ]
        specs += [
            MapSpec(
                "relevance",
                "probability",
                f"DMIN relevance sigmoid(r / tau) (r: the patch's largest mask logit); a class's mask keeps patches above "
                f"{self.config.mask_threshold}",
            ),
            MapSpec("dmin/keep", "binary", "whether DMIN's mask keeps the patch (for any class)", ("pruned", "kept")),
            MapSpec("prescreen/score", "probability", "DB-LIPN pre-screening probability sigmoid(q) (slide predictor)"),
            MapSpec(
                "prescreen/keep",
                "binary",
                "whether DB-LIPN keeps the patch for high-resolution encoding (slide predictor)",
                ("pruned", "kept"),
            ),
        ]
        return specs

    def forward(self, x: Tensor, coords: Tensor | None = None, keep: Tensor | None = None, **extras) -> MILOutput:
        single = x.dim() == 2
        x = prepare_bag(x, self.config.in_dim, "ahdmil")
        out = self.dmin(x, keep=keep)
        use_mask = self.config.use_mask
        logits = out["logits_selected"] if use_mask else out["logits_full"]
        attn = out["attention_selected"] if use_mask else out["attention_full"]
        cm = out["class_mask"].detach()  # [B, N, M]: the class's own mask (M = C) or the shared one (M = 1)
        on = (cm > 0) if use_mask else torch.ones_like(cm, dtype=torch.bool)
        if keep is not None:
            on = on & keep.to(device=on.device, dtype=torch.bool).reshape(on.shape[:2]).unsqueeze(-1)
        maps: dict[str, Tensor] = {}
        if single or x.shape[0] == 1:
            a = attn[0].detach().float()  # [N, C]
            a = a.masked_fill(~on[0].expand_as(a), float("nan"))
            pred = int(logits[0].detach().argmax())
            maps["attention"] = a[:, pred]
            for k in range(a.shape[1]):
                maps[f"attention/class{k}"] = a[:, k]
            maps["relevance"] = torch.sigmoid(out["relevance_logits"][0].detach().float() / self.config.tau)
            maps["dmin/keep"] = (out["mask"][0].detach() > 0).float()
        extras_out = dict(out)
        extras_out["embedding"] = out["features_selected" if use_mask else "features_full"].flatten(1)
        return MILOutput(logits=logits, maps=maps, extras=extras_out)


__all__ = ["AHDMIL", "AHDMILConfig", "DMIN", "MASK_MODES", "gumbel_sigmoid_mask", "masked_attention", "ensure_one"]
