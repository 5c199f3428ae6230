"""How a checkpoint predicts one slide: the ``Predictor`` protocol, its per-slide input and the default predictor.

The one inference pipeline (``wsimil_core.inference``) builds a :class:`SlideInput` for each slide (its patch
grid, lazy access to its patch features, the checkpoint meta) and calls the predictor the checkpoint's method
returns from ``Method.predictor(model, meta)``. Methods cannot import the pipeline, so the contract lives here.

A predictor declares what it needs:

- ``uses_features``: it reads patch features through ``SlideInput.features`` (the store's cache when it holds the
  checkpoint's encoder, else the pipeline encodes pixels with the checkpoint's encoder);
- ``reads_pixels``: it reads the slide file itself (``SlideInput.slide_path``), e.g. AHDMIL's low-resolution
  pre-screening or an end-to-end encoder;
- ``progressive``: it can run on the first ``n`` patches (``SlideInput.head``), so a viewer can show maps while
  features are still being encoded.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor, nn

from wsimil_core.checkpoint_meta import DEFAULT_TARGET, CheckpointMeta
from wsimil_core.devices import resolve_device
from wsimil_core.errors import DataError
from wsimil_core.wsi.tiling import PatchGrid


@dataclass
class BagPrediction:
    """Prediction for one bag (or slide).

    Attributes:
        probs: ``{task: float [C]}`` softmax probabilities (single-task models: one entry named after the target).
        maps: ``{name: float32 [N] or [N, K]}`` per-patch values in the input patch order (NaN where a predictor
            skipped a patch).
        logits: ``{task: float [C]}`` raw logits.
        info: what a predictor reports besides (e.g. AHDMIL: ``keep``, ``timings``, ``row`` columns for the
            predictions table, ``attrs`` for the maps' store attrs).
    """

    probs: dict[str, np.ndarray]
    maps: dict[str, np.ndarray] = field(default_factory=dict)
    logits: dict[str, np.ndarray] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class FeatureSource(Protocol):
    """Lazy patch features of one slide, rows aligned with ``SlideInput.coords``.

    ``source()`` gives every row, ``source(index)`` the rows ``index`` (int ``[k]``) only: an encoding source
    reads and encodes just those patches (once; later calls reuse them). ``cached`` says whether the rows come
    from a feature store; ``encoder_id`` names the features.
    """

    @property
    def cached(self) -> bool: ...

    @property
    def encoder_id(self) -> str | None: ...

    def __call__(self, index: np.ndarray | None = None) -> np.ndarray: ...


@dataclass
class SlideInput:
    """What the pipeline gives a predictor for one slide.

    Attributes:
        slide_id: the slide's id (store group name).
        slide_path: the slide file (None when unknown, e.g. a store imported from CLAM without slide paths).
        grid: the patch grid (``grid.coords`` int64 ``[N, 2]`` level-0 x, y; ``size_level0``, ``patch_px``,
            ``mpp``, ...).
        features: lazy features ``[N, D]`` (see :class:`FeatureSource`); None when the predictor does not use them.
        meta: the checkpoint's metadata.
        device: where the model runs.
        slide_mpp: µm per level-0 pixel for slide files without it.
        batch_size, num_workers, progress: patch reading / encoding settings for predictors that read pixels.
    """

    slide_id: str
    slide_path: Path | None
    grid: PatchGrid
    features: FeatureSource | None
    meta: CheckpointMeta
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    slide_mpp: float | None = None
    batch_size: int = 64
    num_workers: int = 0
    progress: bool = False

    @property
    def coords(self) -> np.ndarray:
        """int64 ``[N, 2]`` level-0 (x, y) of every patch."""
        return self.grid.coords

    @property
    def n_patches(self) -> int:
        return int(len(self.grid.coords))

    def head(self, n: int) -> SlideInput:
        """The same slide restricted to its first ``n`` patches (progressive previews)."""
        grid = replace(self.grid, coords=self.grid.coords[:n], tissue_fraction=None)
        feats = None if self.features is None else _HeadSource(self.features, n)
        return replace(self, grid=grid, features=feats)


class _HeadSource:
    """The first ``n`` rows of a feature source."""

    def __init__(self, source: FeatureSource, n: int):
        self.source, self.n = source, int(n)
        self.cached, self.encoder_id = source.cached, source.encoder_id

    def __call__(self, index: np.ndarray | None = None) -> np.ndarray:
        return self.source(np.arange(self.n) if index is None else np.asarray(index)[np.asarray(index) < self.n])


@runtime_checkable
class Predictor(Protocol):
    """Predicts one slide: ``predictor(slide: SlideInput) -> BagPrediction`` (maps aligned with the grid)."""

    uses_features: bool
    reads_pixels: bool
    progressive: bool

    def __call__(self, slide: SlideInput) -> BagPrediction: ...


def _to_numpy(t: Any) -> np.ndarray:
    if isinstance(t, Tensor):
        return t.detach().float().cpu().numpy()
    return np.asarray(t, dtype=np.float32)


def bag_prediction(out: Any, n: int, target: str) -> BagPrediction:
    """A model's ``MILOutput`` for a bag of ``n`` patches -> :class:`BagPrediction` (softmax per task; maps that
    are not ``[n]`` or ``[n, K]`` are left out with a warning). ``target`` names a single-task model's task."""
    logits = {str(k): v for k, v in out.logits.items()} if isinstance(out.logits, dict) else {target: out.logits}
    probs: dict[str, np.ndarray] = {}
    raw: dict[str, np.ndarray] = {}
    for task, lg in logits.items():
        lg = lg.float().reshape(-1, lg.shape[-1])[0]
        raw[task] = lg.cpu().numpy()
        probs[task] = torch.softmax(lg, dim=-1).cpu().numpy()
    maps: dict[str, np.ndarray] = {}
    for name, value in (out.maps or {}).items():
        m = _to_numpy(value).astype(np.float32, copy=False)
        if m.ndim >= 2 and m.shape[0] == 1 and n != 1:
            m = m[0]
        if m.ndim not in (1, 2) or m.shape[0] != n:
            warnings.warn(f"map {name!r} has shape {m.shape}, not [N={n}] or [N, K]; it is left out", stacklevel=3)
            continue
        maps[name] = m
    return BagPrediction(probs=probs, maps=maps, logits=raw)


