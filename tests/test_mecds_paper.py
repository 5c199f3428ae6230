"""MECDS as the paper describes it (issue 13): expert input, the no-DFRM ablation, old checkpoints keeping their
meaning, distillation variants and the teacher's best epoch."""

from __future__ import annotations

import pytest
import torch

import wsimil_core.methods  # noqa: F401
from test_mecds import TASKS, TINY, tiny_model

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def expert_inputs(model, f, t):
    """Run the first MFA module's DFR on ``f`` [1, N, C], ``t`` [1, M, C]; the patches each expert read and the
    routed mask [N, M]."""
    module = model.mfa[0]
    seen = {}
    hooks = [
        expert.register_forward_pre_hook(lambda mod, args, m=m: seen.__setitem__(m, args[0][0, 1:].detach()))
        for m, expert in enumerate(module.experts)
    ]
    _, _, phi, mask = module.dfr(f, t)
    for h in hooks:
        h.remove()
    return seen, phi[0].detach(), mask[0]


# --- expert input (Sec. 2.2: [T'_m, F'_m] = Exp_m([T_m, F_m])) ------------------------------------------------


def test_experts_read_the_routed_features_themselves_by_default():
    model = tiny_model().eval()
    assert model.config.expert_weight == "straight_through"
    f, t = torch.randn(1, 30, 16), torch.randn(1, 2, 16)
    seen, _, mask = expert_inputs(model, f, t)
    for m in range(2):
        assert torch.equal(seen[m], f[0, mask[:, m]])  # bit-identical: the gate's forward value is exactly 1


def test_scaled_expert_input_is_the_old_routing_weight():
    model = tiny_model(expert_weight="scaled").eval()
    f, t = torch.randn(1, 30, 16), torch.randn(1, 2, 16)
    seen, phi, mask = expert_inputs(model, f, t)
    for m in range(2):
        w = phi[mask[:, m], m]
        expected = f[0, mask[:, m]] * (w * w.numel() / w.sum()).unsqueeze(1)  # |S| phi / sum_S phi
        torch.testing.assert_close(seen[m], expected)
        assert not torch.equal(seen[m], f[0, mask[:, m]])


@pytest.mark.parametrize("expert_weight", ["straight_through", "scaled"])
def test_routers_get_a_gradient_with_either_expert_input(expert_weight):
    model = tiny_model(expert_weight=expert_weight)
    out = model(torch.randn(40, 12))
    sum(lg[0, 1] for lg in out.logits.values()).backward()
    for module in model.mfa:
        for router in module.routers:
            assert sum(float(p.grad.abs().sum()) for p in router.parameters()) > 0


def test_straight_through_gate_gradient_is_the_routed_feature():
    # d/dphi of sel * (1 + phi - sg(phi)) is sel, as for sel * phi
    model = tiny_model()
    sel = torch.randn(5, 16)
    w = torch.rand(5, requires_grad=True)
    out = model.mfa[0]._expert_input(sel, w)
    assert torch.equal(out, sel)
    out.sum().backward()
    torch.testing.assert_close(w.grad, sel.sum(dim=1))


def test_a_checkpoint_without_the_new_fields_keeps_its_old_expert_input(tmp_path, monkeypatch):
    import wsimil_core.engine.checkpoint as ckpt_mod

    model = tiny_model(expert_weight="scaled").eval()
    x = torch.randn(25, 12)
    with torch.no_grad():
        before = model(x).logits
    real = ckpt_mod.model_config_dict

    def as_written_before(m):  # the stored config of a checkpoint written before the fields existed
        cfg = real(m)
        cfg.pop("expert_weight"), cfg.pop("dfr")
        return cfg

    monkeypatch.setattr(ckpt_mod, "model_config_dict", as_written_before)
    path = tmp_path / "old.safetensors"
    ckpt_mod.save_checkpoint(path, model, {"method": "mecds"})
    monkeypatch.undo()
    assert "expert_weight" not in ckpt_mod.read_checkpoint_meta(path).model_kwargs
    loaded, meta = ckpt_mod.load_checkpoint(path)
    assert loaded.config.expert_weight == "scaled" and loaded.config.dfr
    assert meta.model_kwargs["expert_weight"] == "scaled"
    with torch.no_grad():
        after = loaded(x).logits
    assert all(torch.equal(after[k], before[k]) for k in TASKS)
    # a new model (no stored config) takes the paper's default
    assert tiny_model().config.expert_weight == "straight_through"


