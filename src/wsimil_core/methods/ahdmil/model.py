"""AHDMIL (2025): DMIN with a learned hard relevance mask + CKA classifiers, and the DB-LIPN pre-screener.

"AHDMIL: Asymmetric Hierarchical Distillation Multi-Instance Learning for Fast and Accurate Whole-Slide Image
Classification". The registered model ``ahdmil`` is the whole inference pipeline in one module so that a
checkpoint alone runs fast slide inference:

* ``model.dmin`` -- DMIN, the dynamic multi-instance network on high-resolution patch features ``[N, D]``:

  - embedding       ``h_k = Dropout(ReLU(W_e x_k + b_e))``                    (Linear D -> 512)
  - gated attention ``g_k = tanh(V h_k) * sigmoid(U h_k)``; one attention branch per class
                    ``s_{k,c} = w_c^T g_k`` and one relevance logit ``r_k = w_r^T g_k`` from the same branch
                    (``r_k`` is computed without dropout, so the mask is the same in training and inference)
  - relevance mask  ``m_k = 1[sigmoid((r_k + l_k) / tau) > 0.5]`` with logistic noise ``l_k = log u - log(1-u)``
                    (Gumbel-sigmoid, tau = 0.7) while training, ``l_k = 0`` at inference; the gradient flows
                    through ``sigmoid((r_k + l_k) / tau)`` (straight-through estimator)
  - pooling         ``a_{k,c} = m_k exp(s_{k,c}) / sum_j m_j exp(s_{j,c})``, ``z_c = sum_k a_{k,c} h_k``
                    (class-wise pooled features; the full-bag variant uses ``m = 1``)
  - classifier      ``logit_c = CKA_c(z_c)`` (Chebyshev KAN per class, degree 12) or a linear map
                    (``head: linear``), see :mod:`wsimil_core.nn.kan`.

* ``model.prescreen`` -- DB-LIPN (:class:`wsimil_core.methods.ahdmil.prescreen.DBLIPN`) on low-resolution patches.

Called on features (``model(x [N, D])``, what the engine does) the model runs DMIN: the prediction uses the
patches DMIN's mask selects (``use_mask``). Slide inference (DB-LIPN, then only the kept patches are read at high
resolution and encoded) is :class:`wsimil_core.methods.ahdmil.predictor.AHDMILPredictor`, run by the inference
pipeline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

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
        cka_degree: highest Chebyshev degree K of the CKA head (12 in the paper).
        tau: temperature of the Gumbel-sigmoid relevance mask (0.7).
        mask_threshold: a patch is kept when ``sigmoid(r / tau) > mask_threshold`` (0.5).
        use_mask: the prediction on features uses only the patches DMIN's mask keeps (False: the whole bag).
        prescreen_arch: DB-LIPN branches, ``tiny`` or ``timm:<name>`` (e.g. ``timm:mobilenetv4_conv_small``).
        prescreen_width: channel width of the ``tiny`` branches.
        prescreen_factor: low-resolution patches are read at ``patch_mpp * prescreen_factor`` (companion grid;
            4 turns 20x patches of 256 px into 5x patches of 64 px).
        prescreen_threshold: DB-LIPN keeps a patch when ``sigmoid(q) > prescreen_threshold``.
    """

    renamed: ClassVar[dict[str, str]] = {"hidden": "dim"}

    in_dim: int = 1024
    n_classes: int = 2
    dim: int = 512
    attn_dim: int = 128
    dropout: float = 0.25
    head: str = "cka"
    cka_degree: int = 12
    tau: float = 0.7
    mask_threshold: float = 0.5
    use_mask: bool = True
    prescreen_arch: str = "tiny"
    prescreen_width: int = 16
    prescreen_factor: float = 4.0
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
        if not isinstance(self.use_mask, bool):
            raise ValueError(f"use_mask must be true or false, got {self.use_mask!r}")
        if not isinstance(self.prescreen_arch, str) or not (
            self.prescreen_arch == "tiny" or self.prescreen_arch.startswith("timm:")
        ):
            raise ValueError(f"prescreen_arch must be 'tiny' or 'timm:<name>', got {self.prescreen_arch!r}")
        f = self.prescreen_factor
        if not isinstance(f, (int, float)) or not math.isfinite(f) or f < 1:
            raise ValueError(f"prescreen_factor must be a number >= 1, got {f!r}")


