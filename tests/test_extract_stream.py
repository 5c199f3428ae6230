"""Issue 15 goal 5: ``extract_cohort`` streams the whole cohort through one DataLoader (its workers start once per
run) and ends in the same store as the per-slide path; a slide's error stays that slide's."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch

import wsimil_core.features.stream as stream_mod
from test_extract import _tissue_slide
from wsimil_core.errors import SlideError
from wsimil_core.features.encoders import RandomWeightsWarning, create_encoder
from wsimil_core.features.extract import NoTissueWarning, extract_cohort
from wsimil_core.features.slide_step import extract_slide
from wsimil_core.store.zarr_store import FeatureStore
from wsimil_core.wsi.tiling import GridSpec, TissueParams
from wsimil_core.wsi.writer import write_pyramid_tiff

GRID = GridSpec(mpp=2.0, patch=32, min_tissue=0.5)
BATCH = 8  # several batches per slide, and a last one that is not full


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    d = tmp_path_factory.mktemp("stream")
    white = d / "white.tif"
    write_pyramid_tiff(white, np.full((512, 512, 3), 255, np.uint8), mpp=0.5, levels=2, tile=256)
    return {
        "s1": _tissue_slide(d / "s1.tif", 1),
        "s2": _tissue_slide(d / "s2.tif", 2, box=(64, 320, 768, 512)),
        "s3": _tissue_slide(d / "s3.tif", 3, box=(128, 128, 384, 256)),
        "white": white,
    }


@pytest.fixture(scope="module")
def encoder():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        return create_encoder("resnet18")


@pytest.fixture
def loader_starts(monkeypatch):
    """Counts DataLoader iterations started (each one starts its worker processes)."""
    starts: list[int] = []

    class Counting(torch.utils.data.DataLoader):
        def __iter__(self):
            starts.append(self.num_workers)
            return super().__iter__()

    monkeypatch.setattr(torch.utils.data, "DataLoader", Counting)
    return starts


def _cohort(paths, store, encoder, **kw):
    kw.setdefault("num_workers", 1)
    return extract_cohort(
        paths, store, "resnet18", GRID, TissueParams(), batch_size=BATCH, encoder=encoder, progress=False, **kw
    )


def _per_slide(paths, store, encoder):
    """The previous driver: one ``extract_slide`` (one DataLoader) per slide."""
    fs = FeatureStore(store, create=True)
    model, spec = encoder
    done = []
    for path in paths:
        n = extract_slide(
            path,
            path.stem,
            fs,
            model,
            spec,
            GRID,
            TissueParams(),
            dtype="float16",
            slide_mpp=None,
            backend="auto",
            amp=True,
            batch_size=BATCH,
            num_workers=1,
            progress=False,
            warn_empty=False,
        )
        if n:
            done.append(path.stem)
    return done


def _assert_same_bags(store_a, store_b, sids):
    a, b = FeatureStore(store_a), FeatureStore(store_b)
    assert a.slide_ids() == b.slide_ids() == sids
    for sid in sids:
        bag_a, bag_b = a.read_bag(sid, "resnet18-random"), b.read_bag(sid, "resnet18-random")
        np.testing.assert_array_equal(bag_a.coords, bag_b.coords)
        np.testing.assert_array_equal(bag_a.features, bag_b.features)
        assert bag_a.attrs == bag_b.attrs and bag_a.encoder_attrs == bag_b.encoder_attrs


def test_one_loader_per_cohort_and_the_features_of_the_per_slide_path(slides, tmp_path, encoder, loader_starts):
    paths = [slides["s1"], slides["white"], tmp_path / "missing.svs", slides["s2"], slides["s3"]]
    with pytest.warns(NoTissueWarning, match="white.tif"):
        summary = _cohort(paths, tmp_path / "stream", encoder)
    assert loader_starts == [1]  # one DataLoader (one worker start) for the whole cohort
    assert summary.done == ["s1", "s2", "s3"] and summary.empty == ["white"]
    assert list(summary.failed) == ["missing.svs"] and "missing.svs: file not found" in summary.failed["missing.svs"]
    fs = FeatureStore(tmp_path / "stream")
    assert summary.n_patches == sum(len(fs.read_coords(s)) for s in ("s1", "s2", "s3"))
    assert len(fs.read_coords("s3")) % BATCH != 0 or len(fs.read_coords("s1")) % BATCH != 0  # a partial batch

    loader_starts.clear()
    assert _per_slide([slides["s1"], slides["s2"], slides["s3"]], tmp_path / "per_slide", encoder) == summary.done
    assert loader_starts == [1, 1, 1]  # the per-slide path starts its workers once per slide
    _assert_same_bags(tmp_path / "stream", tmp_path / "per_slide", ["s1", "s2", "s3"])


def _failing_open(bad, exc_factory):
    real = stream_mod.open_slide

    def open_slide(path, **kw):
        if os.fspath(path) == os.fspath(bad):
            raise exc_factory(path)
        return real(path, **kw)

    return open_slide


def test_a_read_error_in_a_worker_fails_only_its_slide(slides, tmp_path, encoder, monkeypatch, loader_starts):
    # the workers (forked from this process) read through stream.open_slide; tissue detection here does not
    monkeypatch.setattr(
        stream_mod, "open_slide", _failing_open(slides["s2"], lambda p: SlideError(f"{p}: Bogus marker in tile 3"))
    )
    paths = [slides["s1"], slides["s2"], slides["s3"]]
    summary = _cohort(paths, tmp_path / "stream", encoder)
    assert summary.done == ["s1", "s3"] and list(summary.failed) == ["s2.tif"]
    assert summary.failed["s2.tif"] == f"{slides['s2']}: Bogus marker in tile 3"  # the worker's error, one line
    assert loader_starts == [1]
    _per_slide([slides["s1"], slides["s3"]], tmp_path / "per_slide", encoder)
    _assert_same_bags(tmp_path / "stream", tmp_path / "per_slide", ["s1", "s3"])

    stopped = _cohort(paths, tmp_path / "fail_fast", encoder, fail_fast=True)
    assert stopped.stopped and stopped.done == ["s1"] and list(stopped.failed) == ["s2.tif"]
    assert FeatureStore(tmp_path / "fail_fast").slide_ids() == ["s1"]


class _Unpicklable(Exception):
    def __init__(self, path, code):
        super().__init__(f"{path}: code {code}")

    def __reduce__(self):
        raise TypeError("cannot pickle")


def test_an_error_that_cannot_cross_processes_still_names_the_slide(slides, tmp_path, encoder, monkeypatch):
    monkeypatch.setattr(stream_mod, "open_slide", _failing_open(slides["s1"], lambda p: _Unpicklable(p, 7)))
    summary = _cohort([slides["s1"], slides["s3"]], tmp_path / "stream", encoder)
    assert (
        summary.done == ["s3"] and summary.failed["s1.tif"] == f"{slides['s1']}: _Unpicklable: {slides['s1']}: code 7"
    )


def test_a_killed_worker_fails_its_slide_and_a_fresh_loader_takes_the_rest(
    slides, tmp_path, encoder, monkeypatch, loader_starts
):
    def die(path):
        os._exit(3)  # the worker process dies while reading this slide (only ever called in a worker)

    monkeypatch.setattr(stream_mod, "open_slide", _failing_open(slides["s2"], die))
    summary = _cohort([slides["s2"], slides["s1"], slides["s3"]], tmp_path / "stream", encoder)
    assert list(summary.failed) == ["s2.tif"] and "exited unexpectedly" in summary.failed["s2.tif"]
    assert summary.done == ["s1", "s3"] and loader_starts == [1, 1]
    _per_slide([slides["s1"], slides["s3"]], tmp_path / "per_slide", encoder)
    _assert_same_bags(tmp_path / "stream", tmp_path / "per_slide", ["s1", "s3"])


def test_reading_in_this_process_gives_the_same_store(slides, tmp_path, encoder):
    paths = [slides["s1"], slides["s3"]]
    _cohort(paths, tmp_path / "w0", encoder, num_workers=0)
    _cohort(paths, tmp_path / "w2", encoder, num_workers=2)
    _assert_same_bags(tmp_path / "w0", tmp_path / "w2", ["s1", "s3"])


def test_the_reader_gives_the_encoders_input_when_asked(slides, encoder):
    from wsimil_core.features.encoders import preprocess_batch
    from wsimil_core.wsi.slide import open_slide

    _, spec = encoder
    coords = np.array([[192, 192], [320, 448], [576, 192]], dtype=np.int64)
    job = stream_mod.BatchJob(0, slides["s1"], coords, 128, 32, None, "auto")
    slide_no, raw, error = stream_mod.PatchBatches()[job]
    assert slide_no == 0 and error is None and raw.dtype == torch.uint8 and raw.shape == (3, 32, 32, 3)
    with open_slide(slides["s1"]) as slide:
        direct = np.stack([slide.read_patch(int(x), int(y), 128, 32) for x, y in coords])
    np.testing.assert_array_equal(raw.numpy(), direct)
    _, normalised, _ = stream_mod.PatchBatches(spec)[job]
    expected = preprocess_batch(spec, direct)
    assert normalised.dtype == torch.float32 and normalised.stride() == expected.stride()  # same memory format
    torch.testing.assert_close(normalised, expected, rtol=0, atol=0)
