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

Machine control, measured in the same run (each repeat, right after the samplers' blocks), so that every
speed-up comes with what the machine itself delivers at that moment: **sampler pair** = two 1-thread
checkerboards on two separate lattices (copies of the start, own seeds) stepped at once in two threads (the
compiled step runs without the GIL), aggregate MCS/s over the 1-thread checkerboard's in the same repeat (2.0 on
two independent cores; cache or memory contention and shared cores lower it); **compute pair** = a
register-bound compiled loop (xorshift, no memory traffic) run as two copies at once, aggregate throughput over
one copy (≈ 2.0 on two real cores, ≈ 1.0–1.4 when the two vCPUs share one core or when another process takes
one). Then the checkerboard's K-thread speed-up over the sampler pair's ratio: the parallel efficiency relative to
the machine (1.0 = as good as two independent copies). ``2 pinned`` = the K-thread checkerboard with each
worker pinned to one CPU (``pin_cpus``; ``--no-pin`` leaves it out); ``2 spin`` = the same with the barrier
spinning ``--long-spin-us`` (2 ms) instead of 50 µs before it sleeps (an idle vCPU that sleeps at a barrier
halts, and its wake-up goes through the hypervisor). Each block also records the host's steal
time (``/proc/stat``: time the hypervisor ran something else on our vCPUs) and the CPU time other processes used
(all CPUs' busy time minus this process's), as a share of the block's wall time × CPUs. Per-block figures are
printed so that a bimodal machine shows up block by block. At the start: the one-way cache-line hand-off time
between two threads pinned to the first two CPUs (atomic ping-pong; ≲ 30 ns means SMT siblings of one
core, ≳ 100 ns cores on different L3s or sockets).

The samplers keep the lattice as uint16 ids / uint8 types (``narrow_ids``, the default: a 400² lattice is
320 KiB instead of 640 KiB); ``--int32`` adds the sequential and 1/K-thread rows on the int32 lattice
(``narrow_ids=False``: the same trajectories), interleaved with the others, and prints uint16 / int32 per repeat.

Wall-clock speed-ups need idle cores: on a shared machine, say so next to the figure (the load average is
printed).

    python benchmarks/bench_checkerboard.py [--sizes 400 1000] [--threads 2] [--mcs 2] [--repeats 5]
        [--no-pin] [--no-control] [--int32]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from functools import partial
from pathlib import Path

_CLK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _cpu_ticks():
    """(busy, steal) seconds summed over all CPUs since boot, from /proc/stat (None where it is missing)."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    busy = v[0] + v[1] + v[2] + v[5] + v[6]  # user nice system irq softirq
    return busy / _CLK, (v[7] if len(v) > 7 else 0) / _CLK


class _Block:
    """Wall, process CPU, host steal and other processes' CPU time of one timed block."""

    def __enter__(self):
        self.t = _cpu_ticks()
        self.w, self.c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.w
        self.cpu = time.process_time() - self.c
        t1 = _cpu_ticks()
        if self.t is None or t1 is None:
            self.steal = self.others = float("nan")
        else:
            self.steal = t1[1] - self.t[1]
            self.others = max(0.0, t1[0] - self.t[0] - self.cpu)
        return False


def _pair(fn_a, fn_b):
    """Run ``fn_a`` in this thread and ``fn_b`` in another, at once; wall seconds until both are done."""
    err = []

    def run_b():
        try:
            fn_b()
        except BaseException as e:  # noqa: BLE001 - re-raised in the calling thread
            err.append(e)
    th = threading.Thread(target=run_b)
    w0 = time.perf_counter()
    th.start()
    fn_a()
    th.join()
    w = time.perf_counter() - w0
    if err:
        raise err[0]
    return w


