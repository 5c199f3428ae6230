"""``wsimil demo``, ``wsimil import-mil-csv`` and ``wsimil import-h5``: make or import a cohort's features."""

from __future__ import annotations

from pathlib import Path

import typer

from wsimil_core.cli.app import app
from wsimil_core.cli.batch import FAIL_FAST_HELP, Failures


@app.command("demo")
def demo(
    out_dir: Path = typer.Argument(..., help="Folder to write the demo cohort into (created)."),
    n_slides: int = typer.Option(12, "--n-slides", help="Number of slides (>= 2)."),
    size: int = typer.Option(
        4096, "--size", help="Level-0 slide width in px (height is 3/4); a multiple of 256, >= 2048."
    ),
    seed: int = typer.Option(0, "--seed", help="Random seed (same seed, same cohort)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Rewrite a folder made with other parameters."),
) -> None:
    """Write a small offline cohort of pyramidal TIFF slides with planted lesions, labels.csv and omics.csv."""
    from wsimil_core.demo import make_demo_cohort

    c = make_demo_cohort(out_dir, n_slides=n_slides, size=size, seed=seed, overwrite=overwrite)
    kept = f" ({len(c.skipped)} already there)" if c.skipped else ""
    typer.echo(f"wrote {len(c.slides)} slides{kept} to {c.out_dir}")
    typer.echo(f"labels: {c.labels_csv}")
    typer.echo(f"omics:  {c.omics_csv}")
    typer.echo(f"next:   wsimil extract {c.out_dir} --store {c.out_dir / 'store'}")


@app.command("import-mil-csv")
def import_mil_csv_cmd(
    file: Path = typer.Argument(..., help="MIL benchmark CSV: label, bag id, features...; no header."),
    store: Path = typer.Option(..., "--store", help="Feature store directory (created when missing)."),
    labels: Path = typer.Option(..., "--labels", help="Labels CSV to write (slide_id,label)."),
    name: str | None = typer.Option(None, "--name", help="Slide id prefix (default: the file name)."),
    encoder_id: str = typer.Option("milcsv", "--encoder-id", help="Encoder id to store the features under."),
) -> None:
    """Import a classic MIL benchmark CSV (MUSK, Elephant, UCSB breast cancer, ...) into a feature store."""
    from wsimil_core.store.milcsv import import_mil_csv

    s = import_mil_csv(file, store, labels, name=name, encoder_id=encoder_id)
    typer.echo(
        f"{file.name}: {s.n_bags} bags ({s.n_positive} positive), {s.n_instances} instances, "
        f"{s.n_features} features; {s.label_mapping}"
    )
    for w in s.warnings[:10]:
        typer.echo(f"warning: {w}", err=True)
    if len(s.warnings) > 10:
        typer.echo(f"warning: ... and {len(s.warnings) - 10} more", err=True)
    typer.echo(f"store:  {store} (encoder {encoder_id!r})")
    typer.echo(f"labels: {s.labels_csv}")


@app.command("import-h5")
def import_h5_cmd(
    files: list[Path] = typer.Argument(..., help="CLAM/TRIDENT .h5 files, or folders of them."),
    store: Path = typer.Option(..., "--store", help="Feature store directory (created when missing)."),
    encoder_id: str = typer.Option("h5", "--encoder-id", help="Encoder id to store the features under."),
    slide_id: str | None = typer.Option(None, "--slide-id", help="Slide id (one file only; default: file stem)."),
    slide_mpp: float | None = typer.Option(None, "--slide-mpp", help="µm per level-0 px of the slides."),
    patch_mpp: float | None = typer.Option(None, "--patch-mpp", help="µm per px the patches were read at."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Re-import slides already in the store."),
    fail_fast: bool = typer.Option(False, "--fail-fast", help=FAIL_FAST_HELP),
) -> None:
    """Import CLAM/TRIDENT-style .h5 feature files (datasets 'features' and 'coords') into a feature store.

    A file that cannot be imported (unreadable, NaN features, ...) is reported and the others are imported; the
    exit code is 1 at the end when any failed."""
    from wsimil_core.errors import StoreError, WsimilError
    from wsimil_core.store.h5 import h5_files
    from wsimil_core.store.zarr_store import FeatureStore

    failures = Failures("file", StoreError, fail_fast)
    paths: list[Path] = []
    for f in files:
        try:
            paths.extend(h5_files(f))
        except WsimilError as exc:  # a missing file or an empty folder
            failures.add(str(f), str(exc))
    n_bad_args = len(failures.items)
    attrs = {}
    if slide_mpp is not None:
        attrs["slide_mpp"] = slide_mpp
    if patch_mpp is not None:
        attrs["patch_mpp"] = patch_mpp
    fs = FeatureStore(store, create=True)
    ids = []
    if paths:
        ids = fs.import_h5(
            paths,
            slide_id=slide_id,
            encoder_id=encoder_id,
            overwrite=overwrite,
            progress=True,
            on_error=lambda path, exc: failures.add(str(path), str(exc)),
            **attrs,
        )
    typer.echo(f"imported {len(ids)} slide(s) into {store} (encoder {encoder_id!r})")
    failures.finish(len(paths) + n_bad_args)
