"""Slide reading: both backends, real OpenSlide fixtures, errors, dask pyramid, bounds offset."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import tifffile

from wsimil_core.errors import SlideError
from wsimil_core.wsi.slide import Slide, open_slide
from wsimil_core.wsi.writer import downsample_rgb, write_pyramid_tiff, write_pyramid_tiff_tiles


def synthetic_rgb(h: int = 512, w: int = 768, seed: int = 0) -> np.ndarray:
    """White background with a smooth pink 'tissue' blob and a few dark marks (smooth -> JPEG-friendly)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.full((h, w, 3), 250, np.float32)
    blob = ((xx - w * 0.4) / (w * 0.25)) ** 2 + ((yy - h * 0.5) / (h * 0.3)) ** 2 < 1
    shade = 0.5 + 0.5 * np.sin(xx / 23.0) * np.cos(yy / 17.0)
    img[blob] = np.stack([200 - 40 * shade, 90 + 30 * shade, 160 + 20 * shade], -1)[blob]
    for _ in range(5):
        y, x = rng.integers(0, h - 20), rng.integers(0, w - 20)
        img[y : y + 12, x : x + 12] = (60, 30, 90)
    return img.astype(np.uint8)


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """A lossless 3-level pyramid (tile 128, mpp 0.5) and its level-0 pixels."""
    rgb = synthetic_rgb()
    path = write_pyramid_tiff(
        tmp_path_factory.mktemp("pyr") / "syn.tif", rgb, 0.5, levels=3, tile=128, compression="deflate"
    )
    return path, rgb


# --- real fixtures --------------------------------------------------------------------------------------
def test_small_svs(fixtures_dir: Path) -> None:
    with open_slide(fixtures_dir / "openslide" / "small.svs") as s:
        assert s.backend == "openslide" and s.vendor == "aperio"
        assert s.level_dimensions == [(16, 16)] and s.level_downsamples == [1.0]
        assert s.mpp == pytest.approx(0.499) and s.objective_power == 20
        assert s.bounds == (0, 0, 16, 16)
        thumb = s.associated_images["thumbnail"]
        assert thumb.dtype == np.uint8 and thumb.ndim == 3 and thumb.shape[2] == 3
        region = s.read_region((0, 0), 0, (16, 16))
        assert region.shape == (16, 16, 3) and region.dtype == np.uint8
        # tifffile reads the same SVS (Aperio description parsed for mpp/objective)
    with open_slide(fixtures_dir / "openslide" / "small.svs", backend="tifffile") as t:
        assert t.mpp == pytest.approx(0.499) and t.objective_power == 20
        assert "thumbnail" in t.associated_images
        assert np.abs(t.read_region((0, 0), 0, (16, 16)).astype(int) - region).max() <= 2


def test_boxes_tiff_both_backends(fixtures_dir: Path) -> None:
    path = fixtures_dir / "openslide" / "boxes.tiff"
    with open_slide(path) as a, open_slide(path, backend="tifffile") as b:
        assert a.backend == "openslide" and b.backend == "tifffile"
        assert a.level_dimensions == b.level_dimensions == [(300, 250), (150, 125), (75, 62), (37, 31)]
        assert np.allclose(a.level_downsamples, b.level_downsamples)
        assert a.mpp == pytest.approx(352.7777, rel=1e-4) and b.mpp == pytest.approx(a.mpp)
        for level in (0, 1):
            ra = a.read_region((40, 24), level, (50, 40))
            rb = b.read_region((40, 24), level, (50, 40))
            assert np.array_equal(ra, rb)


def test_dicom_opens(fixtures_dir: Path) -> None:
    with open_slide(fixtures_dir / "openslide" / "boxes_0.dcm") as s:
        assert s.vendor == "dicom" and s.dimensions == (16, 16)
        assert s.mpp == pytest.approx(0.499)
        assert s.read_region((0, 0), 0, (16, 16)).shape == (16, 16, 3)


@pytest.mark.parametrize("backend", ["auto", "openslide", "tifffile"])
def test_unopenable_names_file_and_cause(fixtures_dir: Path, backend: str) -> None:
    path = fixtures_dir / "openslide" / "unopenable.tiff"
    with pytest.raises(SlideError) as err:
        open_slide(path, backend=backend)
    assert str(path) in str(err.value) and "compression" in str(err.value).lower()


