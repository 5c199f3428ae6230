"""MECDS end to end on ``synthetic_store``: teacher -> student from a YAML config through ``wsimil train``, a
student-only run from a teacher checkpoint, and ``wsimil mecds extend`` (old parameters bit-identical, M+1 tasks)."""

from __future__ import annotations

import json

import pytest
import torch

from _helpers import train_from_config
from wsimil_core.cli import main

MODEL = {"dim": 16, "n_heads": 2, "router_dim": 8, "dropout": 0.0}


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _config(synthetic_store, out, options=None, epochs=1):
    return {
        "method": {"name": "mecds", "options": options or {}},
        "model": MODEL,
        "data": {
            "store": str(synthetic_store.store),
            "labels": str(synthetic_store.labels),
            "targets": ["label", "task_b"],
        },
        "train": {"epochs": epochs, "lr": 3e-3, "device": "cpu", "seed": 0},
        "output": {"dir": str(out), "progress": False},
    }


def _train(cfg, path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module-scoped fixtures run before the autouse one_thread fixture
    try:
        with torch.random.fork_rng():
            train_from_config(cfg, path)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def mecds_run(synthetic_store, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mecds_run")
    _train(_config(synthetic_store, tmp / "run"), tmp / "mecds.yaml")
    return tmp / "run"


def test_teacher_then_student_from_the_cli(mecds_run, synthetic_store):
    from wsimil_core.engine.checkpoint import load_checkpoint
    from wsimil_core.inference.predict import predict_bag
    from wsimil_core.store.zarr_store import FeatureStore

    history = [json.loads(s) for s in (mecds_run / "metrics.jsonl").read_text().splitlines() if s.strip()]
    assert [r["phase"] for r in history] == ["teacher", "student"]
    assert "train/kd" in history[1] and "train/kd" not in history[0]
    assert 0 < history[0]["train/routed_label"] <= 1
    for task in ("label", "task_b"):
        assert f"val/{task}/auc" in history[-1] and f"val/{task}/sensitivity" in history[-1]
    model, meta = load_checkpoint(mecds_run / "best.safetensors")
    assert meta.method == "mecds" and meta.model_kwargs["tasks"] == {"label": 2, "task_b": 2}
    bag = FeatureStore(synthetic_store.store).read_bag(synthetic_store.slide_ids[0])
    pred = predict_bag(model, bag.features, bag.coords, device="cpu")
    assert set(pred.probs) == {"label", "task_b"}
    n = bag.features.shape[0]
    for task in ("label", "task_b"):
        assert pred.maps[f"routing/{task}"].shape == (n,)
        assert pred.maps[f"routing/{task}/module2"].shape == (n,)
        assert pred.maps[f"attention/{task}"].shape == (n,)


def test_student_only_run_from_a_teacher_checkpoint(mecds_run, synthetic_store, tmp_path):
    cfg = _config(
        synthetic_store,
        tmp_path / "student",
        {"phases": ["student"], "teacher_checkpoint": str(mecds_run / "best.safetensors"), "distill": "kl"},
    )
    _train(cfg, tmp_path / "student.yaml")
    history = [json.loads(s) for s in (tmp_path / "student" / "metrics.jsonl").read_text().splitlines() if s]
    assert [r["phase"] for r in history] == ["student"]
    assert (tmp_path / "student" / "best.safetensors").exists()


def test_extend_adds_a_task_and_keeps_old_parameters(mecds_run, synthetic_store, tmp_path, capsys):
    from safetensors.torch import load_file

    from wsimil_core.engine.checkpoint import load_checkpoint

    src = mecds_run / "best.safetensors"
    out = tmp_path / "ext.safetensors"
    report = tmp_path / "ext.json"
    main(
        [
            "mecds",
            "extend",
            str(src),
            "--labels",
            str(synthetic_store.labels),
            "--target",
            "task_c",
            "--epochs",
            "1",
            "--device",
            "cpu",
            "--output",
            str(out),
            "--json",
            str(report),
        ]
    )
    text = capsys.readouterr().out
    assert "extend: epoch 1/1" in text and "bit-identical: True" in text
    model, meta = load_checkpoint(out)
    assert meta.model_kwargs["tasks"] == {"label": 2, "task_b": 2, "task_c": 2}
    assert meta.task_names == ["label", "task_b", "task_c"]
    assert meta.class_names("task_c") == ["high", "low"]
    old, new = load_file(str(src)), load_file(str(out))
    assert all(torch.equal(new[k], v) for k, v in old.items())
    assert set(new) - set(old)
    data = json.loads(report.read_text())
    assert set(data["before"]) == set(data["after"]) == {"label", "task_b"}
    assert data["frozen_identical"] is True
    for task in ("label", "task_b"):  # isolated extension: old tasks' metrics are exactly unchanged
        a, b = data["after"][task]["auc"], data["before"][task]["auc"]
        assert a == b or (a != a and b != b)  # equal, or both NaN (one class in the split)
    x = torch.randn(30, synthetic_store.in_dim)
    out_pred = model(x)
    assert set(out_pred.logits) == {"label", "task_b", "task_c"}
    old_model, _ = load_checkpoint(src)
    with torch.no_grad():
        for task in ("label", "task_b"):  # the old tasks' predictions are bit-identical
            assert torch.equal(old_model(x).logits[task], model(x).logits[task])
    # the extension ran as the engine's "extend" phase; its run directory sits beside the output
    history = [json.loads(s) for s in (tmp_path / "ext_run" / "metrics.jsonl").read_text().splitlines() if s]
    assert [r["phase"] for r in history] == ["extend"] and "val/task_c/auc" in history[0]
    assert meta.extras["extension"]["run_dir"] == str(tmp_path / "ext_run")
    assert meta.extras["extension"]["isolated"] is True
    assert "routing/task_c/module1" in out_pred.maps
    # an existing task name is a clear one-line error
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "mecds",
                "extend",
                str(src),
                "--labels",
                str(synthetic_store.labels),
                "--target",
                "task_b",
                "--epochs",
                "1",
            ]
        )
    assert exc.value.code == 1
    assert "already has a task 'task_b'" in capsys.readouterr().err


