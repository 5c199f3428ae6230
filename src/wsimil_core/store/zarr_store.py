"""The feature store: one zarr v3 directory per cohort, one group per slide (DESIGN.md "The feature store").

Layout::

    <root>/zarr.json                                  root group; attrs {"wsimil_store": {"format": 1, ...}}
    <root>/<slide_id>/zarr.json                       slide attrs (slide_path, mpp, patch size, ...) + "complete"
    <root>/<slide_id>/coords                          int64 [N, 2] level-0 (x, y) top-left corners
    <root>/<slide_id>/features/<encoder_id>           float16 | float32 [N, D]; attrs: encoder spec + "complete"
    <root>/<slide_id>/maps/<checkpoint_id>/<name>     float32 [N] or [N, K]; attrs {"map_name": "attention/head3"}
    <root>/.wsimil-tmp/                               temporary groups being built (never read)

Atomicity. A slide group is built in ``.wsimil-tmp/`` and renamed into place; adding a second encoder's features
(or a checkpoint's maps) to an existing slide builds that one array (group) in ``.wsimil-tmp/`` and renames it
into ``features/`` (``maps/``). A killed writer therefore leaves only garbage in ``.wsimil-tmp/`` (cleaned on the
next write), never a half-written group under a slide name.

Validation. A group counts as complete only when its ``complete`` attr is set (the last thing written), its
arrays have the expected shapes (features N == coords N), and every chunk file of every array exists. Chunks
carry a CRC32C checksum, so a truncated or corrupted chunk is reported as a ``StoreError`` on read. Incomplete
slides are left out of ``slide_ids()``, ``has_bag`` is False for them, and re-running the writer redoes them.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import re
import shutil
import socket
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wsimil_core._io import jsonable
from wsimil_core.errors import DataError, StoreError
from wsimil_core.store.h5 import h5_files, read_h5_bag

__all__ = [
    "Bag",
    "FeatureStore",
    "safe_slide_id",
    "check_name",
    "slide_fingerprint",
    "read_h5_bag",
    "h5_files",
    "STORE_FORMAT",
]

STORE_FORMAT = 1
_TMP_DIR = ".wsimil-tmp"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
_CHUNK_BYTES = 4 * 1024 * 1024  # target size of one feature chunk (uncompressed)


@dataclass
class Bag:
    """One slide's bag as read from the store.

    Attributes:
        features: ``[N, D]`` float16 or float32 (as stored).
        coords: ``[N, 2]`` int64 level-0 (x, y) of each patch's top-left corner.
        attrs: the slide group's attrs (slide path, mpp, patch size, ...).
        encoder_attrs: the features array's attrs (encoder name, weights sha256, input size, ...).
        slide_id: the slide group's name.
        encoder_id: the encoder whose features these are.
    """

    features: np.ndarray
    coords: np.ndarray
    attrs: dict = field(default_factory=dict)
    encoder_attrs: dict = field(default_factory=dict)
    slide_id: str = ""
    encoder_id: str = ""


# --------------------------------------------------------------------------------------------------------------
# names and attrs


def check_name(name: Any, what: str, where: str | os.PathLike = "") -> str:
    """Return ``name`` if it is a safe group name, else raise ``StoreError``.

    Safe: 1-200 characters from letters, digits, ``.``, ``_``, ``-``, starting with a letter or digit (so no
    path separators, no ``..``, no hidden or zarr-reserved ``__`` names).
    """
    if not isinstance(name, str) or not _NAME_RE.match(name):
        prefix = f"{where}: " if where else ""
        raise StoreError(
            f"{prefix}invalid {what} {name!r}: use 1-200 letters, digits, '.', '_' or '-', starting with a "
            "letter or digit (see wsimil_core.store.zarr_store.safe_slide_id)"
        )
    return name


def safe_slide_id(name: str) -> str:
    """Turn a file stem or bag id into a safe slide id: other characters become ``_``.

    >>> safe_slide_id("TCGA-AB 12/3.svs")
    'TCGA-AB_12_3.svs'
    """
    out = re.sub(r"[^A-Za-z0-9._-]", "_", str(name).strip())
    out = out.lstrip("._-")[:200]
    if not out:
        raise StoreError(f"cannot make a slide id from {name!r}")
    return out


def _jsonable(value: Any) -> Any:
    """Numpy scalars/arrays, paths, tuples and dataclasses as JSON values; anything else becomes ``str``."""
    return jsonable(value, fallback=str)


def slide_fingerprint(path: str | os.PathLike) -> dict[str, Any]:
    """``{"slide_sha256_1mib": sha256 of the first MiB, "slide_size": bytes}`` of a slide file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 20)
        size = path.stat().st_size
    except OSError as exc:
        raise StoreError(f"{path}: cannot fingerprint the slide file: {exc.strerror or exc}") from None
    return {"slide_sha256_1mib": hashlib.sha256(head).hexdigest(), "slide_size": int(size)}


