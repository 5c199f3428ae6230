"""GATv2 over a regular neighbour matrix (``functional.gatv2_attention``, ``nn.GATv2Layer``) against an independent
implementation: torch_geometric's scatter-based ``GATv2Conv`` on the same graph as an edge list, same weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wsimil_core.functional.graph import gatv2_attention, knn_neighbors
from wsimil_core.nn.gatv2 import GATv2Layer

GATv2Conv = pytest.importorskip("torch_geometric.nn").GATv2Conv


def edge_index(neighbors: torch.Tensor) -> torch.Tensor:
    n, k = neighbors.shape
    return torch.stack([neighbors.reshape(-1), torch.arange(n).repeat_interleave(k)])


def pair(n_heads: int = 4, head_dim: int = 8, in_dim: int = 16, dropout: float = 0.0):
    torch.manual_seed(0)
    ours = GATv2Layer(in_dim, head_dim, n_heads=n_heads, dropout=dropout)
    ref = GATv2Conv(in_dim, head_dim, heads=n_heads, concat=True, dropout=dropout, add_self_loops=True)
    missing = ref.load_state_dict(ours.state_dict(), strict=True)  # the same parameter names and shapes
    assert not missing.missing_keys and not missing.unexpected_keys
    return ours, ref


@pytest.mark.parametrize("n,k,chunk", [(50, 8, 7), (50, 8, 1024), (3, 8, 2), (1, 8, 4)])
def test_matches_torch_geometric_forward_and_gradients(n, k, chunk):
    ours, ref = pair()
    rng = np.random.default_rng(n)
    coords = torch.from_numpy(rng.integers(0, 40, size=(n, 2)))  # duplicated positions happen at this density
    nb = knn_neighbors(coords, k)
    x = torch.randn(n, 16, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    h, c = ours.n_heads, ours.head_dim
    out = gatv2_attention(ours.lin_l(x).view(-1, h, c), ours.lin_r(x).view(-1, h, c), ours.att, nb, chunk=chunk)
    out = out.reshape(n, -1) + ours.bias
    want = ref(x_ref, edge_index(nb))
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours(x, nb), want, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(want)
    (out * g).sum().backward()
    (want * g).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-6)
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, dict(ref.named_parameters())[name].grad, rtol=1e-4, atol=1e-6)


def test_initialisation_matches_torch_geometric_in_distribution():
    ours, ref = GATv2Layer(256, 64, n_heads=4), GATv2Conv(256, 64, heads=4)
    for name, p in ref.named_parameters():
        q = dict(ours.named_parameters())[name]
        assert q.shape == p.shape
        if name == "bias":
            assert not q.detach().any() and not p.detach().any()
        else:  # same uniform bounds: the extremes agree within a few percent
            assert float(q.detach().abs().max()) == pytest.approx(float(p.detach().abs().max()), rel=0.05)


def test_dropout_acts_on_the_attention_coefficients():
    ours, _ = pair(dropout=1.0)
    x, nb = torch.randn(20, 16), knn_neighbors(torch.randn(20, 2), 4)
    ours.train()
    torch.testing.assert_close(ours(x, nb), ours.bias.expand(20, -1))  # every message dropped: the bias alone
    ours.eval()
    assert not torch.allclose(ours(x, nb), ours.bias.expand(20, -1))


def test_each_patch_attends_only_to_itself_and_its_neighbours():
    ours, _ = pair()
    x, nb = torch.randn(30, 16), knn_neighbors(torch.randn(30, 2), 3)
    base = ours(x, nb)
    far = [j for j in range(30) if j != 0 and j not in nb[0].tolist()][0]
    x2 = x.clone()
    x2[far] += 10.0
    assert torch.equal(ours(x2, nb)[0], base[0])  # patch 0 does not see a non-neighbour
    x3 = x.clone()
    x3[int(nb[0, 0])] += 10.0
    assert not torch.allclose(ours(x3, nb)[0], base[0])  # but sees its neighbour


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="neighbors"):
        gatv2_attention(
            torch.zeros(5, 2, 3), torch.zeros(5, 2, 3), torch.zeros(2, 3), torch.zeros(4, 2, dtype=torch.long)
        )
    with pytest.raises(ValueError, match="same shape"):
        gatv2_attention(
            torch.zeros(5, 2, 3), torch.zeros(5, 2, 4), torch.zeros(2, 3), torch.zeros(5, 2, dtype=torch.long)
        )


def test_no_grad_path_equals_autograd_path():
    ours, _ = pair()
    x, nb = torch.randn(40, 16), knn_neighbors(torch.randn(40, 2), 8)
    h, c = ours.n_heads, ours.head_dim
    with torch.no_grad():
        xs, xd = ours.lin_l(x).view(-1, h, c), ours.lin_r(x).view(-1, h, c)
        fast = gatv2_attention(xs, xd, ours.att, nb, chunk=7)
    slow = gatv2_attention(xs.requires_grad_(True), xd, ours.att, nb, chunk=7)
    assert slow.requires_grad
    torch.testing.assert_close(fast, slow.detach(), rtol=1e-6, atol=1e-6)
