"""The one slide pipeline with fake predictors: what a predictor receives, capabilities, rows, maps and specs."""

import numpy as np
import pytest
import torch

from wsimil_core.api import create_model
from wsimil_core.engine.checkpoint import save_checkpoint
from wsimil_core.errors import CheckpointError, ConfigError, SlideError, StoreError
from wsimil_core.inference.features import CachedFeatures
from wsimil_core.inference.loaded import LoadedCheckpoint
from wsimil_core.inference.pipeline import PipelineOptions, predict_slide
from wsimil_core.inference.predict import predict_store
from wsimil_core.methods.base import Method, register_method
from wsimil_core.methods.predictor import BagPrediction, FeaturePredictor, Predictor
from wsimil_core.store.zarr_store import FeatureStore

D = 8
# a pretrained encoder whose weights file is not available: building it would be a CheckpointError
ENC = {"name": "resnet18", "encoder_id": "resnet18-abcdef12", "dim": D, "weights_sha256": "ab" * 32}
SPECS = [
    {"name": "score", "kind": "scalar", "description": "fake", "categories": [], "colormap": "magma"},
    {"name": "never", "kind": "scalar", "description": "declared, not emitted", "categories": []},
]


class FakePredictor:
    """Records every SlideInput; probs from the mean of the first feature (or fixed), one map."""

    progressive = False

    def __init__(self, uses_features=True, reads_pixels=False, tag=None):
        self.uses_features, self.reads_pixels, self.tag = uses_features, reads_pixels, tag
        self.seen = []

    def __call__(self, slide):
        self.seen.append(slide)
        n = slide.n_patches
        if self.uses_features:
            x = slide.features()
            p1 = float(1 / (1 + np.exp(-x[:, 0].mean())))
        else:
            p1 = 0.25
        info = {"row": {"extra_col": 7}, "attrs": {"fake": True}}
        return BagPrediction(
            probs={"tumour": np.array([1 - p1, p1])}, maps={"score": np.arange(n, dtype=np.float32)}, info=info
        )


class _FakeMethod(Method):
    name = "fakepipe"
    model_name = "abmil"

    @classmethod
    def predictor(cls, model, meta, **options):
        return FakePredictor(tag=options.get("tag"))


@pytest.fixture(autouse=True)
def fake_method():
    """Register the fake method for this module's tests only (other tests list every registered method)."""
    from wsimil_core.methods import base

    register_method(_FakeMethod)
    yield
    base._METHODS.pop("fakepipe", None)


def _store(tmp_path, n_slides=2):
    rng = np.random.default_rng(0)
    fs = FeatureStore(tmp_path / "store", create=True)
    feats = {}
    for i in range(n_slides):
        n = 4 + i
        x = rng.normal(size=(n, D)).astype(np.float32)
        coords = np.stack([np.arange(n) * 256, np.zeros(n)], 1).astype(np.int64)
        fs.write_bag(
            f"s{i}", x, coords, ENC["encoder_id"], ENC, patch_size_level0=256, stride_level0=256, slide_mpp=0.5
        )
        feats[f"s{i}"] = (x, coords)
    return fs, feats


def _ckpt(tmp_path, method="fakepipe", threshold=0.3):
    torch.manual_seed(0)
    model = create_model("abmil", in_dim=D, n_classes=2, hidden=8, attn_dim=4)
    meta = {
        "method": method,
        "targets": ["tumour"],
        "class_names": {"tumour": ["no", "yes"]},
        "threshold": threshold,
        "encoder": ENC,
        "map_specs": SPECS,
    }
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, model, meta)
    return path


def test_registry_gives_the_methods_predictor_and_its_options(tmp_path):
    path = _ckpt(tmp_path)
    ckpt = LoadedCheckpoint(path, "cpu", tag="x")
    assert isinstance(ckpt.predictor, FakePredictor) and ckpt.predictor.tag == "x"
    assert isinstance(ckpt.predictor, Predictor)
    # an unregistered method falls back to the default predictor, which takes no options
    other = _ckpt(tmp_path / "o", method="not_registered")
    assert isinstance(LoadedCheckpoint(other, "cpu").predictor, FeaturePredictor)
    with pytest.raises(ConfigError, match="no predictor options"):
        LoadedCheckpoint(other, "cpu", prescreen=True)


