"""The survival variant of the demo cohort: event times drawn from a hazard that grows with the lesion burden.

Each patient's lesion burden ``b`` is the mean, over its slides, of the planted lesion area in patch units
(``(256 px at 0.5 µm/px)^2``) from the lesion GeoJSON. Event times are exponential with the proportional hazard
``lambda = base_hazard * exp(beta * b / b_max)`` (defaults 0.02 and 5); 70 % of the patients are censored at a
time uniform on ``[0, censor_max]``, the rest at ``censor_max`` (about 10-20 % censored in all). ``survival.csv`` holds
``slide_id, time, event, patient_id, burden`` (both slides of a patient share its time and event).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from wsimil_core._io import atomic_write_text
from wsimil_core.demo.lesions import load_lesions
from wsimil_core.errors import DataError

PATCH0_AREA = 256.0 * 256.0  # level-0 px^2 of one demo patch (256 px at 0.5 µm/px)


def survival_times(
    burden: np.ndarray,
    seed: int = 0,
    beta: float = 5.0,
    base_hazard: float = 0.02,
    censor_max: float = 60.0,
) -> tuple[np.ndarray, np.ndarray]:
    """``(times [P], events [P])`` for burdens ``[P]`` (>= 0): exponential event times with hazard
    ``base_hazard * exp(beta * burden / max(burden))``, uniform censoring on ``[0, censor_max]``."""
    b = np.asarray(burden, dtype=np.float64)
    if np.any(b < 0) or not np.all(np.isfinite(b)):
        raise DataError("survival_times: burdens must be finite and >= 0")
    scale = b.max() if len(b) and b.max() > 0 else 1.0
    rng = np.random.default_rng([seed, 7187])
    hazard = base_hazard * np.exp(beta * b / scale)
    event_time = rng.exponential(1.0 / hazard)
    censor = rng.uniform(0.0, censor_max, size=len(b))
    censor = np.where(rng.random(len(b)) < 0.3, censor_max, censor)  # 30 % followed to the end of the study
    time = np.minimum(event_time, censor)
    event = (event_time <= censor).astype(np.int64)
    return np.round(np.maximum(time, 0.1), 2), event


def ring_area(ring: np.ndarray) -> float:
    """Area of a closed polygon ring ``[M, 2]`` (shoelace)."""
    x, y = ring[:, 0], ring[:, 1]
    return float(0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def lesion_burden(geojson_path: str | os.PathLike) -> float:
    """Planted lesion area of one slide in patch units."""
    return sum(ring_area(r) for r in load_lesions(geojson_path, "lesion")) / PATCH0_AREA


def patient_survival(
    slide_ids: Sequence[str], patients: Sequence[str], burdens: Sequence[float], seed: int = 0
) -> pd.DataFrame:
    """``slide_id, time, event, patient_id, burden`` with one draw per patient (mean burden of its slides)."""
    frame = pd.DataFrame({"slide_id": list(slide_ids), "patient_id": list(patients), "burden": list(burdens)})
    per_patient = frame.groupby("patient_id", sort=True)["burden"].mean()
    times, events = survival_times(per_patient.to_numpy(), seed)
    draw = pd.DataFrame({"patient_id": per_patient.index, "time": times, "event": events})
    out = frame.merge(draw, on="patient_id", how="left")
    return out[["slide_id", "time", "event", "patient_id", "burden"]]


def write_demo_survival(cohort_dir: str | os.PathLike, seed: int | None = None) -> Path:
    """Write ``survival.csv`` into a demo cohort folder (reads its ``labels.csv`` and lesion GeoJSONs)."""
    root = Path(cohort_dir)
    labels = root / "labels.csv"
    if not labels.is_file():
        raise DataError(f"{root}: no labels.csv; make the demo cohort first (wsimil demo)")
    frame = pd.read_csv(labels, dtype={"slide_id": str, "patient_id": str})
    if seed is None:
        manifest = root / "cohort.json"
        seed = int(json.loads(manifest.read_text()).get("seed", 0)) if manifest.is_file() else 0
    burdens = [lesion_burden(root / f"{sid}.lesions.geojson") for sid in frame["slide_id"]]
    table = patient_survival(frame["slide_id"], frame["patient_id"], burdens, seed)
    out = root / "survival.csv"
    atomic_write_text(out, table.to_csv(index=False))
    return out


__all__ = ["survival_times", "lesion_burden", "patient_survival", "write_demo_survival", "ring_area"]
