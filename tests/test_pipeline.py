"""Issue 3 acceptance: tile -> extract -> train -> predict -> export-geojson end to end from the CLI on the demo
cohort, and ABMIL's attention on positive slides is higher inside the planted lesions than outside."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from wsimil_core.cli import main


def _cli(*args: str) -> None:
    try:
        main([str(a) for a in args])
    except SystemExit as exc:  # typer.Exit(0) and friends
        assert exc.code in (0, None), f"wsimil {' '.join(map(str, args))} exited with {exc.code}"


def test_demo_pipeline_from_the_cli(demo_cohort, tmp_path):
    from wsimil_core.demo import lesion_fraction
    from wsimil_core.store.zarr_store import FeatureStore

    slides = sorted(demo_cohort.glob("*.tiff"))
    tiles, store, run = tmp_path / "tiles", tmp_path / "store", tmp_path / "run"

    _cli("tile", *slides, "--out", tiles, "--mpp", "0.5", "--patch", "256")
    assert len(list(tiles.glob("*.coords.npy"))) == len(slides)

    _cli("extract", *slides, "--store", store, "--encoder", "resnet18", "--workers", "0", "--no-progress")
    fs = FeatureStore(store)
    assert sorted(fs.slide_ids()) == sorted(p.stem for p in slides)
    # The grid of `tile` and the grid of `extract` are the same patches.
    first = slides[0].stem
    np.testing.assert_array_equal(np.load(tiles / f"{first}.coords.npy"), fs.read_bag(first).coords)

    config = {
        "method": "abmil",
        "data": {"store": str(store), "labels": str(demo_cohort / "labels.csv"), "targets": ["label"]},
        "train": {"epochs": 20, "lr": 2e-3, "seed": 0},
        "output": {"dir": str(run), "progress": False},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    _cli("train", tmp_path / "run.yaml")
    ckpt = run / "best.safetensors"
    assert ckpt.is_file()

    _cli("predict", ckpt, "--store", store, "--out", tmp_path / "preds.csv", "--no-progress")
    preds = pd.read_csv(tmp_path / "preds.csv").merge(pd.read_csv(demo_cohort / "labels.csv"), on="slide_id")
    assert len(preds) == len(slides)

    positives = preds[preds["label"] == 1]["slide_id"].tolist()
    assert positives, "the demo cohort must hold positive slides"
    inside_higher = 0
    for slide_id in positives:
        (map_id,) = fs.map_ids(slide_id)
        attention = fs.read_maps(slide_id, map_id)["attention"]
        bag = fs.read_bag(slide_id)
        frac = lesion_fraction(
            demo_cohort / f"{slide_id}.lesions.geojson", bag.coords, fs.slide_attrs(slide_id)["patch_size_level0"]
        )
        inside, outside = attention[frac > 0.5], attention[frac < 0.01]
        assert inside.size and outside.size
        inside_higher += inside.mean() > outside.mean()
    assert inside_higher == len(positives)

    out = tmp_path / "slide.geojson"
    _cli("export-geojson", ckpt, "--store", store, "--slide", positives[0], "--out", out)
    geo = json.loads(out.read_text())
    assert geo["type"] == "FeatureCollection"
    assert len(geo["features"]) == len(fs.read_bag(positives[0]).coords)
    assert "attention" in geo["features"][0]["properties"]["measurements"]


@pytest.mark.slow
def test_quickstart_runs_the_main_job(tmp_path, capsys):
    _cli("quickstart", tmp_path / "qs", "--n-slides", "6", "--size", "2048", "--epochs", "3", "--workers", "0")
    # the closing hint names a slide file the run wrote
    (hint,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("open in napari:")]
    slide = Path(hint.split(": napari ", 1)[1].split("  (")[0])
    assert slide.is_file() and slide.name == "demo_000.tiff", hint
    assert (tmp_path / "qs" / "predictions.csv").is_file()
    assert len(list((tmp_path / "qs" / "geojson").glob("*.geojson"))) == 6
