"""napari plugin, layer logic (no display): slide pyramid and per-patch maps line up in world µm at every level."""

from __future__ import annotations

import numpy as np
import pytest

from napari_wsimil._grid import GridGeometry, PatchLookup, attach_patch_status
from napari_wsimil._map_layers import MapSpecWarning, map_layer_data, rasterize
from napari_wsimil._slide_layers import slide_layer_data
from napari_wsimil._viewer import MapLayerSet, add_layers
from wsimil_core.api import MapSpec
from wsimil_core.errors import DataError
from wsimil_core.wsi.slide import open_slide
from wsimil_core.wsi.tiling import GridSpec, make_grid
from wsimil_core.wsi.writer import write_pyramid_tiff

MPP = 0.5
CELL = 128
ATTENTION = MapSpec("attention", "scalar", "attention weight")
COMPONENT = MapSpec("memory/component", "categorical", "component", ("C-1", "C+1", "C+2"), codes=(-1, 1, 2))
HEADS = MapSpec(
    "attention/heads", "scalar", "per head", channels=("h0", "h1")
)  # level-0 px per coloured block (= patch size)
W, H = 1024, 768


def _block_color(col: int, row: int) -> np.ndarray:
    return np.array([16 * col + 8, 16 * row + 8, 200], np.uint8)


