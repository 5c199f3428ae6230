"""ABMILX: attention plus (Eq. 4) against the materialised formula, linear memory, the model and the
two-stage ``abmilx`` method (unit steps and a run through ``wsimil train`` on ``synthetic_store``)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from _helpers import train_from_config
from wsimil_core.functional import attention_plus, attention_plus_reference, attention_sparsity
from wsimil_core.functional.attention_plus import attention_mass_share


def _mass_share_numpy(w: np.ndarray, mass: float) -> float:
    """Independent share of patches holding ``mass`` of the attention: walk the sorted weights one by one."""
    total, k = 0.0, 0
    for v in sorted((float(x) for x in w), reverse=True):
        total += v
        k += 1
        if total >= mass - 1e-6:
            break
    return k / len(w)


# --- functional ------------------------------------------------------------------------------------------
def test_attention_plus_equals_explicit_formula():
    torch.manual_seed(0)
    b, m, n, dh = 2, 3, 17, 5
    q, k = torch.randn(b, m, n, dh), torch.randn(b, m, n, dh)
    a = torch.randn(b, m, n, 1)
    alpha = torch.tensor(0.7)
    # Eq. 4-5 written out with an explicit [N, N] matrix, head by head.
    expected = torch.empty_like(a)
    for i in range(b):
        for j in range(m):
            u = torch.softmax(q[i, j] @ k[i, j].T / math.sqrt(dh), dim=-1)
            expected[i, j] = a[i, j] + 0.7 * (u @ a[i, j])
    got = attention_plus(q, k, a, alpha)
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.allclose(attention_plus_reference(q, k, a, alpha), expected, atol=1e-5)
    # [..., N] input keeps its shape; alpha = 0 is the identity.
    assert torch.allclose(attention_plus(q, k, a.squeeze(-1), 0.7), expected.squeeze(-1), atol=1e-5)
    assert torch.equal(attention_plus(q, k, a, 0.0), a)


def test_attention_plus_gradients_match_reference():
    torch.manual_seed(1)
    q, k, a = (torch.randn(1, 2, 11, 4, requires_grad=True) for _ in range(2)), None, None
    q, k = list(q)
    a = torch.randn(1, 2, 11, 1, requires_grad=True)
    alpha = torch.tensor(0.3, requires_grad=True)
    w = torch.randn(1, 2, 11, 1)
    grads = []
    for fn in (attention_plus, attention_plus_reference):
        for t in (q, k, a, alpha):
            t.grad = None
        (fn(q, k, a, alpha) * w).sum().backward()
        grads.append([t.grad.clone() for t in (q, k, a, alpha)])
    for g1, g2 in zip(*grads):
        assert torch.allclose(g1, g2, atol=1e-5)


def test_attention_plus_runs_on_the_fused_kernel_without_math_fallback():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, a = torch.randn(1, 2, 64, 8), torch.randn(1, 2, 64, 8), torch.randn(1, 2, 64, 1)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):  # raises if the call would need the [N, N] math path
        out = attention_plus(q, k, a, 0.5)
    assert torch.allclose(out, attention_plus_reference(q, k, a, 0.5), atol=1e-5)


def test_attention_plus_bad_shapes():
    with pytest.raises(ValueError, match="attention_plus"):
        attention_plus(torch.randn(1, 5, 4), torch.randn(1, 6, 4), torch.randn(1, 5, 1), 1.0)


_MEM_SCRIPT = textwrap.dedent(
    """
    import resource, sys, torch
    from wsimil_core.functional.attention_plus import attention_plus

    def peak_mb(n, grad):
        torch.manual_seed(0)
        q = torch.randn(1, 1, n, 8, requires_grad=grad)
        k = torch.randn(1, 1, n, 8, requires_grad=grad)
        a = torch.randn(1, 1, n, 1, requires_grad=grad)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        with torch.set_grad_enabled(grad):
            out = attention_plus(q, k, a, 0.5)
            if grad:
                out.sum().backward()
        return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024.0

    print(peak_mb(int(sys.argv[1]), True), peak_mb(int(sys.argv[2]), False))
    """
)


def test_attention_plus_memory_is_linear_in_n():
    # One subprocess (its own peak RSS): forward + backward at N = 3,000, then forward at N = 40,000.
    # A materialised U would take 36 MB (+ its gradient) and 6.4 GB (40k x 40k float32) respectively.
    res = subprocess.run(
        [sys.executable, "-c", _MEM_SCRIPT, "3000", "40000"], capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr
    backward_mb, forward_mb = (float(v) for v in res.stdout.split())
    assert backward_mb < 24, f"A+ backward grew the peak by {backward_mb:.1f} MB: an N x N matrix?"
    assert forward_mb < 256, f"A+ forward at N=40k grew the peak by {forward_mb:.1f} MB: an N x N matrix?"


def test_attention_mass_share_against_a_sorted_walk():
    w = torch.tensor([[0.9, 0.05, 0.05, 0.0], [0.25, 0.25, 0.25, 0.25]])
    assert torch.allclose(attention_mass_share(w, 0.9), torch.tensor([0.25, 1.0]))
    assert float(attention_mass_share(torch.tensor([0.5, 0.3, 0.2]), 0.8)) == pytest.approx(2 / 3)
    rng = np.random.default_rng(0)
    for mass in (0.5, 0.9, 1.0):
        logits = rng.normal(scale=3.0, size=(5, 40))
        weights = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        got = attention_mass_share(torch.from_numpy(weights), mass).numpy()
        assert np.allclose(got, [_mass_share_numpy(row, mass) for row in weights])
    assert attention_sparsity is attention_mass_share  # the old name of the same proxy figure
    with pytest.raises(ValueError):
        attention_mass_share(w, 0.0)


# --- model -------------------------------------------------------------------------------------------------
def _model(**kw):
    from wsimil_core.api import create_model

    cfg = dict(in_dim=12, n_classes=3, dim=16, n_heads=4)
    cfg.update(kw)
    return create_model("abmilx", **cfg)


def test_model_shapes_maps_and_batch():
    torch.manual_seed(0)
    model = _model().eval()
    x = torch.randn(30, 12)
    out = model(x)
    assert out.logits.shape == (1, 3)
    assert set(out.maps) == {"attention", "attention/local"} | {f"attention/head{j}" for j in range(4)}
    for v in out.maps.values():
        assert v.shape == (30,) and torch.isclose(v.sum(), torch.tensor(1.0), atol=1e-5)
    assert torch.allclose(
        out.maps["attention"], torch.stack([out.maps[f"attention/head{j}"] for j in range(4)]).mean(0)
    )
    assert out.extras["attention_logits"].shape == (1, 4, 30)
    # a batch of equal bags gives the same logits as bag by bag
    xb = torch.randn(2, 30, 12)
    outb = model(xb)
    assert outb.logits.shape == (2, 3)
    assert torch.allclose(outb.logits[1], model(xb[1]).logits[0], atol=1e-5)


def test_model_permutation_invariant_and_bias_switch():
    torch.manual_seed(0)
    model = _model().eval()
    x = torch.randn(25, 12)
    perm = torch.randperm(25)
    o1, o2 = model(x), model(x[perm])
    assert torch.allclose(o1.logits, o2.logits, atol=1e-5)
    assert torch.allclose(o1.maps["attention"][perm], o2.maps["attention"], atol=1e-6)
    assert not any(n.endswith(".bias") and "norm" not in n for n, _ in model.named_parameters())
    with_bias = _model(bias=True)
    assert any(n == "classifier.bias" for n, _ in with_bias.named_parameters())
    plain = _model(attn_plus=False).eval()
    out = plain(x)
    assert torch.allclose(out.maps["attention"], out.maps["attention/local"], atol=1e-6)


def test_model_alpha_changes_attention_and_is_learnable():
    torch.manual_seed(0)
    model = _model(alpha_init=0.0).eval()
    x = torch.randn(20, 12)
    out = model(x)
    assert torch.allclose(out.maps["attention"], out.maps["attention/local"], atol=1e-6)  # G(A) = A at alpha 0
    with torch.no_grad():
        model.alpha.fill_(2.0)
    assert not torch.allclose(model(x).maps["attention"], out.maps["attention/local"], atol=1e-4)
    model.train()
    model(x).logits.sum().backward()
    assert model.alpha.grad is not None


def test_forward_equals_the_papers_equations_written_out():
    """Input LN-Linear-GELU, MHLA (shared MLP), A+ (Eq. 4), head pooling + concat (Eq. 3), head, all by hand."""
    torch.manual_seed(0)
    model = _model(dropout=0.0, alpha_init=0.7).eval()
    x = torch.randn(9, 12)
    p = dict(model.named_parameters())
    ln = lambda v, w: torch.nn.functional.layer_norm(v, v.shape[-1:], w)  # noqa: E731  (bias-free LayerNorm)
    h = torch.nn.functional.gelu(ln(x, p["norm_in.weight"]) @ p["proj_in.weight"].T)  # [N, d]
    logits = []
    zs = []
    for j in range(4):
        hj = h[:, 4 * j : 4 * j + 4]  # head j, [N, d/m]
        a = torch.nn.functional.gelu(hj @ p["attn_mlp.0.weight"].T) @ p["attn_mlp.2.weight"].T  # A^j [N, 1]
        hn = ln(hj, p["qk_norm.weight"])
        q, k = hn @ p["w_q.weight"].T, hn @ p["w_k.weight"].T
        u = torch.softmax(q @ k.T / math.sqrt(4), dim=-1)  # U^j
        g = a + 0.7 * u @ a  # Eq. 4
        zs.append(torch.softmax(g[:, 0], dim=0) @ hj)  # Eq. 3: Softmax(G(A^j))^T H^j
        logits.append(g[:, 0])
    z = torch.cat(zs)  # Eq. 3: concat over heads
    expected = ln(z @ p["proj_out.weight"].T, p["norm_out.weight"]) @ p["classifier.weight"].T
    out = model(x)
    assert torch.allclose(out.logits[0], expected, atol=1e-5)
    assert torch.allclose(out.extras["attention_logits"][0], torch.stack(logits), atol=1e-5)


def test_attention_mlp_is_gelu_by_default_and_tanh_as_option():
    torch.manual_seed(0)
    gelu, tanh = _model().eval(), _model(attn_act="tanh").eval()
    assert isinstance(gelu.attn_mlp[1], torch.nn.GELU) and isinstance(tanh.attn_mlp[1], torch.nn.Tanh)
    tanh.load_state_dict(gelu.state_dict())  # same weights: only the activation differs
    x = torch.randn(20, 12)
    hj = gelu.embed(x[None]).view(1, 20, 4, 4).transpose(1, 2)
    first = hj @ gelu.attn_mlp[0].weight.T
    expected = torch.nn.functional.gelu(first) @ gelu.attn_mlp[2].weight.T  # A^j = W2 GELU(W1 H^j)
    assert torch.allclose(gelu(x).extras["local_logits"], expected.squeeze(-1), atol=1e-5)
    assert not torch.allclose(gelu(x).extras["local_logits"], tanh(x).extras["local_logits"], atol=1e-4)


def test_checkpoint_without_attn_act_loads_the_old_tanh_activation(tmp_path):
    from wsimil_core.engine.checkpoint import load_checkpoint, save_checkpoint
    from wsimil_core.models.base import model_config_dict

    torch.manual_seed(0)
    old = _model(attn_act="tanh").eval()
    cfg = model_config_dict(old)
    del cfg["attn_act"], cfg["alpha_learnable"]  # a config written before these options existed
    save_checkpoint(tmp_path / "old.safetensors", old, {"model_name": "abmilx", "model_config": cfg})
    model, meta = load_checkpoint(tmp_path / "old.safetensors")
    assert isinstance(model.attn_mlp[1], torch.nn.Tanh) and meta.model_kwargs["attn_act"] == "tanh"
    x = torch.randn(15, 12)
    assert torch.allclose(model(x).logits, old(x).logits, atol=1e-6)
    save_checkpoint(tmp_path / "new.safetensors", _model(), {"model_name": "abmilx"})  # the field is stored
    assert isinstance(load_checkpoint(tmp_path / "new.safetensors")[0].attn_mlp[1], torch.nn.GELU)


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_fixed_alpha_ablation_stays_and_equals_the_formula(alpha):
    from wsimil_core.methods.abmilx.model import ABMILX

    torch.manual_seed(0)
    model = _model(alpha_init=alpha, alpha_learnable=False, dropout=0.0)
    assert isinstance(model, ABMILX)
    assert "alpha" not in dict(model.named_parameters()) and "alpha" in model.state_dict()
    x = torch.randn(18, 12)
    out = model(x)
    hj = model.embed(x[None]).view(1, 18, 4, 4).transpose(1, 2)
    hn = model.qk_norm(hj)
    q, k = model.w_q(hn), model.w_k(hn)
    u = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1)  # Eq. 4, sqrt(d/m) = sqrt(4)
    local = out.extras["local_logits"]
    expected = local + alpha * (u @ local.unsqueeze(-1)).squeeze(-1)  # G(A) = A + alpha U A
    assert torch.allclose(out.extras["attention_logits"], expected, atol=1e-5)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    out.logits.sum().backward()
    opt.step()
    assert float(model.alpha) == alpha and float(model(x).extras["alpha"]) == alpha
    learnable = _model(alpha_init=alpha)
    learnable(x).logits.sum().backward()
    assert learnable.alpha.grad is not None and float(learnable.alpha.grad) != 0.0


@pytest.mark.parametrize(
    "bad,match",
    [
        ({"dim": 10, "n_heads": 4}, "divisible"),
        ({"n_heads": 0}, "n_heads"),
        ({"dropout": 1.5}, "dropout"),
        ({"n_classes": 1}, "n_classes"),
        ({"bias": "yes"}, "bias"),
        ({"attn_act": "relu"}, "attn_act"),
        ({"alpha_learnable": 1}, "alpha_learnable"),
        ({"nope": 1}, "unknown"),
    ],
)
def test_model_config_errors(bad, match):
    from wsimil_core.errors import ConfigError

    with pytest.raises(ConfigError, match=match):
        _model(**bad)


def test_model_wrong_feature_dim_is_clear():
    from wsimil_core.errors import DataError

    with pytest.raises(DataError, match="in_dim=12"):
        _model()(torch.randn(5, 7))


# --- method (two-stage) ------------------------------------------------------------------------------------
def _bags(n_bags=16, dim=12, seed=0):
    from wsimil_core.data.bag import BagBatch

    rng = np.random.default_rng(seed)
    bags = []
    for i in range(n_bags):
        y = i % 2
        x = rng.normal(size=(int(rng.integers(10, 30)), dim)).astype(np.float32)
        if y:
            x[:3, :4] += 3.0
        bags.append(BagBatch(features=torch.from_numpy(x), targets={"label": torch.tensor([y])}, slide_id=f"s{i}"))
    return bags


def test_method_two_stage_learns_and_logs_alpha_sparsity():
    from wsimil_core.methods import create_method

    torch.manual_seed(0)
    method = create_method(
        "abmilx",
        model={"in_dim": 12, "n_classes": 2, "dim": 16, "n_heads": 4, "dropout": 0.0},
        options={"ema": True, "ema_decay": 0.9},
    )
    opt = torch.optim.Adam(method.trainable_parameters("train"), lr=5e-3)
    bags = _bags(12)
    seen: list[np.ndarray] = []  # each training forward's attention weights [1, m, N]
    method.model.register_forward_hook(lambda m, a, out: seen.append(out.extras["attention_weights"].detach().numpy()))
    ema_before = [p.clone() for p in method.ema_model.parameters()]
    first = last = None
    for epoch in range(6):
        method.train()
        tot = 0.0
        for bag in bags:
            step = method.training_step(bag, "train")
            assert set(step) >= {"loss", "ce", "alpha"}
            opt.zero_grad()
            step["loss"].backward()
            opt.step()
            method.after_optimizer_step("train")
            tot += float(step["loss"].detach())
        logs = method.epoch_end("train", epoch)
        assert set(logs) == {"alpha", "attention_mass_share"}
        expected = np.mean([np.mean([_mass_share_numpy(h, 0.9) for h in w[0]]) for w in seen])
        assert logs["attention_mass_share"] == pytest.approx(expected)
        seen.clear()
        first = tot if first is None else first
        last = tot
    assert last < first * 0.5
    assert logs["alpha"] == pytest.approx(float(method.model.alpha.detach()))
    assert any(not torch.equal(a, b) for a, b in zip(ema_before, method.ema_model.parameters()))
    assert set(method.evaluation_models()) == {"online", "ema"}
    assert not any(p.requires_grad for p in method.ema_model.parameters())


def test_method_option_errors():
    from wsimil_core.errors import ConfigError
    from wsimil_core.methods import create_method

    with pytest.raises(ConfigError, match="scale"):
        create_method("abmilx", model={"in_dim": 12}, options={"scales": [1.0], "scale_ratios": [1.0, 2.0]})
    with pytest.raises(ConfigError, match="nope"):
        create_method("abmilx", model={"in_dim": 12}, options={"nope": 1})


def test_two_stage_trains_from_cli_and_checkpoint_predicts(synthetic_store, tmp_path):
    from wsimil_core.engine.checkpoint import load_checkpoint
    from wsimil_core.store.zarr_store import FeatureStore

    cfg = {
        "method": {"name": "abmilx", "options": {"ema": True}},
        "model": {"dim": 16, "n_heads": 4},
        "data": {
            "store": str(synthetic_store.store),
            "labels": str(synthetic_store.labels),
            "targets": ["label"],
            "split": {"kind": "random", "val_frac": 0.25, "seed": 0},
        },
        "train": {"epochs": 2, "lr": 2e-3, "device": "cpu", "seed": 0},
        "output": {"dir": str(tmp_path / "run"), "progress": False},
    }
    run = train_from_config(cfg, tmp_path / "config.yaml")
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == 2 and "train/alpha" in history[-1] and "train/attention_mass_share" in history[-1]
    # The EMA copy is validated side by side with the online model (Method.evaluation_models).
    assert "val_ema/auc" in history[-1] and "val/auc" in history[-1]
    model, meta = load_checkpoint(run / "last.safetensors")
    assert meta.method == "abmilx" and meta.model_name == "abmilx"
    bag = FeatureStore(synthetic_store.store).read_bag(synthetic_store.slide_ids[0])
    with torch.no_grad():
        out = model(torch.as_tensor(np.asarray(bag.features), dtype=torch.float32))
    assert out.logits.shape == (1, 2) and torch.isfinite(out.logits).all()
    assert out.maps["attention/head3"].shape == (bag.features.shape[0],)
