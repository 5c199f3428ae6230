"""Shared file helpers (wsimil_core._io): atomic writes and JSON-friendly values."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from wsimil_core._io import atomic_path, atomic_write, atomic_write_text, jsonable, write_json_atomic


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_atomic_write_text_creates_folders_and_gives_plain_permissions(tmp_path):
    out = atomic_write_text(tmp_path / "a" / "b" / "x.txt", "héllo\n")
    assert out == tmp_path / "a" / "b" / "x.txt"
    assert out.read_text(encoding="utf-8") == "héllo\n"
    assert (out.stat().st_mode & 0o777) == (0o666 & ~_umask())  # not mkstemp's 0o600
    assert [p.name for p in out.parent.iterdir()] == ["x.txt"]  # no temporary file left


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "keep.bin"
    target.write_bytes(b"old")

    def boom(f):
        f.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, boom)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.bin"]

    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"new")
            raise KeyboardInterrupt
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.bin"]


def test_atomic_path_replaces_on_success(tmp_path):
    target = tmp_path / "t.csv"
    target.write_text("old")
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".t.csv.") and tmp.name.endswith(".tmp")
        tmp.write_text("new")
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.csv"]


def test_write_json_atomic_round_trips(tmp_path):
    obj = {"a": [1, 2.5, None], "b": {"c": "d"}}
    write_json_atomic(obj, tmp_path / "o.json")
    assert json.loads((tmp_path / "o.json").read_text()) == obj
    write_json_atomic(obj, tmp_path / "p.json", indent=2)
    assert (tmp_path / "p.json").read_text() == json.dumps(obj, indent=2)


@dataclasses.dataclass
class _Params:
    size: tuple
    where: Path


def test_jsonable_converts_numpy_torch_paths_and_dataclasses():
    value = {
        1: (np.int64(3), np.float32(0.5), np.bool_(True)),
        "arr": np.arange(4).reshape(2, 2),
        "t": torch.tensor([1.5, 2.0]),
        "p": Path("/x/y"),
        "dc": _Params((1, 2), Path("z")),
        "plain": [None, "s", 1, 2.0, False],
    }
    out = jsonable(value)
    assert out == {
        "1": [3, 0.5, True],
        "arr": [[0, 1], [2, 3]],
        "t": [1.5, 2.0],
        "p": "/x/y",
        "dc": {"size": [1, 2], "where": "z"},
        "plain": [None, "s", 1, 2.0, False],
    }
    json.dumps(out)  # really JSON
    assert type(out["1"][0]) is int and type(out["1"][2]) is bool


def test_jsonable_fallback_only_for_unknown_objects():
    thing = object()
    assert jsonable({"x": thing})["x"] is thing  # no fallback: returned as is
    assert jsonable({"x": thing, "n": None, "s": "a"}, fallback=str) == {"x": str(thing), "n": None, "s": "a"}
