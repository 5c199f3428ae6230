"""Inference on one slide for the plugin (no Qt): a generator of progressive updates.

:func:`run_inference` yields :class:`InferenceUpdate` objects while it works and returns an
:class:`InferenceResult`; the dock widget runs it in a napari ``thread_worker`` (Cancel = ``worker.quit()``, which
stops the generator at its next ``yield``) and :func:`infer_slide` runs it headless.

It is a thin wrapper over wsimil_core's one inference pipeline (``wsimil_core.api.iter_slide_prediction``):

1. load the checkpoint and its method's predictor on the chosen device (kept for the next run with the same
   file: :data:`LOADED_CHECKPOINT`);
2. choose the store: the checkpoint's **training store** when it holds this slide with the checkpoint's features
   (no re-extraction), else the dock's cache store (or none);
3. **cached features** when that store holds this slide (same file, same patch grid) with features of the
   checkpoint's encoder: the whole bag is predicted at once;
4. **otherwise** the slide is tiled at the checkpoint's grid and its patches are encoded chunk by chunk with the
   checkpoint's encoder; after the first chunk, and then whenever 25 % more patches are encoded, the model is run
   on the patches encoded so far, so heatmaps appear and sharpen progressively (a progress update without maps
   follows every chunk, so Cancel answers quickly). The features are then cached in the store, so the next run
   is instant;
5. the final maps are written to the store (``maps/<checkpoint_id>/``, with their map specs) like
   ``wsimil predict`` does.

Partial maps are exact for the bag seen so far (attention is normalised over the encoded patches); the final
update is the model's output on the whole slide.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from napari_wsimil._grid import GridGeometry
from wsimil_core.errors import ConfigError

DEVICES = ("auto", "cpu", "cuda")


@dataclass
class InferenceRequest:
    """What to run.

    Attributes:
        checkpoint: ``*.safetensors`` checkpoint.
        slide_path: the slide file.
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
        store: feature store directory used as a cache (features are read from / written to it, and the maps
            are written to it); None = no cache.
        slide_mpp: µm per level-0 pixel for slides without mpp metadata.
        encoder_weights: local weights file of the checkpoint's encoder (default: the path recorded in the
            checkpoint, when it exists); needed for on-the-fly extraction unless the encoder was random-init.
        chunk_size: patches encoded between two progressive updates.
        batch_size: patches per encoder forward pass.
        min_tissue: tissue fraction a grid cell needs to be kept.
        write_maps: write the final maps into the store.
        use_training_store: use the checkpoint's training store when it holds this slide (no re-extraction).
        region: level-0 ``(x, y)`` polygon rings ``[M, 2]``: predict only the patches whose centre lies inside
            (None: the whole slide); the region's features and maps are not stored.
    """

    checkpoint: str | os.PathLike
    slide_path: str | os.PathLike
    device: str = "auto"
    store: str | os.PathLike | None = None
    slide_mpp: float | None = None
    encoder_weights: str | os.PathLike | None = None
    chunk_size: int = 256
    batch_size: int = 32
    min_tissue: float = 0.25
    write_maps: bool = True
    use_training_store: bool = True
    region: list[np.ndarray] | None = None

    def __post_init__(self) -> None:
        if self.device not in DEVICES and not str(self.device).startswith("cuda:"):
            raise ConfigError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if int(self.chunk_size) < 1 or int(self.batch_size) < 1:
            raise ConfigError("chunk_size and batch_size must be >= 1")
        if not 0.0 <= float(self.min_tissue) <= 1.0:
            raise ConfigError(f"min_tissue must be in [0, 1], got {self.min_tissue!r}")


@dataclass
class InferenceUpdate:
    """A progress report; ``maps`` (when not None) cover the first ``done`` patches of ``coords``.

    Attributes:
        stage: ``"load"``, ``"tiling"``, ``"features"``, ``"predict"`` or ``"done"``.
        done, total: patches processed so far / in the slide (0 / 0 before tiling).
        message: one human-readable line.
        coords: int64 ``[N, 2]`` level-0 (x, y) of every patch (once known).
        geometry: the patch grid geometry (once known).
        maps: ``{name: float32 [done] or [done, K]}``, partial until ``final``.
        probs: ``{task: {class name: probability}}`` of the bag seen so far.
        final: True for the last update (whole slide).
        specs: ``{name: MapSpec dict}`` of the maps the model declares (empty when it declares none).
    """

    stage: str
    done: int = 0
    total: int = 0
    message: str = ""
    coords: np.ndarray | None = None
    geometry: GridGeometry | None = None
    maps: dict[str, np.ndarray] | None = None
    probs: dict[str, dict[str, float]] | None = None
    final: bool = False
    specs: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class InferenceResult:
    """The outcome of :func:`run_inference`.

    Attributes:
        slide_id, slide_path, checkpoint_id: what was predicted with what.
        coords: int64 ``[N, 2]``; geometry: the grid geometry.
        maps: ``{name: float32 [N] or [N, K]}``; specs: ``{name: MapSpec dict}`` of the maps the model declares.
        probs: ``{task: {class: probability}}``; prediction: ``{task: class name}`` (binary tasks use the
            checkpoint's threshold).
        from_cache: features came from the store.
        store: the store directory used (or None).
        meta: the checkpoint's ``CheckpointMeta``.
        messages: notes for the user (e.g. why features were not cached).
    """

    slide_id: str
    slide_path: str
    checkpoint_id: str
    coords: np.ndarray
    geometry: GridGeometry
    maps: dict[str, np.ndarray]
    probs: dict[str, dict[str, float]]
    prediction: dict[str, str]
    from_cache: bool
    store: str | None = None
    meta: Any = field(default=None, repr=False)
    specs: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)
    messages: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------------------
def preload(encoder_name: str | None = None) -> None:
    """Import the heavy libraries inference needs, on the calling (GUI) thread.

    Importing torch's optional C extensions (torchvision -> torch._dynamo -> triton) inside a running napari can
    crash the process, so the widget calls this on the GUI thread before starting its worker, with triton made
    unimportable (set ``WSIMIL_ALLOW_TRITON=1`` to keep it).
    """
    import sys

    if "triton" not in sys.modules and not os.environ.get("WSIMIL_ALLOW_TRITON"):
        # triton bundles its own LLVM; loading it after an OpenGL driver that uses LLVM (Mesa llvmpipe) segfaults.
        # Inference never compiles kernels, so inside the GUI torch is told that triton is absent.
        sys.modules["triton"] = None  # type: ignore[assignment]
    import torch  # noqa: F401
    import torchvision  # noqa: F401

    # wsimil_core.api resolves names on first access: these two import the pipeline, the encoders, the readers
    # and every model and method.
    from wsimil_core.api import iter_slide_prediction, load_predictor  # noqa: F401

    if encoder_name and ("timm" in encoder_name or "levit" in encoder_name):
        import timm  # noqa: F401


class CheckpointCache:
    """The checkpoint of the last run, kept loaded for the next one: a run on another slide with the same file
    (unchanged: same size and modification time), device and encoder weights skips reading the checkpoint, building
    the model and, for slides without cached features, building the encoder. One entry: loading another checkpoint
    frees the previous one."""

    def __init__(self) -> None:
        self._key: tuple[Any, ...] | None = None
        self._loaded: Any = None
        self._lock = threading.Lock()

    def get(self, request: InferenceRequest) -> Any:
        """The ``LoadedCheckpoint`` of ``request`` (loaded now, or the one kept from the last run)."""
        from wsimil_core.api import load_predictor

        path = Path(request.checkpoint)
        try:
            st = path.stat()
        except OSError:  # missing or unreadable: loading it gives the clear CheckpointError
            return load_predictor(request.checkpoint, request.device, encoder_weights=request.encoder_weights)
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns, str(request.device), str(request.encoder_weights))
        with self._lock:
            if self._key != key:
                self._key = self._loaded = None  # free the previous model before loading the next
                self._loaded = load_predictor(
                    request.checkpoint, request.device, encoder_weights=request.encoder_weights
                )
                self._key = key
            return self._loaded

    def clear(self) -> None:
        """Forget the kept checkpoint (the next run loads its file again)."""
        with self._lock:
            self._key = self._loaded = None


#: the plugin's checkpoint kept between runs (every inference dock shares it)
LOADED_CHECKPOINT = CheckpointCache()


def _stores(request: InferenceRequest, meta: Any, slide_path: Path) -> tuple[Any, list[str]]:
    """The store to use: the checkpoint's training store when it holds this slide, else the request's cache."""
    from wsimil_core.api import FeatureStore, slide_id_from_path, training_store

    trained = training_store(meta, slide_id_from_path(slide_path), slide_path) if request.use_training_store else None
    if trained is not None:
        return trained, [f"features from the checkpoint's training store {trained.root}"]
    if request.store is None:
        return None, []
    return FeatureStore(request.store, create=True), []


def run_inference(
    request: InferenceRequest,
) -> Generator[InferenceUpdate, None, InferenceResult]:
    """Run a checkpoint on one slide, yielding progress (see the module docstring).

    Raises:
        CheckpointError, SlideError, StoreError, DataError: bad inputs, with a message naming the file.
    """
    from wsimil_core.api import (
        PipelineOptions,
        class_probabilities,
        iter_slide_prediction,
        specs_by_name,
        survival_tasks,
    )

    slide_path = Path(request.slide_path)
    yield InferenceUpdate("load", message=f"loading {Path(request.checkpoint).name}")
    ckpt = LOADED_CHECKPOINT.get(request)
    meta = ckpt.meta
    fs, messages = _stores(request, meta, slide_path)
    options = PipelineOptions(
        features="auto",
        cache_features=True,
        write_maps=request.write_maps,
        chunk_size=int(request.chunk_size),
        batch_size=int(request.batch_size),
        slide_mpp=request.slide_mpp,
        min_tissue=float(request.min_tissue),
        region=request.region,
    )
    gen = iter_slide_prediction(ckpt, slide_path, store=fs, options=options)
    geometry = coords = None
    try:
        while True:
            try:
                report = next(gen)
            except StopIteration as stop:
                result = stop.value
                break
            if report.grid is not None and geometry is None:
                coords = np.asarray(report.grid.coords, dtype=np.int64)
                geometry = GridGeometry.from_patch_grid(report.grid)
            maps = probs = None
            specs: dict[str, dict[str, Any]] = {}
            if report.prediction is not None:
                maps = {k: np.asarray(v, dtype=np.float32) for k, v in report.prediction.maps.items()}
                surv = survival_tasks(meta)  # a survival curve is shown with the final result only
                probs = {t: v for t, v in class_probabilities(meta, report.prediction.probs).items() if t not in surv}
                specs = specs_by_name(ckpt.map_specs, list(maps))
            stage = "tiling" if report.stage == "grid" else report.stage
            yield InferenceUpdate(
                stage, report.done, report.total, report.message, coords, geometry, maps, probs, specs=specs
            )
    finally:
        gen.close()
    coords = np.asarray(result.coords, dtype=np.int64)
    geometry = GridGeometry.from_patch_grid(result.grid)
    table = class_probabilities(meta, result.probs)
    out = InferenceResult(
        slide_id=result.slide_id,
        slide_path=str(slide_path),
        checkpoint_id=result.checkpoint_id,
        coords=coords,
        geometry=geometry,
        maps=result.maps,
        probs=table,
        prediction=result.prediction,
        from_cache=result.from_cache,
        store=result.store,
        meta=meta,
        specs=result.specs,
        messages=messages + result.messages,
    )
    n = len(coords)
    yield InferenceUpdate("done", n, n, "done", coords, geometry, result.maps, table, final=True, specs=result.specs)
    return out


def infer_slide(
    request: InferenceRequest, on_update: Callable[[InferenceUpdate], None] | None = None, progress: bool = False
) -> InferenceResult:
    """Run :func:`run_inference` to the end (headless); ``on_update`` sees every update."""
    gen = run_inference(request)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=0, unit="patch", desc=Path(request.slide_path).name)
    try:
        while True:
            try:
                update = next(gen)
            except StopIteration as stop:
                return stop.value
            if bar is not None and update.total:
                bar.total = update.total
                bar.n = update.done
                bar.refresh()
            if on_update is not None:
                on_update(update)
    finally:
        if bar is not None:
            bar.close()


def export_geojson_file(result: InferenceResult, out: str | os.PathLike) -> Path:
    """Write a result's maps as QuPath GeoJSON (``maps_to_geojson``; level-0 px squares), atomically."""
    from wsimil_core.api import maps_to_geojson, write_json_atomic

    out = Path(out)
    collection = maps_to_geojson(
        result.coords,
        result.geometry.size,
        result.maps,
        {
            "slide_id": result.slide_id,
            "checkpoint_id": result.checkpoint_id,
            "coordinates": "level-0 px",
            "prediction": result.prediction,
        },
    )
    write_json_atomic(collection, out)
    return out


def default_cache_dir() -> Path:
    """The plugin's cache folder: ``$WSIMIL_CACHE`` or ``~/.cache/wsimil``."""
    env = os.environ.get("WSIMIL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "wsimil"


__all__ = [
    "DEVICES",
    "InferenceRequest",
    "InferenceResult",
    "InferenceUpdate",
    "default_cache_dir",
    "export_geojson_file",
    "infer_slide",
    "preload",
    "run_inference",
]
