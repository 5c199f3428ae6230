"""MoMKD model + method: graph, maps, linear memory, gradient decoupling, K-means init, memory health."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from wsimil_core.api import create_model
from wsimil_core.data.bag import BagBatch
from wsimil_core.errors import ConfigError, DataError
from wsimil_core.functional.graph import knn_neighbors
from wsimil_core.methods import create_method

D, G = 12, 6
SMALL = dict(in_dim=D, dim=16, memory_dim=8, n_components=4, n_heads=2, dropout=0.0)


pytestmark = pytest.mark.usefixtures("torch_one_thread")  # tiny graphs run fastest single-threaded (conftest)


def make_bag(label: int, n: int = 40, seed: int = 0, omics: bool = True) -> BagBatch:
    """A bag whose positive slides hold a cluster of shifted patches; omics carry the label strongly."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g)
    if label == 1:
        x[: n // 4, 0] += 3.0
    coords = torch.from_numpy(np.random.default_rng(seed).choice(10_000, size=(n, 2), replace=False) * 256)
    om = torch.randn(G, generator=g) * 0.3 + (1.5 if label else -1.5) if omics else None
    return BagBatch(
        features=x, coords=coords.long(), targets={"label": torch.tensor([label])}, slide_id=f"s{seed}", omics=om
    )


def make_method(**options):
    torch.manual_seed(0)
    return create_method("momkd", model=dict(SMALL, omics_dim=G), options=options)


# --- model -----------------------------------------------------------------------------------------------
def test_knn_neighbors_match_brute_force():
    rng = np.random.default_rng(1)
    coords = rng.choice(5000, size=(60, 2), replace=False) * 7
    nb = knn_neighbors(torch.from_numpy(coords), k=8).numpy()
    assert nb.shape == (60, 8)
    assert not (nb == np.arange(60)[:, None]).any()
    d = ((coords[:, None, :] - coords[None, :, :]) ** 2).sum(-1).astype(float)
    np.fill_diagonal(d, np.inf)
    for i in range(60):
        assert set(nb[i].tolist()) == set(np.argsort(d[i])[:8].tolist())
    assert knn_neighbors(torch.zeros(1, 2), 8).shape == (1, 0)
    assert knn_neighbors(torch.tensor([[0, 0], [5, 5], [9, 9]]), 8).shape == (3, 2)
    dup = knn_neighbors(torch.tensor([[0, 0], [0, 0], [0, 0], [9, 9]]), 2).numpy()  # duplicated positions
    assert not (dup == np.arange(4)[:, None]).any() and set(dup[0].tolist()) == {1, 2}


def test_model_requires_coords_and_validates_config():
    model = create_model("momkd", **SMALL)
    with pytest.raises(DataError, match="coordinates are required"):
        model(torch.randn(5, D))
    with pytest.raises(DataError, match="coords must be"):
        model(torch.randn(5, D), coords=torch.zeros(4, 2))
    with pytest.raises(DataError, match="in_dim"):
        model(torch.randn(5, D + 1), coords=torch.zeros(5, 2))
    with pytest.raises(ConfigError, match="n_classes must be 2"):
        create_model("momkd", in_dim=8, n_classes=3)
    with pytest.raises(ConfigError, match="divisible"):
        create_model("momkd", in_dim=8, dim=10, n_heads=4)
    with pytest.raises(ConfigError, match="tau"):
        create_model("momkd", in_dim=8, tau=0.0)


def test_maps_and_histology_only_inference():
    torch.manual_seed(0)
    model = create_model("momkd", **dict(SMALL, omics_dim=G)).eval()
    bag = make_bag(1, n=30)
    out = model(bag.features, coords=bag.coords)  # no omics: inference never needs them
    assert out.logits.shape == (1, 2)
    assert set(out.maps) == {
        "attention",
        "memory/score",
        "memory/nearest_pos",
        "memory/nearest_neg",
        "memory/component",
    }
    for m in out.maps.values():
        assert m.shape == (30,)
    assert out.maps["attention"].sum().item() == pytest.approx(1.0, abs=1e-5)
    # attention is softmax(score / tau) (Eq. 7)
    expected = torch.softmax(out.maps["memory/score"] / model.config.tau, dim=0)
    assert torch.allclose(out.maps["attention"], expected, atol=1e-6)
    # signed component id agrees with the nearest component of the winning memory
    comp = out.maps["memory/component"].long()
    sp, sn = out.extras["sim_pos"][0], out.extras["sim_neg"][0]
    pos_wins = sp.max(-1).values >= sn.max(-1).values
    assert torch.equal(comp[pos_wins], out.maps["memory/nearest_pos"].long()[pos_wins] + 1)
    assert torch.equal(comp[~pos_wins], -(out.maps["memory/nearest_neg"].long()[~pos_wins] + 1))
    assert (comp != 0).all()
    assert "f_n_omics" not in out.extras
    with_omics = model(bag.features, coords=bag.coords, omics=bag.omics)
    assert with_omics.extras["omics_recon"].shape == (1, G)
    assert torch.allclose(with_omics.logits, out.logits)  # omics never change the histology prediction


def test_maps_follow_patch_order():
    torch.manual_seed(0)
    model = create_model("momkd", **SMALL).eval()
    bag = make_bag(1, n=35, seed=3)
    perm = torch.randperm(35)
    a = model(bag.features, coords=bag.coords)
    b = model(bag.features[perm], coords=bag.coords[perm])
    assert torch.allclose(a.logits, b.logits, atol=1e-5)
    for name in a.maps:
        assert torch.allclose(a.maps[name][perm], b.maps[name], atol=1e-5), name


class MaxNumel(TorchDispatchMode):
    """Records the largest tensor produced by any aten op."""

    def __init__(self):
        super().__init__()
        self.max = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.max = max(self.max, t.numel())
        return out


def test_memory_is_linear_in_n():
    """No [N, N] tensor: the largest intermediate grows like N, far below N^2."""
    torch.manual_seed(0)
    model = create_model("momkd", **SMALL).eval()
    sizes = {}
    for n in (2000, 8000):
        x = torch.randn(n, D)
        coords = torch.from_numpy(np.random.default_rng(0).choice(100_000, size=(n, 2), replace=False))
        with torch.no_grad(), MaxNumel() as mode:
            model(x, coords=coords)
        sizes[n] = mode.max
        assert mode.max < n * n / 10, (n, mode.max)  # an [N, N] matrix would be n * n
    assert sizes[8000] <= 4 * sizes[2000] * 1.2  # 4x the patches -> about 4x the largest tensor


# --- method: gradient decoupling ---------------------------------------------------------------------------
def _grads(loss, params):
    gs = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return [0.0 if g is None else float(g.abs().sum()) for g in gs]


def test_gradient_decoupling():
    method = make_method()
    model = method.model
    terms = method.loss_terms(make_bag(1, seed=5))
    assert set(terms) == {"ce", "align_wsi", "mem", "recon", "align_omics"}
    memory = [model.memory_pos, model.memory_neg]
    omics_params = list(model.omics.parameters())
    wsi_params = [p for n, p in model.named_parameters() if not n.startswith(("omics.", "memory_"))]
    assert wsi_params and omics_params
    # CE never reaches the memory (detached in the attention path) nor the omics branch.
    assert _grads(terms["ce"], memory) == [0.0, 0.0]
    assert sum(_grads(terms["ce"], omics_params)) == 0.0
    assert sum(_grads(terms["ce"], wsi_params)) > 0
    # Omics losses never reach the histology branch; histology losses never reach the omics branch.
    for k in ("recon", "align_omics"):
        assert sum(_grads(terms[k], wsi_params)) == 0.0, k
    for k in ("ce", "align_wsi", "mem"):
        assert sum(_grads(terms[k], omics_params)) == 0.0, k
    assert sum(_grads(terms["recon"], omics_params)) > 0
    # The memory moves only through L_align (both branches) and L_mem; reconstruction never touches it.
    assert sum(_grads(terms["align_wsi"], memory)) > 0
    assert sum(_grads(terms["align_omics"], memory)) > 0
    assert sum(_grads(terms["mem"], memory)) > 0
    assert _grads(terms["recon"], memory) == [0.0, 0.0]


def test_memory_commitment_does_not_move_memory():
    method = make_method(ortho_weight=0.0)
    terms = method.loss_terms(make_bag(0, seed=6))
    assert _grads(terms["mem"], [method.model.memory_pos, method.model.memory_neg]) == [0.0, 0.0]
    assert sum(_grads(terms["mem"], [method.model.proj.weight])) > 0


# --- method: training ------------------------------------------------------------------------------------
def test_kmeans_init_and_training_steps():
    data = [make_bag(i % 2, n=40, seed=i) for i in range(6)]
    method = make_method(kmeans_samples=200)
    before = method.model.memory_pos.detach().clone()
    method.setup_phase("train", data)
    mp, mn = method.model.memories()
    assert not torch.allclose(before, method.model.memory_pos)
    assert torch.allclose(mp.norm(dim=-1), torch.ones(4), atol=1e-5)
    # the K-means centres are deterministic for a fixed seed
    other = make_method(kmeans_samples=200)
    other.setup_phase("train", data)
    assert torch.allclose(other.model.memory_pos, method.model.memory_pos, atol=1e-5)

    params = list(method.trainable_parameters("train"))
    assert any(p is method.model.memory_pos for p in params)
    opt = torch.optim.Adam(params, lr=1e-2)
    first = last = None
    for epoch in range(4):
        total = 0.0
        for bag in data:
            step = method.training_step(bag, "train")
            opt.zero_grad()
            step["loss"].backward()
            opt.step()
            method.after_optimizer_step("train")
            total += float(step["loss"].detach())
        logs = method.epoch_end("train", epoch)
        first = total if first is None else first
        last = total
    assert last < first
    assert set(logs) == {"mem_pos_active", "mem_pos_perplexity", "mem_neg_active", "mem_neg_perplexity"}
    assert 0 < logs["mem_pos_active"] <= 1 and 1 <= logs["mem_pos_perplexity"] <= 4
    assert method.usage_pos.sum() == 0  # reset by epoch_end
    assert method.epoch_end("train", 9)["mem_pos_active"] == 0.0


def test_slides_without_omics_still_train():
    method = make_method()
    step = method.training_step(make_bag(1, omics=False), "train")
    assert "recon" not in step and "align_omics" not in step
    step["loss"].backward()
    assert all(p.grad is None for p in method.model.omics.parameters())


def test_no_omics_option_and_auto_omics_branch():
    torch.manual_seed(0)
    data = [make_bag(i % 2, seed=i) for i in range(4)]
    auto = create_method("momkd", model=SMALL, options={"kmeans_samples": 100})
    assert auto.model.omics is None
    auto.setup_phase("train", data)  # omics_dim taken from the data
    assert auto.model.omics is not None and auto.model.config.omics_dim == G
    assert "recon" in auto.training_step(data[0], "train")

    plain = create_method("momkd", model=dict(SMALL, omics_dim=G), options={"use_omics": False, "kmeans_samples": 100})
    plain.setup_phase("train", data)
    assert plain.model.omics is None and plain.model.config.omics_dim == 0
    assert set(plain.training_step(data[1], "train")) == {"loss", "ce", "align_wsi", "mem"}

    no_table = create_method("momkd", model=SMALL, options={"kmeans_samples": 100})
    with pytest.warns(UserWarning, match="no omics"):
        no_table.setup_phase("train", [make_bag(i % 2, seed=i, omics=False) for i in range(4)])


def test_fixed_memory_ablation():
    data = [make_bag(i % 2, seed=i) for i in range(4)]
    method = make_method(fixed_memory=True, kmeans_samples=100)
    method.setup_phase("train", data)
    frozen = method.model.memory_pos.detach().clone()
    params = list(method.trainable_parameters("train"))
    assert not any(p is method.model.memory_pos or p is method.model.memory_neg for p in params)
    opt = torch.optim.SGD(params, lr=0.1)
    for bag in data:
        opt.zero_grad()
        method.training_step(bag, "train")["loss"].backward()
        opt.step()
    assert torch.equal(frozen, method.model.memory_pos)


def test_few_patches_keep_random_memory_with_warning():
    method = make_method(kmeans_samples=2)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        method.setup_phase("train", [make_bag(1, n=3, seed=1), make_bag(0, n=40, seed=2)])
    assert any("positive memory keeps its random" in str(w.message) for w in rec)


def test_options_are_validated():
    with pytest.raises(ConfigError, match="beta"):
        create_method("momkd", model=SMALL, options={"beta": 0})
    with pytest.raises(ConfigError, match="bogus"):
        create_method("momkd", model=SMALL, options={"bogus": 1})


def test_checkpoint_roundtrip(tmp_path):
    from wsimil_core.engine.checkpoint import load_checkpoint, save_checkpoint

    method = make_method()
    model = method.inference_model().eval()
    bag = make_bag(1, seed=8)
    ref = model(bag.features, coords=bag.coords)
    path = tmp_path / "momkd.safetensors"
    save_checkpoint(path, model, {"method": "momkd", "class_names": {"label": ["neg", "pos"]}, "targets": ["label"]})
    loaded, meta = load_checkpoint(path)
    assert meta.model_kwargs["omics_dim"] == G
    out = loaded.eval()(bag.features, coords=bag.coords)
    assert torch.allclose(out.logits, ref.logits, atol=1e-6)
    assert torch.equal(out.maps["memory/component"], ref.maps["memory/component"])


def test_reseed_dead_components():
    method = make_method(reseed_dead=True, kmeans_init=False)
    before_pos = method.model.memory_pos.detach().clone()
    before_neg = method.model.memory_neg.detach().clone()
    pos_bag = make_bag(1, seed=11)
    method.loss_terms(pos_bag)  # fills usage counters and the reservoir of positive projections
    method.usage_pos.zero_()
    method.usage_pos[0] = 5  # components 1..3 of C+ are dead; C- has no negative projections to draw from
    logs = method.epoch_end("train", 0)
    assert logs["mem_reseeded"] == 3.0 and logs["mem_pos_active"] == 0.25
    after = method.model.memory_pos.detach()
    assert torch.equal(after[0], before_pos[0])
    assert not torch.allclose(after[1:], before_pos[1:])
    assert torch.allclose(after.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert torch.equal(method.model.memory_neg.detach(), before_neg)
    # the new components are patch projections of the positive bag
    with torch.no_grad():
        _, fp = method.model.project(pos_bag.features, pos_bag.coords)
    sims = after[1:] @ fp.t()
    assert torch.allclose(sims.max(dim=1).values, torch.ones(3), atol=1e-4)


def test_omics_table_without_a_training_slide_is_refused():
    """Issue 17 item 8: a table that matches no slide of the training split stops MoMKD (not MoMKD without it)."""

    class TrainData(list):
        omics_dim = G
        n_with_omics = 0
        omics_source = "omics.csv"

    method = create_method("momkd", model=SMALL, options={"kmeans_samples": 100})
    with pytest.raises(DataError, match=r"omics\.csv: no training slide.*'slide_id'.*use_omics: false"):
        method.setup_phase("train", TrainData(make_bag(i % 2, seed=i, omics=False) for i in range(4)))


# --- issue 18: paper fidelity ------------------------------------------------------------------------------
def test_kmeans_init_seeds_cplus_from_positive_and_cminus_from_negative_slides():
    """Sec. 3.3.2: K-means on patch projections of positive slides gives C+, of negative slides C-."""
    torch.manual_seed(0)
    method = create_method("momkd", model=dict(SMALL, omics_dim=0), options={"kmeans_samples": 400, "use_omics": False})
    far = torch.zeros(D)
    far[:3] = 6.0
    bags = []
    for i in range(6):
        y = i % 2
        b = make_bag(y, n=30, seed=i, omics=False)
        b.features = b.features * 0.1 + (far if y else -far)  # positive and negative slides far apart
        bags.append(b)
    method.model.eval()
    with torch.no_grad():
        proj = {
            y: torch.cat([method.model.project(b.features, b.coords)[1] for b in bags if int(b.label) == y]).mean(0)
            for y in (0, 1)
        }
    method.setup_phase("train", bags)
    mp, mn = method.model.memories()
    cos = torch.nn.functional.cosine_similarity
    assert torch.all(cos(mp, proj[1][None]) > cos(mp, proj[0][None]) + 0.1)  # every C+ component is a positive centre
    assert torch.all(cos(mn, proj[0][None]) > cos(mn, proj[1][None]) + 0.1)  # every C- component a negative one


def test_mem_commit_own_class_is_the_default_and_joint_is_an_option():
    bag = make_bag(1, seed=3)
    own, joint = make_method(), make_method(mem_commit="joint")
    assert own.options.mem_commit == "own_class"
    from wsimil_core.functional.memory import memory_commitment, memory_orthogonality

    for method, memory in ((own, lambda mp, mn: mp), (joint, lambda mp, mn: torch.cat([mp, mn]))):
        method.eval()
        terms = method.loss_terms(bag)
        out = method.model(bag.features, coords=bag.coords)
        mp, mn = method.model.memories()
        f = out.extras["f_proj"][0]
        expected = memory_commitment(f, memory(mp, mn)) + memory_orthogonality(mp) + memory_orthogonality(mn)
        assert float(terms["mem"].detach()) == pytest.approx(float(expected.detach()), rel=1e-5)


def test_usage_counts_each_slide_toward_its_own_class_memory():
    """Fig. 3: a positive slide's patches count toward C+ only, a negative slide's toward C- only."""
    method = make_method()
    method.loss_terms(make_bag(1, n=40, seed=1))
    assert int(method.usage_pos.sum()) == 40 and int(method.usage_neg.sum()) == 0
    method.loss_terms(make_bag(0, n=25, seed=2))
    assert int(method.usage_pos.sum()) == 40 and int(method.usage_neg.sum()) == 25


def test_attention_temperature_fixed_by_default_learnable_option():
    torch.manual_seed(0)
    fixed = create_model("momkd", **SMALL).eval()
    assert fixed.log_tau is None and not any("tau" in n for n, _ in fixed.named_parameters())
    bag = make_bag(1)
    out = fixed(bag.features, coords=bag.coords)
    assert torch.allclose(out.maps["attention"], torch.softmax(out.maps["memory/score"] / 0.2, dim=-1), atol=1e-6)
    learn = create_model("momkd", **SMALL, learn_tau=True, tau=0.3)
    assert float(learn.log_tau.exp()) == pytest.approx(0.3)
    out = learn(bag.features, coords=bag.coords)
    out.logits[0, 1].backward()
    assert learn.log_tau.grad is not None and float(learn.log_tau.grad.abs()) > 0
    with torch.no_grad():
        learn.log_tau.fill_(np.log(5.0))  # clamped to 2 as in the authors' code
    out = learn.eval()(bag.features, coords=bag.coords)
    assert torch.allclose(out.maps["attention"], torch.softmax(out.maps["memory/score"] / 2.0, dim=-1), atol=1e-6)


def test_memory_is_excluded_from_weight_decay_by_the_engine_groups():
    from wsimil_core.engine.param_groups import no_weight_decay_names, weight_decay_groups

    method = make_method()
    assert no_weight_decay_names(method) == {"model.memory_pos", "model.memory_neg"}
    params = list(method.trainable_parameters("train"))
    groups = weight_decay_groups(method, params)
    opt = torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.1)
    by_id = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert by_id[id(method.model.memory_pos)] == 0.0 and by_id[id(method.model.memory_neg)] == 0.0
    assert by_id[id(method.model.proj.weight)] == 0.1
    assert sum(len(g["params"]) for g in opt.param_groups) == len(params)
    # with zero gradients, AdamW shrinks only the decayed parameters
    mem, w = method.model.memory_pos.detach().clone(), method.model.proj.weight.detach().clone()
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.equal(method.model.memory_pos.detach(), mem)
    assert not torch.equal(method.model.proj.weight.detach(), w)
    # the option brings the authors' behaviour back (everything decayed)
    decayed = make_method(memory_weight_decay=True)
    assert no_weight_decay_names(decayed) == set()
    assert len(weight_decay_groups(decayed, decayed.trainable_parameters("train"))) == 1
