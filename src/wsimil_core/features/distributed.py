"""Feature extraction of many slides over a ``dask.distributed`` cluster (DESIGN.md "Devices").

One task per slide (``client.map`` over the slides still to do): the task opens the slide, finds tissue, tiles,
encodes the patches with an encoder built once per worker process and cached there, and writes the slide's group
with ``FeatureStore.write_bag`` -- exactly :func:`wsimil_core.features.slide_step.extract_slide`, the per-slide step of the local
path. Writes are atomic per slide (temporary group + rename), so workers write different slides into one store
concurrently without coordination; the client only plans, submits and collects.

Same behaviour as :func:`wsimil_core.features.extract.extract_cohort`: slides complete in the store are skipped *before*
anything is submitted (a re-run of a finished cohort submits nothing), a store tiled with another grid is a
``StoreError`` up front, a slide that fails is reported by file name in :class:`~wsimil_core.features.extract.ExtractSummary`
and the others go on, slides without tissue are listed as ``empty``.

Requirements: the ``cluster`` extra (``pip install napari-wsimil[cluster]``, i.e. ``distributed``). The store
directory, the slide files and the weights file must be reachable by the workers at the same paths as on the client
(a shared filesystem). ``distributed`` is imported lazily, never by ``import wsimil_core`` or the CLI start-up.
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
import uuid
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from wsimil_core.devices import resolve_device
from wsimil_core.errors import ConfigError, StoreError
from wsimil_core.features.encoders import create_encoder
from wsimil_core.features.extract import ExtractSummary, open_store, plan_extraction
from wsimil_core.features.slide_step import (
    NoTissueWarning,
    check_store_grid,
    extract_slide,
    failure_line,
)
from wsimil_core.store.layout import slide_id_from_path
from wsimil_core.store.zarr_store import FeatureStore

log = logging.getLogger(__name__)

# Encoders built in this process, keyed by (name, weights path, device): a worker builds each encoder once and
# reuses it for every slide task it runs (threads of one worker share it; the module is in eval/inference mode).
_ENCODER_CACHE: dict[tuple[str, str | None, str], Any] = {}
_ENCODER_LOCK = threading.Lock()


@dataclass(frozen=True)
class SlideJob:
    """Everything one slide task needs (small and picklable: paths and settings, never a model or a handle).

    Attributes:
        path: absolute slide path (as the workers see it).
        slide_id: the slide's group name in the store.
        store: absolute store directory (existing store; the client creates it before submitting).
        encoder_name, weights: as for ``create_encoder``; ``weights`` is an absolute path or None.
        encoder_id: the id the client computed; a worker whose encoder gets another id (different weights file
            at that path) fails the slide instead of writing features under the wrong key.
        grid_spec, tissue_params: ``tiling.GridSpec`` / ``tiling.TissueParams``.
        device: ``"auto"`` (CUDA on the worker when it has one), ``"cpu"``, ``"cuda:N"``.
        batch_size, num_workers, dtype, slide_mpp, backend, amp: as for ``extract_cohort``.
    """

    path: str
    slide_id: str
    store: str
    encoder_name: str
    weights: str | None
    encoder_id: str
    grid_spec: Any
    tissue_params: Any
    device: str = "auto"
    batch_size: int = 64
    num_workers: int = 0
    dtype: str = "float16"
    slide_mpp: float | None = None
    backend: str = "auto"
    amp: bool = True


def _worker_encoder(name: str, weights: str | None, device: str) -> Any:
    """``(module, spec)`` for this process, built on first use (thread-safe) and cached."""
    key = (name, weights, device)
    with _ENCODER_LOCK:  # no warnings.catch_warnings here: it is not thread-safe (threaded workers)
        if key not in _ENCODER_CACHE:
            _ENCODER_CACHE[key] = create_encoder(name, weights=weights, device=resolve_device(device))
        return _ENCODER_CACHE[key]


def extract_slide_task(job: SlideJob) -> dict[str, Any]:
    """Run on a worker: extract one slide into the store. Never raises for a bad slide.

    Returns:
        ``{"slide_id", "name" (file name), "status": "done" | "empty" | "failed", "n_patches", "error"}``
        where ``error`` is the one-line reason of a failure (None otherwise).
    """
    path = Path(job.path)
    result: dict[str, Any] = {
        "slide_id": job.slide_id,
        "name": path.name,
        "status": "failed",
        "n_patches": 0,
        "error": None,
    }
    try:
        model, spec = _worker_encoder(job.encoder_name, job.weights, job.device)
        if spec.encoder_id != job.encoder_id:
            raise StoreError(
                f"{job.weights}: on this worker the encoder is {spec.encoder_id!r}, on the client "
                f"{job.encoder_id!r}; the weights file differs between machines"
            )
        fs = FeatureStore(job.store)  # never create=True here: the client made the store before submitting
        # A daemonic worker process (dask's default) may not start DataLoader processes: read in the task then.
        num_workers = 0 if multiprocessing.current_process().daemon else job.num_workers
        n = extract_slide(  # a slide without tissue is only logged here; the client warns ("empty")
            path,
            job.slide_id,
            fs,
            model,
            spec,
            job.grid_spec,
            job.tissue_params,
            dtype=job.dtype,
            slide_mpp=job.slide_mpp,
            backend=job.backend,
            amp=job.amp,
            batch_size=job.batch_size,
            num_workers=num_workers,
            progress=False,
            warn_empty=False,
        )
    except Exception as exc:  # noqa: BLE001 - one bad slide never stops the cohort
        log.debug("%s: traceback", path.name, exc_info=True)
        result["error"] = failure_line(exc)
        return result
    result["status"] = "done" if n else "empty"
    result["n_patches"] = int(n)
    return result


def _import_distributed() -> Any:
    try:
        import distributed
    except ImportError:
        raise ConfigError(
            "cluster extraction needs dask.distributed: pip install 'napari-wsimil[cluster]' (or: pip install "
            "distributed)"
        ) from None
    return distributed


def _connect(
    client: Any, scheduler: str | None, local_cluster: int | None, cluster_kwargs: dict[str, Any] | None
) -> tuple[Any, list[Any]]:
    """The client to use and what to close afterwards (only what this function opened)."""
    given = sum(x is not None for x in (client, scheduler, local_cluster))
    if given != 1:
        raise ConfigError(
            "give exactly one of client=, scheduler= (--scheduler ADDRESS) or local_cluster= "
            f"(--local-cluster N); got {given}"
        )
    if client is not None:
        return client, []
    distributed = _import_distributed()
    if scheduler is not None:
        try:
            c = distributed.Client(scheduler, timeout="30s")
        except (OSError, TimeoutError) as exc:
            raise ConfigError(f"cannot connect to the dask scheduler at {scheduler!r}: {exc}") from None
        return c, [c]
    assert local_cluster is not None  # exactly one of the three was given
    if int(local_cluster) < 1:
        raise ConfigError(f"--local-cluster must be at least 1 worker, got {local_cluster}")
    kwargs = {
        "n_workers": int(local_cluster),
        "threads_per_worker": 1,
        "processes": True,
        "dashboard_address": ":0",
    }  # a free port: several clusters on one host
    kwargs.update(cluster_kwargs or {})
    cluster = distributed.LocalCluster(**kwargs)
    c = distributed.Client(cluster)
    return c, [c, cluster]


def extract_cohort_distributed(
    slides: Sequence[str | Path],
    store: Any,
    encoder_name: str,
    grid_spec: Any,
    tissue_params: Any,
    weights: str | Path | None = None,
    *,
    client: Any = None,
    scheduler: str | None = None,
    local_cluster: int | None = None,
    cluster_kwargs: dict[str, Any] | None = None,
    device: str = "auto",
    batch_size: int = 64,
    num_workers: int = 0,
    dtype: str = "float16",
    slide_mpp: float | None = None,
    backend: str = "auto",
    amp: bool = True,
    retries: int = 0,
    progress: bool = True,
    on_submit: Callable[[list[str]], None] | None = None,
    on_slide_done: Callable[[str], None] | None = None,
    verify: bool = False,
    fail_fast: bool = False,
) -> Any:
    """Extract features of ``slides`` into ``store`` with one ``dask.distributed`` task per slide.

    Args:
        slides, store, encoder_name, grid_spec, tissue_params, weights: as for ``extract.extract_cohort``.
        client: an existing ``distributed.Client`` (left open), or
        scheduler: a scheduler address (``tcp://host:8786``) to connect to, or
        local_cluster: start a ``LocalCluster`` with this many single-threaded worker processes (closed at the
            end). Exactly one of the three.
        cluster_kwargs: extra ``LocalCluster`` arguments (e.g. ``{"processes": False}``).
        device: per worker; ``"auto"`` uses the worker's CUDA device when it has one.
        batch_size: patches per encoder batch on a worker.
        num_workers: DataLoader reader processes inside a task (0 = read in the task; forced to 0 in daemonic
            worker processes, dask's default).
        dtype, slide_mpp, backend, amp: as for ``extract_cohort``.
        retries: dask retries of a task whose worker died (a slide's own errors are reported, not retried).
        progress: a tqdm bar over slides as they complete.
        on_submit: called with the slide ids submitted (empty list: nothing to do).
        on_slide_done: called with each slide id whose group was written, as results arrive.
        verify: re-check finished slides by reading them (on the client) and redo damaged ones, as for
            ``extract_cohort``.
        fail_fast: stop at the first slide that fails: the other tasks are cancelled (a slide being written is
            either complete or absent: writes are atomic) and ``summary.stopped`` is set.

    Returns:
        ``extract.ExtractSummary`` (``done``/``empty`` in input order).
    """
    if dtype not in ("float16", "float32"):
        raise ConfigError(f"dtype must be 'float16' or 'float32', got {dtype!r}")
    if int(batch_size) < 1 or int(num_workers) < 0 or int(retries) < 0:
        raise ConfigError("batch_size must be >= 1, num_workers and retries >= 0")
    paths = [Path(p).absolute() for p in slides]
    ids = [slide_id_from_path(p) for p in paths]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise ConfigError(f"several slides map to the same store id(s) {dupes}; rename them")
    fs = open_store(store)  # created here, once, before any worker writes into it
    check_store_grid(fs, ids, grid_spec)

    # Built once on the client, on the CPU: checks the name and the weights file up front, gives the encoder_id
    # used to skip finished slides, and issues the loud random-weights warning where the user sees it.
    weights_abs = str(Path(weights).expanduser().absolute()) if weights is not None else None
    _, spec = create_encoder(encoder_name, weights=weights_abs, device="cpu")
    summary = ExtractSummary(encoder_id=spec.encoder_id)
    todo = plan_extraction(fs, paths, ids, summary, progress=progress, verify=verify, fail_fast=fail_fast)
    if on_submit is not None:
        on_submit([sid for _, sid in todo])
    if not todo:
        return summary

    jobs = [
        SlideJob(
            path=str(path),
            slide_id=sid,
            store=str(Path(str(fs.root)).absolute()),
            encoder_name=encoder_name,
            weights=weights_abs,
            encoder_id=spec.encoder_id,
            grid_spec=grid_spec,
            tissue_params=tissue_params,
            device=device,
            batch_size=int(batch_size),
            num_workers=int(num_workers),
            dtype=dtype,
            slide_mpp=slide_mpp,
            backend=backend,
            amp=amp,
        )
        for path, sid in todo
    ]
    order = {sid: i for i, sid in enumerate(ids)}
    distributed = _import_distributed()
    dclient, to_close = _connect(client, scheduler, local_cluster, cluster_kwargs)
    futures: list[Any] = []
    bar = tqdm(total=len(jobs), desc="slides", unit="slide", disable=not progress)
    try:
        # Unique keys: a re-submitted slide (after a failure was fixed) is a new task, never a cached result;
        # the slide id in the key names the task in the dashboard.
        run = uuid.uuid4().hex[:8]
        futures = dclient.map(
            extract_slide_task, jobs, retries=int(retries), key=[f"wsimil-extract-{run}-{job.slide_id}" for job in jobs]
        )
        job_of = {f.key: job for f, job in zip(futures, jobs)}
        for fut in distributed.as_completed(futures):
            job = job_of[fut.key]
            try:
                res = fut.result()
            except Exception as exc:  # noqa: BLE001 - the task itself died (worker killed, unpicklable...)
                res = {
                    "slide_id": job.slide_id,
                    "name": Path(job.path).name,
                    "status": "failed",
                    "n_patches": 0,
                    "error": f"task failed on the cluster: {type(exc).__name__}: {exc}",
                }
            fut.release()
            bar.update(1)
            bar.set_postfix_str(job.slide_id)
            _record(summary, res, progress, NoTissueWarning, grid_spec)
            if res["status"] == "done" and on_slide_done is not None:
                on_slide_done(job.slide_id)
            if res["status"] == "failed" and fail_fast:
                summary.stopped = True
                for f in futures:
                    f.cancel()
                break
    except BaseException:
        for f in futures:
            f.cancel()
        raise
    finally:
        bar.close()
        for obj in to_close:
            try:
                obj.close()
            except Exception:  # noqa: BLE001 - closing a cluster that is already gone
                log.debug("closing %r failed", obj, exc_info=True)
    summary.done.sort(key=order.__getitem__)
    summary.empty.sort(key=order.__getitem__)
    return summary


def _record(summary: Any, res: dict[str, Any], progress: bool, no_tissue: type, grid_spec: Any) -> None:
    """Add one slide's result to the summary, reporting like the local path."""
    if res["status"] == "done":
        summary.done.append(res["slide_id"])
        summary.n_patches += int(res["n_patches"])
    elif res["status"] == "empty":
        summary.empty.append(res["slide_id"])
        msg = f"{res['name']}: no tissue patch (min tissue {getattr(grid_spec, 'min_tissue', '?')}); skipped"
        warnings.warn(msg, no_tissue, stacklevel=3)
        log.warning(msg)
    else:
        summary.failed[res["name"]] = res["error"]
        log.error("%s: extraction failed: %s", res["name"], res["error"])
        if progress:
            tqdm.write(f"FAILED {res['name']}: {res['error']}")


__all__ = ["SlideJob", "extract_cohort_distributed", "extract_slide_task"]
