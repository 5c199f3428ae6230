"""Pixel pipeline of end-to-end ABMILX: multi-scale random instance sampling (MRIS), patch reading with
DataLoader workers, train/test transforms, chunked encoding and bounded-memory slide inference.

MRIS (Tang, Qin et al., "Revisiting End-to-End Learning with Slide-level Supervision", Sec. 3.1, Eq. 2): per
slide and step, ``s`` patches in total are drawn across scales ``{I_1..I_t}`` with ratios ``sigma_j`` (sum 1):
``s_j = ceil(s * sigma_j)`` patches of scale j; the ceilings can overshoot ``s`` by at most ``t - 1``, and that
excess is taken one patch each from the last scales that were rounded up (so the total is exactly ``s`` and, with
two scales, the secondary scale gets ``floor(s sigma_2)`` as in the authors' code ``sub = s // ratio``). Scale j is the store's
patch grid rescaled by an mpp factor ``f_j``:

* ``f = 1``: the stored patches;
* ``f > 1`` (coarser, e.g. 2 = 5x from a 10x grid): the coarse cells of side ``f x`` the patch side that hold at
  least one tissue patch, read at ``read_px`` (so at ``f`` times the mpp);
* ``f < 1`` (finer, e.g. 0.5 = 20x from a 10x grid; ``1 / f`` must be an integer k): every one of the ``k x k``
  sub-patches of every stored patch is a candidate, so a sampled finer instance is any sub-patch of a tissue patch
  (uniformly at random), read at ``read_px`` (so at ``f`` times the mpp).

Every patch is read at ``read_px`` and cropped/resized to one ``input_size``. A scale with fewer than ``s_j``
patches is padded by random repetition.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from wsimil_core.checkpoint_meta import CheckpointMeta
from wsimil_core.devices import autocast, single_thread_worker
from wsimil_core.errors import DataError, StoreError
from wsimil_core.methods.abmilx.e2e_model import ABMILXE2E
from wsimil_core.methods.predictor import BagPrediction, SlideInput, bag_prediction
from wsimil_core.models.base import MILOutput
from wsimil_core.wsi.slide import open_slide


@dataclass
class SlideInfo:
    """Where a bag's pixels are: the slide file and its patch grid (from the store's slide attrs)."""

    slide_path: str
    size_level0: int
    origin: tuple[int, int]
    coords: np.ndarray | None = None  # int64 [N, 2] full main-scale grid (None: use the bag's coords)


def slide_info_from_attrs(attrs: dict[str, Any], slide_id: str, coords: np.ndarray | None = None) -> SlideInfo:
    """Build :class:`SlideInfo` from store slide attrs (``slide_path``, ``patch_size_level0``, ``grid_origin``)."""
    path = attrs.get("slide_path")
    size = attrs.get("patch_size_level0")
    if not path or size is None:
        raise StoreError(
            f"slide {slide_id!r}: the store has no slide_path / patch_size_level0 attrs; end-to-end training "
            "needs a store written by `wsimil extract` from the slide files"
        )
    if not Path(path).exists():
        raise DataError(f"slide {slide_id!r}: slide file {path} not found (end-to-end training reads pixels)")
    origin = attrs.get("grid_origin")
    if origin is None:
        origin = (0, 0) if coords is None or len(coords) == 0 else tuple(int(v) for v in coords.min(0))
    return SlideInfo(str(path), int(size), (int(origin[0]), int(origin[1])), coords)


# ------------------------------------------------------------------------------------------------------------
# MRIS
# ------------------------------------------------------------------------------------------------------------
def scale_grid(coords: np.ndarray, size_level0: int, origin: tuple[int, int], factor: float) -> tuple[np.ndarray, int]:
    """The grid of scale ``factor``: coarse cells containing a patch (``factor > 1``) or all sub-patches of the
    patches (``factor < 1``; ``1 / factor`` must be an integer).

    Args:
        coords: ``[N, 2]`` int64 main-scale patch corners (level 0, (x, y)).
        size_level0: main-scale patch side in level-0 px.
        origin: level-0 (x, y) of the grid origin.
        factor: mpp factor of the scale (1 = the main grid, 2 = twice coarser, 0.5 = twice finer).

    Returns:
        ``(coords [M, 2] int64, side_level0)`` of the scale's patches (sorted, unique). For ``factor = 1/k`` the
        side is ``size_level0 // k`` and ``M = N k^2`` (sub-patch ``(i, j)`` of a patch at ``(x, y)`` is at
        ``(x + i side, y + j side)``).
    """
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    if factor == 1:
        return coords, int(size_level0)
    if factor < 1:
        k = fine_split(factor)
        side = int(size_level0) // k
        if side < 1:
            raise DataError(f"MRIS: scale {factor} splits {size_level0}-px patches into sub-patches under 1 px")
        steps = np.arange(k, dtype=np.int64) * side
        offsets = np.stack(np.meshgrid(steps, steps, indexing="ij"), -1).reshape(-1, 2)  # [k^2, 2]
        subs = (coords[:, None, :] + offsets[None, :, :]).reshape(-1, 2)
        return np.unique(subs, axis=0), side
    side = int(round(size_level0 * factor))
    o = np.asarray(origin, dtype=np.int64)
    cells = np.unique((coords - o) // side, axis=0)
    return cells * side + o, side


def fine_split(factor: float) -> int:
    """``k = 1 / factor`` for a scale finer than the stored grid; a ``ValueError`` unless k is an integer >= 2."""
    k = int(round(1.0 / factor))
    if k < 2 or abs(k * factor - 1.0) > 1e-6:
        raise ValueError(f"MRIS scale {factor}: a scale finer than the stored grid must be 1/k for an integer k >= 2")
    return k


def mris_counts(n_samples: int, ratios: Sequence[float]) -> np.ndarray:
    """Patches per scale (paper Eq. 2): ``s_j = ceil(s sigma_j)`` with ``sigma = ratios / sum(ratios)``; the
    excess of the ceilings over ``s`` (at most ``t - 1``) is removed one patch each from the last scales whose
    ceiling rounded up (exact ``s sigma_j`` are kept), so ``sum_j s_j = s``.

    Returns:
        ``[t]`` int64 counts summing to ``n_samples``.
    """
    r = np.asarray(ratios, dtype=np.float64)
    if r.ndim != 1 or not len(r) or (r < 0).any() or r.sum() <= 0:
        raise ValueError(f"MRIS ratios {list(ratios)} must be >= 0 with a positive sum")
    exact = n_samples * r / r.sum()
    counts = np.ceil(exact - 1e-9).astype(np.int64)  # tolerance: 512 * 0.75 must stay 384, not 385
    excess = int(counts.sum()) - n_samples
    for j in range(len(counts) - 1, -1, -1):
        if excess <= 0:
            break
        if counts[j] > exact[j] + 1e-9:
            counts[j] -= 1
            excess -= 1
    return counts


def mris_sample(
    coords: np.ndarray,
    size_level0: int,
    origin: tuple[int, int],
    n_samples: int,
    scales: Sequence[float],
    ratios: Sequence[float],
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Multi-scale random instance sampling (paper Sec. 3.1, Eq. 2; counts by :func:`mris_counts`).

    Returns:
        ``coords [s, 2]`` int64, ``sizes [s]`` int64 (level-0 side of each patch), ``scale [s]`` int64 (index j).
    """
    if len(scales) != len(ratios) or not scales:
        raise ValueError(f"scales {list(scales)} and ratios {list(ratios)} must be non-empty and of equal length")
    counts = mris_counts(n_samples, ratios)
    out_c, out_s, out_j = [], [], []
    for j, (factor, k) in enumerate(zip(scales, counts)):
        if k <= 0:
            continue
        grid, side = scale_grid(coords, size_level0, origin, factor)
        if len(grid) == 0:
            raise DataError("MRIS: the slide has no patches")
        if len(grid) >= k:
            idx = rng.choice(len(grid), size=k, replace=False)
        else:  # pad by random repetition
            idx = np.concatenate([rng.permutation(len(grid)), rng.choice(len(grid), size=k - len(grid))])
        out_c.append(grid[idx])
        out_s.append(np.full(k, side, dtype=np.int64))
        out_j.append(np.full(k, j, dtype=np.int64))
    return np.concatenate(out_c), np.concatenate(out_s), np.concatenate(out_j)


