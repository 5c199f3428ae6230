"""napari plugin, inference logic (no Qt): progressive maps, feature caching in the store, GeoJSON export,
sample data and the npe2 manifest."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from napari_wsimil._inference import InferenceRequest, export_geojson_file, infer_slide, run_inference
from wsimil_core.errors import CheckpointError, ConfigError

GRID_MPP, GRID_PATCH = 2.0, 32  # tiny patches: 128 level-0 px of the 0.5 µm/px demo slide, encoded at 32 px


def make_tiny_checkpoint(path: Path, weights_sha256: str | None = None, grid_mpp: float = GRID_MPP) -> Path:
    """An untrained ABMIL on the random-init truncated ResNet-18 (256 features), patches of 32 px at 2 µm/px."""
    from wsimil_core.api import create_model
    from wsimil_core.engine.checkpoint import save_checkpoint
    from wsimil_core.features.encoders import EncoderSpec

    # what create_encoder("resnet18") reports (not built here: inference builds it and checks the id)
    spec = EncoderSpec(name="resnet18", encoder_id="resnet18-random", dim=256, input_size=None)
    size0 = int(round(GRID_PATCH * grid_mpp / 0.5))  # the test slides are 0.5 µm/px
    enc = spec.with_grid(grid_mpp, GRID_PATCH).to_attrs()
    enc.update(patch_mpp=grid_mpp, patch_size=GRID_PATCH, patch_size_level0=size0, stride_level0=size0)
    if weights_sha256:
        enc["weights_sha256"] = weights_sha256
    import torch

    torch.manual_seed(0)
    model = create_model("abmil", in_dim=spec.dim, n_classes=2, dim=16, attn_dim=8, dropout=0.0)
    save_checkpoint(
        path,
        model,
        {"method": "abmil", "class_names": {"label": ["benign", "tumour"]}, "targets": ["label"], "encoder": enc},
    )
    return path


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    from napari_wsimil._sample_data import demo_cohort_dir

    return demo_cohort_dir(tmp_path_factory.mktemp("napari_demo"))


def write_tissue_slide(path: Path, seed: int = 0) -> Path:
    """A 1024 x 768 px, 0.5 µm/px, 3-level slide: a textured pink ellipse (tissue) on white."""
    from wsimil_core.wsi.writer import write_pyramid_tiff

    rng = np.random.default_rng(seed)
    h, w = 768, 1024
    yy, xx = np.mgrid[0:h, 0:w]
    inside = ((xx - 520) / 380.0) ** 2 + ((yy - 380) / 270.0) ** 2 < 1
    rgb = np.full((h, w, 3), 245, np.uint8)
    tissue = np.stack([200 + 30 * rng.random((h, w)), 80 + 60 * rng.random((h, w)), 150 + 50 * rng.random((h, w))], -1)
    rgb[inside] = tissue[inside].astype(np.uint8)
    return write_pyramid_tiff(path, rgb, 0.5, levels=3, tile=256, compression="jpeg")


@pytest.fixture(scope="module")
def tissue_slide(tmp_path_factory) -> Path:
    return write_tissue_slide(tmp_path_factory.mktemp("napari_slide") / "tissue.tiff")


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("napari_ckpt") / "tiny.safetensors")


def test_progressive_updates_then_cached_features(tissue_slide, tiny_checkpoint, tmp_path):
    slide = tissue_slide
    store = tmp_path / "store"
    updates, stored_then = [], []

    def on_update(update):
        updates.append(update)
        if update.maps is not None and not update.final and len(update.maps["attention"]) == update.total:
            from wsimil_core.store.zarr_store import FeatureStore

            stored_then.append(FeatureStore(store).slide_ids())  # shown before the features and maps are written

    req = InferenceRequest(tiny_checkpoint, slide, device="cpu", store=store, chunk_size=8)
    result = infer_slide(req, on_update)
    n = len(result.coords)
    assert n >= 20 and not result.from_cache
    partial = [u for u in updates if u.maps is not None and not u.final]
    assert len(partial) >= 2
    sizes = [len(u.maps["attention"]) for u in partial]
    assert sizes == sorted(sizes) and sizes[0] == 8 and sizes[-2] < n and sizes[-1] == n
    assert stored_then == [[]]
    assert updates[-1].final and len(updates[-1].maps["attention"]) == n
    assert updates[-1].maps["attention"] is partial[-1].maps["attention"]  # the same arrays: not drawn twice
    assert set(result.probs) == {"label"} and set(result.probs["label"]) == {"benign", "tumour"}
    assert sum(result.probs["label"].values()) == pytest.approx(1.0, abs=1e-5)
    assert result.prediction["label"] in ("benign", "tumour")
    assert result.maps["attention"].shape == (n,)
    # the store now caches the features and holds the maps
    from wsimil_core.store.zarr_store import FeatureStore

    fs = FeatureStore(store)
    assert fs.slide_ids() == ["tissue"] and fs.encoder_ids("tissue") == ["resnet18-random"]
    stored = fs.read_maps("tissue", result.checkpoint_id)
    np.testing.assert_allclose(stored["attention"], result.maps["attention"], rtol=1e-6)
    # second run: cached features, the whole prediction before the maps are written, then the final update
    again_updates = []
    again = infer_slide(InferenceRequest(tiny_checkpoint, slide, device="cpu", store=store), again_updates.append)
    assert again.from_cache
    assert [u.final for u in again_updates if u.maps is not None] == [False, True]
    # features were cached as float16: the answer matches to float16 precision
    np.testing.assert_allclose(again.maps["attention"], result.maps["attention"], atol=2e-3)
    np.testing.assert_array_equal(again.coords, result.coords)
    # the grid geometry matches the stored attrs
    assert again.geometry.stride == 128 and again.geometry.size == 128 and again.geometry.unit == 0.5

    out = export_geojson_file(again, tmp_path / "out" / "demo_000.geojson")
    gj = json.loads(out.read_text())
    assert len(gj["features"]) == n
    first = gj["features"][0]
    x, y = (int(v) for v in again.coords[0])
    assert first["geometry"]["coordinates"][0][0] == [x, y]
    assert first["geometry"]["coordinates"][0][2] == [x + 128, y + 128]
    assert "attention" in first["properties"]["measurements"]

    # a checkpoint on another patch grid still runs, but neither caches its features nor writes maps there
    coarse = make_tiny_checkpoint(tmp_path / "coarse.safetensors", grid_mpp=4.0)
    other = infer_slide(InferenceRequest(coarse, slide, device="cpu", store=store))
    assert not other.from_cache and len(other.coords) < n
    assert any("tiled differently" in m for m in other.messages)
    assert any("maps not written" in m for m in other.messages)
    assert fs.encoder_ids("tissue") == ["resnet18-random"] and fs.map_ids("tissue") == [result.checkpoint_id]

    # the store slide opens through the reader: image + one layer per map
    from napari_wsimil._reader import get_reader, store_summary

    rows = store_summary(store)
    assert rows[0]["slide_id"] == "tissue" and rows[0]["maps"] == [result.checkpoint_id] and rows[0]["slide_found"]
    reader = get_reader(str(store / "tissue"))
    assert reader is not None
    layers = reader(str(store / "tissue"))
    assert [ld[2] for ld in layers] == ["image", "image"]
    grid, kwargs, _ = layers[1]
    assert kwargs["name"] == "tissue · attention" and np.nanmax(grid) == pytest.approx(again.maps["attention"].max())


def test_defaults_to_the_checkpoints_training_store(tissue_slide, tiny_checkpoint, tmp_path):
    from wsimil_core.api import StoreRef, load_checkpoint, save_checkpoint

    store = tmp_path / "training_store"
    first = infer_slide(InferenceRequest(tiny_checkpoint, tissue_slide, device="cpu", store=store))
    assert not first.from_cache
    model, meta = load_checkpoint(tiny_checkpoint)
    trained = save_checkpoint(
        tmp_path / "trained.safetensors", model, meta.model_copy(update={"store": StoreRef(path=str(store))})
    )
    assert trained.store.path == str(store)
    updates = []
    # no cache store given: the checkpoint's training store holds the slide, so nothing is re-extracted
    again = infer_slide(
        InferenceRequest(tmp_path / "trained.safetensors", tissue_slide, device="cpu", store=None), updates.append
    )
    assert again.from_cache and again.store == str(store)
    assert any("training store" in m for m in again.messages)
    assert not [u for u in updates if u.stage == "features"]  # no patch was encoded
    np.testing.assert_allclose(again.maps["attention"], first.maps["attention"], atol=2e-3)


def test_without_store_and_cancel_by_closing_the_generator(tissue_slide, tiny_checkpoint):
    gen = run_inference(InferenceRequest(tiny_checkpoint, tissue_slide, device="cpu", store=None))
    first = next(gen)
    assert first.stage == "load"
    gen.close()  # what the worker's quit() does: nothing else runs
    result = infer_slide(InferenceRequest(tiny_checkpoint, tissue_slide, device="cpu", store=None, chunk_size=10_000))
    assert result.store is None and not result.from_cache and len(result.maps["attention"]) == len(result.coords)


def test_clear_errors(tissue_slide, tmp_path):
    with pytest.raises(ConfigError, match="device"):
        InferenceRequest("x.safetensors", "y.tiff", device="tpu")
    ck = make_tiny_checkpoint(tmp_path / "pretrained.safetensors", weights_sha256="ab" * 32)
    with pytest.raises(CheckpointError, match="weights file"):
        infer_slide(InferenceRequest(ck, tissue_slide, device="cpu"))
    with pytest.raises(CheckpointError, match="not found"):
        infer_slide(InferenceRequest(tmp_path / "missing.safetensors", tissue_slide, device="cpu"))


def test_sample_data_opens_the_demo_slide_with_lesions(demo_dir):
    from napari_wsimil._sample_data import demo_slide

    layers = demo_slide(demo_dir)
    kinds = [t for _, _, t in layers]
    assert kinds[0] == "image" and "shapes" in kinds
    slide_meta = layers[0][1]["metadata"]["wsimil"]
    assert slide_meta["units"] == "µm" and slide_meta["mpp"] == 0.5
    polys, kwargs, _ = next(ld for ld in layers if ld[1]["name"] == "lesions")
    from wsimil_core.demo import load_lesions

    ring = load_lesions(Path(slide_meta["slide_path"]).with_name("demo_000.lesions.geojson"))[0]
    # (y, x) vertices in µm
    np.testing.assert_allclose(polys[0][:, 0], ring[:, 1] * 0.5)
    np.testing.assert_allclose(polys[0][:, 1], ring[:, 0] * 0.5)


def test_manifest_is_valid_and_discovered():
    npe2 = Path(sys.executable).with_name("npe2")
    if not npe2.exists():
        pytest.skip("npe2 command not installed next to this Python")
    out = subprocess.run([str(npe2), "validate", "napari-wsimil"], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    from npe2 import PluginManager

    pm = PluginManager.instance()
    pm.discover()
    manifest = pm.get_manifest("napari-wsimil")
    assert manifest.display_name == "wsimil"
    assert {w.display_name for w in manifest.contributions.widgets} >= {"Inference", "Open a store"}
    assert [s.display_name for s in manifest.contributions.sample_data] == ["wsimil demo slide"]


def test_reader_hook_accepts_slides_and_store_slides_only(tmp_path, fixtures_dir):
    from napari_wsimil._reader import get_reader, read_paths

    assert get_reader(str(fixtures_dir / "openslide" / "boxes.png")) is None
    assert get_reader(str(tmp_path)) is None
    reader = get_reader(str(fixtures_dir / "openslide" / "boxes.tiff"))
    ((data, kwargs, kind),) = reader(str(fixtures_dir / "openslide" / "boxes.tiff"))
    assert kind == "image" and kwargs["multiscale"] and len(data) == 4
    assert kwargs["scale"][0] == pytest.approx(352.78, rel=1e-3)
    svs = read_paths(str(fixtures_dir / "openslide" / "small.svs"))
    assert svs[0][1]["metadata"]["wsimil"]["vendor"] == "aperio"
    with pytest.raises(Exception, match="boxes.png|not a slide"):
        from napari_wsimil._reader import slide_layers

        slide_layers(fixtures_dir / "openslide" / "boxes.png")


def test_logic_modules_import_no_qt():
    code = (
        "import sys, napari_wsimil, napari_wsimil._grid, napari_wsimil._map_layers, napari_wsimil._slide_layers, "
        "napari_wsimil._inference, napari_wsimil._reader, napari_wsimil._viewer, napari_wsimil._sample_data\n"
        "print(','.join(m for m in ('qtpy', 'PyQt5', 'PySide2', 'PyQt6', 'PySide6') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_the_checkpoint_is_kept_loaded_for_the_next_run(tmp_path, monkeypatch):
    import dataclasses

    import wsimil_core.api as api
    from napari_wsimil._inference import CheckpointCache

    loads = []
    monkeypatch.setattr(api, "load_predictor", lambda *a, **kw: loads.append((a, kw)) or object())
    ckpt = tmp_path / "model.safetensors"
    ckpt.write_bytes(b"weights")
    cache = CheckpointCache()
    request = InferenceRequest(ckpt, tmp_path / "a.tiff", device="cpu")
    first = cache.get(request)
    assert cache.get(dataclasses.replace(request, slide_path=tmp_path / "b.tiff")) is first  # another slide
    assert len(loads) == 1
    assert cache.get(dataclasses.replace(request, encoder_weights=tmp_path / "enc.pth")) is not first
    assert cache.get(request) is not first and len(loads) == 3  # one entry: the other weights replaced it
    kept = cache.get(request)
    ckpt.write_bytes(b"retrained weights")  # the file changed: loaded again
    assert cache.get(request) is not kept and len(loads) == 4
    cache.clear()
    cache.get(request)
    assert len(loads) == 5
    ckpt.unlink()  # a missing file is not cached: loading it gives the clear error
    monkeypatch.setattr(api, "load_predictor", lambda *a, **kw: (_ for _ in ()).throw(CheckpointError("missing")))
    with pytest.raises(CheckpointError, match="missing"):
        cache.get(request)
