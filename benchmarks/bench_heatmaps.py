"""Heatmaps from cached features, per model (issue 15 goal 6): "Run" in the napari inference dock -> the first
visible map, for ``--patches`` patches whose features the store already holds.

For each model (random weights; the weights do not change the speed) one run prints, side by side (seconds,
median of ``--trials`` interleaved trials):

* ``before``: the same as ``napari`` with the code before issue 15 swapped in (:class:`Before`);
* ``napari``: ``napari_wsimil._inference.run_inference`` until its first update with maps, then those maps added
  to a headless viewer (``MapLayerSet(primary_only=True).update``, as the dock: the primary map's layer, the
  one a canvas draws first; the other maps are layers on demand); the checkpoint loaded from its file;
* ``re-run``: the same on another slide's features right after (the dock keeps the checkpoint loaded);
* ``predict``: ``predict_store`` on the same store and slide (``wsimil predict``: features, model, maps written);
* ``forward``: the bare model forward on the features already in memory as a float32 tensor (the floor).

Goal: ``napari`` < 2 s at 100k patches on CPU for every model whose compute is linear in N: ABMIL, ASMIL, MoMKD
and AHDMIL's DMIN (run with ``prescreen=False``: its default pre-screening reads the slide's pixels). MECDS is not
linear (its TSA layers are self-attention of the patches over the patches: quadratic compute, linear memory);
give it with ``--models`` at a smaller ``--patches``. ABMILX (A+ is global attention, quadratic in N) has its own
table: ``--abmilx-n 10000,50000,100000`` times its bare forward per N (the fastest exact attention kernel,
``functional.attention_plus``), with ``--abmilx-napari`` through the dock too.

    PYTHONPATH=src python benchmarks/bench_heatmaps.py --patches 100000 --trials 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

LINEAR = ("abmil", "asmil", "momkd", "ahdmil")
#: predictor options per model: AHDMIL's DMIN on every cached feature (its default pre-screening reads pixels)
OPTIONS = {"ahdmil": {"prescreen": False}}


def make_slide(path: Path, side: int) -> Path:
    from wsimil_core.wsi.writer import write_pyramid_tiff

    rng = np.random.default_rng(0)
    rgb = rng.integers(120, 230, size=(side, side, 3), dtype=np.uint8)
    return write_pyramid_tiff(path, rgb, mpp=0.5, levels=2, tile=256)


def make_store(root: Path, slide: Path, side: int, n: int, dim: int) -> dict:
    """A store holding ``n`` float16 features of ``dim`` for ``slide`` on a square grid; returns the encoder attrs."""
    from wsimil_core.store.zarr_store import FeatureStore, slide_fingerprint

    per_row = int(np.ceil(np.sqrt(n)))
    size0 = max(1, side // per_row)
    cells = np.arange(n)
    coords = np.stack([(cells % per_row) * size0, (cells // per_row) * size0], 1).astype(np.int64)
    enc = {
        "name": "bench",
        "encoder_id": "bench",
        "dim": dim,
        "weights_sha256": "random-init",
        "patch_mpp": 0.5 * size0 / 256,
        "patch_size": 256,
        "patch_size_level0": size0,
        "stride_level0": size0,
    }
    feats = np.random.default_rng(0).normal(size=(n, dim)).astype(np.float16)
    FeatureStore(root, create=True).write_bag(
        slide.stem,
        feats,
        coords,
        "bench",
        encoder_attrs=enc,
        slide_path=str(slide),
        slide_mpp=0.5,
        patch_mpp=enc["patch_mpp"],
        patch_size=256,
        patch_size_level0=size0,
        stride_level0=size0,
        grid_origin=[0, 0],
        level0_size=[side, side],
        **slide_fingerprint(slide),
    )
    return enc


def make_checkpoint(name: str, dim: int, enc: dict, out: Path) -> tuple[Path, torch.nn.Module]:
    from wsimil_core.api import create_model
    from wsimil_core.engine.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = create_model(name, in_dim=dim, n_classes=2).eval()
    path = out / f"{name}.safetensors"
    save_checkpoint(path, model, {"method": name, "encoder": enc, "class_names": {"label": ["0", "1"]}})
    return path, model


def scatter_gatv2(layer, x: torch.Tensor, neighbors: torch.Tensor) -> torch.Tensor:
    """MoMKD's GATv2 layer as it ran before issue 15: torch_geometric's scatter-based ``GATv2Conv`` (same weights)
    on the graph as an edge list."""
    from torch_geometric.nn import GATv2Conv

    conv = getattr(layer, "_bench_pyg", None)
    if conv is None:
        conv = GATv2Conv(layer.in_dim, layer.head_dim, heads=layer.n_heads, dropout=layer.dropout)
        conv.load_state_dict(layer.state_dict())
        layer._bench_pyg = conv.eval()
    n, k = neighbors.shape
    edge_index = torch.stack([neighbors.reshape(-1), torch.arange(n).repeat_interleave(k)])
    return conv(x, edge_index)


class Before:
    """Context manager: the dock's path as it was before issue 15 (numpy float16 -> float32 of the cached features,
    a dict of cells for the hover lookup, MoMKD's GATv2 through torch_geometric), swapped in for the ``before``
    column."""

    def __enter__(self) -> Before:
        from napari_wsimil._grid import PatchLookup
        from wsimil_core.inference.features import CachedFeatures
        from wsimil_core.nn.gatv2 import GATv2Layer

        self.saved = (CachedFeatures.__call__, PatchLookup.__init__, PatchLookup.patch_at, GATv2Layer.forward)
        GATv2Layer.forward = scatter_gatv2

        def call(src, index=None):
            if src._values is None:
                src._values = np.asarray(src.fs.read_bag(src.slide_id, src.encoder_id).features, dtype=np.float32)
            return src._values if index is None else src._values[np.asarray(index, dtype=np.int64)]

        def init(lookup, geometry, coords):
            lookup.geometry = geometry.with_coords(coords)
            lookup.coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
            idx = lookup.geometry.cell_index(lookup.coords)
            lookup._cells = {(int(c), int(r)): i for i, (c, r) in enumerate(idx)}
            lookup.maps, lookup.specs = {}, {}

        CachedFeatures.__call__ = call
        PatchLookup.__init__ = init
        return self

    def __exit__(self, *exc: object) -> None:
        from napari_wsimil._grid import PatchLookup
        from wsimil_core.inference.features import CachedFeatures
        from wsimil_core.nn.gatv2 import GATv2Layer

        CachedFeatures.__call__, PatchLookup.__init__, PatchLookup.patch_at, GATv2Layer.forward = self.saved


def napari_first_map(ckpt: Path, slide: Path, store: Path, options: dict | None = None, rerun: bool = False) -> float:
    """Seconds from "Run" to the first map on a headless viewer; ``rerun``: the checkpoint is still loaded from the
    previous run (the dock keeps it), else it is loaded from its file as on the first run."""
    from napari.components import ViewerModel

    import wsimil_core.api as api
    from napari_wsimil._inference import LOADED_CHECKPOINT, InferenceRequest, run_inference

    if not rerun:
        LOADED_CHECKPOINT.clear()
    from napari_wsimil._viewer import MapLayerSet
    from wsimil_core.inference.predict import load_predictor

    api.load_predictor = lambda *a, **kw: load_predictor(*a, **kw, **(options or {}))  # the dock's loader
    viewer = ViewerModel()
    t0 = time.perf_counter()
    maps_view = MapLayerSet(viewer, primary_only=True)  # as the dock's run_layer_set: the primary map's layer
    for update in run_inference(InferenceRequest(ckpt, slide, device="cpu", store=store)):
        if update.maps:
            maps_view.update(update.maps, update.geometry, update.coords)
            break
    took = time.perf_counter() - t0
    api.load_predictor = load_predictor
    return took


def predict(ckpt: Path, store: Path, options: dict | None = None) -> float:
    from wsimil_core.inference.predict import load_predictor, predict_store

    t0 = time.perf_counter()
    predict_store(load_predictor(str(ckpt), "cpu", **(options or {})), store, device="cpu", progress=False)
    return time.perf_counter() - t0


@torch.inference_mode()
def bare_forward(model: torch.nn.Module, x: torch.Tensor, coords: torch.Tensor | None = None) -> float:
    t0 = time.perf_counter()
    model(x, coords=coords)
    return time.perf_counter() - t0


@torch.inference_mode()
def kernels(model: torch.nn.Module, trials: int, n: int = 10_000) -> None:
    """A+ of one head at ``n`` patches: the kernel ``attention_plus`` uses (flash attention, the value column
    zero-padded to the head size) vs. the same call with the 1-column value (SDPA falls back to its math kernel,
    which materialises ``[N, N]``), and the largest difference between the two."""
    import torch.nn.functional as F

    from wsimil_core.functional.attention_plus import attention_plus

    d_h = int(model.config.dim) // int(model.config.n_heads)
    g = torch.Generator().manual_seed(0)
    q, k, a = (torch.randn(1, 1, n, c, generator=g) for c in (d_h, d_h, 1))
    t_flash = min(bare_call(lambda: attention_plus(q, k, a, 1.0)) for _ in range(trials))
    t_math = min(bare_call(lambda: a + F.scaled_dot_product_attention(q, k, a)) for _ in range(trials))
    diff = float((attention_plus(q, k, a, 1.0) - (a + F.scaled_dot_product_attention(q, k, a))).abs().max())
    print(
        f"A+ kernel, one head of {d_h} dims, N = {n}: flash (padded value) {t_flash:.3f} s, "
        f"math (1-column value, [N, N]) {t_math:.3f} s; max |difference| {diff:.2e}"
    )


def bare_call(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patches", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--models", default=",".join(LINEAR))
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--abmilx-n", default="", help="comma list of N for the ABMILX table, e.g. 10000,50000,100000")
    ap.add_argument("--abmilx-napari", action="store_true", help="also time ABMILX through the dock at each N")
    args = ap.parse_args()

    from wsimil_core.devices import apply_thread_policy, available_cores

    threads = apply_thread_policy(0)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    warnings.simplefilter("ignore")
    tmp = Path(tempfile.mkdtemp(prefix="bench_heatmaps_"))
    side = 4096
    slide = make_slide(tmp / "slide.tiff", side)
    print(
        f"{args.patches} patches x {args.dim} dims (float16 in the store), CPU, torch {torch.__version__}, "
        f"{threads} threads, {available_cores()} cores, load average {os.getloadavg()[0]:.1f} at start; "
        f"median of {args.trials} interleaved trials"
    )
    if models:
        enc = make_store(tmp / "store", slide, side, args.patches, args.dim)
        from wsimil_core.store.zarr_store import FeatureStore

        bag = FeatureStore(tmp / "store").read_bag(slide.stem)
        x, coords = torch.from_numpy(bag.features.astype(np.float32)), torch.from_numpy(bag.coords)
        ckpts = {m: make_checkpoint(m, args.dim, enc, tmp) for m in models}
        for m, (path, _) in ckpts.items():  # warm-up: imports, first-call allocations
            napari_first_map(path, slide, tmp / "store", OPTIONS.get(m))
        keys = ("before", "napari", "re-run", "predict", "forward")
        times: dict[str, dict[str, list[float]]] = {m: {k: [] for k in keys} for m in models}
        for _ in range(args.trials):
            for m, (path, model) in ckpts.items():
                opts = OPTIONS.get(m)
                with Before():
                    times[m]["before"].append(napari_first_map(path, slide, tmp / "store", opts))
                times[m]["napari"].append(napari_first_map(path, slide, tmp / "store", opts))
                times[m]["re-run"].append(napari_first_map(path, slide, tmp / "store", opts, rerun=True))
                times[m]["predict"].append(predict(path, tmp / "store", opts))
                times[m]["forward"].append(bare_forward(model, x, coords))
        print(
            f"{'model':<8} {'before (s)':>11} {'napari (s)':>11} {'re-run (s)':>11} {'predict (s)':>12} "
            f"{'forward (s)':>12} {'napari/fwd':>11} {'< 2 s':>6}"
        )
        for m in models:
            med = {k: statistics.median(v) for k, v in times[m].items()}
            ok = "yes" if med["napari"] < 2 else ("re-run" if med["re-run"] < 2 else "NO")
            print(
                f"{m:<8} {med['before']:>11.3f} {med['napari']:>11.3f} {med['re-run']:>11.3f} {med['predict']:>12.3f} "
                f"{med['forward']:>12.3f} {med['napari'] / med['forward']:>10.1f}x {ok:>6}"
            )
    if args.abmilx_n:
        from wsimil_core.api import create_model

        torch.manual_seed(0)
        model = create_model("abmilx", in_dim=args.dim, n_classes=2).eval()
        kernels(model, args.trials)
        print(f"\nABMILX (A+ global attention), bare forward, dim {args.dim}; fastest of {args.trials}")
        print(f"{'N':>8} {'forward (s)':>12}" + (f" {'napari (s)':>11}" if args.abmilx_napari else ""))
        for n in [int(v) for v in args.abmilx_n.split(",") if v.strip()]:
            xn = torch.randn(n, args.dim)
            fwd = min(bare_forward(model, xn) for _ in range(args.trials))
            line = f"{n:>8} {fwd:>12.3f}"
            if args.abmilx_napari:
                store = tmp / f"store_abmilx_{n}"
                enc = make_store(store, slide, side, n, args.dim)
                path, _ = make_checkpoint("abmilx", args.dim, enc, tmp)
                line += f" {napari_first_map(path, slide, store):>11.3f}"
            print(line, flush=True)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
