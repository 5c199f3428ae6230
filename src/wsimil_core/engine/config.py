"""Training configuration: one YAML file validated by a pydantic v2 schema (unknown keys are errors).

Top-level keys: ``method``, ``model``, ``data``, ``train``, ``output`` (see ``docs/training.md``).
``load_config(path, overrides=["train.epochs=3"])`` reads and validates; any problem is a ``ConfigError``
naming the file and the dotted key. ``default_config_yaml(method)`` prints a complete commented default.
Relative paths are taken relative to the current working directory.
"""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

import wsimil_core.methods  # noqa: F401  (registers every model and method)
from wsimil_core.engine.config_sections import (
    DataSection,
    EarlyStoppingSection,
    MethodSection,
    OutputSection,
    SplitSection,
    StrictModel,
    TrainSection,
)
from wsimil_core.errors import ConfigError
from wsimil_core.methods.base import list_methods, method_class
from wsimil_core.models.base import (
    config_field_docs,
    list_models,
    model_class,
    model_config_class,
    rename_model_options,
)


class TrainConfig(StrictModel):
    """A whole training run."""

    method: MethodSection = Field(default_factory=MethodSection, description="training recipe")
    model: dict[str, Any] = Field(
        default_factory=dict, description="model options (in_dim, n_classes/tasks are filled from the data)"
    )
    data: DataSection = Field(default_factory=DataSection, description="data")
    train: TrainSection = Field(default_factory=TrainSection, description="optimisation")
    output: OutputSection = Field(default_factory=OutputSection, description="outputs")

    @field_validator("method", mode="before")
    @classmethod
    def _method_string(cls, v: Any) -> Any:
        return {"name": v} if isinstance(v, str) else v

    @model_validator(mode="after")
    def _fold_in_range(self) -> TrainConfig:
        split = self.data.split
        if split.kind == "kfold" and split.fold >= split.folds:
            raise ValueError(f"data.split.fold={split.fold} must be < data.split.folds={split.folds}")
        surv = self.data.survival
        if surv is not None:
            if surv.task not in self.data.targets:
                if self.data.targets != ["label"]:
                    raise ValueError(f"data.survival.task {surv.task!r} is not in data.targets {self.data.targets}")
                self.data.targets = [surv.task]
            if surv.loss == "cox" and self.train.bags_per_step < 2:
                raise ValueError(
                    "data.survival.loss 'cox' needs train.bags_per_step >= 2 (a risk set of several slides)"
                )
        return self

    def to_json(self) -> dict[str, Any]:
        """JSON-serialisable dict (stored in checkpoints and resume files)."""
        return self.model_dump(mode="json")


# --- loading -------------------------------------------------------------------------------------------------


def _error_text(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        parts.append(f"{key}: {msg}")
    return "; ".join(parts)


def validate_config(data: dict[str, Any], source: str = "config") -> TrainConfig:
    """Validate a dict; a ``ConfigError`` names ``source`` and the dotted key path.

    Old model option names (a model config's ``renamed``) become the new ones, with a ``FutureWarning`` naming
    ``source``.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of method/model/data/train/output")
    try:
        config = TrainConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {_error_text(exc)}") from None
    if config.model:
        config.model = _rename_model_options(config.method.name, config.model, source)
    return config


def apply_overrides(data: dict[str, Any], overrides: list[str] | None, source: str = "--set") -> dict[str, Any]:
    """Apply ``key.path=value`` overrides (values parsed as YAML: ``3``, ``true``, ``[a, b]``, ``null``)."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"{source} {item!r}: expected KEY=VALUE, e.g. train.epochs=3")
        key, raw = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise ConfigError(f"{source} {item!r}: empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{source} {item!r}: value is not valid YAML ({exc})") from None
        node = data
        for p in parts[:-1]:
            if isinstance(node.get(p), str) and p == "method":
                node[p] = {"name": node[p]}
            if node.get(p) is None:
                node[p] = {}
            if not isinstance(node[p], dict):
                raise ConfigError(f"{source} {item!r}: {p!r} is not a mapping")
            node = node[p]
        node[parts[-1]] = value
    return data


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, data: dict[str, Any] | None = None
) -> TrainConfig:
    """Read a YAML config (or take ``data``), apply ``overrides`` and validate.

    Raises ``ConfigError`` naming the file and the dotted key for unknown keys, wrong types and bad YAML.
    """
    source = str(path) if path is not None else "config"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        try:
            raw = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML: {exc}") from None
        data = raw if raw is not None else {}
    if data is not None and not isinstance(data, dict):
        kind = {"list": "a list", "str": "a string", "int": "a number", "float": "a number"}.get(
            type(data).__name__, "a value"
        )
        raise ConfigError(f"{source}: the top level is {kind}; it must be a mapping of method/model/data/train/output")
    data = dict(data or {})
    apply_overrides(data, overrides)
    return validate_config(data, source)


def as_config(config: TrainConfig | dict[str, Any] | str | Path) -> TrainConfig:
    """Accept a ``TrainConfig``, a dict or a YAML path."""
    if isinstance(config, TrainConfig):
        return config
    if isinstance(config, dict):
        return validate_config(config)
    return load_config(config)


# --- model options filled from the data ----------------------------------------------------------------------


def model_fields(model_name: str) -> dict[str, dataclasses.Field]:
    """Fields of a registered model's config dataclass (empty dict when unknown)."""
    if model_name not in list_models():
        return {}
    config_cls = model_config_class(model_name)
    if not dataclasses.is_dataclass(config_cls):
        return {}
    return {f.name: f for f in dataclasses.fields(config_cls)}


