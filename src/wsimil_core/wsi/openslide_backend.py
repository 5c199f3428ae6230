"""The OpenSlide backend: everything OpenSlide opens (SVS, NDPI, MRXS, SCN, generic tiled TIFF, DICOM, ...)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import openslide

from wsimil_core.errors import SlideError
from wsimil_core.wsi.base import LazyImages, Slide
from wsimil_core.wsi.pixels import positive_float, rgba_to_rgb_on_white, to_rgb


class OpenSlideSlide(Slide):
    """A slide read by OpenSlide (``openslide-python`` + ``openslide-bin``)."""

    backend = "openslide"

    def __init__(self, path: Path, slide_mpp: float | None = None):
        super().__init__()
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
        self.file_mpp = positive_float(props.get(openslide.PROPERTY_NAME_MPP_X))
        self.slide_mpp = slide_mpp
        self.objective_power = positive_float(props.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER))
        w0, h0 = self.level_dimensions[0]
        bx = int(props.get(openslide.PROPERTY_NAME_BOUNDS_X, 0) or 0)
        by = int(props.get(openslide.PROPERTY_NAME_BOUNDS_Y, 0) or 0)
        bw = int(props.get(openslide.PROPERTY_NAME_BOUNDS_WIDTH, w0 - bx) or (w0 - bx))
        bh = int(props.get(openslide.PROPERTY_NAME_BOUNDS_HEIGHT, h0 - by) or (h0 - by))
        self.bounds = (bx, by, bw, bh)
        names = list(self._osr.associated_images.keys())
        self.associated_images = LazyImages({n: self._associated_reader(n) for n in names})

    def _associated_reader(self, name: str) -> Callable[[], np.ndarray]:
        def read() -> np.ndarray:
            try:
                img = self._osr.associated_images[name]
            except openslide.OpenSlideError as exc:
                raise SlideError(f"{self.path}: cannot read associated image {name!r}: {exc}") from None
            return to_rgb(np.asarray(img.convert("RGBA")))

        return read

    def _read_region_backend(self, x0: int, y0: int, level: int, w: int, h: int) -> np.ndarray:
        try:
            img = self._osr.read_region((x0, y0), level, (w, h))
        except openslide.OpenSlideError as exc:
            raise SlideError(
                f"{self.path}: cannot read region at level-0 ({x0}, {y0}), level {level}, size {w}x{h}: {exc}"
            ) from None
        if img.getchannel("A").getextrema()[0] == 255:  # fully opaque: drop alpha in C (cheaper than numpy)
            return np.asarray(img.convert("RGB"))
        return rgba_to_rgb_on_white(np.asarray(img))

    def _read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        ds = self.level_downsamples[level]
        return self._read_region_backend(int(round(x * ds)), int(round(y * ds)), level, w, h)

    def close(self) -> None:
        self._chunk_cache.clear()
        osr = getattr(self, "_osr", None)
        if osr is not None:
            osr.close()
            del self._osr
