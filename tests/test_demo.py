"""Demo cohort: files, tables, lesion masks that match the pixels, determinism, lesion_fraction, CLI."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from wsimil_core.cli import main
from wsimil_core.demo import DemoParams, lesion_fraction, load_lesions, make_demo_cohort
from wsimil_core.demo.cohort import cohort_tables
from wsimil_core.errors import DataError

P = 256  # patch side in level-0 px (256 px at 0.5 µm/px)


def test_files_andcohort_tables(demo_cohort):
    labels = pd.read_csv(demo_cohort / "labels.csv")
    assert list(labels.columns) == ["slide_id", "label", "task_b", "task_c", "patient_id"]
    assert len(labels) == 6 and labels["slide_id"].is_unique
    assert labels["label"].sum() == 3  # balanced
    prev = [labels["task_b"].sum(), labels["task_c"].sum()]
    assert prev == [2, 1]  # imbalanced, different prevalences
    assert labels["patient_id"].nunique() == 3
    omics = pd.read_csv(demo_cohort / "omics.csv")
    assert omics.shape == (6, 201) and list(omics["slide_id"]) == list(labels["slide_id"])
    corr = [np.corrcoef(omics[f"GENE{g:03d}"], labels["label"])[0, 1] for g in range(1, 21)]
    assert np.mean(corr) > 0.5
    assert (demo_cohort / "README.txt").read_text().startswith("wsimil demo cohort")
    for sid in labels["slide_id"]:
        assert (demo_cohort / f"{sid}.tiff").is_file() and (demo_cohort / f"{sid}.lesions.geojson").is_file()


def test_slides_open_with_mpp_and_pyramid(demo_cohort):
    from wsimil_core.wsi.slide import open_slide

    with open_slide(demo_cohort / "demo_000.tiff") as s:
        assert s.level_count >= 3
        assert s.level_dimensions[0] == (2048, 1536)
        assert s.mpp == pytest.approx(0.5, rel=1e-3)
        corner = s.read_region((0, 0), 0, (64, 64))
        assert corner.mean() > 230  # white background


def _patch_grid(shape):
    h, w = shape[:2]
    ys, xs = np.mgrid[0 : h // P, 0 : w // P]
    return np.stack([xs.ravel() * P, ys.ravel() * P], 1)


def test_lesions_match_labels_and_pixels(demo_cohort):
    """Regions exist exactly for positive columns; lesion patches are blue-purple and dense, others are not."""
    import tifffile

    labels = pd.read_csv(demo_cohort / "labels.csv")
    in_feat, out_feat = [], []
    for row in labels.itertuples():
        gj = demo_cohort / f"{row.slide_id}.lesions.geojson"
        for kind, col in (("lesion", "label"), ("pattern_b", "task_b"), ("pattern_c", "task_c")):
            assert (len(load_lesions(gj, kind)) > 0) == bool(getattr(row, col)), (row.slide_id, kind)
        img = tifffile.imread(demo_cohort / f"{row.slide_id}.tiff", level=0)
        coords = _patch_grid(img.shape)
        frac = lesion_fraction(gj, coords, P)
        if row.label:
            assert (frac == 1.0).sum() >= 2  # lesions are large enough for whole patches
        means = np.array([img[y : y + P, x : x + P].reshape(-1, 3).mean(0) for x, y in coords])
        tissue = means.mean(1) < 225
        feat = np.stack([means[:, 2] - means[:, 0], means[:, 1]], 1)  # (blue - red, green)
        in_feat += list(feat[frac == 1.0])
        out_feat += list(feat[(frac == 0.0) & tissue])
    in_feat, out_feat = np.array(in_feat), np.array(out_feat)
    assert len(in_feat) >= 6 and len(out_feat) >= 30
    rule = lambda f: (f[:, 0] > 10) & (f[:, 1] < 120)  # noqa: E731  blue-purple and dark
    assert rule(in_feat).mean() == 1.0
    assert rule(out_feat).mean() < 0.05


def test_lesion_fraction_square(tmp_path):
    gj = tmp_path / "sq.geojson"
    square = [[100, 100], [612, 100], [612, 612], [100, 612], [100, 100]]
    feats = [
        {
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [square]},
            "properties": {"classification": {"name": "lesion"}},
        },
        {
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [50, 0], [50, 50], [0, 0]]]},
            "properties": {"classification": {"name": "pattern_b"}},
        },
    ]
    gj.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    coords = np.array([[100, 100], [356, 356], [484, 100], [2000, 2000], [-200, -200]])
    frac = lesion_fraction(gj, coords, 256)
    np.testing.assert_allclose(frac, [1.0, 1.0, 0.5, 0.0, 0.0], atol=1e-9)
    assert lesion_fraction(gj, coords[4:], 256, kind=None)[0] > 0
    assert lesion_fraction(gj, np.zeros((0, 2)), 256).shape == (0,)
    (tmp_path / "bad.geojson").write_text("{oops")
    with pytest.raises(DataError, match="bad.geojson"):
        lesion_fraction(tmp_path / "bad.geojson", coords, 256)


def test_deterministic_resume_and_params_guard(tmp_path):
    a = make_demo_cohort(tmp_path / "a", n_slides=2, size=2048, seed=3, progress=False)
    b = make_demo_cohort(tmp_path / "b", n_slides=2, size=2048, seed=3, progress=False)
    for name in ("demo_000.tiff", "demo_001.lesions.geojson", "labels.csv", "omics.csv"):
        assert (a.out_dir / name).read_bytes() == (b.out_dir / name).read_bytes()
    other = cohort_tables(DemoParams(n_slides=2, size=2048, seed=4))[3]
    assert not np.array_equal(other, cohort_tables(a.params)[3])  # another seed, another cohort
    again = make_demo_cohort(tmp_path / "a", n_slides=2, size=2048, seed=3, progress=False)
    assert again.skipped == ["demo_000", "demo_001"]
    with pytest.raises(DataError, match="other parameters"):
        make_demo_cohort(tmp_path / "a", n_slides=2, size=2048, seed=5, progress=False)
    with pytest.raises(DataError, match="multiple of 256"):
        make_demo_cohort(tmp_path / "d", size=2100, progress=False)
    with pytest.raises(DataError, match=">= 2048"):
        make_demo_cohort(tmp_path / "d", size=1024, progress=False)


def test_cli_demo(tmp_path, capsys):
    main(["demo", str(tmp_path / "cli"), "--n-slides", "2", "--size", "2048", "--seed", "1"])
    assert "wrote 2 slides" in capsys.readouterr().out
    assert len(list((tmp_path / "cli").glob("*.tiff"))) == 2
    with pytest.raises(SystemExit) as exit_:
        main(["demo", str(tmp_path / "cli"), "--n-slides", "1"])
    assert exit_.value.code == 1 and "n_slides must be >= 2" in capsys.readouterr().err
