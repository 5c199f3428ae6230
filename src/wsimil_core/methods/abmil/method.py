"""ABMIL training recipe (Ilse et al. 2018): cross-entropy on the bag logits, one phase, no extra models.

Everything it needs is the base ``Method`` (``training_step`` = CE on ``model(bag).logits``); this class only
names the method and its model so ``create_method("abmil", model={"in_dim": 1024, "n_classes": 2})`` works.
"""

from __future__ import annotations

import wsimil_core.methods.abmil.model  # noqa: F401  (registers the "abmil" model)
from wsimil_core.methods.base import Method, MethodOptions, register_method


class ABMILOptions(MethodOptions):
    """ABMIL has no method options: every hyper-parameter lives in the model config (``ABMILConfig``)."""


@register_method
class ABMILMethod(Method):
    """Attention-based deep MIL trained with cross-entropy (the reference baseline)."""

    name = "abmil"
    model_name = "abmil"
    options_cls = ABMILOptions


__all__ = ["ABMILMethod", "ABMILOptions"]
