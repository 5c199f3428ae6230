"""Checkpoints and resume files: safetensors + JSON metadata, written atomically, never pickled.

A checkpoint (DESIGN.md "Checkpoints") is one ``*.safetensors`` file: the inference model's weights plus, in the
safetensors header, one JSON string per field of :class:`wsimil_core.checkpoint_meta.CheckpointMeta` (``method``,
``model_name``, ``model_config``, ``tasks``, ``encoder``, ``grid``, ``map_specs``, ``train_config``, ``metrics``,
``store``, ``version``, ``checkpoint_id``, ``extras``). The header also holds ``"wsimil_format": "checkpoint/2"``
(or ``"state/1"`` for resume files). ``checkpoint/1`` files (untyped keys ``targets``, ``class_names``,
``threshold``...) load through ``CheckpointMeta.parse``, the one reader, which migrates them.

Resume files use the same container through ``save_state``/``load_state``; ``flatten_state`` and
``unflatten_state`` turn nested Python state (optimizer/scheduler ``state_dict``, RNG states, counters) into
``{path: Tensor}`` plus a JSON skeleton and back (``engine.state_tree``, re-exported here), so resuming needs no
pickle either. Each resume file carries a sha256 of its tensors and JSON state (``wsimil_sha256``): a mismatch
is refused. Each checkpoint carries the sha256 of its weights (``wsimil_weights_sha256``).

Loading parses only the safetensors header (JSON) and raw tensor bytes: a pickle file renamed to
``.safetensors`` is rejected as corrupt, and nothing in it is ever executed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from pydantic_core import PydanticSerializationError
from torch import Tensor, nn

import wsimil_core
import wsimil_core.methods  # noqa: F401  (fills the model registry load_checkpoint builds from)
from wsimil_core._io import atomic_path, jsonable
from wsimil_core.checkpoint_meta import CHECKPOINT_FORMAT, LEGACY_FORMATS, CheckpointMeta, safe_method_name
from wsimil_core.engine.state_tree import (
    flatten_optimizer_state,
    flatten_state,
    unflatten_optimizer_state,
    unflatten_state,
)
from wsimil_core.errors import CheckpointError, ConfigError
from wsimil_core.models.base import (
    checkpoint_model_options,
    create_model,
    map_specs_of,
    model_config_dict,
    rename_model_options,
)

STATE_FORMAT = "state/1"
STATE_HASH_KEY = "wsimil_sha256"
WEIGHTS_HASH_KEY = "wsimil_weights_sha256"
_FORMAT_KEY = "wsimil_format"
REQUIRED_META = ("model_name", "model_config")


# --- low-level container -------------------------------------------------------------------------------------


def _cpu_tensors(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Detached, contiguous CPU copies (safetensors refuses shared or strided storage)."""
    out = {}
    for name, t in tensors.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"tensor {name!r} is a {type(t).__name__}, not a torch.Tensor")
        out[name] = t.detach().to("cpu").contiguous().clone()
    return out


def _write_atomic(path: Path, tensors: dict[str, Tensor], header: dict[str, str]) -> None:
    """Write ``path`` via a temporary file in the same folder and a rename (never a half-written file).

    Raises:
        CheckpointError: the write failed (full disk, quota, permissions): names ``path`` and the cause, and says
            that the previous ``path`` (the last good checkpoint or resume file), if any, is kept unchanged.
    """
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=header)
    except (OSError, SafetensorError) as exc:
        cause = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        kept = "the previous file is kept unchanged" if path.exists() else "no earlier file was there"
        raise CheckpointError(
            f"{path}: cannot write ({cause}); nothing was replaced: {kept}. Free space (or fix the folder) and "
            "re-run the same command (a training run resumes from its last good resume file)"
        ) from None


