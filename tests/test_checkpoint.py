"""Checkpoints and resume files: round trip, ids, corrupt files, no unpickling."""

import json
import os
import pickle

import numpy as np
import pytest
import torch

from wsimil_core.api import create_model
from wsimil_core.engine.checkpoint import (
    checkpoint_id,
    flatten_optimizer_state,
    flatten_state,
    load_checkpoint,
    load_state,
    read_checkpoint_meta,
    save_checkpoint,
    save_state,
    unflatten_optimizer_state,
    unflatten_state,
)
from wsimil_core.errors import CheckpointError

META = {
    "method": "abmil",
    "targets": ["label"],
    "class_names": {"label": ["benign", "tumour"]},
    "encoder": {"name": "resnet18", "encoder_id": "resnet18-random", "dim": 8, "weights_sha256": "random-init"},
    "train_config": {"epochs": 2, "lr": 1e-4},
    "metrics": {"val/auc": 0.75},
    "threshold": 0.42,
}


def _model(seed=0, **cfg):
    torch.manual_seed(seed)
    return create_model("abmil", in_dim=8, n_classes=2, dim=16, attn_dim=8, **cfg)


def test_round_trip_is_bit_identical(tmp_path):
    model = _model()
    path = tmp_path / "best.safetensors"
    written = save_checkpoint(path, model, META)
    loaded, meta = load_checkpoint(path)
    for name, t in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name
    # the legacy keys of META are migrated into the typed fields
    assert meta.method == "abmil" and meta.task_names == ["label"]
    assert meta.class_names("label") == ["benign", "tumour"]
    assert meta.threshold("label") == 0.42
    assert meta.encoder.attrs() == META["encoder"]
    assert meta.train_config == META["train_config"] and meta.metrics == META["metrics"]
    assert meta.model_name == "abmil"
    assert meta.model_kwargs["dim"] == 16
    assert meta.checkpoint_id == written.checkpoint_id
    assert not loaded.training
    assert loaded.checkpoint_meta is meta
    assert read_checkpoint_meta(path) == meta
    assert not [p for p in tmp_path.iterdir() if p.name != "best.safetensors"]  # no temp file left


def test_checkpoint_id_is_stable_and_depends_on_weights_and_method(tmp_path):
    a = save_checkpoint(tmp_path / "a.safetensors", _model(0), META).checkpoint_id
    b = save_checkpoint(tmp_path / "b.safetensors", _model(0), META).checkpoint_id
    c = save_checkpoint(tmp_path / "c.safetensors", _model(1), META).checkpoint_id
    assert a == b != c
    assert a.startswith("abmil-")
    sd = _model(0).state_dict()
    assert checkpoint_id(sd, "abmil") == a != checkpoint_id(sd, "asmil")


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.safetensors")
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, _model(), META)
    data = path.read_bytes()
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated.safetensors"):
        load_checkpoint(bad)
    # flip bytes in the weights: the stored checkpoint_id no longer matches
    flipped = bytearray(data)
    flipped[-9] ^= 0xFF
    bad2 = tmp_path / "flipped.safetensors"
    bad2.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="checkpoint_id"):
        load_checkpoint(bad2)


def test_incompatible_checkpoint(tmp_path):
    path = tmp_path / "m.safetensors"
    wrong = {"in_dim": 8, "n_classes": 3, "dim": 16, "attn_dim": 8}
    save_checkpoint(path, _model(), {**META, "model_config": wrong})
    with pytest.raises(CheckpointError, match="do not fit"):
        load_checkpoint(path)
    path2 = tmp_path / "m2.safetensors"
    save_checkpoint(path2, _model(), {**META, "model_name": "no-such-model"})
    with pytest.raises(CheckpointError, match="no-such-model"):
        load_checkpoint(path2)
    # a resume file is not a checkpoint
    state = tmp_path / "state.safetensors"
    save_state(state, {"x": torch.zeros(2)}, {"epoch": 1})
    with pytest.raises(CheckpointError, match="not a wsimil checkpoint"):
        load_checkpoint(state)


class _Boom:
    """Unpickling this would create a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_content_is_never_unpickled(tmp_path):
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.safetensors"
    evil.write_bytes(pickle.dumps({"state_dict": _Boom(str(marker))}))
    with pytest.raises(CheckpointError, match="never unpickles"):
        load_checkpoint(evil)
    with pytest.raises(CheckpointError):
        load_state(evil)
    with pytest.raises(CheckpointError):
        read_checkpoint_meta(evil)
    assert not marker.exists()
    # a torch.save file (zip + pickle) is refused the same way
    pt = tmp_path / "model.pt"
    torch.save(_model().state_dict(), pt)
    with pytest.raises(CheckpointError, match="safetensors"):
        load_checkpoint(pt)


def test_resume_state_round_trip_with_optimizer(tmp_path):
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(5, 8)).logits.sum().backward()
        opt.step()
        sched.step()
    np_state = np.random.default_rng(0).bit_generator.state
    obj = {
        "model": model.state_dict(),
        "rng_torch": torch.get_rng_state(),
        "rng_numpy_legacy": np.random.get_state(),
        "numpy_bitgen": np_state,
        "scheduler": sched.state_dict(),
        "epoch": 3,
        "best": float("-inf"),
    }
    t1, opt_skel = flatten_optimizer_state(opt.state_dict())
    t2, skel = flatten_state(obj)
    path = tmp_path / "last.state.safetensors"
    save_state(path, {**t1, **t2}, {"optimizer": opt_skel, "state": skel})
    json.dumps(skel)  # the skeleton is plain JSON
    tensors, meta = load_state(path)
    restored = unflatten_state(tensors, meta["state"])
    assert restored["epoch"] == 3 and restored["best"] == float("-inf")
    assert torch.equal(restored["rng_torch"], obj["rng_torch"])
    legacy = restored["rng_numpy_legacy"]
    assert isinstance(legacy, tuple) and legacy[0] == "MT19937"
    assert np.array_equal(legacy[1], obj["rng_numpy_legacy"][1])
    assert restored["numpy_bitgen"] == np_state
    for k, v in obj["model"].items():
        assert torch.equal(restored["model"][k], v)

    opt_sd = unflatten_optimizer_state(tensors, meta["optimizer"])
    model2 = _model(5)
    model2.load_state_dict(restored["model"])
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-3)
    opt2.load_state_dict(opt_sd)
    assert opt2.param_groups[0]["betas"] == (0.9, 0.95)
    for pid, st in opt.state_dict()["state"].items():
        for key, value in st.items():
            assert torch.equal(opt2.state_dict()["state"][pid][key], value)
    sched2 = torch.optim.lr_scheduler.CosineAnnealingLR(opt2, T_max=10)
    sched2.load_state_dict(restored["scheduler"])
    assert sched2.last_epoch == 2
    # the same step from the same state gives the same weights
    x = torch.randn(5, 8)
    for m, o in ((model, opt), (model2, opt2)):
        m.eval()
        o.zero_grad()
        m(x).logits.sum().backward()
        o.step()
    for k, v in model.state_dict().items():
        assert torch.allclose(model2.state_dict()[k], v)


def test_save_is_atomic_on_failure(tmp_path):
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, _model(), META)
    before = path.read_bytes()
    with pytest.raises(TypeError):
        save_checkpoint(path, _model(1), {**META, "bad": object()})
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"]
