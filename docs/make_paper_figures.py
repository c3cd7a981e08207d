"""Make the pictures in docs/ for the Cellular MNIST and bipolar experiments.

    python docs/make_paper_figures.py                       # data pictures (needs only the package)
    python docs/make_paper_figures.py --run runs/mnist-cpu  # + training curves and a roll-out of a trained run

Writes (each < 2 MB):
  docs/cellular_mnist_samples.png   ten paper-scale (100x100) Cellular MNIST training snapshots with labels
  docs/cellular_mnist_generation.gif  the data-generating model (exact sampler) forming a digit
  docs/bipolar_samples.png          CPU-scale (99x99) bipolar training snapshots (randomly rotated)
  docs/bipolar_generation.gif       the data-generating bipolar model (exact sampler, DirectedMotion)
  docs/<name>_training_curves.png   from RUN/metrics.csv            (with --run)
  docs/<name>_rollout.gif           a roll-out of RUN's model from a permuted data frame (with --run --data)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

DOCS = Path(__file__).resolve().parent


def data_pictures(seed: int = 0) -> None:
    from neuralcpm_plugin.render import render_grid, render_trajectory
    from neuralcpm_plugin.sampling.exact import run_exact
    from training import gen_bipolar, gen_mnist

    c = gen_mnist.SCALES["paper"]
    shape = (c["size"], c["size"])
    snaps = [gen_mnist._snapshot(i, seed, shape, c["cells"], c["radius"], c["mcs"], 8.0, "boundary", c["target"])
             for i in range(10)]
    render_grid([s[0] for s in snaps], DOCS / "cellular_mnist_samples.png", ncols=5,
                titles=[f"digit {s[1]}" for s in snaps], scale=3)
    # one generation trajectory
    rng = np.random.default_rng(seed * 100003)
    images, labels = gen_mnist.load_digits()
    lab = int(rng.integers(10))
    pool = np.flatnonzero(labels == lab)
    field = gen_mnist.digit_field(images[int(pool[rng.integers(len(pool))])], shape)
    start = gen_mnist.init_points(rng, shape, c["cells"], c["radius"])
    res = run_exact(start, gen_mnist.mnist_hamiltonian(field), c["mcs"], seed=seed, proposal="boundary",
                    record_every=c["mcs"] / 40)
    render_trajectory(res.frames, DOCS / "cellular_mnist_generation.gif", fps=8, window_size=(300, 300),
                      titles=[f"digit {lab}: MCS {m:.1f}" for m in res.mcs])

    b = gen_bipolar.SCALES["cpu"]
    bshape = (b["size"], b["size"])
    H = gen_bipolar.bipolar_hamiltonian(bshape)
    rng = np.random.default_rng(seed)
    start = gen_bipolar.init_circle(rng, bshape, b["cells"])
    res = run_exact(start, H, b["mcs"], seed=seed, proposal="boundary", record_every=b["mcs"] / 40)
    render_trajectory(res.frames, DOCS / "bipolar_generation.gif", fps=8, window_size=(300, 300),
                      titles=[f"bipolar data model: MCS {m:.0f}" for m in res.mcs])
    finals = []
    for i in range(8):
        r = np.random.default_rng(seed * 100003 + i)
        st = gen_bipolar.init_circle(r, bshape, b["cells"])
        fin = run_exact(st, H, b["mcs"], seed=seed * 100003 + i, proposal="boundary").final
        finals.append(gen_bipolar.rotate_state(fin, float(r.uniform(0, 360))))
    render_grid(finals, DOCS / "bipolar_samples.png", ncols=4, scale=2)


def run_pictures(run: Path, data: Path | None, name: str, frames: int, mcs_per_frame: float, seed: int) -> None:
    from neuralcpm_plugin.bundle import load_bundle
    from neuralcpm_plugin.render import plot_training_curves, render_trajectory
    from training.eval_table1 import find_bundle, load_data, permuted_starts, rollout, states_of

    csv = run / "metrics.csv"
    if csv.exists():
        plot_training_curves(csv, DOCS / f"{name}_training_curves.png", title=f"{name}: training curves",
                             smooth=5)
    if data is not None:
        states, _ = load_data(data)
        ham = load_bundle(find_bundle(run)).hamiltonian
        start = permuted_starts(states, 1, np.random.default_rng(seed))
        traj = rollout(ham, start, frames=frames, mcs_per_frame=mcs_per_frame, seed=seed, chains=1)
        render_trajectory(states_of(traj[0]), DOCS / f"{name}_rollout.gif", fps=8, window_size=(300, 300),
                          titles=[f"{name}: frame {f}" for f in range(traj.shape[1])])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, default=None, help="a training run folder (metrics.csv, model/)")
    p.add_argument("--data", type=Path, default=None, help="its training data (for the roll-out GIF)")
    p.add_argument("--name", default=None, help="file name stem for the run's pictures (default: run folder name)")
    p.add_argument("--frames", type=int, default=40)
    p.add_argument("--mcs-per-frame", type=float, default=0.67)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-data", action="store_true", help="only the run's pictures")
    a = p.parse_args(argv)
    if not a.skip_data:
        data_pictures(a.seed)
    if a.run is not None:
        run_pictures(a.run, a.data, a.name or a.run.name, a.frames, a.mcs_per_frame, a.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
