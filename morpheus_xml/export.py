"""Export a model bundle as a runnable MorpheusML (version 4) model.

``python -m morpheus_xml.export BUNDLE --out model.xml [--init SNAPSHOT] [--mcs N] [--seed S]``

Translation (so that Morpheus 2.2.4's ΔH of every copy attempt equals the bundle's; see
:mod:`morpheus_xml.evaluator` for Morpheus's formulas):

* ``Space/Lattice`` square, size ``W, H, 0`` (x = column), periodic in x and y, ``Neighborhood`` = the copy order;
  a 3-D bundle (array ``[z, y, x]``) becomes ``class="cubic"``, size ``W, H, D``, periodic in x, y and z.
  Neighbourhood orders: square 1..6, cubic 1..8 — where Morpheus's order n is the package's (the n smallest
  distances; cubic orders 1–8 hold 6, 18, 26, 32, 56, 80, 92, 122 sites; Morpheus's cubic order 9 jumps to
  distance √12 and is refused).
* ``Time``: StartTime 0, StopTime = ``--mcs``, ``RandomSeed`` = ``--seed`` (optional ``SaveInterval``).
* ``CellTypes``: the medium first, then the biological types in the bundle's order (so ``cell.type`` in
  Morpheus equals the package's type index); ``VolumeConstraint`` strength = λ·scale, target = V*.
* ``CPM``: ``Interaction/Contact`` per type pair with value = J·scale (per unordered pair) and
  ``ShapeSurface scaling="none"`` over the contact order; ``MonteCarloSampler stepper="random"``, ``MCSDuration``
  1, ``Neighborhood`` = copy order, ``MetropolisKinetics temperature`` = T.
* Site potentials: for each biological type τ one ``Global/Field`` ``phi_<type>`` (float64 values in base64
  ``Data``, bit-exact) and ``<Haptotaxis attractant="phi_<type>" strength="-1"/>`` in the CellType: Morpheus's
  Haptotaxis then adds ``φ_τnew(x) − φ_τold(x)`` to ΔH — exactly an ``ExternalPotential`` (φ_τ = Σ μ_τ·scale·field).
* ``DirectedMotion`` when present (constant directions as vectors, bands as the authors' expressions).
* ``CellPopulations``: one ``Population`` per biological type with one ``Cell`` (id kept) and its ``Nodes`` per
  cell — the initial state exactly. Cells that straddle a periodic boundary are written unwrapped (nodes may
  lie outside the lattice, as in Morpheus's own checkpoints) so that Morpheus's cell centres match the
  package's.
* ``Analysis``: ``TiffPlotter`` (``cell.id``, ``cell.type``; 16 bit, ``OME-header="false"``, time-lapse) and a CSV
  ``Logger`` of cell volumes.

Neural terms (which Morpheus cannot evaluate) become per-type potential fields computed from the network for
the initial state (:func:`neural_potential_fields`): for every boundary site x and neighbouring cell c the
network's ΔH of copying c into x is measured; the fields are chosen so that ``φ_τ(c)(x) − φ_τ(σ(x))(x)``
reproduces it (averaged over candidate cells of one type), with the medium's field fixed at 0, and filled
elsewhere from the nearest measured site. This is exact at the initial state for every attempt whose ΔH
depends only on the types involved; copies between two cells of one type get 0 from the fields. The export
prints the relative RMSE of this approximation over all boundary attempts of the initial state. Run the model
through :mod:`morpheus_xml.run` to recompute the fields every K MCS.
"""

from __future__ import annotations

import argparse
import base64
import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from lxml import etree

from neuralcpm_plugin.cli import claim_output, command
from neuralcpm_plugin.errors import DataError, ExportError
from neuralcpm_plugin.export_checks import check_export, check_run_options
from neuralcpm_plugin.lattice import CellState, neighbour_offsets

__all__ = [
    "ExportReport",
    "default_layout",
    "default_outdir",
    "direction_expression",
    "export_model",
    "hook_command",
    "main",
    "morpheus_command",
    "neural_potential_fields",
]

MAX_ORDER = 6  # Morpheus square lattices: neighbourhood orders 1..6 (distance <= 3)
MAX_ORDER_CUBIC = 8  # Morpheus cubic lattices: orders 1..8 equal the package's (distance <= 3); 9 differs


