"""The Python pieces of ``benchmarks/gpu_check.sh`` (issue 15 goal 7); each prints its figures and exits 0 on
success, non-zero on failure. They run on the CPU too (``--device cpu``, small sizes) so the script is checked
without a GPU.

    python benchmarks/gpu_check.py amp --device cuda           # every method, bf16 + fp16, a few steps each
    python benchmarks/gpu_check.py e2e --device cuda           # ABMILX end to end, MRIS at 512 instances
    python benchmarks/gpu_check.py ddp-setup OUT_DIR           # cohort + config for `torchrun ... train`
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _cohort(root: Path, bags: int, dim: int) -> tuple[Path, Path, Path]:
    from bench_engine import make_cohort

    return make_cohort(root, bags, dim)


def _peak(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return f"{torch.cuda.max_memory_allocated() / 2**20:.0f} MiB"
    return "-"


def amp(args: argparse.Namespace) -> int:
    """Every registered method for ``--bags`` optimiser steps (one epoch, no validation) per AMP dtype."""
    import torch

    from wsimil_core.engine.trainer import train
    from wsimil_core.methods import list_methods

    failures = 0
    with tempfile.TemporaryDirectory(prefix="gpu_amp_") as tmp:
        root = Path(tmp)
        store, labels, omics = _cohort(root, args.bags, args.dim)
        (root / "slides").mkdir()
        slide_store, slide_labels = slide_cohort(root / "slides", 1024, 128, max(4, args.bags), dim=args.dim)
        print(f"AMP training, {args.bags} bags x {args.dim} dims, 1 epoch per phase, device {args.device}")
        print(f"{'method':<14} | {'amp':<5} | {'s':>6} | {'last loss':>9} | peak memory")
        for method in args.methods or list_methods():
            for dtype in args.amp:
                data = {"store": str(store), "labels": str(labels), "split": {"kind": "random", "val_frac": 0.0}}
                if method == "ahdmil":  # reads low-resolution patches from the slide files
                    data.update(store=str(slide_store), labels=str(slide_labels))
                if method == "momkd":
                    data["omics"] = str(omics)
                cfg = {
                    "method": method,
                    "data": data,
                    "train": {"epochs": 1, "lr": 1e-4, "device": args.device, "amp": dtype, "grad_clip": 5.0},
                    "output": {"dir": str(root / f"{method}_{dtype}"), "progress": False},
                }
                if args.device.startswith("cuda"):
                    torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                try:
                    result = train(cfg)
                    loss = float(result.history[-1]["train/loss"])
                    ok = math.isfinite(loss)
                except Exception as exc:  # report and go on: one line per failing method
                    print(f"{method:<14} | {dtype:<5} | FAILED: {type(exc).__name__}: {exc}")
                    failures += 1
                    continue
                failures += not ok
                print(
                    f"{method:<14} | {dtype:<5} | {time.perf_counter() - t0:>6.2f} | {loss:>9.4f} | {_peak(args.device)}"
                    + ("" if ok else "  NON-FINITE")
                )
    return 1 if failures else 0


def slide_cohort(root: Path, side: int, patch: int, n_slides: int, dim: int = 256) -> tuple[Path, Path]:
    """``n_slides`` copies of one textured ``side`` x ``side`` TIFF (mpp 0.5) in a store with a full patch grid."""
    import shutil

    import numpy as np
    import pandas as pd

    from wsimil_core.store.zarr_store import FeatureStore
    from wsimil_core.wsi.writer import write_pyramid_tiff

    rng = np.random.default_rng(0)
    small = rng.integers(60, 230, size=(side // 16, side // 16, 3), dtype=np.uint8)
    rgb = np.repeat(np.repeat(small, 16, axis=0), 16, axis=1)
    first = write_pyramid_tiff(root / "s0.tiff", rgb, mpp=0.5, levels=3, tile=256)
    per_row = side // patch
    idx = np.arange(per_row * per_row)
    coords = np.stack([(idx % per_row) * patch, (idx // per_row) * patch], axis=1).astype(np.int64)
    store = FeatureStore(root / "store.zarr", create=True)
    rows = []
    for i in range(n_slides):
        path = first if i == 0 else Path(shutil.copy(first, root / f"s{i}.tiff"))
        feats = rng.standard_normal((len(coords), dim)).astype(np.float32)
        store.write_bag(
            f"s{i}",
            feats,
            coords,
            "resnet18-random",
            encoder_attrs={"name": "resnet18", "dim": dim, "weights_sha256": "random-init"},
            slide_path=str(path),
            patch_size=patch,
            patch_size_level0=patch,
            stride_level0=patch,
            patch_mpp=0.5,
            slide_mpp=0.5,
            grid_origin=[0, 0],
            level0_size=[side, side],
        )
        rows.append({"slide_id": f"s{i}", "label": i % 2})
    labels = root / "labels.csv"
    pd.DataFrame(rows).to_csv(labels, index=False)
    return root / "store.zarr", labels


def e2e(args: argparse.Namespace) -> int:
    """ABMILX end to end (ResNet-18 cut after layer3 + ABMILX) with MRIS at ``--n-samples`` instances per step."""
    import torch

    from wsimil_core.engine.trainer import train

    with tempfile.TemporaryDirectory(prefix="gpu_e2e_") as tmp:
        root = Path(tmp)
        store, labels = slide_cohort(root, args.side, args.patch, 4)
        cfg = {
            "method": {
                "name": "abmilx",
                "options": {
                    "e2e": True,
                    "n_samples": args.n_samples,
                    "input_size": args.input_size,
                    "encoder_chunk": 128,
                    "num_workers": args.workers,
                    "checkpointing": True,
                    "eval_pixels": False,
                },
            },
            "model": {"n_heads": 4, "dim": 128},
            "data": {"store": str(store), "labels": str(labels), "split": {"kind": "random", "val_frac": 0.0}},
            "train": {"epochs": args.epochs, "lr": 1e-4, "device": args.device, "amp": args.amp},
            "output": {"dir": str(root / "run"), "progress": False},
        }
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        stamps: list[float] = []
        t0 = time.perf_counter()
        result = train(cfg, callbacks=[lambda r: stamps.append(time.perf_counter())])
        steps = 4 * args.epochs
        loss = float(result.history[-1]["train/loss"])
        print(
            f"ABMILX E2E, MRIS {args.n_samples} instances of {args.input_size} px per step, {steps} steps "
            f"({args.epochs} epochs x 4 slides of {(args.side // args.patch) ** 2} patches), amp {args.amp}, "
            f"device {args.device}: {(stamps[-1] - t0) / steps:.2f} s/step (first epoch included), "
            f"last loss {loss:.4f}, peak memory {_peak(args.device)}"
        )
        return 0 if math.isfinite(loss) else 1


def ddp_setup(args: argparse.Namespace) -> int:
    """A cohort and a config (``OUT/ddp.yaml``) for ``torchrun --nproc_per_node=N -m wsimil_core train``."""
    import yaml

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store, labels, _ = _cohort(out, args.bags, args.dim)
    cfg = {
        "method": "abmil",
        "data": {"store": str(store), "labels": str(labels), "split": {"kind": "random", "val_frac": 0.25}},
        "train": {"epochs": 2, "lr": 1e-4, "device": args.device, "amp": args.amp},
        "output": {"dir": str(out / "run"), "progress": False},
    }
    (out / "ddp.yaml").write_text(yaml.safe_dump(cfg))
    print(out / "ddp.yaml")
    return 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("amp")
    a.add_argument("--device", default="cuda")
    a.add_argument("--amp", nargs="+", default=["bf16", "fp16"])
    a.add_argument("--methods", nargs="*")
    a.add_argument("--bags", type=int, default=8)
    a.add_argument("--dim", type=int, default=512)
    e = sub.add_parser("e2e")
    e.add_argument("--device", default="cuda")
    e.add_argument("--amp", default="bf16")
    e.add_argument("--n-samples", type=int, default=512)
    e.add_argument("--input-size", type=int, default=224)
    e.add_argument("--side", type=int, default=6144, help="slide side in px (grid of --patch px patches)")
    e.add_argument("--patch", type=int, default=256)
    e.add_argument("--epochs", type=int, default=2)
    e.add_argument("--workers", type=int, default=4)
    d = sub.add_parser("ddp-setup")
    d.add_argument("out")
    d.add_argument("--device", default="cuda")
    d.add_argument("--amp", default="bf16")
    d.add_argument("--bags", type=int, default=32)
    d.add_argument("--dim", type=int, default=512)
    args = p.parse_args()
    warnings.simplefilter("ignore")
    code = {"amp": amp, "e2e": e2e, "ddp-setup": ddp_setup}[args.cmd](args)
    raise SystemExit(code)


if __name__ == "__main__":
    main()
