"""``wsimil extend``: add a task to a trained MECDS checkpoint (MECDS Sec. 3.4, task extension).

Adds a task token, a head, and a router + expert in every MFA module; every old parameter stays frozen (checked
bit for bit); only the new components train on the new column. Prints the old tasks' metrics before and after
on the same split and writes a normal checkpoint with M+1 tasks. Progress lines start with ``extend:``.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from wsimil_core._io import atomic_write_text
from wsimil_core.cli.app import app


@app.command("extend")
def extend_command(
    checkpoint: Path = typer.Argument(..., help="Trained mecds checkpoint (*.safetensors)."),
    labels: Path = typer.Option(..., "--labels", help="Labels CSV with slide_id and the new task's column."),
    target: str = typer.Option(..., "--target", help="Column of the labels CSV holding the new task's labels."),
    name: str | None = typer.Option(None, "--name", help="Name of the new task (default: the column name)."),
    store: Path | None = typer.Option(
        None, "--store", help="Feature store (default: the store the checkpoint was trained on)."
    ),
    output: Path | None = typer.Option(
        None, "--output", "-o", help="Output checkpoint (default: <checkpoint>_ext_<name>.safetensors)."
    ),
    epochs: int = typer.Option(10, "--epochs", min=1, help="Training epochs of the new components."),
    lr: float = typer.Option(1e-3, "--lr", help="Learning rate of the new components (AdamW)."),
    seed: int = typer.Option(0, "--seed", help="Random seed (initialisation and bag order)."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when available), cpu, cuda, cuda:N."),
    balanced: bool = typer.Option(True, "--balanced/--no-balanced", help="Class-balanced bag sampling."),
    isolated: bool = typer.Option(
        True,
        "--isolated/--shared-stream",
        help="Keep the new experts' patch updates out of the shared patch stream (old tasks' predictions stay "
        "exactly the same); --shared-stream adds them back as the paper's DFR does.",
    ),
    json_out: Path | None = typer.Option(None, "--json", help="Also write the before/after report as JSON."),
) -> None:
    """Add a task to a mecds checkpoint; old parameters stay bit-identical; old tasks' metrics before/after."""
    from wsimil_core.methods.mecds.method import extend_checkpoint

    result = extend_checkpoint(
        checkpoint,
        labels,
        target,
        name=name,
        store=store,
        output=output,
        epochs=epochs,
        lr=lr,
        seed=seed,
        device=device,
        balanced=balanced,
        isolated=isolated,
    )
    typer.echo(f"{'task':<16} {'auc before':>10} {'auc after':>10} {'sens before':>11} {'sens after':>10}")
    for task, m in result.after.items():
        b = result.before[task]
        typer.echo(
            f"{task:<16} {b['auc']:>10.4f} {m['auc']:>10.4f} {b['sensitivity']:>11.4f} {m['sensitivity']:>10.4f}"
        )
    n = result.new_task
    typer.echo(f"{result.task + ' (new)':<16} {'':>10} {n['auc']:>10.4f} {'':>11} {n['sensitivity']:>10.4f}")
    if result.skipped_tasks:
        typer.echo(f"not evaluated (no column in {labels.name}): {', '.join(result.skipped_tasks)}")
    typer.echo(f"metrics on the {result.eval_split} split; old parameters bit-identical: {result.frozen_identical}")
    typer.echo(f"wrote {result.checkpoint}")
    if json_out is not None:
        report = {
            "checkpoint": str(result.checkpoint),
            "task": result.task,
            "target": result.target,
            "eval_split": result.eval_split,
            "before": result.before,
            "after": result.after,
            "new_task": result.new_task,
            "frozen_identical": result.frozen_identical,
            "skipped_tasks": result.skipped_tasks,
            "history": result.history,
        }
        atomic_write_text(Path(json_out), json.dumps(report, indent=2, allow_nan=True))