def gumbel_sigmoid_mask(logits: Tensor, tau: float, threshold: float, sample: bool) -> tuple[Tensor, Tensor]:
    """Hard 0/1 mask with straight-through gradients.

    ``soft = sigmoid((logits + l) / tau)`` with logistic noise ``l = log u - log(1 - u)`` (the difference of two
    Gumbel variables) when ``sample``, else ``l = 0``; ``hard = 1[soft > threshold]``.

    Returns:
        ``(mask, soft)``: ``mask = hard - soft.detach() + soft`` (value = hard, gradient = d soft), same shape as
        ``logits``.
    """
    if sample:
        u = torch.rand_like(logits).clamp_(1e-6, 1.0 - 1e-6)
        logits = logits + (torch.log(u) - torch.log1p(-u))
    soft = torch.sigmoid(logits / tau)
    hard = (soft > threshold).to(soft.dtype)
    return hard - soft.detach() + soft, soft


def masked_attention(scores: Tensor, weights: Tensor) -> Tensor:
    """Softmax over patches weighted by a (straight-through) mask: ``a_kc = w_k e^{s_kc} / sum_j w_j e^{s_jc}``.

    Args:
        scores: ``[B, N, C]`` attention logits.
        weights: ``[B, N]`` mask values in [0, 1] (at least one non-zero per bag).

    Returns:
        ``[B, N, C]`` attention; zero where ``weights`` is zero. Differentiable in ``scores`` and ``weights``.
    """
    on = weights.detach() > 0
    ref = scores.detach().masked_fill(~on.unsqueeze(-1), float("-inf")).amax(dim=1, keepdim=True)
    ref = torch.nan_to_num(ref, neginf=0.0)
    e = torch.exp((scores - ref).clamp(max=30.0)) * weights.unsqueeze(-1)
    return e / e.sum(dim=1, keepdim=True).clamp_min(1e-12)


def ensure_one(mask: Tensor, logits: Tensor, allowed: Tensor | None = None) -> Tensor:
    """Keep at least one patch per bag: where ``mask`` ``[B, N]`` is all zero, switch on the top ``logits`` patch."""
    empty = mask.detach().sum(dim=1) <= 0
    if not bool(empty.any()):
        return mask
    ranked = logits.detach()
    if allowed is not None:
        ranked = ranked.masked_fill(~allowed, float("-inf"))
    top = nn.functional.one_hot(ranked.argmax(dim=1), mask.shape[1]).to(mask.dtype)
    return mask + top * empty.unsqueeze(1).to(mask.dtype)


