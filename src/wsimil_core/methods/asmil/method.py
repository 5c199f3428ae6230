"""ASMIL training recipe: cross-entropy + EMA-anchor NSF attention stabilisation (paper Eq. 4, 5, 7, 9).

    L = CE(logits, y) + lambda * KL(NSF(s_anchor / tau) || softmax(s_online))

over every FEAT token and head of the ``asmil`` model's attention logits ``[B, H, T, N]`` (KL / N by default,
``anchor_kl_reduction``). The anchor is an EMA copy of the model's whole attention branch, input projection
included (``model.attention_branch()``: ``reduce`` + ``scores``), run on the detached input features; it is updated
after every optimiser step (or once per epoch) and discarded at inference (checkpoints hold ``method.model`` only). The attention-stability monitor logs
``attention_jsd`` per epoch. See ``wsimil_core.methods.asmil.anchor`` for the plug-in and docs/methods/asmil.md.
"""

from __future__ import annotations

from torch import nn

from wsimil_core.methods.asmil.anchor import AnchorMixin, AnchorOptions
from wsimil_core.methods.asmil.model import ASMIL  # importing it registers the "asmil" model
from wsimil_core.methods.base import Method, register_method


class ASMILOptions(AnchorOptions):
    """ASMIL options (the model's own hyper-parameters, e.g. ``n_tokens``, ``token_drop``, go under ``model``)."""


@register_method
class ASMILMethod(AnchorMixin, Method):
    """ASMIL: an ``asmil`` model trained with CE + lambda * KL(anchor NSF || online softmax) (Eq. 9; EMA anchor
    Eq. 4, NSF Eq. 5 and 7)."""

    name = "asmil"
    cli = "wsimil_core.methods.asmil.cli:app"
    model_name = "asmil"
    options_cls = ASMILOptions
    anchor_module = "reduce"  # the probe: the anchor branch reads the same input features x as the online one
    # AnchorMixin types these as AnchorOptions / nn.Module and Method as MethodOptions / nn.Module: the concrete
    # types here satisfy both bases.
    options: ASMILOptions
    model: ASMIL

    def anchor_scorer(self) -> nn.Module:
        """The online attention branch ``x -> logits`` (input projection + FEAT-token scores) the anchor copies."""
        model = self._inner_model[0]
        assert isinstance(model, ASMIL)
        return model.attention_branch()


__all__ = ["ASMILMethod", "ASMILOptions"]
