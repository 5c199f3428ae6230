"""Training engine tests (issue 3): the loop, checkpoints, resume, early stopping, multi-task, CLI.

A tiny attention-MIL model and methods are registered here so the engine is tested independently of the real
models (test_crossval.py imports them from this module).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from wsimil_core.methods.base import Method, MethodOptions, register_method
from wsimil_core.models.base import _MODELS, MILOutput, ModelConfig, bag_dims, register_model


@dataclass
class TinyConfig(ModelConfig):
    """in_dim, n_classes, optional tasks {name: C}, hidden size and dropout."""

    in_dim: int = 32
    n_classes: int = 2
    tasks: dict | None = None
    hidden: int = 16
    dropout: float = 0.0


class TinyMIL(nn.Module):
    """Tiny attention MIL used by the engine tests."""

    def __init__(self, config: TinyConfig):
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(config.in_dim, config.hidden), nn.ReLU(), nn.Dropout(config.dropout))
        self.attn = nn.Linear(config.hidden, 1)
        self.tasks = dict(config.tasks) if config.tasks else None
        if self.tasks:
            self.heads = nn.ModuleDict({t: nn.Linear(config.hidden, c) for t, c in self.tasks.items()})
        else:
            self.head = nn.Linear(config.hidden, config.n_classes)

    def forward(self, x, coords=None, **extras):
        h = self.embed(bag_dims(x))  # [B, N, H]
        a = torch.softmax(self.attn(h).squeeze(-1), dim=-1)  # [B, N]
        z = torch.einsum("bn,bnh->bh", a, h)
        logits = {t: head(z) for t, head in self.heads.items()} if self.tasks else self.head(z)
        return MILOutput(logits=logits, maps={"attention": a[0]})


class TinyMultiMethod(Method):
    """Sum of cross-entropies over every task of the tiny model."""

    name = "_tiny_multi"
    model_name = "_tiny"

    def training_step(self, batch, phase):
        out = self.model(batch.features, coords=batch.coords)
        losses = [nn.functional.cross_entropy(out.logits[t], y.view(-1)) for t, y in batch.targets.items()]
        loss = torch.stack(losses).sum()
        return {"loss": loss}


class TwoPhaseOptions(MethodOptions):
    warm_scale: float = 1.0


class TwoPhaseMethod(Method):
    """Two phases; an EMA copy updated after every optimiser step; counts hook calls."""

    name = "_tiny_two_phase"
    model_name = "_tiny"
    options_cls = TwoPhaseOptions
    phases = ("warmup", "main")

    def __init__(self, model, options=None):
        super().__init__(model, options)
        self.ema = nn.Linear(1, 1)
        self.register_buffer("ema_steps", torch.zeros((), dtype=torch.long))
        self.calls = {"setup": [], "after_step": 0}

    def setup_phase(self, phase, train_data):
        self.calls["setup"].append((phase, len(train_data)))

    def trainable_parameters(self, phase):
        if phase == "warmup":
            return list(self.model.head.parameters())
        return list(self.model.parameters())

    def balanced_sampling(self, phase):
        return phase == "warmup"

    def after_optimizer_step(self, phase):
        self.calls["after_step"] += 1
        self.ema_steps += 1

    def epoch_end(self, phase, epoch):
        return {"ema_steps": float(self.ema_steps)}


class Flipped(nn.Module):
    """A side-by-side evaluation model the engine must not call directly (only ``eval_forward`` knows it)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kwargs):
        raise AssertionError("the engine called a model directly instead of method.eval_forward")


class EvalHookMethod(Method):
    """Records every ``eval_forward`` call; its ``flipped`` evaluation model negates the logits."""

    name = "_tiny_eval_hook"
    model_name = "_tiny"

    def __init__(self, model, options=None):
        super().__init__(model, options)
        self.calls = []

    def evaluation_models(self):
        return {"online": self.model, "flipped": Flipped(self.model)}

    def balanced_sampling(self, phase):
        return ["label"]

    def eval_forward(self, batch, model=None):
        model = model if model is not None else self.inference_model()
        kind = "flipped" if isinstance(model, Flipped) else ("online" if model is self.model else "other")
        self.calls.append((kind, batch.slide_id, batch.coords is not None, torch.is_grad_enabled(), model.training))
        if kind == "flipped":
            out = model.inner(batch.features, coords=batch.coords)
            return MILOutput(logits=-out.logits)
        return model(batch.features, coords=batch.coords)


