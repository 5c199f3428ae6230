"""ABMILX end-to-end: a ResNet cut after ``layer3`` (``wsimil_core.features.encoders``) feeding :class:`ABMILX`.

The whole module is one model so that a checkpoint alone (encoder weights included) runs inference on a new
slide. Inputs:

* images ``[N, 3, S, S]`` (normalised float): encoded in chunks of ``encoder_chunk`` (with activation
  checkpointing when ``checkpointing`` and gradients are on), then ABMILX;
* features ``[N, in_dim]`` already produced by this encoder: ABMILX only.

A slide's pixels are read and encoded in bounded memory by
:func:`wsimil_core.methods.abmilx.e2e.encode_slide_patches` (the ``abmilx`` method's ``eval_forward`` does this
for validation and test, from the bag's slide path and coords).

BatchNorm (``bn_mode``): the paper trains the whole encoder (Sec. 3.1, App. B.3) and the authors' runs use
synchronised BatchNorm across GPUs (``sync_bn: true``, several slides of 512 patches per step), so the default is
``sync``: every encoder BatchNorm becomes ``nn.SyncBatchNorm``, which pools the batch statistics of all processes
of a distributed run and is plain train-mode BN in a single process. ``train`` is plain train-mode BN per process;
``frozen`` keeps every encoder BatchNorm in eval mode (running statistics of the loaded weights used and never
updated; the affine parameters still train). Small-batch caveat: in train/sync mode the statistics come from one
``encoder_chunk`` of one slide's patches (correlated, and few with a small chunk), which is noisy and drifts the
running statistics used at inference; with small chunks on one GPU prefer ``frozen``. With ``checkpointing`` the
recomputed forward updates the running statistics a second time (PyTorch behaviour).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from wsimil_core.errors import DataError
from wsimil_core.features.encoders import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EncoderSpec,
    RandomWeightsWarning,
    create_encoder,
)
from wsimil_core.methods.abmilx.model import ABMILX, ABMILXConfig
from wsimil_core.models.base import MapSpec, MILOutput, check_positive_ints, register_model


def normalize_images(x: Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> Tensor:
    """uint8 ``[B, 3, S, S]`` -> float32 ``(x / 255 - mean) / std``; float input is returned unchanged."""
    if x.dtype != torch.uint8:
        return x
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x.float().div_(255.0) - m) / s


#: Encoder BatchNorm modes of end-to-end training (``ABMILXE2EConfig.bn_mode``).
BN_MODES = ("sync", "train", "frozen")


@dataclass
class ABMILXE2EConfig(ABMILXConfig):
    """ABMILX hyper-parameters plus the encoder and pixel pipeline.

    Attributes:
        in_dim: the encoder's output dimension (256 for ``resnet18``, 1024 for ``resnet50`` cut after layer3).
        dim: ABMILX inner dimension d (256 suits ResNet-18).
        encoder: a ``wsimil_core.features.encoders`` name (``resnet18`` / ``resnet50`` are the truncated ResNets).
        input_size: encoder input side S in px (224 in the paper).
        read_px: side in px at which a patch is read from the slide before the crop (256 in the paper).
        encoder_chunk: patches per encoder forward pass (bounds activation memory).
        checkpointing: activation checkpointing of each encoder chunk while training.
        bn_mode: encoder BatchNorm while training: ``sync`` (the authors' set-up; SyncBatchNorm, plain BN in one
            process), ``train`` (per-process batch statistics) or ``frozen`` (eval mode, running statistics fixed);
            see the module docstring for the small-batch caveat.
        freeze_bn: old name of the BatchNorm setting (true = ``frozen``, false = ``train``); kept so checkpoints
            that store it load; none (default) = use ``bn_mode``.
    """

    in_dim: int = 256
    dim: int = 256
    encoder: str = "resnet18"
    input_size: int = 224
    read_px: int = 256
    encoder_chunk: int = 64
    checkpointing: bool = False
    bn_mode: str = "sync"
    freeze_bn: bool | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.encoder, str) or not self.encoder:
            raise ValueError(f"encoder must be an encoder name such as 'resnet18', got {self.encoder!r}")
        check_positive_ints(self, ("input_size", "read_px", "encoder_chunk"))
        if not isinstance(self.checkpointing, bool):
            raise ValueError(f"checkpointing must be true or false, got {self.checkpointing!r}")
        if self.freeze_bn is not None:  # the old setting: a checkpoint written before bn_mode existed
            if not isinstance(self.freeze_bn, bool):
                raise ValueError(f"freeze_bn must be true or false, got {self.freeze_bn!r}")
            self.bn_mode = "frozen" if self.freeze_bn else "train"
            self.freeze_bn = None
        if self.bn_mode not in BN_MODES:
            raise ValueError(f"bn_mode must be one of {list(BN_MODES)}, got {self.bn_mode!r}")


def build_encoder(name: str, weights: str | None = None) -> tuple[nn.Module, EncoderSpec]:
    """The encoder module (trainable) and its ``EncoderSpec``; random init is silent here (callers warn)."""
    with warnings.catch_warnings():
        if weights is None:
            warnings.simplefilter("ignore", RandomWeightsWarning)
        logger = logging.getLogger("wsimil_core.features.encoders")
        level = logger.level
        logger.setLevel(logging.ERROR if weights is None else level)
        try:
            module, spec = create_encoder(name, weights=weights)
        finally:
            logger.setLevel(level)
    for p in module.parameters():
        p.requires_grad_(True)
    return module.train(), spec


@register_model("abmilx_e2e", ABMILXE2EConfig)
class ABMILXE2E(nn.Module):
    """Encoder + ABMILX. ``model(images [N,3,S,S] | features [N,D], coords=None) -> MILOutput``."""

    def __init__(self, config: ABMILXE2EConfig):
        super().__init__()
        self.config = config
        self.encoder, spec = build_encoder(config.encoder)
        if config.bn_mode == "sync":  # same parameters and buffers, statistics pooled across processes
            self.encoder = nn.SyncBatchNorm.convert_sync_batchnorm(self.encoder)
        if spec.dim != config.in_dim:
            raise ValueError(
                f"in_dim={config.in_dim} but encoder {config.encoder!r} outputs {spec.dim} features; "
                f"set model.in_dim: {spec.dim}"
            )
        self.mean = tuple(spec.mean)
        self.std = tuple(spec.std)
        self.mil = ABMILX(config)

    def map_specs(self) -> list[MapSpec]:
        """The maps of the ABMILX part (see :meth:`ABMILX.map_specs`)."""
        return self.mil.map_specs()

    def load_encoder_weights(self, path: str) -> None:
        """Load a local ImageNet/pathology ResNet state dict into the encoder (layer4/fc keys are dropped)."""
        module, _ = build_encoder(self.config.encoder, weights=path)
        self.encoder.load_state_dict(module.state_dict())

    def train(self, mode: bool = True) -> ABMILXE2E:
        super().train(mode)
        if mode and self.config.bn_mode == "frozen":
            for m in self.encoder.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def encode(self, images: Tensor | Iterable[Tensor]) -> Tensor:
        """Encode images in chunks: ``[N, 3, S, S]`` (or an iterable of such chunks) -> ``[N, in_dim]``.

        Images are normalised float, or uint8 (normalised here, per chunk, on the encoder's device).

        Only one chunk's activations live at a time without gradients; with gradients and ``checkpointing``
        only the chunk inputs and the features are kept for the backward pass.
        """
        device = next(self.encoder.parameters()).device
        chunks = images.split(self.config.encoder_chunk) if isinstance(images, Tensor) else images
        feats = []
        for chunk in chunks:
            chunk = normalize_images(chunk.to(device, non_blocking=True), self.mean, self.std)
            if self.config.checkpointing and torch.is_grad_enabled() and self.training:
                f = checkpoint(self.encoder, chunk, use_reentrant=False)
            else:
                f = self.encoder(chunk)
            feats.append(f.flatten(1))
        if not feats:
            raise DataError("abmilx_e2e: empty bag (no patches to encode)")
        return torch.cat(feats)

    def forward(self, x: Tensor, coords: Tensor | None = None, **extras: Any) -> MILOutput:
        """``x``: images ``[N, 3, S, S]`` or this encoder's features ``[N, in_dim]`` / ``[1, N, in_dim]``."""
        if x.dim() == 4:
            feats = self.encode(x)
        else:
            if x.shape[-1] != self.config.in_dim:
                raise DataError(
                    f"abmilx_e2e: got features of dimension {x.shape[-1]} but no slide to read pixels from; "
                    f"give images [N, 3, S, S], features of encoder {self.config.encoder!r} "
                    f"({self.config.in_dim} dims), or use abmilx_e2e_predict() on the slide"
                )
            feats = x
        return self.mil(feats, coords=coords)
