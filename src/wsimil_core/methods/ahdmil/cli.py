"""``wsimil predict-slide``: AHDMIL fast inference from slide files (DB-LIPN pre-screening, then DMIN)."""

from __future__ import annotations

import math
from pathlib import Path

import typer

from wsimil_core.cli.app import app

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
    import pandas as pd
    from rich.console import Console
    from rich.table import Table

    from wsimil_core.devices import resolve_device
    from wsimil_core.errors import SlideError
    from wsimil_core.features.extract import slide_id_from_path
    from wsimil_core.inference.predict import _predicted_class, _write_csv_atomic, class_names_for, threshold_for
    from wsimil_core.methods.ahdmil.predictor import encoder_from_meta, load_ahdmil, predict_slide, write_maps_csv

    dev = resolve_device(device)
    model, meta = load_ahdmil(checkpoint, dev)
    encoder = encoder_from_meta(meta, encoder_weights, dev)
    fs = None
    if store is not None:
        from wsimil_core.store.zarr_store import FeatureStore

        fs = FeatureStore(store)
    console = Console(stderr=True)
    if not console.is_terminal:  # logs and pipes: do not squeeze the per-stage columns into 80 characters
        console = Console(stderr=True, width=150)
    rows = []
    missing = [p for p in slides if not p.exists()]
    if missing:  # before any work
        raise SlideError(
            f"{missing[0]}: file not found" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    for path in slides:
        sid = slide_id_from_path(path)
        coords = size0 = None
        in_store = fs is not None and sid in fs.slide_ids()
        if in_store:
            coords = fs.read_coords(sid)
            size0 = int(fs.slide_attrs(sid)["patch_size_level0"])
        pred = predict_slide(
            (model, meta),
            path,
            encoder=encoder,
            prescreen=prescreen,
            coords=coords,
            size_level0=size0,
            device=dev,
            batch_size=batch_size,
            num_workers=workers,
            slide_mpp=slide_mpp,
            progress=progress,
        )
        row: dict = {
            "slide_id": sid,
            "n_patches": pred.n_patches,
            "n_encoded": pred.n_encoded,
            "kept_fraction": pred.kept_fraction,
        }
        for task, p in pred.probs.items():
            names = class_names_for(meta, task, len(p))
            row[f"{task}_pred"] = names[_predicted_class(p, threshold_for(meta, task))]
            for c, name in enumerate(names):
                row[f"{task}_prob_{name}"] = float(p[c])
        for stage in STAGES:
            row[f"time_{stage}_s"] = float(pred.timings.get(stage, math.nan))
        rows.append(row)
        ckpt_id = meta["checkpoint_id"]
        if in_store:
            attrs = {
                "checkpoint_id": ckpt_id,
                "checkpoint": str(checkpoint),
                "method": "ahdmil",
                "model_name": "ahdmil",
                "prescreen": prescreen,
                "kept_fraction": pred.kept_fraction,
                "timings": pred.timings,
                "probs": {t: [float(v) for v in p] for t, p in pred.probs.items()},
            }
            fs.write_maps(sid, ckpt_id, pred.maps, attrs)
        elif fs is not None:
            console.print(
                f"[yellow]{sid}[/]: not in the store {store}; its maps are not written there "
                "(extract it first, or use --maps-dir)"
            )
        if maps_dir is not None:
            write_maps_csv(pred, maps_dir / f"{sid}.{ckpt_id}.csv")

    frame = pd.DataFrame(rows)
    table = Table(title=f"AHDMIL {'pre-screened' if prescreen else 'full'} inference ({meta['checkpoint_id']})")
    for col in ("slide", "patches", "kept", "prediction", *[s.replace("_", " ") for s in STAGES]):
        table.add_column(col, justify="left" if col in ("slide", "prediction") else "right")
    pred_cols = [c for c in frame.columns if c.endswith("_pred")]
    for r in rows:
        table.add_row(
            r["slide_id"],
            str(r["n_patches"]),
            f"{r['n_encoded']} ({r['kept_fraction']:.0%})",
            ", ".join(str(r[c]) for c in pred_cols),
            *[f"{r[f'time_{s}_s']:.2f}s" for s in STAGES],
        )
    console.print(table)
    if out is not None:
        _write_csv_atomic(frame, out)
        typer.echo(f"{len(frame)} slide prediction(s) written to {out}")
    else:
        typer.echo(frame.to_csv(index=False), nl=False)
