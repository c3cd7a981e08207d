"""ABC-SMC (pyABC, as FitMultiCell uses it) next to the pseudo-likelihood on the reference data P1 and P2.

    pip install -e ".[abc]"          # pyabc; without it this script says so and exits 0
    python benchmarks/bench_abc.py --sims 600 --out runs/bench_abc.json

What it does, per scenario (P1 Morpheus, P2 CompuCell3D; ``../shared/reference-data``):

* **observed data**: the final frames (1000 MCS) of the 16 runs; summary statistics as a FitMultiCell user would
  choose them — the pair counts per type pair (1-1, 2-2, 1-2, 1-0, 2-0), the mean cell volume, the fragmented
  fraction — averaged over the 16 runs.
* **simulator**: the package's exact sampler (classic CPM dynamics = CC3D/Morpheus, tested against both) with a
  proposed θ = (J(1,0), J(2,0), J(1,1), J(1,2), J(2,2), λ), V* fixed to the data's mean volume (as the
  pseudo-likelihood fit), T = 1, from the first frame of a randomly chosen data run for 1000 MCS; its statistics
  are those of that one run (one simulation = one run: 1000 MCS on 100×100).
* **ABC-SMC**: pyABC, uniform priors J ~ U(0, 4), λ ~ U(0, 2) (broad, as without prior knowledge), adaptive
  p-norm distance (p = 2, scales re-estimated each generation), population ``--pop``, single-core sampler,
  stopped after ``--sims`` simulations. After every generation: the weighted posterior mean and its RMSE per pair
  against the truth, and how many true values lie in the 95 % credible intervals (weighted 2.5–97.5 % quantiles).
* **pseudo-likelihood**: ``fit_pl`` on the same 16 final frames, with the cluster sandwich intervals
  (``training.diagnostics``), CPU time of fit + intervals.

CPU times are ``time.process_time()`` of this process (pyABC's single-core sampler runs the simulations here).
Contrastive divergence is not rerun: its numbers are quoted from the README (``--config cd-classic``).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

REF = ROOT.parent / "shared" / "reference-data"
NAMES = ["J10", "J20", "J11", "J12", "J22", "lam"]
STATS = ["1-1", "2-2", "1-2", "1-0", "2-0", "mean_volume", "frac_fragmented"]
SCENARIOS = {"P1": "P1_morpheus", "P2": "P2_cc3d"}


def _load(scenario: str):
    from neuralcpm_plugin.lattice import states_from_channels
    files = sorted(glob.glob(str(REF / SCENARIOS[scenario] / "run_*.npz")))
    if not files:
        raise SystemExit(f"no reference data in {REF / SCENARIOS[scenario]}")
    data = [np.load(f)["data"] for f in files]
    starts = [states_from_channels(d[:1])[0] for d in data]
    finals = [states_from_channels(d[-1:])[0] for d in data]
    return starts, finals


def _stats(state) -> dict:
    from neuralcpm_plugin.metrics.stats import summary_stats
    s = summary_stats(state, n_types=2)
    return {k: float(s[k]) for k in STATS}


def _weighted_quantile(x, w, q):
    o = np.argsort(x)
    x, w = np.asarray(x)[o], np.asarray(w)[o]
    c = np.cumsum(w) - 0.5 * w
    c /= w.sum()
    return float(np.interp(q, c, x))


def run_abc(scenario: str, sims: int, pop: int, seed: int, truth: np.ndarray, log) -> dict:
    import pyabc

    from neuralcpm_plugin.hamiltonian.analytic import cellsort_hamiltonian
    from neuralcpm_plugin.hamiltonian.base import LatticeSpec
    from neuralcpm_plugin.sampling.exact import ExactSampler
    starts, finals = _load(scenario)
    obs_rows = [_stats(s) for s in finals]
    observed = {k: float(np.mean([r[k] for r in obs_rows])) for k in STATS}
    vstar = float(np.mean(np.concatenate([s.volumes()[s.cell_ids()] for s in finals])))
    rng = np.random.default_rng(seed)
    clock = {"n": 0, "cpu": 0.0, "marks": [(0, 0.0)]}

    def model(p):
        t0 = time.process_time()
        J = {(1, 0): p["J10"], (2, 0): p["J20"], (1, 1): p["J11"], (1, 2): p["J12"], (2, 2): p["J22"]}
        ham = cellsort_hamiltonian(J, p["lam"], vstar, LatticeSpec((100, 100)))
        start = starts[int(rng.integers(len(starts)))]
        smp = ExactSampler(start, ham, seed=int(rng.integers(2 ** 31)))
        smp.step(1000)
        out = _stats(smp.state)
        clock["n"] += 1
        clock["cpu"] += time.process_time() - t0
        clock["marks"].append((clock["n"], clock["cpu"]))
        return out

    prior = pyabc.Distribution(**{n: pyabc.RV("uniform", 0.0, 2.0 if n == "lam" else 4.0) for n in NAMES})
    abc = pyabc.ABCSMC(model, prior, pyabc.AdaptivePNormDistance(p=2), population_size=pop,
                       sampler=pyabc.sampler.SingleCoreSampler())
    db = Path(tempfile.mkdtemp(prefix="bench_abc_")) / f"{scenario}.db"
    cpu0 = time.process_time()
    abc.new(f"sqlite:///{db}", observed)
    history = abc.run(minimum_epsilon=0.0, max_total_nr_simulations=sims)
    cpu_total = time.process_time() - cpu0
    pops = history.get_all_populations()
    rows = []
    marks = np.array(clock["marks"])
    for t in range(history.max_t + 1):
        df, w = history.get_distribution(m=0, t=t)
        cum = int(pops.loc[pops["t"] <= t, "samples"].sum())      # including pyABC's calibration sample (t = -1)
        x = df[NAMES].to_numpy()
        mean = (w[:, None] * x).sum(0) / w.sum()
        lo = np.array([_weighted_quantile(x[:, j], w, 0.025) for j in range(len(NAMES))])
        hi = np.array([_weighted_quantile(x[:, j], w, 0.975) for j in range(len(NAMES))])
        sim_cpu = float(np.interp(cum, marks[:, 0], marks[:, 1]))
        rows.append({"generation": t, "simulations": cum, "sim_cpu_s": sim_cpu,
                     "epsilon": float(pops.loc[pops["t"] == t, "epsilon"].iloc[0]),
                     "mean": mean.tolist(), "lo": lo.tolist(), "hi": hi.tolist(),
                     "rmse": float(np.sqrt(np.mean((mean - truth) ** 2))),
                     "inside": int(np.sum((lo <= truth) & (truth <= hi))),
                     "mean_width": float(np.mean(hi - lo))})
        r = rows[-1]
        log(f"  ABC {scenario} generation {t}: {cum} simulations, {sim_cpu:.0f} s CPU in simulations, "
            f"eps {r['epsilon']:.3g}, posterior mean RMSE {r['rmse']:.4f}, truth in 95 % CI {r['inside']}/6, "
            f"mean CI width {r['mean_width']:.3f}")
    return {"generations": rows, "cpu_total_s": cpu_total, "simulations": clock["n"],
            "cpu_per_simulation_s": clock["cpu"] / max(clock["n"], 1), "observed": observed, "V*": vstar}


def run_pl(scenario: str, truth: np.ndarray) -> dict:
    from neuralcpm_plugin.hamiltonian.analytic import cellsort_hamiltonian
    from neuralcpm_plugin.hamiltonian.base import LatticeSpec
    from training.diagnostics import diagnose_pl, truth_coverage
    from training.pseudolikelihood import fit_pl
    _, finals = _load(scenario)
    for i, s in enumerate(finals):
        s.meta["path"] = f"run_{i}"
    vstar = float(np.mean(np.concatenate([s.volumes()[s.cell_ids()] for s in finals])))
    J = np.ones((3, 3))
    J[0, 0] = 0
    t0 = time.process_time()
    ham = cellsort_hamiltonian(J, 0.1, vstar, LatticeSpec((100, 100)))
    res = fit_pl(ham, finals)
    d = diagnose_pl(res, ham, finals)
    cpu = time.process_time() - t0
    u = d["uncertainty"]
    est = np.asarray(u["estimate"])
    c = truth_coverage(u, truth)
    return {"estimate": est.tolist(), "rmse": float(np.sqrt(np.mean((est - truth) ** 2))), "inside": c["count"],
            "mean_width": float(np.mean(np.asarray(u["hi"]) - np.asarray(u["lo"]))), "cpu_s": cpu}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sims", type=int, default=600, help="simulation budget per scenario (default 600)")
    ap.add_argument("--pop", type=int, default=100, help="ABC-SMC population size (default 100)")
    ap.add_argument("--scenarios", default="P1,P2")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the numbers as JSON here")
    args = ap.parse_args(argv)
    try:
        import pyabc  # noqa: F401
    except ImportError:
        print("bench_abc: pyabc is not installed; install the optional extra with  pip install -e \".[abc]\"  "
              "(or pip install pyabc) to run this benchmark. Nothing was run.")
        return 0
    import logging
    logging.getLogger("ABC").setLevel(logging.WARNING)
    logging.getLogger("pyabc").setLevel(logging.WARNING)
    from neuralcpm_plugin.metrics.params import KNOWN_TRUTHS
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"bench_abc: budget {args.sims} simulations per scenario, population {args.pop}, seed {args.seed}; "
          f"load average {load:.1f} on {os.cpu_count()} CPUs")
    results = {}
    for sc in args.scenarios.split(","):
        truth = np.asarray(KNOWN_TRUTHS[sc]["vector"])
        pl = run_pl(sc, truth)
        print(f"{sc}: pseudo-likelihood RMSE {pl['rmse']:.4f}, truth in 95 % CI {pl['inside']}/6, mean CI width "
              f"{pl['mean_width']:.3f}, {pl['cpu_s']:.1f} s CPU (fit + intervals)", flush=True)
        abc = run_abc(sc, args.sims, args.pop, args.seed, truth, lambda m: print(m, flush=True))
        results[sc] = {"pl": pl, "abc": abc}
        best = min(abc["generations"], key=lambda r: r["rmse"])
        reach = next((r for r in abc["generations"] if r["rmse"] <= pl["rmse"]), None)
        print(f"{sc}: ABC-SMC {abc['simulations']} simulations, {abc['cpu_total_s']:.0f} s CPU "
              f"({abc['cpu_per_simulation_s']:.2f} s per simulation); best posterior-mean RMSE {best['rmse']:.4f} "
              f"after {best['simulations']} simulations; " +
              (f"reached the pseudo-likelihood's RMSE after {reach['simulations']} simulations"
               if reach else "did not reach the pseudo-likelihood's RMSE within the budget"), flush=True)
    cd = {"P1": 0.023, "P2": 0.038}
    print("\n| scenario | method | simulations | CPU s | RMSE per pair (posterior mean / estimate) | truth in 95 % interval "
          "| mean interval width |")
    print("|---|---|---|---|---|---|---|")
    for sc, r in results.items():
        pl = r["pl"]
        print(f"| {sc} | pseudo-likelihood + sandwich | 0 | {pl['cpu_s']:.1f} | {pl['rmse']:.4f} | {pl['inside']}/6 | "
              f"{pl['mean_width']:.3f} |")
        for g in r["abc"]["generations"]:
            print(f"| {sc} | ABC-SMC generation {g['generation']} | {g['simulations']} | {g['sim_cpu_s']:.0f} | "
                  f"{g['rmse']:.4f} | {g['inside']}/6 | {g['mean_width']:.3f} |")
        print(f"| {sc} | contrastive divergence (`cd-classic`, README; not rerun) | – | ≈ 540 | T* {cd[sc]} | – | – |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