def _read(path: str | os.PathLike[str], device: str = "cpu") -> tuple[dict[str, Tensor], dict[str, str]]:
    """Read tensors and the raw header; any parse failure is a ``CheckpointError`` naming the file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            header = dict(f.metadata() or {})
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except CheckpointError:
        raise
    except Exception as exc:  # safetensors raises SafetensorError / OSError / ValueError on bad bytes
        raise CheckpointError(
            f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc}); "
            "wsimil never unpickles .pt/.pth/.ckpt files"
        ) from None
    return tensors, header


def _encode_meta(meta: dict[str, Any], fmt: str) -> dict[str, str]:
    header = {_FORMAT_KEY: fmt}
    for key, value in meta.items():
        if not isinstance(key, str) or key == _FORMAT_KEY:
            raise ValueError(f"invalid meta key {key!r}")
        header[key] = json.dumps(jsonable(value), allow_nan=True)
    return header


def _decode_meta(path: Path, header: dict[str, str], fmt: str) -> dict[str, Any]:
    found = header.get(_FORMAT_KEY)
    accepted = (fmt, *LEGACY_FORMATS) if fmt == CHECKPOINT_FORMAT else (fmt,)
    if found not in accepted:
        what = "a wsimil checkpoint" if fmt == CHECKPOINT_FORMAT else "a wsimil resume file"
        if fmt == CHECKPOINT_FORMAT and str(found).startswith("checkpoint/"):
            raise CheckpointError(f"{path}: checkpoint format {found!r} is not one this wsimil reads ({fmt}); upgrade")
        raise CheckpointError(f"{path}: not {what} (format {found!r}, expected {fmt!r})")
    meta = {}
    for key, raw in header.items():
        if key == _FORMAT_KEY:
            continue
        try:
            meta[key] = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{path}: metadata key {key!r} is not valid JSON ({exc})") from None
    return meta


# --- checkpoint id -------------------------------------------------------------------------------------------


def _weights_hash(tensors: dict[str, Tensor]) -> str:
    """sha256 over tensor names, dtypes, shapes and raw bytes, in sorted name order (device independent)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def checkpoint_id(tensors: dict[str, Tensor], meta: CheckpointMeta) -> str:
    """Stable short id ``<method>-<10 hex>`` of the weights and the metadata that changes predictions
    (``CheckpointMeta.make_id``): the same weights and metadata always give the same id, an edited threshold or
    class name another one.

    Used as the maps group name ``maps/<checkpoint_id>/`` in the feature store.
    """
    return meta.make_id(_weights_hash(tensors))


def legacy_checkpoint_id(weights_sha256: str, method: str) -> str:
    """The id files written before the weights hash was stored carry (``checkpoint/1`` and early ``checkpoint/2``):
    weights and method only. Used only to check those files' weights; they get a ``checkpoint_id`` on load."""
    h = hashlib.sha256(f"{weights_sha256}|{method}".encode()).hexdigest()[:10]
    return f"{safe_method_name(method)}-{h}"


# --- checkpoints ---------------------------------------------------------------------------------------------


