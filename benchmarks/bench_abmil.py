"""ABMIL cost: training-epoch time, inference time per slide and extra peak memory, wsimil vs. torchmil.

Both models are the same gated-attention ABMIL (Ilse et al. 2018) on the same inputs: embedding
Linear(D, 256) + ReLU + Dropout(0.25), gated attention with attn_dim 128, linear classifier; one bag of N patches
x D features per step (batch size 1). wsimil trains with 2-class cross-entropy (its ``abmil`` method), torchmil
with its own ``compute_loss`` (BCE on one logit); both with Adam.

* epoch time: ``--bags`` optimiser steps (forward + backward + Adam) on a bag of N patches (the bag is reused,
  so data loading is not measured), after ``--warmup`` untimed steps;
* inference time: fastest of ``--repeats`` no-grad forward passes over one bag (after ``--warmup`` passes);
* peak memory: peak RSS of the measuring process minus its RSS once the bag and the model exist (on CUDA, the
  peak allocated CUDA memory minus the allocation before the run). Each measurement runs in its own process,
  ``--trials`` times, alternating the implementations; the table shows the fastest time and the median memory.

torchmil must be installed in a separate environment, never in the project's .venv::

    python -m venv /tmp/benchenv
    echo "import site; site.addsitedir('$PWD/.venv/lib/python3.11/site-packages')" \
        > /tmp/benchenv/lib/python3.11/site-packages/zz_mainvenv.pth   # reuse torch + wsimil_core
    /tmp/benchenv/bin/pip install torchmil
    /tmp/benchenv/bin/python benchmarks/bench_abmil.py                 # N = 1k, 10k, 100k; D = 1024; CPU

Without torchmil the script prints a note and measures wsimil only.

Cross-validation mode (issue 15 goal 1): a full ``wsimil crossval`` of ABMIL (the CLI in a fresh process, wall
time from start to exit) against a peer, side by side at the same epochs, folds, model and optimiser::

    python benchmarks/bench_abmil.py --crossval                      # Elephant, 10 folds, 20 epochs, 1 thread

The peer is a plain PyTorch script written like torchmil's ABMIL recipe (torchmil is not installed in the
project's environment): gated-attention ABMIL (Linear(D, 128) + ReLU + Dropout 0.25, attention dim 64, one
logit, BCE-with-logits), Adam, bags of batch size 1 in shuffled order, per-epoch validation (loss and AUC) on
10% of each fold's training bags keeping the best state (deep copy) by validation loss, the test fold scored at
the end; stratified K-fold (scikit-learn), no files written. wsimil writes its run folders, checkpoints,
metrics and the report. Each way runs in its own process, trials alternate, the table shows medians.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "mil"


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    import os

    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _build(impl: str, in_dim: int, device: str):
    """Return ``(model, step(x) -> loss, infer(x))`` for one implementation."""
    import torch

    if impl == "wsimil":
        from wsimil_core.methods import create_method

        method = create_method(
            "abmil",
            model={"in_dim": in_dim, "n_classes": 2, "dim": 256, "attn_dim": 128, "dropout": 0.25, "gated": True},
        ).to(device)
        from wsimil_core.data.bag import BagBatch

        y = torch.tensor([1], device=device)

        def loss_fn(x):
            return method.training_step(BagBatch(features=x, targets={"label": y}), "train")["loss"]

        model = method.model
        infer = lambda x: model(x).logits  # noqa: E731
        return model, loss_fn, infer
    if impl == "torchmil":
        from torchmil.models import ABMIL

        feat = torch.nn.Sequential(torch.nn.Linear(in_dim, 256), torch.nn.ReLU(), torch.nn.Dropout(0.25))
        model = ABMIL(in_shape=(in_dim,), att_dim=128, gated=True, feat_ext=feat).to(device)
        y = torch.tensor([1.0], device=device)

        def loss_fn(x):
            _, losses = model.compute_loss(y, x[None])
            return sum(losses.values())

        infer = lambda x: model(x[None])  # noqa: E731
        return model, loss_fn, infer
    raise ValueError(impl)


def worker(
    impl: str, mode: str, n: int, in_dim: int, bags: int, repeats: int, device: str, threads: int, warmup: int = 3
) -> dict:
    """One measurement in this process; returns a dict printed as JSON."""
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    x = torch.randn(n, in_dim, device=device)
    model, loss_fn, infer = _build(impl, in_dim, device)
    cuda = device.startswith("cuda")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    if mode == "train":
        model.train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)

        def step():
            opt.zero_grad(set_to_none=True)
            loss_fn(x).backward()
            opt.step()

        for _ in range(warmup):  # warm-up (allocates Adam state, first-call kernel set-up)
            step()
        sync()
        base = torch.cuda.memory_allocated() / 2**20 if cuda else _rss_mib()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(bags):
            step()
        sync()
        seconds = time.perf_counter() - t0
    else:
        model.eval()
        with torch.no_grad():
            for _ in range(warmup):
                infer(x)
            sync()
            base = torch.cuda.memory_allocated() / 2**20 if cuda else _rss_mib()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                infer(x)
                sync()
                times.append(time.perf_counter() - t0)
        seconds = min(times)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else _peak_rss_mib()
    return {"impl": impl, "mode": mode, "n": n, "seconds": seconds, "extra_mib": max(0.0, peak - base)}


def _run(args, impl: str, mode: str, n: int) -> dict | None:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        impl,
        mode,
        str(n),
        "--in-dim",
        str(args.in_dim),
        "--bags",
        str(args.bags),
        "--repeats",
        str(args.repeats),
        "--device",
        args.device,
        "--threads",
        str(args.threads),
        "--warmup",
        str(args.warmup),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"  {impl} {mode} N={n} failed: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


PEER = """
import sys, time, copy
import numpy as np, pandas as pd, torch
from torch import nn
from sklearn.model_selection import StratifiedKFold, train_test_split
from sklearn.metrics import roc_auc_score
torch.set_num_threads(1)
csv, folds, epochs, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
frame = pd.read_csv(csv, header=None)
bags, labels = [], []
for _, rows in frame.groupby(1, sort=False):
    bags.append(torch.tensor(rows.iloc[:, 2:].to_numpy(), dtype=torch.float32))
    labels.append(float(rows.iloc[0, 0] > 0))