if "_tiny" not in _MODELS:
    register_model("_tiny", TinyConfig)(TinyMIL)
    register_method(
        type(
            "TinyMethod", (Method,), {"name": "_tiny", "model_name": "_tiny", "__doc__": "Plain CE on the tiny model."}
        )
    )
    register_method(TinyMultiMethod)
    register_method(TwoPhaseMethod)
    register_method(EvalHookMethod)


# --- tests ----------------------------------------------------------------------------------------------------

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from wsimil_core.engine.schedule import EarlyStopping, lr_factor  # noqa: E402
from wsimil_core.engine.trainer import train  # noqa: E402
from wsimil_core.errors import CheckpointError, ConfigError  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_one_thread_module")  # the machine is shared: one torch thread


def make_config(cohort, run_dir, method="_tiny", model=None, data=None, train_opts=None, output=None) -> dict:
    """A small config over the synthetic cohort."""
    return {
        "method": method,
        "model": model if model is not None else {"hidden": 16},
        "data": {
            "store": str(cohort.store),
            "labels": str(cohort.labels),
            "split": {"kind": "kfold", "folds": 4, "fold": 0, "val_frac": 0.2},
            **(data or {}),
        },
        "train": {"epochs": 4, "lr": 5e-3, **(train_opts or {})},
        "output": {"dir": str(run_dir), "progress": False, **(output or {})},
    }


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_training_learns_synthetic_cohort(synthetic_store, tmp_path):
    """The base Method (plain CE) reaches a held-out AUC > 0.9 in a few epochs."""
    cfg = make_config(synthetic_store, tmp_path / "run", model={"hidden": 32}, train_opts={"epochs": 6, "lr": 1e-2})
    result = train(cfg)
    assert result.test_metrics["auc"] > 0.9
    assert result.val_metrics["auc"] > 0.9
    losses = [r["train/loss"] for r in result.history]
    assert losses[-1] < losses[0]
    # run directory contents
    run = tmp_path / "run"
    for name in (
        "best.safetensors",
        "last.safetensors",
        "metrics.csv",
        "metrics.jsonl",
        "resume.safetensors",
        "result.json",
        "config.yaml",
    ):
        assert (run / name).is_file(), name
    csv = pd.read_csv(run / "metrics.csv")
    assert len(csv) == 6 and {"train/loss", "val/auc", "val/loss", "lr"} <= set(csv.columns)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["global_epoch"] for x in lines] == list(range(6))


def test_checkpoint_meta_and_reload(synthetic_store, tmp_path):
    from wsimil_core.data.dataset import BagDataset
    from wsimil_core.engine.checkpoint import load_checkpoint
    from wsimil_core.engine.config import as_config
    from wsimil_core.engine.datasets import make_split
    from wsimil_core.inference.predict import predict_bag
    from wsimil_core.store.zarr_store import FeatureStore

    cfg = make_config(synthetic_store, tmp_path / "run", train_opts={"epochs": 2, "threshold": "val"})
    result = train(cfg)
    model, meta = load_checkpoint(result.best_checkpoint)
    assert meta.method == "_tiny" and meta.model_name == "_tiny"
    assert meta.model_kwargs["in_dim"] == synthetic_store.in_dim and meta.model_kwargs["n_classes"] == 2
    assert meta.class_names("label") == ["0", "1"]
    assert meta.task_names == ["label"]
    assert meta.encoder.encoder_id == synthetic_store.encoder_id
    assert meta.encoder.weights_sha256 == "random-init"
    assert meta.train_config["train"]["epochs"] == 2
    assert "auc" in meta.metrics and set(meta.tasks) == {"label"}
    assert meta.tasks["label"].threshold.method == "youden on validation"
    best = result.history[result.best_epoch]
    assert meta.tasks["label"].threshold.value == result.thresholds["label"] == best["val/threshold"]
    cfg = as_config(meta.train_config)  # the number of validation slides of the run's split
    n_val = len(make_split(cfg, BagDataset(synthetic_store.store, synthetic_store.labels)).val)
    assert n_val > 0 and meta.tasks["label"].threshold.n_slides == n_val
    # the grid and the store the model was trained on, from the store's slide attrs
    assert meta.grid.patch_mpp == 0.5 and meta.grid.patch_px == 256 and meta.grid.stride == 256
    assert meta.grid.patch_size_level0 == 256 and meta.grid.stride_level0 == 256
    assert meta.store.path == str(Path(synthetic_store.store).resolve())
    assert meta.store.encoder_id == synthetic_store.encoder_id
    assert meta.checkpoint_id and meta.version
    bag = FeatureStore(synthetic_store.store).read_bag("slide_00")
    pred = predict_bag(model, bag.features, bag.coords)
    assert pred.probs["label"].shape == (2,)


