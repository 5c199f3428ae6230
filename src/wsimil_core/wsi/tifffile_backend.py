"""The tifffile backend: OME-TIFF and plain pyramidal TIFF, read tile by tile through
``tifffile.TiffFile(...).aszarr()`` + zarr.

Pyramid levels are the series' levels (SubIFDs, OME), or else the successive tiled pages of decreasing size with
the same aspect ratio. The mpp comes from the OME metadata, the Aperio description or the TIFF resolution tags.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from wsimil_core.errors import SlideError
from wsimil_core.wsi.base import LazyImages, Slide
from wsimil_core.wsi.pixels import WHITE, positive_float, to_rgb


class TiffLevel:
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
        return to_rgb(arr)


def page_mpp(page: Any) -> float | None:
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


def aperio_fields(description: str) -> dict[str, str]:
    """``Key = Value`` fields of an Aperio ``ImageDescription`` (``...|MPP = 0.499|AppMag = 20|...``)."""
    out: dict[str, str] = {}
    for part in description.split("|")[1:]:
        if "=" in part:
            k, v = part.split("=", 1)
            out[k.strip()] = v.strip()
    return out


def ome_mpp(tf: Any) -> float | None:
    """PhysicalSizeX of the first OME image in µm (converted from its unit), or None."""
    try:
        root = ET.fromstring(tf.ome_metadata)
    except (ET.ParseError, TypeError):
        return None
    for el in root.iter():
        if el.tag.endswith("Pixels") and "PhysicalSizeX" in el.attrib:
            size = positive_float(el.attrib["PhysicalSizeX"])
            unit = el.attrib.get("PhysicalSizeXUnit", "µm")
            scale = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}.get(unit)
            return size * scale if size is not None and scale is not None else None
    return None


class _BrokenChain(logging.Handler):
    """Collects tifffile's "invalid page offset" warnings logged by the current thread (a page directory that
    lies past the end of the file: a truncated TIFF whose later pages, often pyramid levels, are lost)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.thread = threading.get_ident()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread and "invalid page offset" in record.getMessage():
            self.messages.append(record.getMessage())


@contextlib.contextmanager
def _broken_chain_warnings() -> Iterator[list[str]]:
    handler = _BrokenChain()
    logger = logging.getLogger("tifffile")
    logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)


def check_not_truncated(path: Path, level_pages: list[Any], broken_chain: list[str]) -> None:
    """Refuse a truncated TIFF whose header still opens: tile data or a page directory past the end of the file.

    Raises:
        SlideError: naming ``path``, the level and the file size.
    """
    size = path.stat().st_size
    for i, page in enumerate(level_pages):
        ends = [int(o) + int(c) for o, c in zip(page.dataoffsets, page.databytecounts) if c]
        if ends and max(ends) > size:
            raise SlideError(
                f"{path}: truncated or damaged TIFF: the image data of level {i} ends at byte {max(ends)}, past "
                f"the end of the file ({size} bytes)"
            )
    if broken_chain:
        raise SlideError(
            f"{path}: truncated or damaged TIFF: a page directory lies past the end of the file ({size} bytes), "
            "so pyramid levels or images are missing"
        )


class TiffSlide(Slide):
    """A slide read by tifffile: OME-TIFF or plain pyramidal TIFF, tile by tile through ``aszarr()``."""

    backend = "tifffile"

    def __init__(self, path: Path, slide_mpp: float | None = None):
        super().__init__()
        import zarr  # on first use (``import wsimil_core.wsi`` stays light)

        self.path = path
        self._lock = threading.Lock()
        with _broken_chain_warnings() as broken_chain:
            try:
                self._tf = tifffile.TiffFile(str(path))
            except tifffile.TiffFileError as exc:
                raise SlideError(f"{path}: not a slide (not a TIFF file tifffile can read: {exc})") from None
            except OSError as exc:
                raise SlideError(f"{path}: cannot open the file: {exc}") from None
            tf = self._tf
            try:
                has_series = bool(tf.series)
                len(tf.pages)  # read the whole page chain now: a truncated one is logged here
            except Exception:  # noqa: BLE001 - handled below with the same message
                has_series = True
        try:
            if not has_series:
                raise SlideError(f"{path}: not a slide (the TIFF file holds no image)")
            series = tf.series[0]
            level_pages, level_axes = self._find_levels(series)
            check_not_truncated(path, level_pages, broken_chain)
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
            self._levels: list[TiffLevel] = []
            for i, (page, axes) in enumerate(zip(level_pages, level_axes)):
                store = tf.aszarr(series=0, level=i) if len(series.levels) > 1 else page.aszarr()
                z = zarr.open(store, mode="r")
                if page.is_tiled:
                    tile = (int(page.tilewidth), int(page.tilelength))
                else:  # strips: whole-width chunks of at least 256 rows (a multiple of the strip height)
                    rps = max(1, min(int(page.rowsperstrip or page.imagelength), int(page.imagelength)))
                    tile = (int(page.imagewidth), rps * max(1, math.ceil(256 / rps)))
                self._levels.append(TiffLevel(z, axes, (max(1, tile[0]), max(1, tile[1]))))
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
            mpp = ome_mpp(tf)
        elif tf.is_svs:
            self.vendor = "aperio"
            fields = aperio_fields(page0.description)
            props.update({f"aperio.{k}": v for k, v in fields.items()})
            mpp = positive_float(fields.get("MPP"))
            objective = positive_float(fields.get("AppMag"))
        else:
            self.vendor = "generic-tiff"
        if mpp is None:
            mpp = page_mpp(page0)
        self.file_mpp = mpp
        self.slide_mpp = slide_mpp
        self.objective_power = objective
        self.associated_images = LazyImages(self._associated_readers(series, level_pages))

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
            return to_rgb(arr)

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
        out = np.full((h, w, 3), WHITE, np.uint8)
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


def is_ome_tiff(path: Path) -> bool:
    """True when tifffile reads ``path`` as an OME-TIFF (False for anything it cannot read)."""
    try:
        with tifffile.TiffFile(str(path)) as tf:
            return bool(tf.is_ome)
    except Exception:  # noqa: BLE001 - not readable by tifffile: let OpenSlide decide
        return False
