"""Inference on one slide for the plugin (no Qt): a generator of progressive updates.

:func:`run_inference` yields :class:`InferenceUpdate` objects while it works and returns an
:class:`InferenceResult`; the dock widget runs it in a napari ``thread_worker`` (Cancel = ``worker.quit()``, which
stops the generator at its next ``yield``) and :func:`infer_slide` runs it headless.

Steps:

1. load the checkpoint (``engine.checkpoint.load_checkpoint``) on the chosen device;
2. **cached features**: when a store is given and it holds this slide (same file fingerprint) with features of
   the checkpoint's encoder (same encoder id, dimension and weights hash; same patch grid), they are read and
   the whole bag is predicted at once;
3. **otherwise** the slide is tiled (``tiling.detect_tissue`` + ``make_grid`` at the checkpoint encoder's patch
   mpp and size), its patches are encoded chunk by chunk with the checkpoint's encoder
   (``encoders.create_encoder`` + ``extract_patches``); after the first chunk, and then whenever 25 % more
   patches are encoded, the model is run on the patches encoded so far, so heatmaps appear and sharpen
   progressively (a progress update without maps follows every chunk, so Cancel answers quickly). The features are then cached in the store
   (``FeatureStore.write_bag``, atomic), so the next run is instant;
4. the final maps are written to the store (``maps/<checkpoint_id>/``) like ``wsimil predict`` does.

Partial maps are exact for the bag seen so far (attention is normalised over the encoded patches); the final
update is the model's output on the whole slide.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from napari_wsimil._layers import GridGeometry
from wsimil_core.errors import CheckpointError, DataError, StoreError

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

    def __post_init__(self) -> None:
        from wsimil_core.errors import ConfigError

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


@dataclass
class InferenceResult:
    """The outcome of :func:`run_inference`.

    Attributes:
        slide_id, slide_path, checkpoint_id: what was predicted with what.
        coords: int64 ``[N, 2]``; geometry: the grid geometry.
        maps: ``{name: float32 [N] or [N, K]}``.
        probs: ``{task: {class: probability}}``; prediction: ``{task: class name}`` (binary tasks use the
            checkpoint's threshold).
        from_cache: features came from the store.
        store: the store directory used (or None).
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
    meta: dict[str, Any] = field(default_factory=dict, repr=False)
    messages: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------------------
def checkpoint_summary(path: str | os.PathLike) -> dict[str, Any]:
    """What the widget shows about a checkpoint before running it (reads only the header).

    Returns ``{"checkpoint_id", "method", "model_name", "tasks": {task: [classes]}, "encoder": name,
    "encoder_id", "patch_mpp", "patch_size"}``.
    """
    from wsimil_core.engine.checkpoint import read_checkpoint_meta
    from wsimil_core.inference.predict import task_names

    meta = read_checkpoint_meta(path)
    names = meta.get("class_names") if isinstance(meta.get("class_names"), dict) else {}
    enc = meta.get("encoder") if isinstance(meta.get("encoder"), dict) else {}
    mpp, patch, _stride = _grid_of(enc)
    return {
        "checkpoint_id": meta.get("checkpoint_id"),
        "method": meta.get("method"),
        "model_name": meta.get("model_name"),
        "tasks": {t: list(names.get(t, [])) for t in task_names(meta)},
        "encoder": enc.get("name"),
        "encoder_id": enc.get("encoder_id"),
        "patch_mpp": mpp,
        "patch_size": patch,
    }


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

    import wsimil_core.engine.checkpoint  # noqa: F401
    import wsimil_core.features.encoders  # noqa: F401
    import wsimil_core.features.extract  # noqa: F401
    import wsimil_core.inference.predict  # noqa: F401
    import wsimil_core.methods  # noqa: F401  (registers every model)
    import wsimil_core.store.zarr_store  # noqa: F401
    import wsimil_core.wsi.tiling  # noqa: F401

    if encoder_name and ("timm" in encoder_name or "levit" in encoder_name):
        import timm  # noqa: F401


def _grid_of(enc: dict[str, Any]) -> tuple[float | None, int | None, int | None]:
    """(patch mpp, patch px, stride px) recorded in a checkpoint's encoder spec."""
    mpp = enc.get("patch_mpp", enc.get("mpp"))
    patch = enc.get("patch_size", enc.get("patch"))
    stride = None
    size0, stride0 = enc.get("patch_size_level0"), enc.get("stride_level0")
    if patch and size0 and stride0:
        stride = int(round(float(stride0) / float(size0) * int(patch)))
    return (float(mpp) if mpp else None, int(patch) if patch else None, stride)


def _probs_table(meta: dict[str, Any], probs: dict[str, np.ndarray]) -> tuple[dict, dict]:
    from wsimil_core.inference.predict import _predicted_class, class_names_for, threshold_for

    table, pred = {}, {}
    for task, p in probs.items():
        names = class_names_for(meta, task, len(p))
        table[task] = {n: float(v) for n, v in zip(names, p)}
        pred[task] = names[_predicted_class(np.asarray(p), threshold_for(meta, task))]
    return table, pred


def _cached_bag(fs: Any, sid: str, path: Path, meta: dict, source: str, grid_spec: Any) -> tuple[Any, str | None]:
    """The store's bag for this slide when it matches the checkpoint, else ``(None, reason)``.

    The reason is None when the slide is absent, or present with the same file and grid but without this
    encoder's features (its coords are then reused); otherwise it says why the store cannot be used.
    """
    from wsimil_core.features.extract import _grid_matches, _same_file
    from wsimil_core.inference.predict import _check_bag, _encoder_for

    if sid not in fs.slide_ids():
        return None, None
    if not _same_file(fs, sid, path):
        return None, f"the store's slide {sid!r} comes from another file; its features are not used"
    if grid_spec is not None:
        diff = _grid_matches(fs.slide_attrs(sid), grid_spec)
        if diff:
            return None, f"the store's slide {sid!r} was tiled differently ({diff}); features are not cached"
    try:
        enc_id = _encoder_for(fs, sid, meta, source)
    except StoreError:
        return None, None  # same file and grid, no features of this encoder yet: extract them on its coords
    bag = fs.read_bag(sid, enc_id)
    _check_bag(bag, meta, source, fs)
    return bag, None


def _build_encoder(enc: dict[str, Any], weights: Any, device: Any, source: str) -> tuple[Any, Any]:
    """The checkpoint's encoder, checked to produce the same encoder id."""
    from wsimil_core.features.encoders import RANDOM_INIT, RandomWeightsWarning, create_encoder

    name = enc.get("name")
    if not name:
        raise CheckpointError(
            f"{source}: the checkpoint names no encoder, so features cannot be extracted; "
            "give a store that holds this slide's features"
        )
    want_hash = enc.get("weights_sha256") or RANDOM_INIT
    if weights is None and enc.get("weights_path") and Path(enc["weights_path"]).is_file():
        weights = enc["weights_path"]
    if weights is None and want_hash != RANDOM_INIT:
        raise CheckpointError(
            f"{source}: the checkpoint's encoder {name!r} used pretrained weights (sha256 {want_hash[:12]}...); "
            "give that weights file (Encoder weights) or a store that holds this slide's features"
        )
    try:
        with warnings.catch_warnings():
            if want_hash == RANDOM_INIT:
                warnings.simplefilter("ignore", RandomWeightsWarning)  # the checkpoint was trained on these
            model, spec = create_encoder(name, weights=weights, device=device)
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - an unknown encoder name is the checkpoint's problem
        raise CheckpointError(f"{source}: cannot build the checkpoint's encoder {name!r}: {exc}") from None
    if want_hash != RANDOM_INIT and spec.weights_sha256 != want_hash:
        raise CheckpointError(
            f"{weights}: these weights (sha256 {spec.weights_sha256[:12]}...) are not the ones the checkpoint "
            f"{source} was trained with ({want_hash[:12]}...)"
        )
    return model, spec


def run_inference(
    request: InferenceRequest,
) -> Generator[InferenceUpdate, None, InferenceResult]:
    """Run a checkpoint on one slide, yielding progress (see the module docstring).

    Raises:
        CheckpointError, SlideError, StoreError, DataError: bad inputs, with a message naming the file.
    """
    import torch

    from wsimil_core.devices import resolve_device
    from wsimil_core.engine.checkpoint import load_checkpoint
    from wsimil_core.features.extract import slide_id_from_path
    from wsimil_core.inference.predict import predict_bag
    from wsimil_core.wsi.slide import open_slide

    source = str(request.checkpoint)
    slide_path = Path(request.slide_path)
    yield InferenceUpdate("load", message=f"loading {Path(source).name}")
    device = resolve_device(request.device)
    model, meta = load_checkpoint(request.checkpoint, device=device)
    ckpt_id = meta["checkpoint_id"]
    enc = meta.get("encoder") if isinstance(meta.get("encoder"), dict) else {}
    mpp, patch, stride = _grid_of(enc)
    grid_spec = None
    if mpp and patch:
        from wsimil_core.wsi.tiling import GridSpec

        grid_spec = GridSpec(mpp=mpp, patch=patch, stride=stride, min_tissue=float(request.min_tissue))
    sid = slide_id_from_path(slide_path)
    messages: list[str] = []

    fs = None
    if request.store is not None:
        from wsimil_core.store.zarr_store import FeatureStore

        fs = FeatureStore(request.store, create=True)

    bag, why = (None, None) if fs is None else _cached_bag(fs, sid, slide_path, meta, source, grid_spec)
    if why:
        messages.append(why)

    if bag is not None:
        coords = np.asarray(bag.coords, dtype=np.int64)
        geometry = GridGeometry.from_attrs(fs.slide_attrs(sid), coords, where=f"store {fs.root}: slide {sid!r}")
        n = len(coords)
        yield InferenceUpdate("predict", 0, n, f"cached features ({n} patches): predicting", coords, geometry)
        pred = predict_bag(model, bag.features, coords, device=device)
        features = None
        from_cache = True
    else:
        if grid_spec is None:
            raise CheckpointError(
                f"{source}: the checkpoint records no patch mpp/size for its encoder, so the slide cannot be tiled; "
                "give a store that holds this slide's features"
            )
        from wsimil_core.features.encoders import extract_patches
        from wsimil_core.features.extract import _slide_attrs, _to_dtype
        from wsimil_core.store.zarr_store import slide_fingerprint
        from wsimil_core.wsi.tiling import EmptyTissueWarning, TissueParams, detect_tissue, make_grid

        enc_model, spec = _build_encoder(enc, request.encoder_weights, device, source)
        if enc.get("encoder_id") and spec.encoder_id != enc["encoder_id"]:
            raise CheckpointError(
                f"{source}: the encoder built for the checkpoint has id {spec.encoder_id!r}, but the checkpoint was "
                f"trained on {enc['encoder_id']!r}"
            )
        yield InferenceUpdate("tiling", message=f"{slide_path.name}: detecting tissue")
        tissue = TissueParams()
        slide = open_slide(slide_path, slide_mpp=request.slide_mpp)
        try:
            slide.require_mpp()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", EmptyTissueWarning)
                mask = detect_tissue(slide, tissue)
                grid = make_grid(slide, mask, grid_spec)
            coords = np.asarray(grid.coords, dtype=np.int64).reshape(-1, 2)
            attrs = _slide_attrs(slide, slide_path, grid, tissue, slide_fingerprint(slide_path))
            cacheable = fs is not None and why is None
            if cacheable and sid in fs.slide_ids():
                # same file, same grid (checked in _cached_bag): reuse the stored coords so encoders align
                stored = np.asarray(fs.read_coords(sid), dtype=np.int64)
                coords = stored
                attrs = {k: v for k, v in attrs.items() if k not in ("tissue", "grid_origin")}
            geometry = GridGeometry.from_patch_grid(grid).with_coords(coords)
            n = len(coords)
            if n == 0:
                raise DataError(f"{slide_path}: no tissue patch found (min tissue {request.min_tissue})")
            features = np.empty((n, spec.dim), dtype=np.float32)
            chunk = int(request.chunk_size)
            bs = int(request.batch_size)
            pred = None
            next_maps = chunk  # partial maps at chunk, then every >= 25 % more patches (bounded total cost)
            yield InferenceUpdate("features", 0, n, f"{n} patches to encode", coords, geometry)
            for start in range(0, n, chunk):
                stop = min(n, start + chunk)
                for b in range(start, stop, bs):
                    e = min(stop, b + bs)
                    imgs = np.stack(
                        [slide.read_patch(int(x), int(y), grid.size_level0, grid.patch_px) for x, y in coords[b:e]]
                    )
                    features[b:e] = extract_patches(enc_model, spec, imgs).numpy()
                if stop < n and stop >= next_maps:
                    pred = predict_bag(model, features[:stop], coords[:stop], device=device)
                    table, _ = _probs_table(meta, pred.probs)
                    next_maps = max(stop + chunk, int(stop * 1.25))
                    yield InferenceUpdate(
                        "features", stop, n, f"encoded {stop}/{n} patches", coords, geometry, pred.maps, table
                    )
                elif stop < n:
                    yield InferenceUpdate("features", stop, n, f"encoded {stop}/{n} patches", coords, geometry)
        finally:
            slide.close()
        del enc_model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        pred = predict_bag(model, features, coords, device=device)
        from_cache = False
        if cacheable:
            try:
                stored = _to_dtype(features, "float16", str(slide_path))
            except DataError:  # beyond float16's range: keep float32
                stored = features
            enc_attrs = spec.with_grid(grid.mpp, grid.patch_px).to_attrs()
            enc_attrs["dtype"] = "float16" if stored.dtype == np.float16 else "float32"
            try:
                fs.write_bag(sid, stored, coords, spec.encoder_id, encoder_attrs=enc_attrs, **attrs)
            except StoreError as exc:
                messages.append(f"features not cached: {exc}")

    table, prediction = _probs_table(meta, pred.probs)
    maps = {k: np.asarray(v, dtype=np.float32) for k, v in pred.maps.items()}
    maps_fit = fs is not None and sid in fs.slide_ids() and np.array_equal(fs.read_coords(sid), coords)
    if fs is not None and request.write_maps and not maps_fit:
        messages.append("maps not written to the store (its slide has other patches)")
    if request.write_maps and maps_fit:
        attrs = {
            "checkpoint_id": ckpt_id,
            "checkpoint": source,
            "method": meta.get("method"),
            "model_name": meta.get("model_name"),
            "class_names": {t: list(c) for t, c in table.items()},
            "probs": {t: list(c.values()) for t, c in table.items()},
            "prediction": prediction,
        }
        fs.write_maps(sid, ckpt_id, maps, attrs)
    result = InferenceResult(
        slide_id=sid,
        slide_path=str(slide_path),
        checkpoint_id=ckpt_id,
        coords=coords,
        geometry=geometry,
        maps=maps,
        probs=table,
        prediction=prediction,
        from_cache=from_cache,
        store=None if fs is None else str(fs.root),
        meta=meta,
        messages=messages,
    )
    yield InferenceUpdate("done", len(coords), len(coords), "done", coords, geometry, maps, table, final=True)
    return result


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
    """Write a result's maps as QuPath GeoJSON (``engine.geojson``; level-0 px squares), atomically."""
    from wsimil_core.inference.geojson import maps_to_geojson, write_json_atomic

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
    "checkpoint_summary",
    "default_cache_dir",
    "export_geojson_file",
    "infer_slide",
    "preload",
    "run_inference",
]
