"""Model contract (DESIGN.md "Models and methods"): ``MILOutput``, ``ModelConfig``, the model registry and
factory, and the forward prologue / config checks every model uses.

The map declarations (``MapSpec``, ``MAP_KINDS``, ``map_specs_of``, ``primary_map_names``) live in
``models/map_spec.py`` and are re-exported here, so ``from wsimil_core.models.base import MapSpec`` keeps working.
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from torch import Tensor, nn

from wsimil_core.errors import ConfigError, DataError
from wsimil_core.models.map_spec import MAP_KINDS, MapSpec, map_specs_of, primary_map_names


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

    def single_logits(self, model: str) -> Tensor:
        """``logits`` ``[B, C]`` of a single-task model; a ``TypeError`` naming ``model`` for a multi-task dict."""
        if isinstance(self.logits, dict):
            raise TypeError(f"{model}: expected single-task logits [B, C], got the tasks {sorted(self.logits)}")
        return self.logits

    def task_logits(self, model: str) -> dict[str, Tensor]:
        """``{task: [B, C_task]}`` of a multi-task model; a ``TypeError`` naming ``model`` for a single tensor."""
        if not isinstance(self.logits, dict):
            raise TypeError(f"{model}: expected multi-task logits {{task: [B, C]}}, got one tensor")
        return self.logits


@dataclass
class ModelConfig:
    """Base of every model's config dataclass. ``in_dim`` and ``n_classes`` come first by contract.

    Names shared by every model (DESIGN.md "Models, maps and methods"): ``in_dim``, ``n_classes`` (or ``tasks``),
    ``dim`` (width of the main hidden representation), ``n_heads``, ``dropout``; a second width or head count gets
    a descriptive name (``attn_dim``, ``memory_dim``, ...). Each field is documented by one entry of the config's
    ``Attributes:`` docstring section (``config_field_docs``; ``wsimil config`` prints it). ``renamed`` maps old
    option names to new ones: old configs and checkpoints still load, with a ``FutureWarning``.
    ``checkpoint_defaults`` holds the values of fields added after checkpoints were written, as those checkpoints
    were built: a checkpoint whose stored config lacks such a field loads with this value (its old architecture
    or behaviour), not the field's new default (``checkpoint_model_options``).

    Attributes:
        in_dim: patch feature dimension D.
        n_classes: number of classes C.
    """

    renamed: ClassVar[dict[str, str]] = {}
    checkpoint_defaults: ClassVar[dict[str, Any]] = {}

    in_dim: int = 1024
    n_classes: int = 2


_MODELS: dict[str, tuple[type[nn.Module], type]] = {}


def register_model(name: str, config_cls: type) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: register ``cls(config)`` under ``name`` with its config dataclass."""

    def deco(cls: type[nn.Module]) -> type[nn.Module]:
        if name in _MODELS and _MODELS[name][0] is not cls:
            raise ValueError(f"model {name!r} is registered twice")
        fields = {f.name for f in dataclasses.fields(config_cls)} if dataclasses.is_dataclass(config_cls) else set()
        for old, new in getattr(config_cls, "renamed", {}).items():
            if old in fields or new not in fields:
                raise ValueError(f"model {name!r}: renamed {old!r} -> {new!r} must map an old name to a field")
        _MODELS[name] = (cls, config_cls)
        setattr(cls, "model_name", name)  # noqa: B010  (class attributes every registered model carries)
        setattr(cls, "config_cls", config_cls)  # noqa: B010
        return cls

    return deco


def rename_old_options(config_cls: type, cfg: Mapping[str, Any], what: str) -> dict[str, Any]:
    """``cfg`` with the old option names of ``config_cls.renamed`` replaced by the new ones (order kept).

    Each old name gives a ``FutureWarning`` naming ``what`` (e.g. the YAML file or checkpoint and the model) and
    old -> new; an old name given together with its new name is a ``ConfigError``.
    """
    renamed: Mapping[str, str] = getattr(config_cls, "renamed", {})
    for old, new in renamed.items():
        if old not in cfg:
            continue
        if new in cfg:
            raise ConfigError(f"{what}: both {old!r} (the old name) and {new!r} are given; keep only {new!r}")
        warnings.warn(
            f"{what}: option {old!r} is now called {new!r}; the old name still loads but will be removed",
            FutureWarning,
            stacklevel=3,
        )
    return {renamed.get(k, k): v for k, v in cfg.items()}


def rename_model_options(name: str, cfg: Mapping[str, Any], source: str | None = None) -> dict[str, Any]:
    """``rename_old_options`` for registered model ``name`` (``cfg`` unchanged for an unknown model).

    ``source`` (a config file, a checkpoint) is named in the warning, e.g. ``"run.yaml: model 'abmil'"``.
    """
    entry = _MODELS.get(name)
    if entry is None:
        return dict(cfg)
    what = f"model {name!r}" if source is None else f"{source}: model {name!r}"
    return rename_old_options(entry[1], cfg, what)


