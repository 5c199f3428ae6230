"""Regenerate the screenshots of docs/napari.md (needs a display: run under ``xvfb-run -a`` on a headless box).

Before opening the viewer, the script trains a small model so that the attention heatmap means something:

1. writes a 12-slide demo cohort (``wsimil_core.demo.make_demo_cohort``, 2048 px, 0.5 µm/px, seed 0) to the
   work dir;
2. extracts its features with the random-init truncated ResNet-18 on the grid the Inference widget will use
   (2 µm/px, 32 px patches, stride = patch; recorded in the checkpoint's encoder spec);
3. trains ABMIL (``wsimil_core.engine.train``: lr 2e-3, 100 epochs, CPU, ~30 s; with 20 epochs the attention
   is still almost uniform on these random-init features) and checks on every positive training slide that the
   mean attention inside the lesion (patches with ``wsimil_core.demo.lesion_fraction`` >= 0.5) exceeds the mean
   attention outside; both are printed, and the script stops (exit 1, no screenshots) when a slide fails.

It then opens the "wsimil demo slide" sample (a slide of the plugin's own 2-slide demo cohort, not one the model
was trained on, with its lesion outline), runs the Inference widget with the trained checkpoint (features are
extracted on the fly), prints the inside/outside attention on that slide too, and saves:

* ``docs/images/napari/sample.png``: the demo slide and its lesion outlines (canvas);
* ``docs/images/napari/inference.png``: the whole window with the Inference dock and the attention heatmap;
* ``docs/images/napari/heatmap.png``: the canvas with the heatmap over the slide;
* ``mecds.png``, ``momkd.png``, ``training.png``, ``qupath.png``: a MECDS model (primary maps + the map picker),
  MoMKD memory components with their names, the Training dock mid-run and a QuPath GeoJSON loaded (see
  ``screenshot_scenes.py``; MECDS and MoMKD are trained on the same store first).

    xvfb-run -a .venv/bin/python scripts/make_screenshots.py [--out docs/images/napari] [--cache DIR]

``--cache DIR`` keeps the cohorts, store and run in DIR (re-runs reuse the slides and features).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from screenshot_scenes import Scenes, train_more_models  # noqa: E402

PATCH_MPP = 2.0  # µm/px of the patches (the encoder grid recorded in the checkpoint)
PATCH_PX = 32  # patch side in pixels at PATCH_MPP (128 level-0 px at 0.5 µm/px)
TRAIN_SLIDES = 12
TRAIN_SIZE = 2048
EPOCHS = 100
LR = 2e-3
SEED = 0


def train_demo_model(work: Path) -> tuple[Path, Path, Path] | None:
    """Demo cohort -> features (resnet18 random init, 2 µm/px, 32 px) -> ABMIL.

    Returns (checkpoint, store, labels CSV), or None when the model does not attend to the lesions.
    """
    from wsimil_core.demo import make_demo_cohort
    from wsimil_core.engine import train
    from wsimil_core.features.extract import extract_cohort
    from wsimil_core.wsi.tiling import GridSpec, TissueParams

    cohort = make_demo_cohort(work / "train_cohort", n_slides=TRAIN_SLIDES, size=TRAIN_SIZE, seed=SEED, progress=True)
    store = work / "train_store"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the (intended) random-init encoder warning
        extract_cohort(
            cohort.slides,
            store,
            "resnet18",
            GridSpec(mpp=PATCH_MPP, patch=PATCH_PX),
            TissueParams(),
            weights=None,
            device="cpu",
            batch_size=64,
            num_workers=0,
            amp=False,
            progress=True,
        )
    config = {
        "method": {"name": "abmil", "options": {}},
        "model": {"dim": 32, "attn_dim": 16, "dropout": 0.0, "gated": True},
        "data": {
            "store": str(store),
            "labels": str(cohort.labels_csv),
            "targets": ["label"],
            "split": {"kind": "random", "val_frac": 0.2, "test_frac": 0.0, "seed": SEED},
        },
        "train": {"epochs": EPOCHS, "lr": LR, "device": "cpu", "seed": SEED},
        "output": {"dir": str(work / "run"), "keep": ["best", "last"], "overwrite": True, "progress": False},
    }
    t0 = time.time()
    result = train(config)
    ckpt = result.last_checkpoint or result.best_checkpoint
    print(
        f"trained ABMIL in {time.time() - t0:.0f} s: best epoch {result.best_epoch}, "
        f"val {', '.join(f'{k}={v:.3f}' for k, v in result.val_metrics.items() if isinstance(v, float))}; "
        f"using {ckpt.name}"
    )
    if not check_attention_on_store(ckpt, store, cohort.labels_csv):
        return None
    return ckpt, store, cohort.labels_csv


def attention_inside_outside(
    attention: np.ndarray, coords: np.ndarray, geojson: Path, size_level0: int
) -> tuple[float, float]:
    """Mean attention of patches at least half inside a lesion, and of the other patches."""
    from wsimil_core.demo import lesion_fraction

    inside = lesion_fraction(geojson, coords, size_level0) >= 0.5
    att = np.asarray(attention, dtype=np.float64).reshape(-1)
    if not inside.any() or inside.all():
        return float("nan"), float("nan")
    return float(att[inside].mean()), float(att[~inside].mean())


def check_attention_on_store(ckpt: Path, store: Path, labels_csv: Path) -> bool:
    """Print mean attention inside vs outside the lesions of each positive training slide; True if inside wins."""
    import csv

    from wsimil_core.api import load_checkpoint, predict_bag
    from wsimil_core.store.zarr_store import FeatureStore

    model, _meta = load_checkpoint(ckpt)
    fs = FeatureStore(store)
    with open(labels_csv, newline="") as f:
        positives = [r["slide_id"] for r in csv.DictReader(f) if r["label"] == "1"]
    wins = 0
    for sid in positives:
        bag = fs.read_bag(sid)
        pred = predict_bag(model, bag.features, bag.coords)
        size0 = int(bag.attrs.get("patch_size_level0") or round(PATCH_PX * PATCH_MPP / float(bag.attrs["slide_mpp"])))
        inn, out = attention_inside_outside(
            pred.maps["attention"], bag.coords, labels_csv.parent / f"{sid}.lesions.geojson", size0
        )
        wins += int(inn > out)
        print(
            f"  {sid}: p(lesion)={pred.probs['label'][1]:.2f}, mean attention inside lesion {inn:.5f} "
            f"vs outside {out:.5f} ({inn / out:.1f}x)"
        )
    print(f"attention inside > outside on {wins}/{len(positives)} positive training slides")
    if wins < len(positives) or not positives:
        print("the trained model does not attend to every lesion: no screenshots written", file=sys.stderr)
        return False
    return True


MAX_PNG_BYTES = 280 * 1024  # keep the docs' images small in git


def save_png(array, path: Path) -> None:
    """Write an ``[H, W, 3|4]`` uint8 screenshot as a palette PNG (256 colours, 128 if still too big), atomically."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    image = Image.fromarray(array[..., :3])
    for colors in (256, 128):
        image.quantize(colors=colors, method=Image.Quantize.MEDIANCUT).save(tmp, optimize=True)
        if tmp.stat().st_size <= MAX_PNG_BYTES:
            break
    tmp.replace(path)  # atomic
    size_kb = path.stat().st_size / 1024
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path} ({size_kb:.0f} KB)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "images" / "napari")
    ap.add_argument(
        "--cache", type=Path, default=None, help="work folder for the cohorts, store and run (default: a temporary one)"
    )
    args = ap.parse_args(argv)
    if args.cache is not None:
        args.cache.mkdir(parents=True, exist_ok=True)
        return make_screenshots(args.cache, args.out)
    work = Path(tempfile.mkdtemp(prefix="wsimil_shots_"))
    try:
        return make_screenshots(work, args.out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def make_screenshots(work: Path, out_dir: Path) -> int:
    """Train the demo model in ``work``, then open napari and write the three PNGs to ``out_dir``."""
    t_start = time.time()
    trained = train_demo_model(work)  # before any Qt import: plain CPU work
    if trained is None:
        return 1
    checkpoint, store, labels_csv = trained
    more = train_more_models(work, store, labels_csv)

    import napari
    from qtpy.QtWidgets import QApplication

    from napari_wsimil._inference import preload
    from napari_wsimil._inference_widget import InferenceWidget
    from napari_wsimil._sample_data import demo_slide, demo_slide_path
    from napari_wsimil._viewer import add_layers

    preload("resnet18")
    viewer = napari.Viewer(show=True, title="wsimil")
    viewer.window._qt_window.resize(1400, 900)
    layers = add_layers(viewer, demo_slide(work / "demo"))
    slide_layer = layers[0]
    viewer.reset_view()

    def settle(ms: int = 300) -> None:
        end = time.time() + ms / 1000
        while time.time() < end:
            QApplication.processEvents()
            time.sleep(0.01)

    settle()
    save_png(viewer.screenshot(canvas_only=True, flash=False), out_dir / "sample.png")

    widget = InferenceWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Inference (wsimil)", area="right")
    widget.load_checkpoint(checkpoint)
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
    res = widget.result
    path = demo_slide_path(work / "demo")
    size0 = int(round(PATCH_PX * PATCH_MPP / float(slide_layer.metadata["wsimil"]["mpp"])))
    inn, out = attention_inside_outside(
        res.maps["attention"], res.coords, path.with_name(path.name[: -len(".tiff")] + ".lesions.geojson"), size0
    )
    print(
        f"sample slide {res.slide_id} (not in training): prediction {res.prediction}, mean attention inside "
        f"lesion {inn:.5f} vs outside {out:.5f} ({inn / out:.1f}x)"
    )
    lesions = [layer for layer in viewer.layers if layer.name == "lesions"]
    if lesions:
        viewer.layers.move(viewer.layers.index(lesions[0]), len(viewer.layers))  # outlines on top
    viewer.reset_view()  # the dock narrowed the canvas: fit the whole slide again
    settle()
    save_png(viewer.screenshot(canvas_only=True, flash=False), out_dir / "heatmap.png")
    save_png(viewer.screenshot(canvas_only=False, flash=False), out_dir / "inference.png")
    viewer.close()
    scenes = Scenes(work, out_dir, save_png)
    scenes.mecds(more["mecds"])
    scenes.momkd(more["momkd"])
    scenes.qupath()
    scenes.training(store, labels_csv)
    print(f"done in {time.time() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
