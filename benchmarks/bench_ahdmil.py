"""AHDMIL benchmark: end-to-end slide inference with DB-LIPN pre-screening vs. encoding every patch.

On a demo cohort (``wsimil_core.demo.make_demo_cohort``): extract features (same encoder for everything), train
AHDMIL through the engine on the training patients (step 1 self-distillation, step 2 asymmetric distillation,
DMIN fine-tuning), then predict every held-out slide from its slide file twice in one run with the same encoder:

* ``prescreen``: DB-LIPN scores low-resolution patches; only kept patches are read at high resolution and encoded;
* ``full``: every patch is read at high resolution and encoded (the baseline).

Prints per-mode wall-clock time (read + encode + classify, tissue detection included) and process CPU time (less
sensitive to other jobs on a shared machine), speed-up, kept fraction and AUC side by side. ``--heads cka,linear`` also trains a linear-head DMIN and compares AUCs on cached features.

Small defaults run in a few minutes on a 2-core CPU:

    .venv/bin/python benchmarks/bench_ahdmil.py
    .venv/bin/python benchmarks/bench_ahdmil.py --slides 48 --size 4096 --device cuda   # fuller run
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch


def auc(y: np.ndarray, p: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, p)) if len(set(y.tolist())) == 2 else float("nan")


def train_run(work: Path, store: Path, labels: Path, head: str, args) -> Path:
    from wsimil_core.engine.trainer import train

    config = {
        "method": {"name": "ahdmil", "options": {"target_keep": args.target_keep}},
        "model": {"head": head, "dim": args.dim, "cka_degree": args.degree},
        "data": {"store": str(store), "labels": str(labels), "split": {"kind": "column", "column": "split"}},
        "train": {
            "epochs": 1,
            "phase_epochs": {
                "self_distill": args.epochs,
                "prescreen": args.epochs,
                "finetune": max(1, args.epochs // 2),
            },
            "lr": args.lr,
            "device": args.device,
            "seed": args.seed,
        },
        "output": {"dir": str(work / f"run_{head}"), "progress": False, "overwrite": True},
    }
    result = train(config)
    return Path(result.last_checkpoint)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slides", type=int, default=24, help="demo slides (half train, half held out)")
    ap.add_argument("--size", type=int, default=3072, help="demo slide width in px (0.5 µm/px)")
    ap.add_argument("--encoder", default="resnet18", help="patch encoder (random init unless --weights)")
    ap.add_argument("--weights", default=None, help="local encoder weights file")
    ap.add_argument("--mpp", type=float, default=0.5)
    ap.add_argument("--patch", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=15, help="epochs of steps 1 and 2 (fine-tuning: half)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--dim", type=int, default=128, help="DMIN width (model.dim)")
    ap.add_argument("--degree", type=int, default=12)
    ap.add_argument("--target-keep", type=float, default=0.6)
    ap.add_argument("--heads", default="cka,linear", help="comma-separated heads to train (cka, linear)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--workdir", default=None, help="keep files here (default: a temporary folder)")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    from wsimil_core.demo import make_demo_cohort
    from wsimil_core.features.encoders import RandomWeightsWarning, create_encoder
    from wsimil_core.features.extract import extract_cohort
    from wsimil_core.inference.pipeline import LoadedCheckpoint, predict_slide
    from wsimil_core.inference.predict import predict_store
    from wsimil_core.wsi.tiling import GridSpec, TissueParams

    warnings.simplefilter("ignore", RandomWeightsWarning)
    tmp = tempfile.TemporaryDirectory() if args.workdir is None else None
    work = Path(args.workdir or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    cohort = make_demo_cohort(work / "demo", n_slides=args.slides, size=args.size, seed=args.seed, progress=False)
    labels = pd.read_csv(cohort.labels_csv, dtype={"slide_id": str, "patient_id": str})
    patients = sorted(labels["patient_id"].unique())
    held = set(patients[len(patients) // 2 :])
    labels["split"] = ["test" if p in held else "train" for p in labels["patient_id"]]
    # a validation slide per class from the training patients keeps the engine's model selection meaningful
    for cls in (0, 1):
        rows = labels.index[(labels["split"] == "train") & (labels["label"] == cls)]
        if len(rows) > 1:
            labels.loc[rows[0], "split"] = "val"
    labels_csv = work / "labels_split.csv"
    labels.to_csv(labels_csv, index=False)
    encoder = create_encoder(args.encoder, weights=args.weights, device=args.device)
    store = work / "store.zarr"
    extract_cohort(
        cohort.slides,
        store,
        args.encoder,
        GridSpec(mpp=args.mpp, patch=args.patch),
        TissueParams(),
        weights=args.weights,
        device=args.device,
        num_workers=0,
        progress=False,
        encoder=encoder,
    )
    print(f"cohort + extraction: {time.perf_counter() - t0:.1f}s ({len(cohort.slides)} slides)")

    test = labels[labels["split"] == "test"]
    y = test["label"].to_numpy()
    head_rows = []
    ckpts = {}
    for head in [h.strip() for h in args.heads.split(",") if h.strip()]:
        t = time.perf_counter()
        ckpts[head] = train_run(work, store, labels_csv, head, args)
        frame = predict_store(
            ckpts[head], store, slide_ids=list(test["slide_id"]), device=args.device, write_maps=False, progress=False
        ).set_index("slide_id")
        head_rows.append(
            (head, auc(y, frame.loc[test["slide_id"], "label_prob_1"].to_numpy()), time.perf_counter() - t)
        )
    print("\nDMIN head comparison (wsimil predict: pre-screened, cached features; held-out slides):")
    print(f"{'head':8s} {'AUC':>6s} {'train s':>8s}")
    for head, a, secs in head_rows:
        print(f"{head:8s} {a:6.3f} {secs:8.1f}")

    ckpt = ckpts.get("cka") or next(iter(ckpts.values()))
    runs = {
        mode: LoadedCheckpoint(ckpt, args.device, encoder=encoder, prescreen=mode == "prescreen")
        for mode in ("prescreen", "full")
    }
    paths = {p.stem: p for p in cohort.slides}
    # warm-up (first-call allocations, file cache) so neither mode pays it
    predict_slide(runs["prescreen"], paths[test["slide_id"].iloc[0]])
    results = {}
    for mode in ("prescreen", "full"):
        probs, times, kept, stage, cpu = [], [], [], {}, 0.0
        for sid in test["slide_id"]:
            c0 = time.process_time()
            pred = predict_slide(runs[mode], paths[sid])
            cpu += time.process_time() - c0
            probs.append(pred.probs["label"][1])
            times.append(pred.timings["total"])
            kept.append(pred.info["kept_fraction"])
            for k, v in pred.timings.items():
                stage[k] = stage.get(k, 0.0) + v
        results[mode] = {
            "auc": auc(y, np.array(probs)),
            "time": float(np.sum(times)),
            "kept": float(np.mean(kept)),
            "stages": stage,
            "cpu": cpu,
        }
    p, f = results["prescreen"], results["full"]
    print(f"\nEnd-to-end slide inference on {len(test)} held-out slides, encoder {args.encoder}, device {args.device}:")
    print(f"{'':22s} {'pre-screened':>13s} {'every patch':>12s}")
    print(f"{'total time (s)':22s} {p['time']:13.2f} {f['time']:12.2f}")
    for k in ("tissue", "prescreen_read", "prescreen", "read_encode", "classify"):
        print(f"{'  ' + k + ' (s)':22s} {p['stages'].get(k, 0):13.2f} {f['stages'].get(k, 0):12.2f}")
    print(f"{'process CPU time (s)':22s} {p['cpu']:13.2f} {f['cpu']:12.2f}")
    print(f"{'kept fraction':22s} {p['kept']:13.2f} {f['kept']:12.2f}")
    print(f"{'AUC':22s} {p['auc']:13.3f} {f['auc']:12.3f}")
    print(
        f"speed-up (every patch / pre-screened): {f['time'] / max(p['time'], 1e-9):.2f}x wall-clock, "
        f"{f['cpu'] / max(p['cpu'], 1e-9):.2f}x CPU time"
    )
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
