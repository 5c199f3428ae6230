"""``wsimil info`` and ``wsimil tile``: inspect slides and write patch grids."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from wsimil_core.cli.app import app
from wsimil_core.cli.batch import FAIL_FAST_HELP, Failures
from wsimil_core.errors import SlideError, WsimilError

if TYPE_CHECKING:
    from wsimil_core.wsi.tiling import GridSpec, PatchGrid, TissueMask, TissueParams

_BACKEND_HELP = "Slide reader: auto (OpenSlide when it recognises the file, else tifffile), openslide, tifffile."
_MPP_HELP = "µm per level-0 pixel, overriding (or supplying) the slide's metadata."


def slide_id_of(path: Path) -> str:
    """Slide id from a file name: the name without its extension(s) (``a.ome.tif`` -> ``a``)."""
    name = path.name
    for suffix in (".ome.tiff", ".ome.tif", ".ome.tf2", ".ome.tf8", ".ome.btf"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


@app.command("info")
def info(
    slide: Path = typer.Argument(..., help="Slide file."),
    backend: str = typer.Option("auto", "--backend", help=_BACKEND_HELP),
    slide_mpp: float | None = typer.Option(None, "--slide-mpp", help=_MPP_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the information as JSON."),
) -> None:
    """Print a slide's levels, dimensions, downsamples, mpp, vendor, objective, bounds and associated images."""
    from wsimil_core.wsi.slide import open_slide

    with open_slide(slide, backend=backend, slide_mpp=slide_mpp) as s:
        data: dict[str, Any] = {
            "path": str(s.path),
            "backend": s.backend,
            "vendor": s.vendor,
            "levels": [
                {"level": i, "width": w, "height": h, "downsample": ds, "tile": list(t)}
                for i, ((w, h), ds, t) in enumerate(zip(s.level_dimensions, s.level_downsamples, s.level_tile_sizes))
            ],
            "mpp": s.mpp,
            "mpp_source": "--slide-mpp" if s.slide_mpp is not None else ("file" if s.file_mpp is not None else None),
            "objective_power": s.objective_power,
            "bounds": list(s.bounds),
            "associated_images": sorted(s.associated_images),
        }
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    typer.echo(f"slide:      {data['path']}")
    typer.echo(f"backend:    {data['backend']}")
    typer.echo(f"vendor:     {data['vendor'] or 'unknown'}")
    mpp = "unknown (pass --slide-mpp)" if data["mpp"] is None else f"{data['mpp']:.6g} µm/px ({data['mpp_source']})"
    typer.echo(f"mpp:        {mpp}")
    obj = data["objective_power"]
    typer.echo(f"objective:  {'unknown' if obj is None else f'{obj:g}x'}")
    bx, by, bw, bh = data["bounds"]
    typer.echo(f"bounds:     x={bx} y={by} w={bw} h={bh}")
    typer.echo(f"levels:     {len(data['levels'])}")
    for lv in data["levels"]:
        typer.echo(
            f"  level {lv['level']}: {lv['width']} x {lv['height']} px, downsample {lv['downsample']:.4g}, "
            f"tile {lv['tile'][0]}x{lv['tile'][1]}"
        )
    assoc = ", ".join(data["associated_images"]) or "none"
    typer.echo(f"associated: {assoc}")


def _mask_png(mask: TissueMask, out: Path) -> None:
    """Write the tissue thumbnail with tissue tinted green and background dimmed, atomically."""
    import numpy as np
    from PIL import Image

    from wsimil_core._io import atomic_write

    thumb = mask.thumbnail if mask.thumbnail is not None else np.full((*mask.mask.shape, 3), 255, np.uint8)
    img = thumb.astype(np.float32)
    m = mask.mask[..., None]
    green = np.array([40, 200, 60], np.float32)
    img = np.where(m, 0.65 * img + 0.35 * green, 0.5 * img + 0.5 * 255)
    rgb = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    atomic_write(out, lambda f: Image.fromarray(rgb).save(f, format="PNG"))


