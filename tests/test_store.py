"""FeatureStore: layout, atomic writes, validation of half-written groups, encoder mismatch, maps, .h5 import."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from wsimil_core.errors import DataError, StoreError
from wsimil_core.store.zarr_store import FeatureStore, safe_slide_id


def _bag(n=10, d=6, seed=0, dtype=np.float16):
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(n, d)).astype(dtype)
    coords = np.stack([np.arange(n) % 4 * 256, np.arange(n) // 4 * 256], 1).astype(np.int64)
    return feats, coords


@pytest.fixture
def store(tmp_path) -> FeatureStore:
    return FeatureStore(tmp_path / "store", create=True)


def test_roundtrip_layout_and_attrs(store):
    feats, coords = _bag()
    store.write_bag(
        "s1",
        feats,
        coords,
        "resnet18",
        {"name": "resnet18", "weights_sha256": "random-init"},
        slide_mpp=0.25,
        patch_size_level0=512,
        slide_path=Path("/x/s1.svs"),
    )
    assert store.slide_ids() == ["s1"] and "s1" in store
    assert store.has_bag("s1", "resnet18") and not store.has_bag("s1", "uni")
    bag = store.read_bag("s1", "resnet18")
    assert bag.features.dtype == np.float16 and bag.coords.dtype == np.int64
    np.testing.assert_array_equal(bag.features, feats)
    np.testing.assert_array_equal(bag.coords, coords)
    assert bag.attrs["slide_mpp"] == 0.25 and bag.attrs["slide_path"] == "/x/s1.svs"
    assert bag.attrs["complete"] is True and bag.attrs["n_patches"] == 10 and "version" in bag.attrs
    assert bag.encoder_attrs["weights_sha256"] == "random-init" and bag.encoder_attrs["dim"] == 6
    # zarr v3 layout of DESIGN.md
    root = store.root
    for node in ("", "s1", "s1/coords", "s1/features", "s1/features/resnet18", "s1/maps"):
        meta = json.loads((root / node / "zarr.json").read_text())
        assert meta["zarr_format"] == 3
    assert json.loads((root / "s1/coords/zarr.json").read_text())["data_type"] == "int64"
    # float64 input is stored as float32; the default encoder is the only one
    store.write_bag("s2", feats.astype(np.float64), coords, "e")
    assert store.read_bag("s2").features.dtype == np.float32


def test_missing_and_foreign_store(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        FeatureStore(tmp_path / "nope")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "x.txt").write_text("hi")
    with pytest.raises(StoreError, match="not a wsimil feature store"):
        FeatureStore(tmp_path / "plain")
    with pytest.raises(StoreError, match="not empty"):
        FeatureStore(tmp_path / "plain", create=True)


@pytest.mark.parametrize("bad", ["../evil", "a/b", "", ".hidden", "__zarr", "a b", "x" * 201])
def test_unsafe_slide_ids_refused(store, bad):
    feats, coords = _bag()
    with pytest.raises(StoreError, match="invalid slide id"):
        store.write_bag(bad, feats, coords, "e")
    with pytest.raises(StoreError, match="invalid encoder id"):
        store.write_bag("ok", feats, coords, bad or "/")


def test_safe_slide_id():
    assert safe_slide_id("TCGA-AB 12/3.svs") == "TCGA-AB_12_3.svs"
    assert safe_slide_id("._x") == "x"
    # nothing usable left: a stable hash id, never a refusal (issue 17; tests/test_batch.py has the rest)
    assert safe_slide_id("///") == safe_slide_id("///") != safe_slide_id("//")
    assert safe_slide_id("///").startswith("slide-")


def test_second_encoder_and_mismatch_error(store):
    feats, coords = _bag()
    store.write_bag("s1", feats, coords, "resnet18")
    store.write_maps("s1", "ck", {"attention": np.ones(10)})
    f2 = np.ones((10, 3), np.float32)
    store.write_bag("s1", f2, coords, "uni", {"name": "uni"}, extra_attr=1)
    assert store.encoder_ids("s1") == ["resnet18", "uni"]
    assert store.slide_attrs("s1")["extra_attr"] == 1
    assert store.map_ids("s1") == ["ck"]  # maps of the same grid survive
    np.testing.assert_array_equal(store.read_bag("s1", "resnet18").features, feats)
    with pytest.raises(StoreError) as err:
        store.read_bag("s1", "conch")
    msg = str(err.value)
    assert "another encoder" in msg and "'conch'" in msg and "resnet18" in msg and "uni" in msg
    assert str(store.root) in msg and "'s1'" in msg
    with pytest.raises(StoreError, match="2 encoders"):
        store.read_bag("s1")
    assert store.slide_ids(encoder_id="uni") == ["s1"] and store.slide_ids(encoder_id="conch") == []


def test_different_grid_needs_overwrite(store):
    feats, coords = _bag()
    store.write_bag("s1", feats, coords, "a")
    store.write_bag("s1", feats, coords, "b")
    f3, c3 = _bag(n=5)
    with pytest.raises(StoreError, match="different patch grid"):
        store.write_bag("s1", f3, c3, "a")
    store.write_bag("s1", f3, c3, "a", overwrite=True)
    assert store.encoder_ids("s1") == ["a"] and store.read_bag("s1").features.shape == (5, 6)


def test_bad_arrays(store):
    feats, coords = _bag()
    with pytest.raises(DataError, match="10 feature rows but 9 coords"):
        store.write_bag("s", feats, coords[:9], "e")
    bad = feats.astype(np.float32)
    bad[3, 2] = np.nan
    with pytest.raises(DataError, match="NaN"):
        store.write_bag("s", bad, coords, "e")
    with pytest.raises(DataError, match=r"\[N, 2\]"):
        store.write_bag("s", feats, coords[:, :1], "e")
    with pytest.raises(DataError, match="integer"):
        store.write_bag("s", feats, coords + 0.5, "e")
    assert store.slide_ids() == []
    with pytest.raises(StoreError, match="no slide 'zz'"):
        store.read_bag("zz", "e")


def test_zero_patch_bag(store):
    store.write_bag("empty", np.zeros((0, 4), np.float16), np.zeros((0, 2), np.int64), "e")
    assert store.has_bag("empty", "e")
    assert store.read_bag("empty").features.shape == (0, 4)


def _chunk(node: Path) -> Path:
    return next(p for p in (node / "c").rglob("*") if p.is_file())


def test_deleted_chunk_is_incomplete_and_redone(store):
    feats, coords = _bag()
    store.write_bag("s1", feats, coords, "e")
    store.write_bag("s2", feats, coords, "e")
    _chunk(store.root / "s1" / "features" / "e").unlink()
    assert not store.has_bag("s1", "e") and store.has_bag("s2", "e")
    assert store.encoder_ids("s1") == []
    with pytest.raises(StoreError, match="incomplete or damaged"):
        store.read_bag("s1", "e")
    _chunk(store.root / "s2" / "coords").unlink()
    assert store.slide_ids() == ["s1"]  # s1's group is fine, only its features array is broken
    assert store.incomplete_slide_ids() == ["s2"]
    assert any("coords chunk" in p for p in store.problems("s2"))
    with pytest.raises(StoreError, match="incomplete"):
        store.read_bag("s2", "e")
    # re-running the writes redoes both
    store.write_bag("s1", feats, coords, "e")
    store.write_bag("s2", feats, coords, "e")
    assert store.slide_ids("e") == ["s1", "s2"]
    np.testing.assert_array_equal(store.read_bag("s2").features, feats)


def test_truncated_chunk_is_detected_on_read(store):
    feats, coords = _bag(n=200, d=64, dtype=np.float32)
    store.write_bag("s1", feats, coords, "e")
    chunk = _chunk(store.root / "s1" / "features" / "e")
    data = chunk.read_bytes()
    chunk.write_bytes(data[: len(data) // 2])
    with pytest.raises(StoreError, match="damaged"):
        store.read_bag("s1", "e")


def test_unmarked_group_is_incomplete(store):
    feats, coords = _bag()
    store.write_bag("s1", feats, coords, "e")
    meta_path = store.root / "s1" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["attributes"]["complete"] = False
    meta_path.write_text(json.dumps(meta))
    assert store.slide_ids() == [] and not store.has_bag("s1", "e")
    assert "never marked complete" in store.problems("s1")[0]
    store.write_bag("s1", feats, coords, "e")
    assert store.slide_ids() == ["s1"]


def test_failed_write_leaves_nothing(store, monkeypatch):
    import wsimil_core.store.zarr_store as st

    feats, coords = _bag()
    real = st.create_array
    calls = []

    def boom(group, name, data, attrs=None):
        calls.append(name)
        if len(calls) == 2:  # after coords, while writing the features
            raise OSError(28, "No space left on device")
        return real(group, name, data, attrs)

    monkeypatch.setattr(st, "create_array", boom)
    with pytest.raises(OSError, match="No space"):
        store.write_bag("s1", feats, coords, "e")
    assert store.slide_ids() == [] and not (store.root / "s1").exists()
    assert list((store.root / ".wsimil-tmp").iterdir()) == []


_KILLED_WRITER = """
import sys, time
import numpy as np
import wsimil_core.store.zarr_store as st
def hang(self, built, dest):
    print("BUILT", flush=True)
    time.sleep(60)
