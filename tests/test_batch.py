"""Batch commands go on past one bad input (issue 17 item 4): each bad input is reported (file or slide, cause),
the others are done, the exit code is 1 at the end; ``--fail-fast`` stops at the first bad input. Slide ids
from non-ASCII file names are a stable transliteration or hash, never a refusal."""

from __future__ import annotations

import hashlib
import shutil
import warnings
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from wsimil_core.store.layout import is_name, safe_slide_id, slide_id_from_path
from wsimil_core.store.zarr_store import FeatureStore
from wsimil_core.wsi.writer import write_pyramid_tiff


def run_cli(args: list[str]) -> int:
    from wsimil_core.cli import main

    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


# --- slide ids -------------------------------------------------------------------------------------------------
def test_non_ascii_names_give_stable_ids_never_a_refusal():
    h = hashlib.sha1("名前".encode()).hexdigest()[:8]
    assert slide_id_from_path("/x/名前.tiff") == f"slide-{h}"
    assert slide_id_from_path("/y/名前.tiff") == slide_id_from_path("/x/名前.tiff")  # same id every time
    assert slide_id_from_path("名後.tiff") != slide_id_from_path("名前.tiff")
    assert safe_slide_id("café ünï") == "cafe_uni"  # transliterated where possible
    assert safe_slide_id("cafe\u0301") == safe_slide_id("caf\u00e9") == "cafe"  # NFD and NFC names agree
    # characters without an ASCII form are not silently dropped: a hash keeps "a名" and "a前" apart
    assert safe_slide_id("a名") != safe_slide_id("a前")
    assert safe_slide_id("a名").startswith("a-") and len(safe_slide_id("a名")) == 10
    assert safe_slide_id("///") == f"slide-{hashlib.sha1(b'///').hexdigest()[:8]}"
    assert safe_slide_id("TCGA-AB 12/3.svs") == "TCGA-AB_12_3.svs"  # ASCII names are unchanged
    for name in ("名前", "a名", "x" * 300 + "名", "///"):
        assert is_name(safe_slide_id(name)), name  # 1-200 safe characters


# --- import-h5 ---------------------------------------------------------------------------------------------------
def _h5(path: Path, feats: np.ndarray, n: int = 6) -> None:
    coords = np.stack([np.arange(n) * 256, np.zeros(n)], 1).astype(np.int64)
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=feats)
        f.create_dataset("coords", data=coords)


def _h5_folder(tmp_path: Path) -> Path:
    src = tmp_path / "h5"
    src.mkdir()
    good = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)
    bad = good.copy()
    bad[2, 1] = np.nan
    _h5(src / "a.h5", good)
    _h5(src / "b.h5", bad)
    _h5(src / "c.h5", good)
    return src


def test_import_h5_goes_on_past_a_file_with_nan_features(tmp_path, capsys):
    src = _h5_folder(tmp_path)
    assert run_cli(["import-h5", src, "--store", tmp_path / "st"]) == 1
    err = capsys.readouterr().err
    fs = FeatureStore(tmp_path / "st")
    assert fs.slide_ids() == ["a", "c"]  # before and after the bad one
    assert "b.h5" in err and "NaN" in err and "1 of 3" in err
    # fail fast: stops at b, c is not imported
    assert run_cli(["import-h5", src, "--store", tmp_path / "st2", "--fail-fast"]) == 1
    assert FeatureStore(tmp_path / "st2").slide_ids() == ["a"]
    assert "b.h5" in capsys.readouterr().err


def test_import_h5_api_reports_through_on_error(tmp_path):
    src = _h5_folder(tmp_path)
    fs = FeatureStore(tmp_path / "st", create=True)
    bad: dict[str, str] = {}
    ids = fs.import_h5(src, on_error=lambda path, exc: bad.setdefault(Path(path).name, str(exc)))
    assert ids == ["a", "c"] and list(bad) == ["b.h5"] and "NaN" in bad["b.h5"]