@pytest.mark.parametrize("backend", ["auto", "tifffile"])
def test_unreadable_fails_on_read(fixtures_dir: Path, backend: str) -> None:
    path = fixtures_dir / "openslide" / "unreadable.svs"
    s = open_slide(path, backend=backend)
    with pytest.raises(SlideError) as err:
        s.read_region((0, 0), 0, (16, 16))
    assert str(path) in str(err.value) and "Bogus marker length" in str(err.value)
    s.close()


@pytest.mark.parametrize("backend", ["auto", "openslide", "tifffile"])
def test_png_is_not_a_slide(fixtures_dir: Path, backend: str) -> None:
    path = fixtures_dir / "openslide" / "boxes.png"
    with pytest.raises(SlideError, match="not a slide") as err:
        open_slide(path, backend=backend)
    assert str(path) in str(err.value)


def test_missing_file_and_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(SlideError, match="file not found"):
        open_slide(tmp_path / "nope.svs")
    with pytest.raises(SlideError, match="directory"):
        open_slide(tmp_path)
    f = tmp_path / "x.tif"
    f.write_bytes(b"")
    with pytest.raises(SlideError, match="unknown backend"):
        open_slide(f, backend="bioformats")
    with pytest.raises(SlideError, match="positive"):
        open_slide(f, slide_mpp=-1.0)


# --- synthetic pyramids -----------------------------------------------------------------------------------
def test_both_backends_same_pixels(pyramid) -> None:
    path, rgb = pyramid
    with open_slide(path, backend="openslide") as a, open_slide(path, backend="tifffile") as b:
        assert a.vendor == "generic-tiff"
        assert a.level_dimensions == b.level_dimensions == [(768, 512), (384, 256), (192, 128)]
        assert a.level_downsamples == b.level_downsamples == [1.0, 2.0, 4.0]
        assert a.level_tile_sizes == b.level_tile_sizes == [(128, 128)] * 3
        assert a.mpp == b.mpp == pytest.approx(0.5)
        # level 0: exactly the written pixels (lossless) through both backends
        assert np.array_equal(a.read_region((100, 60), 0, (300, 200)), rgb[60:260, 100:400])
        assert np.array_equal(b.read_region((100, 60), 0, (300, 200)), rgb[60:260, 100:400])
        # level 1 with level-0 coordinates, as OpenSlide's read_region takes them
        level1 = downsample_rgb(rgb, 2)
        ra = a.read_region((100, 60), 1, (150, 100))
        rb = b.read_region((100, 60), 1, (150, 100))
        assert np.array_equal(ra, rb)
        assert np.array_equal(rb, level1[30:130, 50:200])


def test_jpeg_pyramid_both_backends_agree(tmp_path: Path) -> None:
    rgb = synthetic_rgb(256, 384)
    path = write_pyramid_tiff(tmp_path / "j.tif", rgb, 0.25, levels=2, tile=128)
    with open_slide(path, backend="openslide") as a, open_slide(path, backend="tifffile") as b:
        assert a.mpp == b.mpp == pytest.approx(0.25)
        for level in (0, 1):
            ra = a.read_region((64, 32), level, (96, 64)).astype(int)
            rb = b.read_region((64, 32), level, (96, 64)).astype(int)
            assert np.abs(ra - rb).mean() < 2.0
        assert np.abs(a.read_region((0, 0), 0, (384, 256)).astype(int) - rgb).mean() < 4.0


def test_read_region_outside_is_white(pyramid) -> None:
    path, rgb = pyramid
    for backend in ("openslide", "tifffile"):
        with open_slide(path, backend=backend) as s:
            r = s.read_region((-10, -20), 0, (40, 40))
            assert (r[:20] == 255).all() and (r[:, :10] == 255).all()
            assert np.array_equal(r[20:, 10:], rgb[:20, :30])
            assert (s.read_region((760, 500), 0, (30, 30))[12:, :] == 255).all()
            with pytest.raises(SlideError, match="level 5"):
                s.read_region((0, 0), 5, (4, 4))


