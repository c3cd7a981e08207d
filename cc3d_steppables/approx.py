"""Per-type potential fields: the documented approximation of a global neural Hamiltonian inside CC3D.

A global NH (paper §3.1) has a receptive field as large as the lattice; evaluating it once per copy attempt
inside CompuCell3D would take minutes per MCS. The exported project instead uses, between updates,

    ΔH_NN(copy cell a into site x)  ≈  φ[τ(a), x] − φ[τ(σ(x)), x]

with per-type potential fields φ (shape ``(T + 1, *lattice)``) computed from the network at the state σ₀
of the last update (every k MCS):

* at every *boundary* site x of σ₀ (a site with a copy neighbour in another cell) and every type t that
  occurs among those neighbours, D[t, x] = the network's exact ΔH of copying into x a neighbouring cell of
  type t (the mean over such cells if there are several); D[τ(σ₀(x)), x] = 0;
* elsewhere, and for types not adjacent at x, D[t, x] is taken from the nearest boundary site (Euclidean,
  on the lattice array) with the same current type that has an entry for t (0 if there is none);
* φ = D. At σ₀ the approximation is exact for every copy attempt whose source is the only neighbouring
  cell of its type; it degrades as the lattice moves away from σ₀ and where two cells of one type meet.

The error is measured by :func:`measure_error` on roll-outs of the exported dynamics (analytic terms exact,
neural part through the fields, updated every k MCS): the RMSE between the fields' ΔH and the network's
exact ΔH over copy attempts (site, neighbouring cell of another id) drawn uniformly from states at all
ages 0 … k MCS since the last update, relative to the standard deviation of the exact ΔH.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from scipy import ndimage

from neuralcpm_plugin.hamiltonian.base import Batch, Term
from neuralcpm_plugin.lattice import CellState, neighbour_offsets

__all__ = ["FieldTerm", "measure_error", "type_fields"]


def _candidates(ids: np.ndarray, types: np.ndarray, order: int = 2, periodic: bool = True):
    """(flat site, candidate cell) pairs: every site and every distinct neighbouring cell of another id."""
    shape = ids.shape
    pairs = set()
    flat = ids.ravel()
    idx = np.arange(flat.size)
    for off in neighbour_offsets(order, ids.ndim):
        nb = np.roll(ids, tuple(-int(o) for o in off), axis=tuple(range(ids.ndim))).ravel()
        if not periodic:
            coords = np.stack(np.unravel_index(idx, shape), -1) + off
            ok = np.all((coords >= 0) & (coords < np.asarray(shape)), axis=1)
        else:
            ok = np.ones(flat.size, bool)
        m = ok & (nb != flat)
        pairs.update(zip(idx[m].tolist(), nb[m].tolist()))
    if not pairs:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    arr = np.array(sorted(pairs), dtype=np.int64)
    return arr[:, 0], arr[:, 1]


def _exact_deltas(nh_terms, ids, types, sites, new_ids, *, periodic=True, chunk: int = 4096) -> np.ndarray:
    """The neural terms' exact ΔH for (flat site, new id) attempts on one state (batched torch)."""
    if len(sites) == 0:
        return np.zeros(0)
    dev = next(iter(nh_terms[0].parameters())).device
    b = Batch.from_states([CellState(np.asarray(ids), np.asarray(types))], device=dev, periodic=periodic)
    out = np.zeros(len(sites))
    with torch.no_grad():
        for lo in range(0, len(sites), chunk):
            s = torch.as_tensor(sites[lo:lo + chunk], device=dev)[None]
            a = torch.as_tensor(new_ids[lo:lo + chunk], device=dev)[None]
            d = sum(t.delta(b, s, a) for t in nh_terms)
            out[lo:lo + chunk] = d[0].detach().cpu().numpy()
    return out


def type_fields(nh_terms, ids, types, *, n_types: int | None = None, order: int = 2, periodic: bool = True):
    """Per-type fields φ ``(T + 1, *shape)`` (float64) of the neural term(s) at state (ids, types).

    ``nh_terms``: a neural term, a list of them, or a Hamiltonian (its non-analytic terms are used).
    """
    if hasattr(nh_terms, "neural_terms"):
        nh_terms = nh_terms.neural_terms()
    if isinstance(nh_terms, Term):
        nh_terms = [nh_terms]
    ids = np.asarray(ids)
    types = np.asarray(types)
    T1 = (int(n_types) if n_types is not None else int(types.max())) + 1
    shape = ids.shape
    sites, cand = _candidates(ids, types, order, periodic)
    d = _exact_deltas(nh_terms, ids, types, sites, cand, periodic=periodic)
    tflat = types[ids.ravel()]
    ct = types[cand]
    # mean per (site, candidate type)
    D = np.zeros((T1, ids.size))
    cnt = np.zeros((T1, ids.size))
    np.add.at(D, (ct, sites), d)
    np.add.at(cnt, (ct, sites), 1.0)
    have = cnt > 0
    D[have] /= cnt[have]
    for t in range(T1):
        have[t, tflat == t] = True  # own type: 0
        D[t, tflat == t] = 0.0
    # fill the gaps from the nearest site with the same current type that has an entry
    for t in range(T1):
        for t0 in range(T1):
            grp = tflat == t0
            if t == t0 or not grp.any():
                continue
            src = (have[t] & grp).reshape(shape)
            need = (~have[t] & grp).reshape(shape)
            if not need.any():
                continue
            if not src.any():
                continue  # stays 0
            _, ind = ndimage.distance_transform_edt(~src, return_indices=True)
            near = np.ravel_multi_index(tuple(ind), shape)
            nm = need.ravel()
            D[t, nm] = D[t, near.ravel()[nm]]
    return D.reshape((T1,) + shape)


