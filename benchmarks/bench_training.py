"""Time one PCD training iteration of the Cellular MNIST preset (paper Table 7: 16 chains, 0.5 MCS of the
parallel sampler with P = 50, 100×100 lattice, 50 cells) for the paper's NH + closure and the local NH + closure
(and the analytic cell-sorting model for reference). Prints the median of repeats and the split between
sampling and the gradient step.

    python benchmarks/bench_training.py [--models local-nh-closure,nh-closure,analytic] [--repeats 3]

The states are short classic-CPM runs from single-pixel cells (25 + 25, V* = 100) — the cost of an iteration
depends on the lattice, the cell count and the model, not on which digit the cells draw.
Targets (issue 5): ≤ 10 s per iteration with the local NH + closure, ≤ 15 min with the NH + closure
(the authors' JAX code needs ≈ 5.7 h here, extrapolated from measured sampler steps).
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


def bench(kind: str, states, repeats: int, log=print):
    from training.config import load_config
    from training.fit import _sampler_factory, build_model
    from training.pcd import PCDTrainer
    cfg = load_config("mnist", {"model": {"kind": kind, "neural": {} if kind.startswith("local") or
                                          kind == "analytic" else {"preset": "mnist"}}})
    ham, _ = build_model(cfg, states, seed=0)
    with tempfile.TemporaryDirectory() as d:
        tr = PCDTrainer(ham, states, cfg["pcd"], sampler_factory=_sampler_factory("parallel"), run_dir=d,
                        seed=0, progress=False, log=lambda m: None)
        t_samp, t_tot = [], []
        orig = tr._advance

        def timed_advance():
            t0 = time.perf_counter()
            r = orig()
            t_samp.append(time.perf_counter() - t0)
            return r

        tr._advance = timed_advance
        for _ in range(repeats):
            t0 = time.perf_counter()
            tr.step()
            t_tot.append(time.perf_counter() - t0)
    med, ms = statistics.median(t_tot), statistics.median(t_samp)
    log(f"{kind:>18}: one iteration {med:8.2f} s (median of {repeats}; sampling {ms:.2f} s, energies + gradient "
        f"{med - ms:.2f} s); all: {', '.join(f'{t:.2f}' for t in t_tot)}")
    return med


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="analytic,local-nh-closure,nh-closure")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    states = make_states()
    print(f"16 states 100x100, {len(states[0].cell_ids())} cells, made in {time.perf_counter() - t0:.1f} s; "
          f"torch threads {torch.get_num_threads()}")
    for kind in a.models.split(","):
        bench(kind.strip(), states, a.repeats if kind != "nh-closure" else max(1, min(a.repeats, 2)))


if __name__ == "__main__":
    main()