# --- ablation "no DFRM" (Table 2, first row) -----------------------------------------------------------------


def test_no_dfrm_has_no_routers_or_experts_and_tokens_read_the_shared_stream():
    full, plain = tiny_model(), tiny_model(dfr=False)
    assert all(len(m.routers) == len(m.experts) == 2 for m in full.mfa)
    assert all(len(m.routers) == len(m.experts) == 0 for m in plain.mfa)
    n_full = sum(p.numel() for p in full.parameters())
    assert sum(p.numel() for p in plain.parameters()) < n_full
    plain.eval()
    module = plain.mfa[0]
    f, t = torch.randn(1, 20, 16), torch.randn(1, 2, 16)
    with torch.no_grad():
        f1, t1, info = module(f, t)
        g, s = f, t  # independent: TSA, TSA, FFN only, nothing after
        for layer in module.tsa:
            g, s, _ = layer(g, s)
        g, s = module.ffn(g), module.ffn(s)
    assert torch.equal(f1, g) and torch.equal(t1, s) and set(info) == {"attention"}
    out = plain(torch.randn(20, 12))
    assert set(out.maps) == {"attention/a", "attention/b"}
    assert [s.name for s in plain.map_specs()] == ["attention/a", "attention/b"]
    assert out.extras["routed_fraction"] == {}


def test_no_dfrm_model_extends_with_a_token_and_a_head():
    from wsimil_core.methods.mecds.method import extend_model

    model = tiny_model(dfr=False).eval()
    x = torch.randn(15, 12)
    with torch.no_grad():
        before = model(x).logits
    new = extend_model(model, "c", 2)
    assert len(new) == 3  # token, head weight, head bias
    assert len(model.task_modules("c")) == 1
    with torch.no_grad():
        after = model(x).logits
    assert all(torch.equal(after[k], before[k]) for k in TASKS) and after["c"].shape == (1, 2)


# --- distillation: AKD (Eq. 1-2), the label-gated variant, plain KL, none ------------------------------------


def _softmax2(a: float, b: float, T: float = 1.0) -> float:
    """Probability of class 1 of logits (a, b) at temperature T, in plain Python."""
    import math

    return 1.0 / (1.0 + math.exp((a - b) / T))


def _reference(student, teacher, y, T=2.0, gp=1.0, gn=4.0, margin=0.2):
    """Per-bag AKD (Eq. 2 with z_hat -> 1 - z_hat in the 2nd term), gated AKD and KL, in plain Python floats."""
    import math

    akd, gated, kl = [], [], []
    for (s0, s1), (t0, t1), lab in zip(student, teacher, y, strict=True):
        z, zh = _softmax2(s0, s1, T), _softmax2(t0, t1, T)
        p, ph = _softmax2(s0, s1), _softmax2(t0, t1)
        w_pos, w_neg = (1 - p) ** gp, max(ph - margin, 0.0) ** gn
        pos, neg = zh * math.log(zh / z), (1 - zh) * math.log((1 - zh) / (1 - z))
        akd.append(T * T * (w_pos * pos + w_neg * neg))
        gated.append(T * T * (w_pos if lab == 1 else w_neg) * (pos + neg))
        kl.append(T * T * (pos + neg))
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    return mean(akd), mean(gated), mean(kl)


def test_akd_gated_and_kl_match_an_independent_computation():
    from wsimil_core.functional import akd_gated_loss, akd_loss, kd_kl_loss

    student = [[0.3, -0.4], [1.2, 0.9], [-0.5, 2.0], [0.0, 0.1]]
    teacher = [[2.0, -1.0], [-0.3, 0.8], [0.4, 0.2], [-1.5, 1.5]]
    y = [0, 1, 1, 0]
    akd, gated, kl = _reference(student, teacher, y)
    s, t, lab = torch.tensor(student), torch.tensor(teacher), torch.tensor(y)
    assert float(akd_loss(s, t)) == pytest.approx(akd, rel=1e-5)
    assert float(akd_gated_loss(s, t, lab)) == pytest.approx(gated, rel=1e-5)
    assert float(kd_kl_loss(s, t)) == pytest.approx(kl, rel=1e-5)
    with pytest.raises(ValueError, match="labels"):
        akd_gated_loss(s, t, lab[:2])


