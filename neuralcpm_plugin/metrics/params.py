"""Parameter-recovery metric of paper §4.2: RMSE of the analytic parameters at T=1 and at T*.

The parameter vector of a two-type cell-sorting model is ``[J(1,0), J(2,0), J(1,1), J(1,2), J(2,2), λ]``
(in general: ``J(a,0)`` for a = 1..T, then ``J(a,b)`` for 1 <= a <= b <= T, then λ). Because the scale of a
Boltzmann energy is not identifiable from snapshots alone, the paper also reports the RMSE of θ̂/T* against θ
with the temperature ``T* = (θ̂·θ̂)/(θ̂·θ)`` that minimises it.

Scalings: ``"per_pair"`` is this project's physical unit (J per unordered neighbour pair);
``"paper"`` multiplies J by 4 (the reference code's Moore half-stencil divided by 4, SPEC.md), λ unchanged.
The paper's numbers (cell sorting a: 0.055 / 0.021) are in the paper scaling; the reference-data recovery
targets (P1, P2) are quoted per pair.
"""

from __future__ import annotations

import numpy as np

__all__ = ["KNOWN_TRUTHS", "PAPER_J_FACTOR", "param_names", "param_rmse", "param_rmse_both_scalings", "param_vector",
           "truth_from_source"]

PAPER_J_FACTOR = 4.0


def param_names(n_types: int = 2) -> list[str]:
    """Names of the entries of :func:`param_vector` for ``n_types`` biological types."""
    names = [f"J({a},0)" for a in range(1, n_types + 1)]
    names += [f"J({a},{b})" for a in range(1, n_types + 1) for b in range(a, n_types + 1)]
    return names + ["lambda"]


def _from_arrays(J, lam, n_types: int, scaling: str, scale: float = 1.0) -> np.ndarray:
    J = np.asarray(J, dtype=np.float64) * scale
    lam = np.asarray(lam, dtype=np.float64).reshape(-1) * scale
    f = PAPER_J_FACTOR if scaling == "paper" else 1.0
    vals = [f * 0.5 * (J[a, 0] + J[0, a]) for a in range(1, n_types + 1)]
    vals += [f * 0.5 * (J[a, b] + J[b, a]) for a in range(1, n_types + 1) for b in range(a, n_types + 1)]
    lam_v = float(np.mean(lam[1:n_types + 1])) if lam.size > 1 else float(lam[0])
    return np.array(vals + [lam_v], dtype=np.float64)


def param_vector(model, *, scaling: str = "per_pair", n_types: int | None = None) -> np.ndarray:
    """The parameter vector of a model.

    Parameters
    ----------
    model : Hamiltonian, ModelBundle, dict or sequence
        A Hamiltonian (or bundle) holding a ``contact`` and a ``volume`` term (their ``scale`` — e.g. the
        closure weight w_a — is multiplied in); a dict ``{"J": (T+1)x(T+1), "lambda": scalar or (T+1,)}`` in
        per-pair units; or an already-built vector (returned as float64, scaling applied to nothing).
    scaling : {"per_pair", "paper"}
        Unit of the contact energies in the result (λ is the same in both).
    """
    if scaling not in ("per_pair", "paper"):
        raise ValueError(f"scaling must be 'per_pair' or 'paper', got {scaling!r}")
    ham = getattr(model, "hamiltonian", model)
    if hasattr(ham, "terms"):
        contact = next((t for t in ham.terms if t.kind == "contact"), None)
        volume = next((t for t in ham.terms if t.kind == "volume"), None)
        if contact is None or volume is None:
            raise ValueError("parameter recovery needs a model with a contact and a volume term")
        cs, vs = contact.spec(), volume.spec()
        J = np.asarray(cs["params"]["J"], dtype=np.float64)
        nt = J.shape[0] - 1 if n_types is None else n_types
        if not np.isclose(contact.scale_value(), volume.scale_value()):
            # terms with different scales: fold each scale in separately
            vec_j = _from_arrays(J, [0.0, 0.0], nt, scaling, contact.scale_value())
            vec_l = _from_arrays(J, vs["params"]["lambda"], nt, scaling, volume.scale_value())
            return np.concatenate([vec_j[:-1], vec_l[-1:]])
        return _from_arrays(J, vs["params"]["lambda"], nt, scaling, contact.scale_value())
    if isinstance(model, dict):
        J = np.asarray(model["J"], dtype=np.float64)
        nt = J.shape[0] - 1 if n_types is None else n_types
        return _from_arrays(J, model["lambda"], nt, scaling)
    return np.asarray(model, dtype=np.float64).reshape(-1)


