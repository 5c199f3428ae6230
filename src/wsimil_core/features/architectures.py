"""Encoder architectures by name (random initialisation; weights are loaded by ``wsimil_core.features.weights``).

See ``wsimil_core.features.encoders`` for the names (``resnet18``, ``resnet50``, ``resnet18-full``,
``resnet50-full``, ``levit_128s`` (and ``levit_128``/``192``/``256``/``384``), ``timm:<name>``, ``tv:<name>``). timm and torchvision are imported on first use.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from wsimil_core.errors import ConfigError

if TYPE_CHECKING:
    from torchvision.models import ResNet

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class TruncatedResNet(nn.Module):
    """A torchvision ResNet cut after ``layer3``, then global average pooling.

    Submodule names equal torchvision's (``conv1``, ``bn1``, ``layer1``..``layer3``), so a full ResNet state
    dict loads after dropping its ``layer4.*`` and ``fc.*`` keys.

    Input ``[B, 3, H, W]`` float (normalised); output ``[B, C3]`` with C3 = 256 (resnet18) or 1024 (resnet50).
    """

    def __init__(self, resnet: ResNet):
        super().__init__()
        self.conv1 = resnet.conv1
        self.bn1 = resnet.bn1
        self.relu = resnet.relu
        self.maxpool = resnet.maxpool
        self.layer1 = resnet.layer1
        self.layer2 = resnet.layer2
        self.layer3 = resnet.layer3
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return torch.flatten(self.pool(x), 1)


@dataclass
class BuiltEncoder:
    """An architecture before weights: the module, its spec fields and the state-dict keys we drop.

    Attributes:
        module: maps a normalised ``[B, 3, S, S]`` float tensor to ``[B, dim]`` (random initialisation).
        dim: feature dimension ``D``.
        input_size: side ``S`` in px the module needs, or None when it takes patches at their own size.
        mean, std: per-channel RGB normalisation of ``[0, 1]`` pixels.
        ignored_prefixes: state-dict key prefixes of the removed classifier (dropped when loading weights).
    """

    module: nn.Module
    dim: int
    input_size: int | None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    ignored_prefixes: tuple[str, ...] = field(default_factory=tuple)


def rgb_triple(values: Any) -> tuple[float, float, float]:
    """Per-channel RGB values (a model's normalisation mean or std) as three floats."""
    r, g, b = (float(v) for v in values)
    return (r, g, b)


def build_resnet(depth: int, truncated: bool) -> BuiltEncoder:
    """torchvision ResNet-``depth``, cut after ``layer3`` (``truncated``) or whole up to global pooling."""
    import torchvision

    net = getattr(torchvision.models, f"resnet{depth}")(weights=None)
    if truncated:
        dim = net.layer3[-1].conv2.out_channels if depth == 18 else net.layer3[-1].conv3.out_channels
        return BuiltEncoder(TruncatedResNet(net), dim, None, ignored_prefixes=("layer4.", "fc."))
    dim = net.fc.in_features
    net.fc = nn.Identity()
    return BuiltEncoder(net, dim, None, ignored_prefixes=("fc.",))


def build_timm(model_name: str) -> BuiltEncoder:
    """A timm model without its classifier (``num_classes=0``: pooled features), input size and normalisation
    from its ``pretrained_cfg``."""
    import timm

    if not timm.is_model(model_name):
        raise ConfigError(f"encoder 'timm:{model_name}': timm has no model of that name (see timm.list_models())")
    net: Any = timm.create_model(model_name, pretrained=False, num_classes=0)  # timm adds num_features, pretrained_cfg
    cfg = getattr(net, "pretrained_cfg", None) or {}
    size = cfg.get("input_size", (3, 224, 224))
    classifier = cfg.get("classifier") or ()
    if isinstance(classifier, str):
        classifier = (classifier,)
    ignored = tuple(sorted({c.split(".")[0] + "." for c in classifier}))
    mean = rgb_triple(cfg.get("mean", IMAGENET_MEAN))
    std = rgb_triple(cfg.get("std", IMAGENET_STD))
    return BuiltEncoder(net, int(net.num_features), int(size[-1]), mean, std, ignored)


def build_torchvision(model_name: str) -> BuiltEncoder:
    """A torchvision classification model with its last ``Linear`` replaced by ``Identity``."""
    import torchvision

    try:
        net = torchvision.models.get_model(model_name, weights=None)
    except (ValueError, KeyError):
        raise ConfigError(
            f"encoder 'tv:{model_name}': torchvision has no model of that name (see torchvision.models.list_models())"
        ) from None
    size, mean, std = 224, IMAGENET_MEAN, IMAGENET_STD
    try:  # read the documented preprocessing of the weights enum; this never downloads anything
        tf = torchvision.models.get_model_weights(model_name).DEFAULT.transforms()
        size = int(tf.crop_size[0])
        mean, std = rgb_triple(tf.mean), rgb_triple(tf.std)
    except Exception:  # noqa: BLE001 - models without a weights enum keep the ImageNet defaults
        pass
    ignored = strip_torchvision_classifier(net, model_name)
    net.eval()
    with torch.no_grad():
        dim = int(net(torch.zeros(1, 3, size, size)).flatten(1).shape[1])
    return BuiltEncoder(net, dim, size, mean, std, ignored)


def strip_torchvision_classifier(net: nn.Module, model_name: str) -> tuple[str, ...]:
    """Replace the last ``Linear`` of ``fc``/``classifier``/``heads``/``head`` with ``Identity``."""
    for attr in ("fc", "classifier", "heads", "head"):
        sub = getattr(net, attr, None)
        if isinstance(sub, nn.Linear):
            setattr(net, attr, nn.Identity())
            return (f"{attr}.",)
        if isinstance(sub, nn.Sequential):
            linear_names = [n for n, m in sub.named_children() if isinstance(m, nn.Linear)]
            if linear_names:
                last = linear_names[-1]
                setattr(sub, last, nn.Identity())
                return (f"{attr}.{last}.",)
    raise ConfigError(f"encoder 'tv:{model_name}': cannot find its classifier layer to remove")


LEVIT_ENCODERS = ("levit_128s", "levit_128", "levit_192", "levit_256", "levit_384")

BUILTIN_ENCODERS: dict[str, Callable[[], BuiltEncoder]] = {
    "resnet18": lambda: build_resnet(18, truncated=True),
    "resnet50": lambda: build_resnet(50, truncated=True),
    "resnet18-full": lambda: build_resnet(18, truncated=False),
    "resnet50-full": lambda: build_resnet(50, truncated=False),
}


# the LeViT family (Graham et al. 2021), MECDS' patch encoder (Sec. 2.1); timm names, no hub download
for _levit in LEVIT_ENCODERS:
    BUILTIN_ENCODERS[_levit] = functools.partial(build_timm, _levit)


def list_encoders() -> list[str]:
    """Built-in encoder names (plus ``timm:<name>`` and ``tv:<name>``)."""
    return sorted(BUILTIN_ENCODERS) + ["timm:<name>", "tv:<name>"]


def build_architecture(name: str) -> BuiltEncoder:
    """The architecture of encoder ``name`` with random weights (``ConfigError`` for an unknown name)."""
    if name in BUILTIN_ENCODERS:
        return BUILTIN_ENCODERS[name]()
    if name.startswith("timm:"):
        return build_timm(name[len("timm:") :])
    if name.startswith("tv:"):
        return build_torchvision(name[len("tv:") :])
    raise ConfigError(f"unknown encoder {name!r}; available: {', '.join(list_encoders())}")
