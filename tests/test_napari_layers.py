"""napari plugin, layer logic (no display): slide pyramid and per-patch maps line up in world µm at every level."""

from __future__ import annotations

import numpy as np
import pytest

from napari_wsimil._layers import (
    GridGeometry,
    PatchLookup,
    attach_patch_status,
    category_names,
    map_kind,
    map_layer_data,
    rasterize,
    slide_layer_data,
)
from napari_wsimil._viewer import MapLayerSet, add_layers
from wsimil_core.errors import DataError
from wsimil_core.wsi.slide import open_slide
from wsimil_core.wsi.tiling import GridSpec, make_grid
from wsimil_core.wsi.writer import write_pyramid_tiff

MPP = 0.5
CELL = 128  # level-0 px per coloured block (= patch size)
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
    (map_layer,) = maps.update({"attention": values}, geometry, coords)
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
    data, kwargs, kind = map_layer_data("attention/heads", heads, geo, coords)
    assert kind == "image" and data.shape == (2, 2, 2)
    assert kwargs["scale"] == (1.0, 128.0, 128.0) and kwargs["translate"][0] == 0.0
    assert data[1, 0, 1] == 3.0 and np.isnan(data[0, 1, 1])
    comp = np.array([0, 2, 2], np.float32)
    data, kwargs, kind = map_layer_data("memory/component", comp, geo, coords)
    assert kind == "labels" and data.dtype == np.int32 and data[0, 0] == 1 and data[0, 1] == 3 and data[1, 1] == 0
    assert kwargs["metadata"]["wsimil"]["legend"] == {1: "component 0", 3: "component 2"}
    assert map_kind("routing/task_b", comp) == "categorical"
    assert map_kind("routing/task_b/weight", comp) == "scalar"
    assert map_kind("routing/task_b", np.array([0.2, 0.5, 0.1])) == "scalar"  # not integer: a heatmap
    assert map_kind("prescreen/keep", np.array([0.0, 1.0, 1.0])) == "categorical"
    assert category_names("prescreen/keep", np.array([0.0, 1.0])) == {1: "dropped", 2: "kept"}
    out = rasterize(np.array([1.0, 2.0]), np.array([[1, 0], [0, 1]]), (2, 2))
    assert out[0, 1] == 1.0 and out[1, 0] == 2.0 and np.isnan(out[0, 0])


def test_progressive_updates_reuse_layers_and_status_shows_values():
    viewer = _viewer()
    coords = np.array([[0, 0], [256, 0], [512, 0], [0, 256]])
    geo = GridGeometry.from_coords(coords, 256, mpp=0.5)
    maps = MapLayerSet(viewer)
    (layer,) = maps.update({"attention": np.array([0.1, 0.2], np.float32)}, geo, coords)
    assert np.isnan(layer.data[0, 2])
    (again,) = maps.update({"attention": np.array([0.1, 0.2, 0.3, 0.4], np.float32)}, geo, coords)
    assert again is layer and layer.data[0, 2] == pytest.approx(0.3) and len(viewer.layers) == 1
    status = layer.get_status((64.0, 300.0), world=True)
    assert "patch (512, 0)" in status["coordinates"] and "attention=0.3" in status["coordinates"]
    attach_patch_status(layer, maps.lookup)  # idempotent
    assert layer.get_status((64.0, 300.0), world=True)["coordinates"].count("patch (") == 1
    maps.remove()
    assert len(viewer.layers) == 0


def test_bad_coords_are_a_clear_error():
    geo = GridGeometry.from_coords(np.array([[256, 256]]), 256, origin=(256, 256))
    with pytest.raises(DataError, match="before the grid origin"):
        geo.cell_index(np.array([[0, 0]]))


def test_categorical_legend_has_the_layer_colours():
    from napari_wsimil._layers import legend_text
    from napari_wsimil._viewer import legend_colors

    viewer = _viewer()
    coords = np.array([[0, 0], [256, 0], [0, 256]])
    geo = GridGeometry.from_coords(coords, 256, mpp=0.5)
    layer, heads = MapLayerSet(viewer).update(
        {"memory/component": np.array([0, 2, 2], np.float32), "attention/heads": np.ones((3, 4), np.float32)},
        geo,
        coords,
    )
    assert layer._type_string == "labels" and heads.data.shape == (4, 2, 2)
    assert viewer.dims.nsteps[0] == 4  # the channel slider
    legend = layer.metadata["wsimil"]["legend"]
    colors = legend_colors(layer, legend)
    np.testing.assert_allclose(colors[3], layer.get_color(3))
    text = legend_text(legend, colors)
    assert text.count("&#9632;") == 2 and "component 2" in text
