"""Tissue detection, patch grids, companion grids, and the ``info``/``tile`` CLI commands."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from wsimil_core.errors import ConfigError, DataError, SlideError
from wsimil_core.wsi.slide import open_slide
from wsimil_core.wsi.tiling import (
    EmptyTissueWarning,
    GridSpec,
    PatchGrid,
    TissueParams,
    detect_tissue,
    make_grid,
    otsu_threshold,
    tissue_image,
)
from wsimil_core.wsi.writer import write_pyramid_tiff

# Level-0 layout of the synthetic slide (mpp 0.25): a 'tissue' rectangle with a hole, a tiny speck.
H, W = 1024, 1536
TISSUE = (256, 768, 256, 1024)  # y0, y1, x0, x1
HOLE = (448, 576, 512, 640)
SPECK = (100, 108, 1400, 1408)


def tissue_rgb() -> np.ndarray:
    rng = np.random.default_rng(1)
    img = np.full((H, W, 3), 245, np.uint8)
    y0, y1, x0, x1 = TISSUE
    noise = rng.integers(-15, 15, (y1 - y0, x1 - x0, 1))
    img[y0:y1, x0:x1] = np.clip(np.array([190, 100, 170]) + noise, 0, 255).astype(np.uint8)
    hy0, hy1, hx0, hx1 = HOLE
    img[hy0:hy1, hx0:hx1] = 245
    sy0, sy1, sx0, sx1 = SPECK
    img[sy0:sy1, sx0:sx1] = (120, 40, 120)
    return img


@pytest.fixture(scope="module")
def slide_path(tmp_path_factory) -> Path:
    return write_pyramid_tiff(
        tmp_path_factory.mktemp("til") / "t1.tif", tissue_rgb(), 0.25, levels=4, tile=128, compression="deflate"
    )


@pytest.fixture(scope="module")
def blank_path(tmp_path_factory) -> Path:
    img = np.full((512, 512, 3), 246, np.uint8)
    img[::7, ::5] = 240  # faint texture, no tissue
    return write_pyramid_tiff(
        tmp_path_factory.mktemp("blank") / "blank.tif", img, 0.5, levels=2, tile=128, compression="deflate"
    )


PARAMS = TissueParams(thumb_mpp=4.0, min_area_um2=500.0, blur_sigma_px=0.0)


# --- parameters ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs",
    [{"thumb_mpp": 0}, {"space": "hsv"}, {"threshold": -1.0}, {"min_area_um2": float("nan")}, {"thumb_max_size": 4}],
)
def test_tissue_params_validated(kwargs) -> None:
    with pytest.raises(ConfigError):
        TissueParams(**kwargs)


@pytest.mark.parametrize("kwargs", [{"mpp": 0}, {"patch": 0}, {"stride": -2}, {"min_tissue": 1.5}, {"patch": 2.5}])
def test_grid_spec_validated(kwargs) -> None:
    with pytest.raises(ConfigError):
        GridSpec(**kwargs)


def test_otsu_and_spaces() -> None:
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(0.1, 0.02, 1000), rng.normal(0.6, 0.05, 500)])
    thr = otsu_threshold(values)
    assert 0.2 < thr < 0.5
    rgb = np.array([[[255, 255, 255], [128, 128, 128], [200, 100, 150], [0, 0, 0]]], np.uint8)
    sat = tissue_image(rgb, "saturation")
    assert sat[0, 0] == 0 and sat[0, 1] == 0 and sat[0, 2] == pytest.approx(0.5) and sat[0, 3] == 0
    od = tissue_image(rgb, "od")
    assert od[0, 0] == pytest.approx(0.0) and od[0, 1] > 0 and od[0, 3] > od[0, 1]


# --- tissue detection --------------------------------------------------------------------------------------
@pytest.mark.parametrize("space", ["saturation", "od"])
def test_detect_tissue_fills_holes_and_drops_specks(slide_path: Path, space: str) -> None:
    with open_slide(slide_path) as s:
        m = detect_tissue(s, TissueParams(thumb_mpp=4.0, space=space, min_area_um2=500.0, blur_sigma_px=0.0))
    assert m.downsample == pytest.approx(16.0) and m.mask.shape == (H // 16, W // 16) and m.origin == (0, 0)
    y0, y1, x0, x1 = (v // 16 for v in TISSUE)
    expected = np.zeros_like(m.mask)
    expected[y0:y1, x0:x1] = True  # the hole is filled; the 2x2 µm speck (0.5 px here) is dropped
    assert np.mean(m.mask == expected) > 0.99
    assert m.mask[HOLE[0] // 16 + 2, HOLE[2] // 16 + 2]
    assert not m.mask[: 256 // 16].any()


def test_detect_tissue_hole_kept_when_not_filling(slide_path: Path) -> None:
    with open_slide(slide_path) as s:
        m = detect_tissue(s, TissueParams(thumb_mpp=4.0, min_area_um2=500.0, blur_sigma_px=0.0, fill_holes=False))
        m2 = detect_tissue(s, TissueParams(thumb_mpp=4.0, min_area_um2=500.0, blur_sigma_px=0.0, max_hole_um2=10.0))
    cy, cx = (HOLE[0] + HOLE[1]) // 32, (HOLE[2] + HOLE[3]) // 32
    assert not m.mask[cy, cx] and not m2.mask[cy, cx]


def test_min_area_removes_components(slide_path: Path) -> None:
    with open_slide(slide_path) as s, pytest.warns(EmptyTissueWarning):
        big = detect_tissue(s, TissueParams(thumb_mpp=4.0, min_area_um2=1e9))
    assert not big.mask.any()


def test_empty_mask_warns_and_gives_zero_patches(blank_path: Path) -> None:
    with open_slide(blank_path) as s:
        with pytest.warns(EmptyTissueWarning, match="no tissue"):
            m = detect_tissue(s, PARAMS)
        grid = make_grid(s, m, GridSpec(mpp=0.5, patch=64))
    assert not m.mask.any()
    assert grid.coords.shape == (0, 2) and grid.coords.dtype == np.int64 and len(grid) == 0


# --- grids ---------------------------------------------------------------------------------------------------
def test_make_grid_physical_size_and_tissue_filter(slide_path: Path) -> None:
    with open_slide(slide_path) as s:
        m = detect_tissue(s, PARAMS)
        g = make_grid(s, m, GridSpec(mpp=0.5, patch=64, min_tissue=0.5))
    # 64 px at 0.5 µm/px on a 0.25 µm/px slide = 128 level-0 px
    assert g.size_level0 == 128 and g.stride_level0 == 128 and g.patch_px == 64 and g.mpp == 0.5
    assert g.coords.dtype == np.int64 and g.coords.shape[1] == 2
    assert g.grid_shape == (H // 128, W // 128)
    y0, y1, x0, x1 = TISSUE
    # the tissue rectangle is exactly 4 x 6 cells; all kept (the filled hole counts as tissue), nothing else
    assert len(g) == ((y1 - y0) // 128) * ((x1 - x0) // 128)
    assert (g.coords[:, 0] >= x0).all() and (g.coords[:, 0] + 128 <= x1).all()
    assert (g.coords[:, 1] >= y0).all() and (g.coords[:, 1] + 128 <= y1).all()
    assert np.array_equal(g.grid_index(), g.coords // 128)
    assert (g.tissue_fraction >= 0.5).all()


def test_stride_and_min_tissue(slide_path: Path) -> None:
    with open_slide(slide_path) as s:
        m = detect_tissue(s, PARAMS)
        dense = make_grid(s, m, GridSpec(mpp=0.5, patch=64, stride=32, min_tissue=0.5))
        loose = make_grid(s, m, GridSpec(mpp=0.5, patch=64, stride=32, min_tissue=0.0))
        strict = make_grid(s, m, GridSpec(mpp=0.5, patch=64, stride=32, min_tissue=1.0))
        everything = make_grid(s, None, GridSpec(mpp=0.5, patch=64, stride=32))
    assert dense.stride_level0 == 64
    assert (dense.coords % 64 == 0).all()
    assert len(strict) < len(dense) < len(loose) < len(everything)
    assert len(everything) == ((H - 128) // 64 + 1) * ((W - 128) // 64 + 1)


def test_companion_grid(slide_path: Path) -> None:
    with open_slide(slide_path) as s:
        g = make_grid(s, detect_tissue(s, PARAMS), GridSpec(mpp=0.5, patch=64))
        c = g.companion(4.0)
        assert np.array_equal(c.coords, g.coords) and c.size_level0 == g.size_level0
        assert c.patch_px == 16 and c.mpp == pytest.approx(2.0) and c.stride_level0 == g.stride_level0
        x, y = g.coords[0]
        hi = s.read_patch(int(x), int(y), g.size_level0, g.patch_px)
        lo = s.read_patch(int(x), int(y), c.size_level0, c.patch_px)
        assert hi.shape == (64, 64, 3) and lo.shape == (16, 16, 3)
        assert np.abs(hi.reshape(16, 4, 16, 4, 3).mean((1, 3)) - lo).mean() < 6
    with pytest.raises(ConfigError):
        g.companion(1000.0)


def test_grid_requires_mpp(tmp_path: Path) -> None:
    path = write_pyramid_tiff(tmp_path / "nompp.tif", tissue_rgb()[:512, :512], None, levels=2, tile=128)
    with open_slide(path) as s:
        with pytest.raises(SlideError, match="--slide-mpp"):
            make_grid(s, None, GridSpec())
        with pytest.raises(SlideError, match="--slide-mpp"):
            detect_tissue(s, PARAMS)
    with open_slide(path, slide_mpp=0.5) as s:
        g = make_grid(s, detect_tissue(s, PARAMS), GridSpec(mpp=0.5, patch=64))
        assert g.size_level0 == 64 and len(g) > 0


def test_grid_save_load_roundtrip(slide_path: Path, tmp_path: Path) -> None:
    with open_slide(slide_path) as s:
        g = make_grid(s, detect_tissue(s, PARAMS), GridSpec(mpp=0.5, patch=64))
    cpath, jpath = g.save(tmp_path / "t1.coords.npy", {"slide_id": "t1"})
    assert jpath.name == "t1.grid.json" and json.loads(jpath.read_text())["slide_id"] == "t1"
    g2 = PatchGrid.load(cpath)
    assert np.array_equal(g2.coords, g.coords) and g2.size_level0 == g.size_level0 and g2.mpp == g.mpp
    assert g2.origin == g.origin and g2.level0_size == g.level0_size
    assert not list(tmp_path.glob(".*tmp"))
    np.save(cpath, g.coords[:, :1].copy())
    with pytest.raises(DataError, match="int64"):
        PatchGrid.load(cpath)


def test_bounds_offset_in_grid_and_reads(slide_path: Path, monkeypatch) -> None:
    """OpenSlide's bounds-x/y shift the tissue mask, the grid origin and every coordinate."""
    import openslide

    bx, by = 384, 128

    class BoundedOpenSlide(openslide.OpenSlide):
        @property
        def properties(self):  # type: ignore[override]
            props = dict(super().properties)
            props.update(
                {
                    "openslide.bounds-x": str(bx),
                    "openslide.bounds-y": str(by),
                    "openslide.bounds-width": str(W - bx),
                    "openslide.bounds-height": str(H - by),
                }
            )
            return props

    monkeypatch.setattr(openslide, "OpenSlide", BoundedOpenSlide)
    rgb = tissue_rgb()
    with open_slide(slide_path, backend="openslide") as s:
        assert s.bounds == (bx, by, W - bx, H - by)
        m = detect_tissue(s, PARAMS)
        assert m.origin == (bx, by) and m.mask.shape == ((H - by) // 16, (W - bx) // 16)
        g = make_grid(s, m, GridSpec(mpp=0.5, patch=64, min_tissue=0.5))
        assert g.origin == (bx, by)
        assert ((g.coords - [bx, by]) % 128 == 0).all()
        assert (g.coords[:, 0] >= bx).all() and (g.coords[:, 1] >= by).all()
        y0, y1, x0, x1 = TISSUE
        # cells now start at bx=384 (not on the 128-grid from 0): x in {384, 512, ..., 896}, y in {256, ...}
        assert set(g.coords[:, 0].tolist()) == set(range(x0 + 128, x1 - 127, 128))
        assert len(g) == 4 * 5
        x, y = g.coords[0]
        patch = s.read_patch(int(x), int(y), g.size_level0, g.patch_px)
        expected = rgb[y : y + 128, x : x + 128].astype(np.float32).reshape(64, 2, 64, 2, 3).mean((1, 3))
        assert np.abs(patch.astype(np.float32) - expected).max() <= 1.0


# --- CLI -------------------------------------------------------------------------------------------------------
def run_cli(args: list[str]) -> int:
    from wsimil_core.cli import main

    try:
        main(args)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def test_cli_info(fixtures_dir: Path, capsys) -> None:
    assert run_cli(["info", str(fixtures_dir / "openslide" / "small.svs")]) == 0
    out = capsys.readouterr().out
    assert "aperio" in out and "0.499" in out and "20x" in out and "thumbnail" in out and "level 0: 16 x 16" in out
    assert run_cli(["info", str(fixtures_dir / "openslide" / "boxes.tiff"), "--backend", "tifffile", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["backend"] == "tifffile" and len(data["levels"]) == 4


def test_cli_info_errors_are_one_line(fixtures_dir: Path, tmp_path: Path, capsys) -> None:
    assert run_cli(["info", str(tmp_path / "missing.svs")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "file not found" in err and "\n" not in err
    assert run_cli(["info", str(fixtures_dir / "openslide" / "boxes.png")]) == 1
    assert "not a slide" in capsys.readouterr().err


def test_cli_tile(slide_path: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "grids"
    code = run_cli(
        [
            "tile",
            str(slide_path),
            "--out",
            str(out),
            "--mpp",
            "0.5",
            "--patch",
            "64",
            "--min-tissue",
            "0.5",
            "--thumb-mpp",
            "4",
            "--min-area-um2",
            "500",
        ]
    )
    assert code == 0
    coords = np.load(out / "t1.coords.npy")
    meta = json.loads((out / "t1.grid.json").read_text())
    assert coords.dtype == np.int64 and coords.shape == (24, 2)
    assert meta["patch_size_level0"] == 128 and meta["patch_mpp"] == 0.5 and meta["n_patches"] == 24
    assert meta["slide_mpp"] == 0.25 and meta["tissue"]["thumb_mpp"] == 4.0
    from PIL import Image

    assert Image.open(out / "t1.tissue.png").size == (W // 16, H // 16)


def test_cli_tile_without_mpp(tmp_path: Path, capsys) -> None:
    path = write_pyramid_tiff(tmp_path / "n.tif", tissue_rgb()[:512, :512], None, levels=2, tile=128)
    assert run_cli(["tile", str(path), "--out", str(tmp_path / "o")]) == 1
    assert "--slide-mpp" in capsys.readouterr().err
    assert run_cli(["tile", str(path), "--out", str(tmp_path / "o"), "--slide-mpp", "0.5", "--patch", "64"]) == 0
    assert (tmp_path / "o" / "n.coords.npy").exists()


def test_cli_tile_empty_slide_warns(blank_path: Path, tmp_path: Path, capsys) -> None:
    assert run_cli(["tile", str(blank_path), "--out", str(tmp_path / "o"), "--patch", "64"]) == 0
    captured = capsys.readouterr()
    assert "no tissue" in captured.err + captured.out
    assert np.load(tmp_path / "o" / "blank.coords.npy").shape == (0, 2)


def test_cli_help() -> None:
    assert run_cli(["tile", "--help"]) == 0
    assert run_cli(["info", "--help"]) == 0
