"""Writing a demo cohort: slides, lesion GeoJSONs, ``labels.csv``, ``omics.csv``, ``cohort.json``, ``README.txt``."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from wsimil_core._io import atomic_write_text
from wsimil_core.demo.params import DemoCohort, DemoParams
from wsimil_core.demo.slides import make_slide, source_textures
from wsimil_core.errors import DataError
from wsimil_core.wsi.writer import write_pyramid_tiff

_N_GENES = 200


def _assign(n: int, prevalence: float, rng: np.random.Generator) -> np.ndarray:
    """A shuffled 0/1 vector with round(n * prevalence) ones, at least one 1 and one 0."""
    k = int(np.clip(round(n * prevalence), 1, n - 1))
    v = np.zeros(n, np.int64)
    v[:k] = 1
    return rng.permutation(v)


def cohort_tables(params: DemoParams) -> tuple[list[str], dict[str, np.ndarray], list[str], np.ndarray]:
    """Slide ids, per-slide 0/1 columns, patient ids and the omics matrix ``[n_slides, 200]``."""
    n = int(params.n_slides)
    rng = np.random.default_rng([params.seed, 104729])
    ids = [f"demo_{i:03d}" for i in range(n)]
    cols = {
        "label": _assign(n, 0.5, rng),
        "task_b": _assign(n, params.prevalence_b, rng),
        "task_c": _assign(n, params.prevalence_c, rng),
    }
    patients = [f"P{i // 2:03d}" for i in range(n)]  # two slides per patient
    base = rng.uniform(2.0, 9.0, size=_N_GENES)
    sd = rng.uniform(0.4, 1.2, size=_N_GENES)
    omics = base + sd * rng.standard_normal((n, _N_GENES))
    omics[:, :20] += 1.5 * sd[:20] * (cols["label"][:, None] - 0.5) * 2
    omics[:, 20:30] += 1.2 * sd[20:30] * (cols["task_b"][:, None] - 0.5) * 2
    return ids, cols, patients, np.round(omics, 4)


_README = """wsimil demo cohort (synthetic, offline)
======================================

{n} pyramidal TIFF slides ({w} x {h} px at {mpp} um/px, JPEG tiles of {tile} px, {levels} levels), seed {seed}.
Tissue pixels are scikit-image's bundled immunohistochemistry image (skimage.data.immunohistochemistry()),
cut into flipped/rotated blocks inside irregular tissue blobs on a white background. Planted regions, made
from the same pixels re-stained in HED colour space:

  lesion     hematoxylin-dense blue-purple tissue crowded with nuclei   -> labels.csv `label`   (50 %)
  pattern_b  DAB-saturated dark-brown tissue with brown granules         -> labels.csv `task_b`  ({pb:.0f} %)
  pattern_c  pale pink, eosin-rich tissue with round white vacuoles      -> labels.csv `task_c`  ({pc:.0f} %)

A slide's column is 1 exactly when it contains that region. Lesions have a radius of 1.6-2.4 patches of 256 px.

Files
  <slide_id>.tiff              the slides (mpp in the TIFF resolution tags)
  <slide_id>.lesions.geojson   region outlines, level-0 pixel (x, y) coordinates; properties.classification.name
                               is the region kind, properties.task the labels.csv column
  labels.csv                   slide_id,label,task_b,task_c,patient_id (two slides per patient)
  omics.csv                    slide_id + {genes} gene-like columns; GENE001-GENE020 are higher when label=1,
                               GENE021-GENE030 when task_b=1; the rest are noise
  cohort.json                  the parameters this cohort was made with

