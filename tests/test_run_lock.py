"""Issue 17 item 3: a run folder is locked for the run's life; a second run in it is refused, naming the holder."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import yaml

import test_trainer  # noqa: F401  (registers the tiny test model and methods)
from test_trainer import make_config
from wsimil_core.engine.crossval import crossval
from wsimil_core.engine.trainer import train
from wsimil_core.errors import LockError

pytestmark = pytest.mark.usefixtures("torch_one_thread_module")


def test_second_train_in_the_same_folder_is_refused(synthetic_store, tmp_path):
    """A second run (here started from the first one's epoch callback, a separate open of the lock) is refused
    with one error naming this process; the first run finishes and the folder holds only it."""
    run = tmp_path / "run"
    cfg = make_config(synthetic_store, run, train_opts={"epochs": 2})
    seen = []

    def second_run(record):
        if record["global_epoch"] == 0:
            with pytest.raises(LockError) as exc:
                train(cfg)
            seen.append(str(exc.value))

    result = train(cfg, callbacks=[second_run])
    assert len(seen) == 1
    msg = seen[0]
    assert str(run) in msg and f"process {os.getpid()} on host {socket.gethostname()}" in msg
    assert "output.dir" in msg and "\n" not in msg
    assert len(result.history) == 2
    written = json.loads((run / "result.json").read_text())
    assert len(written["history"]) == 2 and yaml.safe_load((run / "config.yaml").read_text())["train"]["epochs"] == 2
    # the lock ends with the run: the folder can be used again (here: refused only because the run is finished)
    again = train(make_config(synthetic_store, run, train_opts={"epochs": 1}, output={"overwrite": True}))
    assert len(again.history) == 1


def test_second_wsimil_train_process_is_refused(synthetic_store, tmp_path):
    """`wsimil train` in another process while a run holds the folder: exit 1, one line naming pid and host."""
    run = tmp_path / "run"
    path = tmp_path / "run.yaml"
    cfg = make_config(
        synthetic_store, run, method="abmil", model={"dim": 16, "attn_dim": 8}, train_opts={"epochs": 1}
    )  # a registered method: the second process does not import the tests' tiny one
    path.write_text(yaml.safe_dump(cfg))
    out = []

    def second_process(record):
        del record
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        out.append(
            subprocess.run(
                [sys.executable, "-m", "wsimil_core", "train", str(path)],
                capture_output=True,
                text=True,
                env=env,
                timeout=300,
            )
        )

    train(cfg, callbacks=[second_process])
    proc = out[0]
    assert proc.returncode == 1, proc.stderr[-2000:]
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert lines[-1].startswith("error: ") and f"process {os.getpid()} on host {socket.gethostname()}" in lines[-1]
    assert "Traceback" not in proc.stderr


def test_crossval_folder_is_locked(synthetic_store, tmp_path):
    """A second cross-validation of the same output.dir is refused at once (the first holds the base folder and
    each fold's folder); after it ends, a rerun reads the finished folds back."""
    cfg = make_config(synthetic_store, tmp_path / "cv", train_opts={"epochs": 1})
    errors = []

    def second(record):
        if not errors:
            with pytest.raises(LockError) as exc:
                crossval(cfg, folds=2)
            errors.append(str(exc.value))
            with pytest.raises(LockError, match="fold_"):  # a plain run in a fold's folder is refused too
                train(make_config(synthetic_store, tmp_path / "cv" / "fold_0", train_opts={"epochs": 1}))

    crossval(cfg, folds=2, callbacks=[second])
    assert len(errors) == 1 and str(tmp_path / "cv") in errors[0] and str(os.getpid()) in errors[0]
    assert crossval(cfg, folds=2).report["folds"] == 2


def test_lock_is_released_when_the_holder_is_killed(tmp_path):
    """kill -9 of the holder frees the folder (the OS drops flock locks); the message quoted the holder before."""
    import signal

    from wsimil_core.locks import LOCK_FILE, hold_folder

    script = (
        "import sys, time\nfrom wsimil_core.locks import hold_folder\n"
        "with hold_folder(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(120)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(LockError, match=rf"in use by process {proc.pid} on host {socket.gethostname()}"):
            with hold_folder(tmp_path, "run folder"):
                pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with hold_folder(tmp_path, "run folder"):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert (tmp_path / LOCK_FILE).read_text() == ""  # a finished holder is not quoted later
