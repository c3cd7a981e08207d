"""Speed and memory of the paper's parallel sampler (copy attempts per second).

Setting (issue 3): 100×100 torus, 49 cells of 100 sites (10×10 squares, then 20 MCS of the sampler to roughen
them), contact + volume Hamiltonian (P1 parameters), P = 50 proposals per chain and step, 1 and 16 chains.
Each configuration runs in its own subprocess, so that its peak resident memory (VmHWM, see
``benchmarks/_measure.py``) is its own.
Reported: median (and min–max) of ``--repeats`` timed runs of ``--steps`` steps each, after one warm-up run
(numba compilation excluded), attempts = proposals actually made.

    python benchmarks/bench_parallel.py                 # both back ends, 1 and 16 chains
    python benchmarks/bench_parallel.py --backend torch --chains 16 --repeats 7
    python benchmarks/bench_parallel.py --device cuda   # torch back end on a GPU
    python benchmarks/bench_parallel.py --drift         # statistics vs the real-tool reference runs (P1, P2)

``--drift``: from the 16 initial states of each reference scenario (``../shared/reference-data``, Morpheus P1 and
CompuCell3D P2, classic sequential Metropolis), ``--seeds`` runs per state of the parallel sampler (P = 50,
numba back end) to 100/500/1000 of *its* MCS; prints our mean ± SE of every summary statistic next to the
tools' and z = (ours − theirs)/√(SE² + SE²). This is the parallel sampler's drift from the exact dynamics at
equal nominal MCS (its MCS changes far more sites than a classic MCS, so large |z| are expected). With
``--vs-exact`` the same table also holds the sequential boundary proposal (P = 1: the same proposal without
the parallelism) and the exact classic sampler (``sampling.exact.run_exact``), which separates the drift due to
the boundary proposal (no Hastings correction) from the drift due to P simultaneous copies.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def _state(H=100, W=100):
    import numpy as np

    from neuralcpm_plugin.lattice import CellState
    ids = np.zeros((H, W), np.int32)
    c = 1
    for i in range(7):
        for j in range(7):
            y, x = 2 + i * 14, 2 + j * 14
            ids[y:y + 10, x:x + 10] = c
            c += 1
    types = np.array([0] + [1 + (k % 2) for k in range(c - 1)], np.int32)
    return CellState(ids, types)


def _hamiltonian(shape):
    from neuralcpm_plugin.hamiltonian.analytic import cellsort_hamiltonian
    from neuralcpm_plugin.hamiltonian.base import LatticeSpec
    return cellsort_hamiltonian({(1, 0): 0.625, (2, 0): 0.25, (1, 1): 0.25, (2, 2): 0.25, (1, 2): 1.125}, 0.5, 100,
                                LatticeSpec(shape), T=1.0)


def _roughened(path, chains=16):
    """16 states: the squares after 20 MCS of the sampler (numba, serial), saved for the child processes."""
    import numpy as np
    import torch

    from neuralcpm_plugin.hamiltonian.base import Batch
    from neuralcpm_plugin.sampling.parallel import ParallelSampler
    s = _state()
    batch = Batch.from_states([s] * chains)
    ParallelSampler(_hamiltonian(s.shape), 50, backend="numba").sweep(batch, 20.0, torch.Generator().manual_seed(0))
    np.savez(path, ids=batch.ids.numpy(), types=s.types)


def child(args) -> dict:
    import numpy as np
    import torch

    from neuralcpm_plugin.hamiltonian.base import Batch
    from neuralcpm_plugin.lattice import CellState
    from neuralcpm_plugin.sampling.parallel import ParallelSampler

    if args.threads:
        torch.set_num_threads(args.threads)
    chains = args.chains[0]
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _measure import peak_rss_mib
    rss0 = peak_rss_mib()
    z = np.load(args.states)
    states = [CellState(z["ids"][b % len(z["ids"])], z["types"]) for b in range(chains)]
    dev = torch.device(args.device)
    ham = _hamiltonian(states[0].shape).to(dev)
    batch = Batch.from_states(states, device=dev)
    smp = ParallelSampler(ham, args.P, backend=args.backend, threads=args.numba_threads)
    g = torch.Generator(device=dev).manual_seed(1)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    smp._run(batch, max(2, args.steps // 10), g)  # warm-up (compilation, caches)
    rates, cpu_rates = [], []
    for _ in range(args.repeats):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        st = smp._run(batch, args.steps, g)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        rates.append(st["attempts"] / (time.perf_counter() - t0))
        cpu_rates.append(st["attempts"] / max(time.process_time() - c0, 1e-9))
    out = {"backend": args.backend, "chains": chains, "P": args.P, "device": args.device,
           "threads": torch.get_num_threads(), "numba_threads": _numba_threads() if args.numba_threads else 1,
           "median": statistics.median(rates), "cpu_median": statistics.median(cpu_rates), "min": min(rates), "max": max(rates), "repeats": len(rates),
           "steps": args.steps, "acceptance": st["acceptance"],
           "peak_rss_mb": peak_rss_mib(), "rss_after_imports_mb": rss0}
    if dev.type == "cuda":
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def _numba_threads():
    try:
        import numba
        return numba.get_num_threads()
    except ImportError:  # pragma: no cover
        return None


SCENARIOS = {  # the reference runs' parameters (../shared/reference-data/README.md), per unordered Moore pair
    "P1_morpheus": {"J": {(1, 0): 0.625, (2, 0): 0.25, (1, 1): 0.25, (2, 2): 0.25, (1, 2): 1.125}, "lam": 0.5,
                    "target": 100.0},
    "P2_cc3d": {"J": {(1, 0): 2.0, (2, 0): 2.0, (1, 1): 1.0, (2, 2): 1.0, (1, 2): 1.6}, "lam": 0.8, "target": 90.0},
}


def _mean_se(values):
    import numpy as np
    v = np.asarray(values, dtype=float)
    return v.mean(), (v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else 0.0)


def drift(args) -> None:
    from pathlib import Path

    import numpy as np
    import torch

    from neuralcpm_plugin.hamiltonian.analytic import cellsort_hamiltonian
    from neuralcpm_plugin.hamiltonian.base import Batch, LatticeSpec
    from neuralcpm_plugin.lattice import CellState
    from neuralcpm_plugin.metrics.stats import summary_stats
    from neuralcpm_plugin.sampling.parallel import ParallelSampler

    ref_dir = Path(args.reference)
    ref = json.loads((ref_dir / "summary_stats.json").read_text())["scenarios"]
    marks = sorted(int(m) for m in args.drift_mcs)
    for name, par in SCENARIOS.items():
        runs = sorted((ref_dir / name).glob("run_*.npz"))
        if not runs or name not in ref:
            print(f"{name}: no reference runs under {ref_dir / name}; skipped")
            continue
        states = []
        for r in runs:
            d = np.load(r)["data"][0]
            states.append(CellState.from_maps(d[0], d[1]))
        chains = [s for s in states for _ in range(args.seeds)]
        ham = cellsort_hamiltonian(par["J"], par["lam"], par["target"], LatticeSpec(states[0].shape), T=1.0)
        t0 = time.perf_counter()
        results = {}  # sampler name -> {mcs: [summary dicts]}
        samplers = [(f"parallel P={args.P}", args.P)] + ([("boundary P=1", 1)] if args.vs_exact else [])
        for label, P in samplers:
            batch = Batch.from_states(chains)
            smp = ParallelSampler(ham, P, backend="numba")
            g = torch.Generator().manual_seed(12345)
            done, res = 0, {}
            for m in marks:
                smp.sweep(batch, m - done, g)
                done = m
                res[m] = [summary_stats(s, n_types=2) for s in batch.to_states()]
            results[label] = res
        if args.vs_exact:
            from neuralcpm_plugin.sampling.exact import run_exact
            res = {m: [] for m in marks}
            for i, s in enumerate(chains):
                out = run_exact(s, ham, marks[-1], seed=1000 + i, proposal="classic", record_every=marks[0])
                for fr, mc in zip(out.frames, out.mcs):
                    if round(mc) in res:
                        res[round(mc)].append(summary_stats(fr, n_types=2))
            results["exact classic"] = res
        rr = ref[name]
        print(f"\n{name}: {len(runs)} reference initial states x {args.seeds} seeds; tool = the reference runs "
              f"(16 each); z = (sampler - tool)/sqrt(SE^2 + SE^2); {time.perf_counter() - t0:.0f} s")
        head = "".join(f"{lab:>26s} {'z':>6s}" for lab in results)
        print(f"{'MCS':>5s} {'statistic':>16s} {'tool (mean ± SE)':>22s}{head}")
        for m in marks:
            if m not in rr["mcs"]:
                continue
            k = rr["mcs"].index(m)
            for key in rr["mean"]:
                mt, stt = rr["mean"][key][k], rr["se"][key][k]
                line = f"{m:5d} {key:>16s} {mt:12.3f} ± {stt:7.3f}"
                for res in results.values():
                    mo, so = _mean_se([x[key] for x in res[m]])
                    den = float(np.hypot(so, stt))
                    z = (mo - mt) / den if den > 0 else (0.0 if mo == mt else float("inf"))
                    line += f"{mo:14.3f} ± {so:8.3f} {z:6.1f}"
                print(line)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=["torch", "numba", "both"], default="both")
    ap.add_argument("--chains", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--P", type=int, default=50)
    ap.add_argument("--steps", type=int, default=0, help="steps per timed run (default: torch 200, numba 2000)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    ap.add_argument("--numba-threads", action="store_true", help="numba back end: chains in parallel threads")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--states", help=argparse.SUPPRESS)
    ap.add_argument("--drift", action="store_true", help="compare statistics with the reference runs")
    ap.add_argument("--drift-mcs", nargs="+", default=["100", "500", "1000"])
    ap.add_argument("--seeds", type=int, default=2, help="--drift: runs per reference initial state")
    ap.add_argument("--vs-exact", action="store_true",
                    help="--drift: also the sequential boundary proposal (P=1) and the exact classic sampler")
    ap.add_argument("--reference", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                                                        "shared", "reference-data"))
    args = ap.parse_args(argv)
    if args.drift:
        drift(args)
        return
    if args.child:
        print(json.dumps(child(args)))
        return
    import tempfile
    tmp = tempfile.mkdtemp(prefix="bench_parallel_")
    states = os.path.join(tmp, "states.npz")
    _roughened(states)
    backends = ["torch", "numba"] if args.backend == "both" else [args.backend]
    if args.device != "cpu":
        backends = [b for b in backends if b == "torch"]
    print(f"parallel sampler, 100x100 torus, 49 cells x 100 sites, contact+volume, P={args.P}, device={args.device}")
    print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (the figures scale with it)")
    print(f"{'backend':8s} {'chains':>6s} {'attempts/s (median)':>20s} {'min':>12s} {'max':>12s} "
          f"{'per CPU-s':>12s} {'accept':>7s} {'peak RSS MB':>11s} {'(+ over imports)':>16s} {'threads':>7s}")
    for be in backends:
        for ch in args.chains:
            steps = args.steps or (200 if be == "torch" else 2000)
            cmd = [sys.executable, os.path.abspath(__file__), "--child", "--backend", be, "--chains", str(ch),
                   "--P", str(args.P), "--steps", str(steps), "--repeats", str(args.repeats),
                   "--device", args.device, "--threads", str(args.threads), "--states", states]
            if args.numba_threads:
                cmd.append("--numba-threads")
            res = subprocess.run(cmd, check=False, capture_output=True, text=True)
            if res.returncode != 0:
                print(f"{be:8s} {ch:6d} FAILED: {res.stderr.strip().splitlines()[-1:]}")
                continue
            r = json.loads(res.stdout.strip().splitlines()[-1])
            extra = f"  peak CUDA {r['peak_cuda_mb']:.1f} MB" if "peak_cuda_mb" in r else ""
            thr = r["numba_threads"] if be == "numba" else r["threads"]
            print(f"{be:8s} {ch:6d} {r['median']:20,.0f} {r['min']:12,.0f} {r['max']:12,.0f} "
                  f"{r['cpu_median']:12,.0f} {r['acceptance']:7.3f} {r['peak_rss_mb']:11.0f} "
                  f"{r['peak_rss_mb'] - r['rss_after_imports_mb']:16.1f} {thr:7d}{extra}")
    print(f"load average after: {os.getloadavg()[0]:.1f}.  'per CPU-s' = attempts per second of this process's CPU "
          "time (all its threads), a load-independent figure")
    print("(reference: the authors' JAX sampler ~3,700 attempts/s with 16 chains, ~4,700/s with 1 chain, this CPU)")


if __name__ == "__main__":
    main()
