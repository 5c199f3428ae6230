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

Modules: ``base`` (the ``Slide`` interface and what is common to the backends), ``openslide_backend``
(``OpenSlideSlide``), ``tifffile_backend`` (``TiffSlide``), ``pixels`` (RGB conversions) and this one.
"""

from __future__ import annotations

import os
from pathlib import Path

import openslide

from wsimil_core.errors import SlideError
from wsimil_core.wsi.base import Slide
from wsimil_core.wsi.mpp import warn_implausible_mpp
from wsimil_core.wsi.openslide_backend import OpenSlideSlide
from wsimil_core.wsi.pixels import positive_float
from wsimil_core.wsi.tifffile_backend import TiffSlide, is_ome_tiff

__all__ = ["BACKENDS", "Slide", "open_slide"]

BACKENDS = ("auto", "openslide", "tifffile")


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

    Warns:
        ImplausibleMppWarning: the mpp (the file's, or ``slide_mpp``) is outside ``wsi.mpp.MPP_RANGE`` or disagrees
            with the file's objective power; one warning naming the file, the value and how to override it.
    """
    slide = _open(Path(path), backend, slide_mpp)
    try:
        warn_implausible_mpp(slide.path, slide.mpp, slide.objective_power, overridden=slide.slide_mpp is not None)
    except BaseException:  # the warning raised (an "error" filter): do not leak the open file
        slide.close()
        raise
    return slide


def _open(path: Path, backend: str, slide_mpp: float | None) -> Slide:
    """``open_slide`` without the mpp check."""
    if backend not in BACKENDS:
        raise SlideError(f"{path}: unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if slide_mpp is not None:
        mpp = positive_float(slide_mpp)
        if mpp is None:
            raise SlideError(f"{path}: --slide-mpp must be a positive number, got {slide_mpp!r}")
        slide_mpp = mpp
    if not path.exists():
        raise SlideError(f"{path}: file not found")
    if path.is_dir():
        raise SlideError(f"{path}: a directory, not a slide file")
    if backend == "openslide":
        return OpenSlideSlide(path, slide_mpp)
    if backend == "tifffile":
        return TiffSlide(path, slide_mpp)
    # auto: OpenSlide when it knows the format; a recognised-but-broken file is an error, not a fallback.
    try:
        fmt = openslide.OpenSlide.detect_format(str(path))
    except openslide.OpenSlideError:
        fmt = None
    if fmt == "generic-tiff" and is_ome_tiff(path):
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
        raise SlideError(f"{exc}; OpenSlide: {_openslide_message(path)}") from None


def _openslide_message(path: Path) -> str:
    """What OpenSlide says when it opens ``path`` (its error message, or that it opens it)."""
    try:
        openslide.OpenSlide(str(path)).close()
    except openslide.OpenSlideError as exc:
        return str(exc) or type(exc).__name__
    return "opens the file"
