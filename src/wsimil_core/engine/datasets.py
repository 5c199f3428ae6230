"""The run's data: open the cohort (``BagDataset``) and cut it into train / val / test as ``data.split`` asks.

Survival tasks (``data.survival``): splits are stratified by event and time quantile (the first target), every
non-empty part must hold an event, and the time bins are fitted on the training split.
"""

from __future__ import annotations

import numpy as np

from wsimil_core.data.dataset import BagDataset, read_table
from wsimil_core.data.splits import Split, column_split, kfold_split, random_split
from wsimil_core.data.survival import SurvivalSpec, require_events, time_strata
from wsimil_core.engine.config import TrainConfig
from wsimil_core.errors import ConfigError


def open_cohort(config: TrainConfig) -> BagDataset:
    """The whole labelled cohort of ``config.data`` (store + labels CSV, omics, bag cache), before any split."""
    d = config.data
    if d.store is None or d.labels is None:
        raise ConfigError("data.store and data.labels are required")
    survival = d.survival
    if survival is None and d.targets == ["label"]:  # a CSV with time + event and no label declares survival
        frame, _ = read_table(d.labels, "labels")
        if "label" not in frame.columns and {"time", "event"} <= set(frame.columns):
            survival = SurvivalSpec(task="label")
    return BagDataset(
        d.store,
        d.labels,
        targets=d.targets,
        encoder_id=d.encoder,
        omics_csv=d.omics,
        seed=config.train.seed,
        missing_labels=d.missing_labels,
        cache_gb=d.cache_gb,
        survival=survival,
    )


def split_strata(dataset: BagDataset) -> np.ndarray:
    """Stratification labels of the splits: the first target's class, or for a survival task
    ``event * 2 + time half`` (``data.survival.time_strata``)."""
    first = dataset.targets[0]
    if first in dataset.survival:
        return time_strata(*dataset.survival_data(first))
    return dataset.labels()


def make_split(config: TrainConfig, dataset: BagDataset) -> Split:
    """The train/val/test split the config asks for."""
    s = config.data.split
    if s.kind == "column":
        values = dataset.split_values() if s.column == "split" else None
        if values is None:
            if config.data.labels is None:
                raise ConfigError("data.split.kind 'column' needs data.labels")
            frame, source = read_table(config.data.labels, "labels")
            if s.column not in frame.columns:
                raise ConfigError(f"data.split.column: {source} has no column {s.column!r}")
            by_id = dict(zip(frame["slide_id"], frame[s.column]))
            values = [by_id[sid] for sid in dataset.slide_ids]
        return column_split(dataset.slide_ids, values, dataset.labels_source)
    if s.kind == "random":
        return random_split(dataset.slide_ids, split_strata(dataset), dataset.groups(), s.val_frac, s.test_frac, s.seed)
    return kfold_split(dataset.slide_ids, split_strata(dataset), dataset.groups(), s.folds, s.fold, s.val_frac, s.seed)


def build_datasets(
    config: TrainConfig, full: BagDataset | None = None
) -> tuple[BagDataset, dict[str, BagDataset | None], Split]:
    """Open the cohort and cut it into ``{"train", "val", "test"}`` datasets (val/test None when empty).

    Omics vectors are standardised with the training split's statistics. ``full`` reuses an opened cohort
    (cross-validation shares one bag cache across folds).
    """
    if full is None:
        full = open_cohort(config)
    split = make_split(config, full)
    train = full.subset(split.train, max_patches=config.data.max_patches)
    stats = train.fit_omics_stats() if full.omics_dim else None
    parts: dict[str, BagDataset | None] = {"train": train}
    for name in ("val", "test"):
        ids = getattr(split, name)
        parts[name] = full.subset(ids) if ids else None
    for ds in parts.values():
        if ds is not None:
            ds.set_omics_stats(stats)
    if full.survival:
        for name, ds in parts.items():
            for task, spec in full.survival.items():
                if ds is not None:
                    where = f"{full.labels_source}: the {name} split ({config.data.split.kind})"
                    require_events(ds.survival_data(task)[1], ds.slide_ids, spec, where)
        train.fit_survival_bins()
    return full, parts, split
