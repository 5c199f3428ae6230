"""MECDS benchmark: time and peak memory vs. bag size N with M = 3 tasks, routing on vs. off (DFR's saving).

For each N, the same weights are run twice: with dynamic feature routing (top-p, p = 0.5) and with routing off
(every expert processes every patch). Printed side by side: forward time (inference, no grad), a training step
(forward + backward) for the smaller sizes, peak memory, the fraction of patches each task's expert processes
(mean over the L modules) and the speed-up.

Routers at random initialisation give a nearly uniform phi, so top-p selects about half the patches; trained
routers are peaked. ``--sharpness S`` multiplies the routers' output weights by S to emulate peaked routers
(both rows are printed when S != 1). Each configuration runs in a fresh subprocess so that CPU peak memory
(``ru_maxrss``) belongs to it alone; on CUDA the peak is ``torch.cuda.max_memory_allocated``. On CPU the times
are process CPU seconds (``time.process_time``, one thread by default), which a shared machine's load disturbs far
less than wall time; on CUDA they are wall seconds.

    .venv/bin/python benchmarks/bench_mecds.py                    # N = 1000, 3000 (a few minutes on 2 cores)
    .venv/bin/python benchmarks/bench_mecds.py --full             # N = 1000, 10000, 100000 (use a GPU)
    .venv/bin/python benchmarks/bench_mecds.py --sizes 2000 --device cuda
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def run_one(args: argparse.Namespace) -> dict:
    import torch

    from wsimil_core.api import create_model

    torch.set_num_threads(args.threads)
    dev = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    torch.manual_seed(0)
    tasks = {f"task{m}": 2 for m in range(args.tasks)}
    cfg = dict(in_dim=args.in_dim, tasks=tasks, dim=args.dim, n_heads=args.heads, n_modules=args.modules, dropout=0.0)
    model = create_model("mecds", **cfg, routing=args.routing == "on").to(dev)
    with torch.no_grad():
        for module in model.mfa:
            for router in module.routers:
                router[-1].weight.mul_(args.sharpness)
    x = torch.randn(args.one, args.in_dim, device=dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    # CPU: process time (both threads' CPU seconds; robust on a shared, loaded machine); CUDA: wall time
    clock = time.perf_counter if dev.type == "cuda" else time.process_time
    model.eval()
    with torch.no_grad():
        if args.warmup:
            out = model(x)
            sync()
        times = []
        for _ in range(args.repeats):
            t0 = clock()
            out = model(x)
            sync()
            times.append(clock() - t0)
    fractions = {t: float(v.mean()) for t, v in out.extras["routed_fraction"].items()}
    train_s = None
    if args.one <= args.train_max_n:
        model.train()
        t0 = clock()
        out = model(x)
        sum(lg.sum() for lg in out.logits.values()).backward()
        sync()
        train_s = clock() - t0
    if dev.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "n": args.one,
        "routing": args.routing,
        "forward_s": min(times),
        "train_step_s": train_s,
        "peak_mb": peak_mb,
        "fraction": fractions,
        "device": str(dev),
        "clock": "wall s" if dev.type == "cuda" else "CPU s",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000,3000", help="comma-separated bag sizes N")
    ap.add_argument("--full", action="store_true", help="N = 1000, 10000, 100000 (the issue's sizes)")
    ap.add_argument("--tasks", type=int, default=3, help="number of tasks M")
    ap.add_argument("--in-dim", type=int, default=384)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--modules", type=int, default=2, help="MFA modules L")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1, help="1: one untimed forward pass first; 0: none")
    ap.add_argument("--train-max-n", type=int, default=3000, help="time a training step up to this N")
    ap.add_argument("--sharpness", type=float, default=20.0, help="router output scale of the 'peaked' rows")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--routing", default="on", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one is not None:
        print(json.dumps(run_one(args)))
        return
    sizes = [1000, 10000, 100000] if args.full else [int(s) for s in args.sizes.split(",") if s.strip()]
    sharp = [1.0] if args.sharpness == 1.0 else [1.0, args.sharpness]
    print(
        f"MECDS, M = {args.tasks} tasks, L = {args.modules}, dim {args.dim}, heads {args.heads}, "
        f"in_dim {args.in_dim}, threads {args.threads}"
    )
    header = (
        f"{'N':>7} {'routers':>8} | {'fwd on s':>9} {'fwd off s':>9} {'speed-up':>8} | "
        f"{'train on':>8} {'train off':>9} | {'peak on MB':>10} {'peak off MB':>11} | routed fraction per expert"
    )
    print(header)
    print("-" * len(header))
    rows: dict = {}
    for n in sizes:
        for s in sharp:
            rows = {}
            for routing in ("on", "off"):
                cmd = [sys.executable, __file__, "--one", str(n), "--routing", routing, "--sharpness", str(s)]
                for k in (
                    "tasks",
                    "in_dim",
                    "dim",
                    "heads",
                    "modules",
                    "repeats",
                    "warmup",
                    "train_max_n",
                    "device",
                    "threads",
                ):
                    cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
                res = subprocess.run(cmd, capture_output=True, text=True)
                if res.returncode != 0:
                    print(f"{n:>7} routing {routing}: failed: {res.stderr.strip().splitlines()[-1:]}")
                    break
                rows[routing] = json.loads(res.stdout.strip().splitlines()[-1])
            if len(rows) < 2:
                continue
            on, off = rows["on"], rows["off"]
            tr = lambda v: f"{v:8.3f}" if v is not None else f"{'-':>8}"  # noqa: E731
            frac = " ".join(f"{v:.3f}" for v in on["fraction"].values())
            label = "init" if s == 1.0 else f"x{s:g}"
            print(
                f"{n:>7} {label:>8} | {on['forward_s']:9.3f} {off['forward_s']:9.3f} "
                f"{off['forward_s'] / on['forward_s']:7.2f}x | {tr(on['train_step_s'])} {tr(off['train_step_s']):>9} | "
                f"{on['peak_mb']:10.0f} {off['peak_mb']:11.0f} | {frac}",
                flush=True,
            )
    on = rows.get("on", {})
    cuda = "cuda" in str(on.get("device"))
    print(
        f"device: {on.get('device', '?')}; times: {on.get('clock', '?')} (best of --repeats forward passes, one "
        f"training step); peak = {'torch.cuda.max_memory_allocated' if cuda else 'process max RSS (incl. ~0.5 GB of imports)'}"
    )


if __name__ == "__main__":
    main()
