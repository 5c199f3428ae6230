"""predict_bag / predict_store / evaluate_store and the predict + evaluate CLI commands."""

import json
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from wsimil_core.api import MILOutput, ModelConfig, create_model, register_model
from wsimil_core.engine.checkpoint import save_checkpoint
from wsimil_core.errors import DataError, StoreError
from wsimil_core.inference.predict import evaluate_store, predict_bag, predict_store
from wsimil_core.store.zarr_store import FeatureStore

D = 8
ENC = {"name": "toy", "encoder_id": "toy-abc123", "dim": D, "weights_sha256": "abc123" * 10}


@dataclass
class _TwoTaskConfig(ModelConfig):
    in_dim: int = D
    n_classes: int = 2


class _TwoTask(nn.Module):
    """Multi-task test model: logits {"grade": [B, 3], "label": [B, 2]}, a [N, 2] map."""

    def __init__(self, config):
        super().__init__()
        self.proj = nn.Linear(config.in_dim, 5)

    def forward(self, x, coords=None, **extras):
        h = self.proj(x if x.dim() == 3 else x[None])  # [B, N, 5]
        pooled = h.mean(1)
        return MILOutput(
            logits={"grade": pooled[:, :3], "label": pooled[:, 3:]},
            maps={"routing": torch.softmax(h[0, :, :2], -1), "score": h[0, :, 0]},
        )


@pytest.fixture
def two_task_model():
    """Register the multi-task test model for one test only (the registry stays clean for other tests)."""
    from wsimil_core.models import base

    register_model("_test_two_task", _TwoTaskConfig)(_TwoTask)
    yield "_test_two_task"
    base._MODELS.pop("_test_two_task", None)


def _store(tmp_path, n_slides=6, encoder=ENC, dim=D, offset=(0, 0)):
    rng = np.random.default_rng(0)
    fs = FeatureStore(tmp_path / "store", create=True)
    for i in range(n_slides):
        n = 5 + i
        feats = rng.normal(size=(n, dim)).astype(np.float32)
        feats[:, 0] += 1.5 * (i % 2)  # class signal
        coords = np.stack([np.arange(n) * 256 + offset[0], np.full(n, offset[1])], 1).astype(np.int64)
        fs.write_bag(
            f"s{i}",
            feats,
            coords,
            encoder["encoder_id"],
            encoder,
            patch_size_level0=256,
            stride_level0=256,
            slide_mpp=0.5,
        )
    return fs


def _abmil_ckpt(tmp_path, **meta):
    torch.manual_seed(0)
    model = create_model("abmil", in_dim=D, n_classes=2, dim=16, attn_dim=8)
    base = {"method": "abmil", "targets": ["tumour"], "class_names": {"tumour": ["no", "yes"]}, "encoder": ENC}
    path = tmp_path / "model.safetensors"
    meta = save_checkpoint(path, model, {**base, **meta})
    return path, model, meta


def test_predict_bag_maps_follow_input_order(tmp_path):
    path, model, meta = _abmil_ckpt(tmp_path)
    x = np.random.default_rng(1).normal(size=(30, D)).astype(np.float32)
    perm = np.random.default_rng(2).permutation(30)
    a = predict_bag(model.eval(), x)
    b = predict_bag(model, x[perm])
    assert set(a.probs) == {"label"}  # no meta attached: default target name
    assert a.probs["label"].shape == (2,) and a.probs["label"].sum() == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(a.maps["attention"][perm], b.maps["attention"], atol=1e-6)
    np.testing.assert_allclose(a.probs["label"], b.probs["label"], atol=1e-5)
    assert a.maps["attention"].dtype == np.float32 and a.maps["attention"].shape == (30,)
    # a loaded checkpoint names its task; float16 features work; training mode is restored
    from wsimil_core.engine.checkpoint import load_checkpoint

    loaded, _ = load_checkpoint(path)
    loaded.train()
    c = predict_bag(loaded, torch.from_numpy(x).half(), device="auto")
    assert set(c.probs) == {"tumour"} and loaded.training
    with pytest.raises(DataError):
        predict_bag(loaded, np.zeros((2, 3, D), np.float32))


