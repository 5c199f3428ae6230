"""MoMKD memory collapse: usage of C+ / C- per epoch with and without weight decay on the memory, and with the
own-class vs. joint L_mem commitment (issue 18), side by side in one run.

Same synthetic cohort as ``bench_momkd_omics.py`` (positive slides hold a few shifted patches, the omics table
carries the label); every variant trains through the engine with the same split, seed and optimiser (AdamW,
``--lr``, ``--weight-decay``). Printed per epoch: active ratio and perplexity of each memory (Fig. 3 statistics:
each slide's patches count toward its own-class memory).

    .venv/bin/python benchmarks/bench_momkd_collapse.py                          # 48 bags, 6 epochs, lr 2e-3
    .venv/bin/python benchmarks/bench_momkd_collapse.py --weight-decay 0.05 --lr 2e-3
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_momkd_omics import make_cohort  # noqa: E402  (a sibling script, not a package)

VARIANTS = {
    "0.x: joint, decayed": {"mem_commit": "joint", "memory_weight_decay": True},
    "joint, no decay": {"mem_commit": "joint", "memory_weight_decay": False},
    "own, decayed": {"mem_commit": "own_class", "memory_weight_decay": True},
    "own, no decay (default)": {"mem_commit": "own_class", "memory_weight_decay": False},
}


def run(store: Path, labels: Path, omics: Path, out: Path, options: dict, args: argparse.Namespace) -> list[dict]:
    from wsimil_core.engine.trainer import train

    model = {"dim": 64, "memory_dim": args.memory_dim, "n_components": args.components, "n_heads": 4, "dropout": 0.1}
    cfg = {
        "method": {"name": "momkd", "options": {"kmeans_samples": 2000, **options}},
        "model": model,
        "data": {
            "store": str(store),
            "labels": str(labels),
            "omics": str(omics),
            "split": {"kind": "random", "val_frac": 0.2, "test_frac": 0.2, "seed": args.seed},
        },
        "train": {
            "epochs": args.epochs,
            "lr": args.lr,
            "weight_decay": args.weight_decay,
            "device": "cpu",
            "seed": args.seed,
        },
        "output": {"dir": str(out), "progress": False},
    }
    return list(train(cfg).history)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bags", type=int, default=48)
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--shift", type=float, default=2.5)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--weight-decay", type=float, default=1e-4, help="train.weight_decay (the engine default)")
    ap.add_argument("--memory-dim", type=int, default=32)
    ap.add_argument("--components", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    histories: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        store, labels, omics = make_cohort(root, args.bags, args.dim, args.shift, 40, 5, 1.5, seed=123)
        for i, (name, options) in enumerate(VARIANTS.items()):
            histories[name] = run(store, labels, omics, root / f"run{i}", options, args)
    print(
        f"# {args.bags} bags (D={args.dim}, shift {args.shift}), D_N={args.memory_dim}, n={args.components}, "
        f"{args.epochs} epochs, AdamW lr {args.lr}, weight_decay {args.weight_decay}, seed {args.seed}"
    )
    print("# per cell: C+ active / C- active (C+ perplexity / C- perplexity)")
    names = list(histories)
    print("epoch | " + " | ".join(f"{n:>28}" for n in names))
    for e in range(args.epochs):
        cells = []
        for n in names:
            r = histories[n][e]
            cells.append(
                f"{r['train/mem_pos_active']:.2f} / {r['train/mem_neg_active']:.2f} "
                f"({r['train/mem_pos_perplexity']:.1f} / {r['train/mem_neg_perplexity']:.1f})"
            )
        print(f"{e:>5} | " + " | ".join(f"{c:>28}" for c in cells))
    cells = [f"{histories[n][-1].get('val/auc', float('nan')):.3f}" for n in names]
    print("  val AUC | " + " | ".join(f"{c:>28}" for c in cells))


if __name__ == "__main__":
    main()
