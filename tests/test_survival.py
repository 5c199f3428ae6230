"""Survival prediction (issue 14): losses against independent computations, targets and their validation,
metrics, the engine's bags-per-step Cox loss, and C-index bars for ABMIL and ABMILX on the survival demo cohort."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from wsimil_core.data.dataset import BagDataset
from wsimil_core.data.survival import SurvivalSpec, bin_index, bin_names, fit_time_bins, time_strata
from wsimil_core.demo.survival import patient_survival, survival_times
from wsimil_core.errors import ConfigError, DataError
from wsimil_core.functional.survival import (
    cox_partial_nll,
    cox_risk,
    curve_risk,
    hazard_nll,
    incidence_curve,
    incidence_nll,
    survival_curve,
)

pytestmark = pytest.mark.usefixtures("torch_one_thread_module")


# --- losses -------------------------------------------------------------------------------------------------


def test_hazard_nll_hand_computed():
    # logits 0 -> every hazard 0.5; S_0 = 0.5, S_1 = 0.25
    logits = torch.zeros(3, 2)
    bins = torch.tensor([1, 0, 1])
    events = torch.tensor([1, 0, 0])
    # event in bin 1: -log S_0 - log h_1 = 2 log 2; censored in bin 0: -log S_0 = log 2; censored bin 1: 2 log 2
    expected = (2 * math.log(2) + math.log(2) + 2 * math.log(2)) / 3
    assert float(hazard_nll(logits, bins, events)) == pytest.approx(expected, rel=1e-6)


def test_hazard_nll_matches_a_direct_loop():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(7, 4))
    bins = rng.integers(0, 4, size=7)
    events = rng.integers(0, 2, size=7)
    total = 0.0
    for lg, y, e in zip(logits, bins, events):
        h = 1.0 / (1.0 + np.exp(-lg))
        surv_before = np.prod(1 - h[:y])  # alive at the start of bin y
        total += -math.log(surv_before * h[y]) if e else -math.log(surv_before * (1 - h[y]))
    got = hazard_nll(torch.tensor(logits), torch.tensor(bins), torch.tensor(events))
    assert float(got) == pytest.approx(total / 7, rel=1e-5)
    curve = survival_curve(torch.tensor(logits)).numpy()
    h = 1.0 / (1.0 + np.exp(-logits))
    np.testing.assert_allclose(curve, np.cumprod(1 - h, axis=1), rtol=1e-5)
    np.testing.assert_allclose(curve_risk(torch.tensor(curve)).numpy(), -curve.sum(1), rtol=1e-6)


def test_incidence_nll_hand_computed_and_curve():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.5, 0.3, 0.2], [0.1, 0.1, 0.8]]))
    bins = torch.tensor([1, 1, 2])
    events = torch.tensor([1, 0, 0])
    # event in bin 1: -log 0.3; censored in bin 1: -log(0.3 + 0.2); censored in bin 2: -log 0.8
    expected = (-math.log(0.3) - math.log(0.5) - math.log(0.8)) / 3
    assert float(incidence_nll(logits, bins, events)) == pytest.approx(expected, rel=1e-5)
    np.testing.assert_allclose(incidence_curve(logits[:1]).numpy(), [[0.5, 0.2, 0.0]], atol=1e-6)


@pytest.mark.parametrize("kind", ["nll", "incidence"])
def test_validation_loss_from_curves_equals_the_training_loss(kind):
    """engine.survival.survival_loss (numpy, from the output curves) == the torch loss on the logits."""
    from wsimil_core.engine.survival import survival_loss, survival_output

    rng = np.random.default_rng(2)
    logits = torch.tensor(rng.normal(size=(9, 4)))
    cuts = [1.0, 2.0, 3.0]
    times = rng.uniform(0, 4, size=9)
    events = rng.integers(0, 2, size=9)
    bins = torch.tensor(bin_index(times, cuts))
    curves = np.stack([survival_output(lg, kind) for lg in logits])
    fn = hazard_nll if kind == "nll" else incidence_nll
    expected = float(fn(logits, bins, torch.tensor(events)))
    assert survival_loss(curves, kind, times, events, cuts) == pytest.approx(expected, rel=1e-5)


def _cox_loop(risk, times, events):
    """Breslow partial NLL by a double loop over events and risk sets."""
    terms = []
    for i in range(len(risk)):
        if events[i]:
            denominator = sum(math.exp(risk[j]) for j in range(len(risk)) if times[j] >= times[i])
            terms.append(risk[i] - math.log(denominator))
    return -sum(terms) / len(terms)


def test_cox_partial_nll_matches_a_loop_with_ties():
    risk = [0.3, -1.2, 0.8, 0.0, 2.0, -0.5]
    times = [5.0, 3.0, 3.0, 8.0, 1.0, 3.0]  # three tied at t=3
    events = [1, 1, 0, 1, 1, 1]
    got = cox_partial_nll(torch.tensor(risk), torch.tensor(times), torch.tensor(events))
    assert float(got) == pytest.approx(_cox_loop(risk, times, events), rel=1e-6)
    # no event: zero, still attached to the graph
    r = torch.tensor(risk, requires_grad=True)
    zero = cox_partial_nll(r, torch.tensor(times), torch.zeros(6))
    zero.backward()
    assert float(zero.detach()) == 0.0 and r.grad is not None


def test_cox_partial_nll_is_minimised_at_the_library_fit():
    """scikit-survival's CoxPH (Breslow ties) fit of one covariate: our loss has zero gradient there."""
    from sksurv.linear_model import CoxPHSurvivalAnalysis
    from sksurv.util import Surv

    rng = np.random.default_rng(1)
    x = rng.normal(size=60)
    times = np.round(rng.exponential(1.0 / np.exp(0.8 * x)), 1) + 0.1  # rounded: ties
    events = (rng.random(60) < 0.7).astype(int)
    fit = CoxPHSurvivalAnalysis(alpha=0.0, ties="breslow").fit(x[:, None], Surv.from_arrays(events == 1, times))
    beta = torch.tensor(float(fit.coef_[0]), dtype=torch.float64, requires_grad=True)
    loss = cox_partial_nll(beta * torch.tensor(x), torch.tensor(times), torch.tensor(events))
    loss.backward()
    assert beta.grad is not None and abs(float(beta.grad)) < 1e-4
    assert abs(float(fit.coef_[0])) > 0.2  # a real effect was fitted


