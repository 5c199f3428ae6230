"""DB-LIPN as the authors' code has it: twin MobileNetV4-class timm branches, cross-EMA, local pretrained weights."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from wsimil_core.api import create_model
from wsimil_core.data.bag import BagBatch
from wsimil_core.errors import CheckpointError, ConfigError
from wsimil_core.methods.ahdmil.prescreen import DBLIPN, load_backbone_weights
from wsimil_core.methods.base import create_method

pytestmark = pytest.mark.usefixtures("torch_one_thread")

ARCH = "timm:mobilenetv4_conv_small_035"  # the narrowest MobileNetV4-conv-small: fast on CPU
SMALL = {"in_dim": 8, "n_classes": 2, "dim": 16, "attn_dim": 8, "cka_degree": 3, "prescreen_arch": ARCH}


def test_default_dblipn_is_twin_mobilenetv4_small_at_1_25x():
    model = create_model("ahdmil", in_dim=8)
    cfg = model.config
    assert cfg.prescreen_arch == "timm:mobilenetv4_conv_small" and cfg.prescreen_factor == 16.0  # 20x -> 1.25x
    pre = model.prescreen
    assert type(pre.branch1).__name__ == "MobileNetV3" and pre.twin  # timm's class of the MobileNetV4 family
    w1, w2 = pre.branch1.state_dict(), pre.branch2.state_dict()
    assert any(not torch.equal(w1[k], w2[k]) for k in w1 if w1[k].is_floating_point())  # independent inits
    assert not DBLIPN("tiny", width=4).twin  # 3x3 and 5x5 branches


def test_cross_ema_formula_and_errors():
    torch.manual_seed(0)
    pre = DBLIPN(ARCH)
    a = {k: v.clone() for k, v in pre.branch1.state_dict().items()}
    b = {k: v.clone() for k, v in pre.branch2.state_dict().items()}
    pre.cross_ema_(0.9)
    new1, new2 = pre.branch1.state_dict(), pre.branch2.state_dict()
    for k in a:
        if a[k].is_floating_point():
            torch.testing.assert_close(new1[k], 0.9 * a[k] + 0.1 * b[k])
            torch.testing.assert_close(new2[k], 0.9 * b[k] + 0.1 * a[k])
        else:
            assert torch.equal(new1[k], a[k]) and torch.equal(new2[k], b[k])  # e.g. BN num_batches_tracked
    with pytest.raises(ConfigError, match="cross-EMA"):
        DBLIPN("tiny", width=4).cross_ema_(0.9)


def lowres_bags(n=2):
    g = torch.Generator().manual_seed(0)
    return [
        BagBatch(
            torch.randn(12, 8, generator=g),
            targets={"label": torch.tensor([i % 2])},
            slide_id=f"s{i}",
            extras={"lowres": torch.randint(0, 256, (12, 16, 16, 3), dtype=torch.uint8, generator=g)},
        )
        for i in range(n)
    ]


def branch_gap(method):
    a, b = method.model.prescreen.branch1.state_dict(), method.model.prescreen.branch2.state_dict()
    return sum(float((a[k] - b[k]).abs().sum()) for k in a if a[k].is_floating_point())


@pytest.mark.parametrize(("momentum", "pulled"), [(0.9, True), (1.0, False)])
def test_prescreen_step_applies_the_cross_ema(momentum, pulled):
    torch.manual_seed(0)
    method = create_method("ahdmil", model=SMALL, options={"cross_ema_momentum": momentum})
    bags = lowres_bags()
    method.setup_phase("prescreen", bags)
    before = branch_gap(method)
    method.after_optimizer_step("prescreen")
    # each difference shrinks by 1 - 2 (1 - m): to 0.8 of the gap at m = 0.9; unchanged at m = 1
    assert branch_gap(method) == pytest.approx(0.8 * before if pulled else before, rel=1e-4)
    method.after_optimizer_step("finetune")  # no cross-EMA outside step 2
    method.train()
    step = method.training_step(bags[0], "prescreen")
    step["loss"].backward()


def test_pretrained_weights_from_a_local_file(tmp_path):
    torch.manual_seed(1)
    source = DBLIPN(ARCH).branch1
    sd = {k: v.clone() for k, v in source.state_dict().items()}
    sd["classifier.weight"] = torch.randn(1000, sd["classifier.weight"].shape[1])  # an ImageNet head
    sd["classifier.bias"] = torch.zeros(1000)
    path = tmp_path / "mnv4.safetensors"
    save_file(sd, str(path))
    torch.manual_seed(0)
    method = create_method("ahdmil", model=SMALL, options={"prescreen_weights": str(path)})
    heads = [b.classifier.weight.clone() for b in (method.model.prescreen.branch1, method.model.prescreen.branch2)]
    method.setup_phase("prescreen", lowres_bags())
    for branch, head in zip((method.model.prescreen.branch1, method.model.prescreen.branch2), heads, strict=True):
        got = branch.state_dict()
        for k, v in sd.items():
            if not k.startswith("classifier."):
                assert torch.equal(got[k], v), k
        assert torch.equal(branch.classifier.weight, head)  # the one-logit head keeps its own init
    with pytest.raises(CheckpointError, match="not found"):
        load_backbone_weights(source, tmp_path / "missing.safetensors")
    save_file({"conv.weight": torch.zeros(3)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="do not fit"):
        load_backbone_weights(source, tmp_path / "other.safetensors")
