"""AHDMIL end to end on the demo cohort: extract -> `wsimil train` (3 phases) -> `wsimil ahdmil predict-slide` / `predict`."""

from __future__ import annotations

import json
import warnings

import pandas as pd
import pytest
import torch

from _helpers import train_from_config
from wsimil_core.cli import main

pytestmark = [
    pytest.mark.filterwarnings("ignore::wsimil_core.features.encoders.RandomWeightsWarning"),
    pytest.mark.usefixtures("torch_one_thread"),
]


@pytest.fixture(scope="module")
def demo_store(demo_cohort, tmp_path_factory):
    """Demo slides extracted with the (random-init) truncated ResNet-18 at 1 µm/px, 128 px patches."""
    from wsimil_core.features.encoders import RandomWeightsWarning
    from wsimil_core.features.extract import extract_cohort
    from wsimil_core.wsi.tiling import GridSpec, TissueParams

    store = tmp_path_factory.mktemp("ahdmil") / "store.zarr"
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        summary = extract_cohort(
            sorted(demo_cohort.glob("*.tiff")),
            store,
            "resnet18",
            GridSpec(mpp=1.0, patch=128),
            TissueParams(),
            device="cpu",
            num_workers=0,
            progress=False,
        )
    assert summary.ok and len(summary.done) == 6
    return store


#: DMIN with a tiny DB-LIPN at factor 4 (128 px patches -> 32 px twins): small enough for CPU tests
TINY_MODEL = {
    "dim": 16,
    "attn_dim": 8,
    "cka_degree": 3,
    "prescreen_arch": "tiny",
    "prescreen_width": 4,
    "prescreen_factor": 4.0,
}


def ahdmil_config(demo_cohort, demo_store, run_dir, train: dict, *, model=None, options=None, test_frac=None) -> dict:
    """A training config of ``ahdmil`` on the demo store (``model`` overrides :data:`TINY_MODEL`)."""
    split = {"kind": "random", "val_frac": 0.34, "seed": 0}
    if test_frac is not None:
        split["test_frac"] = test_frac
    return {
        "method": {"name": "ahdmil", **({"options": options} if options else {})},
        "model": {**TINY_MODEL, **(model or {})},
        "data": {"store": str(demo_store), "labels": str(demo_cohort / "labels.csv"), "split": split},
        "train": {"device": "cpu", **train},
        "output": {"dir": str(run_dir), "progress": False},
    }


