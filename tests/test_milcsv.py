"""MIL benchmark CSV import: bag/instance counts of the real fixtures, label mapping, grid coords, errors, CLI."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest

from wsimil_core.cli import main
from wsimil_core.errors import DataError
from wsimil_core.store.milcsv import grid_coords, import_mil_csv, read_mil_csv
from wsimil_core.store.zarr_store import FeatureStore

# counts from ../shared/fixtures/README.md
EXPECTED = {"elephant": (1391, 230, 200), "ucsb_breast_cancer": (2002, 708, 58)}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_real_benchmarks(fixtures_dir, tmp_path, name):
    n_inst, n_feat, n_bags = EXPECTED[name]
    src = fixtures_dir / "mil" / f"{name}.csv"
    s = import_mil_csv(src, tmp_path / "store", tmp_path / "labels.csv", progress=False)
    assert (s.n_instances, s.n_features, s.n_bags) == (n_inst, n_feat, n_bags)
    assert "{0, 1}" in s.label_mapping and s.warnings == []
    fs = FeatureStore(tmp_path / "store")
    ids = fs.slide_ids("milcsv")
    assert len(ids) == n_bags and all(i.startswith(f"{name}_") for i in ids)
    with open(tmp_path / "labels.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["slide_id", "label"] and len(rows) == n_bags + 1
    assert {r[1] for r in rows[1:]} == {"0", "1"} and s.n_positive == sum(int(r[1]) for r in rows[1:])
    total = 0
    raw = np.loadtxt(src, delimiter=",", dtype=np.float64)
    sid, _ = rows[1]
    bag_id = float(sid[len(name) + 1 :])
    bag = fs.read_bag(sid)
    np.testing.assert_allclose(bag.features, raw[raw[:, 1] == bag_id, 2:].astype(np.float32))
    for sid in ids[:20]:
        bag = fs.read_bag(sid)
        total += len(bag.coords)
        side = math.ceil(math.sqrt(len(bag.coords)))
        assert bag.features.shape[1] == n_feat and bag.attrs["patch_size_level0"] == 256
        assert bag.coords.max() <= (side - 1) * 256 and len(np.unique(bag.coords, axis=0)) == len(bag.coords)
    assert total > 0


def test_grid_coords():
    c = grid_coords(5)
    assert c.dtype == np.int64
    assert c.tolist() == [[0, 0], [256, 0], [512, 0], [0, 256], [256, 256]]
    assert grid_coords(0).shape == (0, 2)


def test_minus_one_labels_and_mixed_bag(tmp_path):
    src = tmp_path / "musk.csv"
    src.write_text("-1,a,1.0,2.0\n-1,a,3.0,4.0\n1,b,5.0,6.0\n-1,c,0,0\n1,c,1,1\n")
    s = import_mil_csv(src, tmp_path / "store", tmp_path / "out" / "labels.csv", name="m", progress=False)
    assert "-1 -> 0" in s.label_mapping
    assert s.slide_ids == ["m_a", "m_b", "m_c"] and s.n_positive == 2
    assert any("'c'" in w and "mixed" in w for w in s.warnings)
    assert (tmp_path / "out" / "labels.csv").read_text() == "slide_id,label\nm_a,0\nm_b,1\nm_c,1\n"
    bag = FeatureStore(tmp_path / "store").read_bag("m_a")
    np.testing.assert_array_equal(bag.features, [[1, 2], [3, 4]])
    np.testing.assert_array_equal(bag.coords, [[0, 0], [256, 0]])
    assert bag.attrs["bag_id"] == "a" and bag.attrs["slide_mpp"] == 0.5


@pytest.mark.parametrize(
    "text, match",
    [
        ("label,bag,f1\n1,a,2\n", "header"),
        ("2,a,1\n0,b,1\n", "0/1 or -1/1"),
        ("1,a\n", ">= 3 columns"),
        ("1,a,1,2\n0,b,1\n", "missing values"),
        ("", "empty"),
    ],
)
def test_bad_files(tmp_path, text, match):
    src = tmp_path / "bad.csv"
    src.write_text(text)
    with pytest.raises(DataError, match=match):
        read_mil_csv(src)


def test_cli(tmp_path, capsys):
    src = tmp_path / "tiny.csv"
    src.write_text("0,1,1.0,2.0\n1,2,3.0,4.0\n1,2,5.0,6.0\n")
    main(["import-mil-csv", str(src), "--store", str(tmp_path / "st"), "--labels", str(tmp_path / "l.csv")])
    out = capsys.readouterr().out
    assert "2 bags (1 positive), 3 instances, 2 features" in out
    assert FeatureStore(tmp_path / "st").slide_ids() == ["tiny_1", "tiny_2"]
    with pytest.raises(SystemExit) as exit_:
        main(["import-mil-csv", str(tmp_path / "nope.csv"), "--store", str(tmp_path / "st"), "--labels", "x.csv"])
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert "nope.csv" in err and "does not exist" in err
