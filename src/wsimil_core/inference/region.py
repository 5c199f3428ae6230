"""Inference on a region of a slide: the patch grid restricted to the patches whose centre lies inside polygons.

The pipeline (``PipelineOptions.region``) predicts only these patches: the model sees the region's bag (attention
is normalised over it), the maps cover it, and neither features nor maps of the partial bag go into the store.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from wsimil_core.errors import SlideError
from wsimil_core.methods.predictor import FeatureSource
from wsimil_core.wsi.annotations import Annotation, points_in_polygons
from wsimil_core.wsi.tiling import PatchGrid


def region_index(grid: PatchGrid, region: Sequence[Annotation | np.ndarray]) -> np.ndarray:
    """int64 ``[k]``: rows of ``grid.coords`` whose patch centre (``coords + size_level0 / 2``) lies inside any
    polygon of ``region`` (level-0 ``(x, y)`` rings ``[M, 2]`` or polygon annotations), in grid order."""
    centres = np.asarray(grid.coords, dtype=np.float64) + grid.size_level0 / 2.0
    return np.flatnonzero(points_in_polygons(centres, region)).astype(np.int64)


def restrict_grid(
    grid: PatchGrid, region: Sequence[Annotation | np.ndarray], where: str
) -> tuple[PatchGrid, np.ndarray]:
    """``(the grid of the region's patches, their rows in grid)``; same origin, stride and grid shape.

    Raises:
        SlideError: no patch of the grid lies inside the region (naming ``where``, the slide).
    """
    index = region_index(grid, region)
    if not len(index):
        raise SlideError(f"{where}: no tissue patch of the grid has its centre inside the region")
    tissue = None if grid.tissue_fraction is None else np.asarray(grid.tissue_fraction)[index]
    return replace(grid, coords=np.asarray(grid.coords)[index], tissue_fraction=tissue), index


class SubsetFeatures:
    """The rows ``index`` of a feature source, renumbered ``0..k-1`` (a store bag restricted to a region)."""

    def __init__(self, source: FeatureSource, index: np.ndarray):
        self.source, self.index = source, np.asarray(index, dtype=np.int64)
        self.cached, self.encoder_id = source.cached, source.encoder_id

    def __call__(self, index: np.ndarray | None = None) -> np.ndarray:
        """float32 ``[k, D]`` (or the rows ``index`` of the subset)."""
        rows = self.index if index is None else self.index[np.asarray(index, dtype=np.int64)]
        return self.source(rows)


__all__ = ["SubsetFeatures", "region_index", "restrict_grid"]
