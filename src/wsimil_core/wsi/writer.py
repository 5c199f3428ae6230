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
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from wsimil_core._io import atomic_path
from wsimil_core.errors import SlideError

__all__ = ["write_pyramid_tiff", "write_pyramid_tiff_tiles", "downsample_rgb", "TileRenderer"]


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
    path = Path(path)
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise SlideError(f"{path}: expected an RGB image [h, w, 3] uint8, got {rgb.shape} {rgb.dtype}")
    if rgb.shape[0] < 1 or rgb.shape[1] < 1:
        raise SlideError(f"{path}: the image is empty ({rgb.shape})")
    _check_options(path, mpp, levels, tile, factor, compression, quality)
    import tifffile

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp_name:
        with tifffile.TiffWriter(tmp_name, bigtiff=rgb.nbytes > 2**31) as tif:
            level_rgb = np.ascontiguousarray(rgb)
            for lvl in range(int(levels)):
                if lvl > 0:
                    if level_rgb.shape[0] < factor or level_rgb.shape[1] < factor:
                        break
                    level_rgb = downsample_rgb(level_rgb, int(factor))
                ds = (rgb.shape[1] / level_rgb.shape[1], rgb.shape[0] / level_rgb.shape[0])
                kwargs = _page_options(lvl, ds, mpp, tile, compression, quality, description)
                tif.write(level_rgb, **kwargs)
    return path


_CODECS = {"jpeg": "jpeg", "deflate": "zlib", "zlib": "zlib", "lzw": "lzw", "none": None}


def _check_options(
    path: Path, mpp: float | None, levels: int, tile: int, factor: int, compression: str, quality: int
) -> None:
    """One ``SlideError`` naming ``path`` for an invalid writer option."""
    if mpp is not None and not (np.isfinite(mpp) and mpp > 0):
        raise SlideError(f"{path}: mpp must be a positive number, got {mpp!r}")
    if int(levels) < 1:
        raise SlideError(f"{path}: levels must be >= 1, got {levels}")
    if tile < 16 or tile % 16:
        raise SlideError(f"{path}: tile must be a positive multiple of 16, got {tile}")
    if int(factor) < 2:
        raise SlideError(f"{path}: factor must be an integer >= 2, got {factor}")
    if compression not in _CODECS:
        raise SlideError(f"{path}: compression must be one of {sorted(_CODECS)}, got {compression!r}")
    if not 1 <= int(quality) <= 100:
        raise SlideError(f"{path}: quality must be in 1..100, got {quality}")


def _page_options(
    level: int,
    downsample: tuple[float, float],
    mpp: float | None,
    tile: int,
    compression: str,
    quality: int,
    description: str | None,
) -> dict:
    """``TiffWriter.write`` keywords of one pyramid page (tiles, codec, resolution tags, reduced-level flag)."""
    kwargs: dict = {"photometric": "rgb", "tile": (tile, tile), "subfiletype": 1 if level > 0 else 0, "metadata": None}
    codec = _CODECS[compression]
    if codec == "jpeg":
        kwargs["compression"] = "jpeg"
        kwargs["compressionargs"] = {"level": int(quality)}
    elif codec is not None:
        kwargs["compression"] = codec
    if mpp is not None:
        # level-k pixels are (downsample_k * mpp) µm
        kwargs["resolution"] = (1e4 / (mpp * downsample[0]), 1e4 / (mpp * downsample[1]))
        kwargs["resolutionunit"] = "CENTIMETER"
    if level == 0 and description is not None:
        kwargs["description"] = description
    return kwargs


TileRenderer = Callable[[int, int, int, int, int], np.ndarray]
"""``render(downsample, x, y, w, h) -> uint8 [h, w, 3]``: the pixels of a pyramid level (``downsample`` = 1, 2,
4, ...; ``x, y, w, h`` in that level's pixels)."""


def write_pyramid_tiff_tiles(
    path: str | os.PathLike,
    width: int,
    height: int,
    render: TileRenderer,
    mpp: float | None,
    levels: int = 3,
    tile: int = 256,
    *,
    factor: int = 2,
    compression: str = "jpeg",
    quality: int = 90,
    description: str | None = None,
) -> Path:
    """Write a pyramidal TIFF of any size tile by tile, in bounded memory (one tile at a time).

    The same file layout as :func:`write_pyramid_tiff` (successive pages, resolution tags, reduced levels
    marked), for slides too large to hold in memory (a 100k x 100k RGB level is 28 GiB): ``render`` draws each
    tile of each level on demand, so the caller decides how a reduced level looks (e.g. a synthetic texture
    drawn at that scale, or an area average it computes itself). Level ``k`` is ``floor(size / factor**k)``
    pixels, as OpenSlide-style pyramids floor the level size; levels stop early below ``factor`` pixels.

    Args:
        path: destination file; width, height: level-0 size in pixels.
        render: ``render(downsample, x, y, w, h) -> uint8 [h, w, 3]`` (see :data:`TileRenderer`); called once
            per tile per level, in row-major order; edge tiles ask for the remaining ``w``/``h`` only.
        mpp, levels, tile, factor, compression, quality, description: as :func:`write_pyramid_tiff`.

    Raises:
        SlideError: invalid arguments, or ``render`` returns an array of the wrong shape or type.
    """
    path = Path(path)
    if int(width) < 1 or int(height) < 1:
        raise SlideError(f"{path}: width and height must be >= 1, got {width} x {height}")
    _check_options(path, mpp, levels, tile, factor, compression, quality)
    import tifffile

    def tiles(ds: int, w: int, h: int) -> Iterator[np.ndarray]:
        for y in range(0, h, tile):
            for x in range(0, w, tile):
                tw, th = min(tile, w - x), min(tile, h - y)
                block = np.asarray(render(ds, x, y, tw, th))
                if block.shape != (th, tw, 3) or block.dtype != np.uint8:
                    raise SlideError(
                        f"{path}: render({ds}, {x}, {y}, {tw}, {th}) returned {block.shape} {block.dtype}, "
                        f"expected ({th}, {tw}, 3) uint8"
                    )
                if (tw, th) != (tile, tile):  # tifffile wants whole tiles: pad the edge ones
                    full = np.zeros((tile, tile, 3), np.uint8)
                    full[:th, :tw] = block
                    block = full
                yield block

    path.parent.mkdir(parents=True, exist_ok=True)
    big = int(width) * int(height) * 3 > 2**31
    with atomic_path(path) as tmp_name:
        with tifffile.TiffWriter(tmp_name, bigtiff=big) as tif:
            for lvl in range(int(levels)):
                ds = int(factor) ** lvl
                w, h = int(width) // ds, int(height) // ds
                if lvl > 0 and (w < 1 or h < 1):
                    break
                kwargs = _page_options(lvl, (width / w, height / h), mpp, tile, compression, quality, description)
                tif.write(tiles(ds, w, h), shape=(h, w, 3), dtype=np.uint8, **kwargs)
    return path
