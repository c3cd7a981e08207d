"""The paper's parallel sampler on Hamiltonians with neural or directed-motion terms: torch vs compiled back end.

The roll-outs of ``training.evaluate table1|table2 --sampler parallel`` run such models (the data model of
Table 2 with DirectedMotion; the pooled closures) on the parallel sampler. The torch back end recomputes every
lattice's per-patch features at every step (the batched exact pooled ΔH); the "compiled" back end
(``ParallelSampler(backend="compiled")``) runs the step on the exact sampler's compiled ΔH and incremental
caches. This script times both, in the same process, from the same starts: ``--chains`` type-permuted data
frames (``training.eval_table1.permuted_starts``, seed 0), P = ``--flips``, ``--steps`` steps per timed run,
median of ``--repeats`` runs after one warm-up run (numba compilation and the compiled state's construction
excluded), CPU time beside wall time, and the acceptance of each back end (they agree in distribution only:
different random streams). Peak resident memory (VmHWM) of the process at the end.

    python benchmarks/bench_parallel_neural.py --data runs/data/bipolar-cpu.npz --runs runs/t2/truth runs/t2/pos
    python benchmarks/bench_parallel_neural.py --data DATA.npz --runs RUN --backend compiled --steps 500
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="a data set .npz (the starts: type-permuted frames)")
    ap.add_argument("--runs", nargs="+", required=True, help="run folders or model bundles")
    ap.add_argument("--backend", choices=["torch", "compiled", "both"], default="both")
    ap.add_argument("--chains", type=int, default=10)
    ap.add_argument("--flips", type=int, default=50)
    ap.add_argument("--steps", type=int, default=50, help="steps per timed run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    a = ap.parse_args(argv)
    import numpy as np
    import torch
    from _measure import peak_rss_mib, timed

    from neuralcpm_plugin.bundle import load_bundle
    from neuralcpm_plugin.hamiltonian.base import Batch
    from neuralcpm_plugin.sampling.parallel import ParallelSampler
    from training.eval_table1 import find_bundle, load_data, permuted_starts

    torch.set_num_threads(a.threads)
    states, _ = load_data(a.data)
    starts = permuted_starts(states, a.chains, np.random.default_rng(0))
    n_ids = max(s.n_ids for s in starts)
    backends = ["torch", "compiled"] if a.backend == "both" else [a.backend]
    rows = []
    for run in a.runs:
        ham = load_bundle(find_bundle(run)).hamiltonian
        n_sites = int(np.prod(starts[0].shape))
        for bk in backends:
            batch = Batch.from_states(starts, n_ids=n_ids, periodic=ham.lattice.periodic)
            smp = ParallelSampler(ham, n_flips=a.flips, backend=bk)
            gen = torch.Generator().manual_seed(0)
            smp._run(batch, 2, gen)  # warm-up: compilation, the compiled state
            acc = []
            wall, cpu = timed(lambda smp=smp, batch=batch, gen=gen, acc=acc:
                              acc.append(smp._run(batch, a.steps, gen)["acceptance"]), a.repeats)
            steps_per_mcs = n_sites / a.flips
            row = {"run": str(run), "terms": [t.kind for t in ham.terms], "backend": bk, "chains": a.chains,
                   "P": a.flips, "ms_per_step_wall": 1e3 * wall / a.steps, "ms_per_step_cpu": 1e3 * cpu / a.steps,
                   "cpu_s_per_trajectory_mcs": cpu / a.steps * steps_per_mcs / a.chains,
                   "acceptance": float(np.mean(acc))}
            rows.append(row)
            print(f"{run} {row['terms']} {bk:>8}: {row['ms_per_step_wall']:8.2f} ms/step wall, "
                  f"{row['ms_per_step_cpu']:8.2f} ms/step CPU ({a.chains} chains, P = {a.flips}); "
                  f"{row['cpu_s_per_trajectory_mcs']:.3f} CPU-s per trajectory-MCS; acceptance "
                  f"{row['acceptance']:.4f}", flush=True)
    print(f"peak resident memory {peak_rss_mib():.0f} MiB; load average {os.getloadavg()[0]:.2f}; "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(json.dumps({"rows": rows, "peak_rss_mib": peak_rss_mib()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
