"""The main job on an embedded default: demo cohort -> features -> training -> prediction -> maps.

``wsimil quickstart OUT_DIR`` runs, offline on the CPU (or CUDA when present):

1. ``make_demo_cohort``: pyramidal TIFF slides with planted lesions, ``labels.csv``, ``omics.csv``, lesion GeoJSON;
2. ``extract_cohort``: tissue detection, a 256 px grid at 0.5 µm/px and ResNet-18 (layer3) features into a store;
3. ``train``: a MIL method (ABMIL by default) on a seeded train/validation split;
4. ``predict_store``: slide predictions (CSV) and per-patch maps into the store;
5. ``export_geojson``: one QuPath measurement map per slide.

``task="survival"`` trains on the survival variant (``demo.survival``: ``survival.csv`` with event times drawn
from a hazard growing with the lesion burden, censored) with the discrete-time loss, and evaluates the checkpoint
on the demo slides: ``evaluation.json`` (C-index with 95% CIs...) and ``km_survival.png`` (Kaplan-Meier of
high vs low predicted risk with the log-rank p). The demo is tiny, so this evaluation includes training slides.

Every step is resumable: re-running the command skips finished slides and a finished training run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from wsimil_core._io import write_json_atomic
from wsimil_core.demo import make_demo_cohort
from wsimil_core.demo.survival import write_demo_survival
from wsimil_core.engine.checkpoint import load_checkpoint
from wsimil_core.engine.config import load_config
from wsimil_core.engine.trainer import train
from wsimil_core.errors import WsimilError
from wsimil_core.features.extract import extract_cohort
from wsimil_core.inference.geojson import export_geojson
from wsimil_core.inference.predict import evaluate_store, predict_store
from wsimil_core.wsi.tiling import GridSpec, TissueParams


@dataclass
class QuickstartResult:
    """Paths written by ``run_quickstart``."""

    out_dir: Path
    cohort_dir: Path
    store: Path
    run_dir: Path
    checkpoint: Path
    checkpoint_id: str
    predictions: pd.DataFrame
    geojson: list[Path]
    slides: list[Path] = field(default_factory=list)  # the cohort's slide files (``demo_000.tiff``...)
    evaluation: dict | None = None  # task="survival": the evaluate_store report (km plot path in its task entry)


def run_quickstart(
    out_dir: str | Path,
    n_slides: int = 12,
    size: int = 4096,
    method: str = "abmil",
    epochs: int = 20,
    lr: float = 2e-3,
    device: str = "auto",
    seed: int = 0,
    num_workers: int = 2,
    progress: bool = True,
    task: str = "classification",
) -> QuickstartResult:
    """Run the whole pipeline into ``out_dir`` (see the module docstring); ``task``: classification or survival."""
    if task not in ("classification", "survival"):
        raise WsimilError(f"quickstart task must be classification or survival, got {task!r}")
    out = Path(out_dir)
    cohort = make_demo_cohort(out / "cohort", n_slides=n_slides, size=size, seed=seed, progress=progress)
    store = out / "store"
    summary = extract_cohort(
        cohort.slides,
        store,
        "resnet18",
        GridSpec(mpp=0.5, patch=256),
        TissueParams(),
        device=device,
        num_workers=num_workers,
        progress=progress,
    )
    if summary.failed:
        raise WsimilError(f"feature extraction failed for {len(summary.failed)} slide(s): {summary.failed}")

    run_dir = out / ("run" if task == "classification" else "run_survival")
    data: dict = {"store": str(store), "labels": str(cohort.labels_csv), "targets": ["label"]}
    if task == "survival":
        data = {"store": str(store), "labels": str(write_demo_survival(cohort.out_dir)), "survival": {"bins": 4}}
        data["split"] = {"kind": "random", "val_frac": 0.3, "seed": seed}
    config = load_config(
        data={
            "method": method,
            "data": data,
            "train": {"epochs": epochs, "lr": lr, "device": device, "seed": seed},
            "output": {"dir": str(run_dir), "progress": progress},
        }
    )
    result = train(config)
    checkpoint = result.best_checkpoint or result.last_checkpoint
    if checkpoint is None:
        raise WsimilError(f"training in {run_dir} kept no checkpoint to predict with")
    _, meta = load_checkpoint(checkpoint)
    ckpt_id = meta.checkpoint_id
    assert ckpt_id is not None  # load_checkpoint fills it from the weights

    predictions = predict_store(checkpoint, store, device=device, out_csv=out / "predictions.csv", progress=progress)
    evaluation = None
    if task == "survival":
        evaluation = evaluate_store(
            checkpoint, store, data["labels"], n_boot=200, device=device, progress=progress, km_dir=out
        )
        write_json_atomic(evaluation, out / "evaluation.json", allow_nan=True)
    geojson_dir = out / "geojson"
    geojson_dir.mkdir(parents=True, exist_ok=True)
    geojson = []
    for slide_id in predictions["slide_id"]:
        path = geojson_dir / f"{slide_id}.geojson"
        export_geojson(store, slide_id, ckpt_id, out=path)
        geojson.append(path)
    return QuickstartResult(
        out_dir=out,
        cohort_dir=cohort.out_dir,
        store=store,
        run_dir=run_dir,
        checkpoint=Path(checkpoint),
        checkpoint_id=ckpt_id,
        predictions=predictions,
        geojson=geojson,
        slides=list(cohort.slides),
        evaluation=evaluation,
    )
