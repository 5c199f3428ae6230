"""Plausibility of a slide's pixel size (µm per level-0 pixel): the one definition of the range used by
``open_slide``'s warning, ``wsimil tile`` and the napari plugin.

A wrong mpp is silent and costly: patches are cut at the wrong physical size, features no longer match the
encoder's training resolution, and maps land off the tissue. Two mis-reads are common:

* a 72-dpi TIFF resolution tag (a screen default, not a scan) reads as 25400 / 72 = 352.78 µm/px, and a tag in
  pixels per µm read as per centimetre gives 10^4 times the value: far outside :data:`MPP_RANGE`;
* a resolution unit mis-read (pixels per millimetre stored with the unit "inch": 25.4x too large; per centimetre
  read as per inch: 2.54x) can stay inside the range (0.25 -> 6.35 µm/px). When the file also gives its
  objective power, an mpp more than :data:`OBJECTIVE_TOLERANCE` times away from ``10 / objective`` µm/px
  (40x ~ 0.25, 20x ~ 0.5) is flagged too; a 2.54x error is not caught.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

__all__ = ["MPP_RANGE", "OBJECTIVE_TOLERANCE", "ImplausibleMppWarning", "implausible_mpp", "warn_implausible_mpp"]

#: plausible µm per level-0 pixel of a slide: ~0.1 (100x) to a few µm (low-magnification scans); outside it the
#: value is almost surely a mis-read tag (72 dpi -> 352.78 µm/px).
MPP_RANGE = (0.05, 20.0)
#: how many times an mpp may differ from ``10 / objective power`` µm/px before the two are said to disagree.
OBJECTIVE_TOLERANCE = 4.0


class ImplausibleMppWarning(UserWarning):
    """A slide's µm per level-0 pixel is outside :data:`MPP_RANGE` or disagrees with its objective power;
    ``--slide-mpp`` (``open_slide(..., slide_mpp=...)``) gives the real one."""


def implausible_mpp(mpp: float, objective_power: float | None = None) -> str | None:
    """Why ``mpp`` (µm per level-0 pixel) is implausible for a slide, or None when it is plausible.

    Implausible: outside :data:`MPP_RANGE`, or (``objective_power`` given) more than :data:`OBJECTIVE_TOLERANCE`
    times away from ``10 / objective_power``.
    """
    lo, hi = MPP_RANGE
    value = float(mpp)
    if not (math.isfinite(value) and lo <= value <= hi):
        hint = "; a 72-dpi resolution tag reads as 352.78" if value > 100 else ""
        return f"{value:.4g} µm/px is implausible for a slide (expected {lo:g}-{hi:g} µm/px{hint})"
    if objective_power is not None and math.isfinite(objective_power) and objective_power > 0:
        expected = 10.0 / float(objective_power)
        if max(value / expected, expected / value) > OBJECTIVE_TOLERANCE:
            return (
                f"{value:.4g} µm/px is implausible for the file's {float(objective_power):g}x objective (about "
                f"{expected:.2g} µm/px expected; a resolution unit mis-read gives 25.4x or 10x errors)"
            )
    return None


def warn_implausible_mpp(
    path: str | Path, mpp: float | None, objective_power: float | None, overridden: bool, stacklevel: int = 2
) -> bool:
    """One ``ImplausibleMppWarning`` naming the file, the value and how to override it when ``mpp`` is
    implausible (``implausible_mpp``); returns whether it warned. ``overridden``: the value came from
    ``--slide-mpp`` / ``slide_mpp`` rather than from the file."""
    problem = None if mpp is None else implausible_mpp(mpp, objective_power)
    if problem is None:
        return False
    if overridden:
        fix = "it was given as --slide-mpp (slide_mpp=...): check the value"
    else:
        fix = (
            "read from the file's metadata: pass --slide-mpp (open_slide(..., slide_mpp=...)) with the real µm per "
            "level-0 pixel, e.g. --slide-mpp 0.25 for a 40x scan"
        )
    warnings.warn(f"{path}: {problem}; {fix}", ImplausibleMppWarning, stacklevel=stacklevel + 1)
    return True
