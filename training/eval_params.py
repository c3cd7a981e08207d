"""`python -m training.evaluate params RUN_DIR` — parameter RMSE at T=1 and T* (paper §4.2; SPEC.md → Metrics).

Reads the run's bundle (``RUN_DIR/model``, or RUN_DIR itself if it is a bundle) and the true parameters
(``--truth``, else ``RUN_DIR/truth.json`` written by ``training.fit``), and prints the parameter vector
``[J(1,0), J(2,0), J(1,1), J(1,2), J(2,2), λ]`` and the RMSE at T=1 and at ``T* = (θ̂·θ̂)/(θ̂·θ)`` in both
scalings: per unordered pair (this project's unit; the reference-data targets) and the paper's (J × 4).

When the bundle holds the fit's diagnostics (pseudo-likelihood fits, ``training.diagnostics``), it also prints
each parameter's standard error and 95 % interval, whether the true value lies inside (at T=1 and after
dividing by T*, delta method), and the fit's warnings (stationarity, identifiability). Without any truth it
prints the estimates and their intervals only.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from neuralcpm_plugin.errors import BundleError, ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="run folder of training.fit (or a bundle directory)")
    p.add_argument("--truth", help="true parameters: P1 | P2 | cellsort-a | cellsort-b, a bundle, a JSON file "
                                   "({\"J(1,0)\": 0.6, ..., \"lambda\": 0.5} or {J, lambda}; optional \"scaling\": "
                                   "\"paper\"), or a Morpheus/CC3D model (default RUN_DIR/truth.json)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def evaluate_params(run_dir, truth=None) -> dict:
    """Return ``{"names", "learned", "truth", "per_pair": {...}, "paper": {...}}`` for a run."""
    from neuralcpm_plugin.bundle import load_bundle
    from neuralcpm_plugin.metrics.params import param_names, param_rmse_both_scalings, param_vector, truth_from_source
    run_dir = Path(run_dir)
    bdir = run_dir / "model" if (run_dir / "model" / "model.json").exists() else run_dir
    try:
        bundle = load_bundle(bdir)
    except BundleError as e:
        raise ConfigError(f"{run_dir}: no trained model to evaluate ({e})") from None
    try:
        v = param_vector(bundle)
    except ValueError as e:
        raise ConfigError(f"{bdir}: {e}") from None
    diag = bundle.provenance.get("diagnostics") or {}
    unc = diag.get("uncertainty")
    if unc is not None and len(unc.get("estimate", [])) != len(v):
        unc = None
    if truth is None:
        tf = run_dir / "truth.json"
        if not tf.exists():
            if unc is None:
                raise ConfigError(f"{run_dir}: no truth.json; give the true parameters with --truth")
            n_types = bundle.hamiltonian.term("contact").n_types
            return {"names": param_names(n_types), "learned": v.tolist(), "truth": None, "source": None,
                    "uncertainty": unc, "warnings": diag.get("warnings", [])}
        t = json.loads(tf.read_text())
    else:
        try:
            t = truth_from_source(truth)
        except (ValueError, KeyError, OSError) as e:
            raise ConfigError(str(e)) from None
    tv = np.asarray(t["vector"], dtype=np.float64)
    if tv.shape != v.shape:
        raise ConfigError(f"the model has {len(v)} parameters, the truth {len(tv)}")
    n_types = bundle.hamiltonian.term("contact").n_types
    out = {"names": param_names(n_types), "learned": v.tolist(), "truth": tv.tolist(), "source": t.get("source")}
    out.update(param_rmse_both_scalings(v, tv))
    if unc is not None:
        from .diagnostics import report_coverage
        out["uncertainty"] = unc
        out["coverage"] = report_coverage(unc, {"vector": tv})
    out["warnings"] = diag.get("warnings", [])
    return out


def run(args) -> int:
    res = evaluate_params(args.run_dir, args.truth)
    if args.json:
        print(json.dumps(res, indent=1))
        return 0
    unc = res.get("uncertainty")
    print(f"model: {args.run_dir}   truth: {res['source'] or 'none given (estimates and intervals only)'}")
    if unc is not None:
        lvl = round(100 * unc["level"])
        print(f"intervals: {unc['method']}")
    head = f"{'parameter':>10} {'learned':>10}"
    if unc is not None:
        head += f" {'SE':>8}   {lvl} % interval      "
    if res["truth"] is not None:
        head += f" {'true':>10}" + ("  inside" if unc is not None else "")
    print(head + "   (per unordered pair; λ)")
    for i, (n, a) in enumerate(zip(res["names"], res["learned"])):
        row = f"{n:>10} {a:10.4f}"
        if unc is not None:
            row += f" {unc['se'][i]:8.4f}   [{unc['lo'][i]:7.4f}, {unc['hi'][i]:7.4f}]"
        if res["truth"] is not None:
            row += f" {res['truth'][i]:10.4f}"
            if unc is not None:
                row += "  " + ("yes" if res["coverage"]["inside"][i] else "NO")
        print(row)
    two_d = unc is None or unc.get("ndim", 2) == 2     # paper scaling belongs to the paper's 2-D lattices
    if unc is not None and two_d:
        pp = unc["paper"]
        print("paper scaling (J x 4): " + ", ".join(
            f"{n} {e:.3f} [{lo:.3f}, {hi:.3f}]" for n, e, lo, hi in zip(pp["names"], pp["estimate"], pp["lo"], pp["hi"])))
    if res["truth"] is not None:
        for scaling, label in (("per_pair", "per pair"), ("paper", "paper scaling (J x 4)"))[:2 if two_d else 1]:
            r = res[scaling]
            print(f"RMSE {label}: T=1 {r['rmse_T1']:.4f}   T* {r['rmse_Tstar']:.4f}   (T* = {r['Tstar']:.4f})")
    cov = res.get("coverage")
    if cov is not None:
        print(f"true values inside the {lvl} % intervals: {cov['count']} of {cov['n']} at T=1", end="")
        ts = cov.get("Tstar_scaled")
        if ts is not None:
            print(f"; {sum(ts['inside'])} of {len(ts['inside'])} after dividing by T* = {ts['Tstar']:.4f} "
                  "(delta-method intervals: " + ", ".join(
                      f"{n} [{lo:.3f}, {hi:.3f}]" for n, lo, hi in zip(res["names"], ts["lo"], ts["hi"])) + ")")
        else:
            print()
    for w in res.get("warnings", []):
        print(f"WARNING: {w}")
    return 0
