"""AHDMIL benchmark: the deployed pipeline (DB-LIPN pre-screening -> DMIN on the kept patches) at several keep
targets vs. no pre-screening (every patch read at high resolution, encoded and classified), in one run.

On a demo cohort (``wsimil_core.demo.make_demo_cohort``): extract features (one encoder for everything), train
one AHDMIL run per keep target ``rho`` (``method.options.target_keep``) through the engine on the training
patients (self-distillation, asymmetric distillation, fine-tuning), then predict every held-out slide from its
slide file with each checkpoint twice: ``pre-screened`` (low-resolution twins -> DB-LIPN -> only kept patches read
at high resolution and encoded -> DMIN) and ``every patch`` (no pre-screening). The modes run in interleaved
trials (every trial runs every mode once, in a shuffled order), so machine load hits all modes alike.

Printed per mode, side by side: held-out AUC, accuracy, macro F1 and Brier score (at the checkpoint's
validation threshold; identical across trials), the kept fraction, and the median over trials of the wall time
and of the process CPU time for all held-out slides (tissue detection, reads, DB-LIPN, encoding, DMIN).

Small defaults run in a few minutes on a 2-core CPU (``tiny`` DB-LIPN branches; the authors' MobileNetV4
branches are ``--prescreen-arch timm:mobilenetv4_conv_small --factor 16``, slow on CPU):

    .venv/bin/python benchmarks/bench_ahdmil.py --threads 1
    .venv/bin/python benchmarks/bench_ahdmil.py --slides 48 --size 4096 --device cuda \
        --prescreen-arch timm:mobilenetv4_conv_small --factor 16 --trials 5          # fuller run
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch


def train_run(work: Path, store: Path, labels: Path, keep: float, args) -> Path:
    from wsimil_core.engine.trainer import train

    config = {
        "method": {"name": "ahdmil", "options": {"target_keep": keep}},
        "model": {
            "dim": args.dim,
            "attn_dim": args.dim // 2,
            "cka_degree": args.degree,
            "prescreen_arch": args.prescreen_arch,
            "prescreen_factor": args.factor,
        },
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
        "output": {"dir": str(work / f"run_keep{keep:g}"), "progress": False, "overwrite": True},
    }
    return Path(train(config).best_checkpoint)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slides", type=int, default=16, help="demo slides (half train, half held out)")
    ap.add_argument("--size", type=int, default=2560, help="demo slide width in px (0.5 µm/px)")
    ap.add_argument("--encoder", default="resnet18", help="patch encoder (random init unless --weights)")
    ap.add_argument("--weights", default=None, help="local encoder weights file")
    ap.add_argument("--mpp", type=float, default=0.5)
    ap.add_argument("--patch", type=int, default=224)
    ap.add_argument("--keeps", default="0.4,0.6,0.8", help="keep targets rho, one trained run each")
    ap.add_argument("--trials", type=int, default=3, help="interleaved timing trials")
    ap.add_argument("--epochs", type=int, default=12, help="epochs of steps 1 and 2 (fine-tuning: half)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--dim", type=int, default=64, help="DMIN width (model.dim)")
    ap.add_argument("--degree", type=int, default=12)
    ap.add_argument("--prescreen-arch", default="tiny", help="DB-LIPN branches: tiny or timm:<name>")
    ap.add_argument("--factor", type=float, default=4.0, help="low-resolution factor (16: 20x -> 1.25x)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--workdir", default=None, help="keep files here (default: a temporary folder)")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    from wsimil_core.demo import make_demo_cohort
    from wsimil_core.engine.metrics import compute_metrics
    from wsimil_core.features.encoders import RandomWeightsWarning, create_encoder
    from wsimil_core.features.extract import extract_cohort
    from wsimil_core.inference.loaded import LoadedCheckpoint
    from wsimil_core.inference.pipeline import predict_slide
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
    for cls in (0, 1):  # a validation slide per class from the training patients (threshold, best epoch)
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

    keeps = [float(k) for k in args.keeps.split(",") if k.strip()]
    ckpts = {}
    for keep in keeps:
        t = time.perf_counter()
        ckpts[keep] = train_run(work, store, labels_csv, keep, args)
        print(f"trained keep target {keep:g}: {time.perf_counter() - t:.1f}s")

    test = labels[labels["split"] == "test"]
    y = test["label"].to_numpy()
    paths = {p.stem: p for p in cohort.slides}
    modes = [(keep, screen) for keep in keeps for screen in (True, False)]
    runs = {m: LoadedCheckpoint(ckpts[m[0]], args.device, encoder=encoder, prescreen=m[1]) for m in modes}
    predict_slide(runs[modes[0]], paths[test["slide_id"].iloc[0]])  # warm-up (allocations, file cache)
    wall: dict[tuple[float, bool], list[float]] = {m: [] for m in modes}
    cpu: dict[tuple[float, bool], list[float]] = {m: [] for m in modes}
    probs: dict[tuple[float, bool], np.ndarray] = {}
    kept: dict[tuple[float, bool], float] = {}
    order_rng = random.Random(args.seed)
    for _ in range(args.trials):
        order = list(modes)
        order_rng.shuffle(order)
        for m in order:
            c0, w0 = time.process_time(), time.perf_counter()
            preds = [predict_slide(runs[m], paths[sid]) for sid in test["slide_id"]]
            wall[m].append(time.perf_counter() - w0)
            cpu[m].append(time.process_time() - c0)
            probs[m] = np.array([p.probs["label"] for p in preds])
            kept[m] = float(np.mean([p.info["kept_fraction"] for p in preds]))

    print(
        f"\nHeld-out slides: {len(test)} ({int(y.sum())} positive), encoder {args.encoder}, DB-LIPN "
        f"{args.prescreen_arch} at factor {args.factor:g}, device {args.device}, {args.trials} interleaved trials"
    )
    head = f"{'keep target':>11s} {'mode':>13s} {'kept':>5s} {'AUC':>6s} {'acc':>6s} {'F1':>6s} {'Brier':>6s}"
    print(head + f" {'wall s':>7s} {'CPU s':>7s} {'speed-up':>8s}")
    for keep in keeps:
        full_wall = float(np.median(wall[(keep, False)]))
        for screen in (True, False):
            m = (keep, screen)
            threshold = runs[m].meta.tasks["label"].threshold.value
            met = compute_metrics(y, probs[m], threshold)
            w = float(np.median(wall[m]))
            print(
                f"{keep:11.1f} {'pre-screened' if screen else 'every patch':>13s} {kept[m]:5.2f} {met['auc']:6.3f} "
                f"{met['accuracy']:6.3f} {met['f1_macro']:6.3f} {met['brier']:6.3f} {w:7.2f} "
                f"{float(np.median(cpu[m])):7.2f} {full_wall / max(w, 1e-9):7.2f}x"
            )
    print("(wall / CPU s: median over trials for all held-out slides; speed-up: every patch / this mode, same run)")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