@dataclass
class ExportReport:
    """What :func:`export_model` wrote."""

    path: Path
    n_cells: int
    type_names: list
    neural: bool
    approx_rel_rmse: float | None = None
    approx_max_abs: float | None = None
    n_attempts: int = 0
    error_sample: str = ""
    notes: list = field(default_factory=list)
    bundle: Path | None = None  # the bundle directory exported, when given as a path (for the printed hook command)
    mcs: int = 1000

    def summary(self) -> str:
        lines = [f"wrote {self.path} (MorpheusML 4, {self.n_cells} cells, types {self.type_names[1:]})"]
        if self.neural:
            lines.append("neural terms: exported as per-type potential fields (Haptotaxis, strength -1) computed "
                         "from the network for the initial state; Morpheus cannot evaluate the network itself.")
            if self.approx_rel_rmse is not None:
                lines.append(f"  approximation error at the initial state over {self.n_attempts} boundary copy "
                             f"attempts ({self.error_sample}): RMSE/std(ΔH_NN) = {self.approx_rel_rmse:.4g}, "
                             f"max |error| = {self.approx_max_abs:.4g}")
            lines.append("  the fields go stale as cells move: the energy hook (morpheus_xml.run) recomputes them "
                         "every K MCS.")
        else:
            lines.append("analytic terms only: Morpheus's ΔH equals the bundle's for every copy attempt.")
        lines.extend(self.notes)
        lines.append(f"run: {morpheus_command(self.path)}   (writes a TIFF stack + CSV log; one OpenMP thread: "
                     "Morpheus's trajectory depends on its thread count)")
        if self.neural and self.bundle is not None:
            lines.append("     or with the neural fields recomputed every 50 MCS (the energy hook): "
                         + hook_command(self.bundle, self.path.with_name(self.path.name.split(".")[0] + "_hook.npz"),
                                        mcs=self.mcs, init=self.path))
        return "\n".join(lines)


def default_outdir(model) -> Path:
    """The output folder the printed command uses for ``model``: ``<model stem>_out`` beside it."""
    model = Path(model)
    return model.with_name(model.name.split(".")[0] + "_out")


def morpheus_command(model, outdir=None, *, morpheus: str = "morpheus") -> str:
    """The shell command that runs ``model`` headless in Morpheus, as printed by the exporter: it creates the
    output folder (Morpheus 2.2.4 stops with "output directory ... does not exist" otherwise) and pins one
    OpenMP thread (a Morpheus run is reproducible bit for bit only at a fixed thread count)."""
    out = shlex.quote(str(outdir if outdir is not None else default_outdir(model)))
    return (f"mkdir -p {out} && OMP_NUM_THREADS=1 {shlex.quote(str(morpheus))} --file {shlex.quote(str(model))} "
            f"--outdir {out}")


def hook_command(bundle, out, *, mcs: int = 1000, refresh: int = 50, morpheus: str = "morpheus",
                 init=None) -> str:
    """The energy-hook command line (:mod:`morpheus_xml.run`) with every required flag."""
    cmd = (f"python -m morpheus_xml.run {shlex.quote(str(bundle))} --morpheus {shlex.quote(str(morpheus))} "
           f"--mcs {int(mcs)} --refresh {int(refresh)} --out {shlex.quote(str(out))}")
    if init is not None:
        cmd += f" --init {shlex.quote(str(init))}"
    return cmd


def _fmt(x: float) -> str:
    x = float(x)
    if x == int(x) and abs(x) < 1e15:
        return str(int(x))
    return repr(x)


def _safe_names(names) -> list[str]:
    out, seen = [], set()
    for i, n in enumerate(names):
        s = re.sub(r"[^A-Za-z0-9_]", "_", str(n)) if n else ""
        if not s or not (s[0].isalpha() or s[0] == "_"):
            s = f"ct{i}" if i else "medium"
        base, k = s, 2
        while s in seen:
            s = f"{base}_{k}"
            k += 1
        seen.add(s)
        out.append(s)
    return out


def direction_expression(d: dict, ndim: int = 2) -> str:
    """MorpheusML vector expression for a DirectedMotion direction spec (``[dy, dx]`` → ``"dx, dy, 0"``;
    in 3-D ``[dz, dy, dx]`` → ``"dx, dy, dz"``)."""
    if d["mode"] == "constant":
        if ndim == 3:
            dz, dy, dx = d["vector"]
            return f"{_fmt(dx)}, {_fmt(dy)}, {_fmt(dz)}"
        dy, dx = d["vector"]
        return f"{_fmt(dx)}, {_fmt(dy)}, 0"
    if d["mode"] != "band":
        raise ExportError(f"DirectedMotion direction mode {d['mode']!r} cannot be exported")
    axis = int(d["axis"])
    c = ({2: "x", 1: "y", 0: "z"} if ndim == 3 else {1: "x", 0: "y"})[axis]
    p, L = f"cell.center.{c}", f"size.{c}"
    lo, hi = _fmt(d["lo"]), _fmt(d["hi"])
    if d["sense"] == "inward":
        e = f"sign({L}/2-{p})*(({p}<{L}*{lo}) or ({p}>{L}*{hi}))"
    else:
        e = f"sign({p}-{L}/2)*({p}>{L}*{lo})*({p}<{L}*{hi})"
    return {"x": f"{e}, 0, 0", "y": f"0, {e}, 0", "z": f"0, 0, {e}"}[c]