st.FeatureStore._swap_in = hang
fs = st.FeatureStore(sys.argv[1], create=True)
fs.write_bag("s1", np.ones((50, 8), np.float16), np.zeros((50, 2), np.int64), "e")
"""


def test_killed_writer_leaves_no_group_and_rerun_redoes(tmp_path):
    root = tmp_path / "store"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(root)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "BUILT"  # everything written to the temporary group
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    fs = FeatureStore(root)
    assert fs.slide_ids() == [] and not fs.has_bag("s1", "e")
    tmp = root / ".wsimil-tmp"
    assert len(list(tmp.iterdir())) == 1  # the dead writer's leftovers
    feats, coords = _bag()
    fs.write_bag("s1", feats, coords, "e")  # re-run: works, and cleans the dead writer's temporaries
    assert fs.slide_ids() == ["s1"] and list(tmp.iterdir()) == []


def test_maps(store):
    feats, coords = _bag()
    store.write_bag("s1", feats, coords, "e")
    with pytest.raises(StoreError, match="no complete maps"):
        store.read_maps("s1", "ck1")
    maps = {"attention": np.arange(10), "attention/head3": np.ones((10, 2)), "routing/task_b": np.zeros(10)}
    store.write_maps("s1", "ck1", maps, {"prediction": {"label": "yes"}})
    out = store.read_maps("s1", "ck1")
    assert set(out) == set(maps) and all(v.dtype == np.float32 for v in out.values())
    np.testing.assert_array_equal(out["attention"], np.arange(10))
    assert out["attention/head3"].shape == (10, 2)
    assert store.maps_attrs("s1", "ck1") == {"prediction": {"label": "yes"}}
    store.write_maps("s1", "ck1", {"attention": np.zeros(10)})  # replaces atomically
    assert set(store.read_maps("s1", "ck1")) == {"attention"}
    with pytest.raises(DataError, match=r"expected \[10\]"):
        store.write_maps("s1", "ck2", {"attention": np.zeros(9)})
    assert store.map_ids("s1") == ["ck1"]
    with pytest.raises(StoreError, match="invalid checkpoint id"):
        store.write_maps("s1", "../x", {"attention": np.zeros(10)})


def _write_h5(path, feats, coords, coord_attrs=None):
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=feats)
        c = f.create_dataset("coords", data=coords)
        for k, v in (coord_attrs or {}).items():
            c.attrs[k] = v


def test_import_h5(tmp_path, store):
    feats, coords = _bag(n=12, d=5, dtype=np.float32)
    coords = coords * 2 + 1000
    # CLAM: features [1, N, D]? (CLAM writes [N, D]; TRIDENT-era tools sometimes [1, N, D]), patch_size at a level
    _write_h5(
        tmp_path / "clam one.h5", feats[None], coords, {"patch_size": 256, "patch_level": 1, "downsample": [2.0, 2.0]}
    )
    _write_h5(tmp_path / "trident.h5", feats, coords.astype(np.float64), {"patch_size_level0": 512, "patch_size": 256})
    ids = store.import_h5(tmp_path, encoder_id="uni", slide_mpp=0.25)
    assert ids == ["clam_one", "trident"]
    for sid in ids:
        bag = store.read_bag(sid, "uni")
        np.testing.assert_allclose(bag.features, feats)
        np.testing.assert_array_equal(bag.coords, coords)
        assert bag.attrs["patch_size_level0"] == 512 and bag.attrs["stride_level0"] == 512
        assert bag.attrs["grid_origin"] == [1000, 1000] and bag.attrs["slide_mpp"] == 0.25
    assert store.import_h5(tmp_path / "trident.h5", slide_id="other") == ["other"]
    _write_h5(tmp_path / "bad.h5", feats, coords[:5])
    with pytest.raises(StoreError, match="12 feature rows but 5 coords"):
        store.import_h5(tmp_path / "bad.h5")
    with h5py.File(tmp_path / "nofeat.h5", "w") as f:
        f.create_dataset("coords", data=coords)
    with pytest.raises(StoreError, match="no features dataset"):
        store.import_h5(tmp_path / "nofeat.h5")
    with pytest.raises(StoreError, match="does not exist"):
        store.import_h5(tmp_path / "missing.h5")
    (tmp_path / "fake.h5").write_text("not hdf5")
    with pytest.raises(StoreError, match="fake.h5"):
        store.import_h5(tmp_path / "fake.h5")


def test_cli_import_h5_and_error_line(tmp_path):
    feats, coords = _bag(n=4, d=3, dtype=np.float32)
    _write_h5(tmp_path / "a.h5", feats, coords)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    run = [sys.executable, "-m", "wsimil_core", "import-h5", str(tmp_path / "a.h5"), "--store", str(tmp_path / "st")]
    out = subprocess.run(run, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert FeatureStore(tmp_path / "st").has_bag("a", "h5")
    out = subprocess.run(run[:4] + [str(tmp_path / "zz.h5")] + run[5:], capture_output=True, text=True, env=env)
    assert out.returncode == 1 and "zz.h5" in out.stderr and "Traceback" not in out.stderr


def test_map_specs_travel_with_the_maps(tmp_path):
    """Specs given to write_maps come back per map name; maps written without a spec have none."""
    import numpy as np

    from wsimil_core.models.base import MapSpec
    from wsimil_core.store import FeatureStore

    fs = FeatureStore(tmp_path / "s", create=True)
    fs.write_bag("a", np.zeros((3, 4), np.float32), np.arange(6).reshape(3, 2), "enc")
    spec = MapSpec("routing/t", "binary", "patch routed to the task expert", categories=("not routed", "routed"))
    fs.write_maps(
        "a", "ck-1", {"routing/t": np.array([0, 1, 1]), "attention": np.ones(3)}, specs={spec.name: spec.to_dict()}
    )
    got = fs.read_map_specs("a", "ck-1")
    assert set(got) == {"routing/t"}
    assert MapSpec.from_dict(got["routing/t"]) == spec


# --- verification (issue 17 item 1): damage that stat() cannot see is found by reading every chunk ------------


def _damage(node: Path, how: str = "truncate") -> None:
    chunk = _chunk(node)
    data = chunk.read_bytes()
    if how == "truncate":
        chunk.write_bytes(data[: len(data) // 2])
    else:  # flip bytes in the middle: same size, wrong checksum
        mid = len(data) // 2
        chunk.write_bytes(data[:mid] + bytes(b ^ 0xFF for b in data[mid : mid + 4]) + data[mid + 4 :])


def test_damaged_chunk_looks_healthy_until_verified_and_repair_removes_it(store):
    from wsimil_core.store.verify import repair_store, verify_store

    feats, coords = _bag(n=200, d=64, dtype=np.float32)
    for sid in ("s1", "s2", "s3"):
        store.write_bag(sid, feats, coords, "e")
    store.write_bag("s2", feats[:, :8], coords, "f")  # a second encoder on s2
    store.write_maps("s3", "ck", {"attention": np.arange(200, dtype=np.float32)})
    _damage(store.root / "s1" / "features" / "e")
    _damage(store.root / "s2" / "coords", how="flip")
    _damage(store.root / "s3" / "maps" / "ck" / "m000", how="flip")
    # the cheap checks (stat only) see nothing: this is what the default extract relies on
    assert store.problems("s1") == [] and store.has_bag("s1", "e") and store.incomplete_slide_ids() == []
    assert store.map_ids("s3") == ["ck"]

    report = {d.slide_id: d for d in verify_store(store)}
    assert sorted(report) == ["s1", "s2", "s3"]
    assert report["s1"].remove == ["features/e"] and "features 'e'" in report["s1"].problems[0]
    assert report["s2"].remove == [""] and report["s2"].whole and "coords" in report["s2"].problems[0]
    assert report["s3"].remove == ["maps/ck"] and "maps 'ck'" in report["s3"].problems[0]
    assert all("checksum" in p or "cannot read" in p for d in report.values() for p in d.problems)

    removed = repair_store(store, report.values())
    assert removed == ["s1/features/e", "s2", "s3/maps/ck"]
    assert verify_store(store) == []
    assert store.slide_ids() == ["s1", "s3"] and not store.has_bag("s1", "e") and store.has_bag("s3", "e")
    assert store.map_ids("s3") == []
    # the next write redoes the removed features on the kept coords
    store.write_bag("s1", feats, coords, "e")
    np.testing.assert_array_equal(store.read_bag("s1", "e").features, feats)


def test_verify_checks_counts_and_values(store):
    from wsimil_core.store.verify import verify_slide

    feats, coords = _bag(n=30, d=4, dtype=np.float32)
    store.write_bag("s1", feats, coords, "e")
    assert verify_slide(store, "s1") is None
    # NaN written behind the store's back (write_bag refuses them) is damage too
    import zarr

    arr = zarr.open_array(str(store.root / "s1" / "features" / "e"), mode="r+")
    arr[3, 1] = np.nan
    damage = verify_slide(store, "s1")
    assert damage is not None and damage.remove == ["features/e"] and "NaN" in damage.problems[0]
    # an interrupted group (never marked complete) is reported as a whole-slide problem
    store.write_bag("s2", feats, coords, "e")
    meta_path = store.root / "s2" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["attributes"]["complete"] = False
    meta_path.write_text(json.dumps(meta))
    damage = verify_slide(store, "s2")
    assert damage is not None and damage.whole and "never marked complete" in damage.problems[0]


def test_read_error_names_the_repair_command(store):
    feats, coords = _bag(n=200, d=64, dtype=np.float32)
    store.write_bag("s1", feats, coords, "e")
    _damage(store.root / "s1" / "features" / "e")
    with pytest.raises(StoreError, match=r"s1.*wsimil store verify --repair"):
        store.read_bag("s1", "e")


def test_cli_store_verify_and_repair(tmp_path):
    fs = FeatureStore(tmp_path / "st", create=True)
    feats, coords = _bag(n=200, d=64, dtype=np.float32)
    fs.write_bag("good", feats, coords, "e")
    fs.write_bag("bad", feats, coords, "e")
    _damage(fs.root / "bad" / "features" / "e")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    run = [sys.executable, "-m", "wsimil_core", "store", "verify", str(fs.root)]
    out = subprocess.run(run, capture_output=True, text=True, env=env)
    assert out.returncode == 1, out.stderr
    assert "bad" in out.stdout and "features 'e'" in out.stdout and "--repair" in out.stdout
    assert "good" not in out.stdout.replace("good:", "")  # healthy slides are only counted
    assert "Traceback" not in out.stderr
    out = subprocess.run([*run, "--repair"], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "removed bad/features/e" in out.stdout and "extract" in out.stdout
    assert not fs.has_bag("bad", "e") and fs.has_bag("good", "e")
    out = subprocess.run(run, capture_output=True, text=True, env=env)
    assert out.returncode == 0 and "2 slide(s)" in out.stdout and "no damage" in out.stdout
