"""The feature store: one zarr v3 directory per cohort, one group per slide (DESIGN.md "The feature store").

Layout::

    <root>/zarr.json                                  root group; attrs {"wsimil_store": {"format": 1, ...}}
    <root>/<slide_id>/zarr.json                       slide attrs (slide_path, mpp, patch size, ...) + "complete"
    <root>/<slide_id>/coords                          int64 [N, 2] level-0 (x, y) top-left corners
    <root>/<slide_id>/features/<encoder_id>           float16 | float32 [N, D]; attrs: encoder spec + "complete"
    <root>/<slide_id>/maps/<checkpoint_id>/m000       float32 [N] or [N, K]; attrs {"map_name": "attention/head3"}
    <root>/.wsimil-tmp/                               temporary groups being built (never read)

Atomicity. A slide group is built in ``.wsimil-tmp/`` and renamed into place; adding a second encoder's features
(or a checkpoint's maps) to an existing slide builds that one array (group) in ``.wsimil-tmp/`` and renames it
into ``features/`` (``maps/``). A killed writer therefore leaves only garbage in ``.wsimil-tmp/`` (cleaned on the
next write), never a half-written group under a slide name.

Modules: ``layout`` (names, fingerprints, zarr node helpers), ``groups`` (``SlideGroups``: opening, validity,
listing, atomic replacement), ``maps`` (``StoreMaps``: per-patch maps), ``verify`` (reading every chunk:
damage that stat() cannot see) and this one (``FeatureStore``: features).

Validation. A group counts as complete only when its ``complete`` attr is set (the last thing written), its
arrays have the expected shapes (features N == coords N), and every chunk file of every array exists. Chunks
carry a CRC32C checksum, so a truncated or corrupted chunk is reported as a ``StoreError`` on read. Incomplete
slides are left out of ``slide_ids()``, ``has_bag`` is False for them, and re-running the writer redoes them.
These checks stat files only; ``store.verify`` reads every chunk (``wsimil store verify [--repair]``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import wsimil_core
from wsimil_core.errors import DataError, StoreError, WsimilError
from wsimil_core.locks import folder_lock
from wsimil_core.store.h5 import h5_files, read_h5_bag
from wsimil_core.store.layout import (
    STORE_FORMAT,
    attrs_jsonable,
    check_name,
    create_array,
    node_attrs,
    rmtree,
    safe_slide_id,
    slide_fingerprint,
    zarr_module,
)
from wsimil_core.store.maps import StoreMaps

__all__ = ["Bag", "FeatureStore", "STORE_FORMAT", "check_name", "safe_slide_id", "slide_fingerprint"]


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


class FeatureStore(StoreMaps):
    """A cohort's feature store (zarr v3 directory). See the module docstring for the layout.

    The slide groups (opening, validity, listing, atomic replacement) come from
    :class:`~wsimil_core.store.groups.SlideGroups`, the maps from :class:`~wsimil_core.store.maps.StoreMaps`;
    this class reads and writes the features.

    Args:
        root: the store directory.
        create: create the store when it does not exist (an existing store is opened as is). Without it a
            missing directory is a ``StoreError``.
    """

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.root)!r})"

    # ---------------------------------------------------------------------------------------- reading
    def read_coords(self, slide_id: str) -> np.ndarray:
        """``[N, 2]`` int64 level-0 (x, y) coords of the slide's patches."""
        node = self._slide_dir(slide_id) / "coords"

        def read() -> np.ndarray:
            self._require_group(slide_id)
            return self._read_array(node, slide_id)

        return self._consistent([node], read)

    def read_bag(self, slide_id: str, encoder_id: str | None = None) -> Bag:
        """Features, coords and attrs of one slide.

        Args:
            slide_id: the slide group.
            encoder_id: which encoder's features; may be None when the slide has exactly one.

        Raises:
            StoreError: missing/incomplete slide, features of another encoder only, or damaged chunks.
        """
        d = self._slide_dir(slide_id)
        if encoder_id is None:

            def encoders() -> list[str]:
                self._require_group(slide_id)
                return self.encoder_ids(slide_id)

            have = self._consistent([d / "coords"], encoders)
            if len(have) != 1:
                raise StoreError(
                    f"store {self.root}: slide {slide_id!r} has features of {len(have)} encoders {have}; "
                    "say which one (encoder_id / --encoder)"
                )
            encoder_id = have[0]
        enc_id = encoder_id
        return self._consistent(
            [d / "coords", d / "features" / str(enc_id)], lambda: self._read_bag_once(slide_id, enc_id)
        )

    def _read_bag_once(self, slide_id: str, encoder_id: str) -> Bag:
        n = self._require_group(slide_id)
        have = self.encoder_ids(slide_id)
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
        enc_attrs = node_attrs(fnode)
        enc_attrs.pop("complete", None)
        return Bag(
            features=features,
            coords=coords,
            attrs=node_attrs(self.root / slide_id),
            encoder_attrs=enc_attrs,
            slide_id=slide_id,
            encoder_id=encoder_id,
        )

    # ---------------------------------------------------------------------------------------- writing
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
        d = self._writable(self._slide_dir(slide_id))
        check_name(encoder_id, "encoder id", self.root)
        feats, crd = self._check_features(slide_id, features, coords)
        enc = {**attrs_jsonable(encoder_attrs or {}), "encoder_id": encoder_id, "dim": int(feats.shape[1])}

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

        zarr = zarr_module()
        tmp = self._tmp_dir(slide_id)
        try:
            g = zarr.open_group(str(tmp), mode="w", zarr_format=3)
            create_array(g, "coords", crd)
            fg = g.create_group("features")
            create_array(fg, encoder_id, feats, {**enc, "complete": True})
            g.create_group("maps")
            attrs = {"version": wsimil_core.__version__, **attrs_jsonable(slide_attrs)}
            attrs.update({"n_patches": int(crd.shape[0]), "complete": True})
            g.attrs.update(attrs)  # the complete marker is written last
            self._swap_in(tmp, d)
        except BaseException:
            rmtree(tmp)
            raise

    def _add_features(self, slide_id: str, feats: np.ndarray, enc: dict, slide_attrs: dict) -> None:
        zarr = zarr_module()
        d = self.root / slide_id
        fdir = self._require_subgroup(slide_id, "features")  # missing only in a group written without features/
        tmp = self._tmp_dir(f"{slide_id}-{enc['encoder_id']}")
        try:
            g = zarr.open_group(str(tmp), mode="w", zarr_format=3)
            create_array(g, "a", feats, {**enc, "complete": True})
            self._swap_in(tmp / "a", fdir / enc["encoder_id"])
        finally:
            rmtree(tmp)
        new = {k: v for k, v in attrs_jsonable(slide_attrs).items() if k not in ("complete", "n_patches")}
        if new:
            with folder_lock(self.root):  # not while another process replaces the whole group
                g = zarr.open_group(str(d), mode="r+")
                g.attrs.update(new)

    # ---------------------------------------------------------------------------------------- .h5 import
    def import_h5(
        self,
        path: str | os.PathLike | Iterable[str | os.PathLike],
        slide_id: str | None = None,
        encoder_id: str = "h5",
        *,
        overwrite: bool = False,
        progress: bool = False,
        on_error: Callable[[Path, WsimilError], None] | None = None,
        **attrs: Any,
    ) -> list[str]:
        """Import CLAM/TRIDENT-style ``.h5`` feature files (``features`` [N, D] or [1, N, D], ``coords`` [N, 2]).

        Args:
            path: one ``.h5`` file, a directory (all ``*.h5`` in it), or a list of files.
            slide_id: the slide id for a single file (default: a safe version of the file stem).
            encoder_id: the encoder id the features are stored under.
            overwrite: re-import slides that already have complete features of ``encoder_id``.
            progress: show a progress bar.
            on_error: called with ``(file, error)`` for each file that cannot be imported (unreadable, NaN
                features, another grid under the same slide id...); the import then goes on with the next file.
                Without it the first such error is raised.
            **attrs: extra slide attrs (e.g. ``slide_mpp=0.25``).

        Returns:
            The slide ids imported (or already present); files reported to ``on_error`` are left out.
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
            try:
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
            except WsimilError as exc:
                if on_error is None:
                    raise
                on_error(f, exc)
                continue
            ids.append(sid)
        return ids
