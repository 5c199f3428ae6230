"""MoMKD (histology + omics distillation) vs. the same WSI model trained without omics, side by side.

A synthetic cohort where histology carries a weak signal (a few positive patches slightly shifted) and the omics
table a strong one (``--informative`` columns = label * ``--omics-signal`` + noise). Both runs use the same model,
split, seed and optimiser through the training engine; only ``method.options.use_omics`` differs. Inference is
histology-only for both. Reports validation / test AUC and accuracy per seed and their means.

    .venv/bin/python benchmarks/bench_momkd_omics.py                     # 80 bags, 3 seeds, 10 epochs (~10 min, 1 core)
    .venv/bin/python benchmarks/bench_momkd_omics.py --bags 200 --seeds 0 1 2 3 4 --epochs 20
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

import numpy as np


def make_cohort(
    root: Path, n_bags: int, dim: int, shift: float, n_omics: int, informative: int, omics_signal: float, seed: int
) -> tuple[Path, Path, Path]:
    """Feature store + labels CSV + omics CSV under ``root``."""
    import pandas as pd

    from wsimil_core.store.zarr_store import FeatureStore

    rng = np.random.default_rng(seed)
    store_path = root / "store.zarr"
    store = FeatureStore(store_path, create=True)
    attrs = {"name": "synthetic", "weights_sha256": "random-init", "dim": dim, "input_size": 256, "mpp": 0.5}
    rows, omics_rows = [], []
    for i in range(n_bags):
        sid = f"slide_{i:03d}"
        label = i % 2
        n = int(rng.integers(20, 81))
        feats = rng.normal(0.0, 1.0, size=(n, dim)).astype(np.float32)
        if label:
            k = int(rng.integers(2, 6))
            idx = rng.choice(n, size=k, replace=False)
            feats[idx, :4] += shift
        cells = rng.choice(24 * 24, size=n, replace=False)
        coords = np.stack([(cells % 24) * 256, (cells // 24) * 256], axis=1).astype(np.int64)
        store.write_bag(
            sid,
            feats,
            coords,
            "synthetic",
            encoder_attrs=attrs,
            patch_size=256,
            patch_size_level0=256,
            stride_level0=256,
            patch_mpp=0.5,
            slide_mpp=0.5,
            grid_origin=[0, 0],
        )
        om = rng.normal(0.0, 1.0, size=n_omics)
        om[:informative] += omics_signal * (2 * label - 1)
        rows.append({"slide_id": sid, "label": label})
        omics_rows.append({"slide_id": sid, **{f"g{j:03d}": float(v) for j, v in enumerate(om)}})
    labels, omics = root / "labels.csv", root / "omics.csv"
    pd.DataFrame(rows).to_csv(labels, index=False)
    pd.DataFrame(omics_rows).to_csv(omics, index=False)
    return store_path, labels, omics


def run(
    store: Path,
    labels: Path,
    omics: Path,
    out: Path,
    use_omics: bool,
    seed: int,
    epochs: int,
    lr: float,
    model: dict,
    reseed_dead: bool = False,
) -> dict:
    from wsimil_core.engine.trainer import train

    cfg = {
        "method": {
            "name": "momkd",
            "options": {"use_omics": use_omics, "kmeans_samples": 2000, "reseed_dead": reseed_dead},
        },
        "model": model,
        "data": {
            "store": str(store),
            "labels": str(labels),
            "omics": str(omics),
            "split": {"kind": "random", "val_frac": 0.2, "test_frac": 0.3, "seed": seed},
        },
        "train": {"epochs": epochs, "lr": lr, "device": "cpu", "seed": seed},
        "output": {"dir": str(out), "progress": False},
    }
    res = train(cfg)
    last = res.history[-1]
    return {
        "val_auc": res.val_metrics.get("auc", float("nan")),
        "test_auc": res.test_metrics.get("auc", float("nan")),
        "test_acc": res.test_metrics.get("accuracy", float("nan")),
        "pos_active": last.get("train/mem_pos_active", float("nan")),
        "neg_active": last.get("train/mem_neg_active", float("nan")),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bags", type=int, default=80)
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--shift", type=float, default=2.0, help="histology signal: shift of the positive patches")
    ap.add_argument("--omics", type=int, default=40, help="omics columns")
    ap.add_argument("--informative", type=int, default=5, help="omics columns carrying the label")
    ap.add_argument("--omics-signal", type=float, default=1.5)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reseed-dead", action="store_true", help="method option reseed_dead for both runs")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    model = {"dim": 64, "memory_dim": 32, "n_components": 8, "n_heads": 4, "dropout": 0.1}
    results: dict[bool, list[dict]] = {True: [], False: []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        store, labels, omics = make_cohort(
            root, args.bags, args.dim, args.shift, args.omics, args.informative, args.omics_signal, seed=123
        )
        for seed in args.seeds:
            for use in (True, False):
                r = run(
                    store,
                    labels,
                    omics,
                    root / f"run_{seed}_{int(use)}",
                    use,
                    seed,
                    args.epochs,
                    args.lr,
                    model,
                    args.reseed_dead,
                )
                results[use].append(r)
    print(
        f"{args.bags} bags (D={args.dim}, patch shift {args.shift}), omics {args.omics} cols "
        f"({args.informative} informative, signal {args.omics_signal}), {args.epochs} epochs, lr {args.lr}; "
        f"split 50/20/30 train/val/test by seed; histology-only inference; reseed_dead={args.reseed_dead}"
    )
    hdr = (
        f"{'seed':>4} | {'MoMKD test AUC':>14} | {'no-omics test AUC':>17} | {'MoMKD val AUC':>13} | "
        f"{'no-omics val AUC':>16} | {'MoMKD active +/-':>16} | {'no-omics active +/-':>18}"
    )
    print(hdr)
    print("-" * len(hdr))
    for i, seed in enumerate(args.seeds):
        a, b = results[True][i], results[False][i]
        print(
            f"{seed:>4} | {a['test_auc']:>14.3f} | {b['test_auc']:>17.3f} | {a['val_auc']:>13.3f} | "
            f"{b['val_auc']:>16.3f} | {a['pos_active']:>7.2f} / {a['neg_active']:<6.2f} | "
            f"{b['pos_active']:>8.2f} / {b['neg_active']:<7.2f}"
        )
    ma = np.nanmean([r["test_auc"] for r in results[True]])
    mb = np.nanmean([r["test_auc"] for r in results[False]])
    sa = np.nanstd([r["test_auc"] for r in results[True]])
    sb = np.nanstd([r["test_auc"] for r in results[False]])
    print(f"mean | {ma:>8.3f}+-{sa:.3f} | {mb:>11.3f}+-{sb:.3f} |")


if __name__ == "__main__":
    main()