def test_read_patch_and_best_level(pyramid) -> None:
    path, rgb = pyramid
    with open_slide(path) as s:
        assert s.best_level_for_downsample(1.0) == 0
        assert s.best_level_for_downsample(2.0) == 1
        assert s.best_level_for_downsample(3.9) == 1
        assert s.best_level_for_downsample(100) == 2
        p = s.read_patch(128, 64, 256, 128)  # downsample 2 -> level 1, no resampling
        assert p.shape == (128, 128, 3)
        assert np.array_equal(p, downsample_rgb(rgb, 2)[32:160, 64:192])
        q = s.read_patch(128, 64, 96, 64)  # downsample 1.5 -> level 0, resampled
        assert q.shape == (64, 64, 3) and q.dtype == np.uint8


def test_thumbnail(pyramid) -> None:
    path, rgb = pyramid
    with open_slide(path) as s:
        thumb, ds = s.thumbnail(max_size=96)
        assert ds == pytest.approx(8.0) and thumb.shape == (64, 96, 3)
        thumb2, ds2 = s.thumbnail(max_size=4096, downsample=4.0)
        assert ds2 == 4.0 and thumb2.shape == (128, 192, 3)
        assert np.array_equal(thumb2, downsample_rgb(downsample_rgb(rgb, 2), 2))


def test_thumbnail_in_bands_matches(tmp_path: Path, monkeypatch) -> None:
    import wsimil_core.wsi.base as slide_base

    rgb = synthetic_rgb(256, 384)
    path = write_pyramid_tiff(tmp_path / "flat.tif", rgb, 0.5, levels=1, tile=64, compression="deflate")
    with open_slide(path) as s:
        whole, ds = s.thumbnail(downsample=4.0)
        monkeypatch.setattr(slide_base, "_THUMB_BAND_PIXELS", 384 * 4 * 3)  # 3 thumbnail rows per band
        banded, ds2 = s.thumbnail(downsample=4.0)
    assert ds == ds2 == 4.0 and banded.shape == whole.shape == (64, 96, 3)
    assert np.array_equal(banded, whole)
    assert np.abs(whole.astype(int) - downsample_rgb(rgb, 4)).max() <= 1


def test_dask_pyramid_lazy_and_correct(pyramid, monkeypatch) -> None:
    path, rgb = pyramid
    for backend in ("openslide", "tifffile"):
        with open_slide(path, backend=backend) as s:
            calls = []
            original = s._read_level
            monkeypatch.setattr(
                s, "_read_level", lambda *a, calls=calls, original=original: calls.append(a) or original(*a)
            )
            levels = s.dask_pyramid()
            assert calls == []  # building the pyramid read no pixels
            assert [a.shape for a in levels] == [(512, 768, 3), (256, 384, 3), (128, 192, 3)]
            assert levels[0].chunks[0] == (128,) * 4 and levels[0].chunks[1] == (128,) * 6
            assert levels[2].chunks[:2] == ((128,), (128, 64))
            assert levels[0].dtype == np.uint8
            tile = levels[0][128:256, 256:384].compute()
            assert len(calls) == 1  # one chunk read for one tile
            assert np.array_equal(tile, rgb[128:256, 256:384])
            assert np.array_equal(levels[1].compute(), downsample_rgb(rgb, 2))
            # the graph is not a dict of every chunk (whose size, and slicing cost, grows with the slide)
            from dask.highlevelgraph import MaterializedLayer

            assert not any(isinstance(layer, MaterializedLayer) for layer in levels[0].dask.layers.values())
            np.testing.assert_array_equal(levels[0][100:300, 50:700:3, 1].compute(), rgb[100:300, 50:700:3, 1])


def test_no_mpp_requires_override(tmp_path: Path) -> None:
    rgb = synthetic_rgb(128, 128)
    path = write_pyramid_tiff(tmp_path / "nompp.tif", rgb, None, levels=1, tile=64)
    for backend in ("openslide", "tifffile"):
        with open_slide(path, backend=backend) as s:
            assert s.mpp is None
            with pytest.raises(SlideError, match="--slide-mpp") as err:
                s.require_mpp()
            assert str(path) in str(err.value)
        with open_slide(path, backend=backend, slide_mpp=0.25) as s:
            assert s.require_mpp() == 0.25 and s.file_mpp is None


def test_slide_mpp_override_wins(pyramid) -> None:
    path, _ = pyramid
    with open_slide(path, slide_mpp=0.3) as s:
        assert s.mpp == 0.3 and s.file_mpp == pytest.approx(0.5)


