"""The CPU thread policy (issue 15, goal 2): ``devices.apply_thread_policy`` and its callers.

The test runner may set ``OMP_NUM_THREADS``; every test here removes it (and ``MKL_NUM_THREADS``) first and fakes
the cores with a patched ``os.sched_getaffinity`` / ``os.cpu_count``. Torch's thread count is restored after each.
"""

from __future__ import annotations

import os

import pytest
import torch

import test_trainer  # noqa: F401  (registers the tiny test model and methods)
from test_trainer import make_config
from wsimil_core import devices
from wsimil_core.devices import apply_thread_policy, available_cores, policy_thread_count, user_thread_count
from wsimil_core.engine.trainer import train


def fake_cores(monkeypatch, n: int, affinity: bool = True) -> None:
    """This process "may use" ``n`` cores: through the affinity mask, or (``affinity=False``) ``os.cpu_count``."""
    if affinity:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(n)), raising=False)
    else:
        monkeypatch.delattr(os, "sched_getaffinity", raising=False)
        monkeypatch.setattr(os, "cpu_count", lambda: n)


@pytest.fixture(autouse=True)
def clean_threads(monkeypatch):
    """No thread variables, torch at 1 thread as the policy last left it; torch's count restored afterwards."""
    saved = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    torch.set_num_threads(1)
    monkeypatch.setitem(devices._EXPECTED_THREADS, "count", 1)
    yield
    torch.set_num_threads(saved)


@pytest.mark.parametrize(("cores", "workers", "expected"), [(2, 0, 2), (2, 1, 1), (2, 4, 1), (8, 3, 5), (1, 0, 1)])
def test_policy_is_cores_minus_workers_at_least_one(monkeypatch, cores, workers, expected):
    fake_cores(monkeypatch, cores)
    assert available_cores() == cores
    assert policy_thread_count(workers) == expected
    assert apply_thread_policy(workers) == expected
    assert torch.get_num_threads() == expected


def test_cores_fall_back_to_cpu_count_without_affinity(monkeypatch):
    fake_cores(monkeypatch, 3, affinity=False)
    assert available_cores() == 3
    assert apply_thread_policy(1) == 2 and torch.get_num_threads() == 2
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert available_cores() == 1


@pytest.mark.parametrize("var", ["OMP_NUM_THREADS", "MKL_NUM_THREADS"])
def test_the_users_thread_variable_is_respected(monkeypatch, var):
    fake_cores(monkeypatch, 4)
    monkeypatch.setenv(var, "3")
    assert user_thread_count() == 3
    assert apply_thread_policy(0) == 1  # torch left as it is (torch reads the variable itself at start-up)
    assert torch.get_num_threads() == 1
    monkeypatch.setenv(var, "")  # empty or invalid values are no choice
    assert user_thread_count() is None
    assert apply_thread_policy(0) == 4


def test_a_set_num_threads_call_by_the_user_is_respected(monkeypatch):
    fake_cores(monkeypatch, 4)
    assert apply_thread_policy(0) == 4
    assert apply_thread_policy(1) == 3  # the policy may change its own count
    torch.set_num_threads(2)  # the user's choice
    assert user_thread_count() == 2
    assert apply_thread_policy(0) == 2 and torch.get_num_threads() == 2


def test_worker_init_sets_one_thread():
    torch.set_num_threads(2)
    devices.single_thread_worker(0)
    assert torch.get_num_threads() == 1


@pytest.mark.parametrize(("workers", "expected"), [(0, 3), (1, 2)])
def test_a_training_run_sets_torch_threads_by_the_policy(monkeypatch, synthetic_store, tmp_path, workers, expected):
    fake_cores(monkeypatch, 3)
    seen: list[int] = []
    cfg = make_config(synthetic_store, tmp_path / "run", data={"num_workers": workers}, train_opts={"epochs": 1})
    train(cfg, callbacks=[lambda record: seen.append(torch.get_num_threads())])
    assert seen == [expected]


def test_a_training_run_keeps_the_users_variable(monkeypatch, synthetic_store, tmp_path):
    fake_cores(monkeypatch, 3)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    seen: list[int] = []
    train(
        make_config(synthetic_store, tmp_path / "run", train_opts={"epochs": 1}),
        callbacks=[lambda r: seen.append(torch.get_num_threads())],
    )
    assert seen == [1]


def test_extraction_and_the_inference_pipeline_apply_the_policy(monkeypatch, tmp_path):
    import types

    import wsimil_core.features.extract as extract_mod
    import wsimil_core.inference.pipeline as pipeline_mod
    from wsimil_core.errors import DataError

    calls: list[tuple[str, int]] = []
    monkeypatch.setattr(extract_mod, "apply_thread_policy", lambda n=0: calls.append(("extract", n)) or 1)
    monkeypatch.setattr(pipeline_mod, "apply_thread_policy", lambda n=0: calls.append(("infer", n)) or 1)
    spec = types.SimpleNamespace(encoder_id="enc")
    summary = extract_mod.extract_cohort(
        [],
        tmp_path / "store.zarr",
        "enc",
        None,
        None,
        encoder=(torch.nn.Identity(), spec),
        num_workers=3,
        progress=False,
    )
    assert summary.n_patches == 0
    ckpt = types.SimpleNamespace(meta=None, source="x", predictor=None)
    opts = pipeline_mod.PipelineOptions(num_workers=2)
    with pytest.raises(DataError):
        next(pipeline_mod.iter_slide_prediction(ckpt, options=opts))  # type: ignore[arg-type]
    assert calls == [("extract", 3), ("infer", 2)]
