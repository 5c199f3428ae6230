"""Cross-validation (issue 3 item 7): K folds, mean ± std report, resumable, CLI."""

from __future__ import annotations

import json

import pytest
import yaml

import test_trainer  # noqa: F401  (registers the tiny test model and methods)
from test_trainer import make_config
from wsimil_core.engine.crossval import crossval, summarize_folds

pytestmark = pytest.mark.usefixtures("torch_one_thread_module")


def test_summarize_folds():
    s = summarize_folds([{"auc": 1.0, "acc": 0.5}, {"auc": float("nan"), "acc": 0.7}, {"auc": 0.8, "acc": 0.6}])
    assert s["auc"]["mean"] == pytest.approx(0.9) and s["auc"]["n"] == 2 and s["auc"]["std"] == pytest.approx(0.1)
    assert s["acc"]["mean"] == pytest.approx(0.6) and len(s["acc"]["values"]) == 3


def test_crossval_three_folds_report_and_resume(synthetic_store, tmp_path):
    cfg = make_config(synthetic_store, tmp_path / "cv", model={"hidden": 32}, train_opts={"epochs": 4, "lr": 1e-2})
    result = crossval(cfg, folds=3)
    report = json.loads((tmp_path / "cv" / "crossval.json").read_text())
    assert report["folds"] == 3 and len(report["per_fold"]) == 3
    assert report["summary"]["auc"]["mean"] > 0.85
    for name in ("auc", "accuracy", "balanced_accuracy", "f1_macro", "sensitivity", "specificity", "loss"):
        assert name in report["summary"] and len(report["summary"][name]["values"]) == 3
    for fold in range(3):
        run = json.loads((tmp_path / "cv" / f"fold_{fold}" / "result.json").read_text())
        assert run["test_metrics"] == report["per_fold"][fold]["test"]
        used = yaml.safe_load((tmp_path / "cv" / f"fold_{fold}" / "config.yaml").read_text())
        split = used["data"]["split"]
        assert (split["kind"], split["folds"], split["fold"], split["val_frac"]) == ("kfold", 3, fold, 0.2)
        assert used["output"]["dir"] == str(tmp_path / "cv" / f"fold_{fold}")
    assert result.summary == report["summary"]
    # a second call reads the finished folds back instead of retraining
    stamp = (tmp_path / "cv" / "fold_1" / "last.safetensors").stat().st_mtime_ns
    again = crossval(cfg, folds=3)
    assert again.summary == result.summary
    assert (tmp_path / "cv" / "fold_1" / "last.safetensors").stat().st_mtime_ns == stamp


def test_cli_crossval(synthetic_store, tmp_path, capsys):
    from wsimil_core.cli import main

    cfg = make_config(synthetic_store, tmp_path / "ignored", train_opts={"epochs": 1})
    path = tmp_path / "cv.yaml"
    path.write_text(yaml.safe_dump(cfg))
    main(["crossval", str(path), "--folds", "2", "--output", str(tmp_path / "cv")])
    out = capsys.readouterr().out
    assert "auc\t" in out and "±" in out and "report:" in out
    report = json.loads((tmp_path / "cv" / "crossval.json").read_text())
    assert report["folds"] == 2 and report["config"]["data"]["split"]["folds"] == 2
