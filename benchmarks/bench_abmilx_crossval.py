"""Cross-validation of ABMILX against ABMIL on the classic MIL benchmarks (two-stage, features from the CSV).

    .venv/bin/python benchmarks/bench_abmilx_crossval.py                       # elephant, 5 folds, 20 epochs
    .venv/bin/python benchmarks/bench_abmilx_crossval.py --datasets elephant ucsb_breast_cancer --folds 10 --epochs 40

Prints mean ± std of the test metrics over folds for both methods side by side (same folds, same seed).
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "mil"

MODELS = {
    "abmil": {"dim": 128, "attn_dim": 64},
    "abmilx": {"dim": 128, "n_heads": 4},
}


def run(dataset: str, method: str, folds: int, epochs: int, lr: float, work: Path) -> dict:
    from wsimil_core.engine.crossval import crossval

    cfg = {
        "method": {"name": method},
        "model": dict(MODELS[method]),
        "data": {
            "store": str(work / "store.zarr"),
            "labels": str(work / "labels.csv"),
            "targets": ["label"],
            "split": {"kind": "random", "val_frac": 0.2, "seed": 0, "folds": folds},
        },
        "train": {"epochs": epochs, "lr": lr, "device": "cpu", "seed": 0, "weight_decay": 1e-4},
        "output": {"dir": str(work / f"cv_{method}"), "progress": False},
    }
    return crossval(cfg, folds=folds).summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="*", default=["elephant"])
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--lr", type=float, default=5e-4)
    a = p.parse_args()
    warnings.simplefilter("ignore")
    from wsimil_core.store.milcsv import import_mil_csv

    for ds in a.datasets:
        csv = FIXTURES / f"{ds}.csv"
        if not csv.exists():
            print(f"{ds}: {csv} not found, skipped")
            continue
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            import_mil_csv(csv, work / "store.zarr", work / "labels.csv", progress=False)
            res = {m: run(ds, m, a.folds, a.epochs, a.lr, work) for m in MODELS}
        print(f"\n{ds}: {a.folds}-fold cross-validation, {a.epochs} epochs, test metrics mean ± std")
        print(f"{'metric':>17} | {'abmil':>17} | {'abmilx':>17}")
        for metric in ("auc", "accuracy", "balanced_accuracy", "f1_macro"):
            cells = []
            for m in MODELS:
                s = res[m].get(metric)
                cells.append(f"{s['mean']:.4f} ± {s['std']:.4f}" if s else "-")
            print(f"{metric:>17} | {cells[0]:>17} | {cells[1]:>17}")


if __name__ == "__main__":
    main()