# ------------------------------------------------------------------------------------------------------
# neural terms → per-type potential fields
# ------------------------------------------------------------------------------------------------------
def boundary_attempts(state: CellState, order: int, periodic: bool = True):
    """All distinct copy attempts at the state: (flat site, new id) for each site and each different cell
    among its copy-neighbours. Returns two int64 arrays."""
    ids = state.ids
    H, W = ids.shape
    cand = []
    for dy, dx in neighbour_offsets(order, 2):
        nb = np.roll(ids, (-dy, -dx), (0, 1)) if periodic else None
        if nb is None:
            nb = np.full_like(ids, -1)
            ys, xs = slice(max(0, -dy), H - max(0, dy)), slice(max(0, -dx), W - max(0, dx))
            nb[ys, xs] = ids[max(0, dy):H + min(0, dy), max(0, dx):W + min(0, dx)]
        cand.append(nb.ravel())
    cand = np.stack(cand, 1)
    flat = ids.ravel()
    pairs = set()
    rows, cols = np.nonzero((cand != flat[:, None]) & (cand >= 0))
    for s, k in zip(rows.tolist(), cols.tolist()):
        pairs.add((s, int(cand[s, k])))
    if not pairs:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    arr = np.array(sorted(pairs), dtype=np.int64)
    return arr[:, 0], arr[:, 1]


def neural_delta(terms, state: CellState, sites, new_ids, *, chunk: int = 2048, periodic: bool = True,
                 device=None):
    """Σ over ``terms`` of the batched ΔH for the attempts (flat sites, new ids), float64 numpy."""
    import torch

    from neuralcpm_plugin.hamiltonian.base import Batch
    batch = Batch.from_states([state], periodic=periodic, device=device)
    out = np.zeros(len(sites))
    with torch.no_grad():
        for a in range(0, len(sites), chunk):
            s = torch.as_tensor(sites[a:a + chunk], dtype=torch.long, device=batch.device)[None]
            n = torch.as_tensor(new_ids[a:a + chunk], dtype=torch.long, device=batch.device)[None]
            d = torch.zeros(s.shape, dtype=torch.float64, device=batch.device)
            for t in terms:
                d = d + t.delta(batch, s, n).to(torch.float64)
            out[a:a + chunk] = d[0].cpu().numpy()
    return out


def _select_attempts(sites, new, max_attempts, holdout, rng):
    """Split the attempts into those evaluated to build the fields (whole sites, at most ``max_attempts``) and
    a held-out random sample from the other sites (to measure the error honestly). ``None`` = all."""
    if max_attempts is None or len(sites) <= max_attempts:
        return np.arange(len(sites)), None
    order = rng.permutation(np.unique(sites))
    counts = np.bincount(sites)
    take = order[np.cumsum(counts[order]) <= max_attempts]
    chosen = np.isin(sites, take)
    fit = np.nonzero(chosen)[0]
    rest = np.nonzero(~chosen)[0]
    held = rng.choice(rest, size=min(holdout, len(rest)), replace=False) if len(rest) and holdout else None
    return fit, held


