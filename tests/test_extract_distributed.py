"""Extraction over a dask.distributed cluster equals the local path; re-runs submit nothing; the store takes
concurrent writers of different slides (two OS processes at once)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest

from wsimil_core.features.encoders import RandomWeightsWarning, create_encoder
from wsimil_core.features.extract import NoTissueWarning, extract_cohort
from wsimil_core.store.zarr_store import FeatureStore
from wsimil_core.wsi.tiling import GridSpec, TissueParams
from wsimil_core.wsi.writer import write_pyramid_tiff

distributed = pytest.importorskip("distributed")

SIDE = 1024  # level-0 px at 0.5 µm/px
GRID = dict(mpp=2.0, patch=32, min_tissue=0.5)  # 128 level-0 px per patch


def _tissue_slide(path, seed, box):
    """White slide with a textured pink 'tissue' rectangle (x0, y0, w, h in level-0 px)."""
    rng = np.random.default_rng(seed)
    rgb = np.full((SIDE, SIDE, 3), 255, dtype=np.uint8)
    x0, y0, w, h = box
    tex = rng.integers(-40, 40, size=(h, w, 3), dtype=np.int16)
    rgb[y0 : y0 + h, x0 : x0 + w] = np.clip(np.array([200, 90, 150], np.int16) + tex, 0, 255).astype(np.uint8)
    return write_pyramid_tiff(path, rgb, mpp=0.5, levels=3, tile=256, compression="deflate")


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    d = tmp_path_factory.mktemp("dslides")
    return [
        _tissue_slide(d / "a.tif", 1, (256, 256, 512, 384)),
        _tissue_slide(d / "b.tif", 2, (128, 384, 640, 384)),
        _tissue_slide(d / "c.tif", 3, (384, 128, 384, 640)),
    ]


@pytest.fixture(scope="module")
def client():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=":0")
        c = distributed.Client(cluster)
    yield c
    c.close()
    cluster.close()


def _distributed(slides, store, client, **kw):
    from wsimil_core.features.distributed import extract_cohort_distributed

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        return extract_cohort_distributed(
            slides,
            store,
            "resnet18",
            GridSpec(**GRID),
            TissueParams(),
            client=client,
            device="cpu",
            batch_size=16,
            progress=False,
            **kw,
        )


def test_cluster_extraction_equals_local_and_rerun_submits_nothing(slides, tmp_path, client):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        local = extract_cohort(
            slides,
            tmp_path / "local",
            "resnet18",
            GridSpec(**GRID),
            TissueParams(),
            device="cpu",
            batch_size=16,
            num_workers=0,
            progress=False,
            encoder=create_encoder("resnet18"),
        )
    assert local.done == ["a", "b", "c"]

    submitted: list[list[str]] = []
    summary = _distributed(slides, tmp_path / "dist", client, on_submit=submitted.append)
    assert submitted == [["a", "b", "c"]]
    assert summary.ok and summary.done == ["a", "b", "c"] and summary.encoder_id == "resnet18-random"
    assert summary.n_patches == local.n_patches > 0
    ref, got = FeatureStore(tmp_path / "local"), FeatureStore(tmp_path / "dist")
    assert got.slide_ids("resnet18-random") == ["a", "b", "c"]
    for sid in ("a", "b", "c"):
        a, b = ref.read_bag(sid, "resnet18-random"), got.read_bag(sid, "resnet18-random")
        np.testing.assert_array_equal(a.coords, b.coords)
        assert b.features.dtype == np.float16
        np.testing.assert_allclose(b.features.astype(np.float32), a.features.astype(np.float32), rtol=1e-2, atol=1e-2)
        assert {k: v for k, v in b.attrs.items()} == a.attrs
        assert b.encoder_attrs == a.encoder_attrs
    assert not list((got.root / ".wsimil-tmp").iterdir())

    again = _distributed(slides, tmp_path / "dist", client, on_submit=submitted.append)
    assert submitted[-1] == [] and again.skipped == ["a", "b", "c"] and not again.done and again.ok


def test_failures_and_empty_slides_are_reported_per_slide(slides, tmp_path, client):
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"II*\x00" + bytes(range(256)) * 8)  # a TIFF header followed by garbage
    white = write_pyramid_tiff(
        tmp_path / "white.tif", np.full((512, 512, 3), 255, np.uint8), mpp=0.5, levels=2, tile=256
    )
    done: list[str] = []
    with pytest.warns(NoTissueWarning, match="white.tif"):
        summary = _distributed(
            [slides[0], bad, white, tmp_path / "missing.svs"], tmp_path / "store", client, on_slide_done=done.append
        )
    assert summary.done == ["a"] and done == ["a"] and summary.empty == ["white"]
    assert set(summary.failed) == {"bad.tif", "missing.svs"} and not summary.ok
    assert "missing.svs" in summary.failed["missing.svs"] and "\n" not in summary.failed["bad.tif"]
    assert FeatureStore(tmp_path / "store").slide_ids() == ["a"]


def test_exactly_one_cluster_target_and_lazy_import(slides, tmp_path):
    from wsimil_core.errors import ConfigError
    from wsimil_core.features.distributed import extract_cohort_distributed

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        with pytest.raises(ConfigError, match="exactly one of"):
            extract_cohort_distributed(
                slides,
                tmp_path / "s",
                "resnet18",
                GridSpec(**GRID),
                TissueParams(),
                scheduler="tcp://127.0.0.1:1",
                local_cluster=2,
                progress=False,
            )
    code = (
        "import sys, wsimil_core, wsimil_core.cli, wsimil_core.features.distributed; "
        "assert 'distributed' not in sys.modules, 'distributed imported at import time'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


_WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import numpy as np
    from wsimil_core.store.zarr_store import FeatureStore
    root, tag, go = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    fs = FeatureStore(root)
    while not go.exists():
        time.sleep(0.01)
    for i in range(6):
        seed = (ord(tag) * 100 + i)
        rng = np.random.default_rng(seed)
        n = 50 + i
        feats = rng.standard_normal((n, 64)).astype(np.float16)
        coords = np.stack([np.arange(n), np.full(n, seed)], 1).astype(np.int64)
        fs.write_bag(f"{tag}{i}", feats, coords, "enc", {"name": "enc"}, slide_path=f"/x/{tag}{i}.svs")
""")


