"""Per-patch map layers (no Qt): each map the model returns as a napari layer-data tuple over the patch grid.

Where the grid lies in world units is :mod:`napari_wsimil._grid` (``GridGeometry``).

Maps are drawn from their :class:`~wsimil_core.api.MapSpec` only (DESIGN.md "Models, maps and
methods"), never from their name:

* ``categorical`` / ``binary``: a Labels layer, label ``i + 1`` for the spec's i-th category (0 = no patch or no
  category), one fixed colour per category, the category names in the layer's ``features`` (so the status bar
  shows them) and in ``metadata["wsimil"]["legend"]``;
* ``scalar`` / ``probability`` / ``signed``: an Image layer with the spec's colormap made transparent at the low
  end (``signed``: a diverging map transparent at 0 over a range symmetric about 0), the spec's range (else
  ``[0, 1]`` for probabilities, else the data's), and ``metadata["wsimil"]["colorbar"] = True``: the viewer
  helpers turn napari's colorbar overlay on (a tuple cannot carry it);
* a map without a spec (stores written before specs existed) is drawn as ``scalar`` with a
  :class:`MapSpecWarning` naming it.

Layer-data tuples are ``(data, kwargs, layer_type)`` as napari readers return them.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from napari_wsimil._grid import META_KEY, GridGeometry, LayerData, layer_units
from wsimil_core.api import DataError, MapSpec, primary_map_names

#: opacity of scalar map layers (their colormap is also transparent at the low end) and of label layers
DEFAULT_OPACITY = 0.75
LABELS_OPACITY = 0.7
#: fraction of the colour range over which a scalar colormap's alpha ramps up from 0 (signed: on each side of 0)
ALPHA_RAMP = 0.25
#: colours of categories 0, 1, 2... (RGBA in [0, 1]); cycled when there are more categories
CATEGORY_COLORS = tuple(
    tuple(int(h[i : i + 2], 16) / 255 for i in (0, 2, 4)) + (1.0,)
    for h in (
        "1f77b4 ff7f0e 2ca02c d62728 9467bd 8c564b e377c2 17becf bcbd22 7f7f7f "
        "aec7e8 ffbb78 98df8a ff9896 c5b0d5 c49c94 f7b6d2 9edae5 dbdb8d 393b79"
    ).split()
)
#: binary maps: category 0 (e.g. "not routed", "pruned") faint grey, category 1 a strong orange
BINARY_COLORS = ((0.6, 0.6, 0.6, 0.35), (1.0, 0.5, 0.05, 1.0))
TRANSPARENT = (0.0, 0.0, 0.0, 0.0)


class MapSpecWarning(UserWarning):
    """A map arrived without a usable MapSpec (an older store), or its values do not fit its spec."""


def rasterize(values: np.ndarray, cells: np.ndarray, shape: tuple[int, int], fill: float = np.nan) -> np.ndarray:
    """Scatter per-patch values onto the grid image.

    Args:
        values: ``[n]`` or ``[n, K]`` values of the first ``n`` patches.
        cells: int ``[>= n, 2]`` (col, row) cell of each patch (only the first ``n`` rows are used).
        shape: (rows, cols) of the grid.
        fill: value of cells without a patch (NaN: no tissue).

    Returns:
        float32 ``[rows, cols]``, or ``[K, rows, cols]`` for ``[n, K]`` values.
    """
    v = np.asarray(values, dtype=np.float32)
    n = v.shape[0]
    c = np.asarray(cells)[:n]
    rows, cols = int(shape[0]), int(shape[1])
    if v.ndim == 1:
        out = np.full((rows, cols), fill, dtype=np.float32)
        out[c[:, 1], c[:, 0]] = v
        return out
    k = v.shape[1]
    out = np.full((k, rows, cols), fill, dtype=np.float32)
    out[:, c[:, 1], c[:, 0]] = v.T
    return out


def as_spec(name: str, spec: MapSpec | Mapping[str, Any] | None) -> MapSpec:
    """``spec`` as a :class:`MapSpec` (a ``to_dict()`` form is converted); None gives a ``scalar`` spec and a
    :class:`MapSpecWarning` naming the map."""
    if isinstance(spec, MapSpec):
        return spec
    if spec is not None:
        return MapSpec.from_dict({"name": name, **dict(spec)})
    warnings.warn(
        f"map {name!r} has no MapSpec (written before wsimil stored specs?); drawn as a scalar map",
        MapSpecWarning,
        stacklevel=3,
    )
    return MapSpec(name, "scalar", "no spec stored with this map")


def category_labels(spec: MapSpec, values: np.ndarray) -> np.ndarray:
    """int32 label of each value: ``i + 1`` for the spec's i-th category code, 0 for NaN or an unknown code
    (warned once, naming the map)."""
    v = np.asarray(values, dtype=np.float64)
    lab = np.zeros(v.shape, dtype=np.int32)
    finite = np.isfinite(v)
    for i, code in enumerate(spec.category_codes):
        lab[finite & (v == code)] = i + 1
    bad = finite & (lab == 0)
    if bad.any():
        shown = sorted({float(a) for a in v[bad]})[:5]
        warnings.warn(
            f"map {spec.name!r}: values {shown} are not codes of its categories {spec.category_codes}; left blank",
            MapSpecWarning,
            stacklevel=3,
        )
    return lab


def label_colormap(spec: MapSpec) -> Any:
    """napari ``DirectLabelColormap``: label ``i + 1`` -> the colour of category i, 0 transparent."""
    from napari.utils.colormaps import DirectLabelColormap

    palette = BINARY_COLORS if spec.kind == "binary" else CATEGORY_COLORS
    colors: dict[int | None, Any] = {None: TRANSPARENT, 0: TRANSPARENT}
    for i in range(len(spec.categories)):
        colors[i + 1] = palette[i % len(palette)]
    return DirectLabelColormap(color_dict=colors)


def overlay_colormap(spec: MapSpec) -> Any:
    """A napari ``Colormap`` from the spec's colormap whose alpha ramps from 0 at the low end (``signed``: from 0
    at the centre, i.e. at value 0 over a symmetric range), so the tissue below stays visible."""
    from napari.utils.colormaps import Colormap, ensure_colormap

    fallback = "coolwarm" if spec.kind == "signed" else "inferno"
    try:
        base = ensure_colormap(spec.colormap)
    except (KeyError, ValueError, TypeError):
        warnings.warn(
            f"map {spec.name!r}: napari has no colormap {spec.colormap!r}; using {fallback!r}",
            MapSpecWarning,
            stacklevel=3,
        )
        base = ensure_colormap(fallback)
    t = np.linspace(0.0, 1.0, 257)  # odd: 0.5 (value 0 of a signed map) is a control point
    colors = np.asarray(base.map(t), dtype=np.float64).copy()
    if spec.kind == "signed":
        alpha = np.clip(np.abs(t - 0.5) / (ALPHA_RAMP / 2), 0.0, 1.0)
        how = "transparent at 0"
    else:
        alpha = np.clip(t / ALPHA_RAMP, 0.0, 1.0)
        how = "transparent low end"
    colors[:, 3] *= alpha
    # a short display name: the layer controls widen to fit it (a long one squeezes the canvas)
    return Colormap(colors, controls=t, name=f"wsimil {base.name} ({how})", display_name=f"{base.name} α")


def display_range(spec: MapSpec, values: np.ndarray) -> tuple[float, float]:
    """Contrast limits: the spec's range, else ``(0, 1)`` for probabilities, ``(-m, m)`` with ``m = max |v|`` for
    signed maps, the finite data range otherwise (see :func:`contrast_limits`)."""
    if spec.range is not None:
        return (float(spec.range[0]), float(spec.range[1]))
    if spec.kind == "probability":
        return (0.0, 1.0)
    if spec.kind == "signed":
        v = np.asarray(values, dtype=np.float64)
        v = v[np.isfinite(v)]
        m = float(np.abs(v).max()) if v.size else 0.0
        m = m or 1.0
        return (-m, m)
    return contrast_limits(values)


def contrast_limits(values: np.ndarray) -> tuple[float, float]:
    """Finite (min, max) of ``values``, widened when constant; (0, 1) when nothing is finite."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return (0.0, 1.0)
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        pad = abs(lo) * 0.01 or 1.0
        return (lo - pad, hi + pad)
    return (lo, hi)