def _rename_model_options(method: str, options: dict[str, Any], source: str) -> dict[str, Any]:
    """The ``model:`` section with old option names of ``method``'s model renamed (unknown method: unchanged)."""
    if method not in list_methods():
        return options
    return rename_model_options(method_class(method).model_name, options, source)


def _always_multi_task(model_name: str) -> bool:
    return model_name in list_models() and bool(getattr(model_class(model_name), "multi_task", False))


def fill_model_options(
    model_name: str,
    options: dict[str, Any],
    in_dim: int,
    n_classes: dict[str, int],
    omics_dim: int | None = None,
) -> dict[str, Any]:
    """Fill ``in_dim``, ``n_classes`` / ``tasks`` (and ``omics_dim``) from the data when omitted.

    Multi-target data goes to ``tasks`` ({target: n_classes}) when the model has that field; single-target data
    to ``n_classes``, except for models whose logits are always per task (class attribute ``multi_task = True``,
    e.g. MECDS), which get ``tasks`` named after the target column. Explicit values that contradict the data are a
    ``ConfigError``.
    """
    fields = model_fields(model_name)
    out = dict(options)
    out.setdefault("in_dim", in_dim)
    if out["in_dim"] != in_dim:
        raise ConfigError(f"model.in_dim={out['in_dim']} but the features have dimension {in_dim}")
    targets = list(n_classes)
    if "tasks" in fields and (len(targets) > 1 or "n_classes" not in fields or _always_multi_task(model_name)):
        out.setdefault("tasks", dict(n_classes))
        if dict(out["tasks"]) != dict(n_classes):
            raise ConfigError(f"model.tasks={out['tasks']} but the data's targets have classes {n_classes}")
    elif len(targets) > 1:
        raise ConfigError(
            f"model {model_name!r} is single-task but data.targets lists {targets}; use one target or a "
            "multi-task model"
        )
    else:
        out.setdefault("n_classes", n_classes[targets[0]])
        if out["n_classes"] != n_classes[targets[0]]:
            raise ConfigError(
                f"model.n_classes={out['n_classes']} but target {targets[0]!r} has {n_classes[targets[0]]} classes"
            )
    if "omics_dim" in fields and omics_dim is not None:
        out.setdefault("omics_dim", omics_dim)
    return out


# --- commented default YAML ----------------------------------------------------------------------------------


def _yaml_value(value: Any) -> str:
    if isinstance(value, Path):
        value = str(value)
    text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False).strip()
    if text.endswith("\n..."):
        text = text[: -len("\n...")]
    return text.removesuffix("...").strip()


def _emit_model(model: type[BaseModel] | BaseModel, indent: int, lines: list[str]) -> None:
    pad = "  " * indent
    instance = model if isinstance(model, BaseModel) else model()
    for name, field in type(instance).model_fields.items():
        value = getattr(instance, name)
        if field.description:
            lines.append(f"{pad}# {field.description}")
        if isinstance(value, BaseModel):
            lines.append(f"{pad}{name}:")
            _emit_model(value, indent + 1, lines)
        else:
            lines.append(f"{pad}{name}: {_yaml_value(value)}")


def _model_docs(model_name: str) -> dict[str, str]:
    """One-line description of each field of a registered model's config (its ``Attributes:`` docstring)."""
    return config_field_docs(model_config_class(model_name)) if model_name in list_models() else {}


def _comment_lines(text: str, width: int = 110) -> list[str]:
    """``text`` wrapped into comment lines of at most ``width`` characters (no line for an empty text)."""
    return textwrap.wrap(text.replace("``", "`"), width) if text else []


def default_config_yaml(method: str = "abmil") -> str:
    """A complete commented default config for ``method`` (valid YAML; ``load_config`` accepts it)."""
    cls = method_class(method)
    lines = [
        f"# wsimil training config for method {method!r}",
        f"# {(cls.__doc__ or '').strip().splitlines()[0] if cls.__doc__ else ''}".rstrip(),
        "# Run: wsimil train THIS.yaml   (override any key: --set train.epochs=3)",
        "method:",
        f"  name: {method}",
        "  options:",
    ]
    options = cls.options_cls()
    fields = type(options).model_fields
    if not fields:
        lines[-1] = "  options: {}"
    for name, field in fields.items():
        if field.description:
            lines.append(f"    # {field.description}")
        lines.append(f"    {name}: {_yaml_value(getattr(options, name))}")
    lines.append(f"# model {cls.model_name!r}; in_dim and n_classes/tasks are filled from the data when omitted")
    mfields = [f for f in model_fields(cls.model_name).values() if f.name not in ("in_dim", "n_classes", "tasks")]
    docs = _model_docs(cls.model_name)
    if not mfields:
        lines.append("model: {}")
    else:
        lines.append("model:")
        for f in mfields:
            if f.default is not dataclasses.MISSING:
                value = f.default
            elif f.default_factory is not dataclasses.MISSING:
                value = f.default_factory()
            else:
                continue
            lines.extend(f"  # {line}" for line in _comment_lines(docs.get(f.name, "")))
            lines.append(f"  {f.name}: {_yaml_value(value)}")
    for section in ("data", "train", "output"):
        field = TrainConfig.model_fields[section]
        lines.append(f"# {field.description}")
        lines.append(f"{section}:")
        _emit_model(getattr(TrainConfig(), section), 1, lines)
    return "\n".join(lines) + "\n"


__all__ = [
    "TrainConfig",
    "MethodSection",
    "DataSection",
    "SplitSection",
    "TrainSection",
    "EarlyStoppingSection",
    "OutputSection",
    "load_config",
    "validate_config",
    "apply_overrides",
    "as_config",
    "fill_model_options",
    "default_config_yaml",
]
