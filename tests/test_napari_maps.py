"""Acceptance (issue 12): every map of every registered model, rendered by the plugin's layer builder from the
model's MapSpecs: categorical / binary -> Labels with the declared category names; scalar kinds -> Image with the
colorbar on. Layer data needs no viewer; the colorbar is checked on real layers in a ``ViewerModel`` (no Qt)."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from napari_wsimil._grid import GridGeometry  # noqa: E402
from napari_wsimil._map_layers import MapSpecWarning, maps_layer_data  # noqa: E402
from napari_wsimil._reader import store_slide_layers  # noqa: E402
from napari_wsimil._viewer import add_layers  # noqa: E402
from test_model_contract import ALL_MODELS, run_small  # noqa: E402
from wsimil_core.api import FeatureStore, MapSpec  # noqa: E402


def _values_for(spec: MapSpec, n: int, rng: np.random.Generator) -> np.ndarray:
    """Plausible values of a declared map that the forward pass does not emit (e.g. predictor-only maps)."""
    shape = (n, len(spec.channels)) if spec.channels else (n,)
    if spec.is_categorical:
        return rng.choice(np.array(spec.category_codes, np.float32), size=shape)
    return rng.random(shape).astype(np.float32)


def model_maps(name: str) -> tuple[list[MapSpec], dict[str, np.ndarray], np.ndarray]:
    """``(specs, maps, coords)``: every declared map of ``name``, emitted ones from a forward pass on a random bag
    whose coords lie on a 256-px grid."""
    model, out, coords = run_small(name)
    specs = model.map_specs()
    rng = np.random.default_rng(0)
    n = coords.shape[0]
    maps = {s.name: out.maps[s.name].float().numpy() if s.name in out.maps else _values_for(s, n, rng) for s in specs}
    return specs, maps, coords.numpy()


@pytest.mark.parametrize("name", ALL_MODELS)
def test_every_map_of_every_model_renders_as_its_spec_says(name):
    from napari.components import ViewerModel

    specs, maps, coords = model_maps(name)
    geometry = GridGeometry.from_coords(coords, 256, mpp=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", MapSpecWarning)  # every map has a spec, and its values fit it
        layers = maps_layer_data(maps, geometry, coords, specs={s.name: s for s in specs}, prefix=f"{name}: ")
    assert len(layers) == len(specs)
    viewer = ViewerModel()
    for spec, (data, kwargs, layer_type), layer in zip(specs, layers, add_layers(viewer, layers)):
        meta = kwargs["metadata"]["wsimil"]
        assert meta["map"] == spec.name and meta["map_kind"] == spec.kind
        assert meta["spec"] == spec.to_dict() and layer.name == f"{name}: {spec.name}"
        if spec.is_categorical:
            assert layer_type == "labels" and layer._type_string == "labels", spec.name
            assert data.dtype == np.int32
            assert list(layer.features["category"]) == ["", *spec.categories]
            assert set(meta["legend"].values()) <= set(spec.categories)
            # each patch's label is its category: the legend name of the label is the category of its value
            cells = geometry.with_coords(coords).cell_index(coords)
            for (col, row), v in zip(cells, maps[spec.name]):
                label = int(data[row, col])
                assert spec.categories[label - 1] == spec.category_of(v), (spec.name, v, label)
            assert "colorbar" not in meta
        else:
            assert layer_type == "image" and layer._type_string == "image", spec.name
            assert meta["colorbar"] is True and layer.colorbar.visible, spec.name
            assert layer.colormap.map(np.array([0.0]))[0, 3] == 0.0 or spec.kind == "signed"  # transparent low end
            lo, hi = kwargs["contrast_limits"]
            assert lo < hi


def test_categorical_kinds_of_the_issue():
    """The maps issue 12 found drawn wrongly: MoMKD components and nearest indices, MECDS routing."""
    kinds = {s.name: s for name in ("momkd", "mecds") for s in run_small(name)[0].map_specs()}
    assert kinds["memory/component"].kind == "categorical" and "C+3" in kinds["memory/component"].categories
    assert kinds["memory/nearest_pos"].is_categorical and kinds["memory/nearest_neg"].is_categorical
    assert kinds["memory/score"].kind == "signed"
    assert kinds["routing/a"].kind == "binary" and kinds["routing/a"].categories == ("not routed", "routed")
    assert kinds["routing/a/weight"].kind == "scalar"


def test_store_reader_draws_maps_from_the_stored_specs(tmp_path):
    torch.manual_seed(0)
    specs, maps, coords = model_maps("momkd")
    fs = FeatureStore(tmp_path / "store", create=True)
    fs.write_bag("s1", np.zeros((len(coords), 4), np.float32), coords, "toy", {"dim": 4}, patch_size_level0=256)
    with_spec = {s.name: s.to_dict() for s in specs if s.name != "attention"}
    fs.write_maps("s1", "ck", maps, specs=with_spec)
    with pytest.warns(MapSpecWarning, match="'attention' has no MapSpec"):  # an old map: scalar, with a warning
        layers = store_slide_layers(fs.root, "s1", open_image=False)
    got = {kw["metadata"]["wsimil"]["map"]: (kind, kw["metadata"]["wsimil"]["map_kind"]) for _, kw, kind in layers}
    assert got["memory/component"] == ("labels", "categorical")
    assert got["memory/score"] == ("image", "signed")
    assert got["attention"] == ("image", "scalar")