def test_store_slide_cached_features_row_maps_and_specs(tmp_path):
    fs, feats = _store(tmp_path)
    ckpt = LoadedCheckpoint(_ckpt(tmp_path), "cpu")
    fake = ckpt.predictor
    result = predict_slide(ckpt, store=fs, slide_id="s1", options=PipelineOptions(features="store"))
    (slide,) = fake.seen
    x, coords = feats["s1"]
    np.testing.assert_array_equal(slide.coords, coords)
    np.testing.assert_allclose(slide.features(), x)
    np.testing.assert_allclose(slide.features(np.array([2, 0])), x[[2, 0]])
    # float16 in the store: float32 rows equal to numpy's conversion (the source converts through torch)
    half = (x * 3).astype(np.float16)
    fs.write_bag("h", half, coords, ENC["encoder_id"], ENC, patch_size_level0=256, stride_level0=256, slide_mpp=0.5)
    rows = CachedFeatures(fs, "h", ENC["encoder_id"], ckpt.meta, "x")()
    assert rows.dtype == np.float32
    np.testing.assert_array_equal(rows, half.astype(np.float32))
    assert slide.features.cached and slide.features.encoder_id == ENC["encoder_id"]
    assert slide.grid.size_level0 == 256 and slide.meta.threshold("tumour") == 0.3
    # the row: id, patches, the predictor's extra columns, then the checkpoint's threshold on P(yes)
    p1 = 1 / (1 + np.exp(-x[:, 0].mean()))
    assert list(result.row) == [
        "slide_id",
        "n_patches",
        "extra_col",
        "tumour_pred",
        "tumour_prob_no",
        "tumour_prob_yes",
    ]
    assert result.row["tumour_pred"] == ("yes" if p1 >= 0.3 else "no") and result.from_cache
    assert result.row["tumour_prob_yes"] == pytest.approx(p1)
    # maps in the store with the attrs and the specs of the maps emitted
    assert result.maps_written
    np.testing.assert_array_equal(fs.read_maps("s1", ckpt.checkpoint_id)["score"], np.arange(5))
    attrs = fs.maps_attrs("s1", ckpt.checkpoint_id)
    assert attrs["fake"] is True and attrs["encoder_id"] == ENC["encoder_id"] and attrs["method"] == "fakepipe"
    assert attrs["class_names"] == {"tumour": ["no", "yes"]} and attrs["prediction"] == result.prediction
    assert set(fs.read_map_specs("s1", ckpt.checkpoint_id)) == {"score"}
    assert result.specs["score"]["colormap"] == "magma"


def test_pixel_predictor_never_builds_the_encoder_nor_reads_features(tmp_path):
    fs, _ = _store(tmp_path)
    ckpt = LoadedCheckpoint(_ckpt(tmp_path), "cpu")
    pixels = FakePredictor(uses_features=False, reads_pixels=True)
    ckpt.predictor = pixels
    slide_file = tmp_path / "s0.tiff"
    slide_file.write_bytes(b"not read by the fake")
    attrs_path = fs.slide_attrs("s0")
    assert "slide_path" not in attrs_path
    # the store records no slide file: a clear error before the predictor runs
    with pytest.raises(SlideError, match="reads the slide's pixels"):
        predict_slide(ckpt, store=fs, slide_id="s0")
    result = predict_slide(ckpt, slide_file, store=fs, options=PipelineOptions(check_grid=False))
    (slide,) = pixels.seen
    assert slide.features is None and slide.slide_path == slide_file and not result.from_cache
    assert result.row["tumour_prob_yes"] == 0.25 and ckpt._encoder is None  # the encoder was never built
    with pytest.raises(CheckpointError, match="weights file"):
        ckpt.encoder()


def test_predict_store_checks_every_slide_before_any_work(tmp_path):
    fs, _ = _store(tmp_path)
    FeatureStore(fs.root).write_bag(
        "s9", np.zeros((2, D), np.float32), np.zeros((2, 2), np.int64) + [[0, 0], [256, 0]], "other-1", {"dim": D}
    )
    path = _ckpt(tmp_path)
    with pytest.raises(StoreError, match="resnet18-abcdef12"):
        predict_store(path, fs, device="cpu", progress=False)
    assert fs.map_ids("s0") == []  # nothing predicted before the error
    frame = predict_store(path, fs, slide_ids=["s0", "s1"], device="cpu", progress=False)
    assert frame.columns[:3].tolist() == ["slide_id", "n_patches", "extra_col"]
    assert frame.attrs["thresholds"] == {"tumour": 0.3} and frame.attrs["class_names"] == {"tumour": ["no", "yes"]}


def test_feature_rows_and_standardisation_match_numpy():
    from types import SimpleNamespace

    from wsimil_core.inference.features import StandardizedFeatures, take_rows

    rng = np.random.default_rng(0)
    values = rng.normal(size=(50, 6)).astype(np.float32)
    assert take_rows(values, None) is values  # the whole bag: no copy
    index = np.array([7, 0, 49, 7, 3])
    np.testing.assert_array_equal(take_rows(values, index), values[index])
    assert take_rows(values, np.array([], dtype=np.int64)).shape == (0, 6)
    stats = SimpleNamespace(mean=rng.normal(size=6).tolist(), std=(rng.random(6) + 0.5).tolist())
    seen = StandardizedFeatures(lambda idx=None: take_rows(values, idx), stats, "ckpt")
    want = (values - np.float32(stats.mean)) / np.float32(stats.std)
    np.testing.assert_allclose(seen(), want, rtol=1e-6)
    np.testing.assert_allclose(seen(index), want[index], rtol=1e-6)
    assert seen() is not values and not np.shares_memory(seen(), values)  # the inner features are left as they are
