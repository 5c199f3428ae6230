"""MoMKD end to end: train from a YAML config on ``synthetic_store`` (with its omics table), predict with histology
only, and build the memory gallery (CSV without slides, PNGs from a real slide)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from _helpers import train_from_config
from wsimil_core.cli import main

MODEL = {"dim": 16, "memory_dim": 8, "n_components": 4, "n_heads": 2, "dropout": 0.0}


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def momkd_run(synthetic_store, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("momkd_run")
    cfg = {
        "method": {"name": "momkd", "options": {"kmeans_samples": 400}},
        "model": MODEL,
        "data": {
            "store": str(synthetic_store.store),
            "labels": str(synthetic_store.labels),
            "omics": str(synthetic_store.omics),
            "targets": ["label"],
        },
        "train": {"epochs": 2, "lr": 3e-3, "device": "cpu", "seed": 0},
        "output": {"dir": str(tmp / "run"), "progress": False},
    }
    with torch.random.fork_rng():
        torch.set_num_threads(1)
        train_from_config(cfg, tmp / "momkd.yaml")
    return tmp / "run"


def test_train_from_yaml_and_predict_histology_only(momkd_run, synthetic_store):
    from wsimil_core.engine.checkpoint import load_checkpoint
    from wsimil_core.inference.predict import predict_bag
    from wsimil_core.store.zarr_store import FeatureStore

    ckpts = sorted(momkd_run.glob("*.safetensors"))
    assert ckpts, list(momkd_run.iterdir())
    model, meta = load_checkpoint(ckpts[0])
    assert meta.model_name == "momkd" and meta.method == "momkd"
    assert meta.model_kwargs["omics_dim"] == 50  # trained with the omics table
    bag = FeatureStore(synthetic_store.store).read_bag(synthetic_store.slide_ids[0])
    pred = predict_bag(model, bag.features, bag.coords, device="cpu")  # no omics at inference
    probs = next(iter(pred.probs.values()))
    assert probs.shape == (2,) and abs(probs.sum() - 1) < 1e-5
    assert {"attention", "memory/score", "memory/component"} <= set(pred.maps)
    assert pred.maps["memory/component"].shape == (bag.features.shape[0],)
    # memory health per epoch in the run's history
    lines = [json.loads(s) for s in (momkd_run / "metrics.jsonl").read_text().splitlines() if s.strip()]
    flat = json.dumps(lines)
    assert "mem_pos_active" in flat and "mem_neg_perplexity" in flat
    assert "align_omics" in flat and "recon" in flat


def test_memory_gallery_csv_without_slides(momkd_run, synthetic_store, tmp_path, capsys):
    ckpt = sorted(momkd_run.glob("*.safetensors"))[0]
    out = tmp_path / "gallery"
    main(
        [
            "momkd",
            "memory-gallery",
            str(ckpt),
            "--store",
            str(synthetic_store.store),
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    msg = capsys.readouterr().out
    assert "no pixels" in msg and "gallery.csv" in msg
    table = pd.read_csv(out / "gallery.csv", keep_default_na=False)
    assert set(table["component"]) == {f"pos{k:02d}" for k in range(1, 5)} | {f"neg{k:02d}" for k in range(1, 5)}
    assert (table.groupby("component").size() == 3).all()
    assert (table["image"] == "").all()
    assert set(table["signed_id"]) == {1, 2, 3, 4, -1, -2, -3, -4}
    # ranks follow decreasing similarity inside each component
    for _, g in table.groupby("component"):
        assert list(g.sort_values("rank")["similarity"]) == sorted(g["similarity"], reverse=True)


def test_memory_gallery_pngs_from_slide(fixtures_dir, tmp_path):
    """A store whose slide_path points to a real slide gives one PNG per kept patch."""
    from PIL import Image

    from wsimil_core.api import create_model
    from wsimil_core.engine.checkpoint import save_checkpoint
    from wsimil_core.store.zarr_store import FeatureStore

    slide = fixtures_dir / "openslide" / "boxes.tiff"  # 300 x 250 px
    store = FeatureStore(tmp_path / "store.zarr", create=True)
    rng = np.random.default_rng(0)
    xs, ys = np.meshgrid(np.arange(0, 250, 50), np.arange(0, 200, 50))
    coords = np.stack([xs.ravel(), ys.ravel()], 1).astype(np.int64)
    store.write_bag(
        "boxes",
        rng.normal(size=(len(coords), 8)).astype(np.float32),
        coords,
        "enc",
        encoder_attrs={"name": "enc", "dim": 8},
        slide_path=str(slide),
        patch_size=32,
        patch_size_level0=50,
        stride_level0=50,
        slide_mpp=352.78,
        patch_mpp=551.0,
    )
    torch.manual_seed(0)
    model = create_model("momkd", in_dim=8, **MODEL)
    ckpt = tmp_path / "m.safetensors"
    save_checkpoint(ckpt, model, {"method": "momkd", "class_names": {"label": ["0", "1"]}, "targets": ["label"]})
    main(
        [
            "momkd",
            "memory-gallery",
            str(ckpt),
            "--store",
            str(tmp_path / "store.zarr"),
            "--out",
            str(tmp_path / "g"),
            "--top",
            "2",
            "--no-progress",
            "--device",
            "cpu",
        ]
    )
    table = pd.read_csv(tmp_path / "g" / "gallery.csv", keep_default_na=False)
    assert len(table) == 8 * 2
    for rel in table["image"]:
        img = Image.open(tmp_path / "g" / rel)
        assert img.size == (32, 32)
    assert (tmp_path / "g" / "pos01").is_dir() and (tmp_path / "g" / "neg04").is_dir()


def test_config_command_lists_momkd_options(capsys):
    main(["config", "--method", "momkd"])
    text = capsys.readouterr().out
    for option in ("align_omics_weight", "fixed_memory", "kmeans_samples", "use_omics"):
        assert option in text


def test_memory_gallery_rejects_other_models(tmp_path, synthetic_store):
    from wsimil_core.api import create_model
    from wsimil_core.engine.checkpoint import save_checkpoint

    ckpt = tmp_path / "abmil.safetensors"
    save_checkpoint(ckpt, create_model("abmil", in_dim=synthetic_store.in_dim), {"method": "abmil"})
    with pytest.raises(SystemExit):
        main(
            ["momkd", "memory-gallery", str(ckpt), "--store", str(synthetic_store.store), "--out", str(tmp_path / "g")]
        )


def _train_with_omics(synthetic_store, tmp_path, omics: pd.DataFrame, capsys) -> str:
    """Write ``omics`` as a CSV, train MoMKD on it (1 epoch) and return the one error line (exit code 1)."""
    path = tmp_path / "omics_bad.csv"
    omics.to_csv(path, index=False)
    cfg = {
        "method": {"name": "momkd", "options": {"kmeans_samples": 100}},
        "model": MODEL,
        "data": {"store": str(synthetic_store.store), "labels": str(synthetic_store.labels), "omics": str(path)},
        "train": {"epochs": 1, "lr": 3e-3, "device": "cpu", "seed": 0},
        "output": {"dir": str(tmp_path / "run"), "progress": False},
    }
    with pytest.raises(SystemExit) as stop:
        train_from_config(cfg, tmp_path / "momkd.yaml")
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 1 and len(err) == 1 and err[0].startswith("error: ")
    assert str(path) in err[0]
    return err[0]


def test_omics_table_matching_no_slide_is_refused(synthetic_store, tmp_path, capsys):
    """Issue 17 item 8: an omics table whose slide ids match no slide is an error, not a silent histology run."""
    omics = pd.read_csv(synthetic_store.omics, dtype={"slide_id": str})
    omics["slide_id"] = "TCGA-" + omics["slide_id"]
    line = _train_with_omics(synthetic_store, tmp_path, omics, capsys)
    assert "'slide_id'" in line and "matches" in line
    assert not (tmp_path / "run").exists() or not list((tmp_path / "run").glob("*.safetensors"))


def test_infinite_omics_cell_names_column_and_slide(synthetic_store, tmp_path, capsys):
    """Issue 17 item 8: an ``inf`` omics cell names the file, the column and the slide, not a learning rate."""
    omics = pd.read_csv(synthetic_store.omics, dtype={"slide_id": str})
    omics.loc[3, "g07"] = np.inf
    line = _train_with_omics(synthetic_store, tmp_path, omics, capsys)
    assert "'g07'" in line and omics.loc[3, "slide_id"] in line and "learning rate" not in line


def test_engine_optimiser_gives_no_weight_decay_names_weight_decay_0(momkd_run):
    """The trainer builds its optimiser with the groups of ``no_weight_decay()``: the memory is not decayed."""
    from wsimil_core.engine.checkpoint import load_state
    from wsimil_core.engine.state_tree import unflatten_state

    tensors, meta = load_state(momkd_run / "resume.safetensors")
    state = unflatten_state(tensors, meta["skeleton"])
    groups = state["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [1e-4, 0.0]
    assert len(groups[1]["params"]) == 2  # memory_pos, memory_neg