# --- tile -------------------------------------------------------------------------------------------------------
def _rgb() -> np.ndarray:
    """A white 1024 px square with a textured pink 'tissue' square in the middle."""
    rng = np.random.default_rng(1)
    img = np.full((1024, 1024, 3), 255, np.uint8)
    tex = rng.integers(-40, 40, size=(512, 512, 3), dtype=np.int16)
    img[256:768, 256:768] = np.clip(np.array([200, 90, 150], np.int16) + tex, 0, 255).astype(np.uint8)
    return img


def test_tile_reports_an_implausible_pixel_size_and_goes_on(tmp_path, capsys):
    dpi72 = write_pyramid_tiff(tmp_path / "dpi72.tif", _rgb(), 25400 / 72, levels=2, tile=128)  # 352.78 µm/px
    good = write_pyramid_tiff(tmp_path / "good.tif", _rgb(), 0.5, levels=2, tile=128)
    out = tmp_path / "grids"
    assert run_cli(["tile", dpi72, good, "--out", out, "--patch", "64"]) == 1
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert (out / "good.coords.npy").exists() and not (out / "dpi72.coords.npy").exists()
    assert "dpi72.tif" in text and "352.78" in text and "implausible" in text  # the warning, naming the file
    assert text.count("µm/px is implausible") == 1 and "--slide-mpp" in text  # once (open_slide), with the fix
    assert "1 of 2" in captured.err
    assert run_cli(["tile", dpi72, good, "--out", tmp_path / "ff", "--patch", "64", "--fail-fast"]) == 1
    assert not (tmp_path / "ff" / "good.coords.npy").exists()


# --- extract ---------------------------------------------------------------------------------------------------------
def test_extract_accepts_a_name_without_ascii_and_fail_fast_stops(tmp_path):
    from wsimil_core.features.encoders import RandomWeightsWarning, create_encoder
    from wsimil_core.features.extract import extract_cohort
    from wsimil_core.wsi.tiling import GridSpec, TissueParams

    kanji = write_pyramid_tiff(tmp_path / "名前.tiff", _rgb(), 0.5, levels=2, tile=128)
    plain = tmp_path / "plain.tiff"
    shutil.copy(kanji, plain)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        enc = create_encoder("resnet18")

    def run(slides, store, **kw):
        return extract_cohort(
            slides,
            store,
            "resnet18",
            GridSpec(mpp=2.0, patch=32, min_tissue=0.5),
            TissueParams(),
            device="cpu",
            progress=False,
            encoder=enc,
            num_workers=0,
            **kw,
        )

    sid = f"slide-{hashlib.sha1('名前'.encode()).hexdigest()[:8]}"
    summary = run([kanji, plain], tmp_path / "st")
    assert summary.done == [sid, "plain"] and not summary.failed
    again = run([kanji, plain], tmp_path / "st")  # same id next time: skipped, not redone
    assert again.skipped == [sid, "plain"]
    stopped = run([tmp_path / "missing.svs", kanji, plain], tmp_path / "st2", fail_fast=True)
    assert list(stopped.failed) == ["missing.svs"] and stopped.done == []
    assert "stopped" in str(stopped)


