"""Tissue scale, local NH: what one training step costs on 1000×1000 lattices with 10,000 cells, and whether a
trained model fits the data (issue 15).

    python -m training.generate tissue                       # runs/data/tissue-b.npz (16 snapshots)
    python benchmarks/bench_tissue_local_nh.py               # step costs and memory, fresh process per figure
    python benchmarks/bench_tissue_local_nh.py --run runs/tissue-local-nh   # + held-out check of a trained run

Figures (one thread; each in a fresh child process so that its peak memory is its own):

* ``pl step`` — one stochastic pseudo-likelihood step of the local NH + closure (``--model local-nh-closure``,
  the ``tissue-local-nh`` preset's settings: 4 snapshots × 256 boundary sites, the exact local ΔH of their
  candidate copies, backward, Adam): median wall and CPU seconds of ``--steps`` steps, peak memory;
* ``energy + gradient`` — the local NH's energy of ``--batch`` whole snapshots and its gradient (what a pcd
  iteration evaluates for its data and chain states): wall, CPU, peak memory.  Before the per-patch labels
  this stopped with a 40 GB allocation for one snapshot (patch tables sized patches × cells);
* ``--run DIR`` — mean negative log pseudo-likelihood per boundary site on held-out sites (a fixed draw of
  ``--sites`` sites per snapshot, another seed than training) for the generator's true Hamiltonian, the
  trained model of DIR and the same model untrained; and DIR's parameter RMSE (summary.json).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _measure import peak_rss_mib, run_child


def _setup(data: str):
    from neuralcpm_plugin.threads import configure_threads
    from training.config import load_config
    from training.fit import load_training_data
    configure_threads(1)
    cfg = load_config("tissue-local-nh")
    cfg["data"].update(path=data, frames="all")
    states = load_training_data(cfg, ROOT / "runs" / "bench-tissue-local-nh", progress=False)
    states = states[0] if isinstance(states, tuple) else states
    return cfg, states


def child_step(data: str, steps: int) -> dict:
    from training.fit import build_model
    from training.pseudolikelihood import fit_pl
    cfg, states = _setup(data)
    ham = build_model(cfg, states, seed=0)[0]
    pl = cfg["pl"]
    walls, cpus = [], []
    for i in range(steps + 1):  # the first step builds the per-lattice index tables: not counted
        w0, c0 = time.perf_counter(), time.process_time()
        fit_pl(ham, states, steps=1, lr=pl["lr"], sites_per_state=pl["sites_per_state"],
               states_per_step=pl["states_per_step"], seed=i, proposal=pl["proposal"], stochastic=True)
        if i:
            walls.append(time.perf_counter() - w0)
            cpus.append(time.process_time() - c0)
    walls.sort()
    cpus.sort()
    return {"wall_s": walls[len(walls) // 2], "cpu_s": cpus[len(cpus) // 2], "steps": steps,
            "peak_mib": peak_rss_mib(), "n_cells": len(states[0].cell_ids()),
            "shape": list(states[0].shape)}


def child_energy(data: str, batch: int) -> dict:
    from neuralcpm_plugin.hamiltonian import Batch
    from neuralcpm_plugin.hamiltonian.local_nh import LocalNeuralHamiltonian
    _, states = _setup(data)
    t = LocalNeuralHamiltonian({"n_types": 2}, seed=0)
    b = Batch.from_states(states[:batch])
    base = peak_rss_mib()
    w0, c0 = time.perf_counter(), time.process_time()
    t.energy(b).sum().backward()
    return {"wall_s": time.perf_counter() - w0, "cpu_s": time.process_time() - c0, "batch": batch,
            "peak_mib": peak_rss_mib(), "peak_before_mib": base}


def heldout(run: str, data: str, sites: int) -> dict:
    import numpy as np
    import torch

    from neuralcpm_plugin.bundle import load_bundle
    from training.fit import build_model
    from training.gen_cellsort import cellsort_hamiltonian_for
    from training.pseudolikelihood import build_candidates, pl_nll
    cfg, states = _setup(data)
    trained = load_bundle(Path(run) / "model").hamiltonian
    truth = cellsort_hamiltonian_for("b", tuple(states[0].shape), 90.0)
    untrained = build_model(cfg, states, seed=0)[0]
    n_ids = max(s.n_ids for s in states)
    out = {}
    for name, ham in (("truth", truth), ("trained", trained), ("untrained", untrained)):
        tot, n = 0.0, 0
        for i in range(0, len(states), 4):  # 4 snapshots at a time (memory)
            c = build_candidates(states[i:i + 4], n_ids=n_ids, max_sites_per_state=sites,
                                 rng=np.random.default_rng(12345 + i), proposal=cfg["pl"]["proposal"])
            with torch.no_grad():
                tot += float(pl_nll(ham, c)) * c.n_sites
            n += c.n_sites
        out[name] = tot / n
    out["sites"] = n
    summ = json.loads((Path(run) / "summary.json").read_text())
    out["rmse_per_pair"] = summ.get("rmse", {}).get("per_pair", {}).get("rmse_T1")
    hist = summ.get("pl_nll_history") or []
    if hist:
        k = max(1, len(hist) // 10)
        out["train_nll_first_last_10pct"] = [float(np.mean(hist[:k])), float(np.mean(hist[-k:]))]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Tissue-scale local NH: pl step cost, energy + gradient memory, held-out "
                                "check of a trained run (python -m training.fit --config tissue-local-nh).")
    p.add_argument("--data", default=str(ROOT / "runs" / "data" / "tissue-b.npz"))
    p.add_argument("--steps", type=int, default=5, help="timed pl steps (median)")
    p.add_argument("--batch", type=int, default=4, help="snapshots in the energy + gradient figure")
    p.add_argument("--run", help="a trained run folder (python -m training.fit --config tissue-local-nh)")
    p.add_argument("--sites", type=int, default=2048, help="held-out boundary sites per snapshot")
    p.add_argument("--child", choices=["step", "energy"], help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child == "step":
        print(json.dumps(child_step(a.data, a.steps)))
        return 0
    if a.child == "energy":
        print(json.dumps(child_energy(a.data, a.batch)))
        return 0
    if not Path(a.data).exists():
        print(f"error: --data {a.data}: not found; make it with: python -m training.generate tissue", file=sys.stderr)
        return 2
    print(f"tissue-scale local NH, {a.data}, one thread, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    r = run_child(__file__, ["--child", "step", "--data", a.data, "--steps", str(a.steps)])
    if "error" in r:
        print(f"pl step: {r['error']}")
    else:
        print(f"pl step (local-nh-closure, {r['shape']}, {r['n_cells']} cells, 4 snapshots x 256 sites): median {r['wall_s']:.2f} s wall, "
              f"{r['cpu_s']:.2f} s CPU over {r['steps']} steps; peak memory {r['peak_mib']:.0f} MiB")
    r = run_child(__file__, ["--child", "energy", "--data", a.data, "--batch", str(a.batch)])
    if "error" in r:
        print(f"energy + gradient: {r['error']}")
    else:
        print(f"energy + gradient of {r['batch']} snapshots (local NH): {r['wall_s']:.2f} s wall, {r['cpu_s']:.2f} s "
              f"CPU; peak memory {r['peak_mib']:.0f} MiB ({r['peak_before_mib']:.0f} MiB before the evaluation)")
    if a.run:
        h = heldout(a.run, a.data, a.sites)
        print(f"held-out pseudo-likelihood ({h['sites']} boundary sites, nll per site): truth {h['truth']:.5f}, "
              f"trained {h['trained']:.5f}, untrained {h['untrained']:.5f}")
        if h.get("rmse_per_pair") is not None:
            print(f"parameter RMSE per pair of the analytic part (summary.json): {h['rmse_per_pair']:.4f}")
        if "train_nll_first_last_10pct" in h:
            f, last = h["train_nll_first_last_10pct"]
            print(f"training nll, mean of the first / last 10 % of the steps: {f:.5f} / {last:.5f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
