"""The slide groups of a feature store: opening the store, validity, listing, and atomic replacement.

:class:`SlideGroups` is the base of :class:`~wsimil_core.store.zarr_store.FeatureStore`: it knows the store root,
which slide groups are complete and valid (see "Validation" in ``zarr_store``), and how a group or array built in
``.wsimil-tmp/`` is renamed into place. It writes no features or maps itself.

Concurrency. Every replacement (:meth:`SlideGroups._swap_in`, :meth:`SlideGroups.remove_slide`) renames under the
store's exclusive lock (``<root>/.wsimil-lock``, ``wsimil_core.locks``), so concurrent writers of the same node
take turns and none fails half-way; the replaced node is deleted after the lock is released. Readers take no
lock: :meth:`SlideGroups._consistent` notices a node that vanished or was replaced while it was read and reads it
once more under the shared lock. Links: nothing is written or deleted through a symbolic link inside the store.
"""

from __future__ import annotations

import os
import re
import socket
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np

import wsimil_core
from wsimil_core.errors import StoreError
from wsimil_core.locks import folder_lock
from wsimil_core.store.layout import (
    STORE_FORMAT,
    TMP_DIR,
    array_ok,
    check_name,
    check_no_links,
    chunks_present,
    is_name,
    node_attrs,
    read_meta,
    rmtree,
    zarr_module,
)

T = TypeVar("T")