def map_layer_name(name: str, prefix: str = "") -> str:
    """Layer name of a map: the map's slash path, after an optional prefix (``"<slide>: "``)."""
    return f"{prefix}{name}"


def map_layer_data(
    name: str,
    values: np.ndarray,
    geometry: GridGeometry,
    coords: np.ndarray,
    *,
    spec: MapSpec | Mapping[str, Any] | None = None,
    prefix: str = "",
    extra_meta: Mapping[str, Any] | None = None,
) -> LayerData:
    """The layer of one per-patch map (values of the first ``len(values)`` patches of ``coords``), drawn as its
    ``spec`` says (see the module docstring; None: scalar with a :class:`MapSpecWarning`).

    ``[N]`` maps give a ``[rows, cols]`` grid image (NaN / label 0 where there is no patch), ``[N, K]`` maps a
    ``[K, rows, cols]`` one whose first axis is a slider. The layer's ``metadata["wsimil"]`` holds ``kind``,
    ``map``, ``map_kind`` (the spec's kind), ``spec`` (its dict), ``description``, the geometry, ``legend``
    (``{label: category name}`` of the categories present, categorical maps) or ``colorbar`` (scalar kinds), and
    anything in ``extra_meta``.
    """
    spec = as_spec(name, spec)
    v = np.asarray(values, dtype=np.float32)
    if v.ndim == 2 and v.shape[1] == 1:
        v = v[:, 0]
    if v.ndim not in (1, 2):
        raise DataError(f"map {name!r} has shape {v.shape}; expected [N] or [N, K]")
    geometry = geometry.with_coords(coords)
    cells = geometry.cell_index(coords)
    if len(cells) < v.shape[0]:
        raise DataError(f"map {name!r} has {v.shape[0]} values for {len(cells)} patches")
    meta = {
        "kind": "map",
        "map_kind": spec.kind,
        "map": name,
        "spec": spec.to_dict(),
        "description": spec.description,
        "geometry": geometry.to_dict(),
        **(extra_meta or {}),
    }
    kwargs: dict[str, Any] = {"name": map_layer_name(name, prefix), "metadata": {META_KEY: meta}}
    scale, translate = geometry.scale, geometry.translate
    if spec.is_categorical:
        lab = category_labels(spec, v)
        present = sorted({int(a) for a in np.unique(lab)} - {0})
        meta["legend"] = {i: spec.categories[i - 1] for i in present}
        data = rasterize(lab.astype(np.float32), cells, geometry.shape, fill=0.0).astype(np.int32)
        if data.ndim == 3:
            scale, translate = (1.0, *scale), (0.0, *translate)
        kwargs.update(
            scale=scale,
            translate=translate,
            opacity=LABELS_OPACITY,
            units=layer_units(geometry.units, data.ndim),
            colormap=label_colormap(spec),
            features={"index": list(range(len(spec.categories) + 1)), "category": ["", *spec.categories]},
        )
        return data, kwargs, "labels"
    data = rasterize(v, cells, geometry.shape)
    if data.ndim == 3:
        scale, translate = (1.0, *scale), (0.0, *translate)
        meta["channels"] = int(data.shape[0])
    meta["colorbar"] = True
    kwargs.update(
        scale=scale,
        translate=translate,
        units=layer_units(geometry.units, data.ndim),
        colormap=overlay_colormap(spec),
        opacity=DEFAULT_OPACITY,
        contrast_limits=display_range(spec, v),
        blending="translucent",
        interpolation2d="nearest",
    )
    return data, kwargs, "image"