labels = np.array(labels)


class ABMIL(nn.Module):  # gated attention (Ilse et al. 2018), as torchmil's ABMIL(gated=True, feat_ext=...)
    def __init__(self, d, dim=128, att=64, dropout=0.25):
        super().__init__()
        self.feat = nn.Sequential(nn.Linear(d, dim), nn.ReLU(), nn.Dropout(dropout))
        self.v, self.u, self.w = nn.Linear(dim, att), nn.Linear(dim, att), nn.Linear(att, 1)
        self.cls = nn.Linear(dim, 1)

    def forward(self, x):
        h = self.feat(x)
        a = torch.softmax(self.w(torch.tanh(self.v(h)) * torch.sigmoid(self.u(h))), dim=0)
        return self.cls((a * h).sum(0)).squeeze(-1)


def scores(model, idx):
    model.eval()
    with torch.no_grad():
        out = torch.stack([model(bags[i]) for i in idx])
    y = torch.tensor(labels[idx], dtype=torch.float32)
    return nn.functional.binary_cross_entropy_with_logits(out, y).item(), torch.sigmoid(out).numpy()


aucs = []
for fold, (train_val, test) in enumerate(StratifiedKFold(folds, shuffle=True, random_state=seed).split(labels, labels)):
    torch.manual_seed(seed + fold)
    train, val = train_test_split(train_val, test_size=0.1, stratify=labels[train_val], random_state=seed)
    model = ABMIL(bags[0].shape[1])
    opt = torch.optim.Adam(model.parameters(), lr=5e-4, weight_decay=1e-4)
    best, best_state = float("inf"), None
    for epoch in range(epochs):
        model.train()
        for i in torch.randperm(len(train)).tolist():
            j = train[i]
            loss = nn.functional.binary_cross_entropy_with_logits(model(bags[j]), torch.tensor(labels[j]).float())
            opt.zero_grad()
            loss.backward()
            opt.step()
        val_loss, p = scores(model, val)
        roc_auc_score(labels[val], p) if len(set(labels[val])) > 1 else float("nan")
        if val_loss < best:
            best, best_state = val_loss, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    _, p = scores(model, test)
    aucs.append(roc_auc_score(labels[test], p))
