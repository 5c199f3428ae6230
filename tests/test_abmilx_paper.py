"""ABMILX as its paper describes it: the MRIS counts (Eq. 2) and mix, finer-than-grid instances (a random
sub-patch, read with the slide's own pixels), the training crop, the encoder BatchNorm modes and the refusal of
``abmilx-anchor`` with ``e2e: true``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from wsimil_core.methods.abmilx.e2e import (
    PatchReadDataset,
    make_transform,
    mris_counts,
    mris_sample,
    scale_grid,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class FakeSlide:
    """A reader stand-in painting each patch by its (x, y) and level-0 side."""

    def __init__(self, path: str):
        self.path = path

    def read_patch(self, x: int, y: int, size_level0: int, out_px: int) -> np.ndarray:
        img = np.empty((out_px, out_px, 3), dtype=np.uint8)
        img[..., 0], img[..., 1], img[..., 2] = (x // 7) % 255, (y // 7) % 255, size_level0 % 255
        return img


def _grid(n_side: int, size: int, origin=(100, 50)) -> np.ndarray:
    xs, ys = np.meshgrid(np.arange(n_side), np.arange(n_side))
    return np.stack([xs.ravel() * size, ys.ravel() * size], 1).astype(np.int64) + np.array(origin)


# --- MRIS counts (Eq. 2) -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "s,ratios,expected",
    [
        (512, [3, 1], [384, 128]),  # the paper's multi-scale ratio 4: s // 4 secondary
        (10, [3, 1], [8, 2]),  # ceil(7.5) = 8, ceil(2.5) = 3 overshoots: the secondary gives one back
        (9, [1, 1, 1], [3, 3, 3]),
        (10, [1, 1, 1], [4, 3, 3]),  # ceil(3.33) = 4 each, excess 2 taken from the last two scales
        (11, [1, 1, 1], [4, 4, 3]),  # not floor + remainder to the first scale (5, 3, 3)
        (10, [1, 1, 2], [3, 2, 5]),  # the exact 5 is kept; a rounded-up scale gives one back
        (7, [1, 0], [7, 0]),
    ],
)
def test_mris_counts_are_the_papers_ceil_with_the_total_kept(s, ratios, expected):
    counts = mris_counts(s, ratios)
    assert counts.tolist() == expected and counts.sum() == s


def test_mris_counts_against_an_independent_ceil_for_many_sizes():
    rng = np.random.default_rng(0)
    for _ in range(200):
        t = int(rng.integers(1, 5))
        ratios = rng.integers(0, 6, size=t).astype(float)
        if ratios.sum() == 0:
            continue
        s = int(rng.integers(1, 700))
        counts = mris_counts(s, ratios)
        ceil = [math.ceil(round(s * r / ratios.sum(), 9)) for r in ratios]
        assert counts.sum() == s
        exact = [s * r / ratios.sum() for r in ratios]
        assert all(c in (e, e - 1) for c, e in zip(counts, ceil))  # each the ceil, or one less to keep s
        assert all(c == x for c, x in zip(counts, exact) if float(x).is_integer())  # exact values are kept
        lowered = [i for i, (c, e) in enumerate(zip(counts, ceil)) if c < e]
        raised = [i for i, (c, e, x) in enumerate(zip(counts, ceil, exact)) if c == e and e > x + 1e-9]
        assert not lowered or not raised or min(lowered) > max(raised)  # the last rounded-up scales give back


def test_default_mix_is_75_main_25_secondary_at_twice_the_mpp(tmp_path):
    from wsimil_core.methods.abmilx.method import ABMILXOptions

    o = ABMILXOptions()
    assert o.scales == [1.0, 2.0] and o.scale_ratios == [3.0, 1.0]
    coords = _grid(8, 256)
    _, sizes, j = mris_sample(coords, 256, (100, 50), 512, o.scales, o.scale_ratios, np.random.default_rng(0))
    assert (j == 0).sum() == 384 and (j == 1).sum() == 128
    assert set(sizes[j == 0]) == {256} and set(sizes[j == 1]) == {512}


# --- finer scales: any sub-patch --------------------------------------------------------------------------------
def test_finer_scale_candidates_are_every_sub_patch():
    coords = _grid(3, 256)
    subs, side = scale_grid(coords, 256, (100, 50), 0.5)
    assert side == 128 and len(subs) == 4 * len(coords)
    expected = {(int(x) + dx, int(y) + dy) for x, y in coords for dx in (0, 128) for dy in (0, 128)}
    assert {tuple(int(v) for v in c) for c in subs} == expected
    with pytest.raises(ValueError, match="1/k"):
        scale_grid(coords, 256, (100, 50), 0.4)


def test_finer_scale_draws_every_sub_patch_position():
    coords = _grid(4, 256)
    rng = np.random.default_rng(0)
    positions = set()
    for _ in range(20):
        c, sizes, j = mris_sample(coords, 256, (100, 50), 16, [1.0, 0.5], [1.0, 1.0], rng)
        fine = c[j == 1]
        assert set(sizes[j == 1]) == {128}
        offset = (fine - np.array([100, 50])) % 256
        positions |= {tuple(int(v) for v in o) for o in offset}
        parent = fine - offset  # the stored patch a sub-patch comes from is a tissue patch
        assert {tuple(p) for p in parent.tolist()} <= {tuple(p) for p in coords.tolist()}
    assert positions == {(0, 0), (128, 0), (0, 128), (128, 128)}  # not only the top-left one


def test_finer_scale_pixels_are_the_slides_sub_patch(tmp_path):
    from wsimil_core.wsi.slide import open_slide
    from wsimil_core.wsi.writer import write_pyramid_tiff

    rgb = np.random.default_rng(1).integers(0, 255, size=(256, 256, 3), dtype=np.uint8)
    path = write_pyramid_tiff(tmp_path / "s.tiff", rgb, 0.5, levels=1, tile=128, compression="deflate")
    coords = np.array([[0, 0], [128, 128]], dtype=np.int64)  # two stored 128-px patches
    c, sizes, j = mris_sample(coords, 128, (0, 0), 8, [0.5], [1.0], np.random.default_rng(0))
    assert set(sizes) == {64}
    ds = PatchReadDataset(str(path), c, sizes, read_px=64, input_size=64, train=False)
    with open_slide(path) as slide:
        for i, (x, y) in enumerate(c):
            expected = slide.read_region((int(x), int(y)), 0, (64, 64))
            assert np.array_equal(ds[i].permute(1, 2, 0).numpy(), expected)
            assert np.array_equal(expected, rgb[y : y + 64, x : x + 64])  # the written pixels (lossless)


def test_finer_scale_option_is_validated():
    from wsimil_core.errors import ConfigError
    from wsimil_core.methods import create_method

    with pytest.raises(ConfigError, match="1/k"):
        create_method("abmilx", model={"in_dim": 12}, options={"scales": [1.0, 0.3], "scale_ratios": [3, 1]})


# --- training crop -----------------------------------------------------------------------------------------------
def test_train_crop_scale_is_the_authors_and_an_option():
    from torchvision.transforms import v2

    crop = make_transform(32, train=True).geometry.transforms[0]
    assert isinstance(crop, v2.RandomResizedCrop) and crop.scale == (0.25, 1.0)
    assert make_transform(32, train=True, crop_scale=0.5).geometry.transforms[0].scale == (0.5, 1.0)
    ds = PatchReadDataset("x.svs", np.zeros((1, 2), np.int64), 256, 40, 32, True, FakeSlide, crop_scale=0.6)
    assert ds.transform.geometry.transforms[0].scale == (0.6, 1.0)
    with pytest.raises(ValueError, match="crop_scale"):
        make_transform(32, train=True, crop_scale=0.0)


# --- BatchNorm modes -------------------------------------------------------------------------------------------
def _e2e(**opts):
    from wsimil_core.methods import create_method

    options = dict(e2e=True, n_samples=6, input_size=32, read_px=40, encoder_chunk=6, num_workers=0)
    options.update(opts)
    method = create_method("abmilx", model={"n_classes": 2, "n_heads": 4, "dim": 32}, options=options)
    method.reader = FakeSlide
    return method


def _bag(tmp_path):
    from wsimil_core.data.bag import BagBatch

    slide = tmp_path / "fake.svs"
    slide.touch()
    coords = torch.from_numpy(_grid(4, 256))
    return BagBatch(
        features=torch.zeros(len(coords), 8),
        coords=coords,
        targets={"label": torch.tensor([1])},
        slide_id="fake",
        slide_path=str(slide),
        slide_attrs={"patch_size_level0": 256, "grid_origin": [100, 50]},
    )


@pytest.mark.parametrize("mode,sync,updates", [("sync", True, True), ("train", False, True), ("frozen", False, False)])
def test_bn_modes(tmp_path, mode, sync, updates):
    method = _e2e(bn_mode=mode)
    enc = method.model.encoder
    bns = [m for m in enc.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bns and all(isinstance(m, nn.SyncBatchNorm) == sync for m in bns)
    assert method.model.config.bn_mode == mode
    method.train()
    assert all(m.training == updates for m in bns)
    stats = enc.bn1.running_mean.clone()
    method.training_step(_bag(tmp_path), "train")
    assert (not torch.equal(stats, enc.bn1.running_mean)) == updates


def test_default_bn_mode_is_the_authors_sync_and_freeze_bn_still_loads(tmp_path):
    from wsimil_core.api import create_model

    assert _e2e().model.config.bn_mode == "sync"
    with pytest.warns(FutureWarning, match="bn_mode"):
        assert _e2e(freeze_bn=True).model.config.bn_mode == "frozen"
    # an old checkpoint's config stores freeze_bn: it maps to the matching mode
    old = create_model("abmilx_e2e", n_classes=2, n_heads=4, dim=32, freeze_bn=False)
    assert old.config.bn_mode == "train" and old.config.freeze_bn is None
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in old.encoder.modules())


# --- abmilx-anchor with e2e ---------------------------------------------------------------------------------
def test_abmilx_anchor_refuses_e2e_with_a_clear_error():
    from wsimil_core.errors import ConfigError
    from wsimil_core.methods import create_method

    with pytest.raises(ConfigError, match="'abmilx-anchor' does not support e2e: true"):
        create_method("abmilx-anchor", model={"n_classes": 2, "n_heads": 4, "dim": 32}, options={"e2e": True})
    with pytest.raises(ConfigError, match="does not support e2e"):  # monitor-only baseline too
        create_method("abmilx-anchor", model={"n_classes": 2}, options={"e2e": True, "anchor": False})
    method = create_method("abmilx-anchor", model={"in_dim": 12, "n_classes": 2, "n_heads": 4, "dim": 16})
    assert method.anchor is not None  # on cached features it builds as before


# --- the paper's recipe ----------------------------------------------------------------------------------------
def test_paper_config_loads_holds_the_papers_values_and_cites_each():
    from pathlib import Path

    from wsimil_core.engine.config import load_config
    from wsimil_core.methods.abmilx.method import ABMILXOptions
    from wsimil_core.methods.abmilx.model import ABMILXConfig

    path = Path(__file__).parents[1] / "configs" / "abmilx_paper.yaml"
    cfg = load_config(path)
    t = cfg.train
    assert (t.optimizer, t.lr, t.weight_decay, t.epochs, t.scheduler) == ("adamw", 8e-5, 0.0, 75, "cosine")
    o = ABMILXOptions(**cfg.method.options)
    assert o.e2e and o.n_samples == 512 and o.scales == [1.0, 2.0] and o.scale_ratios == [3.0, 1.0]
    assert o.crop_scale == 0.25 and o.bn_mode == "sync"
    m = ABMILXConfig(**{"in_dim": 256, **cfg.model})
    assert (m.dim, m.n_heads, m.bias, m.attn_plus, m.attn_act) == (256, 8, False, True, "gelu")
    for line in path.read_text().splitlines():  # every value carries a comment saying where it comes from
        body = line.split("#")[0].rstrip()
        if body.endswith(":") or not body.strip() or body.strip() in ("targets: [label]", "device: auto"):
            continue
        if body.lstrip().startswith(("store:", "labels:", "output:")):
            continue
        assert "#" in line, f"no source comment: {line!r}"
