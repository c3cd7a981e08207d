"""Analytic Hamiltonian terms: contact energy, volume constraint, external potential, directed motion, surface.

Every term follows the contract of :mod:`.base`: ``energy(batch)`` (full energy, differentiable in the
parameters, float64), ``delta(batch, sites, new_ids)`` (batched local ΔH of copying cell ``new_ids[b, p]``
into the site with flat row-major index ``sites[b, p]``, all against the same state), ``delta_np(state,
site, new_id, cache)`` (one attempt, plain numpy float64) and ``spec()/tensors()/from_spec()``.

Units and conventions (``../shared/SPEC.md``, ``notes/INTERFACES.md``)
----------------------------------------------------------------------
* Contact energy J is per *unordered* neighbour pair of the term's neighbourhood order, counted once, no
  normalisation. The authors' reference code sums over the half-stencil and divides by its length, so its
  J equals ``len(half_offsets(order))`` × ours (4 × ours for order 2); see :func:`to_paper_scale`.
* Energies are in units of the temperature scale of the model; Metropolis is ``min(1, exp(-ΔH/T))``.
* Type tables are indexed by type ``0..T`` (0 = medium). Every energy includes the term's ``scale``.
* Periodicity: the batched forms read ``batch.periodic``. The numpy form takes it from ``cache["periodic"]``
  if given, else ``state.meta["periodic"]``, else the term's ``periodic`` attribute (set by ``from_spec``
  from the bundle's lattice), else ``True``.
* A copy that deletes a cell is *not* refused here (see :func:`.base.deletion_mask`); the local forms are
  still exact for it (the volume term drops a cell whose volume becomes 0; directed motion gives 0).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError
from ..lattice import half_offsets, neighbour_offsets
from .base import Batch, Hamiltonian, LatticeSpec, Term, register_term

__all__ = [
    "ContactEnergy",
    "DirectedMotion",
    "ExternalPotential",
    "SurfaceConstraint",
    "VolumeConstraint",
    "cellsort_hamiltonian",
    "from_paper_scale",
    "neighbour_table",
    "reference_lambda",
    "to_paper_scale",
]

_F64 = torch.float64


# --------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------
_TABLES: dict = {}


def neighbour_table(shape, offsets, periodic: bool, device=None) -> torch.Tensor:
    """``[n_sites, K]`` LongTensor: flat index of the neighbour of every site at every offset.

    ``-1`` marks a neighbour outside a non-periodic lattice. Cached per (shape, offsets, periodic, device).
    """
    offs = np.asarray(offsets, dtype=np.int64).reshape(-1, len(shape))
    key = (tuple(int(s) for s in shape), offs.tobytes(), offs.shape, bool(periodic), str(device))
    t = _TABLES.get(key)
    if t is None:
        shape = tuple(int(s) for s in shape)
        coords = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, len(shape))
        nb = coords[:, None, :] + offs[None, :, :]  # [N, K, d]
        dims = np.array(shape)
        if periodic:
            nb = np.mod(nb, dims)
            valid = np.ones(nb.shape[:2], bool)
        else:
            valid = np.all((nb >= 0) & (nb < dims), axis=-1)
            nb = np.clip(nb, 0, dims - 1)
        flat = np.ravel_multi_index(tuple(nb[..., i] for i in range(len(shape))), shape)
        flat = np.where(valid, flat, -1)
        t = torch.as_tensor(flat, dtype=torch.long, device=device)
        if len(_TABLES) > 64:
            _TABLES.clear()
        _TABLES[key] = t
    return t


def _rows(table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``table[idx]`` for a 2-D table and an index tensor of any shape (index_select: fast on CPU)."""
    return table.index_select(0, idx.reshape(-1)).view(*idx.shape, table.shape[1])