print("AUC", float(np.mean(aucs)))
"""


def crossval_bench(args) -> None:
    """Full ``wsimil crossval`` (CLI, fresh process) vs. the torchmil-style peer script, side by side."""
    import os
    import statistics
    import tempfile
    from pathlib import Path

    import yaml

    from wsimil_core.store.milcsv import import_mil_csv

    csv = Path(args.csv)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    times: dict[str, list[float]] = {"wsimil": [], "peer": []}
    aucs: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="bench_abmil_cv_") as tmp:
        work = Path(tmp)
        import_mil_csv(csv, work / "store.zarr", work / "labels.csv", progress=False)
        peer = work / "peer.py"
        peer.write_text(PEER)
        for trial in range(args.trials):
            for way in ("wsimil", "peer") if trial % 2 == 0 else ("peer", "wsimil"):
                if way == "wsimil":
                    cfg = {
                        "method": "abmil",
                        "model": {"dim": 128, "attn_dim": 64, "dropout": 0.25},
                        "data": {
                            "store": str(work / "store.zarr"),
                            "labels": str(work / "labels.csv"),
                            "split": {"val_frac": 0.1, "seed": 0},
                        },
                        "train": {"epochs": args.epochs, "lr": 5e-4, "weight_decay": 1e-4, "optimizer": "adam"},
                        "output": {"dir": str(work / f"cv_{trial}")},
                    }
                    (work / "cv.yaml").write_text(yaml.safe_dump(cfg))
                    cmd = [sys.executable, "-m", "wsimil_core", "crossval", str(work / "cv.yaml")]
                    cmd += ["--folds", str(args.folds), "--device", "cpu"]
                    cmd += ["--jobs", str(args.jobs)] if args.jobs != 1 else []  # (no --jobs before it existed)
                else:
                    cmd = [sys.executable, str(peer), str(csv), str(args.folds), str(args.epochs), "0"]
                t0 = time.perf_counter()
                done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
                times[way].append(time.perf_counter() - t0)
                if done.returncode != 0:
                    raise SystemExit(f"{way} failed:\n{done.stderr[-2000:]}")
                out = done.stdout.strip().splitlines()
                if way == "peer":
                    aucs[way] = out[-1].split()[-1][:6]
                else:
                    aucs[way] = next((ln.split()[1] for ln in out if ln.startswith("auc\t")), "?")
    w, q = statistics.median(times["wsimil"]), statistics.median(times["peer"])
    print(
        f"ABMIL {args.folds}-fold cross-validation on {csv.stem}, {args.epochs} epochs per fold, CPU, "
        f"{args.threads} torch thread(s), wsimil --jobs {args.jobs}; wall s from process start to exit, median of "
        f"{args.trials} alternating trials (all: wsimil {[round(t, 1) for t in times['wsimil']]}, "
        f"peer {[round(t, 1) for t in times['peer']]})"
    )
    print(f"{'':>22} | {'wsimil crossval':>15} | {'torchmil-style peer':>19} | wsimil/peer")
    print(f"{'wall (s)':>22} | {w:>15.1f} | {q:>19.1f} | {w / q:>10.2f}x")
    print(f"{'mean test AUC':>22} | {aucs.get('wsimil', '?'):>15} | {aucs.get('peer', '?'):>19} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    p.add_argument("--in-dim", type=int, default=1024)
    p.add_argument("--bags", type=int, default=4, help="optimiser steps (bags) per training epoch")
    p.add_argument("--repeats", type=int, default=3, help="inference repeats (fastest is reported)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps / passes before timing")
    p.add_argument("--trials", type=int, default=3, help="fresh processes per measurement (min time, median memory)")
    p.add_argument("--worker", nargs=3, metavar=("IMPL", "MODE", "N"), help=argparse.SUPPRESS)
    p.add_argument("--crossval", action="store_true", help="full `wsimil crossval` vs. the torchmil-style peer")
    p.add_argument("--csv", default=str(FIXTURES / "elephant.csv"), help="--crossval: a MIL benchmark CSV")
    p.add_argument("--folds", type=int, default=10, help="--crossval: folds")
    p.add_argument("--epochs", type=int, default=20, help="--crossval: epochs per fold")
    p.add_argument("--jobs", type=int, default=1, help="--crossval: wsimil crossval --jobs")
    args = p.parse_args()
    if args.crossval:
        if "--threads" not in sys.argv:
            args.threads = 1
        if "--trials" not in sys.argv:
            args.trials = 2
        crossval_bench(args)
        return
    if args.worker:
        impl, mode, n = args.worker
        print(
            json.dumps(
                worker(impl, mode, int(n), args.in_dim, args.bags, args.repeats, args.device, args.threads, args.warmup)
            )
        )
        return

    impls = ["wsimil"]
    try:
        import torchmil  # noqa: F401

        impls.append("torchmil")
    except ImportError:
        print(
            "NOTE: torchmil is not importable with this Python, so only wsimil is measured. Install it in a "
            "separate environment (see this script's docstring) and run the script with that Python.\n"
        )
    import platform

    import numpy as np
    import torch

    print(
        f"ABMIL (gated, dim 256, attn 128), D = {args.in_dim}, device {args.device}, {args.threads} threads, "
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}; "
        f"epoch = {args.bags} bags of N patches; best of {args.trials} alternating trials"
    )
    results: dict[tuple[str, str, int], dict | None] = {}
    for n in args.sizes:
        for mode in ("train", "infer"):
            runs: dict[str, list[dict]] = {impl: [] for impl in impls}
            for _ in range(args.trials):  # alternate the implementations so load changes hit both alike
                for impl in impls:
                    r = _run(args, impl, mode, n)
                    if r:
                        runs[impl].append(r)
            for impl, rs in runs.items():
                results[(impl, mode, n)] = (
                    {
                        "seconds": min(r["seconds"] for r in rs),
                        "extra_mib": float(np.median([r["extra_mib"] for r in rs])),
                    }
                    if rs
                    else None
                )

    def cell(r, key, fmt):
        return fmt.format(r[key]) if r else "failed"

    header = f"{'N':>7} | {'metric':<22} | " + " | ".join(f"{i:>10}" for i in impls)
    if len(impls) == 2:
        header += " | wsimil/torchmil"
    print(header)
    print("-" * len(header))
    rows = [
        ("train", "seconds", "epoch time (s)", "{:.3f}"),
        ("train", "extra_mib", "train peak mem (MiB)", "{:.0f}"),
        ("infer", "seconds", "infer / slide (s)", "{:.4f}"),
        ("infer", "extra_mib", "infer peak mem (MiB)", "{:.0f}"),
    ]
    for n in args.sizes:
        for mode, key, label, fmt in rows:
            cells = [cell(results[(i, mode, n)], key, fmt) for i in impls]
            line = f"{n:>7} | {label:<22} | " + " | ".join(f"{c:>10}" for c in cells)
            if len(impls) == 2:
                a, b = results[("wsimil", mode, n)], results[("torchmil", mode, n)]
                ratio = a[key] / b[key] if a and b and b[key] > 0 else float("nan")
                line += f" | {ratio:>15.2f}"
            print(line)


if __name__ == "__main__":
    main()