def neural_potential_fields(terms, state: CellState, n_types: int, *, order: int = 2, periodic: bool = True,
                            max_attempts: int | None = None, holdout: int | None = None, seed: int = 0,
                            device=None, parts: dict | None = None):
    """Per-type potential fields ``phi[τ, y, x]`` (φ_0 ≡ 0) reproducing the terms' ΔH at ``state``.

    Construction: for every boundary site x and every cell c among x's copy-neighbours, D(x, c) = the terms'
    ΔH of copying c into x. With τ0 = the type of x's current cell, φ_τ0(x) = −D̄(x, medium) when the medium is a
    candidate (else 0) and φ_τ(x) = φ_τ0(x) + D̄(x, τ) for the other candidate types (D̄ = mean over candidate cells
    of type τ; φ_τ(x) = D̄(x, τ) on medium sites). Then Morpheus's ``φ_τnew(x) − φ_τold(x)`` equals D exactly for
    every attempt whose candidate is the only one of its type; same-type copies get 0. Values at sites not on
    the boundary (or not evaluated) are copied from the nearest evaluated site of that type.

    ``max_attempts`` bounds the number of network evaluations (whole sites are drawn at random until the budget
    is used); the error is then measured on a held-out random sample of ``holdout`` attempts at other sites
    (default ``max(50, min(200, max_attempts // 4))``).

    ``terms`` are objects with ``delta(batch, sites, new_ids)`` (terms, or wrappers such as the pooled NH's
    first-order form, see :mod:`morpheus_xml.run`).  ``parts`` (optional, ``{name: [some of terms]}``): the
    fields of those subsets too — the construction is linear in D, so the fields of the whole are the sum of
    the fields of its parts — reported in ``stats["parts"][name]`` (``phi`` and the error keys below).

    Returns ``(phi, stats)``; stats: ``rel_rmse`` (RMSE of field ΔH − exact ΔH over the error sample, divided
    by the std of the exact ΔH), ``max_abs``, ``n_attempts`` (size of the error sample), ``n_evaluated``,
    ``n_boundary_attempts``, ``error_sample`` ("all boundary attempts" or "held-out").
    """
    H, W = state.shape
    sites_all, new_all = boundary_attempts(state, order, periodic)
    parts = dict(parts or {})
    if len(sites_all) == 0:
        phi = np.zeros((n_types + 1, H, W))
        zero = {"rel_rmse": 0.0, "max_abs": 0.0, "n_attempts": 0, "std": 0.0, "rmse": 0.0}
        return phi, {**zero, "n_evaluated": 0, "n_boundary_attempts": 0, "error_sample": "none",
                     "parts": {k: {**zero, "phi": phi.copy()} for k in parts}}
    rng = np.random.default_rng(seed)
    if holdout is None:
        holdout = max(50, min(200, (max_attempts or 0) // 4))
    fit, held = _select_attempts(sites_all, new_all, max_attempts, holdout, rng)
    sites, new = sites_all[fit], new_all[fit]
    in_part = {id(t) for ts in parts.values() for t in ts}
    groups = {**{k: list(v) for k, v in parts.items()}, None: [t for t in terms if id(t) not in in_part]}

    def deltas(s, n):
        return {k: neural_delta(ts, state, s, n, periodic=periodic, device=device) if ts else np.zeros(len(s))
                for k, ts in groups.items()}

    Ds = deltas(sites, new)
    D = sum(Ds.values())
    phi = _fields_from_delta(D, sites, new, state, n_types)
    if held is None:
        e_sites, e_new, e_Ds, kind = sites, new, Ds, "all boundary attempts"
    else:
        e_sites, e_new = sites_all[held], new_all[held]
        e_Ds = deltas(e_sites, e_new)
        kind = "held-out"
    stats = _field_error(phi, state, e_sites, e_new, sum(e_Ds.values()))
    stats.update({"n_evaluated": len(sites), "n_boundary_attempts": len(sites_all), "error_sample": kind,
                  "parts": {}})
    for k in parts:
        phk = _fields_from_delta(Ds[k], sites, new, state, n_types)
        stats["parts"][k] = {**_field_error(phk, state, e_sites, e_new, e_Ds[k]), "phi": phk}
    return phi, stats


def _fields_from_delta(D, sites, new, state: CellState, n_types: int):
    """The fields of :func:`neural_potential_fields` from the ΔH values D of the attempts (sites, new)."""
    from scipy import ndimage

    H, W = state.shape
    phi = np.zeros((n_types + 1, H, W))
    types = state.types
    flat_ids = state.ids.ravel()
    t_old = types[flat_ids[sites]]
    t_new = types[new]
    N = H * W
    # mean ΔH per (site, candidate type), candidates of another type than the site's
    sums = np.zeros((n_types + 1, N))
    cnt = np.zeros((n_types + 1, N))
    m = t_new != t_old
    np.add.at(sums, (t_new[m], sites[m]), D[m])
    np.add.at(cnt, (t_new[m], sites[m]), 1)
    Dm = np.divide(sums, cnt, out=np.zeros_like(sums), where=cnt > 0)
    known = np.zeros((n_types + 1, N), bool)
    flat_phi = np.zeros((n_types + 1, N))
    site_type = types[flat_ids]
    # base value φ_τ0(x) for the site's own type: −D_0 when the medium is a candidate, else 0
    base = np.where(cnt[0] > 0, -Dm[0], 0.0)
    evaluated = np.zeros(N, bool)
    evaluated[sites] = True
    idx = np.nonzero((site_type > 0) & evaluated)[0]
    flat_phi[site_type[idx], idx] = base[idx]
    known[site_type[idx], idx] = True
    for t in range(1, n_types + 1):
        sel = cnt[t] > 0
        flat_phi[t, sel] = np.where(site_type[sel] == 0, 0.0, base[sel]) + Dm[t, sel]
        known[t, sel] = True
    for t in range(1, n_types + 1):
        k = known[t].reshape(H, W)
        f = flat_phi[t].reshape(H, W)
        if k.all() or not k.any():
            phi[t] = f
            continue
        _, (iy, ix) = ndimage.distance_transform_edt(~k, return_indices=True)
        phi[t] = np.where(k, f, f[iy, ix])
    return phi


def _field_error(phi, state: CellState, e_sites, e_new, e_D) -> dict:
    """RMSE of the fields' ΔH against ``e_D`` over the attempts (e_sites, e_new), relative to std(e_D)."""
    W = state.shape[1]
    types = state.types
    e_old_t = types[state.ids.ravel()[e_sites]]
    approx = phi[types[e_new], e_sites // W, e_sites % W] - phi[e_old_t, e_sites // W, e_sites % W]
    err = approx - e_D
    std = float(e_D.std()) if len(e_D) else 0.0
    rmse = float(np.sqrt(np.mean(err ** 2))) if len(err) else 0.0
    return {"rel_rmse": rmse / std if std > 0 else (0.0 if rmse == 0 else float("inf")),
            "max_abs": float(np.abs(err).max()) if len(err) else 0.0, "n_attempts": len(e_sites),
            "std": std, "rmse": rmse}


# ------------------------------------------------------------------------------------------------------
# initial layouts
# ------------------------------------------------------------------------------------------------------
def default_layout(shape, n_types: int, targets, *, cells_per_type: int = 20, seed: int = 0) -> CellState:
    """Documented default initial state: ``cells_per_type`` cells of each type, squares of side
    ``max(1, round(sqrt(V*_τ)/2))`` (a quarter of the target volume), on a square grid centred on the lattice,
    types assigned by a seeded random permutation; ids 1..N in grid order (row-major). On a 3-D lattice: cubes
    of side ``max(1, round(V*_τ^(1/3)/2))`` (an eighth of the target volume) on a cubic grid."""
    shape = tuple(int(v) for v in shape)
    nd = len(shape)
    n = cells_per_type * n_types
    if n == 0:
        return CellState(np.zeros(shape, np.int32), np.zeros(1, np.int32))
    rng = np.random.default_rng(seed)
    tys = np.repeat(np.arange(1, n_types + 1), cells_per_type)
    rng.shuffle(tys)
    root = np.sqrt if nd == 2 else np.cbrt
    sides = [max(1, round(root(max(float(targets[t]), 1.0)) / 2)) for t in range(n_types + 1)]
    pitch = max(sides[1:]) + 1
    g = int(np.ceil(np.sqrt(n))) if nd == 2 else round(float(np.cbrt(n)))
    g += int(g ** nd < n)
    if g * pitch > min(shape):
        raise ExportError(f"the default layout of {n} cells (pitch {pitch}) does not fit a "
                          f"{'x'.join(map(str, shape))} lattice; pass --init SNAPSHOT or fewer --cells-per-type")
    start = [(L - g * pitch) // 2 for L in shape]
    ids = np.zeros(shape, np.int32)
    types = np.zeros(n + 1, np.int32)
    for k in range(n):
        cell = np.unravel_index(k, (g,) * nd)
        s = sides[tys[k]]
        ids[tuple(slice(a + i * pitch, a + i * pitch + s) for a, i in zip(start, cell))] = k + 1
        types[k + 1] = tys[k]
    return CellState(ids, types, {"layout": "default"})


def _nodes_text(state: CellState, cid: int, periodic: bool) -> str:
    pos = np.argwhere(state.ids == cid).astype(np.int64)  # row-major; first = reference site
    if periodic and len(pos):
        L = np.asarray(state.ids.shape, dtype=np.int64)
        pos = pos - L * np.round((pos - pos[0]) / L).astype(np.int64)
    if state.ids.ndim == 3:
        return ";".join(f"{x}, {y}, {z}" for z, y, x in pos.tolist())
    return ";".join(f"{x}, {y}, 0" for y, x in pos.tolist())


def _b64_field(arr: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(arr, dtype="<f8").tobytes()).decode("ascii")


# ------------------------------------------------------------------------------------------------------
# the writer
# ------------------------------------------------------------------------------------------------------
def build_xml(hamiltonian, state: CellState, *, mcs: int = 1000, seed: int = 1, title: str = "neuralcpm",
              record_every: int | None = None, save_interval: int | None = None, start_time: float = 0.0,
              neural_fields: np.ndarray | None = None, details: str = "") -> etree._Element:
    """The MorpheusML document (lxml element) for an analytic Hamiltonian (+ optional neural fields)."""
    lat = hamiltonian.lattice
    nd = len(lat.shape)
    if nd not in (2, 3):
        raise ExportError(f"only 2-D (square) and 3-D (cubic) lattices can be exported to Morpheus, got shape "
                          f"{lat.shape}")
    if not lat.periodic:
        raise ExportError("only periodic lattices can be exported to Morpheus (the package's open boundaries "
                          "have no exact MorpheusML equivalent)")
    shape = tuple(int(v) for v in lat.shape)
    H, W = shape[-2:]
    D = shape[0] if nd == 3 else 0
    check_export(hamiltonian, state, mcs=mcs, intervals={"--record-every": record_every,
                                                         "--save-interval": save_interval})
    max_order = MAX_ORDER if nd == 2 else MAX_ORDER_CUBIC
    for name, o in (("copy", lat.copy_order), ("contact", lat.contact_order)):
        if not 1 <= o <= max_order:
            raise ExportError(f"{name} neighbourhood order {o} is outside 1..{max_order}, the orders of Morpheus's "
                              f"{'square' if nd == 2 else 'cubic'} lattice that match the package's")
    names = list(hamiltonian.type_names or [])
    n_types = max(len(names) - 1, int(state.types.max()) if len(state.types) else 0)
    for t in hamiltonian.analytic_terms():
        n_types = max(n_types, getattr(t, "n_types", 0))
    names = names + [f"ct{i}" for i in range(len(names), n_types + 1)] if names else \
        ["medium"] + [f"ct{i}" for i in range(1, n_types + 1)]
    names = _safe_names(names)
    if int(state.types.max()) > n_types:
        raise ExportError(f"the initial state has cell type {int(state.types.max())}, the model only {n_types}")
    cells = state.cell_ids()
    if len(cells) and int(cells.max()) > 32767:
        raise ExportError("cell ids above 32767 do not fit Morpheus's 16-bit TIFF output; relabel the state")

    J = np.zeros((n_types + 1, n_types + 1))
    lam = np.zeros(n_types + 1)
    target = np.zeros(n_types + 1)
    has_volume = False
    phi = np.zeros((n_types + 1, *shape))
    has_phi = False
    dm = None
    for t in hamiltonian.analytic_terms():
        spec = t.spec()
        p, sc = spec["params"], t.scale_value()
        if t.kind == "contact":
            if int(p.get("order", lat.contact_order)) != lat.contact_order:
                raise ExportError(f"contact term of order {p.get('order')} differs from the lattice's contact order "
                                  f"{lat.contact_order}; Morpheus has one ShapeSurface neighbourhood")
            Jt = np.asarray(p["J"], dtype=np.float64)
            J[: Jt.shape[0], : Jt.shape[1]] += Jt * sc
        elif t.kind == "volume":
            if has_volume:
                raise ExportError("more than one volume term cannot be exported")
            lt, tt = np.asarray(p["lambda"], float), np.asarray(p["target"], float)
            lam[: len(lt)] = lt * sc
            target[: len(tt)] = tt
            has_volume = True
        elif t.kind == "external":
            mu = np.asarray(p["mu"], float) * sc
            fld = t.tensors()["field"].detach().cpu().numpy().astype(np.float64)
            for k in range(1, len(mu)):
                if mu[k] != 0:
                    phi[k] += mu[k] * fld
                    has_phi = True
        elif t.kind == "directed_motion":
            if dm is not None:
                raise ExportError("more than one directed-motion term cannot be exported")
            dm = (np.asarray(p["strength"], float) * sc, p["direction"])
        else:
            raise ExportError(f"term kind {t.kind!r} has no MorpheusML equivalent in this exporter")
    if neural_fields is not None:
        phi[: neural_fields.shape[0]] += neural_fields
        has_phi = True
    phi[0] = 0.0

    root = etree.Element("MorpheusModel", version="4")
    desc = etree.SubElement(root, "Description")
    etree.SubElement(desc, "Title").text = title
    etree.SubElement(desc, "Details").text = details or "Exported by neuralcpm-plugin (morpheus_xml.export)."
    glob = etree.SubElement(root, "Global")
    field_syms = {}
    if has_phi:
        for k in range(1, n_types + 1):
            if np.any(phi[k] != 0):
                sym = f"phi_{names[k]}"
                field_syms[k] = sym
                f = etree.SubElement(glob, "Field", symbol=sym, value="0")
                etree.SubElement(f, "Data", encoding="base64").text = _b64_field(phi[k])
                f.find("Data").set("word-size", "8")
    space = etree.SubElement(root, "Space")
    etree.SubElement(space, "SpaceSymbol", symbol="l")
    lt_el = etree.SubElement(space, "Lattice", {"class": "square" if nd == 2 else "cubic"})
    etree.SubElement(lt_el, "Size", symbol="size", value=f"{W}, {H}, {D}")
    bc = etree.SubElement(lt_el, "BoundaryConditions")
    for axis in "xyz"[:nd]:
        etree.SubElement(bc, "Condition", type="periodic", boundary=axis)
    nb = etree.SubElement(lt_el, "Neighborhood")
    etree.SubElement(nb, "Order").text = str(lat.copy_order)
    tm = etree.SubElement(root, "Time")
    etree.SubElement(tm, "StartTime", value=_fmt(start_time))
    etree.SubElement(tm, "StopTime", value=_fmt(start_time + mcs))
    if save_interval is not None:
        etree.SubElement(tm, "SaveInterval", value=_fmt(save_interval))
    etree.SubElement(tm, "RandomSeed", value=str(int(seed)))
    etree.SubElement(tm, "TimeSymbol", symbol="time")
    cts = etree.SubElement(root, "CellTypes")
    etree.SubElement(cts, "CellType", {"name": names[0], "class": "medium"})
    for k in range(1, n_types + 1):
        ct = etree.SubElement(cts, "CellType", {"name": names[k], "class": "biological"})
        if has_volume:
            etree.SubElement(ct, "VolumeConstraint", target=_fmt(target[k]), strength=_fmt(lam[k]))
        if k in field_syms:
            etree.SubElement(ct, "Haptotaxis", attractant=field_syms[k], strength="-1")
        if dm is not None and k < len(dm[0]) and dm[1][k] is not None and dm[0][k] != 0:
            etree.SubElement(ct, "DirectedMotion", strength=_fmt(dm[0][k]),
                             direction=direction_expression(dm[1][k], nd))
    cpm = etree.SubElement(root, "CPM")
    inter = etree.SubElement(cpm, "Interaction", default="0")
    for a in range(n_types + 1):
        for b in range(a, n_types + 1):
            if a == 0 and b == 0:
                continue
            etree.SubElement(inter, "Contact", type1=names[b], type2=names[a], value=_fmt(J[a, b]))
    mcs_el = etree.SubElement(cpm, "MonteCarloSampler", stepper="random")
    etree.SubElement(mcs_el, "MCSDuration", value="1")
    nb = etree.SubElement(mcs_el, "Neighborhood")
    etree.SubElement(nb, "Order").text = str(lat.copy_order)
    etree.SubElement(mcs_el, "MetropolisKinetics", temperature=_fmt(hamiltonian.temperature))
    ss = etree.SubElement(cpm, "ShapeSurface", scaling="none")
    nb = etree.SubElement(ss, "Neighborhood")
    etree.SubElement(nb, "Order").text = str(lat.contact_order)
    pops = etree.SubElement(root, "CellPopulations")
    for k in range(1, n_types + 1):
        pop = etree.SubElement(pops, "Population", type=names[k], size="0")
        for cid in cells[state.types[cells] == k].tolist():
            c = etree.SubElement(pop, "Cell", id=str(int(cid)))
            etree.SubElement(c, "Nodes").text = _nodes_text(state, int(cid), lat.periodic)
    an = etree.SubElement(root, "Analysis")
    rec = str(int(record_every if record_every else max(1, mcs // 20 if mcs >= 20 else mcs)))
    tp = etree.SubElement(an, "TiffPlotter", {"time-step": rec, "format": "16bit", "compression": "false",
                                              "timelapse": "true", "OME-header": "false"})
    etree.SubElement(tp, "Channel", {"symbol-ref": "cell.id"})
    etree.SubElement(tp, "Channel", {"symbol-ref": "cell.type"})
    lg = etree.SubElement(an, "Logger", {"time-step": rec})
    inp = etree.SubElement(lg, "Input")
    etree.SubElement(inp, "Symbol", {"symbol-ref": "cell.id"})
    etree.SubElement(inp, "Symbol", {"symbol-ref": "cell.type"})
    etree.SubElement(inp, "Symbol", {"symbol-ref": "cell.volume"})
    out = etree.SubElement(lg, "Output")
    etree.SubElement(out, "TextOutput", {"file-format": "csv", "separator": "comma", "file-name": "cells"})
    if not len(glob):
        root.remove(glob)
    return root


def load_initial_state(path, frame: int = 0) -> CellState:
    """One frame of a snapshot file (any format :func:`neuralcpm_plugin.io.load_states` reads), a Morpheus
    checkpoint ``.xml.gz``, or the initial state of a MorpheusML model ``.xml``."""
    p = Path(path)
    if p.name.endswith(".xml.gz"):
        from .readers import read_checkpoint
        return read_checkpoint(p)
    if p.suffix == ".xml":
        from .importer import parse_model
        st = parse_model(p).state
        if st is None:
            raise DataError("the MorpheusML model has no CellPopulations", path=p)
        return st
    from neuralcpm_plugin.io import load_states
    states = load_states(p)
    if not -len(states) <= frame < len(states):
        raise DataError(f"frame {frame} out of range (the file holds {len(states)} frames)", path=p)
    return states[frame]


def resolve_model_and_state(bundle, init, frame: int = 0, *, cells_per_type: int = 20, seed: int = 1):
    """``(hamiltonian, n_types, initial state)`` from a bundle (or its path, or a Hamiltonian) and ``init``.

    ``init``: a CellState, a snapshot file (frame ``frame``), or None for the default layout
    (``cells_per_type`` cells per type at the volume term's target volumes, seeded by ``seed``).
    """
    from neuralcpm_plugin.bundle import ModelBundle, load_bundle
    if init is None:
        check_run_options(intervals={"--cells-per-type": cells_per_type})
    if isinstance(bundle, (str, Path)):
        bundle = load_bundle(bundle)
    ham = bundle.hamiltonian if isinstance(bundle, ModelBundle) else bundle
    n_types = len(ham.type_names) - 1 if ham.type_names else 0
    for t in ham.analytic_terms():
        n_types = max(n_types, getattr(t, "n_types", 0))
    if init is None:
        targets = np.full(n_types + 1, 25.0)
        vol = ham.term("volume")
        if vol is not None:
            targets[: vol.target.shape[0]] = vol.target.detach().cpu().numpy()
        state = default_layout(ham.lattice.shape, n_types, targets, cells_per_type=cells_per_type, seed=seed)
    elif isinstance(init, CellState):
        state = init
    else:
        state = load_initial_state(init, frame)
    return ham, n_types, state


def export_model(bundle, out, *, init=None, frame: int = 0, mcs: int = 1000, seed: int = 1,
                 record_every: int | None = None, save_interval: int | None = None, cells_per_type: int = 20,
                 title: str = "neuralcpm", start_time: float = 0.0, field_attempts: int | None = None,
                 device=None) -> ExportReport:
    """Write ``bundle`` (a bundle path, :class:`~neuralcpm_plugin.bundle.ModelBundle` or Hamiltonian) as MorpheusML.

    Parameters
    ----------
    init : CellState or path, optional
        The initial state (a snapshot file and ``frame``); default :func:`default_layout`.
    mcs, seed : int
        Simulated MCS (``StopTime``) and Morpheus's ``RandomSeed``.
    record_every : int, optional
        TiffPlotter/Logger interval in MCS (default mcs/20).
    save_interval : int, optional
        Checkpoint interval (``Time/SaveInterval``); none by default.
    field_attempts : int, optional
        Budget of network ΔH evaluations for the neural potential fields (default: every boundary attempt).
    device : str, optional
        Torch device for the network evaluations (e.g. ``"cuda"``).
    """
    check_run_options(mcs=mcs, intervals={"--record-every": record_every, "--save-interval": save_interval},
                      counts={"--field-attempts": field_attempts})
    ham, n_types, state = resolve_model_and_state(bundle, init, frame, cells_per_type=cells_per_type, seed=seed)
    lat = ham.lattice
    check_export(ham, state)    # the validation shared with the CC3D exporter (again in build_xml: cheap)
    if ham.neural_terms() and len(lat.shape) != 2:
        raise ExportError(f"neural terms are 2-D only; this model has a {len(lat.shape)}-D lattice {tuple(lat.shape)}")
    report = ExportReport(Path(out), len(state.cell_ids()), [], bool(ham.neural_terms()), mcs=int(mcs),
                          bundle=Path(bundle) if isinstance(bundle, (str, os.PathLike)) else None)
    fields = None
    details = "Exported by neuralcpm-plugin (morpheus_xml.export). Analytic terms are native MorpheusML elements."
    if ham.neural_terms():
        import time
        t0 = time.perf_counter()
        if device is not None:
            for t in ham.neural_terms():
                t.to(device)
        fields, stats = neural_potential_fields(ham.neural_terms(), state, n_types, order=lat.copy_order,
                                                periodic=lat.periodic, max_attempts=field_attempts, seed=seed,
                                                device=device)
        report.approx_rel_rmse, report.approx_max_abs = stats["rel_rmse"], stats["max_abs"]
        report.n_attempts = stats["n_attempts"]
        report.error_sample = stats["error_sample"]
        report.notes.append(f"  fields built from {stats['n_evaluated']} of {stats['n_boundary_attempts']} boundary "
                            f"attempts in {time.perf_counter() - t0:.1f} s")
        details += (" The neural terms are represented by per-type potential fields phi_<type> (Haptotaxis, "
                    "strength -1) computed from the network for the initial state; relative RMSE of that "
                    f"approximation at the initial state: {stats['rel_rmse']:.4g}.")
    root = build_xml(ham, state, mcs=mcs, seed=seed, title=title, record_every=record_every,
                     save_interval=save_interval, start_time=start_time, neural_fields=fields, details=details)
    report.type_names = [c.get("name") for c in root.findall("CellTypes/CellType")]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(etree.tostring(root, pretty_print=True, xml_declaration=True, encoding="UTF-8"))
    return report


@command
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m morpheus_xml.export",
                                description="Export a NeuralCPM model bundle as a runnable MorpheusML 4 model.")
    p.add_argument("bundle", help="model bundle directory (model.json + weights.safetensors)")
    p.add_argument("--out", required=True, help="output .xml")
    p.add_argument("--init", help="initial state: a snapshot file (npz, TIFF, PIFF, ...) or a Morpheus checkpoint")
    p.add_argument("--frame", "--init-frame", dest="frame", type=int, default=0, help="frame of --init (default 0)")
    p.add_argument("--mcs", type=int, default=1000, help="MCS to simulate (StopTime), default 1000")
    p.add_argument("--seed", type=int, default=1, help="Morpheus RandomSeed (and default-layout seed), default 1")
    p.add_argument("--record-every", type=int, help="TiffPlotter/Logger interval in MCS (default mcs/20)")
    p.add_argument("--save-interval", type=int, help="checkpoint interval (Time/SaveInterval), default none")
    p.add_argument("--cells-per-type", type=int, default=20, help="cells per type of the default layout")
    p.add_argument("--field-attempts", type=int, default=0,
                   help="budget of network ΔH evaluations for the neural fields (0 = every boundary attempt; "
                        "a global NH costs ~0.1-1 s per attempt on a CPU)")
    p.add_argument("--device", help="torch device for the network (e.g. cuda)")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads for torch, BLAS and numba (default 0: torch/numba the available CPUs, BLAS 1)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    a = p.parse_args(argv)
    from neuralcpm_plugin.threads import configure_threads
    configure_threads(a.threads)
    claim_output(a.out, overwrite=a.overwrite)
    rep = export_model(a.bundle, a.out, init=a.init, frame=a.frame, mcs=a.mcs, seed=a.seed,
                       record_every=a.record_every, save_interval=a.save_interval,
                       cells_per_type=a.cells_per_type, field_attempts=a.field_attempts or None,
                       device=a.device)
    print(rep.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
