"""Survival targets: time and event columns of a labels CSV, their validation and the quantile time bins.

A survival task is declared by ``data.survival`` (a :class:`SurvivalSpec`: task name, time and event columns,
loss, number of bins); a labels CSV with ``time`` and ``event`` columns and no ``label`` column declares one with
the defaults. The task's "class" of a slide is its time bin (discrete-time loss) or 0 (Cox), so class-based code
(balanced sampling, stratification) still runs; time and event travel in ``BagBatch.survival``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from wsimil_core.errors import DataError

SurvivalLoss = Literal["nll", "incidence", "cox"]
BINNED_LOSSES = ("nll", "incidence")  # losses over time bins (one logit per bin)


class SurvivalSpec(BaseModel):
    """A time-to-event task: which columns, which loss."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    task: str = Field("survival", description="task name (listed in data.targets; 'survival' by default)")
    time: str = Field("time", description="labels CSV column of the event or censoring time (>= 0)")
    event: str = Field("event", description="labels CSV column of the event indicator (1 = event, 0 = censored)")
    loss: SurvivalLoss = Field(
        "nll",
        description="nll: discrete-time hazard likelihood over quantile bins; incidence: softmax over the bins "
        "(ASMIL App. N); cox: Cox partial likelihood",
    )
    bins: int = Field(4, ge=2, le=64, description="nll/incidence: time bins (quantiles of the training event times)")


def read_survival(
    frame: pd.DataFrame, spec: SurvivalSpec, source: str, slide_ids: Sequence[str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(times float64 [B], events int64 [B])`` of ``frame`` (rows in order), validated.

    Raises:
        DataError: a missing column, or missing/negative/non-numeric times, or events other than 0/1; the message
            names the file, the column and the first slides (rows) at fault.
    """
    ids = list(slide_ids) if slide_ids is not None else [str(s) for s in frame["slide_id"]]
    for col in (spec.time, spec.event):
        if col not in frame.columns:
            raise DataError(
                f"{source}: survival task {spec.task!r} needs column {col!r} (columns: {list(frame.columns)[:10]})"
            )
    times = pd.to_numeric(frame[spec.time], errors="coerce").to_numpy(dtype=np.float64)
    bad = [ids[i] for i in np.flatnonzero(~np.isfinite(times))]
    if bad:
        raise DataError(f"{source}: column {spec.time!r} is missing or not a number in the rows of slides {bad[:5]}")
    bad = [ids[i] for i in np.flatnonzero(times < 0)]
    if bad:
        raise DataError(f"{source}: column {spec.time!r} has negative times in the rows of slides {bad[:5]}")
    raw = pd.to_numeric(frame[spec.event], errors="coerce").to_numpy(dtype=np.float64)
    bad = [ids[i] for i in np.flatnonzero(~np.isin(raw, (0.0, 1.0)))]
    if bad:
        raise DataError(
            f"{source}: column {spec.event!r} must be 0 (censored) or 1 (event); other or missing values in the rows "
            f"of slides {bad[:5]}"
        )
    return times, raw.astype(np.int64)


def require_events(events: np.ndarray, slide_ids: Sequence[str], spec: SurvivalSpec, where: str) -> None:
    """A ``DataError`` when ``where`` (a split part or a fold) has slides but no event."""
    if len(events) and not np.any(events == 1):
        raise DataError(
            f"{where}: column {spec.event!r} has no event (all {len(events)} slides censored: "
            f"{list(slide_ids)[:5]}{' ...' if len(events) > 5 else ''}); C-index and the loss need events "
            "(use fewer folds or another split seed)"
        )


def fit_time_bins(times: np.ndarray, events: np.ndarray, n_bins: int) -> list[float]:
    """The ``n_bins - 1`` inner cut points: quantiles of the event times (all times when there is no event).

    Bin ``k`` is ``[cut_{k-1}, cut_k)`` with ``cut_{-1} = 0`` and ``cut_{K-1} = inf``. Ties among the quantiles
    are kept (an empty bin is harmless).
    """
    source = times[events == 1] if np.any(events == 1) else times
    if len(source) == 0:
        return [float(i) for i in range(1, n_bins)]
    qs = np.quantile(source, np.linspace(0.0, 1.0, n_bins + 1)[1:-1])
    return [float(q) for q in qs]


def bin_index(times: np.ndarray, cuts: Sequence[float]) -> np.ndarray:
    """``int64 [B]`` bin of each time: the number of cut points ``<= t``."""
    return np.searchsorted(np.asarray(cuts, dtype=np.float64), np.asarray(times, dtype=np.float64), side="right")


def bin_names(cuts: Sequence[float]) -> list[str]:
    """Name of each bin: its upper edge (``"12.5"``, ..., ``"inf"``), the time at which ``S_k`` is read; tied
    edges (an empty bin) get ``"~k"`` appended so names stay unique."""
    names: list[str] = []
    for k, c in enumerate(list(cuts) + [math.inf]):
        name = "inf" if math.isinf(c) else f"{c:.4g}"
        names.append(name if name not in names else f"{name}~{k}")
    return names


def time_strata(times: np.ndarray, events: np.ndarray, n_quantiles: int = 2) -> np.ndarray:
    """Stratum per slide for splits: ``event * n_quantiles + time quantile`` (quantiles of all times)."""
    if len(times) == 0:
        return np.zeros(0, dtype=np.int64)
    cuts = np.quantile(times, np.linspace(0.0, 1.0, n_quantiles + 1)[1:-1])
    return events.astype(np.int64) * n_quantiles + np.searchsorted(cuts, times, side="right")


__all__ = [
    "SurvivalSpec",
    "SurvivalLoss",
    "BINNED_LOSSES",
    "read_survival",
    "require_events",
    "fit_time_bins",
    "bin_index",
    "bin_names",
    "time_strata",
]
