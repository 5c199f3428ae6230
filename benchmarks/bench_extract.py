"""Feature-extraction throughput vs. the encoder's pure compute rate on the same patches (issue 15 goal 5).

One run prints, side by side (patches/s, median of ``--trials`` interleaved trials, ratio to ``pure``):

* ``pure``: the encoder's forward alone on the same patches, already read, decoded and normalised into float
  tensors in memory, in the same batches (per slide, as extraction batches them), at the torch threads named;
* ``per-slide``: the previous ``extract_cohort`` driver, one DataLoader per slide (``slide_step.extract_slide`` in a
  loop: its workers start, and its first batch is read with nothing to overlap, once per slide);
* ``extract_cohort``: today's driver (tissue, grid, encoding, float16, the zarr group writes into a fresh store):
  one DataLoader for the whole cohort (``features.stream``);
* with ``--more``: ``encode_slide_patches`` alone and the old ``workers-norm`` candidate (patch-by-patch
  normalisation in the workers, stacked into a contiguous batch: it loses the channels-last strides the forward is
  faster on, see docs/benchmarks.md); with ``--naive``: read -> transform -> encode one patch at a time.

Thread counts: ``policy`` is what ``extract_cohort`` sets (``devices.apply_thread_policy(workers)``: cores minus
DataLoader workers, at least 1); ``all cores`` gives the forward every core while the reader(s) run beside it
(what ``OMP_NUM_THREADS=<cores> wsimil extract`` does: a count the user sets wins over the policy). ``/ pure``
divides by ``pure`` at the same thread count, ``/ best`` by the faster ``pure``. ``--compete`` runs a busy process
(one core of pure Python) during the trials. ``--slides K`` makes a cohort of K slides of ``--patches`` patches
each (small slides such as biopsies); ``--stages`` adds a serial per-stage table of the first slide; ``--devices
cpu,cuda`` prints one table per device. Nothing is asserted.

    PYTHONPATH=src python benchmarks/bench_extract.py --patches 512 --trials 3
    PYTHONPATH=src python benchmarks/bench_extract.py --patches 64 --slides 8 --trials 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings
from functools import partial
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


def run_extract(paths, store_dir, model, spec, grid, tissue, batch_size, workers) -> tuple[float, int]:
    """Today's ``extract_cohort`` (one DataLoader for the cohort) into a fresh store."""
    from wsimil_core.features.extract import extract_cohort

    t0 = time.perf_counter()
    summary = extract_cohort(
        paths,
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


def run_per_slide(paths, store_dir, model, spec, grid, tissue, batch_size, workers) -> tuple[float, int]:
    """The previous driver: ``extract_slide`` (one DataLoader each) slide after slide, into a fresh store."""
    from wsimil_core.devices import apply_thread_policy
    from wsimil_core.features.slide_step import extract_slide
    from wsimil_core.store.zarr_store import FeatureStore

    t0 = time.perf_counter()
    fs = FeatureStore(store_dir, create=True)
    apply_thread_policy(workers)
    n = 0
    for path in paths:
        n += extract_slide(
            path,
            path.stem,
            fs,
            model,
            spec,
            grid,
            tissue,
            dtype="float16",
            slide_mpp=None,
            backend="auto",
            amp=True,
            batch_size=batch_size,
            num_workers=workers,
            progress=False,
        )
    return time.perf_counter() - t0, n


def busy_process():
    """A competing process: one core of pure-Python work until terminated."""
    import multiprocessing

    def spin() -> None:
        x = 0
        while True:
            x = (x * 31 + 7) % 1000003

    proc = multiprocessing.get_context("fork").Process(target=spin, daemon=True)
    proc.start()
    return proc


@torch.inference_mode()
def run_naive(path, coords, size0, patch, model, spec) -> float:
    """Open the slide, then read -> transform -> encode one patch at a time (batch of 1, float32)."""
    from wsimil_core.features.encoders import encoder_transform, module_device
    from wsimil_core.wsi.slide import open_slide

    transform = encoder_transform(spec)
    t0 = time.perf_counter()
    with open_slide(path) as slide:
        for x, y in coords:
            img = slide.read_patch(int(x), int(y), size0, patch)
            model(transform(img)[None].to(module_device(model))).cpu()
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


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"CUDA {torch.cuda.get_device_name(device)}"
    return device.type.upper()


def set_threads(count: int) -> None:
    """Torch's intra-op threads for the next column (``apply_thread_policy`` keeps a count set this way)."""
    torch.set_num_threads(count)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patches", type=int, default=512, help="patches per slide (a square grid of tissue)")
    ap.add_argument("--slides", type=int, default=1, help="slides in the cohort (each with --patches patches)")
    ap.add_argument("--patch", type=int, default=224, help="patch side in px (read at level 0, mpp 0.5)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=1, help="DataLoader reader processes")
    ap.add_argument("--encoder", default="resnet18")
    ap.add_argument("--trials", type=int, default=3, help="interleaved trials; medians are printed")
    ap.add_argument("--compete", action="store_true", help="a busy process (one core) runs during the trials")
    ap.add_argument("--no-all-cores", action="store_true", help="skip the columns with the forward on all cores")
    ap.add_argument("--more", action="store_true", help="also encode_slide_patches and the workers-norm candidate")
    ap.add_argument("--naive", action="store_true", help="also time the one-patch-at-a-time loop")
    ap.add_argument("--stages", action="store_true", help="also the serial per-stage table of the first slide (CPU)")
    ap.add_argument("--devices", default="cpu", help="comma-separated torch devices, one table each (cpu,cuda)")
    args = ap.parse_args()
    if os.environ.get("OMP_NUM_THREADS") or os.environ.get("MKL_NUM_THREADS"):
        ap.error("unset OMP_NUM_THREADS / MKL_NUM_THREADS: this bench sets torch's threads per column")

    from wsimil_core.devices import policy_thread_count
    from wsimil_core.features.encoders import RandomWeightsWarning, create_encoder
    from wsimil_core.store.zarr_store import FeatureStore
    from wsimil_core.wsi.tiling import GridSpec, TissueParams

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        model, spec = create_encoder(args.encoder, device="cpu")
    policy = policy_thread_count(args.workers)
    per_row = int(np.ceil(np.sqrt(args.patches)))
    side = per_row * args.patch
    grid = GridSpec(mpp=0.5, patch=args.patch, min_tissue=0.0)
    tissue = TissueParams()
    bs = args.batch_size
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        paths = [make_slide(tmp / f"bench{k}.tif", side, seed=k) for k in range(args.slides)]
        # the patches extraction keeps (tissue detection decides): every other column encodes exactly these
        set_threads(policy)
        _, n = run_extract(paths, tmp / "warm", model, spec, grid, tissue, bs, 0)
        warm = FeatureStore(tmp / "warm")
        coords = {p: warm.read_coords(p.stem) for p in paths}
        imgs = [read_all(p, coords[p], args.patch, args.patch) for p in paths]
        for name in args.devices.split(","):
            device = torch.device(name.strip())
            model.to(device)
            table(args, device, model, spec, paths, coords, imgs, n, tmp / name.strip(), grid, tissue)


def table(args, device, model, spec, paths, coords, imgs, n, tmp, grid, tissue) -> None:
    """The trials on one device and their table."""
    from wsimil_core.devices import available_cores, policy_thread_count
    from wsimil_core.features.encoders import preprocess_batch

    bs = args.batch_size
    cores = available_cores()
    policy = policy_thread_count(args.workers)
    on_cpu = device.type == "cpu"
    all_cores = on_cpu and not args.no_all_cores and cores != policy
    thread_counts = {"policy": policy, "all": cores} if all_cores else {"policy": policy}
    batches = [preprocess_batch(spec, im[i : i + bs], device) for im in imgs for i in range(0, len(im), bs)]
    tmp.mkdir(parents=True, exist_ok=True)
    first = paths[0]
    print(
        f"encoder {args.encoder}, {len(paths)} slide(s) x {len(coords[first])} patches = {n} patches of "
        f"{args.patch} px, batch {bs}, {args.workers} DataLoader worker(s), {cores} cores, torch threads: "
        f"policy {policy}" + (f", all cores {cores}" if "all" in thread_counts else "") + ", "
        f"{'a competing busy process, ' if args.compete else ''}load average {os.getloadavg()[0]:.1f} at start, "
        f"torch {torch.__version__}, {device_name(device)}; median of {args.trials} interleaved trials"
    )
    competitor = busy_process() if args.compete else None
    times: dict[str, list[float]] = {}

    def timed(key: str, threads: int, fn) -> None:
        set_threads(threads)
        result = fn()
        sec, n_done = result if isinstance(result, tuple) else (result, n)
        assert n_done == n, (key, n_done, n)
        times.setdefault(key, []).append(sec)

    try:
        for trial in range(args.trials):
            for tname, th in thread_counts.items():
                timed(f"pure@{tname}", th, lambda: run_pure(batches, model))
                timed(
                    f"per-slide@{tname}",
                    th,
                    partial(
                        run_per_slide, paths, tmp / f"p{trial}{tname}", model, spec, grid, tissue, bs, args.workers
                    ),
                )
                timed(
                    f"extract@{tname}",
                    th,
                    partial(run_extract, paths, tmp / f"e{trial}{tname}", model, spec, grid, tissue, bs, args.workers),
                )
            if args.more:
                timed(
                    "encode@policy",
                    policy,
                    lambda: sum(
                        run_encode(p, coords[p], args.patch, args.patch, model, spec, bs, args.workers) for p in paths
                    ),
                )
                timed(
                    "workers-norm@policy",
                    policy,
                    lambda: sum(
                        run_workers_norm(p, coords[p], args.patch, args.patch, model, spec, bs, args.workers)
                        for p in paths
                    ),
                )
            if args.naive:
                timed(
                    "naive@policy",
                    policy,
                    lambda: sum(run_naive(p, coords[p], args.patch, args.patch, model, spec) for p in paths),
                )
    finally:
        if competitor is not None:
            competitor.terminate()
            competitor.join()
    set_threads(policy)

    def rate(key: str) -> float:
        return n / statistics.median(times[key])

    labels = {
        "pure": "pure encoder compute (tensors in memory)",
        "per-slide": "before: one DataLoader per slide",
        "extract": "extract_cohort: one DataLoader per run",
        "encode": "encode_slide_patches (DataLoader)",
        "workers-norm": "candidate: normalised in the workers",
        "naive": "naive (1 patch at a time, no workers)",
    }
    print(f"{'path':<42} {'threads':>7} {'patches/s':>10} {'/ pure':>7} {'/ best':>7}   trials (s)")
    best = max(rate(f"pure@{t}") for t in thread_counts)
    for key, label in labels.items():
        for tname, th in {**thread_counts, "policy": policy}.items():
            k = f"{key}@{tname}"
            if k not in times:
                continue
            r = rate(k)
            trials = " ".join(f"{v:.2f}" for v in times[k])
            print(f"{label:<42} {th:>7} {r:>10.1f} {r / rate(f'pure@{tname}'):>6.2f}x {r / best:>6.2f}x   {trials}")
    print(f"goal extract/pure >= 0.9 (same threads): {rate('extract@policy') / rate('pure@policy'):.2f} at policy")
    if "all" in thread_counts:
        print(
            f"  {rate('extract@all') / rate('pure@all'):.2f} with the forward on all cores; "
            f"extract@all / pure@policy = {rate('extract@all') / rate('pure@policy'):.2f}"
        )
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    if args.stages and on_cpu:
        print("\nstages of the first slide, serial in this process (what the workers must hide):")
        m = len(coords[first])
        for name, sec in stages(
            first, tmp / "stages", coords[first], args.patch, args.patch, model, spec, grid, tissue, bs
        ).items():
            print(f"  {name:<44} {sec:8.3f} s  ({1000 * sec / m:7.2f} ms/patch)")


if __name__ == "__main__":
    main()