def save_checkpoint(
    path: str | os.PathLike[str], model: nn.Module, meta: CheckpointMeta | dict[str, Any]
) -> CheckpointMeta:
    """Write the inference ``model`` and ``meta`` to ``path`` (safetensors, atomic).

    ``meta`` is a :class:`CheckpointMeta` or a dict in either layout (the trainer's dict of ``targets``,
    ``class_names``, ``threshold``, ``encoder``...), validated through ``CheckpointMeta.parse``. ``model_name``,
    ``model_config`` (the model's whole config, updated by a given one), ``method`` (defaults to the model name), ``version`` and an empty
    ``map_specs`` are filled from the model; ``checkpoint_id`` is always recomputed from the weights and the
    metadata (``checkpoint_id``), and the weights' sha256 is stored in the header (``wsimil_weights_sha256``) so
    a load tells damaged weights from edited metadata. Returns the meta as written.
    """
    tensors = _cpu_tensors(model.state_dict())
    if isinstance(meta, CheckpointMeta):
        raw = meta.fields()
    else:
        raw = dict(meta)
    name = getattr(model, "model_name", None)
    if not raw.get("model_name"):
        if not name:
            raise ValueError("model has no registered model_name; pass meta['model_name']")
        raw["model_name"] = name
    if dataclasses.is_dataclass(getattr(model, "config", None)):
        # the model's whole config, with what the caller gives on top: a partial config would leave later readers
        # guessing which missing fields mean "written before the field existed" (``checkpoint_model_options``)
        given = raw.pop("model_config", None) or raw.pop("model_kwargs", None) or {}
        raw["model_config"] = {
            **model_config_dict(model),
            **rename_model_options(str(raw["model_name"]), given, f"checkpoint {path}"),
        }
    elif raw.get("model_config") is None and raw.get("model_kwargs") is None:
        raise ValueError("model has no config dataclass; pass meta['model_config']")
    raw["method"] = raw.get("method") or raw["model_name"]
    raw["version"] = raw.get("version") or wsimil_core.__version__
    if not raw.get("map_specs"):
        raw["map_specs"] = [s.to_dict() for s in map_specs_of(model)]
    raw["checkpoint_id"] = None  # recomputed below from the weights and the validated metadata
    raw = jsonable(raw)
    typed = CheckpointMeta.parse(raw, where=str(path))
    weights = _weights_hash(tensors)
    try:
        typed = typed.model_copy(update={"checkpoint_id": typed.make_id(weights)})
        fields = typed.fields()
    except PydanticSerializationError as exc:
        raise TypeError(f"{path}: checkpoint metadata is not JSON-serialisable ({exc})") from None
    header = _encode_meta(fields, CHECKPOINT_FORMAT)
    header[WEIGHTS_HASH_KEY] = weights
    _write_atomic(Path(path), tensors, header)
    return typed


def _read_header(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return dict(f.metadata() or {})
    except Exception as exc:
        raise CheckpointError(
            f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc}); "
            "wsimil never unpickles .pt/.pth/.ckpt files"
        ) from None


def _parse_meta(path: Path, header: dict[str, str]) -> CheckpointMeta:
    """The header's fields, migrated and validated (``CheckpointMeta.parse``, the one reader)."""
    raw = _decode_meta(path, header, CHECKPOINT_FORMAT)
    missing = [k for k in REQUIRED_META if k not in raw]
    if missing:
        raise CheckpointError(f"{path}: metadata lacks {missing}")
    if not isinstance(raw["model_config"], dict):
        raise CheckpointError(f"{path}: metadata 'model_config' must be a JSON object")
    return CheckpointMeta.parse(raw, header.get(_FORMAT_KEY), where=str(path))


def read_checkpoint_meta(path: str | os.PathLike[str]) -> CheckpointMeta:
    """Only the metadata of a checkpoint (reads the header, builds no model), migrated to the current layout.

    ``checkpoint_id`` is recomputed from the stored weights hash and the metadata, as ``load_checkpoint`` does
    (which also checks the weights against that hash).
    """
    path = Path(path)
    header = _read_header(path)
    weights = header.pop(WEIGHTS_HASH_KEY, None)
    meta = _parse_meta(path, header)
    if weights is None:  # an older file: hash its weights once (the weights are not checked here)
        weights = _weights_hash(_read(path, "cpu")[0])
    return meta.model_copy(update={"checkpoint_id": meta.make_id(weights)})