def test_cli_extract_fail_fast_flag(tmp_path, capsys):
    kanji = write_pyramid_tiff(tmp_path / "名前.tiff", _rgb(), 0.5, levels=2, tile=128)
    args = ["extract", tmp_path / "missing.svs", kanji, "--store", tmp_path / "st", "--mpp", "2", "--patch", "32"]
    args += ["--workers", "0", "--device", "cpu", "--no-progress", "--fail-fast"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert run_cli(args) == 1
    assert "missing.svs" in capsys.readouterr().err
    assert FeatureStore(tmp_path / "st").slide_ids() == []


# --- predict -------------------------------------------------------------------------------------------------------
D = 8
ENC = {"name": "toy", "encoder_id": "toy-abc123", "dim": D, "weights_sha256": "abc123" * 10}


def _damaged_store(tmp_path: Path) -> FeatureStore:
    rng = np.random.default_rng(0)
    fs = FeatureStore(tmp_path / "store", create=True)
    for i in range(5):
        n = 5 + i
        coords = np.stack([np.arange(n) * 256, np.zeros(n)], 1).astype(np.int64)
        enc = ENC if i != 3 else {**ENC, "encoder_id": "other-enc"}  # s3: no features of the checkpoint's encoder
        fs.write_bag(
            f"s{i}", rng.normal(size=(n, D)).astype(np.float32), coords, enc["encoder_id"], enc, patch_size_level0=256
        )
    chunk = next(
        p for p in (fs.root / "s1" / "features" / ENC["encoder_id"]).rglob("*") if p.is_file() and "c" in p.parts
    )
    data = chunk.read_bytes()
    chunk.write_bytes(data[: len(data) // 2])  # s1: a truncated feature chunk
    return fs


def _ckpt(tmp_path: Path) -> Path:
    import torch

    from wsimil_core.api import create_model
    from wsimil_core.engine.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = create_model("abmil", in_dim=D, n_classes=2, dim=16, attn_dim=8)
    path = tmp_path / "model.safetensors"
    meta = {"method": "abmil", "targets": ["tumour"], "class_names": {"tumour": ["no", "yes"]}, "encoder": ENC}
    save_checkpoint(path, model, meta)
    return path


def test_predict_goes_on_past_damaged_slides(tmp_path, capsys):
    fs = _damaged_store(tmp_path)
    ckpt = _ckpt(tmp_path)
    out = tmp_path / "preds.csv"
    args = ["predict", ckpt, "--store", fs.root, "--out", out, "--device", "cpu", "--no-progress"]
    assert run_cli(args) == 1
    err = capsys.readouterr().err
    assert pd.read_csv(out)["slide_id"].tolist() == ["s0", "s2", "s4"]
    assert "s1" in err and "damaged" in err  # the truncated chunk, by slide and cause
    assert "s3" in err and "toy-abc123" in err  # the missing encoder, by slide and cause
    assert "2 of 5" in err
    for sid in ("s0", "s2", "s4"):
        assert fs.map_ids(sid)
    # fail fast: the first bad slide stops the run, no CSV
    out2 = tmp_path / "preds2.csv"
    assert run_cli([*args[:5], out2, *args[6:], "--fail-fast"]) == 1
    assert not out2.exists()


def test_predict_store_api_collects_failures(tmp_path):
    from wsimil_core.errors import StoreError
    from wsimil_core.inference.predict import predict_store

    fs = _damaged_store(tmp_path)
    ckpt = _ckpt(tmp_path)
    with pytest.raises(StoreError):  # the library default stays: the first bad slide raises
        predict_store(ckpt, fs, device="cpu", progress=False)
    frame = predict_store(ckpt, fs, device="cpu", progress=False, fail_fast=False)
    assert frame["slide_id"].tolist() == ["s0", "s2", "s4"]
    assert sorted(frame.attrs["failed"]) == ["s1", "s3"]


def test_distributed_extract_fail_fast_cancels_the_rest(tmp_path):
    distributed = pytest.importorskip("distributed")
    from wsimil_core.features.distributed import extract_cohort_distributed
    from wsimil_core.features.encoders import RandomWeightsWarning
    from wsimil_core.wsi.tiling import GridSpec, TissueParams

    slides = [write_pyramid_tiff(tmp_path / f"{n}.tif", _rgb(), 0.5, levels=2, tile=128) for n in "abc"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cluster = distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0")
        client = distributed.Client(cluster)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RandomWeightsWarning)
            summary = extract_cohort_distributed(
                [tmp_path / "missing.svs", *slides],
                tmp_path / "st",
                "resnet18",
                GridSpec(mpp=2.0, patch=32, min_tissue=0.5),
                TissueParams(),
                client=client,
                device="cpu",
                batch_size=16,
                progress=False,
                fail_fast=True,
            )
    finally:
        client.close()
        cluster.close()
    assert summary.stopped and list(summary.failed) == ["missing.svs"]
    assert "c" not in summary.done  # the tasks after the failure were cancelled
