"""The screenshots of docs/napari.md beyond the attention heatmap (used by ``make_screenshots.py``).

Each scene opens a fresh 1280 x 800 napari window (the smallest screen the docks must fit) over the plugin's demo
slide and saves one PNG:

* ``mecds.png``: a MECDS model trained on ``label`` and ``task_b``: its two primary maps (each task's attention)
  are the only layers; the Inference dock's map picker adds ``routing/label`` (routed / not routed);
* ``momkd.png``: a MoMKD model trained with the demo's omics table: its ``memory/component`` map, added with the
  picker, is a Labels layer whose legend names the memory components (C+k / C-k);
* ``training.png``: the Training dock mid-run (ABMIL, live curves from ``metrics.jsonl``), stopped after the shot;
* ``qupath.png``: the demo slide's ``*.lesions.geojson`` (QuPath GeoJSON) opened with File > Open: a Shapes layer
  in µm over the slide, each region's class in the layer's features.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

WINDOW = (1280, 800)
EPOCHS_MECDS = 20
EPOCHS_MOMKD = 30


def train_config(method: dict[str, Any], model: dict[str, Any], data: dict[str, Any], epochs: int, out: Path) -> dict:
    return {
        "method": method,
        "model": model,
        "data": {**data, "split": {"kind": "random", "val_frac": 0.2, "test_frac": 0.0, "seed": 0}},
        "train": {"epochs": epochs, "lr": 2e-3, "device": "cpu", "seed": 0},
        "output": {"dir": str(out), "keep": ["best", "last"], "overwrite": True, "progress": False},
    }


def train_more_models(work: Path, store: Path, labels: Path) -> dict[str, Path]:
    """MECDS (tasks label + task_b) and MoMKD (with the cohort's omics) on the demo store; their checkpoints."""
    from wsimil_core.engine import train

    data = {"store": str(store), "labels": str(labels)}
    out = {}
    t0 = time.time()
    mecds = train(
        train_config(
            {"name": "mecds"},
            {"dim": 32, "n_heads": 2, "router_dim": 16, "dropout": 0.0},
            {**data, "targets": ["label", "task_b"]},
            EPOCHS_MECDS,
            work / "run_mecds",
        )
    )
    out["mecds"] = mecds.last_checkpoint or mecds.best_checkpoint
    momkd = train(
        train_config(
            {"name": "momkd", "options": {"kmeans_samples": 400}},
            {"n_components": 4, "dropout": 0.0},
            {**data, "targets": ["label"], "omics": str(labels.parent / "omics.csv")},
            EPOCHS_MOMKD,
            work / "run_momkd",
        )
    )
    out["momkd"] = momkd.last_checkpoint or momkd.best_checkpoint
    print(f"trained MECDS and MoMKD in {time.time() - t0:.0f} s")
    return out


class Scenes:
    """Opens viewers over the demo slide and saves the scenes' screenshots with ``save_png(array, path)``."""

    def __init__(self, work: Path, out_dir: Path, save_png: Callable[[Any, Path], None]):
        self.work, self.out_dir, self.save_png = work, out_dir, save_png

    def settle(self, ms: int = 300) -> None:
        from qtpy.QtWidgets import QApplication

        end = time.time() + ms / 1000
        while time.time() < end:
            QApplication.processEvents()
            time.sleep(0.01)

    def viewer(self, lesions: bool = False) -> tuple[Any, Any]:
        """A 1280 x 800 viewer with the demo slide (and its lesion outline); returns (viewer, slide layer)."""
        import napari

        from napari_wsimil._sample_data import demo_slide
        from napari_wsimil._viewer import add_layers

        viewer = napari.Viewer(show=True, title="wsimil")
        viewer.window._qt_window.resize(*WINDOW)
        layers = add_layers(viewer, [d for d in demo_slide(self.work / "demo") if lesions or d[2] != "shapes"])
        return viewer, layers[0]

    def run_inference(self, viewer: Any, slide_layer: Any, checkpoint: Path) -> Any:
        from napari_wsimil._inference_widget import InferenceWidget

        widget = InferenceWidget(viewer)
        viewer.window.add_dock_widget(widget, name="Inference (wsimil)", area="right")
        widget.load_checkpoint(checkpoint)
        widget.set_slide_layer(slide_layer)
        widget.store_edit.setText(str(self.work / "store"))
        widget.device_combo.setCurrentText("cpu")
        widget.run()
        deadline = time.time() + 300
        while widget.worker is not None and time.time() < deadline:
            self.settle(50)
        if widget.result is None:
            raise RuntimeError(f"inference did not finish: {widget.error or 'timeout'}")
        return widget

    def shot(self, viewer: Any, name: str) -> None:
        viewer.reset_view()
        self.settle(500)
        self.save_png(viewer.screenshot(canvas_only=False, flash=False), self.out_dir / name)
        viewer.close()

    def mecds(self, checkpoint: Path) -> None:
        viewer, slide = self.viewer()
        widget = self.run_inference(viewer, slide, checkpoint)
        shown = [ly.name for ly in widget.map_layers.layers.values()]
        print(f"MECDS: {len(widget.result.maps)} maps, shown {shown}")
        routing = widget.map_picker.add("routing/label")
        widget.map_layers.layers["attention/task_b"].visible = False
        viewer.layers.selection.active = routing
        self.shot(viewer, "mecds.png")

    def momkd(self, checkpoint: Path) -> None:
        viewer, slide = self.viewer()
        widget = self.run_inference(viewer, slide, checkpoint)
        components = widget.map_picker.add("memory/component")
        widget.map_layers.layers["attention"].visible = False
        viewer.layers.selection.active = components
        print(f"MoMKD legend: {components.metadata['wsimil']['legend']}")
        self.shot(viewer, "momkd.png")

    def training(self, store: Path, labels: Path) -> None:
        from napari_wsimil._training_widget import TrainingWidget

        viewer, _ = self.viewer()
        widget = TrainingWidget(viewer)
        viewer.window.add_dock_widget(widget, name="Training (wsimil)", area="right")
        widget.set_method("abmil")
        widget.set_store(store)
        widget.set_labels(labels)
        widget.set_targets(["label"])
        widget.epochs_spin.setValue(200)
        widget.output_edit.setText(str(self.work / "run_dock"))
        widget.overwrite_box.setChecked(True)
        widget.train()  # shows the Curves tab
        deadline = time.time() + 240
        while len(widget.history) < 12 and widget.state == "running" and time.time() < deadline:
            self.settle(100)
        self.settle(300)
        viewer.reset_view()
        self.settle(300)
        print(f"training dock: {len(widget.history)} epochs shown, state {widget.state}")
        self.save_png(viewer.screenshot(canvas_only=False, flash=False), self.out_dir / "training.png")
        widget.stop()
        deadline = time.time() + 60
        while widget.state == "running" and time.time() < deadline:
            self.settle(100)
        viewer.close()

    def qupath(self) -> None:
        from napari_wsimil._sample_data import demo_slide_path

        viewer, _ = self.viewer()
        path = demo_slide_path(self.work / "demo")
        geojson = path.with_name(path.name[: -len(".tiff")] + ".lesions.geojson")
        (shapes,) = viewer.open(str(geojson), plugin="napari-wsimil")
        shapes.selected_data = set(range(len(shapes.data)))
        print(f"QuPath GeoJSON: {len(shapes.data)} shapes, classes {sorted(set(shapes.features['classification']))}")
        assert np.isclose(shapes.metadata["wsimil"]["mpp"], 0.5)
        self.shot(viewer, "qupath.png")


__all__ = ["Scenes", "train_more_models"]
