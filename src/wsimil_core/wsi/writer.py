"""Write small pyramidal TIFF slides (tests, the demo cohort, benchmarks).

The file layout is the one OpenSlide's *generic tiled TIFF* driver and our tifffile backend both read:

* one tiled, JPEG-compressed (or other) RGB page per pyramid level, written as **successive pages**
  (not SubIFDs), each level ``factor`` times smaller than the one before;
* ``XResolution``/``YResolution`` with ``ResolutionUnit = CENTIMETER`` on every page, so the level-0 mpp is
  ``1e4 / XResolution`` (OpenSlide reports it as ``openslide.mpp-x``; the tifffile backend reads the same tags);
* reduced levels are marked ``NewSubfileType = 1`` (reduced-resolution image), as pyramidal TIFF writers do.

The file is written to a temporary name in the destination folder and renamed at the end, so a crash never
leaves a half-written slide under the final name.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from wsimil_core._io import atomic_path
from wsimil_core.errors import SlideError

__all__ = ["write_pyramid_tiff", "downsample_rgb"]


def downsample_rgb(rgb: np.ndarray, factor: int) -> np.ndarray:
    """Area-average an RGB image by an integer ``factor``.

    Args:
        rgb: ``[h, w, 3]`` uint8.
        factor: integer >= 1.

    Returns:
        ``[max(1, h // factor), max(1, w // factor), 3]`` uint8; trailing rows/columns that do not fill a whole
        ``factor x factor`` block are dropped (as OpenSlide-style pyramids floor the level size).
    """
    if factor == 1:
        return rgb
    h, w = rgb.shape[:2]
    oh, ow = max(1, h // factor), max(1, w // factor)
    fh, fw = min(factor, h), min(factor, w)
    crop = rgb[: oh * fh, : ow * fw].astype(np.float32)
    out = crop.reshape(oh, fh, ow, fw, 3).mean(axis=(1, 3))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def write_pyramid_tiff(
    path: str | os.PathLike,
    rgb: np.ndarray,
    mpp: float | None,
    levels: int = 3,
    tile: int = 256,
    *,
    factor: int = 2,
    compression: str = "jpeg",
    quality: int = 90,
    description: str | None = None,
) -> Path:
    """Write ``rgb`` as a tiled pyramidal TIFF readable by OpenSlide (generic TIFF) and by tifffile.

    Args:
        path: destination file (``.tif``/``.tiff``); parent folders are created.
        rgb: level-0 pixels, ``[h, w, 3]`` uint8 RGB.
        mpp: micrometres per level-0 pixel stored in the resolution tags, or None to write no physical
            resolution (a slide "without mpp": readers then need ``slide_mpp``).
        levels: number of pyramid levels to write (>= 1). Levels stop early when a level would be smaller
            than one pixel.
        tile: tile side in pixels, a positive multiple of 16 (TIFF requirement).
        factor: integer downsample between successive levels (>= 2).
        compression: ``"jpeg"`` (default, what scanners write), ``"deflate"``, ``"lzw"`` or ``"none"``
            (lossless ones make pixel-exact tests possible).
        quality: JPEG quality 1..100.
        description: optional ``ImageDescription`` of the first page.

    Returns:
        The path written.

    Raises:
        SlideError: invalid arguments (naming the destination file).
    """
    import tifffile

    path = Path(path)
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise SlideError(f"{path}: expected an RGB image [h, w, 3] uint8, got {rgb.shape} {rgb.dtype}")
    if rgb.shape[0] < 1 or rgb.shape[1] < 1:
        raise SlideError(f"{path}: the image is empty ({rgb.shape})")
    if mpp is not None and not (np.isfinite(mpp) and mpp > 0):
        raise SlideError(f"{path}: mpp must be a positive number, got {mpp!r}")
    if int(levels) < 1:
        raise SlideError(f"{path}: levels must be >= 1, got {levels}")
    if tile < 16 or tile % 16:
        raise SlideError(f"{path}: tile must be a positive multiple of 16, got {tile}")
    if int(factor) < 2:
        raise SlideError(f"{path}: factor must be an integer >= 2, got {factor}")
    codecs = {"jpeg": "jpeg", "deflate": "zlib", "zlib": "zlib", "lzw": "lzw", "none": None}
    if compression not in codecs:
        raise SlideError(f"{path}: compression must be one of {sorted(codecs)}, got {compression!r}")
    if not 1 <= int(quality) <= 100:
        raise SlideError(f"{path}: quality must be in 1..100, got {quality}")

    path.parent.mkdir(parents=True, exist_ok=True)
    codec = codecs[compression]
    with atomic_path(path) as tmp_name:
        with tifffile.TiffWriter(tmp_name, bigtiff=rgb.nbytes > 2**31) as tif:
            level_rgb = np.ascontiguousarray(rgb)
            for lvl in range(int(levels)):
                if lvl > 0:
                    if level_rgb.shape[0] < factor or level_rgb.shape[1] < factor:
                        break
                    level_rgb = downsample_rgb(level_rgb, int(factor))
                kwargs: dict = {
                    "photometric": "rgb",
                    "tile": (tile, tile),
                    "subfiletype": 1 if lvl > 0 else 0,
                    "metadata": None,
                }
                if codec == "jpeg":
                    kwargs["compression"] = "jpeg"
                    kwargs["compressionargs"] = {"level": int(quality)}
                elif codec is not None:
                    kwargs["compression"] = codec
                if mpp is not None:
                    # Level-0 pixel size is 1 px of the base image; level k pixels are (ds_k * mpp) µm.
                    ds_x = rgb.shape[1] / level_rgb.shape[1]
                    ds_y = rgb.shape[0] / level_rgb.shape[0]
                    kwargs["resolution"] = (1e4 / (mpp * ds_x), 1e4 / (mpp * ds_y))
                    kwargs["resolutionunit"] = "CENTIMETER"
                if lvl == 0 and description is not None:
                    kwargs["description"] = description
                tif.write(level_rgb, **kwargs)
    return path