def test_two_processes_write_different_slides_into_one_store_at_once(tmp_path):
    root = tmp_path / "store"
    FeatureStore(root, create=True)
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(root), tag, str(go)]) for tag in ("p", "q")]
    go.touch()  # both writers start together
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    fs = FeatureStore(root)
    assert fs.slide_ids("enc") == sorted(f"{t}{i}" for t in "pq" for i in range(6))
    assert fs.incomplete_slide_ids() == []
    for tag in "pq":
        for i in range(6):
            seed = ord(tag) * 100 + i
            bag = fs.read_bag(f"{tag}{i}", "enc")
            want = np.random.default_rng(seed).standard_normal((50 + i, 64)).astype(np.float16)
            np.testing.assert_array_equal(bag.features, want)
            assert bag.coords[0, 1] == seed and bag.attrs["slide_path"] == f"/x/{tag}{i}.svs"
    assert not list((root / ".wsimil-tmp").iterdir())


def test_cli_local_cluster_with_a_worker_process(slides, tmp_path, capsys):
    """--local-cluster starts real worker processes (daemonic: --workers falls back to reading in the task)."""
    from wsimil_core.cli import main

    store = tmp_path / "store"
    args = [
        "extract",
        str(slides[1]),
        "--store",
        str(store),
        "--mpp",
        "2",
        "--patch",
        "32",
        "--min-tissue",
        "0.5",
        "--workers",
        "1",
        "--batch-size",
        "16",
        "--device",
        "cpu",
        "--no-progress",
        "--local-cluster",
        "1",
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        main(args)
    assert "extracted 1 slide(s)" in capsys.readouterr().out
    assert FeatureStore(store).slide_ids("resnet18-random") == ["b"]
    with pytest.raises(SystemExit) as exc:
        main(args + ["--scheduler", "tcp://127.0.0.1:9"])
    assert exc.value.code == 1 and "not both" in capsys.readouterr().err
