"""The sections of a training config (``method``, ``data`` with its ``split``, ``train`` with its
``early_stopping``, ``output``): typed pydantic models whose field descriptions ``wsimil config`` prints.
``engine.config`` assembles them into ``TrainConfig`` and loads YAML files."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from wsimil_core.data.survival import SurvivalSpec


class StrictModel(BaseModel):
    """A config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class MethodSection(StrictModel):
    """The training recipe (one per paper) and its options."""

    name: str = Field("abmil", description="registered method name (`wsimil models` lists them)")
    options: dict[str, Any] = Field(default_factory=dict, description="method options (validated by the method)")


class SplitSection(StrictModel):
    """How slides are split into train / val / test."""

    kind: Literal["column", "random", "kfold"] = Field(
        "random", description="column: the labels CSV's split column; random: seeded fractions; kfold: K-fold"
    )
    column: str = Field("split", description="kind=column: column holding train/val/test")
    val_frac: float = Field(0.2, ge=0.0, lt=1.0, description="random/kfold: fraction of patients for validation")
    test_frac: float = Field(0.0, ge=0.0, lt=1.0, description="random: fraction of patients held out for testing")
    folds: int = Field(5, ge=2, description="kfold: number of folds (stratified by label, grouped by patient)")
    fold: int = Field(0, ge=0, description="kfold: which fold is the test set")
    seed: int = Field(0, description="seed of the random / K-fold assignment")


class DataSection(StrictModel):
    """Where the features and labels come from."""

    store: Path | None = Field(None, description="feature store directory (zarr)")
    labels: Path | None = Field(None, description="labels CSV: slide_id, target columns, optional patient_id/split")
    encoder: str | None = Field(None, description="encoder id in the store (null: the store's only one)")
    targets: list[str] = Field(default_factory=lambda: ["label"], min_length=1, description="target columns")
    omics: Path | None = Field(None, description="optional omics CSV (slide_id + numeric columns)")
    split: SplitSection = Field(default_factory=SplitSection, description="train/val/test split")
    max_patches: int | None = Field(None, ge=1, description="training: random subset of at most this many patches")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes")
    missing_labels: Literal["error", "skip"] = Field("error", description="empty label cells: error or skip slide")
    cache_gb: float = Field(4.0, ge=0.0, description="keep bags in memory after the first read, up to this many GiB")
    standardize: Literal["auto", "on", "off"] = Field(
        "auto",
        description="per-feature standardisation fitted on the training split: auto (on for MIL-CSV imports), "
        "on or off",
    )
    survival: SurvivalSpec | None = Field(
        None, description="a time-to-event task (task, time, event, loss, bins); see docs/survival.md"
    )


class EarlyStoppingSection(StrictModel):
    """Stop when the validation metric has not improved for `patience` epochs."""

    metric: str = Field("auc", description="validation metric (auc, f1_macro, accuracy, balanced_accuracy, loss)")
    patience: int | None = Field(None, ge=1, description="epochs without improvement before stopping (null: off)")
    mode: Literal["auto", "max", "min"] = Field("auto", description="auto: min for loss, max otherwise")
    min_delta: float = Field(0.0, ge=0.0, description="smallest change that counts as an improvement")


class TrainSection(StrictModel):
    """Optimisation."""

    epochs: int = Field(20, ge=1, description="epochs per phase")
    phase_epochs: dict[str, int] = Field(default_factory=dict, description="epochs of named phases (overrides)")
    lr: float = Field(2e-4, gt=0.0, description="peak learning rate")
    phase_lr: dict[str, float] = Field(
        default_factory=dict,
        description="peak learning rate of named phases (overrides lr and the method's per-phase default)",
    )
    weight_decay: float = Field(1e-4, ge=0.0, description="weight decay")
    optimizer: Literal["adamw", "adam"] = Field("adamw", description="adamw or adam")
    warmup_epochs: float = Field(0.0, ge=0.0, description="linear warm-up length in epochs")
    scheduler: Literal["cosine", "none"] = Field("cosine", description="cosine decay after warm-up, or constant")
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0, description="cosine floor as a fraction of lr")
    grad_clip: float | None = Field(None, gt=0.0, description="clip the gradient norm to this value (null: off)")
    accumulate: int = Field(1, ge=1, description="bags per optimizer step (gradient accumulation)")
    bags_per_step: int = Field(1, ge=1, description="bags whose losses are summed before one backward (Cox risk sets)")
    device: str = Field("auto", description="auto (CUDA when available), cpu, cuda, cuda:1")
    seed: int = Field(0, description="seed of torch, numpy, random and the data order")
    amp: Literal["off", "bf16", "fp16"] = Field("off", description="mixed precision on CUDA (ignored on CPU)")
    early_stopping: EarlyStoppingSection = Field(default_factory=EarlyStoppingSection, description="early stopping")
    threshold: Literal["auto", "val"] | float = Field(
        "auto",
        description="decision threshold of binary tasks: auto (Youden's J on validation when its smaller class "
        "has at least threshold_min_slides slides, else 0.5), val (Youden's J on validation always) or a number",
    )
    threshold_min_slides: int = Field(
        20, ge=1, description="auto threshold: validation slides the smaller class needs before tuning"
    )
    balanced: bool = Field(False, description="class-balanced bag sampling (also when the method asks for it)")
    deterministic: bool = Field(False, description="torch deterministic algorithms (slower on CUDA)")

    @field_validator("phase_lr")
    @classmethod
    def _phase_lr(cls, v: dict[str, float]) -> dict[str, float]:
        bad = {k: x for k, x in v.items() if not x > 0}
        if bad:
            raise ValueError(f"learning rates must be > 0, got {bad}")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v not in ("auto", "cpu", "cuda") and not v.startswith("cuda:") and v != "mps":
            raise ValueError("must be auto, cpu, cuda or cuda:N")
        return v


_KEEP_BOTH: tuple[Literal["best", "last"], ...] = ("best", "last")


class OutputSection(StrictModel):
    """Where the run is written."""

    dir: Path = Field(Path("runs/run"), description="run directory (checkpoints, metrics.csv, metrics.jsonl)")
    keep: list[Literal["best", "last"]] = Field(
        default_factory=lambda: list(_KEEP_BOTH), description="checkpoints to keep: best and/or last"
    )
    overwrite: bool = Field(False, description="start afresh in a directory that holds a finished run")
    progress: bool = Field(True, description="progress bars and per-epoch lines on the console")
    save_interval_s: float = Field(
        30.0,
        ge=0.0,
        description="write checkpoints, metrics.csv and the resume file at most every this many seconds (and at "
        "the end of each phase, and on Ctrl-C or an error: a run still loses at most the epoch it was in); 0: "
        "after every epoch",
    )


__all__ = [
    "StrictModel",
    "MethodSection",
    "SplitSection",
    "DataSection",
    "EarlyStoppingSection",
    "TrainSection",
    "OutputSection",
]
