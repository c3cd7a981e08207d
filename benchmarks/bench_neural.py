"""Speed and memory of the neural Hamiltonians' ΔH (medians of repeats; every figure spot-checked).

Figures printed:

* global NH, Cellular-MNIST preset, 100×100 lattice, 50 cells, closure model (contact + volume + NH):
  ΔH evaluations per second for 16 chains × P=50 proposals (``Hamiltonian.delta``, activation reuse), the
  NH term alone, and a plain full forward (states/s) for comparison;
* local NH (default: stride 4, 16 channels, 3×3 coarse kernel → receptive-field radius 5 sites):
  batched torch ΔH/s (16 × 50 proposals) and numpy ΔH/s one attempt at a time;
* peak resident memory of one 16-chain parallel-sampler step for each (child processes).

Each speed figure is spot-checked against full recomputation H(after) − H(before) and the largest error is
printed.  The machine is shared: the load average is printed with the figures.

Usage::

    python benchmarks/bench_neural.py            # all figures (a few minutes on 2 cores)
    python benchmarks/bench_neural.py --quick    # fewer repeats
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
import torch

from neuralcpm_plugin.hamiltonian import Batch, LatticeSpec
from neuralcpm_plugin.hamiltonian.closure import closure_hamiltonian
from neuralcpm_plugin.hamiltonian.local_nh import LocalNeuralHamiltonian
from neuralcpm_plugin.hamiltonian.neural import NeuralHamiltonian
from neuralcpm_plugin.lattice import CellState, boundary_mask

SHAPE = (100, 100)
N_CELLS = 50
CHAINS = 16
P = 50


def mnist_like_state(rng, shape=SHAPE, n_cells=N_CELLS, radius=45.0, cell_r=6.0, spacing=7.5):
    """50 compact cells (~100 sites) packed in a disc, types 1/2 half-half; Voronoi within cell_r of seeds."""
    H, W = shape
    pts = []
    for _ in range(200_000):
        p = rng.uniform(-radius, radius, 2)
        if np.hypot(*p) < radius and all(np.hypot(*(p - q)) > spacing for q in pts):
            pts.append(p)
            if len(pts) == n_cells:
                break
    else:
        raise RuntimeError("could not place the cells")
    pts = np.array(pts) + np.array([H / 2, W / 2])
    yy, xx = np.mgrid[:H, :W]
    best = np.full((H, W), np.inf)
    ids = np.zeros((H, W), np.int64)
    for k, (py, px) in enumerate(pts):
        d = np.hypot(yy - py, xx - px)
        m = (d < best) & (d < cell_r)
        best[m] = d[m]
        ids[m] = k + 1
    types = np.concatenate([[0], rng.permutation(np.repeat([1, 2], n_cells // 2 + 1))[:n_cells]])
    return CellState(ids, types)


def proposals(states, P, rng):
    """Paper-style proposals: boundary sites, each with a neighbour's (different) cell copied into it."""
    S, N = [], []
    for s in states:
        H, W = s.shape
        bm = np.flatnonzero(boundary_mask(s.ids).ravel())
        sites = rng.choice(bm, P, replace=False)
        new = []
        for site in sites:
            i, j = divmod(int(site), W)
            cand = [s.ids[(i + a) % H, (j + b) % W] for a in (-1, 0, 1) for b in (-1, 0, 1)]
            cand = [c for c in cand if c != s.ids[i, j]]
            new.append(cand[rng.integers(len(cand))])
        S.append(sites)
        N.append(new)
    return torch.as_tensor(np.array(S)), torch.as_tensor(np.array(N))


CPU_TIMES: dict = {}


def median_time(fn, repeats, label=None):
    """Median wall time of ``repeats`` calls; the median process CPU time is kept in CPU_TIMES[label].

    On a shared, oversubscribed machine the CPU time (all threads of this process) is the better estimate
    of what the code costs; with ``--threads 1`` it equals the wall time of a dedicated core.
    """
    ts, cs = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        ts.append(time.perf_counter() - t0)
        cs.append(time.process_time() - c0)
    if label:
        CPU_TIMES[label] = float(np.median(cs))
    return float(np.median(ts)), ts


def spot_check(ham, states, sites, new, d, n_check, W):
    """Largest |ΔH − (H(after) − H(before))| over n_check proposals (full recomputation)."""
    err, scale = 0.0, 0.0
    with torch.no_grad():
        for k in range(n_check):
            b, p = k % len(states), (7 * k) % sites.shape[1]
            s = states[b]
            after = s.ids.copy()
            after.flat[int(sites[b, p])] = int(new[b, p])
            e = ham.energy(Batch.from_states([s, CellState(after, s.types)]))
            ref = float(e[1] - e[0])
            err = max(err, abs(float(d[b, p]) - ref))
            scale = max(scale, abs(ref))
    return err, scale


