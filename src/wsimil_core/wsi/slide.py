"""Whole-slide image reading: one ``Slide`` interface over OpenSlide and tifffile.

``open_slide(path, backend="auto", slide_mpp=None)`` returns a :class:`Slide`:

* ``backend="openslide"``: everything OpenSlide opens (SVS, NDPI, MRXS, SCN, generic tiled TIFF, DICOM, ...);
* ``backend="tifffile"``: OME-TIFF and plain pyramidal TIFF, read tile by tile through
  ``tifffile.TiffFile(...).aszarr()`` + zarr. Pyramid levels are the series' levels (SubIFDs, OME), or else the
  successive tiled pages of decreasing size with the same aspect ratio;
* ``backend="auto"`` (default): OpenSlide when it recognises the file, else tifffile (also for OME-TIFFs, and
  for plain TIFFs OpenSlide recognises but cannot open, e.g. a codec it lacks).

Coordinates follow DESIGN.md: ``read_region`` takes the **level-0** (x, y) of the top-left corner (as OpenSlide's
``read_region`` does, for both backends) and returns RGB uint8 ``[h, w, 3]`` with white outside the image.
``bounds`` is the non-empty region (OpenSlide's ``openslide.bounds-x/y/width/height``; the whole image when
absent); tiling and thumbnails work inside it.

Every failure that is the user's input is a :class:`~wsimil_core.errors.SlideError` whose message starts with the
file's path and says the cause.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from wsimil_core.errors import SlideError

__all__ = ["Slide", "open_slide", "BACKENDS"]

BACKENDS = ("auto", "openslide", "tifffile")
_WHITE = 255


class _LazyImages(Mapping):
    """A read-only ``dict[str, np.ndarray]`` whose values are read on first access (and then kept)."""

    def __init__(self, readers: dict[str, Callable[[], np.ndarray]]):
        self._readers = readers
        self._cache: dict[str, np.ndarray] = {}

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._cache:
            self._cache[key] = self._readers[key]()
        return self._cache[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._readers)

    def __len__(self) -> int:
        return len(self._readers)

    def __repr__(self) -> str:
        return f"<associated images {sorted(self._readers)}>"


class _ChunkCache:
    """A thread-safe LRU cache of decoded tile chunks, bounded in bytes (like OpenSlide's tile cache)."""

    def __init__(self, max_bytes: int):
        from collections import OrderedDict

        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: tuple) -> np.ndarray | None:
        with self._lock:
            arr = self._items.get(key)
            if arr is not None:
                self._items.move_to_end(key)
            return arr

    def put(self, key: tuple, arr: np.ndarray) -> None:
        if arr.nbytes > self.max_bytes:
            return
        arr.flags.writeable = False
        with self._lock:
            if key in self._items:
                return
            self._items[key] = arr
            self._bytes += arr.nbytes
            while self._bytes > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self._bytes -= old.nbytes

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0


#: Level pixels read per band by ``Slide.thumbnail`` (bounds its memory on slides without a pyramid).
_THUMB_BAND_PIXELS = 16 * 2**20

#: Default size of each slide's decoded-chunk cache (dask pyramid and tifffile reads), in bytes.
CHUNK_CACHE_BYTES = 96 * 2**20


def _rgba_to_rgb_on_white(rgba: np.ndarray) -> np.ndarray:
    """Composite non-premultiplied RGBA ``[h, w, 4]`` uint8 over white; returns ``[h, w, 3]`` uint8."""
    alpha = rgba[..., 3]
    if alpha.size == 0 or alpha.min() == 255:
        return np.ascontiguousarray(rgba[..., :3])
    a = alpha[..., None].astype(np.float32) / 255.0
    out = rgba[..., :3].astype(np.float32) * a + _WHITE * (1.0 - a)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _to_rgb(arr: np.ndarray) -> np.ndarray:
    """Any 8-bit grayscale / RGB / RGBA array ``[h, w(, c)]`` -> RGB uint8 ``[h, w, 3]``."""
    if arr.ndim == 2:
        return np.repeat(arr[..., None], 3, axis=2)
    if arr.shape[2] in (1, 2):  # grayscale (+ alpha or a second channel): first channel as gray
        return np.repeat(arr[..., :1], 3, axis=2)
    if arr.shape[2] == 4:
        return _rgba_to_rgb_on_white(arr)
    return np.ascontiguousarray(arr[..., :3])


