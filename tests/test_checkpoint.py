"""Checkpoints and resume files: round trip, ids, corrupt files, no unpickling."""

import hashlib
import json
import os
import pickle

import numpy as np
import pytest
import torch

from wsimil_core.api import create_model
from wsimil_core.checkpoint_meta import StoreRef
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
    a = save_checkpoint(tmp_path / "a.safetensors", _model(0), META)
    b = save_checkpoint(tmp_path / "b.safetensors", _model(0), META).checkpoint_id
    c = save_checkpoint(tmp_path / "c.safetensors", _model(1), META).checkpoint_id
    assert a.checkpoint_id == b != c
    assert a.checkpoint_id.startswith("abmil-")
    sd = _model(0).state_dict()
    assert checkpoint_id(sd, a) == a.checkpoint_id != checkpoint_id(sd, a.model_copy(update={"method": "asmil"}))
    # stable between save, header-only read and load
    assert read_checkpoint_meta(tmp_path / "a.safetensors").checkpoint_id == a.checkpoint_id
    assert load_checkpoint(tmp_path / "a.safetensors")[1].checkpoint_id == a.checkpoint_id


def test_checkpoint_id_covers_the_metadata_that_changes_predictions(tmp_path):
    """Same weights: another threshold, class name, model config, encoder or grid gives another id; metrics,
    paths, the train config, version and extras do not."""
    sd = _model(0).state_dict()
    base = save_checkpoint(tmp_path / "a.safetensors", _model(0), {**META, "grid": {"patch_mpp": 0.5, "patch_px": 224}})
    same = {
        "metrics": {"val/auc": 0.99},
        "train_config": {"epochs": 9},
        "version": "9.9",
        "extras": {"note": "x"},
        "store": StoreRef(path="/elsewhere.zarr", encoder_id="resnet18-random"),
        "encoder": base.encoder.model_copy(update={"weights_path": "/moved/w.safetensors"}),
    }
    for key, value in same.items():
        assert checkpoint_id(sd, base.model_copy(update={key: value})) == base.checkpoint_id, key
    task = base.tasks["label"]
    differ = {
        "threshold": {"label": task.model_copy(update={"threshold": task.threshold.model_copy(update={"value": 0.6})})},
        "class names": {"label": task.model_copy(update={"class_names": ["benign", "cancer"]})},
    }
    ids = {base.checkpoint_id}
    for what, tasks in differ.items():
        ids.add(checkpoint_id(sd, base.model_copy(update={"tasks": tasks})))
        assert len(ids) == 2 + list(differ).index(what), what
    ids.add(checkpoint_id(sd, base.model_copy(update={"model_kwargs": {**base.model_kwargs, "dropout": 0.5}})))
    ids.add(checkpoint_id(sd, base.model_copy(update={"encoder": base.encoder.model_copy(update={"dim": 9})})))
    ids.add(checkpoint_id(sd, base.model_copy(update={"grid": base.grid.model_copy(update={"patch_mpp": 1.0})})))
    assert len(ids) == 6