def _lut(table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``table[idx]`` for a 1-D table (index_select: fast on CPU, differentiable in ``table``)."""
    return table.index_select(0, idx.reshape(-1)).view(idx.shape)


def _site_coords(shape, device) -> torch.Tensor:
    """``[n_sites, ndim]`` float64 coordinates of the sites in row-major order."""
    grids = torch.meshgrid(*[torch.arange(n, dtype=_F64, device=device) for n in shape], indexing="ij")
    return torch.stack([g.reshape(-1) for g in grids], -1)


def _periodic_np(term, state, cache) -> bool:
    if cache is not None and "periodic" in cache:
        return bool(cache["periodic"])
    meta = getattr(state, "meta", None) or {}
    if meta.get("periodic") is not None:
        return bool(meta["periodic"])
    p = getattr(term, "periodic", None)
    return True if p is None else bool(p)


def _np_neighbours(ids: np.ndarray, site: tuple, offsets: np.ndarray, periodic: bool):
    """Ids of the neighbours of ``site`` (list, outside-lattice neighbours dropped; the site itself dropped)."""
    shape = ids.shape
    out = []
    for off in offsets:
        q = []
        ok = True
        for c, o, n in zip(site, off, shape):
            v = int(c) + int(o)
            if periodic:
                v %= n
            elif v < 0 or v >= n:
                ok = False
                break
            q.append(v)
        if ok and tuple(q) != tuple(int(c) for c in site):
            out.append(int(ids[tuple(q)]))
    return out


def _np_volumes(state, cache) -> np.ndarray:
    if cache is not None and cache.get("volumes") is not None:
        return np.asarray(cache["volumes"])
    return np.bincount(state.ids.ravel().astype(np.int64), minlength=len(state.types))


def _as_f64(x, name, shape=None) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        t = x.detach().to(_F64).clone()
    else:
        try:
            t = torch.as_tensor(np.asarray(x, dtype=np.float64))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{name}: expected numbers, got {x!r} ({e})") from None
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ConfigError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ConfigError(f"{name}: non-finite values {t.tolist()}")
    return t


def _param(module: nn.Module, name: str, value: torch.Tensor, learnable: bool):
    if learnable:
        setattr(module, name, nn.Parameter(value))
    else:
        module.register_buffer(name, value)


def _site_types(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    ids = batch.ids.flatten(1)
    return ids, batch.types.gather(1, ids)


def _check_sites(batch: Batch, sites: torch.Tensor, new_ids: torch.Tensor):
    if sites.shape != new_ids.shape or sites.dim() != 2 or sites.shape[0] != batch.B:
        raise ValueError(f"sites {tuple(sites.shape)} and new_ids {tuple(new_ids.shape)} must both be [B={batch.B}, P]")


# --------------------------------------------------------------------------------------------------------
# contact energy
# --------------------------------------------------------------------------------------------------------
@register_term
class ContactEnergy(Term):
    """H = Σ_{unordered neighbour pairs (i,j)} J(τ(σ_i), τ(σ_j)) · [σ_i ≠ σ_j].

    Parameters
    ----------
    J : array (T+1, T+1)
        Contact energy per unordered pair (this project's units; the reference code's J is 4 × this for
        order 2). Must be symmetric; ``J[0, 0]`` is forced to 0.
    order : int
        Neighbourhood order of the pairs (1: 4 neighbours, 2: Moore, ...).
    learnable : bool
        Learn J, parametrised by its upper triangle (``J_triu``) so it stays symmetric with ``J[0,0] = 0``.
    """

    kind = "contact"

    def __init__(self, J, order: int = 2, *, scale=1.0, learnable: bool = True, learn_scale: bool = False,
                 periodic: bool | None = None):
        super().__init__(scale, learn_scale)
        J = _as_f64(J, "contact J")
        if J.dim() != 2 or J.shape[0] != J.shape[1] or J.shape[0] < 1:
            raise ConfigError(f"contact J must be a square (T+1)x(T+1) table, got shape {tuple(J.shape)}")
        if not torch.allclose(J, J.T, atol=1e-12, rtol=0):
            raise ConfigError(f"contact J must be symmetric, got {J.tolist()}")
        self.order = int(order)
        if self.order < 1:
            raise ConfigError(f"contact order must be >= 1, got {order}")
        self.periodic = periodic
        n = J.shape[0]
        r, c = np.triu_indices(n)
        keep = ~((r == 0) & (c == 0))
        self.register_buffer("_r", torch.as_tensor(r[keep], dtype=torch.long), persistent=False)
        self.register_buffer("_c", torch.as_tensor(c[keep], dtype=torch.long), persistent=False)
        _param(self, "J_triu", J[self._r, self._c].clone(), learnable)
        self.n_types = n - 1

    @property
    def J(self) -> torch.Tensor:
        """Symmetric (T+1, T+1) table, J[0,0] = 0 (differentiable in ``J_triu``)."""
        n = self.n_types + 1
        m = torch.zeros((n, n), dtype=_F64, device=self.J_triu.device)
        m = m.index_put((self._r, self._c), self.J_triu)
        return m.index_put((self._c, self._r), self.J_triu)

    def _J_eff(self):
        return self.J * self.scale

    def energy(self, batch: Batch) -> torch.Tensor:
        ids, st = _site_types(batch)
        tab = neighbour_table(batch.shape, half_offsets(self.order, len(batch.shape)), batch.periodic,
                              batch.device)
        n = self.n_types + 1
        if int(batch.types.max()) >= n:
            raise ValueError(f"cell type {int(batch.types.max())} outside the contact table 0..{n - 1}")
        valid = (tab >= 0) & (tab != torch.arange(tab.shape[0], device=tab.device)[:, None])
        idx = tab.clamp(min=0).flatten()  # [N*Kh]
        nb_ids = ids[:, idx].view(batch.B, *tab.shape)
        nb_t = st[:, idx].view(batch.B, *tab.shape)
        diff = (nb_ids != ids[:, :, None]) & valid[None]
        pair = self._J_eff().flatten()[(st[:, :, None] * n + nb_t)]
        return (pair * diff).sum(dim=(1, 2))

    def delta(self, batch: Batch, sites: torch.Tensor, new_ids: torch.Tensor) -> torch.Tensor:
        _check_sites(batch, sites, new_ids)
        ids = batch.ids.flatten(1)
        tab = neighbour_table(batch.shape, neighbour_offsets(self.order, len(batch.shape)), batch.periodic,
                              batch.device)
        n = self.n_types + 1
        nbr = _rows(tab, sites)  # [B, P, K]
        valid = (nbr >= 0) & (nbr != sites[..., None])
        B, P, K = nbr.shape
        nb_ids = ids.gather(1, nbr.clamp(min=0).view(B, -1)).view(B, P, K)
        nb_t = batch.types.gather(1, nb_ids.view(B, -1)).view(B, P, K)
        old = ids.gather(1, sites)
        t_old = batch.types.gather(1, old)
        t_new = batch.types.gather(1, new_ids)
        Jf = self._J_eff().flatten()
        e_new = _lut(Jf, t_new[..., None] * n + nb_t) * ((nb_ids != new_ids[..., None]) & valid)
        e_old = _lut(Jf, t_old[..., None] * n + nb_t) * ((nb_ids != old[..., None]) & valid)
        return (e_new - e_old).sum(-1)

    def delta_np(self, state, site, new_id, cache=None) -> float:
        site = tuple(int(s) for s in site)
        old = int(state.ids[site])
        new_id = int(new_id)
        if old == new_id:
            return 0.0
        per = _periodic_np(self, state, cache)
        J = self.J.detach().cpu().numpy() * self.scale_value()
        types = state.types
        to, tn = int(types[old]), int(types[new_id])
        d = 0.0
        for nb in _np_neighbours(state.ids, site, neighbour_offsets(self.order, state.ids.ndim), per):
            tb = int(types[nb])
            if nb != new_id:
                d += J[tn, tb]
            if nb != old:
                d -= J[to, tb]
        return float(d)

    def spec(self) -> dict:
        return {"kind": self.kind, "scale": self.scale_value(),
                "params": {"J": self.J.detach().cpu().tolist(), "order": self.order}}

    @classmethod
    def from_spec(cls, spec, tensors, lattice: LatticeSpec):
        p = spec["params"]
        return cls(p["J"], int(p.get("order", lattice.contact_order)), scale=float(spec.get("scale", 1.0)),
                   periodic=lattice.periodic)


# --------------------------------------------------------------------------------------------------------
# volume constraint
# --------------------------------------------------------------------------------------------------------
@register_term
class VolumeConstraint(Term):
    """H = Σ_{cells c ≥ 1 present on the lattice} λ_τ(c) · (V(c) − V*_τ(c))².

    ``lam`` and ``target`` are per type, shape (T+1,); entry 0 (medium) is ignored. V in sites. Cells with
    volume 0 (absent ids, padding) contribute nothing, so the local forms stay exact even for a deletion.
    """

    kind = "volume"

    def __init__(self, lam, target, *, scale=1.0, learnable: bool = True, learn_target: bool = False,
                 learn_scale: bool = False, periodic: bool | None = None):
        super().__init__(scale, learn_scale)
        lam = _as_f64(lam, "volume lambda")
        target = _as_f64(target, "volume target")
        if lam.dim() != 1 or lam.shape != target.shape or lam.shape[0] < 1:
            raise ConfigError(f"volume lambda {tuple(lam.shape)} and target {tuple(target.shape)} must be 1-D "
                              "of the same length T+1")
        _param(self, "lam", lam, learnable)
        _param(self, "target", target, learn_target)
        self.n_types = lam.shape[0] - 1
        self.periodic = periodic

    def _tables(self):
        mask = torch.ones_like(self.lam)
        mask[0] = 0.0
        return self.lam * mask * self.scale, self.target

    def energy(self, batch: Batch) -> torch.Tensor:
        lam, tgt = self._tables()
        v = batch.volumes.to(_F64)
        t = batch.types
        present = (batch.volumes > 0) & (t > 0)
        present[:, 0] = False
        e = lam[t] * (v - tgt[t]) ** 2
        return (e * present).sum(1)

    def delta(self, batch: Batch, sites: torch.Tensor, new_ids: torch.Tensor) -> torch.Tensor:
        _check_sites(batch, sites, new_ids)
        lam, tgt = self._tables()
        old = batch.ids.flatten(1).gather(1, sites)
        vo = batch.volumes.gather(1, old).to(_F64)
        vn = batch.volumes.gather(1, new_ids).to(_F64)
        to = batch.types.gather(1, old)
        tn = batch.types.gather(1, new_ids)
        lo, so = _lut(lam, to), _lut(tgt, to)
        ln, sn = _lut(lam, tn), _lut(tgt, tn)
        d_new = ln * ((vn + 1 - sn) ** 2 - torch.where(vn > 0, (vn - sn) ** 2, torch.zeros_like(vn)))
        d_old = torch.where(vo > 1, lo * ((vo - 1 - so) ** 2 - (vo - so) ** 2), -lo * (vo - so) ** 2)
        d = d_new * ((new_ids != 0) & (tn > 0)) + d_old * ((old != 0) & (to > 0))
        return d * (old != new_ids)

    def delta_np(self, state, site, new_id, cache=None) -> float:
        site = tuple(int(s) for s in site)
        old = int(state.ids[site])
        new_id = int(new_id)
        if old == new_id:
            return 0.0
        vols = _np_volumes(state, cache)
        lam = self.lam.detach().cpu().numpy() * self.scale_value()
        tgt = self.target.detach().cpu().numpy()
        types = state.types
        d = 0.0
        if new_id != 0 and types[new_id] > 0:
            t = int(types[new_id])
            v = float(vols[new_id])
            d += lam[t] * ((v + 1 - tgt[t]) ** 2 - ((v - tgt[t]) ** 2 if v > 0 else 0.0))
        if old != 0 and types[old] > 0:
            t = int(types[old])
            v = float(vols[old])
            d += lam[t] * ((v - 1 - tgt[t]) ** 2 - (v - tgt[t]) ** 2) if v > 1 else -lam[t] * (v - tgt[t]) ** 2
        return float(d)

    def spec(self) -> dict:
        return {"kind": self.kind, "scale": self.scale_value(),
                "params": {"lambda": self.lam.detach().cpu().tolist(),
                           "target": self.target.detach().cpu().tolist()}}

    @classmethod
    def from_spec(cls, spec, tensors, lattice: LatticeSpec):
        p = spec["params"]
        return cls(p["lambda"], p["target"], scale=float(spec.get("scale", 1.0)), periodic=lattice.periodic)


# --------------------------------------------------------------------------------------------------------
# external potential
# --------------------------------------------------------------------------------------------------------
@register_term
class ExternalPotential(Term):
    """H = Σ_i μ(τ(σ_i)) · φ(i)   (paper Eq. 8).

    mu : (T+1,) coupling per type, ``mu[0]`` forced to 0. field : float array of the lattice shape (φ),
    written to ``weights.safetensors`` as ``"field"``; a fixed buffer, or learned with ``learn_field=True``
    (the paper's "cell sorting + external potential" baseline learns the field from the data).
    """

    kind = "external"

    def __init__(self, mu, field, *, scale=1.0, learnable: bool = True, learn_scale: bool = False,
                 learn_field: bool = False, periodic: bool | None = None):
        super().__init__(scale, learn_scale)
        mu = _as_f64(mu, "external mu")
        if mu.dim() != 1 or mu.shape[0] < 1:
            raise ConfigError(f"external mu must be 1-D of length T+1, got shape {tuple(mu.shape)}")
        field = _as_f64(field, "external field")
        if field.dim() not in (2, 3):
            raise ConfigError(f"external field must be 2-D or 3-D (the lattice shape), got {tuple(field.shape)}")
        _param(self, "mu", mu, learnable)
        _param(self, "field", field, learn_field)
        self.learn_field = bool(learn_field)
        self.n_types = mu.shape[0] - 1
        self.periodic = periodic

    def _mu(self):
        mask = torch.ones_like(self.mu)
        mask[0] = 0.0
        return self.mu * mask * self.scale

    def _field_for(self, shape):
        if tuple(self.field.shape) != tuple(shape):
            raise ValueError(f"external field has shape {tuple(self.field.shape)}, the lattice {tuple(shape)}")
        return self.field.flatten()

    def energy(self, batch: Batch) -> torch.Tensor:
        _, st = _site_types(batch)
        phi = self._field_for(batch.shape)
        return (self._mu()[st] * phi[None]).sum(1)

    def delta(self, batch: Batch, sites: torch.Tensor, new_ids: torch.Tensor) -> torch.Tensor:
        _check_sites(batch, sites, new_ids)
        phi = self._field_for(batch.shape)
        mu = self._mu()
        old = batch.ids.flatten(1).gather(1, sites)
        to = batch.types.gather(1, old)
        tn = batch.types.gather(1, new_ids)
        return _lut(phi, sites) * (_lut(mu, tn) - _lut(mu, to))

    def delta_np(self, state, site, new_id, cache=None) -> float:
        site = tuple(int(s) for s in site)
        old = int(state.ids[site])
        mu = self._mu().detach().cpu().numpy()
        phi = self.field.detach().cpu().numpy()
        if phi.shape != state.ids.shape:
            raise ValueError(f"external field has shape {phi.shape}, the lattice {state.ids.shape}")
        return float(phi[site] * (mu[int(state.types[int(new_id)])] - mu[int(state.types[old])]))

    def spec(self) -> dict:
        spec = {"kind": self.kind, "scale": self.scale_value(), "params": {"mu": self.mu.detach().cpu().tolist()}}
        if self.learn_field:
            spec["learn_field"] = True
        return spec

    def tensors(self):
        return {"field": self.field.detach().cpu()}

    @classmethod
    def from_spec(cls, spec, tensors, lattice: LatticeSpec):
        if "field" not in tensors:
            raise ConfigError("external potential: the weights file holds no 'field' tensor")
        return cls(spec["params"]["mu"], tensors["field"], scale=float(spec.get("scale", 1.0)),
                   learn_field=bool(spec.get("learn_field", False)), periodic=lattice.periodic)


# --------------------------------------------------------------------------------------------------------
# directed motion (Morpheus 2.2.4 DirectedMotion)
# --------------------------------------------------------------------------------------------------------
def _norm_direction(d, ndim: int, name: str):
    if d is None:
        return None
    if not isinstance(d, dict) or d.get("mode") not in ("constant", "band", "none"):
        raise ConfigError(f"{name}: expected {{'mode': 'constant'|'band'|'none', ...}}, got {d!r}")
    if d["mode"] == "none":
        return None
    if d["mode"] == "constant":
        v = [float(x) for x in d.get("vector", [])]
        if len(v) != ndim:
            raise ConfigError(f"{name}: 'vector' must have {ndim} components ([dy, dx] in 2-D), got {v}")
        return {"mode": "constant", "vector": v}
    axis = int(d.get("axis", ndim - 1))
    if not 0 <= axis < ndim:
        raise ConfigError(f"{name}: axis {axis} outside 0..{ndim - 1}")
    sense = d.get("sense", "inward")
    if sense not in ("inward", "outward"):
        raise ConfigError(f"{name}: sense must be 'inward' or 'outward', got {sense!r}")
    lo, hi = float(d.get("lo", 0.4)), float(d.get("hi", 0.6))
    if not lo <= hi:
        raise ConfigError(f"{name}: need lo <= hi, got {lo}, {hi}")
    return {"mode": "band", "axis": axis, "lo": lo, "hi": hi, "sense": sense}


@register_term
class DirectedMotion(Term):
    """Morpheus 2.2.4 ``DirectedMotion`` (a non-conservative drive; no energy function exists).

    For a copy of cell ``a`` into site x (x currently in cell ``b``) every involved non-medium cell c whose type
    has a strength contributes (Morpheus ``DirectedMotion::delta``, evaluated for the gaining and the losing
    cell)::

        ΔH_c = − s_τ(c) · V(c) · ((C_after(c) − C_before(c)) · d̂_c)

    with V(c) the cell's volume *before* the copy (Morpheus ``cell.nNodes()``), C its centre of mass in sites
    (Morpheus ``getCenter`` / ``getUpdatedCenter``: node-position sums divided by the node count), so
    C_after − C_before = (x − C)/(V+1) for the gaining cell and (C − x)/(V−1) for the losing one; a losing
    cell of volume 1 contributes 0 (Morpheus does not update the shape of a cell that loses its last node).
    d̂_c = d_c/|d_c| (0 if d_c = 0) is the cell's preferred direction, evaluated at its current centre.

    Direction per type (index 0 = medium, ignored): ``None``, ``{"mode": "constant", "vector": [dy, dx]}`` or
    ``{"mode": "band", "axis": 1, "lo": 0.4, "hi": 0.6, "sense": "inward"|"outward"}`` — with p the centre
    coordinate along ``axis`` (wrapped into [0, L)) and L the lattice size along it, "inward" is
    ``sign(L/2 − p)·[p < lo·L or p > hi·L]`` and "outward" is ``sign(p − L/2)·[lo·L < p < hi·L]`` (the
    authors' bipolar model: type 1 inward, type 2 outward, axis x).

    Periodic centres (this project's convention): per cell, a *reference site* r = the cell's site of smallest
    flat (row-major) index; every site's coordinate is unwrapped to its image nearest r along each periodic
    axis (``x − L·round((x − r)/L)``, ties rounded half to even); C is the mean of those images, and the
    copied site x enters the formula through its image nearest r. For cells spanning less than half the
    lattice along each axis this is the ordinary (unwrapped) centre of mass, so C_after − C_before is exactly
    Morpheus's. Non-periodic lattices use plain coordinates.

    Difference from Morpheus, for the band rule only: Morpheus stores each node at its source's stored position
    plus the copy offset, unresolved (``CPM::Update::set``), so a cell's centre is continuous in time and may
    leave [0, L) after the cell crosses the wrap; its band expression sees that unwrapped value. A snapshot
    carries no such history, so here the centre is wrapped into [0, L) first. The two agree unless a cell's
    centre has crossed the wrap (e.g. a type-1 cell sitting exactly on the x-wrap is pushed towards the band
    from the other side).

    ``energy()`` raises :class:`NotImplementedError`: a Hamiltonian that contains this term has no energy,
    only ΔH (it can be sampled, not trained by contrastive divergence on H).
    """

    kind = "directed_motion"

    def __init__(self, strength, direction, *, scale=1.0, learnable: bool = False, learn_scale: bool = False,
                 ndim: int = 2, periodic: bool | None = None):
        super().__init__(scale, learn_scale)
        strength = _as_f64(strength, "directed motion strength")
        if strength.dim() != 1 or strength.shape[0] < 1:
            raise ConfigError(f"directed motion strength must be 1-D of length T+1, got {tuple(strength.shape)}")
        if isinstance(direction, dict) or direction is None:
            direction = [None] + [direction] * (strength.shape[0] - 1)
        direction = list(direction)
        if len(direction) != strength.shape[0]:
            raise ConfigError(f"directed motion: {len(direction)} directions for {strength.shape[0]} types "
                              "(one per type, medium first)")
        self.ndim = int(ndim)
        self.direction = [None] + [_norm_direction(d, self.ndim, f"directed motion direction of type {i}")
                                   for i, d in enumerate(direction) if i > 0]
        _param(self, "strength", strength, learnable)
        self.n_types = strength.shape[0] - 1
        self.periodic = periodic

    # ---- direction tables -------------------------------------------------------------------------------
    def _dir_of_centres(self, cen: np.ndarray | torch.Tensor, tys, shape, xp):
        """Unit preferred direction per cell: cen [..., d] (float), tys [...] (int) → [..., d]."""
        is_t = xp is torch
        out = xp.zeros_like(cen)
        for t, d in enumerate(self.direction):
            if d is None:
                continue
            m = (tys == t)
            if d["mode"] == "constant":
                v = np.asarray(d["vector"], dtype=np.float64)
                nv = np.linalg.norm(v)
                v = v / nv if nv > 0 else v
                vt = torch.as_tensor(v, dtype=_F64, device=cen.device) if is_t else v
                out = xp.where(m[..., None], vt, out)
            else:
                a = d["axis"]
                L = float(shape[a])
                p = cen[..., a] % L
                if d["sense"] == "inward":
                    on = (p < d["lo"] * L) | (p > d["hi"] * L)
                    comp = xp.sign(L / 2 - p) * on
                else:
                    on = (p > d["lo"] * L) & (p < d["hi"] * L)
                    comp = xp.sign(p - L / 2) * on
                vec = xp.zeros_like(cen)
                vec[..., a] = comp
                out = xp.where(m[..., None], vec, out)
        return out

    # ---- centres ----------------------------------------------------------------------------------------
    @staticmethod
    def _centres_torch(batch: Batch):
        """Per id: reference coordinates [B, C, d], unwrapped coordinate sums [B, C, d] (float64)."""
        B, C = batch.volumes.shape
        shape = batch.shape
        ids = batch.ids.flatten(1)
        N = ids.shape[1]
        ar = torch.arange(N, device=ids.device)
        ref = torch.full((B, C), N, dtype=torch.long, device=ids.device)
        ref = ref.scatter_reduce(1, ids, ar.expand(B, N), reduce="amin", include_self=True)
        ref = ref.clamp(max=N - 1)
        coords = _site_coords(shape, ids.device)  # [N, d]
        refc = coords[ref]  # [B, C, d]
        site_ref = refc.gather(1, ids[..., None].expand(B, N, len(shape)))  # [B, N, d]
        x = coords[None].expand(B, N, len(shape))
        if batch.periodic:
            Ls = torch.tensor(shape, dtype=_F64, device=ids.device)
            x = x - Ls * torch.round((x - site_ref) / Ls)
        sums = torch.zeros((B, C, len(shape)), dtype=_F64, device=ids.device)
        sums.scatter_add_(1, ids[..., None].expand(B, N, len(shape)), x)
        return refc, sums, coords

    def energy(self, batch: Batch) -> torch.Tensor:
        raise NotImplementedError("DirectedMotion (Morpheus) is a non-conservative drive: it defines ΔH per copy "
                                  "attempt but no energy H(σ). Use delta()/delta_np(), or train without it.")

    def delta(self, batch: Batch, sites: torch.Tensor, new_ids: torch.Tensor) -> torch.Tensor:
        _check_sites(batch, sites, new_ids)
        shape = batch.shape
        refc, sums, coords = self._centres_torch(batch)
        vol = batch.volumes.to(_F64)
        cen = sums / vol.clamp(min=1)[..., None]
        dirs = self._dir_of_centres(cen, batch.types, shape, torch)  # [B, C, d]
        s = self.strength * self.scale
        mask0 = torch.ones_like(s)
        mask0[0] = 0.0
        s = s * mask0
        old = batch.ids.flatten(1).gather(1, sites)
        x = _rows(coords, sites)  # [B, P, d]
        Ls = torch.tensor(shape, dtype=_F64, device=sites.device)
        d = len(shape)

        def part(cell, gain: bool):
            r = refc.gather(1, cell[..., None].expand(*cell.shape, d))
            xi = x - Ls * torch.round((x - r) / Ls) if batch.periodic else x
            c = cen.gather(1, cell[..., None].expand(*cell.shape, d))
            v = vol.gather(1, cell)
            dh = dirs.gather(1, cell[..., None].expand(*cell.shape, d))
            if gain:
                disp = (xi - c) / (v + 1)[..., None]
            else:
                disp = torch.where((v > 1)[..., None], (c - xi) / (v - 1).clamp(min=1)[..., None],
                                   torch.zeros_like(c))
            st = s[batch.types.gather(1, cell)]
            return -st * v * (disp * dh).sum(-1) * (cell != 0)

        out = part(new_ids, True) + part(old, False)
        return out * (old != new_ids)

    def _centre_np(self, ids, cell, periodic):
        pos = np.argwhere(ids == cell).astype(np.float64)  # row-major order: first = smallest flat index
        if len(pos) == 0:
            return None, None
        ref = pos[0].copy()
        if periodic:
            L = np.asarray(ids.shape, dtype=np.float64)
            pos = pos - L * np.round((pos - ref) / L)
        return ref, pos.sum(0) / len(pos)

    def delta_np(self, state, site, new_id, cache=None) -> float:
        site = tuple(int(s) for s in site)
        old = int(state.ids[site])
        new_id = int(new_id)
        if old == new_id:
            return 0.0
        per = _periodic_np(self, state, cache)
        vols = _np_volumes(state, cache)
        s = self.strength.detach().cpu().numpy() * self.scale_value()
        L = np.asarray(state.ids.shape, dtype=np.float64)
        x = np.asarray(site, dtype=np.float64)
        total = 0.0
        for cell, gain in ((new_id, True), (old, False)):
            if cell == 0:
                continue
            t = int(state.types[cell])
            if t == 0 or self.direction[t] is None or s[t] == 0:
                continue
            v = float(vols[cell])
            if not gain and v <= 1:
                continue
            ref, c = self._centre_np(state.ids, cell, per)
            if c is None:
                continue
            xi = x - L * np.round((x - ref) / L) if per else x
            dh = self._dir_of_centres(c[None], np.array([t]), state.ids.shape, np)[0]
            disp = (xi - c) / (v + 1) if gain else (c - xi) / (v - 1)
            total += -s[t] * v * float(disp @ dh)
        return float(total)

    def spec(self) -> dict:
        return {"kind": self.kind, "scale": self.scale_value(),
                "params": {"strength": self.strength.detach().cpu().tolist(),
                           "direction": [None if d is None else dict(d) for d in self.direction]}}

    @classmethod
    def from_spec(cls, spec, tensors, lattice: LatticeSpec):
        p = spec["params"]
        return cls(p["strength"], p["direction"], scale=float(spec.get("scale", 1.0)), ndim=len(lattice.shape),
                   periodic=lattice.periodic)


# --------------------------------------------------------------------------------------------------------
# surface constraint
# --------------------------------------------------------------------------------------------------------
@register_term
class SurfaceConstraint(Term):
    """H = Σ_{cells c ≥ 1 present} λ_τ(c) · (S(c) − S*_τ(c))².

    S(c) = number of (ordered-from-c) neighbour pairs (i, j) of the given order with σ_i = c ≠ σ_j, i.e. the
    count of unlike neighbours over c's sites (CC3D-style surface in neighbour-pair units, no scaling).
    """

    kind = "surface"

    def __init__(self, lam, target, order: int = 1, *, scale=1.0, learnable: bool = True,
                 learn_target: bool = False, learn_scale: bool = False, periodic: bool | None = None):
        super().__init__(scale, learn_scale)
        lam = _as_f64(lam, "surface lambda")
        target = _as_f64(target, "surface target")
        if lam.dim() != 1 or lam.shape != target.shape:
            raise ConfigError(f"surface lambda {tuple(lam.shape)} and target {tuple(target.shape)} must be 1-D "
                              "of the same length T+1")
        self.order = int(order)
        _param(self, "lam", lam, learnable)
        _param(self, "target", target, learn_target)
        self.n_types = lam.shape[0] - 1
        self.periodic = periodic

    def _tables(self):
        mask = torch.ones_like(self.lam)
        mask[0] = 0.0
        return self.lam * mask * self.scale, self.target

    def _surfaces(self, batch: Batch) -> torch.Tensor:
        ids = batch.ids.flatten(1)
        tab = neighbour_table(batch.shape, neighbour_offsets(self.order, len(batch.shape)), batch.periodic,
                              batch.device)
        valid = (tab >= 0) & (tab != torch.arange(tab.shape[0], device=tab.device)[:, None])
        nb = ids[:, tab.clamp(min=0).flatten()].view(batch.B, *tab.shape)
        unlike = ((nb != ids[:, :, None]) & valid[None]).sum(-1)  # [B, N]
        S = torch.zeros_like(batch.volumes)
        return S.scatter_add_(1, ids, unlike)

    def energy(self, batch: Batch) -> torch.Tensor:
        lam, tgt = self._tables()
        S = self._surfaces(batch).to(_F64)
        t = batch.types
        present = (batch.volumes > 0) & (t > 0)
        present[:, 0] = False
        return (lam[t] * (S - tgt[t]) ** 2 * present).sum(1)

    def delta(self, batch: Batch, sites: torch.Tensor, new_ids: torch.Tensor) -> torch.Tensor:
        _check_sites(batch, sites, new_ids)
        lam, tgt = self._tables()
        ids = batch.ids.flatten(1)
        S = self._surfaces(batch).to(_F64)
        tab = neighbour_table(batch.shape, neighbour_offsets(self.order, len(batch.shape)), batch.periodic,
                              batch.device)
        nbr = _rows(tab, sites)
        valid = (nbr >= 0) & (nbr != sites[..., None])
        B, P, K = nbr.shape
        nb = ids.gather(1, nbr.clamp(min=0).view(B, -1)).view(B, P, K)
        nb = torch.where(valid, nb, torch.full_like(nb, -1))
        old = ids.gather(1, sites)
        cand = torch.cat([old[..., None], new_ids[..., None], nb], -1)  # [B, P, K+2]
        # ΔS of each candidate cell
        v = valid[..., None, :]
        nbj = nb[..., None, :]
        c = cand[..., :, None]
        own_new = ((nbj != new_ids[..., None, None]) & v).sum(-1) * (cand == new_ids[..., None])
        own_old = ((nbj != old[..., None, None]) & v).sum(-1) * (cand == old[..., None])
        nbr_part = ((nbj == c) & v).sum(-1) * ((new_ids[..., None] != cand).long() - (old[..., None] != cand).long())
        dS = (own_new - own_old + nbr_part).to(_F64)
        # keep the first occurrence of each candidate; ignore medium and the -1 padding
        same = cand[..., :, None] == cand[..., None, :]
        earlier = torch.tril(torch.ones(K + 2, K + 2, dtype=torch.bool, device=cand.device), -1)
        first = ~(same & earlier).any(-1)
        cc = cand.clamp(min=0)
        tc = batch.types.gather(1, cc.view(B, -1)).view(B, P, K + 2)
        keep = first & (cand > 0) & (tc > 0)
        Sc = S.gather(1, cc.view(B, -1)).view(B, P, K + 2)
        vc = batch.volumes.gather(1, cc.view(B, -1)).view(B, P, K + 2)
        # volume after the copy decides presence
        v_after = vc + (cand == new_ids[..., None]).long() - (cand == old[..., None]).long()
        e_before = torch.where(vc > 0, (Sc - tgt[tc]) ** 2, torch.zeros_like(Sc))
        e_after = torch.where(v_after > 0, (Sc + dS - tgt[tc]) ** 2, torch.zeros_like(Sc))
        out = (lam[tc] * (e_after - e_before) * keep).sum(-1)
        return out * (old != new_ids)

    def delta_np(self, state, site, new_id, cache=None) -> float:
        site = tuple(int(s) for s in site)
        old = int(state.ids[site])
        new_id = int(new_id)
        if old == new_id:
            return 0.0
        per = _periodic_np(self, state, cache)
        ids = state.ids
        offs = neighbour_offsets(self.order, ids.ndim)
        nbs = _np_neighbours(ids, site, offs, per)
        affected = {old, new_id, *nbs}
        vols = _np_volumes(state, cache)
        lam = self.lam.detach().cpu().numpy() * self.scale_value()
        tgt = self.target.detach().cpu().numpy()
        d = 0.0
        for c in affected:
            if c == 0 or state.types[c] == 0:
                continue
            t = int(state.types[c])
            S = self._surface_np(ids, c, offs, per)
            dS = 0
            if c == new_id:
                dS += sum(1 for n in nbs if n != new_id)
            if c == old:
                dS -= sum(1 for n in nbs if n != old)
            k = sum(1 for n in nbs if n == c)
            dS += k * (int(new_id != c) - int(old != c))
            v = int(vols[c])
            va = v + int(c == new_id) - int(c == old)
            eb = (S - tgt[t]) ** 2 if v > 0 else 0.0
            ea = (S + dS - tgt[t]) ** 2 if va > 0 else 0.0
            d += lam[t] * (ea - eb)
        return float(d)

    @staticmethod
    def _surface_np(ids, c, offs, periodic):
        S = 0
        for p in np.argwhere(ids == c):
            S += sum(1 for n in _np_neighbours(ids, tuple(p), offs, periodic) if n != c)
        return S

    def spec(self) -> dict:
        return {"kind": self.kind, "scale": self.scale_value(),
                "params": {"lambda": self.lam.detach().cpu().tolist(), "target": self.target.detach().cpu().tolist(),
                           "order": self.order}}

    @classmethod
    def from_spec(cls, spec, tensors, lattice: LatticeSpec):
        p = spec["params"]
        return cls(p["lambda"], p["target"], int(p.get("order", 1)), scale=float(spec.get("scale", 1.0)),
                   periodic=lattice.periodic)


# --------------------------------------------------------------------------------------------------------
# conveniences and paper scaling
# --------------------------------------------------------------------------------------------------------
def _per_type(x, n: int, name: str) -> list[float]:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 0:
        return [0.0] + [float(a)] * (n - 1)
    if a.shape == (n,):
        return [float(v) for v in a]
    if a.shape == (n - 1,):
        return [0.0] + [float(v) for v in a]
    raise ConfigError(f"{name}: expected a number or {n - 1} (per biological type) or {n} values, got shape {a.shape}")


def _J_table(J, n_types: int | None = None) -> np.ndarray:
    """J as a dense symmetric table from an array or a dict {(a, b) or "a-b": value}."""
    if isinstance(J, dict):
        pairs = {}
        for k, v in J.items():
            a, b = (int(s) for s in (k.split("-") if isinstance(k, str) else k))
            pairs[(a, b)] = float(v)
        n = (max(max(p) for p in pairs) if n_types is None else n_types) + 1
        M = np.zeros((n, n))
        for (a, b), v in pairs.items():
            if (b, a) in pairs and pairs[(b, a)] != v:
                raise ConfigError(f"contact J({a},{b}) = {v} but J({b},{a}) = {pairs[(b, a)]}")
            M[a, b] = M[b, a] = v
        return M
    M = np.asarray(J, dtype=np.float64)
    if M.ndim != 2 or M.shape[0] != M.shape[1]:
        raise ConfigError(f"contact J must be a square table or a dict of pairs, got shape {M.shape}")
    return M


def cellsort_hamiltonian(J, lam, target, lattice: LatticeSpec, T: float = 1.0, type_names=None, *,
                         learnable: bool = True) -> Hamiltonian:
    """Contact + volume Hamiltonian (paper Eq. 4) in this project's units.

    J : (T+1, T+1) table or dict ``{(a, b): value}`` / ``{"a-b": value}`` (per unordered pair, ours).
    lam, target : number (shared by all biological types) or per type (length T or T+1).
    The contact order is ``lattice.contact_order``.
    """
    Jt = _J_table(J, None if type_names is None else len(type_names) - 1)
    n = Jt.shape[0]
    if type_names is None:
        type_names = ["medium"] + [f"type{i}" for i in range(1, n)]
    if len(type_names) != n:
        raise ConfigError(f"{len(type_names)} type names for a {n}x{n} contact table")
    terms = [ContactEnergy(Jt, lattice.contact_order, learnable=learnable, periodic=lattice.periodic),
             VolumeConstraint(_per_type(lam, n, "lambda"), _per_type(target, n, "target"), learnable=learnable,
                              periodic=lattice.periodic)]
    return Hamiltonian(terms, lattice, T, type_names)


def reference_lambda(raw: float, eps: float = 1e-3) -> float:
    """λ that the authors' code uses for a stored raw value: softplus(raw) + eps (e.g. MNIST 0.5 → 0.975)."""
    return float(math.log1p(math.exp(-abs(raw))) + max(raw, 0.0) + eps)


def _contact_factor(order: int, ndim: int = 2) -> int:
    return len(half_offsets(order, ndim))


def to_paper_scale(hamiltonian) -> dict:
    """Effective parameters (scales folded in) in the paper / reference-code scaling.

    Returns a dict with ``"J"`` ((T+1)x(T+1) list, reference J = ``len(half_offsets(order))`` × ours, i.e.
    4 × for order 2), ``"J_pairs"`` ({"a-b": value} for a ≤ b, (0,0) omitted), ``"lambda"``, ``"target"``,
    ``"mu"`` (unchanged: the reference code uses the same units) where the terms exist, ``"temperature"``, and
    ``"theta"`` = [J(1,0), J(2,0), J(1,1), J(1,2), J(2,2), λ(1)] (the paper's parameter-recovery vector) when
    the model has two types, a contact and a volume term.
    """
    terms = hamiltonian.terms if isinstance(hamiltonian, Hamiltonian) else list(hamiltonian)
    out: dict = {}
    ndim = len(hamiltonian.lattice.shape) if isinstance(hamiltonian, Hamiltonian) else 2
    for t in terms:
        if isinstance(t, ContactEnergy):
            J = (t.J.detach().cpu().numpy() * t.scale_value() * _contact_factor(t.order, ndim))
            out["J"] = J.tolist()
            out["J_pairs"] = {f"{a}-{b}": float(J[a, b]) for a in range(J.shape[0]) for b in range(a, J.shape[0])
                              if (a, b) != (0, 0)}
            out["contact_order"] = t.order
        elif isinstance(t, VolumeConstraint):
            out["lambda"] = (t.lam.detach().cpu().numpy() * t.scale_value()).tolist()
            out["target"] = t.target.detach().cpu().tolist()
        elif isinstance(t, ExternalPotential):
            out["mu"] = (t._mu().detach().cpu().numpy()).tolist()
    if isinstance(hamiltonian, Hamiltonian):
        out["temperature"] = hamiltonian.temperature
    if "J" in out and "lambda" in out and len(out["J"]) == 3:
        J = out["J"]
        out["theta"] = [J[1][0], J[2][0], J[1][1], J[1][2], J[2][2], out["lambda"][1]]
    return out


def from_paper_scale(params: dict, lattice: LatticeSpec, T: float = 1.0, type_names=None, *,
                     field=None, learnable: bool = True) -> Hamiltonian:
    """Build a Hamiltonian from paper-scale parameters (the inverse of :func:`to_paper_scale`).

    params : ``"J"`` (table or {"a-b": v} dict, reference scaling: divided by ``len(half_offsets(order))``),
    ``"lambda"`` and ``"target"`` (number or per type; λ is used as given — apply :func:`reference_lambda`
    first for a raw softplus parameter), optional ``"mu"`` (per type) with ``field`` (lattice-shaped φ).
    """
    order = int(params.get("contact_order", lattice.contact_order))
    Jt = _J_table(params["J"] if "J" in params else params["J_pairs"],
                  None if type_names is None else len(type_names) - 1)
    Jt = Jt / _contact_factor(order, len(lattice.shape))
    n = Jt.shape[0]
    if type_names is None:
        type_names = ["medium"] + [f"type{i}" for i in range(1, n)]
    terms = [ContactEnergy(Jt, order, learnable=learnable, periodic=lattice.periodic)]
    if "lambda" in params:
        terms.append(VolumeConstraint(_per_type(params["lambda"], n, "lambda"),
                                      _per_type(params["target"], n, "target"), learnable=learnable,
                                      periodic=lattice.periodic))
    if "mu" in params:
        if field is None:
            raise ConfigError("paper parameters hold 'mu' but no field was given")
        terms.append(ExternalPotential(_per_type(params["mu"], n, "mu"), field, learnable=learnable,
                                       periodic=lattice.periodic))
    return Hamiltonian(terms, lattice, float(params.get("temperature", T)), type_names)
