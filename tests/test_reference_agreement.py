"""The exact sampler reproduces Morpheus 2.2.4 (P1) and CompuCell3D 4.8 (P2) statistics.

From frame 0 of the 16 runs of each scenario (``tests/fixtures/reference/initial_frames.npz``, copied from
``../shared/reference-data``), 2 seeded runs per initial state (32 runs) under the known parameters (J per
unordered Moore pair, T = 1, λ, V*) reach statistics at 100 / 500 / 1000 MCS that agree with the tools':
|ours − theirs| ≤ 4·√(SE_ours² + SE_theirs²) for every statistic, exactly when both SEs are 0.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from neuralcpm_plugin.lattice import CellState
from neuralcpm_plugin.metrics.stats import summary_stats
from neuralcpm_plugin.sampling.exact import ExactSampler

FIX = Path(__file__).resolve().parent / "fixtures" / "reference"

PARAMS = {  # shared/reference-data/README.md
    "P1_morpheus": {"J10": 0.625, "J20": 0.25, "J11": 0.25, "J22": 0.25, "J12": 1.125, "lam": 0.5, "target": 100.0},
    "P2_cc3d": {"J10": 2.0, "J20": 2.0, "J11": 1.0, "J22": 1.0, "J12": 1.6, "lam": 0.8, "target": 90.0},
}
CHECK_MCS = (100, 500, 1000)
RUNS_PER_START = 2


def reference_terms(p):
    J = np.array([[0.0, p["J10"], p["J20"]], [p["J10"], p["J11"], p["J12"]], [p["J20"], p["J12"], p["J22"]]])
    return [({"kind": "contact", "scale": 1.0, "params": {"J": J.tolist(), "order": 2}}, {}),
            ({"kind": "volume", "scale": 1.0,
              "params": {"lambda": [0.0, p["lam"], p["lam"]], "target": [0.0, p["target"], p["target"]]}}, {})]


def run_scenario(name, frames, runs_per_start=RUNS_PER_START, seed0=0):
    """Statistics of our runs: {key: array (runs, len(CHECK_MCS))}."""
    terms = reference_terms(PARAMS[name])
    out = []
    for i, fr in enumerate(frames):
        st = CellState.from_maps(fr[0].astype(np.int32), fr[1].astype(np.int32))
        for r in range(runs_per_start):
            s = ExactSampler(st, None, seed=seed0 + 1000 * r + i, terms=terms, temperature=1.0, periodic=True,
                             copy_order=2)
            done = 0
            rows = []
            for m in CHECK_MCS:
                s.step(m - done)
                done = m
                rows.append(summary_stats(s.state))
            out.append(rows)
    keys = list(out[0][0])
    return {k: np.array([[row[k] for row in run] for run in out]) for k in keys}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["P1_morpheus", "P2_cc3d"])
def test_exact_sampler_agrees_with_real_simulators(name):
    ref = json.loads((FIX / "summary_stats_subset.json").read_text())["scenarios"][name]
    assert ref["mcs"] == list(CHECK_MCS)
    frames = np.load(FIX / "initial_frames.npz")[name]
    assert frames.shape == (16, 2, 100, 100)
    ours = run_scenario(name, frames)
    n = ours["mean_volume"].shape[0]
    assert n >= 32
    failures = []
    for k, theirs_mean in ref["mean"].items():
        a = ours[k]
        m = a.mean(0)
        se = a.std(0, ddof=1) / np.sqrt(n)
        for j, mcs in enumerate(CHECK_MCS):
            tm, ts = theirs_mean[j], ref["se"][k][j]
            tol = 4.0 * np.sqrt(se[j] ** 2 + ts ** 2)
            if se[j] == 0 and ts == 0:
                ok = m[j] == tm
            else:
                ok = abs(m[j] - tm) <= tol
            if not ok:
                failures.append(f"{k} @ {mcs} MCS: ours {m[j]:.4g}±{se[j]:.3g}, theirs {tm:.4g}±{ts:.3g}")
    assert not failures, f"{name}: " + "; ".join(failures)
