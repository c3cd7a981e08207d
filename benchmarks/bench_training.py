"""Time one PCD training iteration of the Cellular MNIST preset (paper Table 7: 16 chains, 0.5 MCS of the
parallel sampler with P = 50, 100×100 lattice, 50 cells) for the paper's NH + closure and the local NH + closure
(and the analytic cell-sorting model for reference). Prints the median of repeats and the split between
sampling and the gradient step.

    python benchmarks/bench_training.py [--models local-nh-closure,local-pooled-closure,nh-closure,analytic]
                                        [--repeats 3] [--threads 1]

The states are short classic-CPM runs from single-pixel cells (25 + 25, V* = 100) — the cost of an iteration
depends on the lattice, the cell count and the model, not on which digit the cells draw.
Targets (issue 5): ≤ 10 s per iteration with the local NH + closure, ≤ 15 min with the NH + closure
(the authors' JAX code needs ≈ 5.7 h here, extrapolated from measured sampler steps).  Issue 12: ≤ 3 s per
iteration for the local + pooled closure with exact-sampler chains (compiled neural terms):

    python benchmarks/bench_training.py --models local-nh-closure,local-pooled-closure --sampler exact \
        --repeats 3 --threads 1

One untimed iteration runs first (numba compiles or loads its cache there; printed as "first iteration").
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch


def make_states(n=16, size=100, cells=50, target=100.0, seed=0):
    from training.gen_cellsort import generate_cellsort
    states, _ = generate_cellsort("a", "cpu", n_snapshots=n, seed=seed, size=size, cells=cells, target=target,
                                  radius=25.0, mcs=20.0, proposal="classic", progress=False)
    return states


def _neural_cfg(kind: str) -> dict:
    """The global NH's mnist preset for nh kinds; the defaults for the local, pooled and analytic kinds."""
    return {"preset": "mnist"} if kind in ("nh", "nh-closure") else {}


def bench(kind: str, states, repeats: int, log=print, sampler: str = "parallel", proposal: str = "boundary"):
    from training.config import load_config
    from training.fit import _sampler_factory, build_model
    from training.pcd import PCDTrainer
    cfg = load_config("mnist", {"model": {"kind": kind, "neural": _neural_cfg(kind)}})
    ham, _ = build_model(cfg, states, seed=0)
    with tempfile.TemporaryDirectory() as d:
        tr = PCDTrainer(ham, states, cfg["pcd"], sampler_factory=_sampler_factory(sampler, proposal), run_dir=d,
                        seed=0, progress=False, log=lambda m: None)
        t_samp, c_samp, t_tot, c_tot = [], [], [], []
        orig = tr._advance

        def timed_advance():
            t0, c0 = time.perf_counter(), time.process_time()
            r = orig()
            t_samp.append(time.perf_counter() - t0)
            c_samp.append(time.process_time() - c0)
            return r

        t0, c0 = time.perf_counter(), time.process_time()
        tr.step()  # compiles / loads the numba cache: not an iteration's cost
        first = (time.perf_counter() - t0, time.process_time() - c0)
        tr._advance = timed_advance
        for _ in range(repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            tr.step()
            t_tot.append(time.perf_counter() - t0)
            c_tot.append(time.process_time() - c0)
    med, ms = statistics.median(t_tot), statistics.median(t_samp)
    cm, cs = statistics.median(c_tot), statistics.median(c_samp)
    log(f"{kind:>20} ({sampler} sampler): one iteration {med:8.2f} s wall, {cm:.2f} s CPU (median of {repeats}; "
        f"sampling {ms:.2f} s wall / {cs:.2f} s CPU, energies + gradient {med - ms:.2f} s wall / {cm - cs:.2f} s CPU); "
        "all (wall): "
        f"{', '.join(f'{t:.2f}' for t in t_tot)}; first iteration {first[0]:.1f} s wall, {first[1]:.1f} s CPU")
    return med


def bench_extrapolated(kind: str, states, n_steps: int, log=print):
    """Time ``n_steps`` sampler steps on the 16-chain batch and one energy+gradient evaluation; extrapolate."""
    from neuralcpm_plugin.hamiltonian.base import Batch
    from neuralcpm_plugin.sampling.parallel import ParallelSampler
    from training.config import load_config
    from training.fit import build_model
    from training.parammap import ParamMap, using_params
    cfg = load_config("mnist", {"model": {"kind": kind, "neural": _neural_cfg(kind)}})
    ham, _ = build_model(cfg, states, seed=0)
    p = cfg["pcd"]
    batch = Batch.from_states(states)
    sampler = ParallelSampler(ham, int(p["flips"]))
    g = torch.Generator().manual_seed(0)
    steps = []
    for _ in range(n_steps):
        t0 = time.perf_counter()
        sampler.step(batch, g)
        steps.append(time.perf_counter() - t0)
    pm = ParamMap(ham)
    pos = Batch.from_states(states)
    t0 = time.perf_counter()
    with using_params(ham, pm.functional_params()):
        loss = ham.energy(pos).mean() - ham.energy(batch).mean()
    loss.backward()
    t_grad = time.perf_counter() - t0
    per_it = round(p["mcs"] * batch.ids[0].numel() / p["flips"])
    step = statistics.median(steps)
    log(f"{kind:>18}: sampler step {step:.3f} s (median of {n_steps}, 16 chains x {p['flips']} proposals), "
        f"energies + gradient {t_grad:.2f} s -> one iteration ≈ {per_it} x {step:.3f} + {t_grad:.2f} = "
        f"{per_it * step + t_grad:.1f} s (extrapolated from measured steps)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="analytic,local-nh-closure,nh-closure")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads (torch, BLAS, numba; default: neuralcpm_plugin.threads' policy)")
    p.add_argument("--extrapolate", type=int, default=0,
                   help="time this many sampler steps and extrapolate one iteration (for slow models)")
    p.add_argument("--sampler", choices=["parallel", "exact"], default="parallel",
                   help="pcd chains: the paper's parallel sampler (default) or the exact sequential one (compiled "
                        "local / pooled NH)")
    p.add_argument("--proposal", choices=["boundary", "classic"], default="boundary",
                   help="proposal of the exact sampler (the Cellular-MNIST generator's: boundary)")
    a = p.parse_args(argv)
    from neuralcpm_plugin.threads import configure_threads
    configure_threads(a.threads)
    t0 = time.perf_counter()
    states = make_states()
    print(f"16 states 100x100, {len(states[0].cell_ids())} cells, made in {time.perf_counter() - t0:.1f} s; "
          f"torch threads {torch.get_num_threads()}")
    for kind in a.models.split(","):
        if a.extrapolate:
            bench_extrapolated(kind.strip(), states, a.extrapolate)
        else:
            bench(kind.strip(), states, a.repeats, sampler=a.sampler, proposal=a.proposal)


if __name__ == "__main__":
    main()