@torch.no_grad()
def predict_bag(
    model: nn.Module,
    features: Tensor | np.ndarray,
    coords: Tensor | np.ndarray | None = None,
    device: str | torch.device = "cpu",
    target: str | None = None,
) -> BagPrediction:
    """Run ``model`` on one whole bag (no chunking), in eval mode and without gradients.

    Args:
        model: a registered model (e.g. from ``load_checkpoint``).
        features: ``[N, D]`` patch features (float16/32; cast to float32).
        coords: ``[N, 2]`` level-0 (x, y), passed to models that use them.
        device: ``"cpu"``, ``"cuda"``, ``"auto"``...
        target: name of the single task (default: the first task of ``model.checkpoint_meta``, else ``"label"``).

    Returns:
        ``BagPrediction`` whose maps are aligned with the rows of ``features``.
    """
    dev = resolve_device(device)
    x = torch.as_tensor(np.asarray(features) if not isinstance(features, Tensor) else features)
    if x.dim() == 3 and x.shape[0] == 1:
        x = x[0]
    if x.dim() != 2:
        raise DataError(f"predict_bag: features must be [N, D], got shape {tuple(x.shape)}")
    x = x.to(dev, dtype=torch.float32)
    c = None
    if coords is not None:
        c = torch.as_tensor(np.asarray(coords) if not isinstance(coords, Tensor) else coords).to(dev, torch.long)
    was_training = model.training
    model.eval()
    try:
        out = model(x, coords=c)
    finally:
        model.train(was_training)
    if target is None:
        meta = getattr(model, "checkpoint_meta", None)
        target = meta.task_names[0] if isinstance(meta, CheckpointMeta) else DEFAULT_TARGET
    return bag_prediction(out, int(x.shape[0]), target)


class FeaturePredictor:
    """The default predictor: the inference model on every patch feature of the slide (``predict_bag``)."""

    uses_features = True
    reads_pixels = False
    progressive = True

    def __init__(self, model: nn.Module, meta: CheckpointMeta):
        self.model, self.meta = model, meta

    def __call__(self, slide: SlideInput) -> BagPrediction:
        feats = slide.features() if slide.features is not None else None
        if feats is None:
            raise DataError(f"slide {slide.slide_id!r}: the default predictor needs patch features")
        return predict_bag(self.model, feats, slide.coords, slide.device, self.meta.task_names[0])


__all__ = [
    "BagPrediction",
    "FeaturePredictor",
    "FeatureSource",
    "Predictor",
    "SlideInput",
    "bag_prediction",
    "predict_bag",
]
