"""An offline demo cohort: small pyramidal TIFF slides built from real tissue pixels, with planted lesions.

Every slide is a pyramidal, JPEG-tiled TIFF at 0.5 µm/px (``wsimil_core.wsi.writer.write_pyramid_tiff``). Its
tissue is scikit-image's bundled immunohistochemistry image (``skimage.data.immunohistochemistry()``, a real
IHC-stained colon section), cut into randomly flipped/rotated blocks and laid out inside 1-3 irregular tissue
blobs on a white background. Three kinds of region are planted inside the tissue, each made from the same real
pixels re-stained in HED colour space (``skimage.color.rgb2hed``):

* ``lesion`` (defines ``label``): hematoxylin-dense, blue-purple tissue crowded with dark nuclei;
* ``pattern_b`` (defines ``task_b``): DAB-saturated dark-brown tissue with brown granules;
* ``pattern_c`` (defines ``task_c``): pale pink, eosin-rich tissue full of round white vacuoles.

Regions are large (lesions: radius 1.6-2.4 patches of 256 px at 0.5 µm/px; others >= 1.1), so patches lie wholly
inside them, and
their colours differ enough that even a random-init CNN's features separate them. The outline of each region is
written as GeoJSON in level-0 pixel coordinates (``<slide_id>.lesions.geojson``); ``lesion_fraction`` turns it into
a per-patch "fraction inside" for tests such as "attention inside lesions > outside".

Files: ``<slide_id>.tiff``, ``<slide_id>.lesions.geojson``, ``labels.csv`` (slide_id, label, task_b, task_c,
patient_id), ``omics.csv`` (slide_id + 200 gene-like columns; ``GENE001..GENE020`` go up with ``label``,
``GENE021..GENE030`` with ``task_b``), ``cohort.json`` (parameters) and ``README.txt``.
Everything is deterministic for a seed.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from wsimil_core._io import atomic_write_text as _atomic_write_text
from wsimil_core.errors import DataError

__all__ = ["DemoParams", "DemoCohort", "make_demo_cohort", "lesion_fraction", "load_lesions", "REGION_KINDS"]

#: region kind -> the labels.csv column its presence defines
REGION_KINDS = {"lesion": "label", "pattern_b": "task_b", "pattern_c": "task_c"}
_PATCH0 = 256  # a 256 px patch at 0.5 µm/px, in level-0 pixels at the demo mpp
_N_GENES = 200
_BG = np.array([243, 242, 245], np.uint8)


@dataclass
class DemoParams:
    """Parameters of a demo cohort (recorded in ``cohort.json``).

    Attributes:
        n_slides: number of slides (>= 2).
        size: level-0 width in px (height is 3/4 of it, rounded to the tile); >= 2048, multiple of 256.
        seed: random seed; the same seed gives the same cohort, bit for bit.
        mpp: µm per level-0 pixel written in the TIFF tags.
        tile: TIFF tile side.
        prevalence_b, prevalence_c: fraction of slides with ``pattern_b`` / ``pattern_c`` (label is 50 %).
    """

    n_slides: int = 12
    size: int = 4096
    seed: int = 0
    mpp: float = 0.5
    tile: int = 256
    prevalence_b: float = 0.35
    prevalence_c: float = 0.2

    def __post_init__(self) -> None:
        if int(self.n_slides) < 2:
            raise DataError(f"demo cohort: n_slides must be >= 2, got {self.n_slides}")
        if int(self.size) < 2048 or int(self.size) % 256:
            raise DataError(f"demo cohort: size must be a multiple of 256 and >= 2048, got {self.size}")
        if not (self.mpp > 0):
            raise DataError(f"demo cohort: mpp must be positive, got {self.mpp}")
        for name in ("prevalence_b", "prevalence_c"):
            v = getattr(self, name)
            if not 0.0 < v < 1.0:
                raise DataError(f"demo cohort: {name} must be in (0, 1), got {v}")


@dataclass
class DemoCohort:
    """What ``make_demo_cohort`` wrote."""

    out_dir: Path
    slides: list[Path]
    labels_csv: Path
    omics_csv: Path
    geojson: list[Path]
    params: DemoParams
    skipped: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------------------
# textures (real IHC pixels re-stained in HED space)


def _disks(shape: tuple[int, int], n: int, rmin: float, rmax: float, rng: np.random.Generator) -> np.ndarray:
    """``[h, w]`` float32 in [0, 1]: ``n`` random elliptical blobs (nuclei, granules, vacuoles)."""
    from skimage import draw

    out = np.zeros(shape, np.float32)
    for _ in range(n):
        r = rng.uniform(rmin, rmax)
        cy, cx = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
        rr, cc = draw.ellipse(cy, cx, r, r * rng.uniform(0.7, 1.3), shape=shape, rotation=rng.uniform(0, np.pi))
        out[rr, cc] = np.maximum(out[rr, cc], rng.uniform(0.6, 1.0))
    return out


def _textures(seed: int) -> dict[str, np.ndarray]:
    """The four 512x512 RGB uint8 source textures: ``normal`` and one per region kind."""
    from skimage import color, data

    rng = np.random.default_rng([seed, 7919])
    ihc = data.immunohistochemistry()
    hed = color.rgb2hed(ihc)
    h, e, d = hed[..., 0], hed[..., 1], hed[..., 2]

    def rgb(hh: np.ndarray, ee: np.ndarray, dd: np.ndarray) -> np.ndarray:
        out = color.hed2rgb(np.stack([hh, ee, dd], -1))
        return np.clip(np.rint(out * 255), 0, 255).astype(np.uint8)

    lesion = rgb(h * 1.8 + 0.10 * _disks(h.shape, 1400, 3, 7, rng) + 0.02, e + 0.02, d * 0.2)
    pattern_b = rgb(h * 0.6, e, d * 2.5 + 0.06 * _disks(h.shape, 600, 4, 10, rng))
    pattern_c = rgb(h * 0.4, e + 0.07, d * 0.3)
    pattern_c[_disks(h.shape, 120, 8, 20, rng) > 0] = _BG
    return {"normal": ihc, "lesion": lesion, "pattern_b": pattern_b, "pattern_c": pattern_c}


def _fill_texture(out: np.ndarray, src: np.ndarray, rng: np.random.Generator, block: int = 320) -> None:
    """Fill ``out`` [h, w, 3] with randomly cropped, flipped and rotated ``block``-px pieces of ``src``."""
    h, w = out.shape[:2]
    sh, sw = src.shape[:2]
    for y in range(0, h, block):
        for x in range(0, w, block):
            oy, ox = rng.integers(0, sh - block + 1), rng.integers(0, sw - block + 1)
            piece = np.rot90(src[oy : oy + block, ox : ox + block], k=int(rng.integers(4)))
            if rng.integers(2):
                piece = piece[:, ::-1]
            ph, pw = min(block, h - y), min(block, w - x)
            out[y : y + ph, x : x + pw] = piece[:ph, :pw]


# --------------------------------------------------------------------------------------------------------------
# shapes


def _blob(
    cx: float, cy: float, radius: float, rng: np.random.Generator, n: int = 72, rough: float = 0.12
) -> np.ndarray:
    """An irregular closed polygon ``[n, 2]`` (x, y): r(θ) = R (1 + Σ_k a_k sin(kθ + φ_k)), k = 2..5."""
    theta = np.linspace(0, 2 * np.pi, n, endpoint=False)
    r = np.ones_like(theta)
    for k in range(2, 6):
        r += rng.uniform(0, rough) * np.sin(k * theta + rng.uniform(0, 2 * np.pi))
    r *= radius
    return np.stack([cx + r * np.cos(theta), cy + r * np.sin(theta)], -1)


def _mask(poly: np.ndarray, shape: tuple[int, int], scale: float = 1.0, origin: tuple[int, int] = (0, 0)) -> np.ndarray:
    """Bool ``[h, w]`` mask of a polygon given in level-0 (x, y), on a grid ``scale`` times coarser whose
    cell (0, 0) starts at level-0 ``origin`` (x0, y0). Filled with PIL (fast C scan conversion)."""
    from PIL import Image, ImageDraw

    canvas = Image.new("1", (int(shape[1]), int(shape[0])), 0)
    pts = (poly - np.asarray(origin, np.float64)) / scale - 0.5  # pixel centres at integer + 0.5
    ImageDraw.Draw(canvas).polygon([tuple(p) for p in pts.tolist()], fill=1, outline=1)
    return np.asarray(canvas, dtype=bool)


def _place(
    tissue: np.ndarray, occupied: np.ndarray, radius: float, scale: float, rng: np.random.Generator
) -> tuple[float, float] | None:
    """A random centre (level-0 x, y) for a region reaching ``radius`` from its centre, on the low-res grid
    (``scale`` px per cell): at least ``radius / 2`` inside the tissue, ``radius`` inside the image, and
    ``radius + patch / 4`` away from every region placed before (``occupied``). None when there is no such place."""
    from scipy import ndimage

    d_tissue = ndimage.distance_transform_edt(tissue) * scale
    d_free = ndimage.distance_transform_edt(~occupied) * scale if occupied.any() else np.full(tissue.shape, np.inf)
    ys, xs = np.mgrid[0 : tissue.shape[0], 0 : tissue.shape[1]]
    cx, cy = (xs + 0.5) * scale, (ys + 0.5) * scale
    w, h = tissue.shape[1] * scale, tissue.shape[0] * scale
    ok = (d_tissue >= radius / 2) & (d_free >= radius + _PATCH0 / 4)
    ok &= (cx >= radius) & (cx <= w - radius) & (cy >= radius) & (cy <= h - radius)
    ys, xs = np.nonzero(ok)
    if ys.size == 0:
        return None
    i = int(rng.integers(ys.size))
    return (xs[i] + 0.5) * scale, (ys[i] + 0.5) * scale


# --------------------------------------------------------------------------------------------------------------
# one slide


def _assign(n: int, prevalence: float, rng: np.random.Generator) -> np.ndarray:
    """A shuffled 0/1 vector with round(n * prevalence) ones, at least one 1 and one 0."""
    k = int(np.clip(round(n * prevalence), 1, n - 1))
    v = np.zeros(n, np.int64)
    v[:k] = 1
    return rng.permutation(v)


def _make_slide(
    index: int, params: DemoParams, flags: dict[str, int], textures: dict[str, np.ndarray]
) -> tuple[np.ndarray, list[dict]]:
    """Pixels ``[h, w, 3]`` uint8 and GeoJSON features of one slide."""
    rng = np.random.default_rng([params.seed, index])
    w = int(params.size)
    h = int(round(0.75 * w / params.tile)) * params.tile
    scale = 16.0  # low-res placement grid, level-0 px per cell
    lo_shape = (math.ceil(h / scale), math.ceil(w / scale))

    # per-slide stain jitter on the (small) source textures
    gain = rng.uniform(0.94, 1.06, size=3)
    tex = {k: np.clip(v.astype(np.float32) * gain, 0, 255).astype(np.uint8) for k, v in textures.items()}

    # tissue: one elliptic blob, or two side by side on larger slides
    tissue_lo = np.zeros(lo_shape, bool)
    tissue_full = np.zeros((h, w), bool)
    n_blobs = int(rng.integers(1, 3)) if w >= 3072 else 1
    for b in range(n_blobs):
        rx, ry = (0.40 * w, 0.40 * h) if n_blobs == 1 else (0.24 * w, 0.40 * h)
        cx = (b + 0.5) / n_blobs * w + rng.uniform(-0.03, 0.03) * w
        cy = h / 2 + rng.uniform(-0.04, 0.04) * h
        poly = _blob(0.0, 0.0, 1.0, rng, rough=0.08) * rng.uniform(0.92, 1.0)
        poly = poly * np.array([rx, ry]) + np.array([cx, cy])
        tissue_lo |= _mask(poly, lo_shape, scale)
        tissue_full |= _mask(poly, (h, w))

    img = np.empty((h, w, 3), np.uint8)
    _fill_texture(img, tex["normal"], rng)
    img[~tissue_full] = _BG

    # planted regions: the required ones first, then maybe a second lesion on large slides
    todo = [(kind, True) for kind, column in REGION_KINDS.items() if flags[column]]
    if flags["label"] and w >= 3072 and rng.integers(2):
        todo.append(("lesion", False))
    shapes = []  # unit-free outlines around (0, 0): [M, 2] level-0 px offsets
    for kind, _ in todo:
        lo, hi = (1.8, 2.4) if kind == "lesion" else (1.2, 1.6)
        shapes.append(_blob(0.0, 0.0, min(rng.uniform(lo, hi) * _PATCH0, 0.25 * w), rng, rough=0.07))
    layout: list[tuple[str, np.ndarray]] | None = None
    # random layouts; every 8 failures shrink the regions by 10 % (lesions not below 1.6 patches, others 1.1)
    for attempt in range(40):
        occupied = np.zeros(lo_shape, bool)
        layout = []
        for (kind, required), shape in zip(todo, shapes):
            r_mean = float(np.hypot(*shape.T).mean())
            floor = (1.6 if kind == "lesion" else 1.1) * _PATCH0
            shape = shape * max(0.9 ** (attempt // 8), min(1.0, floor / r_mean))
            centre = _place(tissue_lo, occupied, float(np.hypot(*shape.T).max()), scale, rng)
            if centre is None:
                if required:
                    layout = None
                    break
                continue
            poly = shape + np.asarray(centre)
            layout.append((kind, poly))
            occupied |= _mask(poly, lo_shape, scale)
        if layout is not None:
            break
    if layout is None:
        raise DataError(f"demo slide {index}: no room for {[k for k, _ in todo]} (use a larger --size)")

    features = []
    for kind, poly in layout:
        x0, y0 = (max(0, int(v)) for v in np.floor(poly.min(axis=0)))
        x1, y1 = min(w, int(np.ceil(poly[:, 0].max())) + 1), min(h, int(np.ceil(poly[:, 1].max())) + 1)
        inside = _mask(poly, (y1 - y0, x1 - x0), origin=(x0, y0))
        patch = np.empty((y1 - y0, x1 - x0, 3), np.uint8)
        _fill_texture(patch, tex[kind], rng)
        view = img[y0:y1, x0:x1]
        view[inside] = patch[inside]
        ring = np.round(poly).astype(int).tolist()
        features.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [ring + [ring[0]]]},
                "properties": {
                    "objectType": "annotation",
                    "classification": {"name": kind},
                    "task": REGION_KINDS[kind],
                },
            }
        )
    return img, features


# --------------------------------------------------------------------------------------------------------------
# cohort


def _tables(params: DemoParams) -> tuple[list[str], dict[str, np.ndarray], list[str], np.ndarray]:
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
    from wsimil_core.wsi.writer import write_pyramid_tiff

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
    _atomic_write_text(manifest, json.dumps(asdict(params), indent=2) + "\n")

    ids, cols, patients, omics = _tables(params)
    textures = None
    slides, geojsons, skipped = [], [], []
    levels = _levels(params.size)
    it = range(len(ids))
    if progress:
        from tqdm.auto import tqdm

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
            textures = _textures(params.seed)
        flags = {c: int(v[i]) for c, v in cols.items()}
        img, feats = _make_slide(i, params, flags, textures)
        geo = {"type": "FeatureCollection", "properties": {"slide_id": sid, "units": "level-0 px"}, "features": feats}
        _atomic_write_text(gj, json.dumps(geo) + "\n")
        write_pyramid_tiff(
            tiff, img, params.mpp, levels=levels, tile=params.tile, quality=85, description=f"wsimil demo slide {sid}"
        )

    labels = ["slide_id,label,task_b,task_c,patient_id"]
    labels += [
        f"{s},{cols['label'][i]},{cols['task_b'][i]},{cols['task_c'][i]},{patients[i]}" for i, s in enumerate(ids)
    ]
    labels_csv = out / "labels.csv"
    _atomic_write_text(labels_csv, "\n".join(labels) + "\n")
    genes = [f"GENE{g + 1:03d}" for g in range(_N_GENES)]
    rows = ["slide_id," + ",".join(genes)]
    rows += [s + "," + ",".join(f"{v:.4f}" for v in omics[i]) for i, s in enumerate(ids)]
    omics_csv = out / "omics.csv"
    _atomic_write_text(omics_csv, "\n".join(rows) + "\n")
    h = int(round(0.75 * params.size / params.tile)) * params.tile
    _atomic_write_text(
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


# --------------------------------------------------------------------------------------------------------------
# lesion masks


def load_lesions(geojson_path: str | os.PathLike, kind: str | None = "lesion") -> list[np.ndarray]:
    """Outer rings ``[M, 2]`` (level-0 x, y) of the regions of ``kind`` (None: every region) in a GeoJSON file.

    Accepts a FeatureCollection (or a single Feature) of Polygon / MultiPolygon geometries; holes are ignored.
    """
    path = Path(geojson_path)
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise DataError(f"{path}: cannot read the lesion GeoJSON: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise DataError(f"{path}: not valid JSON: {exc}") from None
    feats = data.get("features", [data]) if isinstance(data, dict) else None
    if not isinstance(feats, list):
        raise DataError(f"{path}: not a GeoJSON FeatureCollection")
    rings = []
    for f in feats:
        props = (f or {}).get("properties") or {}
        name = (props.get("classification") or {}).get("name")
        if kind is not None and name != kind:
            continue
        geom = (f or {}).get("geometry") or {}
        if geom.get("type") == "Polygon":
            polys = [geom["coordinates"]]
        elif geom.get("type") == "MultiPolygon":
            polys = geom["coordinates"]
        else:
            continue
        for poly in polys:
            ring = np.asarray(poly[0], dtype=np.float64)
            if ring.ndim != 2 or ring.shape[1] != 2 or len(ring) < 3:
                raise DataError(f"{path}: a polygon ring is not a list of >= 3 (x, y) points")
            rings.append(ring)
    return rings


def lesion_fraction(
    geojson_path: str | os.PathLike,
    coords: np.ndarray,
    patch_size_level0: int | float,
    kind: str | None = "lesion",
    samples: int = 8,
) -> np.ndarray:
    """Fraction of each patch that lies inside a region of ``kind`` (default: the label-defining lesions).

    Each patch is sampled at ``samples x samples`` evenly spaced points (cell centres) tested against every
    polygon with ``matplotlib.path.Path.contains_points``.

    Args:
        geojson_path: ``<slide_id>.lesions.geojson`` (level-0 pixel coordinates).
        coords: ``[N, 2]`` level-0 (x, y) top-left corners.
        patch_size_level0: patch side in level-0 pixels.
        kind: region kind (``lesion``, ``pattern_b``, ``pattern_c``) or None for any region.
        samples: points per patch side.

    Returns:
        ``[N]`` float64 in [0, 1].
    """
    from matplotlib.path import Path as MplPath

    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    rings = load_lesions(geojson_path, kind)
    n = coords.shape[0]
    if n == 0 or not rings:
        return np.zeros(n)
    offs = (np.arange(samples) + 0.5) / samples * float(patch_size_level0)
    ox, oy = np.meshgrid(offs, offs)
    pts = (coords[:, None, :] + np.stack([ox.ravel(), oy.ravel()], -1)[None]).reshape(-1, 2)
    inside = np.zeros(pts.shape[0], bool)
    for ring in rings:
        inside |= MplPath(ring).contains_points(pts)
    return inside.reshape(n, -1).mean(axis=1)
