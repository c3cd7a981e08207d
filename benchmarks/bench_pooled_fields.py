"""How well per-type potential fields carry a pooled NH between refreshes (the Morpheus energy hook's error).

A closure (contact + volume + local NH + pooled NH, default architectures; ``--gain`` multiplies the networks'
weight matrices to make F more non-linear than at initialisation) is run with the package's exact sampler
(a stand-in for Morpheus's dynamics: same model, exact ΔH), refreshing the fields every ``--refresh`` MCS as
``python -m morpheus_xml.run`` does.  Printed per refresh, relative RMSE of ΔH over all boundary attempts:

* fields of the whole neural part, and of the pooled part alone, fresh (at the refresh) → stale (K MCS later);
* the pooled part with its global context Z frozen at the refresh, K MCS later — the error the fields add on
  top of their per-site approximation of ΔZ (``pooled_expansion_rel_rmse`` of the hook);
* what the pooled part's stale error is made of, K MCS later: the error of fields rebuilt at that state (the
  floor of any per-type field: a field sees the type of the copied cell only, so a copy between two cells of
  one type gets ΔH 0 and several candidate cells of one type share one value), the share of the squared stale
  error that comes from copies between cells of one type, and the same-type share of the squared exact ΔH.

    python benchmarks/bench_pooled_fields.py [--size 32] [--refresh 10] [--chunks 3] [--gain 1]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _measure import peak_rss_mib


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--refresh", type=int, default=10)
    ap.add_argument("--chunks", type=int, default=3)
    ap.add_argument("--gain", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    from neuralcpm_plugin.threads import configure_threads
    configure_threads(a.threads)
    import torch

    from morpheus_xml.export import default_layout, neural_potential_fields
    from morpheus_xml.run import _current_Z, _expansion_error, _FrozenZ, _stale_error
    from neuralcpm_plugin.hamiltonian import LatticeSpec, analytic
    from neuralcpm_plugin.hamiltonian.closure import closure_hamiltonian
    from neuralcpm_plugin.hamiltonian.local_nh import LocalNeuralHamiltonian
    from neuralcpm_plugin.hamiltonian.pooled_nh import PooledNeuralHamiltonian
    from neuralcpm_plugin.sampling.exact import ExactSampler
    shape = (a.size, a.size)
    J = np.array([[0.0, 0.625, 0.25], [0.625, 0.25, 1.125], [0.25, 1.125, 0.25]])
    loc = LocalNeuralHamiltonian({"n_types": 2}, seed=a.seed)
    pool = PooledNeuralHamiltonian({"n_types": 2, "lattice_shape": list(shape)}, seed=a.seed)
    with torch.no_grad():
        for t in (loc, pool):
            for p in t.parameters():
                if p.dim() > 1:
                    p.mul_(a.gain)
    ham = closure_hamiltonian([analytic.ContactEnergy(J, 2), analytic.VolumeConstraint([0, 0.5, 0.5], [0, 40, 40])],
                              {"w_l": [loc], "w_g": [pool]}, LatticeSpec(shape), 1.0, ["medium", "a", "b"], w_a=1.0)
    state = default_layout(shape, 2, [0, 40, 40], cells_per_type=max(2, a.size ** 2 // 200), seed=a.seed)
    smp = ExactSampler(state, ham, seed=a.seed)
    w0, c0 = time.perf_counter(), time.process_time()
    smp.step(10)  # grow the seeded cells first
    print(f"{a.size}x{a.size}, {len(state.cell_ids())} cells, gain {a.gain}, refresh {a.refresh} MCS; "
          f"load average {os.getloadavg()}", flush=True)
    neural = ham.neural_terms()
    for k in range(a.chunks):
        st = smp.state
        phi, stats = neural_potential_fields(neural, st, 2, parts={"pooled": [pool]})
        frozen = [_FrozenZ(pool, _current_Z(pool, st, True, None))]
        smp.step(a.refresh)
        s1 = smp.state
        stale = _stale_error(phi, neural, s1, 2, True)
        pstale = _stale_error(stats["parts"]["pooled"]["phi"], [pool], s1, 2, True)
        exp = _expansion_error(frozen, s1, 2, True)
        print(f"refresh {k}: fields of the neural part {stats['rel_rmse']:.3g} -> {stale:.3g}; pooled part alone "
              f"{stats['parts']['pooled']['rel_rmse']:.3g} -> {pstale:.3g}; pooled with Z frozen for {a.refresh} MCS "
              f"{exp:.3g}  (acceptance {smp.stats()['acceptance']:.2f})", flush=True)
        _, rebuilt = neural_potential_fields([pool], s1, 2)
        same, dsame = _same_type_shares(stats["parts"]["pooled"]["phi"], pool, s1)
        print(f"    pooled part {a.refresh} MCS later: fields rebuilt there {rebuilt['rel_rmse']:.3g} (per-type floor); "
              f"same-type copies carry {same:.0%} of the stale squared error and {dsame:.0%} of the squared "
              "exact ΔH", flush=True)
    print(f"wall {time.perf_counter() - w0:.0f} s, CPU {time.process_time() - c0:.0f} s, peak RSS "
          f"{peak_rss_mib():.0f} MiB")


def _same_type_shares(phi, term, state):
    """(share of the fields' squared error, share of the squared exact ΔH) from copies between two cells of one
    type, over every boundary attempt of ``state``."""
    from morpheus_xml.export import boundary_attempts, neural_delta
    sites, new = boundary_attempts(state, 2, True)
    D = neural_delta([term], state, sites, new)
    W = state.shape[1]
    t_old = state.types[state.ids.ravel()[sites]]
    t_new = state.types[new]
    err = phi[t_new, sites // W, sites % W] - phi[t_old, sites // W, sites % W] - D
    m = t_old == t_new
    return float((err[m] ** 2).sum() / max((err ** 2).sum(), 1e-300)), \
        float((D[m] ** 2).sum() / max((D ** 2).sum(), 1e-300))


if __name__ == "__main__":
    main()
