"""The ``Slide`` interface every reader backend implements (use ``wsimil_core.wsi.slide.open_slide``).

A backend sets the level geometry, mpp, bounds and properties in its ``__init__`` and implements two hooks:
``_read_level`` (pixels of one level, in that level's coordinates) and ``_read_region_backend`` (level-0
coordinates, white outside the image). Everything else (``read_region``, ``read_patch``, ``thumbnail``, the lazy
dask pyramid over a per-slide cache of decoded chunks) is common and lives here.
"""

from __future__ import annotations

import math
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from wsimil_core.errors import SlideError
from wsimil_core.wsi.pixels import WHITE, resize_rgb

#: Level pixels read per band by ``Slide.thumbnail`` (bounds its memory on slides without a pyramid).
_THUMB_BAND_PIXELS = 16 * 2**20

#: Default size of each slide's decoded-chunk cache (dask pyramid and tifffile reads), in bytes.
CHUNK_CACHE_BYTES = 96 * 2**20


class LazyImages(Mapping):
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


class ChunkCache:
    """A thread-safe LRU cache of decoded tile chunks, bounded in bytes (like OpenSlide's tile cache)."""

    def __init__(self, max_bytes: int):
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
        self.associated_images: Mapping[str, np.ndarray] = LazyImages({})
        self._chunk_cache = ChunkCache(CHUNK_CACHE_BYTES)

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
        # Pickles (e.g. to DataLoader workers) as "open this path again with the same backend", never the file
        # handle. Every backend's constructor takes (path, slide_mpp).
        return (type(self), (self.path, self.slide_mpp))

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
            return np.full((h, w, 3), WHITE, np.uint8)
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
        return resize_rgb(region, out_px, out_px)

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
            bands.append(resize_rgb(self.read_region((bx, y0), level, (rw, rh)), tw, r1 - r0))
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

        Chunks follow the file's own tile grid (``level_tile_sizes``); building the arrays reads no pixels and
        takes the same time for any slide size (the graph is one ``from_array`` layer over a :class:`LevelPixels`
        reader, inlined, never a dict of every chunk: a 100k x 100k slide has 150k level-0 chunks). Each chunk is
        read only when computed, and kept in a per-slide LRU cache of decoded chunks (``CHUNK_CACHE_BYTES``), as
        OpenSlide keeps decoded tiles.
        """
        import dask.array as da
        from dask.base import tokenize

        try:
            stamp = os.stat(self.path).st_mtime_ns
        except OSError:
            stamp = 0
        arrays = []
        for level, (tw, th) in enumerate(self.level_tile_sizes):
            name = f"wsimil-{self.backend}-L{level}-" + tokenize(str(self.path), stamp, level, self.backend)
            pixels = LevelPixels(self, level)
            arrays.append(
                da.from_array(
                    pixels,
                    chunks=(th, tw, 3),
                    name=name,
                    asarray=False,
                    fancy=False,
                    lock=False,
                    inline_array=True,
                    meta=np.empty((0, 0, 0), np.uint8),
                )
            )
        return arrays


class LevelPixels:
    """One pyramid level as an array-like for ``dask.array.from_array``: ``shape``, ``dtype`` and basic slicing
    (``[y0:y1, x0:x1, c]``), read through the slide's chunk cache. Dask asks for one chunk per call."""

    def __init__(self, slide: Slide, level: int):
        w, h = slide.level_dimensions[level]
        self.slide, self.level = slide, level
        self.shape = (int(h), int(w), 3)
        self.dtype = np.dtype(np.uint8)
        self.ndim = 3

    def __getitem__(self, index: tuple[slice, ...]) -> np.ndarray:
        """``uint8 [h, w, c]`` of the region ``index`` (a tuple of step-1 slices within the level)."""
        ys, xs, cs = (tuple(index) + (slice(None),) * 3)[:3]
        y0, y1, _ = ys.indices(self.shape[0])
        x0, x1, _ = xs.indices(self.shape[1])
        block = self.slide._read_chunk(self.level, x0, y0, max(0, x1 - x0), max(0, y1 - y0))
        return block[:, :, cs]
