"""Cross-validation folds in parallel processes (``wsimil crossval --jobs N``).

Each job is a fresh (spawned) process that trains one fold at a time with ``train(fold_config)``; it runs torch on
its share of the cores: ``max(1, cores // jobs - data.num_workers)`` intra-op threads (set as ``OMP_NUM_THREADS``
in the job, so the engine's thread policy keeps it), unless the user chose a count (``OMP_NUM_THREADS`` /
``MKL_NUM_THREADS``), which every job then uses. A fold's result depends only on its config and seed, so the
report equals a sequential run's when each fold runs with the same thread count (e.g. ``OMP_NUM_THREADS=1``;
with other counts the floating-point summation order, hence the last bits, may differ).

Outputs stay apart: each fold writes only its own folder (``fold_<i>/``, locked while it trains); the parent
writes ``crossval.json`` once every fold has finished. Each job opens the cohort itself (its own bag cache).
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import FIRST_EXCEPTION, Future, ProcessPoolExecutor, wait
from typing import Any

import torch
from rich.console import Console

from wsimil_core.devices import available_cores, user_thread_count
from wsimil_core.engine.config import TrainConfig


def job_threads(jobs: int, num_workers: int = 0, cores: int | None = None) -> int:
    """Intra-op threads of each of ``jobs`` fold processes: ``max(1, cores // jobs - num_workers)``."""
    cores = available_cores() if cores is None else cores
    return max(1, cores // max(1, jobs) - max(0, num_workers))


def _init_job(threads: int | None) -> None:
    """Process initialiser: this job's thread share (None: the user's count, inherited through the environment)."""
    if threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


def _train_fold(config: dict[str, Any]) -> dict[str, Any]:
    """Train one fold in a job process; returns its ``RunResult`` as JSON."""
    from wsimil_core.engine.trainer import train

    return train(config).to_json()


def run_fold_jobs(
    todo: list[tuple[int, TrainConfig]], k: int, jobs: int, num_workers: int, console: Console
) -> dict[int, dict[str, Any]]:
    """Train the folds of ``todo`` (``(fold, config)``) in ``jobs`` processes; ``{fold: RunResult JSON}``.

    The first fold that fails stops the others (not yet started ones are cancelled) and its error is raised.
    """
    jobs = min(jobs, len(todo))
    threads = None if user_thread_count() is not None else job_threads(jobs, num_workers)
    console.print(f"{len(todo)} folds in {jobs} processes, {threads or torch.get_num_threads()} torch thread(s) each")
    results: dict[int, dict[str, Any]] = {}
    ctx = multiprocessing.get_context("spawn")  # no fork of a process with torch's thread pools
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_init_job, initargs=(threads,)) as pool:
        futures: dict[Future, int] = {}
        for fold, cfg in todo:
            data = cfg.to_json()
            data["output"]["progress"] = False  # one line per finished fold instead of interleaved epoch lines
            futures[pool.submit(_train_fold, data)] = fold
        pending = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for fut in done:
                fold = futures[fut]
                error = fut.exception()
                if error is not None:
                    for other in pending:
                        other.cancel()
                    raise error
                results[fold] = fut.result()
                test = results[fold].get("test_metrics") or {}
                shown = ", ".join(f"{m} {test[m]:.4f}" for m in ("auc", "accuracy") if m in test)
                console.print(f"fold {fold + 1}/{k} finished" + (f": test {shown}" if shown else ""))
    return results


__all__ = ["job_threads", "run_fold_jobs"]
