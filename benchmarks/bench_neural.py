"""Speed and memory of the neural Hamiltonians' ΔH (medians of repeats; every figure spot-checked).

Figures printed:

* global NH, Cellular-MNIST preset, 100×100 lattice, 50 cells, closure model (contact + volume + NH):
  ΔH evaluations per second for 16 chains × P=50 proposals (``Hamiltonian.delta``, activation reuse), the
  NH term alone, and a plain full forward (states/s) for comparison;
* local NH (default: stride 4, 16 channels, 3×3 coarse kernel → receptive-field radius 5 sites):
  batched torch ΔH/s (16 × 50 proposals) and numpy ΔH/s one attempt at a time;
* pooled NH (default: the local NH's features, position embedding D = 4, MLP width 32): batched torch ΔH/s
  (16 × 50 proposals) and numpy ΔH/s one attempt at a time with the cached Z;
* peak resident memory of one 16-chain parallel-sampler step for each (child processes).

Every figure runs in its own fresh process (the parent imports neither torch nor the package), which prints
its own peak memory (VmHWM, see ``benchmarks/_measure.py``) and CPU time beside wall time.  Each speed figure is
spot-checked against full recomputation H(after) − H(before) and the largest error is printed.  The machine is
shared: the load average is printed with the figures.

Usage::

    python benchmarks/bench_neural.py            # all figures (a few minutes on 2 cores)
    python benchmarks/bench_neural.py --quick    # fewer repeats
    python benchmarks/bench_neural.py --only pooled --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _measure import peak_rss_mib, rss_mib, run_child

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
    from neuralcpm_plugin.lattice import CellState
    return CellState(ids, types)


def proposals(states, P, rng):
    """Paper-style proposals: boundary sites, each with a neighbour's (different) cell copied into it."""
    import torch

    from neuralcpm_plugin.lattice import boundary_mask
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
    import torch

    from neuralcpm_plugin.hamiltonian import Batch
    from neuralcpm_plugin.lattice import CellState
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
    from neuralcpm_plugin.hamiltonian import LatticeSpec
    from neuralcpm_plugin.hamiltonian.closure import closure_hamiltonian
    from neuralcpm_plugin.hamiltonian.neural import NeuralHamiltonian
    nh = NeuralHamiltonian(preset="mnist", seed=seed)
    ham = closure_hamiltonian(analytic_terms(), [nh], LatticeSpec(SHAPE), 1.0, ["medium", "type1", "type2"])
    return ham, nh


def bench_global(args, rng):
    import torch

    from neuralcpm_plugin.hamiltonian import Batch
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
    import torch

    from neuralcpm_plugin.hamiltonian import Batch
    from neuralcpm_plugin.hamiltonian.local_nh import LocalNeuralHamiltonian
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