class FieldTerm(Term):
    """The fields' ΔH as a callback term for the package's exact sampler (same formula as in CC3D)."""

    kind = "type_fields"
    analytic = False

    def __init__(self, phi):
        super().__init__(1.0)
        self.phi = np.asarray(phi, dtype=np.float64)

    def delta_np(self, state, site, new_id, cache=None) -> float:
        site = tuple(int(s) for s in site)
        old = int(state.ids[site])
        t = state.types
        return float(self.phi[(int(t[int(new_id)]),) + site] - self.phi[(int(t[old]),) + site])


def measure_error(hamiltonian, nh_terms, state: CellState, *, k: int = 10, mcs: float = 20.0,
                  n_attempts: int = 400, seed: int = 0, samples_per_interval: int = 4) -> dict:
    """Relative RMSE of the field approximation on roll-outs of the exported dynamics (see module doc).

    Returns {"rel_rmse", "rmse", "std_exact", "n", "k", "mcs", "update_s" (seconds per field update),
    "rel_rmse_at_update" (error right after an update, age 0), "by_age" (list of {"age_mcs", "n", "rel_rmse"}:
    the relative error by time since the last update, to choose k)}.
    """
    from neuralcpm_plugin.sampling.exact import ExactSampler
    lat = hamiltonian.lattice
    analytic = [(t.spec(), t.tensors()) for t in hamiltonian.terms if t.analytic]
    rng = np.random.default_rng(seed)
    ft = FieldTerm(np.zeros((1,) + tuple(state.shape)))
    sampler = ExactSampler(state, None, seed=seed, terms=analytic, temperature=hamiltonian.temperature,
                           periodic=lat.periodic, copy_order=lat.copy_order, contact_order=lat.contact_order,
                           callback_terms=[ft])
    types = state.types
    n_t = max(int(types.max()), len(hamiltonian.type_names or []) - 1)
    k = max(1, int(k))
    n_updates = max(1, int(np.ceil(float(mcs) / k)))
    sub = max(1, int(samples_per_interval))
    per_sample = max(1, int(np.ceil(n_attempts / (n_updates * sub))))
    approx_all, exact_all, age0 = [], [], []
    by_age = [([], []) for _ in range(sub)]
    upd_times = []
    for _ in range(n_updates):
        t0 = time.perf_counter()
        ids = sampler.ids.copy()
        ft.phi = type_fields(nh_terms, ids, types, n_types=n_t, order=lat.copy_order, periodic=lat.periodic)
        upd_times.append(time.perf_counter() - t0)
        for j in range(sub):
            if j > 0:
                sampler.step(k / sub)
            ids = sampler.ids.copy()
            sites, cand = _candidates(ids, types, lat.copy_order, lat.periodic)
            if len(sites) == 0:
                continue
            pick = rng.choice(len(sites), size=min(per_sample, len(sites)), replace=False)
            s, a = sites[pick], cand[pick]
            ex = _exact_deltas(nh_terms, ids, types, s, a, periodic=lat.periodic)
            cs = CellState(ids, types)
            ap = np.array([ft.delta_np(cs, np.unravel_index(int(x), ids.shape), int(c)) for x, c in zip(s, a)])
            approx_all.append(ap)
            exact_all.append(ex)
            by_age[j][0].append(ap)
            by_age[j][1].append(ex)
            if j == 0:
                age0.append((ap, ex))
        sampler.step(k / sub)
    ap = np.concatenate(approx_all)
    ex = np.concatenate(exact_all)
    std = float(np.std(ex))
    rmse = float(np.sqrt(np.mean((ap - ex) ** 2)))
    a0 = np.concatenate([a for a, _ in age0])
    e0 = np.concatenate([e for _, e in age0])
    rmse0 = float(np.sqrt(np.mean((a0 - e0) ** 2)))
    ages = []
    for j, (aps, exs) in enumerate(by_age):
        if aps:
            a, e = np.concatenate(aps), np.concatenate(exs)
            ages.append({"age_mcs": j * k / sub, "n": len(e),
                         "rel_rmse": float(np.sqrt(np.mean((a - e) ** 2))) / std if std > 0 else float("nan")})
    return {"rel_rmse": rmse / std if std > 0 else float("nan"), "rmse": rmse, "std_exact": std, "n": len(ex),
            "k": k, "mcs": float(n_updates * k), "update_s": float(np.median(upd_times)),
            "rel_rmse_at_update": rmse0 / std if std > 0 else float("nan"), "by_age": ages}
