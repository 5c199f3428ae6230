"""Random 256x256 tile reads: our dask pyramid vs. raw ``openslide.read_region`` on the same tiles.

Generates a pyramidal JPEG TIFF (a few thousand pixels per side) at run time, then reads the same random
tiles (a) aligned on the file's 256-px tile grid and (b) at random offsets, through:

* baseline: ``openslide.OpenSlide.read_region`` (+ ``np.asarray``, RGBA);
* ours: ``Slide.dask_pyramid()[0][y:y+256, x:x+256].compute()`` for the OpenSlide and tifffile backends,
  and ``Slide.read_region`` (RGB composited on white).

Prints mean ms per tile side by side with the ratio ours / baseline (goal: within 1.25x).

    .venv/bin/python benchmarks/bench_tile_reads.py [--size 4096] [--n 1000] [--seed 0]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def make_image(size: int, seed: int) -> np.ndarray:
    """JPEG-friendly pseudo-tissue ``[size, size, 3]`` uint8: a noisy 1024-px texture tiled with random shifts."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:1024, 0:1024].astype(np.float32)
    base = np.sin(xx / 37.0) * np.cos(yy / 29.0) + 0.3 * np.sin((xx + yy) / 11.0)
    tex = np.stack([200 - 40 * base, 120 + 30 * base, 170 + 20 * base], axis=-1)
    tex = np.clip(tex + rng.normal(0, 6, tex.shape), 0, 255).astype(np.uint8)
    reps = -(-size // 1024)
    rows = [
        np.concatenate([np.roll(tex, int(rng.integers(0, 1024)), axis=1) for _ in range(reps)], 1) for _ in range(reps)
    ]
    return np.ascontiguousarray(np.concatenate(rows, 0)[:size, :size])


def timed_pair(ours, base, locations) -> tuple[float, float]:
    """Mean seconds per call of ``ours(x, y)`` and ``base(x, y)``, interleaved location by location.

    Interleaving (alternating which goes first) exposes both readers to the same machine load and cache state.
    One warm-up pass over the first 20 locations is not timed.
    """
    for x, y in locations[:20]:
        ours(x, y)
        base(x, y)
    t_ours = t_base = 0.0
    for k, (x, y) in enumerate(locations):
        pair = ((ours, True), (base, False)) if k % 2 == 0 else ((base, False), (ours, True))
        for fn, is_ours in pair:
            t0 = time.perf_counter()
            fn(x, y)
            dt = time.perf_counter() - t0
            if is_ours:
                t_ours += dt
            else:
                t_base += dt
    return t_ours / len(locations), t_base / len(locations)


def batched(pyramid, locations, batch: int):
    """A reader of ``batch`` tiles per ``dask.compute`` call (how a viewer or a loader asks for many tiles)."""
    import dask

    def read(x, y):
        i = locations.index((x, y)) if (x, y) in locations else 0
        group = [locations[(i + k) % len(locations)] for k in range(batch)]
        return dask.compute(*[pyramid[b : b + 256, a : a + 256] for a, b in group], scheduler="synchronous")

    return read


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096, help="level-0 side in pixels")
    ap.add_argument("--n", type=int, default=1000, help="tiles per measurement")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import openslide

    from wsimil_core.wsi.slide import open_slide
    from wsimil_core.wsi.writer import write_pyramid_tiff

    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.tif"
        t0 = time.perf_counter()
        write_pyramid_tiff(path, make_image(args.size, args.seed), 0.5, levels=4, tile=256)
        print(
            f"wrote {args.size}x{args.size} pyramid ({path.stat().st_size / 1e6:.1f} MB) "
            f"in {time.perf_counter() - t0:.1f} s; {args.n} reads per row\n"
        )
        n_tiles = args.size // 256
        aligned = [(int(i) * 256, int(j) * 256) for i, j in rng.integers(0, n_tiles, (args.n, 2))]
        free = [(int(x), int(y)) for x, y in rng.integers(0, args.size - 256, (args.n, 2))]

        raw = openslide.OpenSlide(str(path))
        ours_os = open_slide(path, backend="openslide")
        ours_tf = open_slide(path, backend="tifffile")
        pyr_os = ours_os.dask_pyramid()[0]
        pyr_tf = ours_tf.dask_pyramid()[0]

        readers = {
            "dask pyramid (openslide backend)": lambda x, y: pyr_os[y : y + 256, x : x + 256].compute(
                scheduler="synchronous"
            ),
            "dask pyramid (tifffile backend)": lambda x, y: pyr_tf[y : y + 256, x : x + 256].compute(
                scheduler="synchronous"
            ),
            "Slide.read_region (openslide)": lambda x, y: ours_os.read_region((x, y), 0, (256, 256)),
            "Slide.read_region (tifffile)": lambda x, y: ours_tf.read_region((x, y), 0, (256, 256)),
        }
        baseline = lambda x, y: np.asarray(raw.read_region((x, y), 0, (256, 256)))  # noqa: E731

        print(f"{'tiles':<9} {'reader':<40} {'ours ms':>8} {'openslide ms':>13} {'ratio':>7}")
        for label, locs in (("aligned", aligned), ("random", free)):
            for name, fn in readers.items():
                ours, base = timed_pair(fn, baseline, locs)
                flag = "ok" if ours / base <= 1.25 else "SLOW"
                print(f"{label:<9} {name:<40} {ours * 1e3:8.3f} {base * 1e3:13.3f} {ours / base:6.2f}x {flag}")
            # Many tiles per compute amortise dask's fixed per-compute scheduling cost.
            batch = 16
            sub = locs[: max(batch, len(locs) // 4)]
            read16 = batched(pyr_os, sub, batch)
            base16 = lambda x, y, sub=sub, batch=batch: [baseline(a, b) for a, b in sub[:batch]]  # noqa: E731
            ours, base = timed_pair(read16, base16, sub[::batch])
            name = f"dask pyramid, {batch} tiles/compute (per tile)"
            flag = "ok" if ours / base <= 1.25 else "SLOW"
            print(
                f"{label:<9} {name:<40} {ours / batch * 1e3:8.3f} {base / batch * 1e3:13.3f} {ours / base:6.2f}x {flag}"
            )
        raw.close()
        ours_os.close()
        ours_tf.close()


if __name__ == "__main__":
    main()
