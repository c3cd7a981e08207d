"""The exact sampler against a minimal hand-written C implementation of the same classic CPM.

The C program (written to a temporary directory and compiled with ``gcc -O2`` at run time; skipped with a
message when no ``gcc``/``cc`` is found) is the classic Graner–Glazier CPM in ~60 lines: a site s uniform over
the periodic lattice, a target t uniform over s's 8 Moore copy neighbours (neighbours by coordinate
arithmetic, no tables), same cell → the attempt ends and counts, a copy that would delete a cell is refused,
ΔH of the contact energy (Moore order 2, J per unordered pair) + volume constraint λ(V − V*)², Metropolis
min(1, exp(−ΔH/T)). It uses the package's random numbers (xoshiro256**, the same seed state, the same
mapping of one 64-bit draw to (site, neighbour), Lemire's multiply-shift) and the package's neighbour order,
so — floating point permitting — it follows **the same trajectory** as ``ExactSampler(...).attempts(n)``:
the physics check compares the two final states site by site, and their acceptance rate, mean volume, cell
count and sorting index.

Per lattice size (50², 100², 200², 400², 1000² by default): a jittered-grid Voronoi tiling with cells of
~90 sites (``training.gen_tissue.voronoi_start``: ≈ L²/100 cells, ~10 % medium), relaxed by the package for
``--relax`` MCS; then ``--repeats`` interleaved blocks (package, C, package, C, ...) of ``--attempts`` copy
attempts, each C block from the same relaxed state, each package block continuing its own chain.
Timing is CPU time (``time.process_time`` around ``ExactSampler.attempts``; C's ``clock()`` around its loop,
file reading excluded), median over the blocks → ns per attempt and the package/C ratio. Also the boundary
proposal's ns per attempt (package, same state) and its ratio to the classic one, and the ns per attempt of
:class:`~neuralcpm_plugin.sampling.checkerboard.CheckerboardSampler` on one thread (the same attempts in strip
order: its working set stays in cache). ns per attempt = CPU time / attempts counted by the sampler.

Parameters: P1 of the reference data (Morpheus): J(1,0) 0.625, J(2,0) 0.25, J(1,1) 0.25, J(2,2) 0.25,
J(1,2) 1.125, λ = 0.5, V* = 90 (to match the ~90-site start cells), T = 1.

    python benchmarks/bench_vs_c.py [--sizes 50 100 200 400 1000] [--attempts 2000000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from neuralcpm_plugin.lattice import CellState, neighbour_offsets
from neuralcpm_plugin.metrics.stats import sorting_index
from neuralcpm_plugin.sampling import _kernels as K
from neuralcpm_plugin.sampling.checkerboard import CheckerboardSampler
from neuralcpm_plugin.sampling.exact import ExactSampler
from training.gen_tissue import voronoi_start

J = [[0.0, 0.625, 0.25], [0.625, 0.25, 1.125], [0.25, 1.125, 0.25]]
LAM, TARGET, TEMP = 0.5, 90.0, 1.0

C_SOURCE = r"""
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <math.h>
#include <time.h>

static uint64_t S[4];
static inline uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }
static inline uint64_t next(void) {               /* xoshiro256** */
    uint64_t r = rotl(S[1] * 5, 7) * 9, t = S[1] << 17;
    S[2] ^= S[0]; S[3] ^= S[1]; S[1] ^= S[2]; S[0] ^= S[3]; S[2] ^= t; S[3] = rotl(S[3], 45);
    return r;
}
static inline int64_t below(uint64_t r32, uint64_t n) { return (int64_t)((r32 * n) >> 32); }