class DMIN(nn.Module):
    """Dynamic multi-instance network (see the module docstring for the equations).

    ``forward(x [B, N, D], keep=None, sample=None)``; ``keep`` ``[B, N]`` bool restricts the bag (pre-screening).
    Returns a dict: ``logits_full`` / ``logits_selected`` ``[B, C]``, ``features_full`` / ``features_selected``
    ``[B, C, H]``, ``attention_full`` / ``attention_selected`` ``[B, N, C]``, ``attention_logits`` ``[B, N, C]``,
    ``relevance_logits`` ``[B, N]``, ``mask`` ``[B, N]`` (0/1, straight-through; sampled while training),
    ``mask_soft`` ``[B, N]``, ``mask_deterministic`` ``[B, N]`` (the noise-free mask used at inference, also
    straight-through; before the ``keep`` restriction).
    """

    def __init__(self, config: AHDMILConfig):
        super().__init__()
        c = config
        self.config = c
        self.embed = nn.Sequential(nn.Linear(c.in_dim, c.dim), nn.ReLU())
        self.dropout = nn.Dropout(c.dropout)
        self.V = nn.Linear(c.dim, c.attn_dim)
        self.U = nn.Linear(c.dim, c.attn_dim)
        self.attn_dropout = nn.Dropout(c.dropout)
        self.w = nn.Linear(c.attn_dim, c.n_classes + 1)  # C class attention branches + 1 relevance logit
        self.head = ClasswiseHead(c.dim, c.n_classes, c.head, c.cka_degree)
        with torch.no_grad():  # start with every patch kept (r > 0) so distillation starts from the full bag
            self.w.bias[-1].fill_(2.0)

    def forward(self, x: Tensor, keep: Tensor | None = None, sample: bool | None = None) -> dict[str, Tensor]:
        c = self.config
        sample = self.training if sample is None else sample
        h0 = self.embed(x)  # [B, N, H]
        h = self.dropout(h0)
        g = self.attn_dropout(torch.tanh(self.V(h)) * torch.sigmoid(self.U(h)))
        scores = self.w(g)[..., : c.n_classes]  # [B, N, C]
        # The relevance logit skips dropout, so the mask (and its kept fraction) is the same in training and at
        # inference; dropout would otherwise shift r and the rate term would be met only in training mode.
        if self.training and c.dropout > 0:
            g0 = torch.tanh(self.V(h0)) * torch.sigmoid(self.U(h0))
        else:
            g0 = g
        r = nn.functional.linear(g0, self.w.weight[c.n_classes :], self.w.bias[c.n_classes :])[..., 0]  # [B, N]
        allowed = None if keep is None else keep.to(device=x.device, dtype=torch.bool).reshape(r.shape)
        full_w = torch.ones_like(r) if allowed is None else allowed.to(r.dtype)
        mask, soft = gumbel_sigmoid_mask(r, c.tau, c.mask_threshold, sample)
        mask_det, _ = gumbel_sigmoid_mask(r, c.tau, c.mask_threshold, False) if sample else (mask, soft)
        if allowed is not None:
            mask = mask * full_w
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
            "relevance_logits": r,
            "mask": mask,
            "mask_soft": soft,
            "mask_deterministic": mask_det,
        }


@register_model("ahdmil", AHDMILConfig)
class AHDMIL(nn.Module):
    """DMIN + DB-LIPN in one module (one checkpoint). ``model(x [N, D] or [B, N, D], coords=None, keep=None)``.

    Returns ``MILOutput`` with
        logits ``[B, C]``: from the patches DMIN's mask keeps (``use_mask``), else from the whole bag;
        maps (one bag): ``attention`` ``[N]`` (attention of the predicted class), ``attention/class<c>`` ``[N]``
        (NaN where pruned by the mask or by ``keep``), ``relevance`` ``[N]`` (``sigmoid(r / tau)``), ``dmin/keep``
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
                f"DMIN relevance sigmoid(r / tau); the mask keeps patches above {self.config.mask_threshold}",
            ),
            MapSpec("dmin/keep", "binary", "whether DMIN's relevance mask keeps the patch", ("pruned", "kept")),
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
        on = (out["mask"].detach() > 0) if use_mask else torch.ones_like(out["mask"], dtype=torch.bool)
        if keep is not None:
            on = on & keep.to(device=on.device, dtype=torch.bool).reshape(on.shape)
        maps: dict[str, Tensor] = {}
        if single or x.shape[0] == 1:
            a = attn[0].detach().float()  # [N, C]
            a = a.masked_fill(~on[0].unsqueeze(-1), float("nan"))
            pred = int(logits[0].detach().argmax())
            maps["attention"] = a[:, pred]
            for k in range(a.shape[1]):
                maps[f"attention/class{k}"] = a[:, k]
            maps["relevance"] = torch.sigmoid(out["relevance_logits"][0].detach().float() / self.config.tau)
            maps["dmin/keep"] = (out["mask"][0].detach() > 0).float()
        extras_out = dict(out)
        extras_out["embedding"] = out["features_selected" if use_mask else "features_full"].flatten(1)
        return MILOutput(logits=logits, maps=maps, extras=extras_out)


__all__ = ["AHDMIL", "AHDMILConfig", "DMIN", "gumbel_sigmoid_mask", "masked_attention", "ensure_one"]