def test_fixed_threshold_is_recorded_and_used_by_predict_and_evaluate(synthetic_store, tmp_path, capsys):
    from wsimil_core.checkpoint_meta import THRESHOLD_FIXED
    from wsimil_core.cli import main
    from wsimil_core.engine.checkpoint import read_checkpoint_meta
    from wsimil_core.inference.predict import predict_store

    cfg = make_config(synthetic_store, tmp_path / "run", train_opts={"epochs": 1, "threshold": 0.3})
    result = train(cfg)
    meta = read_checkpoint_meta(str(result.best_checkpoint))  # a str path is accepted
    thr = meta.tasks["label"].threshold
    assert (thr.value, thr.method, thr.n_slides) == (0.3, THRESHOLD_FIXED, None)
    frame = predict_store(result.best_checkpoint, synthetic_store.store, device="cpu", write_maps=False, progress=False)
    assert frame.attrs["thresholds"] == {"label": 0.3}
    expected = np.where(frame["label_prob_1"].to_numpy() >= 0.3, "1", "0")
    assert frame["label_pred"].astype(str).tolist() == expected.tolist()
    out = tmp_path / "report.json"
    args = ["evaluate", str(result.best_checkpoint), "--store", str(synthetic_store.store)]
    args += ["--labels", str(synthetic_store.labels), "--n-boot", "10", "--out", str(out), "--device", "cpu"]
    main([*args, "--no-progress"])
    capsys.readouterr()
    report = json.loads(out.read_text())
    assert report["tasks"]["label"]["threshold"] == 0.3


