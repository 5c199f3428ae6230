"""Regenerate the screenshots of docs/napari.md (needs a display: run under ``xvfb-run -a`` on a headless box).

Opens the "wsimil demo slide" sample (slide + lesion outlines), runs the Inference widget with a small
checkpoint (an *untrained* ABMIL on the random-init truncated ResNet-18 at 2 µm/px, 32 px patches: the
screenshots show the plugin, not a model's accuracy), then saves:

* ``docs/images/napari/sample.png``: the demo slide and its lesion outlines (canvas);
* ``docs/images/napari/inference.png``: the whole window with the Inference dock and the attention heatmap;
* ``docs/images/napari/heatmap.png``: the canvas with the heatmap over the slide.

    xvfb-run -a .venv/bin/python scripts/make_screenshots.py [--out docs/images/napari] [--cache DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def tiny_checkpoint(path: Path) -> Path:
    """An untrained ABMIL whose encoder is the random-init truncated ResNet-18 (recorded, not built here)."""
    import torch

    from wsimil_core.encoders import EncoderSpec
    from wsimil_core.engine.checkpoint import save_checkpoint
    from wsimil_core.models import create_model

    spec = EncoderSpec(name="resnet18", encoder_id="resnet18-random", dim=256, input_size=None)
    enc = spec.with_grid(2.0, 32).to_attrs()
    enc.update(patch_mpp=2.0, patch_size=32, patch_size_level0=128, stride_level0=128)
    torch.manual_seed(0)
    model = create_model("abmil", in_dim=256, n_classes=2, hidden=32, attn_dim=16, dropout=0.0)
    save_checkpoint(path, model, {"method": "abmil", "class_names": {"label": ["benign", "lesion"]},
                                  "targets": ["label"], "encoder": enc})
    return path


def save_png(array, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    image = Image.fromarray(array[..., :3])
    image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(tmp, optimize=True)  # small files in git
    tmp.replace(path)  # atomic
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "images" / "napari")
    ap.add_argument("--cache", type=Path, default=None, help="demo cohort folder (default: a temporary one)")
    args = ap.parse_args(argv)

    import napari
    import napari._qt.qt_main_window as qt_main_window
    from qtpy.QtWidgets import QApplication

    qt_main_window.SHOW_QT_WARNING = False  # no "PyQt5 is deprecated" toast in the screenshots

    from napari_wsimil._inference import preload
    from napari_wsimil._sample_data import demo_slide
    from napari_wsimil._viewer import add_layers
    from napari_wsimil._widget import InferenceWidget

    work = Path(tempfile.mkdtemp(prefix="wsimil_shots_"))
    cache = args.cache or work / "demo"
    preload("resnet18")
    viewer = napari.Viewer(show=True, title="wsimil")
    viewer.window._qt_window.resize(1400, 900)
    layers = add_layers(viewer, demo_slide(cache))
    slide_layer = layers[0]
    viewer.reset_view()

    def settle(ms: int = 300) -> None:
        end = time.time() + ms / 1000
        while time.time() < end:
            QApplication.processEvents()
            time.sleep(0.01)

    settle()
    save_png(viewer.screenshot(canvas_only=True, flash=False), args.out / "sample.png")

    widget = InferenceWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Inference (wsimil)", area="right")
    widget.load_checkpoint(tiny_checkpoint(work / "abmil_demo.safetensors"))
    widget.set_slide_layer(slide_layer)
    widget.store_edit.setText(str(work / "store"))
    widget.device_combo.setCurrentText("cpu")
    widget.run()
    deadline = time.time() + 300
    while widget.worker is not None and time.time() < deadline:
        settle(50)
    if widget.result is None:
        print(f"inference did not finish: {widget.error or 'timeout'}", file=sys.stderr)
        return 1
    lesions = [layer for layer in viewer.layers if layer.name == "lesions"]
    if lesions:
        viewer.layers.move(viewer.layers.index(lesions[0]), len(viewer.layers))  # outlines on top
    settle()
    save_png(viewer.screenshot(canvas_only=True, flash=False), args.out / "heatmap.png")
    save_png(viewer.screenshot(canvas_only=False, flash=False), args.out / "inference.png")
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
