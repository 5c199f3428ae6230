"""Extend-task dock: MECDS task extension in a child process, before/after table.

GUI tests (``gui`` marker) skip without a display. The real extension trains a tiny MECDS checkpoint in-process
(1 epoch per phase on ``synthetic_store``) and runs ``wsimil mecds extend`` through the widget's subprocess.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.gui

REPORT = {
    "checkpoint": "/runs/mecds/best_ext_task_c.safetensors",
    "task": "task_c",
    "target": "task_c",
    "eval_split": "val",
    "before": {
        "label": {"auc": 0.75, "sensitivity": 0.5, "specificity": 1.0, "balanced_accuracy": 0.75},
        "task_b": {"auc": 0.6, "sensitivity": 0.0, "specificity": 1.0, "balanced_accuracy": 0.5},
    },
    "after": {
        "label": {"auc": 0.75, "sensitivity": 0.5, "specificity": 1.0, "balanced_accuracy": 0.75},
        "task_b": {"auc": 0.6, "sensitivity": 0.0, "specificity": 1.0, "balanced_accuracy": 0.5},
    },
    "new_task": {"auc": 0.9, "sensitivity": 1.0, "specificity": 0.8, "balanced_accuracy": 0.9},
    "frozen_identical": True,
    "skipped_tasks": [],
    "history": [{"epoch": 1, "loss": 0.7, "val_auc": 0.9}],
}


@pytest.fixture(scope="module")
def mecds_checkpoint(synthetic_store, tmp_path_factory) -> Path:
    """A tiny mecds checkpoint with tasks label and task_b (teacher + student, 1 epoch each)."""
    import torch

    from wsimil_core.engine.trainer import train

    out = tmp_path_factory.mktemp("mecds_for_extend") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng():
            train(
                {
                    "method": {"name": "mecds"},
                    "model": {"dim": 16, "n_heads": 2, "router_dim": 8, "dropout": 0.0},
                    "data": {
                        "store": str(synthetic_store.store),
                        "labels": str(synthetic_store.labels),
                        "targets": ["label", "task_b"],
                    },
                    "train": {"epochs": 1, "lr": 3e-3, "device": "cpu"},
                    "output": {"dir": str(out), "progress": False},
                }
            )
    finally:
        torch.set_num_threads(threads)
    return out / "best.safetensors"


@pytest.fixture(autouse=True)
def one_thread_children(monkeypatch):
    """Child processes use one torch thread (the test machine's cores are shared)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def _table(w) -> list[list[str]]:
    return [[w.table.item(r, c).text() for c in range(w.table.columnCount())] for r in range(w.table.rowCount())]


def test_table_fills_from_a_report(extend_widget, tmp_path):
    from napari_wsimil._extend_report import load_report, report_rows
    from wsimil_core.errors import DataError

    path = tmp_path / "r.extend.json"
    path.write_text(json.dumps(REPORT))
    rows = extend_widget.show_report(path)
    assert rows == report_rows(load_report(path))
    table = _table(extend_widget)
    assert table[0] == ["label", "AUC", "0.7500", "0.7500", "+0.0000"]
    assert ["task_b", "sensitivity", "0.0000", "0.0000", "+0.0000"] in table
    new = [r for r in table if r[0] == "task_c (new)"]
    assert ["task_c (new)", "AUC", "—", "0.9000", "—"] in new and len(new) == 4
    assert len(table) == 3 * 4
    assert (
        "val split" in extend_widget.summary_label.text()
        and "bit-identical: True" in extend_widget.summary_label.text()
    )
    # a changed metric shows its signed difference
    report = json.loads(json.dumps(REPORT))
    report["after"]["label"]["auc"] = 0.70
    extend_widget.show_report(report)
    assert _table(extend_widget)[0][4] == "-0.0500"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"task": "x"}))
    with pytest.raises(DataError, match="bad.json.*missing before"):
        load_report(bad)


def test_auc_on_one_class_or_few_slides_is_flagged(extend_widget):
    report = json.loads(json.dumps(REPORT))
    report["before"]["task_b"]["auc"] = report["after"]["task_b"]["auc"] = float("nan")  # one class: the core's NaN
    report["new_task"]["auc"] = 0.0  # 2 slides, wrongly ranked: a number, but a meaningless one
    report.update(n_eval=2, eval_classes={"label": 2, "task_b": 1, "task_c": 2})
    extend_widget.show_report(json.loads(json.dumps(report)))  # through JSON like the real report (NaN kept)
    table = _table(extend_widget)
    assert ["task_b", "AUC", "n/a (one class in the split)", "n/a (one class in the split)", "—"] in table
    assert ["task_c (new)", "AUC", "—", "0.0000", "—"] in table
    summary = extend_widget.summary_label.text()
    assert summary.startswith("⚠ only 2 slides in the val split") and "not meaningful" in summary
    assert "one class only in the val split for task_b: AUC n/a" in summary
    # a NaN AUC without class counts (older reports) still reads n/a; enough slides: no warning
    old = json.loads(json.dumps(REPORT))
    old["after"]["label"]["auc"] = float("nan")
    extend_widget.show_report(old)
    assert _table(extend_widget)[0] == ["label", "AUC", "0.7500", "n/a (one class in the split)", "—"]
    assert "⚠" not in extend_widget.summary_label.text()
    extend_widget.show_report({**REPORT, "n_eval": 40, "eval_classes": {"label": 2, "task_b": 2, "task_c": 2}})
    assert "⚠" not in extend_widget.summary_label.text() and _table(extend_widget)[0][2] == "0.7500"


