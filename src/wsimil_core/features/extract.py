"""Batched, resumable patch-feature extraction into the feature store.

Per slide: tissue mask -> patch grid -> batches of patches read with ``Slide.read_patch`` by ``DataLoader`` worker
processes (each opens its own slide handle) -> the encoder on batches (CUDA + float16 autocast when present,
float32 on the CPU) -> features cast to float16 (or float32) -> ``FeatureStore.write_bag``, which writes the
slide's group atomically. One DataLoader serves the whole run (``stream``): its workers start once and read the
next slide's first batches while this slide's last ones are encoded.

Resuming: a slide whose group already holds complete features for this ``encoder_id`` is skipped, so an
interrupted run re-run with the same arguments finishes the remaining slides and ends in the same store as an
uninterrupted run. A slide that fails (missing, corrupt, no mpp...) is reported by name and the run continues;
:class:`ExtractSummary` lists what happened and the CLI exits non-zero when any slide failed.

Modules: ``patches`` (reading and encoding one slide's patches), ``slide_step`` (the per-slide steps and their
checks), ``stream`` (the cohort's patches through one DataLoader) and this one (the cohort driver); the public
names of ``patches`` and ``slide_step`` are importable from here too.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from wsimil_core.devices import apply_thread_policy, resolve_device
from wsimil_core.errors import ConfigError
from wsimil_core.features.encoders import EncoderSpec, create_encoder
from wsimil_core.features.patches import PatchDataset, encode_slide_patches
from wsimil_core.features.slide_step import (
    NoTissueWarning,
    PreparedSlide,
    check_store_grid,
    failure_line,
    grid_difference,
    prepare_slide,
    same_slide_file,
    slide_group_attrs,
    to_store_dtype,
    write_slide,
)
from wsimil_core.features.stream import iter_cohort_features
from wsimil_core.store.layout import slide_id_from_path
from wsimil_core.store.verify import repair_store, verify_slide
from wsimil_core.store.zarr_store import FeatureStore

__all__ = [
    "ExtractSummary",
    "NoTissueWarning",
    "PatchDataset",
    "encode_slide_patches",
    "extract_cohort",
    "grid_difference",
    "open_store",
    "plan_extraction",
    "same_slide_file",
    "slide_group_attrs",
    "slide_id_from_path",
    "to_store_dtype",
]

log = logging.getLogger(__name__)


@dataclass
class ExtractSummary:
    """What :func:`extract_cohort` did.

    Attributes:
        encoder_id: the ``features/<encoder_id>`` key written.
        done: slide ids extracted in this run.
        skipped: slide ids already complete in the store (not recomputed).
        empty: slide ids with zero tissue patches (warned about, nothing written).
        failed: ``{slide file name: one-line error}`` for slides that could not be extracted.
        repaired: ``{slide id: problems}`` of finished slides found damaged by ``verify=True``; their damaged
            parts were removed (a slide with damaged coords or features is then extracted again).
        n_patches: patches encoded in this run.
        stopped: the run stopped at its first failure (``fail_fast``); the slides after it were not tried.
    """

    encoder_id: str
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    empty: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    repaired: dict[str, str] = field(default_factory=dict)
    redone: list[str] = field(default_factory=list)
    n_patches: int = 0
    stopped: bool = False

    @property
    def ok(self) -> bool:
        return not self.failed

    def lines(self) -> list[str]:
        """Human-readable summary, one line per fact."""
        out = [f"extracted {len(self.done)} slide(s), {self.n_patches} patches, features/{self.encoder_id}"]
        if self.skipped:
            out.append(f"skipped {len(self.skipped)} already done")
        if self.redone:
            out.append(f"redid {len(self.redone)} damaged slide(s): {', '.join(self.redone)}")
        maps_only = [s for s in self.repaired if s not in self.redone]
        if maps_only:
            out.append(f"removed damaged maps of {', '.join(maps_only)} (re-run predict to redo them)")
        if self.empty:
            out.append(f"skipped {len(self.empty)} without tissue: {', '.join(self.empty)}")
        for name, err in self.failed.items():
            out.append(f"FAILED {name}: {err}")
        if self.stopped:
            out.append("stopped at the first failure (fail-fast); the slides after it were not tried")
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())


def open_store(store: Any) -> Any:
    """``store`` as a ``FeatureStore``: as is, or the directory opened (created when missing)."""
    if isinstance(store, FeatureStore):
        return store
    return FeatureStore(Path(store), create=True)


def extract_cohort(
    slides: Sequence[str | Path],
    store: Any,
    encoder_name: str,
    grid_spec: Any,
    tissue_params: Any,
    weights: str | Path | None = None,
    device: str = "auto",
    batch_size: int = 64,
    num_workers: int = 2,
    *,
    dtype: str = "float16",
    slide_mpp: float | None = None,
    backend: str = "auto",
    amp: bool = True,
    progress: bool = True,
    encoder: tuple[nn.Module, EncoderSpec] | None = None,
    on_slide_done: Callable[[str], None] | None = None,
    verify: bool = False,
    fail_fast: bool = False,
) -> ExtractSummary:
    """Extract features of ``slides`` into ``store`` (resumable; one atomic group write per slide).

    Args:
        slides: slide files; their ids in the store are :func:`slide_id_from_path` (must be unique).
        store: a ``FeatureStore`` or a directory (created when missing).
        encoder_name: see :func:`wsimil_core.features.encoders.create_encoder`.
        grid_spec: ``tiling.GridSpec`` (patch mpp, size, stride, min tissue fraction).
        tissue_params: ``tiling.TissueParams``.
        weights: local weights file of the encoder (None = random init, with a loud warning).
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``...
        batch_size, num_workers: DataLoader settings (workers read patches in their own processes).
        dtype: ``"float16"`` (default) or ``"float32"`` features in the store.
        slide_mpp: µm per level-0 pixel for slides without mpp metadata.
        backend: slide reader backend (``"auto"``, ``"openslide"``, ``"tifffile"``).
        amp: float16 autocast on CUDA.
        progress: tqdm bars (overall and per slide).
        encoder: an already built ``(module, spec)`` (then ``encoder_name``/``weights`` are not used).
        on_slide_done: called with each slide id right after its group is written (progress hooks, tests).
        verify: read every chunk of finished slides before skipping them (``store.verify``); damaged parts are
            removed and the slide extracted again. Off by default: it reads the whole store.
        fail_fast: stop at the first slide that fails (``summary.stopped``); by default every slide is tried.

    Returns:
        ExtractSummary. Per-slide failures are collected, not raised; a store tiled with another grid raises
        ``StoreError`` before any work.
    """
    if dtype not in ("float16", "float32"):
        raise ConfigError(f"dtype must be 'float16' or 'float32', got {dtype!r}")
    paths = [Path(p) for p in slides]
    ids = [slide_id_from_path(p) for p in paths]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise ConfigError(f"several slides map to the same store id(s) {dupes}; rename them")
    fs = open_store(store)
    check_store_grid(fs, ids, grid_spec)

    if encoder is None:
        model, spec = create_encoder(encoder_name, weights=weights, device=resolve_device(device))
    else:
        model, spec = encoder
    apply_thread_policy(num_workers)
    summary = ExtractSummary(encoder_id=spec.encoder_id)
    todo = plan_extraction(fs, paths, ids, summary, progress=progress, verify=verify, fail_fast=fail_fast)

    def prepare(path: Path, sid: str) -> PreparedSlide:
        return prepare_slide(path, sid, fs, grid_spec, tissue_params, slide_mpp=slide_mpp, backend=backend)

    stream = iter_cohort_features(
        todo,
        prepare,
        model,
        spec,
        batch_size=batch_size,
        num_workers=num_workers,
        amp=amp,
        slide_mpp=slide_mpp,
        backend=backend,
        progress=progress,
    )
    overall = tqdm(total=len(todo), desc="slides", unit="slide", disable=not progress)
    try:
        for item in stream:
            overall.set_postfix_str(item.sid)
            try:
                if item.error is not None:
                    raise item.error
                assert item.prepared is not None and item.features is not None
                n = write_slide(item.prepared, item.features, fs, spec, dtype) if len(item.features) else 0
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as exc:  # noqa: BLE001 - one bad slide never stops the cohort
                line = failure_line(exc)
                log.debug("%s: traceback", item.path.name, exc_info=True)
                summary.failed[item.path.name] = line
                log.error("%s: extraction failed: %s", item.path.name, line)
                if progress:
                    tqdm.write(f"FAILED {item.path.name}: {line}")
                overall.update(1)
                if fail_fast:
                    summary.stopped = True
                    break
                continue
            overall.update(1)
            if n == 0:
                summary.empty.append(item.sid)
                continue
            summary.done.append(item.sid)
            summary.n_patches += n
            if on_slide_done is not None:
                on_slide_done(item.sid)
    finally:
        stream.close()  # stops the DataLoader workers, also on an early stop or an exception
        overall.close()
    return summary


def plan_extraction(
    fs: Any,
    paths: Sequence[Path],
    ids: Sequence[str],
    summary: ExtractSummary,
    *,
    progress: bool,
    verify: bool = False,
    fail_fast: bool = False,
) -> list[tuple[Path, str]]:
    """The ``(path, slide_id)`` pairs still to extract. Slides complete in the store for ``summary.encoder_id``
    go to ``summary.skipped``; a complete slide made from another file goes to ``summary.failed`` (with
    ``fail_fast`` nothing is left to do then, and ``summary.stopped`` is set). With ``verify``, a complete slide is
    first read whole (:func:`~wsimil_core.store.verify.verify_slide`): its damaged parts are removed
    (``summary.repaired``) and, when coords or features were damaged, it is extracted again (``summary.redone``).
    Shared by :func:`extract_cohort` and ``extract_cohort_distributed`` (same resuming)."""
    todo = []
    for path, sid in zip(paths, ids):
        if not fs.has_bag(sid, summary.encoder_id):
            todo.append((path, sid))
        elif not same_slide_file(fs, sid, path):
            summary.failed[path.name] = (
                f"{Path(str(fs.root)) / sid}: the store's slide {sid!r} was made from another file than {path}; "
                "rename the slide or use another --store"
            )
        elif verify and (damage := verify_slide(fs, sid)) is not None:
            summary.repaired[sid] = "; ".join(damage.problems)
            repair_store(fs, [damage])
            log.warning("%s: damaged (%s); removed the damaged parts", sid, summary.repaired[sid])
            if progress:
                tqdm.write(f"DAMAGED {sid}: {summary.repaired[sid]}")
            if fs.has_bag(sid, summary.encoder_id):
                summary.skipped.append(sid)  # only its maps were damaged
            else:
                summary.redone.append(sid)
                todo.append((path, sid))
        else:
            summary.skipped.append(sid)
    if fail_fast and summary.failed:
        summary.stopped = True
        return []
    if summary.skipped:
        msg = f"skipped {len(summary.skipped)} already done (features/{summary.encoder_id})"
        log.info(msg)
        if progress:
            tqdm.write(msg)
    return todo
