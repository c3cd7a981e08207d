"""Multi-core exact sampler for bounded-range (analytic) Hamiltonians: a checkerboard of strips.

Domain decomposition in the style of CompuCell3D's parallel Potts solver (a checkerboard of subdomains whose
same-colour members are processed concurrently) and Morpheus, here with strips along the first lattice
axis (rows in 2-D, slabs in 3-D: a strip is a contiguous range of flat site indices):

* The lattice's ``n0`` rows are cut into ``2m`` strips of ``≥ block`` rows each (``m`` = strips per colour,
  see :class:`CheckerboardSampler`), coloured alternately A, B, A, B, … Every *round* draws a fresh random
  row offset for the cut and a random colour order (no strip boundary stays fixed), then runs the two colour
  *phases*: in a phase, the ``m`` strips of the colour run concurrently (numba ``prange``, one strip per
  task, each with its own xoshiro256** stream), the other ``m`` strips are idle.
* Inside a strip, attempts are the classic (Graner–Glazier) attempts *restricted to targets in the strip*:
  a source ``s`` uniform over the strip widened by the copy range ``R`` (rows within ``R`` of it), a target
  ``t`` uniform over ``s``'s valid copy neighbours; if ``t`` is outside the strip the draw is void (not
  counted as an attempt); otherwise it is an attempt exactly as in
  :func:`~neuralcpm_plugin.sampling._kernels.sweep` (same cell → ends and counts; deletion → refused; ΔH by
  the compiled :func:`~neuralcpm_plugin.sampling._kernels.delta_analytic`; Metropolis min(1, e^(−ΔH/T))).
  A strip makes ``(rows + 2R) · row_size · f`` draws per round of ``f`` MCS, so **every ordered pair
  (s, t) is attempted at the sequential sampler's expected rate** (``f / k(s)`` per round; ``k(s)`` = number
  of valid copy neighbours of ``s``): the scheme changes the order of the attempts, not their distribution.
* No data race on the lattice: a strip writes only its own rows and reads rows within
  ``R_read`` = max(copy, contact, surface range) of them; strips of one colour are separated by a strip of the
  other colour of ``≥ block ≥ 2·R_read`` rows.
* Per-cell state (volume, surface, directed-motion centre sums and site lists) is shared between strips. At
  the start of each phase every strip marks (in parallel) the cells present in its widened region — the only
  cells whose state its attempts can read or write (as the old cell at ``t`` or the new cell at ``s``). A cell
  marked by two strips of the phase is *shared*: attempts whose old or new cell is shared are refused this
  phase (counted in ``stats()["refused_shared"]``). Every other cell is touched by one strip only, so its
  volume and surface are read and written without races and are **exact** at every attempt. The medium's
  volume (id 0, written by every strip) is not kept during the phase and is set to ``N − Σ V`` after it; the
  medium has no volume or surface energy.

What it preserves, precisely: each attempt's ΔH and decision are exactly those of the sequential kernel on the
current state, and the result of a phase equals some sequential execution of its attempts (same-colour strips
commute: disjoint writes, reads never touching another active strip's rows or cells). It differs from the
sequential random scan in two ways: (1) the order of attempts — within a phase, targets are confined to one
colour's strips (a blocked random scan; the per-pair attempt rate is the sequential one); (2) attempts on
shared cells are refused for that phase — a cell is shared only when it spans a whole strip of the other
colour but ``R`` rows at either side (``block − 2R`` rows or more; 30 with the default ``block = 32``). Cells
of ~100 sites (10–12 rows) never do at the default; with ``block = 16`` on 100×100 about 0.02–0.05 % of the
attempts are refused, with ``block = 8`` (12-row strips) 0.6 %. The count is in ``stats()["refused_shared"]``.
Where the sequential kernel has a stationary distribution π through detailed balance of each site update, any
schedule of those updates keeps π, and (2) is then a state-dependent pause that is the only approximation. The test suite
compares volumes, pair counts and the sorting index over time against the sequential sampler.

Determinism: a run is a deterministic function of ``(state, Hamiltonian, seed, block, rounds_per_mcs)`` and
of the ``step`` calls, **independent of the number of threads** (streams belong to strips, not threads).

Only analytic terms (``contact``, ``volume``, ``external``, ``surface``, ``directed_motion``) and the classic
proposal; neural terms (the local NH has a bounded range too) are future work.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from ..errors import ConfigError
from ..lattice import CellState, neighbour_offsets
from . import _kernels as K
from .exact import ExactSampler

__all__ = ["CheckerboardSampler", "run_checkerboard"]


@njit(cache=True, inline="always")
def _apply(x, new, ids, vol, P, A):
    """``ids[x] = new`` with the per-cell bookkeeping of the analytic terms; the medium's volume and surface
    are left alone (every strip would write them)."""
    old = ids[x]
    if P[8]:
        d_old, d_new = K.surface_change(x, old, new, ids, P[9])
        surf = A[0]
        if old != 0:
            surf[old] += d_old
        if new != 0:
            surf[new] += d_new
    ids[x] = new
    if old != 0:
        vol[old] -= 1
    if new != 0:
        vol[new] += 1
    if P[12]:
        K._dm_move(x, old, new, P, A)


@njit(cache=True)
def _strip_attempts(lo, rows, n0, row_size, R, n_draws, ids, types, vol, P, A, nb, nvalid, rng, inv_t,
                    shared, counters):
    """``n_draws`` classic draws with targets restricted to rows ``lo .. lo+rows-1`` (cyclic)."""
    n = ids.shape[0]
    span = (rows + 2 * R) * row_size
    start = (((lo - R) % n0) * row_size) % n          # flat index of the widened strip's first site
    lo_flat = lo * row_size
    inside = rows * row_size
    for _ in range(n_draws):
        r = K.rng_next(rng)
        s = start + K._below(r >> np.uint64(32), span)  # flat ranges: no division per draw
        if s >= n:
            s -= n
        k = nvalid[s]
        if k == 0:
            continue
        t = nb[s, K._below(r & np.uint64(0xFFFFFFFF), k)]
        d = t - lo_flat
        if d < 0:
            d += n
        if d >= inside:
            continue  # the target lies outside the strip: a void draw
        counters[0] += 1
        new = ids[s]
        old = ids[t]
        if old == new:
            continue
        if shared[old] or shared[new]:
            counters[4] += 1
            continue
        if old != 0 and vol[old] <= 1:
            counters[3] += 1
            continue
        counters[1] += 1
        dh = K.delta_analytic(t, new, ids, types, vol, P, A)
        if dh <= 0.0 or K.rng_uniform(rng) < np.exp(-dh * inv_t):
            _apply(t, new, ids, vol, P, A)
            counters[2] += 1


@njit(cache=True, parallel=True)
def _phase(first, m, bounds, n0, row_size, R, frac, ids, types, vol, P, A, nb, nvalid, rngs, inv_t, counters):
    """One colour phase: strips ``first, first+2, …`` (``m`` of them; strip ``j`` = rows ``bounds[j] ..
    bounds[j+1]-1`` shifted cyclically by the round's offset, already applied to ``bounds``)."""
    n_ids = vol.shape[0]
    marks = np.zeros((m, n_ids), np.uint8)
    for q in prange(m):  # cells each strip can touch: present in its rows widened by R
        j = first + 2 * q
        lo = bounds[j]
        rows = bounds[j + 1] - bounds[j]
        for rr in range(rows + 2 * R):
            base = ((lo - R + rr) % n0) * row_size
            for i in range(row_size):
                marks[q, ids[base + i]] = 1
    shared = np.zeros(n_ids, np.bool_)
    for c in range(1, n_ids):
        n = 0
        for q in range(m):
            n += marks[q, c]
        shared[c] = n >= 2
    local = np.zeros((m, 5), np.int64)
    for q in prange(m):
        j = first + 2 * q
        lo = bounds[j]
        rows = bounds[j + 1] - bounds[j]
        n_draws = np.int64(np.floor((rows + 2 * R) * row_size * frac + K.rng_uniform(rngs[j])))
        _strip_attempts(lo % n0, rows, n0, row_size, R, n_draws, ids, types, vol, P, A, nb, nvalid, rngs[j],
                        inv_t, shared, local[q])
    for q in range(m):
        for a in range(5):
            counters[a] += local[q, a]
    tot = 0
    for c in range(1, n_ids):
        tot += vol[c]
    vol[0] = ids.shape[0] - tot


def _chebyshev_range(order: int, ndim: int) -> int:
    return int(np.abs(neighbour_offsets(order, ndim)).max())


class CheckerboardSampler(ExactSampler):
    """Exact-attempt Metropolis on ``threads`` cores by a checkerboard of strips (see the module docstring).

    Parameters (besides :class:`~neuralcpm_plugin.sampling.exact.ExactSampler`'s ``state``, ``hamiltonian``,
    ``seed``, ``terms``, ``temperature``, ``periodic``, ``copy_order``, ``contact_order``)
    ----------
    threads : int
        Worker threads (numba). ``1`` runs the same algorithm on one core (same result: the outcome does not
        depend on ``threads``). Capped at numba's thread pool size (``NUMBA_NUM_THREADS``).
    block : int
        Minimum strip width in rows (axis 0), default 32; at least ``2·R_read`` (twice the largest of the
        copy, contact and surface ranges). Strips per colour ``m = n0 // (2·block)``, rounded down to a
        multiple of 4 when ≥ 4 (balances 1, 2 and 4 threads); the ``2m`` strips split the rows as evenly as
        possible.
    rounds_per_mcs : int
        New random cut offset and colour order this many times per MCS (default 2).
    """

    def __init__(self, state: CellState, hamiltonian=None, *, seed: int = 0, threads: int = 1, block: int = 32,
                 rounds_per_mcs: int = 2, terms=None, temperature=None, periodic=None, copy_order=None,
                 contact_order=None, proposal: str = "classic", callback_terms=None):
        if proposal != "classic":
            raise ConfigError(f"CheckerboardSampler supports the classic proposal only, got {proposal!r}")
        super().__init__(state, hamiltonian, seed=seed, proposal="classic", terms=terms, temperature=temperature,
                         periodic=periodic, copy_order=copy_order, contact_order=contact_order,
                         callback_terms=callback_terms, compiled_neural=False)
        if self.callback_terms:
            names = ", ".join(type(t).__name__ for t in self.callback_terms)
            raise ConfigError(f"CheckerboardSampler runs analytic terms only; {names} would need the sequential "
                              "ExactSampler")
        if int(threads) < 1:
            raise ConfigError(f"threads must be >= 1, got {threads}")
        if int(rounds_per_mcs) < 1:
            raise ConfigError(f"rounds_per_mcs must be >= 1, got {rounds_per_mcs}")
        nd = len(self.shape)
        P = self.pack.P
        self.copy_range = _chebyshev_range(self.copy_order, nd)
        read = self.copy_range
        if P[0]:
            read = max(read, int(np.abs(neighbour_offsets(_max_contact_order(self._terms, contact_order, hamiltonian),
                                                          nd)).max()))
        if P[8]:
            read = max(read, _chebyshev_range(self.pack.surface_order, nd))
        self.read_range = read
        block = max(int(block), 2 * read)
        n0 = self.shape[0]
        m = n0 // (2 * block)
        if m < 1:
            raise ConfigError(f"CheckerboardSampler: axis 0 has {n0} rows, fewer than 2 strips of {block} rows; use "
                              "ExactSampler (or a smaller block)")
        if m >= 4:
            m -= m % 4
        self.m = m
        self.block = block
        self.threads = int(threads)
        self.rounds_per_mcs = int(rounds_per_mcs)
        edges = np.linspace(0, n0, 2 * m + 1)
        self._bounds0 = np.round(edges).astype(np.int64)
        self._row_size = self.n_sites // n0
        self._rngs = np.stack([K.seed_state(int(seed) * 1000003 + 7919 * (j + 1)) for j in range(2 * m)])
        self.counters = np.zeros(5, np.int64)  # attempts, candidates, accepted, refused deletions, refused shared

    def stats(self) -> dict:
        a, c, acc, ref, sh = (int(x) for x in self.counters)
        out = {"attempts": a, "candidates": c, "accepted": acc, "refused_deletions": ref,
               "acceptance": acc / c if c else float("nan"), "mcs": self.mcs_done, "refused_shared": sh}
        out["threads"] = self.threads
        out["strips"] = 2 * self.m
        return out

    def step(self, mcs: float = 1.0) -> dict:
        """Advance by ``mcs`` MCS: rounds of ``1/rounds_per_mcs`` MCS (the last one shorter)."""
        left = float(mcs)
        f = 1.0 / self.rounds_per_mcs
        prev = numba.get_num_threads()
        numba.set_num_threads(max(1, min(self.threads, numba.config.NUMBA_NUM_THREADS)))
        try:
            while left > 1e-12:
                self._round(min(f, left))
                left -= f
        finally:
            numba.set_num_threads(prev)
        self.mcs_done += float(mcs)
        return self.stats()

    def attempts(self, n: int) -> None:
        """``n`` attempts in expectation (``n / N`` MCS)."""
        self.step(int(n) / self.n_sites)

    def _round(self, frac: float) -> None:
        r = K.rng_next(self._rng)
        offset = int(r >> np.uint64(33)) % self.shape[0]
        colour0 = int(r & np.uint64(1))
        bounds = self._bounds0 + offset
        inv_t = 1.0 / self.temperature
        for c in (colour0, 1 - colour0):
            _phase(c, self.m, bounds, self.shape[0], self._row_size, self.copy_range, float(frac), self._ids,
                   self._types, self._vol, self.pack.P, self._A, self._nb, self._nvalid, self._rngs, inv_t,
                   self.counters)


def _max_contact_order(terms, contact_order, hamiltonian) -> int:
    lat = getattr(hamiltonian, "lattice", None)
    default = int(contact_order if contact_order is not None else (lat.contact_order if lat else 2))
    orders = [int(spec.get("params", {}).get("order", default)) for spec, _ in terms if spec["kind"] == "contact"]
    return max(orders) if orders else default


def run_checkerboard(state: CellState, hamiltonian, mcs: float, *, seed: int, threads: int = 1, **kwargs):
    """Run :class:`CheckerboardSampler` for ``mcs`` MCS; returns ``(final_state, stats)``."""
    s = CheckerboardSampler(state, hamiltonian, seed=seed, threads=threads, **kwargs)
    s.step(mcs)
    return s.state, s.stats()

