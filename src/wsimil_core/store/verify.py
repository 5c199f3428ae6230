"""Deep verification of a feature store: read and decode every chunk, check shapes, counts and values.

The store's everyday validity checks (``SlideGroups.problems``, ``has_bag``, ``slide_ids``) only read ``zarr.json``
files and stat chunk files, so they are fast but cannot see a chunk whose bytes were truncated or flipped after it
was written (a failing disk, a bad copy). Every chunk is written with a CRC32C checksum and zstd; reading it
through zarr decodes and checks it, which is what :func:`verify_slide` does for every array of a slide:

* the slide group: complete, coords ``int64 [N, 2]`` with ``N == n_patches``, every coords chunk readable;
* each ``features/<encoder_id>``: complete, ``[N, D]`` with ``D == attrs["dim"]``, every chunk readable, finite;
* each ``maps/<checkpoint_id>``: complete, each array ``[N]`` or ``[N, K]``, every chunk readable.

A damaged part is reported with the node to remove so that the writer redoes it: the whole slide when its group
or coords are damaged, ``features/<encoder_id>`` (redone on the kept coords by the next extract or import) or
``maps/<checkpoint_id>`` (redone by the next predict). :func:`repair_store` removes them atomically.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from wsimil_core.store.groups import SlideGroups
from wsimil_core.store.layout import array_ok, is_name, read_meta, rmtree, zarr_module

__all__ = ["SlideDamage", "describe", "repair_store", "store_slide_groups", "verify_slide", "verify_store"]


@dataclass
class SlideDamage:
    """What is damaged in one slide group.

    Attributes:
        slide_id: the slide group.
        problems: one human-readable line per damaged part (``"features 'e': cannot read chunk ..."``).
        remove: the nodes to remove, relative to the slide group: ``""`` (the whole slide),
            ``"features/<encoder_id>"`` or ``"maps/<checkpoint_id>"``.
    """

    slide_id: str
    problems: list[str] = field(default_factory=list)
    remove: list[str] = field(default_factory=list)

    @property
    def whole(self) -> bool:
        """True when the whole slide group must be redone (its group or coords are damaged)."""
        return "" in self.remove

    def lines(self) -> list[str]:
        return [f"{self.slide_id}: {p}" for p in self.problems]


def _read_all(node: Path, *, finite: bool = False) -> tuple[tuple[int, ...] | None, str | None]:
    """Read the array at ``node`` one chunk row-block at a time (memory stays one block).

    Returns:
        ``(shape, None)`` when every chunk decodes (and, with ``finite``, holds no NaN/inf), else
        ``(shape or None, reason)``.
    """
    try:
        arr = zarr_module().open_array(str(node), mode="r")
    except Exception as exc:  # noqa: BLE001 - unreadable metadata of a damaged node
        return None, f"cannot open ({type(exc).__name__}: {exc})"
    shape = tuple(int(s) for s in arr.shape)
    step = max(1, int(arr.chunks[0])) if arr.ndim else 1
    rows = shape[0] if shape else 1
    for start in range(0, max(rows, 1), step):
        try:
            block = np.asarray(arr[start : start + step] if arr.ndim else arr[...])
        except Exception as exc:  # noqa: BLE001 - codec / checksum / IO errors of a damaged chunk
            return shape, f"cannot read rows {start}-{min(start + step, rows) - 1} ({type(exc).__name__}: {exc})"
        if finite and block.size and np.issubdtype(block.dtype, np.floating) and not np.isfinite(block).all():
            return shape, f"rows {start}-{min(start + step, rows) - 1} hold NaN or infinite values"
    return shape, None


def _entries(folder: Path) -> list[str]:
    """Safe child names of a group folder (sorted; hidden and zarr files left out)."""
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and is_name(p.name))


def _check_features(node: Path, encoder_id: str, n: int) -> str | None:
    meta = read_meta(node)
    if not meta or meta.get("node_type") != "array":
        return f"features {encoder_id!r}: zarr.json is missing or unreadable"
    if not array_ok(node, ndim=2, rows=n, need_complete=True):
        return f"features {encoder_id!r}: incomplete, a chunk file is missing, or not [N={n}, D]"
    shape, why = _read_all(node, finite=True)
    if why:
        return f"features {encoder_id!r}: {why}"
    dim = meta.get("attributes", {}).get("dim")
    if shape is not None and dim is not None and int(dim) != shape[1]:
        return f"features {encoder_id!r}: shape {list(shape)} but attrs say dim={dim}"
    return None


def _check_maps(node: Path, checkpoint_id: str, n: int) -> str | None:
    meta = read_meta(node)
    attrs = (meta or {}).get("attributes", {})
    if not meta or not attrs.get("complete") or not isinstance(attrs.get("arrays"), dict):
        return f"maps {checkpoint_id!r}: incomplete (interrupted write) or zarr.json unreadable"
    for key, name in attrs["arrays"].items():
        if not is_name(key) or not array_ok(node / key, rows=n):
            return f"maps {checkpoint_id!r}: map {name!r} is missing, has a missing chunk, or does not have N={n} rows"
        shape, why = _read_all(node / key)
        if why:
            return f"maps {checkpoint_id!r}: map {name!r}: {why}"
        if shape is None or len(shape) not in (1, 2):
            return f"maps {checkpoint_id!r}: map {name!r} has shape {shape}, expected [N] or [N, K]"
    return None


def verify_slide(store: SlideGroups, slide_id: str) -> SlideDamage | None:
    """Read every chunk of one slide group and check it (see the module docstring).

    Args:
        store: a ``FeatureStore``.
        slide_id: a slide group that exists in the store.

    Returns:
        None when the slide is healthy, else the :class:`SlideDamage`.
    """
    d = store.root / slide_id
    damage = SlideDamage(slide_id)
    n = store._group_n(slide_id)
    if n is None:
        reasons = "; ".join(store.problems(slide_id)) or "the slide group is invalid"
        damage.problems.append(f"slide group: {reasons}")
        damage.remove.append("")
        return damage
    shape, why = _read_all(d / "coords")
    if why or shape != (n, 2):
        damage.problems.append(f"coords: {why or f'shape {shape}, expected [{n}, 2]'}")
        damage.remove.append("")
        return damage
    for enc in _entries(d / "features"):
        problem = _check_features(d / "features" / enc, enc, n)
        if problem:
            damage.problems.append(problem)
            damage.remove.append(f"features/{enc}")
    for ckpt in _entries(d / "maps"):
        problem = _check_maps(d / "maps" / ckpt, ckpt, n)
        if problem:
            damage.problems.append(problem)
            damage.remove.append(f"maps/{ckpt}")
    return damage if damage.problems else None


def store_slide_groups(store: SlideGroups) -> list[str]:
    """Every slide group of the store, complete or not (folders with a safe name and a ``zarr.json``)."""
    return [
        p.name for p in sorted(store.root.iterdir()) if p.is_dir() and is_name(p.name) and (p / "zarr.json").exists()
    ]


def verify_store(
    store: SlideGroups, slide_ids: Sequence[str] | None = None, *, progress: bool = False
) -> list[SlideDamage]:
    """:func:`verify_slide` on every slide group (or on ``slide_ids``); the damaged ones in slide order."""
    ids = list(slide_ids) if slide_ids is not None else store_slide_groups(store)
    it: Iterable[str] = ids
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(ids, desc="verify", unit="slide")
    out = []
    for sid in it:
        damage = verify_slide(store, sid)
        if damage is not None:
            out.append(damage)
    return out


def repair_store(store: SlideGroups, damages: Iterable[SlideDamage]) -> list[str]:
    """Remove the damaged nodes (each moved aside atomically, then deleted) so the writers redo them.

    Returns:
        The removed nodes relative to the store root (``"s1"``, ``"s1/features/e"``, ``"s1/maps/ck"``).
    """
    removed: list[str] = []
    for damage in damages:
        if damage.whole:
            store.remove_slide(damage.slide_id)
            removed.append(damage.slide_id)
            continue
        for rel in damage.remove:
            node = store.root / damage.slide_id / rel
            if node.exists():
                trash = store._tmp_dir(f"old-{damage.slide_id}-{node.name}")
                os.rename(node, trash)
                rmtree(trash)
            removed.append(f"{damage.slide_id}/{rel}")
    return removed


def describe(damages: Sequence[SlideDamage]) -> list[str]:
    """One line per damaged part of each slide."""
    return [line for d in damages for line in d.lines()]
