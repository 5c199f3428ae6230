"""``wsimil extract``: batched, resumable patch-feature extraction into a feature store."""

from __future__ import annotations

import signal
from functools import partial
from pathlib import Path
from types import FrameType

import typer

from wsimil_core.cli.app import app
from wsimil_core.cli.batch import FAIL_FAST_HELP

_SLIDE_SUFFIXES = (
    ".svs",
    ".tif",
    ".tiff",
    ".ndpi",
    ".vms",
    ".vmu",
    ".scn",
    ".mrxs",
    ".svslide",
    ".bif",
    ".czi",
    ".dcm",
)


def _expand(slides: list[Path]) -> list[Path]:
    """Files as given; a directory contributes its slide files (by extension, sorted, not recursive).

    A directory whose name has a slide extension (``x.svs/``), given or found, stays in the list: opening it
    fails with "<path>: a directory, not a slide file", as in ``wsimil tile``.

    A DICOM WSI folder contributes only its first ``.dcm`` file (OpenSlide finds the others).
    """
    out: list[Path] = []
    for p in slides:
        if p.is_dir() and p.suffix.lower() not in _SLIDE_SUFFIXES:
            # a directory named like a slide (``x.svs/``) is kept as a path, so it is reported like a bad slide
            found = sorted(q for q in p.iterdir() if q.suffix.lower() in _SLIDE_SUFFIXES)
            dcm = [q for q in found if q.suffix.lower() == ".dcm"]
            out.extend([q for q in found if q.suffix.lower() != ".dcm"] + dcm[:1])
        else:
            out.append(p)
    return out


class _InterruptWatch:
    """Record a Ctrl-C (SIGINT) while extracting, and raise ``KeyboardInterrupt`` as Python's default handler does.

    The flag survives where the ``KeyboardInterrupt`` itself is lost: CPython ignores exceptions raised in fork
    hooks (a DataLoader worker starting), and a worker killed by the same SIGINT reaches the main process as a
    slide failure, not an interrupt. ``check`` (after each slide, and at the end) then stops the run. On an
    exception the handler stays installed; it behaves as the default one.
    """

    def __init__(self) -> None:
        self.seen = False
        self._previous = signal.signal(signal.SIGINT, self._handler)

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        self.seen = True
        raise KeyboardInterrupt

    def check(self, _slide_id: str | None = None) -> None:
        if self.seen:
            raise KeyboardInterrupt

    def close(self) -> None:
        signal.signal(signal.SIGINT, self._previous)


@app.command("extract")
def extract_command(
    slides: list[Path] = typer.Argument(..., help="Slide files (or folders of slides)."),
    store: Path = typer.Option(..., "--store", help="Feature store directory (created when missing)."),
    encoder: str = typer.Option(
        "resnet18",
        "--encoder",
        help="resnet18 | resnet50 (truncated after layer3) | resnet18-full | resnet50-full | levit_128s (levit_128, _192, _256, _384) | "
        "timm:<name> | tv:<name>.",
    ),
    weights: Path | None = typer.Option(
        None, "--weights", help="Local .pth/.pt/.safetensors state dict. Without it: random init (warned)."
    ),
    mpp: float = typer.Option(0.5, "--mpp", help="Patch resolution in µm per pixel."),
    patch: int = typer.Option(256, "--patch", help="Patch side in pixels at --mpp."),
    stride: int | None = typer.Option(None, "--stride", help="Grid step in pixels at --mpp (default: --patch)."),
    min_tissue: float = typer.Option(0.25, "--min-tissue", help="Minimum tissue fraction of a kept patch."),
    slide_mpp: float | None = typer.Option(
        None, "--slide-mpp", help="µm per level-0 pixel for slides without mpp metadata."
    ),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Patches per encoder batch."),
    workers: int = typer.Option(2, "--workers", min=0, help="Patch-reading worker processes (0 = main process)."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when available) | cpu | cuda | cuda:N."),
    dtype: str = typer.Option("float16", "--dtype", help="Stored feature dtype: float16 | float32."),
    backend: str = typer.Option("auto", "--backend", help="Slide reader: auto | openslide | tifffile."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
    verify: bool = typer.Option(
        False,
        "--verify",
        help="Read every chunk of finished slides before skipping them (checksums, shapes, counts); damaged ones "
        "are redone. Slower: it reads the whole store (see `wsimil store verify`).",
    ),
    scheduler: str | None = typer.Option(
        None,
        "--scheduler",
        help="Run one task per slide on an existing dask.distributed cluster (scheduler address, e.g. "
        "tcp://host:8786). Needs the 'cluster' extra; store and slides must be on a filesystem the workers share.",
    ),
    local_cluster: int | None = typer.Option(
        None,
        "--local-cluster",
        min=1,
        help="Start a dask.distributed LocalCluster with N single-threaded worker processes, one task per slide.",
    ),
    fail_fast: bool = typer.Option(False, "--fail-fast", help=FAIL_FAST_HELP),
) -> None:
    """Tissue -> patch grid -> encoder -> features in the store. Re-running skips finished slides.

    A slide that cannot be extracted is reported and the others are extracted; the exit code is 1 at the end
    when any failed."""
    from wsimil_core.errors import ConfigError, SlideError
    from wsimil_core.features.extract import extract_cohort
    from wsimil_core.wsi.tiling import GridSpec, TissueParams

    if dtype not in ("float16", "float32"):
        raise ConfigError(f"--dtype must be float16 or float32, got {dtype!r}")
    if not (mpp > 0 and patch > 0 and (stride is None or stride > 0)):
        raise ConfigError("--mpp, --patch and --stride must be positive")
    if not 0.0 <= min_tissue <= 1.0:
        raise ConfigError(f"--min-tissue must be in [0, 1], got {min_tissue}")
    paths = _expand(slides)
    if not paths:
        raise ConfigError("no slide files found in the given paths")
    grid_spec = GridSpec(mpp=mpp, patch=patch, stride=stride, min_tissue=min_tissue)
    if scheduler is not None and local_cluster is not None:
        raise ConfigError("give --scheduler or --local-cluster, not both")
    run = extract_cohort
    if scheduler is not None or local_cluster is not None:
        from wsimil_core.features.distributed import extract_cohort_distributed

        run = partial(extract_cohort_distributed, scheduler=scheduler, local_cluster=local_cluster)
    from wsimil_core.cli.app import state

    state.interrupt_note = (
        f"the slides finished so far are in the store {store} (the slide in progress is not: a slide is written "
        "whole or not at all); re-run the same command to resume: finished slides are skipped"
    )
    watch = _InterruptWatch()
    if run is extract_cohort:  # stop after the slide in progress when the interrupt itself was lost
        run = partial(extract_cohort, on_slide_done=watch.check)
    summary = run(
        paths,
        store,
        encoder,
        grid_spec,
        TissueParams(),
        weights=str(weights) if weights is not None else None,
        device=device,
        batch_size=batch_size,
        num_workers=workers,
        dtype=dtype,
        slide_mpp=slide_mpp,
        backend=backend,
        progress=progress,
        verify=verify,
        fail_fast=fail_fast,
    )
    watch.close()
    watch.check()
    for line in summary.lines():
        typer.echo(line)
    if summary.failed:
        raise SlideError(f"{len(summary.failed)} of {len(paths)} slide(s) failed: {', '.join(summary.failed)}")
