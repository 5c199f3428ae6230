"""Encoder weights from a local file: ``.pth``/``.pt``/``.bin`` (``torch.load(weights_only=True)``) or
``.safetensors``, loaded strictly (except the classifier keys an encoder drops). Never unpickles, never downloads.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from wsimil_core.errors import CheckpointError
from wsimil_core.features.architectures import BuiltEncoder


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 hex digest of a whole file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """Tensors of a ``.pth``/``.pt`` (weights only) or ``.safetensors`` file; unwraps ``state_dict``/``model``."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            sd: Any = load_file(str(path), device="cpu")
        elif suffix in (".pth", ".pt", ".bin"):
            sd = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise CheckpointError(f"{path}: unsupported weights format {suffix!r} (use .pth, .pt or .safetensors)")
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - corrupt file, pickled objects refused by weights_only, ...
        raise CheckpointError(f"{path}: cannot read weights ({type(exc).__name__}: {exc})") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: not a state dict (expected a mapping of parameter names to tensors)")
    if sd and all(k.startswith("module.") for k in sd):  # saved from DataParallel / DDP
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def load_weights(built: BuiltEncoder, path: Path, name: str) -> None:
    """Load a state dict strictly (except the classifier keys the encoder drops on purpose)."""
    sd = read_state_dict(path)
    sd = {k: v for k, v in sd.items() if not k.startswith(built.ignored_prefixes)}
    own = built.module.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    wrong_shape = sorted(k for k in set(own) & set(sd) if tuple(own[k].shape) != tuple(sd[k].shape))
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s) {missing[:5]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s) {unexpected[:5]}")
    if wrong_shape:
        shapes = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}" for k in wrong_shape[:3]]
        problems.append(f"{len(wrong_shape)} shape mismatch(es) {shapes}")
    if problems:
        raise CheckpointError(f"{path}: weights do not fit encoder {name!r}: " + "; ".join(problems))
    built.module.load_state_dict(sd, strict=True)
