"""napari plugin timings (no display needed; napari's ``ViewerModel`` does the slicing a canvas would ask for).

Prints ours vs. baseline side by side:

1. open a large slide as a layer (reader: lazy dask pyramid) vs. ``openslide.OpenSlide`` alone;
2. first view: the data napari requests for a whole-slide view after ``reset_view`` (the level it picks, the
   visible chunks) vs. ``openslide.get_thumbnail`` of the same size;
3. tile fetch rate through the layer's level-0 dask array vs. raw ``openslide.read_region`` on the same tiles;
4. "Run" -> first visible heatmap with cached features for ``--patches`` patches (goal: < 2 s for 10k on CPU)
   vs. ``wsimil predict`` on the same store (``predict_store``);
5. "Run" -> first heatmap without cached features (tissue, grid, encoder on the first chunk) vs. the full
   extraction of the slide (``extract_cohort``).

0. (``--scaling``) open-to-first-pixels and dask graph build time for slides of 16k, 50k and 100k px a side:
   open the file, build the layer's pyramid, add it to a viewer, reset the view and read the pixels of the
   first view, vs. ``openslide.OpenSlide`` + ``get_thumbnail`` of the same size (goal: under 1 s, and a graph
   build time that does not grow with the slide).

The slides are pyramidal JPEG TIFFs written tile by tile at run time (``write_pyramid_tiff_tiles``: bounded
memory, so 100k x 100k needs no 28 GiB array; about 2 GiB of disk and a few minutes to write on one core).

    .venv/bin/python benchmarks/bench_viewer.py [--size 16384] [--patches 10000] [--tiles 200]
    .venv/bin/python benchmarks/bench_viewer.py --scaling 16384,50000,100000 --skip-inference
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np


def make_slide(path: Path, size: int, seed: int = 0) -> Path:
    """A ``size`` x ``size`` pyramidal JPEG TIFF at 0.5 µm/px: pink textured tissue disc on white, drawn tile by
    tile at every level (bounded memory for any size)."""
    from wsimil_core.wsi.writer import write_pyramid_tiff_tiles

    rng = np.random.default_rng(seed)
    tex = (rng.integers(0, 60, size=(1024, 1024, 3), dtype=np.uint8) + np.array([180, 90, 150], np.uint8)).astype(
        np.uint8
    )

    def render(ds: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        ys = (np.arange(y, y + h) * ds)[:, None]
        xs = (np.arange(x, x + w) * ds)[None, :]
        block = tex[ys % 1024, xs % 1024]
        outside = (xs - size / 2) ** 2 + (ys - size / 2) ** 2 > (0.45 * size) ** 2
        block[outside] = 245
        return block

    levels = max(1, int(np.log2(size / 512)) + 1)
    return write_pyramid_tiff_tiles(path, size, size, render, 0.5, levels=levels, tile=256, quality=80)


def timeit(fn, repeat: int = 1) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def row(what: str, ours: float, base: float, unit: str = "s") -> None:
    ratio = ours / base if base > 0 else float("nan")
    print(f"{what:<46} {ours:>10.4f} {unit:<3} {base:>10.4f} {unit:<3} {ratio:>7.2f}x")


def scaling(sizes: list[int], tmp: Path) -> None:
    """Section 0: graph build time and open-to-first-pixels per slide size, vs. OpenSlide open + thumbnail."""
    import openslide
    from napari.components import ViewerModel

    from napari_wsimil._slide_layers import slide_layer_data
    from napari_wsimil._viewer import add_layers
    from wsimil_core.wsi.slide import open_slide

    warm = make_slide(tmp / "warm.tiff", 2048)  # napari's and dask's one-off start-up costs
    add_layers(ViewerModel(), [slide_layer_data(open_slide(warm))])
    for size in sizes:
        t0 = time.perf_counter()
        path = make_slide(tmp / f"scale_{size}.tiff", size)
        mib = path.stat().st_size / 2**20
        print(f"   wrote {size} x {size} ({mib:.0f} MiB) in {time.perf_counter() - t0:.0f} s")
        with open_slide(path) as slide:
            t_graph, pyramid = timeit(slide.dask_pyramid, repeat=3)
            chunks = sum(a.npartitions for a in pyramid)
        t_base, _ = timeit(lambda path=path: openslide.OpenSlide(str(path)), repeat=3)
        row(f"0a. {size // 1000}k: build dask pyramid ({chunks} chunks) / OpenSlide()", t_graph, t_base)

        def open_to_pixels(path: Path = path) -> tuple[int, tuple[int, ...]]:
            viewer = ViewerModel()
            (layer,) = add_layers(viewer, [slide_layer_data(open_slide(path))])
            viewer.reset_view()
            layer.refresh()
            level = layer.data_level
            np.asarray(layer.data[level])  # the pixels of the first (whole-slide) view
            return level, layer.data[level].shape

        t_ours, (level, shape) = timeit(open_to_pixels, repeat=3)

        def thumbnail(path: Path = path, shape: tuple[int, ...] = shape) -> None:
            osr = openslide.OpenSlide(str(path))
            osr.get_thumbnail((shape[1], shape[0]))

        t_base, _ = timeit(thumbnail, repeat=3)
        row(f"0b. {size // 1000}k: open -> first view (level {level}) / thumbnail", t_ours, t_base)
        print(f"    goal: open-to-first-pixels < 1 s -> {'met' if t_ours < 1 else 'NOT met'}")
        path.unlink()


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark in a temporary folder that is removed at the end (the slides are large)."""
    tmp = Path(tempfile.mkdtemp(prefix="bench_viewer_"))
    try:
        return run(tmp, argv)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(tmp: Path, argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=16384)
    ap.add_argument("--patches", type=int, default=10_000)
    ap.add_argument("--tiles", type=int, default=200)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--scaling", type=str, default="", help="comma-separated sizes for section 0, e.g. 16384,50000")
    ap.add_argument("--skip-inference", action="store_true", help="leave out sections 4 and 5")
    ap.add_argument("--only-scaling", action="store_true", help="run section 0 only")
    args = ap.parse_args(argv)

    import openslide
    from napari.components import ViewerModel

    from napari_wsimil._slide_layers import slide_layer_data
    from napari_wsimil._viewer import MapLayerSet, add_layers

    if args.scaling:
        print(f"{'':<46} {'ours':>14} {'baseline':>14} {'ratio':>8}")
        scaling([int(v) for v in args.scaling.split(",") if v.strip()], tmp)
        if args.only_scaling:
            return 0
    t0 = time.perf_counter()
    slide_path = make_slide(tmp / "big.tiff", args.size)
    print(f"generated {args.size} x {args.size} slide in {time.perf_counter() - t0:.1f} s: {slide_path}")
    print(f"{'':<46} {'ours':>14} {'baseline':>14} {'ratio':>8}")

    # 1. open: reader work (no pixels) and napari's first slicing when the layer is added
    from wsimil_core.wsi.slide import open_slide

    viewer = ViewerModel()
    t_ours, layer_data = timeit(lambda: slide_layer_data(open_slide(slide_path)), repeat=3)
    t_base, _ = timeit(lambda: openslide.OpenSlide(str(slide_path)), repeat=3)
    row("1a. open slide -> layer data / OpenSlide()", t_ours, t_base)
    warm = add_layers(viewer, [slide_layer_data(open_slide(slide_path))])  # napari's one-off start-up costs
    viewer.layers.remove(warm[0])
    t_add, (layer,) = timeit(lambda: add_layers(viewer, [layer_data]))
    osr = openslide.OpenSlide(str(slide_path))
    lowest = layer.data[-1].shape
    t_base, _ = timeit(lambda: osr.read_region((0, 0), osr.level_count - 1, (lowest[1], lowest[0])))
    row(f"1b. add layer (napari reads level {len(layer.data) - 1}) / read it", t_add, t_base)

    # 2. first view: the level and chunks napari asks for at reset_view
    def first_view():
        viewer.reset_view()
        layer.refresh()
        return layer.data_level

    t_ours, level = timeit(first_view)
    shape = layer.data[level].shape
    t_base, _ = timeit(lambda: osr.get_thumbnail((shape[1], shape[0])))
    row(f"2. first view (level {level}, {shape[1]}x{shape[0]}) / thumbnail", t_ours, t_base)

    # 3. level-0 regions of 1024 px (16 file tiles, what one zoomed-in view needs) through the layer's dask
    # array (cold cache) vs raw read_region of the same regions
    rng = np.random.default_rng(0)
    n_regions = max(1, args.tiles // 16)
    xs = rng.integers(0, max(1, args.size // 1024), n_regions) * 1024
    ys = rng.integers(0, max(1, args.size // 1024), n_regions) * 1024
    level0 = open_slide(slide_path).dask_pyramid()[0]  # a cold chunk cache, like a new view

    def ours_tiles():
        for x, y in zip(xs, ys):
            level0[y : y + 1024, x : x + 1024].compute()

    def base_tiles():
        for x, y in zip(xs, ys):
            np.asarray(osr.read_region((int(x), int(y)), 0, (1024, 1024)))

    t_ours, _ = timeit(ours_tiles)
    t_base, _ = timeit(base_tiles)
    per = 16 * n_regions
    row("3. ms per 256 px tile, 1024 px views", 1000 * t_ours / per, 1000 * t_base / per, "ms")

    if args.skip_inference:
        return 0

    # 4. cached features -> first heatmap (the store and checkpoint of bench_heatmaps.py, on this slide)
    from bench_heatmaps import make_checkpoint, make_store

    from wsimil_core.api import create_model
    from wsimil_core.engine.checkpoint import save_checkpoint
    from wsimil_core.inference.predict import predict_store

    n = args.patches
    enc = make_store(tmp / "store", slide_path, args.size, n, args.dim)
    ckpt, _ = make_checkpoint("abmil", args.dim, enc, tmp)

    from napari_wsimil._inference import InferenceRequest, run_inference

    def first_heatmap(request):
        maps_view = MapLayerSet(viewer, primary_only=True)  # as the dock
        for update in run_inference(request):
            if update.maps:
                maps_view.update(update.maps, update.geometry, update.coords)
                maps_view.remove()
                return update

    req = InferenceRequest(ckpt, slide_path, device="cpu", store=tmp / "store")
    t_ours, _ = timeit(lambda: first_heatmap(req))
    t_base, _ = timeit(lambda: predict_store(str(ckpt), tmp / "store", device="cpu", progress=False))
    row(f"4. Run -> first heatmap, cached ({n} patches)", t_ours, t_base)
    print(f"   goal: < 2 s for 10k patches on CPU -> {'met' if n >= 10_000 and t_ours < 2 else 'see above'}")

    # 5. no cached features: first chunk on the fly vs the full extraction
    from wsimil_core.features.encoders import RandomWeightsWarning, create_encoder
    from wsimil_core.features.extract import extract_cohort
    from wsimil_core.wsi.tiling import GridSpec, TissueParams

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        _, spec = create_encoder("resnet18")
    enc2 = spec.with_grid(4.0, 32).to_attrs()
    enc2.update(patch_mpp=4.0, patch_size=32, patch_size_level0=256, stride_level0=256)
    model2 = create_model("abmil", in_dim=spec.dim, n_classes=2)
    ckpt2 = tmp / "abmil_r18.safetensors"
    save_checkpoint(ckpt2, model2, {"method": "abmil", "encoder": enc2, "class_names": {"label": ["0", "1"]}})
    req2 = InferenceRequest(ckpt2, slide_path, device="cpu", store=None, chunk_size=32)
    t_ours, upd = timeit(lambda: first_heatmap(req2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t_base, _ = timeit(
            lambda: extract_cohort(
                [slide_path],
                tmp / "store2",
                "resnet18",
                GridSpec(mpp=4.0, patch=32),
                TissueParams(),
                device="cpu",
                num_workers=0,
                progress=False,
            )
        )
    row(f"5. first heatmap on the fly ({upd.done}/{upd.total}) / extract", t_ours, t_base)
    return 0


if __name__ == "__main__":
    sys.exit(main())