def test_extension_options_are_a_magicgui_form_of_their_schema(extend_widget):
    from magicgui.widgets import CheckBox, FloatSpinBox, SpinBox

    from napari_wsimil._extend_report import ExtendOptions
    from wsimil_core.errors import ConfigError

    f = extend_widget.options_form.widgets
    assert list(f) == list(ExtendOptions.model_fields)
    assert isinstance(f["epochs"], SpinBox) and f["epochs"].min == 1 and f["epochs"].value == 10
    assert isinstance(f["lr"], FloatSpinBox) and f["lr"].value == pytest.approx(1e-3) and f["lr"].min > 0
    assert isinstance(f["isolated"], CheckBox) and "shared patch stream" in f["isolated"].tooltip
    f["isolated"].value = False
    f["balanced"].value = False
    assert extend_widget.options().cli_args()[-2:] == ["--no-balanced", "--shared-stream"]
    with pytest.raises(ConfigError, match="no option"):
        extend_widget.options_form.set_values({"warmup": 1})


def test_non_mecds_checkpoint_is_refused(extend_widget, tmp_path):
    from wsimil_core.api import create_model
    from wsimil_core.engine.checkpoint import save_checkpoint
    from wsimil_core.errors import CheckpointError

    path = tmp_path / "abmil.safetensors"
    save_checkpoint(
        path,
        create_model("abmil", in_dim=8, n_classes=2, dim=8, attn_dim=4),
        {"method": "abmil", "targets": ["label"], "class_names": {"label": ["0", "1"]}},
    )
    with pytest.raises(CheckpointError, match="abmil.safetensors.*mecds"):
        extend_widget.load_checkpoint(path)
    assert "mecds" in extend_widget.checkpoint_info.text() and extend_widget.run() is None
    assert "mecds" in extend_widget.error


def test_real_extension_in_a_subprocess(extend_widget, qtbot, mecds_checkpoint, synthetic_store, tmp_path):
    summary = extend_widget.load_checkpoint(mecds_checkpoint)
    assert summary["tasks"] == {"label": ["0", "1"], "task_b": ["0", "1"]}
    assert "task_b" in extend_widget.checkpoint_info.text()
    # store and labels come from the checkpoint's training config; the first new column is preselected
    assert Path(extend_widget.store_edit.text()) == synthetic_store.store
    assert extend_widget.column_combo.currentText() == "task_c"
    extend_widget.name_edit.setText("grade")
    out = tmp_path / "ext.safetensors"
    extend_widget.output_edit.setText(str(out))
    extend_widget._output_auto = False
    extend_widget.options_form.set_values({"epochs": 1, "seed": 3})
    extend_widget.device_combo.setCurrentText("cpu")
    cmd = extend_widget.command()
    assert cmd[:3] == ["mecds", "extend", str(mecds_checkpoint)] and cmd[cmd.index("--name") + 1] == "grade"
    assert cmd[cmd.index("--epochs") + 1] == "1" and cmd[cmd.index("--seed") + 1] == "3"
    assert "--balanced" in cmd and "--isolated" in cmd  # the CLI's defaults
    assert extend_widget.run() is not None and extend_widget.state == "running"
    qtbot.waitUntil(lambda: extend_widget.state not in ("running", "stopping"), timeout=180_000)
    assert extend_widget.state == "finished", (extend_widget.error, extend_widget.log.toPlainText()[-2000:])
    assert out.is_file() and (tmp_path / "ext.extend.json").is_file()
    assert "extend: epoch 1/1" in extend_widget.log.toPlainText()
    assert extend_widget.progress.value() == extend_widget.progress.maximum()
    # progress came from the extension run's metrics.jsonl (the engine's extend phase), not from the console
    assert cmd[cmd.index("--run-dir") + 1] == str(tmp_path / "ext_run")
    rows = extend_widget.runner.metrics
    assert [r["phase"] for r in rows] == ["extend"] and (tmp_path / "ext_run" / "metrics.jsonl").is_file()
    assert extend_widget.status.text().startswith("wrote")
    table = _table(extend_widget)
    assert {r[0] for r in table} == {"label", "task_b", "grade (new)"}
    for r in table:  # old tasks: measured before and after; the new task only after
        assert (r[2] == "—") == (r[0] == "grade (new)") and r[3] != "—"
    assert extend_widget.report["frozen_identical"] is True and extend_widget.report["task"] == "grade"
    # the report says how many slides and classes the metrics stand on (the dock warns when too few)
    assert extend_widget.report["n_eval"] >= 1 and set(extend_widget.report["eval_classes"]) == {
        "label",
        "task_b",
        "grade",
    }
    assert ("⚠" in extend_widget.summary_label.text()) == (extend_widget.report["n_eval"] < 20)
    # hand the extended checkpoint to an inference widget
    got = []

    class Inference:
        def load_checkpoint(self, path):
            got.append(Path(path))

    assert extend_widget.load_button.isEnabled()
    extend_widget.load_into_inference(Inference())
    assert got == [out]
    # the same name again is refused before any process starts
    extend_widget.load_checkpoint(out)
    assert extend_widget.run() is None and "already has a task 'grade'" in extend_widget.error
