"""``BagBatch``: one slide's bag as the training engine hands it to a method."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor


@dataclass
class BagBatch:
    """One bag (batch size 1: bags have different sizes; the engine accumulates gradients).

    Attributes:
        features: ``[N, D]`` float32 patch features (already subsampled for training when configured).
        coords: ``[N, 2]`` int64 level-0 (x, y) of each patch's top-left corner, or None.
        targets: ``{target_name: LongTensor[1]}`` class index per target column.
            Single-task methods use ``label``; multi-task methods read every target.
        slide_id: the slide's id in the store.
        omics: ``[G]`` float32 omics vector (MoMKD), or None when the slide has no omics row.
        extras: anything else a method may need (e.g. ``patch_index``: int64 ``[N]`` rows of the full bag kept
            by the training subsampling; ``lowres``: uint8 ``[N, h, w, 3]`` images given by hand).
        slide_path: the slide file the patches come from (the store's ``slide_path`` attr), or None when the
            store has none (features imported from a MIL-CSV benchmark, hand-made bags).
        slide_attrs: the store's slide attrs: the patch grid (``patch_size_level0``, ``patch_size`` px,
            ``patch_mpp``, ``grid_origin``), ``slide_mpp``, ... (empty for hand-made bags). With ``coords`` and
            ``slide_path`` they let a method read the bag's pixels (ABMILX E2E, AHDMIL pre-screening).
        survival: ``{task: float64 [2]}`` (time, event) of each survival task (``targets[task]`` is then the time
            bin, or 0 for a Cox task); empty without survival tasks.
        survival_loss: ``{task: "nll" | "incidence" | "cox"}`` of each survival task.
    """

    features: Tensor
    coords: Tensor | None = None
    targets: dict[str, Tensor] = field(default_factory=dict)
    slide_id: str = ""
    omics: Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    slide_path: str | None = None
    slide_attrs: dict[str, Any] = field(default_factory=dict)
    survival: dict[str, Tensor] = field(default_factory=dict)
    survival_loss: dict[str, str] = field(default_factory=dict)

    @property
    def label(self) -> Tensor:
        """``LongTensor[1]`` of the first (or only) target."""
        if not self.targets:
            raise KeyError(f"bag {self.slide_id!r} has no target")
        return next(iter(self.targets.values()))

    def to(self, device: torch.device | str) -> BagBatch:
        """Copy the tensors to ``device`` (non-tensor extras, the slide path and attrs are kept as they are)."""

        def move(v: Any) -> Any:
            return v.to(device, non_blocking=True) if isinstance(v, Tensor) else v

        return replace(
            self,
            features=move(self.features),
            coords=move(self.coords),
            targets={k: move(v) for k, v in self.targets.items()},
            omics=move(self.omics),
            extras={k: move(v) for k, v in self.extras.items()},
            survival={k: move(v) for k, v in self.survival.items()},
        )
