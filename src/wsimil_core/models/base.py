"""Model contract (DESIGN.md "Models and methods"): ``MILOutput`` and the model registry."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from wsimil_core.errors import ConfigError


@dataclass
class MILOutput:
    """What every model returns for a bag.

    Attributes:
        logits: ``[B, C]``, or ``dict[task, Tensor[B, C_task]]`` for multi-task models.
        maps: per-patch values aligned with the input bag's patch order, each ``[N]`` or ``[N, K]``.
            Names are slash paths shown as layer names (``attention``, ``attention/head3``, ``routing/<task>``).
        extras: anything else (embeddings, auxiliary logits, attention logits needed by losses).
    """

    logits: Tensor | dict[str, Tensor]
    maps: dict[str, Tensor] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)


MAP_KINDS = ("scalar", "probability", "signed", "categorical", "binary")


@dataclass(frozen=True)
class MapSpec:
    """How one per-patch map of a model is read and drawn (DESIGN.md "Models, maps and methods").

    Every map a model can emit is declared once by the model (``model.map_specs()``); the specs travel with the
    maps into the store and the checkpoint, and the plugin, GeoJSON export and docs render maps from them only.

    Attributes:
        name: the map's key in ``MILOutput.maps`` (a slash path such as ``attention/head3``).
        kind: ``scalar`` (any real value), ``probability`` (in [0, 1]), ``signed`` (centred on 0),
            ``categorical`` (integer category index) or ``binary`` (0 / 1).
        description: one line saying what the value means.
        categories: names of the category values 0..K-1 for ``categorical`` and ``binary`` maps
            (e.g. ``("not routed", "routed")``, memory components ``("C-0", ..., "C+3")``).
        colormap: suggested napari colormap name for scalar kinds (categorical maps use label colours).
        range: suggested display range ``(low, high)``; None means "from the data".
        channels: names of the K columns of an ``[N, K]`` map; empty for ``[N]`` maps.
    """

    name: str
    kind: str
    description: str
    categories: tuple[str, ...] = ()
    colormap: str = "inferno"
    range: tuple[float, float] | None = None
    channels: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in MAP_KINDS:
            raise ValueError(f"map {self.name!r}: kind must be one of {MAP_KINDS}, got {self.kind!r}")
        if self.kind in ("categorical", "binary") and not self.categories:
            raise ValueError(f"map {self.name!r}: a {self.kind} map needs its category names")
        if self.kind == "binary" and len(self.categories) != 2:
            raise ValueError(f"map {self.name!r}: a binary map has exactly two category names")

    @property
    def is_categorical(self) -> bool:
        """Whether values are category indices (drawn as labels, never with a continuous colormap)."""
        return self.kind in ("categorical", "binary")

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (store attrs, checkpoint metadata)."""
        return {
            "name": self.name,
            "kind": self.kind,
            "description": self.description,
            "categories": list(self.categories),
            "colormap": self.colormap,
            "range": None if self.range is None else [float(self.range[0]), float(self.range[1])],
            "channels": list(self.channels),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MapSpec:
        """Inverse of ``to_dict`` (unknown keys are ignored so newer specs still load)."""
        rng = data.get("range")
        return cls(
            name=str(data["name"]),
            kind=str(data["kind"]),
            description=str(data.get("description", "")),
            categories=tuple(str(c) for c in data.get("categories") or ()),
            colormap=str(data.get("colormap") or "inferno"),
            range=None if rng is None else (float(rng[0]), float(rng[1])),
            channels=tuple(str(c) for c in data.get("channels") or ()),
        )


def map_specs_of(model: nn.Module) -> list[MapSpec]:
    """The ``MapSpec`` of every map ``model`` can emit (``model.map_specs()``; [] for a model declaring none)."""
    declare = getattr(model, "map_specs", None)
    return list(declare()) if callable(declare) else []


@dataclass
class ModelConfig:
    """Base of every model's config dataclass. ``in_dim`` and ``n_classes`` come first by contract."""

    in_dim: int = 1024
    n_classes: int = 2


_MODELS: dict[str, tuple[type[nn.Module], type]] = {}


def register_model(name: str, config_cls: type) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: register ``cls(config)`` under ``name`` with its config dataclass."""

    def deco(cls: type[nn.Module]) -> type[nn.Module]:
        if name in _MODELS and _MODELS[name][0] is not cls:
            raise ValueError(f"model {name!r} is registered twice")
        _MODELS[name] = (cls, config_cls)
        cls.model_name = name
        cls.config_cls = config_cls
        return cls

    return deco


def build_config(config_cls: type, cfg: dict[str, Any], what: str) -> Any:
    """Build a config dataclass from a dict; unknown keys are a clear ``ConfigError``."""
    names = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(cfg) - names)
    if unknown:
        raise ConfigError(f"{what}: unknown option(s) {unknown}; valid options are {sorted(names)}")
    try:
        return config_cls(**cfg)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{what}: {exc}") from None


def create_model(name: str, **cfg: Any) -> nn.Module:
    """Create a registered model, e.g. ``create_model("abmil", in_dim=384, n_classes=2)``."""
    if name not in _MODELS:
        raise ConfigError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    cls, config_cls = _MODELS[name]
    config = build_config(config_cls, cfg, f"model {name!r}")
    model = cls(config)
    model.config = config
    return model


def model_config_class(name: str) -> type:
    """The config dataclass of a registered model (its fields are the model's options)."""
    if name not in _MODELS:
        raise ConfigError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    return _MODELS[name][1]


def list_models() -> list[str]:
    """Names of the registered models, sorted."""
    return sorted(_MODELS)


def model_config_dict(model: nn.Module) -> dict[str, Any]:
    """The JSON-serialisable config a model was created with (stored in checkpoints)."""
    return dataclasses.asdict(model.config)


def bag_dims(x: Tensor) -> Tensor:
    """Accept ``[N, D]`` or ``[B, N, D]`` and return ``[B, N, D]``."""
    if x.dim() == 2:
        return x.unsqueeze(0)
    if x.dim() != 3:
        raise ValueError(f"expected a bag [N, D] or a batch [B, N, D], got shape {tuple(x.shape)}")
    return x


def check_in_dim(x: Tensor, in_dim: int, model: str) -> None:
    """A clear error for a feature-dimension mismatch between data and model."""
    if x.shape[-1] != in_dim:
        from wsimil_core.errors import DataError

        raise DataError(
            f"{model}: features have dimension {x.shape[-1]} but the model expects in_dim={in_dim}; "
            "use the encoder the model was trained with, or set model.in_dim"
        )


def check_positive_ints(config: Any, names: Sequence[str]) -> None:
    """``ValueError`` unless each ``config.<name>`` is an ``int`` (not ``bool``) >= 1 (config validation)."""
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_dropout(value: Any) -> None:
    """``ValueError`` unless ``value`` is a number in [0, 1) (config validation)."""
    if not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {value!r}")


def prepare_bag(x: Tensor, in_dim: int, model: str) -> Tensor:
    """The usual forward prologue: ``x`` ``[N, D]`` or ``[B, N, D]`` -> ``[B, N, D]`` (``bag_dims``), checked
    for the feature dimension (``check_in_dim``) and for at least one patch (``DataError`` naming the model)."""
    x = bag_dims(x)
    check_in_dim(x, in_dim, model)
    if x.shape[1] == 0:
        from wsimil_core.errors import DataError

        raise DataError(f"{model}: the bag has no patches")
    return x


__all__ = [
    "MAP_KINDS",
    "MapSpec",
    "map_specs_of",
    "MILOutput",
    "ModelConfig",
    "register_model",
    "create_model",
    "list_models",
    "model_config_class",
    "model_config_dict",
    "bag_dims",
    "check_in_dim",
    "prepare_bag",
    "check_positive_ints",
    "check_dropout",
]