def param_rmse(theta_hat, theta) -> tuple[float, float, float]:
    """RMSE of ``theta_hat`` against ``theta`` at T=1 and at ``T* = (θ̂·θ̂)/(θ̂·θ)``.

    Returns ``(rmse_T1, rmse_Tstar, Tstar)``. Both vectors must be in the same scaling.

    >>> r1, rs, ts = param_rmse([2.0, 4.0], [1.0, 2.0])
    >>> round(r1, 6), round(rs, 6), round(ts, 6)
    (1.581139, 0.0, 2.0)
    """
    th = np.asarray(theta_hat, dtype=np.float64).reshape(-1)
    t = np.asarray(theta, dtype=np.float64).reshape(-1)
    if th.shape != t.shape:
        raise ValueError(f"parameter vectors differ in length: {th.shape[0]} vs {t.shape[0]}")
    rmse1 = float(np.sqrt(np.mean((th - t) ** 2)))
    dot = float(th @ t)
    if dot <= 0 or not np.isfinite(dot):
        return rmse1, float("nan"), float("nan")
    tstar = float(th @ th) / dot
    rmse_s = float(np.sqrt(np.mean((th / tstar - t) ** 2)))
    return rmse1, rmse_s, tstar


def param_rmse_both_scalings(theta_hat, theta) -> dict:
    """:func:`param_rmse` of ``[J..., λ]`` vectors (per-pair units) in this project's scaling and in the
    paper's (every J × :data:`PAPER_J_FACTOR`, λ unchanged).

    Returns ``{"per_pair": {...}, "paper": {...}}``, each ``{"rmse_T1", "rmse_Tstar", "Tstar"}``.
    """
    out = {}
    for scaling, f in (("per_pair", 1.0), ("paper", PAPER_J_FACTOR)):
        a = np.array(theta_hat, dtype=np.float64)
        b = np.array(theta, dtype=np.float64)
        a[:-1] *= f
        b[:-1] *= f
        r1, rs, ts = param_rmse(a, b)
        out[scaling] = {"rmse_T1": r1, "rmse_Tstar": rs, "Tstar": ts}
    return out


# True parameters of the known data sets, per unordered pair (this project's units); vector order of
# :func:`param_names`. P1/P2: ../shared/reference-data/README.md. cellsort-a/b: SPEC.md (paper scaling / 4).
KNOWN_TRUTHS = {
    "P1": {"vector": [0.625, 0.25, 0.25, 1.125, 0.25, 0.5], "source": "reference-data P1 (Morpheus), README"},
    "P2": {"vector": [2.0, 2.0, 1.0, 1.6, 1.0, 0.8], "source": "reference-data P2 (CompuCell3D), README"},
    "cellsort-a": {"vector": [0.5 / 4, 0.5 / 4, 0.333333 / 4, 0.2 / 4, 0.266667 / 4, 0.1],
                   "source": "paper cell sorting a (SPEC.md, paper scaling / 4)"},
    "cellsort-b": {"vector": [2.5 / 4, 1.0 / 4, 1.0 / 4, 4.5 / 4, 1.0 / 4, 0.5],
                   "source": "paper cell sorting b (SPEC.md, paper scaling / 4)"},
}


def _J_from(J) -> np.ndarray:
    if isinstance(J, dict):
        pairs = {}
        for k, v in J.items():
            a, b = (int(x) for x in (k.split("-") if isinstance(k, str) else k))
            pairs[(a, b)] = float(v)
        n = max(max(p) for p in pairs) + 1
        M = np.zeros((n, n))
        for (a, b), v in pairs.items():
            M[a, b] = M[b, a] = v
        return M
    return np.asarray(J, dtype=np.float64)


def _truth_from_names(spec: dict, scaling: str, source: str | None) -> dict:
    """``{"J(1,0)": v, ..., "lambda": v[, "scaling": ...]}`` → truth dict (see :func:`truth_from_source`)."""
    import re
    pairs, lam, unknown = {}, None, []
    for k, val in spec.items():
        key = k.replace(" ", "") if isinstance(k, str) else k
        m = re.fullmatch(r"J\((\d+),(\d+)\)", key) if isinstance(key, str) else None
        if m:
            a, b = sorted((int(m.group(1)), int(m.group(2))))
            if (a, b) in pairs:
                raise ValueError(f"truth: J({a},{b}) is given twice ({k!r})")
            pairs[(a, b)] = float(val)
        elif key in ("lambda", "λ"):
            lam = float(val)
        elif key not in ("scaling", "source"):
            unknown.append(k)
    if unknown:
        raise ValueError(f"truth: unknown parameter name(s) {unknown}; the names are J(a,b) (a, b = 0 medium, "
                         "1..T types) and lambda")
    n_types = max(b for _, b in pairs)
    names = param_names(n_types)
    def key(n):                                   # "J(a,b)" → (a, b), a <= b
        return tuple(sorted(int(x) for x in n[2:-1].split(",")))

    missing = [n for n in names[:-1] if key(n) not in pairs]
    if lam is None:
        missing.append("lambda")
    if missing:
        raise ValueError(f"truth: missing parameter(s) {missing} (a model with {n_types} cell types has "
                         f"{', '.join(names)})")
    f = PAPER_J_FACTOR if spec.get("scaling", scaling) == "paper" else 1.0
    vec = [pairs[key(n)] / f for n in names[:-1]] + [lam]
    return {"vector": vec, "names": names, "source": source or "given parameters"}


