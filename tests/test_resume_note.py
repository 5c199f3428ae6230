"""A run stopped part-way resumes at the start of the interrupted epoch, and says so (issue 16 item 9)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from test_trainer import make_config  # noqa: E402  (also registers the tiny "_tiny" method)
from wsimil_core.engine.epoch import EpochRunner  # noqa: E402
from wsimil_core.engine.trainer import train  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_one_thread_module")

OPTS = dict(data={"max_patches": 10}, train_opts={"epochs": 3, "warmup_epochs": 0}, output={"progress": True})


def _interrupt_on_call(monkeypatch, n: int) -> None:
    """Ctrl-C inside the ``n``-th epoch (1-based), before it finishes."""
    run = EpochRunner.run
    calls = {"n": 0}

    def interrupted(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return run(self, *args, **kwargs)

    monkeypatch.setattr(EpochRunner, "run", interrupted)


def _err(capsys) -> str:
    return " ".join(capsys.readouterr().err.split())  # rich wraps long lines


def test_interrupt_and_resume_say_that_the_interrupted_epoch_is_repeated(
    synthetic_store, tmp_path, capsys, monkeypatch
):
    cfg = make_config(synthetic_store, tmp_path / "run", **OPTS)
    with monkeypatch.context() as m:
        _interrupt_on_call(m, 2)
        with pytest.raises(KeyboardInterrupt):
            train(cfg)
    err = _err(capsys)
    assert "interrupted: state after epoch 1 is in" in err
    assert "the interrupted epoch (2 overall) runs again from its start" in err
    result = train(cfg)
    err = _err(capsys)
    assert "after epoch 1: the interrupted epoch (2 overall) runs again from its start" in err
    assert result.resumed and [r["global_epoch"] for r in result.history] == [0, 1, 2]


def test_an_interrupt_in_the_first_epoch_leaves_nothing_to_resume(synthetic_store, tmp_path, capsys, monkeypatch):
    _interrupt_on_call(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        train(make_config(synthetic_store, tmp_path / "run", **OPTS))
    err = _err(capsys)
    assert "interrupted before an epoch had finished: nothing to resume" in err
    assert not (tmp_path / "run" / "resume.safetensors").exists()