def maps_layer_data(
    maps: Mapping[str, np.ndarray],
    geometry: GridGeometry,
    coords: np.ndarray,
    *,
    specs: Mapping[str, MapSpec | Mapping[str, Any]] | None = None,
    prefix: str = "",
    extra_meta: Mapping[str, Any] | None = None,
    hide_secondary: bool = True,
) -> list[LayerData]:
    """One layer per map (see :func:`map_layer_data`), in the maps' order; ``specs`` maps a map name to its
    ``MapSpec`` (or its ``to_dict()`` form, as ``FeatureStore.read_map_specs`` returns). With ``hide_secondary``,
    only the primary maps (``primary_map_names``: one per task) are visible, so a 15-map model does not cover the
    slide with 15 layers; the others are listed, hidden."""
    specs = specs or {}
    out = [
        map_layer_data(name, values, geometry, coords, spec=specs.get(name), prefix=prefix, extra_meta=extra_meta)
        for name, values in maps.items()
    ]
    if hide_secondary and out:
        primary = set(primary_map_names([layer[1]["metadata"][META_KEY]["spec"] for layer in out]))
        for _, kwargs, _ in out:
            if kwargs["metadata"][META_KEY]["map"] not in primary:
                kwargs["visible"] = False
    return out


def legend_text(legend: Mapping[int, str], colors: Mapping[int, Sequence[float]] | None = None) -> str:
    """Compact HTML legend: ``■ name`` entries on wrapped lines (colour swatches when ``colors`` maps label id
    -> RGBA in [0, 1]); an entry never breaks inside."""
    lines = []
    for label, name in sorted(legend.items()):
        text = str(name).replace(" ", "&nbsp;")
        rgba = (colors or {}).get(label)
        if rgba is not None:
            r, g, b = (int(round(255 * float(c))) for c in list(rgba)[:3])
            lines.append(f'<span style="color:#{r:02x}{g:02x}{b:02x}">&#9632;</span>&nbsp;{text}')
        else:
            lines.append(f"{label}:&nbsp;{text}")
    return " &nbsp; ".join(lines)


__all__ = [
    "MapSpecWarning",
    "as_spec",
    "category_labels",
    "contrast_limits",
    "display_range",
    "label_colormap",
    "legend_text",
    "map_layer_data",
    "map_layer_name",
    "maps_layer_data",
    "overlay_colormap",
    "rasterize",
]