def _blocks_slide(path, offset=(0, 0)):
    """A 3-level lossless slide whose CELL x CELL blocks (starting at ``offset``) each have a unique colour."""
    ox, oy = offset
    rgb = np.full((H, W, 3), 255, np.uint8)
    for row in range((H - oy) // CELL):
        for col in range((W - ox) // CELL):
            rgb[oy + row * CELL : oy + (row + 1) * CELL, ox + col * CELL : ox + (col + 1) * CELL] = _block_color(
                col, row
            )
    write_pyramid_tiff(path, rgb, MPP, levels=3, tile=128, compression="deflate")
    return path


def _viewer():
    from napari.components import ViewerModel

    return ViewerModel()


def _check_alignment(viewer, slide_layer, map_layer, coords, values, origin):
    """Every patch: the map value and the slide block colour at points inside the patch, at every level."""
    ox, oy = origin
    levels = len(slide_layer.data) if slide_layer.multiscale else 1
    for level in range(levels):
        slide_layer.locked_data_level = level
        slide_layer.refresh()
        assert slide_layer.data_level == level
        for (x, y), v in zip(coords, values):
            col, row = (x - ox) // CELL, (y - oy) // CELL
            for dx, dy in ((CELL / 2, CELL / 2), (9, 9), (CELL - 9, CELL - 9), (9, CELL - 9)):
                world = ((y + dy) * MPP, (x + dx) * MPP)
                got_level, rgb = slide_layer.get_value(world, world=True)
                assert got_level == level
                np.testing.assert_array_equal(rgb, _block_color(col, row), err_msg=f"level {level} at {(x, y)}")
                assert map_layer.get_value(world, world=True) == pytest.approx(v)


def test_slide_layer_is_lazy_multiscale_in_micrometres(tmp_path):
    path = _blocks_slide(tmp_path / "blocks.tiff")
    slide = open_slide(path)
    data, kwargs, kind = slide_layer_data(slide)
    assert kind == "image" and kwargs["multiscale"] and len(data) == 3
    assert all(type(d).__name__ == "Array" for d in data)  # dask: nothing read yet
    assert kwargs["scale"] == (MPP, MPP) and kwargs["translate"] == (MPP / 2, MPP / 2)
    meta = kwargs["metadata"]["wsimil"]
    assert meta["units"] == "µm" and meta["mpp"] == MPP and meta["levels"] == 3 and meta["slide_path"] == str(path)
    viewer = _viewer()
    (layer,) = add_layers(viewer, [(data, kwargs, kind)])
    # napari infers the lower levels' scale from the shapes: level k covers ds_k level-0 px
    np.testing.assert_allclose(layer.downsample_factors[:, 0], [1, 2, 4])
    # world extent = the slide in µm
    assert layer.extent.world[1][0] == pytest.approx(H * MPP + MPP / 2 - MPP / 2, abs=MPP)


def test_slide_without_mpp_is_shown_in_pixels(tmp_path):
    rgb = np.zeros((64, 64, 3), np.uint8)
    path = write_pyramid_tiff(tmp_path / "nompp.tiff", rgb, None, levels=1, tile=32, compression="none")
    data, kwargs, _ = slide_layer_data(open_slide(path))
    assert kwargs["scale"] == (1.0, 1.0) and kwargs["metadata"]["wsimil"]["units"] == "px"


@pytest.mark.parametrize("offset", [(0, 0), (64, 32)])
def test_map_value_lands_on_its_patch_at_every_level(tmp_path, offset):
    path = _blocks_slide(tmp_path / "blocks.tiff", offset)
    slide = open_slide(path)
    if offset != (0, 0):
        # an OpenSlide-style bounds offset: the grid starts there, and stored coords include it
        slide.bounds = (offset[0], offset[1], W - offset[0], H - offset[1])
    grid = make_grid(slide, None, GridSpec(mpp=MPP, patch=CELL, min_tissue=0.0))
    assert tuple(grid.origin) == offset
    rng = np.random.default_rng(0)
    keep = rng.random(len(grid.coords)) < 0.6  # patches missing = no tissue
    coords = grid.coords[keep]
    values = rng.random(len(coords)).astype(np.float32)
    geometry = GridGeometry.from_patch_grid(grid)
    viewer = _viewer()
    (slide_layer,) = add_layers(viewer, [slide_layer_data(slide)])
    maps = MapLayerSet(viewer)
    (map_layer,) = maps.update({"attention": values}, geometry, coords, specs={"attention": ATTENTION})
    assert map_layer.scale[0] == pytest.approx(CELL * MPP)
    # cells without a patch are NaN, one pixel per cell
    assert map_layer.data.shape == grid.grid_shape
    assert np.isnan(map_layer.data).sum() == map_layer.data.size - len(coords)
    _check_alignment(viewer, slide_layer, map_layer, coords, values, offset)


def test_grid_pixel_covers_exactly_its_patch():
    geo = GridGeometry.from_coords(np.array([[100, 60], [100 + 64, 60]]), size=64, origin=(100, 60), mpp=0.25)
    # pixel (0, 0) is centred on the patch centre, so its edges are the patch edges
    cy, cx = geo.translate
    assert (cx - geo.scale[1] / 2, cx + geo.scale[1] / 2) == pytest.approx((100 * 0.25, 164 * 0.25))
    assert (cy - geo.scale[0] / 2, cy + geo.scale[0] / 2) == pytest.approx((60 * 0.25, 124 * 0.25))
    lookup = PatchLookup(geo, np.array([[100, 60], [164, 60]]))
    assert lookup.patch_at((60.01 * 0.25, 100.01 * 0.25)) == 0
    assert lookup.patch_at((123.9 * 0.25, 163.9 * 0.25)) == 0
    assert lookup.patch_at((61 * 0.25, 164.1 * 0.25)) == 1
    assert lookup.patch_at((59.9 * 0.25, 120 * 0.25)) is None


def test_overlapping_patches_cells_are_centred_on_patches():
    coords = np.array([[0, 0], [32, 0], [64, 0]])
    geo = GridGeometry.from_coords(coords, size=64, stride=32, origin=(0, 0), mpp=1.0)
    assert geo.scale == (32.0, 32.0) and geo.translate == (32.0, 32.0)
    lookup = PatchLookup(geo, coords)
    assert lookup.patch_at((32.0, 40.0)) == 0  # patch 0 centre (32, 32) +- 16
    assert lookup.patch_at((32.0, 50.0)) == 1


def test_channel_and_categorical_maps():
    coords = np.array([[0, 0], [256, 0], [0, 256]])
    geo = GridGeometry.from_coords(coords, 256, mpp=0.5)
    heads = np.arange(6, dtype=np.float32).reshape(3, 2)
    data, kwargs, kind = map_layer_data("attention/heads", heads, geo, coords, spec=HEADS)
    assert kind == "image" and data.shape == (2, 2, 2)
    assert kwargs["scale"] == (1.0, 128.0, 128.0) and kwargs["translate"][0] == 0.0
    assert data[1, 0, 1] == 3.0 and np.isnan(data[0, 1, 1])
    comp = np.array([-1, 2, 2], np.float32)  # signed codes: label = position of the code in the spec + 1
    data, kwargs, kind = map_layer_data("memory/component", comp, geo, coords, spec=COMPONENT)
    assert kind == "labels" and data.dtype == np.int32 and data[0, 0] == 1 and data[0, 1] == 3 and data[1, 1] == 0
    assert kwargs["metadata"]["wsimil"]["legend"] == {1: "C-1", 3: "C+2"}
    assert kwargs["metadata"]["wsimil"]["map_kind"] == "categorical"
    # the kind comes from the spec, never from the name: the same values under a scalar spec are an image
    scalar = MapSpec("memory/component", "scalar", "as numbers")
    assert map_layer_data("memory/component", comp, geo, coords, spec=scalar)[2] == "image"
    routed = MapSpec("routing/b", "binary", "routed", ("not routed", "routed"))
    data, kwargs, kind = map_layer_data("routing/b", np.array([0.0, 1.0, 1.0]), geo, coords, spec=routed.to_dict())
    assert kind == "labels" and kwargs["metadata"]["wsimil"]["legend"] == {1: "not routed", 2: "routed"}
    assert list(kwargs["features"]["category"]) == ["", "not routed", "routed"]
    with pytest.warns(MapSpecWarning, match="not codes"):  # values outside the categories are left blank
        data, _, _ = map_layer_data("routing/b", np.array([0.0, 0.5, 1.0]), geo, coords, spec=routed)
    assert data[0, 1] == 0 and data[1, 0] == 2
    out = rasterize(np.array([1.0, 2.0]), np.array([[1, 0], [0, 1]]), (2, 2))
    assert out[0, 1] == 1.0 and out[1, 0] == 2.0 and np.isnan(out[0, 0])


def test_progressive_updates_reuse_layers_and_status_shows_values():
    viewer = _viewer()
    coords = np.array([[0, 0], [256, 0], [512, 0], [0, 256]])
    geo = GridGeometry.from_coords(coords, 256, mpp=0.5)
    maps = MapLayerSet(viewer, specs={"attention": ATTENTION})
    (layer,) = maps.update({"attention": np.array([0.1, 0.2], np.float32)}, geo, coords)
    assert np.isnan(layer.data[0, 2])
    (again,) = maps.update({"attention": np.array([0.1, 0.2, 0.3, 0.4], np.float32)}, geo, coords)
    assert again is layer and layer.data[0, 2] == pytest.approx(0.3) and len(viewer.layers) == 1
    status = layer.get_status((64.0, 300.0), world=True)
    assert "patch x, y = 512, 0 px: attention=0.3" in status["coordinates"]
    # the pointer in (x, y) order too, with its unit; napari's own (row, col) bracket is gone
    assert status["coordinates"].startswith("x, y = 300.00, 64.00 µm: ") and "[" not in status["coordinates"]
    # the very arrays shown already (a run's final update repeats its whole prediction): the layer is kept as is
    full = {"attention": np.array([0.4, 0.3, 0.2, 0.1], np.float32)}
    maps.update(full, geo, coords)
    redrawn = []
    layer.events.data.connect(redrawn.append)
    maps.update(full, geo, coords.copy())
    assert not redrawn and layer.data[0, 2] == pytest.approx(0.2)
    maps.update({"attention": full["attention"].copy()}, geo, coords)  # new values (even if equal): redrawn
    assert redrawn
    attach_patch_status(layer, maps.lookup)  # idempotent
    assert layer.get_status((64.0, 300.0), world=True)["coordinates"].count("patch x, y") == 1
    outside = layer.get_status((64.0, 900.0), world=True)["coordinates"]
    assert outside.startswith("x, y = 900.00, 64.00 µm") and "patch" not in outside
    maps.remove()
    assert len(viewer.layers) == 0


def test_bad_coords_are_a_clear_error():
    geo = GridGeometry.from_coords(np.array([[256, 256]]), 256, origin=(256, 256))
    with pytest.raises(DataError, match="before the grid origin"):
        geo.cell_index(np.array([[0, 0]]))


def test_categorical_legend_has_the_layer_colours():
    from napari_wsimil._map_layers import legend_text
    from napari_wsimil._viewer import legend_colors

    viewer = _viewer()
    coords = np.array([[0, 0], [256, 0], [0, 256]])
    geo = GridGeometry.from_coords(coords, 256, mpp=0.5)
    heads4 = MapSpec("attention/heads", "scalar", "per head", channels=("h0", "h1", "h2", "h3"))
    layer, heads = MapLayerSet(viewer).update(
        {"memory/component": np.array([-1, 2, 2], np.float32), "attention/heads": np.ones((3, 4), np.float32)},
        geo,
        coords,
        specs={"memory/component": COMPONENT, "attention/heads": heads4},
    )
    assert layer._type_string == "labels" and heads.data.shape == (4, 2, 2)
    assert viewer.dims.nsteps[0] == 4  # the channel slider
    legend = layer.metadata["wsimil"]["legend"]
    colors = legend_colors(layer, legend)
    np.testing.assert_allclose(colors[3], layer.get_color(3))
    assert not np.allclose(colors[1], colors[3])  # one colour per category
    text = legend_text(legend, colors)
    assert text.count("&#9632;") == 2 and "C+2" in text
    assert "<br>" not in text  # compact: the entries share wrapped lines
    # the status bar names the category of the hovered patch
    assert "memory/component=C+2" in layer.get_status((64.0, 192.0), world=True)["coordinates"]


def test_a_map_without_a_spec_is_scalar_with_a_warning():
    coords = np.array([[0, 0], [256, 0]])
    geo = GridGeometry.from_coords(coords, 256, mpp=0.5)
    with pytest.warns(MapSpecWarning, match="'routing/b' has no MapSpec"):
        data, kwargs, kind = map_layer_data("routing/b", np.array([0.0, 1.0]), geo, coords)
    assert kind == "image" and kwargs["metadata"]["wsimil"]["map_kind"] == "scalar"


def test_scalar_colormaps_are_transparent_at_the_low_end_and_signed_maps_at_zero():
    coords = np.array([[0, 0], [256, 0], [512, 0]])
    geo = GridGeometry.from_coords(coords, 256, mpp=0.5)
    _, kw, _ = map_layer_data("a", np.array([0.1, 0.5, 0.9]), geo, coords, spec=MapSpec("a", "scalar", "x"))
    alpha = kw["colormap"].map(np.array([0.0, 0.1, 0.5, 1.0]))[:, 3]
    assert alpha[0] == 0.0 and 0 < alpha[1] < 1 and alpha[2] == alpha[3] == 1.0
    assert kw["contrast_limits"] == (pytest.approx(0.1), pytest.approx(0.9))
    assert kw["metadata"]["wsimil"]["colorbar"] is True
    signed = MapSpec("s", "signed", "x", colormap="coolwarm")
    _, kw, _ = map_layer_data("s", np.array([-0.5, 0.1, 2.0]), geo, coords, spec=signed)
    assert kw["contrast_limits"] == (-2.0, 2.0)  # symmetric: 0 is the centre
    rgba = kw["colormap"].map(np.array([0.0, 0.5, 1.0]))
    assert rgba[1, 3] == 0.0 and rgba[0, 3] == rgba[2, 3] == 1.0
    assert rgba[0, 2] > rgba[0, 0] and rgba[2, 0] > rgba[2, 2]  # diverging: blue below 0, red above
    prob = MapSpec("p", "probability", "x", colormap="viridis")
    _, kw, _ = map_layer_data("p", np.array([0.2, 0.3, 0.4]), geo, coords, spec=prob)
    assert kw["contrast_limits"] == (0.0, 1.0)
    fixed = MapSpec("r", "scalar", "x", range=(-1.0, 3.0))
    assert map_layer_data("r", np.zeros(3), geo, coords, spec=fixed)[1]["contrast_limits"] == (-1.0, 3.0)


def test_patch_lookup_finds_each_patch_and_the_last_of_a_repeated_cell():
    """Every patch is found at its centre, a cell without a patch is None, a repeated cell gives the later
    patch, and positions outside the grid are None (the lookup is a sorted-key search, not a dict)."""
    geo = GridGeometry((0, 0), 10, 10, (3, 4), 1.0, "px")
    coords = np.array([[0, 0], [30, 0], [10, 20], [30, 0], [20, 10]])
    lookup = PatchLookup(geo, coords)
    assert lookup.patch_at((5.0, 5.0)) == 0
    assert lookup.patch_at((5.0, 35.0)) == 3  # cells (3, 0) of patches 1 and 3: the later one
    assert lookup.patch_at((25.0, 15.0)) == 2
    assert lookup.patch_at((15.0, 25.0)) == 4
    assert lookup.patch_at((15.0, 5.0)) is None  # cell (0, 1) holds no patch
    assert lookup.patch_at((-5.0, 5.0)) is None and lookup.patch_at((5.0, 45.0)) is None
    assert lookup.patch_at((35.0, 5.0)) is None
