"""K-fold cross-validation: ``crossval(config, folds=K)`` trains one run per fold and summarises them.

(The module is not named ``crossval`` so that ``wsimil_core.engine.crossval`` stays the function.)

Folds are stratified by the first target's label (a survival task: event and time half) and grouped by patient
(``data.split.kind: kfold``); each fold's held-out part is its test set and ``data.split.val_frac`` of the
remaining patients are its validation set (early stopping, threshold). Fold ``i`` is written to ``<output.dir>/fold_<i>/``; the report (mean and
standard deviation over folds of every test metric, plus the per-fold values) to ``<output.dir>/crossval.json``.
A finished fold (its ``result.json`` exists) is read back instead of retrained, so an interrupted
cross-validation continues where it stopped. The output folder is locked while the cross-validation runs
(and each fold's folder while that fold trains), so a second one of the same folder is refused at once.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from wsimil_core._io import atomic_write_text
from wsimil_core.data.dataset import BagDataset
from wsimil_core.engine.config import TrainConfig, as_config
from wsimil_core.engine.crossval_jobs import run_fold_jobs
from wsimil_core.engine.datasets import open_cohort
from wsimil_core.engine.run_outputs import lock_run_dir
from wsimil_core.engine.trainer import Callback, train
from wsimil_core.errors import ConfigError

REPORT_FILE = "crossval.json"


@dataclass
class CrossvalResult:
    """Cross-validation outcome.

    Attributes:
        report: the JSON report (``summary`` = ``{metric: {"mean", "std", "values"}}`` over folds).
        report_path: where it was written.
        fold_results: per-fold ``RunResult`` dicts (as in each fold's ``result.json``).
    """

    report: dict[str, Any]
    report_path: Path
    fold_results: list[dict[str, Any]]

    @property
    def summary(self) -> dict[str, dict[str, Any]]:
        return self.report["summary"]


def summarize_folds(per_fold: list[dict[str, float]]) -> dict[str, dict[str, Any]]:
    """``{metric: {"mean", "std", "n", "values"}}`` over folds (NaN values, e.g. AUC of a one-class fold,
    are left out of mean and std; ``std`` is the population standard deviation, numpy's default)."""
    names: list[str] = []
    for metrics in per_fold:
        names.extend(k for k in metrics if k not in names)
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        values = [float(m.get(name, float("nan"))) for m in per_fold]
        finite = np.array([v for v in values if math.isfinite(v)], dtype=np.float64)
        out[name] = {
            "mean": float(finite.mean()) if len(finite) else float("nan"),
            "std": float(finite.std()) if len(finite) else float("nan"),
            "n": int(len(finite)),
            "values": values,
        }
    return out


def fold_config(config: TrainConfig, folds: int, fold: int) -> TrainConfig:
    """The config of fold ``fold`` of ``folds`` (K-fold split, its own output directory)."""
    data = config.to_json()
    data["data"]["split"].update({"kind": "kfold", "folds": folds, "fold": fold})
    data["output"]["dir"] = str(Path(config.output.dir) / f"fold_{fold}")
    return TrainConfig.model_validate(data)


def _run_folds(
    config: TrainConfig,
    k: int,
    full: BagDataset,
    callbacks: Iterable[Callback] | None,
    console: Console,
    jobs: int = 1,
) -> list[dict[str, Any]]:
    """Each fold's ``RunResult`` dict: read from its ``result.json`` when finished earlier, else trained (in
    ``jobs`` processes at once when ``jobs > 1``, see ``engine.crossval_jobs``)."""
    results: dict[int, dict[str, Any]] = {}
    todo: list[tuple[int, TrainConfig]] = []
    for fold in range(k):
        cfg = fold_config(config, k, fold)
        done = Path(cfg.output.dir) / "result.json"
        if done.exists() and not config.output.overwrite:
            console.print(f"fold {fold + 1}/{k}: finished earlier, read from {done}")
            results[fold] = json.loads(done.read_text())
        else:
            todo.append((fold, cfg))
    if jobs > 1 and len(todo) > 1:
        results.update(run_fold_jobs(todo, k, jobs, config.data.num_workers, console))
    else:
        for fold, cfg in todo:
            console.rule(f"fold {fold + 1}/{k}")
            results[fold] = train(cfg, callbacks=callbacks, dataset=full).to_json()
    return [results[fold] for fold in range(k)]


def crossval(
    config: TrainConfig | dict | str | Path,
    folds: int | None = None,
    callbacks: Iterable[Callback] | None = None,
    jobs: int = 1,
) -> CrossvalResult:
    """Run K-fold cross-validation (Python API of ``wsimil crossval``).

    Args:
        config: the training config; ``data.split`` supplies ``val_frac`` and ``seed`` (its kind is ignored).
        folds: K (default: ``data.split.folds``).
        callbacks: passed to every fold's training run (only with ``jobs=1``).
        jobs: folds trained at once, each in its own process with its share of the cores (``--jobs``); the
            results are those of a sequential run with the same seed (and the same threads per fold).
    """
    config = as_config(config)
    k = int(folds if folds is not None else config.data.split.folds)
    if k < 2:
        raise ConfigError(f"crossval: --folds must be at least 2, got {k}")
    if jobs < 1:
        raise ConfigError(f"crossval: --jobs must be at least 1, got {jobs}")
    if jobs > 1 and callbacks:
        raise ConfigError("crossval: callbacks run in this process only; use jobs=1 with callbacks")
    console = Console(stderr=True, quiet=not config.output.progress)
    full = open_cohort(config)  # checks the data at once (with jobs > 1 each job opens its own)
    base = Path(config.output.dir)
    with lock_run_dir(base):  # a second cross-validation of this folder is refused at once
        results = _run_folds(config, k, full, callbacks, console, jobs)
    test = [r["test_metrics"] for r in results]
    val = [r["val_metrics"] for r in results]
    report: dict[str, Any] = {
        "method": config.method.name,
        "folds": k,
        "targets": list(config.data.targets),
        "summary": summarize_folds(test),
        "val_summary": summarize_folds(val),
        "per_fold": [
            {
                "fold": i,
                "run_dir": r["run_dir"],
                "best_epoch": r["best_epoch"],
                "test": r["test_metrics"],
                "val": r["val_metrics"],
                "thresholds": r["thresholds"],
            }
            for i, r in enumerate(results)
        ],
        "config": config.to_json(),
    }
    path = base / REPORT_FILE
    atomic_write_text(path, json.dumps(report, indent=2, allow_nan=True))
    table = Table(title=f"{config.method.name}: {k}-fold cross-validation (test folds)")
    table.add_column("metric")
    table.add_column("mean ± std", justify="right")
    for name, s in report["summary"].items():
        if name == "threshold" or name.endswith("/threshold"):
            continue
        table.add_row(name, f"{s['mean']:.4f} ± {s['std']:.4f}")
    Console(quiet=not config.output.progress).print(table)
    console.print(f"report: {path}")
    return CrossvalResult(report=report, report_path=path, fold_results=results)


__all__ = ["crossval", "CrossvalResult", "summarize_folds"]
