"""DB-LIPN: AHDMIL's dual-branch lightweight instance pre-screening network (low-resolution patches).

Each high-resolution patch ``i`` of a slide has a low-resolution twin covering the same tissue (the patch grid's
``PatchGrid.companion(factor)``: same level-0 square, read at ``mpp * factor``; factor 16 turns 20x patches into
the paper's 1.25x). DB-LIPN scores these twins with two branches and averages their logits:

    q_i = (g_1(v_i) + g_2(v_i)) / 2,     keep_i = [sigmoid(q_i) > threshold]

The branches are MobileNetV4-conv-small-class timm models (``timm:mobilenetv4_conv_small``, the authors' choice;
``_050`` / ``_035`` are narrower), each built with ``pretrained=False`` and its own random init -- nothing is ever
downloaded; ImageNet weights come only from a local file (:func:`load_backbone_weights`) -- or ``tiny`` (two
small CNNs with 3x3 and 5x5 kernels, for fast tests). Twin branches (same architecture) are pulled toward each
other after each training step by the cross-EMA :meth:`DBLIPN.cross_ema_`. Only kept patches are then read at
high resolution and encoded.

Input images are uint8 RGB ``[N, h, w, 3]`` (or a normalised float ``[N, 3, h, w]``); output logits ``[N]``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from wsimil_core.errors import CheckpointError, ConfigError
from wsimil_core.features.encoders import IMAGENET_MEAN, IMAGENET_STD
from wsimil_core.features.weights import read_state_dict


def tiny_cnn(width: int = 16, kernel: int = 3) -> nn.Module:
    """A small CNN ``[N, 3, h, w] -> [N, 1]``: three stride-2 conv + GELU blocks, global average pool, linear."""
    pad = kernel // 2
    layers: list[nn.Module] = []
    c_in = 3
    for c_out in (width, 2 * width, 4 * width):
        layers += [nn.Conv2d(c_in, c_out, kernel, stride=2, padding=pad), nn.GELU()]
        c_in = c_out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, 1)]
    return nn.Sequential(*layers)


def timm_branch(name: str) -> nn.Module:
    """A timm model with one output logit, random init (``pretrained=False``)."""
    import timm  # optional and heavy: only the timm branches need it

    if not timm.is_model(name):
        raise ConfigError(f"ahdmil prescreen branch 'timm:{name}': timm has no model of that name")
    return timm.create_model(name, pretrained=False, num_classes=1)


def build_branch(arch: str, width: int, kernel: int) -> nn.Module:
    """``tiny`` or ``timm:<name>``."""
    if arch == "tiny":
        return tiny_cnn(width, kernel)
    if arch.startswith("timm:"):
        return timm_branch(arch[len("timm:") :])
    raise ConfigError(f"ahdmil prescreen_arch must be 'tiny' or 'timm:<name>', got {arch!r}")


def classifier_prefix(branch: nn.Module) -> str | None:
    """Name of a timm branch's classifier (``classifier`` for MobileNetV4), whose keys a pretrained file's
    ImageNet head does not fit; None for other modules."""
    cfg = getattr(branch, "pretrained_cfg", None)
    name = cfg.get("classifier") if isinstance(cfg, dict) else None
    return name if isinstance(name, str) else None


def load_backbone_weights(branch: nn.Module, path: str | Path) -> int:
    """Load a local weights file (``.safetensors`` / ``.pth``, e.g. timm's ImageNet MobileNetV4) into ``branch``
    strictly, except its classifier (kept as initialised: one logit). Returns the number of tensors loaded.

    Raises:
        CheckpointError: the file is missing, unreadable, or does not fit the branch (naming the keys).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: DB-LIPN weights file not found")
    sd = read_state_dict(path)
    head = classifier_prefix(branch)
    if head is not None:
        sd = {k: v for k, v in sd.items() if not k.startswith(head + ".")}
    own = {k: v for k, v in branch.state_dict().items() if head is None or not k.startswith(head + ".")}
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    wrong = sorted(k for k in set(own) & set(sd) if tuple(own[k].shape) != tuple(sd[k].shape))
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{path}: weights do not fit the DB-LIPN branch: {len(missing)} missing {missing[:3]}, "
            f"{len(unexpected)} unexpected {unexpected[:3]}, {len(wrong)} of another shape {wrong[:3]}"
        )
    branch.load_state_dict(sd, strict=False)
    return len(sd)