def bench_pooled(args, rng):
    import torch

    from neuralcpm_plugin.hamiltonian import Batch
    from neuralcpm_plugin.hamiltonian.pooled_nh import PooledNeuralHamiltonian
    torch.manual_seed(0)
    term = PooledNeuralHamiltonian({"lattice_shape": list(SHAPE)}, seed=0)
    with torch.no_grad():  # O(0.1-1) ΔH, so the checks are not vacuous
        for p in term.parameters():
            if p.dim() > 1:
                p.mul_(3.0)
    states = [mnist_like_state(rng) for _ in range(CHAINS)]
    batch = Batch.from_states(states)
    sites, new = proposals(states, P, rng)
    n = sites.numel()
    with torch.no_grad():
        term.delta(batch, sites[:, :1], new[:, :1])
        t_t, _ = median_time(lambda: term.delta(batch, sites, new), args.repeats, "pooled")
        t_c, _ = median_time(lambda: term.delta(batch, sites, new, method="crop"), args.repeats, "pooled_crop")
        d = term.delta(batch, sites, new)
    err, scale = spot_check(term, states, sites, new, d, args.checks, SHAPE[1])
    ev = term.numpy_evaluator()
    W = SHAPE[1]
    # one chain at a time (the cached Z follows its lattice), as the exact sampler and CC3D call it
    attempts = [(b, divmod(int(sites[b, p]), W), int(new[b, p]), float(d[b, p]))
                for b in range(CHAINS) for p in range(P)]
    arrs = [(s.ids, s.types) for s in states]
    np_err = 0.0
    for b, ij, nid, dt in attempts[:200]:
        np_err = max(np_err, abs(ev.delta(arrs[b][0], arrs[b][1], ij, nid) - dt) / max(1.0, abs(dt)))

    def run_np():
        for b, ij, nid, _ in attempts[:P]:  # chain 0: Z cached after the first call
            ev.delta(arrs[b][0], arrs[b][1], ij, nid)

    ev.reset(*arrs[0])
    t_np, _ = median_time(run_np, args.repeats, "pooled_np")
    return {
        "pooled_radius_sites": term.radius, "pooled_channels": term.config["channels"],
        "pooled_position_dim": term.config["position_dim"], "pooled_hidden": term.config["hidden"],
        "pooled_torch_delta_per_s": n / t_t, "pooled_torch_delta_per_cpu_s": n / CPU_TIMES["pooled"],
        "pooled_torch_crop_delta_per_s": n / t_c, "pooled_torch_crop_delta_per_cpu_s": n / CPU_TIMES["pooled_crop"],
        "pooled_numpy_delta_per_s": P / t_np, "pooled_numpy_delta_per_cpu_s": P / CPU_TIMES["pooled_np"],
        "spot_check_max_abs_err": err, "spot_check_max_abs_dH": scale, "numpy_vs_torch_max_rel_err": np_err,
    }


def child_memory(which):
    """Peak RSS (MiB) of one 16-chain ParallelSampler step (run in a fresh process)."""
    import torch

    from neuralcpm_plugin.hamiltonian import Batch, LatticeSpec
    from neuralcpm_plugin.sampling.parallel import ParallelSampler
    rng = np.random.default_rng(1)
    if which == "nh":
        ham, _ = mnist_closure()
    else:
        from neuralcpm_plugin.hamiltonian.base import Hamiltonian
        if which == "pooled":
            from neuralcpm_plugin.hamiltonian.pooled_nh import PooledNeuralHamiltonian
            term = PooledNeuralHamiltonian({"lattice_shape": list(SHAPE)}, seed=0)
        else:
            from neuralcpm_plugin.hamiltonian.local_nh import LocalNeuralHamiltonian
            term = LocalNeuralHamiltonian(seed=0)
        ham = Hamiltonian([term], LatticeSpec(SHAPE), 1.0, ["medium", "a", "b"])
    batch = Batch.from_states([mnist_like_state(rng) for _ in range(CHAINS)])
    sampler = ParallelSampler(ham, n_flips=P, backend="torch")
    g = torch.Generator().manual_seed(0)
    peak_setup = peak_rss_mib()
    before = rss_mib()
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.no_grad():
        sampler.step(batch, g)
    dt, dc = time.perf_counter() - t0, time.process_time() - c0
    return {"peak_rss_mib": peak_rss_mib(), "rss_before_step_mib": before, "peak_before_step_mib": peak_setup,
            "step_s": dt, "step_cpu_s": dc}


