"""DB-LIPN: AHDMIL's dual-branch lightweight instance pre-screening network (low-resolution patches).

Each high-resolution patch ``i`` of a slide has a low-resolution twin covering the same tissue (the patch grid's
``PatchGrid.companion(factor)``: same level-0 square, read at ``mpp * factor``). DB-LIPN scores these twins with
two small CNN branches and averages their logits:

    q_i = (g_1(v_i) + g_2(v_i)) / 2,     keep_i = [sigmoid(q_i) > threshold]

The branches are independent small CNNs: ``tiny`` (built here, two different kernel sizes so the branches see
different receptive fields) or any timm model (``timm:mobilenetv4_conv_small``, built with ``pretrained=False``;
no weights are ever downloaded). Only kept patches are then read at high resolution and encoded.

Input images are uint8 RGB ``[N, h, w, 3]`` (or a normalised float ``[N, 3, h, w]``); output logits ``[N]``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from wsimil_core.errors import ConfigError
from wsimil_core.features.encoders import IMAGENET_MEAN, IMAGENET_STD


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


class DBLIPN(nn.Module):
    """Dual-branch pre-screener: ``images [N, h, w, 3] uint8 -> logits [N]`` (mean of the two branches' logits).

    Args:
        arch: ``tiny`` (default, CPU friendly) or ``timm:<name>`` (e.g. ``timm:mobilenetv4_conv_small``).
        width: channel width of the tiny branches.
        chunk: images per forward pass (bounds memory on big slides).
    """

    mean: Tensor  # [1, 3, 1, 1] ImageNet statistics (buffers, not saved)
    std: Tensor

    def __init__(self, arch: str = "tiny", width: int = 16, chunk: int = 1024):
        super().__init__()
        self.arch = arch
        self.chunk = int(chunk)
        self.branch1 = build_branch(arch, width, 3)
        self.branch2 = build_branch(arch, width, 5)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

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


__all__ = ["DBLIPN", "tiny_cnn", "build_branch"]
