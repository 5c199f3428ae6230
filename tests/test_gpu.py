"""CUDA paths (issue 15 goal 7): training with AMP on the GPU, the checkpoint read back on the CPU, and inference
on both devices agreeing. Marked ``gpu``: run by ``benchmarks/gpu_check.sh`` (``pytest -m gpu``); skipped
without CUDA."""

from __future__ import annotations

import math

import pytest
import torch

from test_trainer import make_config
from wsimil_core.devices import resolve_device
from wsimil_core.engine.checkpoint import load_checkpoint
from wsimil_core.engine.trainer import train

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def test_auto_device_is_cuda():
    assert resolve_device("auto").type == "cuda"


@pytest.mark.parametrize("amp", ["off", "bf16", "fp16"])
def test_abmil_trains_on_cuda_with_amp_and_loads_on_cpu(synthetic_store, tmp_path, amp):
    """Two epochs of ABMIL on CUDA (AMP dtype ``amp``): finite losses, a checkpoint that loads on the CPU, and the
    CPU model's logits equal the CUDA model's (float32 weights, tolerance of float32 kernels)."""
    cfg = make_config(
        synthetic_store,
        tmp_path / "run",
        method="abmil",
        model={"dim": 32, "attn_dim": 16},
        train_opts={"epochs": 2, "device": "cuda", "amp": amp},
    )
    result = train(cfg)
    assert all(math.isfinite(r["train/loss"]) for r in result.history)
    assert result.test_metrics and math.isfinite(result.test_metrics["loss"])
    cpu_model, _ = load_checkpoint(result.last_checkpoint, device="cpu")
    gpu_model, _ = load_checkpoint(result.last_checkpoint, device="cuda")
    x = torch.randn(300, cpu_model.config.in_dim)
    with torch.no_grad():
        a = cpu_model(x).logits
        b = gpu_model(x.cuda()).logits.cpu()
    assert torch.allclose(a, b, atol=1e-4), (a, b)


def test_momkd_gatv2_on_cuda_equals_the_cpu():
    """MoMKD's GATv2 layers run chunked on CUDA (larger chunks than on the CPU): same output as on the CPU."""
    from wsimil_core.functional.graph import knn_neighbors
    from wsimil_core.nn.gatv2 import GATv2Layer

    torch.manual_seed(0)
    layer = GATv2Layer(32, 8, n_heads=4).eval()
    x, nb = torch.randn(20_000, 32), knn_neighbors(torch.randint(0, 5000, (20_000, 2)), 8)
    with torch.no_grad():
        want = layer(x, nb)
        got = layer.cuda()(x.cuda(), nb.cuda()).cpu()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