int main(int argc, char **argv) {
    if (argc != 3) { fprintf(stderr, "usage: cpm in.bin out.bin\n"); return 2; }
    FILE *f = fopen(argv[1], "rb");
    int64_t hdr[6];                                /* H, W, T1, K, n_ids, n_attempts */
    if (!f || fread(hdr, 8, 6, f) != 6) { fprintf(stderr, "bad input\n"); return 2; }
    int64_t H = hdr[0], W = hdr[1], T1 = hdr[2], K = hdr[3], NI = hdr[4], NA = hdr[5], N = H * W;
    int64_t *off = malloc(16 * K);
    double *J = malloc(8 * T1 * T1), *lam = malloc(8 * T1), *lamv = malloc(8 * T1), inv_t;
    int32_t *types = malloc(4 * NI), *ids = malloc(4 * N);
    int64_t *vol = calloc(NI, 8);
    size_t ok = fread(off, 8, 2 * K, f) + fread(S, 8, 4, f) + fread(&inv_t, 8, 1, f) + fread(J, 8, T1 * T1, f)
              + fread(lam, 8, T1, f) + fread(lamv, 8, T1, f) + fread(types, 4, NI, f) + fread(ids, 4, N, f);
    fclose(f);
    if (ok != (size_t)(2 * K + 4 + 1 + T1 * T1 + 2 * T1 + NI + N)) { fprintf(stderr, "short input\n"); return 2; }
    for (int64_t i = 0; i < N; i++) vol[ids[i]]++;
    int64_t cand = 0, acc = 0, refused = 0;
    clock_t c0 = clock();
    for (int64_t a = 0; a < NA; a++) {
        uint64_t r = next();
        int64_t s = below(r >> 32, N);
        int64_t j = below(r & 0xFFFFFFFFu, K);
        int64_t sy = s / W, sx = s - sy * W;
        int64_t ty = sy + off[2 * j], tx = sx + off[2 * j + 1];
        ty += ty < 0 ? H : (ty >= H ? -H : 0);
        tx += tx < 0 ? W : (tx >= W ? -W : 0);
        int64_t x = ty * W + tx;
        int32_t nw = ids[s], old = ids[x];
        if (nw == old) continue;
        if (old != 0 && vol[old] <= 1) { refused++; continue; }
        cand++;
        int32_t to = types[old], tn = types[nw];
        double dh = 0.0;
        for (int64_t k = 0; k < K; k++) {          /* contact, the same neighbour order as the package */
            int64_t yy = ty + off[2 * k], xx = tx + off[2 * k + 1];
            yy += yy < 0 ? H : (yy >= H ? -H : 0);
            xx += xx < 0 ? W : (xx >= W ? -W : 0);
            int32_t sn = ids[yy * W + xx], ts = types[sn];
            if (sn != nw) dh += J[tn * T1 + ts];
            if (sn != old) dh -= J[to * T1 + ts];
        }
        if (old != 0) dh += lam[to] * (1.0 - 2.0 * vol[old]) + 2.0 * lamv[to];
        if (nw != 0) dh += lam[tn] * (1.0 + 2.0 * vol[nw]) - 2.0 * lamv[tn];
        if (dh <= 0.0 || (double)(next() >> 11) * (1.0 / 9007199254740992.0) < exp(-dh * inv_t)) {
            ids[x] = nw; vol[old]--; vol[nw]++; acc++;
        }
    }
    double sec = (double)(clock() - c0) / CLOCKS_PER_SEC;
    printf("%.6f %lld %lld %lld %lld\n", 1e9 * sec / (double)NA, (long long)NA, (long long)cand, (long long)acc,
           (long long)refused);
    FILE *g = fopen(argv[2], "wb");
    fwrite(ids, 4, N, g);
    fclose(g);
    return 0;
}
"""


def compile_c(workdir: Path) -> Path | None:
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        return None
    src = workdir / "cpm.c"
    src.write_text(C_SOURCE)
    exe = workdir / "cpm"
    subprocess.run([cc, "-O2", "-o", str(exe), str(src), "-lm"], check=True)
    return exe


def terms():
    return [({"kind": "contact", "scale": 1.0, "params": {"J": J, "order": 2}}, {}),
            ({"kind": "volume", "scale": 1.0, "params": {"lambda": [0.0, LAM, LAM], "target": [0.0, TARGET, TARGET]}},
             {})]


def sampler(state: CellState, seed: int, proposal: str = "classic") -> ExactSampler:
    return ExactSampler(state, None, seed=seed, terms=terms(), temperature=TEMP, periodic=True, copy_order=2,
                        contact_order=2, proposal=proposal)


def write_input(path: Path, ids: np.ndarray, types: np.ndarray, rng_state: np.ndarray, n_attempts: int):
    H, W = ids.shape
    T1 = len(J)
    offs = neighbour_offsets(2, 2).astype(np.int64)
    lam = np.array([0.0, LAM, LAM])
    with open(path, "wb") as f:
        f.write(np.array([H, W, T1, len(offs), len(types), n_attempts], np.int64).tobytes())
        f.write(offs.tobytes())
        f.write(np.asarray(rng_state, np.uint64).tobytes())
        f.write(np.array([1.0 / TEMP]).tobytes())
        f.write(np.array(J, np.float64).tobytes())
        f.write(lam.tobytes())
        f.write((lam * TARGET).tobytes())
        f.write(types.astype(np.int32).tobytes())
        f.write(np.ascontiguousarray(ids, np.int32).tobytes())


def run_c(exe: Path, workdir: Path, ids, types, rng_state, n_attempts):
    inp, out = workdir / "in.bin", workdir / "out.bin"
    write_input(inp, ids, types, rng_state, n_attempts)
    res = subprocess.run([str(exe), str(inp), str(out)], check=True, capture_output=True, text=True)
    ns, na, cand, acc, ref = res.stdout.split()
    final = np.fromfile(out, np.int32).reshape(ids.shape)
    return float(ns), {"attempts": int(na), "candidates": int(cand), "accepted": int(acc), "refused": int(ref)}, final


def relaxed_state(L: int, relax: float, seed: int) -> CellState:
    st = voronoi_start(np.random.default_rng(seed), L, max(4, round(L * L / 100)), TARGET)
    s = sampler(st, seed)
    s.step(relax)
    return s.state


def timed_package(s: ExactSampler, n: int) -> float:
    a0 = int(s.counters[0])
    c0 = time.process_time()
    s.attempts(n)
    return 1e9 * (time.process_time() - c0) / (int(s.counters[0]) - a0)


def bench_size(exe, workdir, L, attempts, repeats, relax, seed):
    st = relaxed_state(L, relax, seed)
    pk = sampler(st, seed + 1)
    bd = sampler(st, seed + 2, "boundary")
    cb = CheckerboardSampler(st, None, seed=seed + 3, terms=terms(), temperature=TEMP, periodic=True, copy_order=2,
                             contact_order=2, threads=1, block=max(4, min(32, L // 4)))
    for s in (pk, bd, cb):
        s.attempts(1000)  # compiled / cache loaded
    t_pk, t_c, t_bd, t_cb = [], [], [], []
    for r in range(repeats):
        t_pk.append(timed_package(pk, attempts))
        t_c.append(run_c(exe, workdir, st.ids, st.types, K.seed_state(seed + 100 + r), attempts)[0])
        t_bd.append(timed_package(bd, attempts))
        t_cb.append(timed_package(cb, attempts))
    return {"L": L, "cells": int((np.bincount(st.ids.ravel())[1:] > 0).sum()), "cb": statistics.median(t_cb),
            "pkg": statistics.median(t_pk), "c": statistics.median(t_c), "bnd": statistics.median(t_bd),
            "pkg_range": (min(t_pk), max(t_pk)), "c_range": (min(t_c), max(t_c))}


def physics_check(exe, workdir, L, mcs, seed):
    """Same start, same seed: package and C run the same number of attempts; compare the outcomes."""
    st = relaxed_state(L, 5.0, seed)
    n = round(mcs * L * L)
    s = sampler(st, seed + 7)
    s.attempts(n)
    _, cst, cfinal = run_c(exe, workdir, st.ids, st.types, K.seed_state(seed + 7), n)
    pst = s.stats()
    cstate = CellState(cfinal, st.types.copy())

    def summary(state, acc, cand):
        v = np.bincount(state.ids.ravel(), minlength=len(state.types))[1:]
        return (f"acceptance {acc / cand:.4f}, cells {int((v > 0).sum())}, mean volume {v[v > 0].mean():.2f}, "
                f"volume sd {v[v > 0].std():.2f}, sorting index {sorting_index(state):.4f}")

    print(f"physics check, {L}x{L}, {mcs:g} MCS ({n} attempts) from the same state and seed:")
    print(f"  package: {summary(s.state, pst['accepted'], pst['candidates'])}")
    print(f"  C      : {summary(cstate, cst['accepted'], cst['candidates'])}")
    same = int((s.state.ids == cfinal).sum())
    print(f"  counters package (attempts, candidates, accepted, refused) = ({pst['attempts']}, {pst['candidates']}, "
          f"{pst['accepted']}, {pst['refused_deletions']}); C = ({cst['attempts']}, {cst['candidates']}, "
          f"{cst['accepted']}, {cst['refused']})")
    print(f"  final states identical at {same}/{L * L} sites"
          + (" (the same trajectory)" if same == L * L else " (trajectories diverged)"))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[50, 100, 200, 400, 1000])
    ap.add_argument("--attempts", type=int, default=2_000_000, help="copy attempts per timed block")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved timed blocks per implementation")
    ap.add_argument("--relax", type=float, default=5.0, help="MCS of relaxation before timing")
    ap.add_argument("--check-size", type=int, default=100, help="lattice side of the physics check")
    ap.add_argument("--check-mcs", type=float, default=100.0, help="MCS of the physics check")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="neuralcpm-bench-c-") as d:
        workdir = Path(d)
        try:
            exe = compile_c(workdir)
        except (subprocess.CalledProcessError, OSError) as e:
            print(f"skipped: compiling the C reference failed ({e})")
            return 0
        if exe is None:
            print("skipped: no C compiler (gcc / cc) on PATH")
            return 0
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        print(f"exact sampler vs C (gcc -O2), classic proposal, P1 contact + volume (V* = {TARGET:g}), periodic, "
              f"one thread; CPU time, median of {args.repeats} interleaved blocks of {args.attempts} attempts; "
              f"load average {load:.2f} at the start")
        physics_check(exe, workdir, args.check_size, args.check_mcs, args.seed)
        print(f"{'size':>9s} {'cells':>6s} {'package ns/att':>15s} {'C ns/att':>9s} {'package/C speed':>16s} "
              f"{'boundary ns/att':>16s} {'boundary/classic':>17s} {'checkerboard ns/att':>20s} {'chk/C speed':>12s}")
        for L in args.sizes:
            r = bench_size(exe, workdir, L, args.attempts, args.repeats, args.relax, args.seed)
            print(f"{L:>4d}x{L:<4d} {r['cells']:6d} {r['pkg']:15.1f} {r['c']:9.1f} {r['c'] / r['pkg']:16.2f} "
                  f"{r['bnd']:16.1f} {r['bnd'] / r['pkg']:17.2f} {r['cb']:20.1f} {r['c'] / r['cb']:12.2f}", flush=True)
        print("package/C speed = C ns per attempt / package ns per attempt (1 = as fast as C; issue 15 asks >= 0.9); "
              "boundary/classic = cost per attempt of the boundary proposal relative to the classic one (<= 3); "
              "checkerboard = CheckerboardSampler on one thread (strips of max(4, min(32, L/4)) rows: the same "
              "attempts, in strip order)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
