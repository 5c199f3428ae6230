"""Typed checkpoint metadata: the one reader, migration of checkpoint/1 files, and a checkpoint written by the
code before CheckpointMeta existed (tests/data/checkpoint_v1_abmil.safetensors) still predicting."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from wsimil_core.api import create_model
from wsimil_core.checkpoint_meta import (
    CHECKPOINT_FORMAT,
    THRESHOLD_DEFAULT,
    THRESHOLD_FIXED,
    THRESHOLD_YOUDEN_VAL,
    CheckpointMeta,
    migrate_v1,
)
from wsimil_core.engine.checkpoint import (
    _weights_hash,
    legacy_checkpoint_id,
    load_checkpoint,
    read_checkpoint_meta,
    save_checkpoint,
)
from wsimil_core.errors import CheckpointError
from wsimil_core.store.zarr_store import FeatureStore

V1 = Path(__file__).parent / "data" / "checkpoint_v1_abmil.safetensors"
BASE = {"method": "abmil", "model_name": "abmil", "model_config": {"in_dim": 8, "n_classes": 2}}


def _header(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata())


def test_v1_fixture_is_a_checkpoint_1_file_and_migrates():
    header = _header(V1)
    assert header["wsimil_format"] == "checkpoint/1" and "targets" in header and "threshold" in header
    meta = read_checkpoint_meta(V1)
    assert isinstance(meta, CheckpointMeta) and meta.format == CHECKPOINT_FORMAT
    assert meta.method == "abmil" and meta.model_name == "abmil" and meta.model_kwargs["in_dim"] == 8
    assert meta.task_names == ["label"] and meta.class_names("label") == ["0", "1"]
    legacy = json.loads(header["threshold"])["label"]
    assert meta.threshold("label") == legacy
    assert meta.tasks["label"].threshold.method == THRESHOLD_YOUDEN_VAL  # train.threshold "val", val metrics
    assert meta.encoder.encoder_id == "synthetic" and meta.encoder.dim == 8
    assert meta.grid.patch_mpp == 0.5 and meta.grid.patch_px == 256 and meta.grid.stride == 256
    assert meta.store.path.endswith("store.zarr") and meta.store.encoder_id == "synthetic"
    # its stored id hashed the weights and method only: it still checks the weights, and the file gets an id of
    # weights + metadata like every checkpoint (the same from the header-only read and from a load)
    assert json.loads(header["checkpoint_id"]) == legacy_checkpoint_id(_weights_hash(load_file(V1)), "abmil")
    assert meta.checkpoint_id != json.loads(header["checkpoint_id"]) and meta.checkpoint_id.startswith("abmil-")
    assert meta.checkpoint_id == load_checkpoint(V1)[1].checkpoint_id == read_checkpoint_meta(V1).checkpoint_id
    assert meta.map_specs == [] and meta.extras == {}


def test_v1_fixture_weights_are_still_checked_and_its_metadata_is_in_the_id(tmp_path):
    from safetensors.torch import save_file

    tensors, header = load_file(V1), _header(V1)
    base = read_checkpoint_meta(V1).checkpoint_id
    # an edited legacy threshold: another id (its maps never overwrite the original's)
    edited = tmp_path / "edited.safetensors"
    save_file(tensors, str(edited), metadata={**header, "threshold": json.dumps({"label": 0.9})})
    _, meta = load_checkpoint(edited)
    assert meta.threshold("label") == 0.9 and meta.checkpoint_id != base
    # a legacy threshold of "abc" is refused, naming the key
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata={**header, "threshold": json.dumps({"label": "abc"})})
    with pytest.raises(CheckpointError, match=r"bad.safetensors: metadata key 'threshold' \(task 'label'\)"):
        load_checkpoint(bad)
    # damaged weights: refused through the stored weights-only id
    damaged = tmp_path / "damaged.safetensors"
    first = next(iter(tensors))
    save_file({**tensors, first: tensors[first] + 1}, str(damaged), metadata=header)
    with pytest.raises(CheckpointError, match="modified or damaged"):
        load_checkpoint(damaged)


def test_v1_fixture_loads_and_predicts(tmp_path):
    from wsimil_core.inference.predict import predict_bag, predict_store

    model, meta = load_checkpoint(V1)
    x = np.arange(5 * 8, dtype=np.float32).reshape(5, 8) / 40
    pred = predict_bag(model, x)
    # the numbers the code that wrote the fixture gave (before CheckpointMeta)
    np.testing.assert_allclose(pred.probs["label"], [0.55617815, 0.4438218], atol=1e-6)
    np.testing.assert_allclose(
        pred.maps["attention"], [0.21072483, 0.20561856, 0.20019417, 0.19423778, 0.18922468], atol=1e-6
    )
    # an independent computation: the same weights in a fresh model
    fresh = create_model("abmil", **meta.model_kwargs).eval()
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        want = torch.softmax(fresh(torch.from_numpy(x)).logits[0], -1).numpy()
    np.testing.assert_allclose(pred.probs["label"], want, atol=1e-6)

    # through the pipeline: a store with the checkpoint's encoder; the legacy threshold decides the class
    fs = FeatureStore(tmp_path / "store", create=True)
    enc = {"name": "synthetic", "encoder_id": "synthetic", "dim": 8, "weights_sha256": "random-init"}
    coords = np.stack([np.arange(5) * 256, np.zeros(5)], 1).astype(np.int64)
    fs.write_bag("a", x, coords, "synthetic", enc, patch_size_level0=256, stride_level0=256, slide_mpp=0.5)
    frame = predict_store(V1, fs, device="cpu", progress=False)
    assert frame["label_prob_1"].iloc[0] == pytest.approx(0.4438218, abs=1e-5)
    assert frame["label_pred"].iloc[0] == "1"  # P(1) 0.444 >= the validation threshold 0.407 (argmax says "0")
    attrs = fs.maps_attrs("a", meta.checkpoint_id)
    assert attrs["prediction"] == {"label": "1"} and attrs["encoder_id"] == "synthetic"


def test_migration_of_every_legacy_key_and_alias():
    raw = {
        **BASE,
        "model_config": {"in_dim": 8, "tasks": {"a": 2, "b": 3}},
        "thresholds": {"a": 0.3},
        "class_names": {"a": ["neg", "pos"]},
        "encoder": {"name": "resnet18", "encoder_id": "r-1", "dim": 8, "mpp": 1.0, "patch": 64, "dtype": "float16"},
        "train_config": {"train": {"threshold": 0.3}, "data": {"store": "/data/s.zarr"}},
        "metrics": {"auc": 0.9},
        "extension": {"task": "b"},
    }
    meta = CheckpointMeta.parse(raw, "checkpoint/1")
    assert meta.task_names == ["a"]  # class_names' keys when there are no targets
    assert meta.threshold("a") == 0.3 and meta.tasks["a"].threshold.method == THRESHOLD_FIXED
    assert meta.class_names("b") == ["0", "1", "2"]  # not a recorded task: from model_config tasks
    assert meta.grid.patch_mpp == 1.0 and meta.grid.patch_px == 64 and meta.grid.stride == 64  # mpp/patch aliases
    assert meta.encoder.model_extra == {"dtype": "float16"}  # unknown encoder attrs are kept
    assert meta.store.path == "/data/s.zarr" and meta.store.encoder_id == "r-1"
    assert meta.extras == {"extension": {"task": "b"}}

    one = CheckpointMeta.parse({**BASE, "targets": "label", "threshold": 0.7, "class_names": ["n", "p"]}, None)
    assert one.task_names == ["label"] and one.class_names("label") == ["n", "p"] and one.threshold("label") == 0.7
    assert one.tasks["label"].threshold.method == THRESHOLD_DEFAULT  # no validation metrics recorded
    assert one.predicted_class("label", [0.35, 0.65]) == "n" and one.predicted_class("label", [0.2, 0.8]) == "p"

    bare = CheckpointMeta.parse({**BASE, "model_config": {"in_dim": 8, "tasks": {"x": 2, "y": 4}}}, None)
    assert bare.task_names == ["x", "y"] and bare.class_names("y") == ["0", "1", "2", "3"]
    assert bare.threshold("x") == 0.5 and bare.tasks["x"].threshold.method == THRESHOLD_DEFAULT
    assert bare.predicted_class("y", [0.1, 0.2, 0.6, 0.1]) == "2"
    # grid keys (patch_mpp / patch_size / level-0 sizes) move from the encoder to the grid, stride from level 0
    enc = {"name": "e", "patch_mpp": 0.5, "patch_size": 32, "patch_size_level0": 64, "stride_level0": 32}
    m = migrate_v1({**BASE, "encoder": enc})
    assert m["grid"] == {
        "patch_mpp": 0.5,
        "patch_px": 32,
        "stride_px": 16,
        "patch_size_level0": 64,
        "stride_level0": 32,
    }
    assert m["encoder"] == {"name": "e"}


def test_current_format_round_trip_and_clear_errors(tmp_path):
    torch.manual_seed(0)
    model = create_model("abmil", in_dim=8, n_classes=2, hidden=8, attn_dim=4)
    typed = CheckpointMeta.parse({**BASE, "targets": ["t"], "class_names": {"t": ["a", "b"]}}, None)
    path = tmp_path / "m.safetensors"
    written = save_checkpoint(path, model, typed)
    assert _header(path)["wsimil_format"] == CHECKPOINT_FORMAT and "targets" not in _header(path)
    again = read_checkpoint_meta(path)
    assert again == written and again.class_names("t") == ["a", "b"]
    assert again.model_dump(by_alias=True)["model_config"] == again.model_kwargs

    from safetensors.torch import save_file

    newer = tmp_path / "newer.safetensors"
    save_file({"w": torch.zeros(1)}, str(newer), metadata={**_header(path), "wsimil_format": "checkpoint/99"})
    with pytest.raises(CheckpointError, match="checkpoint/99"):
        read_checkpoint_meta(newer)
    bad = tmp_path / "bad.safetensors"
    save_file({"w": torch.zeros(1)}, str(bad), metadata={**_header(path), "tasks": json.dumps({"t": 3})})
    with pytest.raises(CheckpointError, match=r"bad.safetensors.*tasks"):
        read_checkpoint_meta(bad)


def test_grid_from_store_slide_attrs():
    from wsimil_core.checkpoint_meta import GridMeta

    attrs = {
        "patch_mpp": 0.5,
        "patch_size": 224,
        "patch_size_level0": 448,
        "stride_level0": 224,  # half-overlapping patches: 112 px at 0.5 µm/px
        "tissue": {"level_mpp": 8.0, "min_area_um2": 1000.0},
        "slide_mpp": 0.25,
    }
    grid = GridMeta.from_slide_attrs(attrs)
    assert (grid.patch_mpp, grid.patch_px, grid.stride, grid.patch_size_level0, grid.stride_level0) == (
        0.5,
        224,
        112,
        448,
        224,
    )
    assert grid.tissue == {"level_mpp": 8.0, "min_area_um2": 1000.0} and grid.min_tissue is None
    assert GridMeta.from_slide_attrs({**attrs, "min_tissue": 0.3}).min_tissue == 0.3
    assert GridMeta.from_slide_attrs({"patch_size": 224}) is None  # no patch mpp: no grid
