"""MoMKD scaling: kNN graph construction and forward time, and peak memory, for N patches; MoMKD as before issue 15
(GATv2 through torch_geometric's scatter implementation) and ABMIL side by side.

Each (model, N) runs in a fresh subprocess; peak memory is the resident set sampled every millisecond during the
forward (CPU) or ``torch.cuda.max_memory_allocated`` (CUDA); the reported "peak MiB" is the peak minus the memory
held before the forward (model + input).
Linear memory means peak/N stays about constant as N grows.

    .venv/bin/python benchmarks/bench_momkd_graph.py                       # N = 1k, 10k, 100k, D = 384
    .venv/bin/python benchmarks/bench_momkd_graph.py --sizes 1000 10000 --in-dim 1024 --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


class RssSampler:
    """Samples this process's resident memory every millisecond in a thread; ``peak`` in bytes."""

    def __init__(self) -> None:
        import threading

        import psutil

        self.proc = psutil.Process()
        self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self._stop.wait(0.001)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def worker(model_name: str, n: int, in_dim: int, device: str, repeats: int) -> dict:
    import numpy as np
    import psutil
    import torch

    from wsimil_core.api import create_model
    from wsimil_core.functional.graph import knn_neighbors

    torch.manual_seed(0)
    dev = torch.device(device)
    if model_name == "momkd-before":  # the GATv2 layers as before issue 15: torch_geometric's scatter GATv2Conv
        from bench_heatmaps import scatter_gatv2

        from wsimil_core.nn.gatv2 import GATv2Layer

        GATv2Layer.forward = scatter_gatv2
    model = create_model(model_name.removesuffix("-before"), in_dim=in_dim, n_classes=2).to(dev).eval()
    side = int(np.ceil(np.sqrt(n)))
    cells = np.random.default_rng(0).choice(side * side, size=n, replace=False)
    coords = torch.from_numpy(np.stack([(cells % side) * 256, (cells // side) * 256], 1).astype(np.int64))
    x = torch.randn(n, in_dim, device=dev)
    c = coords.to(dev)
    graph_s = float("nan")
    if model_name.startswith("momkd"):
        knn_neighbors(coords[:64], model.config.k_neighbors)  # warm-up (scipy import)
        t = time.perf_counter()
        knn_neighbors(coords, model.config.k_neighbors)
        graph_s = time.perf_counter() - t
    with torch.no_grad():
        model(x[: min(n, 256)], coords=c[: min(n, 256)])  # warm-up (lazy init, kernels)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = psutil.Process().memory_info().rss
    times = []
    with RssSampler() as sampler:
        for _ in range(repeats):
            t = time.perf_counter()
            with torch.no_grad():
                model(x, coords=c)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
    if dev.type == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = (sampler.peak - base) / 2**20
    return {"model": model_name, "n": n, "graph_s": graph_s, "forward_s": min(times), "peak_mib": max(peak, 0.0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    ap.add_argument("--in-dim", type=int, default=384)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--worker", nargs=2, metavar=("MODEL", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        res = worker(args.worker[0], int(args.worker[1]), args.in_dim, args.device, args.repeats)
        print("RESULT " + json.dumps(res))
        return
    rows = {}
    for n in args.sizes:
        for model in ("momkd", "momkd-before", "abmil"):
            cmd = [
                sys.executable,
                "-W",
                "ignore",
                __file__,
                "--worker",
                model,
                str(n),
                "--in-dim",
                str(args.in_dim),
                "--device",
                args.device,
                "--repeats",
                str(args.repeats),
                "--threads",
                str(args.threads),
            ]
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            line = [s for s in out.stdout.splitlines() if s.startswith("RESULT ")]
            if not line:
                print(out.stderr[-2000:], file=sys.stderr)
                raise SystemExit(f"worker {model} N={n} failed")
            rows[(model, n)] = json.loads(line[0][7:])
    print(f"device={args.device} in_dim={args.in_dim} threads={args.threads} (MoMKD: kNN k=8, 2 GATv2 layers, D=256)")
    print(
        "before = the same MoMKD with its GATv2 layers through torch_geometric's GATv2Conv (the code before issue 15)"
    )
    hdr = (
        f"{'N':>8} | {'kNN graph s':>11} | {'MoMKD fwd s':>11} | {'before fwd s':>12} | {'ABMIL fwd s':>11} | "
        f"{'MoMKD peak MiB':>14} | {'before peak MiB':>15} | {'ABMIL peak MiB':>14} | {'MoMKD KiB/patch':>15}"
    )
    print(hdr)
    print("-" * len(hdr))
    for n in args.sizes:
        m, b, a = rows[("momkd", n)], rows[("momkd-before", n)], rows[("abmil", n)]
        print(
            f"{n:>8} | {m['graph_s']:>11.3f} | {m['forward_s']:>11.3f} | {b['forward_s']:>12.3f} | "
            f"{a['forward_s']:>11.3f} | {m['peak_mib']:>14.1f} | {b['peak_mib']:>15.1f} | {a['peak_mib']:>14.1f} | "
            f"{1024 * m['peak_mib'] / n:>15.2f}"
        )


if __name__ == "__main__":
    main()
