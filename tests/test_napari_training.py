"""Training dock and its Qt-free subprocess runner.

The runner tests need no Qt: a tiny Python child prints lines, writes a metrics file, is stopped with SIGINT, or
crashes. The GUI tests (``gui`` marker; skipped without a display) run the real ``wsimil train`` in a child
process on the ``synthetic_store`` cohort, and the dock's numbers come from that run's ``metrics.jsonl``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from napari_wsimil._metrics_tail import MetricsTail
from napari_wsimil._process_runner import ProcessRunner, last_error_line


@pytest.fixture(autouse=True)
def one_thread_children(monkeypatch):
    """Child processes use one torch thread (the test machine's cores are shared)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def wait_for(predicate, timeout: float, interval: float = 0.05) -> bool:
    """Poll ``predicate()`` until true or ``timeout`` seconds pass."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def _child(tmp_path: Path, code: str) -> list[str]:
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(code))
    return [sys.executable, str(script)]


# --- runner (no Qt) ---------------------------------------------------------------------------------------------


def test_runner_streams_lines_and_progress(tmp_path):
    argv = _child(
        tmp_path,
        """
        import sys
        print("hello", flush=True)
        sys.stderr.write("epoch 1:  50%|#####     | 1/2 [00:01<00:01]\\r")
        sys.stderr.write("epoch 1: 100%|##########| 2/2 [00:02<00:00]\\n")
        print("train epoch 1  loss 0.6931  val/loss 0.7000  val/auc 0.8125  (best)", flush=True)
        print("done", flush=True)
    """,
    )
    runner = ProcessRunner(argv, cwd=tmp_path).start()
    assert runner.wait(30) == 0
    assert not runner.running and runner.succeeded and not runner.was_interrupted
    lines = runner.lines
    assert lines[0] == "hello" and lines[-1] == "done"
    # "\r" of a progress bar ends a line: both bar states arrive separately
    bars = [x for x in lines if "| 1/2 [" in x or "| 2/2 [" in x]
    assert len(bars) == 2 and "1/2" in bars[0] and "2/2" in bars[1]
    assert runner.poll() == []  # already drained
    assert runner.poll_metrics() == (False, []) and runner.metrics == []  # no metrics file was asked for


@pytest.mark.skipif(os.name == "nt", reason="POSIX signals")
def test_runner_stop_sends_sigint_and_the_child_saves(tmp_path):
    state = tmp_path / "state.txt"
    argv = _child(
        tmp_path,
        f"""
        import sys, time
        try:
            print("ready", flush=True)
            for i in range(600):
                sys.stdout.write(f"tick {{i}}\\n")  # one write: an interrupt cannot split the line
                sys.stdout.flush()
                time.sleep(0.05)
        except KeyboardInterrupt:
            open({str(state)!r}, "w").write("saved")
            print("interrupted: state saved", flush=True)
            sys.exit(130)
    """,
    )
    runner = ProcessRunner(argv).start()
    assert wait_for(lambda: (runner.poll() or True) and "ready" in runner.lines, timeout=30)
    rc = runner.stop(grace=20)
    assert rc == 130 and runner.was_interrupted and not runner.running
    assert state.read_text() == "saved"
    assert runner.lines[-1] == "interrupted: state saved"
    assert runner.interrupt() is False  # nothing left to stop


@pytest.mark.skipif(os.name == "nt", reason="POSIX signals")
def test_runner_escalates_when_sigint_is_ignored(tmp_path):
    argv = _child(
        tmp_path,
        """
        import signal, time
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        print("ready", flush=True)
        time.sleep(60)
    """,
    )
    runner = ProcessRunner(argv).start()
    assert wait_for(lambda: (runner.poll() or True) and "ready" in runner.lines, timeout=30)
    rc = runner.stop(grace=0.5, term_grace=5)
    assert rc == -signal.SIGTERM and runner.was_interrupted
    assert "SIGTERM" in last_error_line([], rc)


def test_runner_reports_a_crash(tmp_path):
    argv = _child(
        tmp_path,
        """
        print("working", flush=True)
        raise ValueError("the labels CSV has no column 'grade'")
    """,
    )
    runner = ProcessRunner(argv).start()
    assert runner.wait(30) == 1
    assert not runner.succeeded and not runner.was_interrupted
    assert runner.error_line() == "ValueError: the labels CSV has no column 'grade'"
    assert any(line.startswith("Traceback") for line in runner.lines)


def test_error_line_prefers_the_cli_error_and_parsers():
    lines = ["method abmil, 3 train bags", "error: labels.csv: no column 'x'", "Traceback..."]
    assert last_error_line(lines, 1) == "error: labels.csv: no column 'x'"
    assert last_error_line(["a", "b"], 1) == "b"
    assert last_error_line([], 3) == "the process exited with status 3"


def _rows(n: int, start: int = 0, **extra) -> list[dict]:
    return [
        {"phase": "train", "epoch": i, "global_epoch": i, "train/loss": 1.0 / (i + 1), **extra} for i in range(start, n)
    ]


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def _replace(path: Path, text: str) -> None:
    """Rewrite ``path`` the way the trainer does (a new file moved over the old one)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def test_metrics_tail_reads_new_rows_only(tmp_path):
    path = tmp_path / "metrics.jsonl"
    tail = MetricsTail(path)
    assert tail.read() == (False, [])  # the file appears late
    rows = _rows(3)
    _replace(path, _jsonl(rows[:1]))
    assert tail.read() == (False, rows[:1])
    assert tail.read() == (False, [])
    # an atomic rewrite that continues the file: only the new rows come back
    _replace(path, _jsonl(rows))
    assert tail.read() == (False, rows[1:]) and tail.rows == rows
    # appends, with a partial last line that is read once complete; a bad line is skipped and counted
    more = _rows(5, start=3)
    with path.open("a") as fh:
        fh.write(_jsonl(more[:1]) + "not json\n" + json.dumps(more[1])[:10])
    assert tail.read() == (False, more[:1]) and tail.bad_lines == 1
    with path.open("a") as fh:
        fh.write(json.dumps(more[1])[10:] + "\n")
    assert tail.read() == (False, more[1:])
    assert tail.rows == rows + more


def test_metrics_tail_resets_on_a_restarted_run(tmp_path):
    path = tmp_path / "metrics.jsonl"
    old = _rows(4)
    path.write_text(_jsonl(old))
    # a stale file of an earlier run is ignored until it changes
    tail = MetricsTail(path, skip_existing=True)
    assert tail.read() == (False, [])
    new = _rows(1, lr=0.1)
    _replace(path, _jsonl(new))
    assert tail.read() == (False, new)
    # a resumed run that rewrote the epoch it had not finished: the rows so far are void
    again = [dict(new[0], **{"train/loss": 0.25})]
    _replace(path, _jsonl(again))
    assert tail.read() == (True, again) and tail.rows == again
    # truncated and rewritten in place: a shorter file, then one as long whose last bytes differ
    with path.open("w") as fh:
        fh.write(_jsonl([{"phase": "train"}]))
    assert tail.read() == (True, [{"phase": "train"}])
    before = _jsonl([dict(again[0], lr=0.1)])
    with path.open("w") as fh:
        fh.write(before)
    assert tail.read() == (True, [dict(again[0], lr=0.1)])
    with path.open("r+") as fh:
        fh.write(before.replace('"lr": 0.1', '"lr": 0.2'))
    assert tail.read() == (True, [dict(again[0], lr=0.2)])


def test_runner_tails_the_metrics_file_of_its_child(tmp_path):
    """A child that rewrites metrics.jsonl atomically each "epoch", as the trainer does, then prints nothing."""
    path = tmp_path / "run" / "metrics.jsonl"
    argv = _child(
        tmp_path,
        f"""
        import json, os, time
        path = {str(path)!r}
        time.sleep(0.3)  # the file appears after the runner started
        os.makedirs(os.path.dirname(path), exist_ok=True)
        rows = []
        for e in range(4):
            rows.append({{"phase": "train", "epoch": e, "global_epoch": e, "train/loss": 1.0 / (e + 1), "best": e == 2}})
            with open(path + ".tmp", "w") as fh:
                fh.write("".join(json.dumps(r) + "\\n" for r in rows))
            os.replace(path + ".tmp", path)
            time.sleep(0.3)
        print("done", flush=True)
    """,
    )
    runner = ProcessRunner(argv, cwd=tmp_path, metrics=path).start()
    seen: list[dict] = []
    deadline = time.monotonic() + 60
    while runner.running and time.monotonic() < deadline:  # what the dock's timer does
        runner.poll()
        reset, rows = runner.poll_metrics()
        assert not reset
        seen.extend(rows)
        time.sleep(0.05)
    seen.extend(runner.poll_metrics()[1])
    assert runner.returncode == 0
    on_disk = [json.loads(line) for line in path.read_text().splitlines()]
    assert seen == on_disk == runner.metrics and len(seen) == 4
    assert [r["global_epoch"] for r in seen] == [0, 1, 2, 3] and [r["best"] for r in seen] == [
        False,
        False,
        True,
        False,
    ]


def test_qt_free_helpers(tmp_path, synthetic_store):
    import subprocess

    from napari_wsimil._training_config import total_epochs
    from wsimil_core.errors import DataError

    code = (
        "import sys, napari_wsimil._process_runner, napari_wsimil._metrics_tail, napari_wsimil._training_config, "
        "napari_wsimil._extend_report; assert not {'qtpy', 'PyQt5', 'PyQt6', 'napari'} & set(sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
    csv = tmp_path / "l.csv"
    csv.write_text("slide_id,label,grade,patient_id,split\na,0,1,p,train\n")
    dock = pytest.importorskip("napari_wsimil._run_dock")
    assert dock.target_columns(dock.read_csv_header(csv)) == ["label", "grade"]
    with pytest.raises(DataError, match="missing.csv"):
        dock.read_csv_header(tmp_path / "missing.csv")
    cfg = {
        "method": {"name": "mecds", "options": {"phases": ["teacher", "student"]}},
        "train": {"epochs": 3, "phase_epochs": {"student": 2}},
    }
    assert total_epochs(cfg) == 5
    assert total_epochs({"method": {"name": "abmil"}, "train": {"epochs": 4}}) == 4


# --- GUI ----------------------------------------------------------------------------------------------------------


def _widget(qtbot, viewer=None):
    from napari_wsimil._training_widget import TrainingWidget

    w = TrainingWidget(viewer)
    qtbot.addWidget(w)
    return w


def _fill(w, cohort, run_dir, epochs=1, targets=("label",)):
    w.set_method("abmil")
    w.set_store(cohort.store)
    assert "label" in w.set_labels(cohort.labels)
    w.set_targets(list(targets))
    w.set_model_values({"dim": 16, "attn_dim": 8})
    w.epochs_spin.setValue(epochs)
    w.lr_spin.setValue(1e-3)
    w.device_combo.setCurrentText("cpu")
    w.output_edit.setText(str(run_dir))


@pytest.mark.gui
def test_option_forms_are_built_by_magicgui_from_the_schemas(gui):
    from magicgui.widgets import CheckBox, ComboBox, FloatSpinBox, LineEdit, ListEdit, SpinBox

    from wsimil_core.api import ConfigError, method_class

    w = _widget(gui)
    w.set_method("mecds")
    f = w.options_form.widgets
    assert list(f) == list(method_class("mecds").options_cls.model_fields)
    assert isinstance(f["distill"], ComboBox) and list(f["distill"].choices) == ["akd", "akd_gated", "kl", "none"]
    assert isinstance(f["temperature"], FloatSpinBox) and f["temperature"].value == 2.0
    assert f["temperature"].min > 0  # gt=0 in the schema
    assert f["margin"].max < 1  # lt=1
    assert f["temperature"].tooltip.startswith("Distillation temperature")  # the field's description
    assert isinstance(f["init_student_from_teacher"], CheckBox)
    assert isinstance(f["phases"], ListEdit) and f["phases"].value == ["teacher", "student"]
    assert isinstance(f["teacher_checkpoint"], LineEdit) and w.option_values()["teacher_checkpoint"] is None
    f["distill"].value = "kl"
    f["phases"].value = ["teacher"]
    assert w.option_values()["distill"] == "kl" and w.option_values()["phases"] == ["teacher"]
    assert w.options_error.text() == ""
    # a value the schema refuses: a clear message in the dock, and config_dict names the option
    f["phases"].value = ["student"]
    assert "teacher_checkpoint" in w.options_error.text()
    with pytest.raises(ConfigError, match="method 'mecds'.*teacher_checkpoint"):
        w.option_values()
    f["teacher_checkpoint"].value = "teacher.safetensors"
    assert w.options_error.text() == "" and w.option_values()["teacher_checkpoint"] == "teacher.safetensors"
    # model options come from the model's config dataclass; what the data fills is not shown
    m = w.model_form.widgets
    assert isinstance(m["dim"], SpinBox) and isinstance(m["routing"], CheckBox) and "in_dim" not in m
    assert m["dim"].tooltip.startswith("model width C")  # the config's Attributes: docstring
    assert w.model_values() == {}
    m["dim"].value, m["n_heads"].value = 10, 4  # MECDSConfig.__post_init__: dim divisible by heads
    assert "divisible" in w.options_error.text()
    with pytest.raises(ConfigError, match="model 'mecds'.*divisible"):
        w.model_values()
    m["dim"].value = 16
    assert w.model_values() == {"dim": 16}
    w.set_method("momkd")
    assert isinstance(w.options_form.widgets["kmeans_samples"], SpinBox)
    assert w.options_form.widgets["kmeans_samples"].min == 1
    w.set_method("abmilx")  # an optional int is a text field; empty = none, else validated by the schema
    read_px = w.options_form.widgets["read_px"]
    assert isinstance(read_px, LineEdit) and w.option_values()["read_px"] is None
    read_px.value = "many"
    with pytest.raises(ConfigError, match="read_px"):
        w.option_values()
    read_px.value = "64"
    assert w.option_values()["read_px"] == 64
    assert w.options_form.widgets["ema_decay"].value == pytest.approx(0.9997)  # enough decimals for the default
    w.set_method("abmil")
    assert w.options_form.widgets == {} and w.option_values() == {}


@pytest.mark.gui
def test_load_config_yaml_fills_the_form_and_keeps_other_keys(gui, tmp_path, synthetic_store):
    from wsimil_core.errors import ConfigError

    path = tmp_path / "cfg" / "run.yaml"
    path.parent.mkdir()
    path.write_text(
        yaml.safe_dump(
            {
                "method": {"name": "asmil", "options": {"anchor_weight": 0.5, "anchor": False}},
                "model": {"dropout": 0.1},
                "data": {
                    "store": str(synthetic_store.store),
                    "labels": str(synthetic_store.labels),
                    "targets": ["task_b"],
                    "split": {"kind": "random", "val_frac": 0.25},
                },
                "train": {"epochs": 3, "lr": 0.001, "device": "cpu", "early_stopping": {"metric": "loss"}},
                "output": {"dir": "runs/a"},
            }
        )
    )
    w = _widget(gui)
    w.load_config_yaml(path)
    assert w.method_combo.currentText() == "asmil"
    opts = w.option_values()
    assert opts["anchor_weight"] == 0.5 and opts["anchor"] is False
    assert opts["anchor_momentum"] == pytest.approx(0.999)  # default filled in
    assert w.targets() == ["task_b"]
    assert w.epochs_spin.value() == 3 and w.lr_spin.value() == pytest.approx(1e-3)
    assert w.device_combo.currentText() == "cpu"
    assert Path(w.output_edit.text()) == path.parent / "runs" / "a"  # relative to the YAML's folder
    assert w.model_form.widgets["dropout"].value == pytest.approx(0.1)
    assert w.model_values() == {"dropout": 0.1}
    cfg = w.config_dict()
    assert cfg["data"]["split"]["val_frac"] == 0.25 and cfg["train"]["early_stopping"]["metric"] == "loss"
    assert cfg["method"]["options"]["anchor_weight"] == 0.5 and cfg["model"] == {"dropout": 0.1}
    # a bad YAML file is one clear error naming it
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: abmil\ntrain: {epochs: many}\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        w.load_config_yaml(bad)
    # a form problem names the field
    w.options_form.widgets["anchor_weight"].value = 0.0
    w.targets_list.clear()
    with pytest.raises(ConfigError, match="target"):
        w.config_dict()


@pytest.mark.gui
def test_train_one_epoch_in_a_subprocess_and_load_into_inference(gui, tmp_path, synthetic_store):
    napari = pytest.importorskip("napari")
    viewer = napari.Viewer(show=False)
    try:
        # both run docks come from the npe2 manifest (Plugins > wsimil)
        _, w = viewer.window.add_plugin_dock_widget("napari-wsimil", "Training")
        _, ext = viewer.window.add_plugin_dock_widget("napari-wsimil", "Extend a task (MECDS)")
        assert type(w).__name__ == "TrainingWidget" and type(ext).__name__ == "ExtendWidget"
        run_dir = tmp_path / "run"
        _fill(w, synthetic_store, run_dir, epochs=1)
        runner = w.train()
        assert runner is not None and w.state == "running" and not w.train_button.isEnabled()
        gui.waitUntil(lambda: w.state not in ("running", "stopping"), timeout=180_000)
        assert w.state == "finished", (w.error, w.log.toPlainText()[-2000:])
        assert (run_dir / "train.yaml").is_file() and (run_dir / "best.safetensors").is_file()
        # the curves, progress and best epoch come from the run's metrics.jsonl (tailed while it ran)
        on_disk = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert w.history == on_disk and len(on_disk) == 1 and "val/auc" in on_disk[0]
        assert on_disk[0]["best"] is True and w.plot.best_epoch == 1
        assert w.plot.series["train/loss"] == [(1, on_disk[0]["train/loss"])]
        assert w.plot.series["val/auc"] == [(1, on_disk[0]["val/auc"])]
        assert "best: train epoch 1" in w.status.text()
        assert "train epoch 1" in w.log.toPlainText()  # the console goes to the log
        assert w.progress.value() == w.progress.maximum() == 1
        assert w.load_button.isEnabled()
        # hand the checkpoint to the Inference widget, opened in the viewer's dock
        inference = w.load_into_inference()
        assert type(inference).__name__ == "InferenceWidget"
        assert Path(inference.checkpoint_edit.text()) == run_dir / "best.safetensors"
        assert "abmil" in inference.checkpoint_info.text()
    finally:
        viewer.close()


@pytest.mark.gui
@pytest.mark.skipif(os.name == "nt", reason="POSIX signals")
def test_stop_keeps_the_checkpoint(gui, tmp_path, synthetic_store):
    w = _widget(gui)
    run_dir = tmp_path / "long"
    _fill(w, synthetic_store, run_dir, epochs=500)
    w.train()
    from napari.utils import progress

    bar = w.activity  # the run is listed in napari's activity dock, counting epochs
    assert bar is not None and bar in progress._all_instances and bar.total == 500 and "long" in bar.desc
    gui.waitUntil(lambda: (run_dir / "best.safetensors").is_file() and len(w.history) >= 1, timeout=180_000)
    w.stop()
    assert w.state == "stopping"
    gui.waitUntil(lambda: w.state == "stopped", timeout=60_000)
    assert bar.n >= 1 and bar not in progress._all_instances and w.activity is None
    # the dock says that the interrupted epoch is not saved and runs again on resume
    n = len(w.history)
    assert f"stopped during epoch {n + 1} overall: epochs 1-{n} are saved" in w.status.text()
    assert "the stopped epoch runs again from its start" in w.status.text()
    assert w.runner.returncode in (130, -signal.SIGINT)
    assert w.best_checkpoint() == run_dir / "best.safetensors"
    assert (run_dir / "resume.safetensors").is_file() and not (run_dir / "result.json").exists()
    assert "checkpoint kept" in w.status.text() and w.load_button.isEnabled()
    done = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert w.history == done
    # "Train" again resumes: the earlier epochs show at once, new ones are appended to them
    w.train()
    assert w.state == "running" and "resuming the stopped run" in w.status.text()
    assert "runs again from its start" in w.log.toPlainText()
    gui.waitUntil(lambda: len(w.history) > len(done), timeout=180_000)
    assert w.history[: len(done)] == done
    w.stop()
    gui.waitUntil(lambda: w.state == "stopped", timeout=60_000)
    assert "resuming" in w.log.toPlainText()


@pytest.mark.gui
def test_a_crashing_child_shows_its_error_and_the_widget_survives(gui, tmp_path, synthetic_store, monkeypatch):
    import napari_wsimil._training_widget as tw

    # a real `wsimil train` fails the same way (tested in the core); a tiny child keeps this test fast
    argv = _child(
        tmp_path,
        """
        import sys
        print("method abmil, 18 train / 6 val / 0 test bags, device cpu", flush=True)
        print("error: model 'abmil' is single-task but data.targets lists ['label', 'task_b']", file=sys.stderr)
        sys.exit(1)
    """,
    )
    monkeypatch.setattr(tw, "wsimil_command", lambda *args: argv)
    w = _widget(gui)
    _fill(w, synthetic_store, tmp_path / "bad", epochs=1)
    w.train()
    gui.waitUntil(lambda: w.state not in ("running", "stopping"), timeout=60_000)
    assert w.state == "failed" and w.runner.returncode == 1
    assert w.error == "error: model 'abmil' is single-task but data.targets lists ['label', 'task_b']"
    assert "single-task" in w.status.text() and w.train_button.isEnabled() and not w.stop_button.isEnabled()
    assert not w.load_button.isEnabled()
