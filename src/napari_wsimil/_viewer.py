"""Putting layer data into a viewer (napari ``ViewerModel`` or ``Viewer``; no Qt): adding layers, turning on the
colorbar of scalar maps, and keeping a set of map layers up to date while inference refines them."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from napari_wsimil._grid import META_KEY, GridGeometry, LayerData, PatchLookup, attach_patch_status
from napari_wsimil._map_layers import as_spec, map_layer_data
from wsimil_core.api import MapSpec, primary_map_names, slide_id_from_path


def show_colorbar(layer: Any) -> bool:
    """Turn napari's colorbar overlay on for a layer whose ``metadata["wsimil"]["colorbar"]`` asks for it (scalar
    maps); returns whether the colorbar is now on (False when napari has no colorbar for this layer)."""
    meta = layer.metadata.get(META_KEY) if isinstance(layer.metadata, dict) else None
    colorbar = getattr(layer, "colorbar", None)
    if not isinstance(meta, dict) or not meta.get("colorbar") or colorbar is None:
        return False
    colorbar.visible = True
    return True


def watch_colorbars(viewer: Any) -> None:
    """Show the colorbar of every scalar map layer added to ``viewer`` from now on, also by napari itself (a reader
    returns tuples, which cannot carry the colorbar). Idempotent per viewer."""
    if getattr(viewer, "_wsimil_colorbars", False):
        return
    viewer.layers.events.inserted.connect(lambda event: show_colorbar(event.value))
    viewer._wsimil_colorbars = True


def add_layers(viewer: Any, layer_data: Iterable[LayerData]) -> list[Any]:
    """Add ``(data, kwargs, type)`` tuples to ``viewer`` (scalar maps with their colorbar on); returns the layers."""
    from napari.layers import Layer

    added = []
    for data, kwargs, layer_type in layer_data:
        layer = Layer.create(data, dict(kwargs), layer_type)
        viewer.add_layer(layer)
        show_colorbar(layer)
        added.append(layer)
    return added


def slide_layers_of(viewer: Any) -> list[Any]:
    """The viewer's slide image layers (made by this plugin's reader)."""
    return [
        lyr
        for lyr in viewer.layers
        if isinstance(lyr.metadata.get(META_KEY), dict) and lyr.metadata[META_KEY].get("kind") == "slide"
    ]


def legend_colors(layer: Any, legend: Mapping[int, str]) -> dict[int, Any]:
    """RGBA colour of each label id of a Labels layer (empty when the layer cannot tell)."""
    colors = {}
    for label in legend:
        try:
            colors[label] = np.asarray(layer.get_color(int(label)), dtype=float)
        except Exception:  # noqa: BLE001 - legend colours are cosmetic
            return {}
    return colors


def _same_path(a: Any, b: Any) -> bool:
    try:
        return a is not None and Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


class MapLayerSet:
    """The layers of one slide's maps, updated in place as new (partial or final) maps arrive.

    With ``primary_only``, only the primary maps (``primary_map_names`` of the specs: one per task) become layers;
    the others stay available (``available()``) and :meth:`show` adds one on demand (the dock's map picker).

    Args:
        viewer: the napari viewer (model).
        prefix: layer-name prefix (e.g. ``"<slide> · "``); the map's slash path follows.
        extra_meta: added to every layer's ``metadata["wsimil"]`` (slide path, checkpoint...).
        specs: ``{map name: MapSpec}`` (or ``to_dict()`` forms) of the maps to come; ``update`` may add more.
        primary_only: add layers for the primary maps only (default: every map).
    """

    def __init__(
        self,
        viewer: Any,
        prefix: str = "",
        extra_meta: Mapping[str, Any] | None = None,
        *,
        specs: Mapping[str, MapSpec | Mapping[str, Any]] | None = None,
        primary_only: bool = False,
    ):
        self.viewer = viewer
        self.prefix = prefix
        self.extra_meta = dict(extra_meta or {})
        self.specs: dict[str, MapSpec] = {name: as_spec(name, s) for name, s in (specs or {}).items()}
        self.layers: dict[str, Any] = {}
        self.lookup: PatchLookup | None = None
        self.primary_only = primary_only
        #: maps shown as layers on demand (``show``), besides the primary ones
        self.requested: set[str] = set()
        self._last: tuple[dict[str, np.ndarray], GridGeometry, np.ndarray] | None = None

    def available(self) -> list[str]:
        """Every map of the last update, in the model's order (shown or not)."""
        return list(self._last[0]) if self._last is not None else []

    def shown(self) -> list[str]:
        """The maps that are (or become, at the next update) layers: all, or the primary and requested ones."""
        names = self.available()
        if not self.primary_only:
            return names
        primary = set(primary_map_names([self.specs[n] for n in names if n in self.specs]))
        return [n for n in names if n in primary or n in self.requested]

    def show(self, name: str) -> Any:
        """Add (or re-add) the layer of map ``name`` from the last update; returns the layer."""
        if name not in self.available():
            raise KeyError(f"no map {name!r}; the last result has {self.available()}")
        self.requested.add(name)
        maps, geometry, coords = self._last  # type: ignore[misc]
        self.update(maps, geometry, coords)
        return self.layers[name]

    def update(
        self,
        maps: Mapping[str, np.ndarray],
        geometry: GridGeometry,
        coords: np.ndarray,
        *,
        specs: Mapping[str, MapSpec | Mapping[str, Any]] | None = None,
    ) -> list[Any]:
        """Show ``maps`` (values of the first ``len(values)`` patches of ``coords``), each drawn as its spec says
        (``specs`` adds to those given at construction; a map without one is drawn as scalar with a warning);
        returns the layers."""
        from napari.layers import Layer

        self.specs.update({name: as_spec(name, s) for name, s in (specs or {}).items()})
        for name in maps:  # warn once per map without a spec, not at every progressive update
            if name not in self.specs:
                self.specs[name] = as_spec(name, None)
        previous = self._last
        self._last = (dict(maps), geometry, np.asarray(coords))
        # a map whose values are the very array already shown on this grid (the final update of a run repeats
        # the whole prediction reported just before the maps were written) keeps its layer as it is
        unchanged = (
            set()
            if previous is None or previous[1] != geometry or not np.array_equal(previous[2], coords)
            else {name for name, values in maps.items() if previous[0].get(name) is values}
        )
        if self.lookup is None or self.lookup.coords.shape != np.asarray(coords).shape:
            self.lookup = PatchLookup(geometry, coords)
        self.lookup.maps = dict(maps)
        self.lookup.specs = dict(self.specs)
        meta = {**self.extra_meta, "coords": np.asarray(coords)}
        for name in self.shown():
            values = maps[name]
            kept = self.layers.get(name)
            if name in unchanged and kept is not None and kept in self.viewer.layers:
                continue
            data, kwargs, layer_type = map_layer_data(
                name, values, geometry, coords, spec=self.specs[name], prefix=self.prefix, extra_meta=meta
            )
            layer = self.layers.get(name)
            same = (
                layer is not None
                and layer in self.viewer.layers
                and layer._type_string == layer_type
                and np.shape(layer.data) == np.shape(data)
            )
            if same:
                layer.data = data
                layer.metadata = kwargs["metadata"]
                if layer_type == "image":
                    layer.contrast_limits = kwargs["contrast_limits"]
                    if layer.colormap.name != kwargs["colormap"].name:
                        layer.colormap = kwargs["colormap"]
            else:
                if layer is not None and layer in self.viewer.layers:
                    self.viewer.layers.remove(layer)
                layer = Layer.create(data, dict(kwargs), layer_type)
                self.viewer.add_layer(layer)
                self.layers[name] = layer
            show_colorbar(layer)
            attach_patch_status(layer, self.lookup)
        want = self.extra_meta.get("slide_path")
        for slide_layer in slide_layers_of(self.viewer):
            if not want or _same_path(slide_layer.metadata[META_KEY].get("slide_path"), want):
                attach_patch_status(slide_layer, self.lookup)
        return [self.layers[n] for n in maps if n in self.layers]

    def remove(self) -> None:
        """Remove this set's layers from the viewer."""
        for layer in self.layers.values():
            if layer in self.viewer.layers:
                self.viewer.layers.remove(layer)
        self.layers.clear()
        self.lookup = None


def run_layer_set(
    sets: dict[tuple[str, ...], MapLayerSet],
    viewer: Any,
    request: Any,
    checkpoint_id: str | None,
    region: str | None = None,
) -> MapLayerSet:
    """The :class:`MapLayerSet` of an inference run (``request``: its ``slide_path`` and ``checkpoint``; ``region``:
    the region layer's name or None), kept in ``sets``: the same slide, checkpoint and region reuse
    theirs (layers updated in place), anything else gets a new set, so earlier runs' layers stay. Layers are named
    ``<slide> · <map>`` (``<slide> · <region> · <map>``; slide: the file's slide id), show the primary maps only, and carry the checkpoint
    (path and id) and slide path in ``metadata["wsimil"]``."""
    slide_path, checkpoint = str(request.slide_path), str(request.checkpoint)
    key = (slide_path, checkpoint, region or "")
    found = sets.get(key)
    if found is None:
        meta = {"slide_path": slide_path, "checkpoint": checkpoint, "checkpoint_id": checkpoint_id}
        if region:
            meta["region"] = region
        prefix = f"{slide_id_from_path(slide_path)} · " + (f"{region} · " if region else "")
        found = sets[key] = MapLayerSet(viewer, prefix, meta, primary_only=True)
    return found


__all__ = [
    "MapLayerSet",
    "run_layer_set",
    "add_layers",
    "legend_colors",
    "show_colorbar",
    "slide_layers_of",
    "watch_colorbars",
]
