"""Cost of the CC3D Python energy term (the code CC3D calls once per copy attempt between different cells).

Prints, per exported term kind, the median time of one ΔH call of the project's ``PythonEnergy`` (as it runs
inside CompuCell3D, without CC3D's ~1 µs call overhead; neural terms both on the numpy evaluator and on the
compiled one that the project uses when numba imports; BLAS limited to one thread as in the project) on copy attempts drawn from a relaxed 100×100
cell-sorting state, and the implied upper bound on MCS/s (calls per MCS = lattice sites × fraction of
attempts between different cells).

    python benchmarks/bench_cc3d_python_term.py [--size 100] [--calls 2000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from cc3d_steppables import steppables as stp
from cc3d_steppables.export import default_initial_state, export_project
from neuralcpm_plugin.hamiltonian.analytic import ContactEnergy, DirectedMotion, ExternalPotential, VolumeConstraint
from neuralcpm_plugin.hamiltonian.base import Hamiltonian, LatticeSpec
from neuralcpm_plugin.hamiltonian.local_nh import LocalNeuralHamiltonian
from neuralcpm_plugin.lattice import neighbour_offsets
from neuralcpm_plugin.sampling.exact import run_exact


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=100)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    stp.limit_blas_threads(1)
    shape = (a.size, a.size)
    lat = LatticeSpec(shape, True, 2, 2)
    base = [ContactEnergy([[0, 2, 2], [2, 1, 1.6], [2, 1.6, 1]], 2), VolumeConstraint([0, 0.8, 0.8], [0, 90, 90])]
    h0 = Hamiltonian(base, lat, 1.0, ["medium", "A", "B"])
    state = run_exact(default_initial_state(h0, seed=0), h0, 100, seed=0).final
    rng = np.random.default_rng(0)
    extra = {
        "external": ExternalPotential([0, 0.5, -0.5], rng.normal(size=shape)),
        "directed_motion": DirectedMotion([0, 0.2, 0.2], [None, {"mode": "band", "axis": 1, "lo": 0.4, "hi": 0.6,
                                                                "sense": "inward"},
                                                          {"mode": "constant", "vector": [0.0, 1.0]}]),
        "local_nh (C=16, s=4, k=3)": LocalNeuralHamiltonian({"n_types": 2}, seed=0),
    }
    offs = neighbour_offsets(2)
    atts = []
    while len(atts) < a.calls:
        s = rng.integers(0, a.size, 2)
        t = (s + offs[rng.integers(8)]) % a.size
        if state.ids[tuple(s)] != state.ids[tuple(t)]:
            atts.append((tuple(int(v) for v in t), int(state.ids[tuple(s)])))
    diff = np.mean([np.mean(np.roll(state.ids, tuple(-o), (0, 1)) != state.ids) for o in offs])
    calls_per_mcs = a.size * a.size * diff
    print(f"{a.size}x{a.size} relaxed cell-sorting state: {calls_per_mcs:.0f} Python calls per MCS "
          f"({diff:.3f} of attempts between different cells)")
    with tempfile.TemporaryDirectory() as d:
        for name, term in extra.items():
            ham = Hamiltonian(base + [term], lat, 1.0, ["medium", "A", "B"])
            res = export_project(ham, Path(d) / name.split()[0], init=state, quiet=True, measure_cost=False)
            sim = res.directory / "Simulation"
            for compiled in ([False, True] if "nh" in name else [None]):
                energy = stp.load_python_energy(sim, stp.LatticeMirror(state.ids, state.types), compiled=compiled)
                energy.delta(*atts[0])
                times = []
                for _ in range(a.repeats):
                    t0 = time.perf_counter()
                    for s, c in atts:
                        energy.delta(s, c)
                    times.append((time.perf_counter() - t0) / len(atts))
                us = float(np.median(times)) * 1e6
                label = name + {None: "", False: " numpy", True: " compiled"}[compiled]
                print(f"  {label:37s} {us:8.1f} µs/call  → ≤ {1e6 / (us + 1.0) / calls_per_mcs:8.2f} MCS/s "
                      f"(median of {a.repeats} × {len(atts)} calls)")


if __name__ == "__main__":
    main()
