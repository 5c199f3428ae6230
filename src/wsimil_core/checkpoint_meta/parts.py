"""The parts of :class:`wsimil_core.checkpoint_meta.CheckpointMeta`: thresholds, tasks, encoder, grid, store, and
the constants and small helpers the migration shares."""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

FORMAT_PREFIX = "checkpoint/"
CHECKPOINT_FORMAT = "checkpoint/2"
LEGACY_FORMATS = ("checkpoint/1",)
DEFAULT_TARGET = "label"
DEFAULT_THRESHOLD = 0.5

# how a threshold was chosen (ThresholdMeta.method)
THRESHOLD_DEFAULT = "default 0.5"
THRESHOLD_YOUDEN_VAL = "youden on validation"
THRESHOLD_FIXED = "fixed by train.threshold"
THRESHOLD_FEW_SLIDES = "default 0.5 (too few validation slides to tune)"
THRESHOLD_EXTENSION = "youden on validation (task extension)"


class _Meta(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ThresholdMeta(_Meta):
    """Decision threshold on P(class 1) of a binary task, and how it was chosen.

    Attributes:
        value: the threshold (unused by tasks with more than two classes: they predict the arg-max).
        method: how it was chosen: ``"youden on validation"``, ``"fixed by train.threshold"``, ``"default 0.5"``...
        n_slides: number of validation slides it was chosen on (None when not known).
    """

    value: float = DEFAULT_THRESHOLD
    method: str = THRESHOLD_DEFAULT
    n_slides: int | None = None

    @field_validator("value", mode="before")
    @classmethod
    def _finite_number(cls, v: Any) -> float:
        """A finite number (a string such as ``"abc"`` or ``"0.3"``, a bool or NaN is corrupt metadata)."""
        if finite_number(v) is None:
            raise ValueError(f"must be a finite number, got {v!r}")
        return float(v)


class TaskMeta(_Meta):
    """One classification task of the model: its class names (index order of the logits) and threshold."""

    class_names: list[str]
    threshold: ThresholdMeta = Field(default_factory=ThresholdMeta)


class EncoderMeta(BaseModel):
    """The patch encoder the features were extracted with (``features.encoders.EncoderSpec`` attrs).

    Unknown keys (e.g. the store's ``dtype``) are kept. ``weights_path`` is informational: the encoder is rebuilt
    from ``name`` and checked against ``weights_sha256``.
    """

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    name: str | None = None
    encoder_id: str | None = None
    dim: int | None = None
    input_size: int | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    weights_sha256: str | None = None
    weights_path: str | None = None
    mpp: float | None = None
    patch: int | None = None

    def attrs(self) -> dict[str, Any]:
        """The plain dict (``EncoderSpec.from_attrs`` accepts it)."""
        return self.model_dump(mode="json", exclude_none=True)


class GridMeta(_Meta):
    """The patch grid the model was trained on.

    Attributes:
        patch_mpp: µm per pixel of the patches; patch_px: patch side in px at that mpp; stride_px: grid step in
            px at that mpp (None = ``patch_px``).
        patch_size_level0, stride_level0: the same in level-0 px of the training slides (informational: it
            depends on each slide's mpp).
        min_tissue: tissue fraction a cell needed; tissue: ``TissueParams`` as a dict (None = defaults).
    """

    patch_mpp: float
    patch_px: int
    stride_px: int | None = None
    patch_size_level0: int | None = None
    stride_level0: int | None = None
    min_tissue: float | None = None
    tissue: dict[str, Any] | None = None

    @property
    def stride(self) -> int:
        """Grid step in px at ``patch_mpp``."""
        return int(self.stride_px if self.stride_px is not None else self.patch_px)

    @classmethod
    def from_slide_attrs(cls, attrs: dict[str, Any]) -> GridMeta | None:
        """The grid of a feature-store slide group's attrs (``patch_mpp``, ``patch_size``, ``patch_size_level0``,
        ``stride_level0``, ``min_tissue``, ``tissue``); None when the patch mpp or size is missing."""
        mpp, px = finite_number(attrs.get("patch_mpp")), finite_number(attrs.get("patch_size"))
        if mpp is None or px is None:
            return None
        fields: dict[str, Any] = {
            "patch_mpp": mpp,
            "patch_px": int(px),
            "min_tissue": finite_number(attrs.get("min_tissue")),
        }
        s0, p0 = finite_number(attrs.get("stride_level0")), finite_number(attrs.get("patch_size_level0"))
        if s0 and p0:
            fields.update(stride_px=int(round(s0 / p0 * int(px))), patch_size_level0=int(p0), stride_level0=int(s0))
        tissue = attrs.get("tissue")
        if isinstance(tissue, dict):
            fields["tissue"] = dict(tissue)
        return cls(**fields)


class StoreRef(_Meta):
    """The feature store a checkpoint was trained on (its directory and the features' encoder id)."""

    path: str | None = None
    encoder_id: str | None = None


class FeatureStatsMeta(_Meta):
    """Per-feature standardisation fitted on the training split (``data.standardize``): the model sees
    ``(x - mean) / std``, so inference applies the same statistics to every patch feature.

    Attributes:
        mean, std: ``[D]`` per-feature mean and standard deviation (std > 0; constant features get 1).
        n_patches: patches the statistics were fitted on.
    """

    mean: list[float]
    std: list[float]
    n_patches: int = 0

    @field_validator("mean", "std")
    @classmethod
    def _finite(cls, v: list[float]) -> list[float]:
        if any(finite_number(x) is None for x in v):
            raise ValueError("must hold finite numbers only")
        return [float(x) for x in v]

    @field_validator("std")
    @classmethod
    def _positive(cls, v: list[float]) -> list[float]:
        if any(x <= 0 for x in v):
            raise ValueError("must be positive")
        return v

    @model_validator(mode="after")
    def _same_length(self) -> FeatureStatsMeta:
        if len(self.mean) != len(self.std):
            raise ValueError(f"mean has {len(self.mean)} values but std has {len(self.std)}")
        return self


def safe_method_name(method: str) -> str:
    """``method`` with every character but letters, digits, ``-`` and ``_`` replaced by ``_`` (id prefix)."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in (method or "model"))


def default_class_names(model_kwargs: dict[str, Any], task: str, n_classes: int | None) -> list[str]:
    """``"0".."C-1"``: C = ``n_classes``, else the model config's classes for ``task`` (``tasks``/``n_classes``)."""
    if n_classes is None:
        tasks = model_kwargs.get("tasks")
        if isinstance(tasks, dict) and task in tasks:
            n_classes = int(tasks[task])
        else:
            n_classes = int(model_kwargs.get("n_classes", 2))
    return [str(i) for i in range(n_classes)]


def finite_number(value: Any) -> float | None:
    """``value`` as a float when it is a finite int/float (not a bool, string or NaN), else None."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


__all__ = [
    "FORMAT_PREFIX",
    "CHECKPOINT_FORMAT",
    "LEGACY_FORMATS",
    "DEFAULT_TARGET",
    "DEFAULT_THRESHOLD",
    "THRESHOLD_DEFAULT",
    "THRESHOLD_YOUDEN_VAL",
    "THRESHOLD_FIXED",
    "THRESHOLD_FEW_SLIDES",
    "THRESHOLD_EXTENSION",
    "EncoderMeta",
    "GridMeta",
    "StoreRef",
    "FeatureStatsMeta",
    "TaskMeta",
    "ThresholdMeta",
    "default_class_names",
    "finite_number",
    "safe_method_name",
]
