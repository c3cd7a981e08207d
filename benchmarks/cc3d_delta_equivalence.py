"""ΔH of exported CC3D projects computed from their files' text vs the bundle's ΔH (prints the worst error).

20 random models (contact of order 1–4, volume, optionally external potential and directed motion, periodic or
not, copy order 1–3) on 14×15 lattices with random states; ~100 copy attempts each (deletions excluded).

    python benchmarks/cc3d_delta_equivalence.py
"""

import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_cc3d_export import attempts, random_model, random_state

from cc3d_steppables.evaluator import ProjectEvaluator
from cc3d_steppables.export import export_project


def main():
    rng = np.random.default_rng(123)
    worst, n = 0.0, 0
    for k in range(20):
        per, ext, dm = bool(k % 2), bool((k // 2) % 2), bool((k // 4) % 2)
        ham = random_model(rng, (14, 15), int(rng.integers(1, 4)), per, int(rng.integers(1, 5)),
                           int(rng.integers(1, 4)), ext, dm)
        st = random_state(rng, (14, 15), ham.n_types, int(rng.integers(2, 9)))
        with tempfile.TemporaryDirectory() as d:
            res = export_project(ham, Path(d), init=st, quiet=True, measure_cost=False)
            ev = ProjectEvaluator(res.project)
            s0 = res.initial_state
            v = s0.volumes()
            for site, a in attempts(rng, s0, ham.lattice.copy_order, per, 100):
                old = int(s0.ids[site])
                if old and v[old] == 1:
                    continue
                ref = ham.delta_np(s0, site, a)
                got = ev.delta(s0.ids, s0.types, site, a)
                worst = max(worst, abs(got - ref) / max(1, abs(ref)))
                n += 1
    print(f"{n} copy attempts on 20 random exported models: max |ΔH_files − ΔH_bundle| / max(1, |ΔH|) = {worst:.2e}")


if __name__ == "__main__":
    main()
