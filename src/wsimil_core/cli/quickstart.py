"""``wsimil quickstart``: the main job on the embedded demo cohort."""

from __future__ import annotations

from pathlib import Path

import typer

from wsimil_core.cli.app import app


@app.command("quickstart")
def quickstart(
    out_dir: Path = typer.Argument(..., help="Output folder (cohort/, store/, run/, predictions.csv, geojson/)."),
    n_slides: int = typer.Option(12, "--n-slides", min=4, help="Demo slides to generate."),
    size: int = typer.Option(4096, "--size", min=2048, help="Demo slide width in pixels (mpp 0.5)."),
    method: str = typer.Option("abmil", "--method", help="Method to train (`wsimil models` lists them)."),
    epochs: int = typer.Option(20, "--epochs", min=1, help="Training epochs."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    seed: int = typer.Option(0, "--seed", help="Seed of the cohort, the split and training."),
    workers: int = typer.Option(2, "--workers", min=0, help="Patch-reading worker processes."),
    task: str = typer.Option(
        "classification", "--task", help="classification, or survival (time-to-event demo, C-index, KM plot)."
    ),
) -> None:
    """Demo cohort -> tissue + tiles -> ResNet-18 features -> train -> predict -> GeoJSON maps (offline)."""
    from wsimil_core.quickstart import run_quickstart

    result = run_quickstart(
        out_dir,
        n_slides=n_slides,
        size=size,
        method=method,
        epochs=epochs,
        device=device,
        seed=seed,
        num_workers=workers,
        task=task,
    )
    typer.echo(f"checkpoint:   {result.checkpoint}")
    typer.echo(f"predictions:  {result.out_dir / 'predictions.csv'}")
    typer.echo(f"maps:         {result.store} (maps/{result.checkpoint_id}/), GeoJSON in {result.out_dir / 'geojson'}")
    if result.evaluation is not None:
        entry = result.evaluation["tasks"]["survival"]
        c = entry["metrics"]["c_index"]
        typer.echo(f"C-index:      {c['value']:.3f} [{c['ci_low']:.3f}, {c['ci_high']:.3f}] (demo slides)")
        typer.echo(f"Kaplan-Meier: {entry['km_plot']} (log-rank p = {entry['logrank_p']:.3g})")
    slide = result.slides[0] if result.slides else result.cohort_dir  # a slide file the run wrote
    typer.echo(f"open in napari: napari {slide}  (Plugins -> wsimil -> Inference)")
