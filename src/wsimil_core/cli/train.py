"""CLI commands ``train``, ``crossval``, ``models`` and ``config`` (a thin layer over ``wsimil_core.engine``).

Every flag is a config key: ``--output DIR`` = ``output.dir``, ``--device`` = ``train.device``, ``--epochs`` =
``train.epochs``, ``--seed`` = ``train.seed``, ``--folds`` = ``data.split.folds``; any other key with
``--set key.path=value`` (repeatable). Multi-GPU: ``torchrun --nproc_per_node=N -m wsimil_core train CONFIG``.
"""

from __future__ import annotations

from pathlib import Path

import typer

from wsimil_core.cli.app import app


def _overrides(
    sets: list[str] | None,
    output: Path | None = None,
    device: str | None = None,
    epochs: int | None = None,
    seed: int | None = None,
) -> list[str]:
    out = list(sets or [])
    if output is not None:
        out.append(f"output.dir={output}")
    if device is not None:
        out.append(f"train.device={device}")
    if epochs is not None:
        out.append(f"train.epochs={epochs}")
    if seed is not None:
        out.append(f"train.seed={seed}")
    return out


_SET_HELP = "Override a config key, e.g. --set train.epochs=3 --set data.max_patches=4096 (repeatable)."


@app.command("train")
def train_command(
    config: Path = typer.Argument(..., help="Training config (YAML); `wsimil config --method NAME` writes one."),
    set_: list[str] | None = typer.Option(None, "--set", help=_SET_HELP),
    output: Path | None = typer.Option(None, "--output", "-o", help="Run directory (output.dir)."),
    device: str | None = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:N (train.device)."),
    epochs: int | None = typer.Option(None, "--epochs", help="Epochs per phase (train.epochs)."),
    seed: int | None = typer.Option(None, "--seed", help="Random seed (train.seed)."),
    resume: bool | None = typer.Option(
        None,
        "--resume/--no-resume",
        help="Continue from the run directory's resume file (default: automatically when one exists); "
        "--no-resume starts afresh.",
    ),
) -> None:
    """Train a model on a feature store; checkpoints, metrics.csv and a resume file go to output.dir."""
    from wsimil_core.engine.config import load_config
    from wsimil_core.engine.trainer import train

    cfg = load_config(config, _overrides(set_, output, device, epochs, seed))
    result = train(cfg, resume=resume)
    best = "-" if result.best_epoch is None else result.best_epoch + 1  # 1-based, as in the epoch lines
    typer.echo(f"best epoch {best} of {len(result.history)}: {result.best_checkpoint or result.last_checkpoint}")
    if result.test_metrics:
        shown = {k: v for k, v in result.test_metrics.items() if "/" not in k or k.startswith("mean/")}
        typer.echo("test " + "  ".join(f"{k} {v:.4f}" for k, v in shown.items()))


@app.command("crossval")
def crossval_command(
    config: Path = typer.Argument(..., help="Training config (YAML)."),
    folds: int | None = typer.Option(None, "--folds", "-k", help="Number of folds (data.split.folds)."),
    set_: list[str] | None = typer.Option(None, "--set", help=_SET_HELP),
    output: Path | None = typer.Option(None, "--output", "-o", help="Base directory (output.dir)."),
    device: str | None = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:N (train.device)."),
    epochs: int | None = typer.Option(None, "--epochs", help="Epochs per phase (train.epochs)."),
    seed: int | None = typer.Option(None, "--seed", help="Random seed (train.seed)."),
    jobs: int = typer.Option(
        1, "--jobs", "-j", min=1, help="Folds trained at once, each in its own process with its share of the cores."
    ),
) -> None:
    """K-fold cross-validation (stratified, patient-grouped): mean ± std of every metric and a JSON report."""
    from wsimil_core.engine.config import load_config
    from wsimil_core.engine.crossval import crossval

    sets = _overrides(set_, output, device, epochs, seed)
    if folds is not None:
        sets.append(f"data.split.folds={folds}")
    cfg = load_config(config, sets)
    result = crossval(cfg, folds=folds, jobs=jobs)
    for name, s in result.summary.items():
        if "threshold" not in name:
            typer.echo(f"{name}\t{s['mean']:.4f} ± {s['std']:.4f}")
    typer.echo(f"report: {result.report_path}")


def _first_line(obj: object) -> str:
    doc = (getattr(obj, "__doc__", None) or "").strip()
    return doc.splitlines()[0] if doc else ""


@app.command("models")
def models_command() -> None:
    """List the registered models and methods (one line each)."""
    import wsimil_core.methods  # noqa: F401
    from wsimil_core.methods.base import list_methods, method_class
    from wsimil_core.models.base import list_models, model_class

    typer.echo("models:")
    for name in list_models():
        typer.echo(f"  {name:<12} {_first_line(model_class(name))}")
    typer.echo("methods:")
    for name in list_methods():
        cls = method_class(name)
        typer.echo(f"  {name:<12} {_first_line(cls)} (model: {cls.model_name})")


@app.command("config")
def config_command(
    method: str = typer.Option("abmil", "--method", "-m", help="Method whose defaults to print."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Write to this file instead of stdout."),
) -> None:
    """Print a complete commented default training config (YAML) for a method."""
    from wsimil_core._io import atomic_write_text
    from wsimil_core.engine.config import default_config_yaml

    text = default_config_yaml(method)
    if output is None:
        typer.echo(text, nl=False)
    else:
        atomic_write_text(Path(output), text)
        typer.echo(f"wrote {output}")
