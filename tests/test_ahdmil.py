"""AHDMIL: Chebyshev basis and CKA layer, DMIN's straight-through mask, the three training phases, fast inference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from numpy.polynomial import chebyshev as npcheb
from torch import nn

from wsimil_core.api import create_model
from wsimil_core.data.bag import BagBatch
from wsimil_core.errors import ConfigError, DataError
from wsimil_core.functional import chebyshev_basis
from wsimil_core.methods.ahdmil.model import gumbel_sigmoid_mask, masked_attention
from wsimil_core.methods.base import create_method
from wsimil_core.nn.kan import ChebyshevKAN, ClasswiseHead, make_head

pytestmark = pytest.mark.usefixtures("torch_one_thread")  # tiny tensors: one thread is fastest (conftest)


SMALL = {"in_dim": 16, "n_classes": 2, "dim": 32, "attn_dim": 16, "cka_degree": 4, "prescreen_arch": "tiny",
         "prescreen_width": 4, "prescreen_factor": 4.0}  # fmt: skip


# --- Chebyshev basis and CKA layer -------------------------------------------------------------------------
@pytest.mark.parametrize("degree", [0, 1, 2, 5, 12, 16])
def test_chebyshev_basis_matches_numpy(degree):
    x = np.linspace(-1.0, 1.0, 41)
    ours = chebyshev_basis(torch.from_numpy(x), degree).numpy()
    assert ours.shape == (41, degree + 1)
    np.testing.assert_allclose(ours, npcheb.chebvander(x, degree), atol=1e-10)
    for k in range(degree + 1):  # column k is chebval with the k-th unit coefficient vector
        np.testing.assert_allclose(ours[:, k], npcheb.chebval(x, np.eye(degree + 1)[k]), atol=1e-10)


def test_chebyshev_basis_shapes_and_errors():
    x = torch.rand(2, 3, 4) * 2 - 1
    assert chebyshev_basis(x, 3).shape == (2, 3, 4, 4)
    np.testing.assert_allclose(
        chebyshev_basis(torch.cos(torch.tensor([0.3])), 7)[0].numpy(), np.cos(np.arange(8) * 0.3), atol=1e-6
    )  # T_k(cos t) = cos(k t)
    with pytest.raises(ValueError, match="degree"):
        chebyshev_basis(x, -1)


def test_chebyshev_kan_equals_explicit_formula():
    torch.manual_seed(0)
    layer = ChebyshevKAN(5, 3, degree=4).double()
    x = torch.randn(7, 5, dtype=torch.float64)
    y = layer(x).detach().numpy()
    u = np.tanh(x.numpy())
    c = layer.coeffs.detach().numpy()  # [in, out, K+1]
    want = np.zeros((7, 3))
    for o in range(3):
        for i in range(5):
            want[:, o] += npcheb.chebval(u[:, i], c[i, o])
    np.testing.assert_allclose(y, want, atol=1e-10)
    assert isinstance(make_head("linear", 5, 3), nn.Linear)
    assert isinstance(make_head("cka", 5, 3), ChebyshevKAN)
    with pytest.raises(ValueError):
        make_head("mlp", 5, 3)


@pytest.mark.parametrize("layernorm", [False, True])
def test_classwise_head_one_function_per_class(layernorm):
    torch.manual_seed(0)
    head = ClasswiseHead(6, 3, "cka", degree=3, layernorm=layernorm).double()
    assert isinstance(head.norm, nn.LayerNorm) == layernorm  # AHDMIL's head: tanh straight on z (no LayerNorm)
    assert "bias" not in dict(head.named_parameters())
    z = torch.rand(2, 3, 6, dtype=torch.float64) * 2
    out = head(z).detach().numpy()
    c = head.coeffs.detach().numpy()
    assert c.shape == (3, 6, 4)  # per class: (in, degree + 1), i.e. a ChebyshevKAN(in, 1, degree)
    zn = z.numpy()
    if layernorm:
        zn = (zn - zn.mean(-1, keepdims=True)) / np.sqrt(zn.var(-1, keepdims=True) + 1e-5)  # LayerNorm (init affine)
    for b in range(2):
        for k in range(3):
            want = sum(npcheb.chebval(np.tanh(zn[b, k, i]), c[k, i]) for i in range(6))
            assert out[b, k] == pytest.approx(want, abs=1e-10)
    lin = ClasswiseHead(6, 3, "linear")
    assert lin(z.float()).shape == (2, 3)


# --- DMIN ------------------------------------------------------------------------------------------------
def test_straight_through_mask_is_hard_with_nonzero_gradients():
    torch.manual_seed(0)
    r = torch.randn(50, requires_grad=True)
    mask, soft = gumbel_sigmoid_mask(r, tau=0.7, threshold=0.5, sample=True)
    assert set(mask.detach().unique().tolist()) <= {0.0, 1.0}
    (mask * torch.arange(1.0, 51.0)).sum().backward()
    assert r.grad is not None and bool((r.grad != 0).all())
    det, _ = gumbel_sigmoid_mask(r.detach(), 0.7, 0.5, sample=False)
    assert torch.equal(det, (r.detach() > 0).float())


def test_mask_gradient_reaches_the_relevance_branch():
    torch.manual_seed(0)
    model = create_model("ahdmil", **SMALL)
    out = model.dmin(torch.randn(1, 30, 16), sample=True)
    out["logits_selected"].sum().backward()
    grad = model.dmin.w.weight.grad[-1]  # the relevance logit's row
    assert grad.abs().sum() > 0


def test_masked_attention_ignores_pruned_patches():
    s = torch.randn(1, 6, 2)
    w = torch.tensor([[1.0, 0, 1, 0, 0, 1]])
    a = masked_attention(s, w)
    assert torch.allclose(a.sum(1), torch.ones(1, 2))
    assert (a[0, w[0] == 0] == 0).all()
    want = torch.softmax(s[0, w[0] > 0], dim=0)
    assert torch.allclose(a[0, w[0] > 0], want, atol=1e-6)


@pytest.mark.parametrize("mask_mode", ["per_class", "shared"])
def test_model_maps_nan_where_pruned_and_keep_restriction(mask_mode):
    torch.manual_seed(0)
    model = create_model("ahdmil", **SMALL, mask_mode=mask_mode).eval()
    with torch.no_grad():
        model.dmin.w.bias.zero_()
    x = torch.randn(40, 16)
    out = model(x)
    assert out.logits.shape == (1, 2)
    keep = out.maps["dmin/keep"] > 0
    class_keep = out.extras["class_mask"][0] > 0  # [N, C] per class, [N, 1] shared
    assert class_keep.shape == (40, 2 if mask_mode == "per_class" else 1)
    assert torch.equal(keep, class_keep.any(-1))  # a patch is kept when any class keeps it
    assert set(out.maps) >= {"attention", "attention/class0", "attention/class1", "relevance", "dmin/keep"}
    for c in (0, 1):
        on = class_keep[:, min(c, class_keep.shape[1] - 1)]
        a = out.maps[f"attention/class{c}"]
        assert a.shape == (40,)
        assert torch.isnan(a[~on]).all() and not torch.isnan(a[on]).any()
        assert torch.allclose(a[on].sum(), torch.tensor(1.0), atol=1e-5)
    if mask_mode == "per_class":  # the two classes' masks differ: each class prunes its own patches
        assert not torch.equal(class_keep[:, 0], class_keep[:, 1])
    restrict = torch.zeros(40, dtype=torch.bool)
    restrict[:10] = True
    out2 = model(x, keep=restrict)
    assert torch.isnan(out2.maps["attention"][10:]).all()
    assert out2.extras["attention_full"][0, 10:].abs().sum() == 0
    assert model(torch.randn(2, 8, 16)).logits.shape == (2, 2)


@pytest.mark.parametrize(
    "bad",
    [
        {"head": "mlp"},
        {"tau": 0},
        {"mask_threshold": 1.5},
        {"prescreen_arch": "vgg"},
        {"prescreen_factor": 0.5},
        {"n_classes": 1},
    ],
)
def test_config_validation(bad):
    with pytest.raises(ConfigError):
        create_model("ahdmil", **{**SMALL, **bad})


# --- training phases ---------------------------------------------------------------------------------------
def make_bags(n: int = 12, dim: int = 16, seed: int = 0, lowres: bool = False) -> list[BagBatch]:
    """Positive bags hold 4 patches shifted on dims 0-3; low-res twins are dark exactly where dims 0-3 are high."""
    rng = np.random.default_rng(seed)
    bags = []
    for i in range(n):
        y = i % 2
        m = int(rng.integers(20, 36))
        x = rng.normal(size=(m, dim)).astype(np.float32)
        if y:
            x[rng.choice(m, 4, replace=False), :4] += 3.0
        extras = {}
        if lowres:
            level = np.where(x[:, 0] > 0, 60, 220).astype(np.uint8)
            extras["lowres"] = torch.from_numpy(np.broadcast_to(level[:, None, None, None], (m, 8, 8, 3)).copy())
        bags.append(
            BagBatch(torch.from_numpy(x), targets={"label": torch.tensor([y])}, slide_id=f"s{i}", extras=extras)
        )
    return bags


def run_phase(method, phase, bags, epochs, lr=2e-3):
    method.setup_phase(phase, bags)
    opt = torch.optim.Adam(method.trainable_parameters(phase), lr=lr)
    logs = []
    for _ in range(epochs):
        method.train()
        for bag in bags:
            step = method.training_step(bag, phase)
            opt.zero_grad()
            step["loss"].backward()
            opt.step()
            logs.append({k: float(v.detach()) for k, v in step.items()})
    return logs


def eval_keep_fraction(method, bags):
    method.eval()
    with torch.no_grad():
        return float(np.mean([float((method.model.dmin(b.features[None])["mask"] > 0).float().mean()) for b in bags]))


def test_self_distillation_kept_fraction_converges_to_target():
    torch.manual_seed(0)
    bags = make_bags()
    method = create_method("ahdmil", model=SMALL, options={"target_keep": 0.6})
    assert method.phases == ("self_distill", "prescreen", "finetune")
    assert eval_keep_fraction(method, bags) == 1.0  # starts from the full bag
    method.setup_phase("self_distill", bags)
    opt = torch.optim.Adam(method.trainable_parameters("self_distill"), lr=5e-3)
    fractions = []
    for _ in range(12):
        method.train()
        for bag in bags:
            step = method.training_step(bag, "self_distill")
            opt.zero_grad()
            step["loss"].backward()
            opt.step()
        fractions.append(eval_keep_fraction(method, bags))
    assert {"ce", "kl", "feat_mse", "rate", "keep_fraction"} <= set(step)
    frac = float(np.mean(fractions[-4:]))  # bags of 20-35 patches: the fraction moves by a few % per step
    assert abs(frac - 0.6) < 0.12, fractions


def test_prescreen_phase_trains_only_dblipn_and_learns_the_mask():
    torch.manual_seed(0)
    bags = make_bags(n=8, lowres=True)
    method = create_method("ahdmil", model=SMALL, options={"w_logit": 0.0})
    with torch.no_grad():  # a DMIN whose relevance is "dim 0 is high": r = 4 * x_0 through the embedding
        method.model.dmin.w.bias.zero_()
    dmin_before = {k: v.clone() for k, v in method.model.dmin.state_dict().items()}
    pre_before = {k: v.clone() for k, v in method.model.prescreen.state_dict().items()}
    logs = run_phase(method, "prescreen", bags, epochs=6, lr=5e-3)
    for k, v in method.model.dmin.state_dict().items():
        assert torch.equal(v, dmin_before[k]), k
    assert any(not torch.equal(v, pre_before[k]) for k, v in method.model.prescreen.state_dict().items())
    assert all(p.requires_grad is False for p in method.model.dmin.parameters())
    first = np.mean([r["l1_mask"] for r in logs[:8]])
    last = np.mean([r["l1_mask"] for r in logs[-8:]])
    assert last < first


def test_finetune_phase_uses_prescreen_keep_and_trains_dmin():
    torch.manual_seed(0)
    bags = make_bags(n=4, lowres=True)
    method = create_method("ahdmil", model=SMALL)
    with torch.no_grad():  # DB-LIPN keeps nothing -> at least one patch kept
        for branch in (method.model.prescreen.branch1, method.model.prescreen.branch2):
            branch[-1].bias.fill_(-50.0)
    method.setup_phase("finetune", bags)
    assert all(p.requires_grad for p in method.model.dmin.parameters())
    assert not any(p.requires_grad for p in method.model.prescreen.parameters())
    step = method.training_step(bags[0], "finetune")
    assert float(step["prescreen_keep_fraction"]) == pytest.approx(1 / bags[0].features.shape[0])
    step["loss"].backward()
    assert method.model.dmin.embed[0].weight.grad.abs().sum() > 0


def test_missing_lowres_images_is_a_clear_error():
    method = create_method("ahdmil", model=SMALL)
    bag = make_bags(n=1)[0]
    with pytest.raises(DataError, match="low-resolution"):
        method.training_step(bag, "prescreen")


class Brightness(nn.Module):
    """A stand-in DB-LIPN: logit ``sign * (128 - mean grey level) / 10`` (keeps dark twins for sign 1)."""

    def __init__(self, sign: float = 1.0):
        super().__init__()
        self.sign = sign

    def forward(self, images):
        return self.sign * (128.0 - images.float().mean(dim=(1, 2, 3))) / 10.0


def test_eval_forward_is_the_prescreened_pipeline():
    """Validation/test run DB-LIPN -> keep mask -> DMIN on the kept patches (as predict_slide does)."""
    torch.manual_seed(0)
    bags = make_bags(n=3, lowres=True)
    method = create_method("ahdmil", model=SMALL)
    method.model.prescreen = Brightness()
    method.setup_phase("finetune", bags)
    method.eval()
    model = method.model
    for bag in bags:
        with torch.no_grad():
            out = method.eval_forward(bag)
            q = model.prescreen(bag.extras["lowres"]).float()
            keep = torch.sigmoid(q) > model.config.prescreen_threshold
            if not keep.any():
                keep[q.argmax()] = True
            kept = model(bag.features[keep])  # independent: DMIN run on the kept sub-bag only
            full = model(bag.features)
        assert torch.equal(keep, bag.features[:, 0] > 0)  # the dark twins are those with a high dim 0
        assert 0 < int(keep.sum()) < len(keep)
        assert torch.allclose(out.logits, kept.logits, atol=1e-5)
        assert not torch.allclose(out.logits, full.logits, atol=1e-5)
        assert out.maps["attention"].shape == (len(keep),) and out.maps["attention"][~keep].isnan().all()
    # DMIN on every patch is reported beside it
    models = method.evaluation_models()
    assert set(models) == {"online", "all_patches"} and models["online"] is model
    with torch.no_grad():
        beside = method.eval_forward(bags[0], models["all_patches"])
        assert torch.allclose(beside.logits, model(bags[0].features).logits)
    # the given model's own DB-LIPN is used (e.g. the best checkpoint on the test split)
    other = create_model("ahdmil", **SMALL).eval()
    other.prescreen = Brightness(-1.0)  # keeps the light twins
    with torch.no_grad():
        q = other.prescreen(bags[0].extras["lowres"]).float()
        keep = torch.sigmoid(q) > other.config.prescreen_threshold
        if not keep.any():
            keep[q.argmax()] = True
        got = method.eval_forward(bags[0], other).logits
        assert torch.allclose(got, other(bags[0].features[keep]).logits, atol=1e-5)


def test_eval_forward_during_self_distillation_and_without_slide_files():
    torch.manual_seed(0)
    bags = make_bags(n=2, lowres=True)
    method = create_method("ahdmil", model=SMALL)
    method.setup_phase("self_distill", bags)
    method.eval()
    assert set(method.evaluation_models()) == {"online"}  # DB-LIPN untrained: no pre-screened figure yet
    with torch.no_grad():
        assert torch.equal(method.eval_forward(bags[0]).logits, method.model(bags[0].features).logits)
    # a feature-only cohort (no slide path, no twins): DMIN on every patch, one warning
    method.setup_phase("finetune", bags)
    plain = make_bags(n=2)
    with pytest.warns(UserWarning, match="'s0' has no slide file") as record:
        with torch.no_grad():
            outs = [method.eval_forward(b) for b in plain]
    assert len(record) == 1
    for b, out in zip(plain, outs):
        assert torch.allclose(out.logits, method.model(b.features).logits)


# --- fast inference from a slide file ----------------------------------------------------------------------
class CountingEncoder(nn.Module):
    """A tiny encoder that records how many patch images it encoded."""

    def __init__(self, dim: int = 16):
        super().__init__()
        self.conv = nn.Conv2d(3, dim, 3, stride=4)
        self.seen = 0

    def forward(self, x):
        self.seen += x.shape[0]
        return self.conv(x).mean(dim=(2, 3))


class FixedScreen(nn.Module):
    """Stand-in for DB-LIPN: keeps every other patch (logit +5 / -5)."""

    def forward(self, images):
        n = len(images)
        return torch.tensor([5.0 if i % 2 == 0 else -5.0 for i in range(n)])


def test_inference_never_encodes_a_pruned_patch(demo_cohort, tmp_path):
    from wsimil_core.features.encoders import EncoderSpec
    from wsimil_core.features.extract import encode_slide_patches
    from wsimil_core.inference.loaded import LoadedCheckpoint
    from wsimil_core.inference.pipeline import predict_slide
    from wsimil_core.methods.ahdmil.predictor import AHDMILPredictor
    from wsimil_core.store.zarr_store import FeatureStore

    torch.manual_seed(0)
    model = create_model("ahdmil", **SMALL).eval()
    model.prescreen = FixedScreen()
    meta = {
        "model_name": "ahdmil",
        "method": "ahdmil",
        "checkpoint_id": "ahdmil-test",
        "targets": ["label"],
        "encoder": {"name": "counting", "patch_mpp": 2.0, "patch_size": 64, "dim": 16},
    }
    enc = CountingEncoder()
    spec = EncoderSpec(name="counting", encoder_id="counting", dim=16, input_size=None)
    slide = sorted(demo_cohort.glob("*.tiff"))[0]
    ckpt = LoadedCheckpoint((model, meta), "cpu", encoder=(enc, spec), prescreen=True)
    assert isinstance(ckpt.predictor, AHDMILPredictor)  # the method's predictor, found from meta["method"]
    pred = predict_slide(ckpt, slide)
    n, keep = len(pred.coords), pred.info["keep"]
    assert n >= 4
    assert enc.seen == pred.info["n_encoded"] == int(keep.sum()) == (n + 1) // 2
    assert pred.info["kept_fraction"] == pytest.approx(((n + 1) // 2) / n)
    assert pred.row["n_encoded"] == pred.info["n_encoded"] and pred.row["kept_fraction"] == pred.info["kept_fraction"]
    pruned = ~keep
    for name in ("attention", "attention/class0", "relevance"):
        assert pred.maps[name].shape == (n,)
        assert np.isnan(pred.maps[name][pruned]).all()
    assert np.array_equal(pred.maps["prescreen/keep"] > 0, keep)
    assert set(pred.timings) >= {"tissue", "prescreen_read", "prescreen", "read_encode", "classify", "total"}
    assert pred.probs["label"].sum() == pytest.approx(1.0, abs=1e-5)

    enc.seen = 0
    full = predict_slide(LoadedCheckpoint((model, meta), "cpu", encoder=(enc, spec), prescreen=False), slide)
    assert enc.seen == len(full.coords) == n and full.info["keep"].all()

    # a store holding the slide's features: DMIN reads the kept patches' cached features, nothing is encoded
    grid = pred.grid
    feats = encode_slide_patches(slide, grid.coords, grid.size_level0, grid.patch_px, enc, spec, num_workers=0)
    fs = FeatureStore(tmp_path / "store", create=True)
    fs.write_bag(
        slide.stem,
        feats,
        grid.coords,
        "counting",
        {"name": "counting", "dim": 16},
        patch_size=64,
        patch_mpp=2.0,
        patch_size_level0=grid.size_level0,
        stride_level0=grid.stride_level0,
        slide_mpp=grid.slide_mpp,
        grid_origin=list(grid.origin),
    )
    enc.seen = 0
    cached = predict_slide(ckpt, slide, store=fs)
    assert cached.from_cache and enc.seen == 0 and cached.info["n_encoded"] == 0
    np.testing.assert_array_equal(cached.info["keep"], keep)
    np.testing.assert_allclose(cached.probs["label"], pred.probs["label"], atol=1e-5)
    assert cached.maps_written and fs.maps_attrs(slide.stem, "ahdmil-test")["prescreen"] is True


def test_dblipn_branches_tiny_and_timm():
    from wsimil_core.methods.ahdmil.prescreen import DBLIPN

    images = torch.randint(0, 256, (5, 16, 16, 3), dtype=torch.uint8)
    tiny = DBLIPN("tiny", width=4, chunk=2).eval()
    q = tiny(images)
    assert q.shape == (5,)
    want = 0.5 * (tiny.branch1(tiny.normalise(images)).view(-1) + tiny.branch2(tiny.normalise(images)).view(-1))
    assert torch.allclose(q, want, atol=1e-6)  # logits of the two branches averaged (chunking changes nothing)
    timm_net = DBLIPN("timm:mobilenetv4_conv_small").eval()
    assert timm_net(images).shape == (5,)
    with pytest.raises(ConfigError):
        DBLIPN("timm:not_a_model_name")


def test_relevance_mask_is_the_same_in_training_and_eval_mode():
    torch.manual_seed(0)
    model = create_model("ahdmil", **{**SMALL, "dropout": 0.5})
    with torch.no_grad():
        model.dmin.w.bias.zero_()
    x = torch.randn(1, 50, 16)
    model.train()
    train_mask = model.dmin(x, sample=False)["mask_deterministic"]
    model.eval()
    eval_mask = model.dmin(x)["mask"]
    assert 0 < float(eval_mask.detach().mean()) < 1
    assert torch.equal(train_mask.detach(), eval_mask)
