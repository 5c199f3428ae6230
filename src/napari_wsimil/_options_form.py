"""Option forms built by magicgui from a schema: a method's pydantic ``options_cls`` or a model's config dataclass.

``OptionsForm(schema, what)`` makes one magicgui widget per field, in schema order, from the field's annotation,
default, description (the tooltip) and bounds:

    bool -> CheckBox; ``Literal[...]`` -> ComboBox; int / float -> SpinBox / FloatSpinBox with the schema's
    ``ge``/``gt``/``le``/``lt`` bounds (a strict bound is one step inside); str -> LineEdit; Path -> FileEdit;
    ``list[X]`` -> ListEdit of X widgets; an optional value (``X | None``) and anything else (dicts) -> a LineEdit
    holding a YAML value, empty = none.

``values()`` reads the widgets back, ``validated()`` runs them through the same schema (pydantic validates a
model class, and a dataclass through ``pydantic.TypeAdapter``, so its ``__post_init__`` checks run too) and turns
the first error into one ``ConfigError`` naming the field. The form's ``native`` QWidget goes into a dock layout.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import yaml
from magicgui.widgets import Container, LineEdit, create_widget
from magicgui.widgets.bases import ValueWidget
from pydantic import BaseModel, TypeAdapter, ValidationError
from qtpy.QtWidgets import QLabel

from wsimil_core.api import ConfigError, config_field_docs

#: range of a spin box whose field has no bound.
INT_LIMIT = 2**31 - 1
FLOAT_LIMIT = 1e6
MAX_DECIMALS = 8


@dataclasses.dataclass
class FieldSpec:
    """What a form needs to know about one schema field (``default`` None for a required field)."""

    name: str
    annotation: Any
    default: Any
    description: str = ""
    metadata: list[Any] = dataclasses.field(default_factory=list)


def schema_fields(schema: type) -> list[FieldSpec]:
    """The fields of a pydantic model class (``model_fields``, descriptions from ``Field(description=...)``) or of
    a model config dataclass (descriptions from its ``Attributes:`` docstring, as ``wsimil config`` prints them)."""
    if isinstance(schema, type) and issubclass(schema, BaseModel):
        out = []
        for name, info in schema.model_fields.items():
            default = None if info.is_required() else info.get_default(call_default_factory=True)
            out.append(FieldSpec(name, info.annotation, default, info.description or "", list(info.metadata)))
        return out
    if dataclasses.is_dataclass(schema):
        hints = typing.get_type_hints(schema)
        docs = config_field_docs(schema)
        out = []
        for f in dataclasses.fields(schema):
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                default = None
            out.append(FieldSpec(f.name, hints.get(f.name, Any), default, docs.get(f.name, "")))
        return out
    raise TypeError(f"{schema!r} is neither a pydantic model class nor a dataclass")


def _unwrap_optional(annotation: Any) -> tuple[Any, bool]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1 and len(inner) < len(args):
            return inner[0], True
    return annotation, False


def _bounds(metadata: Iterable[Any], step: float) -> tuple[float | None, float | None]:
    lo = hi = None
    for m in metadata:
        if getattr(m, "ge", None) is not None:
            lo = float(m.ge)
        if getattr(m, "gt", None) is not None:
            lo = float(m.gt) + step
        if getattr(m, "le", None) is not None:
            hi = float(m.le)
        if getattr(m, "lt", None) is not None:
            hi = float(m.lt) - step
    return lo, hi


def _decimals(*values: Any) -> int:
    """Decimals a float spin box needs to show ``values`` exactly (at least 3, at most ``MAX_DECIMALS``)."""
    need = 3
    for v in values:
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v:
            text = f"{abs(float(v)):.{MAX_DECIMALS}f}".rstrip("0")
            need = max(need, len(text.split(".")[1]))
    return min(need, MAX_DECIMALS)


def _yaml_text(value: Any) -> str:
    if value is None:
        return ""
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


class _YamlEdit:
    """Reads and writes the text of a LineEdit holding a YAML value (empty = None; ``raw`` keeps str text)."""

    def __init__(self, raw: bool):
        self.raw = raw

    def get(self, widget: LineEdit, name: str) -> Any:
        text = widget.value.strip()
        if not text:
            return None
        if self.raw:
            return widget.value
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"option {name!r}: {text!r} is not a valid value ({exc})") from None

    def set(self, widget: LineEdit, value: Any) -> None:
        widget.value = "" if value is None else (str(value) if self.raw else _yaml_text(value))


def field_widget(spec: FieldSpec) -> tuple[ValueWidget, _YamlEdit | None]:
    """The magicgui widget of one field, and its YAML codec when it is a text field holding a value."""
    inner, optional = _unwrap_optional(spec.annotation)
    label = spec.name.replace("_", " ")
    tip = {"tooltip": spec.description} if spec.description else {}

    def make(value: Any, annotation: Any, **options: Any) -> ValueWidget:
        kwargs = {} if value is None else {"value": value}
        return create_widget(annotation=annotation, name=spec.name, label=label, options={**options, **tip}, **kwargs)

    origin = typing.get_origin(inner)
    if not optional:
        if inner is bool:
            return make(bool(spec.default), bool), None
        if origin is typing.Literal:
            choices = list(typing.get_args(inner))
            return make(spec.default if spec.default in choices else choices[0], inner), None
        if inner is int:
            lo, hi = _bounds(spec.metadata, 1)
            lo_i, hi_i = int(lo) if lo is not None else -INT_LIMIT, int(hi) if hi is not None else INT_LIMIT
            value = int(spec.default) if spec.default is not None else max(0, lo_i)
            return make(value, int, min=lo_i, max=hi_i), None
        if inner is float:
            lo, hi = _bounds(spec.metadata, 10.0 ** -_decimals(spec.default))
            decimals = _decimals(spec.default, lo, hi)
            d = abs(float(spec.default)) if isinstance(spec.default, (int, float)) and spec.default else 0.0
            step = 10 ** math.floor(math.log10(d)) / 10 if d > 0 else 0.01
            lo_f = lo if lo is not None else -FLOAT_LIMIT
            hi_f = hi if hi is not None else FLOAT_LIMIT
            w = make(None, float, min=lo_f, max=hi_f, step=max(step, 10.0**-decimals))
            w.native.setDecimals(decimals)  # magicgui derives decimals from the step only
            w.value = float(spec.default) if spec.default is not None else max(0.0, lo_f)
            return w, None
        if inner is str:
            return make("" if spec.default is None else str(spec.default), str), None
        if isinstance(inner, type) and issubclass(inner, Path):
            return make(spec.default, Path, mode="r"), None
        if origin is list and spec.default is not None:
            try:
                return make(list(spec.default), inner), None
            except (ValueError, TypeError):
                pass  # an item type magicgui has no widget for: a YAML line
    codec = _YamlEdit(raw=inner is str and optional)
    w = LineEdit(name=spec.name, label=label, **tip)
    w.native.setPlaceholderText("empty = none" if optional else "a YAML value")
    codec.set(w, spec.default)
    return w, codec


class OptionsForm:
    """A magicgui form for a schema's fields (see the module docstring).

    Args:
        schema: a pydantic model class (a method's ``options_cls``) or a config dataclass (a model's).
        what: how errors name the schema, e.g. ``"method 'mecds'"``.
        exclude: field names the form leaves out (filled elsewhere, e.g. a model's ``in_dim``).

    Attributes:
        container: the magicgui ``Container``; ``native`` is its QWidget.
        widgets: ``{field name: magicgui widget}``.
        defaults: ``{field name: default}``.
    """

    def __init__(self, schema: type, what: str, exclude: Iterable[str] = ()):
        self.schema = schema
        self.what = what
        skip = set(exclude)
        self.specs = [s for s in schema_fields(schema) if s.name not in skip]
        self.defaults = {s.name: s.default for s in self.specs}
        self.widgets: dict[str, ValueWidget] = {}
        self._codecs: dict[str, _YamlEdit] = {}
        for spec in self.specs:
            widget, codec = field_widget(spec)
            self.widgets[spec.name] = widget
            if codec is not None:
                self._codecs[spec.name] = codec
        self.container = Container(widgets=list(self.widgets.values()), labels=True)
        self.container.native.layout().setContentsMargins(0, 0, 0, 0)
        self._align_labels()

    def _align_labels(self) -> None:
        """Give the row labels one width, so the widgets form a column (magicgui sizes each row alone)."""
        texts = {w.label for w in self.widgets.values()}
        labels = [q for q in self.container.native.findChildren(QLabel) if q.text() in texts]
        width = max((q.sizeHint().width() for q in labels), default=0)
        for q in labels:
            q.setMinimumWidth(width)

    @property
    def native(self) -> Any:
        return self.container.native

    def on_change(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` whenever a field changes."""
        self.container.changed.connect(lambda *_: callback())

    def values(self) -> dict[str, Any]:
        """The fields as the widgets show them (not validated; ``ConfigError`` for unreadable YAML text)."""
        out = {}
        for name, widget in self.widgets.items():
            codec = self._codecs.get(name)
            out[name] = codec.get(widget, name) if codec else widget.value
            if isinstance(out[name], tuple):
                out[name] = list(out[name])
        return out

    def set_values(self, values: dict[str, Any]) -> None:
        """Show these values; a name the form lacks is a ``ConfigError``."""
        unknown = sorted(set(values) - set(self.widgets))
        if unknown:
            raise ConfigError(f"{self.what} has no option(s) {unknown}; it has {sorted(self.widgets)}")
        for name, value in values.items():
            codec = self._codecs.get(name)
            if codec:
                codec.set(self.widgets[name], value)
            elif value is not None:
                self.widgets[name].value = value

    def validated(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """``values()`` (plus ``extra``, e.g. keys the form does not show) validated by the schema, as plain
        JSON-able values. ``ConfigError`` naming the field and the problem."""
        values = {**(extra or {}), **self.values()}
        try:
            if issubclass(self.schema, BaseModel):
                return self.schema.model_validate(values).model_dump(mode="json")
            TypeAdapter(self.schema).validate_python(values)
        except ValidationError as exc:
            first = exc.errors()[0]
            key = ".".join(str(p) for p in first["loc"])
            msg = str(first["msg"]).removeprefix("Value error, ")
            where = f" option {key!r}" if key else ""
            raise ConfigError(f"{self.what}{where}: {msg}") from None
        return values  # as given: a dataclass's __post_init__ may fill derived values (dim 0 -> in_dim)

    def changed(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """The validated values that differ from the schema's defaults (what a config needs to say)."""
        valid = self.validated(extra)
        return {k: v for k, v in valid.items() if k not in self.defaults or v != self.defaults[k]}


__all__ = ["OptionsForm", "FieldSpec", "schema_fields", "field_widget"]
