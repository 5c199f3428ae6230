"""Issue 15 goals 1 and 3: the bag cache is hit from epoch 2 on in every fold of a cross-validation, the save
points (``output.save_interval_s``) and ``crossval --jobs``. No timed assertions: speed is measured by
``benchmarks/bench_engine.py`` and ``benchmarks/bench_abmil.py --crossval``."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

import test_trainer  # noqa: F401  (registers the tiny test model and methods)
from test_trainer import make_config, read_weights
from wsimil_core.engine.crossval import crossval
from wsimil_core.engine.crossval_jobs import job_threads
from wsimil_core.engine.trainer import train
from wsimil_core.store.zarr_store import FeatureStore

pytestmark = pytest.mark.usefixtures("torch_one_thread_module")


class StoreReads:
    """Counts ``FeatureStore.read_bag`` calls per slide id, in this process and in DataLoader workers (forked:
    each call appends the slide id to a file)."""

    def __init__(self, monkeypatch, log):
        self.log = log
        log.write_text("")
        real = FeatureStore.read_bag

        def counting(store, slide_id, *args, **kwargs):
            with open(log, "a") as f:
                f.write(f"{slide_id}\n")
            return real(store, slide_id, *args, **kwargs)

        monkeypatch.setattr(FeatureStore, "read_bag", counting)

    def per_slide(self) -> Counter:
        return Counter(self.log.read_text().split())

    def total(self) -> int:
        return len(self.log.read_text().split())


def _reads_per_epoch(
    synthetic_store, tmp_path, monkeypatch, cache_gb: float, workers: int = 0
) -> tuple[list[tuple[int, int, int]], Counter]:
    """``[(fold, epoch, store reads between the end of the previous epoch and the end of this one)]`` of a 3-fold,
    3-epoch cross-validation with ``workers`` DataLoader workers, and the reads per slide over the whole of it."""
    reads = StoreReads(monkeypatch, tmp_path / "reads.log")
    seen: list[tuple[int, int]] = []
    last = {"n": 0}

    def per_epoch(record):
        n = reads.total()
        seen.append((record["epoch"], n - last["n"]))
        last["n"] = n

    data = {"cache_gb": cache_gb, "num_workers": workers}
    cfg = make_config(synthetic_store, tmp_path / "cv", train_opts={"epochs": 3}, data=data)
    crossval(cfg, folds=3, callbacks=[per_epoch])
    folds = [(i // 3, epoch, n) for i, (epoch, n) in enumerate(seen)]
    assert [(f, e) for f, e, _ in folds] == [(f, e) for f in range(3) for e in range(3)]
    return folds, reads.per_slide()


@pytest.mark.parametrize("workers", [0, 1])
def test_bag_cache_is_hit_from_epoch_two_in_every_fold(synthetic_store, tmp_path, monkeypatch, workers):
    """With the cache on, no epoch after the first of any fold reads the store, and over the whole
    cross-validation each bag is read once (the folds share the opened cohort and its cache; the first slide
    once more when the cohort is opened, to learn the feature dimension). With DataLoader workers too: the
    cache lives in the main process (``BagDataset.loader_workers``), not in workers that end with each epoch."""
    per_epoch, reads = _reads_per_epoch(synthetic_store, tmp_path, monkeypatch, cache_gb=1.0, workers=workers)
    assert per_epoch[0][2] > 0  # fold 0, epoch 1: the first reads
    assert all(n == 0 for fold, epoch, n in per_epoch if epoch >= 1), per_epoch
    first = next(iter(reads))
    assert len(reads) == 24 and all(n == 1 for s, n in reads.items() if s != first), reads
    assert reads[first] == 2


@pytest.mark.parametrize("workers", [0, 1])
def test_without_the_cache_every_epoch_reads_the_store(synthetic_store, tmp_path, monkeypatch, workers):
    """The control: ``data.cache_gb: 0`` reads each training bag again in every epoch of every fold (in the
    workers when there are some)."""
    per_epoch, reads = _reads_per_epoch(synthetic_store, tmp_path, monkeypatch, cache_gb=0.0, workers=workers)
    assert all(n > 0 for _, _, n in per_epoch), per_epoch
    assert all(n > 3 for n in reads.values()), reads


@pytest.mark.parametrize("cache_gb", [1.0, 0.0])
def test_workers_train_the_same_bags_in_the_same_order(synthetic_store, tmp_path, cache_gb):
    """``data.num_workers: 1`` (served from the cache after it is filled, or read by the worker without a
    cache) trains on the same bags in the same order as no workers: the weights are equal."""
    seen: dict[int, list[str]] = {0: [], 1: []}
    runs = {}
    for workers in (0, 1):
        run = tmp_path / f"w{workers}"
        cfg = make_config(
            synthetic_store, run, train_opts={"epochs": 2}, data={"num_workers": workers, "cache_gb": cache_gb}
        )
        runs[workers] = train(cfg)
        seen[workers] = [r["train/loss"] for r in runs[workers].history]
    assert seen[0] == seen[1]
    w0, w1 = read_weights(tmp_path / "w0" / "last.safetensors"), read_weights(tmp_path / "w1" / "last.safetensors")
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)
    assert runs[0].test_metrics == runs[1].test_metrics


def test_save_interval_stages_files_and_writes_them_at_the_end(synthetic_store, tmp_path):
    """A long ``save_interval_s``: the first epoch is written (a checkpoint exists early), the next ones are only
    staged (the resume file on disk stays at epoch 1) until the end of the phase; metrics.jsonl gets every epoch
    at once. ``0``: the resume file follows every epoch."""
    from wsimil_core.engine.checkpoint import load_state

    def resume_epochs(run, seen):
        def look(record):
            names = ("best.safetensors", "last.safetensors", "metrics.csv", "resume.safetensors")
            assert all((run / n).exists() for n in names)
            seen.append(load_state(run / "resume.safetensors")[1]["epoch"])
            lines = (run / "metrics.jsonl").read_text().splitlines()
            assert len(lines) == record["global_epoch"] + 1 and json.loads(lines[-1])["epoch"] == record["epoch"]

        return look

    late: list[int] = []
    run = tmp_path / "late"
    opts = {"train_opts": {"epochs": 3}}
    result = train(
        make_config(synthetic_store, run, output={"save_interval_s": 3600}, **opts),
        callbacks=[resume_epochs(run, late)],
    )
    assert late == [0, 0, 0]
    _, meta = load_state(run / "resume.safetensors")
    assert meta["epoch"] == 2 and meta["completed"] and (run / "result.json").is_file()
    assert len((run / "metrics.csv").read_text().splitlines()) == 4  # header + 3 epochs
    assert result.best_checkpoint is not None and result.best_checkpoint.exists()
    every: list[int] = []
    run = tmp_path / "every"
    train(
        make_config(synthetic_store, run, output={"save_interval_s": 0}, **opts), callbacks=[resume_epochs(run, every)]
    )
    assert every == [0, 1, 2]


def test_error_mid_run_writes_the_last_finished_epoch(synthetic_store, tmp_path):
    """An exception after epoch 2 (staged, not yet written with a long interval) still leaves that epoch's resume
    file and last checkpoint on disk, and the same command finishes the run with the weights of a straight run."""
    opts = dict(train_opts={"epochs": 3}, output={"save_interval_s": 3600})
    straight = tmp_path / "a"
    train(make_config(synthetic_store, straight, **opts))

    def fail_after_second(record):
        if record["global_epoch"] == 1:
            raise RuntimeError("disk controller on fire")

    run = tmp_path / "b"
    with pytest.raises(RuntimeError, match="on fire"):
        train(make_config(synthetic_store, run, **opts), callbacks=[fail_after_second])
    from wsimil_core.engine.checkpoint import load_state

    _, meta = load_state(run / "resume.safetensors")
    assert meta["epoch"] == 1 and not meta["completed"]
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    resumed = train(make_config(synthetic_store, run, **opts))
    assert resumed.resumed
    wa, wb = read_weights(straight / "last.safetensors"), read_weights(run / "last.safetensors")
    assert all(bool((wa[k] == wb[k]).all()) for k in wa)
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3


def test_job_threads_share_the_cores():
    assert job_threads(2, cores=8) == 4
    assert job_threads(2, num_workers=1, cores=8) == 3
    assert job_threads(4, cores=2) == 1


@pytest.mark.slow
def test_crossval_jobs_equals_sequential(synthetic_store, tmp_path):
    """Two folds in two processes give the report and checkpoints of the sequential run (same seed, 1 thread)."""
    cfg = make_config(synthetic_store, tmp_path / "seq", method="abmil", model={"dim": 8, "attn_dim": 4})
    cfg["train"]["epochs"] = 2
    seq = crossval(cfg, folds=2)
    cfg["output"]["dir"] = str(tmp_path / "par")
    par = crossval(cfg, folds=2, jobs=2)
    assert par.summary == seq.summary
    for fold in range(2):
        a = read_weights(tmp_path / "seq" / f"fold_{fold}" / "best.safetensors")
        b = read_weights(tmp_path / "par" / f"fold_{fold}" / "best.safetensors")
        assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)
    assert json.loads((tmp_path / "par" / "crossval.json").read_text())["folds"] == 2


def test_ctrl_c_during_a_save_point_still_leaves_the_resume_file(synthetic_store, tmp_path, monkeypatch):
    """Ctrl-C arriving while a save point writes (here: the first resume write) is finished by the run's handler:
    the resume file of that epoch is on disk (what the napari dock's Stop relies on)."""
    import wsimil_core.engine.save_points as save_points
    from wsimil_core.engine.checkpoint import load_state

    real = save_points.save_state
    calls = {"n": 0}

    def interrupted_once(path, tensors, meta):
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt
        return real(path, tensors, meta)

    monkeypatch.setattr(save_points, "save_state", interrupted_once)
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(make_config(synthetic_store, run, train_opts={"epochs": 3}, output={"save_interval_s": 0}))
    _, meta = load_state(run / "resume.safetensors")
    assert calls["n"] == 2 and meta["epoch"] == 0 and (run / "best.safetensors").is_file()
