"""``wsimil momkd memory-gallery``: the patches closest to every MoMKD memory component (paper Fig. 4).

For each component ``c`` of ``C+`` and ``C-`` of a trained ``momkd`` checkpoint, the ``top`` patches of the store
with the highest similarity ``F_P,i . c`` are kept. Their pixels are read from the slide (the store's
``slide_path`` attribute at the stored level-0 coords, ``patch_size_level0`` resampled to ``patch_size``) and
saved as PNGs ``<out>/<component>/rank<r>_<slide>_<x>_<y>.png``; ``<out>/gallery.csv`` lists every kept patch
(component, signed id, rank, slide, x, y, similarity, image). Slides whose file is unknown or unreadable are
listed in the CSV only (the ``image`` column is empty), and the command says so.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import typer
from PIL import Image
from tqdm.auto import tqdm

from wsimil_core._io import atomic_path
from wsimil_core.checkpoint_meta import CheckpointMeta
from wsimil_core.devices import resolve_device
from wsimil_core.engine.checkpoint import load_checkpoint
from wsimil_core.errors import CheckpointError, SlideError, StoreError, WsimilError
from wsimil_core.methods.momkd.model import MoMKD
from wsimil_core.store.zarr_store import FeatureStore
from wsimil_core.wsi.slide import open_slide

app = typer.Typer(name="momkd", help="MoMKD commands: the memory-component patch gallery.", no_args_is_help=True)


@dataclass
class GalleryResult:
    """What ``memory_gallery`` wrote."""

    csv: Path
    rows: list[dict[str, Any]]
    n_png: int = 0
    slides_without_pixels: dict[str, str] = field(default_factory=dict)  # slide id -> reason


def component_names(n: int) -> list[tuple[str, int]]:
    """``[(name, signed_id)]`` for C+ then C-: ``("pos01", 1) .. ("neg01", -1) ..`` (ids as in ``memory/component``)."""
    return [(f"pos{k + 1:02d}", k + 1) for k in range(n)] + [(f"neg{k + 1:02d}", -(k + 1)) for k in range(n)]


def _pick_encoder(store: Any, slide_id: str, meta: CheckpointMeta, encoder_id: str | None) -> str:
    have = store.encoder_ids(slide_id)
    want = encoder_id or meta.encoder_id
    if want:
        if want not in have:
            raise StoreError(f"store {store.root}: slide {slide_id!r} has no features of encoder {want!r} (has {have})")
        return want
    if len(have) != 1:
        raise StoreError(
            f"store {store.root}: slide {slide_id!r} has features of {have or 'no encoder'}; pass --encoder-id"
        )
    return have[0]


def _save_png_atomic(img: np.ndarray, path: Path) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(img).save(tmp, format="PNG")


def _write_csv_atomic(rows: list[dict[str, Any]], path: Path) -> None:
    cols = ["component", "signed_id", "rank", "slide_id", "x", "y", "similarity", "patch_size_level0", "image"]
    with atomic_path(path) as tmp:
        pd.DataFrame(rows, columns=cols).to_csv(tmp, index=False)


def memory_gallery(
    checkpoint: str | os.PathLike,
    store: str | os.PathLike,
    out: str | os.PathLike,
    top: int = 3,
    slide_ids: list[str] | None = None,
    encoder_id: str | None = None,
    device: str = "auto",
    write_images: bool = True,
    progress: bool = True,
) -> GalleryResult:
    """Find the ``top`` patches of every memory component over a store and save them (PNG + CSV).

    Args:
        checkpoint: a ``momkd`` checkpoint (``*.safetensors``).
        store: feature store directory (the checkpoint's encoder).
        out: output folder (created).
        top: patches kept per component.
        slide_ids: restrict to these slides (default: all).
        encoder_id: features to read when the store holds several encoders and the checkpoint names none.
        device: ``auto`` | ``cpu`` | ``cuda``.
        write_images: read pixels and write PNGs when the slide files are available.

    Returns:
        ``GalleryResult`` (the CSV path, its rows, the PNG count and the slides whose pixels were unavailable).
    """
    checkpoint = Path(checkpoint)
    if top < 1:
        raise WsimilError(f"memory-gallery: --top must be >= 1, got {top}")
    dev = resolve_device(device)
    model, meta = load_checkpoint(checkpoint, device=dev)
    if meta.model_name != "momkd":
        raise CheckpointError(
            f"{checkpoint}: memory-gallery needs a momkd checkpoint, this one holds model {meta.model_name!r}"
        )
    model.eval()
    fs = FeatureStore(store)
    ids = list(slide_ids) if slide_ids else fs.slide_ids()
    if not ids:
        raise StoreError(f"store {store}: no complete slide to search")
    if not isinstance(model, MoMKD):
        raise CheckpointError(f"{checkpoint}: memory-gallery needs a MoMKD model, got {type(model).__name__}")
    n = model.config.n_components
    names = component_names(n)
    best_sim = np.full((2 * n, top), -np.inf)
    best_ref: list[list[tuple[str, int, int] | None]] = [[None] * top for _ in range(2 * n)]
    for sid in tqdm(ids, desc="memory-gallery", disable=not progress, leave=False):
        bag = fs.read_bag(sid, _pick_encoder(fs, sid, meta, encoder_id))
        x = torch.as_tensor(np.asarray(bag.features, dtype=np.float32), device=dev)
        coords = torch.as_tensor(np.asarray(bag.coords, dtype=np.int64), device=dev)
        with torch.no_grad():
            o = model(x, coords=coords)
        sim = torch.cat([o.extras["sim_pos"][0], o.extras["sim_neg"][0]], dim=1).float().cpu().numpy()  # [N, 2n]
        k = min(top, sim.shape[0])
        cand = np.argpartition(-sim, k - 1, axis=0)[:k]  # [k, 2n] patch rows
        for c in range(2 * n):
            for row in cand[:, c]:
                s = float(sim[row, c])
                worst = int(np.argmin(best_sim[c]))
                if s > best_sim[c, worst]:
                    best_sim[c, worst] = s
                    best_ref[c][worst] = (sid, int(bag.coords[row, 0]), int(bag.coords[row, 1]))

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result = GalleryResult(csv=out / "gallery.csv", rows=[])
    slides: dict[str, Any] = {}
    try:
        for c, (name, signed) in enumerate(names):
            order = np.argsort(-best_sim[c])
            for rank, j in enumerate(order, start=1):
                ref = best_ref[c][j]
                if ref is None:
                    continue
                sid, x0, y0 = ref
                attrs = fs.slide_attrs(sid)
                size0 = int(attrs.get("patch_size_level0") or attrs.get("stride_level0") or 0)
                image = ""
                if write_images and sid not in result.slides_without_pixels:
                    slide = slides.get(sid) or _open(attrs, sid, result)
                    if slide is not None and size0 > 0:
                        slides[sid] = slide
                        out_px = int(attrs.get("patch_size") or size0)
                        rel = Path(name) / f"rank{rank}_{sid}_{x0}_{y0}.png"
                        try:
                            _save_png_atomic(slide.read_patch(x0, y0, size0, out_px), out / rel)
                            image = rel.as_posix()
                            result.n_png += 1
                        except SlideError as exc:
                            result.slides_without_pixels[sid] = str(exc)
                    elif slide is not None:
                        result.slides_without_pixels[sid] = "the store has no patch_size_level0 attribute"
                result.rows.append(
                    {
                        "component": name,
                        "signed_id": signed,
                        "rank": rank,
                        "slide_id": sid,
                        "x": x0,
                        "y": y0,
                        "similarity": float(best_sim[c, j]),
                        "patch_size_level0": size0,
                        "image": image,
                    }
                )
    finally:
        for slide in slides.values():
            close = getattr(slide, "close", None)
            if close is not None:
                close()
    _write_csv_atomic(result.rows, result.csv)
    return result


def _open(attrs: dict[str, Any], sid: str, result: GalleryResult) -> Any:
    """Open the slide of a store group, or record why its pixels are unavailable and return None."""
    path = attrs.get("slide_path")
    if not path:
        result.slides_without_pixels[sid] = "the store records no slide_path"
        return None
    if not Path(path).is_file():
        result.slides_without_pixels[sid] = f"slide file {path} not found"
        return None
    try:
        return open_slide(path, slide_mpp=attrs.get("slide_mpp"))
    except SlideError as exc:
        result.slides_without_pixels[sid] = str(exc)
        return None


@app.command("memory-gallery")
def memory_gallery_command(
    checkpoint: Path = typer.Argument(..., help="A momkd checkpoint (.safetensors) written by wsimil train."),
    store: Path = typer.Option(..., "--store", help="Feature store directory."),
    out: Path = typer.Option(..., "--out", help="Output folder: <component>/rank*.png and gallery.csv."),
    top: int = typer.Option(3, "--top", min=1, help="Patches kept per memory component."),
    slides: list[str] | None = typer.Option(None, "--slides", help="Slide ids (repeat, or comma-separated)."),
    encoder_id: str | None = typer.Option(None, "--encoder-id", help="Features to read (default: the checkpoint's)."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when available) | cpu | cuda | cuda:N."),
    images: bool = typer.Option(True, "--images/--no-images", help="Read pixels from the slides and save PNGs."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Save the top patches of every MoMKD memory component (C+ and C-) as PNGs plus a CSV (paper Fig. 4)."""
    ids = [s.strip() for item in (slides or []) for s in item.split(",") if s.strip()] or None
    res = memory_gallery(
        checkpoint,
        store,
        out,
        top=top,
        slide_ids=ids,
        encoder_id=encoder_id,
        device=device,
        write_images=images,
        progress=progress,
    )
    n_comp = len({r["component"] for r in res.rows})
    typer.echo(f"memory-gallery: {len(res.rows)} patches for {n_comp} components -> {res.csv}")
    if images:
        typer.echo(f"memory-gallery: {res.n_png} PNG patches written under {Path(out)}")
    if res.slides_without_pixels:
        typer.echo(
            f"memory-gallery: no pixels for {len(res.slides_without_pixels)} slide(s); their patches are listed in "
            f"{res.csv.name} only (x, y level-0):"
        )
        for sid, why in sorted(res.slides_without_pixels.items())[:10]:
            typer.echo(f"  {sid}: {why}")


__all__ = ["memory_gallery", "GalleryResult", "component_names"]
