"""Multi-core exact sampler for bounded-range (analytic) Hamiltonians: a checkerboard of strips.

Domain decomposition in the style of CompuCell3D's parallel Potts solver (a checkerboard of subdomains whose
same-colour members are processed concurrently) and Morpheus, here with strips along the first lattice
axis (rows in 2-D, slabs in 3-D: a strip is a contiguous range of flat site indices):

* The lattice's ``n0`` rows are cut into ``2m`` strips of ``≥ block`` rows each (``m`` = strips per colour,
  see :class:`CheckerboardSampler`), coloured alternately A, B, A, B, … Every *round* draws a fresh random
  row offset for the cut and a random colour order (no strip boundary stays fixed), then runs the two colour
  *phases*: in a phase, the ``m`` strips of the colour run concurrently, the other ``m`` strips are idle.
  Each worker thread runs a whole ``step`` in one compiled call without the GIL (each strip has its own
  xoshiro256** stream; a worker runs the strips centred in its fixed home rows, then helps with the others'
  not yet started ones, see ``_worker``); the workers meet at a barrier after each phase's stamping and
  after its attempts (:mod:`._sync`: spin, then sleep on a futex).
  Nothing else is done per phase, and no per-phase work is done by one thread while the others wait
  (``CheckerboardSampler.profile()`` measures the stamping, the barrier waits and the attempts).
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
  the start of each phase every strip stamps (in parallel, one store per site, ``stamps[strip, cell] =
  phase``) the cells present in its widened region — the only cells whose state its attempts can read or
  write (as the old cell at ``t`` or the new cell at ``s``). A cell stamped by two strips of the phase is
  *shared*: attempts whose old or new cell is shared are refused this phase (counted in
  ``stats()["refused_shared"]``; a strip works the answer out at its first query of the cell in the phase and
  remembers it). Every other cell is touched by one strip only, so its volume and surface are read and
  written by one thread without races and are **exact** at every attempt: a cell near a strip boundary is
  either the strip's alone (it sees the true volume) or refused. The medium's volume (id 0, written by every
  strip) is not kept during a ``step`` and is set to ``N − Σ V`` after it; the medium has no volume or
  surface energy. False sharing (two threads writing different cells of one cache line) would cost time,
  never correctness: with more than one worker thread the volume and surface arrays hold one cell per
  64-byte line (a strided view; on one thread they stay packed, ≈ 2–5 % faster), so cell ids need not
  follow the lattice layout. The directed-motion per-cell state is not padded.

What it preserves, precisely: each attempt's ΔH and decision are exactly those of the sequential kernel on the
current state, and the result of a phase equals some sequential execution of its attempts (same-colour strips
commute: disjoint writes, reads never touching another active strip's rows or cells). It differs from the
sequential random scan in two ways: (1) the order of attempts — within a phase, targets are confined to one
colour's strips (a blocked random scan; the per-pair attempt rate is the sequential one); (2) attempts on
shared cells are refused for that phase — a connected cell is shared only when it spans a whole strip of the
other colour but ``R`` rows at either side (``block − 2R`` rows or more; 30 with the default ``block = 32``;
a fragmented cell also when its pieces lie in two same-colour strips). Cells
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

import os
import threading

import numba
import numpy as np
from numba import njit
from numba.core import types as nb_types
from numba.extending import overload

from ..errors import ConfigError
from ..lattice import CellState
from . import _kernels as K
from . import _sync
from .exact import ExactSampler, chebyshev_range

__all__ = ["CheckerboardSampler", "run_checkerboard"]

# How long a thread waiting at a barrier spins before it sleeps (futex), in seconds: longer than the usual
# imbalance between the workers' strips and than a futex wake-up, far shorter than a scheduler time slice.
SPIN_SECONDS = 50e-6


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


@njit(cache=True, inline="always")
def _is_shared(c, j, first, m, ep, stamps, memo):
    """Whether cell ``c`` is shared in this phase (epoch ``ep``): present in strip ``j``'s widened rows and in
    another strip of the phase (``first, first+2, …``), i.e. stamped ``ep`` in that strip's row of
    ``stamps``. Worked out at the strip's first query of ``c`` in the phase and remembered in ``memo``
    (strip ``j``'s own row: ``ep`` = not shared, ``-ep`` = shared). The medium is never shared."""
    if c == 0:
        return False
    x = memo[c]
    if x == ep:
        return False
    if x == -ep:
        return True
    shared = False
    for q in range(m):
        j2 = first + 2 * q
        if j2 != j and stamps[j2, c] == ep:
            shared = True
            break
    memo[c] = -ep if shared else ep
    return shared


@njit(**K._HOT)
def _strip_attempts(j, first, m, ep, lo, rows, n0, row_size, R, n_draws, ids, types, vol, G, P, A, rng, inv_t,
                    stamps, memo, counters):
    """``n_draws`` classic draws of strip ``j`` with targets restricted to rows ``lo .. lo+rows-1`` (cyclic);
    attempts whose old or new cell is shared this phase (:func:`_is_shared`) are refused. The counters are
    kept in locals and added to ``counters`` (the strip's own 64-byte row) at the end: writing them per
    attempt from two threads into rows that share a cache line cost the two-thread run a third of its speed
    (false sharing)."""
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
        if _is_shared(old, j, first, m, ep, stamps, memo) or _is_shared(new, j, first, m, ep, stamps, memo):
            n_sh += 1
            continue
        if old != 0 and vol[old] <= 1:
            n_del += 1
            continue
        n_cand += 1
        dh = K.delta_core(t, fast, old, new, ids, types, vol, G, P, A)
        if dh > 0.0:
            u, s0, s1, s2, s3 = K._xo(s0, s1, s2, s3)
            if not K.below_exp(u >> np.uint64(11), dh * inv_t):
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


@njit(cache=True, inline="always")
def _stamp_strip(ep, lo, rows, n0, row_size, R, ids, stamp):
    """``stamp[c] = ep`` for every cell ``c`` present in rows ``lo - R .. lo + rows + R - 1`` (cyclic): the
    cells strip's attempts can read or write. One store per site, no test, unsigned indices (no negative-index
    wrap-around code): ≈ 0.35 ns per site here, against ≈ 2.5 ns for a test-and-list scan."""
    n = ids.shape[0]
    start = ((lo - R) % n0) * row_size
    end = start + (rows + 2 * R) * row_size
    for i in range(np.uint64(start), np.uint64(min(end, n))):
        stamp[np.uint32(ids[i])] = ep
    for i in range(np.uint64(max(end - n, 0))):
        stamp[np.uint32(ids[i])] = ep


@njit(cache=True, inline="always")
def _home(j, off, bounds0, n0, n_workers):
    """The worker whose share of the rows (``n0 / n_workers`` consecutive rows each, fixed) holds the centre
    row of strip ``j`` under the round's offset ``off``."""
    centre = (bounds0[j] + off + (bounds0[j + 1] - bounds0[j]) // 2) % n0
    return centre * n_workers // n0


@njit(cache=True, inline="always")
def _kth_home_strip(k, owner, first, m, off, bounds0, n0, n_workers):
    """The ``k``-th strip (``q`` order) of the phase whose home is worker ``owner``; -1 if it has fewer."""
    for q in range(m):
        if _home(first + 2 * q, off, bounds0, n0, n_workers) == owner:
            if k == 0:
                return q
            k -= 1
    return -1


@njit(nogil=True, **K._HOT)
def _worker(w, n_workers, offsets, colours, fracs, epoch0, bounds0, n0, row_size, R, ids, types, vol, G, P, A, rngs,
            inv_t, stamps, memo, counters, sync, spin, clock, strip_ns):
    """Worker ``w`` of ``n_workers`` for the rounds ``offsets``/``colours``/``fracs`` (drawn in advance).

    Every worker has a fixed *home*, ``n0 / n_workers`` consecutive rows; a strip's home worker is the one
    whose rows hold the strip's centre (:func:`_home`), so a worker keeps working on the same rows, whose
    lattice and cell data stay in its core's cache, whatever the round's offset. In each colour phase (epoch
    ``epoch0 + 1 + 2·round + phase``) the worker stamps its home strips, meets the others at a barrier (the
    shared test reads every strip's stamps), runs its home strips in ``q`` order (taking them from its
    counter ``sync[2 + w]``), then takes the not yet started strips of the other workers from theirs (a
    thread that finishes early helps; the result does not depend on which thread runs a strip), and meets
    the others at a barrier again (the next phase reads rows this one wrote). Worker 0 zeroes the counters
    between the two barriers' windows. No other work is done per phase, and none by one thread alone.
    ``clock[w]`` accumulates ticks of ``_sync.cycles``: stamping, waiting at barriers, attempts. When
    ``strip_ns`` has a row per phase (else it has 1), ``strip_ns[phase, q]`` gets the thread CPU time (ns)
    of strip ``q``'s stamping and attempts (:func:`_sync.thread_cpu_ns`, two system calls per strip)."""
    m = (bounds0.shape[0] - 1) // 2
    record = strip_ns.shape[0] == 2 * offsets.shape[0]
    tb = clock[w, 6:8]  # this worker's timespec
    for rnd in range(offsets.shape[0]):
        off = offsets[rnd]
        for ph in range(2):
            first = colours[rnd] if ph == 0 else 1 - colours[rnd]
            ep = np.int32(epoch0 + 1 + 2 * rnd + ph)
            t0 = _sync.cycles()
            if w == 0:  # no thread reads the counters now: the last phase's drawing ended at its last barrier
                for v in range(n_workers):
                    _sync.atomic_add(sync, 2 + v, -_sync.atomic_load(sync, 2 + v))
            for q in range(m):
                j = first + 2 * q
                if _home(j, off, bounds0, n0, n_workers) != w:
                    continue
                c0 = _sync.thread_cpu_ns(tb, 0) if record else 0
                _stamp_strip(ep, (bounds0[j] + off) % n0, bounds0[j + 1] - bounds0[j], n0, row_size, R, ids,
                             stamps[j])
                if record:
                    strip_ns[2 * rnd + ph, q, 0] = _sync.thread_cpu_ns(tb, 0) - c0
            t1 = _sync.cycles()
            _sync.barrier(sync, n_workers, spin)
            t2 = _sync.cycles()
            for v in range(n_workers):
                owner = (w + v) % n_workers
                while True:
                    q = _kth_home_strip(_sync.atomic_add(sync, 2 + owner, 1), owner, first, m, off, bounds0, n0,
                                        n_workers)
                    if q < 0:
                        break
                    j = first + 2 * q
                    rows = bounds0[j + 1] - bounds0[j]
                    n_draws = np.int64(np.floor((rows + 2 * R) * row_size * fracs[rnd] + K.rng_uniform(rngs[j])))
                    c0 = _sync.thread_cpu_ns(tb, 0) if record else 0
                    _strip_attempts(j, first, m, ep, (bounds0[j] + off) % n0, rows, n0, row_size, R, n_draws, ids,
                                    types, vol, G, P, A, rngs[j], inv_t, stamps, memo[j], counters[j])
                    if record:
                        strip_ns[2 * rnd + ph, q, 1] = _sync.thread_cpu_ns(tb, 0) - c0
            t3 = _sync.cycles()
            _sync.barrier(sync, n_workers, spin)
            t4 = _sync.cycles()
            clock[w, 0] += t1 - t0
            clock[w, 1] += (t2 - t1) + (t4 - t3)
            clock[w, 2] += t3 - t2


def _pinned(cpus, w, *args):
    """``_worker(w, *args)``; with ``cpus`` (a list of CPU ids) the calling thread runs pinned to CPU
    ``cpus[w % len(cpus)]`` (Linux ``sched_setaffinity`` of the calling thread), its previous CPU set restored
    afterwards; ``None`` (or empty) leaves the placement to the OS."""
    if not cpus:
        _worker(w, *args)
        return
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {int(cpus[w % len(cpus)])})
    try:
        _worker(w, *args)
    finally:
        os.sched_setaffinity(0, old)


def _one_per_line(a: np.ndarray) -> np.ndarray:
    """A copy of the 1-D array ``a`` as a strided view with one element per 64-byte cache line (so that two
    threads writing different cells never write the same line: no false sharing)."""
    k = max(1, 64 // a.itemsize)
    buf = np.zeros(a.shape[0] * k + k, a.dtype)
    off = (-buf.ctypes.data % 64) // a.itemsize
    v = buf[off: off + a.shape[0] * k: k]
    v[:] = a
    return v


class CheckerboardSampler(ExactSampler):
    """Exact-attempt Metropolis on ``threads`` cores by a checkerboard of strips (see the module docstring).

    Parameters (besides :class:`~neuralcpm_plugin.sampling.exact.ExactSampler`'s ``state``, ``hamiltonian``,
    ``seed``, ``terms``, ``temperature``, ``periodic``, ``copy_order``, ``contact_order`` and ``narrow_ids``:
    uint16 ids / uint8 types where they fit, bit-identical results)
    ----------
    threads : int
        Worker threads (Python threads each running the whole ``step`` compiled, without the GIL, meeting at
        two barriers per phase). ``1`` runs the same algorithm on one core in the calling thread (same
        result: the outcome does not depend on ``threads``). Capped at numba's thread pool size
        (``NUMBA_NUM_THREADS``) and at the number of strips per colour.
    block : int
        Minimum strip width in rows (axis 0), default 32; at least ``2·R_read`` (twice the largest of the
        copy, contact and surface ranges). Strips per colour ``m = n0 // (2·block)``, rounded down to a
        multiple of 4 when ≥ 4 (balances 1, 2 and 4 threads); the ``2m`` strips split the rows as evenly as
        possible.
    rounds_per_mcs : int
        New random cut offset and colour order this many times per MCS (default 2).

    Attributes set after construction: ``record_strips`` (see :meth:`predicted_speedup`) and ``pin_cpus`` — a
    list of CPU ids (Linux): worker ``w`` runs pinned to ``pin_cpus[w % len(pin_cpus)]`` during ``step`` (each
    thread's previous CPU set is restored after it); ``None`` (default) lets the OS place the threads. Pinning
    changes where the work runs, never the result. ``spin_seconds`` (default :data:`SPIN_SECONDS`): how long a
    worker waiting at a barrier spins before it sleeps on the futex (longer spins keep an idle vCPU from
    halting between phases, at the cost of CPU time; never changes the result).
    """

    def __init__(self, state: CellState, hamiltonian=None, *, seed: int = 0, threads: int = 1, block: int = 32,
                 rounds_per_mcs: int = 2, terms=None, temperature=None, periodic=None, copy_order=None,
                 contact_order=None, proposal: str = "classic", callback_terms=None, narrow_ids: bool = True):
        if proposal != "classic":
            raise ConfigError(f"CheckerboardSampler supports the classic proposal only, got {proposal!r}")
        super().__init__(state, hamiltonian, seed=seed, proposal="classic", terms=terms, temperature=temperature,
                         periodic=periodic, copy_order=copy_order, contact_order=contact_order,
                         callback_terms=callback_terms, compiled_neural=False, narrow_ids=narrow_ids)
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
        self._workers = max(1, min(self.threads, numba.config.NUMBA_NUM_THREADS, m))
        if self._workers > 1:  # the per-cell arrays the threads write (volume, surface): one cell per cache line
            self._vol = _one_per_line(self._vol)
            self._A = (_one_per_line(self._A[0]), *self._A[1:])
        self._local = np.zeros((2 * m, 8), np.int64)  # the same per strip, one 64-byte row each
        self._stamps = np.zeros((2 * m, self.n_ids), np.int32)  # per strip: last phase (epoch) it held each cell
        self._memo = np.zeros((2 * m, self.n_ids), np.int32)  # per strip: ±epoch, shared test's answer
        self._epoch = 0  # phases run so far
        self._sync_state = np.zeros(2 + max(self._workers, 6), np.int64)  # barrier count, generation; counters
        self._clock = np.zeros(4, np.int64)  # cycles: mark, wait, attempts, all (summed over worker threads)
        self.record_strips = False  # True: keep each strip's CPU time per phase (see predicted_speedup)
        # CPUs to pin the worker threads to (worker w on pin_cpus[w % len]); None: the OS places them
        self.pin_cpus = None
        self.spin_seconds = SPIN_SECONDS  # barrier spin before the futex sleep
        self._strip_ns = []

    def stats(self) -> dict:
        a, c, acc, ref, sh = (int(x) for x in self.counters)
        out = {"attempts": a, "candidates": c, "accepted": acc, "refused_deletions": ref,
               "acceptance": acc / c if c else float("nan"), "mcs": self.mcs_done, "refused_shared": sh}
        out["threads"] = self.threads
        out["strips"] = 2 * self.m
        return out

    def step(self, mcs: float = 1.0) -> dict:
        """Advance by ``mcs`` MCS: rounds of ``1/rounds_per_mcs`` MCS (the last one shorter). The rounds' cut
        offsets and colour orders are drawn first (from the sampler's stream); then each worker thread runs all
        the rounds in one compiled call, meeting the others at a barrier twice per colour phase."""
        f = 1.0 / self.rounds_per_mcs
        fracs, left = [], float(mcs)
        while left > 1e-12:
            fracs.append(min(f, left))
            left -= f
        offsets = np.empty(len(fracs), np.int64)
        colours = np.empty(len(fracs), np.int64)
        for i in range(len(fracs)):
            r = K.rng_next(self._rng)
            offsets[i] = int(r >> np.uint64(33)) % self.shape[0]
            colours[i] = int(r & np.uint64(1))
        workers = self._workers
        clock = np.zeros((workers, 8), np.int64)   # one 64-byte row per worker
        self._sync_state[:] = 0
        if self._epoch + 2 * len(fracs) >= 2**31 - 1:  # epochs are int32: start again from 0
            self._stamps[:] = 0
            self._memo[:] = 0
            self._epoch = 0
        args = (offsets, colours, np.asarray(fracs, np.float64), self._epoch, self._bounds0, self.shape[0], self._row_size,
                self.copy_range, self._ids, self._types, self._vol, self._G, self.pack.P, self._A, self._rngs,
                1.0 / self.temperature, self._stamps, self._memo, self._local, self._sync_state,
                int(self.spin_seconds * _sync.ticks_per_second()), clock,
                np.zeros((2 * len(fracs) if self.record_strips else 1, self.m, 2), np.int64))
        c0 = _sync.cycles_now()
        pin = None if self.pin_cpus is None else [int(c) for c in self.pin_cpus]  # a list or an array of ids
        if workers > 1:
            _worker(0, 1, *((offsets[:0],) + args[1:]))  # compiled here first (no rounds), not in two threads
        helpers = [threading.Thread(target=_pinned, args=(pin, w, workers, *args)) for w in range(1, workers)]
        for th in helpers:
            th.start()
        _pinned(pin, 0, workers, *args)  # worker 0 in the calling thread
        for th in helpers:
            th.join()
        if self.record_strips:
            self._strip_ns.append((args[-1], offsets, colours))
        self._clock[:3] += clock[:, :3].sum(axis=0)
        self._clock[3] += workers * (_sync.cycles_now() - c0)
        self._vol[0] = self.n_sites - int(self._vol[1:].sum())  # the medium's volume, not kept during a step
        self.counters[:] = self._local[:, :5].sum(axis=0)
        self._epoch += 2 * len(fracs)
        self.mcs_done += float(mcs)
        return self.stats()

    def profile(self) -> dict:
        """Where the worker threads' time went since construction, in seconds per MCS summed over the
        threads (by the CPU's tick counter, ``_sync.cycles``: wall-clock time, descheduled time included): ``mark``
        (stamping the cells of each strip), ``wait`` (at the two barriers per phase: load imbalance and
        wake-up), ``attempts`` (the copy attempts, with the shared-cell tests), ``other`` (the rest of the threads' time in
        ``step``: drawing the rounds, starting threads, Python), and ``wait_fraction`` = wait / total."""
        mcs = max(self.mcs_done, 1e-300)
        hz = _sync.ticks_per_second() or float("nan")
        mark, wait, att, tot = (float(x) / hz / mcs for x in self._clock)
        return {"mark": mark, "wait": wait, "attempts": att, "other": tot - mark - wait - att,
                "total": tot, "wait_fraction": wait / tot if tot > 0 else float("nan")}

    def predicted_speedup(self, workers: int = 2) -> dict:
        """The speed-up on ``workers`` threads that the load balance alone allows, from the per-strip thread
        CPU times recorded while ``record_strips`` was True (on any number of threads; a loaded machine
        stretches them little, unlike wall-clock times). Each phase is replayed as ``step`` schedules it:
        every strip stamped by its home worker, a barrier, each worker running its home strips and then
        taking the other workers' not yet started ones (the worker free first picks next), a barrier.
        Returns ``speedup`` = total work / Σ phase makespans, ``phases`` and ``work_s`` (the recorded CPU
        seconds). Barrier latency, thread start, cache and memory effects are not in it."""
        if not self._strip_ns:
            raise ValueError("predicted_speedup: no strip times recorded; set record_strips = True and step")
        n0, b0, m = self.shape[0], self._bounds0, self.m
        work = span = 0.0
        n_ph = 0
        for rec, offsets, colours in self._strip_ns:
            for i, ph in enumerate(rec.astype(np.float64)):
                off, first = offsets[i // 2], colours[i // 2] if i % 2 == 0 else 1 - colours[i // 2]
                js = first + 2 * np.arange(m)
                home = ((b0[js] + off + (b0[js + 1] - b0[js]) // 2) % n0) * workers // n0
                lists = [list(np.flatnonzero(home == w)) for w in range(workers)]
                stamp = max(ph[lst, 0].sum() for lst in lists)
                free, nxt, active = np.zeros(workers), [0] * workers, set(range(workers))
                while active:
                    w = min(active, key=lambda v: free[v])
                    for v in range(workers):
                        o = (w + v) % workers
                        if nxt[o] < len(lists[o]):
                            free[w] += ph[lists[o][nxt[o]], 1]
                            nxt[o] += 1
                            break
                    else:
                        active.discard(w)
                work += ph.sum()
                span += stamp + free.max()
                n_ph += 1
        return {"speedup": float(work / span) if span > 0 else float("nan"), "phases": n_ph,
                "work_s": float(work * 1e-9)}

    def attempts(self, n: int) -> None:
        """``n`` attempts in expectation (``n / N`` MCS)."""
        self.step(int(n) / self.n_sites)


def run_checkerboard(state: CellState, hamiltonian, mcs: float, *, seed: int, threads: int = 1, **kwargs):
    """Run :class:`CheckerboardSampler` for ``mcs`` MCS; returns ``(final_state, stats)``."""
    s = CheckerboardSampler(state, hamiltonian, seed=seed, threads=threads, **kwargs)
    s.step(mcs)
    return s.state, s.stats()

