"""Training data (issue 3 item 2): BagDataset, splits, balanced sampling, omics join, clear errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from wsimil_core.data.dataset import BagDataset
from wsimil_core.data.sampling import BagSampler, balanced_weights, make_sampler
from wsimil_core.data.splits import column_split, kfold_split, random_split
from wsimil_core.errors import DataError, StoreError


def labels_frame(cohort) -> pd.DataFrame:
    return pd.read_csv(cohort.labels, dtype={"slide_id": str, "patient_id": str})


def test_dataset_items_labels_and_class_names(synthetic_store):
    ds = BagDataset(synthetic_store.store, synthetic_store.labels, ["label", "task_c"])
    assert len(ds) == 24 and ds.in_dim == synthetic_store.in_dim
    assert ds.encoder_id == synthetic_store.encoder_id
    assert ds.class_names == {"label": ["0", "1"], "task_c": ["high", "low"]}
    frame = labels_frame(synthetic_store)
    assert ds.labels("task_c").tolist() == [0 if v == "high" else 1 for v in frame["task_c"]]
    bag = ds[3]
    assert bag.slide_id == "slide_03"
    assert bag.features.dtype == torch.float32 and bag.features.shape[1] == synthetic_store.in_dim
    assert bag.coords.dtype == torch.int64 and bag.coords.shape == (bag.features.shape[0], 2)
    assert bag.label.tolist() == [int(frame["label"][3])] and set(bag.targets) == {"label", "task_c"}
    assert bag.omics is None
    assert ds.groups()[0] == ds.groups()[1] == "P00"


def test_patch_subsampling_is_seeded_per_epoch(synthetic_store):
    ds = BagDataset(synthetic_store.store, synthetic_store.labels, max_patches=10, seed=3)
    full = BagDataset(synthetic_store.store, synthetic_store.labels)
    a, b = ds[0], ds[0]
    assert a.features.shape[0] == 10 and torch.equal(a.extras["patch_index"], b.extras["patch_index"])
    idx = a.extras["patch_index"]
    assert torch.equal(a.features, full[0].features[idx]) and torch.equal(a.coords, full[0].coords[idx])
    ds.set_epoch(1)
    assert not torch.equal(ds[0].extras["patch_index"], idx)


def test_omics_join_standardised_with_train_stats(synthetic_store):
    ds = BagDataset(synthetic_store.store, synthetic_store.labels, omics_csv=synthetic_store.omics)
    assert ds.omics_dim == 50
    train = ds.subset(ds.slide_ids[:12])
    test = ds.subset(ds.slide_ids[12:])
    stats = train.fit_omics_stats()
    train.set_omics_stats(stats)
    test.set_omics_stats(stats)
    mat = np.stack([train[i].omics.numpy() for i in range(len(train))])
    np.testing.assert_allclose(mat.mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(mat.std(0), 1.0, atol=1e-4)
    raw = pd.read_csv(synthetic_store.omics).set_index("slide_id")
    expected = (raw.loc["slide_20"].to_numpy(np.float32) - stats[0]) / stats[1]
    np.testing.assert_allclose(test[test.slide_ids.index("slide_20")].omics.numpy(), expected, rtol=1e-5)
    # the label-correlated columns separate the classes
    labels = train.labels()
    assert mat[labels == 1, :5].mean() > mat[labels == 0, :5].mean() + 0.5


def test_missing_label_error_or_skip(synthetic_store, tmp_path):
    frame = labels_frame(synthetic_store)
    frame.loc[5, "task_b"] = np.nan
    path = tmp_path / "labels.csv"
    frame.to_csv(path, index=False)
    with pytest.raises(DataError, match=r"slide_05.*task_b"):
        BagDataset(synthetic_store.store, path, ["label", "task_b"])
    with pytest.warns(UserWarning, match="slide_05"):
        ds = BagDataset(synthetic_store.store, path, ["label", "task_b"], missing_labels="skip")
    assert "slide_05" not in ds.slide_ids and len(ds) == 23
    # the other target alone is fine
    assert len(BagDataset(synthetic_store.store, path, ["label"])) == 24


def test_slides_missing_from_store_and_bad_columns(synthetic_store, tmp_path):
    frame = labels_frame(synthetic_store)
    extra = pd.DataFrame(
        [{"slide_id": f"ghost_{i}", "label": 0, "task_b": 0, "task_c": "low", "patient_id": "X"} for i in range(7)]
    )
    path = tmp_path / "labels.csv"
    pd.concat([frame, extra]).to_csv(path, index=False)
    with pytest.raises(DataError, match=r"7 slide\(s\) are not in the store.*ghost_0"):
        BagDataset(synthetic_store.store, path)
    with pytest.raises(DataError, match="not_a_column"):
        BagDataset(synthetic_store.store, synthetic_store.labels, ["not_a_column"])
    frame.drop(columns="slide_id").to_csv(tmp_path / "noid.csv", index=False)
    with pytest.raises(DataError, match="slide_id"):
        BagDataset(synthetic_store.store, tmp_path / "noid.csv")
    with pytest.raises(StoreError, match="nope"):
        BagDataset(synthetic_store.store, synthetic_store.labels, encoder_id="nope")


def test_omics_nan_is_an_error(synthetic_store, tmp_path):
    frame = pd.read_csv(synthetic_store.omics)
    frame.loc[2, "g07"] = np.nan
    path = tmp_path / "omics.csv"
    frame.to_csv(path, index=False)
    with pytest.raises(DataError, match=r"omics.csv.*g07"):
        BagDataset(synthetic_store.store, synthetic_store.labels, omics_csv=path)


def test_nan_features_name_the_slide(tmp_path):
    from wsimil_core.store.zarr_store import FeatureStore

    store = FeatureStore(tmp_path / "s.zarr", create=True)
    feats = np.ones((5, 4), np.float32)
    coords = np.arange(10, dtype=np.int64).reshape(5, 2)
    store.write_bag("good", feats, coords, "enc")
    store.write_bag("bad", feats, coords, "enc")
    import zarr  # the store refuses to write NaN, so corrupt the array afterwards (as a broken disk might)

    arr = zarr.open_array(str(tmp_path / "s.zarr" / "bad" / "features" / "enc"), mode="r+")
    arr[2, 1] = np.nan
    pd.DataFrame({"slide_id": ["good", "bad"], "label": [0, 1]}).to_csv(tmp_path / "l.csv", index=False)
    ds = BagDataset(tmp_path / "s.zarr", tmp_path / "l.csv")
    ds[0]
    with pytest.raises(DataError, match="'bad'.*NaN"):
        ds[1]


def test_column_split():
    split = column_split(["a", "b", "c", "d"], ["train", "Val", "test", float("nan")])
    assert split.train == ["a"] and split.val == ["b"] and split.test == ["c"]
    with pytest.raises(DataError, match="train/val/test"):
        column_split(["a", "b"], ["train", "holdout"])


def test_random_split_grouped_and_stratified():
    ids = [f"s{i}" for i in range(40)]
    groups = [f"p{i // 2}" for i in range(40)]
    labels = np.array([(i // 2) % 2 for i in range(40)])
    split = random_split(ids, labels, groups, val_frac=0.2, test_frac=0.2, seed=1)
    assert len(split.train) + len(split.val) + len(split.test) == 40
    part = {s: name for name, members in split.as_dict().items() for s in members}
    for i in range(0, 40, 2):
        assert part[ids[i]] == part[ids[i + 1]]
    val_labels = [labels[ids.index(s)] for s in split.val]
    assert sorted(val_labels) == [0] * 4 + [1] * 4  # 2 of 10 patients per class, 2 slides each
    assert random_split(ids, labels, groups, 0.2, 0.2, seed=1) == split
    assert random_split(ids, labels, groups, 0.2, 0.2, seed=2) != split


def test_kfold_split_partitions_patients():
    ids = [f"s{i}" for i in range(30)]
    groups = [f"p{i // 3}" for i in range(30)]
    labels = np.array([(i // 3) % 2 for i in range(30)])
    tests = []
    for fold in range(5):
        split = kfold_split(ids, labels, groups, folds=5, fold=fold, val_frac=0.25, seed=0)
        assert split.val and not set(split.val) & set(split.train)
        tests.extend(split.test)
        for name, members in split.as_dict().items():
            pats = {groups[ids.index(s)] for s in members}
            others = {groups[ids.index(s)] for n, m in split.as_dict().items() if n != name for s in m}
            assert not pats & others
        assert {labels[ids.index(s)] for s in split.test} == {0, 1}
    assert sorted(tests) == sorted(ids)
    with pytest.raises(DataError, match="patients"):
        kfold_split(ids[:6], labels[:6], groups[:6], folds=5)


def test_balanced_weights_single_and_multi_target():
    y = np.array([0, 0, 0, 1])
    w = balanced_weights({"label": y})
    assert w[y == 1].sum() == pytest.approx(0.5) and w[y == 0].sum() == pytest.approx(0.5)
    b = np.array([1, 0, 0, 0])
    w2 = balanced_weights({"label": y, "task_b": b})
    assert w2.sum() == pytest.approx(1.0)
    assert w2[3] > w2[1] and w2[0] > w2[1]


def test_bag_sampler_reproducible_balanced_and_sharded():
    labels = {"label": np.array([0] * 18 + [1] * 2)}
    s = make_sampler(labels, 20, balanced=True, seed=0)
    s.set_epoch(0)
    first = list(s)
    s.set_epoch(0)
    assert list(s) == first
    s.set_epoch(1)
    assert list(s) != first
    many = []
    for e in range(20):
        s.set_epoch(e)
        many.extend(s)
    share = np.mean(np.array(many) >= 18)
    assert 0.35 < share < 0.65
    plain = BagSampler(7, seed=0)
    assert sorted(plain) == list(range(7))
    shards = [list(BagSampler(7, seed=0, rank=r, world_size=2)) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 4 and set(shards[0]) | set(shards[1]) == set(range(7))


def test_bag_cache_budget_shared_by_views(synthetic_store):
    none = BagDataset(synthetic_store.store, synthetic_store.labels)
    none[0]
    assert not none.cache
    ds = BagDataset(synthetic_store.store, synthetic_store.labels, cache_gb=1.0)
    view = ds.subset(ds.slide_ids[:2])
    view[1]
    assert list(ds.cache.bags) == [ds.slide_ids[1]]
    assert torch.equal(ds[1].features, view[1].features)
    feats, coords = ds._read(ds.slide_ids[0])
    budget = feats.nbytes + coords.nbytes + 1
    small = BagDataset(synthetic_store.store, synthetic_store.labels, cache_gb=budget / 2**30)
    for i in range(4):
        small[i]
    assert list(small.cache.bags) == [ds.slide_ids[0]]


def test_loader_workers_fill_the_cache_in_this_process(synthetic_store, monkeypatch):
    """Before a pass with workers the view's bags are read here, in order, until one does not fit; a view whose
    bags are all cached gets no workers. The items are those of an uncached dataset."""
    from wsimil_core.store.zarr_store import FeatureStore

    reads: list[str] = []
    real = FeatureStore.read_bag
    monkeypatch.setattr(FeatureStore, "read_bag", lambda self, s, *a, **k: reads.append(s) or real(self, s, *a, **k))
    plain = BagDataset(synthetic_store.store, synthetic_store.labels)
    sizes = [sum(a.nbytes for a in plain._read(s)) for s in plain.slide_ids]
    order = plain.slide_ids[::-1]
    budget = sizes[-1] + sizes[-2] + sizes[-3]  # the view's first three bags fit, the fourth does not
    ds = BagDataset(synthetic_store.store, synthetic_store.labels, cache_gb=budget / 2**30)
    view = ds.subset(order)
    reads.clear()
    assert view.loader_workers(0) == 0 and reads == []  # no workers: the cache fills as the bags are read
    assert view.loader_workers(2) == 2
    assert list(ds.cache.bags) == order[:3] and reads == order[:4]
    assert view.loader_workers(2) == 2 and reads == order[:4]  # the refused bag stops later fills
    assert view.subset(order[:3]).loader_workers(2) == 0  # every bag of that view is cached
    full = BagDataset(synthetic_store.store, synthetic_store.labels, cache_gb=1.0)
    assert full.loader_workers(1) == 0 and len(full.cache) == len(full)
    for i in range(len(full)):
        assert torch.equal(full[i].features, plain[i].features) and torch.equal(full[i].coords, plain[i].coords)
    assert BagDataset(synthetic_store.store, synthetic_store.labels).loader_workers(3) == 3  # no cache: workers


def test_items_carry_slide_path_and_grid_attrs(synthetic_store, tmp_path):
    from wsimil_core.store.zarr_store import FeatureStore

    # a store without slide files (features only, as MIL-CSV imports): slide_path None, grid attrs still there
    ds = BagDataset(synthetic_store.store, synthetic_store.labels)
    bag = ds.subset(ds.slide_ids[2:4])[1]
    assert bag.slide_id == ds.slide_ids[3] and bag.slide_path is None
    assert bag.slide_attrs["patch_size_level0"] == 256 and bag.slide_attrs["slide_mpp"] == 0.5
    assert torch.equal(bag.coords, torch.from_numpy(FeatureStore(synthetic_store.store).read_coords(bag.slide_id)))
    # a store written from slide files: every item (train, val, test views, cached or not) names its file
    store = FeatureStore(tmp_path / "s.zarr", create=True)
    rows = []
    for i in range(3):
        coords = np.array([[0, 0], [256, 0], [0, 256 * (i + 1)]], dtype=np.int64)
        store.write_bag(
            f"s{i}",
            np.ones((3, 4), np.float32),
            coords,
            "enc",
            slide_path=f"/data/slide{i}.svs",
            patch_size_level0=256,
            patch_size=224,
        )
        rows.append({"slide_id": f"s{i}", "label": i % 2})
    pd.DataFrame(rows).to_csv(tmp_path / "l.csv", index=False)
    for cache in (0.0, 1.0):
        ds = BagDataset(tmp_path / "s.zarr", tmp_path / "l.csv", cache_gb=cache, max_patches=2)
        for view, n in ((ds, 2), (ds.subset(["s2", "s0"]), 3)):  # training subsampling / full validation bags
            for k in range(len(view)):
                item = view[k]
                assert item.slide_path == f"/data/slide{item.slide_id[1]}.svs"
                assert item.slide_attrs["patch_size"] == 224 and item.coords.shape == (n, 2)
        assert ds[0].to("cpu").slide_path == "/data/slide0.svs"


def test_damaged_bag_names_the_slide_and_the_fix(synthetic_store, tmp_path):
    import shutil

    store = tmp_path / "store.zarr"
    shutil.copytree(synthetic_store.store, store)
    chunk = next(
        p for p in (store / "slide_03" / "features" / synthetic_store.encoder_id / "c").rglob("*") if p.is_file()
    )
    chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])
    ds = BagDataset(store, synthetic_store.labels)
    with pytest.raises(StoreError, match=r"slide 'slide_03'.*damaged.*wsimil store verify --repair"):
        ds[ds.slide_ids.index("slide_03")]
