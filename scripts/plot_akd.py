"""Plot MECDS' distillation losses against the student's positive probability (docs/images/mecds_akd.png).

One panel per teacher probability p_hat (0.1: below the margin alpha = 0.2, so omega_- = 0; 0.5; 0.9). Curves:
AKD as written (Eq. 1-2, the default), the label-gated variant for a positive and a negative bag, and plain KL
(Table 2 "KL"); the dotted line marks the student probability equal to the teacher's, where KL is minimal.

Usage: python scripts/plot_akd.py [--out docs/images/mecds_akd.png]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from wsimil_core.functional import akd_gated_loss, akd_loss, kd_kl_loss  # noqa: E402


def logits_of(p: torch.Tensor) -> torch.Tensor:
    """``[K]`` positive probabilities -> ``[K, 2]`` logits with that softmax (class 1 = positive)."""
    return torch.stack([torch.zeros_like(p), torch.log(p) - torch.log1p(-p)], dim=1)


def per_bag(fn, student: torch.Tensor, teacher: torch.Tensor, *extra: torch.Tensor) -> list[float]:
    """The loss of every row separately (the library functions return the batch mean)."""
    return [
        float(fn(student[i : i + 1], teacher[i : i + 1], *(e[i : i + 1] for e in extra))) for i in range(len(student))
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/images/mecds_akd.png"))
    args = parser.parse_args()
    p = torch.linspace(0.005, 0.995, 397, dtype=torch.float64)
    student = logits_of(p)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), sharey=False)
    for ax, p_hat in zip(axes, (0.1, 0.5, 0.9), strict=True):
        teacher = logits_of(torch.full_like(p, p_hat))
        ones, zeros = torch.ones(len(p), dtype=torch.long), torch.zeros(len(p), dtype=torch.long)
        ax.plot(p, per_bag(akd_loss, student, teacher), label="AKD, Eq. 2 (default)", lw=2)
        ax.plot(p, per_bag(akd_gated_loss, student, teacher, ones), label="AKD gated, positive bag", ls="--")
        ax.plot(p, per_bag(akd_gated_loss, student, teacher, zeros), label="AKD gated, negative bag", ls="-.")
        ax.plot(p, per_bag(kd_kl_loss, student, teacher), label="KL (Table 2)", color="gray")
        ax.axvline(p_hat, color="k", ls=":", lw=1)
        w_neg = max(p_hat - 0.2, 0.0) ** 4
        ax.set_title(f"teacher p̂ = {p_hat}  (ω₋ = {w_neg:.3g})")
        ax.set_xlabel("student positive probability p")
        ax.set_ylim(bottom=-0.02 if p_hat > 0.2 else None)
    axes[0].set_ylabel("loss (T = 2, γ₊ = 1, γ₋ = 4, α = 0.2)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out} ({math.ceil(args.out.stat().st_size / 1024)} KiB)")


if __name__ == "__main__":
    main()