def _version() -> str:
    from wsimil_core import __version__

    return __version__


# --------------------------------------------------------------------------------------------------------------
# low-level zarr helpers (no zarr import at module import time)


def _zarr():
    import zarr

    return zarr


def _read_meta(node: Path) -> dict | None:
    """The parsed ``zarr.json`` of a node, or None when absent or unreadable."""
    try:
        with open(node / "zarr.json", "rb") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _node_attrs(node: Path) -> dict:
    """The ``attributes`` of a node that was checked to exist (``StoreError`` if its zarr.json vanished since)."""
    meta = _read_meta(node)
    if meta is None:
        raise StoreError(f"{node}: zarr.json is missing or unreadable; re-run the extraction/import to redo it")
    return dict(meta.get("attributes", {}))


def _chunks_present(node: Path, meta: dict) -> bool:
    """True when every chunk file of the array at ``node`` exists and is non-empty."""
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


def _array_ok(node: Path, ndim: int | None = None, rows: int | None = None, need_complete: bool = False) -> bool:
    meta = _read_meta(node)
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
    return _chunks_present(node, meta)


def _create_array(group: Any, name: str, data: np.ndarray, attrs: dict | None = None) -> None:
    """Write ``data`` as a checksummed, zstd-compressed array; chunks along the first axis only."""
    zarr = _zarr()
    row_bytes = max(1, int(np.prod(data.shape[1:], dtype=np.int64)) * data.dtype.itemsize)
    rows = max(1, min(max(data.shape[0], 1), _CHUNK_BYTES // row_bytes))
    chunks = (rows, *[max(1, s) for s in data.shape[1:]])
    group.create_array(
        name,
        data=data,
        chunks=chunks,
        compressors=[zarr.codecs.ZstdCodec(level=3), zarr.codecs.Crc32cCodec()],
        fill_value=0,
        attributes=_jsonable(attrs or {}),
        config={"write_empty_chunks": True},
    )


def _rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------------------------------------------


class FeatureStore:
    """A cohort's feature store (zarr v3 directory). See the module docstring for the layout.

    Args:
        root: the store directory.
        create: create the store when it does not exist (an existing store is opened as is). Without it a
            missing directory is a ``StoreError``.
    """

    def __init__(self, root: str | os.PathLike, create: bool = False):
        self.root = Path(root)
        meta = _read_meta(self.root)
        if meta is None:
            if not create:
                if self.root.exists():
                    raise StoreError(f"{self.root}: not a wsimil feature store (no zarr.json)")
                raise StoreError(f"{self.root}: feature store does not exist (extract or import features first)")
            if self.root.exists() and any(p for p in self.root.iterdir() if p.name != _TMP_DIR):
                raise StoreError(f"{self.root}: exists and is not empty, but is not a feature store")
            self.root.mkdir(parents=True, exist_ok=True)
            zarr = _zarr()
            g = zarr.open_group(str(self.root), mode="w", zarr_format=3)
            g.attrs.update({"wsimil_store": {"format": STORE_FORMAT, "version": _version()}})
            meta = _read_meta(self.root)
        info = (meta or {}).get("attributes", {}).get("wsimil_store")
        if (meta or {}).get("node_type") != "group" or not isinstance(info, dict):
            raise StoreError(f"{self.root}: a zarr group, but not a wsimil feature store (no 'wsimil_store' attr)")
        if int(info.get("format", 0)) > STORE_FORMAT:
            raise StoreError(
                f"{self.root}: store format {info.get('format')} is newer than this library understands "
                f"({STORE_FORMAT}); upgrade wsimil"
            )
        self._cleaned = False

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.root)!r})"

    def __contains__(self, slide_id: str) -> bool:
        return isinstance(slide_id, str) and bool(_NAME_RE.match(slide_id)) and self._group_ok(slide_id)

    # ---------------------------------------------------------------------------------------- validity
    def _slide_dir(self, slide_id: str) -> Path:
        return self.root / check_name(slide_id, "slide id", self.root)

    def _group_n(self, slide_id: str) -> int | None:
        """N (rows of coords) when the slide group is complete and valid, else None."""
        d = self.root / slide_id
        meta = _read_meta(d)
        if not meta or meta.get("node_type") != "group" or not meta.get("attributes", {}).get("complete"):
            return None
        cmeta = _read_meta(d / "coords")
        if not cmeta or cmeta.get("node_type") != "array":
            return None
        shape = cmeta.get("shape")
        if not isinstance(shape, list) or len(shape) != 2 or shape[1] != 2 or cmeta.get("data_type") != "int64":
            return None
        if not _chunks_present(d / "coords", cmeta):
            return None
        n = int(shape[0])
        if meta["attributes"].get("n_patches", n) != n:
            return None
        return n

    def _group_ok(self, slide_id: str) -> bool:
        return self._group_n(slide_id) is not None

    def _features_ok(self, slide_id: str, encoder_id: str, n: int) -> bool:
        return _array_ok(self.root / slide_id / "features" / encoder_id, ndim=2, rows=n, need_complete=True)

    def problems(self, slide_id: str) -> list[str]:
        """Human-readable reasons why a slide is incomplete or invalid (empty when it is fine)."""
        d = self._slide_dir(slide_id)
        if not d.is_dir():
            return [f"no group {slide_id!r}"]
        meta = _read_meta(d)
        if not meta:
            return ["the group has no zarr.json"]
        out = []
        if not meta.get("attributes", {}).get("complete"):
            out.append("the group was never marked complete (interrupted write)")
        n = None
        cmeta = _read_meta(d / "coords")
        if not cmeta:
            out.append("coords are missing")
        else:
            n = (cmeta.get("shape") or [None])[0]
            if not _chunks_present(d / "coords", cmeta):
                out.append("a coords chunk is missing")
        fdir = d / "features"
        for enc in sorted(p.name for p in fdir.iterdir()) if fdir.is_dir() else []:
            if enc.startswith(".") or enc == "zarr.json":
                continue
            if not self._features_ok(slide_id, enc, n if n is not None else -1):
                out.append(f"features {enc!r} are incomplete, truncated or do not match coords N={n}")
        return out

    # ---------------------------------------------------------------------------------------- listing
    def slide_ids(self, encoder_id: str | None = None) -> list[str]:
        """Sorted ids of complete, valid slide groups (with valid features of ``encoder_id`` when given)."""
        out = []
        for p in sorted(self.root.iterdir()):
            name = p.name
            if not p.is_dir() or not _NAME_RE.match(name):
                continue
            n = self._group_n(name)
            if n is None:
                continue
            if encoder_id is not None and not self._features_ok(name, encoder_id, n):
                continue
            out.append(name)
        return out

    def incomplete_slide_ids(self) -> list[str]:
        """Ids of slide groups that exist but are incomplete or invalid (a re-run redoes them)."""
        return sorted(
            p.name
            for p in self.root.iterdir()
            if p.is_dir() and _NAME_RE.match(p.name) and (p / "zarr.json").exists() and not self._group_ok(p.name)
        )

    def has_bag(self, slide_id: str, encoder_id: str) -> bool:
        """True when the slide group is complete and has complete features of ``encoder_id`` matching coords."""
        if not (isinstance(slide_id, str) and _NAME_RE.match(slide_id) and isinstance(encoder_id, str)):
            return False
        n = self._group_n(slide_id)
        return n is not None and _NAME_RE.match(encoder_id) is not None and self._features_ok(slide_id, encoder_id, n)

    def encoder_ids(self, slide_id: str) -> list[str]:
        """Encoders with complete, valid features for the slide (empty when the slide is missing)."""
        n = self._group_n(check_name(slide_id, "slide id", self.root))
        fdir = self.root / slide_id / "features"
        if n is None or not fdir.is_dir():
            return []
        return sorted(
            p.name for p in fdir.iterdir() if _NAME_RE.match(p.name) and self._features_ok(slide_id, p.name, n)
        )

    def map_ids(self, slide_id: str) -> list[str]:
        """Checkpoint ids with complete maps for the slide."""
        n = self._group_n(check_name(slide_id, "slide id", self.root))
        mdir = self.root / slide_id / "maps"
        if n is None or not mdir.is_dir():
            return []
        return sorted(p.name for p in mdir.iterdir() if _NAME_RE.match(p.name) and self._maps_ok(slide_id, p.name, n))

    def _require_group(self, slide_id: str) -> int:
        d = self._slide_dir(slide_id)
        n = self._group_n(slide_id)
        if n is None:
            if not d.exists():
                have = self.slide_ids()
                hint = f"; it has {len(have)} slide(s), e.g. {have[:5]}" if have else "; it has no complete slides"
                raise StoreError(f"store {self.root}: no slide {slide_id!r}{hint}")
            why = "; ".join(self.problems(slide_id)) or "invalid"
            raise StoreError(
                f"store {self.root}: slide {slide_id!r} is incomplete ({why}); re-run the extraction/import to redo it"
            )
        return n

    def slide_attrs(self, slide_id: str) -> dict:
        """The slide group's attrs (``StoreError`` if the slide is missing or incomplete)."""
        self._require_group(slide_id)
        return _node_attrs(self.root / slide_id)

    # ---------------------------------------------------------------------------------------- reading
    def read_coords(self, slide_id: str) -> np.ndarray:
        """``[N, 2]`` int64 level-0 (x, y) coords of the slide's patches."""
        self._require_group(slide_id)
        return self._read_array(self.root / slide_id / "coords", slide_id)

    def _read_array(self, node: Path, slide_id: str) -> np.ndarray:
        zarr = _zarr()
        try:
            return np.asarray(zarr.open_array(str(node), mode="r")[...])
        except Exception as exc:  # codec / checksum / IO errors of a damaged chunk
            raise StoreError(
                f"store {self.root}: slide {slide_id!r}: cannot read {node.relative_to(self.root)} "
                f"({type(exc).__name__}: {exc}); the data are damaged, re-run to rewrite this slide"
            ) from None

    def read_bag(self, slide_id: str, encoder_id: str | None = None) -> Bag:
        """Features, coords and attrs of one slide.

        Args:
            slide_id: the slide group.
            encoder_id: which encoder's features; may be None when the slide has exactly one.

        Raises:
            StoreError: missing/incomplete slide, features of another encoder only, or damaged chunks.
        """
        n = self._require_group(slide_id)
        have = self.encoder_ids(slide_id)
        if encoder_id is None:
            if len(have) != 1:
                raise StoreError(
                    f"store {self.root}: slide {slide_id!r} has features of {len(have)} encoders {have}; "
                    "say which one (encoder_id / --encoder)"
                )
            encoder_id = have[0]
        if encoder_id not in have:
            broken = (self.root / slide_id / "features" / str(encoder_id)).exists()
            if broken:
                raise StoreError(
                    f"store {self.root}: slide {slide_id!r}: features of encoder {encoder_id!r} are incomplete or "
                    "damaged; re-run the extraction to redo them"
                )
            raise StoreError(
                f"store {self.root}: slide {slide_id!r} has no features of encoder {encoder_id!r} "
                f"(written by another encoder: it has {have or 'none'}); extract with {encoder_id!r} or use one of those"
            )
        fnode = self.root / slide_id / "features" / encoder_id
        features = self._read_array(fnode, slide_id)
        coords = self._read_array(self.root / slide_id / "coords", slide_id)
        if features.shape[0] != n or coords.shape[0] != n:
            raise StoreError(f"store {self.root}: slide {slide_id!r}: features and coords disagree on N")
        enc_attrs = _node_attrs(fnode)
        enc_attrs.pop("complete", None)
        return Bag(
            features=features,
            coords=coords,
            attrs=_node_attrs(self.root / slide_id),
            encoder_attrs=enc_attrs,
            slide_id=slide_id,
            encoder_id=encoder_id,
        )

    # ---------------------------------------------------------------------------------------- writing
    def _tmp_dir(self, label: str) -> Path:
        base = self.root / _TMP_DIR
        base.mkdir(exist_ok=True)
        if not self._cleaned:
            self._clean_stale_tmp(base)
            self._cleaned = True
        return base / f"{label}.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:12]}"

    @staticmethod
    def _clean_stale_tmp(base: Path) -> None:
        """Remove temporaries of dead writer processes on this host (other hosts' are left alone)."""
        pattern = re.compile(rf"\.{re.escape(socket.gethostname())}\.(\d+)\.[0-9a-f]{{12}}$")
        for p in base.iterdir():
            m = pattern.search(p.name)
            if not m:
                continue
            pid = int(m.group(1))
            if pid == os.getpid():
                continue
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                _rmtree(p)
            except PermissionError:
                pass

    def _swap_in(self, built: Path, dest: Path) -> None:
        """Rename ``built`` to ``dest``; an existing ``dest`` is moved aside first and deleted after."""
        if dest.exists():
            trash = self._tmp_dir(f"old-{dest.name}")
            os.rename(dest, trash)
            os.rename(built, dest)
            _rmtree(trash)
        else:
            os.rename(built, dest)

    def _check_features(self, slide_id: str, features: Any, coords: Any) -> tuple[np.ndarray, np.ndarray]:
        where = f"store {self.root}: slide {slide_id!r}"
        feats = np.asarray(features)
        if feats.ndim == 3 and feats.shape[0] == 1:
            feats = feats[0]
        if feats.ndim != 2:
            raise DataError(f"{where}: features must be [N, D], got shape {feats.shape}")
        if not np.issubdtype(feats.dtype, np.floating):
            raise DataError(f"{where}: features must be floating point, got {feats.dtype}")
        if feats.dtype not in (np.float16, np.float32):
            feats = feats.astype(np.float32)
        if feats.size and not np.isfinite(feats).all():
            raise DataError(f"{where}: features contain NaN or infinite values")
        crd = np.asarray(coords)
        if crd.ndim == 3 and crd.shape[0] == 1:
            crd = crd[0]
        if crd.ndim != 2 or crd.shape[1] != 2:
            raise DataError(f"{where}: coords must be [N, 2] (x, y), got shape {crd.shape}")
        if not np.issubdtype(crd.dtype, np.integer):
            if crd.size and (not np.isfinite(crd).all() or np.any(crd != np.round(crd))):
                raise DataError(f"{where}: coords must be integer level-0 pixels")
        crd = crd.astype(np.int64)
        if crd.shape[0] != feats.shape[0]:
            raise DataError(f"{where}: {feats.shape[0]} feature rows but {crd.shape[0]} coords")
        return np.ascontiguousarray(feats), np.ascontiguousarray(crd)

    def write_bag(
        self,
        slide_id: str,
        features: Any,
        coords: Any,
        encoder_id: str,
        encoder_attrs: dict | None = None,
        *,
        overwrite: bool = False,
        **slide_attrs: Any,
    ) -> None:
        """Write one slide's features (atomic).

        * New (or incomplete) slide: the whole group (attrs, coords, ``features/<encoder_id>``, empty ``maps``)
          is built in a temporary directory and renamed into place.
        * Complete slide with the same coords: only ``features/<encoder_id>`` is (re)written, atomically; other
          encoders' features and the maps stay; new slide attrs are merged in.
        * Complete slide with different coords: ``StoreError`` unless ``overwrite=True``, which replaces the
          whole group (dropping other encoders' features and maps, which belong to the old grid).

        Args:
            slide_id: safe group name (see ``safe_slide_id``).
            features: ``[N, D]`` (or ``[1, N, D]``) float16/float32 (float64 is stored as float32).
            coords: ``[N, 2]`` level-0 (x, y) integers.
            encoder_id: safe name of the encoder (``features/<encoder_id>``).
            encoder_attrs: JSON-able description of the encoder (name, weights_sha256, input_size, mean, std, mpp).
            overwrite: replace a complete slide whose coords differ.
            **slide_attrs: slide attrs (``slide_path``, ``slide_mpp``, ``patch_size_level0``, ...; see docs/store.md).
        """
        d = self._slide_dir(slide_id)
        check_name(encoder_id, "encoder id", self.root)
        feats, crd = self._check_features(slide_id, features, coords)
        enc = {**_jsonable(encoder_attrs or {}), "encoder_id": encoder_id, "dim": int(feats.shape[1])}

        n_old = self._group_n(slide_id)
        if n_old is not None:
            old = self._read_array(d / "coords", slide_id) if n_old == crd.shape[0] else None
            if old is not None and np.array_equal(old, crd):
                self._add_features(slide_id, feats, enc, slide_attrs)
                return
            if not overwrite:
                raise StoreError(
                    f"store {self.root}: slide {slide_id!r} already has a different patch grid "
                    f"(N={n_old}, new N={crd.shape[0]}); pass overwrite=True (--overwrite) to replace it, which "
                    "drops its other encoders' features and maps"
                )

        zarr = _zarr()
        tmp = self._tmp_dir(slide_id)
        try:
            g = zarr.open_group(str(tmp), mode="w", zarr_format=3)
            _create_array(g, "coords", crd)
            fg = g.create_group("features")
            _create_array(fg, encoder_id, feats, {**enc, "complete": True})
            g.create_group("maps")
            attrs = {"version": _version(), **_jsonable(slide_attrs)}
            attrs.update({"n_patches": int(crd.shape[0]), "complete": True})
            g.attrs.update(attrs)  # the complete marker is written last
            self._swap_in(tmp, d)
        except BaseException:
            _rmtree(tmp)
            raise

    def _add_features(self, slide_id: str, feats: np.ndarray, enc: dict, slide_attrs: dict) -> None:
        zarr = _zarr()
        d = self.root / slide_id
        fdir = d / "features"
        if _read_meta(fdir) is None:  # a group written without features/ (should not happen); make one
            zarr.open_group(str(d), mode="r+").require_group("features")
        tmp = self._tmp_dir(f"{slide_id}-{enc['encoder_id']}")
        try:
            g = zarr.open_group(str(tmp), mode="w", zarr_format=3)
            _create_array(g, "a", feats, {**enc, "complete": True})
            self._swap_in(tmp / "a", fdir / enc["encoder_id"])
        finally:
            _rmtree(tmp)
        new = {k: v for k, v in _jsonable(slide_attrs).items() if k not in ("complete", "n_patches")}
        if new:
            g = zarr.open_group(str(d), mode="r+")
            g.attrs.update(new)  # zarr writes zarr.json atomically (temp + rename)

    # ---------------------------------------------------------------------------------------- maps
    def _maps_ok(self, slide_id: str, checkpoint_id: str, n: int) -> bool:
        node = self.root / slide_id / "maps" / checkpoint_id
        meta = _read_meta(node)
        if not meta or not meta.get("attributes", {}).get("complete"):
            return False
        names = meta["attributes"].get("arrays", {})
        return all(_array_ok(node / key, rows=n) for key in names)

    def write_maps(
        self,
        slide_id: str,
        checkpoint_id: str,
        maps: Mapping[str, Any],
        attrs: dict | None = None,
        specs: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        """Write (replace) a checkpoint's per-patch maps for a slide, atomically.

        Args:
            slide_id: a complete slide in the store.
            checkpoint_id: safe name of the checkpoint (``maps/<checkpoint_id>``).
            maps: ``{name: [N] or [N, K]}`` aligned with the slide's coords; names are slash paths
                (``attention/head3``); stored as float32.
            attrs: JSON-able attrs of the maps group (checkpoint path, class names, prediction, ...).
            specs: ``{name: MapSpec.to_dict()}`` of the maps (how to read and draw each one); stored in each
                array's attrs as ``map_spec`` and returned by ``read_map_specs``.
        """
        n = self._require_group(slide_id)
        check_name(checkpoint_id, "checkpoint id", self.root)
        where = f"store {self.root}: slide {slide_id!r}, maps {checkpoint_id!r}"
        arrays: dict[str, np.ndarray] = {}
        keys: dict[str, str] = {}
        for i, (name, value) in enumerate(maps.items()):
            if not isinstance(name, str) or not name or any(not part for part in name.split("/")):
                raise DataError(f"{where}: invalid map name {name!r}")
            v = np.asarray(value.detach().cpu().numpy() if hasattr(value, "detach") else value, dtype=np.float32)
            if v.ndim not in (1, 2) or v.shape[0] != n:
                raise DataError(f"{where}: map {name!r} has shape {v.shape}, expected [{n}] or [{n}, K]")
            key = f"m{i:03d}"
            arrays[key] = v
            keys[key] = name
        zarr = _zarr()
        mdir = self.root / slide_id / "maps"
        if _read_meta(mdir) is None:
            zarr.open_group(str(self.root / slide_id), mode="r+").require_group("maps")
        tmp = self._tmp_dir(f"{slide_id}-maps-{checkpoint_id}")
        try:
            g = zarr.open_group(str(tmp), mode="w", zarr_format=3)
            for key, v in arrays.items():
                spec = (specs or {}).get(keys[key])
                array_attrs = {"map_name": keys[key], **({"map_spec": _jsonable(dict(spec))} if spec else {})}
                _create_array(g, key, np.ascontiguousarray(v), array_attrs)
            g.attrs.update({**_jsonable(attrs or {}), "arrays": keys, "complete": True})
            self._swap_in(tmp, mdir / checkpoint_id)
        except BaseException:
            _rmtree(tmp)
            raise

    def read_maps(self, slide_id: str, checkpoint_id: str) -> dict[str, np.ndarray]:
        """``{map_name: float32 [N] or [N, K]}`` written by ``write_maps`` (``StoreError`` if absent)."""
        n = self._require_group(slide_id)
        check_name(checkpoint_id, "checkpoint id", self.root)
        if not self._maps_ok(slide_id, checkpoint_id, n):
            raise StoreError(
                f"store {self.root}: slide {slide_id!r} has no complete maps of checkpoint {checkpoint_id!r} "
                f"(it has {self.map_ids(slide_id) or 'none'}); run predict"
            )
        node = self.root / slide_id / "maps" / checkpoint_id
        keys = _node_attrs(node)["arrays"]
        return {name: self._read_array(node / key, slide_id) for key, name in keys.items()}

    def read_map_specs(self, slide_id: str, checkpoint_id: str) -> dict[str, dict]:
        """``{map_name: spec dict}`` stored beside the maps by ``write_maps`` (maps written without a spec are
        left out; ``MapSpec.from_dict`` turns each into a ``MapSpec``)."""
        n = self._require_group(slide_id)
        if not self._maps_ok(slide_id, checkpoint_id, n):
            raise StoreError(f"store {self.root}: slide {slide_id!r} has no complete maps of {checkpoint_id!r}")
        node = self.root / slide_id / "maps" / checkpoint_id
        out = {}
        for key, name in _node_attrs(node)["arrays"].items():
            spec = (_read_meta(node / key) or {}).get("attributes", {}).get("map_spec")
            if isinstance(spec, dict):
                out[name] = spec
        return out

    def maps_attrs(self, slide_id: str, checkpoint_id: str) -> dict:
        """The attrs given to ``write_maps`` for this slide and checkpoint."""
        n = self._require_group(slide_id)
        if not self._maps_ok(slide_id, checkpoint_id, n):
            raise StoreError(f"store {self.root}: slide {slide_id!r} has no complete maps of {checkpoint_id!r}")
        attrs = _node_attrs(self.root / slide_id / "maps" / checkpoint_id)
        attrs.pop("arrays", None)
        attrs.pop("complete", None)
        return attrs

    # ---------------------------------------------------------------------------------------- removal
    def remove_slide(self, slide_id: str) -> None:
        """Delete a slide group (atomically moved aside first)."""
        d = self._slide_dir(slide_id)
        if d.exists():
            trash = self._tmp_dir(f"old-{slide_id}")
            os.rename(d, trash)
            _rmtree(trash)

    # ---------------------------------------------------------------------------------------- .h5 import
    def import_h5(
        self,
        path: str | os.PathLike | Iterable[str | os.PathLike],
        slide_id: str | None = None,
        encoder_id: str = "h5",
        *,
        overwrite: bool = False,
        progress: bool = False,
        **attrs: Any,
    ) -> list[str]:
        """Import CLAM/TRIDENT-style ``.h5`` feature files (``features`` [N, D] or [1, N, D], ``coords`` [N, 2]).

        Args:
            path: one ``.h5`` file, a directory (all ``*.h5`` in it), or a list of files.
            slide_id: the slide id for a single file (default: a safe version of the file stem).
            encoder_id: the encoder id the features are stored under.
            overwrite: re-import slides that already have complete features of ``encoder_id``.
            progress: show a progress bar.
            **attrs: extra slide attrs (e.g. ``slide_mpp=0.25``).

        Returns:
            The slide ids imported (or already present).
        """
        files = h5_files(path)
        if slide_id is not None and len(files) != 1:
            raise StoreError(f"slide_id={slide_id!r} can only be given for a single .h5 file, got {len(files)}")
        ids = []
        it: Iterable[Path] = files
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(files, desc="import .h5", unit="file")
        for f in it:
            sid = slide_id or safe_slide_id(f.stem)
            if not overwrite and self.has_bag(sid, encoder_id):
                ids.append(sid)
                continue
            feats, crd, h5attrs, enc_attrs = read_h5_bag(f)
            self.write_bag(
                sid,
                feats,
                crd,
                encoder_id,
                {"source": "h5", **enc_attrs},
                overwrite=overwrite,
                **{**h5attrs, "source_file": str(f.resolve()), **attrs},
            )
            ids.append(sid)
        return ids
