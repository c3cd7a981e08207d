"""Exact sampler throughput: MCS/s on 100×100 with 40 cells of ~100 sites (contact + volume), one thread.

Setup: frame 0 of the Morpheus P1 runs (``tests/fixtures/reference/initial_frames.npz``: 40 cells of 25
sites), P1 parameters (J per unordered Moore pair, λ = 0.5, V* = 100, T = 1), relaxed for 100 MCS so the
cells have ~100 sites; then ``--repeats`` timed blocks of ``--mcs`` MCS each (compile time and warm-up
excluded). Classic proposal (same-cell attempts counted, 10,000 attempts per MCS) and the boundary
proposal. Prints the median and the range of wall-clock and CPU-time rates (the CPU-time figure is robust
to other processes sharing the cores).

    python benchmarks/bench_exact.py [--mcs 200] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
from _measure import sampler_rates

from neuralcpm_plugin.lattice import CellState
from neuralcpm_plugin.sampling.exact import ExactSampler

ROOT = Path(__file__).resolve().parents[1]
P1 = {"J10": 0.625, "J20": 0.25, "J11": 0.25, "J22": 0.25, "J12": 1.125, "lam": 0.5, "target": 100.0}


def p1_terms():
    p = P1
    J = [[0.0, p["J10"], p["J20"]], [p["J10"], p["J11"], p["J12"]], [p["J20"], p["J12"], p["J22"]]]
    return [({"kind": "contact", "scale": 1.0, "params": {"J": J, "order": 2}}, {}),
            ({"kind": "volume", "scale": 1.0, "params": {"lambda": [0, p["lam"], p["lam"]],
                                                         "target": [0, p["target"], p["target"]]}}, {})]


def start_state() -> CellState:
    fr = np.load(ROOT / "tests" / "fixtures" / "reference" / "initial_frames.npz")["P1_morpheus"][0]
    return CellState.from_maps(fr[0].astype(np.int32), fr[1].astype(np.int32))


def bench(proposal: str, mcs: float, repeats: int):
    s = ExactSampler(start_state(), None, seed=1, terms=p1_terms(), temperature=1.0, proposal=proposal)
    t0 = time.perf_counter()
    s.step(1)  # compile (or load the cache)
    compile_s = time.perf_counter() - t0
    s.step(100)  # relax: cells grow from 25 to ~100 sites
    vols = s.volumes[1:]
    walls, cpus = sampler_rates(s, mcs, repeats)
    return {"proposal": proposal, "cells": int((vols > 0).sum()), "mean_volume": float(vols[vols > 0].mean()),
            "wall": walls, "cpu": cpus, "compile_s": compile_s, "acceptance": s.stats()["acceptance"]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mcs", type=float, default=200.0, help="MCS per timed block")
    ap.add_argument("--repeats", type=int, default=7, help="timed blocks (median reported)")
    args = ap.parse_args(argv)
    print(f"exact sampler, 100x100 periodic, P1 contact+volume, {args.repeats} blocks of {args.mcs:g} MCS, "
          "one thread")
    print(f"{'proposal':9s} {'cells':>5s} {'mean V':>7s} {'MCS/s wall (median, min-max)':>32s} "
          f"{'MCS/s CPU (median)':>19s} {'attempts/s':>11s} {'compile/load s':>14s}")
    for prop in ("classic", "boundary"):
        r = bench(prop, args.mcs, args.repeats)
        w, c = statistics.median(r["wall"]), statistics.median(r["cpu"])
        print(f"{prop:9s} {r['cells']:5d} {r['mean_volume']:7.1f} {w:12.0f} ({min(r['wall']):6.0f}-{max(r['wall']):6.0f})"
              f"{'':8s} {c:19.0f} {c * 1e4:11.3g} {r['compile_s']:14.2f}")
    print("targets (classic): >= 1,500 MCS/s; Morpheus 2.2.4 1,100-1,550; CompuCell3D 4.8 800-1,100 (DESIGN/issue 3)")


if __name__ == "__main__":
    main()
