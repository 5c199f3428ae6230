"""Engine overhead (issue 15, goal 1): a training epoch of every method through ``wsimil train`` vs. a bare PyTorch
loop over the same model and the same bags, side by side in one run.

The cohort is MUSK-like and synthetic (``--bags`` bags of 5-40 instances x ``--dim`` features, half positive, an
omics table for MoMKD); the run has no validation split (``val_frac: 0``), so the figure is the training loop
itself. For each method, in one process with 1 torch thread:

* ``bare``: the method built by ``create_method`` with the engine's default model options, the training bags
  already decoded in memory as ``BagBatch`` tensors, and per phase a plain loop: ``torch.randperm`` order,
  ``method.training_step`` -> ``loss.backward()`` -> AdamW step -> ``after_optimizer_step``, ``epoch_end``
  after each epoch. No scheduler, checks, logging or files: what a user writes by hand.
* ``engine``: ``Trainer(config).fit()`` on the same cohort (the bag cache filled before timing), default
  ``output.save_interval_s``: the DataLoader, the seeded sampler, the schedule, the per-step checks, the epoch
  records, ``metrics.jsonl`` appends and the save points (checkpoints + resume file at the end of the phase), the
  run's final files (``result.json``, the completed resume file).
* ``engine, save every epoch``: the same with ``output.save_interval_s: 0`` (best + last checkpoints,
  ``metrics.csv`` and the resume file written after every epoch, the behaviour before the save points).

Time per epoch = (end of the last epoch - end of the first) / (epochs - 1): the first epoch (kernel warm-up, the
first optimiser step's imports) is left out of every way alike; for the engine, an epoch ends when its record is
handed to the callbacks (training, ``epoch_end``, the record, staging or writing its files). ``run end (once)``:
the engine's wall time after the last epoch (the last save point, the completed resume file, ``result.json``).
Trials alternate the ways; the table shows medians. Prints a table and exits 0::

    python benchmarks/bench_engine.py                          # every method, 92 bags x 166 dims, 6 epochs
    python benchmarks/bench_engine.py --methods abmil asmil --trials 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
WAYS = ("bare", "engine", "engine_every_epoch")


def make_cohort(root: Path, n_bags: int, dim: int, seed: int = 0) -> tuple[Path, Path, Path]:
    """The MUSK-like cohort of ``bench_threads`` plus an omics table (16 columns) for MoMKD."""
    import numpy as np
    import pandas as pd
    from bench_threads import make_cohort as musk

    store, labels = musk(root, n_bags, dim, seed)
    ids = pd.read_csv(labels, dtype={"slide_id": str})["slide_id"]
    omics = pd.DataFrame(
        np.random.default_rng(seed).standard_normal((len(ids), 16)), columns=[f"g{i}" for i in range(16)]
    )
    omics.insert(0, "slide_id", ids)
    omics_path = root / "omics.csv"
    omics.to_csv(omics_path, index=False)
    return store, labels, omics_path


def config(method: str, store: str, labels: str, omics: str, out: str, epochs: int, interval: float) -> dict:
    data = {"store": store, "labels": labels, "split": {"kind": "random", "val_frac": 0.0}}
    if method == "momkd":
        data["omics"] = omics
    from wsimil_core.engine.config import OutputSection

    output: dict = {"dir": out, "progress": False}
    if "save_interval_s" in OutputSection.model_fields:  # absent before the save points: every epoch is saved
        output["save_interval_s"] = interval
    return {"method": method, "data": data, "train": {"epochs": epochs, "lr": 2e-4, "device": "cpu"}, "output": output}


def _now() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _per_epoch(stamps: list[tuple[float, float]]) -> list[float]:
    """``[wall s, CPU s]`` per epoch between the first and the last stamp."""
    n = len(stamps) - 1
    return [(stamps[-1][0] - stamps[0][0]) / n, (stamps[-1][1] - stamps[0][1]) / n]


def engine_run(cfg: dict) -> list[float]:
    """Wall and CPU seconds per epoch of ``Trainer.fit`` after the first epoch (the bag cache filled first), and
    the wall seconds of the run's end (after the last epoch: the last save point, ``result.json``)."""
    from wsimil_core.engine.trainer import Trainer

    stamps: list[tuple[float, float]] = []
    trainer = Trainer(cfg, callbacks=[lambda r: stamps.append(_now())])
    trainer.build()
    for i in range(len(trainer.full)):  # fill the bag cache (the bare loop has its bags in memory too)
        trainer.full[i]
    trainer.fit()
    end = _now()
    return [*_per_epoch(stamps), end[0] - stamps[-1][0]]


