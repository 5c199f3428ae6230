"""Issue 17 items 5 and 7: concurrent writers of a slide's maps, readers during a replace, and links inside a store.

Items: (5) three processes replace the same slide's maps of one checkpoint many times while a fourth reads them:
every write succeeds, the reader always sees one whole write (never an error, never a mix or zeros), and no
trash is left in ``.wsimil-tmp``. (7) a store whose ``.wsimil-tmp`` or a slide folder is a symbolic link is
refused for writing, and nothing outside the store is deleted or written.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import re
import socket
import time
import traceback
from pathlib import Path

import numpy as np
import pytest

from wsimil_core.errors import StoreError
from wsimil_core.store.zarr_store import FeatureStore

N_PATCHES = 64
WRITES = 60  # per writer


def _writer(root: str, wid: int, start, errors) -> None:
    fs = FeatureStore(root)
    start.wait()
    for i in range(WRITES):
        value = float(wid * 1000 + i)
        try:
            fs.write_maps(
                "s1",
                "ck",
                {"attention": np.full(N_PATCHES, value), "b/c": np.full((N_PATCHES, 2), value)},
                {"value": value},
            )
        except Exception:  # noqa: BLE001  (reported to the parent)
            errors.put(f"writer {wid} write {i}: {traceback.format_exc(limit=3)}")


def _reader(root: str, start, stop, errors, counts) -> None:
    fs = FeatureStore(root)
    start.wait()
    n = 0
    while not stop.is_set():
        try:
            maps = fs.read_maps("s1", "ck")
            value = fs.maps_attrs("s1", "ck")["value"]
            a, b = maps["attention"], maps["b/c"]
            # one whole write: both maps hold one value (never zeros of a vanished chunk, never a mix)
            if not (np.all(a == a[0]) and np.all(b == a[0]) and a.shape == (N_PATCHES,) and b.shape == (N_PATCHES, 2)):
                errors.put(f"reader saw a mixed or partial write: {np.unique(a)} {np.unique(b)}")
            del value
        except Exception:  # noqa: BLE001
            errors.put(f"reader: {traceback.format_exc(limit=3)}")
        n += 1
    counts.put(n)


def test_concurrent_map_writers_and_a_reader(tmp_path):
    root = tmp_path / "store"
    fs = FeatureStore(root, create=True)
    fs.write_bag("s1", np.ones((N_PATCHES, 4), np.float32), np.arange(2 * N_PATCHES).reshape(-1, 2), "e")
    fs.write_maps(
        "s1", "ck", {"attention": np.full(N_PATCHES, -1.0), "b/c": np.full((N_PATCHES, 2), -1.0)}, {"value": -1.0}
    )
    ctx = mp.get_context("spawn")
    start, stop = ctx.Event(), ctx.Event()
    errors, counts = ctx.Queue(), ctx.Queue()
    writers = [ctx.Process(target=_writer, args=(str(root), w, start, errors)) for w in range(3)]
    reader = ctx.Process(target=_reader, args=(str(root), start, stop, errors, counts))
    for p in [*writers, reader]:
        p.start()
    time.sleep(0.5)
    start.set()
    for p in writers:
        p.join(120)
    stop.set()
    reader.join(60)
    found = []
    while not errors.empty():
        found.append(errors.get())
    assert not found, f"{len(found)} failures, first: {found[0]}"
    assert all(p.exitcode == 0 for p in [*writers, reader])
    assert counts.get(timeout=5) > 0
    assert list((root / ".wsimil-tmp").iterdir()) == []  # no trash left behind
    out = FeatureStore(root).read_maps("s1", "ck")
    assert out["attention"][0] in {float(w * 1000 + WRITES - 1) for w in range(3)}


def test_reader_retries_a_node_replaced_mid_read(tmp_path, monkeypatch):
    """A maps node that vanishes and comes back (another process's replace) between the reader's check and its
    read is read again once instead of being reported as damaged."""
    import wsimil_core.store.groups as groups

    fs = FeatureStore(tmp_path / "store", create=True)
    fs.write_bag("s1", np.ones((8, 4), np.float32), np.arange(16).reshape(-1, 2), "e")
    fs.write_maps("s1", "ck", {"attention": np.full(8, 1.0)})
    other = FeatureStore(tmp_path / "store")
    real = groups.SlideGroups._read_array
    calls = []

    def replaced_during_read(self, node, slide_id):
        calls.append(node)
        if len(calls) == 1:  # another writer replaces the node right now: the path is gone for a moment
            node_dir = Path(node).parent
            os.rename(node_dir, tmp_path / "aside")
            try:
                return real(self, node, slide_id)
            finally:
                os.rename(tmp_path / "aside", node_dir)
                other.write_maps("s1", "ck", {"attention": np.full(8, 2.0)})
        return real(self, node, slide_id)

    monkeypatch.setattr(groups.SlideGroups, "_read_array", replaced_during_read)
    out = fs.read_maps("s1", "ck")
    np.testing.assert_array_equal(out["attention"], np.full(8, 2.0, np.float32))
    assert len(calls) == 2


def _dead_pid() -> int:
    pid = 4_000_000
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid -= 1


def test_symlinked_tmp_folder_is_refused_and_nothing_outside_is_deleted(tmp_path):
    fs = FeatureStore(tmp_path / "store", create=True)
    outside = tmp_path / "precious"
    victim = outside / f"data.{socket.gethostname()}.{_dead_pid()}.0123456789ab"  # looks like a dead writer's tmp
    victim.mkdir(parents=True)
    (victim / "keep.txt").write_text("mine")
    tmp = fs.root / ".wsimil-tmp"
    if tmp.exists():
        tmp.rmdir()
    tmp.symlink_to(outside, target_is_directory=True)
    with pytest.raises(StoreError, match=r"\.wsimil-tmp.*symbolic link"):
        fs.write_bag("s1", np.ones((8, 4), np.float32), np.arange(16).reshape(-1, 2), "e")
    assert (victim / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in outside.iterdir()) == [victim.name]


def test_symlinked_slide_folder_is_not_written_through(tmp_path):
    other = FeatureStore(tmp_path / "other", create=True)
    other.write_bag("s1", np.ones((8, 4), np.float32), np.arange(16).reshape(-1, 2), "e")
    fs = FeatureStore(tmp_path / "store", create=True)
    (fs.root / "s1").symlink_to(other.root / "s1", target_is_directory=True)
    assert fs.slide_ids() == ["s1"]  # reading through it is harmless
    with pytest.raises(StoreError, match=r"s1.*symbolic link"):
        fs.write_maps("s1", "ck", {"attention": np.zeros(8)})
    with pytest.raises(StoreError, match=r"s1.*symbolic link"):
        fs.write_bag("s1", np.ones((8, 4), np.float32), np.arange(16).reshape(-1, 2), "e2")
    assert other.map_ids("s1") == [] and other.encoder_ids("s1") == ["e"]
    # removing the slide removes the link only, never what it points to
    fs.remove_slide("s1")
    assert not os.path.lexists(fs.root / "s1") and other.slide_ids() == ["s1"] and other.has_bag("s1", "e")


def test_symlinked_maps_folder_is_refused(tmp_path):
    fs = FeatureStore(tmp_path / "store", create=True)
    fs.write_bag("s1", np.ones((8, 4), np.float32), np.arange(16).reshape(-1, 2), "e")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    maps = fs.root / "s1" / "maps"
    os.rename(maps, elsewhere / "maps")
    maps.symlink_to(elsewhere / "maps", target_is_directory=True)
    with pytest.raises(StoreError, match=re.escape(os.path.join("s1", "maps")) + ".*symbolic link"):
        fs.write_maps("s1", "ck", {"attention": np.zeros(8)})
    assert sorted(p.name for p in (elsewhere / "maps").iterdir()) == ["zarr.json"]


def test_symlinked_lock_file_is_refused(tmp_path):
    from wsimil_core.errors import LockError

    fs = FeatureStore(tmp_path / "store", create=True)
    target = tmp_path / "elsewhere.txt"
    target.write_text("mine")
    (fs.root / ".wsimil-lock").symlink_to(target)
    with pytest.raises(LockError, match="symbolic link"):
        fs.write_bag("s1", np.ones((8, 4), np.float32), np.arange(16).reshape(-1, 2), "e")
    assert target.read_text() == "mine" and fs.slide_ids() == []
    assert list((fs.root / ".wsimil-tmp").iterdir()) == []