class SlideGroups:
    """A cohort's store directory and its slide groups (opened or created; see ``FeatureStore``).

    Args:
        root: the store directory.
        create: create the store when it does not exist (an existing store is opened as is). Without it a
            missing directory is a ``StoreError``.
    """

    def __init__(self, root: str | os.PathLike, create: bool = False):
        self.root = Path(root)
        meta = read_meta(self.root)
        if meta is None:
            if not create:
                if self.root.exists():
                    raise StoreError(f"{self.root}: not a wsimil feature store (no zarr.json)")
                raise StoreError(f"{self.root}: feature store does not exist (extract or import features first)")
            if self.root.exists() and any(p for p in self.root.iterdir() if p.name != TMP_DIR):
                raise StoreError(f"{self.root}: exists and is not empty, but is not a feature store")
            self.root.mkdir(parents=True, exist_ok=True)
            g = zarr_module().open_group(str(self.root), mode="w", zarr_format=3)
            g.attrs.update({"wsimil_store": {"format": STORE_FORMAT, "version": wsimil_core.__version__}})
            meta = read_meta(self.root)
        info = (meta or {}).get("attributes", {}).get("wsimil_store")
        if (meta or {}).get("node_type") != "group" or not isinstance(info, dict):
            raise StoreError(f"{self.root}: a zarr group, but not a wsimil feature store (no 'wsimil_store' attr)")
        if int(info.get("format", 0)) > STORE_FORMAT:
            raise StoreError(
                f"{self.root}: store format {info.get('format')} is newer than this library understands "
                f"({STORE_FORMAT}); upgrade wsimil"
            )
        self._cleaned = False

    def __contains__(self, slide_id: str) -> bool:
        return is_name(slide_id) and self._group_ok(slide_id)

    # ---------------------------------------------------------------------------------------- validity
    def _slide_dir(self, slide_id: str) -> Path:
        return self.root / check_name(slide_id, "slide id", self.root)

    def _group_n(self, slide_id: str) -> int | None:
        """N (rows of coords) when the slide group is complete and valid, else None."""
        d = self.root / slide_id
        meta = read_meta(d)
        if not meta or meta.get("node_type") != "group" or not meta.get("attributes", {}).get("complete"):
            return None
        cmeta = read_meta(d / "coords")
        if not cmeta or cmeta.get("node_type") != "array":
            return None
        shape = cmeta.get("shape")
        if not isinstance(shape, list) or len(shape) != 2 or shape[1] != 2 or cmeta.get("data_type") != "int64":
            return None
        if not chunks_present(d / "coords", cmeta):
            return None
        n = int(shape[0])
        if meta["attributes"].get("n_patches", n) != n:
            return None
        return n

    def _group_ok(self, slide_id: str) -> bool:
        return self._group_n(slide_id) is not None

    def _features_ok(self, slide_id: str, encoder_id: str, n: int) -> bool:
        return array_ok(self.root / slide_id / "features" / encoder_id, ndim=2, rows=n, need_complete=True)

    def problems(self, slide_id: str) -> list[str]:
        """Human-readable reasons why a slide is incomplete or invalid (empty when it is fine)."""
        d = self._slide_dir(slide_id)
        if not d.is_dir():
            return [f"no group {slide_id!r}"]
        meta = read_meta(d)
        if not meta:
            return ["the group has no zarr.json"]
        out = []
        if not meta.get("attributes", {}).get("complete"):
            out.append("the group was never marked complete (interrupted write)")
        n = None
        cmeta = read_meta(d / "coords")
        if not cmeta:
            out.append("coords are missing")
        else:
            n = (cmeta.get("shape") or [None])[0]
            if not chunks_present(d / "coords", cmeta):
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
            if not p.is_dir() or not is_name(name):
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
            if p.is_dir() and is_name(p.name) and (p / "zarr.json").exists() and not self._group_ok(p.name)
        )

    def has_bag(self, slide_id: str, encoder_id: str) -> bool:
        """True when the slide group is complete and has complete features of ``encoder_id`` matching coords."""
        if not (is_name(slide_id) and isinstance(encoder_id, str)):
            return False
        n = self._group_n(slide_id)
        return n is not None and is_name(encoder_id) and self._features_ok(slide_id, encoder_id, n)

    def encoder_ids(self, slide_id: str) -> list[str]:
        """Encoders with complete, valid features for the slide (empty when the slide is missing)."""
        n = self._group_n(check_name(slide_id, "slide id", self.root))
        fdir = self.root / slide_id / "features"
        if n is None or not fdir.is_dir():
            return []
        return sorted(p.name for p in fdir.iterdir() if is_name(p.name) and self._features_ok(slide_id, p.name, n))

    def _require_group(self, slide_id: str) -> int:
        """N of a complete slide; ``StoreError`` saying what is missing or wrong otherwise."""
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
        return node_attrs(self.root / slide_id)

    def _read_array(self, node: Path, slide_id: str) -> np.ndarray:
        """The whole array at ``node`` (``StoreError`` naming the slide when a chunk is damaged)."""
        try:
            return np.asarray(zarr_module().open_array(str(node), mode="r")[...])
        except Exception as exc:  # codec / checksum / IO errors of a damaged chunk
            raise StoreError(
                f"store {self.root}: slide {slide_id!r}: cannot read {node.relative_to(self.root)} "
                f"({type(exc).__name__}: {exc}); the data are damaged: run `wsimil store verify --repair {self.root}` "
                "and re-run the extraction/import (features) or predict (maps) to redo them"
            ) from None

    def _node_id(self, node: Path) -> tuple[int, int, int, int] | None:
        """Identity of a node (its folder's and its zarr.json's inode, zarr.json's mtime); None when missing. A
        replacement always gives a new identity (the whole subtree is new)."""
        try:
            folder, meta = os.stat(node), os.stat(node / "zarr.json")
        except OSError:
            return None
        return folder.st_dev, folder.st_ino, meta.st_ino, meta.st_mtime_ns

    def _consistent(self, nodes: Sequence[Path], read: Callable[[], T]) -> T:
        """``read()`` of ``nodes``, done again once under the store's shared lock (no replacement can run then)
        when a node was missing or was replaced by another process while it was read; the second answer, value
        or ``StoreError``, is final."""
        before = [self._node_id(n) for n in nodes]
        try:
            out = read()
        except StoreError:
            if None not in before and before == [self._node_id(n) for n in nodes]:
                raise  # nothing moved: the error is real
        else:
            if None not in before and before == [self._node_id(n) for n in nodes]:
                return out
        with folder_lock(self.root, shared=True):
            return read()

    # ---------------------------------------------------------------------------------------- atomic writes
    def _writable(self, path: Path) -> Path:
        """``path`` (inside the store) when no folder on the way is a symbolic link, else ``StoreError``."""
        return check_no_links(self.root, path)

    def _tmp_dir(self, label: str) -> Path:
        """A fresh path in ``.wsimil-tmp/`` named after this host and process (stale ones are cleaned once)."""
        base = self._writable(self.root / TMP_DIR)
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
                rmtree(p)
            except PermissionError:
                pass

    def _swap_in(self, built: Path, dest: Path) -> None:
        """Rename ``built`` to ``dest`` under the store lock; an existing ``dest`` is moved aside first (and put
        back if the second rename fails) and deleted after the lock is released."""
        self._writable(dest)
        trash = None
        with folder_lock(self.root):
            if os.path.lexists(dest):
                trash = self._tmp_dir(f"old-{dest.name}")
                os.rename(dest, trash)
                try:
                    os.rename(built, dest)
                except BaseException:
                    os.rename(trash, dest)
                    raise
            else:
                os.rename(built, dest)
        if trash is not None:
            rmtree(trash)

    # ---------------------------------------------------------------------------------------- removal
    def remove_slide(self, slide_id: str) -> None:
        """Delete a slide group (atomically moved aside first). A slide folder that is a symbolic link is
        unlinked: what it points to is never touched."""
        d = self._slide_dir(slide_id)
        if d.is_symlink():
            with folder_lock(self.root):
                d.unlink()
            return
        if d.exists():
            trash = self._tmp_dir(f"old-{slide_id}")
            with folder_lock(self.root):
                if not d.exists():  # another process removed it meanwhile
                    return
                os.rename(d, trash)
            rmtree(trash)

    def _require_subgroup(self, slide_id: str, name: str) -> Path:
        """``<slide>/<name>`` (``maps``, ``features``), created under the store lock when missing."""
        node = self._writable(self.root / slide_id / name)
        if read_meta(node) is None:
            with folder_lock(self.root):
                if read_meta(node) is None:
                    zarr_module().open_group(str(self.root / slide_id), mode="r+").require_group(name)
        return node
