"""`python -m training.generate cellsort --scenario a|b` — the cell-sorting data sets (paper §4.2, App. A).

Each snapshot is the final state of an independent run from single-pixel cells scattered in a centred disc,
under contact + volume energies of the Edelstein-Keshet & Xiao scenarios (paper scaling, T = 1):

======  =========  =========  =========  =========  =========  =====
 scen.    J(1,0)     J(2,0)     J(1,1)     J(1,2)     J(2,2)      λ
======  =========  =========  =========  =========  =========  =====
  a       0.5        0.5       0.333333     0.2      0.266667    0.1
  b       2.5        1.0        1.0         4.5        1.0       0.5
======  =========  =========  =========  =========  =========  =====

The paper / reference-code J sums the 4 Moore half-offsets and divides by 4, so this project's per-pair J is
J_paper / 4 (:func:`~neuralcpm_plugin.hamiltonian.analytic.from_paper_scale`). λ is used as the paper
states it (the authors' code passes it through softplus and adds 1e-3, i.e. 0.101 / 0.501: negligible);
``λ·(V − V*)²`` per cell.

Scales (``--scale``), the paper preset following the authors' generator (``generate_data_cellsort.py``):

* ``paper``: 200×200 periodic, 100 cells (ids 1–50 type 1, 51–100 type 2), V* = 200, single-pixel starts
  at distinct sites with distance < 60 from (100, 100), 500 MCS, 128 snapshots.
* ``cpu``: 48×48, 16 cells (8 + 8), V* = 60, start radius 14, 200 MCS, 32 snapshots (~10 s on one core).

Three dimensions (``--dim 3``; the paper has no 3-D cell-sorting data): the same scenarios on a periodic cubic
lattice, copy and contact neighbourhood order 2 (the 18 face and edge neighbours, CC3D's and Morpheus's
order 2), the *per-pair* J of the 2-D scenario (J_paper / 4; note that
:func:`~neuralcpm_plugin.hamiltonian.analytic.to_paper_scale` reports 3-D J as 9 × per-pair, the length of
the 3-D half stencil), single-voxel starts in a centred ball:

* ``cpu``: 24³, 32 cells, V* = 64, start radius 8, 100 MCS, 16 snapshots (a few seconds).
* ``paper``: 64³, 256 cells, V* = 200 (the size of Toda et al.'s aggregates, 200–240 cells), start radius
  23, 200 MCS, 32 snapshots (about 15 s per snapshot on one core).

Sampler (documented choice): the exact sequential sampler (:mod:`neuralcpm_plugin.sampling.exact`) with
the boundary-site proposal by default — the authors' generator ran its parallel sampler, which proposes only at
cell boundaries, for 500 "MCS" of H·W proposals; ``--proposal boundary`` makes the same number of
boundary proposals one at a time (no parallel approximation), ``--proposal classic`` is the Graner–Glazier
dynamics of CC3D/Morpheus (much slower to sort per MCS). ``--sampler parallel`` runs the project's
parallel sampler (paper Algorithm 2, P = 100, all snapshots as one batch of chains) instead.

Output (reference ``.npz``): ``data`` (N, 2, H, W) — (N, 2, D, H, W) in 3-D — int32 final states, ``seed`` (N,) per-snapshot seeds,
``mcs`` (N,), ``sorting_index`` (N,), ``params_json`` (UTF-8 JSON bytes as uint8: the Hamiltonian in this
project's units and in paper scaling, the scale preset, the sampler). Snapshot i uses seed
``seed·100003 + i`` for its start and its sampler, so the file is a deterministic function of the options.
The sorting index (fraction of cell–cell contacts that are heterotypic) over time is printed.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from neuralcpm_plugin.errors import ConfigError
from neuralcpm_plugin.hamiltonian.analytic import from_paper_scale, to_paper_scale
from neuralcpm_plugin.hamiltonian.base import LatticeSpec
from neuralcpm_plugin.lattice import CellState
from neuralcpm_plugin.metrics.stats import finite_column_means, sorting_index

from .status import progress_counter

__all__ = ["SCALES", "SCENARIOS", "add_arguments", "cellsort_hamiltonian_for", "generate_cellsort", "init_points",
           "run", "save_cellsort"]

SCENARIOS = {  # paper scaling (reference code: J = 4 × ours), T = 1
    "a": {"J": {"1-0": 0.5, "2-0": 0.5, "1-1": 0.333333, "1-2": 0.2, "2-2": 0.266667}, "lambda": 0.1},
    "b": {"J": {"1-0": 2.5, "2-0": 1.0, "1-1": 1.0, "1-2": 4.5, "2-2": 1.0}, "lambda": 0.5},
}
SCALES = {
    "paper": {"size": 200, "cells": 100, "target": 200.0, "radius": 60.0, "mcs": 500.0, "n": 128},
    "cpu": {"size": 48, "cells": 16, "target": 60.0, "radius": 14.0, "mcs": 200.0, "n": 32},
}
SCALES_3D = {
    "paper": {"size": 64, "cells": 256, "target": 200.0, "radius": 23.0, "mcs": 200.0, "n": 32},
    "cpu": {"size": 24, "cells": 32, "target": 64.0, "radius": 8.0, "mcs": 100.0, "n": 16},
}
N_CHECKPOINTS = 10


def init_points(rng: np.random.Generator, shape, n_cells: int, radius: float) -> CellState:
    """Single-pixel cells at distinct random sites with distance < ``radius`` from the centre (H//2, W//2);
    ids 1..n, the first half type 1, the rest type 2 (the authors' ``get_points_init_state_numpy``).
    A 3-D ``shape`` (D, H, W) places single voxels in the ball around (D//2, H//2, W//2) the same way."""
    grids = np.indices(shape)
    d2 = sum((g - n // 2) ** 2 for g, n in zip(grids, shape))
    cand = np.flatnonzero(d2.ravel() < radius ** 2)
    if len(cand) < n_cells:
        where = "a disc" if len(shape) == 2 else "a ball"
        raise ConfigError(f"{n_cells} cells do not fit in {where} of radius {radius} ({len(cand)} sites)")
    pick = rng.choice(cand, size=n_cells, replace=False)
    ids = np.zeros(int(np.prod(shape)), np.int32)
    ids[pick] = np.arange(1, n_cells + 1)
    types = np.concatenate([[0], (np.arange(n_cells) // (n_cells / 2)).astype(np.int32) + 1]).astype(np.int32)
    return CellState(ids.reshape(shape), types)


def cellsort_hamiltonian_for(scenario: str, shape=(200, 200), target: float = 200.0, *, learnable: bool = False):
    """The data-generating Hamiltonian of scenario ``a`` or ``b`` (this project's units, J = J_paper / 4).

    A 3-D ``shape`` gets the same per-pair J (J_paper / 4), λ and V* on a cubic lattice of order 2."""
    scenario = str(scenario).lower()
    if scenario not in SCENARIOS:
        raise ConfigError(f"unknown cell-sorting scenario {scenario!r}; use 'a' or 'b'")
    p = SCENARIOS[scenario]
    lat = LatticeSpec(tuple(int(s) for s in shape), periodic=True, copy_order=2, contact_order=2)
    if len(lat.shape) == 3:
        from neuralcpm_plugin.hamiltonian.analytic import cellsort_hamiltonian
        per_pair = {k: v / 4.0 for k, v in p["J"].items()}
        return cellsort_hamiltonian(per_pair, p["lambda"], float(target), lat, 1.0,
                                    ["medium", "type1", "type2"], learnable=learnable)
    return from_paper_scale({"J": p["J"], "lambda": p["lambda"], "target": float(target), "temperature": 1.0}, lat,
                            type_names=["medium", "type1", "type2"], learnable=learnable)


def _config(scale: str, overrides: dict, dim: int = 2) -> dict:
    if dim not in (2, 3):
        raise ConfigError(f"cell sorting: dim must be 2 or 3, got {dim!r}")
    scales = SCALES if dim == 2 else SCALES_3D
    if scale not in scales:
        raise ConfigError(f"unknown scale {scale!r}; use one of {', '.join(scales)}")
    cfg = dict(scales[scale])
    for k, v in overrides.items():
        if v is not None:
            cfg[k] = v
    check_generator_options(cfg, min_size=4, where="cellsort: ")
    return cfg


def check_generator_options(cfg: dict, *, min_size: int, where: str = "") -> None:
    """Bounds on the options of the data generators (shared by cellsort, mnist and bipolar): enough snapshots,
    cells and sites to be data at all, and no more than a run can hold in memory or finish in a day."""
    from .config import check_bounds
    size = cfg.get("size")
    check_bounds(cfg, {"n": (1, MAX_SNAPSHOTS, "--snapshots/-n (number of snapshots)"),
                       "size": (min_size, MAX_SIZE, "--size (lattice side)"),
                       "mcs": (1e-3, MAX_MCS, "--mcs"),
                       "target": (1.0, None if size is None else float(size) ** 2, "--target (V*)"),
                       "radius": (0.5, None, "--radius")}, where=where)
    check_bounds(cfg, {"cells": (2, None if size is None else int(size) ** 2 // 4, "--cells")}, where=where)
    total = int(cfg["n"]) * int(size) ** 2 if size is not None else 0
    if total > MAX_TOTAL_SITES:
        raise ConfigError(f"{where}--snapshots x --size² = {total:.3g} lattice sites exceeds {MAX_TOTAL_SITES:.0e} "
                          "(about 2 GB of data in memory); make fewer or smaller snapshots")


MAX_SNAPSHOTS = 100_000       #: most snapshots one generator call makes
MAX_SIZE = 4096               #: largest lattice side of the generators
MAX_MCS = 1e6                 #: most MCS per snapshot
MAX_TOTAL_SITES = 250_000_000  #: snapshots x sites per snapshot (the int32 ids + types of ~2 GB)


def generate_cellsort(scenario: str = "a", scale: str = "cpu", n_snapshots: int | None = None, seed: int = 0, *,
                      size: int | None = None, cells: int | None = None, target: float | None = None,
                      radius: float | None = None, mcs: float | None = None, sampler: str = "exact",
                      proposal: str = "boundary", n_flips: int = 100, progress: bool = True,
                      report: dict | None = None, dim: int = 2):
    """Generate cell-sorting snapshots; returns ``(states, hamiltonian)``.

    Parameters
    ----------
    scenario : "a" | "b"; scale : "paper" | "cpu" (presets, see the module docstring); n_snapshots : number
    of independent runs (one final frame each; default from the preset); seed : base seed.
    size, cells, target, radius, mcs : override the preset (lattice side in sites, number of cells, V* in
    sites, start-disc radius in sites, MCS per run).
    sampler : "exact" (sequential, :mod:`~neuralcpm_plugin.sampling.exact`) or "parallel" (paper Algorithm 2,
    ``n_flips`` proposals per step). proposal : "boundary" | "classic" (exact sampler only).
    dim : 2 (square lattice, the paper) or 3 (cubic lattice, ``size``³; see the module docstring).
    report : optional dict that receives ``"checkpoints"`` (MCS) and ``"sorting_index"`` (mean over runs at
    each checkpoint), ``"seeds"`` and ``"seconds"``.

    Each state carries ``meta["mcs"]`` and ``meta["seed"]``.
    """
    cfg = _config(scale, {"n": n_snapshots, "size": size, "cells": cells, "target": target, "radius": radius,
                          "mcs": mcs}, int(dim))
    if sampler not in ("exact", "parallel"):
        raise ConfigError(f"unknown sampler {sampler!r}; use 'exact' or 'parallel'")
    shape = (int(cfg["size"]),) * int(dim)
    ham = cellsort_hamiltonian_for(scenario, shape, float(cfg["target"]))
    n = int(cfg["n"])
    total = float(cfg["mcs"])
    checkpoints = [total * (k + 1) / N_CHECKPOINTS for k in range(N_CHECKPOINTS)]
    seeds = [int(seed) * 100003 + i for i in range(n)]
    starts = [init_points(np.random.default_rng(s), shape, int(cfg["cells"]), float(cfg["radius"])) for s in seeds]
    si = np.full((n, N_CHECKPOINTS), np.nan)
    t0 = time.perf_counter()
    bar = progress_counter(n if sampler == "exact" else N_CHECKPOINTS, f"cellsort {scenario} ({scale}, {sampler})",
                           "run" if sampler == "exact" else "chunk", progress=progress)
    finals = []
    if sampler == "exact":
        from neuralcpm_plugin.sampling.exact import ExactSampler
        for i, (s, st) in enumerate(zip(seeds, starts)):
            smp = ExactSampler(st, ham, seed=s, proposal=proposal)
            done = 0.0
            for k, c in enumerate(checkpoints):
                smp.step(c - done)
                done = c
                si[i, k] = sorting_index(smp.state)
            fin = smp.state
            finals.append(fin)
            bar.update(1)
    else:
        import torch

        from neuralcpm_plugin.hamiltonian.base import Batch
        from neuralcpm_plugin.sampling.parallel import ParallelSampler
        ps = ParallelSampler(ham, n_flips=int(n_flips))
        batch = Batch.from_states(starts, periodic=True)
        gen = torch.Generator().manual_seed(int(seed))
        done = 0.0
        for k, c in enumerate(checkpoints):
            ps.sweep(batch, c - done, gen)
            done = c
            for i, st in enumerate(batch.to_states()):
                si[i, k] = sorting_index(st)
            bar.update(1)
        finals = batch.to_states()
    bar.close()
    for s, st in zip(seeds, finals):
        st.meta["mcs"] = round(total)
        st.meta["seed"] = s
    if report is not None:
        report.update({"checkpoints": checkpoints, "sorting_index": finite_column_means(si).tolist(),
                       "sorting_index_runs": si, "seeds": seeds, "seconds": time.perf_counter() - t0,
                       "config": cfg, "sampler": sampler, "proposal": proposal if sampler == "exact" else None})
    return finals, ham


def save_cellsort(path, states, hamiltonian, *, scenario: str, scale: str, report: dict) -> Path:
    """Write the reference ``.npz`` with the true parameters in ``params_json``."""
    from neuralcpm_plugin.io.npz import save_npz
    params = {"dataset": "cellsort", "scenario": scenario, "scale": scale, "dim": len(hamiltonian.lattice.shape),
              **report["config"],
              "sampler": report["sampler"], "proposal": report["proposal"],
              "temperature": hamiltonian.temperature, "type_names": hamiltonian.type_names,
              "terms": [t.spec() for t in hamiltonian.terms],
              "paper_scale": {k: v for k, v in to_paper_scale(hamiltonian).items() if k != "theta"},
              "theta_paper": to_paper_scale(hamiltonian).get("theta"),
              "sorting_index_over_time": {"mcs": report["checkpoints"], "mean": report["sorting_index"]},
              "lattice": hamiltonian.lattice.to_json(), "seconds": round(report["seconds"], 2)}
    blob = np.frombuffer(json.dumps(params).encode("utf-8"), dtype=np.uint8)
    si = np.array([sorting_index(s) for s in states])
    return save_npz(path, states, seed=np.array(report["seeds"], np.int64), sorting_index=si, params_json=blob)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scenario", choices=sorted(SCENARIOS), required=True, help="Edelstein-Keshet & Xiao scenario")
    p.add_argument("--scale", choices=sorted(SCALES), default="cpu",
                   help="preset: " + "; ".join(f"{k}: {v['size']}x{v['size']}, {v['cells']} cells, {v['n']} snapshots, "
                                               f"{v['mcs']:g} MCS" for k, v in sorted(SCALES.items()))
                        + " (with --dim 3: " + "; ".join(f"{k}: {v['size']}^3, {v['cells']} cells, {v['n']} snapshots, "
                                                         f"{v['mcs']:g} MCS" for k, v in sorted(SCALES_3D.items())) + ")")
    p.add_argument("--dim", type=int, choices=[2, 3], default=2,
                   help="lattice dimension: 2 (square, the paper) or 3 (cubic, order-2 neighbourhoods)")
    p.add_argument("--out", default=None,
                   help="output .npz (default runs/data/cellsort-<scenario>[-3d][-cpu].npz)")
    p.add_argument("--seed", type=int, default=0, help="base seed (snapshot i uses seed*100003 + i)")
    p.add_argument("--snapshots", type=int, default=None, help="number of snapshots (independent runs)")
    p.add_argument("--mcs", type=float, default=None, help="MCS per run (H*W attempts each)")
    p.add_argument("--size", type=int, default=None, help="lattice side (sites)")
    p.add_argument("--cells", type=int, default=None, help="number of cells (half type 1, half type 2)")
    p.add_argument("--target", type=float, default=None, help="target volume V* (sites)")
    p.add_argument("--radius", type=float, default=None, help="radius of the start disc (sites)")
    p.add_argument("--sampler", choices=["exact", "parallel"], default="exact")
    p.add_argument("--proposal", choices=["boundary", "classic"], default="boundary",
                   help="exact sampler proposal (default boundary, like the authors' generator)")
    p.add_argument("--flips", type=int, default=100, help="parallel sampler: proposals per step (P)")
    p.add_argument("--no-progress", action="store_true")


def run(args) -> int:
    from neuralcpm_plugin.cli import claim_output
    d3 = "-3d" if args.dim == 3 else ""
    out = claim_output(Path(args.out) if args.out else Path("runs/data") / (
        f"cellsort-{args.scenario}{d3}.npz" if args.scale == "paper"
        else f"cellsort-{args.scenario}{d3}-{args.scale}.npz"), overwrite=args.overwrite)
    report: dict = {}
    states, ham = generate_cellsort(args.scenario, args.scale, args.snapshots, args.seed, size=args.size,
                                    cells=args.cells, target=args.target, radius=args.radius, mcs=args.mcs,
                                    sampler=args.sampler, proposal=args.proposal, n_flips=args.flips,
                                    progress=not args.no_progress, report=report, dim=args.dim)
    print("sorting index (fraction of cell-cell contacts that are heterotypic), mean over runs:")
    for m, v in zip(report["checkpoints"], report["sorting_index"]):
        print(f"  MCS {m:8.1f}: {v:.3f}")
    path = save_cellsort(out, states, ham, scenario=args.scenario, scale=args.scale, report=report)
    print(f"wrote {path} ({len(states)} snapshots, {report['seconds']:.1f} s)")
    return 0