def test_cox_risk_is_the_logit_difference():
    lg = torch.tensor([[0.5, 2.0], [1.0, -1.0]])
    np.testing.assert_allclose(cox_risk(lg).numpy(), [1.5, -2.0])
    with pytest.raises(ValueError):
        cox_risk(torch.zeros(1, 4))


# --- targets and bins ----------------------------------------------------------------------------------------


def test_bins_are_event_time_quantiles():
    times = np.array([1.0, 2.0, 3.0, 4.0, 50.0, 60.0])
    events = np.array([1, 1, 1, 1, 0, 0])
    cuts = fit_time_bins(times, events, 2)
    assert cuts == [2.5]  # the median of the event times only
    np.testing.assert_array_equal(bin_index(times, cuts), [0, 0, 1, 1, 1, 1])
    assert bin_names([2.5, 2.5, 7.0]) == ["2.5", "2.5~1", "7", "inf"]  # tied cut points stay distinct
    strata = time_strata(times, events)
    assert set(strata[events == 1]) <= {2, 3} and set(strata[events == 0]) <= {0, 1}


def _write_store(root: Path, n: int = 60, dim: int = 16, seed: int = 0) -> tuple[Path, Path]:
    """The survival demo cohort as features: bag ``i`` holds ``k_i`` lesion patches (shifted on dims 0-3); times
    and events come from the demo's hazard (``demo.survival``) of the lesion burden ``k_i``."""
    from wsimil_core.store.zarr_store import FeatureStore

    rng = np.random.default_rng(seed)
    store = FeatureStore(root / "store.zarr", create=True)
    attrs = {"name": "s", "weights_sha256": "random-init", "dim": dim, "input_size": 256}
    attrs |= {"mean": [0.0] * 3, "std": [1.0] * 3, "mpp": 0.5}
    ids, burden = [], []
    for i in range(n):
        m, k = 40, int(rng.integers(0, 13))  # a fixed bag size: the burden k is also the lesion fraction
        feats = rng.normal(size=(m, dim)).astype(np.float32)
        feats[rng.choice(m, k, replace=False), :4] += 3.0
        cells = rng.choice(256, m, replace=False)
        coords = np.stack([(cells % 16) * 256, (cells // 16) * 256], 1).astype(np.int64)
        grid = {"patch_size": 256, "patch_size_level0": 256, "stride_level0": 256, "patch_mpp": 0.5}
        grid |= {"slide_mpp": 0.5, "grid_origin": [0, 0], "level0_size": [4096, 4096]}
        store.write_bag(f"s{i:03d}", feats, coords, "s", encoder_attrs=attrs, **grid)
        ids.append(f"s{i:03d}")
        burden.append(k)
    table = patient_survival(ids, [f"P{i:03d}" for i in range(n)], burden, seed)
    labels = root / "survival.csv"
    table.to_csv(labels, index=False)
    return root / "store.zarr", labels


@pytest.fixture(scope="module")
def surv_cohort(tmp_path_factory) -> tuple[Path, Path]:
    return _write_store(tmp_path_factory.mktemp("survival_cohort"), n=80)


def test_bad_times_and_events_are_one_error_naming_column_and_rows(surv_cohort, tmp_path):
    store, labels = surv_cohort
    frame = pd.read_csv(labels, dtype={"slide_id": str})
    cases = [
        ("time", -1.0, "negative"),
        ("time", np.nan, "missing"),
        ("event", 2, "0 (censored) or 1"),
    ]
    for column, value, words in cases:
        bad = frame.copy()
        bad.loc[[3, 5], column] = value
        with pytest.raises(DataError) as info:
            BagDataset(store, bad, targets=["survival"], survival=SurvivalSpec())
        text = str(info.value)
        assert repr(column) in text and words in text and "s003" in text and "s005" in text


def test_fold_without_events_is_an_error(surv_cohort, tmp_path):
    from wsimil_core.engine import load_config
    from wsimil_core.engine.datasets import build_datasets

    store, labels = surv_cohort
    frame = pd.read_csv(labels, dtype={"slide_id": str})
    frame["split"] = ["train"] * 60 + ["test"] * 20
    frame.loc[60:, "event"] = 0
    path = tmp_path / "labels.csv"
    frame.to_csv(path, index=False)
    cfg = load_config(
        data={"data": {"store": str(store), "labels": str(path), "survival": {}, "split": {"kind": "column"}}}
    )
    with pytest.raises(DataError, match=r"test split.*'event' has no event"):
        build_datasets(cfg)


def test_config_declares_and_checks_survival(surv_cohort):
    from wsimil_core.engine import load_config
    from wsimil_core.engine.datasets import open_cohort

    store, labels = surv_cohort
    cfg = load_config(data={"data": {"survival": {"loss": "nll", "bins": 3}}})
    assert cfg.data.targets == ["survival"]
    with pytest.raises(ConfigError, match="bags_per_step"):
        load_config(data={"data": {"survival": {"loss": "cox"}}})
    with pytest.raises(ConfigError, match="not in data.targets"):
        load_config(data={"data": {"targets": ["grade"], "survival": {}}})
    # a CSV with time + event and no label column declares a survival task named "label"
    auto = open_cohort(load_config(data={"data": {"store": str(store), "labels": str(labels)}}))
    assert auto.survival["label"].time == "time" and auto.n_classes() == {"label": 4}


def test_crossval_folds_are_stratified_by_event_and_grouped_by_patient(surv_cohort):
    from wsimil_core.engine import load_config
    from wsimil_core.engine.datasets import build_datasets

    store, labels = surv_cohort
    seen: set[str] = set()
    for fold in range(4):
        cfg = load_config(
            data={
                "data": {
                    "store": str(store),
                    "labels": str(labels),
                    "survival": {},
                    "split": {"kind": "kfold", "folds": 4, "fold": fold, "val_frac": 0.2},
                }
            }
        )
        full, parts, split = build_datasets(cfg)
        test = parts["test"]
        assert test is not None
        events = test.survival_data("survival")[1]
        all_events = full.survival_data("survival")[1]
        assert abs(events.mean() - all_events.mean()) < 0.2  # stratified by event
        patients = {full.groups()[full.slide_ids.index(s)] for s in split.test}
        others = {full.groups()[full.slide_ids.index(s)] for s in split.train + split.val}
        assert not patients & others
        seen |= set(split.test)
        # bins fitted on the training split only
        train = parts["train"]
        assert train is not None
        t, e = train.survival_data("survival")
        assert full.survival_cuts["survival"] == fit_time_bins(t, e, 4)
    assert len(seen) == 80


# --- training -------------------------------------------------------------------------------------------------


def _train(store: Path, labels: Path, out: Path, method: str, loss: str = "nll", epochs: int = 10):
    from wsimil_core.engine import load_config, train

    cfg = load_config(
        data={
            "method": method,
            "model": {"dim": 32},
            "data": {
                "store": str(store),
                "labels": str(labels),
                "survival": {"loss": loss},
                "split": {"kind": "random", "val_frac": 0.25, "test_frac": 0.35},
            },
            "train": {
                "epochs": epochs,
                "lr": 2e-3,
                "device": "cpu",
                "bags_per_step": 8 if loss == "cox" else 1,
                "early_stopping": {"metric": "loss"},
            },
            "output": {"dir": str(out), "progress": False},
        }
    )
    return train(cfg)


@pytest.mark.parametrize("method", ["abmil", "abmilx"])
def test_c_index_bar_on_the_survival_demo_cohort(surv_cohort, tmp_path, method):
    """Oracle C-index of the burden is about 0.77; a trained model must be clearly above chance."""
    store, labels = surv_cohort
    result = _train(store, labels, tmp_path / method, method)
    assert result.test_metrics["c_index"] > 0.6, result.test_metrics
    from wsimil_core.engine.checkpoint import read_checkpoint_meta

    meta = read_checkpoint_meta(result.best_checkpoint)
    info = meta.extras["survival"]["survival"]
    assert info["loss"] == "nll" and len(info["cuts"]) == 3
    assert meta.tasks["survival"].threshold.method == "median validation risk"


def test_cox_trains_with_several_bags_per_step(surv_cohort, tmp_path):
    store, labels = surv_cohort
    result = _train(store, labels, tmp_path / "cox", "abmil", loss="cox", epochs=8)
    assert "train/cox" in result.history[0] and result.history[0]["train/cox"] > 0
    assert result.test_metrics["c_index"] > 0.6, result.test_metrics


def test_survival_times_grow_shorter_with_burden():
    burden = np.repeat([0.0, 10.0], 400)
    times, events = survival_times(burden, seed=3)
    assert 0.05 < 1 - events.mean() < 0.6  # some censoring
    assert np.median(times[400:]) < 0.5 * np.median(times[:400])


# --- outputs ----------------------------------------------------------------------------------------------------


def test_predictions_evaluate_and_km_plot(surv_cohort, tmp_path, capsys):
    """Predictions hold risk + curve; evaluate gives every survival metric with CIs and writes the KM plot."""
    from wsimil_core.engine.survival import SURVIVAL_METRIC_NAMES, harrell_c
    from wsimil_core.inference.predict import evaluate_store, predict_store

    store, labels = surv_cohort
    result = _train(store, labels, tmp_path / "run", "abmil", epochs=3)
    some = [f"s{i:03d}" for i in range(40)]  # the pipeline's per-slide overhead: keep the slide count small
    preds = predict_store(result.best_checkpoint, store, slide_ids=some, device="cpu", progress=False)
    curve_cols = [c for c in preds.columns if c.startswith("survival_S_")]
    assert len(curve_cols) == 4 and curve_cols[-1] == "survival_S_inf"
    curves = preds[curve_cols].to_numpy()
    assert np.all(np.diff(curves, axis=1) <= 1e-9) and np.all((curves > 0) & (curves < 1))  # a survival curve
    np.testing.assert_allclose(preds["survival_risk"], -curves.sum(1), rtol=1e-6)
    assert set(preds["survival_pred"]) <= {"high", "low"}
    from wsimil_core.store.zarr_store import FeatureStore

    maps = FeatureStore(store).read_maps(some[0], preds.attrs["checkpoint_id"])
    assert "attention" in maps and len(maps["attention"]) == 40  # the risk's attention map, as for any task
    report = evaluate_store(
        result.best_checkpoint, store, labels, slide_ids=some, n_boot=20, device="cpu", progress=False, km_dir=tmp_path
    )
    entry = report["tasks"]["survival"]
    assert set(entry["metrics"]) == set(SURVIVAL_METRIC_NAMES)
    table = pd.read_csv(labels, dtype={"slide_id": str}).set_index("slide_id").loc[preds["slide_id"]]
    c = harrell_c(table["time"].to_numpy(), table["event"].to_numpy(), preds["survival_risk"].to_numpy())
    assert entry["metrics"]["c_index"]["value"] == pytest.approx(c)
    lo, hi = entry["metrics"]["c_index"]["ci_low"], entry["metrics"]["c_index"]["ci_high"]
    assert lo <= c <= hi
    assert 0.0 <= entry["metrics"]["ibs"]["value"] <= 0.5
    km = Path(entry["km_plot"])
    assert km.name == "km_survival.png" and km.read_bytes()[:4] == b"\x89PNG"
    assert 0.0 <= entry["logrank_p"] <= 1.0 and entry["n_high"] + entry["n_low"] == 40
    # the CLI prints the survival metrics and where the plot went
    from wsimil_core.cli import main

    args = ["evaluate", str(result.best_checkpoint), "--store", str(store), "--labels", str(labels)]
    args += ["--n-boot", "5", "--device", "cpu", "--no-progress", "--km-dir", str(tmp_path / "cli")]
    args += ["--slides", ",".join(some[:20])]
    try:
        main(args)
    except SystemExit as exc:
        assert exc.code in (0, None)
    out = " ".join(capsys.readouterr().out.split())  # the console wraps long lines
    assert "c_index" in out and "ibs" in out and "log-rank p" in out
    assert (tmp_path / "cli" / "km_survival.png").is_file()


def test_logrank_separates_groups():
    from wsimil_core.engine.survival import logrank_p

    times, events = survival_times(np.repeat([0.0, 12.0], 60), seed=1)
    high = np.repeat([False, True], 60)
    assert logrank_p(times, events, high) < 1e-3
    assert np.isnan(logrank_p(times, events, np.ones(120, bool)))


def test_asmil_trains_with_the_incidence_loss(surv_cohort, tmp_path):
    from wsimil_core.engine import load_config, train
    from wsimil_core.engine.checkpoint import read_checkpoint_meta

    store, labels = surv_cohort
    cfg = load_config(
        data={
            "method": "asmil",
            "model": {"dim": 32},
            "data": {"store": str(store), "labels": str(labels), "survival": {"loss": "incidence"}},
            "train": {"epochs": 2, "lr": 2e-3, "device": "cpu"},
            "output": {"dir": str(tmp_path / "asmil"), "progress": False},
        }
    )
    result = train(cfg)
    assert np.isfinite(result.val_metrics["c_index"]) and "train/anchor_kl" in result.history[-1]
    assert read_checkpoint_meta(result.best_checkpoint).extras["survival"]["survival"]["loss"] == "incidence"


def test_mecds_mixes_a_classification_and_a_survival_task(surv_cohort, tmp_path):
    from wsimil_core.engine import load_config, train

    store, labels = surv_cohort
    frame = pd.read_csv(labels, dtype={"slide_id": str}).iloc[:40].copy()  # 40 slides keep it short
    frame["grade"] = np.where(frame["burden"] > 6, "high", "low")
    path = tmp_path / "labels.csv"
    frame.to_csv(path, index=False)
    cfg = load_config(
        data={
            "method": "mecds",
            "data": {
                "store": str(store),
                "labels": str(path),
                "targets": ["grade", "survival"],
                "survival": {"bins": 3},
            },
            "train": {"epochs": 1, "device": "cpu"},
            "output": {"dir": str(tmp_path / "mecds"), "progress": False},
        }
    )
    result = train(cfg)
    assert {"grade/auc", "survival/c_index", "loss"} <= set(result.val_metrics)
    assert "survival/auc" not in result.val_metrics


# --- demo -------------------------------------------------------------------------------------------------------


def test_demo_survival_table_follows_the_lesion_burden(demo_cohort):
    from wsimil_core.demo.survival import write_demo_survival

    path = write_demo_survival(demo_cohort)
    table = pd.read_csv(path, dtype={"slide_id": str, "patient_id": str})
    labels = pd.read_csv(demo_cohort / "labels.csv", dtype={"slide_id": str})
    merged = table.merge(labels[["slide_id", "label"]], on="slide_id")
    assert (merged.loc[merged["label"] == 1, "burden"] > 0).all()
    assert (merged.loc[merged["label"] == 0, "burden"] == 0).all()
    assert table.groupby("patient_id")[["time", "event"]].nunique().max().max() == 1  # one draw per patient
    assert set(table["event"]) <= {0, 1} and (table["time"] > 0).all()


@pytest.mark.slow
def test_quickstart_survival_trains_evaluates_and_plots(tmp_path, capsys):
    from wsimil_core.cli import main

    out = tmp_path / "qs"
    args = ["quickstart", str(out), "--task", "survival", "--n-slides", "8", "--size", "2048", "--epochs", "3"]
    try:
        main([*args, "--workers", "0"])
    except SystemExit as exc:
        assert exc.code in (0, None)
    text = capsys.readouterr().out
    assert "C-index:" in text and "Kaplan-Meier:" in text
    assert (out / "km_survival.png").read_bytes()[:4] == b"\x89PNG"
    preds = pd.read_csv(out / "predictions.csv")
    assert {"survival_risk", "survival_S_inf"} <= set(preds.columns)


def test_a_method_without_survival_support_is_refused(surv_cohort, tmp_path):
    from wsimil_core.engine import load_config, train

    store, labels = surv_cohort
    cfg = load_config(
        data={
            "method": "momkd",
            "data": {"store": str(store), "labels": str(labels), "survival": {"bins": 2}},
            "train": {"epochs": 1, "device": "cpu"},
            "output": {"dir": str(tmp_path / "momkd"), "progress": False},
        }
    )
    with pytest.raises(ConfigError, match="'momkd' does not train survival tasks"):
        train(cfg)
