"""ABMILX benchmarks: forward+backward time and peak memory of our A+ (scaled_dot_product_attention, no [N, N]
matrix) against a reference ABMILX that materialises U = softmax(QK^T/sqrt(d)) (paper Eq. 4-5); and E2E
training throughput (patches/s).

Each measurement runs in its own subprocess so its peak memory (CPU: peak RSS growth; CUDA:
``torch.cuda.max_memory_allocated``) is its own.

    .venv/bin/python benchmarks/bench_abmilx.py                 # small sizes (a few minutes on 2 CPU cores)
    .venv/bin/python benchmarks/bench_abmilx.py --full          # N = 1k, 10k, 100k (reference skipped when U
                                                                #   would exceed --ref-budget-gb)
    .venv/bin/python benchmarks/bench_abmilx.py --device cuda --full
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def _peak_start(device: str) -> float:
    import resource

    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return float(torch.cuda.memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0


def _peak_end(device: str, start: float) -> float:
    import resource

    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - start) / 2**20
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0 - start) / 2**20


def worker_mil(n: int, dim: int, heads: int, impl: str, device: str, repeats: int) -> dict:
    import torch

    import wsimil_core.methods.abmilx.model as mod
    from wsimil_core.api import create_model
    from wsimil_core.functional.attention_plus import attention_plus_reference

    if impl == "reference":
        mod.attention_plus = attention_plus_reference  # the same model with U materialised
    torch.manual_seed(0)
    model = create_model("abmilx", in_dim=dim, n_classes=2, n_heads=heads).to(device)
    x = torch.randn(n, dim, device=device)
    y = torch.tensor([1], device=device)

    def step():
        out = model(x)
        torch.nn.functional.cross_entropy(out.logits, y).backward()

    start = _peak_start(device)
    step()  # warm-up (allocator, kernels); CPU peak RSS is monotonic, so the peak is measured here
    peak = _peak_end(device, start)
    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    for _ in range(repeats):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / repeats
    return {"time_s": dt, "peak_mb": peak}


def worker_e2e(n_samples: int, input_size: int, chunk: int, checkpointing: bool, device: str, steps: int) -> dict:
    import numpy as np
    import torch

    from wsimil_core.api import create_model

    torch.manual_seed(0)
    model = (
        create_model("abmilx_e2e", n_classes=2, input_size=input_size, encoder_chunk=chunk, checkpointing=checkpointing)
        .to(device)
        .train()
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    imgs = torch.from_numpy(
        np.random.default_rng(0).integers(0, 255, (n_samples, 3, input_size, input_size), dtype=np.uint8)
    )
    y = torch.tensor([1], device=device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else _Null()

    def step():
        with amp:
            out = model(imgs)
            loss = torch.nn.functional.cross_entropy(out.logits.float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    start = _peak_start(device)
    step()  # warm-up; the peak (activations + optimiser state) is measured here
    peak = _peak_end(device, start)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return {"patches_per_s": n_samples * steps / dt, "peak_mb": peak}


class _Null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return None


def _run(args: list[str], timeout: float) -> dict | None:
    cmd = [sys.executable, __file__, "--worker", json.dumps(args)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout {timeout:.0f}s"}
    if res.returncode != 0:
        tail = (res.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": tail[:80]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="N = 1k, 10k, 100k (default: 1k, 4k)")
    p.add_argument("--sizes", type=int, nargs="*", help="explicit bag sizes N")
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--ref-budget-gb", type=float, default=6.0, help="skip the reference when U exceeds this")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--e2e-samples", type=int, default=32)
    p.add_argument("--e2e-input", type=int, default=112)
    p.add_argument("--e2e-steps", type=int, default=2)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        spec = json.loads(a.worker)
        kind, rest = spec[0], spec[1:]
        out = worker_mil(*rest) if kind == "mil" else worker_e2e(*rest)
        print(json.dumps(out))
        return

    import torch

    sizes = a.sizes or ([1000, 10_000, 100_000] if a.full else [1000, 4000])
    print(
        f"ABMILX forward+backward, D={a.dim}, {a.heads} heads, inner 512, device {a.device}, torch {torch.__version__}"
    )
    print(f"{'N':>8} | {'ours s':>9} {'ours MB':>9} | {'reference s':>11} {'reference MB':>12} | U would be")
    for n in sizes:
        ours = _run(["mil", n, a.dim, a.heads, "ours", a.device, a.repeats], a.timeout)
        u_gb = 2 * a.heads * n * n * 4 / 2**30  # U and its softmax gradient, float32
        if u_gb > a.ref_budget_gb:
            ref = {"error": f"skipped (> {a.ref_budget_gb:g} GB)"}
        else:
            ref = _run(["mil", n, a.dim, a.heads, "reference", a.device, a.repeats], a.timeout)

        def fmt(r: dict | None, w1: int, w2: int) -> str:
            if not r or "error" in r:
                return f"{(r or {}).get('error', '?'):>{w1 + w2 + 1}}"
            return f"{r['time_s']:>{w1}.3f} {r['peak_mb']:>{w2}.1f}"

        print(f"{n:>8} | {fmt(ours, 9, 9)} | {fmt(ref, 11, 12)} | {u_gb:.2f} GB")

    print(
        f"\nE2E training (resnet18 cut after layer3 + ABMILX), {a.e2e_samples} patches/step, "
        f"{a.e2e_input} px, device {a.device}"
    )
    print(f"{'setting':>28} | {'patches/s':>10} {'peak MB':>9}")
    for chunk, ckpt in ((a.e2e_samples, False), (8, False), (8, True)):
        r = _run(["e2e", a.e2e_samples, a.e2e_input, chunk, ckpt, a.device, a.e2e_steps], a.timeout)
        name = f"chunk {chunk}{' + checkpointing' if ckpt else ''}"
        if not r or "error" in r:
            print(f"{name:>28} | {(r or {}).get('error', '?')}")
        else:
            print(f"{name:>28} | {r['patches_per_s']:>10.1f} {r['peak_mb']:>9.1f}")


if __name__ == "__main__":
    main()