class DBLIPN(nn.Module):
    """Dual-branch pre-screener: ``images [N, h, w, 3] uint8 -> logits [N]`` (mean of the two branches' logits).

    Args:
        arch: ``timm:<name>`` (e.g. ``timm:mobilenetv4_conv_small``, the authors' branch) or ``tiny``.
        width: channel width of the tiny branches.
        chunk: images per forward pass (bounds memory on big slides).
    """

    mean: Tensor  # [1, 3, 1, 1] ImageNet statistics (buffers, not saved)
    std: Tensor

    def __init__(self, arch: str = "timm:mobilenetv4_conv_small", width: int = 16, chunk: int = 1024):
        super().__init__()
        self.arch = arch
        self.chunk = int(chunk)
        self.branch1 = build_branch(arch, width, 3)
        self.branch2 = build_branch(arch, width, 5)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def twin(self) -> bool:
        """Whether the branches have the same state-dict keys and shapes (timm branches; not ``tiny``, whose
        kernels differ), so the cross-EMA applies."""
        a, b = self.branch1.state_dict(), self.branch2.state_dict()
        return a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)

    @torch.no_grad()
    def cross_ema_(self, momentum: float) -> None:
        """Cross-EMA between the branches, in place, from their values before the update:
        ``theta_1 <- m theta_1 + (1 - m) theta_2`` and ``theta_2 <- m theta_2 + (1 - m) theta_1`` over every
        parameter and floating-point buffer (BatchNorm statistics).

        Raises:
            ConfigError: the branches are not twins (:attr:`twin`).
        """
        if not self.twin:
            raise ConfigError(f"DB-LIPN cross-EMA needs two branches of one architecture; {self.arch!r} has two kinds")
        a, b = self.branch1.state_dict(), self.branch2.state_dict()
        for k, t1 in a.items():
            t2 = b[k]
            if not t1.is_floating_point():
                continue
            old1 = t1.clone()
            t1.mul_(momentum).add_(t2, alpha=1.0 - momentum)
            t2.mul_(momentum).add_(old1, alpha=1.0 - momentum)

    def normalise(self, images: Tensor | np.ndarray) -> Tensor:
        """uint8 ``[N, h, w, 3]`` -> float ``[N, 3, h, w]`` normalised with ImageNet statistics (float input passes)."""
        x = torch.as_tensor(np.ascontiguousarray(images) if isinstance(images, np.ndarray) else images)
        x = x.to(self.mean.device)
        if x.dtype == torch.uint8:
            if x.dim() != 4 or x.shape[-1] != 3:
                raise ValueError(f"DB-LIPN expects uint8 images [N, h, w, 3], got {tuple(x.shape)}")
            x = x.permute(0, 3, 1, 2).float().div(255.0)
            return (x - self.mean) / self.std
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"DB-LIPN expects float images [N, 3, h, w], got {tuple(x.shape)}")
        return x.float()

    def forward(self, images: Tensor | np.ndarray) -> Tensor:
        """Logits ``[N]``: ``(g_1(v) + g_2(v)) / 2`` over chunks of ``chunk`` images."""
        x = self.normalise(images)
        if x.shape[0] == 0:
            return x.new_zeros(0)
        out = []
        for start in range(0, x.shape[0], self.chunk):
            xb = x[start : start + self.chunk]
            out.append(0.5 * (self.branch1(xb).reshape(-1) + self.branch2(xb).reshape(-1)))
        return torch.cat(out)


__all__ = ["DBLIPN", "tiny_cnn", "build_branch", "load_backbone_weights", "classifier_prefix"]
