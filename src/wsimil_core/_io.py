"""Small file helpers shared across the library: atomic writes and JSON-friendly values.

Every file the library writes goes through ``atomic_path``: the content is written to a temporary file in the
destination folder (``.<name>.<random>.tmp``), given the permissions a plain ``open()`` would give (``0o666``
minus the umask; ``mkstemp`` alone leaves ``0o600``) and renamed over the destination with ``os.replace``. A
failure (or Ctrl-C) removes the temporary file and leaves any previous file untouched, so a reader never sees
a half-written file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | os.PathLike, *, mkdir: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path``, on any exception it is removed.

    Use for writers that want a file name (``safetensors.save_file``, ``tifffile``, ``DataFrame.to_csv``)::

        with atomic_path(out) as tmp:
            frame.to_csv(tmp, index=False)
    """
    path = Path(path)
    if mkdir:
        path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any], *, mkdir: bool = True) -> Path:
    """Write through ``write(binary file object)`` to a temporary file, then rename it over ``path``."""
    path = Path(path)
    with atomic_path(path, mkdir=mkdir) as tmp:
        with open(tmp, "wb") as f:
            write(f)
    return path


def atomic_write_text(path: str | os.PathLike, text: str, *, mkdir: bool = True) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically. Returns the path."""
    path = Path(path)
    with atomic_path(path, mkdir=mkdir) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    return path


def write_json_atomic(obj: Any, path: str | os.PathLike, **dump_kwargs: Any) -> Path:
    """Write ``json.dumps(obj, **dump_kwargs)`` to ``path`` atomically. Returns the path."""
    return atomic_write_text(path, json.dumps(obj, **dump_kwargs))


def jsonable(value: Any, fallback: Callable[[Any], Any] | None = None) -> Any:
    """``value`` as plain JSON values, for zarr attributes and safetensors metadata.

    Mappings -> dict with ``str`` keys, lists/tuples -> list, numpy arrays and torch tensors -> nested lists,
    numpy scalars -> Python scalars, paths -> str, dataclass instances -> dict of their fields. Anything else is
    returned as is, or ``fallback(value)`` when given (e.g. ``fallback=str``); ``None``, str, int, float and
    bool are always returned as is.
    """
    if isinstance(value, Mapping):
        return {str(k): jsonable(v, fallback) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v, fallback) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist(), fallback)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name), fallback) for f in dataclasses.fields(value)}
    torch = sys.modules.get("torch")  # a tensor can only exist once torch is imported; never import it here
    if torch is not None and isinstance(value, torch.Tensor):
        return jsonable(value.detach().cpu().tolist(), fallback)
    if fallback is None or value is None or isinstance(value, (str, int, float, bool)):
        return value
    return fallback(value)


__all__ = ["atomic_path", "atomic_write", "atomic_write_text", "write_json_atomic", "jsonable"]
