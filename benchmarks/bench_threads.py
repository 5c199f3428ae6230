"""Thread policy (issue 15, goal 2): a short ABMIL training while another process busies one core.

Two ways, side by side in one run, each in a fresh process with ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` removed:

* ``default``: torch's own intra-op thread count (the engine's ``apply_thread_policy`` replaced by a no-op: the
  behaviour before the policy);
* ``policy``: the engine as it is (``wsimil_core.devices.apply_thread_policy``: the cores this process may use
  minus its DataLoader workers, at least 1; workers at 1 thread).

The cohort is MUSK-like and synthetic (``--bags`` bags of 5-40 instances x ``--dim`` features, half positive);
each training runs ``--epochs`` epochs of the ``abmil`` method with per-epoch validation. While it runs, one
competing process spins numpy matrix products on one thread (one busy core). Each row is one DataLoader setting
(``data.num_workers``); times are wall seconds of ``train()`` (the fastest of ``--trials``, ways alternating).
Prints a table and exits 0::

    python benchmarks/bench_threads.py                 # 92 bags, 166-dim, 5 epochs, workers 0 and 1
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMPETITOR = """
import numpy as np
a = np.random.default_rng(0).standard_normal((256, 256))
while True:
    a = np.tanh(a @ a)
"""


def make_cohort(root: Path, n_bags: int, dim: int, seed: int = 0) -> tuple[Path, Path]:
    """A MUSK-like cohort: bags of 5-40 instances; positive bags hold 1-4 instances shifted by +2 on dims 0-7."""
    import numpy as np
    import pandas as pd

    from wsimil_core.store.zarr_store import FeatureStore

    rng = np.random.default_rng(seed)
    store = FeatureStore(root / "store.zarr", create=True)
    rows = []
    for i in range(n_bags):
        n = int(rng.integers(5, 41))
        x = rng.standard_normal((n, dim)).astype(np.float32)
        label = i % 2
        if label:
            x[: int(rng.integers(1, 5)), :8] += 2.0
        coords = np.stack([np.arange(n) % 16, np.arange(n) // 16], axis=1).astype(np.int64) * 256
        sid = f"bag_{i:03d}"
        store.write_bag(sid, x, coords, "musk", {"name": "musk", "dim": dim, "weights_sha256": "random-init"})
        rows.append({"slide_id": sid, "label": label})
    labels = root / "labels.csv"
    pd.DataFrame(rows).to_csv(labels, index=False)
    return store.root, labels


def child(way: str, store: str, labels: str, out_dir: str, epochs: int, workers: int) -> None:
    """One training run; prints ``{"wall": s, "threads": n}`` as its last line."""
    import torch

    import wsimil_core.engine.trainer as trainer_mod

    if way == "default":
        trainer_mod.apply_thread_policy = lambda num_workers=0: torch.get_num_threads()  # type: ignore[assignment]
    seen: list[int] = []
    cfg = {
        "method": "abmil",
        "data": {"store": store, "labels": labels, "num_workers": workers, "split": {"kind": "random"}},
        "train": {"epochs": epochs, "lr": 5e-4, "device": "cpu"},
        "output": {"dir": out_dir, "progress": False},
    }
    t0 = time.perf_counter()
    trainer_mod.train(cfg, callbacks=[lambda r: seen.append(torch.get_num_threads())])
    wall = time.perf_counter() - t0
    print(json.dumps({"wall": wall, "threads": seen[-1]}))


def run_child(way: str, store: Path, labels: Path, out_dir: Path, epochs: int, workers: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    cmd = [sys.executable, __file__, "--child", way, "--store", str(store), "--labels", str(labels)]
    cmd += ["--out", str(out_dir), "--epochs", str(epochs), "--workers", str(workers)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{way} run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bags", type=int, default=92)
    p.add_argument("--dim", type=int, default=166)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1], help="data.num_workers settings (one row each)")
    p.add_argument("--trials", type=int, default=2)
    p.add_argument("--child", choices=["default", "policy"], help=argparse.SUPPRESS)
    p.add_argument("--store", help=argparse.SUPPRESS)
    p.add_argument("--labels", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        child(a.child, a.store, a.labels, a.out, a.epochs, a.workers[0])
        return

    from wsimil_core.devices import available_cores

    with tempfile.TemporaryDirectory(prefix="bench_threads_") as tmp:
        root = Path(tmp)
        store, labels = make_cohort(root, a.bags, a.dim)
        comp_env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
        competitor = subprocess.Popen([sys.executable, "-c", COMPETITOR], env=comp_env)
        try:
            time.sleep(1.0)
            results: dict[int, dict[str, list[dict]]] = {}
            for workers in a.workers:
                results[workers] = {"default": [], "policy": []}
                for trial in range(a.trials):
                    ways = ("default", "policy") if trial % 2 == 0 else ("policy", "default")
                    for way in ways:
                        out = root / f"run_{way}_{workers}_{trial}"
                        results[workers][way].append(run_child(way, store, labels, out, a.epochs, workers))
        finally:
            competitor.kill()
            competitor.wait()

    print(
        f"ABMIL, {a.bags} bags x {a.dim} dims, {a.epochs} epochs with validation, CPU, {available_cores()} cores, "
        f"one competing busy process; wall s of train(), fastest of {a.trials}"
    )
    print(f"{'num_workers':>11} | {'default (threads)':>17} | {'policy (threads)':>16} | ratio default/policy")
    for workers, res in results.items():
        d = min(res["default"], key=lambda r: r["wall"])
        q = min(res["policy"], key=lambda r: r["wall"])
        print(
            f"{workers:>11} | {d['wall']:>9.2f} s ({d['threads']}) | {q['wall']:>8.2f} s ({q['threads']}) | "
            f"{d['wall'] / q['wall']:.2f}x"
        )


if __name__ == "__main__":
    main()
