"""The inference dock shows the threshold rule behind each predicted class (issue 16, item 2).

Pure tests of ``napari_wsimil._decision`` and a GUI test (Xvfb) that runs the dock on a checkpoint whose
threshold, 0.754, was tuned on 2 validation slides, while its model gives p(tumour) = 0.753 on every slide.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from _helpers import NO_DISPLAY_REASON, display_available  # noqa: E402
from napari_wsimil._decision import MIN_TUNING_SLIDES, decide, decide_task, probs_html, warnings_html  # noqa: E402
from wsimil_core.api import CheckpointMeta, TaskMeta, ThresholdMeta  # noqa: E402

P1 = 0.753
THRESHOLD = 0.754


def meta_with(value: float, method: str = "youden on validation", n_slides: int | None = 2) -> CheckpointMeta:
    threshold = ThresholdMeta(value=value, method=method, n_slides=n_slides)
    task = TaskMeta(class_names=["benign", "tumour"], threshold=threshold)
    return CheckpointMeta.model_construct(tasks={"label": task})


def test_tuned_threshold_above_the_probability_predicts_class_0_and_warns():
    d = decide_task("label", {"benign": 1 - P1, "tumour": P1}, meta_with(THRESHOLD))
    assert d.predicted == "benign" and d.threshold == THRESHOLD
    assert d.rule == "p(tumour) = 0.753 < 0.754 → benign (threshold tuned on 2 validation slides)"
    assert d.warning is not None and "2 slides" in d.warning and str(MIN_TUNING_SLIDES) in d.warning
    half = decide_task("label", {"benign": 1 - P1, "tumour": P1}, meta_with(THRESHOLD), use_half=True)
    assert half.predicted == "tumour" and half.threshold == 0.5 and half.warning is None
    assert half.rule.startswith("p(tumour) = 0.753 ≥ 0.500 → tumour (0.5 chosen in the viewer")


def test_the_shown_rule_always_agrees_with_the_class():
    # every rule, read back (p, sign, t), gives the class it names; close numbers get more decimals
    cases = [(0.7535, 0.754), (0.75349, 0.7535), (0.5, 0.5), (0.9, 0.1), (0.1, 0.9), (0.7540004, 0.754)]
    for p1, t in cases:
        d = decide_task("label", {"benign": 1 - p1, "tumour": p1}, meta_with(t, n_slides=50))
        text = d.rule.split(" (")[0]
        shown_p, sign, shown_t, arrow, cls = text.split(" = ")[1].split(" ")
        assert arrow == "→" and cls == d.predicted
        assert (float(shown_p) >= float(shown_t)) == (sign == "≥") == (p1 >= t) == (cls == "tumour"), (p1, t, d.rule)
        assert d.warning is None  # 50 slides: enough
        # the same class as the core's own rule
        assert d.predicted == meta_with(t).predicted_class("label", [1 - p1, p1])


def test_threshold_sources_and_multiclass():
    table = {"benign": 0.3, "tumour": 0.7}
    fixed = decide_task("label", table, meta_with(0.8, "fixed by train.threshold", None))
    assert fixed.predicted == "benign" and "fixed in the training config" in fixed.rule and fixed.warning is None
    default = decide_task("label", table, meta_with(0.5, "default 0.5", None))
    assert default.predicted == "tumour" and "default threshold" in default.rule and default.warning is None
    unknown = decide_task("label", table, meta_with(0.6, "youden on validation", None))
    assert unknown.warning is not None and "unknown number" in unknown.warning
    ext = decide_task("label", table, meta_with(0.6, "youden on validation (task extension)", 1))
    assert "1 validation slide for the task extension" in ext.rule and "1 slide " in (ext.warning or "")
    no_meta = decide_task("label", table, None)
    assert no_meta.predicted == "tumour" and no_meta.threshold == 0.5
    nan = decide_task("label", {"a": math.nan, "b": math.nan}, meta_with(0.5))
    assert nan.predicted == "a"
    multi = decide({"grade": {"g1": 0.2, "g2": 0.5, "g3": 0.3}}, meta_with(0.9))["grade"]
    assert multi.predicted == "g2" and multi.threshold is None and multi.warning is None


def test_html_bolds_the_decided_class_and_shows_the_rule_and_warning():
    probs = {"label": {"benign": 1 - P1, "tumour": P1}}
    decisions = decide(probs, meta_with(THRESHOLD))
    text = probs_html(probs, decisions)
    assert "<b>benign: 0.247</b>" in text and "<b>tumour" not in text
    assert "0.753 &lt; 0.754" in text
    assert "2 slides" in warnings_html(decisions)
    assert warnings_html(decide(probs, meta_with(THRESHOLD), use_half=True)) == ""
    assert "<b>" not in probs_html(probs, partial=True)


# --- the dock, end to end -----------------------------------------------------------------------------------
def make_fixed_probability_checkpoint(path: Path) -> Path:
    """A tiny ABMIL whose classifier ignores its input: p(tumour) = 0.753 on every bag; threshold 0.754 tuned on
    2 validation slides."""
    import torch

    from test_napari_inference import GRID_MPP, GRID_PATCH
    from wsimil_core.api import create_model
    from wsimil_core.engine.checkpoint import save_checkpoint
    from wsimil_core.features.encoders import EncoderSpec

    spec = EncoderSpec(name="resnet18", encoder_id="resnet18-random", dim=256, input_size=None)
    size0 = int(round(GRID_PATCH * GRID_MPP / 0.5))
    enc = spec.with_grid(GRID_MPP, GRID_PATCH).to_attrs()
    enc.update(patch_mpp=GRID_MPP, patch_size=GRID_PATCH, patch_size_level0=size0, stride_level0=size0)
    torch.manual_seed(0)
    model = create_model("abmil", in_dim=spec.dim, n_classes=2, dim=16, attn_dim=8, dropout=0.0)
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([0.0, math.log(P1 / (1 - P1))]))
    threshold = {"value": THRESHOLD, "method": "youden on validation", "n_slides": 2}
    meta = {
        "method": "abmil",
        "tasks": {"label": {"class_names": ["benign", "tumour"], "threshold": threshold}},
        "encoder": enc,
    }
    save_checkpoint(path, model, meta)
    return path


@pytest.mark.gui
@pytest.mark.skipif(not display_available(), reason=NO_DISPLAY_REASON)
def test_dock_shows_the_threshold_rule_warns_and_switches_to_half(qtbot, tmp_path):
    pytest.importorskip("qtpy")
    import napari

    from napari_wsimil._inference_widget import InferenceWidget
    from test_napari_inference import write_tissue_slide

    slide = write_tissue_slide(tmp_path / "tissue.tiff")
    ckpt = make_fixed_probability_checkpoint(tmp_path / "tuned.safetensors")
    viewer = napari.Viewer(show=False)
    try:
        viewer.open(str(slide), plugin="napari-wsimil")
        widget = InferenceWidget(viewer)
        viewer.window.add_dock_widget(widget, name="Inference")
        summary = widget.load_checkpoint(ckpt)
        assert summary["thresholds"]["label"] == {"value": THRESHOLD, "method": "youden on validation", "n_slides": 2}
        assert "0.754 (youden on validation, 2 slides)" in widget.checkpoint_info.text()
        widget.store_edit.setText("")
        widget.device_combo.setCurrentText("cpu")
        assert widget.run() is not None
        qtbot.waitUntil(lambda: widget.worker is None, timeout=120_000)
        assert widget.error is None, widget.error
        assert widget.result.probs["label"]["tumour"] == pytest.approx(P1, abs=1e-6)
        # the checkpoint's threshold: class 0 in bold, the rule and a visible warning
        text = widget.probs_label.text()
        assert "<b>benign: 0.247</b>" in text and "<b>tumour" not in text
        assert "p(tumour) = 0.753 &lt; 0.754 → benign (threshold tuned on 2 validation slides)" in text
        assert widget.shown_prediction() == {"label": "benign"}
        from napari_wsimil._inference import InferenceUpdate

        late = InferenceUpdate("predict", 1, 1, "late", probs={"label": {"benign": 0.5, "tumour": 0.5}})
        widget._on_update(late)  # an update delivered after the result (Qt events processed out of turn)
        assert widget.probs_label.text() == text and widget.status.text() != "late"
        assert not widget.threshold_warning.isHidden() and "tuned on 2 slides" in widget.threshold_warning.text()
        # "use 0.5": class 1, without re-running the model
        result = widget.result
        widget.half_check.setChecked(True)
        assert widget.worker is None and widget.result is result
        text = widget.probs_label.text()
        assert "<b>tumour: 0.753</b>" in text and "<b>benign" not in text
        assert "p(tumour) = 0.753 ≥ 0.500 → tumour" in text
        assert widget.shown_prediction() == {"label": "tumour"} and widget.threshold_warning.isHidden()
        # the export carries the class shown
        import json

        out = widget.export_geojson(tmp_path / "maps.geojson")
        assert json.loads(out.read_text())["properties"]["prediction"] == {"label": "tumour"}
        widget.half_check.setChecked(False)
        assert "<b>benign: 0.247</b>" in widget.probs_label.text() and not widget.threshold_warning.isHidden()
    finally:
        viewer.close()