def test_resume_after_interrupt_matches_uninterrupted_run(synthetic_store, tmp_path):
    """Interrupt after epoch 2 (KeyboardInterrupt from a callback), resume, compare with a straight run."""
    opts = dict(
        model={"hidden": 16, "dropout": 0.3},
        data={"max_patches": 25},
        train_opts={"epochs": 4, "warmup_epochs": 1, "accumulate": 2, "grad_clip": 1.0},
    )
    straight = train(make_config(synthetic_store, tmp_path / "a", **opts))

    def stop_after_second(record):
        if record["global_epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(make_config(synthetic_store, tmp_path / "b", **opts), callbacks=[stop_after_second])
    assert not (tmp_path / "b" / "result.json").exists()
    resumed = train(make_config(synthetic_store, tmp_path / "b", **opts))
    assert resumed.resumed
    wa, wb = read_weights(tmp_path / "a" / "last.safetensors"), read_weights(tmp_path / "b" / "last.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert [r["train/loss"] for r in straight.history] == [r["train/loss"] for r in resumed.history]
    assert straight.best_epoch == resumed.best_epoch
    # a finished run is not silently overwritten
    with pytest.raises(ConfigError, match="finished run"):
        train(make_config(synthetic_store, tmp_path / "b", **opts))
    # a different config in a run dir with an unfinished resume file is refused
    with pytest.raises(KeyboardInterrupt):
        train(make_config(synthetic_store, tmp_path / "c", **opts), callbacks=[stop_after_second])
    changed = make_config(synthetic_store, tmp_path / "c", **opts)
    changed["train"]["lr"] = 1e-2
    with pytest.raises(ConfigError, match="train.lr"):
        train(changed)


def flip_tensor_bytes(path: Path, name_part: str = "") -> str:
    """Flip 4 bytes in the middle of the data of the first tensor whose name contains ``name_part``; its name."""
    data = bytearray(path.read_bytes())
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    name = next(k for k, v in header.items() if k != "__metadata__" and name_part in k and v["data_offsets"][1] > 8)
    start, end = header[name]["data_offsets"]
    mid = 8 + n + (start + end) // 2
    data[mid : mid + 4] = bytes(b ^ 0x5A for b in data[mid : mid + 4])
    path.write_bytes(bytes(data))
    return name


def test_damaged_resume_file_is_refused_with_the_ways_out(synthetic_store, tmp_path):
    """Bytes flipped inside a tensor of resume.safetensors: no silent resume; --no-resume starts afresh."""
    opts = dict(model={"hidden": 16}, data={"max_patches": 25}, train_opts={"epochs": 3, "warmup_epochs": 0})

    def stop_after_second(record):
        if record["global_epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(make_config(synthetic_store, tmp_path / "r", **opts), callbacks=[stop_after_second])
    resume_file = tmp_path / "r" / "resume.safetensors"
    flip_tensor_bytes(resume_file, "method")
    with pytest.raises(CheckpointError) as err:
        train(make_config(synthetic_store, tmp_path / "r", **opts))
    msg = str(err.value)
    assert str(resume_file) in msg and "damaged" in msg
    assert "--no-resume" in msg and "delete" in msg and "restore a copy" in msg
    assert not (tmp_path / "r" / "result.json").exists()
    # the first way out: start afresh; the run then equals a straight run
    fresh = train(make_config(synthetic_store, tmp_path / "r", **opts), resume=False)
    straight = train(make_config(synthetic_store, tmp_path / "s", **opts))
    assert not fresh.resumed and [r["train/loss"] for r in fresh.history] == [r["train/loss"] for r in straight.history]


def test_early_stopping_and_lr_schedule():
    es = EarlyStopping("max", patience=2)
    assert es.update(0.5, 0) and not es.update(0.4, 1) and not es.should_stop
    assert not es.update(0.5, 2, tiebreak=None) and es.should_stop
    es = EarlyStopping("max", patience=None)
    assert es.update(float("nan"), 0) and es.update(0.6, 1, tiebreak=0.5) and es.update(0.6, 2, tiebreak=0.4)
    assert not es.update(0.6, 3, tiebreak=0.45)
    es = EarlyStopping("min", patience=1)
    assert es.update(1.0, 0) and es.update(0.5, 1) and not es.update(0.7, 2) and es.should_stop
    # warm-up then cosine to the floor
    assert lr_factor(0, 100, 10, "cosine", 0.0) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, "cosine", 0.0) == pytest.approx(1.0)
    assert lr_factor(10, 100, 10, "cosine", 0.0) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, "cosine", 0.0) == pytest.approx(0.5)
    assert lr_factor(100, 100, 10, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_factor(50, 100, 0, "none", 0.0) == 1.0


def test_early_stopping_stops_run(synthetic_store, tmp_path):
    cfg = make_config(
        synthetic_store,
        tmp_path / "run",
        train_opts={"epochs": 30, "lr": 1e-9, "early_stopping": {"metric": "loss", "patience": 1, "min_delta": 1.0}},
    )
    result = train(cfg)
    assert result.stopped_early and len(result.history) == 2


def test_two_phase_method_hooks_and_balanced_sampling(synthetic_store, tmp_path):
    cfg = make_config(
        synthetic_store,
        tmp_path / "run",
        method="_tiny_two_phase",
        train_opts={"epochs": 2, "phase_epochs": {"warmup": 1}},
        output={"keep": ["last"]},
    )
    result = train(cfg)
    assert [r["phase"] for r in result.history] == ["warmup", "main", "main"]
    assert result.best_checkpoint is None and result.last_checkpoint.is_file()
    steps = [r["train/ema_steps"] for r in result.history]
    assert steps[0] > 0 and steps[1] > steps[0] and steps[2] > steps[1]


def test_balanced_sampler_is_used(synthetic_store, tmp_path, monkeypatch):
    import wsimil_core.engine.epoch as epoch_mod

    seen = []
    real = epoch_mod.make_sampler

    def spy(labels, n, balanced, seed, **kw):
        seen.append(balanced)
        return real(labels, n, balanced, seed, **kw)

    monkeypatch.setattr(epoch_mod, "make_sampler", spy)
    train(make_config(synthetic_store, tmp_path / "run", train_opts={"epochs": 1, "balanced": True}))
    assert seen == [True]


def test_validation_and_test_run_through_eval_forward(synthetic_store, tmp_path, monkeypatch):
    import wsimil_core.engine.epoch as epoch_mod
    import wsimil_core.engine.trainer as trainer_mod
    from wsimil_core.data.dataset import BagDataset

    seen = []
    real = epoch_mod.make_sampler

    def spy(labels, n, balanced, seed, **kw):
        seen.append((sorted(labels), balanced))
        return real(labels, n, balanced, seed, **kw)

    monkeypatch.setattr(epoch_mod, "make_sampler", spy)
    cfg = make_config(synthetic_store, tmp_path / "run", method="_tiny_eval_hook", train_opts={"epochs": 2})
    trainer = trainer_mod.Trainer(cfg)
    result = trainer.fit()
    calls = trainer.method.calls
    split = trainer.split
    val_online = [c for c in calls if c[0] == "online"]
    assert [c[1] for c in val_online] == list(split.val) * 2  # every validation bag, each epoch
    assert [c[1] for c in calls if c[0] == "flipped"] == list(split.val) * 2
    assert [c[1] for c in calls if c[0] == "other"] == list(split.test)  # the best checkpoint's model
    assert all(has_coords and not grad and not training for _, _, has_coords, grad, training in calls)
    for record in result.history:  # 2 classes: negated logits give 1 - p, so the AUC is mirrored
        assert record["val_flipped/auc"] == pytest.approx(1.0 - record["val/auc"])
    assert seen == [(["label"], True)] * 2  # the method's list of targets to balance
    ds = BagDataset(synthetic_store.store, synthetic_store.labels)
    probs, labels = trainer.predict(ds.subset(split.test))
    assert probs["label"].shape == (len(split.test), 2) and list(labels) == ["label"]


def test_multi_task_training(synthetic_store, tmp_path):
    cfg = make_config(
        synthetic_store,
        tmp_path / "run",
        method="_tiny_multi",
        data={"targets": ["label", "task_b", "task_c"], "split": {"kind": "random", "val_frac": 0.3}},
        train_opts={"epochs": 2},
    )
    result = train(cfg)
    for key in ("label/auc", "task_b/auc", "task_c/auc", "mean/auc", "loss"):
        assert key in result.val_metrics
    from wsimil_core.engine.checkpoint import read_checkpoint_meta

    meta = read_checkpoint_meta(result.best_checkpoint)
    assert meta.model_kwargs["tasks"] == {"label": 2, "task_b": 2, "task_c": 2}
    assert meta.class_names("task_c") == ["high", "low"]
    assert set(meta.tasks) == {"label", "task_b", "task_c"}


def test_single_task_model_with_several_targets_is_an_error(synthetic_store, tmp_path):
    cfg = make_config(synthetic_store, tmp_path / "run", data={"targets": ["label", "task_b"]})
    cfg["method"] = "abmil"
    with pytest.raises(ConfigError, match="single-task"):
        train(cfg)


def test_column_split_and_bad_metric(synthetic_store, tmp_path):
    labels = pd.read_csv(synthetic_store.labels)
    labels["split"] = ["train"] * 16 + ["val"] * 4 + ["test"] * 4
    path = tmp_path / "labels.csv"
    labels.to_csv(path, index=False)
    cfg = make_config(
        synthetic_store,
        tmp_path / "run",
        data={"labels": str(path), "split": {"kind": "column"}},
        train_opts={"epochs": 1},
    )
    result = train(cfg)
    assert "auc" in result.test_metrics
    cfg = make_config(
        synthetic_store, tmp_path / "run2", train_opts={"epochs": 1, "early_stopping": {"metric": "nope"}}
    )
    with pytest.raises(ConfigError, match="nope"):
        train(cfg)


def test_cli_train(synthetic_store, tmp_path):
    import yaml

    from wsimil_core.cli import main

    cfg = make_config(synthetic_store, tmp_path / "ignored", train_opts={"epochs": 1})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    main(["train", str(path), "--output", str(tmp_path / "cli"), "--epochs", "2", "--set", "train.lr=0.01"])
    meta_cfg = json.loads((tmp_path / "cli" / "result.json").read_text())
    assert len(meta_cfg["history"]) == 2
    written = yaml.safe_load((tmp_path / "cli" / "config.yaml").read_text())
    assert written["train"]["lr"] == 0.01 and written["train"]["epochs"] == 2
    with pytest.raises(SystemExit) as exc:
        main(["train", str(path), "--set", "train.epoch=3"])
    assert exc.value.code == 1


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_ddp_gloo_two_processes(synthetic_store, tmp_path):
    """torchrun-style launch on CPU (gloo): both ranks train, rank 0 writes, weights stay in sync (~30 s)."""
    import socket

    import yaml

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    cfg = make_config(synthetic_store, tmp_path / "ddp", train_opts={"epochs": 1, "device": "cpu"})
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    script = tmp_path / "launch.py"
    script.write_text(
        "import os, sys\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "import test_trainer  # registers the tiny model\n"
        "import torch; torch.set_num_threads(1)\n"
        "from wsimil_core.engine.trainer import Trainer\n"
        "import torch.distributed as dist\n"
        "t = Trainer(sys.argv[1]); r = t.fit()\n"
        "w = torch.cat([p.detach().flatten() for p in t.method.model.parameters()])\n"
        "ws = [torch.zeros_like(w) for _ in range(2)]; dist.all_gather(ws, w)\n"
        "assert torch.equal(ws[0], ws[1]), 'ranks diverged'\n"
        "assert len(t.data['train']) > 0 and len(r.history) == 1\n"
        "print('rank', dist.get_rank(), 'ok', flush=True)\n"
        "dist.barrier(); dist.destroy_process_group()\n"
    )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={port}",
        str(script),
        str(path),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0 ok" in proc.stdout and "rank 1 ok" in proc.stdout
    assert (tmp_path / "ddp" / "last.safetensors").is_file()
    assert (tmp_path / "ddp" / "result.json").is_file()


@pytest.mark.slow
def test_cli_sigint_then_resume(synthetic_store, tmp_path):
    """Ctrl-C (SIGINT) on `wsimil train` exits with 130 and keeps the resume file; re-running finishes the run
    with the same weights as an uninterrupted run."""
    import signal
    import time

    import yaml

    cfg = make_config(
        synthetic_store, tmp_path / "x", method="abmil", model={"dim": 16, "attn_dim": 8}, train_opts={"epochs": 12}
    )
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    base = [sys.executable, "-m", "wsimil_core", "train", str(path), "--output"]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(base + [str(tmp_path / "a")], check=True, capture_output=True, env=env, timeout=300)
    proc = subprocess.Popen(base + [str(tmp_path / "b")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    jsonl = tmp_path / "b" / "metrics.jsonl"
    deadline = time.time() + 200
    while time.time() < deadline and proc.poll() is None:
        if jsonl.exists() and len(jsonl.read_text().splitlines()) >= 2:
            proc.send_signal(signal.SIGINT)
            break
        time.sleep(0.05)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err.decode()[-2000:]
    assert (tmp_path / "b" / "resume.safetensors").is_file() and not (tmp_path / "b" / "result.json").exists()
    subprocess.run(base + [str(tmp_path / "b")], check=True, capture_output=True, env=env, timeout=300)
    wa, wb = read_weights(tmp_path / "a" / "last.safetensors"), read_weights(tmp_path / "b" / "last.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
