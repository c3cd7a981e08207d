"""Drift of the paper's parallel sampler from the exact sampler, on the reference statistics.

From frame 0 of the 16 Morpheus (P1) and 16 CompuCell3D (P2) runs (``tests/fixtures/reference``), under the
tools' parameters, both samplers run ``--runs`` chains per start to 100 / 500 / 1000 MCS:

* exact: sequential Metropolis, classic proposal (what the tools do; verified against them by
  ``tests/test_reference_agreement.py``), 1 MCS = 10,000 attempts;
* exact-boundary: sequential Metropolis with the boundary-site proposal (the parallel sampler's proposal,
  one at a time), 1 MCS = 10,000 attempts — separates the effect of the proposal from that of parallelism;
* parallel: paper Algorithm 2 with P = ``--flips`` boundary proposals per step, 1 MCS = 10,000 / P steps.

For each statistic (mean cell volume, fragmented fraction, pair counts per type pair) the table gives the
tools' mean, the three samplers' means ± SE over chains, and the parallel sampler's drift from the exact
classic sampler and from the exact boundary-proposal sampler with z-scores (drift / √(SE_a² + SE_b²)).
|z| ≫ 4 means the states differ measurably.

    python benchmarks/bench_drift.py [--runs 1] [--flips 50] [--mcs 100 500 1000]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from neuralcpm_plugin.hamiltonian.analytic import cellsort_hamiltonian
from neuralcpm_plugin.hamiltonian.base import Batch, LatticeSpec
from neuralcpm_plugin.lattice import CellState
from neuralcpm_plugin.metrics.stats import summary_stats
from neuralcpm_plugin.sampling.exact import ExactSampler

FIX = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "reference"
PARAMS = {  # shared/reference-data/README.md (J per unordered Moore pair, T = 1)
    "P1_morpheus": {"J": {"1-0": 0.625, "2-0": 0.25, "1-1": 0.25, "2-2": 0.25, "1-2": 1.125}, "lam": 0.5, "target": 100.0},
    "P2_cc3d": {"J": {"1-0": 2.0, "2-0": 2.0, "1-1": 1.0, "2-2": 1.0, "1-2": 1.6}, "lam": 0.8, "target": 90.0},
}


def hamiltonian(name):
    p = PARAMS[name]
    return cellsort_hamiltonian(p["J"], p["lam"], p["target"], LatticeSpec((100, 100), True, 2, 2), 1.0,
                                learnable=False)


def starts(name):
    fr = np.load(FIX / "initial_frames.npz")[name]
    return [CellState.from_maps(f[0].astype(np.int32), f[1].astype(np.int32)) for f in fr]


def run_exact(name, runs, checkpoints, proposal="classic"):
    ham = hamiltonian(name)
    rows = []
    for i, st in enumerate(starts(name)):
        for r in range(runs):
            s = ExactSampler(st, ham, seed=7919 * r + i, proposal=proposal)
            done, rec = 0, []
            for m in checkpoints:
                s.step(m - done)
                done = m
                rec.append(summary_stats(s.state))
            rows.append(rec)
    return rows


def run_parallel(name, runs, checkpoints, flips, seed=0):
    from neuralcpm_plugin.sampling.parallel import ParallelSampler
    ham = hamiltonian(name)
    sts = [st for st in starts(name) for _ in range(runs)]
    batch = Batch.from_states(sts, periodic=True)
    ps = ParallelSampler(ham, n_flips=flips)
    gen = torch.Generator().manual_seed(seed)
    done = 0
    per_chain = [[] for _ in sts]
    for m in checkpoints:
        ps.sweep(batch, m - done, gen)
        done = m
        for c, st in enumerate(batch.to_states()):
            per_chain[c].append(summary_stats(st))
    return per_chain


def mean_se(rows, k, j):
    a = np.array([r[j][k] for r in rows], float)
    return a.mean(), a.std(ddof=1) / np.sqrt(len(a))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=1, help="chains per initial state (16 starts per scenario)")
    ap.add_argument("--flips", type=int, default=50, help="parallel sampler proposals per step (P)")
    ap.add_argument("--mcs", type=int, nargs="+", default=[100, 500, 1000])
    args = ap.parse_args(argv)
    ref = json.loads((FIX / "summary_stats_subset.json").read_text())["scenarios"]
    checkpoints = sorted(args.mcs)
    for name in PARAMS:
        t0 = time.process_time()
        ex = run_exact(name, args.runs, checkpoints)
        t1 = time.process_time()
        eb = run_exact(name, args.runs, checkpoints, "boundary")
        t2 = time.process_time()
        pa = run_parallel(name, args.runs, checkpoints, args.flips)
        t3 = time.process_time()
        print(f"\n{name}: {len(ex)} chains each; CPU s: exact classic {t1 - t0:.0f}, exact boundary {t2 - t1:.0f}, "
              f"parallel P={args.flips} {t3 - t2:.0f}")
        print(f"{'statistic':15s} {'MCS':>5s} {'tool':>8s} {'exact classic':>16s} {'exact boundary':>16s} "
              f"{'parallel':>16s} {'par-classic (z)':>18s} {'par-boundary (z)':>18s}")
        for k in ex[0][0]:
            if k == "n_cells":
                continue
            for j, m in enumerate(checkpoints):
                me, se = mean_se(ex, k, j)
                mb, sb = mean_se(eb, k, j)
                mp, sp = mean_se(pa, k, j)
                tool = ""
                if m in ref[name]["mcs"]:
                    tool = f"{ref[name]['mean'][k][ref[name]['mcs'].index(m)]:8.2f}"
                cols = []
                for mo, so in ((me, se), (mb, sb)):
                    d = mp - mo
                    den = np.hypot(so, sp)
                    z = d / den if den > 0 else (0.0 if d == 0 else np.inf)
                    cols.append(f"{d:+9.2f} ({z:+5.1f})")
                print(f"{k:15s} {m:5d} {tool:>8s} {me:8.2f}±{se:6.2f} {mb:8.2f}±{sb:6.2f} {mp:8.2f}±{sp:6.2f} "
                      f"{cols[0]:>18s} {cols[1]:>18s}")

if __name__ == "__main__":
    main()
