"""Training widget (napari plugin part 2) and its Qt-free subprocess runner.

The runner tests need no Qt: a tiny Python child prints lines, is stopped with SIGINT, or crashes. The GUI tests
(``gui`` marker; skipped without a display) run the real ``wsimil train`` in a child process on the
``synthetic_store`` cohort.
"""

from __future__ import annotations

import os
import signal
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from _helpers import NO_DISPLAY_REASON, display_available
from napari_wsimil._subprocess import (
    ProcessRunner,
    last_error_line,
    parse_epoch_metrics,
    parse_progress,
    wait_for,
)


@pytest.fixture(autouse=True)
def one_thread_children(monkeypatch):
    """Child processes use one torch thread (the test machine's cores are shared)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


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
        print("train epoch 1  loss 0.6931  val/loss 0.7000  val/auc 0.8125  *", flush=True)
        print("done", flush=True)
    """,
    )
    runner = ProcessRunner(argv, cwd=tmp_path).start()
    assert runner.wait(30) == 0
    assert not runner.running and runner.succeeded and not runner.was_interrupted
    lines = runner.lines
    assert lines[0] == "hello" and lines[-1] == "done"
    # "\r" of a progress bar ends a line: both bar states arrive separately
    bars = [parse_progress(x) for x in lines if parse_progress(x)]
    assert bars == [(1, 2), (2, 2)]
    epoch = [parse_epoch_metrics(x) for x in lines if parse_epoch_metrics(x)]
    assert len(epoch) == 1 and epoch[0].phase == "train" and epoch[0].epoch == 1 and epoch[0].best
    assert epoch[0].metrics == {"loss": 0.6931, "val/loss": 0.7, "val/auc": 0.8125}
    assert runner.poll() == []  # already drained


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
                print(f"tick {{i}}", flush=True)
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
    ext = parse_epoch_metrics("extend: epoch 2/5 loss 0.4100 val_auc 0.7700")
    assert ext.phase == "extend" and (ext.epoch, ext.total) == (2, 5)
    assert ext.metrics == {"loss": 0.41, "val_auc": 0.77}
    assert parse_progress("extend: epoch 2/5 loss 0.41") == (2, 5)
    nan = parse_epoch_metrics("teacher epoch 3  loss 0.5000  val/loss nan  val/mean/auc 0.5000")
    assert (
        nan.phase == "teacher"
        and nan.metrics["val/mean/auc"] == 0.5
        and nan.metrics["val/loss"] != nan.metrics["val/loss"]
    )
    assert parse_epoch_metrics("method abmil, 18 train / 6 val / 0 test bags, device cpu") is None
    assert parse_progress("nothing here") is None


def test_qt_free_helpers(tmp_path, synthetic_store):
    import subprocess

    from wsimil_core.errors import DataError

    code = "import sys, napari_wsimil._subprocess; assert not {'qtpy', 'PyQt5', 'napari'} & set(sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
    csv = tmp_path / "l.csv"
    csv.write_text("slide_id,label,grade,patient_id,split\na,0,1,p,train\n")
    training = pytest.importorskip("napari_wsimil._training_widget")
    assert training.target_columns(training.read_csv_header(csv)) == ["label", "grade"]
    with pytest.raises(DataError, match="missing.csv"):
        training.read_csv_header(tmp_path / "missing.csv")
    cfg = {
        "method": {"name": "mecds", "options": {"phases": ["teacher", "student"]}},
        "train": {"epochs": 3, "phase_epochs": {"student": 2}},
    }
    assert training.total_epochs(cfg) == 5
    assert training.total_epochs({"method": {"name": "abmil"}, "train": {"epochs": 4}}) == 4


# --- GUI ----------------------------------------------------------------------------------------------------------


@pytest.fixture
def gui(qtbot):
    if not display_available():
        pytest.skip(NO_DISPLAY_REASON)
    pytest.importorskip("qtpy")
    return qtbot


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
    w.model_edit.setText("{dim: 16, attn_dim: 8}")
    w.epochs_spin.setValue(epochs)
    w.lr_spin.setValue(1e-3)
    w.device_combo.setCurrentText("cpu")
    w.output_edit.setText(str(run_dir))


