"""``wsimil asmil attention-jsd``: the attention-stability curves of training runs (ASMIL App. H), side by side.

Reads ``train/attention_jsd`` from each run directory's ``metrics.csv`` (logged by ``asmil``, ``abmil-anchor``,
``abmilx-anchor`` and their ``anchor: false`` baselines), prints a table epoch by epoch and, with ``--out``,
writes a PNG plot (matplotlib's Agg canvas: no GUI toolkit is imported).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import typer

from wsimil_core._io import atomic_path
from wsimil_core.errors import DataError

app = typer.Typer(
    name="asmil", help="ASMIL commands: attention-stability curves of training runs.", no_args_is_help=True
)

JSD_COLUMN = "train/attention_jsd"


def read_jsd_curve(run_dir: Path) -> list[float]:
    """The per-epoch attention JSD of a run (``metrics.csv``); ``DataError`` naming the file when absent."""
    path = Path(run_dir) / "metrics.csv"
    if not path.is_file():
        raise DataError(f"{path}: no metrics.csv (is {run_dir} a training run directory?)")
    table = pd.read_csv(path)
    if JSD_COLUMN not in table.columns:
        raise DataError(
            f"{path}: no {JSD_COLUMN!r} column; train with asmil or an '-anchor' method (monitor_slides > 0)"
        )
    return [float(v) for v in table[JSD_COLUMN].tolist()]


def plot_jsd_curves(curves: dict[str, list[float]], out: Path) -> Path:
    """Write a PNG of the JSD curves (log y axis), atomically."""
    # matplotlib is heavy to import: only --out needs it, `wsimil --help` does not.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for name, values in curves.items():
        ax.plot(range(1, len(values) + 1), values, marker="o", label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("attention JSD to the previous epoch")
    if all(v > 0 for values in curves.values() for v in values if v == v):
        ax.set_yscale("log")
    ax.set_title("attention stability (lower = more stable)")
    ax.legend()
    fig.tight_layout()
    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    return out


@app.command("attention-jsd")
def attention_jsd_command(
    runs: list[Path] = typer.Argument(..., help="Training run directories (each with metrics.csv)."),
    out: Path | None = typer.Option(None, "--out", help="Write a PNG plot of the curves here."),
) -> None:
    """Attention JSD between consecutive epochs of one or more runs (e.g. with and without the ASMIL anchor)."""
    curves = {str(r): read_jsd_curve(r) for r in runs}
    n = max(len(v) for v in curves.values())
    names = list(curves)
    typer.echo("epoch  " + "  ".join(f"{name:>20}" for name in names))
    for e in range(n):
        cells = [f"{curves[k][e]:>20.4e}" if e < len(curves[k]) else f"{'':>20}" for k in names]
        typer.echo(f"{e + 1:>5}  " + "  ".join(cells))
    means = [sum(v) / len(v) if v else float("nan") for v in curves.values()]
    typer.echo(" mean  " + "  ".join(f"{m:>20.4e}" for m in means))
    if out is not None:
        typer.echo(f"plot written to {plot_jsd_curves(curves, out)}")
