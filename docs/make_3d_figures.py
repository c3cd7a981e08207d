"""The 3-D pictures of the README: a model fitted by ``python -m training.fit --config default-3d`` rolled out with
the exact sampler from a fresh start, rendered with :mod:`neuralcpm_plugin.render` (pyvista, offscreen).

    python -m training.fit --config default-3d --out runs/default-3d
    python docs/make_3d_figures.py --run runs/default-3d --out docs

writes ``cellsort_3d.png`` (the final state: cell surfaces, and the same view clipped at the middle of x) and
``cellsort_3d.gif`` (the roll-out, clipped, one frame every ``--mcs``/20 MCS). The start is the generator's
(single voxels of 32 cells in a ball, as in the training data), the dynamics the classic CPM of CC3D/Morpheus.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from neuralcpm_plugin import render
from neuralcpm_plugin.bundle import load_bundle
from neuralcpm_plugin.sampling.exact import run_exact
from training.gen_cellsort import SCALES_3D, init_points


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/default-3d", help="run folder of a 3-D fit (its model/ bundle is used)")
    ap.add_argument("--out", default="docs", help="output folder")
    ap.add_argument("--mcs", type=float, default=200.0, help="MCS of the roll-out")
    ap.add_argument("--seed", type=int, default=7)
    a = ap.parse_args(argv)
    ham = load_bundle(Path(a.run) / "model").hamiltonian
    shape = tuple(ham.lattice.shape)
    if len(shape) != 3:
        raise SystemExit(f"{a.run}: the model's lattice {shape} is not 3-D")
    cfg = SCALES_3D["cpu"]
    radius = cfg["radius"] * shape[0] / cfg["size"]
    start = init_points(np.random.default_rng(a.seed), shape, int(cfg["cells"]), radius)
    res = run_exact(start, ham, a.mcs, seed=a.seed, proposal="classic", record_every=a.mcs / 20)
    out = Path(a.out)
    png = out / "cellsort_3d.png"
    render.render_3d_views(res.final, png, window_size=(420, 420),
                           titles=(f"fitted model, {a.mcs:g} MCS", "clipped at x = W/2"))
    gif = render.render_trajectory(res.frames, out / "cellsort_3d.gif", fps=6, window_size=(320, 320), clip="x",
                                   titles=[f"MCS {m:g}" for m in res.mcs])
    print(f"wrote {png} and {gif} ({len(res.frames)} frames; acceptance {res.stats['acceptance']:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
