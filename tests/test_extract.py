"""Feature extraction into the store: correctness, resumability, skips, failures, dtype, mismatch, CLI."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch

from wsimil_core.errors import StoreError
from wsimil_core.features.encoders import RandomWeightsWarning, create_encoder, extract_patches, file_sha256
from wsimil_core.features.extract import NoTissueWarning, extract_cohort, slide_id_from_path
from wsimil_core.store.zarr_store import FeatureStore
from wsimil_core.wsi.slide import open_slide
from wsimil_core.wsi.tiling import GridSpec, TissueParams
from wsimil_core.wsi.writer import write_pyramid_tiff

SIDE = 1024  # level-0 px at 0.5 µm/px
GRID = dict(mpp=2.0, patch=32, min_tissue=0.5)  # 128 level-0 px per patch
SLIDE_KEYS = (
    "slide_path",
    "slide_sha256_1mib",
    "slide_size",
    "level0_size",
    "slide_mpp",
    "patch_mpp",
    "patch_size",
    "patch_size_level0",
    "stride_level0",
    "grid_origin",
    "tissue",
    "version",
)


def _tissue_slide(path, seed, box=(192, 192, 640, 640)):
    """White slide with a textured pink 'tissue' rectangle (x0, y0, w, h in level-0 px)."""
    rng = np.random.default_rng(seed)
    rgb = np.full((SIDE, SIDE, 3), 255, dtype=np.uint8)
    x0, y0, w, h = box
    base = np.array([200, 90, 150], dtype=np.int16)
    tex = rng.integers(-40, 40, size=(h, w, 3), dtype=np.int16)
    rgb[y0 : y0 + h, x0 : x0 + w] = np.clip(base + tex, 0, 255).astype(np.uint8)
    return write_pyramid_tiff(path, rgb, mpp=0.5, levels=3, tile=256, compression="deflate")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    d = tmp_path_factory.mktemp("slides")  # read-only inputs shared by the tests of this module
    return [
        _tissue_slide(d / "s1.tif", 1),
        _tissue_slide(d / "s2.tif", 2, box=(64, 320, 768, 512)),
    ]


@pytest.fixture(scope="module")
def encoder():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        return create_encoder("resnet18")


def _run(slides, store, encoder, **kw):
    kw.setdefault("num_workers", 0)
    kw.setdefault("batch_size", 32)
    return extract_cohort(
        slides,
        store,
        "resnet18",
        GridSpec(**kw.pop("grid", GRID)),
        TissueParams(),
        device="cpu",
        progress=False,
        encoder=encoder,
        **kw,
    )


def test_extract_writes_bags_that_match_direct_encoding(cohort, tmp_path, encoder):
    model, spec = encoder
    summary = _run(cohort, tmp_path / "store", encoder, num_workers=1)  # one worker process reads patches
    assert summary.ok and summary.done == ["s1", "s2"] and summary.encoder_id == "resnet18-random"
    fs = FeatureStore(tmp_path / "store")
    assert fs.slide_ids() == ["s1", "s2"]
    bag = fs.read_bag("s1", "resnet18-random")
    assert bag.features.dtype == np.float16 and bag.features.shape[1] == 256
    assert bag.coords.dtype == np.int64 and bag.coords.shape == (bag.features.shape[0], 2)
    assert 9 <= len(bag.coords) <= 36  # the 640x640 tissue box holds ~25 patches of 128 level-0 px
    assert summary.n_patches == sum(len(fs.read_bag(s).coords) for s in fs.slide_ids())
    for key in SLIDE_KEYS:
        assert key in bag.attrs, key
    assert bag.attrs["slide_path"] == str(cohort[0].resolve())
    assert bag.attrs["level0_size"] == [SIDE, SIDE] and bag.attrs["slide_mpp"] == pytest.approx(0.5)
    assert bag.attrs["patch_size"] == 32 and bag.attrs["patch_size_level0"] == 128
    assert bag.encoder_attrs["weights_sha256"] == "random-init" and bag.encoder_attrs["name"] == "resnet18"
    assert bag.encoder_attrs["mpp"] == 2.0 and bag.encoder_attrs["patch"] == 32
    # The pipeline's features equal reading the same patches by hand and encoding them.
    with open_slide(cohort[0]) as slide:
        imgs = np.stack([slide.read_patch(int(x), int(y), 128, 32) for x, y in bag.coords])
    direct = extract_patches(model, spec, imgs).numpy()
    np.testing.assert_allclose(bag.features.astype(np.float32), direct, rtol=2e-3, atol=2e-3)


class _Stop(Exception):
    """Simulates a kill after the first slide."""


def test_interrupted_run_resumes_to_the_same_result(cohort, tmp_path, encoder):
    full = _run(cohort, tmp_path / "full", encoder)
    assert full.done == ["s1", "s2"]

    def stop_after_first(slide_id):
        raise _Stop(slide_id)

    with pytest.raises(_Stop):
        _run(cohort, tmp_path / "resumed", encoder, on_slide_done=stop_after_first)
    fs = FeatureStore(tmp_path / "resumed")
    assert fs.slide_ids() == ["s1"]
    first = fs.root / "s1" / "features" / "resnet18-random" / "zarr.json"
    stamp = os.stat(first).st_mtime_ns

    again = _run(cohort, tmp_path / "resumed", encoder)
    assert again.skipped == ["s1"] and again.done == ["s2"] and again.ok
    assert "skipped 1 already done" in str(again)
    assert os.stat(first).st_mtime_ns == stamp  # the finished slide was not recomputed
    ref = FeatureStore(tmp_path / "full")
    for sid in ("s1", "s2"):
        a, b = ref.read_bag(sid, "resnet18-random"), fs.read_bag(sid, "resnet18-random")
        np.testing.assert_array_equal(a.coords, b.coords)
        np.testing.assert_array_equal(a.features, b.features)

    third = _run(cohort, tmp_path / "resumed", encoder)
    assert third.skipped == ["s1", "s2"] and not third.done and third.n_patches == 0


def test_failures_and_empty_slides_do_not_stop_the_cohort(cohort, tmp_path, encoder):
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"II*\x00" + os.urandom(2000))  # a TIFF header followed by garbage
    white = tmp_path / "white.tif"
    write_pyramid_tiff(white, np.full((512, 512, 3), 255, np.uint8), mpp=0.5, levels=2, tile=256)
    with pytest.warns(NoTissueWarning, match="white.tif"):
        summary = _run([cohort[0], bad, white, tmp_path / "missing.svs", cohort[1]], tmp_path / "store", encoder)
    assert summary.done == ["s1", "s2"] and summary.empty == ["white"]
    assert set(summary.failed) == {"bad.tif", "missing.svs"}
    assert "bad.tif" in summary.failed["bad.tif"] and "missing.svs" in summary.failed["missing.svs"]
    assert not summary.ok and "FAILED bad.tif" in str(summary)
    assert FeatureStore(tmp_path / "store").slide_ids() == ["s1", "s2"]


def test_float32_dtype_and_a_second_encoder_share_the_grid(cohort, tmp_path, encoder):
    store = tmp_path / "store"
    _run(cohort[:1], store, encoder)
    sd_path = tmp_path / "r18.pth"
    torch.manual_seed(5)
    import torchvision

    torch.save(torchvision.models.resnet18(weights=None).state_dict(), sd_path)
    summary = extract_cohort(
        cohort[:1],
        store,
        "resnet18",
        GridSpec(**GRID),
        TissueParams(),
        weights=sd_path,
        device="cpu",
        batch_size=8,
        num_workers=0,
        dtype="float32",
        progress=False,
    )
    sha = file_sha256(sd_path)
    assert summary.encoder_id == f"resnet18-{sha[:8]}" and summary.done == ["s1"]
    fs = FeatureStore(store)
    assert fs.encoder_ids("s1") == sorted(["resnet18-random", f"resnet18-{sha[:8]}"])
    bag = fs.read_bag("s1", f"resnet18-{sha[:8]}")
    assert bag.features.dtype == np.float32 and bag.encoder_attrs["weights_sha256"] == sha
    np.testing.assert_array_equal(bag.coords, fs.read_bag("s1", "resnet18-random").coords)


def test_store_tiled_with_another_grid_is_a_clear_error(cohort, tmp_path, encoder):
    store = tmp_path / "store"
    _run(cohort[:1], store, encoder)
    with pytest.raises(StoreError, match=r"s1: this store was tiled with a different patch grid: patch 32 px"):
        _run(cohort[:1], store, encoder, grid={**GRID, "patch": 64})
    with pytest.raises(StoreError, match=r"mpp 2.0 \(asked 1.0\)"):
        _run(cohort[:1], store, encoder, grid={**GRID, "mpp": 1.0})


def test_random_init_warning_when_the_run_builds_the_encoder(cohort, tmp_path):
    with pytest.warns(RandomWeightsWarning):
        summary = extract_cohort(
            cohort[:1],
            tmp_path / "store",
            "resnet18",
            GridSpec(**GRID),
            TissueParams(),
            device="cpu",
            batch_size=16,
            num_workers=0,
            progress=False,
        )
    assert summary.done == ["s1"]


def test_slide_ids():
    assert slide_id_from_path("/a/b/TCGA-01.svs") == "TCGA-01"
    assert slide_id_from_path("x/img.ome.tiff") == "img"
    assert slide_id_from_path("x/with space.ndpi") == "with_space"


def test_cli_extract_and_failure_exit_code(cohort, tmp_path, capsys):
    from wsimil_core.cli import main

    store = tmp_path / "store"
    args = [
        "extract",
        str(cohort[0]),
        "--store",
        str(store),
        "--mpp",
        "2",
        "--patch",
        "32",
        "--min-tissue",
        "0.5",
        "--workers",
        "0",
        "--batch-size",
        "16",
        "--device",
        "cpu",
        "--no-progress",
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        main(args)
        assert "extracted 1 slide(s)" in capsys.readouterr().out
        missing = tmp_path / "nope.svs"
        with pytest.raises(SystemExit) as exc:
            main(args[:1] + [str(missing)] + args[1:])
    assert exc.value.code == 1
    captured = capsys.readouterr()
    assert "skipped 1 already done" in captured.out
    assert "nope.svs" in captured.err and "1 of 2 slide(s) failed" in captured.err
    assert FeatureStore(store).slide_ids() == ["s1"]


def test_same_id_from_another_file_is_reported_not_skipped(cohort, tmp_path, encoder):
    store = tmp_path / "store"
    _run(cohort[:1], store, encoder)
    other = _tissue_slide(tmp_path / "elsewhere" / "s1.tif", 9)
    summary = _run([other], store, encoder)
    assert not summary.skipped and not summary.done
    assert "made from another file" in summary.failed["s1.tif"]


def test_float16_overflow_is_refused():
    from wsimil_core.errors import DataError
    from wsimil_core.features.extract import to_store_dtype

    ok = to_store_dtype(np.array([[1.5, -2.0]], np.float32), "float16", "x.svs")
    assert ok.dtype == np.float16
    with pytest.raises(DataError, match="x.svs: .*--dtype float32"):
        to_store_dtype(np.array([[1e6]], np.float32), "float16", "x.svs")


def test_real_corrupt_slides_are_reported_in_one_line(fixtures_dir, cohort, tmp_path, encoder):
    from wsimil_core.errors import SlideError
    from wsimil_core.features.extract import encode_slide_patches
    from wsimil_core.features.slide_step import failure_line

    unreadable = fixtures_dir / "openslide" / "unreadable.svs"
    unopenable = fixtures_dir / "openslide" / "unopenable.tiff"
    summary = _run([unreadable, unopenable, cohort[0]], tmp_path / "store", encoder)
    assert summary.done == ["s1"] and set(summary.failed) == {"unreadable.svs", "unopenable.tiff"}
    for name, line in summary.failed.items():
        assert name in line and "\n" not in line
    # A tile that fails inside a DataLoader worker process is re-raised here and summarised in one line.
    model, spec = encoder
    with pytest.raises(SlideError) as exc:
        encode_slide_patches(unreadable, np.zeros((1, 2), np.int64), 16, 16, model, spec, num_workers=1, progress=False)
    line = failure_line(exc.value)
    assert line.startswith(str(unreadable)) and "Bogus marker" in line and "\n" not in line


def _truncate_a_chunk(node):
    chunk = next(p for p in (node / "c").rglob("*") if p.is_file())
    chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])


def test_verify_redoes_a_damaged_finished_slide(cohort, tmp_path, encoder):
    """Issue 17 item 1: a truncated chunk of a finished slide is skipped by the default (fast) run; ``verify=True``
    re-checks finished slides by reading them and redoes the damaged one."""
    first = _run(cohort, tmp_path / "store", encoder)
    assert first.done == ["s1", "s2"]
    fs = FeatureStore(tmp_path / "store")
    ref = fs.read_bag("s1", "resnet18-random").features
    s2_stamp = os.stat(fs.root / "s2" / "features" / "resnet18-random" / "zarr.json").st_mtime_ns
    _truncate_a_chunk(fs.root / "s1" / "features" / "resnet18-random")
    assert fs.has_bag("s1", "resnet18-random") and fs.problems("s1") == []

    fast = _run(cohort, tmp_path / "store", encoder)
    assert fast.skipped == ["s1", "s2"] and not fast.done  # the default run only stats the chunk files

    checked = _run(cohort, tmp_path / "store", encoder, verify=True)
    assert checked.ok and checked.done == ["s1"] and checked.skipped == ["s2"]
    assert list(checked.repaired) == ["s1"] and "features 'resnet18-random'" in checked.repaired["s1"]
    assert "redid 1 damaged slide(s): s1" in str(checked)
    np.testing.assert_array_equal(fs.read_bag("s1", "resnet18-random").features, ref)
    assert os.stat(fs.root / "s2" / "features" / "resnet18-random" / "zarr.json").st_mtime_ns == s2_stamp
