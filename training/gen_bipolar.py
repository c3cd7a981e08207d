"""`python -m training.generate bipolar` — bipolar axial organisation data (paper §4.4, App. A; SPEC.md → Data).

The authors' Morpheus model (``data_generation/Morpheus_model_bipolar.xml`` in kminartz/NeuralCPM), re-run
with this package's exact sampler and its ``DirectedMotion`` term instead of Morpheus:

* periodic square lattice (149 × 149 at paper scale: 125 + padding), copy neighbourhood order 2;
* 40 cells (20 + 20) seeded as single pixels at random sites of a centred disc of radius size/6
  (Morpheus ``InitCircle mode="random"``);
* per type: VolumeConstraint target 150, strength 1; DirectedMotion strength 0.2 whose direction depends on the
  cell centre's x: type 1 is pushed towards the central band 0.4–0.6·size ("inward"), type 2 is pushed
  outward while inside it ("outward") — type 1 gathers in the middle, type 2 at two poles;
* Contact J(1,0)=J(2,0)=16, J(1,1)=J(2,2)=6, J(1,2)=16 with ShapeSurface "norm" scaling over the order-6
  neighbourhood: per-pair J = J/18 in this project's units (28 neighbours);
* T = 2, 2,000 MCS with boundary proposals (Morpheus's edgelist stepper proposes only at cell boundaries).

Each final state is centred on the torus and rotated by a random angle about the lattice centre
(``scipy.ndimage.rotate``, nearest neighbour, ``reshape=False``), as the authors do for training.

Scales (``--scale``): ``paper`` = 149 × 149, 40 cells, 2,000 MCS, 1,000 snapshots; ``cpu`` = 99 × 99,
20 cells (10 + 10), 200 MCS, 128 snapshots (same cell volume and energies). Options override presets.

Output (reference ``.npz``): ``data`` (N, 2, H, W) int32 rotated final states, ``angle`` (N,) degrees,
``seed`` (N,), ``mcs`` (N,), ``meta`` (JSON bytes). Snapshot i uses seed ``seed·100003 + i``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from neuralcpm_plugin.errors import ConfigError
from neuralcpm_plugin.lattice import CellState

from .status import progress_counter

__all__ = ["SCALES", "add_arguments", "bipolar_hamiltonian", "generate_bipolar", "init_circle", "rotate_state",
           "run"]

SCALES = {
    "paper": {"size": 149, "cells": 40, "mcs": 2000.0, "n": 1000},
    "cpu": {"size": 99, "cells": 20, "mcs": 200.0, "n": 128},
}
MORPHEUS = {"J": {"1-0": 16.0, "2-0": 16.0, "1-1": 6.0, "1-2": 16.0, "2-2": 6.0}, "norm": 18.0,
            "contact_order": 6, "target": 150.0, "lambda": 1.0, "dm_strength": 0.2, "temperature": 2.0,
            "band": [0.4, 0.6]}


def bipolar_hamiltonian(size, *, params: dict | None = None):
    """The data-generating Hamiltonian in this project's units (per-pair J = Morpheus J / 18)."""
    from neuralcpm_plugin.hamiltonian.analytic import ContactEnergy, DirectedMotion, VolumeConstraint
    from neuralcpm_plugin.hamiltonian.base import Hamiltonian, LatticeSpec

    p = dict(MORPHEUS if params is None else params)
    shape = (int(size), int(size)) if np.isscalar(size) else tuple(int(s) for s in size)
    J = np.zeros((3, 3))
    for k, v in p["J"].items():
        a, b = (int(s) for s in k.split("-"))
        J[a, b] = J[b, a] = float(v) / float(p["norm"])
    lo, hi = p["band"]
    lat = LatticeSpec(shape, periodic=True, copy_order=2, contact_order=int(p["contact_order"]))
    terms = [
        ContactEnergy(J, int(p["contact_order"]), learnable=False, periodic=True),
        VolumeConstraint([0.0, p["lambda"], p["lambda"]], [0.0, p["target"], p["target"]], learnable=False,
                         periodic=True),
        DirectedMotion([0.0, p["dm_strength"], p["dm_strength"]],
                       [None, {"mode": "band", "axis": 1, "lo": lo, "hi": hi, "sense": "inward"},
                        {"mode": "band", "axis": 1, "lo": lo, "hi": hi, "sense": "outward"}],
                       learnable=False, periodic=True),
    ]
    return Hamiltonian(terms, lat, float(p["temperature"]), ["medium", "ct1", "ct2"])


