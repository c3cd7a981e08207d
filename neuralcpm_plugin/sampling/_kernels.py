"""Compiled (numba) building blocks of the exact sequential Metropolis sampler.

Everything here works on *flat* lattices: a state is ``ids`` (int32, shape ``(N,)``, row-major over the
lattice shape), ``types`` (int32, ``(C,)``, type per id) and ``vol`` (int64, ``(C,)``, sites per id, kept
incrementally). Geometry enters only through neighbour tables (int32 ``(N, K)``, flat site index of each
neighbour, ``-1`` outside a non-periodic lattice), so the same kernels serve 2-D and 3-D, periodic or not.

Analytic parameters are packed into one tuple ``P`` (see :func:`pack_params` in ``exact.py``)::

    P = (has_contact, cnb, Jn,                # contact: table (N, Kn), per-column J (Kn, T1, T1)
         has_volume, lam, lamV,               # volume: Σλ_k and Σλ_k·V*_k per type (T1,)
         has_ext, ext,                        # external: Σ μ_k(t)·φ_k(i), (T1, N)
         has_surface, snb, slam, starget,     # surface: table (N, Ks), λ and S* per type (T1,)
         has_dm, dm_mode, dm_vec, dm_band, dm_strength, shape, coords, periodic)  # directed motion

and the mutable per-cell state into ``A = (surf, cm_ref, cm_sum, head, nxt, prv)`` (surface per id; for
directed motion: per id the reference site = its smallest flat site index, the sum of the minimal-image
displacements of its sites from it, and a doubly linked list of its sites so that a change of reference
site costs O(V)).

Compiled neural terms travel in a second tuple ``NN`` (built by ``exact.neural_pack``)::

    NN = (flags int64 [2], scales float64 [2],   # flags: a local NH / a pooled NH is present; their scales
          Wl, Sl,                                # local NH weights and per-lattice caches (_local_nh_numba)
          Wp, Sp, Pp, PSp)                       # pooled NH: feature weights, caches, MLP weights, Z cache

(dummies of the same types when absent).  Their ΔH is added to the analytic one inside :func:`sweep`; an
accepted copy updates their caches (:func:`neural_accept`) before the lattice is written.

Random numbers: xoshiro256** (Blackman & Vigna) with a 4-word uint64 state array; seeded in Python through
splitmix64, so a run is a pure function of its seed.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ..hamiltonian._local_nh_numba import nh_accept, nh_delta, pooled_accept, pooled_delta

_TWO53 = 1.0 / 9007199254740992.0


# ----------------------------------------------------------------------------------------------------------
# random numbers
# ----------------------------------------------------------------------------------------------------------
def seed_state(seed: int) -> np.ndarray:
    """xoshiro256** state (4 × uint64) from an integer seed via splitmix64 (pure Python, deterministic)."""
    mask = (1 << 64) - 1
    x = int(seed) & mask
    out = []
    for _ in range(4):
        x = (x + 0x9E3779B97F4A7C15) & mask
        z = x
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        out.append(z ^ (z >> 31))
    if not any(out):  # the all-zero state is forbidden
        out[0] = 1
    return np.array(out, dtype=np.uint64)


@njit(cache=True, inline="always")
def _rotl(x, k):
    return (x << np.uint64(k)) | (x >> np.uint64(64 - k))


@njit(cache=True, inline="always")
def rng_next(s):
    """Next 64-bit output of xoshiro256** (state ``s`` updated in place)."""
    s0 = s[0]
    s1 = s[1]
    s2 = s[2]
    s3 = s[3]
    result = _rotl(s1 * np.uint64(5), 7) * np.uint64(9)
    t = s1 << np.uint64(17)
    s2 ^= s0
    s3 ^= s1
    s1 ^= s2
    s0 ^= s3
    s2 ^= t
    s3 = _rotl(s3, 45)
    s[0] = s0
    s[1] = s1
    s[2] = s2
    s[3] = s3
    return result


@njit(cache=True, inline="always")
def _below(r32, n):
    """Map a 32-bit uniform integer to ``0..n-1`` (Lemire's multiply-shift; n < 2**32)."""
    return np.int64((r32 * np.uint64(n)) >> np.uint64(32))


@njit(cache=True, inline="always")
def rng_uniform(s):
    """Uniform float64 in [0, 1)."""
    return np.float64(rng_next(s) >> np.uint64(11)) * _TWO53


@njit(cache=True)
def rng_uniform_many(s, n):
    out = np.empty(n, np.float64)
    for i in range(n):
        out[i] = rng_uniform(s)
    return out


@njit(cache=True)
def rng_below_many(s, n, k):
    out = np.empty(n, np.int64)
    for i in range(n):
        out[i] = _below(rng_next(s) >> np.uint64(32), k)
    return out


# ----------------------------------------------------------------------------------------------------------
# directed motion helpers (minimal-image displacements on the torus)
# ----------------------------------------------------------------------------------------------------------
@njit(cache=True, inline="always")
def _min_image(d, n, periodic):
    if periodic:
        h = n / 2.0
        if d > h:
            d -= n
        elif d < -h:
            d += n
    return d


@njit(cache=True)
def _dm_direction(t, cx, P):
    """Direction vector (per lattice axis, length ndim) of type ``t`` for a cell whose centre has coordinate
    ``cx`` along its band axis (ignored for constant directions)."""
    dm_mode = P[13]
    dm_vec = P[14]
    dm_band = P[15]
    shape = P[17]
    nd = dm_vec.shape[1]
    out = np.zeros(nd, np.float64)
    mode = dm_mode[t]
    if mode == 1:  # constant
        for a in range(nd):
            out[a] = dm_vec[t, a]
    elif mode == 2 or mode == 3:  # band: inward (2) / outward (3)
        ax = int(dm_band[t, 0])
        size = shape[ax]
        lo = dm_band[t, 1] * size
        hi = dm_band[t, 2] * size
        mid = size / 2.0
        sgn = 0.0
        if mode == 2:  # pushed towards the band from outside it
            if cx < lo or cx > hi:
                sgn = 1.0 if mid - cx > 0 else (-1.0 if mid - cx < 0 else 0.0)
        else:  # pushed away from the middle while inside the band
            if cx > lo and cx < hi:
                sgn = 1.0 if cx - mid > 0 else (-1.0 if cx - mid < 0 else 0.0)
        out[ax] = sgn
    return out


@njit(cache=True)
def _cell_centre_rel(c, vol, A):
    """Centre of mass of cell ``c`` relative to its reference site (length ndim)."""
    cm_sum = A[2]
    nd = cm_sum.shape[1]
    out = np.zeros(nd, np.float64)
    v = vol[c]
    if v > 0:
        for a in range(nd):
            out[a] = cm_sum[c, a] / v
    return out


@njit(cache=True)
def _recompute_cell(c, A, P):
    """Reference site := the cell's smallest flat index; displacement sum recomputed over its members."""
    cm_ref = A[1]
    cm_sum = A[2]
    head = A[3]
    nxt = A[4]
    coords = P[18]
    shape = P[17]
    periodic = P[19]
    nd = coords.shape[1]
    r = -1
    i = head[c]
    while i >= 0:
        if r < 0 or i < r:
            r = i
        i = nxt[i]
    cm_ref[c] = max(r, 0)
    for a in range(nd):
        cm_sum[c, a] = 0.0
    i = head[c]
    while i >= 0:
        for a in range(nd):
            cm_sum[c, a] += _min_image(np.float64(coords[i, a] - coords[r, a]), shape[a], periodic)
        i = nxt[i]


@njit(cache=True)
def dm_init(ids, n_ids, P, A):
    """Build the member lists (ids >= 1), reference sites and displacement sums for directed motion."""
    head = A[3]
    nxt = A[4]
    prv = A[5]
    for c in range(n_ids):
        head[c] = -1
    for i in range(ids.shape[0] - 1, -1, -1):
        c = ids[i]
        nxt[i] = -1
        prv[i] = -1
        if c == 0:
            continue
        h = head[c]
        nxt[i] = h
        if h >= 0:
            prv[h] = i
        head[c] = i
    for c in range(1, n_ids):
        if head[c] >= 0:
            _recompute_cell(c, A, P)


# ----------------------------------------------------------------------------------------------------------
# ΔH of one copy attempt
# ----------------------------------------------------------------------------------------------------------
@njit(cache=True, inline="always")
def delta_analytic(x, new, ids, types, vol, P, A):
    """ΔH of copying cell ``new`` into flat site ``x`` (its current id is overwritten), analytic terms only.

    Deletion is not checked here (the caller refuses it). ``new == ids[x]`` gives 0.
    """
    old = ids[x]
    if old == new:
        return 0.0
    to = types[old]
    tn = types[new]
    dh = 0.0
    if P[0]:  # contact
        cnb = P[1]
        Jn = P[2]
        for j in range(cnb.shape[1]):
            y = cnb[x, j]
            if y < 0:
                continue
            s = ids[y]
            ts = types[s]
            if s != new:
                dh += Jn[j, tn, ts]
            if s != old:
                dh -= Jn[j, to, ts]
    if P[3]:  # volume: λ((V∓1−V*)² − (V−V*)²) summed over volume terms
        lam = P[4]
        lamv = P[5]
        if old != 0:
            dh += lam[to] * (1.0 - 2.0 * vol[old]) + 2.0 * lamv[to]
        if new != 0:
            dh += lam[tn] * (1.0 + 2.0 * vol[new]) - 2.0 * lamv[tn]
    if P[6]:  # external potential
        ext = P[7]
        dh += ext[tn, x] - ext[to, x]
    if P[8]:  # surface: S(c) = # (site in c, neighbour not in c) pairs
        snb = P[9]
        slam = P[10]
        star = P[11]
        surf = A[0]
        n_old = 0
        n_new = 0
        n_valid = 0
        for j in range(snb.shape[1]):
            y = snb[x, j]
            if y < 0:
                continue
            n_valid += 1
            s = ids[y]
            if s == old:
                n_old += 1
            elif s == new:
                n_new += 1
        if old != 0 and slam[to] != 0.0:
            d = n_old - (n_valid - n_old)
            a = surf[old] - star[to]
            dh += slam[to] * ((a + d) * (a + d) - a * a)
        if new != 0 and slam[tn] != 0.0:
            d = (n_valid - n_new) - n_new
            a = surf[new] - star[tn]
            dh += slam[tn] * ((a + d) * (a + d) - a * a)
    if P[12]:  # directed motion: ΔH = −s·V_after·(c_after − c_before)·d̂ per changed cell
        dh += _dm_delta(x, old, new, types, vol, P, A)
    return dh


@njit(cache=True)
def _dm_delta(x, old, new, types, vol, P, A):
    """Morpheus DirectedMotion: Σ over the gaining and losing cell of −s·V·((C_after − C_before)·d̂),
    V = volume before the copy, d̂ evaluated at the current centre (see ``analytic.DirectedMotion``)."""
    strength = P[16]
    coords = P[18]
    shape = P[17]
    periodic = P[19]
    cm_ref = A[1]
    cm_sum = A[2]
    nd = coords.shape[1]
    dh = 0.0
    for k in range(2):
        c = new if k == 0 else old
        if c == 0:
            continue
        t = types[c]
        st = strength[t]
        if t == 0 or st == 0.0 or P[13][t] == 0:
            continue
        v = vol[c]
        if k == 1 and v <= 1:
            continue
        r = cm_ref[c]
        # absolute (unwrapped) centre, computed as Σ positions / V like the numpy reference
        cen = np.zeros(nd, np.float64)
        for a in range(nd):
            cen[a] = (coords[r, a] * v + cm_sum[c, a]) / v
        band_ax = 0
        if P[13][t] >= 2:
            band_ax = int(P[15][t, 0])
        cb = cen[band_ax]
        if periodic:
            cb = cb % shape[band_ax]
        d = _dm_direction(t, cb, P)
        proj = 0.0
        for a in range(nd):
            xi = coords[r, a] + _min_image(np.float64(coords[x, a] - coords[r, a]), shape[a], periodic)
            if k == 0:
                disp = (xi - cen[a]) / (v + 1)
            else:
                disp = (cen[a] - xi) / (v - 1)
            proj += disp * d[a]
        dh -= st * v * proj
    return dh


# ----------------------------------------------------------------------------------------------------------
# applying a copy (incremental bookkeeping)
# ----------------------------------------------------------------------------------------------------------
@njit(cache=True, inline="always")
def surface_change(x, old, new, ids, snb):
    """Changes of the surfaces of ``old`` and ``new`` (unlike surface-neighbour pairs) when site ``x`` passes
    from cell ``old`` to cell ``new``: ``(d_old, d_new)``."""
    n_old = 0
    n_new = 0
    n_valid = 0
    for j in range(snb.shape[1]):
        y = snb[x, j]
        if y < 0:
            continue
        n_valid += 1
        s = ids[y]
        if s == old:
            n_old += 1
        elif s == new:
            n_new += 1
    return n_old - (n_valid - n_old), (n_valid - n_new) - n_new


@njit(cache=True, inline="always")
def apply_copy(x, new, ids, vol, P, A, track_boundary, bnb, bflag, blist, bpos, bcount):
    """Set ``ids[x] = new`` and update volumes, surfaces, centre sums and (optionally) the boundary set."""
    old = ids[x]
    if P[8]:
        d_old, d_new = surface_change(x, old, new, ids, P[9])
        surf = A[0]
        surf[old] += d_old
        surf[new] += d_new
    ids[x] = new
    vol[old] -= 1
    vol[new] += 1
    if P[12]:
        _dm_move(x, old, new, P, A)
    if track_boundary:  # bflag = number of unlike copy neighbours, kept incrementally
        c = 0
        for j in range(bnb.shape[1]):
            y = bnb[x, j]
            if y < 0:
                continue
            idy = ids[y]
            if idy != new:
                c += 1
            if y == x:
                continue
            if idy == old:
                bflag[y] += 1
                if bflag[y] == 1:
                    _bset_add(y, blist, bpos, bcount)
            elif idy == new:
                bflag[y] -= 1
                if bflag[y] == 0:
                    _bset_remove(y, blist, bpos, bcount)
        bflag[x] = c
        if c > 0 and bpos[x] < 0:
            _bset_add(x, blist, bpos, bcount)
        elif c == 0 and bpos[x] >= 0:
            _bset_remove(x, blist, bpos, bcount)


@njit(cache=True)
def _dm_move(x, old, new, P, A):
    """Directed-motion bookkeeping after site ``x`` moved from cell ``old`` to ``new`` (ids already set)."""
    coords = P[18]
    shape = P[17]
    periodic = P[19]
    cm_ref = A[1]
    cm_sum = A[2]
    head = A[3]
    nxt = A[4]
    prv = A[5]
    nd = coords.shape[1]
    if old != 0:  # unlink x
        p = prv[x]
        q = nxt[x]
        if p >= 0:
            nxt[p] = q
        else:
            head[old] = q
        if q >= 0:
            prv[q] = p
        if cm_ref[old] == x:
            if head[old] >= 0:
                _recompute_cell(old, A, P)
        else:
            r = cm_ref[old]
            for a in range(nd):
                cm_sum[old, a] -= _min_image(np.float64(coords[x, a] - coords[r, a]), shape[a], periodic)
    prv[x] = -1
    nxt[x] = -1
    if new != 0:  # link x at the head
        h = head[new]
        nxt[x] = h
        if h >= 0:
            prv[h] = x
        head[new] = x
        if h < 0 or x < cm_ref[new]:
            _recompute_cell(new, A, P)
        else:
            r = cm_ref[new]
            for a in range(nd):
                cm_sum[new, a] += _min_image(np.float64(coords[x, a] - coords[r, a]), shape[a], periodic)


@njit(cache=True, inline="always")
def _bset_add(y, blist, bpos, bcount):
    bpos[y] = bcount[0]
    blist[bcount[0]] = y
    bcount[0] += 1


@njit(cache=True, inline="always")
def _bset_remove(y, blist, bpos, bcount):
    k = bpos[y]
    last = blist[bcount[0] - 1]
    blist[k] = last
    bpos[last] = k
    bpos[y] = -1
    bcount[0] -= 1


@njit(cache=True)
def init_boundary(ids, bnb, bflag, blist, bpos, bcount):
    """Boundary set of the copy neighbourhood: ``bflag[y]`` = number of neighbours of y with another id,
    ``blist[:bcount[0]]`` the sites with ``bflag > 0`` (``bpos`` their positions, -1 for others)."""
    bcount[0] = 0
    for y in range(ids.shape[0]):
        c = 0
        for j in range(bnb.shape[1]):
            z = bnb[y, j]
            if z >= 0 and ids[z] != ids[y]:
                c += 1
        bflag[y] = c
        bpos[y] = -1
        if c > 0:
            _bset_add(y, blist, bpos, bcount)


@njit(cache=True)
def neural_delta(x, new, ids, types, NN):
    """ΔH of the compiled neural terms (scales included)."""
    dh = 0.0
    if NN[0][0]:
        dh += NN[1][0] * nh_delta(x, new, ids, types, NN[2], NN[3])
    if NN[0][1]:
        dh += NN[1][1] * pooled_delta(x, new, ids, types, NN[4], NN[5], NN[6], NN[7])
    return dh


@njit(cache=True)
def neural_accept(x, new, ids, types, NN):
    """Update the compiled neural terms' caches for an accepted copy (``ids`` still the before state)."""
    if NN[0][0]:
        nh_accept(x, new, ids, types, NN[2], NN[3])
    if NN[0][1]:
        pooled_accept(x, new, ids, types, NN[4], NN[5], NN[6], NN[7])


# ----------------------------------------------------------------------------------------------------------
# the sweep
# ----------------------------------------------------------------------------------------------------------
@njit(cache=True)
def sweep(ids, types, vol, P, A, nb, nvalid, rng, n_attempts, inv_t, proposal, stop_at_candidate,
          bflag, blist, bpos, bcount, counters, NN=None):
    """Run up to ``n_attempts`` copy attempts.

    proposal 0 (classic): source s uniform over the lattice, target t uniform over s's valid copy neighbours;
    same cell → the attempt ends (it counts); else t takes σ(s). proposal 1 (boundary): site x uniform over
    the current boundary set, it takes the id of a neighbour drawn uniformly among x's neighbours of another
    cell. Deleting a cell (volume 1 → 0) is refused. Acceptance min(1, exp(−ΔH·inv_t)).

    With ``stop_at_candidate`` the sweep stops *before* deciding the first candidate copy (one that passed
    the same-cell and deletion checks) and returns it, so that Python can add a non-compiled ΔH; the
    caller then calls :func:`decide`. ``NN``: the compiled neural terms (module docstring); their ΔH is
    part of ``dh_analytic`` (the compiled ΔH). Returns ``(attempts_done, pending, site, new_id, dh_analytic)``;
    ``pending`` is 1 when a candidate is waiting (its attempt is counted in ``attempts_done``).

    counters (int64, length 4): attempts, candidates (ΔH evaluated), accepted, refused deletions.
    """
    n = ids.shape[0]
    track = proposal == 1
    done = 0
    while done < n_attempts:
        done += 1
        r = rng_next(rng)
        if proposal == 0:
            s = _below(r >> np.uint64(32), n)
            k = nvalid[s]
            if k == 0:
                continue
            t = nb[s, _below(r & np.uint64(0xFFFFFFFF), k)]
            new = ids[s]
            x = t
        else:
            nbnd = bcount[0]
            if nbnd == 0:
                continue
            x = blist[_below(r >> np.uint64(32), nbnd)]
            cx = ids[x]
            m = bflag[x]
            pick = _below(r & np.uint64(0xFFFFFFFF), m)
            new = cx
            for j in range(nvalid[x]):
                idy = ids[nb[x, j]]
                if idy != cx:
                    if pick == 0:
                        new = idy
                        break
                    pick -= 1
        old = ids[x]
        if old == new:
            continue
        if old != 0 and vol[old] <= 1:
            counters[3] += 1
            continue
        counters[1] += 1
        dh = delta_analytic(x, new, ids, types, vol, P, A)
        if NN is not None:  # noqa: SIM102 (nested: numba prunes the branch when NN is None)
            if NN[0][0] or NN[0][1]:
                dh += neural_delta(x, new, ids, types, NN)
        if stop_at_candidate:
            counters[0] += done
            return done, 1, x, new, dh
        if dh <= 0.0 or rng_uniform(rng) < np.exp(-dh * inv_t):
            if NN is not None:  # noqa: SIM102
                if NN[0][0] or NN[0][1]:
                    neural_accept(x, new, ids, types, NN)
            apply_copy(x, new, ids, vol, P, A, track, nb, bflag, blist, bpos, bcount)
            counters[2] += 1
    counters[0] += done
    return done, 0, -1, -1, 0.0


@njit(cache=True)
def decide(x, new, dh, ids, vol, P, A, rng, inv_t, proposal, nb, bflag, blist, bpos, bcount, counters,
           types=None, NN=None):
    """Metropolis decision for a candidate returned by :func:`sweep` (total ΔH ``dh``); applies it if
    accepted (updating the compiled neural terms' caches). Returns 1 if accepted."""
    if dh <= 0.0 or rng_uniform(rng) < np.exp(-dh * inv_t):
        if NN is not None:  # noqa: SIM102
            if NN[0][0] or NN[0][1]:
                neural_accept(x, new, ids, types, NN)
        apply_copy(x, new, ids, vol, P, A, proposal == 1, nb, bflag, blist, bpos, bcount)
        counters[2] += 1
        return 1
    return 0


@njit(cache=True)
def surfaces_of(ids, snb, n_ids):
    """Surface per id: number of (site of the id, neighbour of another id) pairs."""
    out = np.zeros(n_ids, np.int64)
    for i in range(ids.shape[0]):
        c = ids[i]
        for j in range(snb.shape[1]):
            y = snb[i, j]
            if y >= 0 and ids[y] != c:
                out[c] += 1
    return out
