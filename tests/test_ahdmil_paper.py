"""AHDMIL as the authors' code has it: per-class masks, instance loss (smooth top-1 SVM), loss weights, old
checkpoints keeping their architecture."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from wsimil_core.api import create_model
from wsimil_core.data.bag import BagBatch
from wsimil_core.engine.checkpoint import load_checkpoint, save_checkpoint
from wsimil_core.functional import smooth_top1_svm_loss
from wsimil_core.methods.ahdmil.instance import instance_loss
from wsimil_core.methods.base import create_method

pytestmark = pytest.mark.usefixtures("torch_one_thread")

SMALL = {"in_dim": 8, "n_classes": 2, "dim": 16, "attn_dim": 8, "cka_degree": 3, "prescreen_arch": "tiny",
         "prescreen_width": 4}  # fmt: skip


# --- smooth top-1 SVM ------------------------------------------------------------------------------------
def hand_svm(scores: list[list[float]], labels: list[int], alpha: float, tau: float) -> float:
    """tau * log sum_j exp((alpha [j != y] + s_j - s_y) / tau), averaged, with math only."""
    total = 0.0
    for s, y in zip(scores, labels, strict=True):
        terms = [math.exp(((alpha if j != y else 0.0) + s[j] - s[y]) / tau) for j in range(len(s))]
        total += tau * math.log(sum(terms))
    return total / len(scores)


@pytest.mark.parametrize(("alpha", "tau"), [(1.0, 1.0), (0.5, 0.3), (2.0, 4.0)])
def test_smooth_top1_svm_matches_hand_computation(alpha, tau):
    scores = [[0.2, -1.0], [1.5, 0.3], [-0.4, 2.2], [0.0, 0.0]]
    labels = [0, 1, 1, 0]
    got = smooth_top1_svm_loss(torch.tensor(scores, dtype=torch.float64), torch.tensor(labels), alpha, tau)
    assert float(got) == pytest.approx(hand_svm(scores, labels, alpha, tau), abs=1e-12)


def test_smooth_top1_svm_limits_and_errors():
    s = torch.tensor([[3.0, 0.1, -2.0], [0.0, 0.4, 0.2]], dtype=torch.float64)
    y = torch.tensor([0, 2])
    hinge = np.mean([max(3.0, 1 + 0.1, 1 - 2.0) - 3.0, max(1 + 0.0, 1 + 0.4, 0.2) - 0.2])
    assert float(smooth_top1_svm_loss(s, y, 1.0, 1e-4)) == pytest.approx(hinge, abs=1e-3)  # tau -> 0: hinge
    assert float(smooth_top1_svm_loss(s, y, 1.0, 1.0)) >= hinge
    s.requires_grad_(True)
    smooth_top1_svm_loss(s, y).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="tau"):
        smooth_top1_svm_loss(s, y, tau=0.0)
    with pytest.raises(ValueError, match="target"):
        smooth_top1_svm_loss(s, torch.tensor([0]))


# --- instance loss ---------------------------------------------------------------------------------------
class Fixed(torch.nn.Module):
    """An instance classifier scoring patch ``k`` as ``[0, h_k0]`` (so the chosen patches can be read back)."""

    def forward(self, h):
        return torch.stack([torch.zeros_like(h[:, 0]), h[:, 0]], dim=1)


def test_instance_loss_top_and_bottom_patches():
    n = 10
    h = torch.arange(n, dtype=torch.float64).view(n, 1) / 10.0  # patch k's score is k / 10
    s = torch.stack([torch.linspace(1, 0, n), torch.linspace(0, 1, n)], dim=1).double()  # class 1 ranks by k
    clfs = torch.nn.ModuleList([Fixed(), Fixed()])
    k = 3
    # label 1: top-3 patches of class 1 (k = 9, 8, 7) are positives, bottom-3 (0, 1, 2) negatives
    top, bottom = [9, 8, 7], [0, 1, 2]
    want = hand_svm([[0.0, i / 10] for i in top + bottom], [1] * 3 + [0] * 3, 1.0, 1.0)
    assert float(instance_loss(h, s, clfs, 1, k)) == pytest.approx(want, abs=1e-12)
    # subtyping adds class 0's top-3 (patches 0, 1, 2) as negatives, and averages over the classes
    extra = hand_svm([[0.0, i / 10] for i in (0, 1, 2)], [0, 0, 0], 1.0, 1.0)
    assert float(instance_loss(h, s, clfs, 1, k, subtyping=True)) == pytest.approx((want + extra) / 2, abs=1e-12)
    # only allowed patches are candidates; k shrinks to half of them
    allowed = torch.zeros(n, dtype=torch.bool)
    allowed[[2, 5, 6, 9]] = True
    want_allowed = hand_svm([[0.0, i / 10] for i in (9, 6, 2, 5)], [1, 1, 0, 0], 1.0, 1.0)
    assert float(instance_loss(h, s, clfs, 1, k, allowed=allowed)) == pytest.approx(want_allowed, abs=1e-12)
    assert float(instance_loss(h[:1], s[:1], clfs, 1, k)) == 0.0


# --- per-class masks -------------------------------------------------------------------------------------
def test_per_class_masks_act_on_each_class_attention_logits():
    torch.manual_seed(0)
    model = create_model("ahdmil", **SMALL).eval()
    assert model.config.mask_mode == "per_class"
    with torch.no_grad():
        model.dmin.w.bias.zero_()
    out = model.dmin(torch.randn(1, 30, 8))
    s = out["attention_logits"][0]  # [N, C]
    assert out["mask_logits"].shape == (1, 30, 2)
    torch.testing.assert_close(out["mask_logits"][0], s)  # eval mode: the mask logits are the attention logits
    want = (torch.sigmoid(s / 0.7) > 0.5).float()  # tau 0.7, threshold 0.5, no noise at inference
    assert torch.equal(out["class_mask"][0].detach(), want)
    assert 0 < float(want.mean()) < 1 and not torch.equal(want[:, 0], want[:, 1])
    a = out["attention_selected"][0]
    for c in (0, 1):  # class c's attention is a softmax over exactly the patches of class c's mask
        on = want[:, c] > 0
        e = torch.exp(s[on, c] - s[on, c].max())
        torch.testing.assert_close(a[on, c], e / e.sum())
        assert float(a[~on, c].detach().abs().sum()) == 0.0


def test_per_class_mask_gradient_reaches_only_its_class_branch():
    torch.manual_seed(0)
    model = create_model("ahdmil", **SMALL, dropout=0.0).train()
    out = model.dmin(torch.randn(1, 20, 8), sample=True)
    out["class_mask"][..., 0].sum().backward()
    g = model.dmin.w.weight.grad
    assert g[0].abs().sum() > 0 and float(g[1].abs().sum()) == 0.0  # straight-through into class 0's row only


def test_shared_mask_option_is_one_mask_for_every_class():
    torch.manual_seed(0)
    model = create_model("ahdmil", **SMALL, mask_mode="shared").eval()
    assert model.dmin.w.out_features == 3  # C attention branches + the shared relevance logit
    with torch.no_grad():
        model.dmin.w.bias.zero_()
    out = model.dmin(torch.randn(1, 30, 8))
    assert out["class_mask"].shape == (1, 30, 1)
    r = out["mask_logits"][0, :, 0]
    torch.testing.assert_close(r, out["relevance_logits"][0])
    assert torch.equal(out["mask"][0].detach(), (torch.sigmoid(r / 0.7) > 0.5).float())


# --- loss weights ----------------------------------------------------------------------------------------
def bag(n=24, y=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return BagBatch(torch.randn(n, 8, generator=g), targets={"label": torch.tensor([y])}, slide_id="s")


def test_default_loss_weights_are_the_authors_and_rate_is_per_class_mse():
    torch.manual_seed(0)
    method = create_method("ahdmil", model=SMALL)
    o = method.options
    assert (o.w_ce, o.w_instance, o.w_kl, o.w_feat, o.w_rate, o.target_keep) == (0.7, 0.3, 0.5, 0.5, 2.0, 0.6)
    method.setup_phase("self_distill", [bag()])
    method.eval()  # no sampling noise, no dropout: the sampled and the deterministic masks agree
    b = bag()
    step = method.training_step(b, "self_distill")
    want = 0.7 * step["ce"] + 0.3 * step["instance"] + 0.5 * step["kl"] + 0.5 * step["feat_mse"] + 2 * step["rate"]
    assert float(step["loss"].detach()) == pytest.approx(float(want), rel=1e-5)
    assert float(step["instance"]) > 0
    with torch.no_grad():
        out = method.model.dmin(b.features[None])
    rates = (torch.sigmoid(out["attention_logits"][0] / 0.7) > 0.5).float().mean(0)  # per-class kept fraction
    assert float(step["rate"]) == pytest.approx(float(((rates - 0.6) ** 2).mean()), abs=1e-6)


def test_instance_loss_switch_trains_the_instance_classifiers():
    for w, trained in ((0.3, True), (0.0, False)):
        torch.manual_seed(0)
        method = create_method("ahdmil", model=SMALL, options={"w_instance": w})
        method.setup_phase("self_distill", [bag()])
        method.train()
        method.training_step(bag(), "self_distill")["loss"].backward()
        grads = [p.grad for p in method.model.dmin.instance_classifiers.parameters()]
        assert any(g is not None and g.abs().sum() > 0 for g in grads) == trained


# --- old checkpoints -------------------------------------------------------------------------------------
def test_checkpoint_without_new_fields_loads_the_old_architecture(tmp_path):
    torch.manual_seed(0)
    old = create_model("ahdmil", **SMALL, mask_mode="shared", cka_layernorm=True, instance_classifiers=False)
    stored = {k: v for k, v in vars(old.config).items() if k not in ("mask_mode", "cka_layernorm",
                                                                      "instance_classifiers")}  # fmt: skip
    path = tmp_path / "old.safetensors"
    save_checkpoint(path, old, {"model_name": "ahdmil", "model_config": stored, "targets": ["label"]})
    model, meta = load_checkpoint(path)
    assert model.config.mask_mode == "shared" and model.config.cka_layernorm
    assert model.dmin.instance_classifiers is None
    x = torch.randn(25, 8)
    torch.testing.assert_close(model(x).logits, old.eval()(x).logits)
    new = create_model("ahdmil", **SMALL)  # a new checkpoint stores every field: it keeps the new defaults
    save_checkpoint(tmp_path / "new.safetensors", new, {"targets": ["label"]})
    assert load_checkpoint(tmp_path / "new.safetensors")[0].config.mask_mode == "per_class"


def test_paper_config_loads_with_the_authors_values():
    from pathlib import Path

    from wsimil_core.engine.config import load_config

    path = Path(__file__).resolve().parents[1] / "configs" / "ahdmil_paper.yaml"
    cfg = load_config(path)
    method = create_method("ahdmil", model={**cfg.model, "in_dim": 8, "prescreen_arch": "tiny"},
                           options=cfg.method.options)  # fmt: skip
    o, m = method.options, method.model.config
    assert (o.w_ce, o.w_instance, o.w_kl, o.w_feat, o.w_rate, o.target_keep) == (0.7, 0.3, 0.5, 0.5, 2.0, 0.6)
    assert (m.mask_mode, m.tau, m.mask_threshold, m.cka_degree, m.cka_layernorm) == ("per_class", 0.7, 0.5, 12, False)
    assert m.head == "cka" and m.instance_classifiers
    text = path.read_text()
    for line in text.splitlines():  # every value cites its source
        if ":" in line and not line.lstrip().startswith("#") and not line.rstrip().endswith(":"):
            assert "# [" in line, line
    assert cfg.train.phase_lr == {"finetune": 2e-5} and o.cross_ema_momentum == 0.99
    assert cfg.model["prescreen_arch"] == "timm:mobilenetv4_conv_small" and cfg.model["prescreen_factor"] == 16.0


def test_checkpoint_written_before_issue_13_loads_and_predicts_as_then():
    """tests/data/checkpoint_ahdmil_before_issue13.safetensors: written by the code before per-class masks (shared
    relevance mask, LayerNorm before the CKA head, no instance classifiers, tiny DB-LIPN at factor 4); its
    logits and keep map on this input were recorded with that code."""
    from pathlib import Path

    path = Path(__file__).parent / "data" / "checkpoint_ahdmil_before_issue13.safetensors"
    model, meta = load_checkpoint(path)
    cfg = model.config
    assert (cfg.mask_mode, cfg.cka_layernorm, cfg.instance_classifiers) == ("shared", True, False)
    assert (cfg.prescreen_arch, cfg.prescreen_factor) == ("tiny", 4.0)
    x = torch.linspace(-2, 2, 20 * 8).reshape(20, 8).sin() * 2
    out = model(x)
    torch.testing.assert_close(out.logits, torch.tensor([[-0.21460670232772827, -0.2744302451610565]]))
    assert out.maps["dmin/keep"].tolist() == [0.0] * 7 + [1.0] * 13
