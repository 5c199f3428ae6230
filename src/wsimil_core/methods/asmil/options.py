"""Options of the ASMIL anchor plug-in (``AnchorMixin``) and of its attention-stability monitor.

Paper: "ASMIL: Attention-Stabilized Multiple Instance Learning for Whole Slide Imaging" (Eq. 4, 5, 7, 9; the
ablations of Table 3, Table 11 and App. K). Defaults are the paper's; docs/methods/asmil.md lists each choice.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from wsimil_core.methods.base import MethodOptions


class AnchorOptions(MethodOptions):
    """Options of the anchor plug-in and the attention-stability monitor."""

    anchor: bool = Field(True, description="Train with the EMA anchor + NSF stabilisation loss (false = baseline).")
    anchor_weight: float = Field(1.0, ge=0.0, description="lambda: weight of KL(a_anchor || a_online) (Eq. 9).")
    anchor_kl_reduction: Literal["mean", "sum"] = Field(
        "mean",
        description="KL over the patches: mean = KL / N (the authors' code; the paper's lambda means this), "
        "sum = the textbook sum (N times stronger on N-patch bags; wsimil 0.x).",
    )
    anchor_momentum: float = Field(
        0.999, ge=0.0, le=1.0, description="EMA momentum m of the anchor (Eq. 4; App. K.3 sweeps it)."
    )
    anchor_update: Literal["step", "epoch"] = Field(
        "step",
        description="EMA update after every optimiser step (paper default, 'batch' in Table 11) or once per epoch "
        "(the ablation of App. K.3.1, Table 11).",
    )
    anchor_norm: Literal["nsf", "softmax"] = Field(
        "nsf",
        description="Anchor attention: NSF (Eq. 5, the paper) or softmax (the 'NSF x' ablation of Table 3).",
    )
    anchor_temperature: float = Field(
        1.0,
        gt=0.0,
        description="Temperature dividing the anchor logits before NSF (the paper has none: 1; wsimil 0.x used 0.5).",
    )
    monitor_slides: int = Field(
        8, ge=0, description="Training slides whose attention JSD between consecutive epochs is logged (0 = off)."
    )
    monitor_max_patches: int = Field(
        4096, ge=1, description="Patches kept per monitor slide (a fixed random subset of larger bags)."
    )


__all__ = ["AnchorOptions"]
