"""Multi-core exact sampler for bounded-range (analytic) Hamiltonians: a checkerboard of strips.

Domain decomposition in the style of CompuCell3D's parallel Potts solver (a checkerboard of subdomains whose
same-colour members are processed concurrently) and Morpheus, here with strips along the first lattice
axis (rows in 2-D, slabs in 3-D: a strip is a contiguous range of flat site indices):

* The lattice's ``n0`` rows are cut into ``2m`` strips of ``≥ block`` rows each (``m`` = strips per colour,
  see :class:`CheckerboardSampler`), coloured alternately A, B, A, B, … Every *round* draws a fresh random
  row offset for the cut and a random colour order (no strip boundary stays fixed), then runs the two colour
  *phases*: in a phase, the ``m`` strips of the colour run concurrently (worker threads, each running its
  share of the strips in compiled code without the GIL; each strip has its own xoshiro256** stream), the other
  ``m`` strips are idle.
* Inside a strip, attempts are the classic (Graner–Glazier) attempts *restricted to targets in the strip*:
  a source ``s`` uniform over the strip widened by the copy range ``R`` (rows within ``R`` of it), a target
  ``t`` uniform over ``s``'s valid copy neighbours; if ``t`` is outside the strip the draw is void (not
  counted as an attempt); otherwise it is an attempt exactly as in
  :func:`~neuralcpm_plugin.sampling._kernels.sweep` (the same target pick ``propose_classic``; same cell →
  ends and counts; deletion → refused; ΔH by the sequential kernel's ``delta_core``; Metropolis
  min(1, e^(−ΔH/T))).
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

from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
from numba import njit, prange
from numba.core import types as nb_types
from numba.extending import overload

from ..errors import ConfigError
from ..lattice import CellState
from . import _kernels as K
from .exact import ExactSampler, chebyshev_range

__all__ = ["CheckerboardSampler", "run_checkerboard"]


@njit(cache=True, inline="always")
def _surface_update(x, fast, old, new, ids, G, soffs, sfd, surf):
    d_old, d_new = K.surface_change(x, fast, old, new, ids, G, soffs, sfd)
    if old != 0:
        surf[old] += d_old
    if new != 0:
        surf[new] += d_new


def _surface_apply(x, fast, old, new, ids, G, S, surf):  # pragma: no cover - compiled (overload)
    """Surface bookkeeping of a copy, medium excluded; nothing when ``S`` is None."""


@overload(_surface_apply, inline="always")
def _surface_apply_impl(x, fast, old, new, ids, G, S, surf):
    if isinstance(S, nb_types.NoneType):
        return lambda x, fast, old, new, ids, G, S, surf: None
    return lambda x, fast, old, new, ids, G, S, surf: _surface_update(x, fast, old, new, ids, G, S[0], S[1], surf)


@njit(cache=True, inline="always")
def _apply(x, fast, new, ids, vol, G, P, A):
    """``ids[x] = new`` with the per-cell bookkeeping of the analytic terms; the medium's volume and surface
    are left alone (every strip would write them)."""
    old = ids[x]
    _surface_apply(x, fast, old, new, ids, G, P[3], A[0])
    ids[x] = new
    if old != 0:
        vol[old] -= 1
    if new != 0:
        vol[new] += 1
    K.dm_move(x, old, new, P[4], A)


@njit(**K._HOT)
def _strip_attempts(lo, rows, n0, row_size, R, n_draws, ids, types, vol, G, P, A, rng, inv_t, shared, counters):
    """``n_draws`` classic draws with targets restricted to rows ``lo .. lo+rows-1`` (cyclic). The counters are
    kept in locals and added to ``counters`` at the end: the strips' counter rows share cache lines, and
    writing them per attempt from two threads cost the two-thread run a third of its speed (false sharing)."""
    n = ids.shape[0]
    span = (rows + 2 * R) * row_size
    start = (((lo - R) % n0) * row_size) % n          # flat index of the widened strip's first site
    lo_flat = lo * row_size
    inside = rows * row_size
    s0 = rng[0]
    s1 = rng[1]
    s2 = rng[2]
    s3 = rng[3]
    n_att = n_cand = n_acc = n_del = n_sh = 0
    for _ in range(n_draws):
        r, s0, s1, s2, s3 = K._xo(s0, s1, s2, s3)
        s = start + K._below(r >> np.uint64(32), span)  # flat ranges: no division per draw
        if s >= n:
            s -= n
        t, fast = K.propose_classic(s, r & K._LO32, G)
        if t < 0:
            continue
        d = t - lo_flat
        if d < 0:
            d += n
        if d >= inside:
            continue  # the target lies outside the strip: a void draw
        n_att += 1
        new = ids[s]
        old = ids[t]
        if old == new:
            continue
        if shared[old] or shared[new]:
            n_sh += 1
            continue
        if old != 0 and vol[old] <= 1:
            n_del += 1
            continue
        n_cand += 1
        dh = K.delta_core(t, fast, old, new, ids, types, vol, G, P, A)
        if dh > 0.0:
            u, s0, s1, s2, s3 = K._xo(s0, s1, s2, s3)
            if K._unit(u) >= np.exp(-dh * inv_t):
                continue
        _apply(t, fast, new, ids, vol, G, P, A)
        n_acc += 1
    counters[0] += n_att
    counters[1] += n_cand
    counters[2] += n_acc
    counters[3] += n_del
    counters[4] += n_sh
    rng[0] = s0
    rng[1] = s1
    rng[2] = s2
    rng[3] = s3


@njit(cache=True, parallel=True)
def _shared_cells(first, m, bounds, n0, row_size, R, ids, n_ids):
    """Cells present in the widened regions of two or more strips of the phase (``first, first+2, …``; strip
    ``j`` = rows ``bounds[j] .. bounds[j+1]-1`` shifted cyclically by the round's offset, already applied)."""
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
    return shared


@njit(nogil=True, **K._HOT)
def _strips(qs, first, bounds, n0, row_size, R, frac, ids, types, vol, G, P, A, rngs, inv_t, shared, local):
    """The phase's strips ``first + 2q`` for ``q`` in ``qs``, one after the other (one worker thread's share;
    the GIL is released, so the workers run concurrently)."""
    for i in range(qs.shape[0]):
        q = qs[i]
        j = first + 2 * q
        lo = bounds[j]
        rows = bounds[j + 1] - bounds[j]
        n_draws = np.int64(np.floor((rows + 2 * R) * row_size * frac + K.rng_uniform(rngs[j])))
        _strip_attempts(lo % n0, rows, n0, row_size, R, n_draws, ids, types, vol, G, P, A, rngs[j], inv_t, shared,
                        local[q])


@njit(cache=True)
def _end_phase(local, counters, vol, n_sites):
    for q in range(local.shape[0]):
        for a in range(5):
            counters[a] += local[q, a]
    tot = 0
    for c in range(1, vol.shape[0]):
        tot += vol[c]
    vol[0] = n_sites - tot


class CheckerboardSampler(ExactSampler):
    """Exact-attempt Metropolis on ``threads`` cores by a checkerboard of strips (see the module docstring).

    Parameters (besides :class:`~neuralcpm_plugin.sampling.exact.ExactSampler`'s ``state``, ``hamiltonian``,
    ``seed``, ``terms``, ``temperature``, ``periodic``, ``copy_order``, ``contact_order``)
    ----------
    threads : int
        Worker threads (Python threads running the compiled strip loop without the GIL; the per-phase
        marking of shared cells uses numba's ``prange``). ``1`` runs the same algorithm on one core (same
        result: the outcome does not depend on ``threads``). Capped at numba's thread pool size
        (``NUMBA_NUM_THREADS``) and at the number of strips per colour.
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
        self.copy_range = chebyshev_range(self.copy_order, nd)
        read = max(self.copy_range, self.pack.read_range)
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
        workers = max(1, min(self.threads, numba.config.NUMBA_NUM_THREADS, self.m))
        numba.set_num_threads(max(1, min(self.threads, numba.config.NUMBA_NUM_THREADS)))
        pool = ThreadPoolExecutor(max_workers=workers) if workers > 1 else None
        try:
            while left > 1e-12:
                self._round(min(f, left), pool, workers)
                left -= f
        finally:
            numba.set_num_threads(prev)
            if pool is not None:
                pool.shutdown()
        self.mcs_done += float(mcs)
        return self.stats()

    def attempts(self, n: int) -> None:
        """``n`` attempts in expectation (``n / N`` MCS)."""
        self.step(int(n) / self.n_sites)

    def _round(self, frac: float, pool, workers: int) -> None:
        r = K.rng_next(self._rng)
        offset = int(r >> np.uint64(33)) % self.shape[0]
        colour0 = int(r & np.uint64(1))
        bounds = self._bounds0 + offset
        inv_t = 1.0 / self.temperature
        n0, m = self.shape[0], self.m
        for c in (colour0, 1 - colour0):
            shared = _shared_cells(c, m, bounds, n0, self._row_size, self.copy_range, self._ids, self.n_ids)
            local = np.zeros((m, 8), np.int64)     # one 64-byte row per strip

            def run(qs, c=c, shared=shared, local=local):
                _strips(qs, c, bounds, n0, self._row_size, self.copy_range, float(frac), self._ids, self._types,
                        self._vol, self._G, self.pack.P, self._A, self._rngs, inv_t, shared, local)

            shares = [np.arange(k, m, workers, dtype=np.int64) for k in range(workers)]
            if pool is None:
                run(shares[0])
            else:
                for fut in [pool.submit(run, qs) for qs in shares]:
                    fut.result()
            _end_phase(local, self.counters, self._vol, self.n_sites)


def run_checkerboard(state: CellState, hamiltonian, mcs: float, *, seed: int, threads: int = 1, **kwargs):
    """Run :class:`CheckerboardSampler` for ``mcs`` MCS; returns ``(final_state, stats)``."""
    s = CheckerboardSampler(state, hamiltonian, seed=seed, threads=threads, **kwargs)
    s.step(mcs)
    return s.state, s.stats()