def _fmt(xs, f="{:.2f}"):
    return " ".join(f.format(x) for x in xs)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[400, 1000])
    ap.add_argument("--threads", type=int, nargs="+", default=[2], help="thread counts to compare with 1")
    ap.add_argument("--mcs", type=float, default=2.0, help="MCS per timed block")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--block", type=int, default=32, help="minimum strip width (rows)")
    ap.add_argument("--no-pin", action="store_true", help="leave out the pinned K-thread rows")
    ap.add_argument("--no-control", action="store_true", help="leave out the machine control (pairs)")
    ap.add_argument("--int32", action="store_true",
                    help="add int32-lattice rows (narrow_ids=False) of the sequential and 1/K-thread samplers, "
                         "interleaved with the default uint16 ones, and print uint16 / int32 per repeat")
    ap.add_argument("--long-spin-us", type=float, default=2000.0,
                    help="barrier spin of the 'spin' rows (µs; 0 leaves them out); the default spin is 50 µs")
    args = ap.parse_args(argv)
    os.environ["NUMBA_NUM_THREADS"] = str(max([1, *args.threads]))
    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root))
    import numpy as np
    from numba import njit

    from neuralcpm_plugin.sampling import _sync
    from neuralcpm_plugin.sampling.checkerboard import CheckerboardSampler
    from neuralcpm_plugin.sampling.exact import ExactSampler
    from training.gen_tissue import voronoi_start

    @njit(nogil=True)
    def spin(n, x):
        """Register-bound: ``n`` xorshift64 steps (no memory traffic); the result keeps it from being dropped."""
        for _ in range(n):
            x ^= x << np.uint64(13)
            x ^= x >> np.uint64(7)
            x ^= x << np.uint64(17)
        return x

    @njit(nogil=True)
    def volley(flag, me, n, stamps):
        """Cache-line ping-pong: player ``me`` (0/1) waits for ``flag == 2i + me`` and increments it, ``n``
        times; player 0 records the tick counter every 1,000 hand-offs in ``stamps``."""
        for i in range(n):
            while _sync.atomic_load(flag, 0) != 2 * i + me:
                pass
            _sync.atomic_add(flag, 0, 1)
            if me == 0 and i % 1000 == 0:
                stamps[i // 1000] = _sync.cycles()
        return 0

    def handoff_ns(a, b, n=200_000):
        """One-way cache-line hand-off time (ns) between threads pinned to CPUs ``a`` and ``b``: 10th percentile
        over batches of 1,000 round trips (batches where both threads ran; SMT siblings share an L1: ≲ 30 ns;
        two cores of one L3 ≈ 50 ns; across L3s / sockets ≳ 100 ns)."""
        flag, stamps, dummy = np.zeros(8, np.int64), np.zeros(n // 1000 + 1, np.int64), np.zeros(1, np.int64)
        volley(np.ones(8, np.int64), 1, 1, dummy)
        old = os.sched_getaffinity(0)

        def other():
            os.sched_setaffinity(0, {b})
            volley(flag, 1, n, dummy)
        th = threading.Thread(target=other)
        try:
            os.sched_setaffinity(0, {a})
            th.start()
            volley(flag, 0, n, stamps)
            th.join()
        finally:
            os.sched_setaffinity(0, old)
        ns = np.diff(stamps[:-1]) / _sync.ticks_per_second() * 1e9 / 2000
        return float(np.percentile(ns, 10))

    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    pin = not args.no_pin and len(cpus) >= 2
    control = not args.no_control
    n_spin = 0
    if control:
        spin(10, np.uint64(1))
        w0 = time.perf_counter()
        spin(2_000_000, np.uint64(1))
        n_spin = max(1, int(2_000_000 * 0.05 / max(time.perf_counter() - w0, 1e-6)))  # ≈ 50 ms per copy

    J = [[0.0, 0.625, 0.25], [0.625, 0.25, 1.125], [0.25, 1.125, 0.25]]
    terms = [({"kind": "contact", "scale": 1.0, "params": {"J": J, "order": 2}}, {}),
             ({"kind": "volume", "scale": 1.0, "params": {"lambda": [0, 0.5, 0.5], "target": [0, 90.0, 90.0]}}, {})]
    kw = {"terms": terms, "temperature": 1.0, "periodic": True, "copy_order": 2}

    def board(start, k, seed=3, narrow_ids=True, **attrs):
        """A checkerboard sampler from ``start`` on ``k`` threads, with attributes set (the variants' rows)."""
        s = CheckerboardSampler(start, None, seed=seed, threads=k, block=args.block, narrow_ids=narrow_ids, **kw)
        for name, value in attrs.items():
            setattr(s, name, value)
        return s

    print(f"checkerboard sampler, P1 contact + volume (V* = 90), classic proposal; median of {args.repeats} "
          f"interleaved blocks of {args.mcs:g} MCS; load average {os.getloadavg()[0]:.2f} at the start, "
          f"{os.cpu_count()} CPUs (allowed: {cpus}), {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}")
    if control and len(cpus) >= 2 and _sync.ticks_per_second():
        print(f"one-way cache-line hand-off between CPU {cpus[0]} and CPU {cpus[1]}: "
              f"{_fmt([handoff_ns(cpus[0], cpus[1]) for _ in range(3)], '{:.0f}')} ns (3 runs; SMT siblings ≲ 30 ns, "
              "cores sharing an L3 ≈ 50 ns, across L3s / sockets ≳ 100 ns)", flush=True)
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
            samplers[f"checkerboard {k} thr"] = board(st, k)
            if pin and k > 1:
                samplers[f"checkerboard {k} pinned"] = board(st, k, pin_cpus=cpus)
            if args.long_spin_us > 0 and k > 1:
                samplers[f"checkerboard {k} spin"] = board(st, k, spin_seconds=args.long_spin_us * 1e-6)
        if args.int32:  # the same samplers on the int32 lattice (A/B of the narrow lattice, same trajectories)
            samplers["sequential int32"] = ExactSampler(st, None, seed=2, narrow_ids=False, **kw)
            for k in [1, *args.threads]:
                samplers[f"checkerboard {k} int32"] = board(st, k, narrow_ids=False)
        pair = [board(st, 1, seed=4 + i) for i in range(2)] if control else []
        for s in [*samplers.values(), *pair]:
            s.step(0.05)  # compile / load the cache
        samplers["checkerboard 1 thr"].record_strips = True  # per-strip CPU times: the load-balance bound
        prof0 = {k: s.profile() | {"mcs": s.mcs_done} for k, s in samplers.items() if hasattr(s, "profile")}
        wall = {k: [] for k in samplers}
        cpu = {k: [] for k in samplers}
        ctl = {"sampler pair": [], "compute pair": [], "steal %": [], "others %": []}
        ncpu = max(len(cpus), 1)
        for _ in range(args.repeats):
            steal = others = span = 0.0
            for name, s in samplers.items():
                with _Block() as b:
                    s.step(args.mcs)
                wall[name].append(args.mcs / b.wall)
                cpu[name].append(args.mcs / b.cpu)
                steal, others, span = steal + b.steal, others + b.others, span + b.wall
            if control:
                with _Block() as b:
                    w = _pair(partial(pair[0].step, args.mcs), partial(pair[1].step, args.mcs))
                ctl["sampler pair"].append(2 * args.mcs / w / wall["checkerboard 1 thr"][-1])
                steal, others, span = steal + b.steal, others + b.others, span + b.wall
                with _Block() as b:
                    w0 = time.perf_counter()
                    spin(n_spin, np.uint64(7))
                    w1 = time.perf_counter() - w0
                    w2 = _pair(partial(spin, n_spin, np.uint64(3)), partial(spin, n_spin, np.uint64(5)))
                ctl["compute pair"].append(2 * w1 / w2)
                steal, others, span = steal + b.steal, others + b.others, span + b.wall
            ctl["steal %"].append(100 * steal / (span * ncpu))
            ctl["others %"].append(100 * others / (span * ncpu))
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
        one = wall["checkerboard 1 thr"]
        for k in args.threads:
            kw_, kc = med[f"checkerboard {k} thr"]
            bound = samplers["checkerboard 1 thr"].predicted_speedup(k)["speedup"]
            print(f"{L:>4d}x{L:<4d} {k} threads: {kw_ / one_w:.2f}x the 1-thread checkerboard, {kw_ / seq_w:.2f}x the "
                  f"sequential sampler (wall clock); CPU per MCS: 1 thread {seq_c / one_c:.2f}x, {k} threads "
                  f"{seq_c / kc:.2f}x the sequential sampler's; load-balance bound on {k} threads {bound:.2f}x "
                  "(from the 1-thread run's per-strip CPU times)", flush=True)
            per = {f"{k} thr / 1 thr": [a / b for a, b in zip(wall[f"checkerboard {k} thr"], one)]}
            for v in ("pinned", "spin"):
                if f"checkerboard {k} {v}" in wall:
                    per[f"{k} {v} / 1 thr"] = [a / b for a, b in zip(wall[f"checkerboard {k} {v}"], one)]
            if control:
                per.update(ctl)
            print(f"{L:>4d}x{L:<4d} per repeat ({args.repeats} blocks, in order): "
                  + "; ".join(f"{name} {_fmt(v, '{:.1f}' if '%' in name else '{:.2f}')}" for name, v in per.items()),
                  flush=True)
            if control:
                sp = statistics.median(per[f"{k} thr / 1 thr"])
                pc, cc = statistics.median(ctl["sampler pair"]), statistics.median(ctl["compute pair"])
                eff = statistics.median([a / b for a, b in zip(per[f"{k} thr / 1 thr"], ctl["sampler pair"])])
                pinned = "".join(f"; {v} {statistics.median(per[f'{k} {v} / 1 thr']):.2f}x"
                                 for v in ("pinned", "spin") if f"{k} {v} / 1 thr" in per)
                print(f"{L:>4d}x{L:<4d} machine control, same run: {k} threads {sp:.2f}x the 1-thread checkerboard"
                      f"{pinned}; two 1-thread checkerboards on separate lattices at once {pc:.2f}x one; "
                      f"register-bound loop, two copies {cc:.2f}x one; checkerboard / sampler pair = {eff:.2f} "
                      f"(parallel efficiency relative to the machine; medians of the per-repeat figures)", flush=True)
        if args.int32:
            ab = [("sequential (Exact)", "sequential int32")] + [(f"checkerboard {k} thr", f"checkerboard {k} int32")
                                                                 for k in [1, *args.threads]]
            parts = []
            for a, b in ab:
                rw = [x / y for x, y in zip(wall[a], wall[b])]
                rc = [x / y for x, y in zip(cpu[a], cpu[b])]
                parts.append(f"{b.replace(' int32', '')}: wall {statistics.median(rw):.2f} ({_fmt(rw)}), "
                             f"CPU {statistics.median(rc):.2f} ({_fmt(rc)})")
            print(f"{L:>4d}x{L:<4d} uint16 / int32 lattice, MCS/s per repeat (median (all)): " + "; ".join(parts),
                  flush=True)
    print(f"load average {os.getloadavg()[0]:.2f} at the end, {time.strftime('%H:%M:%S UTC', time.gmtime())}. "
          "MCS/s CPU = MCS per second of process CPU time (all "
          "threads): a perfect K-thread run has CPU rate = wall rate / K. stamp % / wait % = share of the worker "
          "threads' time spent stamping cells / waiting at the phase barriers (CheckerboardSampler.profile(), "
          "wall-clock cycles: on a loaded machine waits include time the other thread was descheduled). "
          "steal % / others % = host steal time / other processes' CPU time per repeat, share of wall × CPUs "
          "(/proc/stat, 10 ms ticks)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
