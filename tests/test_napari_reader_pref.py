"""The slide-reader preference, foreign slide layers, implausible mpp and concise errors (no Qt window needed)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("napari")


@pytest.fixture
def settings(tmp_path, monkeypatch):
    """napari settings saved to a temporary file (the user's own settings are never touched)."""
    import napari.settings as napari_settings

    from napari_wsimil import _reader_preference as rp

    fresh = napari_settings.NapariSettings(config_path=tmp_path / "napari" / "settings.yaml")
    monkeypatch.setattr(napari_settings, "_SETTINGS", fresh)
    monkeypatch.delenv(rp.NO_OFFER_ENV, raising=False)
    rp._reset_session()
    yield fresh
    rp._reset_session()


def test_manifest_claims_every_slide_pattern():
    import yaml

    from napari_wsimil._reader_preference import slide_patterns

    manifest = yaml.safe_load((Path(__file__).parents[1] / "src/napari_wsimil/napari.yaml").read_text())
    patterns = set(manifest["contributions"]["readers"][0]["filename_patterns"])
    assert set(slide_patterns()) <= patterns
    assert {"*.svs", "*.SVS", "*.tiff", "*.dcm", "*.ndpi", "*.mrxs"} <= set(slide_patterns())


def test_setting_the_preference_keeps_other_patterns(settings):
    from napari.plugins.utils import get_preferred_reader

    from napari_wsimil._reader_preference import missing_preferences, set_reader_preference, slide_patterns

    settings.plugins.extension2reader = {"*.png": "napari", "*.tif": "napari"}
    assert get_preferred_reader("/data/a.svs") is None
    changed = set_reader_preference()
    assert "*.tif" in changed and "*.svs" in changed and missing_preferences() == []
    prefs = settings.plugins.extension2reader
    assert prefs["*.png"] == "napari" and all(prefs[p] == "napari-wsimil" for p in slide_patterns())
    # napari's own lookup (what File > Open and drag-and-drop use) now picks wsimil
    assert get_preferred_reader("/data/a.svs") == "napari-wsimil"
    assert get_preferred_reader("/data/B.NDPI") == "napari-wsimil"
    assert set_reader_preference() == []  # idempotent
    # napari saved it to its settings file
    assert "napari-wsimil" in Path(settings.config_path).read_text()


def test_the_offer_is_made_once_and_its_answer_is_remembered(settings):
    from napari_wsimil import _reader_preference as rp

    shown = []
    assert rp.offer_reader_preference(dispatch=shown.append)
    assert rp.offer_reader_preference(dispatch=shown.append) is False  # once per session
    (note,) = shown
    labels = [label for label, _ in note.actions]
    assert labels == ["Open slides with wsimil", "No"]
    # "No": remembered beside napari's settings file, so a new session does not ask again
    dict(note.actions)["No"](None)
    rp._reset_session()
    assert rp.remembered_answer() == "no"
    assert (Path(settings.config_path).parent / rp.ANSWER_FILE).is_file()
    assert rp.offer_reader_preference(dispatch=shown.append) is False and len(shown) == 1
    assert rp.missing_preferences()  # declining sets nothing


def test_no_offer_when_scripts_ask_for_none(settings, monkeypatch):
    from napari_wsimil import _reader_preference as rp

    monkeypatch.setenv(rp.NO_OFFER_ENV, "1")
    assert rp.offer_reader_preference(dispatch=lambda n: pytest.fail("offered")) is False
    monkeypatch.delenv(rp.NO_OFFER_ENV)
    assert rp.offer_reader_preference(dispatch=lambda n: None)


def test_accepting_the_offer_sets_the_preference(settings):
    from napari_wsimil import _reader_preference as rp

    shown = []
    rp.offer_reader_preference(dispatch=shown.append)
    dict(shown[0].actions)["Open slides with wsimil"](None)
    assert rp.missing_preferences() == [] and rp.remembered_answer() == "yes"


def test_no_offer_when_the_preference_is_already_set(settings):
    from napari_wsimil import _reader_preference as rp

    rp.set_reader_preference()
    assert rp.offer_reader_preference(dispatch=lambda n: pytest.fail("offered")) is False


@pytest.mark.parametrize(
    ("mpp", "bad"), [(0.25, False), (0.5, False), (16.0, False), (352.78, True), (0.01, True), (None, True)]
)
def test_mpp_problem(mpp, bad):
    from napari_wsimil._reader_preference import mpp_problem

    problem = mpp_problem(mpp)
    assert (problem is not None) is bad
    if mpp == 352.78:
        assert "352.8 µm/px is implausible" in problem and "72-dpi" in problem


def test_the_reader_warns_about_an_implausible_mpp(tmp_path):
    from napari_wsimil._reader import read_paths
    from napari_wsimil._reader_preference import ImplausibleMppWarning
    from wsimil_core.wsi.writer import write_pyramid_tiff

    path = write_pyramid_tiff(
        tmp_path / "dpi72.tiff", np.full((256, 256, 3), 200, np.uint8), mpp=25400 / 72, levels=1, tile=128
    )
    with pytest.warns(ImplausibleMppWarning, match=r"352\.8 µm/px is implausible.*dpi72\.tiff"):
        read_paths(str(path))
    ok = write_pyramid_tiff(tmp_path / "ok.tiff", np.full((256, 256, 3), 200, np.uint8), mpp=0.5, levels=1, tile=128)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ImplausibleMppWarning)
        read_paths(str(ok))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("/very/long/folder/names/slide_007.tiff: cannot read tile (2, 3) at level 1", "cannot read tile (2, 3) at "),
        ("error: /runs/abmil/train.yaml: model 'abmil' is single-task", "error: model 'abmil' is single-task (train"),
        ("choose a checkpoint (*.safetensors) first", "choose a checkpoint (*.safetensors) first"),
        ("ValueError: bad\nTraceback (most recent call last):\n  File ...", "ValueError: bad"),
    ],
)
def test_concise_error_puts_the_cause_first(text, expected):
    pytest.importorskip("qtpy")
    from napari_wsimil._run_dock import MAX_ERROR_CHARS, concise_error

    out = concise_error(text)
    assert out.startswith(expected) and "\n" not in out
    assert not out.startswith("/")
    assert len(concise_error("x" * 1000)) == MAX_ERROR_CHARS
