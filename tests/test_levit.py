"""LeViT encoders (MECDS' patch encoder, Sec. 2.1): built-in names and pretrained weights from a local file."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from wsimil_core.errors import CheckpointError
from wsimil_core.features.encoders import RandomWeightsWarning, create_encoder, extract_patches

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def test_timm_levit_weights_file_loads_and_gives_the_pooled_features(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(3)
    full = timm.create_model("levit_128s", pretrained=False)  # with its classifier and distillation heads
    path = tmp_path / "levit_128s.pth"
    torch.save(full.state_dict(), path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RandomWeightsWarning)  # a weights file: no random-init warning
        model, spec = create_encoder("levit_128s", weights=str(path))
    assert spec.dim == 384 and spec.input_size == 224 and spec.encoder_id.startswith("levit_128s-")
    images = np.random.default_rng(0).integers(0, 256, size=(2, 64, 64, 3), dtype=np.uint8)
    feats = extract_patches(model, spec, images)
    # independent: the full timm network's pre-logits features on the same pre-processed input
    x = torch.nn.functional.interpolate(
        torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0, size=224, mode="bilinear", antialias=True
    )
    mean, std = torch.tensor(spec.mean).view(1, 3, 1, 1), torch.tensor(spec.std).view(1, 3, 1, 1)
    full.eval()
    with torch.no_grad():
        expected = full.forward_head(full.forward_features((x - mean) / std), pre_logits=True)
    torch.testing.assert_close(torch.as_tensor(feats), expected, rtol=1e-4, atol=1e-4)


def test_levit_family_names_and_a_wrong_file_is_a_clear_error(tmp_path):
    timm = pytest.importorskip("timm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        _, spec = create_encoder("levit_256")
    assert spec.dim == 512
    path = tmp_path / "other.pth"
    torch.save(timm.create_model("levit_128", pretrained=False).state_dict(), path)
    with pytest.raises(CheckpointError, match="do not fit encoder 'levit_128s'"):
        create_encoder("levit_128s", weights=str(path))
