"""Checkerboard (multi-core) exact sampler: MCS/s on 1 vs K threads at 400² and 1000² (cells of ~90 sites).

Setup per size: a jittered-grid Voronoi tiling (``training.gen_tissue.voronoi_start``: ≈ L²/100 cells of ~90
sites, ~10 % medium), P1 contact + volume energies (V* = 90, T = 1, as ``bench_vs_c.py``), relaxed by the
sequential sampler for 2 MCS. Then ``--repeats`` interleaved blocks of ``--mcs`` MCS: the sequential
:class:`ExactSampler` (classic), the :class:`CheckerboardSampler` on 1 thread and on each of ``--threads``.
Prints, per size and sampler, the median MCS/s by wall clock and by CPU time (process CPU time summed over
threads, so a perfect 2-thread run has CPU rate = wall rate / 2), CPU ms per MCS, the share of the worker
threads' time spent stamping cells and waiting at the phase barriers (``CheckerboardSampler.profile()``) and
the refused shared-cell attempts; then the ratios: K threads over the 1-thread checkerboard and over the
sequential sampler (wall clock), the checkerboard's CPU time per MCS over the sequential sampler's, and the
speed-up the load balance alone allows on K threads (``CheckerboardSampler.predicted_speedup``: the 1-thread
run's per-strip CPU times replayed on K workers; a loaded machine barely changes it).
``NUMBA_NUM_THREADS`` is set to the largest ``--threads`` before numba starts (the checkerboard's worker
count is capped by it).

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
          f"{os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"{'size':>9s} {'cells':>6s} {'sampler':>20s} {'MCS/s wall':>11s} {'MCS/s CPU':>10s} {'CPU ms/MCS':>11s} "
          f"{'stamp %':>8s} {'wait %':>7s} {'refused shared':>15s}")
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
        samplers["checkerboard 1 thr"].record_strips = True  # per-strip CPU times: the load-balance bound
        prof0 = {k: s.profile() | {"mcs": s.mcs_done} for k, s in samplers.items() if hasattr(s, "profile")}
        wall = {k: [] for k in samplers}
        cpu = {k: [] for k in samplers}
        for _ in range(args.repeats):
            for name, s in samplers.items():
                w0, c0 = time.perf_counter(), time.process_time()
                s.step(args.mcs)
                wall[name].append(args.mcs / (time.perf_counter() - w0))
                cpu[name].append(args.mcs / (time.process_time() - c0))
        med = {k: (statistics.median(wall[k]), statistics.median(cpu[k])) for k in samplers}
        for name, s in samplers.items():
            w, c = med[name]
            stamp = wait = ref = ""
            if name in prof0:  # profile() accumulates from construction: take the timed blocks' share
                p1, p0, m0 = s.profile(), prof0[name], prof0[name]["mcs"]
                m1 = s.mcs_done
                tot = p1["total"] * m1 - p0["total"] * m0
                stamp = f"{100 * (p1['mark'] * m1 - p0['mark'] * m0) / tot:8.1f}"
                wait = f"{100 * (p1['wait'] * m1 - p0['wait'] * m0) / tot:7.1f}"
                ref = s.stats()["refused_shared"]
            print(f"{L:>4d}x{L:<4d} {cells:6d} {name:>20s} {w:11.2f} {c:10.2f} {1e3 / c:11.2f} {stamp:>8s} {wait:>7s} "
                  f"{ref!s:>15s}", flush=True)
        seq_w, seq_c = med["sequential (Exact)"]
        one_w, one_c = med["checkerboard 1 thr"]
        for k in args.threads:
            kw_, kc = med[f"checkerboard {k} thr"]
            bound = samplers["checkerboard 1 thr"].predicted_speedup(k)["speedup"]
            print(f"{L:>4d}x{L:<4d} {k} threads: {kw_ / one_w:.2f}x the 1-thread checkerboard, {kw_ / seq_w:.2f}x the "
                  f"sequential sampler (wall clock); CPU per MCS: 1 thread {seq_c / one_c:.2f}x, {k} threads "
                  f"{seq_c / kc:.2f}x the sequential sampler's; load-balance bound on {k} threads {bound:.2f}x "
                  "(from the 1-thread run's per-strip CPU times)", flush=True)
    print(f"load average {os.getloadavg()[0]:.2f} at the end. MCS/s CPU = MCS per second of process CPU time (all "
          "threads): a perfect K-thread run has CPU rate = wall rate / K. stamp % / wait % = share of the worker "
          "threads' time spent stamping cells / waiting at the phase barriers (CheckerboardSampler.profile(), "
          "wall-clock cycles: on a loaded machine waits include time the other thread was descheduled)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
