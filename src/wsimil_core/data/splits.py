"""Train / validation / test splits of a cohort: by a ``split`` column, by seeded random fractions, or K-fold.

Every split is grouped by patient (all slides of one patient land in the same part) and, where possible,
stratified by the first target's label. A split is a ``Split`` of three lists of slide ids.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from wsimil_core.errors import DataError


@dataclass
class Split:
    """Slide ids of each part. ``val`` and ``test`` may be empty."""

    train: list[str] = field(default_factory=list)
    val: list[str] = field(default_factory=list)
    test: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, list[str]]:
        return {"train": list(self.train), "val": list(self.val), "test": list(self.test)}

    def check(self, what: str) -> Split:
        """A clear error when training is empty or the parts overlap."""
        if not self.train:
            raise DataError(f"{what}: the training split is empty")
        for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
            both = set(getattr(self, a)) & set(getattr(self, b))
            if both:
                raise DataError(f"{what}: slides in both {a} and {b}: {sorted(both)[:5]}")
        return self


def column_split(slide_ids: Sequence[str], values: Sequence[object], source: str = "labels") -> Split:
    """Split by a column whose values are ``train``, ``val`` (or ``valid``/``validation``) and ``test``.

    Args:
        slide_ids: ``[B]`` slide ids.
        values: ``[B]`` the column's value per slide (case-insensitive; empty/NaN rows are left out).
        source: file name used in error messages.
    """
    aliases = {
        "train": "train",
        "training": "train",
        "val": "val",
        "valid": "val",
        "validation": "val",
        "test": "test",
        "testing": "test",
    }
    split = Split()
    bad: list[str] = []
    for sid, value in zip(slide_ids, values):
        if value is None or (isinstance(value, float) and np.isnan(value)) or str(value).strip() == "":
            continue
        part = aliases.get(str(value).strip().lower())
        if part is None:
            bad.append(f"{sid}={value!r}")
            continue
        getattr(split, part).append(str(sid))
    if bad:
        raise DataError(f"{source}: split column values must be train/val/test; got {', '.join(bad[:5])}")
    return split.check(f"{source} (split column)")


def _patient_table(labels: np.ndarray, groups: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Unique patients (in first-seen order) and one label per patient (its first slide's label)."""
    patients: list[str] = []
    patient_label: dict[str, int] = {}
    for label, group in zip(labels, groups):
        if group not in patient_label:
            patient_label[group] = int(label)
            patients.append(group)
    return patients, np.array([patient_label[p] for p in patients], dtype=np.int64)


def random_split(
    slide_ids: Sequence[str],
    labels: np.ndarray,
    groups: Sequence[str] | None = None,
    val_frac: float = 0.2,
    test_frac: float = 0.0,
    seed: int = 0,
) -> Split:
    """Seeded random split by patient, stratified by label.

    Patients of each class are shuffled with ``seed`` and the first ``round(n * test_frac)`` go to test, the
    next ``round(n * val_frac)`` to validation, the rest to training.

    Args:
        slide_ids: ``[B]`` slide ids.
        labels: ``[B]`` int class index per slide (first target).
        groups: ``[B]`` patient id per slide (default: one patient per slide).
    """
    if not 0 <= val_frac < 1 or not 0 <= test_frac < 1 or val_frac + test_frac >= 1:
        raise DataError(f"random split: val_frac={val_frac} and test_frac={test_frac} must be in [0, 1) with sum < 1")
    slide_ids = [str(s) for s in slide_ids]
    groups = [str(g) for g in (groups if groups is not None else slide_ids)]
    patients, patient_labels = _patient_table(np.asarray(labels), groups)
    rng = np.random.default_rng(seed)
    part_of: dict[str, str] = {}
    for cls in np.unique(patient_labels):
        members = [p for p, lab in zip(patients, patient_labels) if lab == cls]
        order = rng.permutation(len(members))
        n_test = int(round(len(members) * test_frac))
        n_val = int(round(len(members) * val_frac))
        for rank, k in enumerate(order):
            part_of[members[k]] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    split = Split()
    for sid, group in zip(slide_ids, groups):
        getattr(split, part_of[group]).append(sid)
    return split.check("random split")


def _stratified_group_folds(labels: np.ndarray, groups: Sequence[str], k: int, seed: int) -> list[np.ndarray]:
    """``k`` arrays of slide indices (the held-out part of each fold), stratified and grouped."""
    from sklearn.model_selection import StratifiedGroupKFold

    n_groups = len(set(groups))
    if k < 2:
        raise DataError(f"K-fold split: folds must be >= 2, got {k}")
    if n_groups < k:
        raise DataError(f"K-fold split: {k} folds need at least {k} patients, the cohort has {n_groups}")
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class")
        return [test for _, test in splitter.split(np.zeros(len(labels)), labels, groups)]


def kfold_split(
    slide_ids: Sequence[str],
    labels: np.ndarray,
    groups: Sequence[str] | None = None,
    folds: int = 5,
    fold: int = 0,
    val_frac: float = 0.1,
    seed: int = 0,
) -> Split:
    """Fold ``fold`` of a K-fold split stratified by label and grouped by patient (sklearn StratifiedGroupKFold).

    The held-out fold is the test set. When ``val_frac > 0`` a validation set (for early stopping and the
    decision threshold) is carved out of the remaining training patients by an inner stratified, grouped split
    into ``round(1 / val_frac)`` parts (one of them is validation).
    """
    if not 0 <= fold < folds:
        raise DataError(f"K-fold split: fold {fold} is outside 0..{folds - 1}")
    slide_ids = [str(s) for s in slide_ids]
    labels = np.asarray(labels)
    groups = [str(g) for g in (groups if groups is not None else slide_ids)]
    test_idx = _stratified_group_folds(labels, groups, folds, seed)[fold]
    held = set(test_idx.tolist())
    rest = np.array([i for i in range(len(slide_ids)) if i not in held], dtype=np.int64)
    val_idx = np.array([], dtype=np.int64)
    if val_frac > 0:
        inner = max(2, int(round(1.0 / val_frac)))
        rest_groups = [groups[i] for i in rest]
        inner = min(inner, len(set(rest_groups)))
        if inner >= 2:
            val_idx = rest[_stratified_group_folds(labels[rest], rest_groups, inner, seed + 1)[0]]
    val_set = set(val_idx.tolist())
    return Split(
        train=[slide_ids[i] for i in rest if i not in val_set],
        val=[slide_ids[i] for i in sorted(val_set)],
        test=[slide_ids[i] for i in sorted(held)],
    ).check(f"K-fold split (fold {fold} of {folds})")


__all__ = ["Split", "column_split", "random_split", "kfold_split"]
