"""Feature-extraction throughput vs. the encoder's pure compute rate on the same patches (issue 15 goal 5).

One run prints, side by side (patches/s, median of ``--trials`` interleaved trials):

* ``pure``: the encoder's forward alone on the same patches, already read, decoded and normalised into float
  tensors in memory, same batch size and the same torch threads;
* ``encode``: ``features.patches.encode_slide_patches`` (DataLoader workers read and decode the patches, the
  main process normalises each batch and runs the encoder);
* ``workers-norm``: the same loop with the normalisation moved into the workers (a candidate fix that was
  measured and not adopted: see docs/benchmarks.md);
* ``extract``: the whole ``extract_cohort`` (tissue detection, grid, encoding, float16 conversion, the zarr
  group write) into a fresh store each trial;
* ``naive`` (``--naive``): open the slide, read -> transform -> encode one patch at a time.

and the ratios to ``pure`` (goal: ``extract / pure >= 0.9``). A second table splits one serial pass of the
extraction into its stages (tissue + grid, read + decode, preprocessing, forward, float16, store write), each
timed alone in this process, which shows what the DataLoader workers must hide.

The torch thread count is the one ``extract_cohort`` sets (``devices.apply_thread_policy``: cores minus
DataLoader workers, at least 1) for every column. Nothing is asserted.

    PYTHONPATH=src python benchmarks/bench_extract.py --patches 128 --workers 1 --trials 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch


def make_slide(path: Path, side: int, seed: int = 0) -> Path:
    """A textured RGB slide (tissue-like noise everywhere), 3 levels, mpp 0.5, JPEG tiles of 256 px."""
    from wsimil_core.wsi.writer import write_pyramid_tiff

    rng = np.random.default_rng(seed)
    small = rng.integers(60, 230, size=(side // 8, side // 8, 3), dtype=np.uint8)
    small[..., 1] //= 2  # pink-ish: saturated enough for the tissue detector everywhere
    rgb = np.repeat(np.repeat(small, 8, axis=0), 8, axis=1)
    noise = rng.integers(-20, 20, size=rgb.shape)
    rgb = np.clip(rgb.astype(np.int16) + noise, 0, 255).astype(np.uint8)
    return write_pyramid_tiff(path, rgb, mpp=0.5, levels=3, tile=256)


def read_all(path: Path, coords: np.ndarray, size0: int, patch: int) -> np.ndarray:
    """uint8 ``[N, patch, patch, 3]`` of every patch, read in this process."""
    from wsimil_core.wsi.slide import open_slide

    with open_slide(path) as slide:
        return np.stack([slide.read_patch(int(x), int(y), size0, patch) for x, y in coords])


@torch.inference_mode()
def run_pure(batches: list[torch.Tensor], model) -> float:
    """The encoder forward alone on normalised float batches already in memory."""
    from wsimil_core.features.encoders import encode_tensor

    t0 = time.perf_counter()
    for x in batches:
        encode_tensor(model, x).float().cpu().numpy()
    return time.perf_counter() - t0


def run_encode(path, coords, size0, patch, model, spec, batch_size, workers) -> float:
    from wsimil_core.features.patches import encode_slide_patches

    t0 = time.perf_counter()
    encode_slide_patches(
        path, coords, size0, patch, model, spec, batch_size=batch_size, num_workers=workers, progress=False
    )
    return time.perf_counter() - t0


class NormalisingPatches(torch.utils.data.Dataset):
    """``PatchDataset`` whose items are already normalised for the encoder (float ``[3, S, S]``)."""

    def __init__(self, path, coords, size0, patch, spec):
        from wsimil_core.features.patches import PatchDataset

        self.inner, self.spec = PatchDataset(path, coords, size0, patch), spec

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int) -> torch.Tensor:
        from wsimil_core.features.encoders import preprocess_batch

        with torch.no_grad():
            return preprocess_batch(self.spec, self.inner[i].numpy()[None])[0]


@torch.inference_mode()
def run_workers_norm(path, coords, size0, patch, model, spec, batch_size, workers) -> float:
    """The ``encode_slide_patches`` loop with the normalisation done by the DataLoader workers."""
    from wsimil_core.devices import single_thread_worker
    from wsimil_core.features.encoders import encode_tensor

    t0 = time.perf_counter()
    loader = torch.utils.data.DataLoader(
        NormalisingPatches(path, coords, size0, patch, spec),
        batch_size=batch_size,
        num_workers=workers,
        worker_init_fn=single_thread_worker if workers else None,
    )
    for batch in loader:
        encode_tensor(model, batch).float().cpu().numpy()
    return time.perf_counter() - t0


def run_extract(path, store_dir, model, spec, grid, tissue, batch_size, workers) -> tuple[float, int]:
    from wsimil_core.features.extract import extract_cohort

    t0 = time.perf_counter()
    summary = extract_cohort(
        [path],
        store_dir,
        "unused",
        grid,
        tissue,
        encoder=(model, spec),
        batch_size=batch_size,
        num_workers=workers,
        progress=False,
    )
    return time.perf_counter() - t0, summary.n_patches


@torch.inference_mode()
def run_naive(path, coords, size0, patch, model, spec) -> float:
    """Open the slide, then read -> transform -> encode one patch at a time (batch of 1, float32)."""
    from wsimil_core.features.encoders import encoder_transform
    from wsimil_core.wsi.slide import open_slide

    transform = encoder_transform(spec)
    t0 = time.perf_counter()
    with open_slide(path) as slide:
        for x, y in coords:
            img = slide.read_patch(int(x), int(y), size0, patch)
            model(transform(img)[None]).cpu()
    return time.perf_counter() - t0


@torch.inference_mode()
def stages(path, store_dir, coords, size0, patch, model, spec, grid, tissue, batch_size) -> dict[str, float]:
    """Seconds of each stage of one slide's extraction, run serially in this process."""
    from wsimil_core.features.encoders import encode_tensor, preprocess_batch
    from wsimil_core.features.slide_step import to_store_dtype
    from wsimil_core.store.zarr_store import FeatureStore
    from wsimil_core.wsi.slide import open_slide
    from wsimil_core.wsi.tiling import detect_tissue, make_grid

    out: dict[str, float] = {}
    t = time.perf_counter()
    with open_slide(path) as slide:
        make_grid(slide, detect_tissue(slide, tissue), grid)
    out["tissue + grid"] = time.perf_counter() - t
    t = time.perf_counter()
    imgs = read_all(path, coords, size0, patch)
    out["read + decode patches"] = time.perf_counter() - t
    t = time.perf_counter()
    xs = [preprocess_batch(spec, imgs[i : i + batch_size]) for i in range(0, len(imgs), batch_size)]
    out["preprocess (uint8 -> normalised float)"] = time.perf_counter() - t
    t = time.perf_counter()
    feats = np.concatenate([encode_tensor(model, x).float().numpy() for x in xs])
    out["encoder forward"] = time.perf_counter() - t
    t = time.perf_counter()
    f16 = to_store_dtype(feats, "float16", str(path))
    out["float16 conversion"] = time.perf_counter() - t
    t = time.perf_counter()
    FeatureStore(store_dir, create=True).write_bag("s", f16, coords, spec.encoder_id, encoder_attrs=spec.to_attrs())
    out["zarr group write"] = time.perf_counter() - t
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patches", type=int, default=128, help="patches per slide (a square grid of tissue)")
    ap.add_argument("--patch", type=int, default=224, help="patch side in px (read at level 0, mpp 0.5)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=1, help="DataLoader reader processes")
    ap.add_argument("--encoder", default="resnet18")
    ap.add_argument("--trials", type=int, default=3, help="interleaved trials; medians are printed")
    ap.add_argument("--naive", action="store_true", help="also time the one-patch-at-a-time loop")
    args = ap.parse_args()

    from wsimil_core.devices import apply_thread_policy, available_cores
    from wsimil_core.features.encoders import RandomWeightsWarning, create_encoder, preprocess_batch
    from wsimil_core.store.zarr_store import FeatureStore
    from wsimil_core.wsi.tiling import GridSpec, TissueParams

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        model, spec = create_encoder(args.encoder, device="cpu")
    threads = apply_thread_policy(args.workers)
    per_row = int(np.ceil(np.sqrt(args.patches)))
    side = per_row * args.patch
    grid = GridSpec(mpp=0.5, patch=args.patch, min_tissue=0.0)
    tissue = TissueParams()
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        path = make_slide(tmp / "bench.tif", side)
        # the patches extraction keeps (tissue detection decides): every other column encodes exactly these
        _, n = run_extract(path, tmp / "warm", model, spec, grid, tissue, args.batch_size, 0)
        coords = FeatureStore(tmp / "warm").read_coords("bench")
        imgs = read_all(path, coords, args.patch, args.patch)
        batches = [preprocess_batch(spec, imgs[i : i + args.batch_size]) for i in range(0, n, args.batch_size)]
        print(
            f"encoder {args.encoder}, {n} patches of {args.patch} px, batch {args.batch_size}, "
            f"{args.workers} DataLoader worker(s), torch threads {threads} (policy), {available_cores()} cores, "
            f"load average {os.getloadavg()[0]:.1f} at start, torch {torch.__version__}, CPU; "
            f"median of {args.trials} interleaved trials"
        )
        times: dict[str, list[float]] = {"pure": [], "encode": [], "workers-norm": [], "extract": [], "naive": []}
        for trial in range(args.trials):
            times["pure"].append(run_pure(batches, model))
            times["workers-norm"].append(
                run_workers_norm(path, coords, args.patch, args.patch, model, spec, args.batch_size, args.workers)
            )
            times["encode"].append(
                run_encode(path, coords, args.patch, args.patch, model, spec, args.batch_size, args.workers)
            )
            t, n_done = run_extract(path, tmp / f"s{trial}", model, spec, grid, tissue, args.batch_size, args.workers)
            assert n_done == n, (n_done, n)
            times["extract"].append(t)
            if args.naive:
                times["naive"].append(run_naive(path, coords, args.patch, args.patch, model, spec))
        pure = n / statistics.median(times["pure"])
        print(f"{'path':<46} {'patches/s':>10} {'/ pure':>8}   trials (s)")
        labels = {
            "pure": "pure encoder compute (tensors in memory)",
            "encode": "encode_slide_patches (DataLoader)",
            "workers-norm": "candidate: normalised in the workers",
            "extract": "extract_cohort (tissue, grid, write)",
            "naive": "naive (1 patch at a time, no workers)",
        }
        for key, label in labels.items():
            if not times[key]:
                continue
            rate = n / statistics.median(times[key])
            trials = " ".join(f"{v:.2f}" for v in times[key])
            print(f"{label:<46} {rate:>10.1f} {rate / pure:>7.2f}x   {trials}")
        print(f"goal extract/pure >= 0.9: {n / statistics.median(times['extract']) / pure:.2f}")
        print(f"load average {os.getloadavg()[0]:.1f} at the end")
        print("\nstages of one slide, serial in this process (what the workers must hide):")
        for name, sec in stages(
            path, tmp / "stages", coords, args.patch, args.patch, model, spec, grid, tissue, args.batch_size
        ).items():
            print(f"  {name:<44} {sec:8.3f} s  ({1000 * sec / n:7.2f} ms/patch)")


if __name__ == "__main__":
    main()
