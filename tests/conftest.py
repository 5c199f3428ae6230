"""Shared test fixtures. Real files live in ../shared/fixtures (skipped when absent)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch._dynamo  # noqa: F401  (loads triton before any Qt/OpenGL context: see below)

# triton bundles its own LLVM; loading it after Mesa's llvmpipe OpenGL driver (Xvfb) segfaults the process.
# In-process training in GUI tests imports it through torch._dynamo, so load it first, whatever the test order.
# (The plugin itself hides triton from torch inside napari: napari_wsimil._inference.preload.)

SHARED_FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"


def pytest_collection_modifyitems(config, items):
    """``slow`` tests are opt-in: they run only when the marker expression names them (``pytest -m slow``)."""
    if "slow" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="opt-in heavy run: pytest -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """``../shared/fixtures``; tests that need it skip with a clear reason when it is absent."""
    if not SHARED_FIXTURES.is_dir():
        pytest.skip(f"shared fixtures not found at {SHARED_FIXTURES} (a user's clone has no ../shared)")
    return SHARED_FIXTURES


# --- synthetic MIL cohort (training engine, issue 3) -----------------------------------------------------
from typing import NamedTuple  # noqa: E402


class SyntheticCohort(NamedTuple):
    """Paths of the tiny learnable cohort built by the ``synthetic_store`` fixture."""

    root: Path  # the temporary folder holding everything
    store: Path  # zarr feature store (one group per slide)
    labels: Path  # CSV: slide_id,label,task_b,task_c,patient_id
    omics: Path  # CSV: slide_id + g00..g49 (g00..g04 correlated with ``label``)
    encoder_id: str
    in_dim: int
    slide_ids: list


def build_synthetic_cohort(root: Path, n_bags: int = 24, dim: int = 32, seed: int = 0) -> SyntheticCohort:
    """Write a tiny learnable MIL cohort under ``root`` (also usable outside pytest).

    Every bag holds 20-60 patches of Gaussian noise ``[N, dim]`` on a 16x16 grid of 256-px cells.
    ``label`` (0/1, balanced, constant per patient): positive bags hold 4-8 patches shifted by +3 on
    dims 0-3. ``task_b`` (0/1, ~30 % positive): 4-8 patches shifted on dims 4-7. ``task_c`` ("high"/"low",
    ~25 % "high"): 4-8 patches shifted on dims 8-11. Slides 0..15 belong to 8 two-slide patients, the rest to
    one patient each (16 patients). The omics table has 50 columns; g00..g04 are ``label`` + noise.
    """
    import numpy as np
    import pandas as pd

    from wsimil_core.store.zarr_store import FeatureStore

    rng = np.random.default_rng(seed)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    store_path = root / "store.zarr"
    store = FeatureStore(store_path, create=True)
    encoder_id = "synthetic"
    encoder_attrs = {
        "name": "synthetic",
        "weights_sha256": "random-init",
        "dim": dim,
        "input_size": 256,
        "mean": [0.0, 0.0, 0.0],
        "std": [1.0, 1.0, 1.0],
        "mpp": 0.5,
    }
    patients = [f"P{i // 2:02d}" for i in range(16)] + [f"P{8 + i:02d}" for i in range(n_bags - 16)]
    unique_patients = sorted(set(patients))
    patient_label = {p: i % 2 for i, p in enumerate(unique_patients)}
    rows, omics_rows, slide_ids = [], [], []
    for i in range(n_bags):
        sid = f"slide_{i:02d}"
        label = patient_label[patients[i]]
        task_b = int(rng.random() < 0.3)
        task_c = "high" if rng.random() < 0.25 else "low"
        n = int(rng.integers(20, 61))
        feats = rng.normal(0.0, 1.0, size=(n, dim)).astype(np.float32)
        for flag, axes in ((label == 1, slice(0, 4)), (task_b == 1, slice(4, 8)), (task_c == "high", slice(8, 12))):
            if flag:
                k = int(rng.integers(4, 9))
                idx = rng.choice(n, size=k, replace=False)
                feats[idx, axes] += 3.0
        cells = rng.choice(16 * 16, size=n, replace=False)
        coords = np.stack([(cells % 16) * 256, (cells // 16) * 256], axis=1).astype(np.int64)
        store.write_bag(
            sid,
            feats,
            coords,
            encoder_id,
            encoder_attrs=encoder_attrs,
            patch_size=256,
            patch_size_level0=256,
            stride_level0=256,
            patch_mpp=0.5,
            slide_mpp=0.5,
            grid_origin=[0, 0],
            level0_size=[16 * 256, 16 * 256],
        )
        rows.append({"slide_id": sid, "label": label, "task_b": task_b, "task_c": task_c, "patient_id": patients[i]})
        omics = rng.normal(0.0, 1.0, size=50)
        omics[:5] += 1.5 * label
        omics_rows.append({"slide_id": sid, **{f"g{j:02d}": float(v) for j, v in enumerate(omics)}})
        slide_ids.append(sid)
    labels_path = root / "labels.csv"
    pd.DataFrame(rows).to_csv(labels_path, index=False)
    omics_path = root / "omics.csv"
    pd.DataFrame(omics_rows).to_csv(omics_path, index=False)
    return SyntheticCohort(root, store_path, labels_path, omics_path, encoder_id, dim, slide_ids)


@pytest.fixture(scope="session")
def synthetic_store(tmp_path_factory) -> SyntheticCohort:
    """A tiny learnable cohort (24 bags, D=32) in a feature store, with labels and omics CSVs."""
    return build_synthetic_cohort(tmp_path_factory.mktemp("synthetic_cohort"))


# --- demo cohort (store / demo helper, issue 2) -----------------------------------------------------------
@pytest.fixture(scope="session")
def demo_cohort(tmp_path_factory) -> Path:
    """A tiny demo cohort (6 slides of 2048 x 1536 px, seed 0): the folder with ``demo_*.tiff``,
    ``demo_*.lesions.geojson``, ``labels.csv`` (label, task_b, task_c, patient_id) and ``omics.csv``."""
    from wsimil_core.demo import make_demo_cohort

    out = tmp_path_factory.mktemp("demo_cohort")
    make_demo_cohort(out, n_slides=6, size=2048, seed=0, progress=False)
    return out


# --- one torch thread (shared by the model / training tests) ----------------------------------------------
import contextlib  # noqa: E402


@contextlib.contextmanager
def single_torch_thread():
    """One intra-op torch thread inside the block (tiny tensors run fastest so on the shared CPU); restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def torch_one_thread():
    """One torch thread for one test: ``pytestmark = pytest.mark.usefixtures("torch_one_thread")``."""
    with single_torch_thread():
        yield


@pytest.fixture(scope="module")
def torch_one_thread_module():
    """One torch thread for a whole test module (set up before its module-scoped fixtures when listed first)."""
    with single_torch_thread():
        yield


@pytest.fixture
def gui(qtbot):
    """pytest-qt's ``qtbot`` for a test that builds Qt widgets; skipped without a display or Qt."""
    from _helpers import NO_DISPLAY_REASON, display_available

    if not display_available():
        pytest.skip(NO_DISPLAY_REASON)
    pytest.importorskip("qtpy")
    return qtbot


@pytest.fixture
def extend_widget(gui):
    """The MECDS extend dock (``ExtendWidget``) without a viewer; skipped without a display or Qt."""
    from napari_wsimil._extend_widget import ExtendWidget

    widget = ExtendWidget(None)
    gui.addWidget(widget)
    return widget
