"""napari survival (issue 14): the inference dock shows risk, risk group and survival curve; the training dock
turns chosen time/event columns into a survival task."""

from __future__ import annotations

import pytest

from wsimil_core.checkpoint_meta import CheckpointMeta, TaskMeta, ThresholdMeta


def _meta(loss: str = "nll") -> CheckpointMeta:
    names = ["10", "20", "inf"] if loss != "cox" else ["low", "high"]
    return CheckpointMeta(
        method="abmil",
        model_name="abmil",
        model_kwargs={"n_classes": len(names)},
        tasks={
            "grade": TaskMeta(class_names=["a", "b"]),
            "survival": TaskMeta(
                class_names=names, threshold=ThresholdMeta(value=-1.5, method="median validation risk")
            ),
        },
        extras={"survival": {"survival": {"loss": loss, "time": "time", "event": "event", "cuts": [10.0, 20.0]}}},
    )


def test_survival_html_shows_risk_group_and_curve():
    from napari_wsimil._survival import split_survival, survival_html

    probs = {"grade": {"a": 0.3, "b": 0.7}, "survival": {"10": 0.9, "20": 0.5, "inf": 0.2}}
    classes, surv = split_survival(probs, _meta())
    assert list(classes) == ["grade"] and list(surv) == ["survival"]
    text = survival_html(surv, _meta())
    assert "risk <b>-1.600</b>" in text and "low risk" in text  # -(0.9 + 0.5 + 0.2) < -1.5
    assert "S(t ≤ 10)" in text and "0.50" in text and "█" * 18 in text  # 0.9 of a 20-character bar
    cox = survival_html({"survival": {"0": 0.4}}, _meta("cox"))
    assert "risk <b>0.400</b>" in cox and "high risk" in cox and "S(t" not in cox


@pytest.mark.gui
def test_training_dock_takes_time_and_event_columns(gui, tmp_path):
    from napari_wsimil._training_widget import TrainingWidget

    labels = tmp_path / "survival.csv"
    labels.write_text("slide_id,days,death,patient_id\ns1,10,1,P1\ns2,20,0,P2\n")
    w = TrainingWidget(None)
    gui.addWidget(w)
    w.set_method("abmil")
    w.set_store(tmp_path / "store")
    w.set_labels(labels)
    assert w.survival_columns() is None  # no columns named time/event: none chosen
    w.time_combo.setCurrentText("days")
    w.event_combo.setCurrentText("death")
    w.output_edit.setText(str(tmp_path / "run"))
    cfg = w.config_dict()
    assert cfg["data"]["targets"] == ["survival"]
    assert cfg["data"]["survival"]["time"] == "days" and cfg["data"]["survival"]["event"] == "death"