def child(section: str, args) -> None:
    """Run one figure in this (fresh) process and print its results as one JSON line."""
    import torch

    from neuralcpm_plugin.threads import configure_threads
    thr = configure_threads(args.threads or 0)
    rng = np.random.default_rng(0)
    w0, c0 = time.perf_counter(), time.process_time()
    if section.startswith("memory-"):
        r = child_memory(section[len("memory-"):])
    else:
        r = {"global": bench_global, "local": bench_local, "pooled": bench_pooled}[section](args, rng)
    r.update({"figure_wall_s": time.perf_counter() - w0, "figure_cpu_s": time.process_time() - c0,
              "figure_peak_rss_mib": peak_rss_mib(), "torch_threads": torch.get_num_threads(),
              "blas_threads": thr["blas"], "torch_version": torch.__version__})
    print(json.dumps(r))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats and checks")
    ap.add_argument("--only", choices=["global", "local", "pooled", "memory"], default=None)
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads (torch, BLAS, numba; default: neuralcpm_plugin.threads' policy)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.repeats = 3 if args.quick else 5
    args.checks = 3 if args.quick else 8
    if args.child:
        child(args.child, args)
        return
    fwd = (["--quick"] if args.quick else []) + (["--threads", str(args.threads)] if args.threads else [])

    def run(section):
        r = run_child(__file__, ["--child", section, *fwd])
        if "error" in r:
            print(f"{section}: failed ({r['error']})", flush=True)
            return None
        return r

    def footer(r):
        print(f"(this figure's process: wall {r['figure_wall_s']:.1f} s, CPU {r['figure_cpu_s']:.1f} s, peak RSS "
              f"{r['figure_peak_rss_mib']:.0f} MiB; torch threads {r['torch_threads']}, BLAS threads "
              f"{r['blas_threads']})", flush=True)

    print(f"load average {os.getloadavg()}; every figure in a fresh process", flush=True)
    if args.only in (None, "global") and (r := run("global")):
        print("\n== global NH (Cellular-MNIST preset, 100x100, 50 cells, closure contact+volume+NH) ==")
        print(f"closure ΔH evaluations/s (16 chains x 50 proposals): wall {r['nh_closure_delta_per_s']:.0f}, "
              f"per CPU-second {r['nh_closure_delta_per_cpu_s']:.0f}  (target >= 150; authors' JAX sampler ~2.2/s)")
        print(f"NH term alone ΔH/s: wall {r['nh_term_delta_per_s']:.0f}, "
              f"per CPU-s {r['nh_term_delta_per_cpu_s']:.0f}; "
              f"plain full forward: wall {r['full_forward_states_per_s']:.1f} states/s, per CPU-s "
              f"{r['full_forward_states_per_cpu_s']:.1f}; ΔH by full recomputation: wall "
              f"{r['delta_by_full_recompute_per_s']:.1f}/s")
        print(f"spot check vs H(after)-H(before): max |err| = {r['spot_check_max_abs_err']:.2e} "
              f"(max |ΔH| {r['spot_check_max_abs_dH']:.2e}, network dtype {r['dtype']})")
        footer(r)
    if args.only in (None, "local") and (r := run("local")):
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
        footer(r)
    if args.only in (None, "pooled") and (r := run("pooled")):
        print(f"\n== pooled NH (features: radius {r['pooled_radius_sites']} sites, {r['pooled_channels']} channels; "
              f"position dim {r['pooled_position_dim']}, MLP width {r['pooled_hidden']}) ==")
        print(f"torch batched ΔH/s (16 x 50): wall {r['pooled_torch_delta_per_s']:.0f}, per CPU-s "
              f"{r['pooled_torch_delta_per_cpu_s']:.0f}  (method='crop': wall {r['pooled_torch_crop_delta_per_s']:.0f},"
              f" per CPU-s {r['pooled_torch_crop_delta_per_cpu_s']:.0f})")
        print(f"numpy one-at-a-time ΔH/s (cached Z): wall {r['pooled_numpy_delta_per_s']:.0f}, per CPU-s "
              f"{r['pooled_numpy_delta_per_cpu_s']:.0f}")
        print(f"spot check vs H(after)-H(before): max |err| = {r['spot_check_max_abs_err']:.2e} "
              f"(max |ΔH| {r['spot_check_max_abs_dH']:.2e}); numpy vs torch max rel err "
              f"{r['numpy_vs_torch_max_rel_err']:.1e}")
        footer(r)
    if args.only in (None, "memory"):
        print("\n== peak memory of one 16-chain parallel-sampler step (each in a fresh process) ==")
        for which in ("nh", "local", "pooled"):
            m = run(f"memory-{which}")
            if m is None:
                continue
            extra = m["peak_rss_mib"] - m["rss_before_step_mib"]
            note = "" if m["peak_rss_mib"] > m["peak_before_step_mib"] else " (at most; setup peak not exceeded)"
            print(f"{which}: peak RSS {m['peak_rss_mib']:.0f} MiB, RSS before the step "
                  f"{m['rss_before_step_mib']:.0f} MiB -> the step adds {extra:.0f} MiB{note}; "
                  f"step took wall {m['step_s']:.2f} s, CPU {m['step_cpu_s']:.2f} s", flush=True)


if __name__ == "__main__":
    main()
