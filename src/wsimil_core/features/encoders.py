"""Patch encoders by name, weights from a local file only, and the ``EncoderSpec`` recorded in the store.

Names understood by :func:`create_encoder`:

``resnet18`` / ``resnet50``
    torchvision ResNet truncated after ``layer3`` (as in the end-to-end MIL literature, e.g. CLAM's
    ResNet50-trunc), followed by global average pooling: 256 / 1024 features. Fully convolutional, so patches
    are encoded at their own size (no resize).
``resnet18-full`` / ``resnet50-full``
    the whole torchvision ResNet up to global average pooling (classifier removed): 512 / 2048 features.
``levit_128s``, ``levit_128``, ``levit_192``, ``levit_256``, ``levit_384``
    aliases of ``timm:levit_*`` (LeViT, MECDS' patch encoder; 384 / 384 / 384 / 512 / 768 features, 224 px
    input). A timm LeViT weights file (``head.*`` and ``head_dist.*`` classifier keys included) loads as is.
``timm:<name>``
    any timm model, built with ``pretrained=False, num_classes=0`` (pooled features).
``tv:<name>``
    any torchvision classification model, built with ``weights=None``; its final ``Linear`` classifier is
    replaced by ``Identity``.

Nothing is ever fetched from a hub. Weights come from a local file (``.pth``/``.pt`` state dict read with
``torch.load(weights_only=True)``, or ``.safetensors``); missing or mismatched keys are a clear
``CheckpointError`` naming the file. Without a file the encoder keeps a *deterministic* random initialisation
(seed 0, so two runs give the same features) and a loud :class:`RandomWeightsWarning` is emitted.

Modules: ``architectures`` (the networks by name), ``weights`` (reading weights files) and this one (the
``EncoderSpec``, ``create_encoder``, pre-processing and batched encoding).
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from wsimil_core.devices import resolve_device
from wsimil_core.errors import CheckpointError
from wsimil_core.features.architectures import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    build_architecture,
    list_encoders,
)
from wsimil_core.features.weights import file_sha256, load_weights

log = logging.getLogger(__name__)

RANDOM_INIT = "random-init"
_RANDOM_SEED = 0


class RandomWeightsWarning(UserWarning):
    """Emitted when an encoder runs with random weights (no ``--weights`` file given)."""


@dataclass(frozen=True)
class EncoderSpec:
    """What identifies an encoder's features (stored as the feature array's attrs, and in checkpoints).

    Attributes:
        name: the name given to :func:`create_encoder` (``resnet18``, ``timm:levit_128s``...).
        encoder_id: the store key ``features/<encoder_id>``: ``<slug>-<sha8 of the weights file>`` or
            ``<slug>-random`` (slug = name with characters outside ``[A-Za-z0-9._-]`` replaced by ``-``).
        dim: feature dimension ``D``.
        input_size: side in px the encoder needs (patches are resized to it), or None when the encoder is fully
            convolutional and takes patches at their own size.
        mean, std: per-channel RGB normalisation applied to ``[0, 1]`` pixels.
        weights_sha256: sha256 of the weights file, or ``"random-init"``.
        weights_path: the weights file as given (informational), or None.
        mpp, patch: patch resolution (µm/px) and side (px) the features were extracted at; set by extraction.
    """

    name: str
    encoder_id: str
    dim: int
    input_size: int | None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    weights_sha256: str = RANDOM_INIT
    weights_path: str | None = None
    mpp: float | None = None
    patch: int | None = None

    def with_grid(self, mpp: float, patch: int) -> EncoderSpec:
        """A copy recording the patch resolution features are extracted at."""
        return EncoderSpec(**{**asdict(self), "mpp": float(mpp), "patch": int(patch)})

    def to_attrs(self) -> dict[str, Any]:
        """JSON-serialisable dict (store attrs, checkpoint metadata)."""
        d = asdict(self)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> EncoderSpec:
        """Inverse of :meth:`to_attrs` (unknown keys are ignored)."""
        names = set(cls.__dataclass_fields__)
        d = {k: v for k, v in attrs.items() if k in names}
        for key in ("mean", "std"):
            if key in d:
                d[key] = tuple(float(v) for v in d[key])
        return cls(**d)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-")


def create_encoder(
    name: str, weights: str | Path | None = None, device: str | torch.device = "cpu"
) -> tuple[nn.Module, EncoderSpec]:
    """Build an encoder (never downloads) and its spec.

    Args:
        name: see the module docstring (``resnet18``, ``resnet50``, ``resnet18-full``, ``levit_128s``,
            ``timm:<name>``, ``tv:<name>``).
        weights: local ``.pth``/``.pt``/``.safetensors`` state dict; None -> deterministic random init and a
            :class:`RandomWeightsWarning`.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``...

    Returns:
        ``(module, spec)``: the module is in eval mode on ``device``, maps a normalised ``[B, 3, H, W]`` float
        tensor to ``[B, spec.dim]``.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_RANDOM_SEED)
        built = build_architecture(name)
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise CheckpointError(f"{path}: weights file not found")
        load_weights(built, path, name)
        sha = file_sha256(path)
        encoder_id = f"{_slug(name)}-{sha[:8]}"
        weights_path: str | None = str(path)
    else:
        sha = RANDOM_INIT
        encoder_id = f"{_slug(name)}-random"
        weights_path = None
        msg = (
            f"encoder {name!r} has NO pretrained weights (random initialisation, seed {_RANDOM_SEED}): its features "
            "are nearly meaningless for real slides. Pass a local weights file (--weights FILE) for real work."
        )
        warnings.warn(msg, RandomWeightsWarning, stacklevel=2)
        log.warning(msg)
    module = built.module.to(resolve_device(device)).eval()
    for p in module.parameters():
        p.requires_grad_(False)
    spec = EncoderSpec(
        name=name,
        encoder_id=encoder_id,
        dim=built.dim,
        input_size=built.input_size,
        mean=built.mean,
        std=built.std,
        weights_sha256=sha,
        weights_path=weights_path,
    )
    return module, spec


