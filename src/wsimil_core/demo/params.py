"""The demo cohort's parameters, what a run wrote, and the region kinds planted in its slides."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from wsimil_core.errors import DataError

#: region kind -> the labels.csv column its presence defines
REGION_KINDS = {"lesion": "label", "pattern_b": "task_b", "pattern_c": "task_c"}
PATCH0 = 256  # a 256 px patch at 0.5 µm/px, in level-0 pixels at the demo mpp
#: the white-ish glass around the tissue
BACKGROUND = np.array([243, 242, 245], np.uint8)


@dataclass
class DemoParams:
    """Parameters of a demo cohort (recorded in ``cohort.json``).

    Attributes:
        n_slides: number of slides (>= 2).
        size: level-0 width in px (height is 3/4 of it, rounded to the tile); >= 2048, multiple of 256.
        seed: random seed; the same seed gives the same cohort, bit for bit.
        mpp: µm per level-0 pixel written in the TIFF tags.
        tile: TIFF tile side.
        prevalence_b, prevalence_c: fraction of slides with ``pattern_b`` / ``pattern_c`` (label is 50 %).
    """

    n_slides: int = 12
    size: int = 4096
    seed: int = 0
    mpp: float = 0.5
    tile: int = 256
    prevalence_b: float = 0.35
    prevalence_c: float = 0.2

    def __post_init__(self) -> None:
        if int(self.n_slides) < 2:
            raise DataError(f"demo cohort: n_slides must be >= 2, got {self.n_slides}")
        if int(self.size) < 2048 or int(self.size) % 256:
            raise DataError(f"demo cohort: size must be a multiple of 256 and >= 2048, got {self.size}")
        if not (self.mpp > 0):
            raise DataError(f"demo cohort: mpp must be positive, got {self.mpp}")
        for name in ("prevalence_b", "prevalence_c"):
            v = getattr(self, name)
            if not 0.0 < v < 1.0:
                raise DataError(f"demo cohort: {name} must be in (0, 1), got {v}")


@dataclass
class DemoCohort:
    """What ``make_demo_cohort`` wrote."""

    out_dir: Path
    slides: list[Path]
    labels_csv: Path
    omics_csv: Path
    geojson: list[Path]
    params: DemoParams
    skipped: list[str] = field(default_factory=list)
