"""Do the training defaults hold up on a small cohort? K-fold cross-validation of ABMIL on a classic MIL benchmark
(a MIL-CSV fixture: Elephant by default), with the 0.1 defaults and with today's, side by side in one run.

Settings compared (everything else is the config default, model `dim: 128, attn_dim: 64, dropout: 0.25`):

* ``0.1 defaults``: ``train.threshold: val`` (Youden's J on ~18 validation bags), ``data.standardize: off``;
* ``threshold auto``: the 0.1 defaults with today's threshold rule (0.5 unless the validation split has
  ``threshold_min_slides`` slides of each class);
* ``today's defaults``: threshold ``auto`` and ``data.standardize: auto`` (on for MIL-CSV imports);
* ``today's + <N> epochs`` (``--long``): the same with more epochs, to see whether the default epoch count
  converges.

Run (about 1 CPU-minute per fold and setting on an idle core)::

    python benchmarks/bench_defaults.py --csv ../shared/fixtures/mil/elephant.csv --folds 10

It prints mean ± std of test accuracy and AUC over the folds per setting. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--csv", type=Path, default=Path("../shared/fixtures/mil/elephant.csv"))
    parser.add_argument("--folds", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=None, help="train.epochs (default: the config default)")
    parser.add_argument("--long", type=int, default=40, help="epochs of the last setting (0: leave it out)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)

    from wsimil_core.engine.config import TrainConfig
    from wsimil_core.engine.crossval import crossval
    from wsimil_core.store.milcsv import import_mil_csv

    default_epochs = TrainConfig().train.epochs
    epochs = args.epochs or default_epochs
    settings: list[tuple[str, dict, dict]] = [
        ("0.1 defaults", {"threshold": "val"}, {"standardize": "off"}),
        ("threshold auto", {}, {"standardize": "off"}),
        ("today's defaults", {}, {}),
    ]
    if args.long:
        settings.append((f"today's + {args.long} epochs", {"epochs": args.long}, {}))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        import_mil_csv(args.csv, root / "store", root / "labels.csv", progress=False)
        rows = []
        for name, train_opts, data_opts in settings:
            config = {
                "method": "abmil",
                "model": {"dim": 128, "attn_dim": 64, "dropout": 0.25},
                "data": {
                    "store": str(root / "store"),
                    "labels": str(root / "labels.csv"),
                    "split": {"kind": "kfold", "folds": args.folds, "val_frac": 0.1, "seed": args.seed},
                    **data_opts,
                },
                "train": {"epochs": epochs, "seed": args.seed, **train_opts},
                "output": {"dir": str(root / "runs" / name.replace(" ", "_")), "progress": False},
            }
            t0 = time.perf_counter()
            summary = crossval(config).summary
            rows.append((name, summary["accuracy"], summary["auc"], time.perf_counter() - t0))
            print(f"done: {name}", flush=True)
    print(f"\nABMIL, {args.csv.name}, {args.folds}-fold crossval, {epochs} epochs unless said (test split per fold)")
    print(f"{'setting':<28} {'accuracy':>17} {'AUC':>17} {'time':>8}")
    for name, acc, auc, seconds in rows:
        print(
            f"{name:<28} {acc['mean']:.3f} ± {acc['std']:.3f}    {auc['mean']:.3f} ± {auc['std']:.3f}  {seconds:6.0f} s"
        )


if __name__ == "__main__":
    main()