def test_three_phases_from_the_cli_then_fast_predict(demo_cohort, demo_store, tmp_path):
    run = tmp_path / "run"
    train = {
        "epochs": 2,
        "phase_epochs": {"self_distill": 25, "prescreen": 3, "finetune": 2},
        "lr": 0.003,
        "scheduler": "none",
    }
    model = {"dim": 32, "attn_dim": 16, "cka_degree": 4}
    config = ahdmil_config(demo_cohort, demo_store, run, train, model=model, options={"target_keep": 0.6})
    train_from_config(config, tmp_path / "ahdmil.yaml")
    history = pd.read_csv(run / "metrics.csv")
    assert list(dict.fromkeys(history["phase"])) == ["self_distill", "prescreen", "finetune"]
    sd = history[history["phase"] == "self_distill"]
    assert sd["train/keep_fraction"].iloc[0] > 0.9  # starts from the full bag
    assert abs(sd["train/keep_fraction"].iloc[-3:].mean() - 0.6) < 0.2  # converges near the target
    assert history[history["phase"] == "prescreen"]["train/l1_mask"].notna().all()
    # validation: DMIN on every patch while DB-LIPN is untrained, then the pre-screened pipeline with DMIN on
    # every patch beside it
    assert history.loc[history["phase"] == "self_distill", "val_all_patches/auc"].isna().all()
    later = history[history["phase"] != "self_distill"]
    assert later["val_all_patches/auc"].notna().all() and later["val/auc"].notna().all()
    assert later["val/brier"].notna().all() and later["val_all_patches/brier"].notna().all()
    ckpt = run / "best.safetensors"

    from wsimil_core.engine.checkpoint import load_checkpoint

    model, meta = load_checkpoint(ckpt)
    assert meta.model_name == "ahdmil" and meta.encoder.name == "resnet18"
    assert hasattr(model, "prescreen") and hasattr(model, "dmin")

    # Fast inference from slide files with the checkpoint alone (no store), then with the store's grid.
    slides = sorted(demo_cohort.glob("*.tiff"))[:2]
    out = tmp_path / "pred.csv"
    main(
        [
            "ahdmil",
            "predict-slide",
            str(ckpt),
            *map(str, slides),
            "--out",
            str(out),
            "--maps-dir",
            str(tmp_path / "maps"),
            "--no-progress",
            "--device",
            "cpu",
        ]
    )
    frame = pd.read_csv(out)
    assert list(frame["slide_id"]) == [s.stem for s in slides]
    assert ((frame["kept_fraction"] > 0) & (frame["kept_fraction"] <= 1)).all()
    assert (frame["n_encoded"] <= frame["n_patches"]).all()
    for col in ("time_prescreen_s", "time_read_encode_s", "time_classify_s", "time_total_s", "label_prob_1"):
        assert frame[col].notna().all()
    maps_csv = pd.read_csv(tmp_path / "maps" / f"{slides[0].stem}.{meta.checkpoint_id}.csv")
    assert {"x", "y", "prescreen/score", "prescreen/keep", "attention", "attention/class0"} <= set(maps_csv.columns)
    pruned = maps_csv["prescreen/keep"] == 0
    assert maps_csv.loc[pruned, "attention"].isna().all()

    main(
        [
            "ahdmil",
            "predict-slide",
            str(ckpt),
            str(slides[0]),
            "--store",
            str(demo_store),
            "--out",
            str(out),
            "--no-progress",
            "--device",
            "cpu",
        ]
    )
    from wsimil_core.store.zarr_store import FeatureStore

    fs = FeatureStore(demo_store)
    maps = fs.read_maps(slides[0].stem, meta.checkpoint_id)
    n = len(fs.read_coords(slides[0].stem))
    assert maps["prescreen/keep"].shape == (n,) and maps["attention/class1"].shape == (n,)

    # The feature-store path (`wsimil predict`) runs DMIN on cached features.
    main(
        [
            "predict",
            str(ckpt),
            "--store",
            str(demo_store),
            "--out",
            str(tmp_path / "store_pred.csv"),
            "--no-progress",
            "--device",
            "cpu",
        ]
    )
    assert len(pd.read_csv(tmp_path / "store_pred.csv")) == 6


def test_test_split_reports_the_deployed_pipeline_beside_all_patches(demo_cohort, demo_store, tmp_path):
    run = tmp_path / "run"
    config = ahdmil_config(demo_cohort, demo_store, run, {"epochs": 1}, test_frac=0.34)
    train_from_config(config, tmp_path / "ahdmil.yaml")
    test_metrics = json.loads((run / "result.json").read_text())["test_metrics"]
    # the best checkpoint's deployed pipeline (plain keys), DMIN of the same checkpoint on every patch beside it
    assert {"accuracy", "brier", "test_all_patches/accuracy", "test_all_patches/brier"} <= set(test_metrics)


def test_bad_checkpoint_kind_is_a_clear_error(tmp_path, demo_cohort, capsys):
    from wsimil_core.api import create_model
    from wsimil_core.engine.checkpoint import save_checkpoint

    ckpt = tmp_path / "abmil.safetensors"
    save_checkpoint(ckpt, create_model("abmil", in_dim=8, n_classes=2), {"method": "abmil"})
    slide = sorted(demo_cohort.glob("*.tiff"))[0]
    with pytest.raises(SystemExit) as exc:
        main(["ahdmil", "predict-slide", str(ckpt), str(slide), "--device", "cpu"])
    assert exc.value.code == 1
    assert "ahdmil" in capsys.readouterr().err


