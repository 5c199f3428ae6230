"""MECDS building blocks: top-p routing, AKD, the model (TSA isolation, linear memory, router gradients, maps),
the teacher/student method and task extension on tiny synthetic bags."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import wsimil_core.methods  # noqa: F401
from wsimil_core.api import create_model
from wsimil_core.data.bag import BagBatch
from wsimil_core.errors import ConfigError
from wsimil_core.functional import akd_loss, kd_kl_loss, top_p_route
from wsimil_core.methods.base import create_method
from wsimil_core.methods.mecds.method import extend_model
from wsimil_core.methods.mecds.mfa import TaskIsolatedAttention

TINY = {"in_dim": 12, "dim": 16, "n_heads": 2, "router_dim": 8, "dropout": 0.0}
TASKS = {"a": 2, "b": 2}


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def tiny_model(tasks=TASKS, **kw):
    torch.manual_seed(0)
    return create_model("mecds", **{**TINY, "tasks": dict(tasks), **kw})


# --- top_p_route ---------------------------------------------------------------------------------------------


def test_top_p_route_hand_cases():
    assert top_p_route(torch.tensor([0.1, 0.4, 0.3, 0.2]), 0.5).tolist() == [False, True, True, False]
    # ties broken by index: the earlier patches first
    assert top_p_route(torch.tensor([0.25, 0.25, 0.25, 0.25]), 0.5).tolist() == [True, True, False, False]
    # one entry reaching p exactly is enough
    assert top_p_route(torch.tensor([0.2, 0.5, 0.3]), 0.5).tolist() == [False, True, False]
    # a slice summing to less than p selects everything; at least one entry is always selected
    assert top_p_route(torch.tensor([0.1, 0.1]), 0.5).all()
    assert top_p_route(torch.tensor([0.9, 0.1]), 0.01).tolist() == [True, False]
    # along dim 1 (rows are independent)
    got = top_p_route(torch.tensor([[0.6, 0.4], [0.3, 0.7]]), 0.5, dim=1)
    assert got.tolist() == [[True, False], [False, True]]
    with pytest.raises(ValueError, match="p must be"):
        top_p_route(torch.tensor([0.5, 0.5]), 0.0)


def test_top_p_route_is_minimal_on_random_inputs():
    gen = torch.Generator().manual_seed(0)
    for trial in range(50):
        n = int(torch.randint(1, 40, (1,), generator=gen))
        probs = torch.softmax(torch.randn(n, 3, generator=gen) * 2, dim=0)
        p = float(torch.rand(1, generator=gen)) * 0.9 + 0.05
        mask = top_p_route(probs, p, dim=0)
        for m in range(3):
            col = probs[:, m].tolist()
            ranked = sorted(range(n), key=lambda i: (-col[i], i))
            k, acc = 0, 0.0
            while acc < p and k < n:  # the minimal prefix reaching p
                acc += col[ranked[k]]
                k += 1
            assert sorted(mask[:, m].nonzero().squeeze(1).tolist()) == sorted(ranked[:k]), (trial, m)
            assert probs[mask[:, m], m].sum() >= p - 1e-6


# --- AKD -----------------------------------------------------------------------------------------------------


def _akd_by_hand(s, t, T, gp, gn, margin):
    def softmax(v):
        e = [math.exp(x - max(v)) for x in v]
        return [x / sum(e) for x in e]

    total = 0.0
    for sv, tv in zip(s, t):
        zs = softmax([x / T for x in sv])[1]
        zt = softmax([x / T for x in tv])[1]
        p = softmax(sv)[1]
        p_hat = softmax(tv)[1]
        w_pos = (1 - p) ** gp
        w_neg = max(p_hat - margin, 0.0) ** gn
        total += T * T * (w_pos * zt * math.log(zt / zs) + w_neg * (1 - zt) * math.log((1 - zt) / (1 - zs)))
    return total / len(s)


def test_akd_matches_hand_computation():
    s = [[0.3, -0.8], [1.2, 0.4], [-0.5, 2.0]]
    t = [[-1.0, 1.5], [0.2, 0.1], [-2.0, 1.0]]
    got = akd_loss(torch.tensor(s), torch.tensor(t), T=2.0, gamma_pos=1.0, gamma_neg=4.0, margin=0.2)
    assert got.item() == pytest.approx(_akd_by_hand(s, t, 2.0, 1.0, 4.0, 0.2), rel=1e-5)
    got = akd_loss(torch.tensor(s), torch.tensor(t), T=3.0, gamma_pos=2.0, gamma_neg=1.0, margin=0.5)
    assert got.item() == pytest.approx(_akd_by_hand(s, t, 3.0, 2.0, 1.0, 0.5), rel=1e-5)
    # teacher p_hat below the margin switches the negative term off entirely
    low = [[3.0, -3.0]]
    only_pos = _akd_by_hand([[0.0, 0.0]], low, 2.0, 1.0, 4.0, 0.2)
    assert akd_loss(torch.zeros(1, 2), torch.tensor(low)).item() == pytest.approx(only_pos, rel=1e-5)


def test_akd_with_unit_weights_is_the_binary_kl_and_weights_are_constants():
    s = torch.tensor([[0.3, -0.8], [1.2, 0.4]], requires_grad=True)
    t = torch.tensor([[-1.0, 1.5], [0.2, 0.1]], requires_grad=True)
    unit = akd_loss(s, t, T=2.0, gamma_pos=0.0, gamma_neg=0.0, margin=0.0)
    assert unit.item() == pytest.approx(kd_kl_loss(s, t, T=2.0).item(), rel=1e-5)
    # kd_kl_loss is T^2 * KL(teacher || student) (batch mean)
    ref = F.kl_div(F.log_softmax(s / 2, 1), F.log_softmax(t / 2, 1), log_target=True, reduction="batchmean") * 4
    assert kd_kl_loss(s, t, 2.0).item() == pytest.approx(ref.item(), rel=1e-5)
    # gradient w.r.t. the student only, through z_s only (weights are constants): compare with autograd of the
    # formula where the weights are plugged in as numbers
    loss = akd_loss(s, t)
    loss.backward()
    assert t.grad is None
    with torch.no_grad():
        p, p_hat = torch.softmax(s, 1)[:, 1], torch.softmax(t, 1)[:, 1]
        w_pos, w_neg = 1 - p, (p_hat - 0.2).clamp_min(0) ** 4
    s2 = s.detach().clone().requires_grad_(True)
    zs = torch.softmax(s2 / 2, 1)[:, 1]
    zt = torch.softmax(t.detach() / 2, 1)[:, 1]
    manual = (4 * (w_pos * zt * torch.log(zt / zs) + w_neg * (1 - zt) * torch.log((1 - zt) / (1 - zs)))).mean()
    manual.backward()
    assert torch.allclose(s.grad, s2.grad, atol=1e-6)
    with pytest.raises(ValueError, match="binary"):
        akd_loss(torch.zeros(2, 3), torch.zeros(2, 3))


# --- model ---------------------------------------------------------------------------------------------------


def test_config_validation_is_clear():
    with pytest.raises(ConfigError, match="top_p"):
        create_model("mecds", in_dim=8, top_p=0.0)
    with pytest.raises(ConfigError, match="divisible"):
        create_model("mecds", in_dim=8, dim=10, n_heads=4)
    with pytest.raises(ConfigError, match="class count"):
        create_model("mecds", in_dim=8, tasks={"a": 1})
    m = create_model("mecds", in_dim=8, n_classes=3, dim=8, n_heads=2)
    assert m.config.tasks == {"label": 3}


def test_outputs_and_maps():
    model = tiny_model({"a": 2, "b": 3})
    out = model(torch.randn(30, 12))
    assert out.logits["a"].shape == (1, 2) and out.logits["b"].shape == (1, 3)
    for t in ("a", "b"):
        routed = out.maps[f"routing/{t}"]
        per_module = [out.maps[f"routing/{t}/module{k}"] for k in (1, 2)]
        assert routed.shape == (30,) and set(routed.unique().tolist()) <= {0.0, 1.0}
        assert torch.equal(routed, torch.maximum(*per_module))
        phi = out.maps[f"routing/{t}/weight"]
        assert phi.sum().item() == pytest.approx(1.0, abs=1e-5)
        # the last module routes the minimal top-p set of its phi
        assert torch.equal(per_module[1].bool(), top_p_route(phi, 0.5))
        attn = out.maps[f"attention/{t}"]
        assert attn.shape == (30,) and (attn >= 0).all() and attn.sum() <= 1 + 1e-5
    batch = model(torch.randn(2, 25, 12))
    assert batch.logits["a"].shape == (2, 2) and batch.maps["routing/a"].shape == (2, 25)


def test_tsa_isolation_adding_a_task_token_leaves_the_patch_stream_identical():
    torch.manual_seed(0)
    layer = TaskIsolatedAttention(16, 2, 0.0).eval()
    f = torch.randn(1, 40, 16)
    t2 = torch.randn(1, 2, 16)
    t3 = torch.cat([t2, torch.randn(1, 1, 16)], dim=1)
    f2, tok2, _ = layer(f, t2)
    f3, tok3, _ = layer(f, t3)
    assert torch.equal(f2, f3)
    assert torch.allclose(tok2, tok3[:, :2], atol=1e-6)  # old tokens do not see the new one either
    # the same in a whole model: extending keeps the first module's patch stream, phi and routing of old tasks
    model = tiny_model().eval()
    x = torch.randn(1, 40, 12)
    streams = {}

    def grab(key):
        def hook(mod, args, out):
            streams.setdefault(key, args[0].detach().clone())  # the first call is the patch stream

        return hook

    h = model.mfa[0].ffn.register_forward_hook(grab("before"))
    old = model(x)
    h.remove()
    extend_model(model, "c", 2)
    h = model.mfa[0].ffn.register_forward_hook(grab("after"))
    new = model(x)
    h.remove()
    assert torch.equal(streams["before"], streams["after"])  # TSA output of the patches
    for t in ("a", "b"):
        assert torch.equal(old.maps[f"routing/{t}/module1"], new.maps[f"routing/{t}/module1"])


def test_routers_receive_gradients():
    model = tiny_model()
    out = model(torch.randn(50, 12))
    sum(lg[0, 1] for lg in out.logits.values()).backward()
    for module in model.mfa:
        for router in module.routers:
            grads = [p.grad for p in router.parameters()]
            assert all(g is not None for g in grads)
            assert sum(float(g.abs().sum()) for g in grads) > 0


class _MaxNumel(TorchDispatchMode):
    """Records the largest tensor any aten op produces (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.op = ""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(o, torch.Tensor) and o.numel() > self.largest:
                self.largest, self.op = o.numel(), str(func)
        return out


@pytest.mark.parametrize("routing", [True, False])
def test_no_n_by_n_tensor_in_forward_and_backward(routing):
    n = 500
    model = tiny_model({"a": 2, "b": 2, "c": 2}, routing=routing)
    x = torch.randn(n, 12)
    with _MaxNumel() as probe:
        out = model(x)
        sum(lg.sum() for lg in out.logits.values()).backward()
    # widest legitimate tensors: [N, 3 * dim] / [1, N + 1, 3 * dim] (about 48 * 500); an [N, N] would be 250000
    assert probe.largest < n * n / 5, (probe.largest, probe.op)


def test_routing_off_sends_every_patch_to_every_expert():
    model = tiny_model(routing=False)
    out = model(torch.randn(20, 12))
    assert all(out.maps[f"routing/{t}"].min() == 1 for t in TASKS)


# --- method and extension ------------------------------------------------------------------------------------


def _bags(n_bags=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    bags = []
    for i in range(n_bags):
        ya, yb = i % 2, (i // 2) % 2
        x = torch.randn(24, 12, generator=gen)
        x[:4, :3] += 3.0 * ya
        x[4:8, 3:6] += 3.0 * yb
        bags.append(BagBatch(features=x, targets={"a": torch.tensor([ya]), "b": torch.tensor([yb])}, slide_id=f"s{i}"))
    return bags


def test_method_teacher_then_student_with_frozen_teacher():
    torch.manual_seed(0)
    method = create_method("mecds", model={**TINY, "tasks": TASKS})
    assert method.phases == ("teacher", "student")
    assert method.balanced_sampling("teacher") and not method.balanced_sampling("student")
    bags = _bags()
    method.setup_phase("teacher", bags)
    assert method.inference_model() is method.teacher
    opt = torch.optim.AdamW(method.trainable_parameters("teacher"), lr=1e-2)
    for bag in bags:
        step = method.training_step(bag, "teacher")
        assert set(step) >= {"loss", "ce", "ce_a", "ce_b"} and "kd" not in step
        opt.zero_grad()
        step["loss"].backward()
        opt.step()
    assert set(method.epoch_end("teacher", 0)) == {"routed_a", "routed_b"}
    method.setup_phase("student", bags)
    assert method.inference_model() is method.model
    teacher_before = {k: v.clone() for k, v in method.teacher.state_dict().items()}
    params = list(method.trainable_parameters("student"))
    assert {id(p) for p in params} == {id(p) for p in method.model.parameters()}
    opt = torch.optim.AdamW(params, lr=1e-2)
    for bag in bags:
        step = method.training_step(bag, "student")
        assert torch.isclose(step["loss"], step["ce"] + step["kd"], atol=1e-5)  # weighted AKD may be < 0
        opt.zero_grad()
        step["loss"].backward()
        opt.step()
    assert all(torch.equal(v, method.teacher.state_dict()[k]) for k, v in teacher_before.items())


def test_method_options_are_validated():
    with pytest.raises(ConfigError, match="teacher_checkpoint"):
        create_method("mecds", model={**TINY, "tasks": TASKS}, options={"phases": ["student"]})
    with pytest.raises(ConfigError, match="phases"):
        create_method("mecds", model={**TINY, "tasks": TASKS}, options={"phases": ["student", "teacher"]})
    with pytest.raises(ConfigError, match="distill"):
        create_method("mecds", model={**TINY, "tasks": TASKS}, options={"distill": "focal"})
    m = create_method("mecds", model={**TINY, "tasks": TASKS}, options={"phases": ["teacher"], "distill": "kl"})
    assert m.phases == ("teacher",)


def test_extend_model_freezes_everything_old_and_keeps_it_bit_identical(tmp_path):
    from wsimil_core.engine.checkpoint import load_checkpoint, save_checkpoint

    model = tiny_model().eval()
    x = torch.randn(15, 12)
    with torch.no_grad():
        logits_before = model(x).logits
    old = {k: v.clone() for k, v in model.state_dict().items()}
    new_params = extend_model(model, "c", 2)
    assert model.config.isolated_tasks == ["c"]
    assert model.config.tasks == {"a": 2, "b": 2, "c": 2}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in new_params}
    opt = torch.optim.AdamW(new_params, lr=1e-2, weight_decay=0.1)
    for bag in _bags(4):
        loss = F.cross_entropy(model(bag.features).logits["c"], bag.targets["a"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    now = model.state_dict()
    assert all(torch.equal(now[k], v) for k, v in old.items())
    assert set(now) - set(old)  # new tensors exist
    # isolated extension: the old tasks' predictions are exactly what they were
    model.eval()
    with torch.no_grad():
        logits_after = model(x).logits
    assert all(torch.equal(logits_after[t], logits_before[t]) for t in ("a", "b"))
    # the extended model is a normal checkpoint with M + 1 tasks
    path = tmp_path / "ext.safetensors"
    save_checkpoint(path, model, {"method": "mecds"})
    loaded, meta = load_checkpoint(path)
    assert meta.model_kwargs["tasks"] == {"a": 2, "b": 2, "c": 2}
    assert meta.model_kwargs["isolated_tasks"] == ["c"]
    assert torch.allclose(loaded(x).logits["c"], model(x).logits["c"])
    with pytest.raises(ValueError, match="already exists"):
        model.add_task("a")


def test_shared_stream_extension_feeds_the_new_expert_into_later_modules():
    model = tiny_model().eval()
    x = torch.randn(30, 12)
    with torch.no_grad():
        before = model(x)
        extend_model(model, "c", 2, isolated=False)
        torch.nn.init.normal_(model.mfa[0].experts[2].ffn.net[-1].weight, std=0.5)  # a visible update
        after = model(x)
    assert model.config.isolated_tasks == []
    # the first module's routing of old tasks is untouched; the second module sees the new expert's updates
    assert torch.equal(before.maps["routing/a/module1"], after.maps["routing/a/module1"])
    assert not torch.equal(before.logits["a"], after.logits["a"])


def test_extend_phase_trains_only_the_new_task_from_the_loaded_checkpoint():

    base = tiny_model(dropout=0.3)
    old = {k: v.clone() for k, v in base.state_dict().items()}
    opts = {"phases": ["extend"], "extend": {"checkpoint": "base.safetensors", "task": "c"}}
    data_model = {"in_dim": 12, "tasks": {"a": 2, "c": 3}}  # what the engine fills from data.targets [a, c]
    method = create_method("mecds", model=data_model, options=opts)
    assert method.phases == ("extend",) and method.teacher is None
    with pytest.raises(ConfigError, match="needs the checkpoint loaded"):
        method.inference_model()  # no model before load_checkpoints
    read = []
    method.load_checkpoints(lambda path: read.append(path) or (base, {}))
    assert read == ["base.safetensors"] and method.model is base
    method.setup_phase("extend", _bags(2))
    assert base.config.tasks == {"a": 2, "b": 2, "c": 3} and base.config.isolated_tasks == ["c"]
    params = list(method.trainable_parameters("extend"))
    new_names = {k for k, _ in base.named_parameters()} - set(old)
    assert {id(p) for p in params} == {id(p) for k, p in base.named_parameters() if k in new_names}
    assert not any(p.requires_grad for k, p in base.named_parameters() if k not in new_names)
    assert method.balanced_sampling("extend") == ["c"]
    method.train()  # frozen parts without dropout, the new task's modules in training mode
    assert not base.embed.training and not base.mfa[0].experts[0].training
    assert base.heads[2].training and base.mfa[1].experts[2].training and base.mfa[0].routers[2].training
    opt = torch.optim.AdamW(params, lr=1e-2)
    for bag in _bags(3):
        bag.targets["c"] = torch.tensor([int(bag.targets["a"]) + 1])
        step = method.training_step(bag, "extend")
        assert set(step) == {"loss", "ce", "ce_c"}
        opt.zero_grad()
        step["loss"].backward()
        opt.step()
    now = base.state_dict()
    assert all(torch.equal(now[k], v) for k, v in old.items())
    assert method.inference_model() is base and base.config.tasks["c"] == 3
    method.setup_phase("extend", _bags(2))  # a second call (resume) does not add the task again
    assert len(base.heads) == 3


def test_extend_options_and_checkpoint_checks():
    from wsimil_core.errors import CheckpointError

    opts = {"phases": ["extend"], "extend": {"checkpoint": "b.safetensors", "task": "c"}}
    with pytest.raises(ConfigError, match="extend"):
        create_method("mecds", model={"in_dim": 12, "tasks": {"c": 2}}, options={"phases": ["extend"]})
    with pytest.raises(ConfigError, match="extend"):
        create_method("mecds", model={"in_dim": 12, "tasks": {"c": 2}}, options={"extend": opts["extend"]})
    with pytest.raises(ConfigError, match=r"architecture comes from b.safetensors.*\['dim'\]"):
        create_method("mecds", model={"in_dim": 12, "tasks": {"c": 2}, "dim": 8}, options=opts)
    method = create_method("mecds", model={"in_dim": 12, "tasks": {"c": 2}}, options=opts)
    with pytest.raises(ConfigError, match="checkpoint loaded"):
        method.setup_phase("extend", [])
    with pytest.raises(CheckpointError, match="b.safetensors.*'abmil'.*not 'mecds'"):
        method.load_checkpoints(lambda p: (create_model("abmil", in_dim=12, n_classes=2), {}))
    bad = create_method(
        "mecds", model={"in_dim": 12, "tasks": {"a": 2}}, options={**opts, "extend": {**opts["extend"], "task": "a"}}
    )
    with pytest.raises(ConfigError, match="already has a task 'a'"):
        bad.load_checkpoints(lambda p: (tiny_model(), {}))
    wrong = create_method("mecds", model={"in_dim": 12, "tasks": {"a": 3, "c": 2}}, options=opts)
    with pytest.raises(ConfigError, match=r"\['a'\] are not tasks of the model"):
        wrong.load_checkpoints(lambda p: (tiny_model(), {}))


def test_method_modules_never_import_the_engine():
    """methods/mecds/method.py (the recipe) reads checkpoints only through the reader the engine hands it."""
    import ast
    import inspect

    import wsimil_core.methods.mecds.method as recipe

    tree = ast.parse(inspect.getsource(recipe))
    names = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    names += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [n for n in names if n and (n.startswith("wsimil_core.engine") or n.startswith("wsimil_core.inference"))]
