"""A checkpoint loaded for slide inference: model, typed meta, its method's predictor and (lazily) its encoder."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wsimil_core.checkpoint_meta import CheckpointMeta
from wsimil_core.devices import resolve_device
from wsimil_core.engine.checkpoint import checkpoint_id, load_checkpoint
from wsimil_core.features.encoders import EncoderSpec
from wsimil_core.inference.encoder import encoder_from_meta
from wsimil_core.methods.base import predictor_for
from wsimil_core.methods.predictor import Predictor
from wsimil_core.models.base import map_specs_of, model_config_dict


class LoadedCheckpoint:
    """A checkpoint ready to predict slides: model, typed meta, its method's predictor and (lazily, once) its
    encoder.

    Args:
        checkpoint: a ``.safetensors`` path, or a ``(model, meta)`` pair (``meta`` a ``CheckpointMeta`` or dict).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``...
        encoder: an already built ``(module, EncoderSpec)`` (default: rebuilt from the meta when first needed).
        encoder_weights: the encoder's weights file when it is not at the recorded path.
        predictor_options: method-specific options for ``Method.predictor`` (e.g. AHDMIL ``prescreen=False``).
    """

    def __init__(
        self,
        checkpoint: Any,
        device: str | torch.device = "auto",
        encoder: tuple[nn.Module, EncoderSpec] | None = None,
        encoder_weights: str | os.PathLike | None = None,
        **predictor_options: Any,
    ):
        self.device = resolve_device(device)
        if isinstance(checkpoint, (str, os.PathLike)):
            model, meta = load_checkpoint(Path(checkpoint), device=self.device)
            self.source = str(checkpoint)
        elif isinstance(checkpoint, tuple) and len(checkpoint) == 2:
            model, meta = checkpoint
            if not isinstance(meta, CheckpointMeta):
                given = {"model_name": getattr(model, "model_name", None), **dict(meta)}
                given.setdefault("model_config", model_config_dict(model))
                meta = CheckpointMeta.parse(given, where="<in-memory model>")
            if meta.checkpoint_id is None:
                meta = meta.model_copy(update={"checkpoint_id": checkpoint_id(model.state_dict(), meta)})
            model.to(self.device).eval()
            model.checkpoint_meta = meta
            self.source = "<in-memory model>"
        else:
            raise TypeError("checkpoint must be a path or a (model, meta) pair")
        self.model: nn.Module = model
        self.meta: CheckpointMeta = meta
        #: ``MapSpec.to_dict()`` of every map: the checkpoint's, else (older checkpoints) the model's declaration
        self.map_specs: list[dict[str, Any]] = list(meta.map_specs) or [s.to_dict() for s in map_specs_of(model)]
        self.predictor: Predictor = predictor_for(model, meta, **predictor_options)
        self._encoder = encoder
        self._encoder_weights = encoder_weights

    @property
    def checkpoint_id(self) -> str:
        return str(self.meta.checkpoint_id)

    def encoder(self) -> tuple[nn.Module, EncoderSpec]:
        """The checkpoint's encoder, built on first use and then shared by every slide."""
        if self._encoder is None:
            self._encoder = encoder_from_meta(self.meta, self._encoder_weights, self.device, self.source)
        return self._encoder


__all__ = ["LoadedCheckpoint"]
