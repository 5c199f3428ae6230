"""``wsimil evaluate``, ``wsimil predict`` and ``wsimil export-geojson``: using a trained checkpoint."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import typer

from wsimil_core.cli.app import app
from wsimil_core.cli.batch import FAIL_FAST_HELP, Failures


def _slide_list(slides: list[str] | None) -> list[str] | None:
    """``--slides a --slides b`` and ``--slides a,b`` both give ``["a", "b"]``; None when not given."""
    if not slides:
        return None
    out = [s.strip() for item in slides for s in item.split(",") if s.strip()]
    return out or None


def _json_safe(value: Any) -> Any:
    """NaN/inf -> null so the report is strict JSON."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _fmt(value: float | None) -> str:
    return "nan" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def _print_report(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    from wsimil_core.engine.metrics import METRIC_NAMES

    tasks = report["tasks"]
    table = Table(title=f"{report['checkpoint_id']} on {report['n_slides']} slides (95% bootstrap CI)")
    table.add_column("metric")
    for task, info in tasks.items():
        table.add_column(f"{task} (n={info['n']})", justify="right")
    if len(tasks) > 1:
        table.add_column("mean", justify="right")
    names = list(METRIC_NAMES) + [m for info in tasks.values() for m in info["metrics"] if m not in METRIC_NAMES]
    for m in dict.fromkeys(names):  # classification metrics, then survival ones (C-index, ...)
        if not any(m in info["metrics"] for info in tasks.values()):
            continue
        cells = []
        for info in tasks.values():
            v = info["metrics"].get(m)
            cells.append("" if v is None else f"{_fmt(v['value'])} [{_fmt(v['ci_low'])}, {_fmt(v['ci_high'])}]")
        if len(tasks) > 1:
            cells.append(_fmt(report["mean"].get(m)))
        table.add_row(m, *cells)
    table.add_row("threshold", *[_fmt(info["threshold"]) for info in tasks.values()], *([""] if len(tasks) > 1 else []))
    Console().print(table)
    for task, info in tasks.items():
        if "km_plot" in info:
            Console().print(
                f"{task}: Kaplan-Meier plot {info['km_plot']} (high {info['n_high']} / low {info['n_low']} slides "
                f"split at the median validation risk {_fmt(info['threshold'])}; log-rank p = {_fmt(info['logrank_p'])})"
            )


@app.command("evaluate")
def evaluate_command(
    checkpoint: Path = typer.Argument(..., metavar="CKPT", help="Checkpoint (.safetensors) written by wsimil train."),
    store: Path = typer.Option(..., "--store", help="Feature store directory."),
    labels: Path = typer.Option(..., "--labels", help="Labels CSV: slide_id + one column per task [+ split]."),
    split: str | None = typer.Option(None, "--split", help="Evaluate the rows whose 'split' column is this."),
    slides: list[str] | None = typer.Option(None, "--slides", help="Slide ids (repeat, or comma-separated)."),
    threshold: float | None = typer.Option(
        None, "--threshold", help="Binary decision threshold (default: the checkpoint's, else 0.5)."
    ),
    n_boot: int = typer.Option(1000, "--n-boot", min=1, help="Bootstrap resamples for the 95% CIs."),
    seed: int = typer.Option(0, "--seed", help="Bootstrap seed."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when available) | cpu | cuda | cuda:N."),
    out: Path | None = typer.Option(None, "--out", help="Write the report as JSON here."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    km_dir: Path | None = typer.Option(
        None, "--km-dir", help="Survival tasks: folder of km_<task>.png (default: beside --out, else the current one)."
    ),
) -> None:
    """Metrics with bootstrap 95% CIs per task (and their mean for multi-task models); survival tasks: C-index
    (Harrell, Uno), time-dependent AUC, integrated Brier score and a Kaplan-Meier plot with the log-rank p."""
    from wsimil_core._io import write_json_atomic
    from wsimil_core.inference.predict import evaluate_store

    report = evaluate_store(
        checkpoint,
        store,
        labels,
        split=split,
        slide_ids=_slide_list(slides),
        threshold=threshold,
        n_boot=n_boot,
        seed=seed,
        device=device,
        progress=progress,
        km_dir=km_dir if km_dir is not None else (out.parent if out is not None else Path.cwd()),
    )
    _print_report(report)
    if out is not None:
        write_json_atomic(_json_safe(report), out)
        typer.echo(f"report written to {out}")


@app.command("predict")
def predict_command(
    checkpoint: Path = typer.Argument(..., metavar="CKPT", help="Checkpoint (.safetensors) written by wsimil train."),
    store: Path = typer.Option(..., "--store", help="Feature store directory."),
    slides: list[str] | None = typer.Option(None, "--slides", help="Slide ids (default: all slides)."),
    out: Path | None = typer.Option(None, "--out", help="Slide predictions CSV (default: print them)."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when available) | cpu | cuda | cuda:N."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    fail_fast: bool = typer.Option(False, "--fail-fast", help=FAIL_FAST_HELP),
) -> None:
    """Slide predictions (CSV) and per-patch maps written into the store under maps/<checkpoint_id>/.

    Each checkpoint predicts through its method's predictor: features from the store, or the slides' pixels
    (ABMILX end-to-end, AHDMIL pre-screening: the store's slide files are read). A slide that cannot be
    predicted (damaged data, features of another encoder, ...) is reported and left out of the CSV; the exit
    code is 1 at the end when any failed."""
    from wsimil_core.errors import StoreError
    from wsimil_core.inference.predict import predict_store

    frame = predict_store(
        checkpoint,
        store,
        slide_ids=_slide_list(slides),
        device=device,
        out_csv=out,
        progress=progress,
        fail_fast=fail_fast,
    )
    ckpt_id = frame.attrs["checkpoint_id"]
    if out is None:
        typer.echo(frame.to_csv(index=False), nl=False)
    else:
        typer.echo(f"{len(frame)} slide prediction(s) written to {out}")
    typer.echo(f"maps written to {store}/<slide>/maps/{ckpt_id}/", err=out is None)
    failures = Failures("slide", StoreError)
    for sid, cause in frame.attrs["failed"].items():
        failures.add(sid, cause)
    failures.finish(len(frame) + len(failures.items))


@app.command("export-geojson")
def export_geojson_command(
    source: str = typer.Argument(
        ..., metavar="CKPT_OR_ID", help="Checkpoint file, or a checkpoint id already in the store's maps."
    ),
    store: Path = typer.Option(..., "--store", help="Feature store directory."),
    slide: str = typer.Option(..., "--slide", help="Slide id."),
    out: Path | None = typer.Option(None, "--out", help="GeoJSON file (default: <slide>.<checkpoint_id>.geojson)."),
    device: str = typer.Option("auto", "--device", help="Device used when the maps must be predicted first."),
) -> None:
    """Patch squares (level-0 px) with every map value as a QuPath measurement (a measurement map in QuPath).

    Given a checkpoint file whose maps are not yet in the store, the slide is predicted first.
    """
    from wsimil_core.engine.checkpoint import read_checkpoint_meta
    from wsimil_core.inference.geojson import export_geojson
    from wsimil_core.inference.predict import predict_store
    from wsimil_core.store.zarr_store import FeatureStore

    fs = FeatureStore(store)
    path = Path(source)
    if path.is_file():
        ckpt_id = str(read_checkpoint_meta(path).checkpoint_id)  # filled from the weights when absent
        if slide in fs.slide_ids() and ckpt_id not in fs.map_ids(slide):
            predict_store(path, fs, slide_ids=[slide], device=device, progress=False)
    else:
        if source.endswith(".safetensors"):
            from wsimil_core.errors import CheckpointError

            raise CheckpointError(f"{source}: checkpoint file not found")
        ckpt_id = source
    out = out or Path(f"{slide}.{ckpt_id}.geojson")
    collection = export_geojson(fs, slide, ckpt_id, out)
    typer.echo(f"{len(collection['features'])} tiles written to {out}")
