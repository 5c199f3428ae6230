"""Per-patch map declarations (DESIGN.md "Models, maps and methods"): ``MapSpec``, ``MAP_KINDS``,
``map_specs_of`` and ``primary_map_names``.

A model declares every map it can emit (``model.map_specs() -> list[MapSpec]``); the specs travel with the maps
into the store and the checkpoint, and the plugin, the GeoJSON export and the docs render maps from them only.
``wsimil_core.models.base`` re-exports these names (the model contract imports them from there).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

MAP_KINDS = ("scalar", "probability", "signed", "categorical", "binary")


@dataclass(frozen=True)
class MapSpec:
    """How one per-patch map of a model is read and drawn (DESIGN.md "Models, maps and methods").

    Every map a model can emit is declared once by the model (``model.map_specs()``); the specs travel with the
    maps into the store and the checkpoint, and the plugin, GeoJSON export and docs render maps from them only.

    Attributes:
        name: the map's key in ``MILOutput.maps`` (a slash path such as ``attention/head3``).
        kind: ``scalar`` (any real value), ``probability`` (in [0, 1]), ``signed`` (centred on 0),
            ``categorical`` (an integer category code, see ``codes``) or ``binary`` (0 / 1, or ``codes``).
        description: one line saying what the value means.
        categories: names of the K categories of ``categorical`` and ``binary`` maps, in order
            (e.g. ``("not routed", "routed")``, memory components ``("C-16", ..., "C-1", "C+1", ..., "C+16")``).
        codes: the map value of each category (same length as ``categories``); empty means ``0..K-1``
            (e.g. MoMKD's signed component ids ``-16..-1, 1..16``).
        colormap: suggested napari colormap name for scalar kinds (categorical maps use label colours).
        range: suggested display range ``(low, high)``; None means "from the data".
        channels: names of the K columns of an ``[N, K]`` map; empty for ``[N]`` maps.
        primary: the map a viewer shows first (one per task: the attention heatmap); the other maps are shown
            on demand (``primary_map_names``).
    """

    name: str
    kind: str
    description: str
    categories: tuple[str, ...] = ()
    colormap: str = "inferno"
    range: tuple[float, float] | None = None
    channels: tuple[str, ...] = ()
    codes: tuple[int, ...] = ()
    primary: bool = False

    def __post_init__(self) -> None:
        if self.kind not in MAP_KINDS:
            raise ValueError(f"map {self.name!r}: kind must be one of {MAP_KINDS}, got {self.kind!r}")
        if self.kind in ("categorical", "binary") and not self.categories:
            raise ValueError(f"map {self.name!r}: a {self.kind} map needs its category names")
        if self.kind == "binary" and len(self.categories) != 2:
            raise ValueError(f"map {self.name!r}: a binary map has exactly two category names")
        if self.codes and (len(self.codes) != len(self.categories) or len(set(self.codes)) != len(self.codes)):
            raise ValueError(f"map {self.name!r}: codes must give one distinct value per category")

    @property
    def category_codes(self) -> tuple[int, ...]:
        """The map value of each category: ``codes``, or ``0..K-1``."""
        return tuple(int(c) for c in self.codes) if self.codes else tuple(range(len(self.categories)))

    def category_of(self, value: float) -> str | None:
        """The name of the category whose code is ``value`` (None for NaN, a non-integer or an unknown code)."""
        try:
            v = float(value)
        except (TypeError, ValueError):
            return None
        if v != v or abs(v) == float("inf") or v != int(v):  # NaN, infinite or not an integer
            return None
        codes = self.category_codes
        return self.categories[codes.index(int(v))] if int(v) in codes else None

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
            "codes": [int(c) for c in self.codes],
            "primary": bool(self.primary),
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
            codes=tuple(int(c) for c in data.get("codes") or ()),
            primary=bool(data.get("primary", False)),
        )


def map_specs_of(model: nn.Module) -> list[MapSpec]:
    """The ``MapSpec`` of every map ``model`` can emit (``model.map_specs()``; [] for a model declaring none)."""
    declare = getattr(model, "map_specs", None)
    return list(declare()) if callable(declare) else []


def primary_map_names(specs: Sequence[MapSpec | Mapping[str, Any]]) -> list[str]:
    """Names of the maps a viewer shows first, in declared order: the specs flagged ``primary`` (one per task),
    else (specs stored before the flag existed) the first declared map; [] for no specs.

    ``specs``: ``MapSpec`` objects or their ``to_dict()`` forms."""
    as_specs = [s if isinstance(s, MapSpec) else MapSpec.from_dict(dict(s)) for s in specs]
    flagged = [s.name for s in as_specs if s.primary]
    return flagged or [s.name for s in as_specs[:1]]


__all__ = ["MAP_KINDS", "MapSpec", "map_specs_of", "primary_map_names"]
