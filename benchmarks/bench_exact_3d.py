"""Exact sampler throughput in 3-D: MCS/s and copy attempts/s on a 64³ cubic lattice with 256 cells, one thread.

Setup: the 3-D cell-sorting start of ``python -m training.generate cellsort --dim 3 --scale paper`` (256
single-voxel cells in a centred ball, scenario b's per-pair J, λ = 0.5, V* = 200, periodic, copy and contact
order 2 = 18 neighbours, T = 1), relaxed for ``--relax`` MCS so the cells reach their volume; then
``--repeats`` timed blocks of ``--mcs`` MCS each (compile time and warm-up excluded). Classic proposal
(262,144 attempts per MCS, same-cell attempts counted) and the boundary proposal. Prints medians and ranges
of wall-clock and CPU-time rates (the CPU-time figure is robust to other processes sharing the cores) and the
peak resident memory of this process.

    python benchmarks/bench_exact_3d.py [--size 64] [--cells 256] [--mcs 5] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
from _measure import peak_rss_mib, sampler_rates

from neuralcpm_plugin.sampling.exact import ExactSampler
from training.gen_cellsort import SCALES_3D, cellsort_hamiltonian_for, init_points


def bench(proposal: str, size: int, cells: int, mcs: float, repeats: int, relax: float):
    cfg = SCALES_3D["paper"]
    shape = (size,) * 3
    radius = cfg["radius"] * size / cfg["size"]
    start = init_points(np.random.default_rng(0), shape, cells, radius)
    ham = cellsort_hamiltonian_for("b", shape, cfg["target"])
    s = ExactSampler(start, ham, seed=1, proposal=proposal)
    t0 = time.perf_counter()
    s.step(0.01)  # compile (or load the cache)
    compile_s = time.perf_counter() - t0
    s.step(relax)
    vols = s.volumes[1:]
    walls, cpus = sampler_rates(s, mcs, repeats)
    return {"cells": int((vols > 0).sum()), "mean_volume": float(vols[vols > 0].mean()), "wall": walls,
            "cpu": cpus, "compile_s": compile_s, "acceptance": s.stats()["acceptance"], "sites": s.n_sites}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=64, help="lattice side (sites); the lattice is size^3")
    ap.add_argument("--cells", type=int, default=256, help="number of cells (half type 1, half type 2)")
    ap.add_argument("--mcs", type=float, default=5.0, help="MCS per timed block")
    ap.add_argument("--repeats", type=int, default=5, help="timed blocks (median reported)")
    ap.add_argument("--relax", type=float, default=30.0, help="MCS before timing (cells grow to ~V*)")
    args = ap.parse_args(argv)
    threads = os.environ.get("NUMBA_NUM_THREADS", "unset")
    print(f"exact sampler, {args.size}^3 periodic cubic, {args.cells} cells, 3-D cell sorting (scenario b, V* = 200), "
          f"order 2 (18 neighbours), {args.repeats} blocks of {args.mcs:g} MCS after {args.relax:g} MCS, one thread "
          f"(the sampler is sequential; NUMBA_NUM_THREADS={threads})")
    print(f"{'proposal':9s} {'cells':>5s} {'mean V':>7s} {'MCS/s wall (median, min-max)':>30s} "
          f"{'MCS/s CPU (median)':>19s} {'attempts/s CPU':>15s} {'attempts/s wall':>16s} {'accept':>7s} "
          f"{'compile/load s':>14s}")
    for prop in ("classic", "boundary"):
        r = bench(prop, args.size, args.cells, args.mcs, args.repeats, args.relax)
        w, c = statistics.median(r["wall"]), statistics.median(r["cpu"])
        print(f"{prop:9s} {r['cells']:5d} {r['mean_volume']:7.1f} {w:10.3g} ({min(r['wall']):6.3g}-{max(r['wall']):6.3g})"
              f"{'':8s} {c:19.3g} {c * r['sites']:15.3g} {w * r['sites']:16.3g} {r['acceptance']:7.3f} "
              f"{r['compile_s']:14.2f}")
    peak = peak_rss_mib()
    print(f"peak resident memory of this process: {peak:.0f} MiB")


if __name__ == "__main__":
    main()