Made by `wsimil demo` (wsimil_core.demo.make_demo_cohort).
"""


def _levels(size: int) -> int:
    """Pyramid levels down to about 512 px wide (at least 2)."""
    return max(2, 1 + int(math.floor(math.log2(size / 512))))


def make_demo_cohort(
    out_dir: str | os.PathLike,
    n_slides: int = 12,
    size: int = 4096,
    seed: int = 0,
    *,
    mpp: float = 0.5,
    tile: int = 256,
    prevalence_b: float = 0.35,
    prevalence_c: float = 0.2,
    overwrite: bool = False,
    progress: bool = True,
) -> DemoCohort:
    """Write a demo cohort to ``out_dir`` (see the module docstring).

    Re-running with the same parameters keeps slides already written (files are written atomically, so an
    existing slide is complete) and rewrites the tables. A folder made with other parameters is refused
    unless ``overwrite=True``.

    Returns:
        A ``DemoCohort`` listing what was written.
    """
    params = DemoParams(
        n_slides=int(n_slides),
        size=int(size),
        seed=int(seed),
        mpp=float(mpp),
        tile=int(tile),
        prevalence_b=float(prevalence_b),
        prevalence_c=float(prevalence_c),
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = out / "cohort.json"
    if manifest.exists() and not overwrite:
        try:
            old = json.loads(manifest.read_text())
        except ValueError:
            old = None
        if old != asdict(params):
            raise DataError(
                f"{out}: holds a demo cohort made with other parameters ({old}); pass --overwrite or choose "
                "another folder"
            )
    elif not manifest.exists() and not overwrite and any(out.glob("*.tiff")):
        raise DataError(f"{out}: contains .tiff files that are not a demo cohort; choose an empty folder")
    atomic_write_text(manifest, json.dumps(asdict(params), indent=2) + "\n")

    ids, cols, patients, omics = cohort_tables(params)
    textures = None
    slides, geojsons, skipped = [], [], []
    levels = _levels(params.size)
    it = range(len(ids))
    if progress:
        it = tqdm(it, desc="demo slides", unit="slide")
    for i in it:
        sid = ids[i]
        tiff, gj = out / f"{sid}.tiff", out / f"{sid}.lesions.geojson"
        slides.append(tiff)
        geojsons.append(gj)
        if tiff.exists() and gj.exists() and not overwrite:
            skipped.append(sid)
            continue
        if textures is None:
            textures = source_textures(params.seed)
        flags = {c: int(v[i]) for c, v in cols.items()}
        img, feats = make_slide(i, params, flags, textures)
        geo = {"type": "FeatureCollection", "properties": {"slide_id": sid, "units": "level-0 px"}, "features": feats}
        atomic_write_text(gj, json.dumps(geo) + "\n")
        write_pyramid_tiff(
            tiff, img, params.mpp, levels=levels, tile=params.tile, quality=85, description=f"wsimil demo slide {sid}"
        )

    labels = ["slide_id,label,task_b,task_c,patient_id"]
    labels += [
        f"{s},{cols['label'][i]},{cols['task_b'][i]},{cols['task_c'][i]},{patients[i]}" for i, s in enumerate(ids)
    ]
    labels_csv = out / "labels.csv"
    atomic_write_text(labels_csv, "\n".join(labels) + "\n")
    genes = [f"GENE{g + 1:03d}" for g in range(_N_GENES)]
    rows = ["slide_id," + ",".join(genes)]
    rows += [s + "," + ",".join(f"{v:.4f}" for v in omics[i]) for i, s in enumerate(ids)]
    omics_csv = out / "omics.csv"
    atomic_write_text(omics_csv, "\n".join(rows) + "\n")
    h = int(round(0.75 * params.size / params.tile)) * params.tile
    atomic_write_text(
        out / "README.txt",
        _README.format(
            n=params.n_slides,
            w=params.size,
            h=h,
            mpp=params.mpp,
            tile=params.tile,
            levels=levels,
            seed=params.seed,
            pb=100 * cols["task_b"].mean(),
            pc=100 * cols["task_c"].mean(),
            genes=_N_GENES,
        ),
    )
    return DemoCohort(out, slides, labels_csv, omics_csv, geojsons, params, skipped)
