"""The run's data: open the cohort (``BagDataset``) and cut it into train / val / test as ``data.split`` asks.

Survival tasks (``data.survival``): splits are stratified by event and time quantile (the first target), every
non-empty part must hold an event, and the time bins are fitted on the training split.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from wsimil_core.checkpoint_meta import CheckpointMeta, FeatureStatsMeta
from wsimil_core.data.dataset import BagDataset
from wsimil_core.data.splits import Split, column_split, kfold_split, random_split
from wsimil_core.data.survival import SurvivalSpec, require_events, time_strata
from wsimil_core.data.tables import read_table
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


MIL_CSV_ENCODER = "mil-csv"


def standardize_features(
    config: TrainConfig,
    full: BagDataset,
    parts: dict[str, BagDataset | None],
    loaded: Sequence[tuple[str, CheckpointMeta]] = (),
) -> tuple[FeatureStatsMeta | None, str]:
    """Fit (or inherit) the per-feature standardisation of ``data.standardize`` and apply it to every split.

    The statistics are fitted on the training split only. A run that starts from checkpoints (``loaded``: a
    teacher, the model a task is added to) must feed them the features they were trained on, so it inherits their
    statistics; ``data.standardize`` set explicitly against them is a ``ConfigError`` naming the checkpoint.
    ``auto`` standardises MIL-CSV imports (raw tabular features of any scale) and leaves encoder features as they
    are. Returns ``(statistics or None, a sentence for the log)``.
    """
    mode = config.data.standardize
    stats: FeatureStatsMeta | None
    if loaded:
        first_path, first = loaded[0]
        for path, meta in loaded[1:]:
            if meta.feature_stats != first.feature_stats:
                raise ConfigError(f"{path} and {first_path} were trained on differently standardised features")
        stats = first.feature_stats
        if (mode == "on" and stats is None) or (mode == "off" and stats is not None):
            state = "standardised" if stats is not None else "raw"
            raise ConfigError(
                f"data.standardize: {mode!r}, but {first_path} was trained on {state} features; "
                "use data.standardize: auto to follow the checkpoint"
            )
        why = f"inherited from {first_path}" if stats is not None else f"off, as in {first_path}"
    else:
        on = mode == "on" or (mode == "auto" and full.encoder_attrs.get("name") == MIL_CSV_ENCODER)
        if not on:
            return None, "feature standardisation off"
        train = parts["train"]
        if train is None:
            raise ConfigError("data.standardize needs a training split")
        mean, std, n = train.fit_feature_stats()
        stats = FeatureStatsMeta(mean=mean.tolist(), std=std.tolist(), n_patches=n)
        why = f"fitted on {n} patches of {len(train)} training slides"
    if stats is None:
        return None, f"feature standardisation {why}"
    pair = (np.asarray(stats.mean, dtype=np.float32), np.asarray(stats.std, dtype=np.float32))
    for ds in parts.values():
        if ds is not None:
            ds.set_feature_stats(pair)
    return stats, f"features standardised ({why})"