def checkpoint_model_options(name: str, cfg: Mapping[str, Any], source: str | None = None) -> dict[str, Any]:
    """A checkpoint's stored model config, ready for ``create_model``: old names renamed
    (``rename_model_options``), and each field of the config's ``checkpoint_defaults`` that the stored config
    lacks set to that value, so a checkpoint written before the field existed rebuilds what it was trained with.
    (``save_checkpoint`` always stores a model's whole config, so a missing field means an older file.)"""
    out = rename_model_options(name, cfg, source)
    entry = _MODELS.get(name)
    old: Mapping[str, Any] = getattr(entry[1], "checkpoint_defaults", {}) if entry is not None else {}
    for key, value in old.items():
        out.setdefault(key, value)
    return out


def _attribute_docs(doc: str) -> dict[str, str]:
    """The entries of a Google-style ``Attributes:`` section: ``{name: text}``, continuation lines joined."""
    docs: dict[str, str] = {}
    lines = inspect.cleandoc(doc).splitlines()
    inside, indent, current = False, 0, None
    for line in lines:
        stripped = line.strip()
        if not inside:
            inside = stripped == "Attributes:"
            continue
        if not stripped:
            current = None
            continue
        depth = len(line) - len(line.lstrip())
        if depth == 0:
            break
        if indent == 0:
            indent = depth
        if depth == indent and ":" in stripped:
            key, text = stripped.split(":", 1)
            if key.isidentifier():
                current = key
                docs[key] = text.strip()
                continue
        if current is not None and depth > indent:
            docs[current] = f"{docs[current]} {stripped}".strip()
    return docs


def config_field_docs(config_cls: type) -> dict[str, str]:
    """One-line description of every documented field of a model config (``Attributes:`` docstring sections of
    the class and its bases; a subclass's entry wins). ``wsimil config`` prints them as comments."""
    docs: dict[str, str] = {}
    for klass in reversed(config_cls.__mro__):
        if klass.__doc__ and "__doc__" in vars(klass):
            docs.update(_attribute_docs(klass.__doc__))
    names = [f.name for f in dataclasses.fields(config_cls)] if dataclasses.is_dataclass(config_cls) else []
    return {n: docs[n] for n in names if docs.get(n)}


def build_config(config_cls: type, cfg: dict[str, Any], what: str) -> Any:
    """Build a config dataclass from a dict; unknown keys are a clear ``ConfigError``.

    Old option names (``config_cls.renamed``) are accepted with a ``FutureWarning`` (``rename_old_options``).
    """
    cfg = rename_old_options(config_cls, cfg, what)
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


ModelT = TypeVar("ModelT", bound=nn.Module)


def create_model_as(model_cls: type[ModelT], name: str, **cfg: Any) -> ModelT:
    """``create_model(name, **cfg)`` typed as ``model_cls``; a ``TypeError`` when ``name`` builds another class."""
    model = create_model(name, **cfg)
    if not isinstance(model, model_cls):
        raise TypeError(f"model {name!r} is a {type(model).__name__}, not a {model_cls.__name__}")
    return model


def model_config_class(name: str) -> type:
    """The config dataclass of registered model ``name`` (``ConfigError`` for an unknown model)."""
    if name not in _MODELS:
        raise ConfigError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    return _MODELS[name][1]


def model_class(name: str) -> type[nn.Module]:
    """The ``nn.Module`` class of registered model ``name`` (``ConfigError`` for an unknown model)."""
    if name not in _MODELS:
        raise ConfigError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    return _MODELS[name][0]


def list_models() -> list[str]:
    """Names of the registered models, sorted."""
    return sorted(_MODELS)


def model_config_dict(model: nn.Module) -> dict[str, Any]:
    """The JSON-serialisable config a model was created with (stored in checkpoints)."""
    config: Any = getattr(model, "config")  # noqa: B009  (set by create_model)
    return dataclasses.asdict(config)


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
        raise DataError(f"{model}: the bag has no patches")
    return x


__all__ = [
    "MAP_KINDS",
    "MapSpec",
    "map_specs_of",
    "primary_map_names",
    "MILOutput",
    "ModelConfig",
    "register_model",
    "rename_old_options",
    "rename_model_options",
    "config_field_docs",
    "create_model",
    "create_model_as",
    "model_config_class",
    "model_class",
    "list_models",
    "model_config_dict",
    "bag_dims",
    "check_in_dim",
    "prepare_bag",
    "check_positive_ints",
    "check_dropout",
]