def analytic_terms():
    from neuralcpm_plugin.hamiltonian import analytic
    # Cellular-MNIST contact/volume parameters (paper scaling / 4 = this project's units)
    J = np.array([[0, 6, 6], [6, 3, 6], [6, 6, 3]], float) / 4
    return [analytic.ContactEnergy(J, 2), analytic.VolumeConstraint([0, 0.974, 0.974], [0, 100.0, 100.0])]


def mnist_closure(seed=0):
    nh = NeuralHamiltonian(preset="mnist", seed=seed)
    ham = closure_hamiltonian(analytic_terms(), [nh], LatticeSpec(SHAPE), 1.0, ["medium", "type1", "type2"])
    return ham, nh


def bench_global(args, rng):
    torch.manual_seed(0)
    ham, nh = mnist_closure()
    states = [mnist_like_state(rng) for _ in range(CHAINS)]
    batch = Batch.from_states(states)
    sites, new = proposals(states, P, rng)
    n = sites.numel()
    with torch.no_grad():
        ham.delta(batch, sites[:, :1], new[:, :1])  # warm-up
        t_ham, _ = median_time(lambda: ham.delta(batch, sites, new), args.repeats, "ham")
        d = ham.delta(batch, sites, new)
        t_nh, _ = median_time(lambda: nh.delta(batch, sites, new), args.repeats, "nh")
        t_fwd, _ = median_time(lambda: ham.energy(batch), args.repeats, "fwd")
        sub = (slice(None), slice(0, 1))
        t_full, _ = median_time(lambda: nh.delta_full(batch, sites[sub], new[sub]), 1, "full")
    err, scale = spot_check(ham, states, sites, new, d, args.checks, SHAPE[1])
    return {
        "nh_closure_delta_per_s": n / t_ham, "nh_closure_delta_per_cpu_s": n / CPU_TIMES["ham"],
        "nh_term_delta_per_cpu_s": n / CPU_TIMES["nh"], "full_forward_states_per_cpu_s": CHAINS / CPU_TIMES["fwd"],
        "nh_term_delta_per_s": n / t_nh,
        "full_forward_states_per_s": CHAINS / t_fwd,
        "delta_by_full_recompute_per_s": 16 / t_full,
        "spot_check_max_abs_err": err, "spot_check_max_abs_dH": scale,
        "dtype": nh.config["dtype"], "proposals": n,
    }


def bench_local(args, rng):
    torch.manual_seed(0)
    term = LocalNeuralHamiltonian(seed=0)
    with torch.no_grad():  # O(1) energies, so the checks are not vacuous
        for p in term.parameters():
            if p.dim() > 1:
                p.mul_(3.0)
    states = [mnist_like_state(rng) for _ in range(CHAINS)]
    batch = Batch.from_states(states)
    sites, new = proposals(states, P, rng)
    n = sites.numel()
    with torch.no_grad():
        term.delta(batch, sites[:, :1], new[:, :1])
        t_t, _ = median_time(lambda: term.delta(batch, sites, new), args.repeats, "local")
        t_c, _ = median_time(lambda: term.delta(batch, sites, new, method="crop"), args.repeats, "local_crop")
        d = term.delta(batch, sites, new)
        d_crop = term.delta(batch, sites, new, method="crop")
    err, scale = spot_check(term, states, sites, new, d, args.checks, SHAPE[1])
    ev = term.numpy_evaluator()
    W = SHAPE[1]
    attempts = [(b, divmod(int(sites[b, p]), W), int(new[b, p]), float(d[b, p]))
                for b in range(CHAINS) for p in range(P)]
    arrs = [(s.ids, s.types) for s in states]
    np_err = 0.0
    for b, ij, nid, dt in attempts[:200]:
        dn = ev.delta(arrs[b][0], arrs[b][1], ij, nid)
        np_err = max(np_err, abs(dn - dt) / max(1.0, abs(dt)))

    def run_np():
        for b, ij, nid, _ in attempts:
            ev.delta(arrs[b][0], arrs[b][1], ij, nid)

    t_np, _ = median_time(run_np, args.repeats, "np")
    return {
        "local_nh_radius_sites": term.radius, "local_nh_channels": term.config["channels"],
        "local_torch_delta_per_s": n / t_t, "local_numpy_delta_per_s": len(attempts) / t_np,
        "local_torch_delta_per_cpu_s": n / CPU_TIMES["local"],
        "local_torch_crop_delta_per_s": n / t_c, "local_torch_crop_delta_per_cpu_s": n / CPU_TIMES["local_crop"],
        "crop_vs_lattice_max_abs_diff": float((d - d_crop).abs().max()),
        "local_numpy_delta_per_cpu_s": len(attempts) / CPU_TIMES["np"],
        "spot_check_max_abs_err": err, "spot_check_max_abs_dH": scale,
        "numpy_vs_torch_max_rel_err": np_err,
    }


