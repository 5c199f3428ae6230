"""Patch encoders: names, dims, deterministic random init + warning, local weights files, transforms."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
import torch
import torchvision

from wsimil_core.errors import CheckpointError, ConfigError
from wsimil_core.features.encoders import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EncoderSpec,
    RandomWeightsWarning,
    create_encoder,
    encoder_transform,
    extract_patches,
    file_sha256,
    preprocess_batch,
)


def _quiet(name, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        return create_encoder(name, **kw)


def _images(n=3, size=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


@pytest.mark.parametrize(
    "name,dim,input_size",
    [("resnet18", 256, None), ("resnet50", 1024, None), ("resnet18-full", 512, None), ("levit_128s", 384, 224)],
)
def test_builtin_dims(name, dim, input_size):
    model, spec = _quiet(name)
    assert spec.dim == dim and spec.input_size == input_size
    assert spec.encoder_id == f"{name}-random" and spec.weights_sha256 == "random-init"
    feats = extract_patches(model, spec, _images(2, size=32 if input_size is None else 48))
    assert feats.shape == (2, dim) and feats.dtype == torch.float32
    assert torch.isfinite(feats).all()


def test_timm_and_torchvision_by_name():
    _, spec = _quiet("tv:resnet18")
    assert spec.dim == 512 and spec.input_size == 224 and spec.encoder_id == "tv-resnet18-random"
    model, spec = _quiet("timm:resnet18")
    assert spec.dim == 512
    assert extract_patches(model, spec, _images(1)).shape == (1, 512)


def test_unknown_names_are_config_errors():
    with pytest.raises(ConfigError, match="unknown encoder 'nope'"):
        create_encoder("nope")
    with pytest.raises(ConfigError, match="timm has no model"):
        create_encoder("timm:definitely_not_a_model")
    with pytest.raises(ConfigError, match="torchvision has no model"):
        create_encoder("tv:definitely_not_a_model")


def test_random_init_warns_loudly_and_is_deterministic(caplog):
    with caplog.at_level(logging.WARNING, logger="wsimil_core.features.encoders"):
        with pytest.warns(RandomWeightsWarning, match="NO pretrained weights"):
            m1, spec = create_encoder("resnet18")
    assert any("NO pretrained weights" in r.getMessage() for r in caplog.records)
    m2, _ = _quiet("resnet18")
    x = _images(2)
    assert torch.equal(extract_patches(m1, spec, x), extract_patches(m2, spec, x))
    # Building the encoder must not disturb the caller's global RNG stream.
    torch.manual_seed(123)
    a = torch.rand(3)
    torch.manual_seed(123)
    _quiet("resnet18")
    assert torch.equal(a, torch.rand(3))


def test_weights_from_local_pth_full_resnet_state_dict(tmp_path):
    torch.manual_seed(7)
    full = torchvision.models.resnet18(weights=None)  # a *full* ResNet: layer4 and fc keys are dropped
    path = tmp_path / "r18.pth"
    torch.save(full.state_dict(), path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RandomWeightsWarning)  # no warning with a weights file
        model, spec = create_encoder("resnet18", weights=str(path))
    sha = file_sha256(path)
    assert spec.weights_sha256 == sha and len(sha) == 64
    assert spec.encoder_id == f"resnet18-{sha[:8]}"
    assert spec.weights_path == str(path)
    assert torch.equal(model.conv1.weight, full.conv1.weight)
    assert torch.equal(model.layer3[1].bn2.running_var, full.layer3[1].bn2.running_var)
    rand_model, _ = _quiet("resnet18")
    x = _images(2)
    assert not torch.allclose(extract_patches(model, spec, x), extract_patches(rand_model, spec, x))


def test_weights_from_safetensors_and_wrapped_pth(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(3)
    sd = torchvision.models.resnet18(weights=None).state_dict()
    st = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(st))
    model, spec = create_encoder("resnet18-full", weights=st)
    assert torch.equal(model.layer4[0].conv1.weight, sd["layer4.0.conv1.weight"])
    assert spec.weights_sha256 == file_sha256(st)
    wrapped = tmp_path / "wrapped.pt"  # {"state_dict": {"module.<key>": ...}} as saved by many trainers
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, wrapped)
    model2, _ = create_encoder("resnet18-full", weights=wrapped)
    assert torch.equal(model2.layer4[0].conv1.weight, sd["layer4.0.conv1.weight"])


def test_bad_weights_files_are_clear_errors(tmp_path):
    missing = tmp_path / "missing.pth"
    with pytest.raises(CheckpointError, match="missing.pth: weights file not found"):
        create_encoder("resnet18", weights=missing)
    bad_keys = tmp_path / "bad_keys.pth"
    torch.save({"foo.weight": torch.zeros(3)}, bad_keys)
    with pytest.raises(CheckpointError, match=r"bad_keys.pth: weights do not fit encoder 'resnet18'.*missing key"):
        create_encoder("resnet18", weights=bad_keys)
    wrong_arch = tmp_path / "wide.pth"
    sd = torchvision.models.resnet18(weights=None).state_dict()
    sd["conv1.weight"] = torch.zeros(32, 3, 7, 7)  # another width than resnet18's 64 stem channels
    torch.save(sd, wrong_arch)
    with pytest.raises(CheckpointError, match=r"wide.pth: .*shape mismatch.*conv1.weight"):
        create_encoder("resnet18", weights=wrong_arch)
    pickled = tmp_path / "pickled.pth"
    torch.save({"obj": _Opaque()}, pickled)
    with pytest.raises(CheckpointError, match="pickled.pth: cannot read weights"):
        create_encoder("resnet18", weights=pickled)
    other = tmp_path / "weights.npz"
    other.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="unsupported weights format"):
        create_encoder("resnet18", weights=other)


class _Opaque:
    """An arbitrary object: ``torch.load(weights_only=True)`` must refuse to unpickle it."""


def test_encoder_transform_normalises_and_resizes():
    spec = EncoderSpec(name="x", encoder_id="x-random", dim=4, input_size=None)
    white = np.full((8, 6, 3), 255, dtype=np.uint8)
    t = encoder_transform(spec)(white)
    assert t.shape == (3, 8, 6) and t.dtype == torch.float32
    expected = (1.0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(t[:, 0, 0], expected, atol=1e-6)
    sized = EncoderSpec(name="y", encoder_id="y-random", dim=4, input_size=16)
    assert encoder_transform(sized)(white).shape == (3, 16, 16)
    with pytest.raises(ValueError, match="uint8"):
        preprocess_batch(spec, np.zeros((1, 4, 4, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
        preprocess_batch(spec, np.zeros((4, 4, 3), dtype=np.uint8))


def test_spec_attrs_roundtrip():
    spec = EncoderSpec(name="resnet18", encoder_id="resnet18-random", dim=256, input_size=None).with_grid(0.5, 256)
    attrs = spec.to_attrs()
    assert attrs["mpp"] == 0.5 and attrs["patch"] == 256 and attrs["mean"] == list(IMAGENET_MEAN)
    assert EncoderSpec.from_attrs({**attrs, "extra": 1}) == spec


def test_resolve_device():
    from wsimil_core.devices import resolve_device

    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda")
    with pytest.raises(ConfigError, match="device 'tpu9'"):
        resolve_device("tpu9")