def load_checkpoint(
    path: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> tuple[nn.Module, CheckpointMeta]:
    """Rebuild the model of a checkpoint: ``create_model(meta.model_name, **meta.model_kwargs)`` + strict load.

    Returns ``(model in eval mode on device, meta)``; the meta is also attached as ``model.checkpoint_meta``.
    Raises ``CheckpointError`` for a missing, corrupt or incompatible file (unknown model, config or weights that
    do not match the model, weights that do not match the hash stored with them, metadata that fails validation).
    Metadata edited after saving (and still valid) loads under a new ``checkpoint_id``, with a warning.
    """
    path = Path(path)
    tensors, header = _read(path, "cpu")
    stored_weights = header.pop(WEIGHTS_HASH_KEY, None)
    meta = _parse_meta(path, header)
    weights = _weights_hash(tensors)
    if stored_weights is not None:
        intact = stored_weights == weights
    else:  # written before the weights hash was stored: its checkpoint_id hashed the weights and method only
        intact = meta.checkpoint_id in (None, legacy_checkpoint_id(weights, meta.method))
    if not intact:
        raise CheckpointError(
            f"{path}: weights do not match the hash stored with them (checkpoint_id {meta.checkpoint_id!r}): the "
            "file was modified or damaged; restore a copy"
        )
    expected = meta.make_id(weights)
    if stored_weights is not None and meta.checkpoint_id not in (None, expected):
        warnings.warn(
            f"{path}: metadata changed since the file was written (checkpoint_id {meta.checkpoint_id} -> "
            f"{expected}); its maps go under the new id",
            stacklevel=2,
        )
    meta = meta.model_copy(update={"checkpoint_id": expected})
    try:
        options = checkpoint_model_options(meta.model_name, meta.model_kwargs, f"checkpoint {path}")
        meta = meta.model_copy(update={"model_kwargs": options})
        model = create_model(meta.model_name, **meta.model_kwargs)
    except ConfigError as exc:
        raise CheckpointError(f"{path}: incompatible checkpoint: {exc}") from None
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise CheckpointError(f"{path}: weights do not fit model {meta.model_name!r}: {' '.join(first[:3])}") from None
    model.to(device)
    model.eval()
    model.checkpoint_meta = meta  # type: ignore[assignment]  # nn.Module attrs are typed as tensors
    return model, meta


# --- resume files --------------------------------------------------------------------------------------------


def _state_hash(tensors: dict[str, Tensor], header: dict[str, str]) -> str:
    """sha256 over the tensors (``_weights_hash``) and every header entry but the hash itself (sorted keys)."""
    h = hashlib.sha256(_weights_hash(tensors).encode())
    for key in sorted(k for k in header if k != STATE_HASH_KEY):
        h.update(f"|{key}={header[key]}".encode())
    return h.hexdigest()


def save_state(path: str | os.PathLike[str], tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    """Write a generic resume file: named tensors + JSON meta, atomically (temp file + ``os.replace``).

    The header also holds ``wsimil_sha256``, a hash of the tensors and the meta that ``load_state`` checks.
    """
    cpu = _cpu_tensors(tensors)
    header = _encode_meta(dict(meta), STATE_FORMAT)
    header[STATE_HASH_KEY] = _state_hash(cpu, header)
    _write_atomic(Path(path), cpu, header)


def load_state(path: str | os.PathLike[str], remedy: str = "") -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read a resume file written by ``save_state``: ``(tensors on CPU, meta)``.

    Files written before the hash existed (no ``wsimil_sha256``) load with a ``UserWarning``: such a file is
    rewritten (with a hash) at the next save, and refusing it would throw away an interrupted run that is most
    likely intact; a damaged one is still refused when it does not parse.

    Raises:
        CheckpointError: missing or unreadable file, another format, or contents that do not match the stored hash
            (the message names the file, says it was modified or damaged, and adds ``remedy``).
    """
    path = Path(path)
    tensors, header = _read(path, "cpu")
    stored = header.pop(STATE_HASH_KEY, None)
    meta = _decode_meta(path, header, STATE_FORMAT)
    if stored is None:
        warnings.warn(
            f"{path}: resume file has no integrity hash (written by an older wsimil); not checked", stacklevel=2
        )
    elif stored != _state_hash(tensors, header):
        raise CheckpointError(
            f"{path}: resume file is damaged: its tensors or state do not match the hash stored when it was "
            f"written (file modified, or a disk/copy error){'; ' + remedy if remedy else ''}"
        )
    return tensors, meta


__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointMeta",
    "save_checkpoint",
    "load_checkpoint",
    "read_checkpoint_meta",
    "checkpoint_id",
    "legacy_checkpoint_id",
    "save_state",
    "load_state",
    "flatten_state",
    "unflatten_state",
    "flatten_optimizer_state",
    "unflatten_optimizer_state",
]