# ------------------------------------------------------------------------------------------------------------
# Reading + transforms
# ------------------------------------------------------------------------------------------------------------
def default_reader(path: str) -> Any:
    """Open a slide with the project's reader (``wsimil_core.wsi.slide.open_slide``)."""
    return open_slide(path)


#: Smallest area share of RandomResizedCrop at train (the authors' set-up, ``crop_scale: 0.25``; the paper,
#: App. B.3, names flips and RandomResizedCrop without the range).
CROP_SCALE = 0.25


def make_transform(input_size: int, train: bool, crop_scale: float = CROP_SCALE) -> Callable[[np.ndarray], Tensor]:
    """uint8 ``[H, W, 3]`` -> uint8 ``[3, S, S]`` (normalisation happens per chunk on the encoder's device).

    Train: RandomResizedCrop(S, scale (crop_scale, 1)) + horizontal and vertical flips (paper App. B.3; no colour
    augmentation). Test: centre crop to S (resize first when the image is smaller than S). The returned callable
    carries the torchvision pipeline as ``.geometry``.
    """
    if not 0.0 < crop_scale <= 1.0:
        raise ValueError(f"crop_scale must be in (0, 1], got {crop_scale}")
    from torchvision.transforms import v2  # heavy (~0.5 s to import); only end-to-end runs need it

    if train:
        geo = v2.Compose(
            [
                v2.RandomResizedCrop(input_size, scale=(float(crop_scale), 1.0), antialias=True),
                v2.RandomHorizontalFlip(),
                v2.RandomVerticalFlip(),
            ]
        )
    else:
        geo = v2.Compose([v2.Resize(input_size, antialias=True), v2.CenterCrop(input_size)])

    def transform(img: np.ndarray) -> Tensor:
        arr = np.ascontiguousarray(img)
        if not arr.flags.writeable:  # readers may return read-only views; torch warns on those
            arr = arr.copy()
        x = torch.from_numpy(arr).permute(2, 0, 1)
        if not train and x.shape[-2] >= input_size and x.shape[-1] >= input_size:
            if x.shape[-2] == input_size and x.shape[-1] == input_size:
                return x
            top, left = (x.shape[-2] - input_size) // 2, (x.shape[-1] - input_size) // 2
            return x[:, top : top + input_size, left : left + input_size]
        return geo(x)

    transform.geometry = geo  # type: ignore[attr-defined]
    return transform


