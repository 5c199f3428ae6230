"""The checkpoint's patch encoder, rebuilt from its metadata: the one function every inference path uses."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import nn

from wsimil_core.checkpoint_meta import CheckpointMeta
from wsimil_core.errors import CheckpointError
from wsimil_core.features.encoders import RANDOM_INIT, EncoderSpec, RandomWeightsWarning, create_encoder


def encoder_from_meta(
    meta: CheckpointMeta,
    weights: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    source: str = "checkpoint",
) -> tuple[nn.Module, EncoderSpec]:
    """Rebuild the encoder the checkpoint's features came from (``meta.encoder``) and check it is the same one.

    Args:
        meta: the checkpoint's metadata.
        weights: the encoder's weights file (default: the path recorded in the checkpoint, when it exists).
            A checkpoint trained on random-init features rebuilds the same deterministic random encoder (its
            ``RandomWeightsWarning`` is silenced: the checkpoint was trained on exactly these features).
        device: where the encoder runs.
        source: the checkpoint's name in error messages.

    Returns:
        ``(module in eval mode on device, EncoderSpec)``.

    Raises:
        CheckpointError: no encoder recorded, pretrained weights not given, or weights / id / dimension that differ
            from the checkpoint's.
    """
    enc = meta.encoder
    name = enc.name if enc is not None else None
    if enc is None or not name:
        raise CheckpointError(
            f"{source}: the checkpoint names no encoder, so slide pixels cannot be encoded; "
            "give a store that holds this slide's features"
        )
    want_hash = enc.weights_sha256 or RANDOM_INIT
    if weights is None and want_hash != RANDOM_INIT and enc.weights_path and Path(enc.weights_path).is_file():
        weights = enc.weights_path
    if want_hash == RANDOM_INIT:
        weights = None
    elif weights is None:
        raise CheckpointError(
            f"{source}: the checkpoint's encoder {name!r} used pretrained weights (sha256 {want_hash[:12]}..., "
            f"recorded at {enc.weights_path or 'no path'}); give that weights file (--encoder-weights, or "
            "Encoder weights in napari) or a store that holds this slide's features"
        )
    try:
        with warnings.catch_warnings():
            if want_hash == RANDOM_INIT:
                warnings.simplefilter("ignore", RandomWeightsWarning)
            module, spec = create_encoder(name, weights=None if weights is None else Path(weights), device=device)
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - an unknown encoder name is the checkpoint's problem
        raise CheckpointError(f"{source}: cannot build the checkpoint's encoder {name!r}: {exc}") from None
    if spec.weights_sha256 != want_hash:
        raise CheckpointError(
            f"{weights}: these weights (sha256 {spec.weights_sha256[:12]}...) are not the ones the checkpoint "
            f"{source} was trained with ({want_hash[:12]}...)"
        )
    if enc.encoder_id and spec.encoder_id != enc.encoder_id:
        raise CheckpointError(
            f"{source}: the encoder built for the checkpoint has id {spec.encoder_id!r}, but the checkpoint was "
            f"trained on {enc.encoder_id!r}"
        )
    if enc.dim is not None and int(enc.dim) != int(spec.dim):
        raise CheckpointError(f"{source}: encoder {name!r} gives {spec.dim} dims, the checkpoint expects {enc.dim}")
    return module, spec


__all__ = ["encoder_from_meta"]
