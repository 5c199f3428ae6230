"""``wsimil abmilx predict``: end-to-end ABMILX inference that reads the slides' pixels (bounded memory)."""

from __future__ import annotations

from pathlib import Path

import typer

from wsimil_core.engine.checkpoint import read_checkpoint_meta
from wsimil_core.errors import CheckpointError
from wsimil_core.inference.predict import predict_store

app = typer.Typer(name="abmilx", help="ABMILX commands: end-to-end prediction from slide pixels.", no_args_is_help=True)


@app.command("predict")
def abmilx_predict_command(
    checkpoint: Path = typer.Argument(..., help="End-to-end ABMILX checkpoint (model abmilx_e2e) from wsimil train."),
    store: Path = typer.Option(..., "--store", help="Store whose slides (slide_path, patch grid) are predicted."),
    slides: list[str] | None = typer.Option(None, "--slides", help="Slide ids (default: all; a,b or repeated)."),
    out: Path | None = typer.Option(None, "--out", help="Slide predictions CSV (default: print them)."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when available) | cpu | cuda | cuda:N."),
    workers: int = typer.Option(2, "--workers", min=0, help="DataLoader worker processes reading patches."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
) -> None:
    """Predict slides with an E2E ABMILX checkpoint: pixels are read and encoded in chunks; maps go to the store.

    The same as ``wsimil predict`` (whose pipeline runs the checkpoint's pixel predictor), with ``--workers``."""
    meta = read_checkpoint_meta(checkpoint)
    if meta.model_name != "abmilx_e2e":
        raise CheckpointError(
            f"{checkpoint}: model {meta.model_name!r} is not an end-to-end ABMILX model; use `wsimil predict`"
        )
    ids = [s.strip() for item in slides for s in item.split(",") if s.strip()] if slides else None
    frame = predict_store(
        checkpoint, store, slide_ids=ids, device=device, out_csv=out, num_workers=workers, progress=progress
    )
    if out is None:
        typer.echo(frame.to_csv(index=False), nl=False)
    else:
        typer.echo(f"{len(frame)} slide prediction(s) written to {out}")
    typer.echo(f"maps written to {store}/<slide>/maps/{frame.attrs['checkpoint_id']}/", err=out is None)
