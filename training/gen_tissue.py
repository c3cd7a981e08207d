"""`python -m training.generate tissue` — tissue-scale cell-sorting snapshots (1,000×1,000, 10,000 cells).

The paper names tissue scale (≫ 100 cells) as its first limitation; this data set is the scale test of the
samplers and of the pseudo-likelihood fit. Defaults: 1000×1000 periodic lattice, 100×100 = 10,000 cells
(ids 1..10,000, types 1 and 2 assigned at random, half each), target volume V* = 90 sites, contact
(Moore order 2, J per unordered pair) + volume energies of cell-sorting scenario ``a`` or ``b``
(:mod:`training.gen_cellsort`, this project's units J = J_paper / 4), T = 1.

Start state (so that a few MCS equilibrate the volumes): a jittered-grid Voronoi tiling — seeds on a
``g×g`` grid of spacing ``a = size / g`` (``g = round(√cells)``), each moved uniformly by up to ±0.3·a
along each axis; each site belongs to its nearest seed (periodic distance) if that seed is closer than
``r = √(V*/π)·1.05`` sites, else to the medium. Cells start at ~V* sites (mean printed), with ~10 % medium
between them (~18 % of the lattice at the start, ~10 % once the volumes relaxed, within 1 MCS), so
every J(·,0) is observed.

Sampler: the exact sequential sampler, classic (Graner–Glazier) proposal — the dynamics of CompuCell3D and
Morpheus, and the default proposal of the pseudo-likelihood fit (``--threads K`` > 1: the checkerboard
sampler :mod:`neuralcpm_plugin.sampling.checkerboard` on K threads; see its docstring for what it preserves).
Snapshot i is the final state after ``--mcs`` MCS of an independent run from its own start, seed
``seed·100003 + i``. The defaults (16 snapshots × 50 MCS, 1 M attempts per MCS) take ~6 min of CPU time on one core.

Output: the reference ``.npz`` (as ``cellsort``: ``data``, ``seed``, ``mcs``, ``sorting_index``,
``params_json`` with the true parameters) and ``<out>.truth.json`` (``{"J": {"a-b": v}, "lambda": λ}``, per
unordered pair, this project's units) for ``python -m training.fit --truth``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import time
from pathlib import Path

import numpy as np

from neuralcpm_plugin.errors import ConfigError
from neuralcpm_plugin.lattice import CellState
from neuralcpm_plugin.metrics.stats import finite_column_means, sorting_index

from .gen_cellsort import SCENARIOS, cellsort_hamiltonian_for, save_cellsort
from .status import progress_counter

__all__ = ["add_arguments", "generate_tissue", "run", "voronoi_start"]

DEFAULTS = {"size": 1000, "cells": 10000, "target": 90.0, "mcs": 50.0, "n": 16}


def voronoi_start(rng: np.random.Generator, size: int, cells: int, target: float) -> CellState:
    """Jittered-grid Voronoi tiling of a periodic ``size×size`` lattice (see the module docstring).

    Returns a state with ``g²`` cells (``g = round(√cells)``), ids 1..g² in row-major grid order, types 1/2
    drawn as a random half/half split; sites farther than ``√(target/π)·1.05`` from their nearest seed are
    medium.
    """
    g = round(float(np.sqrt(cells)))
    if g < 2 or size < 2 * g:
        raise ConfigError(f"tissue: {cells} cells do not fit a {size}x{size} lattice (need size >= 2*sqrt(cells))")
    a = size / g
    centre = (np.arange(g) + 0.5) * a
    sy = centre[:, None] + rng.uniform(-0.3 * a, 0.3 * a, (g, g))
    sx = centre[None, :] + rng.uniform(-0.3 * a, 0.3 * a, (g, g))
    yy, xx = np.indices((size, size), dtype=np.float64)
    by = np.minimum((yy // a).astype(np.int64), g - 1)
    bx = np.minimum((xx // a).astype(np.int64), g - 1)
    best = np.full((size, size), np.inf)
    ids = np.zeros((size, size), np.int32)
    for dy in (-1, 0, 1):  # a seed stays within its block ± 0.3a: the 3x3 blocks around a site hold the nearest
        for dx in (-1, 0, 1):
            cy, cx = (by + dy) % g, (bx + dx) % g
            ddy = np.abs(yy - sy[cy, cx])
            ddx = np.abs(xx - sx[cy, cx])
            ddy = np.minimum(ddy, size - ddy)
            ddx = np.minimum(ddx, size - ddx)
            d2 = ddy * ddy + ddx * ddx
            better = d2 < best
            best[better] = d2[better]
            ids[better] = (cy * g + cx + 1)[better].astype(np.int32)
    r = np.sqrt(target / np.pi) * 1.05
    ids[best > r * r] = 0
    n = g * g
    types = np.zeros(n + 1, np.int32)
    types[1:] = 1 + (rng.permutation(n) >= n // 2)
    return CellState(ids, types)


def generate_tissue(scenario: str = "b", n_snapshots: int = 16, seed: int = 0, *, size: int = 1000,
                    cells: int = 10000, target: float = 90.0, mcs: float = 50.0, threads: int = 1,
                    progress: bool = True, report: dict | None = None):
    """Generate ``n_snapshots`` independent tissue-scale runs; returns ``(final_states, hamiltonian)``.

    ``report`` (optional dict) receives ``checkpoints``, ``sorting_index`` (mean over runs at each),
    ``seeds``, ``seconds``, ``config``, ``mcs_per_s`` (per run, wall clock), ``mean_volume``.
    """
    if n_snapshots < 1 or not mcs > 0 or not target > 0:
        raise ConfigError(f"tissue: need snapshots >= 1, mcs > 0, target > 0 (got {n_snapshots}, {mcs}, {target})")
    if threads < 1:
        raise ConfigError(f"tissue: --threads must be >= 1, got {threads}")
    shape = (int(size), int(size))
    ham = cellsort_hamiltonian_for(scenario, shape, float(target))
    seeds = [int(seed) * 100003 + i for i in range(n_snapshots)]
    checkpoints = [mcs * (k + 1) / 5 for k in range(5)]
    si = np.full((n_snapshots, len(checkpoints)), np.nan)
    rates, finals, start_vol = [], [], []
    t0 = time.perf_counter()
    bar = progress_counter(n_snapshots, f"tissue {scenario} {size}x{size}", "run", progress=progress)
    for i, s in enumerate(seeds):
        st = voronoi_start(np.random.default_rng(s), int(size), int(cells), float(target))
        v = np.bincount(st.ids.ravel())[1:]
        start_vol.append(float(v[v > 0].mean()))
        if threads > 1:
            from neuralcpm_plugin.sampling.checkerboard import CheckerboardSampler
            smp = CheckerboardSampler(st, ham, seed=s, threads=threads)
        else:
            from neuralcpm_plugin.sampling.exact import ExactSampler
            smp = ExactSampler(st, ham, seed=s, proposal="classic")
        done = 0.0
        w0 = time.perf_counter()
        for k, c in enumerate(checkpoints):
            smp.step(c - done)
            done = c
            si[i, k] = sorting_index(smp.state)
        rates.append(mcs / (time.perf_counter() - w0))
        fin = smp.state
        fin.meta["mcs"] = round(mcs)
        fin.meta["seed"] = s
        finals.append(fin)
        bar.update(1)
    bar.close()
    vols = np.bincount(finals[-1].ids.ravel())[1:]
    if report is not None:
        report.update({"checkpoints": checkpoints, "sorting_index": finite_column_means(si).tolist(), "seeds": seeds,
                       "seconds": time.perf_counter() - t0, "mcs_per_s": rates,
                       "start_mean_volume": float(np.mean(start_vol)),
                       "mean_volume": float(vols[vols > 0].mean()), "n_cells": int((vols > 0).sum()),
                       # "dataset" overrides save_cellsort's "cellsort" label: these runs do not start from
                       # gen_cellsort's single pixels, so training.overview must not replay them as such
                       "config": {"dataset": "tissue", "size": int(size), "cells": int(cells), "target": float(target), "mcs": float(mcs),
                                  "n": int(n_snapshots), "start": "jittered-grid Voronoi", "threads": int(threads)},
                       "sampler": "exact" if threads == 1 else "checkerboard", "proposal": "classic"})
    return finals, ham


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scenario", choices=sorted(SCENARIOS), default="b",
                   help="cell-sorting energies (default b: J per pair 0.625/0.25/0.25/1.125/0.25, lambda 0.5)")
    p.add_argument("--out", default=None, help="output .npz (default runs/data/tissue-<scenario>.npz)")
    p.add_argument("--seed", type=int, default=0, help="base seed (snapshot i uses seed*100003 + i)")
    p.add_argument("--snapshots", type=int, default=DEFAULTS["n"], help="independent runs (one final frame each)")
    p.add_argument("--mcs", type=float, default=DEFAULTS["mcs"], help="MCS per run (size^2 attempts each)")
    p.add_argument("--size", type=int, default=DEFAULTS["size"], help="lattice side (sites)")
    p.add_argument("--cells", type=int, default=DEFAULTS["cells"], help="number of cells (rounded to a square)")
    p.add_argument("--target", type=float, default=DEFAULTS["target"], help="target volume V* (sites)")
    p.add_argument("--threads", type=int, default=1, help="> 1: checkerboard sampler on this many threads")
    p.add_argument("--no-progress", action="store_true")


def run(args) -> int:
    from neuralcpm_plugin.cli import claim_output
    out = claim_output(Path(args.out) if args.out else Path("runs/data") / f"tissue-{args.scenario}.npz",
                       overwrite=args.overwrite)
    tpath = claim_output(out.with_name(out.stem + ".truth.json"), option="--out (its .truth.json)",
                         overwrite=args.overwrite)
    report: dict = {}
    states, ham = generate_tissue(args.scenario, args.snapshots, args.seed, size=args.size, cells=args.cells,
                                  target=args.target, mcs=args.mcs, threads=args.threads,
                                  progress=not args.no_progress, report=report)
    print(f"{report['n_cells']} cells, mean volume {report['start_mean_volume']:.1f} at the start, "
          f"{report['mean_volume']:.1f} at the end (V* = {args.target:g})")
    print("sorting index (fraction of cell-cell contacts that are heterotypic), mean over runs:")
    for m, v in zip(report["checkpoints"], report["sorting_index"]):
        print(f"  MCS {m:8.1f}: {v:.3f}")
    r = report["mcs_per_s"]
    print(f"sampler speed: median {np.median(r):.2f} MCS/s wall clock per run ({report['sampler']}, "
          f"{args.threads} thread(s))")
    path = save_cellsort(out, states, ham, scenario=args.scenario, scale="tissue", report=report)
    p = SCENARIOS[args.scenario]
    truth = {"J": {k: v / 4.0 for k, v in p["J"].items()}, "lambda": p["lambda"], "scaling": "per_pair",
             "target": args.target}
    tpath.write_text(json.dumps(truth, indent=1))
    print(f"wrote {path} ({len(states)} snapshots, {report['seconds']:.1f} s) and {tpath}")
    print(f"fit: python -m training.fit --data {shlex.quote(str(path))} --frames all --truth {shlex.quote(str(tpath))} "
          "--no-export")
    return 0