def test_tifffile_plain_successive_pages(tmp_path: Path) -> None:
    """Pages without SubIFDs or NewSubfileType: levels found by decreasing size; odd-sized page = associated."""
    rgb = synthetic_rgb(256, 256)
    path = tmp_path / "plain.tif"
    with tifffile.TiffWriter(path) as tw:
        tw.write(
            rgb,
            tile=(64, 64),
            photometric="rgb",
            compression="zlib",
            resolution=(2e4, 2e4),
            resolutionunit="CENTIMETER",
            metadata=None,
        )
        tw.write(downsample_rgb(rgb, 2), tile=(64, 64), photometric="rgb", compression="zlib", metadata=None)
        tw.write(np.zeros((20, 60, 3), np.uint8), photometric="rgb", metadata=None)  # a "label"
    with open_slide(path, backend="tifffile") as s:
        assert s.level_dimensions == [(256, 256), (128, 128)]
        assert s.mpp == pytest.approx(0.5)
        assert np.array_equal(s.read_region((64, 64), 1, (32, 32)), downsample_rgb(rgb, 2)[32:64, 32:64])
        assert any(img.shape == (20, 60, 3) for img in s.associated_images.values())


def test_ome_tiff_subifds(tmp_path: Path) -> None:
    rgb = synthetic_rgb(256, 256)
    path = tmp_path / "s.ome.tif"
    with tifffile.TiffWriter(path, ome=True) as tw:
        opts = dict(tile=(64, 64), photometric="rgb", compression="zlib")
        tw.write(rgb, subifds=1, metadata={"axes": "YXS", "PhysicalSizeX": 0.25, "PhysicalSizeY": 0.25}, **opts)
        tw.write(downsample_rgb(rgb, 2), subfiletype=1, **opts)
    with open_slide(path) as s:  # auto prefers tifffile for OME-TIFF
        assert s.backend == "tifffile" and s.vendor == "ome-tiff"
        assert s.level_dimensions == [(256, 256), (128, 128)]
        assert s.mpp == pytest.approx(0.25)
        assert np.array_equal(s.read_region((0, 0), 1, (128, 128)), downsample_rgb(rgb, 2))


def test_pickle_reopens(pyramid) -> None:
    path, rgb = pyramid
    with open_slide(path, backend="tifffile", slide_mpp=0.4) as s:
        s2 = pickle.loads(pickle.dumps(s))
    assert isinstance(s2, Slide) and s2.backend == "tifffile" and s2.mpp == 0.4
    assert np.array_equal(s2.read_region((0, 0), 0, (8, 8)), rgb[:8, :8])
    s2.close()


def test_bounds_offset_from_openslide_properties(pyramid, monkeypatch) -> None:
    import openslide

    path, rgb = pyramid

    class BoundedOpenSlide(openslide.OpenSlide):
        @property
        def properties(self):  # type: ignore[override]
            props = dict(super().properties)
            props.update(
                {
                    "openslide.bounds-x": "96",
                    "openslide.bounds-y": "40",
                    "openslide.bounds-width": "512",
                    "openslide.bounds-height": "384",
                }
            )
            return props

    monkeypatch.setattr(openslide, "OpenSlide", BoundedOpenSlide)
    with open_slide(path, backend="openslide") as s:
        assert s.bounds == (96, 40, 512, 384)
        thumb, ds = s.thumbnail(max_size=128)
        assert ds == pytest.approx(4.0) and thumb.shape == (96, 128, 3)
        # the thumbnail starts at the bounds origin, not at (0, 0)
        assert np.array_equal(thumb, downsample_rgb(downsample_rgb(rgb, 2), 2)[10:106, 24:152])


# --- writer ---------------------------------------------------------------------------------------------------
def test_writer_levels_stop_and_validation(tmp_path: Path) -> None:
    rgb = synthetic_rgb(40, 70)
    path = write_pyramid_tiff(tmp_path / "sub" / "tiny.tif", rgb, 0.5, levels=10, tile=16)
    with open_slide(path) as s:
        assert s.level_dimensions == [(70, 40), (35, 20), (17, 10), (8, 5), (4, 2), (2, 1)]
    assert not [p for p in (tmp_path / "sub").iterdir() if p.name != "tiny.tif"]  # no temp file left
    for kwargs, match in [
        ({"tile": 100}, "multiple of 16"),
        ({"levels": 0}, "levels"),
        ({"mpp": -1.0}, "mpp"),
        ({"compression": "webp2"}, "compression"),
        ({"factor": 1}, "factor"),
    ]:
        args = {"mpp": 0.5, **kwargs}
        with pytest.raises(SlideError, match=match):
            write_pyramid_tiff(tmp_path / "bad.tif", rgb, **args)
    with pytest.raises(SlideError, match="RGB"):
        write_pyramid_tiff(tmp_path / "bad.tif", rgb[..., 0], 0.5)
    assert not (tmp_path / "bad.tif").exists()