def test_predict_store_writes_maps_and_csv(tmp_path):
    fs = _store(tmp_path)
    path, model, meta = _abmil_ckpt(tmp_path, threshold=0.3)
    out_csv = tmp_path / "out" / "preds.csv"
    frame = predict_store(path, fs.root, device="cpu", out_csv=out_csv, progress=False)
    assert list(frame.columns) == ["slide_id", "n_patches", "tumour_pred", "tumour_prob_no", "tumour_prob_yes"]
    assert frame["slide_id"].tolist() == [f"s{i}" for i in range(6)]
    np.testing.assert_allclose(frame["tumour_prob_no"] + frame["tumour_prob_yes"], 1.0, atol=1e-6)
    expected = np.where(frame["tumour_prob_yes"] >= 0.3, "yes", "no")
    assert frame["tumour_pred"].tolist() == expected.tolist()
    assert pd.read_csv(out_csv)["slide_id"].tolist() == frame["slide_id"].tolist()
    ckpt_id = meta.checkpoint_id
    for sid in fs.slide_ids():
        assert fs.map_ids(sid) == [ckpt_id]
        maps = fs.read_maps(sid, ckpt_id)
        bag = fs.read_bag(sid)
        direct = predict_bag(model.eval(), bag.features)
        np.testing.assert_allclose(maps["attention"], direct.maps["attention"], atol=1e-6)
        assert maps["attention"].shape == (bag.features.shape[0],)
        assert fs.maps_attrs(sid, ckpt_id)["prediction"]["tumour"] in ("no", "yes")
    # a subset, re-run: ids stable, maps replaced
    again = predict_store(path, fs, slide_ids=["s1"], device="cpu", progress=False)
    assert again["slide_id"].tolist() == ["s1"] and fs.map_ids("s1") == [ckpt_id]


def test_encoder_mismatch_is_a_store_error(tmp_path):
    path, _, _ = _abmil_ckpt(tmp_path)
    other = {**ENC, "encoder_id": "other-999"}
    fs = _store(tmp_path / "a", n_slides=2, encoder=other)
    with pytest.raises(StoreError, match="toy-abc123"):
        predict_store(path, fs, device="cpu", progress=False)
    wrong_dim = {**ENC, "dim": 4}
    fs2 = _store(tmp_path / "b", n_slides=2, encoder=wrong_dim, dim=4)
    with pytest.raises(StoreError, match="in_dim=8"):
        predict_store(path, fs2, device="cpu", progress=False)
    wrong_weights = {**ENC, "weights_sha256": "f" * 64}
    fs3 = _store(tmp_path / "c", n_slides=2, encoder=wrong_weights)
    with pytest.raises(StoreError, match="weights"):
        predict_store(path, fs3, device="cpu", progress=False)
    fs4 = _store(tmp_path / "d", n_slides=2)
    with pytest.raises(StoreError, match="not in the store"):
        predict_store(path, fs4, slide_ids=["s0", "nope"], device="cpu", progress=False)
    assert fs4.map_ids("s0") == []  # checked before any work


def _labels(tmp_path, fs):
    rows = [
        {
            "slide_id": f"s{i}",
            "tumour": ["no", "yes"][i % 2],
            "grade": i % 3,
            "label": i % 2,
            "split": "test" if i >= 2 else "train",
        }
        for i in range(6)
    ]
    path = tmp_path / "labels.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_evaluate_store_single_task(tmp_path):
    fs = _store(tmp_path)
    path, _, _ = _abmil_ckpt(tmp_path, threshold=0.4)
    labels = _labels(tmp_path, fs)
    report = evaluate_store(path, fs, labels, split="test", n_boot=50, device="cpu", progress=False)
    assert report["n_slides"] == 4
    task = report["tasks"]["tumour"]
    assert task["n"] == 4 and task["threshold"] == 0.4 and task["n_per_class"] == {"no": 2, "yes": 2}
    for m, v in task["metrics"].items():
        assert set(v) == {"value", "ci_low", "ci_high"}
        if np.isfinite(v["value"]):
            assert v["ci_low"] <= v["value"] + 1e-12 and v["value"] <= v["ci_high"] + 1e-12, m
    assert report["mean"]["auc"] == task["metrics"]["auc"]["value"]
    assert fs.map_ids("s2") == []  # evaluate does not write maps
    override = evaluate_store(
        path, fs, labels, slide_ids=["s0", "s1"], threshold=0.9, n_boot=10, device="cpu", progress=False
    )
    assert override["tasks"]["tumour"]["threshold"] == 0.9 and override["n_slides"] == 2
    with pytest.raises(DataError, match="split"):
        evaluate_store(path, fs, labels, split="nothing", n_boot=10, device="cpu", progress=False)
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"slide_id": ["s0"], "tumour": ["maybe"]}).to_csv(bad, index=False)
    with pytest.raises(DataError, match="maybe"):
        evaluate_store(path, fs, bad, n_boot=10, device="cpu", progress=False)


