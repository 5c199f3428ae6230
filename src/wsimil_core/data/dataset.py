"""``BagDataset``: bags from the feature store joined with a labels CSV (and optionally an omics table).

Labels CSV: a ``slide_id`` column, one column per target (any values; class names are the sorted unique
values), and optional ``patient_id`` (grouping for splits) and ``split`` (train/val/test) columns.
Omics CSV: a ``slide_id`` column and numeric columns; each vector is standardised with the statistics of the
training split (``fit_omics_stats`` on the training dataset, ``set_omics_stats`` on the others).
"""

from __future__ import annotations

import copy
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch

from wsimil_core.data.bag import BagBatch
from wsimil_core.data.cache import BagCache
from wsimil_core.data.survival import SurvivalSpec, bin_index, bin_names, fit_time_bins, read_survival
from wsimil_core.data.tables import (
    drop_missing_labels,
    is_missing,
    read_omics_table,
    read_table,
    sorted_names,
    value_name,
)
from wsimil_core.errors import DataError, StoreError
from wsimil_core.store.zarr_store import FeatureStore


class BagDataset(torch.utils.data.Dataset):
    """Bags of one cohort as ``BagBatch`` items (batch size 1).

    Each item carries the slide id, its coords, the slide file (the store's ``slide_path``; None for stores
    without one, e.g. MIL-CSV imports) and the store's slide attrs (patch grid), for training, validation and
    test alike, so a method can read the bag's pixels.

    Args:
        store: a ``FeatureStore`` or its path.
        labels: labels CSV path or DataFrame (``slide_id`` + target columns [+ ``patient_id``, ``split``]).
        targets: target column names; the first is ``BagBatch.label``.
        encoder_id: features to read; ``None`` = the store's only encoder (an error when there are several).
        slide_ids: restrict to these slides (default: every labelled slide).
        omics_csv: optional omics table (``slide_id`` + numeric columns).
        max_patches: training subsampling: at most this many patches per bag, a fresh random subset each epoch
            (``set_epoch``), reproducible from ``(seed, epoch, slide_id)``.
        seed: seed of the patch subsampling.
        missing_labels: ``"error"`` (default) or ``"skip"`` (drop the slide with a warning) for empty labels.
        class_names: fixed class names per target (e.g. from a checkpoint) instead of the table's sorted values.
        cache_gb: keep bags in memory after their first read, up to this many GiB in all (0: no cache); views
            made by ``subset`` share the cache (one read per bag in a cross-validation); see ``loader_workers``.
        survival: a time-to-event task (``data/survival.py``): the target named ``survival.task`` is read from its
            time and event columns; its class is the time bin (``nll``) or 0 (``cox``).
    """

    def __init__(
        self,
        store: Any,
        labels: str | Path | pd.DataFrame,
        targets: Sequence[str] = ("label",),
        encoder_id: str | None = None,
        slide_ids: Sequence[str] | None = None,
        omics_csv: str | Path | pd.DataFrame | None = None,
        max_patches: int | None = None,
        seed: int = 0,
        missing_labels: Literal["error", "skip"] = "error",
        class_names: dict[str, list[str]] | None = None,
        cache_gb: float = 0.0,
        survival: SurvivalSpec | None = None,
    ):
        self.store = store if isinstance(store, FeatureStore) else FeatureStore(Path(store))
        self.targets = list(targets)
        if not self.targets:
            raise DataError("BagDataset: at least one target column is needed")
        frame, self.labels_source = read_table(labels, "labels")
        self.survival: dict[str, SurvivalSpec] = {}
        if survival is not None and survival.task in self.targets:
            self.survival[survival.task] = survival
        missing_cols = [t for t in self.targets if t not in frame.columns and t not in self.survival]
        if missing_cols:
            raise DataError(
                f"{self.labels_source}: target column(s) {missing_cols} not found (columns: {list(frame.columns)})"
            )
        full = frame
        if slide_ids is not None:
            wanted = [str(s) for s in slide_ids]
            unknown = sorted(set(wanted) - set(frame["slide_id"]))
            if unknown:
                raise DataError(f"{self.labels_source}: slides not in the labels table: {unknown[:5]}")
            frame = frame.set_index("slide_id").loc[wanted].reset_index()
        kept = [t for t in self.targets if t not in self.survival]  # survival columns: checked by read_survival
        frame = drop_missing_labels(frame, kept, missing_labels, self.labels_source)

        self.class_names: dict[str, list[str]] = {}
        self._surv: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.survival_cuts: dict[str, list[float]] = {}  # shared with subset views (fitted on the training split)
        for t, spec in self.survival.items():
            self._surv[t] = read_survival(frame, spec, self.labels_source)
            self.survival_cuts[t] = fit_time_bins(*self._surv[t], spec.bins) if spec.loss != "cox" else []
        for t in self.targets:
            if t in self.survival:
                names = bin_names(self.survival_cuts[t]) if self.survival[t].loss != "cox" else ["low", "high"]
                self.class_names[t] = names
            elif class_names is not None and t in class_names:
                self.class_names[t] = [str(c) for c in class_names[t]]
            else:
                values = {value_name(v) for v in full[t] if not is_missing(v)}
                self.class_names[t] = sorted_names(values)
        self._labels: dict[str, np.ndarray] = {}
        for t in self.targets:
            if t in self.survival:
                continue
            index = {name: k for k, name in enumerate(self.class_names[t])}
            names = [value_name(v) for v in frame[t]]
            unknown = sorted({n for n in names if n not in index})
            if unknown:
                raise DataError(
                    f"{self.labels_source}: column {t!r} has values {unknown} outside {self.class_names[t]}"
                )
            self._labels[t] = np.array([index[n] for n in names], dtype=np.int64)

        self.slide_ids: list[str] = frame["slide_id"].tolist()
        if not self.slide_ids:
            raise DataError(f"{self.labels_source}: no labelled slides")
        self._groups = (
            frame["patient_id"].astype(str).tolist() if "patient_id" in frame.columns else list(self.slide_ids)
        )
        self._split_values = frame["split"].tolist() if "split" in frame.columns else None

        available = set(self.store.slide_ids())
        absent = [s for s in self.slide_ids if s not in available]
        if absent:
            raise DataError(
                f"{self.labels_source}: {len(absent)} slide(s) are not in the store {self.store_root}: "
                f"{', '.join(absent[:5])}{' ...' if len(absent) > 5 else ''}"
            )
        self.encoder_id = encoder_id or self._only_encoder()
        lacking = [s for s in self.slide_ids if not self.store.has_bag(s, self.encoder_id)]
        if lacking:
            raise StoreError(
                f"{self.store_root}: {len(lacking)} slide(s) have no complete features for encoder "
                f"{self.encoder_id!r}: {', '.join(lacking[:5])}{' ...' if len(lacking) > 5 else ''}; re-run the "
                "extraction/import to (re)do them, or drop them from the labels"
            )
        self.max_patches = max_patches
        self.seed = seed
        self.epoch = 0
        self.cache = BagCache(int(cache_gb * 2**30))  # shared with subset views (data/cache.py)
        self._attrs: dict[str, dict[str, Any]] = {}  # slide attrs, shared with subset views
        first = self.store.read_bag(self.slide_ids[0], self.encoder_id)
        self.in_dim = int(first.features.shape[1])
        self.encoder_attrs: dict[str, Any] = dict(first.encoder_attrs or {})
        self.first_slide_attrs: dict[str, Any] = dict(first.attrs or {})

        self.omics_source: str | None = None
        self.omics_columns: list[str] = []
        self._omics: dict[str, np.ndarray] = {}
        self.omics_stats: tuple[np.ndarray, np.ndarray] | None = None
        self.feature_stats: tuple[np.ndarray, np.ndarray] | None = None
        if omics_csv is not None:
            self._load_omics(omics_csv)
            self.omics_stats = self.fit_omics_stats()

    # --- construction helpers -------------------------------------------------------------------
    @property
    def store_root(self) -> str:
        return str(getattr(self.store, "root", self.store))

    def _only_encoder(self) -> str:
        ids = self.store.encoder_ids(self.slide_ids[0])
        if len(ids) == 1:
            return ids[0]
        if not ids:
            raise StoreError(f"{self.store_root}: slide {self.slide_ids[0]!r} has no features")
        raise StoreError(f"{self.store_root}: several encoders {ids}; choose one with data.encoder")

    def _load_omics(self, omics: str | Path | pd.DataFrame) -> None:
        self.omics_source, self.omics_columns, self._omics = read_omics_table(omics)
        if not any(s in self._omics for s in self.slide_ids):
            raise DataError(
                f"{self.omics_source}: no value of its 'slide_id' column matches a labelled slide of the store "
                f"(omics: {list(self._omics)[:3]}; labels: {self.slide_ids[:3]}); check the slide ids"
            )

    # --- omics standardisation --------------------------------------------------------------------
    @property
    def omics_dim(self) -> int | None:
        """Number of omics columns, or None without an omics table."""
        return len(self.omics_columns) if self.omics_columns else None

    @property
    def n_with_omics(self) -> int:
        """How many of this dataset's slides have a row in the omics table (0 without a table)."""
        return sum(s in self._omics for s in self.slide_ids)

    def fit_omics_stats(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Mean and std ``[G]`` of the omics vectors of this dataset's slides (None when none has omics)."""
        rows = [self._omics[s] for s in self.slide_ids if s in self._omics]
        if not rows:
            return None
        mat = np.stack(rows)
        std = mat.std(axis=0)
        std[std < 1e-8] = 1.0
        return mat.mean(axis=0).astype(np.float32), std.astype(np.float32)

    def set_omics_stats(self, stats: tuple[np.ndarray, np.ndarray] | None) -> None:
        """Standardise with these statistics (those of the training split)."""
        self.omics_stats = stats

    def fit_feature_stats(self) -> tuple[np.ndarray, np.ndarray, int]:
        """Per-feature mean and std ``float32 [D]`` over every patch of this dataset's slides, and the patch count.

        Summed in float64 slide by slide (bags are read once and kept in the bag cache when it has room);
        features with std below 1e-6 get std 1 so they pass through centred. ``max_patches`` does not apply:
        the statistics describe whole bags, as inference sees them.
        """
        total = np.zeros(self.in_dim, dtype=np.float64)
        squares = np.zeros(self.in_dim, dtype=np.float64)
        n = 0
        for slide_id in self.slide_ids:
            features = self._read(slide_id)[0].astype(np.float64)
            total += features.sum(axis=0)
            squares += np.square(features).sum(axis=0)
            n += features.shape[0]
        if n == 0:
            raise DataError(f"{self.store_root}: no patches to fit the feature standardisation on")
        mean = total / n
        std = np.sqrt(np.maximum(squares / n - np.square(mean), 0.0))
        std[std < 1e-6] = 1.0
        return mean.astype(np.float32), std.astype(np.float32), n

    def set_feature_stats(self, stats: tuple[np.ndarray, np.ndarray] | None) -> None:
        """Give every bag as ``(features - mean) / std`` (the training split's statistics); None: raw features."""
        if stats is not None and (len(stats[0]) != self.in_dim or len(stats[1]) != self.in_dim):
            raise DataError(
                f"{self.store_root}: feature standardisation has {len(stats[0])} values, the features have "
                f"{self.in_dim} dimensions"
            )
        self.feature_stats = stats

    # --- views -----------------------------------------------------------------------------------
    def subset(self, slide_ids: Sequence[str], max_patches: int | None = None) -> BagDataset:
        """A view on some of the slides (sharing the bag cache); ``max_patches`` applies to the view only."""
        position = {s: k for k, s in enumerate(self.slide_ids)}
        unknown = [s for s in slide_ids if s not in position]
        if unknown:
            raise DataError(f"{self.labels_source}: slides not in this dataset: {unknown[:5]}")
        rows = [position[s] for s in slide_ids]
        view = copy.copy(self)
        view.slide_ids = [self.slide_ids[k] for k in rows]
        view._labels = {t: v[rows] for t, v in self._labels.items()}
        view._surv = {t: (times[rows], events[rows]) for t, (times, events) in self._surv.items()}
        view._groups = [self._groups[k] for k in rows]
        view._split_values = None if self._split_values is None else [self._split_values[k] for k in rows]
        view.max_patches = max_patches
        return view

    def set_epoch(self, epoch: int) -> None:
        """Epoch of the patch subsampling (a new subset per epoch, reproducible)."""
        self.epoch = epoch

    # --- labels ----------------------------------------------------------------------------------
    def labels(self, target: str | None = None) -> np.ndarray:
        """``int64[B]`` class index per bag of ``target`` (default: the first); survival tasks: the time bin
        (``nll``) or 0 (``cox``)."""
        t = target or self.targets[0]
        if t in self._surv:
            times = self._surv[t][0]
            if self.survival[t].loss == "cox":
                return np.zeros(len(times), dtype=np.int64)
            return bin_index(times, self.survival_cuts[t]).astype(np.int64)
        return self._labels[t]

    def all_labels(self) -> dict[str, np.ndarray]:
        """``{target: int64[B]}``."""
        return {t: self.labels(t) for t in self.targets}

    def survival_data(self, target: str) -> tuple[np.ndarray, np.ndarray]:
        """``(times float64 [B], events int64 [B])`` of survival task ``target``."""
        return self._surv[target]

    def fit_survival_bins(self) -> dict[str, list[float]]:
        """Fit the time bins of every ``nll`` survival task on this dataset's slides (the training split) and set
        them on every view of the cohort (shared). Returns ``{task: cut points}``."""
        for t, spec in self.survival.items():
            if spec.loss != "cox":
                self.survival_cuts[t] = fit_time_bins(*self._surv[t], spec.bins)
                self.class_names[t] = bin_names(self.survival_cuts[t])
        return dict(self.survival_cuts)

    def groups(self) -> list[str]:
        """Patient id per bag (``patient_id`` column, or the slide id)."""
        return list(self._groups)

    def split_values(self) -> list[Any] | None:
        """The ``split`` column per bag, or None when the table has none."""
        return None if self._split_values is None else list(self._split_values)

    def n_classes(self) -> dict[str, int]:
        return {t: len(names) for t, names in self.class_names.items()}

    # --- items -----------------------------------------------------------------------------------
    def _read(self, slide_id: str) -> tuple[np.ndarray, np.ndarray]:
        """Features ``[N, D]`` (float16 or float32, as stored) and coords ``[N, 2]`` int64 of one slide.

        The slide's attrs go to ``self._attrs`` (always kept: a few numbers per slide)."""
        if (cached := self.cache.get(slide_id)) is not None:
            return cached
        bag = self.store.read_bag(slide_id, self.encoder_id)
        features = np.asarray(bag.features)
        if features.dtype not in (np.float16, np.float32):
            features = features.astype(np.float32)
        coords = np.asarray(bag.coords, dtype=np.int64)
        if features.ndim != 2 or features.shape[1] != self.in_dim:
            raise DataError(
                f"{self.store_root}: slide {slide_id!r} has features of shape {features.shape}, "
                f"expected [N, {self.in_dim}]"
            )
        if features.shape[0] == 0:
            raise DataError(f"{self.store_root}: slide {slide_id!r} has an empty bag (no patches)")
        if not np.isfinite(features).all():
            raise DataError(f"{self.store_root}: slide {slide_id!r} has NaN or infinite features")
        self._attrs[slide_id] = dict(bag.attrs or {})
        self.cache.put(slide_id, features, coords)
        return features, coords

    def loader_workers(self, num_workers: int) -> int:
        """DataLoader workers for one pass over this view, after filling the bag cache in this process.

        With ``num_workers > 0`` the uncached bags are read here, in order, until one does not fit the cache (a
        worker's cache would end with the pass: see ``data/cache.py``). Returns 0 when every bag of the view is
        cached (served in this process), else ``num_workers`` (the workers read the bags beyond the budget).
        """
        for slide_id in self.slide_ids if num_workers > 0 else ():
            if self.cache.overflowed:
                break
            self._read(slide_id)
        return 0 if self.cache.holds_all(self.slide_ids) else num_workers

    def __len__(self) -> int:
        return len(self.slide_ids)

    def __getitem__(self, i: int) -> BagBatch:
        slide_id = self.slide_ids[i]
        features, coords = self._read(slide_id)
        attrs = self._attrs.get(slide_id, {})
        extras: dict[str, Any] = {}
        n = features.shape[0]
        if self.max_patches is not None and n > self.max_patches:
            rng = np.random.default_rng([self.seed, self.epoch, zlib.crc32(slide_id.encode())])
            keep = np.sort(rng.choice(n, size=self.max_patches, replace=False))
            features, coords = features[keep], coords[keep]
            extras["patch_index"] = torch.from_numpy(keep.astype(np.int64))
        if self.feature_stats is not None:
            features = (features.astype(np.float32) - self.feature_stats[0]) / self.feature_stats[1]
        omics = None
        if slide_id in self._omics:
            vec = self._omics[slide_id]
            if self.omics_stats is not None:
                vec = (vec - self.omics_stats[0]) / self.omics_stats[1]
            omics = torch.from_numpy(np.ascontiguousarray(vec, dtype=np.float32))
        survival = {
            t: torch.tensor([float(times[i]), float(events[i])], dtype=torch.float64)
            for t, (times, events) in self._surv.items()
        }
        return BagBatch(
            features=torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)),
            coords=torch.from_numpy(np.ascontiguousarray(coords)),
            targets={t: torch.tensor([int(self._label_at(t, i))], dtype=torch.long) for t in self.targets},
            survival=survival,
            survival_loss={t: spec.loss for t, spec in self.survival.items()},
            slide_id=slide_id,
            omics=omics,
            extras=extras,
            slide_path=str(attrs["slide_path"]) if attrs.get("slide_path") else None,
            slide_attrs=dict(attrs),
        )

    def _label_at(self, target: str, i: int) -> int:
        if target in self._surv:
            if self.survival[target].loss == "cox":
                return 0
            return int(bin_index(self._surv[target][0][i : i + 1], self.survival_cuts[target])[0])
        return int(self._labels[target][i])


def collate_single(items: list[BagBatch]) -> BagBatch:
    """DataLoader ``collate_fn`` for batch size 1: the bag itself."""
    if len(items) != 1:
        raise ValueError("bags have different sizes: use batch_size=1 and gradient accumulation")
    return items[0]


__all__ = ["BagDataset", "collate_single"]
