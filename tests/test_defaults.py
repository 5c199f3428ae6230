"""Defaults every method inherits (issue 18): the decision threshold is tuned on validation only when the split is
large enough, and per-feature standardisation is fitted on the training split and applied at inference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from test_trainer import make_config
from wsimil_core.checkpoint_meta import (
    THRESHOLD_FEW_SLIDES,
    THRESHOLD_FIXED,
    THRESHOLD_YOUDEN_VAL,
    CheckpointMeta,
    FeatureStatsMeta,
)
from wsimil_core.data.dataset import BagDataset
from wsimil_core.engine.checkpoint import load_checkpoint
from wsimil_core.engine.config import validate_config
from wsimil_core.engine.datasets import build_datasets, standardize_features
from wsimil_core.engine.run_outputs import describe_thresholds, fixed_thresholds, threshold_plan
from wsimil_core.engine.trainer import train
from wsimil_core.errors import CheckpointError, ConfigError
from wsimil_core.inference.predict import predict_store
from wsimil_core.store.milcsv import import_mil_csv
from wsimil_core.store.zarr_store import FeatureStore


class _Val:
    """A validation split with given labels (what threshold_plan reads)."""

    def __init__(self, labels):
        self._y = np.asarray(labels, dtype=np.int64)

    def labels(self, target=None):
        return self._y

    def __len__(self):
        return len(self._y)


def _cfg(**train):
    return validate_config({"train": train})


@pytest.mark.parametrize(
    "train_opts, labels, expected",
    [
        ({}, [0] * 30 + [1] * 19, (THRESHOLD_FEW_SLIDES, 49)),  # smaller class 19 < 20
        ({}, [0] * 30 + [1] * 20, (THRESHOLD_YOUDEN_VAL, 50)),
        ({"threshold_min_slides": 5}, [0] * 6 + [1] * 5, (THRESHOLD_YOUDEN_VAL, 11)),
        ({"threshold": "val"}, [0, 1, 1], (THRESHOLD_YOUDEN_VAL, 3)),
        ({"threshold": 0.3}, [0] * 50 + [1] * 50, (THRESHOLD_FIXED, None)),
        ({}, [1] * 40, (THRESHOLD_FEW_SLIDES, 40)),  # one class only: nothing to tune
    ],
)
def test_threshold_plan(train_opts, labels, expected):
    cfg = _cfg(**train_opts)
    plan = threshold_plan(cfg, _Val(labels), ["label"])
    assert plan == {"label": expected}
    fixed = fixed_thresholds(cfg, plan)
    if expected[0] == THRESHOLD_YOUDEN_VAL:
        assert fixed == {}
    else:
        assert fixed == {"label": 0.3 if train_opts.get("threshold") == 0.3 else 0.5}


def test_threshold_log_says_why():
    cfg = _cfg()
    line = describe_thresholds(cfg, threshold_plan(cfg, _Val([0] * 8 + [1] * 4), ["label"]))
    assert "0.5" in line and "fewer than 20" in line and "train.threshold: val" in line
    line = describe_thresholds(cfg, threshold_plan(cfg, _Val([0] * 25 + [1] * 25), ["label"]))
    assert "tuned on 50 validation slides" in line


def test_small_validation_keeps_half_and_records_why(synthetic_store, tmp_path):
    """The synthetic cohort's validation split has a handful of slides: auto keeps 0.5 and says so in the meta;
    threshold_min_slides=1 tunes it (Youden's J, generally not 0.5)."""
    result = train(make_config(synthetic_store, tmp_path / "a", train_opts={"epochs": 2}))
    meta = load_checkpoint(result.best_checkpoint)[1]
    thr = meta.tasks["label"].threshold
    assert result.thresholds == {"label": 0.5} and thr.value == 0.5
    assert thr.method == THRESHOLD_FEW_SLIDES and thr.n_slides and thr.n_slides < 20
    assert all(r["val/threshold"] == 0.5 for r in result.history)
    tuned = train(make_config(synthetic_store, tmp_path / "b", train_opts={"epochs": 2, "threshold_min_slides": 1}))
    meta = load_checkpoint(tuned.best_checkpoint)[1]
    assert meta.tasks["label"].threshold.method == THRESHOLD_YOUDEN_VAL
    assert meta.tasks["label"].threshold.value == tuned.thresholds["label"] != 0.5


# --- standardisation ---------------------------------------------------------------------------------------


def test_fit_feature_stats_matches_numpy(synthetic_store):
    ds = BagDataset(synthetic_store.store, synthetic_store.labels)
    part = ds.subset(ds.slide_ids[:7], max_patches=3)  # max_patches does not apply to the statistics
    mean, std, n = part.fit_feature_stats()
    fs = FeatureStore(synthetic_store.store)
    every = np.concatenate([np.asarray(fs.read_bag(s).features, dtype=np.float64) for s in ds.slide_ids[:7]])
    assert n == len(every)
    np.testing.assert_allclose(mean, every.mean(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(std, every.std(axis=0), rtol=1e-5, atol=1e-6)
    whole = ds.subset(ds.slide_ids[:7])
    whole.set_feature_stats((mean, std))
    raw = np.asarray(fs.read_bag(ds.slide_ids[0]).features, dtype=np.float32)
    np.testing.assert_allclose(whole[0].features.numpy(), (raw - mean) / std, rtol=1e-5, atol=1e-5)


def test_constant_feature_passes_through_centred(tmp_path):
    src = tmp_path / "bags.csv"
    src.write_text("0,a,1.0,5.0\n0,a,3.0,5.0\n1,b,5.0,5.0\n1,b,7.0,5.0\n")
    import_mil_csv(src, tmp_path / "store", tmp_path / "labels.csv", progress=False)
    mean, std, n = BagDataset(tmp_path / "store", tmp_path / "labels.csv").fit_feature_stats()
    assert n == 4 and mean.tolist() == [4.0, 5.0]
    assert std[1] == 1.0 and std[0] == pytest.approx(np.std([1, 3, 5, 7]))


def test_standardized_training_and_prediction_agree(synthetic_store, tmp_path):
    """Training with standardize: on stores the training split's statistics; predict applies them, so its
    probabilities equal the model run on (x - mean) / std computed here, and differ from raw features."""
    cfg = make_config(synthetic_store, tmp_path / "run", train_opts={"epochs": 2}, data={"standardize": "on"})
    result = train(cfg)
    model, meta = load_checkpoint(result.best_checkpoint)
    assert meta.feature_stats is not None
    config = validate_config(cfg)
    _, parts, split = build_datasets(config)
    train_ids = split.train
    fs = FeatureStore(synthetic_store.store)
    every = np.concatenate([np.asarray(fs.read_bag(s).features, dtype=np.float64) for s in train_ids])
    np.testing.assert_allclose(meta.feature_stats.mean, every.mean(axis=0), rtol=1e-5, atol=1e-6)
    assert meta.feature_stats.n_patches == len(every)

    frame = predict_store(result.best_checkpoint, synthetic_store.store, progress=False, write_maps=False)
    mean = np.asarray(meta.feature_stats.mean, dtype=np.float32)
    std = np.asarray(meta.feature_stats.std, dtype=np.float32)
    for sid in frame["slide_id"][:4]:
        raw = torch.from_numpy(np.asarray(fs.read_bag(sid).features, dtype=np.float32))
        with torch.no_grad():
            standardized = (raw - torch.from_numpy(mean)) / torch.from_numpy(std)
            p_std = torch.softmax(model(standardized).logits, -1)[0, 1]
            p_raw = torch.softmax(model(raw).logits, -1)[0, 1]
        got = float(frame.loc[frame["slide_id"] == sid, "label_prob_1"].iloc[0])
        assert got == pytest.approx(float(p_std), abs=1e-5)
        assert abs(got - float(p_raw)) > 1e-4


def test_auto_standardizes_mil_csv_imports_only(synthetic_store, tmp_path):
    src = tmp_path / "bags.csv"
    rng = np.random.default_rng(0)
    rows = [f"{i % 2},b{i},{rng.normal(100, 30):.3f},{rng.normal(-5, 0.1):.4f}" for i in range(12) for _ in range(3)]
    src.write_text("\n".join(rows) + "\n")
    import_mil_csv(src, tmp_path / "store", tmp_path / "labels.csv", progress=False)
    config = validate_config({"data": {"store": str(tmp_path / "store"), "labels": str(tmp_path / "labels.csv")}})
    full, parts, _ = build_datasets(config)
    stats, note = standardize_features(config, full, parts)
    assert stats is not None and "fitted on" in note
    assert parts["train"] is not None and parts["train"].feature_stats is not None
    config = validate_config({"data": {"store": str(synthetic_store.store), "labels": str(synthetic_store.labels)}})
    full, parts, _ = build_datasets(config)
    assert standardize_features(config, full, parts)[0] is None
    assert parts["train"] is not None and parts["train"].feature_stats is None


def _meta(stats):
    return CheckpointMeta(method="abmil", model_name="abmil", model_kwargs={}, feature_stats=stats)


def test_runs_from_checkpoints_inherit_their_standardisation(synthetic_store):
    d = synthetic_store.in_dim
    stats = FeatureStatsMeta(mean=[1.0] * d, std=[2.0] * d, n_patches=10)
    config = validate_config({"data": {"store": str(synthetic_store.store), "labels": str(synthetic_store.labels)}})
    full, parts, _ = build_datasets(config)
    got, note = standardize_features(config, full, parts, [("base.safetensors", _meta(stats))])
    assert got == stats and "base.safetensors" in note
    assert parts["train"] is not None and parts["train"].feature_stats is not None
    assert parts["train"].feature_stats[1].tolist() == [2.0] * d
    # an explicit setting against the checkpoint is refused, naming it
    config = validate_config(
        {"data": {"store": str(synthetic_store.store), "labels": str(synthetic_store.labels), "standardize": "on"}}
    )
    full, parts, _ = build_datasets(config)
    with pytest.raises(ConfigError, match="base.safetensors.*raw features"):
        standardize_features(config, full, parts, [("base.safetensors", _meta(None))])


@pytest.mark.parametrize(
    "stats, match",
    [
        ({"mean": [0.0, 1.0], "std": [1.0, 0.0]}, "positive"),
        ({"mean": [0.0, float("nan")], "std": [1.0, 1.0]}, "finite"),
        ({"mean": [0.0], "std": [1.0, 1.0]}, "1 values but std has 2"),
    ],
)
def test_corrupt_feature_stats_are_refused(stats, match):
    raw = {"method": "abmil", "model_name": "abmil", "model_config": {}, "feature_stats": stats}
    with pytest.raises(CheckpointError, match=match):
        CheckpointMeta.parse(raw, "checkpoint/2", where="x.safetensors")


def test_feature_stats_change_the_checkpoint_id():
    a = _meta(None).make_id("0" * 64)
    b = _meta(FeatureStatsMeta(mean=[0.0], std=[1.0])).make_id("0" * 64)
    assert a != b
