"""Small data sets for the trainer tests (tiny lattices so every test runs in seconds)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from neuralcpm_plugin.lattice import CellState

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared"


def block_states(n_frames: int = 6, size: int = 24, n_types: int = 2, seed: int = 0, side: int = 4,
                 grid: int = 3) -> list[CellState]:
    """Frames of grid×grid square cells (side×side sites) at jittered positions; types alternate 1..n_types."""
    rng = np.random.default_rng(seed)
    out = []
    step = size // grid
    for _ in range(n_frames):
        ids = np.zeros((size, size), np.int32)
        c = 0
        for gy in range(grid):
            for gx in range(grid):
                c += 1
                y = gy * step + int(rng.integers(0, step - side + 1))
                x = gx * step + int(rng.integers(0, step - side + 1))
                ids[y:y + side, x:x + side] = c
                # a ragged edge so the shapes are not all squares
                if rng.random() < 0.5:
                    ids[y + side - 1, x] = 0
        types = np.array([0] + [1 + (i % n_types) for i in range(c)], np.int32)
        out.append(CellState(ids, types))
    return out


def write_npz(path, states) -> Path:
    from neuralcpm_plugin.io.npz import save_npz
    return save_npz(path, states)


def run_fit(args, *, cwd=None, timeout=120, env=None) -> subprocess.CompletedProcess:
    e = dict(os.environ)
    e.setdefault("OMP_NUM_THREADS", "1")
    if env:
        e.update(env)
    return subprocess.run([sys.executable, "-m", "training.fit", *args], cwd=cwd or ROOT, capture_output=True,
                          text=True, timeout=timeout, env=e, check=False)
