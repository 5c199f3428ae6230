"""``wsimil ahdmil predict-slide``: AHDMIL fast inference from slide files (DB-LIPN pre-screening, then DMIN)."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import typer
from rich.console import Console
from rich.table import Table

from wsimil_core.engine.checkpoint import read_checkpoint_meta
from wsimil_core.errors import CheckpointError, SlideError
from wsimil_core.inference.pipeline import PipelineOptions, SlidePrediction, predict_slide
from wsimil_core.inference.predict import load_predictor, write_table
from wsimil_core.methods.ahdmil.predictor import write_maps_csv
from wsimil_core.store.zarr_store import FeatureStore

app = typer.Typer(
    name="ahdmil", help="AHDMIL commands: fast pre-screened prediction of slide files.", no_args_is_help=True
)

STAGES = ("tissue", "prescreen_read", "prescreen", "read_encode", "classify", "total")


@app.command("predict-slide")
def predict_slide_command(
    checkpoint: Path = typer.Argument(..., help="AHDMIL checkpoint (.safetensors) written by wsimil train."),
    slides: list[Path] = typer.Argument(..., help="Slide files to predict."),
    store: Path | None = typer.Option(
        None,
        "--store",
        help="Feature store: slides already in it reuse its patch grid and get their maps written "
        "under maps/<checkpoint_id>/.",
    ),
    out: Path | None = typer.Option(None, "--out", help="Slide predictions CSV (kept fraction, stage times)."),
    maps_dir: Path | None = typer.Option(
        None, "--maps-dir", help="Also write <slide_id>.<checkpoint_id>.csv per slide (x, y + every map)."
    ),
    prescreen: bool = typer.Option(
        True, "--prescreen/--no-prescreen", help="DB-LIPN pre-screening (off: encode every patch, the baseline)."
    ),
    encoder_weights: Path | None = typer.Option(
        None, "--encoder-weights", help="Weights file of the checkpoint's encoder (default: the recorded path)."
    ),
    slide_mpp: float | None = typer.Option(None, "--slide-mpp", help="µm per level-0 pixel for slides without it."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Patches per encoder batch."),
    workers: int = typer.Option(0, "--workers", min=0, help="Patch-reading worker processes (0 = main process)."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when available) | cpu | cuda | cuda:N."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
) -> None:
    """Predict slide files with an AHDMIL checkpoint: only patches DB-LIPN keeps are read at high resolution
    and encoded. Prints the kept fraction and the time of each stage per slide."""
    frame, results = predict_slide_files(
        checkpoint,
        slides,
        store=store,
        maps_dir=maps_dir,
        prescreen=prescreen,
        encoder_weights=encoder_weights,
        slide_mpp=slide_mpp,
        batch_size=batch_size,
        num_workers=workers,
        device=device,
        progress=progress,
    )
    console = Console(stderr=True)
    if not console.is_terminal:  # logs and pipes: do not squeeze the per-stage columns into 80 characters
        console = Console(stderr=True, width=150)
    for result in results:
        if store is not None and not result.maps_written:
            console.print(
                f"[yellow]{result.slide_id}[/]: not in the store {store}; its maps are not written there "
                "(extract it first, or use --maps-dir)"
            )
    console.print(_timing_table(frame, prescreen, results[0].checkpoint_id if results else ""))
    if out is not None:
        write_table(frame, out)
        typer.echo(f"{len(frame)} slide prediction(s) written to {out}")
    else:
        typer.echo(frame.to_csv(index=False), nl=False)


def predict_slide_files(
    checkpoint: Path,
    slides: list[Path],
    *,
    store: Path | None = None,
    maps_dir: Path | None = None,
    prescreen: bool = True,
    encoder_weights: Path | None = None,
    slide_mpp: float | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str = "auto",
    progress: bool = False,
) -> tuple[pd.DataFrame, list[SlidePrediction]]:
    """AHDMIL slide files through the inference pipeline: a predictions table (with ``n_encoded``,
    ``kept_fraction`` and ``time_<stage>_s`` columns) and each slide's ``SlidePrediction``.

    Slides the store holds reuse its patch grid (and features) and get their maps written there; ``maps_dir``
    also gets ``<slide_id>.<checkpoint_id>.csv`` per slide (``x, y`` + every map).
    """
    meta = read_checkpoint_meta(checkpoint)
    if meta.model_name != "ahdmil":
        raise CheckpointError(
            f"{checkpoint}: predict-slide needs an ahdmil checkpoint, this one holds model {meta.model_name!r}"
        )
    missing = [p for p in slides if not p.exists()]
    if missing:  # before any work
        raise SlideError(
            f"{missing[0]}: file not found" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    ckpt = load_predictor(checkpoint, device, encoder_weights=encoder_weights, prescreen=prescreen)
    ckpt.encoder()  # a missing encoder weights file fails before any slide is read
    fs = FeatureStore(store) if store is not None else None
    options = PipelineOptions(
        check_grid=False,
        batch_size=batch_size,
        num_workers=num_workers,
        slide_mpp=slide_mpp,
        progress=progress,
    )
    rows, results = [], []
    for path in slides:
        result = predict_slide(ckpt, path, store=fs, options=options)
        row = dict(result.row)
        for stage in STAGES:
            row[f"time_{stage}_s"] = float(result.timings.get(stage, math.nan))
        rows.append(row)
        results.append(result)
        if maps_dir is not None:
            write_maps_csv(result.coords, result.maps, maps_dir / f"{result.slide_id}.{result.checkpoint_id}.csv")
    return pd.DataFrame(rows), results


def _timing_table(frame: pd.DataFrame, prescreen: bool, ckpt_id: str) -> Table:
    table = Table(title=f"AHDMIL {'pre-screened' if prescreen else 'full'} inference ({ckpt_id})")
    for col in ("slide", "patches", "kept", "prediction", *[s.replace("_", " ") for s in STAGES]):
        table.add_column(col, justify="left" if col in ("slide", "prediction") else "right")
    pred_cols = [c for c in frame.columns if c.endswith("_pred")]
    for r in frame.to_dict("records"):
        table.add_row(
            r["slide_id"],
            str(r["n_patches"]),
            f"{int(r['n_patches'] * r['kept_fraction'])} ({r['kept_fraction']:.0%})",
            ", ".join(str(r[c]) for c in pred_cols),
            *[f"{r[f'time_{s}_s']:.2f}s" for s in STAGES],
        )
    return table