def test_akd_pushes_the_student_toward_positive_where_kl_and_gated_do_not():
    """Table 2: KL distillation lowers sensitivity, AKD does not. At student == teacher on a bag the teacher calls
    negative (p_hat < margin, so w_neg = 0) AKD still has a gradient that raises the student's positive
    probability; KL and the gated variant are at their minimum there."""
    from wsimil_core.functional import akd_gated_loss, akd_loss, kd_kl_loss

    teacher = torch.tensor([[1.5, -1.0]])  # p_hat ~ 0.08
    for loss, raises in (
        (lambda s: akd_loss(s, teacher), True),
        (lambda s: kd_kl_loss(s, teacher), False),
        (lambda s: akd_gated_loss(s, teacher, torch.tensor([0])), False),
        (lambda s: akd_gated_loss(s, teacher, torch.tensor([1])), False),
    ):
        s = teacher.clone().requires_grad_(True)
        loss(s).backward()
        push_up = float(s.grad[0, 0] - s.grad[0, 1])  # > 0: descent raises logit 1 over logit 0
        if raises:
            assert push_up > 1e-3
        else:
            assert abs(push_up) < 1e-6


def _bags(n=4):
    from wsimil_core.data.bag import BagBatch

    gen = torch.Generator().manual_seed(1)
    return [
        BagBatch(
            features=torch.randn(20, 12, generator=gen),
            targets={"a": torch.tensor([i % 2]), "b": torch.tensor([(i // 2) % 2])},
            slide_id=f"s{i}",
        )
        for i in range(n)
    ]


@pytest.mark.parametrize("distill", ["akd", "akd_gated", "kl", "none"])
def test_distill_switch_selects_the_student_loss(distill):
    from wsimil_core.functional import akd_gated_loss, akd_loss, kd_kl_loss
    from wsimil_core.methods.base import create_method

    torch.manual_seed(0)
    method = create_method("mecds", model={**TINY, "tasks": TASKS}, options={"distill": distill})
    bag = _bags(1)[0]
    method.setup_phase("student", [bag])
    method.eval()  # no dropout anyway; keeps the two forwards identical
    step = method.training_step(bag, "student")
    if distill == "none":
        assert "kd" not in step and torch.equal(step["loss"], step["loss"].new_tensor(float(step["ce"])))
        return
    with torch.no_grad():
        s = method.model(bag.features).logits
        t = method.teacher(bag.features).logits
    expected = 0.0
    for task in TASKS:
        y = bag.targets[task]
        fn = {
            "akd": lambda a, b, y: akd_loss(a, b),
            "akd_gated": lambda a, b, y: akd_gated_loss(a, b, y),
            "kl": lambda a, b, y: kd_kl_loss(a, b),
        }[distill]
        expected += float(fn(s[task], t[task], y))
    assert float(step["kd"]) == pytest.approx(expected, rel=1e-5, abs=1e-7)


# --- the student distils from the teacher's best epoch -------------------------------------------------------


def test_student_distils_from_the_teachers_best_validation_epoch(synthetic_store, tmp_path, monkeypatch):
    import wsimil_core.engine.trainer as trainer_mod

    # validation metric per epoch: the teacher is best at its first of 3 epochs (then 1 student epoch)
    values = iter([0.9, 0.2, 0.3, 0.1])
    monkeypatch.setattr(trainer_mod, "tracked_metric", lambda cfg, val: next(values))
    cfg = {
        "method": {"name": "mecds", "options": {}},
        "model": {"dim": 16, "n_heads": 2, "router_dim": 8, "dropout": 0.0},
        "data": {
            "store": str(synthetic_store.store),
            "labels": str(synthetic_store.labels),
            "targets": ["label", "task_b"],
        },
        "train": {
            "epochs": 3,
            "phase_epochs": {"student": 1},
            "lr": 3e-2,
            "device": "cpu",
            "seed": 0,
            "early_stopping": {"patience": 10},
        },
        "output": {"dir": str(tmp_path / "run"), "progress": False},
    }
    teacher_at: dict[int, dict[str, torch.Tensor]] = {}

    def copy_teacher(record):
        if record["phase"] == "teacher":
            teacher_at[record["epoch"]] = {k: v.clone() for k, v in trainer.method.teacher.state_dict().items()}

    trainer = trainer_mod.Trainer(cfg, callbacks=[copy_teacher])
    result = trainer.fit()
    teacher_records = [r for r in result.history if r["phase"] == "teacher"]
    assert [r["best"] for r in teacher_records] == [True, False, False]
    method = trainer.method
    assert method.best_teacher_epoch == 0
    final = method.teacher.state_dict()
    assert all(torch.equal(final[k], v) for k, v in teacher_at[0].items())  # the best epoch's weights
    assert any(not torch.equal(final[k], v) for k, v in teacher_at[2].items())  # not the last epoch's
    # the resume file carries the best teacher, so a resumed student phase distils from the same weights
    from wsimil_core.methods.base import create_method

    fresh = create_method("mecds", model=dict(method.model.config.__dict__))
    fresh.load_state_dict(method.state_dict())
    assert fresh.best_teacher_epoch == 0
    state = method.state_dict()
    state.pop("_extra_state")
    fresh.load_state_dict(state)  # a state written before the copy existed still loads
    assert fresh.best_teacher_epoch is None


# --- sensitivity at a fixed threshold (the paper's SEN) -----------------------------------------------------


@pytest.mark.parametrize("report_threshold", [0.5, 0.3, None])
def test_validation_reports_sensitivity_at_the_fixed_threshold(synthetic_store, report_threshold):
    import numpy as np

    from wsimil_core.data.dataset import BagDataset
    from wsimil_core.engine.evaluation import Evaluator
    from wsimil_core.methods.base import create_method

    targets = ["label", "task_b"]
    ds = BagDataset(synthetic_store.store, synthetic_store.labels, targets=targets)
    torch.manual_seed(0)
    method = create_method(
        "mecds",
        model={"in_dim": ds.in_dim, "tasks": {t: 2 for t in targets}, "dim": 16, "n_heads": 2, "dropout": 0.0},
        options={"report_threshold": report_threshold},
    )
    ev = Evaluator(method, torch.device("cpu"), targets)
    metrics, _ = ev.evaluate(ds, thresholds={t: 0.9 for t in targets})  # the run's (chosen) threshold differs
    probs, labels = ev.predict(ds)
    for t in targets:
        if report_threshold is None:
            assert not any("@" in k for k in metrics)
            continue
        y, p1 = labels[t], probs[t][:, 1]
        key = f"{t}/sensitivity@{report_threshold:g}"
        assert metrics[key] == pytest.approx(np.mean(p1[y == 1] >= report_threshold))
        assert metrics[f"{t}/specificity@{report_threshold:g}"] == pytest.approx(np.mean(p1[y == 0] < report_threshold))
        assert metrics[f"{t}/sensitivity"] == pytest.approx(np.mean(p1[y == 1] >= 0.9))
    if report_threshold is not None:
        assert f"mean/sensitivity@{report_threshold:g}" in metrics


# --- the paper's recipe ---------------------------------------------------------------------------------------


def test_paper_config_holds_the_recipe_of_sec_3_1():
    from pathlib import Path

    from wsimil_core.engine.config import load_config
    from wsimil_core.methods.base import method_class

    cfg = load_config(Path(__file__).parents[1] / "configs" / "mecds_paper.yaml")
    t = cfg.train
    assert (t.optimizer, t.lr, t.scheduler, t.epochs, t.warmup_epochs) == ("adam", 1e-4, "cosine", 50, 0)
    assert t.accumulate == 16 and t.threshold == 0.5
    opts = method_class("mecds").options_cls(**cfg.method.options)
    assert (opts.distill, opts.temperature, opts.gamma_pos, opts.gamma_neg, opts.margin) == ("akd", 2, 1, 4, 0.2)
    assert cfg.model["top_p"] == 0.5 and cfg.model["dfr"] and cfg.model["expert_weight"] == "straight_through"
    assert cfg.data.targets == ["cancer", "candidiasis", "clue_cell"]
