"""The ASMIL anchor as a plug-in: EMA anchor + NSF attention stabilisation for any attention MIL method.

Paper: "ASMIL: Attention-Stabilized Multiple Instance Learning for Whole Slide Imaging" (Eq. 4, 5, 7, 9;
Sec. 5.2 plugs the anchor into ABMIL-style models; App. H defines the instability metric).

Pieces:

- ``AttentionAnchor``: a frozen copy of a model's attention *scorer* (exact copy at init, no gradients, always in
  eval mode), updated by EMA after every optimiser step (Eq. 4)::

      theta_a <- m * theta_a + (1 - m) * theta_o

  ``capture(module)`` hooks any module during a forward pass, recording its inputs and output.
- ``AnchorMixin``: mixed in front of a ``Method`` subclass, it adds ``anchor_weight * KL(a_anchor || a_online)``
  (``functional.anchor_kl``: anchor NSF with temperature, stop-gradient) to whatever loss the base method's
  ``training_step`` returns, updates the anchor in ``after_optimizer_step`` and runs the attention-stability
  monitor (JSD of monitor slides' attention between consecutive epochs, ``attention_jsd`` in ``epoch_end``).
  With ``anchor: false`` only the monitor runs (the baseline to compare against).
- ``anchored_method(base_name, ...)``: builds and registers ``<base>-anchor`` methods (``abmil-anchor``,
  ``abmilx-anchor``) around other helpers' methods without editing them.

How the two attentions are obtained, for every model forward inside the base ``training_step``:

- online logits: ``MILOutput.extras["attention_logits"]`` (``[..., N]``, patches last; the model contract);
- anchor logits: the anchor scorer applied to the *detached inputs* of the probe submodule
  (``anchor_module``, the first module of the attention branch), reshaped to the online logits' shape.

The scorer is the probe module itself (ABMIL's ``attention``, ASMIL's ``scores``) unless the method overrides
``anchor_scorer()`` (ABMILX: attention MLP + A+ wrapped by ``wsimil_core.methods.abmilx.model.ABMILXScores``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import Tensor, nn

from wsimil_core.data.bag import BagBatch
from wsimil_core.errors import ConfigError, DataError
from wsimil_core.functional.attention import anchor_kl, attention_jsd, nsf
from wsimil_core.methods.abmil.method import ABMILMethod
from wsimil_core.methods.abmilx.method import ABMILXMethod
from wsimil_core.methods.abmilx.model import ABMILXScores
from wsimil_core.methods.asmil.options import AnchorOptions
from wsimil_core.methods.base import Method, method_class, register_method
from wsimil_core.models.base import MILOutput


@dataclass
class CapturedCall:
    """One forward call of a hooked module: its inputs and its output."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    output: Any


