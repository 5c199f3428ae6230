"""Sample data "wsimil demo slide": a small synthetic slide with planted lesions, made offline on first use.

The slide comes from :func:`wsimil_core.demo.make_demo_cohort` (2 slides of 2048 x 1536 px at 0.5 µm/px, seed 0)
written once to ``<cache>/demo`` (``$WSIMIL_CACHE`` or ``~/.cache/wsimil``); later calls reuse it. The sample opens
the first slide with a lesion (``label`` = 1) and its region outlines as a Shapes layer in µm.
"""

from __future__ import annotations

import csv
from pathlib import Path

from napari_wsimil._grid import LayerData
from napari_wsimil._inference import default_cache_dir
from napari_wsimil._reader import slide_layers
from napari_wsimil._slide_layers import lesion_shapes_data

DEMO_SLIDES = 2
DEMO_SIZE = 2048
DEMO_SEED = 0


def demo_cohort_dir(cache: str | Path | None = None) -> Path:
    """Make (once) and return the folder of the plugin's demo cohort."""
    from wsimil_core.api import make_demo_cohort

    out = Path(cache) if cache is not None else default_cache_dir() / "demo"
    make_demo_cohort(out, n_slides=DEMO_SLIDES, size=DEMO_SIZE, seed=DEMO_SEED, progress=True)
    return out


def demo_slide_path(cache: str | Path | None = None) -> Path:
    """The demo slide shown by the sample: the first one whose ``label`` is 1 (it has a lesion)."""
    out = demo_cohort_dir(cache)
    with open(out / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    chosen = next((r["slide_id"] for r in rows if r.get("label") == "1"), rows[0]["slide_id"])
    return out / f"{chosen}.tiff"


def demo_slide(cache: str | Path | None = None) -> list[LayerData]:
    """npe2 sample-data command: the demo slide (multiscale, µm) and its annotated regions (Shapes, µm)."""
    path = demo_slide_path(cache)
    layers = slide_layers(path)
    mpp = layers[0][1]["metadata"]["wsimil"]["mpp"]
    geojson = path.with_name(path.name[: -len(".tiff")] + ".lesions.geojson")
    lesions = lesion_shapes_data(geojson, mpp, kind="lesion", name="lesions")
    if lesions[0]:
        layers.append(lesions)
    others = lesion_shapes_data(geojson, mpp, kind=None, name="all regions")
    if len(others[0]) > len(lesions[0]):
        others[1].update(edge_color="yellow", visible=False)
        layers.append(others)
    return layers


__all__ = ["demo_cohort_dir", "demo_slide", "demo_slide_path"]
