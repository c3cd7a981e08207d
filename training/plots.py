"""Plots of a training run's ``metrics.csv``: loss, energies and analytic parameters over iterations."""

from __future__ import annotations

import csv
from pathlib import Path

__all__ = ["plot_metrics"]

_BASE = ("iteration", "loss", "e_pos", "e_neg", "acceptance", "lr", "seconds")


def plot_metrics(csv_path, out_dir) -> Path | None:
    """Write ``training.png`` (loss, energies of data and chains, acceptance, parameters) into ``out_dir``.

    Returns the path, or None when matplotlib is missing or the CSV is empty (a note is printed).
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed; no plots (pip install matplotlib)")
        return None
    csv_path = Path(csv_path)
    if not csv_path.exists():
        return None
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return None

    def col(name):
        out = []
        for r in rows:
            try:
                out.append(float(r[name]))
            except (TypeError, ValueError):
                out.append(float("nan"))
        return out

    it = col("iteration")
    params = [k for k in rows[0] if k not in _BASE]
    n = 4 if params else 3
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.4))
    axes[0].plot(it, col("loss"), lw=0.8)
    axes[0].set_title("loss")
    axes[1].plot(it, col("e_pos"), lw=0.8, label="data  H(x+)")
    axes[1].plot(it, col("e_neg"), lw=0.8, label="chains H(x-)")
    axes[1].set_title("mean energy")
    axes[1].legend(fontsize=7)
    axes[2].plot(it, col("acceptance"), lw=0.8)
    axes[2].set_title("sampler acceptance")
    if params:
        for p in params:
            axes[3].plot(it, col(p), lw=0.8, label=p)
        axes[3].set_title("parameters (per pair)")
        axes[3].legend(fontsize=6, ncol=2)
    for a in axes:
        a.set_xlabel("iteration")
    fig.tight_layout()
    out = Path(out_dir) / "training.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
