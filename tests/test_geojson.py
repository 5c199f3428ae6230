"""GeoJSON export: QuPath tile structure, level-0 coordinates with the bounds offset kept, CLI."""

import json

import numpy as np
import pytest
import torch

from wsimil_core.api import create_model
from wsimil_core.engine.checkpoint import save_checkpoint
from wsimil_core.errors import StoreError
from wsimil_core.inference.geojson import export_geojson, maps_to_geojson
from wsimil_core.store.zarr_store import FeatureStore

D = 8
ENC = {"name": "toy", "encoder_id": "toy-abc123", "dim": D}
OFFSET = (1000, 2000)  # openslide.bounds-x/y of an MRXS-like slide


def _store(tmp_path):
    rng = np.random.default_rng(0)
    fs = FeatureStore(tmp_path / "store", create=True)
    cols, rows = np.meshgrid(np.arange(3), np.arange(2))
    grid = np.stack([cols.ravel(), rows.ravel()], 1)
    coords = (grid * 512 + np.array(OFFSET)).astype(np.int64)  # stored coords include the bounds offset
    fs.write_bag(
        "mrxs1",
        rng.normal(size=(6, D)).astype(np.float32),
        coords,
        ENC["encoder_id"],
        ENC,
        patch_size_level0=512,
        stride_level0=512,
        grid_origin=list(OFFSET),
        bounds=[OFFSET[0], OFFSET[1], 1536, 1024],
    )
    return fs, coords


def test_feature_collection_structure():
    coords = np.array([[0, 0], [256, 512]], dtype=np.int64)
    maps = {
        "attention": np.array([0.25, 0.75], np.float32),
        "routing/task": np.array([[0.1, 0.9], [0.6, 0.4]], np.float32),
        "memory/score": np.array([np.nan, 2.0], np.float32),
    }
    fc = maps_to_geojson(coords, 256, maps, {"slide_id": "x"})
    json.dumps(fc, allow_nan=False)  # strict JSON: NaN values are left out
    assert fc["type"] == "FeatureCollection" and len(fc["features"]) == 2
    f1 = fc["features"][1]
    assert f1["type"] == "Feature" and f1["geometry"]["type"] == "Polygon"
    ring = f1["geometry"]["coordinates"][0]
    assert ring == [[256, 512], [512, 512], [512, 768], [256, 768], [256, 512]]  # closed square, (x, y)
    props = f1["properties"]
    assert props["objectType"] == "tile"
    assert props["measurements"] == pytest.approx(
        {"attention": 0.75, "routing/task[0]": 0.6, "routing/task[1]": 0.4, "memory/score": 2.0}
    )
    assert "memory/score" not in fc["features"][0]["properties"]["measurements"]
    with pytest.raises(StoreError):
        maps_to_geojson(coords, 256, {"a": np.zeros(3)})


def _checkpoint(tmp_path):
    torch.manual_seed(0)
    model = create_model("abmil", in_dim=D, n_classes=2, dim=16, attn_dim=8)
    path = tmp_path / "m.safetensors"
    meta = save_checkpoint(path, model, {"method": "abmil", "encoder": ENC})
    return path, meta.checkpoint_id


def test_bounds_offset_polygons_are_at_stored_coords(tmp_path):
    from wsimil_core.inference.predict import predict_store

    fs, coords = _store(tmp_path)
    path, ckpt_id = _checkpoint(tmp_path)
    with pytest.raises(StoreError, match="run wsimil predict"):
        export_geojson(fs, "mrxs1", ckpt_id)
    predict_store(path, fs, device="cpu", progress=False)
    out = tmp_path / "out.geojson"
    fc = export_geojson(fs.root, "mrxs1", ckpt_id, out)
    assert json.loads(out.read_text()) == fc
    corners = np.array([f["geometry"]["coordinates"][0][0] for f in fc["features"]])
    np.testing.assert_array_equal(corners, coords)  # at coords, NOT coords - offset
    assert corners.min(0).tolist() == list(OFFSET)
    att = np.array([f["properties"]["measurements"]["attention"] for f in fc["features"]])
    np.testing.assert_allclose(att, fs.read_maps("mrxs1", ckpt_id)["attention"], rtol=1e-6)
    assert att.sum() == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(StoreError, match="no complete slide"):
        export_geojson(fs, "nope", ckpt_id)