def init_circle(rng: np.random.Generator, shape, n_cells: int, radius: float | None = None) -> CellState:
    """Single-pixel cells at distinct random sites within ``radius`` (default size/6) of the centre; ids 1..n,
    the first half type 1 ("ct1"), the rest type 2 ("ct2")."""
    radius = shape[1] / 6.0 if radius is None else float(radius)
    yy, xx = np.indices(shape)
    cy, cx = shape[0] / 2.0, shape[1] / 2.0
    cand = np.flatnonzero(((yy - cy) ** 2 + (xx - cx) ** 2).ravel() <= radius ** 2)
    if len(cand) < n_cells:
        raise ConfigError(f"{n_cells} cells do not fit in a disc of radius {radius}")
    pick = rng.choice(cand, size=n_cells, replace=False)
    ids = np.zeros(int(np.prod(shape)), np.int32)
    ids[pick] = np.arange(1, n_cells + 1)
    types = np.concatenate([[0], (np.arange(n_cells) // (n_cells / 2)).astype(np.int32) + 1]).astype(np.int32)
    return CellState(ids.reshape(shape), types)


def rotate_state(state: CellState, angle: float, *, centre: bool = True) -> CellState:
    """Rotate a 2-D state by ``angle`` degrees about the lattice centre (nearest neighbour, same shape).

    With ``centre`` the aggregate is first rolled to the lattice centre (a symmetry of the torus), so that
    the rotation does not cut it. Sites rotated in from outside the lattice become medium. Cells keep their
    ids and types (volumes may change by a few sites, as with the authors' ``scipy.ndimage.rotate``).
    """
    from neuralcpm_plugin.metrics.paper import centre_on_torus

    s = centre_on_torus(state) if centre else state
    ids = ndimage.rotate(s.ids, float(angle), reshape=False, order=0, mode="constant", cval=0, prefilter=False)
    return CellState(ids.astype(np.int32), s.types.copy(), dict(s.meta))


def generate_bipolar(out=None, *, scale: str = "cpu", n: int | None = None, size: int | None = None,
                     cells: int | None = None, mcs: float | None = None, seed: int = 0, start: int = 0,
                     rotate: bool = True, proposal: str = "boundary", progress: bool = True) -> Path:
    """Generate bipolar snapshots and write them to ``out`` (default ``runs/data/bipolar[-cpu].npz``)."""
    from neuralcpm_plugin.io.npz import save_npz
    from neuralcpm_plugin.sampling.exact import run_exact

    if scale not in SCALES:
        raise ConfigError(f"unknown scale {scale!r}; use one of {', '.join(SCALES)}")
    cfg = dict(SCALES[scale])
    for k, v in {"n": n, "size": size, "cells": cells, "mcs": mcs}.items():
        if v is not None:
            cfg[k] = v
    from .gen_cellsort import check_generator_options
    check_generator_options(cfg, min_size=12, where="bipolar: ")
    out = Path(out) if out else default_out(scale)
    shape = (int(cfg["size"]), int(cfg["size"]))
    H = bipolar_hamiltonian(shape)
    it = range(int(start), int(start) + int(cfg["n"]))
    bar = progress_counter(len(it), f"bipolar ({scale})", "snapshot", progress=progress)
    states, angles, seeds = [], [], []
    t0 = time.perf_counter()
    for i in it:
        s = int(seed) * 100003 + int(i)
        rng = np.random.default_rng(s)
        st = init_circle(rng, shape, int(cfg["cells"]))
        final = run_exact(st, H, float(cfg["mcs"]), seed=s, proposal=proposal).final
        angle = float(rng.uniform(0.0, 360.0)) if rotate else 0.0
        states.append(rotate_state(final, angle) if rotate else final)
        angles.append(angle)
        seeds.append(s)
        bar.update(1)
    bar.close()
    meta = {"dataset": "bipolar", "scale": scale, **cfg, "seed": seed, "start": start, "rotate": rotate,
            "proposal": proposal, "morpheus_params": MORPHEUS, "seconds": round(time.perf_counter() - t0, 1)}
    return save_npz(out, states, angle=np.array(angles), seed=np.array(seeds, np.int64),
                    mcs=np.full(len(states), round(cfg["mcs"]), np.int64),
                    meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scale", choices=sorted(SCALES), default="cpu",
                   help="preset: " + "; ".join(f"{k}: {v['size']}x{v['size']}, {v['cells']} cells, {v['n']} snapshots, "
                                               f"{v['mcs']:g} MCS" for k, v in sorted(SCALES.items())))
    p.add_argument("--out", default=None, help="output .npz (default runs/data/bipolar.npz | bipolar-cpu.npz)")
    p.add_argument("-n", "--n", type=int, default=None, help="number of snapshots")
    p.add_argument("--size", type=int, default=None, help="lattice side (sites)")
    p.add_argument("--cells", type=int, default=None, help="number of cells (half of each type)")
    p.add_argument("--mcs", type=float, default=None, help="MCS per snapshot (H*W attempts each)")
    p.add_argument("--seed", type=int, default=0, help="base seed (snapshot i uses seed*100003 + i)")
    p.add_argument("--start", type=int, default=0, help="index of the first snapshot (to split the work)")
    p.add_argument("--no-rotate", action="store_true", help="keep the simulated orientation")
    p.add_argument("--proposal", choices=["boundary", "classic"], default="boundary")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--model-out", default=None,
                   help="write the data-generating Hamiltonian (true J, V*, DirectedMotion, T = 2; lattice of --scale "
                        "or --size) as a model bundle into this folder instead of generating data: Table 2's "
                        "reference row, python -m training.evaluate table2 --runs 'data model (true H)=FOLDER'")


def default_out(scale: str) -> Path:
    """Where the data go without ``--out``: ``runs/data/bipolar.npz`` (paper) or ``runs/data/bipolar-<scale>.npz``."""
    return Path("runs/data") / ("bipolar.npz" if scale == "paper" else f"bipolar-{scale}.npz")


def save_model(out, *, scale: str = "cpu", size: int | None = None) -> Path:
    """Write :func:`bipolar_hamiltonian` for the lattice of ``scale`` (or ``size``) as a model bundle at ``out``.

    Its DirectedMotion is anchored to the lattice (the band is 0.4–0.6 of the x axis): rolled out from a
    rotated data frame it reorganises the aggregate along x, which Table 2's error (measured along the type-2
    axis) scores like any other orientation."""
    from neuralcpm_plugin.bundle import save_bundle

    if scale not in SCALES:
        raise ConfigError(f"unknown scale {scale!r}; use one of {', '.join(SCALES)}")
    n = int(size if size is not None else SCALES[scale]["size"])
    from .config import check_bounds
    from .gen_cellsort import MAX_SIZE
    check_bounds({"size": n}, {"size": (12, MAX_SIZE, "--size (lattice side)")}, where="bipolar: ")
    return save_bundle(out, bipolar_hamiltonian((n, n)),
                       provenance={"source": f"training.gen_bipolar.bipolar_hamiltonian(({n}, {n}))",
                                   "morpheus_params": MORPHEUS})


def run(args) -> int:
    from neuralcpm_plugin.cli import claim_output
    if getattr(args, "model_out", None):
        out = claim_output(args.model_out, option="--model-out", kind="dir", overwrite=args.overwrite)
        print(f"wrote {save_model(out, scale=args.scale, size=args.size)}")
        return 0
    out = claim_output(args.out or default_out(args.scale), overwrite=args.overwrite)
    path = generate_bipolar(out, scale=args.scale, n=args.n, size=args.size, cells=args.cells, mcs=args.mcs,
                            seed=args.seed, start=args.start, rotate=not args.no_rotate, proposal=args.proposal,
                            progress=not args.no_progress)
    print(f"wrote {path}")
    return 0
