"""``wsimil store ...``: checks of a feature store (``wsimil store verify [--repair]``)."""

from __future__ import annotations

from pathlib import Path

import typer

from wsimil_core.cli.app import app

store_app = typer.Typer(help="Check and repair a feature store.", no_args_is_help=True)
app.add_typer(store_app, name="store")


@store_app.command("verify")
def verify_command(
    store: Path = typer.Argument(..., help="Feature store directory."),
    repair: bool = typer.Option(
        False,
        "--repair",
        help="Remove the damaged parts (the whole slide when its coords are damaged, else the damaged features or "
        "maps) so that the next extract/import/predict redoes them.",
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Read and decode every chunk of every slide (checksums), and check shapes, counts and values.

    Exit code 1 when damage remains (found without --repair, or left after it)."""
    from wsimil_core.store.verify import describe, repair_store, store_slide_groups, verify_store
    from wsimil_core.store.zarr_store import FeatureStore

    fs = FeatureStore(store)
    n_slides = len(store_slide_groups(fs))
    damages = verify_store(fs, progress=progress)
    if not damages:
        typer.echo(f"{fs.root}: checked {n_slides} slide(s): no damage found")
        return
    for line in describe(damages):
        typer.echo(f"DAMAGED {line}")
    typer.echo(f"{fs.root}: checked {n_slides} slide(s): {len(damages)} damaged")
    if not repair:
        typer.echo(f"run `wsimil store verify --repair {fs.root}` to remove the damaged parts, then re-run extract")
        raise typer.Exit(1)
    for node in repair_store(fs, damages):
        typer.echo(f"removed {node}")
    left = verify_store(fs, [d.slide_id for d in damages if (fs.root / d.slide_id).exists()])
    if left:
        for line in describe(left):
            typer.echo(f"STILL DAMAGED {line}")
        raise typer.Exit(1)
    typer.echo(
        "re-run `wsimil extract` (or the import) with the same arguments to redo the removed slides and features, "
        "and `wsimil predict` for removed maps"
    )