class PatchReadDataset(Dataset):
    """Patches of one slide: item i is ``coords[i]`` with side ``sizes[i]`` (level 0), read at ``read_px`` and
    transformed to uint8 ``[3, input_size, input_size]``. The slide is opened lazily once per worker process."""

    def __init__(
        self,
        slide_path: str,
        coords: np.ndarray,
        sizes: np.ndarray | int,
        read_px: int,
        input_size: int,
        train: bool,
        reader: Callable[[str], Any] | None = None,
        crop_scale: float = CROP_SCALE,
    ):
        self.slide_path = str(slide_path)
        self.coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
        self.sizes = np.broadcast_to(np.asarray(sizes, dtype=np.int64), (len(self.coords),))
        self.read_px = int(read_px)
        self.reader = reader or default_reader
        self.transform = make_transform(input_size, train, crop_scale)
        self._slide: Any = None  # the reader's slide handle, opened on first use in each process

    def __len__(self) -> int:
        return len(self.coords)

    def __getitem__(self, i: int) -> Tensor:
        if self._slide is None:
            self._slide = self.reader(self.slide_path)
        x, y = self.coords[i]
        img = self._slide.read_patch(int(x), int(y), int(self.sizes[i]), self.read_px)
        return self.transform(img)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_slide"] = None  # each worker opens its own handle
        return state


