"""Checkerboard (multi-core) exact sampler: MCS/s on 1 vs K threads at 400² and 1000² (cells of ~90 sites).

Setup per size: a jittered-grid Voronoi tiling (``training.gen_tissue.voronoi_start``: ≈ L²/100 cells of ~90
sites, ~10 % medium), P1 contact + volume energies (V* = 90, T = 1, as ``bench_vs_c.py``), relaxed by the
sequential sampler for 2 MCS. Then ``--repeats`` interleaved blocks of ``--mcs`` MCS: the sequential
:class:`ExactSampler` (classic), the :class:`CheckerboardSampler` on 1 thread and on each of ``--threads``.
Prints the median MCS/s by wall clock and by CPU time (process CPU time summed over threads, so a perfect
2-thread run has CPU rate = wall rate / 2), the speed-up of K threads over 1 (wall clock) and the
checkerboard's refused shared-cell attempts. ``NUMBA_NUM_THREADS`` is set to the largest ``--threads`` before
numba starts, and ``NUMBA_THREADING_LAYER`` to ``workqueue`` unless set (OpenMP's spin-waiting at the phase
barriers cost 5× the CPU time per MCS on a loaded 2-core machine).

Wall-clock speed-ups need idle cores: on a shared machine, say so next to the figure (the load average is
printed).

    python benchmarks/bench_checkerboard.py [--sizes 400 1000] [--threads 2] [--mcs 2] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[400, 1000])
    ap.add_argument("--threads", type=int, nargs="+", default=[2], help="thread counts to compare with 1")
    ap.add_argument("--mcs", type=float, default=2.0, help="MCS per timed block")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--block", type=int, default=32, help="minimum strip width (rows)")
    args = ap.parse_args(argv)
    os.environ["NUMBA_NUM_THREADS"] = str(max([1, *args.threads]))
    # OpenMP's spin-waiting at the phase barriers burns the CPU other processes need on a shared machine
    # (measured here: 5x the CPU time per MCS on 2 threads); the workqueue layer sleeps instead.
    os.environ.setdefault("NUMBA_THREADING_LAYER", "workqueue")
    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root))
    import numpy as np

    from neuralcpm_plugin.sampling.checkerboard import CheckerboardSampler
    from neuralcpm_plugin.sampling.exact import ExactSampler
    from training.gen_tissue import voronoi_start

    J = [[0.0, 0.625, 0.25], [0.625, 0.25, 1.125], [0.25, 1.125, 0.25]]
    terms = [({"kind": "contact", "scale": 1.0, "params": {"J": J, "order": 2}}, {}),
             ({"kind": "volume", "scale": 1.0, "params": {"lambda": [0, 0.5, 0.5], "target": [0, 90.0, 90.0]}}, {})]
    kw = {"terms": terms, "temperature": 1.0, "periodic": True, "copy_order": 2}
    print(f"checkerboard sampler, P1 contact + volume (V* = 90), classic proposal; median of {args.repeats} "
          f"interleaved blocks of {args.mcs:g} MCS; load average {os.getloadavg()[0]:.2f} at the start, "
          f"{os.cpu_count()} CPUs, numba threading layer {os.environ['NUMBA_THREADING_LAYER']}")
    print(f"{'size':>9s} {'cells':>6s} {'sampler':>22s} {'MCS/s wall':>11s} {'MCS/s CPU':>10s} {'speed-up':>9s} "
          f"{'refused shared':>15s}")
    for L in args.sizes:
        st = voronoi_start(np.random.default_rng(0), L, round(L * L / 100), 90.0)
        warm = ExactSampler(st, None, seed=1, **kw)
        warm.step(2)
        st = warm.state
        cells = int((np.bincount(st.ids.ravel())[1:] > 0).sum())
        samplers = {"sequential (Exact)": ExactSampler(st, None, seed=2, **kw)}
        for k in [1, *args.threads]:
            samplers[f"checkerboard {k} thr"] = CheckerboardSampler(st, None, seed=3, threads=k, block=args.block,
                                                                     **kw)
        for s in samplers.values():
            s.step(0.05)  # compile / load the cache
        wall = {k: [] for k in samplers}
        cpu = {k: [] for k in samplers}
        for _ in range(args.repeats):
            for name, s in samplers.items():
                w0, c0 = time.perf_counter(), time.process_time()
                s.step(args.mcs)
                wall[name].append(args.mcs / (time.perf_counter() - w0))
                cpu[name].append(args.mcs / (time.process_time() - c0))
        base = statistics.median(wall["checkerboard 1 thr"])
        for name, s in samplers.items():
            w, c = statistics.median(wall[name]), statistics.median(cpu[name])
            sp = f"{w / base:9.2f}" if name.startswith("checkerboard") else f"{'':9s}"
            ref = s.stats().get("refused_shared", "")
            print(f"{L:>4d}x{L:<4d} {cells:6d} {name:>22s} {w:11.2f} {c:10.2f} {sp} {ref!s:>15s}", flush=True)
    print("speed-up = wall-clock MCS/s of the checkerboard on K threads / on 1 thread (same algorithm, same result)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