def bare_run(cfg: dict) -> list[float]:
    """Wall and CPU seconds per epoch (after the first) of a hand-written loop over the same method and bags."""
    import torch

    from wsimil_core.engine.trainer import Trainer

    trainer = Trainer(cfg)
    trainer.build()  # the same cohort, split, model options and seeds as the engine run
    method = trainer.method
    train = trainer.train_data
    bags = [train[i] for i in range(len(train))]
    stamps: list[tuple[float, float]] = []
    for phase in method.phases:
        method.setup_phase(phase, train)
        params = [p for p in method.trainable_parameters(phase) if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg["train"]["lr"], weight_decay=1e-4)
        for epoch in range(cfg["train"]["epochs"]):
            method.train()
            for i in torch.randperm(len(bags)).tolist():
                loss = method.training_step(bags[i], phase)["loss"]
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                method.after_optimizer_step(phase)
            method.epoch_end(phase, epoch)
            stamps.append(_now())
    return _per_epoch(stamps)


def child(a: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(1)
    out: dict[str, list[list[float]]] = {w: [] for w in WAYS}
    root = Path(a.out)
    for trial in range(a.trials):
        order = WAYS if trial % 2 == 0 else WAYS[::-1]
        for way in order:
            interval = 0.0 if way == "engine_every_epoch" else 30.0
            store, labels = (a.slide_store, a.slide_labels) if a.child == "ahdmil" else (a.store, a.labels)
            cfg = config(a.child, store, labels, a.omics, str(root / f"{way}_{trial}"), a.epochs, interval)
            out[way].append(bare_run(cfg) if way == "bare" else engine_run(cfg))
    print(json.dumps(out))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="*", default=None, help="default: every registered method")
    p.add_argument("--bags", type=int, default=92)
    p.add_argument("--dim", type=int, default=166)
    p.add_argument("--epochs", type=int, default=6, help="epochs per phase")
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--child", help=argparse.SUPPRESS)
    for name in ("store", "labels", "omics", "out", "slide-store", "slide-labels"):
        p.add_argument(f"--{name}", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        child(a)
        return

    import torch

    from wsimil_core.methods import list_methods

    methods = a.methods or list_methods()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_engine_") as tmp:
        root = Path(tmp)
        store, labels, omics = make_cohort(root, a.bags, a.dim)
        from gpu_check import slide_cohort  # AHDMIL reads low-resolution patches from slide files

        (root / "slides").mkdir()
        slide_store, slide_labels = slide_cohort(root / "slides", 1024, 128, a.bags // 2, dim=a.dim)
        for m in methods:
            cmd = [sys.executable, __file__, "--child", m, "--store", str(store), "--labels", str(labels)]
            cmd += ["--omics", str(omics), "--out", str(root / m), "--epochs", str(a.epochs), "--trials", str(a.trials)]
            cmd += ["--slide-store", str(slide_store), "--slide-labels", str(slide_labels)]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                print(f"{m}: failed: {done.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
                continue
            res = json.loads(done.stdout.strip().splitlines()[-1])
            med = {w: [statistics.median(t[k] for t in v) for k in range(len(v[0]))] for w, v in res.items()}
            rows.append((m, med))

    print(
        f"{a.bags} bags x {a.dim} dims (5-40 instances; AHDMIL: {a.bags // 2} slides of 64 patches), no validation, "
        f"{a.epochs} epochs per phase, CPU, 1 torch thread, torch {torch.__version__}; ms per epoch after the first, "
        f"median of {a.trials} alternating trials; wall = elapsed, CPU = this process's CPU time (not slowed by other "
        "processes, but blind to I/O waits)"
    )
    head = f"{'method':<14} | {'bare wall':>9} | {'engine':>8} | {'ratio':>6} | {'bare CPU':>8} | {'engine':>8} | {'ratio':>6}"
    print(head + f" | {'every-epoch saves: wall':>23} | {'ratio':>6} | {'run end (once)':>14}")
    for m, r in rows:
        (b, bc), (e, ec, end), (e0, _, _) = r["bare"], r["engine"], r["engine_every_epoch"]
        print(
            f"{m:<14} | {b * 1e3:>9.1f} | {e * 1e3:>8.1f} | {e / b:>5.2f}x | {bc * 1e3:>8.1f} | {ec * 1e3:>8.1f} | "
            f"{ec / bc:>5.2f}x | {e0 * 1e3:>23.1f} | {e0 / b:>5.2f}x | {end * 1e3:>11.0f} ms"
        )


if __name__ == "__main__":
    main()
