"""Feature-extraction throughput: our batched DataLoader pipeline vs a naive one-patch-at-a-time loop.

Both encode the same patches of the same synthetic pyramidal TIFF with the same encoder (random init; the
weights do not change the speed). Prints patches/s for each and the ratio, on the CPU and, when available, on
CUDA. Nothing is asserted: this is a measurement to read.

    .venv/bin/python benchmarks/bench_extract.py --patches 256 --patch 224 --workers 2
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch


def make_slide(path: Path, side: int, seed: int = 0) -> Path:
    """A textured RGB slide (tissue-like noise), 3 levels, mpp 0.5."""
    from wsimil_core.wsi.writer import write_pyramid_tiff

    rng = np.random.default_rng(seed)
    small = rng.integers(60, 230, size=(side // 8, side // 8, 3), dtype=np.uint8)
    rgb = np.repeat(np.repeat(small, 8, axis=0), 8, axis=1)
    noise = rng.integers(-20, 20, size=rgb.shape)
    rgb = np.clip(rgb.astype(np.int16) + noise, 0, 255).astype(np.uint8)
    return write_pyramid_tiff(path, rgb, mpp=0.5, levels=3, tile=256)


def grid_coords(side: int, size0: int, n: int) -> np.ndarray:
    """Up to ``n`` level-0 (x, y) corners on a regular grid (row-major)."""
    per_row = side // size0
    idx = np.arange(min(n, per_row * per_row))
    return np.stack([(idx % per_row) * size0, (idx // per_row) * size0], axis=1).astype(np.int64)


def run_ours(path, coords, size0, patch, model, spec, batch_size, workers) -> float:
    from wsimil_core.features.extract import encode_slide_patches

    if model.parameters().__next__().device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    encode_slide_patches(
        path, coords, size0, patch, model, spec, batch_size=batch_size, num_workers=workers, progress=False
    )
    if model.parameters().__next__().device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


@torch.inference_mode()
def run_naive(path, coords, size0, patch, model, spec) -> float:
    """Open the slide, then read -> transform -> encode one patch at a time (batch of 1, float32)."""
    from wsimil_core.features.encoders import encoder_transform
    from wsimil_core.wsi.slide import open_slide

    device = next(model.parameters()).device
    transform = encoder_transform(spec)
    t0 = time.perf_counter()
    with open_slide(path) as slide:
        for x, y in coords:
            img = slide.read_patch(int(x), int(y), size0, patch)
            model(transform(img)[None].to(device)).cpu()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patches", type=int, default=128, help="patches encoded per pipeline")
    ap.add_argument("--patch", type=int, default=224, help="patch side in px (read at level 0, mpp 0.5)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--encoder", default="resnet18")
    ap.add_argument("--devices", default="auto", help="comma list: cpu,cuda; auto = cpu (+ cuda when present)")
    args = ap.parse_args()

    from wsimil_core.features.encoders import RandomWeightsWarning, create_encoder

    devices = (
        ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        if args.devices == "auto"
        else [d.strip() for d in args.devices.split(",")]
    )
    side = int(np.ceil(np.sqrt(args.patches))) * args.patch
    with tempfile.TemporaryDirectory() as tmp:
        path = make_slide(Path(tmp) / "bench.tif", side)
        coords = grid_coords(side, args.patch, args.patches)
        n = len(coords)
        print(
            f"encoder {args.encoder}, {n} patches of {args.patch} px, batch {args.batch_size}, "
            f"{args.workers} workers, torch threads {torch.get_num_threads()}"
        )
        print(f"{'device':8s} {'ours (patches/s)':>18s} {'naive (patches/s)':>18s} {'ratio':>7s}")
        for dev in devices:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RandomWeightsWarning)
                model, spec = create_encoder(args.encoder, device=dev)
            # warm-up (cuDNN autotune, first-call allocations) on a few patches, both paths
            run_ours(path, coords[:8], args.patch, args.patch, model, spec, args.batch_size, 0)
            run_naive(path, coords[:4], args.patch, args.patch, model, spec)
            t_ours = run_ours(path, coords, args.patch, args.patch, model, spec, args.batch_size, args.workers)
            t_naive = run_naive(path, coords, args.patch, args.patch, model, spec)
            ours, naive = n / t_ours, n / t_naive
            label = torch.cuda.get_device_name() if dev.startswith("cuda") else "cpu"
            print(f"{dev:8s} {ours:18.1f} {naive:18.1f} {ours / naive:6.2f}x   ({label})")


if __name__ == "__main__":
    main()