def test_multi_task_predict_and_evaluate(tmp_path, two_task_model):
    fs = _store(tmp_path)
    torch.manual_seed(0)
    model = create_model(two_task_model)
    path = tmp_path / "mt.safetensors"
    meta = save_checkpoint(
        path,
        model,
        {
            "method": "mt",
            "targets": ["grade", "label"],
            "class_names": {"grade": ["0", "1", "2"], "label": ["0", "1"]},
            "encoder": ENC,
        },
    )
    frame = predict_store(path, fs, device="cpu", progress=False)
    assert {"grade_pred", "grade_prob_2", "label_prob_1"} <= set(frame.columns)
    maps = fs.read_maps("s3", meta.checkpoint_id)
    assert maps["routing"].shape == (8, 2) and maps["score"].shape == (8,)
    report = evaluate_store(path, fs, _labels(tmp_path, fs), n_boot=20, device="cpu", progress=False)
    assert set(report["tasks"]) == {"grade", "label"}
    acc = [report["tasks"][t]["metrics"]["accuracy"]["value"] for t in ("grade", "label")]
    assert report["mean"]["accuracy"] == pytest.approx(np.mean(acc))
    assert report["flat"]["grade/accuracy"] == acc[0]


def test_cli_predict_and_evaluate(tmp_path, capsys):
    from wsimil_core.cli import main

    fs = _store(tmp_path)
    path, _, meta = _abmil_ckpt(tmp_path)
    labels = _labels(tmp_path, fs)
    out = tmp_path / "preds.csv"
    main(
        [
            "predict",
            str(path),
            "--store",
            str(fs.root),
            "--slides",
            "s0,s1",
            "--slides",
            "s2",
            "--out",
            str(out),
            "--device",
            "cpu",
            "--no-progress",
        ]
    )
    assert pd.read_csv(out)["slide_id"].tolist() == ["s0", "s1", "s2"]
    assert fs.map_ids("s2") == [meta.checkpoint_id] and fs.map_ids("s3") == []
    report = tmp_path / "report.json"
    main(
        [
            "evaluate",
            str(path),
            "--store",
            str(fs.root),
            "--labels",
            str(labels),
            "--split",
            "test",
            "--n-boot",
            "30",
            "--out",
            str(report),
            "--device",
            "cpu",
            "--no-progress",
        ]
    )
    text = capsys.readouterr().out
    assert "balanced_accuracy" in text and "tumour" in text
    data = json.loads(report.read_text())  # strict JSON (NaN -> null)
    assert data["n_slides"] == 4 and "auc" in data["tasks"]["tumour"]["metrics"]
    with pytest.raises(SystemExit) as exc:
        main(["predict", str(tmp_path / "missing.safetensors"), "--store", str(fs.root), "--device", "cpu"])
    assert exc.value.code == 1
    assert "checkpoint file not found" in capsys.readouterr().err


def test_slide_without_patches_gives_nan_row_and_is_skipped_in_evaluate(tmp_path):
    fs = _store(tmp_path, n_slides=4)
    fs.write_bag(
        "empty", np.zeros((0, D), np.float32), np.zeros((0, 2), np.int64), ENC["encoder_id"], ENC, patch_size_level0=256
    )
    path, _, _ = _abmil_ckpt(tmp_path)
    with pytest.warns(UserWarning, match="no patches"):
        frame = predict_store(path, fs, device="cpu", progress=False)
    row = frame.set_index("slide_id").loc["empty"]
    assert row["n_patches"] == 0 and np.isnan(row["tumour_prob_yes"])
    assert fs.map_ids("empty") == []
    labels = tmp_path / "l.csv"
    pd.DataFrame({"slide_id": ["s0", "s1", "s2", "s3", "empty"], "tumour": ["no", "yes", "no", "yes", "yes"]}).to_csv(
        labels, index=False
    )
    with pytest.warns(UserWarning):
        report = evaluate_store(path, fs, labels, n_boot=10, device="cpu", progress=False)
    assert report["tasks"]["tumour"]["n"] == 4
