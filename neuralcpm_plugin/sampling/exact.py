"""Exact sequential Metropolis sampler (numba-compiled) — the project's ground truth.

Conventions (``../shared/SPEC.md``, DESIGN.md decisions 1, 3, 5):

* One copy attempt "copies cell ``a`` into site ``x``"; it is accepted with probability
  ``min(1, exp(-ΔH / T))``. A copy that would delete a cell (volume 1 → 0) is refused.
* ``proposal="classic"`` (Graner–Glazier, as CompuCell3D and Morpheus): a source site ``s`` uniform over the
  lattice, a target ``t`` uniform over the copy neighbours of ``s`` (neighbourhood order
  ``lattice.copy_order``); if both belong to the same cell the attempt ends without effect (and counts);
  otherwise ``t`` takes ``σ(s)``. On a non-periodic lattice ``t`` is drawn among the neighbours inside it.
* ``proposal="boundary"``: a site ``x`` uniform over the current boundary set (sites with a copy neighbour
  of another id); it receives the id of a neighbour drawn uniformly among its neighbours of another cell
  (the proposal of the paper's parallel sampler, one at a time). No Hastings correction: like the parallel
  sampler, this is a dynamics, not an exact sampler of exp(-H/T).
* One MCS = lattice-size (``H·W``) attempts for both proposals; fractional MCS round to whole attempts.
* Analytic terms (kinds ``contact``, ``volume``, ``external``, ``directed_motion``, ``surface``) run in
  compiled code built from each term's ``spec()`` / ``tensors()`` (parameters × ``scale``).
* Neural terms with a compiled form (one ``local_nh`` and one ``pooled_nh`` term, 2-D lattices) run inside
  the same compiled loop (``hamiltonian/_local_nh_numba.py``: exact float64 ΔH from per-lattice caches of
  per-patch features, updated on every accepted copy) — no Python per candidate (``compiled_neural=False``
  turns this off).  Any other term is evaluated through ``term.delta_np`` once per candidate copy: slow,
  exact.
* Cell volumes (and surfaces, centre sums for directed motion, the boundary set) are kept incrementally.

Random numbers: xoshiro256**, seeded from ``seed``; a run is a deterministic function of
``(state, hamiltonian, seed, proposal)`` and the sequence of ``step`` calls.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import ConfigError
from ..hamiltonian import _local_nh_numba as NB
from ..lattice import CellState, neighbour_offsets
from . import _kernels as K

__all__ = ["ANALYTIC_KINDS", "COMPILED_NEURAL_KINDS", "ExactResult", "ExactSampler", "compiled_delta", "run_exact"]

ANALYTIC_KINDS = ("contact", "volume", "external", "directed_motion", "surface")
COMPILED_NEURAL_KINDS = ("local_nh", "pooled_nh")
_PROPOSALS = {"classic": 0, "boundary": 1}


# ----------------------------------------------------------------------------------------------------------
# geometry
# ----------------------------------------------------------------------------------------------------------
def neighbour_table(shape, order: int, periodic: bool, *, valid_first: bool = False, drop_self: bool = False):
    """Flat neighbour table ``(N, K)`` int32 of the neighbourhood of ``order`` and the count of valid entries.

    Column ``j`` is offset ``neighbour_offsets(order)[j]`` (``-1`` outside a non-periodic lattice), unless
    ``valid_first``: then each row lists its in-lattice neighbours first (the order of the copy proposals).
    The sampler's kernels do not use tables (they compute neighbours arithmetically, in the same order, see
    ``_kernels``); this is the reference form for metrics and tests.
    ``drop_self`` marks a neighbour that wraps onto the site itself (tiny periodic lattices) as ``-1``, as the
    energy terms do.
    """
    shape = tuple(int(s) for s in shape)
    offs = neighbour_offsets(order, len(shape))
    grids = np.indices(shape).reshape(len(shape), -1)  # (ndim, N)
    n = grids.shape[1]
    table = np.empty((n, len(offs)), dtype=np.int64)
    for j, off in enumerate(offs):
        coords = grids + off[:, None]
        if periodic:
            coords = coords % np.array(shape)[:, None]
            table[:, j] = np.ravel_multi_index(tuple(coords), shape)
        else:
            ok = np.all((coords >= 0) & (coords < np.array(shape)[:, None]), axis=0)
            flat = np.full(n, -1, dtype=np.int64)
            flat[ok] = np.ravel_multi_index(tuple(coords[:, ok]), shape)
            table[:, j] = flat
    if drop_self:
        table[table == np.arange(n)[:, None]] = -1
    nvalid = (table >= 0).sum(axis=1).astype(np.int32)
    if valid_first and not periodic:
        order_ = np.argsort(table < 0, axis=1, kind="stable")
        table = np.take_along_axis(table, order_, axis=1)
    return np.ascontiguousarray(table.astype(np.int32)), nvalid


def _ring_of_offsets(order: int, ndim: int) -> np.ndarray:
    """Distance rank (0-based shell index) of each offset of the order-``order`` neighbourhood."""
    offs = neighbour_offsets(order, ndim)
    d2 = (offs ** 2).sum(1)
    shells = np.unique(d2)
    return np.searchsorted(shells, d2)


def chebyshev_range(order: int, ndim: int) -> int:
    """Largest |coordinate offset| of the order-``order`` neighbourhood (its range in sites)."""
    return int(np.abs(neighbour_offsets(order, ndim)).max())


def flat_deltas(offsets, shape) -> np.ndarray:
    """Flat index delta of each offset (valid for sites whose neighbours need no wrap), int64 ``(K,)``."""
    strides = np.cumprod((1,) + tuple(int(s) for s in shape[::-1]))[:-1][::-1]
    return np.ascontiguousarray(np.asarray(offsets, np.int64) @ strides.astype(np.int64))


def geometry(shape, periodic: bool, copy_order: int, read_range: int) -> tuple:
    """The kernels' geometry tuple ``G = (shape, periodic, offs, fd, M1, M2)`` (see ``_kernels``):
    ``read_range`` = the largest neighbourhood range the energy terms read (contact, surface)."""
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (2, 3):
        raise ConfigError(f"the exact sampler runs 2-D and 3-D lattices, got shape {shape}")
    offs = np.ascontiguousarray(neighbour_offsets(copy_order, len(shape)))
    r_copy = chebyshev_range(copy_order, len(shape))
    m1 = max(r_copy, int(read_range))
    return (shape, bool(periodic), offs, flat_deltas(offs, shape), m1, r_copy + m1)


# ----------------------------------------------------------------------------------------------------------
# packing the analytic terms
# ----------------------------------------------------------------------------------------------------------
def _as_np(x):
    if x is None:
        return None
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _type_vector(values, n_t1, name):
    v = np.zeros(n_t1, np.float64)
    a = _as_np(values).ravel()
    if a.size == 1 and n_t1 > 1:  # one shared value for every biological type
        v[1:] = a[0]
        return v
    if a.size > n_t1:
        if np.any(a[n_t1:] != 0):
            raise ConfigError(f"{name} has {a.size} entries but the state has only types 0..{n_t1 - 1}")
        a = a[:n_t1]
    v[: a.size] = a
    return v


def _direction_entries(direction, n_t1):
    """Directed-motion directions per type: list (index = type) or dict keyed by type (int or str)."""
    out = [None] * n_t1
    if direction is None:
        return out
    if isinstance(direction, dict) and "mode" in direction:  # one direction for every type
        return [None] + [direction] * (n_t1 - 1)
    if isinstance(direction, dict):
        for k, v in direction.items():
            t = int(k)
            if t < n_t1:
                out[t] = v
        return out
    for t, v in enumerate(direction):
        if t < n_t1:
            out[t] = v
    return out


@dataclass
class TermPack:
    """Compiled-parameter tuple ``P = (C, V, E, S, D)`` (``_kernels``; ``None`` for an absent kind) plus the Python-side data needed to build per-cell state."""

    P: tuple
    kinds: list
    field_shape: tuple | None = None
    surface_order: int = 1
    read_range: int = 0  # largest neighbourhood range the terms read (contact, surface)


def contact_sums_exact(Jn) -> bool:
    """Whether every contact ΔH is computed without rounding, in any order of its terms: all entries of the
    per-column tables ``Jn`` (rings, T1, T1+1) are multiples of a common 2⁻ᴱ (dyadic rationals, e.g. 0.625 =
    5/8) and any sum of ``2·rings`` of them stays below 2⁵³·2⁻ᴱ in magnitude. Then every partial sum is an
    exactly representable double, so the kernel may add the per-neighbour terms in a shorter dependency
    chain (two accumulators, ``_kernels._contact_pairs``) and get the bit-identical result of the sequential
    sum (zero's sign aside, which no decision reads)."""
    Jn = np.asarray(Jn, np.float64)
    if not np.all(np.isfinite(Jn)):
        return False
    e = 0
    for v in np.unique(np.abs(Jn)):
        den = float(v).as_integer_ratio()[1]  # a power of 2 for any finite double
        e = max(e, den.bit_length() - 1)
    if e > 60:
        return False
    big = float(np.abs(Jn).max()) * 2.0 ** e * 2 * Jn.shape[0]
    return big < 2.0 ** 53


def pack_params(terms, shape, periodic: bool, n_t1: int, contact_order_default: int = 2) -> TermPack:
    """Build the kernel parameter tuple from analytic terms.

    Parameters
    ----------
    terms : iterable of ``(spec, tensors)``
        ``spec`` = ``{"kind", "scale", "params"}`` as written by ``Term.spec()``; ``tensors`` = ``Term.tensors()``.
        Every parameter is multiplied by the term's ``scale``. Several terms of a kind add up.
    shape : lattice shape; periodic : torus boundaries; n_t1 : number of types incl. medium (T + 1).
    """
    shape = tuple(int(s) for s in shape)
    nd = len(shape)
    contact = []
    lam = np.zeros(n_t1)
    lamv = np.zeros(n_t1)
    ext = None
    s_lam = np.zeros(n_t1)
    s_tar = np.zeros(n_t1)
    s_order = None
    dm_mode = np.zeros(n_t1, np.int64)
    dm_vec = np.zeros((n_t1, nd))
    dm_band = np.zeros((n_t1, 3))
    dm_strength = np.zeros(n_t1)
    has = {"contact": False, "volume": False, "external": False, "surface": False, "dm": False}
    kinds = []
    for spec, tensors in terms:
        kind = spec["kind"]
        kinds.append(kind)
        sc = float(spec.get("scale", 1.0))
        p = spec.get("params", {})
        if kind == "contact":
            J = _as_np(p["J"])
            if J.ndim != 2 or J.shape[0] != J.shape[1]:
                raise ConfigError(f"contact J must be a square (T+1)x(T+1) table, got shape {J.shape}")
            if J.shape[0] < n_t1:
                raise ConfigError(f"contact J covers types 0..{J.shape[0] - 1} but the state has types up to "
                                  f"{n_t1 - 1}")
            contact.append((sc * J[:n_t1, :n_t1], int(p.get("order", contact_order_default))))
            has["contact"] = True
        elif kind == "volume":
            la = _type_vector(p["lambda"], n_t1, "volume lambda")
            ta = _type_vector(p["target"], n_t1, "volume target")
            la[0] = 0.0
            lam += sc * la
            lamv += sc * la * ta
            has["volume"] = True
        elif kind == "external":
            mu = _type_vector(p["mu"], n_t1, "external mu")
            mu[0] = 0.0  # the medium does not couple (as ExternalPotential)
            fld = _as_np(tensors.get("field") if tensors else None)
            if fld is None:
                fld = _as_np(p.get("field"))
            if fld is None or tuple(fld.shape) != shape:
                raise ConfigError(f"external potential field has shape {None if fld is None else fld.shape}, "
                                  f"the lattice is {shape}")
            e = sc * mu[:, None] * fld.reshape(1, -1)
            ext = e if ext is None else ext + e
            has["external"] = True
        elif kind == "surface":
            la = _type_vector(p["lambda"], n_t1, "surface lambda")
            ta = _type_vector(p["target"], n_t1, "surface target")
            o = int(p.get("order", 1))
            if s_order is not None and o != s_order:
                raise ConfigError("surface terms of different neighbourhood orders cannot be combined")
            s_order = o
            la[0] = 0.0
            if np.any((s_lam != 0) & (la != 0) & (s_tar != ta)):
                raise ConfigError("two surface terms with different targets for one type are not supported")
            s_lam += sc * la
            s_tar = np.where(la != 0, ta, s_tar)
            has["surface"] = True
        elif kind == "directed_motion":
            st = _type_vector(p["strength"], n_t1, "directed motion strength")
            st[0] = 0.0
            dirs = _direction_entries(p.get("direction"), n_t1)
            for t in range(1, n_t1):
                if st[t] == 0.0:
                    continue
                d = dirs[t]
                if d is None or d.get("mode") == "none":
                    continue
                if dm_mode[t] != 0:
                    raise ConfigError(f"directed motion: two terms act on type {t}")
                mode = d.get("mode", "constant")
                if mode == "constant":
                    v = np.asarray(d["vector"], np.float64)
                    if v.size != nd:
                        raise ConfigError(f"directed motion vector {v.tolist()} does not match a {nd}-D lattice")
                    nv = np.linalg.norm(v)
                    dm_mode[t] = 1
                    dm_vec[t] = v / nv if nv > 0 else v
                elif mode == "band":
                    sense = d.get("sense", "inward")
                    if sense not in ("inward", "outward"):
                        raise ConfigError(f"directed motion band sense must be inward/outward, got {sense!r}")
                    dm_mode[t] = 2 if sense == "inward" else 3
                    dm_band[t] = (int(d.get("axis", nd - 1)), float(d["lo"]), float(d["hi"]))
                else:
                    raise ConfigError(f"directed motion: unknown direction mode {mode!r}")
                dm_strength[t] = sc * st[t]
            has["dm"] = True
        else:
            raise ConfigError(f"term kind {kind!r} has no compiled form")

    # contact: per-column J over the union neighbourhood (orders are nested)
    read = 0
    C = V = E = S = D = None
    if contact:
        max_order = max(o for _, o in contact)
        rings = _ring_of_offsets(max_order, nd)
        coffs = np.ascontiguousarray(neighbour_offsets(max_order, nd))
        Jn = np.zeros((len(rings), n_t1, n_t1 + 1))  # the last column stays 0.0 (see _kernels, contact)
        for J, o in contact:
            Jn[rings < o, :, :n_t1] += J[None]
        uniform = bool(np.all(Jn == Jn[:1]))
        exact = np.int64(1) if contact_sums_exact(Jn) else None
        C = (coffs, flat_deltas(coffs, shape), np.ascontiguousarray(Jn[0]), None if uniform else Jn, exact)
        read = max(read, chebyshev_range(max_order, nd))
    if has["volume"]:
        lam[0] = lamv[0] = 0.0  # type 0 (medium) has no volume term; the kernel's volume ΔH relies on this row
        V = (lam, lamv)
    if ext is not None:
        E = np.ascontiguousarray(ext)
    if has["surface"]:
        soffs = np.ascontiguousarray(neighbour_offsets(s_order, nd))
        S = (soffs, flat_deltas(soffs, shape), s_lam, s_tar.astype(np.float64))
        read = max(read, chebyshev_range(s_order, nd))
    else:
        s_order = 1
    if has["dm"]:
        coords = np.ascontiguousarray(np.indices(shape).reshape(nd, -1).T.astype(np.int64))
        D = (dm_mode, dm_vec, dm_band, dm_strength, np.array(shape, np.float64), coords, bool(periodic))
    return TermPack((C, V, E, S, D), kinds, shape, s_order, read)


def _per_cell_state(pack: TermPack, G, ids_flat, n_ids, vol):
    """Mutable per-cell arrays ``A = (surf, cm_ref, cm_sum, head, nxt, prv)`` for the current lattice."""
    _C, _V, _E, S, D = pack.P
    nd = len(G[0])
    if S is not None:
        surf = K.surfaces_arith(ids_flat, G, S, n_ids)
    else:
        surf = np.zeros(n_ids, np.int64)
    if D is not None:
        n = ids_flat.shape[0]
        A = (surf, np.zeros(n_ids, np.int64), np.zeros((n_ids, nd), np.float64), np.full(n_ids, -1, np.int64),
             np.full(n, -1, np.int64), np.full(n, -1, np.int64))
        K.dm_init(ids_flat, n_ids, D, A)
        return A
    return (surf, np.zeros(1, np.int64), np.zeros((1, nd), np.float64), np.full(1, -1, np.int64),
            np.full(1, -1, np.int64), np.full(1, -1, np.int64))


# ----------------------------------------------------------------------------------------------------------
# compiled neural terms
# ----------------------------------------------------------------------------------------------------------
def neural_pack(local=None, pooled=None, ids=None, types=None, shape=None):
    """The kernel's ``NN`` tuple (see ``_kernels``) for a compiled local NH and/or pooled NH evaluator
    (:class:`~neuralcpm_plugin.hamiltonian._local_nh_numba.LocalNHCompiled` /
    :class:`~neuralcpm_plugin.hamiltonian._local_nh_numba.PooledNHCompiled`, bound here to the lattice
    ``ids`` (flat) of ``shape``)."""
    flags = np.zeros(2, np.int64)
    scales = np.zeros(2, np.float64)
    if local is not None:
        local.bind(ids.reshape(shape), types)
        flags[0], scales[0] = 1, local.scale
        Wl, Sl = local.W, local.S
    else:
        Wl = NB.dummy_weights()
        Sl = NB.new_state(Wl, (1, 1))
    if pooled is not None:
        pooled.bind(ids.reshape(shape), types)
        flags[1], scales[1] = 1, pooled.scale
        Wp, Sp, Pp, PSp = pooled.W, pooled.S, pooled.P, pooled.PS
    else:
        Wp = NB.dummy_weights()
        Sp = NB.new_state(Wp, (1, 1))
        Pp = NB.dummy_pooled_weights()
        PSp = NB.new_pooled_state(Pp)
    return (flags, scales, Wl, Sl, Wp, Sp, Pp, PSp)


def _compiled_neural(terms, shape):
    """Split non-analytic terms into (compiled local NH, compiled pooled NH, the rest)."""
    local = pooled = None
    rest = []
    for t in terms:
        kind = getattr(t, "kind", None)
        if len(shape) == 2 and kind == "local_nh" and local is None and hasattr(t, "numpy_evaluator"):
            local = NB.LocalNHCompiled(t.numpy_evaluator())
        elif len(shape) == 2 and kind == "pooled_nh" and pooled is None and hasattr(t, "numpy_evaluator"):
            pooled = NB.PooledNHCompiled(t.numpy_evaluator())
        else:
            rest.append(t)
    return local, pooled, rest


# ----------------------------------------------------------------------------------------------------------
# the sampler
# ----------------------------------------------------------------------------------------------------------
def narrow_lattice(ids: np.ndarray, types: np.ndarray):
    """``(ids, types)`` as uint16 / uint8 copies where every value fits (ids < 65,536: ``len(types)`` ids;
    types < 256), else unchanged: the compiled kernels read the same values from half (a quarter) of the
    bytes."""
    if len(types) <= 1 << 16:
        ids = ids.astype(np.uint16)
    if len(types) == 0 or (int(types.min()) >= 0 and int(types.max()) < 1 << 8):
        types = types.astype(np.uint8)
    return ids, types


def _split_hamiltonian(hamiltonian):
    analytic, other = [], []
    for t in hamiltonian.terms:
        if getattr(t, "analytic", False) and getattr(t, "kind", None) in ANALYTIC_KINDS:
            analytic.append(t)
        else:
            other.append(t)
    return analytic, other


class ExactSampler:
    """Sequential Metropolis on one lattice state; step it repeatedly.

    Parameters
    ----------
    state : CellState
        Initial state (copied; ``self.state`` returns the current one).
    hamiltonian : Hamiltonian or None
        Provides the terms, the temperature and the lattice spec (periodicity, copy order). May be ``None``
        when ``terms`` (list of ``(spec, tensors)``) is given — the low-level form used by tests.
    seed : int
        Seed of the sampler's own xoshiro256** generator.
    proposal : {"classic", "boundary"}
    terms, temperature, periodic, copy_order : optional overrides (used when ``hamiltonian`` is None).
    callback_terms : list of objects with ``delta_np(state, site, new_id, cache)``, optional
        Extra non-compiled terms (in addition to the Hamiltonian's non-analytic terms).
    compiled_neural : bool
        Run the Hamiltonian's ``local_nh`` / ``pooled_nh`` terms (one of each, 2-D) inside the compiled loop
        (default); False sends them through ``delta_np`` like any other neural term (slow; the reference).
    narrow_ids : bool
        Keep the live lattice as uint16 ids and the per-id type table as uint8 when they fit (fewer than
        65,536 ids, fewer than 256 types) and only compiled analytic terms run (no callback or compiled neural
        terms); default True. Half the lattice's bytes: a 400×400 lattice (320 KiB) then fits a 512 KiB L2.
        The compiled kernels specialise on the dtypes and compute with the same values, so trajectories are
        bit-identical to the int32 ones (tested); False keeps int32. ``state`` always returns int32 arrays;
        ``ids`` (the live view) has the narrow dtype.
    """

    def __init__(self, state: CellState, hamiltonian=None, *, seed: int = 0, proposal: str = "classic",
                 terms=None, temperature: float | None = None, periodic: bool | None = None,
                 copy_order: int | None = None, contact_order: int | None = None, callback_terms=None,
                 compiled_neural: bool = True, narrow_ids: bool = True):
        if proposal not in _PROPOSALS:
            raise ConfigError(f"unknown proposal {proposal!r}; use 'classic' or 'boundary'")
        self.proposal = proposal
        lat = getattr(hamiltonian, "lattice", None)
        self.periodic = bool(periodic if periodic is not None else (lat.periodic if lat is not None else True))
        self.copy_order = int(copy_order if copy_order is not None else (lat.copy_order if lat else 2))
        c_order = int(contact_order if contact_order is not None else (lat.contact_order if lat else 2))
        T = temperature if temperature is not None else getattr(hamiltonian, "temperature", 1.0)
        if not T > 0:
            raise ConfigError(f"temperature must be > 0, got {T}")
        self.temperature = float(T)
        self.callback_terms = list(callback_terms or [])
        st = state.copy() if isinstance(state, CellState) else CellState(*state)
        local = pooled = None
        if terms is None:
            if hamiltonian is None:
                raise ConfigError("ExactSampler needs a hamiltonian or a list of (spec, tensors) terms")
            analytic, other = _split_hamiltonian(hamiltonian)
            terms = [(t.spec(), t.tensors()) for t in analytic]
            if compiled_neural:
                local, pooled, other = _compiled_neural(other, st.shape)
            self.callback_terms = other + self.callback_terms
        self._terms = list(terms)

        self.shape = st.shape
        self.n_sites = int(np.prod(self.shape))
        self.n_t1 = max(int(st.types.max()) + 1, 1)
        for spec, _ in self._terms:  # type tables may be larger than the state's types
            for key in ("J", "lambda", "target", "mu", "strength", "direction"):
                v = spec.get("params", {}).get(key)
                if isinstance(v, (list, tuple, np.ndarray)) or hasattr(v, "shape"):
                    self.n_t1 = max(self.n_t1, len(v))
        self.pack = pack_params(self._terms, self.shape, self.periodic, self.n_t1, c_order)
        self._ids = np.ascontiguousarray(st.ids.astype(np.int32).ravel())
        self._types = np.ascontiguousarray(st.types.astype(np.int32))
        self._meta = dict(st.meta)
        self.n_ids = len(self._types)
        self._vol = np.bincount(self._ids, minlength=self.n_ids).astype(np.int64)
        self._G = geometry(self.shape, self.periodic, self.copy_order, self.pack.read_range)
        self._A = _per_cell_state(self.pack, self._G, self._ids, self.n_ids, self._vol)
        self._B = None
        if self.proposal == "boundary":  # (bflag, frame), see _kernels
            small = len(self._G[3]) < 256  # one byte per site keeps the rejection draws' reads in cache
            self._B = (np.zeros(self.n_sites, np.uint8 if small else np.int32), np.zeros(self.n_sites, np.uint8))
            K.init_boundary(self._ids, self._G, *self._B)
        self.compiled_terms = [t for t in (local, pooled) if t is not None]
        self._NN = neural_pack(local, pooled, self._ids, self._types, self.shape) if self.compiled_terms else None
        self._local, self._pooled = local, pooled
        if narrow_ids and not self.compiled_terms and not self.callback_terms:
            self._ids, self._types = narrow_lattice(self._ids, self._types)
        self._rng = K.seed_state(seed)
        self.counters = np.zeros(4, np.int64)  # attempts, candidates, accepted, refused deletions
        self.mcs_done = 0.0
        self._cb_state = None

    # ------------------------------------------------------------------------------------------------
    @property
    def state(self) -> CellState:
        """A copy of the current state."""
        return CellState(self._ids.reshape(self.shape).astype(np.int32), self._types.astype(np.int32),
                         dict(self._meta))

    @property
    def ids(self) -> np.ndarray:
        """The live id array (a view, shape = lattice shape; uint16 under ``narrow_ids`` where the ids fit, else
        int32); do not modify."""
        return self._ids.reshape(self.shape)

    @property
    def volumes(self) -> np.ndarray:
        """The live, incrementally kept volume per id."""
        return self._vol

    def stats(self) -> dict:
        a, c, acc, ref = (int(x) for x in self.counters)
        return {"attempts": a, "candidates": c, "accepted": acc, "refused_deletions": ref,
                "acceptance": acc / c if c else float("nan"), "mcs": self.mcs_done}

    def delta(self, site, new_id: int) -> float:
        """ΔH (compiled analytic part + callback terms) of copying ``new_id`` into ``site`` (tuple or flat)."""
        x = int(np.ravel_multi_index(tuple(site), self.shape)) if not np.isscalar(site) else int(site)
        dh = K.delta_analytic(x, int(new_id), self._ids, self._types, self._vol, self._G, self.pack.P, self._A)
        if self.compiled_terms:
            dh += K.neural_delta(x, int(new_id), self._ids, self._types, self._NN)
        if self.callback_terms:
            dh += self._callback_delta(x, int(new_id))
        return float(dh)

    def neural_cache_error(self) -> float:
        """Max |cached − recomputed| of the compiled neural terms' caches (0.0 without such terms)."""
        return max([t.cache_error() for t in self.compiled_terms], default=0.0)

    def _callback_delta(self, x: int, new_id: int) -> float:
        if self._cb_state is None:
            cs = CellState(self._ids.reshape(self.shape).copy(), self._types.copy(), dict(self._meta))
            cs.ids = self._ids.reshape(self.shape)  # share the live buffer
            self._cb_state = cs
        site = tuple(int(v) for v in np.unravel_index(x, self.shape))
        cache = {"volumes": self._vol, "periodic": self.periodic}
        return float(sum(float(t.delta_np(self._cb_state, site, new_id, cache)) for t in self.callback_terms))

    def step(self, mcs: float = 1.0) -> dict:
        """Advance by ``mcs`` Monte Carlo steps (``round(mcs · N)`` attempts); returns :meth:`stats`."""
        n = round(float(mcs) * self.n_sites)
        self.attempts(n)
        self.mcs_done += float(mcs)
        return self.stats()

    def attempts(self, n: int) -> None:
        """Run exactly ``n`` copy attempts."""
        remaining = int(n)
        if not self.callback_terms:
            self._sweep(remaining)
            return
        while remaining > 0:
            done, pending, x, new, dh = self._sweep(remaining, stop_at_candidate=True)
            remaining -= done
            if pending:
                dh += self._callback_delta(int(x), int(new))
                self._decide(int(x), int(new), float(dh))

    def _sweep(self, n: int, stop_at_candidate: bool = False):
        """Up to ``n`` attempts of the compiled kernel (:func:`_kernels.sweep`; its return value)."""
        fn = K.sweep if self._NN is None else K.sweep_nrt
        return fn(self._ids, self._types, self._vol, self._G, self.pack.P, self._A, self._B, self._rng, int(n),
                  1.0 / self.temperature, bool(stop_at_candidate), self.counters, self._NN)

    def _decide(self, x: int, new: int, dh: float) -> int:
        """Metropolis decision for a pending candidate with total ΔH ``dh`` (:func:`_kernels.decide`)."""
        fn = K.decide if self._NN is None else K.decide_nrt
        return fn(int(x), int(new), float(dh), self._ids, self._types, self._vol, self._G, self.pack.P, self._A,
                  self._B, self._rng, 1.0 / self.temperature, self.counters, self._NN)


def compiled_delta(state: CellState, hamiltonian=None, site=None, new_id=None, *, terms=None, periodic=None,
                   contact_order=None) -> float:
    """ΔH of one attempt by the *compiled* analytic kernel (for tests): copy ``new_id`` into ``site``."""
    s = ExactSampler(state, hamiltonian, terms=terms, periodic=periodic, contact_order=contact_order,
                     temperature=1.0 if hamiltonian is None else None)
    x = int(np.ravel_multi_index(tuple(site), s.shape))
    return float(K.delta_analytic(x, int(new_id), s._ids, s._types, s._vol, s._G, s.pack.P, s._A))


@dataclass
class ExactResult:
    """Output of :func:`run_exact`: the final state, the recorded frames and their MCS, sampler counters."""

    final: CellState
    frames: list = field(default_factory=list)
    mcs: list = field(default_factory=list)
    stats: dict = field(default_factory=dict)


def run_exact(state: CellState, hamiltonian, mcs: float, *, seed: int, proposal: str = "classic",
              record_every: float | None = None, progress: bool = False, **kwargs) -> ExactResult:
    """Run the exact sampler for ``mcs`` Monte Carlo steps.

    With ``record_every`` the frames are the initial state (MCS 0) and the state every ``record_every`` MCS
    (plus the final one if ``mcs`` is not a multiple); without it, ``frames == [final]``.
    ``kwargs`` go to :class:`ExactSampler`.
    """
    sampler = ExactSampler(state, hamiltonian, seed=seed, proposal=proposal, **kwargs)
    frames, times = [], []
    if record_every is None:
        chunks = [float(mcs)]
    else:
        if not record_every > 0:
            raise ConfigError(f"record_every must be > 0, got {record_every}")
        frames.append(sampler.state)
        times.append(0.0)
        n_full = int(np.floor(float(mcs) / record_every + 1e-9))
        chunks = [float(record_every)] * n_full
        rest = float(mcs) - n_full * record_every
        if rest > 1e-9:
            chunks.append(rest)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=float(mcs), unit="MCS", desc="exact sampler")
    t = 0.0
    for c in chunks:
        sampler.step(c)
        t += c
        if record_every is not None:
            frames.append(sampler.state)
            times.append(t)
        if bar is not None:
            bar.update(c)
    if bar is not None:
        bar.close()
    final = sampler.state
    if record_every is None:
        frames, times = [final], [t]
    return ExactResult(final, frames, times, sampler.stats())
