"""End-to-end ABMILX: MRIS sampling, the pixel pipeline, chunked/streamed encoding in bounded memory, frozen
BatchNorm, inference on a real (synthetic) slide, and a short E2E run through ``wsimil train``."""

from __future__ import annotations

import weakref

import numpy as np
import pytest
import torch
from torch import nn

from _helpers import train_from_config
from wsimil_core.functional.attention_plus import attention_mass_share
from wsimil_core.methods.abmilx.e2e import (
    PatchReadDataset,
    SlideInfo,
    abmilx_e2e_predict,
    encode_slide_patches,
    make_transform,
    mris_sample,
    scale_grid,
)
from wsimil_core.methods.abmilx.e2e_model import normalize_images

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class FakeSlide:
    """A reader stand-in: ``read_patch`` paints a patch whose colour depends on (x, y)."""

    calls = 0

    def __init__(self, path: str):
        self.path = path

    def read_patch(self, x: int, y: int, size_level0: int, out_px: int) -> np.ndarray:
        FakeSlide.calls += 1
        img = np.empty((out_px, out_px, 3), dtype=np.uint8)
        img[..., 0] = (x // 7) % 255
        img[..., 1] = (y // 7) % 255
        img[..., 2] = size_level0 % 255
        return img


def _grid(n_side=8, size=256):
    xs, ys = np.meshgrid(np.arange(n_side), np.arange(n_side))
    return np.stack([xs.ravel() * size, ys.ravel() * size], 1).astype(np.int64) + np.array([100, 50])


def test_scale_grid_and_mris_counts():
    coords = _grid()
    coarse, side = scale_grid(coords, 256, (100, 50), 4.0)
    assert side == 1024 and len(coarse) == 4
    assert ((coarse - [100, 50]) % 1024 == 0).all()
    rng = np.random.default_rng(0)
    c, sizes, j = mris_sample(coords, 256, (100, 50), 100, [1.0, 4.0], [1.0, 3.0], rng)
    assert len(c) == 100 and (j == 0).sum() == 25 and (j == 1).sum() == 75
    assert set(sizes[j == 0]) == {256} and set(sizes[j == 1]) == {1024}
    assert len({tuple(v) for v in c[j == 0]}) == 25  # enough main-scale patches: no repetition
    assert {tuple(v) for v in c[j == 1]} == {tuple(v) for v in coarse}  # 4 coarse cells padded by repetition
    # every coarse patch contains at least one tissue patch
    for x, y in c[j == 1]:
        assert ((coords[:, 0] >= x) & (coords[:, 0] < x + 1024) & (coords[:, 1] >= y) & (coords[:, 1] < y + 1024)).any()


def test_transforms_train_and_test():
    img = np.random.default_rng(0).integers(0, 255, size=(40, 40, 3), dtype=np.uint8)
    test_tf = make_transform(32, train=False)
    x = test_tf(img)
    assert x.shape == (3, 32, 32) and x.dtype == torch.uint8
    assert torch.equal(x, torch.from_numpy(img[4:36, 4:36]).permute(2, 0, 1))  # centre crop
    expected = (x.float() / 255 - torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)) / torch.tensor(
        [0.229, 0.224, 0.225]
    ).view(3, 1, 1)
    assert torch.allclose(normalize_images(x[None])[0], expected, atol=1e-5)  # ImageNet normalisation
    torch.manual_seed(0)
    a, b = make_transform(32, train=True)(img), make_transform(32, train=True)(img)
    assert a.shape == (3, 32, 32) and not torch.equal(a, b)  # random crops / flips


def _e2e_method(tmp_path, **opts):
    from wsimil_core.methods import create_method

    options = dict(e2e=True, n_samples=12, input_size=32, read_px=40, encoder_chunk=5, num_workers=0)
    options.update(opts)
    method = create_method("abmilx", model={"n_classes": 2, "n_heads": 4, "dim": 32}, options=options)
    method.reader = FakeSlide
    return method


def _bag(tmp_path, label=1):
    from wsimil_core.data.bag import BagBatch

    slide = tmp_path / "fake.svs"
    slide.touch()
    coords = torch.from_numpy(_grid(6))
    return BagBatch(
        features=torch.zeros(len(coords), 8),
        coords=coords,
        targets={"label": torch.tensor([label])},
        slide_id="fake",
        slide_path=str(slide),
        slide_attrs={"patch_size_level0": 256, "grid_origin": [100, 50]},
    )


def test_e2e_training_step_updates_encoder_and_keeps_bn_frozen(tmp_path):
    torch.manual_seed(0)
    method = _e2e_method(tmp_path, checkpointing=True, ema=True, bn_mode="frozen")
    model = method.model
    seen = []  # the step's attention weights [1, m, N]
    model.mil.register_forward_hook(lambda m, a, out: seen.append(out.extras["attention_weights"].detach()))
    assert model.config.in_dim == 256  # resnet18 cut after layer3
    bn = model.encoder.bn1
    stats = bn.running_mean.clone()
    method.train()
    assert not bn.training and model.encoder.conv1.training  # BatchNorm in eval mode, the rest trains
    opt = torch.optim.SGD(method.trainable_parameters("train"), lr=0.1)
    FakeSlide.calls = 0
    step = method.training_step(_bag(tmp_path), "train")
    assert FakeSlide.calls == 12  # n_samples patches read
    step["loss"].backward()
    assert model.encoder.conv1.weight.grad is not None and model.encoder.conv1.weight.grad.abs().sum() > 0
    assert model.mil.alpha.grad is not None
    before = model.encoder.conv1.weight.detach().clone()
    opt.step()
    method.after_optimizer_step("train")
    assert not torch.equal(before, model.encoder.conv1.weight)
    assert torch.equal(bn.running_mean, stats)  # frozen statistics
    ema_w = method.ema_model.encoder.conv1.weight
    assert torch.allclose(ema_w, 0.9997 * before + 0.0003 * model.encoder.conv1.weight, atol=1e-6)
    logs = method.epoch_end("train", 0)
    assert "alpha" in logs and len(seen) == 1 and seen[0].shape == (1, 4, 12)
    assert logs["attention_mass_share"] == pytest.approx(float(attention_mass_share(seen[0], 0.9).mean()))


def test_e2e_bn_trains_when_not_frozen(tmp_path):
    method = _e2e_method(tmp_path, bn_mode="train")
    method.train()
    stats = method.model.encoder.bn1.running_mean.clone()
    method.training_step(_bag(tmp_path), "train")
    assert method.model.encoder.bn1.training and not torch.equal(stats, method.model.encoder.bn1.running_mean)


def test_e2e_without_slide_is_a_clear_error(tmp_path):
    from wsimil_core.data.bag import BagBatch
    from wsimil_core.errors import DataError

    method = _e2e_method(tmp_path)
    bag = BagBatch(
        features=torch.zeros(3, 8),
        coords=torch.zeros(3, 2, dtype=torch.long),
        targets={"label": torch.tensor([0])},
        slide_id="x",
    )
    with pytest.raises(DataError, match="no slide file"):
        method.training_step(bag, "train")
    with pytest.raises(DataError, match="no slide to read"):
        method.model(torch.zeros(3, 8))
    with pytest.raises(DataError, match="'x' has no slide file.*eval_pixels"):
        method.eval_forward(bag)


def test_e2e_eval_forward_reads_the_bag_pixels_from_its_slide_path(tmp_path):
    """Validation/test read every patch at the bag's coords from batch.slide_path: no coords hash, no store."""
    torch.manual_seed(0)
    method = _e2e_method(tmp_path, ema=True)
    bag = _bag(tmp_path)
    method.eval()
    FakeSlide.calls = 0
    with torch.no_grad():
        out = method.eval_forward(bag)
        ema_out = method.eval_forward(bag, method.ema_model)
    assert FakeSlide.calls == 2 * len(bag.coords)  # each patch read once per evaluated model
    expected = abmilx_e2e_predict(
        method.model, bag.slide_path, bag.coords.numpy(), 256, reader=FakeSlide, progress=False
    )
    assert torch.allclose(out.logits, expected.logits, atol=1e-5)
    assert out.maps["attention"].shape == (len(bag.coords),)
    # another slide file -> other pixels -> other features (the slide path, not the coords, decides)
    other = _bag(tmp_path)
    other.slide_path = str(tmp_path / "other.svs")
    (tmp_path / "other.svs").touch()
    seen = []

    class Recording(FakeSlide):
        def __init__(self, path):
            seen.append(path)
            super().__init__(path)

    method.reader = Recording
    with torch.no_grad():
        method.eval_forward(other)
    assert seen == [str(tmp_path / "other.svs")]
    assert torch.allclose(ema_out.logits, expected.logits, atol=1e-3)  # EMA copy == online at step 0
    # eval_pixels off: the cached features of the store go through the model
    feats_method = _e2e_method(tmp_path, eval_pixels=False).eval()
    feat_bag = _bag(tmp_path)
    feat_bag.features = torch.randn(len(feat_bag.coords), 256)
    FakeSlide.calls = 0
    with torch.no_grad():
        got = feats_method.eval_forward(feat_bag)
    assert FakeSlide.calls == 0 and torch.allclose(got.logits, feats_method.model.mil(feat_bag.features).logits)


class _LiveEncoder(nn.Module):
    """A tiny stand-in encoder (``[b, 3, S, S] -> [b, 256]``) counting how many input chunks are alive."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 256)
        self.live = 0
        self.max_live = 0
        self.max_batch = 0
        self.seen = 0

    def _dead(self):
        self.live -= 1

    def forward(self, x):
        self.live += 1
        weakref.finalize(x, self._dead)
        self.max_live = max(self.max_live, self.live)
        self.max_batch = max(self.max_batch, x.shape[0])
        self.seen += x.shape[0]
        return self.lin(x.mean(dim=(2, 3)))


def test_50k_patches_stream_through_the_chunked_encoder(tmp_path):
    from wsimil_core.api import create_model

    # attn_plus off: A+ is O(N^2) *compute* (linear memory, tested in test_abmilx.py); this test is about
    # streaming the pixels through the encoder.
    model = create_model(
        "abmilx_e2e", n_classes=2, n_heads=4, dim=32, input_size=8, read_px=8, encoder_chunk=2000, attn_plus=False
    )
    model.encoder = _LiveEncoder()
    n = 50_000
    xs = np.arange(n) % 250
    coords = np.stack([xs * 256, (np.arange(n) // 250) * 256], 1).astype(np.int64)
    out = abmilx_e2e_predict(model, tmp_path / "fake.svs", coords, 256, reader=FakeSlide, progress=False)
    enc = model.encoder
    assert enc.seen == n and enc.max_batch == 2000
    assert enc.max_live <= 2  # at most the current chunk and the one being replaced: never all 50k images
    assert out.logits.shape == (1, 2) and out.maps["attention"].shape == (n,)
    assert torch.isfinite(out.maps["attention"]).all()


@pytest.fixture(scope="module")
def tiny_slides(tmp_path_factory):
    """Four 512 x 512 pyramidal TIFFs (mpp 0.5): positives carry dark-red squares."""
    from wsimil_core.wsi.writer import write_pyramid_tiff

    root = tmp_path_factory.mktemp("abmilx_slides")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(4):
        rgb = np.full((512, 512, 3), 230, dtype=np.uint8)
        rgb[:, :, 1] = 190
        rgb += rng.integers(0, 20, size=rgb.shape, dtype=np.uint8)
        if i % 2:
            for _ in range(3):
                x, y = rng.integers(0, 448, size=2)
                rgb[y : y + 64, x : x + 64] = (120, 20, 40)
        paths.append(write_pyramid_tiff(root / f"s{i}.tiff", rgb, 0.5, levels=2, tile=256, compression="deflate"))
    return paths


def test_e2e_predict_on_a_real_slide_with_worker_processes(tiny_slides):
    from wsimil_core.api import create_model

    torch.manual_seed(0)
    model = create_model("abmilx_e2e", n_classes=2, n_heads=4, dim=32, input_size=32, read_px=32, encoder_chunk=16)
    coords = _grid(4, 64) - np.array([100, 50])  # 16 patches of 64 level-0 px
    out0 = abmilx_e2e_predict(model, tiny_slides[1], coords, 64, num_workers=0, progress=False)
    out2 = abmilx_e2e_predict(model, tiny_slides[1], coords, 64, num_workers=1, progress=False)
    assert out0.logits.shape == (1, 2) and out0.maps["attention"].shape == (16,)
    assert torch.allclose(out0.logits, out2.logits, atol=1e-5)  # workers read the same pixels, in order
    feats = encode_slide_patches(model, SlideInfo(str(tiny_slides[1]), 64, (0, 0)), coords)
    assert feats.shape == (16, 256)
    ds = PatchReadDataset(str(tiny_slides[1]), coords[:2], 64, 32, 32, train=False)
    assert ds[0].shape == (3, 32, 32)


def _write_cohort(tmp_path, slides):
    import pandas as pd

    from wsimil_core.store.zarr_store import FeatureStore

    store_path = tmp_path / "store.zarr"
    store = FeatureStore(store_path, create=True)
    rows = []
    for i, p in enumerate(slides):
        coords = (_grid(3, 128) - np.array([100 - 8 * i, 50])).astype(np.int64)  # 9 patches of 128 level-0 px
        feats = np.random.default_rng(i).normal(size=(len(coords), 256)).astype(np.float32)
        store.write_bag(
            f"s{i}",
            feats,
            coords,
            "resnet18-random",
            encoder_attrs={"name": "resnet18", "dim": 256, "weights_sha256": "random-init"},
            slide_path=str(p),
            patch_size=32,
            patch_size_level0=128,
            stride_level0=128,
            patch_mpp=2.0,
            slide_mpp=0.5,
            grid_origin=[0, 0],
            level0_size=[512, 512],
        )
        rows.append({"slide_id": f"s{i}", "label": i % 2})
    labels = tmp_path / "labels.csv"
    pd.DataFrame(rows).to_csv(labels, index=False)
    return store_path, labels


def test_e2e_trains_from_cli_and_checkpoint_predicts(tiny_slides, tmp_path):
    import json

    from wsimil_core.cli import main
    from wsimil_core.engine.checkpoint import load_checkpoint

    store_path, labels = _write_cohort(tmp_path, tiny_slides)
    cfg = {
        "method": {
            "name": "abmilx",
            "options": {
                "e2e": True,
                "n_samples": 8,
                "scales": [1.0, 2.0],
                "scale_ratios": [1.0, 1.0],
                "input_size": 24,
                "encoder_chunk": 8,
                "num_workers": 0,
                "checkpointing": True,
                "ema": True,
            },
        },
        "model": {"n_heads": 4, "dim": 32},
        "data": {
            "store": str(store_path),
            "labels": str(labels),
            "targets": ["label"],
            "split": {"kind": "random", "val_frac": 0.5, "seed": 0},
        },
        "train": {"epochs": 1, "lr": 1e-3, "device": "cpu", "seed": 0},
        "output": {"dir": str(tmp_path / "run"), "progress": False},
    }
    run = train_from_config(cfg, tmp_path / "config.yaml")
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert "train/alpha" in history[-1]
    model, meta = load_checkpoint(run / "last.safetensors")
    assert meta.model_name == "abmilx_e2e" and model.config.read_px == 32  # from the store's patch size
    assert any(k.startswith("encoder.layer3") for k in model.state_dict())
    from wsimil_core.store.zarr_store import FeatureStore

    coords = FeatureStore(store_path).read_coords("s0")
    out = abmilx_e2e_predict(model, tiny_slides[0], coords, 128, progress=False)
    assert out.logits.shape == (1, 2) and torch.isfinite(out.logits).all()

    # the CLI: pixels read from the slides, maps written into the store
    import pandas as pd

    csv = tmp_path / "pred.csv"
    main(
        [
            "abmilx",
            "predict",
            str(run / "last.safetensors"),
            "--store",
            str(store_path),
            "--slides",
            "s0,s1",
            "--out",
            str(csv),
            "--device",
            "cpu",
            "--workers",
            "0",
            "--no-progress",
        ]
    )
    frame = pd.read_csv(csv)
    assert list(frame["slide_id"]) == ["s0", "s1"] and frame.filter(like="_prob_").shape[1] == 2
    fs = FeatureStore(store_path)
    maps = fs.read_maps("s0", fs.map_ids("s0")[0])
    assert maps["attention"].shape == (len(coords),) and "attention/head3" in maps
    assert np.isclose(frame.filter(like="_prob_").iloc[0].sum(), 1.0)
    assert np.allclose(
        frame.filter(like="_prob_").iloc[0].to_numpy(), torch.softmax(out.logits[0], -1).numpy(), atol=1e-5
    )

    # the generic predict goes through the checkpoint's predictor, which reads pixels (the cached features
    # predate the fine-tuned encoder, and the predictor declares it never uses them): the same answer
    from wsimil_core.inference.predict import load_predictor, predict_store

    ckpt = load_predictor(run / "last.safetensors", "cpu")
    assert not ckpt.predictor.uses_features and ckpt.predictor.reads_pixels
    generic = predict_store(ckpt, store_path, slide_ids=["s0", "s1"], progress=False)
    np.testing.assert_allclose(
        generic.filter(like="_prob_").to_numpy(), frame.filter(like="_prob_").to_numpy(), atol=1e-5
    )
    assert FeatureStore(store_path).maps_attrs("s0", ckpt.checkpoint_id)["encoder_id"].startswith("e2e:")