@pytest.mark.parametrize("cache", [True, False])
def test_prescreen_step_reads_lowres_twins_from_the_slides(demo_cohort, demo_store, cache):
    from wsimil_core.data.dataset import BagDataset
    from wsimil_core.methods.base import create_method

    ds = BagDataset(demo_store, demo_cohort / "labels.csv", max_patches=8)
    method = create_method(
        "ahdmil",
        model={"in_dim": ds.in_dim, "n_classes": 2, **TINY_MODEL},
        options={"cache_lowres": cache},
    )
    method.setup_phase("prescreen", ds)
    bag = ds[0]
    images = method.lowres_images(bag)
    assert images.shape == (bag.features.shape[0], 32, 32, 3) and images.dtype == torch.uint8  # 128 px / 4
    from wsimil_core.wsi.slide import open_slide

    with open_slide(ds.store.slide_attrs(bag.slide_id)["slide_path"]) as s:
        x, y = (int(v) for v in bag.coords[0])
        want = s.read_patch(x, y, int(ds.store.slide_attrs(bag.slide_id)["patch_size_level0"]), 32)
    assert torch.equal(images[0], torch.from_numpy(want.copy()))  # twin of patch 0 covers the same level-0 square
    step = method.training_step(bag, "prescreen")
    step["loss"].backward()
    assert any(p.grad is not None for p in method.model.prescreen.parameters())

    # validation bag (full grid): eval_forward reads its twins from bag.slide_path at bag.coords
    from wsimil_core.methods.ahdmil.predictor import read_patches

    val = ds.subset([ds.slide_ids[-1]])[0]
    method.setup_phase("finetune", ds)
    method.eval()
    attrs = ds.store.slide_attrs(val.slide_id)
    twins = read_patches(val.slide_path, val.coords.numpy(), int(attrs["patch_size_level0"]), 32)
    with torch.no_grad():
        out = method.eval_forward(val)
        keep = method.prescreen_keep(torch.from_numpy(twins), torch.device("cpu"))
        want = method.model(val.features[keep])
    assert torch.allclose(out.logits, want.logits, atol=1e-5)
    assert (val.slide_id in method._lowres) == cache  # validation twins are cached like the training ones


def test_phase_learning_rates_and_patience_never_stops_the_prescreen_step(
    demo_cohort, demo_store, tmp_path, monkeypatch
):
    from wsimil_core.engine.evaluation import Evaluator

    def flat(self, ds, thresholds=None, model=None):  # a validation metric that never improves
        return {"auc": 0.5, "loss": 1.0}, {"label": 0.5}

    monkeypatch.setattr(Evaluator, "evaluate", flat)
    train = {"epochs": 4, "lr": 1e-3, "scheduler": "none", "early_stopping": {"patience": 1}}
    config = ahdmil_config(demo_cohort, demo_store, tmp_path / "run", train)
    train_from_config(config, tmp_path / "a.yaml")
    history = pd.read_csv(tmp_path / "run" / "metrics.csv")
    epochs = history.groupby("phase", sort=False)["epoch"].count().to_dict()
    # patience 1 stops steps 1 and 3 after 2 epochs (first best, then one without gain); step 2 runs all 4
    assert epochs == {"self_distill": 2, "prescreen": 4, "finetune": 2}
    lrs = history.groupby("phase", sort=False)["lr"].first().to_dict()
    assert lrs == pytest.approx({"self_distill": 1e-3, "prescreen": 1e-3, "finetune": 1e-4})  # lower lr to fine-tune
    config["train"]["phase_lr"] = {"finetune": 5e-4, "prescreen": 2e-3}
    config["output"]["dir"] = str(tmp_path / "run2")
    train_from_config(config, tmp_path / "b.yaml")
    lrs = pd.read_csv(tmp_path / "run2" / "metrics.csv").groupby("phase", sort=False)["lr"].first().to_dict()
    assert lrs == pytest.approx({"self_distill": 1e-3, "prescreen": 2e-3, "finetune": 5e-4})
