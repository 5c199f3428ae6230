"""DESIGN.md's model contract, checked for every registered model: defaults from (in_dim, n_classes | tasks),
one bag [N, D] in, MILOutput out with [B, C] logits and maps aligned with the input patch order."""

from __future__ import annotations

import pytest
import torch

from wsimil_core.api import MILOutput, create_model, list_models

# Private names ("_tiny") are test doubles registered by other test modules; abmilx_e2e takes pixels.
FEATURE_MODELS = [name for name in list_models() if not name.startswith("_") and name != "abmilx_e2e"]


def _build(name: str, in_dim: int = 24):
    if name == "mecds":
        return create_model(name, in_dim=in_dim, tasks={"a": 2, "b": 3})
    return create_model(name, in_dim=in_dim, n_classes=2)


def _bag(n: int = 30, d: int = 24, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    # Distinct, irregular positions: no ties in neighbour distances (graph models), so order cannot matter.
    coords = torch.randperm(10_000, generator=g)[: 2 * n].reshape(n, 2) * 7
    return x, coords.long()


@pytest.mark.parametrize("name", FEATURE_MODELS)
def test_every_model_follows_the_output_contract(name):
    torch.manual_seed(0)
    model = _build(name).eval()
    x, coords = _bag()
    with torch.no_grad():
        out = model(x, coords=coords)
    assert isinstance(out, MILOutput)
    logits = out.logits if isinstance(out.logits, dict) else {"label": out.logits}
    for task, t in logits.items():
        assert t.dim() == 2 and t.shape[0] == 1, (task, t.shape)
        assert torch.isfinite(t).all()
    if name == "mecds":
        assert {k: v.shape[1] for k, v in logits.items()} == {"a": 2, "b": 3}
    else:
        assert logits["label"].shape == (1, 2)
    assert "attention" in out.maps or any(k.startswith("attention/") for k in out.maps)
    for map_name, value in out.maps.items():
        assert value.shape[0] == x.shape[0], f"{name}: map {map_name!r} is not aligned with the bag"


@pytest.mark.parametrize("name", FEATURE_MODELS)
def test_maps_follow_the_input_patch_order(name):
    torch.manual_seed(0)
    model = _build(name).eval()
    x, coords = _bag()
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = model(x, coords=coords).maps
        b = model(x[perm], coords=coords[perm]).maps
    key = "attention" if "attention" in a else sorted(k for k in a if k.startswith("attention/"))[0]
    torch.testing.assert_close(a[key][perm].float(), b[key].float(), rtol=1e-4, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("name", FEATURE_MODELS)
def test_feature_dimension_mismatch_is_a_clear_error(name):
    from wsimil_core.errors import WsimilError

    model = _build(name).eval()
    x, coords = _bag(d=17)
    with pytest.raises((WsimilError, ValueError)) as info:
        model(x, coords=coords)
    assert "17" in str(info.value) or "dim" in str(info.value)
