"""One demo slide: real IHC tissue pixels re-stained in HED space, irregular tissue blobs, planted regions.

``make_slide`` returns the level-0 pixels and the GeoJSON features of the planted regions' outlines.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from wsimil_core.demo.params import BACKGROUND, PATCH0, REGION_KINDS, DemoParams
from wsimil_core.errors import DataError

# --------------------------------------------------------------------------------------------------------------
# textures (real IHC pixels re-stained in HED space)


def _disks(shape: tuple[int, int], n: int, rmin: float, rmax: float, rng: np.random.Generator) -> np.ndarray:
    """``[h, w]`` float32 in [0, 1]: ``n`` random elliptical blobs (nuclei, granules, vacuoles)."""
    from skimage import draw  # scikit-image is imported on first use (slow to import)

    out = np.zeros(shape, np.float32)
    for _ in range(n):
        r = rng.uniform(rmin, rmax)
        cy, cx = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
        rr, cc = draw.ellipse(cy, cx, r, r * rng.uniform(0.7, 1.3), shape=shape, rotation=rng.uniform(0, np.pi))
        out[rr, cc] = np.maximum(out[rr, cc], rng.uniform(0.6, 1.0))
    return out


def source_textures(seed: int) -> dict[str, np.ndarray]:
    """The four 512x512 RGB uint8 source textures: ``normal`` and one per region kind."""
    from skimage import color, data  # on first use

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
    pattern_c[_disks(h.shape, 120, 8, 20, rng) > 0] = BACKGROUND
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
    d_tissue = ndimage.distance_transform_edt(tissue) * scale
    d_free = ndimage.distance_transform_edt(~occupied) * scale if occupied.any() else np.full(tissue.shape, np.inf)
    ys, xs = np.mgrid[0 : tissue.shape[0], 0 : tissue.shape[1]]
    cx, cy = (xs + 0.5) * scale, (ys + 0.5) * scale
    w, h = tissue.shape[1] * scale, tissue.shape[0] * scale
    ok = (d_tissue >= radius / 2) & (d_free >= radius + PATCH0 / 4)
    ok &= (cx >= radius) & (cx <= w - radius) & (cy >= radius) & (cy <= h - radius)
    ys, xs = np.nonzero(ok)
    if ys.size == 0:
        return None
    i = int(rng.integers(ys.size))
    return (xs[i] + 0.5) * scale, (ys[i] + 0.5) * scale


# --------------------------------------------------------------------------------------------------------------
# one slide


def make_slide(
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
    img[~tissue_full] = BACKGROUND

    # planted regions: the required ones first, then maybe a second lesion on large slides
    todo = [(kind, True) for kind, column in REGION_KINDS.items() if flags[column]]
    if flags["label"] and w >= 3072 and rng.integers(2):
        todo.append(("lesion", False))
    shapes = []  # unit-free outlines around (0, 0): [M, 2] level-0 px offsets
    for kind, _ in todo:
        lo, hi = (1.8, 2.4) if kind == "lesion" else (1.2, 1.6)
        shapes.append(_blob(0.0, 0.0, min(rng.uniform(lo, hi) * PATCH0, 0.25 * w), rng, rough=0.07))
    layout: list[tuple[str, np.ndarray]] | None = None
    # random layouts; every 8 failures shrink the regions by 10 % (lesions not below 1.6 patches, others 1.1)
    for attempt in range(40):
        occupied = np.zeros(lo_shape, bool)
        layout = []
        for (kind, required), shape in zip(todo, shapes):
            r_mean = float(np.hypot(*shape.T).mean())
            floor = (1.6 if kind == "lesion" else 1.1) * PATCH0
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