def child_memory(which):
    """Peak RSS (MiB) increase of one 16-chain ParallelSampler step (run in a fresh process)."""
    from neuralcpm_plugin.sampling.parallel import ParallelSampler
    rng = np.random.default_rng(1)
    if which == "nh":
        ham, _ = mnist_closure()
    else:
        from neuralcpm_plugin.hamiltonian.base import Hamiltonian
        ham = Hamiltonian([LocalNeuralHamiltonian(seed=0)], LatticeSpec(SHAPE), 1.0, ["medium", "a", "b"])
    batch = Batch.from_states([mnist_like_state(rng) for _ in range(CHAINS)])
    sampler = ParallelSampler(ham, n_flips=P, backend="torch")
    g = torch.Generator().manual_seed(0)
    peak_setup = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with open("/proc/self/statm") as f:
        before = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20  # current RSS
    t0 = time.perf_counter()
    with torch.no_grad():
        sampler.step(batch, g)
    dt = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_rss_mib": after, "rss_before_step_mib": before, "peak_before_step_mib": peak_setup,
                      "step_s": dt}))


def memory(which, threads=None):
    cmd = [sys.executable, __file__, "--child", which] + (["--threads", str(threads)] if threads else [])
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, check=False)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats and checks")
    ap.add_argument("--only", choices=["global", "local", "memory"], default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        child_memory(args.child)
        return
    args.repeats = 3 if args.quick else 5
    args.checks = 3 if args.quick else 8
    rng = np.random.default_rng(0)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, load average {os.getloadavg()}",
          flush=True)
    if args.only in (None, "global"):
        r = bench_global(args, rng)
        print("\n== global NH (Cellular-MNIST preset, 100x100, 50 cells, closure contact+volume+NH) ==")
        print(f"closure ΔH evaluations/s (16 chains x 50 proposals): wall {r['nh_closure_delta_per_s']:.0f}, "
              f"per CPU-second {r['nh_closure_delta_per_cpu_s']:.0f}  (target >= 150; authors' JAX sampler ~2.2/s)",
              flush=True)
        print(f"NH term alone ΔH/s: wall {r['nh_term_delta_per_s']:.0f}, "
              f"per CPU-s {r['nh_term_delta_per_cpu_s']:.0f}; "
              f"plain full forward: wall {r['full_forward_states_per_s']:.1f} states/s, per CPU-s "
              f"{r['full_forward_states_per_cpu_s']:.1f}; ΔH by full recomputation: wall "
              f"{r['delta_by_full_recompute_per_s']:.1f}/s")
        print(f"spot check vs H(after)-H(before): max |err| = {r['spot_check_max_abs_err']:.2e} "
              f"(max |ΔH| {r['spot_check_max_abs_dH']:.2e}, network dtype {r['dtype']})")
    if args.only in (None, "local"):
        r = bench_local(args, rng)
        print(f"\n== local NH (radius {r['local_nh_radius_sites']} sites, {r['local_nh_channels']} channels) ==")
        print(f"torch batched ΔH/s (16 x 50): wall {r['local_torch_delta_per_s']:.0f}, per CPU-s "
              f"{r['local_torch_delta_per_cpu_s']:.0f}  (target >= 20000)")
        print(f"  (method='crop': wall {r['local_torch_crop_delta_per_s']:.0f}, per CPU-s "
              f"{r['local_torch_crop_delta_per_cpu_s']:.0f}; max |crop − lattice| "
              f"{r['crop_vs_lattice_max_abs_diff']:.1e})")
        print(f"numpy one-at-a-time ΔH/s: wall {r['local_numpy_delta_per_s']:.0f}, per CPU-s "
              f"{r['local_numpy_delta_per_cpu_s']:.0f}  (target >= 10000)")
        print(f"spot check vs H(after)-H(before): max |err| = {r['spot_check_max_abs_err']:.2e} "
              f"(max |ΔH| {r['spot_check_max_abs_dH']:.2e}); numpy vs torch max rel err "
              f"{r['numpy_vs_torch_max_rel_err']:.1e}")
    if args.only in (None, "memory"):
        print("\n== peak memory of one 16-chain parallel-sampler step (fresh process) ==")
        for which in ("nh", "local"):
            m = memory(which, args.threads)
            if "error" in m:
                print(f"{which}: could not measure ({m['error']})")
            else:
                extra = m["peak_rss_mib"] - m["rss_before_step_mib"]
                note = "" if m["peak_rss_mib"] > m["peak_before_step_mib"] else " (at most; setup peak not exceeded)"
                print(f"{which}: peak RSS {m['peak_rss_mib']:.0f} MiB, RSS before the step "
                      f"{m['rss_before_step_mib']:.0f} MiB -> the step adds {extra:.0f} MiB{note}; "
                      f"step took {m['step_s']:.2f} s")


if __name__ == "__main__":
    main()
