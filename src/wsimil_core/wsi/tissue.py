"""Tissue detection on a low-resolution thumbnail of the slide's ``bounds`` region.

Thumbnail at ``thumb_mpp`` -> tissue channel (HSV saturation or optical density) -> optional Gaussian blur ->
threshold (Otsu, floored; or fixed) -> hole filling -> minimum-area filtering -> a :class:`TissueMask` whose pixel
(i, j) covers a known level-0 square (``downsample``, ``origin``). ``wsimil_core.wsi.tiling`` turns it into a
patch grid.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from wsimil_core.errors import ConfigError
from wsimil_core.wsi.base import Slide

__all__ = [
    "EmptyTissueWarning",
    "TissueMask",
    "TissueParams",
    "detect_tissue",
    "otsu_threshold",
    "tissue_image",
]

SPACES = ("saturation", "od")


class EmptyTissueWarning(UserWarning):
    """No tissue was found on a slide (the slide then yields zero patches)."""


@dataclass
class TissueParams:
    """Tissue-detection parameters.

    Attributes:
        thumb_mpp: µm per pixel of the thumbnail the mask is computed on (8 µm/px ~ 1.25x).
        thumb_max_size: cap on the thumbnail's longest side in pixels (the mpp is coarsened to respect it).
        space: ``"saturation"`` (HSV S channel, in [0, 1]) or ``"od"`` (optical density summed over RGB,
            ``-log10(I/255)`` per channel, Beer-Lambert).
        threshold: fixed threshold in that space; None = Otsu on the thumbnail.
        min_threshold: floor of the Otsu threshold (saturation 0.05 / OD 0.15 by default when None), so that a
            blank slide is not split into "tissue" and "background" noise.
        blur_sigma_px: Gaussian smoothing of the channel before thresholding, in thumbnail pixels (0 = off).
        min_area_um2: connected tissue components smaller than this are dropped (µm²).
        fill_holes: fill holes inside tissue components.
        max_hole_um2: only holes smaller than this are filled (None = all holes).
    """

    thumb_mpp: float = 8.0
    thumb_max_size: int = 4096
    space: str = "saturation"
    threshold: float | None = None
    min_threshold: float | None = None
    blur_sigma_px: float = 1.0
    min_area_um2: float = 20_000.0
    fill_holes: bool = True
    max_hole_um2: float | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.thumb_mpp) and self.thumb_mpp > 0):
            raise ConfigError(f"tissue thumb_mpp must be a positive number, got {self.thumb_mpp!r}")
        if int(self.thumb_max_size) < 16:
            raise ConfigError(f"tissue thumb_max_size must be >= 16, got {self.thumb_max_size!r}")
        if self.space not in SPACES:
            raise ConfigError(f"tissue space must be one of {', '.join(SPACES)}, got {self.space!r}")
        for name in ("threshold", "min_threshold", "max_hole_um2"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and v >= 0):
                raise ConfigError(f"tissue {name} must be a non-negative number or None, got {v!r}")
        if not (math.isfinite(self.blur_sigma_px) and self.blur_sigma_px >= 0):
            raise ConfigError(f"tissue blur_sigma_px must be >= 0, got {self.blur_sigma_px!r}")
        if not (math.isfinite(self.min_area_um2) and self.min_area_um2 >= 0):
            raise ConfigError(f"tissue min_area_um2 must be >= 0, got {self.min_area_um2!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TissueMask:
    """A tissue mask on a thumbnail of the slide's bounds region.

    Attributes:
        mask: bool ``[h, w]``; True = tissue.
        downsample: level-0 pixels per mask pixel (mask pixel (i, j) covers level-0
            ``[x0 + j*ds, x0 + (j+1)*ds) x [y0 + i*ds, y0 + (i+1)*ds)``).
        origin: level-0 ``(x0, y0)`` of mask pixel (0, 0) (the slide's bounds offset).
        threshold: the threshold used (Otsu's or the given one), in ``params.space`` units.
        params: the parameters used.
        thumbnail: the RGB thumbnail ``[h, w, 3]`` uint8 the mask was computed on.
    """

    mask: np.ndarray
    downsample: float
    origin: tuple[int, int]
    threshold: float
    params: TissueParams
    thumbnail: np.ndarray | None = field(default=None, repr=False)

    @property
    def tissue_fraction(self) -> float:
        """Fraction of mask pixels that are tissue."""
        return float(self.mask.mean()) if self.mask.size else 0.0


def tissue_image(rgb: np.ndarray, space: str) -> np.ndarray:
    """The channel thresholded for tissue, float32 ``[h, w]``; higher = more tissue.

    * ``saturation``: HSV saturation ``S = (max - min) / max`` in [0, 1] (0 where max = 0);
    * ``od``: optical density summed over channels, ``sum_c -log10((I_c + 1) / 256)`` (Beer-Lambert law).
    """
    if space not in SPACES:
        raise ConfigError(f"tissue space must be one of {', '.join(SPACES)}, got {space!r}")
    x = rgb.astype(np.float32)
    if space == "saturation":
        mx = x.max(axis=2)
        mn = x.min(axis=2)
        return np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-6), 0.0).astype(np.float32)
    return (-np.log10((x + 1.0) / 256.0)).sum(axis=2).astype(np.float32)


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold (maximises the between-class variance ``w0 w1 (mu0 - mu1)^2``) of a 1-D sample."""
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size == 0:
        return 0.0
    lo, hi = float(values.min()), float(values.max())
    if hi - lo < 1e-12:
        return hi
    hist, edges = np.histogram(values, bins=bins, range=(lo, hi))
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist).astype(np.float64)
    w1 = w0[-1] - w0
    s0 = np.cumsum(hist * centers)
    mu0 = s0 / np.maximum(w0, 1)
    mu1 = (s0[-1] - s0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    between[w1 == 0] = 0
    # Threshold between bin k and k+1: values > edges[k+1] are the upper class. Empty bins between two
    # modes give a plateau of equal variance; take its middle rather than its first bin.
    best = np.flatnonzero(between >= between.max() * (1 - 1e-9))
    k = int(best[len(best) // 2]) if best[-1] - best[0] == len(best) - 1 else int(best[0])
    return float(edges[k + 1])


def _default_floor(space: str) -> float:
    return 0.05 if space == "saturation" else 0.15


def detect_tissue(slide: Slide, params: TissueParams | None = None) -> TissueMask:
    """Tissue mask of ``slide``'s bounds region on a low-resolution thumbnail.

    Steps: thumbnail at ``params.thumb_mpp`` -> channel (``tissue_image``) -> optional Gaussian blur ->
    threshold (Otsu, floored at ``min_threshold``; or fixed) -> hole filling -> drop components smaller than
    ``min_area_um2``. An empty mask is an :class:`EmptyTissueWarning`, not an error.

    Raises:
        SlideError: the slide has no mpp (pass ``slide_mpp``) or cannot be read.
    """
    from scipy import ndimage as ndi

    params = params or TissueParams()
    slide_mpp = slide.require_mpp()
    thumb, ds = slide.thumbnail(max_size=int(params.thumb_max_size), downsample=params.thumb_mpp / slide_mpp)
    chan = tissue_image(thumb, params.space)
    if params.blur_sigma_px > 0:
        chan = ndi.gaussian_filter(chan, sigma=params.blur_sigma_px)
    if params.threshold is not None:
        thr = float(params.threshold)
    else:
        floor = params.min_threshold if params.min_threshold is not None else _default_floor(params.space)
        thr = max(otsu_threshold(chan), float(floor))
    mask = chan > thr
    px_area_um2 = (ds * slide_mpp) ** 2
    if params.fill_holes and mask.any():
        filled = ndi.binary_fill_holes(mask)
        if params.max_hole_um2 is not None:
            holes, n = ndi.label(filled & ~mask)
            if n:
                sizes = np.bincount(holes.ravel())
                small = sizes * px_area_um2 < params.max_hole_um2
                small[0] = False
                filled = mask | small[holes]
        mask = filled
    if params.min_area_um2 > 0 and mask.any():
        labels, n = ndi.label(mask)
        if n:
            sizes = np.bincount(labels.ravel())
            keep = sizes * px_area_um2 >= params.min_area_um2
            keep[0] = False
            mask = keep[labels]
    if not mask.any():
        warnings.warn(
            f"{slide.path}: no tissue detected (threshold {thr:.3g} in {params.space} space); "
            "the slide yields zero patches",
            EmptyTissueWarning,
            stacklevel=2,
        )
    return TissueMask(
        mask=mask.astype(bool),
        downsample=float(ds),
        origin=(int(slide.bounds[0]), int(slide.bounds[1])),
        threshold=thr,
        params=params,
        thumbnail=thumb,
    )