def truth_from_source(spec, *, scaling: str = "per_pair", source: str | None = None) -> dict:
    """True parameters as ``{"vector": per-pair vector, "names": [...], "source": str}``.

    ``spec``: a name of :data:`KNOWN_TRUTHS`; a dict of parameter names → values as :func:`param_names`
    prints them (``{"J(1,0)": 0.625, "J(2,0)": 0.25, "J(1,1)": 0.25, "J(1,2)": 1.125, "J(2,2)": 0.25,
    "lambda": 0.5}``; J(a,b) and J(b,a) are the same; every name once); a dict
    ``{"J": table or {"a-b": v}, "lambda": number or per type}`` or ``{"vector": [...]}`` (in every dict form
    an optional ``"scaling": "paper"`` says J is in the paper's unit and divides it by 4); a path to a bundle
    directory, a JSON file of such a dict, or a Morpheus ``.xml`` / CompuCell3D ``.cc3d`` model.
    """
    from pathlib import Path
    if isinstance(spec, str) and spec in KNOWN_TRUTHS:
        d = dict(KNOWN_TRUTHS[spec])
        d["names"] = param_names(2)
        return d
    if isinstance(spec, dict) and any(isinstance(k, str) and k.replace(" ", "").startswith("J(") for k in spec):
        return _truth_from_names(spec, scaling, source)
    if isinstance(spec, dict):
        if "vector" in spec:
            v = np.asarray(spec["vector"], dtype=np.float64)
            if spec.get("scaling", scaling) == "paper":
                v[:-1] /= PAPER_J_FACTOR
        else:
            J = _J_from(spec["J"] if "J" in spec else spec["J_pairs"])
            if spec.get("scaling", scaling) == "paper":
                J = J / PAPER_J_FACTOR
            lam = spec["lambda"] if "lambda" in spec else spec.get("lambda_raw")
            if "lambda" not in spec and lam is not None:   # the authors' softplus parametrisation
                lam = float(np.log1p(np.exp(-abs(lam))) + max(lam, 0.0) + 1e-3)
            n = J.shape[0] - 1
            lam_a = np.asarray(lam, dtype=np.float64).reshape(-1)
            lam_v = lam_a if lam_a.size > 1 else np.array([0.0] + [float(lam_a[0])] * n)
            v = _from_arrays(J, lam_v, n, "per_pair")
        n_types = round((np.sqrt(8 * len(v) + 1) - 3) / 2) if len(v) > 1 else 1
        return {"vector": v.tolist(), "names": param_names(n_types), "source": source or "given parameters"}
    p = Path(spec)
    if p.is_dir() or p.name == "model.json":
        from ..bundle import load_bundle
        v = param_vector(load_bundle(p))
        return {"vector": v.tolist(), "names": param_names(round((np.sqrt(8 * len(v) + 1) - 3) / 2)),
                "source": f"bundle {p}"}
    if p.suffix.lower() == ".json":
        import json
        return truth_from_source(json.loads(p.read_text()), scaling=scaling, source=source or str(p))
    if p.suffix.lower() in (".xml", ".gz", ".cc3d"):
        import importlib
        modname = "cc3d_steppables" if p.suffix.lower() == ".cc3d" else "morpheus_xml"
        mod = importlib.import_module(modname)
        load = getattr(mod, "load_model", None)
        if load is None:
            raise ValueError(f"{p}: importing this model needs {modname}.load_model, not available yet")
        ham = getattr(load(p), "hamiltonian", None)
        v = param_vector(ham)
        return {"vector": v.tolist(), "names": param_names(ham.n_types or 2), "source": f"model {p}"}
    raise ValueError(f"unknown truth {spec!r}: give {', '.join(KNOWN_TRUTHS)}, a bundle, a JSON file or a model file")