def _resize(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resample ``[h, w, 3]`` uint8 to ``[height, width, 3]`` (box filter when shrinking, bilinear otherwise)."""
    if rgb.shape[0] == height and rgb.shape[1] == width:
        return rgb
    from PIL import Image

    shrinking = width < rgb.shape[1] or height < rgb.shape[0]
    resample = Image.Resampling.BOX if shrinking else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(rgb).resize((width, height), resample=resample))


class Slide:
    """A whole-slide image (use :func:`open_slide`). A context manager; ``close()`` releases the file.

    Attributes:
        path: the slide file.
        backend: ``"openslide"`` or ``"tifffile"``.
        vendor: the format/vendor name (``aperio``, ``generic-tiff``, ``ome-tiff``, ...) or None.
        level_count: number of pyramid levels.
        level_dimensions: ``(width, height)`` per level, level 0 first.
        level_downsamples: level-0 pixels per level pixel, per level (1.0 for level 0).
        level_tile_sizes: ``(tile_width, tile_height)`` of the file's tile grid per level (dask chunks).
        mpp: micrometres per level-0 pixel (the ``slide_mpp`` override wins), or None when unknown.
        objective_power: scanner objective magnification, or None.
        bounds: ``(x, y, w, h)`` of the non-empty region in level-0 px.
        properties: the file's metadata as strings (OpenSlide property names for the OpenSlide backend).
        associated_images: label/macro/thumbnail images, RGB uint8, read lazily on access.
    """

    backend: str = ""

    def __init__(self) -> None:
        self.path: Path = Path()
        self.vendor: str | None = None
        self.level_dimensions: list[tuple[int, int]] = []
        self.level_downsamples: list[float] = []
        self.level_tile_sizes: list[tuple[int, int]] = []
        self.file_mpp: float | None = None
        self.slide_mpp: float | None = None
        self.objective_power: float | None = None
        self.bounds: tuple[int, int, int, int] = (0, 0, 0, 0)
        self.properties: dict[str, str] = {}
        self.associated_images: Mapping[str, np.ndarray] = _LazyImages({})
        self._chunk_cache = _ChunkCache(CHUNK_CACHE_BYTES)

    # --- backend hooks ----------------------------------------------------------------------------
    def _read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Read ``[h, w, 3]`` RGB uint8 at ``level`` with (x, y) in **that level's** pixels, fully inside it."""
        raise NotImplementedError

    def _read_region_backend(self, x0: int, y0: int, level: int, w: int, h: int) -> np.ndarray:
        """Backend read with level-0 (x0, y0); may extend outside the image (white there)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release the file handle."""

    # --- common API -------------------------------------------------------------------------------
    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 ``(width, height)``."""
        return self.level_dimensions[0]

    @property
    def mpp(self) -> float | None:
        """µm per level-0 pixel: the ``slide_mpp`` override if given, else the file's, else None."""
        return self.slide_mpp if self.slide_mpp is not None else self.file_mpp

    def require_mpp(self) -> float:
        """The level-0 mpp; ``SlideError`` naming the file when it is unknown."""
        if self.mpp is None:
            raise SlideError(
                f"{self.path}: the slide has no pixel size (mpp) in its metadata; "
                "pass --slide-mpp (slide_mpp=...) with its µm per level-0 pixel, e.g. --slide-mpp 0.25"
            )
        return float(self.mpp)

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __reduce__(self) -> tuple:
        # Pickles (e.g. to DataLoader workers) as "open this path again", never the file handle.
        return (open_slide, (self.path, self.backend, self.slide_mpp))

    def __repr__(self) -> str:
        return (
            f"<Slide {self.path.name} backend={self.backend} levels={self.level_count} "
            f"dims={self.dimensions} mpp={self.mpp}>"
        )

    def _check_level(self, level: int) -> None:
        if not 0 <= int(level) < self.level_count:
            raise SlideError(f"{self.path}: level {level} does not exist (the slide has {self.level_count})")

    def read_region(self, xy_level0: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """Read a region, as OpenSlide's ``read_region`` does, for any backend.

        Args:
            xy_level0: ``(x, y)`` of the top-left corner in level-0 pixels.
            level: pyramid level to read from.
            size: ``(w, h)`` in pixels **of that level**.

        Returns:
            ``[h, w, 3]`` uint8 RGB; white where the region lies outside the image.
        """
        self._check_level(level)
        w, h = int(size[0]), int(size[1])
        if w < 0 or h < 0:
            raise SlideError(f"{self.path}: region size must be non-negative, got {size}")
        if w == 0 or h == 0:
            return np.full((h, w, 3), _WHITE, np.uint8)
        return self._read_region_backend(int(xy_level0[0]), int(xy_level0[1]), int(level), w, h)

    def best_level_for_downsample(self, downsample: float) -> int:
        """The lowest-resolution level whose downsample is <= ``downsample`` (level 0 when none is)."""
        best = 0
        for i, ds in enumerate(self.level_downsamples):
            if ds <= downsample * (1 + 1e-6):
                best = i
        return best

    def read_patch(self, x: int, y: int, size_level0: int, out_px: int) -> np.ndarray:
        """Read a square patch at a physical resolution.

        Args:
            x, y: level-0 top-left corner.
            size_level0: side of the region in level-0 pixels.
            out_px: side of the returned patch in pixels.

        Returns:
            ``[out_px, out_px, 3]`` uint8 RGB: the region read at the best pyramid level for the downsample
            ``size_level0 / out_px`` and resampled to ``out_px``.
        """
        if size_level0 < 1 or out_px < 1:
            raise SlideError(f"{self.path}: patch sizes must be >= 1 (size_level0={size_level0}, out_px={out_px})")
        ds = size_level0 / out_px
        level = self.best_level_for_downsample(ds)
        lds = self.level_downsamples[level]
        side = max(1, int(round(size_level0 / lds)))
        region = self.read_region((x, y), level, (side, side))
        return _resize(region, out_px, out_px)

    def thumbnail(self, max_size: int = 2048, downsample: float | None = None) -> tuple[np.ndarray, float]:
        """RGB image of the ``bounds`` region and its downsample (level-0 px per thumbnail px).

        Args:
            max_size: longest side of the thumbnail in pixels (used when ``downsample`` is None).
            downsample: wanted level-0 px per thumbnail px (e.g. ``thumb_mpp / mpp``); capped so that the
                thumbnail never exceeds ``max_size``.

        Returns:
            ``(rgb [th, tw, 3] uint8, ds)``: thumbnail pixel (i, j) covers level-0
            ``[bx + j*ds, bx + (j+1)*ds) x [by + i*ds, by + (i+1)*ds)``, with ``(bx, by)`` = ``bounds[:2]``.
        """
        bx, by, bw, bh = self.bounds
        if max_size < 1:
            raise SlideError(f"{self.path}: thumbnail max_size must be >= 1, got {max_size}")
        ds = max(bw, bh) / max_size
        if downsample is not None:
            ds = max(ds, float(downsample))
        ds = max(ds, 1e-9)
        tw, th = max(1, math.ceil(bw / ds - 1e-9)), max(1, math.ceil(bh / ds - 1e-9))
        level = self.best_level_for_downsample(ds)
        lds = self.level_downsamples[level]
        rw = max(1, math.ceil(tw * ds / lds))
        # Read in bands of thumbnail rows so that a slide without a pyramid never loads a huge level at once.
        rows_per_band = max(1, int(_THUMB_BAND_PIXELS // max(1.0, rw * ds / lds)))
        bands = []
        for r0 in range(0, th, rows_per_band):
            r1 = min(th, r0 + rows_per_band)
            y0 = by + int(round(r0 * ds))
            rh = max(1, math.ceil((r1 - r0) * ds / lds))
            bands.append(_resize(self.read_region((bx, y0), level, (rw, rh)), tw, r1 - r0))
        return np.concatenate(bands, axis=0), float(ds)

    def _cached_chunk(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """A read-only chunk of the tile grid from the LRU cache, read by ``_read_level`` on a miss."""
        key = (level, x, y, w, h)
        arr = self._chunk_cache.get(key)
        if arr is None:
            arr = self._read_level(level, x, y, w, h)
            self._chunk_cache.put(key, arr)
        return arr

    def _read_chunk(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """One dask chunk (a writable copy of the cached chunk)."""
        return self._cached_chunk(level, x, y, w, h).copy()

    def dask_pyramid(self) -> list:
        """The pyramid as lazily-read dask arrays, one ``[h, w, 3]`` uint8 per level.

        Chunks follow the file's own tile grid (``level_tile_sizes``); building the arrays reads no pixels:
        each chunk is read by ``_read_level`` only when computed, and kept in a per-slide LRU cache of
        decoded chunks (``CHUNK_CACHE_BYTES``), as OpenSlide keeps decoded tiles.
        """
        import dask.array as da
        from dask.base import tokenize
        from dask.highlevelgraph import HighLevelGraph
        from dask.typing import Key

        try:
            stamp = os.stat(self.path).st_mtime_ns
        except OSError:
            stamp = 0
        arrays = []
        for level, ((w, h), (tw, th)) in enumerate(zip(self.level_dimensions, self.level_tile_sizes)):
            ys = list(range(0, h, th))
            xs = list(range(0, w, tw))
            chunks = (tuple(min(th, h - y) for y in ys), tuple(min(tw, w - x) for x in xs), (3,))
            name = f"wsimil-{self.backend}-L{level}-" + tokenize(str(self.path), stamp, level, self.backend)
            dsk: dict[Key, Any] = {
                (name, i, j, 0): (self._read_chunk, level, x, y, chunks[1][j], chunks[0][i])
                for i, y in enumerate(ys)
                for j, x in enumerate(xs)
            }
            graph = HighLevelGraph.from_collections(name, dsk, dependencies=[])
            arrays.append(da.Array(graph, name, chunks, dtype=np.uint8))
        return arrays


# ------------------------------------------------------------------------------------------------------
# OpenSlide backend
# ------------------------------------------------------------------------------------------------------
class OpenSlideSlide(Slide):
    """A slide read by OpenSlide (``openslide-python`` + ``openslide-bin``)."""

    backend = "openslide"

    def __init__(self, path: Path, slide_mpp: float | None = None):
        super().__init__()
        import openslide

        self.path = path
        try:
            self._osr = openslide.OpenSlide(str(path))
        except openslide.OpenSlideUnsupportedFormatError as exc:
            raise SlideError(f"{path}: not a slide OpenSlide can open ({exc})") from None
        except openslide.OpenSlideError as exc:
            raise SlideError(f"{path}: cannot open the slide: {exc}") from None
        props = {str(k): str(v) for k, v in self._osr.properties.items()}
        self.properties = props
        self.vendor = props.get(openslide.PROPERTY_NAME_VENDOR)
        self.level_dimensions = [(int(w), int(h)) for w, h in self._osr.level_dimensions]
        self.level_downsamples = [float(d) for d in self._osr.level_downsamples]
        self.level_tile_sizes = [
            (
                int(props.get(f"openslide.level[{i}].tile-width", 256)),
                int(props.get(f"openslide.level[{i}].tile-height", 256)),
            )
            for i in range(len(self.level_dimensions))
        ]
        self.file_mpp = _positive_float(props.get(openslide.PROPERTY_NAME_MPP_X))
        self.slide_mpp = slide_mpp
        self.objective_power = _positive_float(props.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER))
        w0, h0 = self.level_dimensions[0]
        bx = int(props.get(openslide.PROPERTY_NAME_BOUNDS_X, 0) or 0)
        by = int(props.get(openslide.PROPERTY_NAME_BOUNDS_Y, 0) or 0)
        bw = int(props.get(openslide.PROPERTY_NAME_BOUNDS_WIDTH, w0 - bx) or (w0 - bx))
        bh = int(props.get(openslide.PROPERTY_NAME_BOUNDS_HEIGHT, h0 - by) or (h0 - by))
        self.bounds = (bx, by, bw, bh)
        names = list(self._osr.associated_images.keys())
        self.associated_images = _LazyImages({n: self._associated_reader(n) for n in names})

    def _associated_reader(self, name: str) -> Callable[[], np.ndarray]:
        def read() -> np.ndarray:
            import openslide

            try:
                img = self._osr.associated_images[name]
            except openslide.OpenSlideError as exc:
                raise SlideError(f"{self.path}: cannot read associated image {name!r}: {exc}") from None
            return _to_rgb(np.asarray(img.convert("RGBA")))

        return read

    def _read_region_backend(self, x0: int, y0: int, level: int, w: int, h: int) -> np.ndarray:
        import openslide

        try:
            img = self._osr.read_region((x0, y0), level, (w, h))
        except openslide.OpenSlideError as exc:
            raise SlideError(
                f"{self.path}: cannot read region at level-0 ({x0}, {y0}), level {level}, size {w}x{h}: {exc}"
            ) from None
        if img.getchannel("A").getextrema()[0] == 255:  # fully opaque: drop alpha in C (cheaper than numpy)
            return np.asarray(img.convert("RGB"))
        return _rgba_to_rgb_on_white(np.asarray(img))

    def _read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        ds = self.level_downsamples[level]
        return self._read_region_backend(int(round(x * ds)), int(round(y * ds)), level, w, h)

    def close(self) -> None:
        self._chunk_cache.clear()
        osr = getattr(self, "_osr", None)
        if osr is not None:
            osr.close()
            del self._osr


# ------------------------------------------------------------------------------------------------------
# tifffile backend
# ------------------------------------------------------------------------------------------------------
class _TiffLevel:
    """One pyramid level of the tifffile backend: a zarr array plus how to get ``[y, x, c]`` from it."""

    def __init__(self, zarr_array: Any, axes: str, tile: tuple[int, int]):
        self.z = zarr_array
        self.axes = axes
        self.tile = tile  # (tile_w, tile_h)
        shape = dict(zip(axes, zarr_array.shape))
        self.height = int(shape["Y"])
        self.width = int(shape["X"])
        self.channel_axis = "S" if "S" in shape else ("C" if "C" in shape else None)

    def read(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        index: list[Any] = []
        for ax in self.axes:
            if ax == "Y":
                index.append(slice(y, y + h))
            elif ax == "X":
                index.append(slice(x, x + w))
            elif ax == self.channel_axis:
                index.append(slice(None))
            else:
                index.append(0)
        arr = np.asarray(self.z[tuple(index)])
        kept = [ax for ax in self.axes if ax in ("Y", "X") or ax == self.channel_axis]
        order = [kept.index("Y"), kept.index("X")] + ([kept.index(self.channel_axis)] if self.channel_axis else [])
        arr = np.transpose(arr, order)
        if self.channel_axis and arr.shape[2] > 4:
            arr = arr[..., :3]
        return _to_rgb(arr)


def _positive_float(value: Any) -> float | None:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) and f > 0 else None


def _page_mpp(page: Any) -> float | None:
    """µm per pixel from a TIFF page's XResolution + ResolutionUnit (centimetre or inch)."""
    tags = page.tags
    if "XResolution" not in tags:
        return None
    num, den = tags["XResolution"].value if isinstance(tags["XResolution"].value, tuple) else (0, 1)
    if not num or not den:
        return None
    px_per_unit = num / den
    unit = int(tags["ResolutionUnit"].value) if "ResolutionUnit" in tags else 2
    if unit == 3:  # centimetre
        return 1e4 / px_per_unit
    if unit == 2 and "ResolutionUnit" in tags:  # inch, only when written explicitly
        return 25400.0 / px_per_unit
    return None


def _aperio_fields(description: str) -> dict[str, str]:
    """``Key = Value`` fields of an Aperio ``ImageDescription`` (``...|MPP = 0.499|AppMag = 20|...``)."""
    out: dict[str, str] = {}
    for part in description.split("|")[1:]:
        if "=" in part:
            k, v = part.split("=", 1)
            out[k.strip()] = v.strip()
    return out


def _ome_mpp(tf: Any) -> float | None:
    """PhysicalSizeX of the first OME image in µm (converted from its unit), or None."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(tf.ome_metadata)
    except (ET.ParseError, TypeError):
        return None
    for el in root.iter():
        if el.tag.endswith("Pixels") and "PhysicalSizeX" in el.attrib:
            size = _positive_float(el.attrib["PhysicalSizeX"])
            unit = el.attrib.get("PhysicalSizeXUnit", "µm")
            scale = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}.get(unit)
            return size * scale if size is not None and scale is not None else None
    return None


class TiffSlide(Slide):
    """A slide read by tifffile: OME-TIFF or plain pyramidal TIFF, tile by tile through ``aszarr()``."""

    backend = "tifffile"

    def __init__(self, path: Path, slide_mpp: float | None = None):
        super().__init__()
        import tifffile
        import zarr

        self.path = path
        self._lock = threading.Lock()
        try:
            self._tf = tifffile.TiffFile(str(path))
        except tifffile.TiffFileError as exc:
            raise SlideError(f"{path}: not a slide (not a TIFF file tifffile can read: {exc})") from None
        except OSError as exc:
            raise SlideError(f"{path}: cannot open the file: {exc}") from None
        tf = self._tf
        try:
            if not tf.series:
                raise SlideError(f"{path}: not a slide (the TIFF file holds no image)")
            series = tf.series[0]
            level_pages, level_axes = self._find_levels(series)
            keyframe = level_pages[0]
            if keyframe.dtype != np.uint8:
                raise SlideError(
                    f"{path}: unsupported pixel type {keyframe.dtype} (only 8-bit RGB or grayscale slides are read)"
                )
            for page in level_pages:
                if page.compression not in tifffile.TIFF.DECOMPRESSORS:
                    raise SlideError(
                        f"{path}: cannot open the slide: unsupported TIFF compression {int(page.compression)}"
                    )
            self._levels: list[_TiffLevel] = []
            for i, (page, axes) in enumerate(zip(level_pages, level_axes)):
                store = tf.aszarr(series=0, level=i) if len(series.levels) > 1 else page.aszarr()
                z = zarr.open(store, mode="r")
                if page.is_tiled:
                    tile = (int(page.tilewidth), int(page.tilelength))
                else:  # strips: whole-width chunks of at least 256 rows (a multiple of the strip height)
                    rps = max(1, min(int(page.rowsperstrip or page.imagelength), int(page.imagelength)))
                    tile = (int(page.imagewidth), rps * max(1, math.ceil(256 / rps)))
                self._levels.append(_TiffLevel(z, axes, (max(1, tile[0]), max(1, tile[1]))))
        except SlideError:
            tf.close()
            raise
        except Exception as exc:  # noqa: BLE001 - any parser failure is a bad file
            tf.close()
            raise SlideError(f"{path}: cannot open the slide: {type(exc).__name__}: {exc}") from None

        w0, h0 = self._levels[0].width, self._levels[0].height
        self.level_dimensions = [(lv.width, lv.height) for lv in self._levels]
        # Same definition as OpenSlide: mean of the x and y ratios.
        self.level_downsamples = [(w0 / w + h0 / h) / 2.0 for w, h in self.level_dimensions]
        self.level_downsamples[0] = 1.0
        self.level_tile_sizes = [lv.tile for lv in self._levels]
        self.bounds = (0, 0, w0, h0)
        page0 = level_pages[0]
        props: dict[str, str] = {"tifffile.series": series.kind or "", "tifffile.axes": series.axes}
        for tag in page0.tags:
            if tag.name in (
                "ImageDescription",
                "Software",
                "Make",
                "Model",
                "DateTime",
                "XResolution",
                "YResolution",
                "ResolutionUnit",
                "Compression",
                "Artist",
            ):
                props[f"tiff.{tag.name}"] = str(tag.value)
        self.properties = props
        mpp: float | None = None
        objective: float | None = None
        if tf.is_ome:
            self.vendor = "ome-tiff"
            mpp = _ome_mpp(tf)
        elif tf.is_svs:
            self.vendor = "aperio"
            fields = _aperio_fields(page0.description)
            props.update({f"aperio.{k}": v for k, v in fields.items()})
            mpp = _positive_float(fields.get("MPP"))
            objective = _positive_float(fields.get("AppMag"))
        else:
            self.vendor = "generic-tiff"
        if mpp is None:
            mpp = _page_mpp(page0)
        self.file_mpp = mpp
        self.slide_mpp = slide_mpp
        self.objective_power = objective
        self.associated_images = _LazyImages(self._associated_readers(series, level_pages))

    def _find_levels(self, series: Any) -> tuple[list[Any], list[str]]:
        """Pyramid levels: the series' own levels, else successive tiled pages of decreasing size."""
        axes = series.axes
        if "Y" not in axes or "X" not in axes:
            raise SlideError(f"{self.path}: not a slide (image axes {axes!r} have no Y and X)")
        if len(series.levels) > 1:
            return [lvl.keyframe for lvl in series.levels], [lvl.axes for lvl in series.levels]
        pages = [series.keyframe]
        base = series.keyframe
        if len(series.pages) == 1 and base.is_tiled:
            later: list[Any] = self._tf.pages[base.index + 1 :]  # TiffPage, or TiffFrame (no tags: skipped)
            for page in later:
                prev = pages[-1]
                if not hasattr(page, "is_tiled") or not page.is_tiled:
                    continue
                if page.dtype != base.dtype or page.samplesperpixel != base.samplesperpixel:
                    continue
                if not (page.imagewidth < prev.imagewidth and page.imagelength < prev.imagelength):
                    continue
                aspect = (page.imagewidth / page.imagelength) / (base.imagewidth / base.imagelength)
                if abs(aspect - 1.0) > 0.05:
                    continue
                pages.append(page)
        return pages, [base.axes] * len(pages)

    def _associated_readers(self, main: Any, level_pages: list[Any]) -> dict[str, Callable[[], np.ndarray]]:
        used = {p.index for p in level_pages}
        readers: dict[str, Callable[[], np.ndarray]] = {}
        for k, s in enumerate(self._tf.series[1:], start=1):
            if s.keyframe.index in used:
                continue
            name = (s.name or "").strip().lower() or f"series{k}"
            readers[name] = self._series_reader(s)
        return readers

    def _series_reader(self, series: Any) -> Callable[[], np.ndarray]:
        def read() -> np.ndarray:
            try:
                with self._lock:
                    arr = series.asarray()
            except Exception as exc:  # noqa: BLE001
                raise SlideError(f"{self.path}: cannot read associated image {series.name!r}: {exc}") from None
            if arr.dtype != np.uint8:
                arr = np.clip(arr, 0, 255).astype(np.uint8)
            while arr.ndim > 3:
                arr = arr[0]
            return _to_rgb(arr)

        return read

    def _read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        try:
            return self._levels[level].read(x, y, w, h)
        except SlideError:
            raise
        except Exception as exc:  # noqa: BLE001 - decoder errors are a corrupt file
            raise SlideError(
                f"{self.path}: cannot read level {level} at ({x}, {y}) size {w}x{h}: {type(exc).__name__}: {exc}"
            ) from None

    def _read_region_backend(self, x0: int, y0: int, level: int, w: int, h: int) -> np.ndarray:
        ds = self.level_downsamples[level]
        lw, lh = self.level_dimensions[level]
        # Level-0 -> level coordinates (exact for integer downsamples, nearest pixel otherwise).
        lx, ly = int(round(x0 / ds)), int(round(y0 / ds))
        out = np.full((h, w, 3), _WHITE, np.uint8)
        ix0, iy0 = max(lx, 0), max(ly, 0)
        ix1, iy1 = min(lx + w, lw), min(ly + h, lh)
        if ix1 <= ix0 or iy1 <= iy0:
            return out
        # Assemble from whole tiles of the file's grid (each decoded once, then served from the chunk cache).
        tw, th = self.level_tile_sizes[level]
        for ty in range(iy0 // th * th, iy1, th):
            for tx in range(ix0 // tw * tw, ix1, tw):
                chunk = self._cached_chunk(level, tx, ty, min(tw, lw - tx), min(th, lh - ty))
                sx0, sy0 = max(ix0, tx), max(iy0, ty)
                sx1, sy1 = min(ix1, tx + chunk.shape[1]), min(iy1, ty + chunk.shape[0])
                out[sy0 - ly : sy1 - ly, sx0 - lx : sx1 - lx] = chunk[sy0 - ty : sy1 - ty, sx0 - tx : sx1 - tx]
        return out

    def close(self) -> None:
        self._chunk_cache.clear()
        tf = getattr(self, "_tf", None)
        if tf is not None:
            tf.close()
            del self._tf


# ------------------------------------------------------------------------------------------------------
def _is_ome_tiff(path: Path) -> bool:
    import tifffile

    try:
        with tifffile.TiffFile(str(path)) as tf:
            return bool(tf.is_ome)
    except Exception:  # noqa: BLE001 - not readable by tifffile: let OpenSlide decide
        return False


def open_slide(path: str | os.PathLike, backend: str = "auto", slide_mpp: float | None = None) -> Slide:
    """Open a whole-slide image.

    Args:
        path: the slide file (for DICOM, any file of the series; for MRXS, the ``.mrxs`` file).
        backend: ``"auto"`` (OpenSlide when it recognises the file, else tifffile), ``"openslide"`` or
            ``"tifffile"``.
        slide_mpp: µm per level-0 pixel overriding the file's metadata (for slides without it).

    Raises:
        SlideError: missing file, not a slide, unsupported or corrupt file, invalid arguments; the message
            starts with the path.
    """
    path = Path(path)
    if backend not in BACKENDS:
        raise SlideError(f"{path}: unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if slide_mpp is not None:
        mpp = _positive_float(slide_mpp)
        if mpp is None:
            raise SlideError(f"{path}: --slide-mpp must be a positive number, got {slide_mpp!r}")
        slide_mpp = mpp
    if not path.exists():
        raise SlideError(f"{path}: file not found")
    if path.is_dir():
        raise SlideError(f"{path}: is a directory, not a slide file")
    if backend == "openslide":
        return OpenSlideSlide(path, slide_mpp)
    if backend == "tifffile":
        return TiffSlide(path, slide_mpp)
    # auto: OpenSlide when it knows the format; a recognised-but-broken file is an error, not a fallback.
    import openslide

    try:
        fmt = openslide.OpenSlide.detect_format(str(path))
    except openslide.OpenSlideError:
        fmt = None
    if fmt == "generic-tiff" and _is_ome_tiff(path):
        fmt = None  # OpenSlide reads only the base image of an OME-TIFF (no SubIFD levels, no OME mpp)
    if fmt == "generic-tiff":
        # A plain TIFF OpenSlide recognises but cannot open (e.g. a codec it lacks) may still be read by
        # tifffile; when neither can, OpenSlide's error (the cause) is reported.
        try:
            return OpenSlideSlide(path, slide_mpp)
        except SlideError as os_error:
            try:
                return TiffSlide(path, slide_mpp)
            except SlideError:
                raise os_error from None
    if fmt is not None:
        return OpenSlideSlide(path, slide_mpp)
    try:
        return TiffSlide(path, slide_mpp)
    except SlideError as exc:
        if "not a TIFF file" in str(exc):
            raise SlideError(f"{path}: not a slide (neither OpenSlide nor tifffile recognises the format)") from None
        raise
