"""The one slide-inference pipeline: grid -> features (store cache, else encoder) -> method predictor -> row + maps.

``wsimil predict`` / ``evaluate`` (``predict_store``), AHDMIL's ``predict-slide``, ABMILX's ``abmilx-predict``
and the napari inference dock all call :func:`iter_slide_prediction` (or :func:`predict_slide`, which runs it to
the end) for each slide:

1. **grid**: a slide the store holds (same file, same grid as the checkpoint's) uses the store's coords; else the
   slide file is tiled at the checkpoint's grid (``meta.grid``);
2. **features** (when the predictor ``uses_features``): the store's, when it holds the checkpoint's encoder
   (id, dimension and weights hash checked), else encoded from the pixels with the checkpoint's encoder, built
   once per :class:`LoadedCheckpoint` (``encoder_from_meta``); encoded features can be cached in the store;
3. **predictor**: ``Method.predictor(model, meta)`` of the checkpoint's method (``predictor_for``) gets a
   ``SlideInput`` and returns probabilities and maps aligned with the grid;
4. **row + maps**: ``prediction_row`` and, when the store holds the slide with these coords, the maps are written
   to ``maps/<checkpoint_id>/`` with their specs (``maps_attrs``, ``specs_by_name``).
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from wsimil_core.devices import apply_thread_policy
from wsimil_core.errors import DataError, SlideError, StoreError
from wsimil_core.features.extract import grid_difference, same_slide_file, slide_id_from_path
from wsimil_core.inference.features import (
    CachedFeatures,
    EncodedFeatures,
    StandardizedFeatures,
    grid_from_slide,
    grid_from_store,
    grid_spec_of,
    store_encoder_id,
)
from wsimil_core.inference.loaded import LoadedCheckpoint
from wsimil_core.inference.region import SubsetFeatures, restrict_grid
from wsimil_core.inference.rows import maps_attrs, prediction_row, predictions, specs_by_name, task_outputs
from wsimil_core.methods.predictor import BagPrediction, FeatureSource, SlideInput
from wsimil_core.store.zarr_store import FeatureStore
from wsimil_core.wsi.tiling import PatchGrid, TissueParams


@dataclass
class PipelineOptions:
    """How the pipeline runs a slide.

    Attributes:
        features: ``"auto"`` (the store's features when they fit the checkpoint, else encode the pixels) or
            ``"store"`` (the store's only: a slide without the checkpoint's features is a ``StoreError``).
        check_grid: refuse a store slide tiled on another grid than the checkpoint's (tile the file instead).
        cache_features: write features encoded from pixels into the store (napari's cache).
        write_maps: write the maps into the store when it holds the slide with the same coords.
        chunk_size: with encoded features and a progressive predictor, encode this many patches at a time and
            yield partial maps after the first chunk and then every 25 % more (None: no partial maps).
        batch_size, num_workers: encoder batch and patch-reading worker processes.
        slide_mpp: µm per level-0 pixel for slides without mpp; tissue: ``TissueParams`` (None = defaults).
        min_tissue: tissue fraction a grid cell needs, when the checkpoint does not record it.
        progress: progress bars while encoding.
        region: predict only the patches whose centre lies inside these polygons (level-0 ``(x, y)`` rings
            ``[M, 2]`` or polygon ``Annotation`` objects); features and maps of the region are not stored.
    """

    features: str = "auto"
    check_grid: bool = True
    cache_features: bool = False
    write_maps: bool = True
    chunk_size: int | None = None
    batch_size: int = 64
    num_workers: int = 0
    slide_mpp: float | None = None
    tissue: TissueParams | None = None
    min_tissue: float = 0.25
    progress: bool = False
    region: Sequence[Any] | None = None


@dataclass
class Progress:
    """A progress report of :func:`iter_slide_prediction`.

    Attributes:
        stage: ``"grid"``, ``"features"``, ``"predict"``.
        done, total: patches processed so far / in the slide (0 / 0 before the grid is known).
        message: one line for people; grid: the slide's patch grid (once known).
        prediction: a partial prediction on the first ``done`` patches (progressive predictors only), or the
            whole prediction (``done == total``), reported once before the features and maps are written.
    """

    stage: str
    done: int = 0
    total: int = 0
    message: str = ""
    grid: PatchGrid | None = None
    prediction: BagPrediction | None = None


@dataclass
class SlidePrediction:
    """One slide's prediction.

    Attributes:
        slide_id, slide_path, checkpoint_id: what was predicted with what.
        grid: the patch grid (``grid.coords`` int64 ``[N, 2]``); maps: ``{name: float32 [N] or [N, K]}``.
        probs: ``{task: float [C]}`` (empty for a slide without patches); prediction: ``{task: class name}``.
        row: the predictions-table row (``prediction_row``); info: what the predictor reported (e.g. ``keep``,
            ``n_encoded``) plus ``timings`` (seconds per stage, with ``tissue`` and ``total``).
        from_cache: features came from the store; encoder_id: the features' encoder (None: none were read).
        store: the store used (or None); maps_written: the maps are in it; specs: ``{map: MapSpec dict}``.
        messages: notes for people (why the store's features or maps were not used).
    """

    slide_id: str
    slide_path: Path | None
    checkpoint_id: str
    grid: PatchGrid
    maps: dict[str, np.ndarray]
    probs: dict[str, np.ndarray]
    prediction: dict[str, str]
    row: dict[str, Any]
    info: dict[str, Any] = field(default_factory=dict)
    from_cache: bool = False
    encoder_id: str | None = None
    store: str | None = None
    maps_written: bool = False
    specs: dict[str, dict[str, Any]] = field(default_factory=dict)
    messages: list[str] = field(default_factory=list)

    @property
    def coords(self) -> np.ndarray:
        return self.grid.coords

    @property
    def timings(self) -> dict[str, float]:
        return dict(self.info.get("timings") or {})


def _store_slide(
    ckpt: LoadedCheckpoint, fs: FeatureStore | None, sid: str, path: Path | None, opts: PipelineOptions
) -> tuple[bool, str | None]:
    """Whether the store's slide ``sid`` is this slide on the checkpoint's grid, and why not (None: absent)."""
    if fs is None or sid not in fs.slide_ids():
        return False, None
    if path is not None and not same_slide_file(fs, sid, path):
        return False, f"the store's slide {sid!r} comes from another file; its features are not used"
    if opts.check_grid and ckpt.meta.grid is not None:
        diff = grid_difference(fs.slide_attrs(sid), grid_spec_of(ckpt.meta, opts.min_tissue, ckpt.source))
        if diff:
            return False, f"the store's slide {sid!r} was tiled differently ({diff}); features are not cached"
    return True, None


def iter_slide_prediction(
    ckpt: LoadedCheckpoint,
    slide_path: str | os.PathLike | None = None,
    *,
    store: FeatureStore | None = None,
    slide_id: str | None = None,
    options: PipelineOptions | None = None,
) -> Generator[Progress, None, SlidePrediction]:
    """Predict one slide (see the module docstring), yielding :class:`Progress`; returns a :class:`SlidePrediction`.

    Give the slide file (``slide_path``), a store slide (``store`` + ``slide_id``; the file is then the store's
    ``slide_path`` attr when the predictor reads pixels), or both.

    Raises:
        StoreError, SlideError, CheckpointError, DataError: one clear message naming the slide or file.
    """
    opts = options or PipelineOptions()
    apply_thread_policy(opts.num_workers)
    meta, source = ckpt.meta, ckpt.source
    pred_fn = ckpt.predictor
    t_start = time.perf_counter()
    path = Path(slide_path) if slide_path is not None else None
    if slide_id is None and path is None:
        raise DataError("iter_slide_prediction: give a slide file or a store slide id")
    sid = slide_id or slide_id_from_path(path)  # type: ignore[arg-type]
    messages: list[str] = []

    # 1. grid
    in_store, why = _store_slide(ckpt, store, sid, path, opts)
    if why:
        messages.append(why)
    new_attrs: dict[str, Any] = {}
    if in_store:
        grid = grid_from_store(store, sid)  # type: ignore[arg-type]
        if path is None and store.slide_attrs(sid).get("slide_path"):  # type: ignore[union-attr]
            path = Path(str(store.slide_attrs(sid)["slide_path"]))  # type: ignore[union-attr]
    else:
        if opts.features == "store":
            raise StoreError(f"store {getattr(store, 'root', store)}: slide {sid!r} is not in the store")
        if path is None:
            raise SlideError(f"slide {sid!r}: not in the store and no slide file given")
        yield Progress("grid", message=f"{path.name}: detecting tissue")
        spec = grid_spec_of(meta, opts.min_tissue, source)
        grid, new_attrs = grid_from_slide(path, spec, opts.tissue, opts.slide_mpp)
        if len(grid.coords) == 0:
            raise SlideError(f"{path}: no tissue patch on the checkpoint's grid ({spec.patch} px at {spec.mpp} µm/px)")
    subset = None
    if opts.region is not None:  # the region's patches only (features of the store's bag: its rows ``subset``)
        grid, subset = restrict_grid(grid, opts.region, str(path or sid))
        messages.append(f"region: {len(subset)} patches inside it; features and maps are not stored")
    n = int(len(grid.coords))
    t_grid = time.perf_counter() - t_start

    # 2. features
    features: CachedFeatures | SubsetFeatures | EncodedFeatures | None = None
    if pred_fn.uses_features:
        enc_id = None
        if in_store:
            try:
                enc_id = store_encoder_id(store, sid, meta, source)  # type: ignore[arg-type]
            except StoreError:
                if opts.features == "store":
                    raise
        if enc_id is not None:
            features = CachedFeatures(store, sid, enc_id, meta, source)  # type: ignore[arg-type]
            features = features if subset is None else SubsetFeatures(features, subset)
        else:
            if path is None:
                raise SlideError(f"slide {sid!r}: the store has no path to its slide file, so it cannot be encoded")
            features = EncodedFeatures(
                path, grid, ckpt.encoder, opts.batch_size, opts.num_workers, opts.slide_mpp, opts.progress
            )
    if pred_fn.reads_pixels and (path is None or not path.is_file()):
        raise SlideError(
            f"slide {sid!r}: the {meta.method} predictor reads the slide's pixels, but its file "
            f"{path or '(not recorded in the store)'} is not found"
        )
    model_input: FeatureSource | None = features
    if features is not None and meta.feature_stats is not None:
        model_input = StandardizedFeatures(features, meta.feature_stats, source)
    slide = SlideInput(
        sid,
        path,
        grid,
        model_input,
        meta,
        ckpt.device,
        opts.slide_mpp,
        opts.batch_size,
        opts.num_workers,
        opts.progress,
    )

    # 3. predictor (progressively while encoding, for previews)
    if n == 0:
        warnings.warn(f"slide {sid!r} has no patches: no prediction, no maps", stacklevel=2)
        pred = BagPrediction(probs={})
    else:
        if isinstance(features, EncodedFeatures) and opts.chunk_size and pred_fn.progressive:
            chunk, next_preview = int(opts.chunk_size), int(opts.chunk_size)
            yield Progress("features", 0, n, f"{n} patches to encode", grid)
            for start in range(0, n, chunk):
                stop = min(n, start + chunk)
                features(np.arange(start, stop))
                if stop >= n:
                    break
                partial = None
                if stop >= next_preview:
                    partial = pred_fn(slide.head(stop))
                    next_preview = max(stop + chunk, int(stop * 1.25))
                yield Progress("features", stop, n, f"encoded {stop}/{n} patches", grid, partial)
        else:
            what = "cached features" if isinstance(features, (CachedFeatures, SubsetFeatures)) else "predicting"
            yield Progress("predict", 0, n, f"{what} ({n} patches)" if features is not None else what, grid)
        pred = pred_fn(slide)
        # float32 arrays once: the report below and the returned SlidePrediction share them, so a viewer that
        # shows this report's maps can tell the final ones are the same arrays
        pred = replace(pred, maps={k: np.asarray(v, dtype=np.float32) for k, v in pred.maps.items()})
        # the whole prediction, before the writes below (features cache, maps): a viewer shows it at once
        yield Progress("predict", n, n, f"predicted {n} patches", grid, pred)

    # 4. cache, row, maps
    fs = store
    cache = opts.cache_features and subset is None
    if isinstance(features, EncodedFeatures) and cache and fs is not None and why is None:
        if features.complete:
            try:
                features.write_to(fs, sid, {} if in_store else new_attrs)
            except StoreError as exc:
                messages.append(f"features not cached: {exc}")
    info = dict(pred.info)
    timings = {"tissue": t_grid, **(info.get("timings") or {})}
    timings["total"] = time.perf_counter() - t_start
    info["timings"] = timings
    if isinstance(features, EncodedFeatures):
        info.setdefault("n_encoded", features.n_encoded)
    encoder_id = info.pop("encoder_id", None) or (features.encoder_id if features is not None else None)
    probs = task_outputs(meta, pred.probs, pred.logits)
    row = prediction_row(meta, sid, n, probs or None, info.get("row"))
    specs = specs_by_name(ckpt.map_specs, list(pred.maps))
    written = False
    maps_fit = fs is not None and sid in fs.slide_ids() and np.array_equal(fs.read_coords(sid), grid.coords)
    if opts.write_maps and fs is not None and n > 0 and subset is None:
        if maps_fit:
            attrs = maps_attrs(meta, source, probs, encoder_id, info.get("attrs"))
            fs.write_maps(sid, ckpt.checkpoint_id, pred.maps, attrs, specs=specs or None)
            written = True
        else:
            messages.append("maps not written to the store (its slide has other patches)")
    return SlidePrediction(
        slide_id=sid,
        slide_path=path,
        checkpoint_id=ckpt.checkpoint_id,
        grid=grid,
        maps=pred.maps,  # float32 arrays since step 3 (empty without patches)
        probs=probs,
        prediction=predictions(meta, probs),
        row=row,
        info=info,
        from_cache=isinstance(features, (CachedFeatures, SubsetFeatures)),
        encoder_id=encoder_id,
        store=None if fs is None else str(fs.root),
        maps_written=written,
        specs=specs,
        messages=messages,
    )


def predict_slide(
    ckpt: LoadedCheckpoint,
    slide_path: str | os.PathLike | None = None,
    *,
    store: FeatureStore | None = None,
    slide_id: str | None = None,
    options: PipelineOptions | None = None,
    on_progress: Callable[[Progress], None] | None = None,
) -> SlidePrediction:
    """:func:`iter_slide_prediction` run to the end (``on_progress`` sees every report)."""
    gen = iter_slide_prediction(ckpt, slide_path, store=store, slide_id=slide_id, options=options)
    while True:
        try:
            report = next(gen)
        except StopIteration as stop:
            return stop.value
        if on_progress is not None:
            on_progress(report)


__all__ = [
    "PipelineOptions",
    "Progress",
    "SlidePrediction",
    "iter_slide_prediction",
    "predict_slide",
]