def test_writer_factor4_jpeg(tmp_path: Path) -> None:
    rgb = synthetic_rgb(512, 512)
    path = write_pyramid_tiff(
        tmp_path / "f4.tif", rgb, 0.25, levels=3, tile=128, factor=4, quality=80, description="demo"
    )
    for backend in ("openslide", "tifffile"):
        with open_slide(path, backend=backend) as s:
            assert s.level_dimensions == [(512, 512), (128, 128), (32, 32)]
            assert s.level_downsamples == [1.0, 4.0, 16.0] and s.mpp == pytest.approx(0.25)


def test_auto_falls_back_to_tifffile_for_codec_openslide_lacks(tmp_path: Path) -> None:
    rgb = synthetic_rgb(128, 128)
    path = tmp_path / "lzma.tif"
    tifffile.imwrite(path, rgb, tile=(64, 64), photometric="rgb", compression="lzma")
    with pytest.raises(SlideError, match="compression"):
        open_slide(path, backend="openslide")
    with open_slide(path) as s:
        assert s.backend == "tifffile"
        assert np.array_equal(s.read_region((0, 0), 0, (128, 128)), rgb)


def test_tile_writer_matches_in_memory_writer(tmp_path: Path) -> None:
    """The streaming writer asks for one tile at a time (never more than ``tile`` px a side) and, given the same
    pixels per level, writes a file both backends read exactly like :func:`write_pyramid_tiff`'s."""
    rgb = synthetic_rgb(300, 520)
    half = downsample_rgb(rgb, 2)
    levels = {1: rgb, 2: half, 4: downsample_rgb(half, 2)}  # successive, as write_pyramid_tiff does
    asked: list[tuple[int, int, int, int, int]] = []

    def render(ds: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        asked.append((ds, x, y, w, h))
        return levels[ds][y : y + h, x : x + w]

    streamed = write_pyramid_tiff_tiles(
        tmp_path / "s.tif", 520, 300, render, 0.5, levels=3, tile=128, compression="deflate", description="x"
    )
    whole = write_pyramid_tiff(tmp_path / "w.tif", rgb, 0.5, levels=3, tile=128, compression="deflate")
    assert max(max(w, h) for _, _, _, w, h in asked) <= 128
    # one call per tile per level: ceil(520/128) * ceil(300/128) + ceil(260/128) * ceil(150/128) + 2 * 1
    assert len(asked) == 5 * 3 + 3 * 2 + 2 * 1
    for backend in ("openslide", "tifffile"):
        with open_slide(streamed, backend=backend) as a, open_slide(whole, backend=backend) as b:
            assert a.level_dimensions == b.level_dimensions == [(520, 300), (260, 150), (130, 75)]
            assert a.mpp == pytest.approx(0.5) and a.level_downsamples == b.level_downsamples
            for level, (w, h) in enumerate(a.level_dimensions):
                ds = int(a.level_downsamples[level])
                got = a.read_region((0, 0), level, (w, h))
                np.testing.assert_array_equal(got, b.read_region((0, 0), level, (w, h)))
                np.testing.assert_array_equal(got, levels[ds][:h, :w])


def test_tile_writer_refuses_bad_tiles_and_leaves_no_file(tmp_path: Path) -> None:
    with pytest.raises(SlideError, match=r"render\(1, 0, 0, 64, 64\) returned \(64, 64\) uint8"):
        write_pyramid_tiff_tiles(tmp_path / "bad.tif", 100, 100, lambda *a: np.zeros((64, 64), np.uint8), 0.5, tile=64)
    with pytest.raises(SlideError, match="width and height"):
        write_pyramid_tiff_tiles(tmp_path / "bad.tif", 0, 100, lambda *a: None, 0.5)
    assert list(tmp_path.iterdir()) == []