def patch_loader(ds: PatchReadDataset, batch_size: int, num_workers: int) -> DataLoader:
    """Chunks ``[b, 3, S, S]`` in order; workers read ahead (prefetch 2 chunks each)."""
    return DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        prefetch_factor=2 if num_workers > 0 else None,
        worker_init_fn=single_thread_worker if num_workers > 0 else None,
    )


def encode_slide_patches(
    model: ABMILXE2E,
    slide: SlideInfo,
    coords: Tensor | np.ndarray | None = None,
    num_workers: int = 0,
    reader: Callable[[str], Any] | None = None,
    progress: bool = False,
) -> Tensor:
    """Encode all main-scale patches of ``slide`` (test transform) in chunks -> ``[N, in_dim]`` features.

    Only ``encoder_chunk`` images (plus the workers' prefetch) exist at once. Gradients follow the caller's
    grad mode.
    """
    c = model.config
    if coords is None:
        coords = slide.coords
    if coords is None:
        raise DataError(f"{slide.slide_path}: no patch coords to encode (give coords or SlideInfo.coords)")
    arr = coords.detach().cpu().numpy() if isinstance(coords, Tensor) else np.asarray(coords)
    ds = PatchReadDataset(slide.slide_path, arr, slide.size_level0, c.read_px, c.input_size, False, reader)
    loader = patch_loader(ds, c.encoder_chunk, num_workers)
    return model.encode(tqdm(loader, desc="encoding patches", leave=False, disable=not progress))


@torch.no_grad()
def abmilx_e2e_predict(
    model: ABMILXE2E,
    slide_path: str | Path,
    coords: np.ndarray,
    size_level0: int,
    num_workers: int = 0,
    reader: Callable[[str], Any] | None = None,
    amp: bool = True,
    progress: bool = True,
) -> MILOutput:
    """End-to-end ABMILX inference on one slide in bounded memory.

    Every patch ``coords [N, 2]`` (side ``size_level0``) is read at ``model.config.read_px``, centre-cropped to
    ``input_size`` and encoded ``encoder_chunk`` at a time; only the ``[N, in_dim]`` features are kept, then
    ABMILX gives the slide logits ``[1, C]`` and the per-patch maps ``[N]``. AMP (bfloat16) on CUDA.
    """
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    slide = SlideInfo(str(slide_path), int(size_level0), (0, 0), np.asarray(coords))
    try:
        with autocast(device, amp, torch.bfloat16):
            feats = encode_slide_patches(model, slide, num_workers=num_workers, reader=reader, progress=progress)
            out = model.mil(feats.float() if device.type == "cpu" else feats)
    finally:
        model.train(was)
    return out


class E2EPredictor:
    """ABMILX-E2E's slide predictor (``ABMILXMethod.predictor`` for an ``abmilx_e2e`` checkpoint): its fine-tuned
    encoder reads and encodes every patch of the grid from the slide's pixels (:func:`abmilx_e2e_predict`); the
    store's cached features predate that fine-tuning, so it never uses them (``uses_features = False``)."""

    uses_features = False
    reads_pixels = True
    progressive = False

    def __init__(self, model: ABMILXE2E, meta: CheckpointMeta):
        self.model, self.meta = model, meta

    def __call__(self, slide: SlideInput) -> BagPrediction:
        if slide.slide_path is None:  # the pipeline refuses slides without a file for predictors reading pixels
            raise DataError(f"slide {slide.slide_id!r}: abmilx e2e reads pixels but the slide has no file path")
        out = abmilx_e2e_predict(
            self.model,
            slide.slide_path,
            slide.coords,
            slide.grid.size_level0,
            num_workers=slide.num_workers,
            progress=slide.progress,
        )
        pred = bag_prediction(out, slide.n_patches, self.meta.task_names[0])
        pred.info["encoder_id"] = f"e2e:{self.model.config.encoder}"
        return pred


__all__ = [
    "SlideInfo",
    "slide_info_from_attrs",
    "scale_grid",
    "fine_split",
    "mris_counts",
    "mris_sample",
    "make_transform",
    "PatchReadDataset",
    "patch_loader",
    "encode_slide_patches",
    "abmilx_e2e_predict",
    "E2EPredictor",
]
