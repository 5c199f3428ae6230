"""MoMKD memory formulas (functional/memory.py) against hand computations (Eq. 3-8, 10)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from wsimil_core.functional import memory_alignment_loss, memory_loss, memory_score
from wsimil_core.functional.memory import (
    memory_attention,
    memory_commitment,
    memory_delta,
    memory_orthogonality,
    memory_phi,
    memory_pool,
    usage_stats,
)

POS = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
NEG = torch.tensor([[0.6, 0.8]])


def softplus(v: float) -> float:
    return math.log1p(math.exp(v))


def test_phi_is_scaled_logsumexp():
    z = torch.tensor([[0.6, 0.8]])
    # dots with POS: 0.6, 0.8 ; phi = (1/5) ln(e^{3} + e^{4})
    expected = math.log(math.exp(5 * 0.6) + math.exp(5 * 0.8)) / 5
    assert memory_phi(z, POS, 5.0).item() == pytest.approx(expected, rel=1e-6)
    # large tau_agg -> hard maximum
    assert memory_phi(z, POS, 1000.0).item() == pytest.approx(0.8, abs=1e-3)


def test_delta_and_alignment_loss_by_hand():
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([1, 0])
    tau, beta, margin = 5.0, 20.0, 0.3
    phi_pos = [math.log(math.exp(5) + 1) / 5, math.log(1 + math.exp(5)) / 5]
    phi_neg = [0.6, 0.8]  # one component: phi = dot
    delta = [phi_pos[0] - phi_neg[0], phi_pos[1] - phi_neg[1]]
    got = memory_delta(z, POS, NEG, tau)
    assert got.tolist() == pytest.approx(delta, rel=1e-6)
    l_pos = softplus(beta * (margin - delta[0]))  # y = 1
    l_neg = softplus(beta * (margin + delta[1]))  # y = 0
    loss = memory_alignment_loss(z, POS, NEG, y, tau_agg=tau, beta=beta, margin=margin)
    assert loss.item() == pytest.approx((l_pos + l_neg) / 2, rel=1e-5)


def test_alignment_loss_direction_and_gradients():
    z = torch.tensor([[0.6, 0.8]], requires_grad=True)
    pos = POS.clone().requires_grad_(True)
    neg = NEG.clone().requires_grad_(True)
    low_if_pos = memory_alignment_loss(torch.tensor([[1.0, 0.0]]), POS, -NEG, torch.tensor([1]))
    high_if_neg = memory_alignment_loss(torch.tensor([[1.0, 0.0]]), POS, -NEG, torch.tensor([0]))
    assert low_if_pos.item() < 1e-3 < high_if_neg.item()
    memory_alignment_loss(z, pos, neg, torch.tensor([1])).backward()
    assert z.grad.abs().sum() > 0 and pos.grad.abs().sum() > 0 and neg.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="labels"):
        memory_alignment_loss(z, POS, NEG, torch.tensor([2]))


def test_score_attention_pool_by_hand():
    f = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, -1.0]])
    # Eq. 6: max over POS minus max over NEG
    expected = [1.0 - 0.6, 0.8 - 1.0, 0.0 - (-0.8)]
    score = memory_score(f, POS, NEG)
    assert score.tolist() == pytest.approx(expected, abs=1e-6)
    # Eq. 7
    e = [math.exp(s / 0.2) for s in expected]
    alpha = memory_attention(score, 0.2)
    assert alpha.tolist() == pytest.approx([v / sum(e) for v in e], rel=1e-5)
    # Eq. 8
    feats = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    pooled = memory_pool(alpha, feats)
    a = alpha.tolist()
    assert pooled.tolist() == pytest.approx([a[0] * 1 + a[1] * 3 + a[2] * 5, a[0] * 2 + a[1] * 4 + a[2] * 6], rel=1e-5)


def test_memory_loss_by_hand():
    f = torch.tensor([[0.9, 0.1], [0.0, 0.5]])
    pos = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    neg = torch.tensor([[0.0, 1.0]])
    # nearest in the union {(1,0), (0.6,0.8), (0,1)}:
    #   f0 . = 0.9, 0.62, 0.1 -> (1,0): dist^2 = 0.01 + 0.01 = 0.02
    #   f1 . = 0.0, 0.4, 0.5 -> (0,1): dist^2 = 0 + 0.25 = 0.25
    commit = (0.02 + 0.25) / 2
    ortho_pos = 2 * 0.6**2  # cos((1,0), (0.6,0.8)) = 0.6, counted for (i, j) and (j, i)
    ortho_neg = 0.0  # one component
    assert memory_commitment(f, torch.cat([pos, neg])).item() == pytest.approx(commit, rel=1e-5)
    assert memory_orthogonality(pos).item() == pytest.approx(ortho_pos, rel=1e-5)
    joint = memory_loss(f, pos, neg, search="joint")
    assert joint.item() == pytest.approx(commit + ortho_pos + ortho_neg, rel=1e-5)
    assert memory_loss(f, pos, neg, ortho_weight=0.5, search="joint").item() == pytest.approx(
        commit + 0.5 * ortho_pos, rel=1e-5
    )
    # own-class memory (the default): a positive slide commits to C+ only, a negative slide to C- only
    #   C+: f0 -> (1,0): 0.02; f1 . = 0.0, 0.4 -> (0.6,0.8): 0.36 + 0.09 = 0.45
    #   C-: f0 -> (0,1): 0.81 + 0.81 = 1.62; f1 -> (0,1): 0.25
    own_pos = (0.02 + 0.45) / 2
    own_neg = (1.62 + 0.25) / 2
    assert memory_loss(f, pos, neg, y=1).item() == pytest.approx(own_pos + ortho_pos, rel=1e-5)
    assert memory_loss(f, pos, neg, y=torch.tensor([0])).item() == pytest.approx(own_neg + ortho_pos, rel=1e-5)
    with pytest.raises(ValueError, match="label"):
        memory_loss(f, pos, neg)
    with pytest.raises(ValueError):
        memory_loss(f, pos, neg, y=1, search="nearest")


def test_own_class_commitment_against_brute_force():
    """Eq. 10's first term with the own-class memory, against a numpy brute-force nearest-component search."""
    rng = np.random.default_rng(0)
    f = rng.normal(size=(40, 6))
    pos, neg = rng.normal(size=(5, 6)), rng.normal(size=(7, 6))
    for y, mem in ((1, pos), (0, neg)):
        # the paper's k* = argmin ||F - c|| (Eq. 10), searched over the own-class memory only
        fu = f / np.linalg.norm(f, axis=1, keepdims=True)
        mu = mem / np.linalg.norm(mem, axis=1, keepdims=True)
        d2u = ((fu[:, None, :] - mu[None, :, :]) ** 2).sum(-1)
        expected = d2u.min(axis=1).mean()
        got = memory_loss(
            torch.tensor(fu),
            torch.tensor(pos / np.linalg.norm(pos, axis=1, keepdims=True)),
            torch.tensor(neg / np.linalg.norm(neg, axis=1, keepdims=True)),
            ortho_weight=0.0,
            y=y,
        )
        assert got.item() == pytest.approx(expected, rel=1e-6)


def test_memory_loss_stop_gradient():
    """The commitment term moves the patches only; the diversity term moves the memory only."""
    f = torch.randn(6, 4, requires_grad=True)
    mem = torch.nn.functional.normalize(torch.randn(3, 4), dim=-1).requires_grad_(True)
    g_f, g_m = torch.autograd.grad(memory_commitment(f, mem), [f, mem], allow_unused=True)
    assert g_f.abs().sum() > 0
    assert g_m is None or g_m.abs().sum() == 0
    g_m2 = torch.autograd.grad(memory_orthogonality(mem), mem)[0]
    assert g_m2.abs().sum() > 0


def test_usage_stats():
    assert usage_stats(torch.tensor([2, 2, 0, 0])) == pytest.approx((0.5, 2.0))
    assert usage_stats(torch.tensor([5, 5, 5, 5])) == pytest.approx((1.0, 4.0))
    assert usage_stats(torch.tensor([7, 0, 0])) == pytest.approx((1 / 3, 1.0))
    assert usage_stats(torch.zeros(3)) == (0.0, 0.0)