@app.command("tile")
def tile(
    slides: list[Path] = typer.Argument(..., help="Slide files."),
    out: Path = typer.Option(..., "--out", help="Output folder for <slide_id>.coords.npy/.grid.json/.tissue.png."),
    mpp: float = typer.Option(0.5, "--mpp", help="Patch resolution in µm per pixel."),
    patch: int = typer.Option(256, "--patch", help="Patch side in pixels at --mpp."),
    stride: int | None = typer.Option(None, "--stride", help="Grid step in pixels at --mpp (default: --patch)."),
    min_tissue: float = typer.Option(0.25, "--min-tissue", help="Keep patches with at least this tissue fraction."),
    slide_mpp: float | None = typer.Option(None, "--slide-mpp", help=_MPP_HELP),
    backend: str = typer.Option("auto", "--backend", help=_BACKEND_HELP),
    tissue_space: str = typer.Option("saturation", "--tissue-space", help="saturation or od (optical density)."),
    tissue_threshold: float | None = typer.Option(None, "--tissue-threshold", help="Fixed threshold (default Otsu)."),
    thumb_mpp: float = typer.Option(8.0, "--thumb-mpp", help="µm/px of the thumbnail used for tissue detection."),
    min_area_um2: float = typer.Option(20000.0, "--min-area-um2", help="Drop tissue components smaller than this."),
    no_fill_holes: bool = typer.Option(False, "--no-fill-holes", help="Do not fill holes in the tissue mask."),
    fail_fast: bool = typer.Option(False, "--fail-fast", help=FAIL_FAST_HELP),
) -> None:
    """Detect tissue and write a patch grid (level-0 coords) per slide, with a tissue-mask PNG.

    A slide that cannot be tiled (unreadable, no or implausible pixel size, ...) is reported and the others are
    tiled; the exit code is 1 at the end when any failed."""
    from tqdm import tqdm

    from wsimil_core.wsi.tiling import GridSpec, TissueParams

    spec = GridSpec(mpp=mpp, patch=patch, stride=stride, min_tissue=min_tissue)
    params = TissueParams(
        thumb_mpp=thumb_mpp,
        space=tissue_space,
        threshold=tissue_threshold,
        min_area_um2=min_area_um2,
        fill_holes=not no_fill_holes,
    )
    ids = [slide_id_of(p) for p in slides]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise WsimilError(f"several slides share the id(s) {dupes} (file name without extension); rename them")
    out.mkdir(parents=True, exist_ok=True)
    failures = Failures("slide", SlideError, fail_fast)
    total = 0
    bar = tqdm(list(zip(slides, ids)), desc="tiling", unit="slide")
    for path, sid in bar:
        bar.set_postfix_str(sid)
        grid, cause = None, ""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                grid, mask, extra = _tile_one(path, sid, backend, slide_mpp, params, spec)
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as exc:  # noqa: BLE001 - one bad slide never stops the batch (unless --fail-fast)
                cause = str(exc) if isinstance(exc, WsimilError) else f"{type(exc).__name__}: {exc}"
            finally:
                for warning in caught:  # also when the slide failed: the warning often says why
                    tqdm.write(f"warning: {warning.message}")
        if grid is None:
            bar.clear()
            failures.add(str(path), cause)
            continue
        grid.save(out / f"{sid}.coords.npy", extra_attrs=extra)
        _mask_png(mask, out / f"{sid}.tissue.png")
        total += len(grid)
        tqdm.write(f"{sid}: {len(grid)} patches of {grid.size_level0} level-0 px")
    bar.close()
    typer.echo(f"{len(slides) - len(failures.items)} of {len(slides)} slides tiled, {total} patches -> {out}")
    failures.finish(len(slides))


def _tile_one(
    path: Path, sid: str, backend: str, slide_mpp: float | None, params: TissueParams, spec: GridSpec
) -> tuple[PatchGrid, TissueMask, dict[str, Any]]:
    """Tissue mask and patch grid of one slide, and the attrs its grid.json gets."""
    from wsimil_core.wsi.slide import open_slide
    from wsimil_core.wsi.tiling import detect_tissue, make_grid

    with open_slide(path, backend=backend, slide_mpp=slide_mpp) as s:
        mask = detect_tissue(s, params)
        grid = make_grid(s, mask, spec)
        extra = {
            "slide_id": sid,
            "slide_path": str(Path(path).resolve()),
            "backend": s.backend,
            "tissue": params.to_dict(),
            "tissue_threshold": mask.threshold,
            "mask_downsample": mask.downsample,
        }
    return grid, mask, extra
