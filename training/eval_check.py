"""`python -m training.evaluate check RUN --data DATA` — posterior predictive check of a fitted model.

Rolls the fitted model out with the exact sampler (:func:`neuralcpm_plugin.sampling.run_exact`'s
:class:`~neuralcpm_plugin.sampling.exact.ExactSampler`, the classic CPM dynamics of CompuCell3D and Morpheus
unless the fit used the boundary proposal) and compares summary statistics
(:mod:`neuralcpm_plugin.metrics.stats`: mean volume, number of cells, fragmented fraction, pair counts per type
pair, sorting index; plus the total boundary — all pairs of sites of different cells — and the standard deviation
of the cell volumes, which respond to the energy scale) with the data's:

* **time series** (files whose frames carry increasing MCS, e.g. the reference data): ``--runs`` simulations
  start from the first frames of the data's runs (the data's own starts) and are recorded at the data's times
  up to ``--mcs``; at every time the model's mean over its runs is compared with the data's mean over files.
* **independent snapshots**: the simulations start from data states and run ``--mcs`` MCS (default 100); the
  statistics must stay where the data are (a stationary model of stationary data).

For every statistic and time ``z = (mean_model − mean_data) / (s_p·√(1/n_model + 1/n_data))`` with the pooled
run-to-run standard deviation ``s_p`` (the two-sample test of "the model is the data's process"; a few simulated
runs alone would estimate their own spread poorly). The verdict uses ``--checkpoints`` K times (default 4: the recorded times nearest to 1/4, 2/4,
3/4 and all of the horizon): a statistic is flagged when ``|z| > --z`` (default 3) at a checkpoint. Writes ``check.png`` (one panel per statistic: data and model
mean ± 2 SE over time, checkpoint z-scores) and ``check.json`` into ``--out`` (default ``RUN/check``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from neuralcpm_plugin.errors import BundleError, ConfigError, DataError
from neuralcpm_plugin.metrics.stats import finite_column_means

__all__ = ["add_arguments", "posterior_predictive_check", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="run folder of training.fit (or a bundle directory)")
    p.add_argument("--data", required=True, help="the data to compare with (file, directory or glob of snapshots)")
    p.add_argument("--mcs", type=float, default=None,
                   help="simulated MCS (default: the data's last recorded MCS for time series, else 100)")
    p.add_argument("--runs", type=int, default=8, help="simulated runs (default 8)")
    p.add_argument("--checkpoints", type=int, default=4, help="times at which z is judged (default 4)")
    p.add_argument("--z", type=float, default=3.0, help="flag a statistic when |z| exceeds this (default 3)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the simulations")
    p.add_argument("--out", default=None, help="folder for check.png and check.json (default RUN_DIR/check)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")


def _stats(state, n_types: int) -> dict:
    """summary_stats, the sorting index, the total boundary (pairs of sites of different cells, any types: the
    interface length, sensitive to the energy scale) and the spread of the cell volumes (sensitive to λ/T)."""
    from neuralcpm_plugin.metrics.stats import sorting_index, summary_stats
    d = summary_stats(state, n_types=n_types)
    d["sorting_index"] = sorting_index(state)
    d["boundary"] = float(sum(v for k, v in d.items() if "-" in k))
    v = state.volumes()[state.cell_ids()]
    d["volume_sd"] = float(v.std(ddof=1)) if v.size > 1 else 0.0
    return d


def _z(m1, s1, m2, s2) -> float:
    den = float(np.hypot(s1, s2))
    if den == 0:
        return 0.0 if np.isclose(m1, m2) else float("inf")
    return float((m1 - m2) / den)


def _mean_se(a: np.ndarray):
    """Mean and standard error of each column (axis 0) over its finite entries (a statistic undefined for a run,
    NaN, counts neither in the mean nor in n); SE 0 with fewer than two finite entries, mean NaN with none."""
    a = np.asarray(a, dtype=np.float64)
    fin = np.isfinite(a)
    n = fin.sum(0)
    m = finite_column_means(a)
    ss = np.where(fin, a - np.where(n > 0, m, 0.0), 0.0) ** 2
    se = np.where(n > 1, np.sqrt(ss.sum(0) / np.maximum(n - 1, 1) / np.maximum(n, 1)), 0.0)
    return m, se


def posterior_predictive_check(ham, states, *, mcs: float | None = None, runs: int = 8, seed: int = 0,
                               checkpoints: int = 4, zmax: float = 3.0, proposal: str = "classic",
                               log=None) -> dict:
    """Simulate ``ham`` from the data's starts and compare summary statistics (see the module docstring).

    Returns a JSON-able dict: ``mode``, ``times``, ``checkpoints``, ``keys``, per key ``data``/``model``
    means and SEs over time, ``z`` [key][time], ``flagged`` (list of ``{key, mcs, z}``), ``max_abs_z``, ``ok``.
    """
    from neuralcpm_plugin.sampling.exact import ExactSampler

    from .diagnostics import time_series_files
    if runs < 2:
        raise ConfigError(f"--runs must be >= 2 (a standard error needs two runs), got {runs}")
    n_types = max(s.n_types for s in states)
    ts = {p: idx for p, idx in time_series_files(states).items()
          if all(states[i].meta.get("mcs") is not None for i in idx)}
    if ts:
        mode = "time series"
        series = list(ts.values())
        common = set.intersection(*({states[i].meta["mcs"] for i in idx} for idx in series))
        times = sorted(float(t) for t in common)
        if len(times) < 2:
            raise DataError("the data's time series share fewer than two recorded MCS; nothing to compare over time")
        t0 = times[0]
        horizon = float(mcs) if mcs is not None else times[-1]
        times = [t for t in times if t <= horizon + 1e-9]
        if len(times) < 2:
            raise ConfigError(f"--mcs {mcs}: no recorded data time after the start (MCS {t0}) up to it")
        data_rows = []
        for idx in series:
            by_t = {float(states[i].meta["mcs"]): states[i] for i in idx}
            data_rows.append([_stats(by_t[t], n_types) for t in times])
        starts = [next(states[i] for i in idx if float(states[i].meta["mcs"]) == t0) for idx in series]
    else:
        mode = "snapshots"
        horizon = float(mcs) if mcs is not None else 100.0
        t0 = 0.0
        times = list(np.linspace(0.0, horizon, 5))
        pick = np.linspace(0, len(states) - 1, min(runs, len(states))).round().astype(int)
        starts = [states[i] for i in pick]
        base = [_stats(s, n_types) for s in states]
        data_rows = [[b] * len(times) for b in base]    # stationary data: the same statistics at every time
    keys = list(data_rows[0][0])
    data = np.array([[[r[k] for k in keys] for r in row] for row in data_rows])      # [n_data, T, K]
    if log:
        log(f"check: {mode}; {runs} simulated runs of {horizon:g} MCS from the data's "
            f"{'first frames' if mode == 'time series' else 'states'}; comparing {len(keys)} statistics at "
            f"{len(times)} times")
    sim = []
    for r in range(runs):
        start = starts[r % len(starts)]
        smp = ExactSampler(start, ham, seed=seed + 7919 * r, proposal=proposal)
        done = t0
        row = []
        for t in times:
            if t > done:
                smp.step(t - done)
                done = t
            row.append([_stats(smp.state, n_types)[k] for k in keys])
        sim.append(row)
    sim = np.array(sim)                                                               # [runs, T, K]
    dm, dse = _mean_se(data)
    sm, sse = _mean_se(sim)
    # two-sample z with the pooled run-to-run variance (under the hypothesis "model = data" both spreads are one;
    # a few simulated runs alone estimate theirs poorly)
    n1, n2 = sim.shape[0], data.shape[0]
    sp2 = ((n1 - 1) * np.nanvar(sim, 0, ddof=1) + (n2 - 1) * (np.nanvar(data, 0, ddof=1) if n2 > 1 else 0.0)) \
        / max(n1 + n2 - 2, 1)
    sp = np.sqrt(sp2 * (1.0 / n1 + 1.0 / n2))
    z = np.array([[_z(sm[t, k], sp[t, k], dm[t, k], 0.0) for t in range(len(times))]
                  for k in range(len(keys))])                                        # [K, T]
    later = [i for i, t in enumerate(times) if t > t0]
    n_cp = max(1, min(checkpoints, len(later)))
    # checkpoints: the recorded times nearest to 1/K, 2/K, …, 1 of the horizon (not the transient's first frame)
    goals = [t0 + (times[-1] - t0) * j / n_cp for j in range(1, n_cp + 1)]
    cps = sorted({min(later, key=lambda i, g=g: abs(times[i] - g)) for g in goals})
    flagged = [{"key": keys[k], "mcs": times[t], "z": float(z[k, t])} for k in range(len(keys)) for t in cps
               if not abs(z[k, t]) <= zmax]
    zc = np.abs(z[:, cps])
    max_abs = float(np.nanmax(zc)) if zc.size else 0.0
    out = {"mode": mode, "times": [float(t) for t in times], "checkpoints": [float(times[t]) for t in cps],
           "keys": keys, "runs": runs, "data_runs": int(data.shape[0]), "zmax": zmax,
           "data": {"mean": dm.T.tolist(), "se": dse.T.tolist()},
           "model": {"mean": sm.T.tolist(), "se": sse.T.tolist()},
           "z": z.tolist(), "flagged": flagged, "max_abs_z": max_abs, "ok": not flagged}
    if log:
        for line in format_check(out):
            log(line)
    return out


def format_check(res: dict) -> list[str]:
    cps = res["checkpoints"]
    idx = [res["times"].index(t) for t in cps]
    last = idx[-1]
    lines = [f"{'statistic':>16} " + " ".join(f"{'z@' + format(t, 'g'):>9}" for t in cps)
             + f"   data @ {cps[-1]:g} MCS     model @ {cps[-1]:g} MCS"]
    for k, key in enumerate(res["keys"]):
        zs = " ".join(f"{res['z'][k][i]:9.2f}" for i in idx)
        dm, ds = res["data"]["mean"][k][last], res["data"]["se"][k][last]
        mm, ms = res["model"]["mean"][k][last], res["model"]["se"][k][last]
        lines.append(f"{key:>16} {zs}   {dm:9.3f} ± {ds:<7.3f} {mm:9.3f} ± {ms:<7.3f}")
    if res["ok"]:
        lines.append(f"check passed: every statistic within ±{res['zmax']:g} z at MCS "
                     f"{', '.join(format(t, 'g') for t in cps)} (max |z| = {res['max_abs_z']:.2f})")
    else:
        bad = sorted({f['key'] for f in res['flagged']})
        lines.append(f"CHECK FLAGGED: {len(res['flagged'])} statistic/time pair(s) beyond ±{res['zmax']:g} z "
                     f"({', '.join(bad)}; max |z| = {res['max_abs_z']:.1f}): the model does not reproduce the data")
    return lines


def plot_check(res: dict, path) -> Path | None:
    """One figure: a panel per statistic, data vs model mean ± 2 SE over MCS, checkpoint z-scores."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed; no figure (pip install matplotlib)")
        return None
    keys, t = res["keys"], np.asarray(res["times"])
    nc = 4
    nr = -(-len(keys) // nc)
    fig, axes = plt.subplots(nr, nc, figsize=(3.2 * nc, 2.5 * nr), squeeze=False)
    for k, key in enumerate(keys):
        ax = axes[k // nc][k % nc]
        for part, color, label in (("data", "0.35", "data"), ("model", "tab:blue", "model")):
            m = np.asarray(res[part]["mean"][k])
            s = np.asarray(res[part]["se"][k])
            ax.plot(t, m, color=color, lw=1.5, label=label)
            ax.fill_between(t, m - 2 * s, m + 2 * s, color=color, alpha=0.25, lw=0)
        bad = False
        for cp in res["checkpoints"]:
            zz = res["z"][k][res["times"].index(cp)]
            hit = not abs(zz) <= res["zmax"]
            bad |= hit
            ax.axvline(cp, color="0.85", lw=0.8, zorder=0)
            ax.annotate(f"{zz:.1f}", (cp, 1.0), xycoords=("data", "axes fraction"), ha="center", va="top",
                        fontsize=7, color="red" if hit else "0.3")
        ax.set_title(key, fontsize=9, color="red" if bad else "black")
        ax.tick_params(labelsize=7)
        if k == 0:
            ax.legend(fontsize=7, loc="lower right")
    for k in range(len(keys), nr * nc):
        axes[k // nc][k % nc].axis("off")
    verdict = ("PASS: all statistics within ±{:g} z".format(res["zmax"]) if res["ok"] else
               "FLAGGED: " + ", ".join(sorted({f["key"] for f in res["flagged"]})))
    fig.suptitle(f"posterior predictive check ({res['mode']}, {res['runs']} model runs vs {res['data_runs']} data; "
                 f"mean ± 2 SE, z at checkpoints) — {verdict}", fontsize=10,
                 color="black" if res["ok"] else "red")
    fig.supxlabel("MCS", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(args) -> int:
    from neuralcpm_plugin.bundle import load_bundle
    from neuralcpm_plugin.cli import claim_output
    from neuralcpm_plugin.io import load_dataset
    run_dir = Path(args.run_dir)
    bdir = run_dir / "model" if (run_dir / "model" / "model.json").exists() else run_dir
    try:
        bundle = load_bundle(bdir)
    except BundleError as e:
        raise ConfigError(f"{run_dir}: no trained model to check ({e})") from None
    out = Path(args.out) if args.out else (run_dir if bdir != run_dir else run_dir.parent) / "check"
    claim_output(out, kind="dir", overwrite=args.overwrite)
    states = load_dataset(args.data).states
    shape = tuple(bundle.hamiltonian.lattice.shape)
    if states[0].shape != shape:
        raise DataError(f"the data's lattice is {states[0].shape}, the model's {shape}", path=args.data)
    cfg = bundle.provenance.get("config") or {}
    proposal = (cfg.get("pl") or {}).get("proposal", "classic") if cfg.get("objective", {}).get("name") == "pl" \
        else "classic"
    res = posterior_predictive_check(bundle.hamiltonian, states, mcs=args.mcs, runs=args.runs, seed=args.seed,
                                     checkpoints=args.checkpoints, zmax=args.z, proposal=proposal, log=print)
    out.mkdir(parents=True, exist_ok=True)
    (out / "check.json").write_text(json.dumps(res, indent=1))
    png = plot_check(res, out / "check.png")
    print(f"wrote {out / 'check.json'}" + (f" and {png}" if png else ""))
    return 0