def _edit_header(path, key, value):
    """Rewrite one metadata entry of a checkpoint's header (tensors and every other entry unchanged)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        header = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    header[key] = json.dumps(value)
    out = path.with_name("edited-" + path.name)
    save_file(tensors, str(out), metadata=header)
    return out


def test_edited_metadata_gets_its_own_id_and_corrupt_metadata_is_refused(tmp_path):
    path = tmp_path / "m.safetensors"
    written = save_checkpoint(path, _model(), META)
    tasks = written.fields()["tasks"]

    # a valid edit (another threshold): loads with a warning under a new id, never the original's
    tasks["label"]["threshold"]["value"] = 0.9
    edited = _edit_header(path, "tasks", tasks)
    with pytest.warns(UserWarning, match="metadata changed"):
        _, meta = load_checkpoint(edited)
    assert meta.threshold("label") == 0.9 and meta.checkpoint_id != written.checkpoint_id
    assert read_checkpoint_meta(edited).checkpoint_id == meta.checkpoint_id

    # a threshold of "abc": one clear error naming the key (not a silent 0.5)
    tasks["label"]["threshold"]["value"] = "abc"
    with pytest.raises(
        CheckpointError, match=r"edited-m.safetensors: metadata field 'tasks.label.threshold.value'.*abc"
    ):
        load_checkpoint(_edit_header(path, "tasks", tasks))
    tasks["label"]["threshold"]["value"] = "0.3"  # a number as a string is corrupt, too
    with pytest.raises(CheckpointError, match="threshold.value"):
        read_checkpoint_meta(_edit_header(path, "tasks", tasks))

    # three class names on a 2-class model
    tasks["label"] = {"class_names": ["a", "b", "c"], "threshold": {"value": 0.5}}
    with pytest.raises(CheckpointError, match=r"'tasks.label.class_names': 3 class names .* 2 classes"):
        load_checkpoint(_edit_header(path, "tasks", tasks))
    # so are they when saving
    with pytest.raises(CheckpointError, match="class_names"):
        save_checkpoint(tmp_path / "x.safetensors", _model(), {**META, "class_names": {"label": ["a", "b", "c"]}})
    # legacy (checkpoint/1 layout) threshold that is not a number: named, not replaced by 0.5
    with pytest.raises(CheckpointError, match=r"metadata key 'threshold' \(task 'label'\): 'abc'"):
        save_checkpoint(tmp_path / "y.safetensors", _model(), {**META, "threshold": "abc"})


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
    save_checkpoint(path, _model(), {**META, "model_config": wrong, "class_names": {"label": ["a", "b", "c"]}})
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


def _flip_in_tensor(path, name):
    """Flip the bytes in the middle of tensor ``name``'s data (the safetensors layout: u64 header size, JSON)."""
    data = bytearray(path.read_bytes())
    n = int.from_bytes(data[:8], "little")
    start, end = json.loads(data[8 : 8 + n])[name]["data_offsets"]
    mid = 8 + n + (start + end) // 2
    data[mid : mid + 2] = bytes(b ^ 0xFF for b in data[mid : mid + 2])
    path.write_bytes(bytes(data))


def test_resume_file_integrity_hash(tmp_path):
    path = tmp_path / "resume.safetensors"
    tensors = {"s/w": torch.arange(64, dtype=torch.float32), "s/step": torch.tensor([3])}
    save_state(path, tensors, {"epoch": 1, "history": [{"loss": 0.5}]})
    got, meta = load_state(path)
    assert meta == {"epoch": 1, "history": [{"loss": 0.5}]} and torch.equal(got["s/w"], tensors["s/w"])
    good = path.read_bytes()

    # bytes flipped inside a tensor: refused, naming the file and the remedy given by the caller
    _flip_in_tensor(path, "s/w")
    with pytest.raises(CheckpointError, match="resume.safetensors: resume file is damaged.*; restore it") as err:
        load_state(path, "restore it")
    assert "hash" in str(err.value)
    # the JSON state edited (same length, still valid JSON): refused as well
    assert good.count(b"0.5}]") == 1
    path.write_bytes(good.replace(b"0.5}]", b"0.7}]"))
    assert path.read_bytes() != good
    with pytest.raises(CheckpointError, match="damaged"):
        load_state(path)
    # an independent check of what is hashed: the file's own tensors and JSON entries, re-hashed here
    from safetensors import safe_open

    path.write_bytes(good)
    with safe_open(str(path), framework="pt") as f:
        header = dict(f.metadata())
    stored = header.pop("wsimil_sha256")
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode() + t.reshape(-1).view(torch.uint8).numpy().tobytes())
    h = hashlib.sha256(h.hexdigest().encode())
    for key in sorted(header):
        h.update(f"|{key}={header[key]}".encode())
    assert stored == h.hexdigest()


def test_resume_file_without_hash_loads_with_a_warning(tmp_path):
    """Files written before the hash existed are accepted (with a warning), not refused."""
    from safetensors.torch import save_file

    path = tmp_path / "old.safetensors"
    save_file({"x": torch.ones(3)}, str(path), metadata={"wsimil_format": "state/1", "epoch": "2"})
    with pytest.warns(UserWarning, match="no integrity hash"):
        tensors, meta = load_state(path)
    assert meta == {"epoch": 2} and torch.equal(tensors["x"], torch.ones(3))
