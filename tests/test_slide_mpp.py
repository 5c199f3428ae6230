"""Implausible pixel sizes (``wsi/mpp.py``): one warning from ``open_slide`` naming the file, the value and the fix;
the range is the one the napari plugin uses."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

from wsimil_core.wsi.mpp import MPP_RANGE, OBJECTIVE_TOLERANCE, ImplausibleMppWarning, implausible_mpp
from wsimil_core.wsi.slide import open_slide
from wsimil_core.wsi.writer import write_pyramid_tiff

RGB = np.full((256, 256, 3), 200, np.uint8)


def _mpp_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, ImplausibleMppWarning)]


@pytest.mark.parametrize(
    ("mpp", "bad"),
    [(0.05, False), (0.25, False), (0.5, False), (8.0, False), (20.0, False)]
    + [(0.049, True), (0.0098, True), (20.5, True), (352.78, True), (1e4 * 0.25, True), (float("nan"), True)],
)
def test_the_range(mpp, bad):
    assert MPP_RANGE == (0.05, 20.0)
    assert (implausible_mpp(mpp) is not None) is bad


def test_the_message_names_the_value_and_the_72_dpi_cause():
    text = implausible_mpp(25400 / 72)
    assert text is not None and text.startswith("352.8 µm/px is implausible") and "0.05-20" in text
    assert "72-dpi" in text and "352.78" in text
    assert "72-dpi" not in (implausible_mpp(0.01) or "")


def test_an_mpp_that_disagrees_with_the_objective_power():
    """A unit mis-read inside the range (0.25 * 25.4 = 6.35 µm/px) is caught when the file gives its objective:
    more than ``OBJECTIVE_TOLERANCE`` times from ``10 / objective``; real scanners (40x at 0.23-0.26, 20x at
    0.5) pass. A 2.54x error (centimetre read as inch) is within the tolerance: not caught."""
    assert OBJECTIVE_TOLERANCE == 4.0
    text = implausible_mpp(0.25 * 25.4, objective_power=40)
    assert text is not None and "6.35 µm/px" in text and "40x" in text and "0.25" in text and "25.4x" in text
    assert implausible_mpp(0.5 / 25.4, objective_power=20) is not None  # also below the range
    assert implausible_mpp(2.5, objective_power=40) is not None  # 10x
    for mpp, objective in [
        (0.2525, 40),
        (0.227, 40),
        (0.263, 40),
        (0.5, 20),
        (0.243, 20),
        (1.0, 10),
        (0.25 * 2.54, 40),
    ]:
        assert implausible_mpp(mpp, objective_power=objective) is None, (mpp, objective)
    assert implausible_mpp(6.35) is None  # without an objective the range alone decides


@pytest.mark.parametrize("backend", ["openslide", "tifffile"])
def test_open_slide_warns_once_naming_file_value_and_fix(tmp_path: Path, backend: str):
    path = write_pyramid_tiff(tmp_path / "dpi72.tif", RGB, 25400 / 72, levels=1, tile=128)
    with pytest.warns(ImplausibleMppWarning) as record:
        with open_slide(path, backend=backend) as s:
            assert s.mpp == pytest.approx(352.7777, rel=1e-4)  # the value is kept: a warning, not an error
    (text,) = _mpp_warnings(record)
    assert text.startswith(f"{path}: 352.8 µm/px is implausible") and "--slide-mpp" in text
    with warnings.catch_warnings():
        warnings.simplefilter("error", ImplausibleMppWarning)
        with open_slide(path, backend=backend, slide_mpp=0.25) as s:  # the override silences it
            assert s.mpp == 0.25
        ok = write_pyramid_tiff(tmp_path / "ok.tif", RGB, 0.5, levels=1, tile=128)
        open_slide(ok, backend=backend).close()
        nompp = write_pyramid_tiff(tmp_path / "nompp.tif", RGB, None, levels=1, tile=128)
        open_slide(nompp, backend=backend).close()  # no mpp: require_mpp's error, not this warning


def test_an_implausible_override_is_warned_about_as_given(tmp_path: Path):
    ok = write_pyramid_tiff(tmp_path / "ok.tif", RGB, 0.5, levels=1, tile=128)
    with pytest.warns(ImplausibleMppWarning) as record:
        open_slide(ok, slide_mpp=25.0).close()
    (text,) = _mpp_warnings(record)
    assert str(ok) in text and "25 µm/px" in text and "given as --slide-mpp" in text


def test_an_aperio_objective_disagreeing_with_the_mpp_is_warned_about(tmp_path: Path):
    description = "Aperio Image Library v12.0.0\r\n256x256 [0,0 256x256] (128x128) JPEG Q=90|AppMag = 40|MPP = 6.35"
    path = write_pyramid_tiff(tmp_path / "unit.svs", RGB, None, levels=1, tile=128, description=description)
    with pytest.warns(ImplausibleMppWarning) as record:
        with open_slide(path, backend="tifffile") as s:
            assert s.vendor == "aperio" and s.objective_power == 40 and s.mpp == pytest.approx(6.35)
    (text,) = _mpp_warnings(record)
    assert str(path) in text and "6.35 µm/px" in text and "40x objective" in text


def test_the_napari_plugin_uses_the_same_range():
    """One definition: the plugin's names are wsimil_core's (imported through ``wsimil_core.api``)."""
    pytest.importorskip("napari")
    import napari_wsimil._reader_preference as pref
    import wsimil_core.api as api

    assert pref.MPP_RANGE is api.MPP_RANGE is MPP_RANGE
    assert pref.ImplausibleMppWarning is api.ImplausibleMppWarning is ImplausibleMppWarning
    assert pref.mpp_problem(25400 / 72) == implausible_mpp(25400 / 72)
    assert pref.mpp_problem(0.5) is None and "no µm per pixel" in (pref.mpp_problem(None) or "")