def test_extend_shared_stream_with_a_new_name_optimises_only_the_new_parameters(
    mecds_run, synthetic_store, tmp_path, monkeypatch
):
    from safetensors.torch import load_file

    from wsimil_core.engine.checkpoint import load_checkpoint
    from wsimil_core.methods.mecds.cli import extend_checkpoint

    optimised = []
    real = torch.optim.AdamW

    class Spy(real):
        def __init__(self, params, **kw):
            params = list(params)  # tensors, or parameter groups (weight decay on / off)
            optimised.append([p for g in params for p in (g["params"] if isinstance(g, dict) else [g])])
            super().__init__(params, **kw)

    monkeypatch.setattr(torch.optim, "AdamW", Spy)
    src = mecds_run / "best.safetensors"
    lines = []
    result = extend_checkpoint(
        src,
        synthetic_store.labels,
        "task_c",
        name="grade",
        output=tmp_path / "g.safetensors",
        epochs=2,
        device="cpu",
        isolated=False,
        progress=False,
        log=lines.append,
    )
    assert [r["epoch"] for r in result.history] == [1, 2] and "extend: epoch 2/2" in " ".join(lines)
    model, meta = load_checkpoint(result.checkpoint)
    old, new = load_file(str(src)), load_file(str(result.checkpoint))
    assert all(torch.equal(new[k], v) for k, v in old.items())  # frozen: requires_grad False, not optimised
    assert len(optimised) == 1 and sum(p.numel() for p in optimised[0]) == result.n_new_params > 0
    assert meta.model_kwargs["tasks"] == {"label": 2, "task_b": 2, "grade": 2}
    assert meta.model_kwargs["isolated_tasks"] == [] and meta.extras["extension"]["isolated"] is False
    assert meta.class_names("grade") == ["high", "low"] and meta.extras["extension"]["target_column"] == "task_c"
    assert set(meta.task_names) == {"label", "task_b", "grade"}
    renamed = (result.run_dir / "labels.csv").read_text().splitlines()[0].split(",")
    assert "grade" in renamed and "task_c" not in renamed
    # shared stream: the new experts' updates reach the later modules, so the old tasks may move
    old_model, _ = load_checkpoint(src)
    x = torch.randn(40, synthetic_store.in_dim)
    with torch.no_grad():
        assert not torch.equal(old_model(x).logits["label"], model(x).logits["label"])
