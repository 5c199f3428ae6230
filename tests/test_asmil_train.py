"""ASMIL and abmil-anchor trained end to end by the engine (``wsimil train`` config) on ``synthetic_store``."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from _helpers import train_from_config


def _config(synthetic_store, tmp_path, method: str, model: dict, options: dict) -> dict:
    return {
        "method": {"name": method, "options": options},
        "model": model,
        "data": {
            "store": str(synthetic_store.store),
            "labels": str(synthetic_store.labels),
            "targets": ["label"],
            "split": {"kind": "random", "val_frac": 0.25, "seed": 0},
        },
        "train": {"epochs": 3, "lr": 2e-3, "device": "cpu", "seed": 0},
        "output": {"dir": str(tmp_path / "run"), "progress": False},
    }


@pytest.mark.parametrize(
    "method,model,options",
    [
        ("asmil", {"dim": 32, "n_tokens": 4}, {"monitor_slides": 4, "anchor_momentum": 0.9}),
        ("abmil-anchor", {"dim": 32, "attn_dim": 16}, {"monitor_slides": 4}),
    ],
)
def test_train_from_config_and_predict(synthetic_store, tmp_path, method, model, options):

    from wsimil_core.engine.checkpoint import load_checkpoint
    from wsimil_core.store.zarr_store import FeatureStore

    run = train_from_config(_config(synthetic_store, tmp_path, method, model, options), tmp_path / "config.yaml")
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == 3
    assert all("train/anchor_kl" in r for r in history)
    jsd = [r["train/attention_jsd"] for r in history]  # first epoch compares with the attention at setup
    assert all(0.0 <= v <= math.log(2) for v in jsd)

    # the JSD curve command (table + PNG), and a clear error for a run without the monitor
    from wsimil_core.cli import main

    main(["asmil", "attention-jsd", str(run), "--out", str(tmp_path / "jsd.png")])
    assert (tmp_path / "jsd.png").stat().st_size > 1000
    from wsimil_core.errors import DataError
    from wsimil_core.methods.asmil.cli import read_jsd_curve

    assert read_jsd_curve(run) == pytest.approx(jsd)
    with pytest.raises(DataError, match="metrics.csv"):
        read_jsd_curve(tmp_path)

    ckpt = run / "last.safetensors"
    model_, meta = load_checkpoint(ckpt)
    assert meta.method == method
    assert not any("anchor" in k for k in model_.state_dict())  # the anchor is discarded at inference
    bag = FeatureStore(synthetic_store.store).read_bag(synthetic_store.slide_ids[0])
    with torch.no_grad():
        out = model_(torch.as_tensor(np.asarray(bag.features), dtype=torch.float32))
    assert out.logits.shape == (1, 2) and torch.isfinite(out.logits).all()
    assert out.maps["attention"].shape == (bag.features.shape[0],)


def test_crossval_on_mil_benchmark(fixtures_dir, tmp_path):
    """2-fold cross-validation of ASMIL on the UCSB breast-cancer MIL benchmark (58 bags, imported into a store)."""
    from wsimil_core.engine.crossval import crossval
    from wsimil_core.store.milcsv import import_mil_csv

    summary = import_mil_csv(
        fixtures_dir / "mil" / "ucsb_breast_cancer.csv", tmp_path / "store", tmp_path / "labels.csv", progress=False
    )
    config = {
        "method": {"name": "asmil", "options": {"monitor_slides": 2}},
        "model": {"dim": 32, "n_tokens": 4},
        "data": {
            "store": str(tmp_path / "store"),
            "labels": str(summary.labels_csv),
            "targets": ["label"],
            "split": {"val_frac": 0.2, "seed": 0},
        },
        "train": {"epochs": 1, "lr": 1e-3, "device": "cpu", "seed": 0},
        "output": {"dir": str(tmp_path / "cv"), "progress": False},
    }
    result = crossval(config, folds=2)
    for fold in range(2):
        assert (tmp_path / "cv" / f"fold_{fold}" / "last.safetensors").exists()
    assert result.report["method"] == "asmil" and len(result.fold_results) == 2