@pytest.mark.gui
def test_form_reflects_the_method_options(gui):
    from qtpy.QtWidgets import QCheckBox, QComboBox, QDoubleSpinBox, QLineEdit, QSpinBox

    w = _widget(gui)
    w.set_method("mecds")
    f = w.fields
    assert list(f)[:3] == ["phases", "distill", "distill_weight"]
    assert isinstance(f["distill"].widget, QComboBox)
    assert [f["distill"].widget.itemText(i) for i in range(3)] == ["akd", "kl", "none"]
    assert isinstance(f["temperature"].widget, QDoubleSpinBox) and f["temperature"].value() == 2.0
    assert f["temperature"].widget.minimum() > 0  # gt=0 in the schema
    assert f["margin"].widget.maximum() < 1  # lt=1
    assert isinstance(f["init_student_from_teacher"].widget, QCheckBox)
    assert isinstance(f["phases"].widget, QLineEdit) and f["phases"].value() == ["teacher", "student"]
    assert f["teacher_checkpoint"].value() is None
    f["distill"].widget.setCurrentText("kl")
    f["phases"].widget.setText("[teacher]")
    assert w.option_values()["distill"] == "kl" and w.option_values()["phases"] == ["teacher"]
    w.set_method("momkd")
    assert isinstance(w.fields["kmeans_samples"].widget, QSpinBox)
    assert w.fields["kmeans_samples"].widget.minimum() == 1
    w.set_method("abmil")
    assert w.fields == {}


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
    assert w.fields["anchor_weight"].value() == 0.5 and w.fields["anchor"].value() is False
    assert w.fields["anchor_momentum"].value() == pytest.approx(0.999)  # default filled in
    assert w.targets() == ["task_b"]
    assert w.epochs_spin.value() == 3 and w.lr_spin.value() == pytest.approx(1e-3)
    assert w.device_combo.currentText() == "cpu"
    assert Path(w.output_edit.text()) == path.parent / "runs" / "a"  # relative to the YAML's folder
    assert yaml.safe_load(w.model_edit.text()) == {"dropout": 0.1}
    cfg = w.config_dict()
    assert cfg["data"]["split"]["val_frac"] == 0.25 and cfg["train"]["early_stopping"]["metric"] == "loss"
    assert cfg["method"]["options"]["anchor_weight"] == 0.5
    # a bad YAML file is one clear error naming it
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: abmil\ntrain: {epochs: many}\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        w.load_config_yaml(bad)
    # a form problem names the field
    w.fields["anchor_weight"].widget.setValue(0.0)
    w.targets_list.clear()
    with pytest.raises(ConfigError, match="target"):
        w.config_dict()


@pytest.mark.gui
def test_train_one_epoch_in_a_subprocess_and_load_into_inference(gui, tmp_path, synthetic_store):
    napari = pytest.importorskip("napari")
    viewer = napari.Viewer(show=False)
    try:
        # both part-2 docks come from the npe2 manifest (Plugins > wsimil)
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
        assert len(w.history) == 1 and "val/auc" in w.history[0]
        assert w.plot.series["train/loss"] and w.plot.series["val/auc"]
        assert "train epoch 1" in w.log.toPlainText()
        assert w.progress.value() == w.progress.maximum() == 1
        assert w.load_button.isEnabled()
        # hand the checkpoint to part 1's Inference widget, opened in the viewer's dock
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
    gui.waitUntil(lambda: (run_dir / "best.safetensors").is_file() and len(w.history) >= 1, timeout=180_000)
    w.stop()
    assert w.state == "stopping"
    gui.waitUntil(lambda: w.state == "stopped", timeout=60_000)
    assert w.runner.returncode in (130, -signal.SIGINT)
    assert w.best_checkpoint() == run_dir / "best.safetensors"
    assert (run_dir / "resume.safetensors").is_file() and not (run_dir / "result.json").exists()
    assert "checkpoint kept" in w.status.text() and w.load_button.isEnabled()


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