# ------------------------------------------------------------------------------------------------------------
# Pre-processing and batched encoding
# ------------------------------------------------------------------------------------------------------------
def encoder_transform(spec: EncoderSpec) -> Callable[[np.ndarray], Tensor]:
    """A per-image transform: uint8 RGB ``[H, W, 3]`` -> normalised float32 ``[3, S, S]``.

    ``S`` is ``spec.input_size`` (bilinear, antialiased resize) or the image's own size when the encoder is fully
    convolutional (``input_size`` None).
    """

    def transform(image: np.ndarray) -> Tensor:
        return preprocess_batch(spec, np.asarray(image)[None])[0]

    return transform


def preprocess_batch(
    spec: EncoderSpec, images: np.ndarray | Tensor, device: str | torch.device | None = None
) -> Tensor:
    """uint8 ``[B, H, W, 3]`` (numpy or tensor) -> normalised float32 ``[B, 3, S, S]`` on ``device``.

    Differentiable downstream: end-to-end methods call this, then the encoder, with gradients on.
    """
    if isinstance(images, np.ndarray) and not images.flags.writeable:
        images = images.copy()  # torch refuses to wrap read-only arrays without a warning
    x = torch.as_tensor(images)
    if x.dim() != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected uint8 images [B, H, W, 3], got shape {tuple(x.shape)}")
    if x.dtype != torch.uint8:
        raise ValueError(f"expected uint8 images, got {x.dtype}")
    if device is not None:
        x = x.to(resolve_device(device), non_blocking=True)
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    size = spec.input_size
    if size is not None and (x.shape[-2] != size or x.shape[-1] != size):
        x = nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(spec.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def module_device(module: nn.Module) -> torch.device:
    """The device of a module's first parameter (CPU for parameter-free modules)."""
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


@torch.inference_mode()
def extract_patches(
    model: nn.Module,
    spec: EncoderSpec,
    images: np.ndarray | Tensor,
    batch_size: int | None = None,
    amp: bool = True,
) -> Tensor:
    """Encode uint8 RGB patches ``[B, H, W, 3]`` -> float32 features ``[B, D]`` on the CPU (no gradients).

    Runs on the model's device; on CUDA with ``amp`` the forward pass uses float16 autocast. ``batch_size``
    splits large inputs into chunks (None = all at once).
    """
    device = module_device(model)
    n = len(images)
    step = n if not batch_size else int(batch_size)
    out = []
    for start in range(0, n, max(step, 1)):
        x = preprocess_batch(spec, images[start : start + step], device)
        out.append(encode_tensor(model, x, amp=amp).float().cpu())
    if not out:
        return torch.zeros(0, spec.dim)
    return torch.cat(out)


def encode_tensor(model: nn.Module, x: Tensor, amp: bool = True) -> Tensor:
    """Forward a normalised ``[B, 3, S, S]`` batch -> ``[B, D]`` (float16 autocast on CUDA when ``amp``)."""
    if amp and x.device.type == "cuda":
        with torch.autocast("cuda", dtype=torch.float16):
            y = model(x)
    else:
        y = model(x)
    return y.flatten(1)


__all__ = [
    "EncoderSpec",
    "RandomWeightsWarning",
    "create_encoder",
    "list_encoders",
    "encoder_transform",
    "preprocess_batch",
    "extract_patches",
    "encode_tensor",
    "file_sha256",
    "module_device",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "RANDOM_INIT",
]
