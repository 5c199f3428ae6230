"""The feature store's on-disk layout: safe names, slide fingerprints and low-level zarr v3 node helpers.

Validity checks read a node's ``zarr.json`` and stat its chunk files directly (no zarr import, fast on large
stores); only :func:`create_array` uses zarr, imported on first use. The layout itself is described in
``wsimil_core.store.zarr_store``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import re
import shutil
import unicodedata
from pathlib import Path
from typing import Any

import numpy as np

from wsimil_core._io import jsonable
from wsimil_core.errors import SlideError, StoreError

STORE_FORMAT = 1
#: the folder of a store where groups are built before being renamed into place (never read)
TMP_DIR = ".wsimil-tmp"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
#: slide file suffixes made of two parts (``a.ome.tiff`` -> slide id ``a``)
_DOUBLE_SUFFIXES = (".ome.tiff", ".ome.tif", ".ome.zarr")
#: target size of one feature chunk (uncompressed), in bytes
CHUNK_BYTES = 4 * 1024 * 1024


def zarr_module() -> Any:
    """The ``zarr`` module, imported on first use (``import wsimil_core.store`` stays light)."""
    import zarr

    return zarr


# --------------------------------------------------------------------------------------------------------------
# names and attrs


def is_name(name: Any) -> bool:
    """True when ``name`` is a safe group name (see :func:`check_name`)."""
    return isinstance(name, str) and NAME_RE.match(name) is not None


def check_name(name: Any, what: str, where: str | os.PathLike = "") -> str:
    """Return ``name`` if it is a safe group name, else raise ``StoreError``.

    Safe: 1-200 characters from letters, digits, ``.``, ``_``, ``-``, starting with a letter or digit (so no
    path separators, no ``..``, no hidden or zarr-reserved ``__`` names).
    """
    if not is_name(name):
        prefix = f"{where}: " if where else ""
        raise StoreError(
            f"{prefix}invalid {what} {name!r}: use 1-200 letters, digits, '.', '_' or '-', starting with a "
            "letter or digit (see wsimil_core.store.zarr_store.safe_slide_id)"
        )
    return str(name)


def safe_slide_id(name: str) -> str:
    """Turn a file stem or bag id into a safe slide id; never refuses, and the same name always gives the same id.

    Letters with accents are transliterated to ASCII (Unicode NFKD: ``café`` -> ``cafe``); other characters
    outside ``[A-Za-z0-9._-]`` become ``_``. When a character has no ASCII form (``名``), 8 hex digits of the
    SHA-1 of the (NFC-normalised) name are appended so that such names stay apart (``a名`` -> ``a-<hex8>``),
    and a name left with no letter or digit becomes ``slide-<hex8>`` (``名前`` -> ``slide-<hex8>``).

    >>> safe_slide_id("TCGA-AB 12/3.svs")
    'TCGA-AB_12_3.svs'
    """
    text = unicodedata.normalize("NFC", str(name).strip())
    ascii_form = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
    lossy = any(ord(c) > 127 for c in ascii_form)
    out = re.sub(r"[^A-Za-z0-9._-]", "_", ascii_form).lstrip("._-")
    digest = hashlib.sha1(text.encode("utf-8")).hexdigest()[:8]
    if not re.search(r"[A-Za-z0-9]", out):
        return f"slide-{digest}"
    if lossy:
        return f"{out[:190].rstrip('._-')}-{digest}"
    return out[:200]


def slide_id_from_path(path: str | Path) -> str:
    """The store group name of a slide: its file name without the extension (``a.ome.tiff`` -> ``a``), made
    safe with :func:`safe_slide_id` (characters other than letters, digits, ``._-`` become ``_``)."""
    name = Path(path).name
    for suffix in _DOUBLE_SUFFIXES:
        if name.lower().endswith(suffix):
            return safe_slide_id(name[: -len(suffix)])
    return safe_slide_id(Path(name).stem or name)


def attrs_jsonable(value: Any) -> Any:
    """Numpy scalars/arrays, paths, tuples and dataclasses as JSON values; anything else becomes ``str``."""
    return jsonable(value, fallback=str)


def slide_fingerprint(path: str | os.PathLike) -> dict[str, Any]:
    """``{"slide_sha256_1mib": sha256 of the first MiB, "slide_size": bytes}`` of a slide file.

    Raises:
        SlideError: ``path`` is a directory.
        StoreError: the file cannot be read.
    """
    path = Path(path)
    if path.is_dir():  # worded as ``open_slide`` says it (a folder named ``x.svs``)
        raise SlideError(f"{path}: a directory, not a slide file")
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 20)
        size = path.stat().st_size
    except OSError as exc:
        raise StoreError(f"{path}: cannot fingerprint the slide file: {exc.strerror or exc}") from None
    return {"slide_sha256_1mib": hashlib.sha256(head).hexdigest(), "slide_size": int(size)}


# --------------------------------------------------------------------------------------------------------------
# nodes


def read_meta(node: Path) -> dict | None:
    """The parsed ``zarr.json`` of a node, or None when absent or unreadable."""
    try:
        with open(node / "zarr.json", "rb") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def node_attrs(node: Path) -> dict:
    """The ``attributes`` of a node that was checked to exist (``StoreError`` if its zarr.json vanished since)."""
    meta = read_meta(node)
    if meta is None:
        raise StoreError(f"{node}: zarr.json is missing or unreadable; re-run the extraction/import to redo it")
    return dict(meta.get("attributes", {}))


def chunks_present(node: Path, meta: dict) -> bool:
    """True when every chunk file of the array at ``node`` (whose parsed zarr.json is ``meta``) exists and is
    non-empty."""
    shape = meta.get("shape")
    try:
        chunks = meta["chunk_grid"]["configuration"]["chunk_shape"]
        enc = meta.get("chunk_key_encoding", {})
        sep = enc.get("configuration", {}).get("separator", "/")
        prefix = "c" if enc.get("name", "default") == "default" else ""
    except (KeyError, TypeError):
        return False
    if not isinstance(shape, list) or len(shape) != len(chunks):
        return False
    counts = [math.ceil(s / c) for s, c in zip(shape, chunks)]
    for idx in itertools.product(*(range(n) for n in counts)):
        parts = [str(i) for i in idx]
        key = sep.join([prefix, *parts]) if prefix else sep.join(parts)
        try:
            if (node / key).stat().st_size == 0:
                return False
        except OSError:
            return False
    return True


def array_ok(node: Path, ndim: int | None = None, rows: int | None = None, need_complete: bool = False) -> bool:
    """True when ``node`` is an array with ``ndim`` dimensions and ``rows`` rows (when given), marked complete
    (when ``need_complete``), and all its chunk files are present."""
    meta = read_meta(node)
    if not meta or meta.get("node_type") != "array":
        return False
    shape = meta.get("shape")
    if not isinstance(shape, list) or not shape:
        return False
    if ndim is not None and len(shape) != ndim:
        return False
    if rows is not None and shape[0] != rows:
        return False
    if need_complete and not meta.get("attributes", {}).get("complete"):
        return False
    return chunks_present(node, meta)


def create_array(group: Any, name: str, data: np.ndarray, attrs: dict | None = None) -> None:
    """Write ``data`` as a checksummed, zstd-compressed array; chunks along the first axis only."""
    zarr = zarr_module()
    row_bytes = max(1, int(np.prod(data.shape[1:], dtype=np.int64)) * data.dtype.itemsize)
    rows = max(1, min(max(data.shape[0], 1), CHUNK_BYTES // row_bytes))
    chunks = (rows, *[max(1, s) for s in data.shape[1:]])
    group.create_array(
        name,
        data=data,
        chunks=chunks,
        compressors=[zarr.codecs.ZstdCodec(level=3), zarr.codecs.Crc32cCodec()],
        fill_value=0,
        attributes=attrs_jsonable(attrs or {}),
        config={"write_empty_chunks": True},
    )


def check_no_links(root: Path, path: Path) -> Path:
    """Return ``path`` when no folder from below ``root`` down to ``path`` (itself included) is a symbolic link,
    else raise ``StoreError``: wsimil never writes or deletes through a link inside a store (a crafted store
    could otherwise make it write or delete elsewhere). ``root`` itself may be a link."""
    current = root
    for part in path.relative_to(root).parts:
        current = current / part
        if current.is_symlink():
            raise StoreError(
                f"store {root}: {current.relative_to(root)} is a symbolic link (to {os.readlink(current)}); wsimil "
                "never writes or deletes through links inside a store: replace it with a real folder"
            )
    return path


def rmtree(path: Path) -> None:
    """Remove a directory tree, ignoring errors (temporaries and trash). A link is unlinked, never followed."""
    if path.is_symlink():
        try:
            path.unlink()
        except OSError:
            pass
        return
    shutil.rmtree(path, ignore_errors=True)  # does not follow links inside the tree
