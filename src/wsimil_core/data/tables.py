"""Reading the tables joined to a feature store: labels / splits CSVs (``read_table``) and omics CSVs
(``read_omics_table``), and how label cells become class names."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from wsimil_core.errors import DataError


def value_name(value: Any) -> str:
    """Class name of one label value (``1.0`` read by pandas from an int column with gaps -> ``"1"``)."""
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    if isinstance(value, (np.integer,)):
        return str(int(value))
    return str(value).strip()


def sorted_names(names: set[str]) -> list[str]:
    """Sort numerically when every name is a number, else lexicographically."""
    try:
        return sorted(names, key=float)
    except ValueError:
        return sorted(names)


def is_missing(value: Any) -> bool:
    """An empty label cell: None, NaN or blank text."""
    if value is None:
        return True
    if isinstance(value, (float, np.floating)) and np.isnan(value):
        return True
    return isinstance(value, str) and value.strip() == ""


def read_table(table: str | Path | pd.DataFrame, what: str) -> tuple[pd.DataFrame, str]:
    """Read a CSV (or take a DataFrame) that must have a ``slide_id`` column; returns (frame, source name)."""
    if isinstance(table, pd.DataFrame):
        frame, source = table.copy(), f"{what} table"
    else:
        path = Path(table)
        source = str(path)
        if not path.is_file():
            raise DataError(f"{path}: {what} file not found")
        try:
            frame = pd.read_csv(path, dtype={"slide_id": str, "patient_id": str, "split": str})
        except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
            raise DataError(f"{path}: cannot read {what} CSV: {exc}") from None
    if "slide_id" not in frame.columns:
        raise DataError(f"{source}: no 'slide_id' column (columns: {list(frame.columns)[:10]})")
    frame["slide_id"] = frame["slide_id"].astype(str).str.strip()
    dup = frame["slide_id"][frame["slide_id"].duplicated()].tolist()
    if dup:
        raise DataError(f"{source}: slide ids listed more than once: {dup[:5]}")
    return frame, source


def read_omics_table(omics: str | Path | pd.DataFrame) -> tuple[str, list[str], dict[str, np.ndarray]]:
    """An omics CSV (``slide_id`` + numeric columns): ``(source, columns, {slide_id: float32 [G]})``.

    Raises:
        DataError: no omics column, a non-numeric column, or NaN / infinite cells (naming column and slides).
    """
    frame, source = read_table(omics, "omics")
    columns = [c for c in frame.columns if c != "slide_id"]
    if not columns:
        raise DataError(f"{source}: no omics columns besides slide_id")
    for c in columns:
        if not pd.api.types.is_numeric_dtype(frame[c]):
            raise DataError(f"{source}: omics column {c!r} is not numeric")
        bad = frame["slide_id"][frame[c].isna()].tolist()
        if bad:
            raise DataError(f"{source}: omics column {c!r} has NaN/empty values (slides {bad[:5]})")
    values = frame[columns].to_numpy(dtype=np.float32)
    finite = np.isfinite(values)
    if not finite.all():
        rows, cols = np.nonzero(~finite)
        c = columns[int(cols[0])]
        bad = [str(frame["slide_id"].iloc[int(r)]) for r in rows[cols == cols[0]]]
        raise DataError(
            f"{source}: omics column {c!r} has infinite values (or values too large for float32) in the rows "
            f"of slide_id {bad[:5]}"
        )
    return source, columns, {sid: values[k] for k, sid in enumerate(frame["slide_id"])}


def drop_missing_labels(frame: pd.DataFrame, targets: list[str], mode: str, source: str) -> pd.DataFrame:
    """The rows of a labels table with a value in every one of ``targets``.

    ``mode``: ``"skip"`` drops a row lacking one (a warning naming the slide and column), ``"error"`` raises a
    ``DataError`` naming ``source``, the slide and the column.
    """
    keep = np.ones(len(frame), dtype=bool)
    for t in targets:
        for row, (sid, value) in enumerate(zip(frame["slide_id"], frame[t])):
            if keep[row] and is_missing(value):
                if mode != "skip":
                    raise DataError(
                        f"{source}: slide {sid!r} has no value in column {t!r} "
                        "(fill it, remove the row, or set data.missing_labels: skip)"
                    )
                warnings.warn(f"{source}: slide {sid!r} has no value in column {t!r}; skipped", stacklevel=2)
                keep[row] = False
    return frame[keep].reset_index(drop=True)


__all__ = ["drop_missing_labels", "read_table", "read_omics_table", "value_name", "sorted_names", "is_missing"]
