"""ABMIL (Ilse et al. 2018): shapes, attention normalisation, masking, config validation, method."""

import pytest
import torch

from wsimil_core.api import create_model, list_models
from wsimil_core.data.bag import BagBatch
from wsimil_core.errors import ConfigError, DataError
from wsimil_core.methods import create_method, list_methods


def _model(**cfg):
    torch.manual_seed(0)
    return create_model("abmil", **{"in_dim": 12, "n_classes": 3, "dim": 16, "attn_dim": 8, **cfg}).eval()


def test_registered():
    assert "abmil" in list_models() and "abmil" in list_methods()
    m = create_model("abmil", in_dim=384, n_classes=2)  # defaults for the rest
    assert m.config.gated and m.config.dim == 256


@pytest.mark.parametrize("gated", [True, False])
def test_single_bag_shapes_and_attention_sums_to_one(gated):
    model = _model(gated=gated)
    out = model(torch.randn(37, 12))
    assert out.logits.shape == (1, 3)
    att = out.maps["attention"]
    assert att.shape == (37,)
    assert torch.all(att >= 0)
    assert att.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert out.extras["embedding"].shape == (1, 16)
    assert out.extras["attention_logits"].shape == (1, 37)


def test_batch_matches_single_bags_and_mask():
    model = _model()
    x = torch.randn(2, 20, 12)
    out = model(x)
    assert out.logits.shape == (2, 3) and out.maps["attention"].shape == (2, 20)
    assert torch.allclose(out.maps["attention"].sum(1), torch.ones(2), atol=1e-5)
    for b in range(2):
        assert torch.allclose(model(x[b]).logits[0], out.logits[b], atol=1e-5)
    # padding: bag 1 has only 7 real patches
    mask = torch.zeros(2, 20, dtype=torch.bool)
    mask[0] = True
    mask[1, :7] = True
    masked = model(x, mask=mask)
    assert torch.all(masked.maps["attention"][1, 7:] == 0)
    assert torch.allclose(masked.logits[1], model(x[1, :7]).logits[0], atol=1e-5)


def test_permutation_invariant_and_attention_equivariant():
    model = _model()
    x = torch.randn(25, 12)
    perm = torch.randperm(25)
    a, b = model(x), model(x[perm])
    assert torch.allclose(a.logits, b.logits, atol=1e-5)
    assert torch.allclose(a.maps["attention"][perm], b.maps["attention"], atol=1e-6)


def test_gradients_reach_every_parameter():
    model = _model(dropout=0.0).train()
    out = model(torch.randn(9, 12))
    torch.nn.functional.cross_entropy(out.logits, torch.tensor([2])).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_bad_input_and_config():
    model = _model()
    with pytest.raises(DataError, match="in_dim=12"):
        model(torch.randn(5, 10))
    with pytest.raises(DataError, match="no patches"):
        model(torch.randn(0, 12))
    with pytest.raises(ConfigError, match="unknown option"):
        create_model("abmil", in_dim=12, n_classes=2, heads=4)
    with pytest.raises(ConfigError, match="dropout"):
        create_model("abmil", in_dim=12, n_classes=2, dropout=1.5)
    with pytest.raises(ConfigError, match="n_classes"):
        create_model("abmil", in_dim=12, n_classes=1)
    with pytest.raises(ConfigError, match="dim"):
        create_model("abmil", in_dim=12, n_classes=2, dim=0)


def test_method_is_cross_entropy_and_learns():
    torch.manual_seed(0)
    method = create_method("abmil", model={"in_dim": 6, "n_classes": 2, "dim": 16, "attn_dim": 8, "dropout": 0.0})
    assert method.model.model_name == "abmil" and method.phases == ("train",)
    with pytest.raises(ConfigError, match="option"):
        create_method("abmil", model={"in_dim": 6, "n_classes": 2}, options={"lr": 1})
    # positive bags contain one shifted "key instance"
    bags = []
    for i in range(16):
        x = torch.randn(10, 6)
        y = i % 2
        if y:
            x[i % 10] += 3.0
        bags.append(BagBatch(features=x, targets={"label": torch.tensor([y])}))
    opt = torch.optim.Adam(method.trainable_parameters("train"), lr=1e-2)
    first = None
    for _epoch in range(15):
        total = 0.0
        for bag in bags:
            step = method.training_step(bag, "train")
            opt.zero_grad()
            step["loss"].backward()
            opt.step()
            total += step["loss"].item()
        first = first if first is not None else total
    assert total < first * 0.5
