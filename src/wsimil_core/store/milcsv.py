"""Classic MIL benchmark CSVs (MUSK, Elephant, Fox, Tiger, UCSB breast cancer, ...) -> feature store + labels CSV.

Format: no header; column 0 the bag label, column 1 the bag id, columns 2.. the instance features; one row per
instance, a bag's rows usually contiguous. Bag labels written as ``0/1`` or ``-1/1`` are mapped to 0/1 (the
mapping found is reported). Each bag becomes one slide group ``<prefix>_<bag id>`` whose instances are laid out on
a square pseudo-grid (instance i at column ``i % side``, row ``i // side``, x, y = col * 256, row * 256; patch size
256 px at a pseudo 0.5 µm/px), so every method and viewer that expects coordinates works on these benchmarks.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from wsimil_core._io import atomic_write_text
from wsimil_core.errors import DataError
from wsimil_core.store.zarr_store import FeatureStore, safe_slide_id

__all__ = ["MilCsvSummary", "read_mil_csv", "import_mil_csv", "grid_coords"]

PSEUDO_PATCH = 256
PSEUDO_MPP = 0.5


@dataclass
class MilCsvSummary:
    """What ``import_mil_csv`` did."""

    n_bags: int
    n_instances: int
    n_features: int
    n_positive: int
    label_mapping: str  # e.g. "{0,1} -> 0/1 (as is)" or "{-1,1} -> -1 becomes 0"
    slide_ids: list[str]
    labels_csv: Path
    warnings: list[str] = field(default_factory=list)


def grid_coords(n: int, patch: int = PSEUDO_PATCH) -> np.ndarray:
    """``[n, 2]`` int64 (x, y) of ``n`` instances on a square grid: side = ceil(sqrt(n)), i -> (i % side, i // side)."""
    side = max(1, math.ceil(math.sqrt(n)))
    i = np.arange(n, dtype=np.int64)
    return np.stack([(i % side) * patch, (i // side) * patch], axis=1)


def _bag_name(value: float | str) -> str:
    try:
        f = float(value)
        if math.isfinite(f) and f == int(f):
            return str(int(f))
    except (TypeError, ValueError):
        pass
    return str(value).strip()


def read_mil_csv(path: str | os.PathLike) -> tuple[np.ndarray, list[str], np.ndarray, str]:
    """Parse a MIL CSV.

    Returns:
        ``(labels01 [I] int64 per instance, bag_ids [I] str, features [I, D] float32, mapping description)``.

    Raises:
        DataError: missing/empty file, a header or non-numeric cells, ragged rows, or labels that are neither
            0/1 nor -1/1.
    """
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: MIL CSV file does not exist")
    try:
        df = pd.read_csv(path, header=None, dtype=str, skipinitialspace=True)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: the file is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a CSV file ({exc})") from None
    if df.shape[1] < 3:
        raise DataError(f"{path}: expected >= 3 columns (label, bag id, features...), got {df.shape[1]}")
    try:
        feats = df.iloc[:, 2:].astype(np.float64).to_numpy()
        raw = df.iloc[:, 0].astype(np.float64).to_numpy()
    except ValueError:
        row = df.iloc[0].tolist()
        raise DataError(
            f"{path}: non-numeric label or feature cells (a header row? the format has none; first row: {row[:4]}...)"
        ) from None
    if np.isnan(feats).any() or np.isnan(raw).any():
        bad = int(np.argwhere(np.isnan(feats).any(axis=1) | np.isnan(raw))[0, 0]) + 1
        raise DataError(f"{path}: missing values (first at line {bad}); every row needs the same number of columns")
    values = sorted(set(np.unique(raw).tolist()))
    if set(values) <= {0.0, 1.0}:
        labels, mapping = raw.astype(np.int64), "labels {0, 1}: used as is (1 = positive)"
    elif set(values) <= {-1.0, 1.0}:
        labels, mapping = (raw > 0).astype(np.int64), "labels {-1, 1}: -1 -> 0, 1 -> 1 (1 = positive)"
    else:
        raise DataError(
            f"{path}: column 0 (bag label) has values {values[:6]}; expected 0/1 or -1/1 (binary MIL benchmarks)"
        )
    bag_ids = [_bag_name(v) for v in df.iloc[:, 1].tolist()]
    return labels, bag_ids, feats.astype(np.float32), mapping


def _write_labels(path: Path, rows: list[tuple[str, int]]) -> None:
    atomic_write_text(path, "slide_id,label\n" + "".join(f"{s},{y}\n" for s, y in rows))


def import_mil_csv(
    csv_path: str | os.PathLike,
    store: str | os.PathLike | FeatureStore,
    labels_csv: str | os.PathLike,
    name: str | None = None,
    encoder_id: str = "milcsv",
    progress: bool = True,
) -> MilCsvSummary:
    """Import a MIL CSV into a feature store and write ``labels_csv`` (``slide_id,label``).

    Args:
        csv_path: the benchmark CSV.
        store: a store directory (created when missing) or an open ``FeatureStore``.
        labels_csv: where to write ``slide_id,label``.
        name: slide id prefix (default: the CSV file stem), ids are ``<name>_<bag id>``.
        encoder_id: the encoder id the features are stored under.
        progress: show a progress bar.

    A bag whose instances carry different labels gets the maximum (the standard MIL assumption: positive if
    any instance is) and a warning in the summary.
    """
    csv_path = Path(csv_path)
    labels, bag_ids, feats, mapping = read_mil_csv(csv_path)
    prefix = safe_slide_id(name if name is not None else csv_path.stem)
    fs = store if isinstance(store, FeatureStore) else FeatureStore(store, create=True)

    order: dict[str, list[int]] = {}
    for i, b in enumerate(bag_ids):
        order.setdefault(b, []).append(i)
    warnings = []
    rows: list[tuple[str, int]] = []
    seen: dict[str, str] = {}
    items = list(order.items())
    it = items
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(items, desc=f"import {csv_path.name}", unit="bag")
    for bag, idx in it:
        sid = safe_slide_id(f"{prefix}_{bag}")
        if sid in seen:
            raise DataError(f"{csv_path}: bag ids {seen[sid]!r} and {bag!r} both map to slide id {sid!r}")
        seen[sid] = bag
        bag_labels = labels[idx]
        y = int(bag_labels.max())
        if bag_labels.min() != bag_labels.max():
            warnings.append(f"bag {bag!r} has mixed instance labels; bag label = 1 (positive if any instance is)")
        n = len(idx)
        coords = grid_coords(n)
        side = max(1, math.ceil(math.sqrt(n)))
        fs.write_bag(
            sid,
            feats[idx],
            coords,
            encoder_id,
            {"name": "mil-csv", "source_file": str(csv_path.resolve()), "weights_sha256": "none", "mpp": PSEUDO_MPP},
            overwrite=True,
            slide_path=None,
            source="mil-csv",
            source_file=str(csv_path.resolve()),
            bag_id=bag,
            slide_mpp=PSEUDO_MPP,
            patch_mpp=PSEUDO_MPP,
            patch_size=PSEUDO_PATCH,
            patch_size_level0=PSEUDO_PATCH,
            stride_level0=PSEUDO_PATCH,
            grid_origin=[0, 0],
            level0_size=[side * PSEUDO_PATCH, math.ceil(n / side) * PSEUDO_PATCH],
            pseudo_coords=True,
        )
        rows.append((sid, y))
    labels_csv = Path(labels_csv)
    _write_labels(labels_csv, rows)
    return MilCsvSummary(
        n_bags=len(rows),
        n_instances=int(labels.shape[0]),
        n_features=int(feats.shape[1]),
        n_positive=sum(y for _, y in rows),
        label_mapping=mapping,
        slide_ids=[s for s, _ in rows],
        labels_csv=labels_csv,
        warnings=warnings,
    )
