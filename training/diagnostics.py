"""How much to trust a pseudo-likelihood fit: uncertainty, a stationarity check, identifiability.

All three work on the tabulated convex problem of an analytic fit (:class:`training.pseudolikelihood.LinearPL`,
kept on the :class:`~training.pseudolikelihood.PLResult`), so they cost a fraction of the fit itself.

**Uncertainty: a cluster (block) sandwich.** The fit minimises the mean over boundary sites i of
``ℓ_i(θ)`` (a site's negative log conditional likelihood). Sites of one snapshot are not independent, but the
dependence is local: a site's score ``s_i = ∇ℓ_i(θ̂)`` depends on its neighbours and, through the volume term,
on its cell and the candidate cells. Sites are therefore grouped into clusters — one *run* (a file holding a
time series, or one independent snapshot) × one square *block* of the lattice about 2.5 cell diameters on a
side — and

    Cov(θ̂) = A⁻¹ (G/(G−1) Σ_c S_c S_cᵀ) A⁻¹,   A = Σ_i ∇²ℓ_i(θ̂),   S_c = Σ_{i ∈ c} s_i,

with G clusters; 95 % intervals are ``θ̂ ± t_{0.975, G−1} · SE``. Covariances of the model's parameter vector
(``metrics.params.param_vector``: J per unordered pair, λ) follow from the free parameters by the (linear)
Jacobian; paper scaling multiplies J and its SE by 4. All frames of one time series share their clusters
(frames 50 MCS apart are strongly correlated), so adding frames never fakes precision.

**Stationarity.** The pseudo-likelihood assumes each snapshot is a sample of the Boltzmann distribution
(sites in local equilibrium). When the selected states hold time series (several frames of one file), the
frames of every series are split into an early and a late half, the model is refitted on each half, and the
difference is tested with the joint sandwich covariance (same clusters): per-parameter z and a Wald χ² test.
A warning names the parameters when p < 0.001.

**Identifiability.** A parameter that changes ΔH at fewer than ``MIN_SUPPORT`` boundary sites is not
determined by the data: its SE and interval are infinite, and a warning names it when a few sites see it (none
at all — a type pair that never touches, an absent type — is reported by ``training.fit``'s data check).
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["auto_frames", "block_clusters", "diagnose_pl", "format_uncertainty",
           "interval_table", "report_coverage", "sandwich_cov", "time_series_files", "truth_coverage"]

#: Sites that must see a parameter in their candidate ΔH for it to count as identified.
MIN_SUPPORT = 50
#: p-value below which the early / late windows are declared to disagree.
STATIONARITY_P = 1e-3

# ----------------------------------------------------------------------------------------- frames, clusters
def time_series_files(states) -> dict:
    """``{path: [state indices in order]}`` for the files whose states form a time series.

    A file's frames are a time series when there are at least two and their ``meta["mcs"]`` differ (or are
    unknown); frames with one common MCS (independent runs written into one file, as ``training.generate``
    does) are independent snapshots.
    """
    by: dict = {}
    for i, s in enumerate(states):
        by.setdefault(s.meta.get("path"), []).append(i)
    out = {}
    for path, idx in by.items():
        if path is None or len(idx) < 2:
            continue
        mcs = [states[i].meta.get("mcs") for i in idx]
        if any(m is None for m in mcs) or len(set(mcs)) > 1:
            out[path] = idx
    return out


def auto_frames(states) -> tuple[list, str | None]:
    """``--frames auto``: the final frame of every file whose frames carry increasing MCS (a recorded time
    series), every frame of the other files (independent snapshots; files without MCS are kept whole and the
    fit's stationarity check compares their early and late frames).

    Returns ``(states, note)``; ``note`` is None when nothing was dropped.
    """
    ts = {p: idx for p, idx in time_series_files(states).items()
          if all(states[i].meta.get("mcs") is not None for i in idx)}
    if not ts:
        return list(states), None
    drop = {i for idx in ts.values() for i in idx[:-1]}
    kept = [s for i, s in enumerate(states) if i not in drop]
    mcs = sorted({states[i].meta["mcs"] for idx in ts.values() for i in idx})
    return kept, (f"data: {len(ts)} file(s) hold time series (MCS {mcs[0]}…{mcs[-1]}); --frames auto (the default) "
                  f"keeps the final frame of each ({len(kept)} of {len(states)} states): early frames are far from "
                  "stationary and bias the pseudo-likelihood. --frames all|last:N uses more; the fit then checks "
                  "early against late frames.")


def _run_ids(states) -> np.ndarray:
    """One id per state: the file for time-series frames, the state itself otherwise."""
    ts = time_series_files(states)
    ids = np.arange(len(states))
    for idx in ts.values():
        ids[idx] = idx[0]
    return np.unique(ids, return_inverse=True)[1]


def block_clusters(states, row_state: np.ndarray, row_site: np.ndarray, block: int | None = None):
    """Cluster label per row (site) of the tabulated problem: run × square lattice block.

    ``block`` is the block side in sites; default ``max(8, 2.5·√(mean cell volume))``, so a block spans a few
    cell diameters and the score correlations (range ≈ one cell) mostly stay inside it. Returns
    ``(labels [m] in 0..G−1, info dict)``.
    """
    shape = states[0].shape
    if block is None:
        vols = np.concatenate([s.volumes()[s.cell_ids()] for s in states[:64]])
        block = max(8, round(2.5 * math.sqrt(max(float(vols.mean()), 1.0))))
    nb = [max(1, round(n / block)) for n in shape]
    coords = np.unravel_index(row_site, shape)
    bid = np.zeros(len(row_site), np.int64)
    for c, n, k in zip(coords, shape, nb):
        bid = bid * k + (c * k) // n
    run = _run_ids(states)[row_state]
    n_blocks = int(np.prod(nb))
    labels = np.unique(run * n_blocks + bid, return_inverse=True)[1]
    info = {"block_sites": int(block), "blocks_per_state": n_blocks, "runs": int(run.max()) + 1 if len(run) else 0}
    return labels, info


# ----------------------------------------------------------------------------------------- sandwich
def _cluster_sums(scores: torch.Tensor, labels: np.ndarray, G: int) -> torch.Tensor:
    out = torch.zeros((G, scores.shape[1]), dtype=torch.float64)
    out.index_add_(0, torch.as_tensor(labels, dtype=torch.long), scores.to(torch.float64).cpu())
    return out


def _bread(problem, theta):
    """A⁻¹ (pseudo-inverse on the identified subspace) of the summed Hessian A = Σ_i ∇²ℓ_i, and its rank."""
    _, _, h = problem(theta)
    A = (h * problem.n_rows).cpu().numpy()
    evals, evecs = np.linalg.eigh(A)
    keep = evals > 1e-9 * max(evals.max(), 1e-300)
    inv = (evecs[:, keep] / evals[keep]) @ evecs[:, keep].T
    return inv, int(keep.sum())


def sandwich_cov(problem, theta, labels: np.ndarray):
    """Cluster-robust covariance of the free parameters at ``theta`` (``labels``: cluster of every site).

    Returns ``(cov [n, n] numpy, G clusters)``.
    """
    s = problem.scores(theta)
    ul, lab = np.unique(labels, return_inverse=True)
    G = len(ul)
    S = _cluster_sums(s, lab, G).numpy()
    S = S - S.mean(0)            # zero at the exact optimum; centring guards against a loose convergence
    inv, _ = _bread(problem, theta)
    meat = S.T @ S * (G / max(G - 1, 1))
    return inv @ meat @ inv, G


def _refit(problem, theta0):
    from .optim import newton_minimize
    th, _, _, _ = newton_minimize(problem, theta0, max_iter=50, tol=1e-10)
    return th


# ----------------------------------------------------------------------------------------- parameter vector
def _vector_map(ham, pmap, theta: torch.Tensor, to_free=None, with_target: bool = False):
    """``(v(θ), J)``: the model's parameter vector (per pair, λ) and its Jacobian in the fit's parameters θ.

    ``to_free`` maps θ to the ParamMap's free vector (a learned V*: θ holds λV*); ``with_target`` appends the
    volume targets V*(1..T) to the vector.
    """
    from neuralcpm_plugin.metrics.params import param_vector

    def vector():
        v = param_vector(ham)
        if with_target:
            v = np.concatenate([v, ham.term("volume").target.detach().cpu().numpy().astype(np.float64)[1:]])
        return v

    def put(vec):
        pmap.set_flat(to_free(vec) if to_free is not None else vec)

    try:
        put(theta)
        v0 = vector()
        n = theta.numel()
        h = 1e-4
        cols = []
        for j in range(n):
            e = torch.zeros(n, dtype=torch.float64)
            e[j] = h
            put(theta + e)
            vp = vector()
            put(theta - e)
            vm = vector()
            cols.append((vp - vm) / (2 * h))
        return v0, np.stack(cols, axis=1)
    finally:
        put(theta)


def _tcrit(level: float, dof: int) -> float:
    from scipy import stats
    return float(stats.t.ppf(0.5 + level / 2, max(dof, 1)))


def interval_table(estimate, cov, crit: float, names) -> dict:
    """``{"names", "estimate", "se", "lo", "hi"}`` from a covariance and a critical value."""
    est = np.asarray(estimate, dtype=np.float64)
    se = np.sqrt(np.clip(np.diag(np.asarray(cov, dtype=np.float64)), 0, None))
    return {"names": list(names), "estimate": est.tolist(), "se": se.tolist(), "lo": (est - crit * se).tolist(),
            "hi": (est + crit * se).tolist()}


def _paper(table: dict) -> dict:
    from neuralcpm_plugin.metrics.params import PAPER_J_FACTOR
    out = {}
    for k in ("estimate", "se", "lo", "hi"):
        v = np.asarray(table[k], dtype=np.float64).copy()
        v[:-1] *= PAPER_J_FACTOR
        out[k] = v.tolist()
    out["names"] = table["names"]
    return out


def truth_coverage(unc: dict, truth_vector) -> dict:
    """Which true parameters lie in the intervals, per pair (T=1) and after dividing θ̂ by T*.

    T* = (θ̂·θ̂)/(θ̂·θ) (paper §4.2) is estimated too, so its intervals use the delta method:
    g(θ̂) = θ̂ (θ̂·θ)/(θ̂·θ̂), ∂g/∂θ̂ = (a/b) I + θ̂ (θ/b − 2aθ̂/b²)ᵀ with a = θ̂·θ, b = θ̂·θ̂.
    """
    est = np.asarray(unc["estimate"], dtype=np.float64)
    cov = np.asarray(unc["cov"], dtype=np.float64)
    t = np.asarray(truth_vector, dtype=np.float64)
    crit = float(unc["crit"])
    inside = [(lo <= x <= hi) for lo, x, hi in zip(unc["lo"], t, unc["hi"])]
    out = {"inside": inside, "count": int(sum(inside)), "n": len(inside)}
    a, b = float(est @ t), float(est @ est)
    if a > 0:
        g = est * a / b
        Jg = (a / b) * np.eye(len(est)) + np.outer(est, t / b - 2 * a * est / b ** 2)
        ts = interval_table(g, Jg @ cov @ Jg.T, crit, unc["names"])
        ts["inside"] = [(lo <= x <= hi) for lo, x, hi in zip(ts["lo"], t, ts["hi"])]
        ts["Tstar"] = b / a
        out["Tstar_scaled"] = ts
    return out


# ----------------------------------------------------------------------------------------- driver
def diagnose_pl(res, ham, states, *, level: float = 0.95, block: int | None = None, log=None) -> dict | None:
    """Uncertainty, identifiability and (for time series) stationarity of a convex pseudo-likelihood fit.

    ``res`` is the :class:`~training.pseudolikelihood.PLResult` of ``fit_pl(ham, states)`` (convex solver).
    Returns a JSON-able dict ``{"uncertainty", "identifiability", "stationarity", "warnings"}`` (None for
    stochastic fits, which keep no tabulated problem), and prints a summary through ``log``.
    """
    from neuralcpm_plugin.metrics.params import param_names
    problem, theta, pmap = res.problem, res.theta, res.param_map
    if problem is None or theta is None:
        if log:
            log("uncertainty: only for the convex (analytic) fit; none for a stochastic fit")
        return None
    labels, cinfo = block_clusters(states, problem.row_state, problem.row_site, block)
    cov_free, G = sandwich_cov(problem, theta, labels)
    warnings: list[str] = []
    # identifiability: parameters no (or few) boundary sites see
    support = problem.support()
    to_free = getattr(res, "to_free", None)
    n_target = 0
    try:
        names = param_names(ham.term("contact").n_types)
        v, Jac = _vector_map(ham, pmap, theta, to_free, with_target=to_free is not None)
        n_target = len(v) - len(names)
    except (ValueError, AttributeError, TypeError):
        v, Jac = theta.cpu().numpy(), np.eye(theta.numel())
        names = [f"free[{i}]" for i in range(theta.numel())]
    cov_all = Jac @ cov_free @ Jac.T
    extra = None
    if n_target:
        tnames = [f"V*({a})" for a in range(1, n_target + 1)]
        extra = interval_table(v[-n_target:], cov_all[-n_target:, -n_target:], _tcrit(level, G - 1), tnames)
        v, Jac, cov_all = v[:-n_target], Jac[:-n_target], cov_all[:-n_target, :-n_target]
    cov = cov_all
    # a vector entry is unidentified if it depends on a free parameter with too little support
    weak_free = support < MIN_SUPPORT
    weak = (np.abs(Jac[:, weak_free]) > 1e-9).any(1) if weak_free.any() else np.zeros(len(v), bool)
    dof = G - 1
    crit = _tcrit(level, dof)
    table = interval_table(v, cov, crit, names)
    unidentified = []
    for i in np.nonzero(weak)[0]:
        sup = int(min(support[np.abs(Jac[i]) > 1e-9])) if (np.abs(Jac[i]) > 1e-9).any() else 0
        table["se"][i] = float("inf")
        table["lo"][i], table["hi"][i] = float("-inf"), float("inf")
        unidentified.append({"name": names[i], "sites": sup})
        if sup > 0:   # no site at all (types that never touch, absent types) is training.fit's data check
            warnings.append(f"{names[i]} is barely identified by these data: only {sup} boundary site(s) see it in "
                            f"their candidate ΔH (need ≥ {MIN_SUPPORT}); its value {v[i]:.4g} is no measurement "
                            "and its interval is left infinite")
    if G < 2 * len(v):
        warnings.append(f"only {G} clusters (runs × {cinfo['block_sites']}-site blocks) for {len(v)} parameters: "
                        "the intervals are unreliable; give more or larger snapshots")
    unc = dict(table, cov=cov.tolist(), level=level, crit=crit, dof=dof, clusters=G,
               method=f"cluster sandwich: {cinfo['runs']} run(s) × {cinfo['blocks_per_state']} blocks of "
                      f"{cinfo['block_sites']}×{cinfo['block_sites']} sites, G = {G}, t({dof})",
               paper=_paper(table), ndim=int(states[0].ids.ndim))
    if extra is not None:
        unc["targets"] = extra
    out = {"uncertainty": unc,
           "identifiability": {"support": [int(x) for x in support], "min_support": MIN_SUPPORT,
                               "unidentified": unidentified},
           "stationarity": None, "warnings": warnings}
    st = _stationarity(problem, theta, states, labels, ham, pmap, names, to_free)
    if st is not None:
        out["stationarity"] = st
        if st["warn"]:
            warnings.append(st["message"])
    if log:
        for line in format_uncertainty(unc):
            log(line)
        if st is not None:
            for line in st["lines"]:
                log(line)
        for w in warnings:
            log(f"WARNING: {w}")
    return out


def _stationarity(problem, theta, states, labels, ham, pmap, names, to_free=None) -> dict | None:
    ts = time_series_files(states)
    if not ts:
        return None
    early_states, late_states = set(), set()
    for idx in ts.values():
        h = len(idx) // 2
        early_states.update(idx[:h])
        late_states.update(idx[h:])
    rs = problem.row_state
    r_e = np.nonzero(np.isin(rs, sorted(early_states)))[0]
    r_l = np.nonzero(np.isin(rs, sorted(late_states)))[0]
    if len(r_e) == 0 or len(r_l) == 0:
        return None
    G = int(labels.max()) + 1
    parts, ests = [], []
    for rows in (r_e, r_l):
        sub = problem.subset(rows)
        th = _refit(sub, theta)
        S = _cluster_sums(sub.scores(th), labels[rows], G).numpy()
        inv, _ = _bread(sub, th)
        parts.append(S @ inv)                        # [G, n]: cluster c's influence on the window's estimate
        ests.append(th)
        del sub
    th_e, th_l = ests
    D = parts[0] - parts[1]
    D = D - D.mean(0)
    used = len(np.unique(labels[np.concatenate([r_e, r_l])]))
    cov_d_free = D.T @ D * (used / max(used - 1, 1))
    v_e, Jac = _vector_map(ham, pmap, th_e, to_free)
    v_l, _ = _vector_map(ham, pmap, th_l, to_free)
    _vector_map(ham, pmap, theta, to_free)          # leave the model at the full fit
    cov_d = Jac @ cov_d_free @ Jac.T
    d = v_e - v_l
    sd = np.sqrt(np.clip(np.diag(cov_d), 1e-300, None))
    z = d / sd
    evals, evecs = np.linalg.eigh(cov_d)
    keep = evals > 1e-10 * max(evals.max(), 1e-300)
    proj = evecs[:, keep].T @ d
    wald = float(np.sum(proj ** 2 / evals[keep]))
    df = int(keep.sum())
    from scipy import stats
    p = float(stats.chi2.sf(wald, df)) if df else 1.0
    warn = p < STATIONARITY_P
    frames_e = sorted({states[i].meta.get("mcs", states[i].meta.get("frame")) for i in early_states},
                      key=lambda x: (x is None, x))
    frames_l = sorted({states[i].meta.get("mcs", states[i].meta.get("frame")) for i in late_states},
                      key=lambda x: (x is None, x))

    def rng(fr):
        return f"{fr[0]}–{fr[-1]}" if len(fr) > 1 else f"{fr[0]}"

    lines = [(f"stationarity: {len(ts)} time series; early frames (MCS/frame {rng(frames_e)}) vs late ({rng(frames_l)}): "
             f"Wald χ² = {wald:.1f} on {df} df, p = {p:.2g}"),
             f"{'parameter':>10} {'early':>9} {'late':>9} {'z':>7}"]
    lines += [f"{n:>10} {a:9.4f} {b:9.4f} {zz:7.1f}" for n, a, b, zz in zip(names, v_e, v_l, z)]
    bad = [f"{n} {a:.3f} → {b:.3f} (z = {zz:.1f})" for n, a, b, zz in zip(names, v_e, v_l, z) if abs(zz) > 3]
    msg = (f"the early frames (MCS/frame {rng(frames_e)}) and the late ones ({rng(frames_l)}) give different "
           f"parameters (p = {p:.2g}): " + ("; ".join(bad) if bad else "jointly") +
           ". The data are not stationary: the fit mixes non-equilibrium frames. Use --frames final (or "
           "last:N with a smaller N, or drop the early frames).")
    return {"early": {"frames": [str(f) for f in frames_e], "estimate": v_e.tolist()},
            "late": {"frames": [str(f) for f in frames_l], "estimate": v_l.tolist()},
            "z": z.tolist(), "wald": wald, "df": df, "p": p, "warn": bool(warn), "message": msg if warn else "",
            "lines": lines}


def format_uncertainty(unc: dict) -> list[str]:
    """The printed table: estimate, SE and interval per parameter (per pair; λ), and in paper scaling (2-D
    lattices only: the paper's factor 4 on J belongs to its 2-D neighbourhood; ``unc["ndim"]``)."""
    lvl = round(100 * unc["level"])
    paper = unc.get("ndim", 2) == 2
    lines = [f"uncertainty ({unc['method']}):",
             (f"{'parameter':>10} {'estimate':>9} {'SE':>8}   {lvl} % interval       "
              + (f"| paper scaling (J x 4): estimate, {lvl} % interval" if paper else ""))]
    pp = unc["paper"]
    for i, n in enumerate(unc["names"]):
        lines.append(f"{n:>10} {unc['estimate'][i]:9.4f} {unc['se'][i]:8.4f}   [{unc['lo'][i]:7.4f}, "
                     f"{unc['hi'][i]:7.4f}]" + (f"   | {pp['estimate'][i]:8.4f}  [{pp['lo'][i]:7.4f}, "
                                               f"{pp['hi'][i]:7.4f}]" if paper else ""))
    tg = unc.get("targets")
    if tg:
        for i, n in enumerate(tg["names"]):
            lines.append(f"{n:>10} {tg['estimate'][i]:9.3f} {tg['se'][i]:8.3f}   [{tg['lo'][i]:7.3f}, "
                         f"{tg['hi'][i]:7.3f}]   (learned target volume, sites)")
    return lines


def report_coverage(unc: dict, truth: dict, log=None) -> dict | None:
    """Log which true parameters (``truth["vector"]``, per pair) lie in the intervals; return the counts."""
    tv = np.asarray(truth.get("vector", []), dtype=np.float64)
    if tv.shape != (len(unc["estimate"]),):
        return None
    c = truth_coverage(unc, tv)
    out = {"inside": [bool(x) for x in c["inside"]], "count": c["count"], "n": c["n"]}
    outside = [n for n, ok in zip(unc["names"], c["inside"]) if not ok]
    if "Tstar_scaled" in c:
        ts = c["Tstar_scaled"]
        out["Tstar_scaled"] = {k: ts[k] for k in ("estimate", "se", "lo", "hi", "Tstar")}
        out["Tstar_scaled"]["inside"] = [bool(x) for x in ts["inside"]]
    if log:
        lvl = round(100 * unc["level"])
        log(f"true parameters inside the {lvl} % intervals: {c['count']} of {c['n']}"
            + (f" (outside: {', '.join(outside)})" if outside else ""))
    return out