def _detach(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach()
    if isinstance(value, (tuple, list)):
        return type(value)(_detach(v) for v in value)
    if isinstance(value, dict):
        return {k: _detach(v) for k, v in value.items()}
    return value


def _logits_of(output: Any, where: str) -> Tensor:
    """The attention logits out of a module's output (a tensor, or the first element of a tuple)."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"{where}: the anchored attention module must return its attention logits as a Tensor")


class AttentionAnchor(nn.Module):
    """EMA anchor of an online attention scorer (ASMIL Eq. 4).

    Args:
        online: the online scorer (a module whose output is attention logits; its parameters are the model's).
        momentum: EMA momentum m in [0, 1]; ``theta_a <- m theta_a + (1 - m) theta_o`` per ``update()``.
    """

    def __init__(self, online: nn.Module, momentum: float = 0.999):
        super().__init__()
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"anchor momentum must be in [0, 1], got {momentum}")
        self.momentum = momentum
        self.anchor = copy.deepcopy(online)
        for p in self.anchor.parameters():
            p.requires_grad_(False)
        self.anchor.eval()
        self._online = [online]  # a list so the online module is not registered (and saved) twice

    @property
    def online(self) -> nn.Module:
        return self._online[0]

    def train(self, mode: bool = True) -> AttentionAnchor:
        super().train(mode)
        self.anchor.eval()  # the anchor never uses dropout: its attention is a stable target
        return self

    @torch.no_grad()
    def update(self) -> None:
        """One EMA step: ``theta_a <- m * theta_a + (1 - m) * theta_o`` (Eq. 4); buffers are copied."""
        m = self.momentum
        for pa, po in zip(self.anchor.parameters(), self.online.parameters(), strict=True):
            pa.mul_(m).add_(po.detach().to(pa.dtype), alpha=1.0 - m)
        for ba, bo in zip(self.anchor.buffers(), self.online.buffers(), strict=True):
            ba.copy_(bo)

    @staticmethod
    @contextmanager
    def capture(module: nn.Module) -> Iterator[list[CapturedCall]]:
        """Record every forward call of ``module`` (inputs and output) inside the ``with`` block."""
        calls: list[CapturedCall] = []

        def hook(mod: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            calls.append(CapturedCall(args=args, kwargs=kwargs, output=output))

        handle = module.register_forward_hook(hook, with_kwargs=True)
        try:
            yield calls
        finally:
            handle.remove()

    @torch.no_grad()
    def logits(self, call: CapturedCall) -> Tensor:
        """The anchor's attention logits for the same (detached) inputs as a captured probe call."""
        return _logits_of(self.anchor(*_detach(call.args), **_detach(call.kwargs)), "anchor")


def monitor_distribution(out: MILOutput) -> Tensor:
    """``[K, N]`` attention distribution(s) over patches from a model output, for the stability monitor.

    Uses ``maps["attention"]`` (``[N]`` or ``[N, K]``). Non-negative maps are renormalised; a map with negative
    values is taken as logits and softmaxed over patches.
    """
    if "attention" not in out.maps:
        raise DataError("attention monitor: the model returns no 'attention' map")
    a = out.maps["attention"].detach().float()
    a = a.unsqueeze(0) if a.dim() == 1 else a.transpose(0, 1)
    if (a < 0).any():
        return torch.softmax(a, dim=-1)
    return a / a.sum(dim=-1, keepdim=True).clamp_min(1e-12)


class AnchorMixin:
    """Mixed in front of a ``Method`` subclass: anchor + NSF stabilisation and the attention JSD monitor.

    Class attributes set by the concrete method:
        anchor_module: dotted path in ``self.model`` of the probe submodule whose inputs feed the anchor scorer
            (by default also the scorer that the anchor copies).
        anchor_logits_key: the ``MILOutput.extras`` entry with the online attention logits (patches last).
    """

    anchor_module: ClassVar[str] = ""
    anchor_logits_key: ClassVar[str] = "attention_logits"
    # provided by the Method subclass this is mixed into
    name: ClassVar[str]
    model_name: ClassVar[str]
    options: AnchorOptions
    model: nn.Module

    def __init__(self, model: dict[str, Any], options: Any = None):
        super().__init__(model, options)  # type: ignore[call-arg]
        opts = self.options
        self.anchor: AttentionAnchor | None = None
        self._inner_model: list[nn.Module] = [self.model]  # kept unwrapped (the engine may wrap it in DDP)
        if opts.anchor:
            self.anchor = AttentionAnchor(self.anchor_scorer(), opts.anchor_momentum)
        self._monitor: list[tuple[str, Tensor, Tensor | None]] = []
        self._monitor_prev: dict[str, Tensor] = {}
        self.jsd_history: list[float] = []

    def anchor_probe(self) -> nn.Module:
        """The submodule whose forward inputs the anchor scorer takes."""
        try:
            return self._inner_model[0].get_submodule(self.anchor_module)
        except AttributeError:
            raise ConfigError(
                f"method {self.name!r}: model {self.model_name!r} has no attention module {self.anchor_module!r} "
                "to anchor"
            ) from None

    def anchor_scorer(self) -> nn.Module:
        """The online scorer the anchor copies (default: the probe module itself)."""
        return self.anchor_probe()

    # --- training -----------------------------------------------------------------------------
    def anchor_loss(self, probe_calls: list[CapturedCall], model_calls: list[CapturedCall]) -> Tensor:
        """Mean over model forwards of ``KL(NSF(s_anchor / tau) || softmax(s_online))`` (Eq. 7, 9)."""
        if not model_calls or len(probe_calls) != len(model_calls):
            raise RuntimeError(
                f"method {self.name!r}: expected one call of the anchored module {self.anchor_module!r} per model "
                f"forward, got {len(probe_calls)} for {len(model_calls)}"
            )
        assert self.anchor is not None
        terms = []
        for probe, call in zip(probe_calls, model_calls):
            out = call.output
            online = out.extras.get(self.anchor_logits_key) if isinstance(out, MILOutput) else None
            if not isinstance(online, Tensor):
                raise RuntimeError(f"method {self.name!r}: the model output has no extras[{self.anchor_logits_key!r}]")
            anchor = self.anchor.logits(probe)
            if anchor.numel() != online.numel():
                raise RuntimeError(
                    f"method {self.name!r}: anchor logits {tuple(anchor.shape)} do not match the online logits "
                    f"{tuple(online.shape)}"
                )
            terms.append(
                anchor_kl(
                    anchor.reshape(online.shape),
                    online,
                    self.options.anchor_temperature,
                    reduction=self.options.anchor_kl_reduction,
                    anchor_norm=self.options.anchor_norm,
                    online_norm=self.online_norm(),
                )
            )
        return torch.stack(terms).mean()

    def online_norm(self) -> Literal["softmax", "nsf"]:
        """How the model normalises its online attention logits (``config.online_norm``; softmax by default)."""
        norm = getattr(getattr(self._inner_model[0], "config", None), "online_norm", "softmax")
        return "nsf" if norm == "nsf" else "softmax"

    @contextmanager
    def _capture_all(self) -> Iterator[tuple[list[CapturedCall], list[CapturedCall]]]:
        with AttentionAnchor.capture(self.anchor_probe()) as probe_calls:
            with AttentionAnchor.capture(self._inner_model[0]) as model_calls:
                yield probe_calls, model_calls

    def training_step(self, batch: BagBatch, phase: str) -> dict[str, Tensor]:
        """The base method's loss plus ``anchor_weight * KL(a_anchor || a_online)`` (Eq. 9)."""
        if self.anchor is None:
            return super().training_step(batch, phase)  # type: ignore[misc]
        with self._capture_all() as (probe_calls, model_calls):
            step = super().training_step(batch, phase)  # type: ignore[misc]
        kl = self.anchor_loss(probe_calls, model_calls)
        step = dict(step)
        step["loss"] = step["loss"] + self.options.anchor_weight * kl
        step["anchor_kl"] = kl.detach()
        return step

    def after_optimizer_step(self, phase: str) -> None:
        super().after_optimizer_step(phase)  # type: ignore[misc]
        if self.anchor is not None and self.options.anchor_update == "step":
            self.anchor.update()

    @torch.no_grad()
    def anchor_maps(self, features: Tensor, coords: Tensor | None = None) -> dict[str, Tensor]:
        """``{"anchor/attention": [N]}``: the anchor's attention (NSF, or softmax with ``anchor_norm: softmax``)
        averaged over its other axes (one bag ``[N, D]``)."""
        if self.anchor is None:
            return {}
        model = self._inner_model[0]
        was_training = model.training
        model.eval()
        try:
            with AttentionAnchor.capture(self.anchor_probe()) as calls:
                out = model(features, coords=coords)
        finally:
            model.train(was_training)
        online = out.extras[self.anchor_logits_key]
        s = self.anchor.logits(calls[-1]).float().reshape(online.shape) / self.options.anchor_temperature
        a = nsf(s, dim=-1) if self.options.anchor_norm == "nsf" else torch.softmax(s, dim=-1)
        return {"anchor/attention": a.reshape(-1, a.shape[-1]).mean(0)}

    # --- attention-stability monitor (App. H) -------------------------------------------------
    def setup_phase(self, phase: str, train_data: Any) -> None:
        super().setup_phase(phase, train_data)  # type: ignore[misc]
        if not self._monitor and self.options.monitor_slides > 0:
            self.pick_monitor_slides(train_data)

    def pick_monitor_slides(self, train_data: Any) -> None:
        """Cache a fixed set of evenly spaced training bags (features on CPU, fixed patch subset) and record
        their attention before training."""
        n_data = len(train_data)
        if n_data == 0:
            return
        n = min(self.options.monitor_slides, n_data)
        indices = sorted({int(i) for i in np.linspace(0, n_data - 1, n).round()})
        gen = torch.Generator().manual_seed(0)
        self._monitor = []
        for i in indices:
            bag: BagBatch = train_data[i]
            feats = bag.features.detach().cpu()
            coords = bag.coords.detach().cpu() if bag.coords is not None else None
            if feats.shape[0] > self.options.monitor_max_patches:
                keep = torch.randperm(feats.shape[0], generator=gen)[: self.options.monitor_max_patches].sort().values
                feats = feats[keep]
                coords = coords[keep] if coords is not None else None
            self._monitor.append((bag.slide_id or f"bag{i}", feats, coords))
        self._monitor_prev = {}
        self.monitor_attention_jsd()  # the attention before training: the first epoch compares with it

    @torch.no_grad()
    def monitor_attention_jsd(self) -> float | None:
        """Mean JSD of the monitor slides' attention between this call and the previous one (None at first)."""
        if not self._monitor:
            return None
        model = self._inner_model[0]
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        values = []
        try:
            for slide_id, feats, coords in self._monitor:
                out = model(feats.to(device), coords=None if coords is None else coords.to(device))
                att = monitor_distribution(out).cpu()
                prev = self._monitor_prev.get(slide_id)
                if prev is not None and prev.shape == att.shape:
                    values.append(float(attention_jsd(prev, att).mean()))
                self._monitor_prev[slide_id] = att
        finally:
            model.train(was_training)
        if not values:
            return None
        value = float(np.mean(values))
        self.jsd_history.append(value)
        return value

    def epoch_end(self, phase: str, epoch: int) -> dict[str, float]:
        """Adds ``attention_jsd`` (vs. the previous epoch, or vs. the attention at setup) to the base figures;
        with ``anchor_update: epoch`` the anchor takes its one EMA step of the epoch here."""
        logs = dict(super().epoch_end(phase, epoch))  # type: ignore[misc]
        if self.anchor is not None and self.options.anchor_update == "epoch":
            self.anchor.update()
        jsd = self.monitor_attention_jsd()
        if jsd is not None:
            logs["attention_jsd"] = jsd
        return logs


def anchored_method(
    base_name: str,
    anchor_module: str,
    scorer: Callable[[nn.Module], nn.Module] | None = None,
    name: str | None = None,
    base_cls: type[Method] | None = None,
) -> type[Method]:
    """Build and register ``<base_name>-anchor``: the base method plus the anchor plug-in.

    Args:
        base_name: a registered method whose model returns ``extras["attention_logits"]``.
        anchor_module: dotted path of the probe submodule in the model (its inputs feed the anchor scorer).
        scorer: builds the online scorer from the model (default: the probe module itself).

    The new options schema is the base method's options plus ``AnchorOptions``.
    """
    base = base_cls or method_class(base_name)
    options_cls = type(
        f"{base.__name__}AnchorOptions",
        (AnchorOptions, base.options_cls),
        {"__doc__": f"Options of {base_name!r} plus the ASMIL anchor plug-in.", "__module__": __name__},
    )
    attrs: dict[str, Any] = {
        "__doc__": f"{base_name!r} with the ASMIL EMA anchor + NSF attention stabilisation (paper Sec. 5.2).",
        "__module__": __name__,
        "name": name or f"{base_name}-anchor",
        "model_name": base.model_name,
        "options_cls": options_cls,
        "anchor_module": anchor_module,
    }
    if scorer is not None:

        def anchor_scorer(self: AnchorMixin) -> nn.Module:
            return scorer(self._inner_model[0])

        attrs["anchor_scorer"] = anchor_scorer
    return register_method(type(f"{base.__name__}Anchor", (AnchorMixin, base), attrs))


# abmil-anchor: the probe is ABMIL's AttentionPool, h [B, N, H] -> logits [B, N].
anchored_method("abmil", "attention", base_cls=ABMILMethod)
# abmilx-anchor: the probe is ABMILX's attention MLP; the scorer re-applies A+, h^j [B, m, N, dh] -> G(A) [B, m, N].
# Its probe and monitor run the model on cached features, so end-to-end training (e2e: true) is refused.
abmilx_anchor = anchored_method("abmilx", "attn_mlp", ABMILXScores, base_cls=ABMILXMethod)
abmilx_anchor.e2e_supported = False  # type: ignore[attr-defined]  # ABMILXMethod ClassVar

__all__ = [
    "AttentionAnchor",
    "AnchorMixin",
    "AnchorOptions",
    "CapturedCall",
    "anchored_method",
    "monitor_distribution",
]