def test_cli_export_geojson(tmp_path, capsys):
    from wsimil_core.cli import main

    fs, coords = _store(tmp_path)
    path, ckpt_id = _checkpoint(tmp_path)
    out = tmp_path / "a.geojson"
    # a checkpoint file whose maps are not in the store yet: predicted first
    main(
        ["export-geojson", str(path), "--store", str(fs.root), "--slide", "mrxs1", "--out", str(out), "--device", "cpu"]
    )
    assert len(json.loads(out.read_text())["features"]) == 6
    assert fs.map_ids("mrxs1") == [ckpt_id]
    out2 = tmp_path / "b.geojson"
    main(["export-geojson", ckpt_id, "--store", str(fs.root), "--slide", "mrxs1", "--out", str(out2)])
    assert json.loads(out2.read_text()) == json.loads(out.read_text())
    with pytest.raises(SystemExit):
        main(["export-geojson", "abmil-0000000000", "--store", str(fs.root), "--slide", "mrxs1"])
    assert "has no maps of checkpoint" in capsys.readouterr().err


def test_categorical_maps_export_their_category_names():
    from wsimil_core.api import MapSpec

    coords = np.array([[0, 0], [256, 0], [512, 0]], dtype=np.int64)
    comp = MapSpec("memory/component", "categorical", "component", ("C-1", "C+1", "C+2"), codes=(-1, 1, 2))
    routed = MapSpec("routing/a", "binary", "routed", ("not routed", "routed"))
    maps = {
        "memory/component": np.array([-1, 2, np.nan], np.float32),
        "routing/a": np.array([0, 1, 1], np.float32),
        "attention": np.array([0.2, 0.3, 0.5], np.float32),
    }
    fc = maps_to_geojson(coords, 256, maps, {"slide_id": "x"}, specs={"memory/component": comp, "routing/a": routed})
    json.dumps(fc, allow_nan=False)
    props = [f["properties"] for f in fc["features"]]
    # the numeric code stays a measurement (QuPath measurement maps), the name is a string beside it
    assert props[0]["measurements"] == pytest.approx({"memory/component": -1.0, "routing/a": 0.0, "attention": 0.2})
    assert props[0]["metadata"] == {"memory/component": "C-1", "routing/a": "not routed"}
    assert props[1]["metadata"] == {"memory/component": "C+2", "routing/a": "routed"}
    assert props[2]["metadata"] == {"routing/a": "routed"}  # NaN: no category
    assert fc["properties"]["slide_id"] == "x"
    assert fc["properties"]["map_specs"]["routing/a"] == routed.to_dict()
    # without specs (an older store) the export is as before: measurements only
    plain = maps_to_geojson(coords, 256, maps)
    assert "metadata" not in plain["features"][0]["properties"] and "properties" not in plain


def test_export_reads_the_specs_stored_beside_the_maps(tmp_path):
    from wsimil_core.api import MapSpec

    fs, coords = _store(tmp_path)
    keep = MapSpec("prescreen/keep", "binary", "kept", ("pruned", "kept"))
    maps = {"prescreen/keep": np.array([1, 0, 1, 1, 0, 1], np.float32), "score": np.linspace(0, 1, 6)}
    fs.write_maps("mrxs1", "ck", maps, specs={"prescreen/keep": keep.to_dict()})
    fc = export_geojson(fs, "mrxs1", "ck")
    names = [f["properties"]["metadata"]["prescreen/keep"] for f in fc["features"]]
    assert names == ["kept", "pruned", "kept", "kept", "pruned", "kept"]
    assert set(fc["properties"]["map_specs"]) == {"prescreen/keep"}
