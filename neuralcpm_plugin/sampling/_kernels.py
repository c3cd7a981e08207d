"""Compiled (numba) building blocks of the exact sequential Metropolis sampler.

Everything here works on *flat* lattices: a state is ``ids`` (int32, or uint16 where the ids fit:
``ExactSampler(narrow_ids=True)``; shape ``(N,)``, row-major over the lattice shape), ``types`` (int32 or uint8,
``(C,)``, type per id; numba compiles one specialisation per dtype, the same values) and ``vol`` (int64,
``(C,)``, sites per id, kept incrementally).

Geometry (no per-site tables): neighbours are computed by index arithmetic from a tuple built by
``exact.geometry``::

    G = (shape, periodic, offs, fd, M1, M2)

``shape`` a tuple of ints (2-D or 3-D: the tuple's length is a compile-time constant, so every loop over the
axes is unrolled), ``offs`` (K, ndim) int64 the copy neighbourhood's offsets (``lattice.neighbour_offsets``
order) and ``fd`` (K,) int64 the same offsets as flat index deltas (arrays, not tuples: numba indexes a
tuple at a run-time position through a jump table). A site whose coordinates lie at least ``M1``
from every edge (``M1`` = the largest of the copy, contact and surface ranges) has all its neighbours at
``x + fd[j]`` — no wrap, no boundary check (the *fast* path, true for all but a thin frame of sites); other
sites take the *slow* path: coordinates, per-axis periodic wrap (``%``, so tiny lattices work) or ``-1``
outside a non-periodic lattice, and a neighbour that wraps onto the site itself is dropped by the energy
terms (as ``exact.neighbour_table(..., drop_self=True)``). A classic source ``s`` at least ``M2 = copy
range + M1`` from every edge has a fast target. The neighbour order is the offset order in both paths, so
sums and picks are identical to table-based code.

Analytic terms: ``P = (C, V, E, S, D)``, each ``None`` when the Hamiltonian has no such term. Each term's
ΔH and bookkeeping is an ``overload`` that picks its implementation from the argument's type at compile time
(``None`` → nothing) and is inlined, so every term set gets its own specialised kernel with no flag tests,
calls or reference counting in the loop::

    C = (coffs (Kn, nd), cfd (Kn,), J (T1, T1+1), Jn (Kn, T1, T1+1) or None,  # contact; Jn per column when
         exact or None)                                                   # terms of several orders add up;
                                                                          # column T1 is 0.0 (no branch);
                                                                          # exact: sums are exact in any order
    V = (lam, lamv)                    # volume: Σλ_k and Σλ_k·V*_k per type (T1,)
    E = ext                            # external: Σ μ_k(t)·φ_k(i), (T1, N)
    S = (soffs, sfd, slam, starget)    # surface: neighbourhood, λ and S* per type (T1,)
    D = (dm_mode, dm_vec, dm_band, dm_strength, shape_f, coords, periodic)  # directed motion

and the mutable per-cell state ``A = (surf, cm_ref, cm_sum, head, nxt, prv)`` (surface per id; for
directed motion: per id the reference site = its smallest flat site index, the sum of the minimal-image
displacements of its sites from it, and a doubly linked list of its sites so that a change of reference
site costs O(V)).

Proposal: ``B = None`` for the classic proposal, ``B = (bflag, frame)`` for the boundary proposal
(``bflag[y]`` = number of copy neighbours of ``y`` with another id, kept incrementally; ``frame[y]`` = 1 for
the sites on the slow neighbour path, fixed; a boundary site is drawn by rejection from uniform sites; the
boundary set is empty exactly when one id fills the lattice, as the copy neighbourhood's unit offsets connect
every site to every other, so its size is not kept).

Compiled neural terms travel in a tuple ``NN`` (built by ``exact.neural_pack``)::

    NN = (flags int64 [2], scales float64 [2],   # flags: a local NH / a pooled NH is present; their scales
          Wl, Sl,                                # local NH weights and per-lattice caches (_local_nh_numba)
          Wp, Sp, Pp, PSp)                       # pooled NH: feature weights, caches, MLP weights, Z cache

or ``None`` (pruned). Their ΔH is added to the analytic one inside :func:`sweep`; an accepted copy updates
their caches (:func:`neural_accept`) before the lattice is written.

One path: :func:`sweep` (the loop), :func:`decide` (the Metropolis decision for a candidate that Python
completed with a non-compiled ΔH) and :func:`delta_analytic` (one ΔH, for tests and ``ExactSampler.delta``)
all use the same :func:`delta_core` and :func:`apply_copy`.

Random numbers: xoshiro256** (Blackman & Vigna) with a 4-word uint64 state array (kept in registers inside
:func:`sweep`); seeded in Python through splitmix64, so a run is a pure function of its seed. One 64-bit draw
gives (source, neighbour) of an attempt: high 32 bits → site, low 32 bits → neighbour, each by Lemire's
multiply-shift; one more draw → the Metropolis uniform (53 bits) when ΔH > 0.
"""

from __future__ import annotations

import types

import numpy as np
from llvmlite import ir
from numba import njit
from numba.core import cgutils
from numba.core import types as nb_types
from numba.extending import intrinsic, overload

from ..hamiltonian._local_nh_numba import nh_accept, nh_delta, pooled_accept, pooled_delta

_TWO53 = 1.0 / 9007199254740992.0

# Options of the compiled entry points (sweep, decide, delta_analytic; the checkerboard's strip loop): every
# helper they call on the hot path is inlined into them, so these options apply to all of it.
# error_model="numpy": integer division by zero is not checked (divisors are lattice sizes ≥ 1), which keeps
# raise paths out of the loop; _nrt=False: no reference counting of the arrays (the entry points allocate
# nothing; the directed-motion and neural helpers they call are ordinary functions that keep their own).
# Without these, numba emits atomic incref/decref pairs per candidate that its pruning pass cannot remove.
_HOT = {"cache": True, "error_model": "numpy", "_nrt": False}
_LO32 = np.uint64(0xFFFFFFFF)
_PREFETCH_SITES = 8192


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


@intrinsic
def prefetch(typingctx, arr, idx):
    """Hint the cache line of ``arr[idx]`` (``idx`` unsigned, may be out of range: a prefetch never faults)."""
    sig = nb_types.void(arr, idx)

    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        ptr = builder.bitcast(builder.gep(ary.data, [args[1]]), cgutils.voidptr_t)
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [ptr.type, i32, i32, i32])
        name = "llvm.prefetch.p0" if getattr(ptr.type, "is_opaque", False) else "llvm.prefetch.p0i8"
        fn = cgutils.get_or_insert_function(builder.module, fnty, name)
        builder.call(fn, [ptr, i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True, inline="always")
def _prefetch_site(x, ids, G, bflag, frame):
    """Prefetch what a boundary attempt at site ``x`` reads first: its boundary count and frame byte and the
    lines of ``ids`` at its first, own and last copy neighbour (the rows above, at and below it in 2-D). The
    boundary proposal's reads are random over the lattice; on large lattices (1000²) they miss the caches."""
    fd = G[3]
    prefetch(bflag, x)
    prefetch(frame, x)
    prefetch(ids, _u(x + fd[0]))
    prefetch(ids, x)
    prefetch(ids, _u(x + fd[len(fd) - 1]))


@njit(cache=True, inline="always")
def _u(i):
    """An index known to be ≥ 0 as unsigned: numba then emits no negative-index wraparound (a shift, an and
    and an add per access, and a register for the extent) — for the hot loops' neighbour reads."""
    return np.uint64(i)


@njit(cache=True, inline="always")
def _rotl(x, k):
    return (x << np.uint64(k)) | (x >> np.uint64(64 - k))


@njit(cache=True, inline="always")
def _xo(s0, s1, s2, s3):
    """One xoshiro256** step on a state held in four scalars: ``(output, s0, s1, s2, s3)``."""
    result = _rotl(s1 * np.uint64(5), 7) * np.uint64(9)
    t = s1 << np.uint64(17)
    s2 ^= s0
    s3 ^= s1
    s1 ^= s2
    s0 ^= s3
    s2 ^= t
    s3 = _rotl(s3, 45)
    return result, s0, s1, s2, s3


@njit(cache=True, inline="always")
def rng_next(s):
    """Next 64-bit output of xoshiro256** (state array ``s`` updated in place)."""
    r, s[0], s[1], s[2], s[3] = _xo(s[0], s[1], s[2], s[3])
    return r


@njit(cache=True, inline="always")
def _below(r32, n):
    """Map a 32-bit uniform integer to ``0..n-1`` (Lemire's multiply-shift; n < 2**32)."""
    return np.int64((r32 * np.uint64(n)) >> np.uint64(32))


@njit(cache=True, inline="always")
def _unit(r):
    """Uniform float64 in [0, 1) from a 64-bit draw (its top 53 bits)."""
    return np.float64(r >> np.uint64(11)) * _TWO53


@njit(cache=True, inline="always")
def rng_uniform(s):
    """Uniform float64 in [0, 1)."""
    return _unit(rng_next(s))


# The Metropolis test u < exp(−a) (a = ΔH/T > 0; u = r·2⁻⁵³ for the 53-bit integer r of the draw) without exp
# for most candidates: for a in [k/16, (k+1)/16), exp(−a) lies in (exp(−(k+1)/16), exp(−k/16)]. With these
# bounds widened by 1e-12 (relative) and scaled to integers, r < _EXP_LO[k] accepts and r ≥ _EXP_LO[k] +
# _EXP_WIDTH[k] rejects without calling exp; r inside the band (≈ 6 % of exp(−a) wide: one unsigned compare,
# a predictable branch) and a ≥ _EXP_N/16 (the last entry: an empty "accept" range and a band covering all r)
# compare u with exp(−a) itself. The margins are far wider than the error of exp (≤ 1 ulp) and of the
# tabulated bounds, so the outcome is that of u < exp(−a) exactly: the same decisions, the same random stream.
_EXP_N = 512


def _exp_table(n):
    k = np.arange(n, dtype=np.float64)
    lo = np.floor(np.exp(-(k + 1.0) / 16.0) * (1.0 - 1e-12) * 2.0 ** 53)
    hi = np.minimum(np.ceil(np.exp(-k / 16.0) * (1.0 + 1e-12) * 2.0 ** 53), 2.0 ** 53)
    lo_i = np.append(lo.astype(np.uint64), np.uint64(0))
    width = np.append((hi - lo).astype(np.uint64), np.uint64(2 ** 53))
    return lo_i, width


_EXP_LO, _EXP_WIDTH = _exp_table(_EXP_N)


@njit(cache=True, inline="always")
def below_exp(r53, a):
    """``r53·2⁻⁵³ < exp(−a)`` for a 53-bit integer ``r53`` (uint64) and ``a > 0`` (see ``_EXP_LO``), mostly
    without exp."""
    k = np.int64(min(a * 16.0, np.float64(_EXP_N)))
    lo = _EXP_LO[k]
    if r53 - lo < _EXP_WIDTH[k]:  # unsigned: r53 in [lo, lo + width), the rare band
        return np.float64(r53) * _TWO53 < np.exp(-a)
    return r53 < lo


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
# geometry by index arithmetic
# ----------------------------------------------------------------------------------------------------------
def coords_of(x, shape):  # pragma: no cover - compiled form below
    """Coordinates (tuple) of flat site ``x`` on a lattice of ``shape`` (2-D or 3-D), compiled code only."""
    raise NotImplementedError("coords_of is for compiled code")


@overload(coords_of, inline="always")
def _coords_of_impl(x, shape):
    # unsigned divisions (x ≥ 0): no sign correction after each, and a cheaper divide instruction
    if shape.count == 2:
        def impl2(x, shape):
            a = np.int64(np.uint64(x) // np.uint64(shape[1]))
            return (a, x - a * shape[1])
        return impl2
    if shape.count == 3:
        def impl3(x, shape):
            q = np.int64(np.uint64(x) // np.uint64(shape[2]))
            a = np.int64(np.uint64(q) // np.uint64(shape[1]))
            return (a, q - a * shape[1], x - q * shape[2])
        return impl3
    return None


@njit(cache=True, inline="always")
def inside(c, shape, m):
    """True if coordinates ``c`` lie at least ``m`` sites from every edge (all neighbours within range ``m``
    are then ``x + flat delta``)."""
    for d in range(len(shape)):
        if c[d] < m or c[d] >= shape[d] - m:
            return False
    return True


@njit(cache=True, inline="always")
def nbr_slow(c, offs, j, shape, periodic):
    """Flat index of the site at offset ``offs[j]`` from coordinates ``c``: periodic wrap, or -1 outside."""
    flat = 0
    for d in range(len(shape)):
        n = shape[d]
        v = c[d] + offs[j, d]
        if v < 0:
            if not periodic:
                return -1
            v += n  # one period (no division), and `%` only where an offset is longer than the lattice
            if v < 0:
                v %= n
        elif v >= n:
            if not periodic:
                return -1
            v -= n
            if v >= n:
                v %= n
        flat = flat * n + v
    return flat


@njit(cache=True, inline="always")
def is_fast(x, G):
    """Whether site ``x`` is at least ``M1`` from every edge (fast neighbour path)."""
    shape = G[0]
    return inside(coords_of(x, shape), shape, G[4])


@njit(cache=True, inline="always")
def propose_classic(s, r32, G):
    """Target of a classic attempt from source ``s`` (uniform over its valid copy neighbours, in offset order,
    by the 32-bit draw ``r32``): ``(t, fast)``, ``t = -1`` when ``s`` has no valid neighbour. ``fast``: ``t``
    is at least ``M1`` from every edge."""
    shape = G[0]
    offs = G[2]
    fd = G[3]
    K = len(fd)
    c = coords_of(s, shape)
    if inside(c, shape, G[5]):
        return s + fd[_below(r32, K)], True
    if G[1]:
        t = nbr_slow(c, offs, _below(r32, K), shape, True)
        return t, is_fast(t, G)
    k = 0
    for j in range(K):
        if nbr_slow(c, offs, j, shape, False) >= 0:
            k += 1
    if k == 0:
        return -1, False
    pick = _below(r32, k)
    for j in range(K):
        y = nbr_slow(c, offs, j, shape, False)
        if y >= 0:
            if pick == 0:
                return y, is_fast(y, G)
            pick -= 1
    return -1, False


# ----------------------------------------------------------------------------------------------------------
# ΔH of one copy attempt, term by term (each accumulates into dh in the order of the original sum)
#
# Every helper on the hot path is inlined into the entry points (sweep, decide, delta_analytic, the
# checkerboard's strip loop), which are compiled with _HOT (no reference counting, no raise paths); the
# per-term overloads pick an implementation by type (absent term → nothing) and forward the tuple's members
# as plain array arguments.
# ----------------------------------------------------------------------------------------------------------
def _absent(x):
    """Compile-time test used by the overloads below: the term's tuple is ``None``."""
    return isinstance(x, nb_types.NoneType)


@njit(cache=True, inline="always")
def _contact_uniform(dh, x, fast, old, new, to, tn, ids, tp, G, coffs, cfd, J):
    """dh + Σ over the contact neighbours s of ``x``: J(new, s) [s ≠ new] − J(old, s) [s ≠ old]."""
    kn = len(cfd)
    if fast:
        # No data-dependent branch: whether a neighbour belongs to old / new is random, and a branch on it
        # mispredicts (x86 has no conditional move for doubles: "J[..] if s != new else 0.0" compiles to a
        # branch). An integer select of the column instead: the neighbour's type, or the zero column T1
        # (adding 0.0 leaves dh bit-identical to skipping the term).
        z = _u(J.shape[1] - 1)
        un = _u(tn)
        uo = _u(to)
        for k in range(kn):
            s = ids[_u(x + cfd[k])]
            ts = _u(tp[_u(s)])
            dh += J[un, ts if s != new else z]
            dh -= J[uo, ts if s != old else z]
        return dh
    shape = G[0]
    c = coords_of(x, shape)
    z = J.shape[1] - 1
    for k in range(kn):
        y = nbr_slow(c, coffs, k, shape, G[1])
        if y < 0 or y == x:  # (predictable: outside a non-periodic lattice, or a tiny periodic one)
            continue
        s = ids[y]
        ts = tp[s]
        dh += J[tn, ts if s != new else z]  # selects, as on the fast path
        dh -= J[to, ts if s != old else z]
    return dh


@njit(cache=True, inline="always")
def _contact_columns(dh, x, fast, old, new, to, tn, ids, tp, G, coffs, cfd, Jn):
    """As :func:`_contact_uniform` with one J per neighbour column (contact terms of several orders)."""
    if fast:  # branch-free, as in _contact_uniform (column T1 of Jn is 0.0)
        z = Jn.shape[2] - 1
        for k in range(len(cfd)):
            s = ids[x + cfd[k]]
            ts = tp[s]
            dh += Jn[k, tn, ts if s != new else z]
            dh -= Jn[k, to, ts if s != old else z]
        return dh
    shape = G[0]
    c = coords_of(x, shape)
    z = Jn.shape[2] - 1
    for k in range(len(cfd)):
        y = nbr_slow(c, coffs, k, shape, G[1])
        if y < 0 or y == x:
            continue
        s = ids[y]
        ts = tp[s]
        dh += Jn[k, tn, ts if s != new else z]
        dh -= Jn[k, to, ts if s != old else z]
    return dh


def _jval(Jn, k, a, b):  # pragma: no cover - compiled (overload)
    """``Jn[a, b]`` (one table, 2-D) or ``Jn[k, a, b]`` (one per neighbour column, 3-D)."""


@overload(_jval, inline="always")
def _jval_impl(Jn, k, a, b):
    if Jn.ndim == 2:
        return lambda Jn, k, a, b: Jn[a, b]
    return lambda Jn, k, a, b: Jn[_u(k), a, b]


@njit(cache=True, inline="always")
def _contact_pair_term(k, x, old, new, un, uo, z, ids, tp, cfd, Jn):
    """Neighbour ``k``'s contact term J(new, s)[s ≠ new] − J(old, s)[s ≠ old] (fast path, branch-free)."""
    s = ids[_u(x + cfd[k])]
    ts = _u(tp[_u(s)])
    return _jval(Jn, k, un, ts if s != new else z) - _jval(Jn, k, uo, ts if s != old else z)


def _contact_seq(dh, x, fast, old, new, to, tn, ids, tp, G, coffs, cfd, Jn):  # pragma: no cover - overload
    """The sequential contact sum for one table (2-D ``Jn``) or one per column (3-D)."""


@overload(_contact_seq, inline="always")
def _contact_seq_impl(dh, x, fast, old, new, to, tn, ids, tp, G, coffs, cfd, Jn):
    if Jn.ndim == 2:
        return lambda dh, x, fast, old, new, to, tn, ids, tp, G, coffs, cfd, Jn: _contact_uniform(
            dh, x, fast, old, new, to, tn, ids, tp, G, coffs, cfd, Jn)
    return lambda dh, x, fast, old, new, to, tn, ids, tp, G, coffs, cfd, Jn: _contact_columns(
        dh, x, fast, old, new, to, tn, ids, tp, G, coffs, cfd, Jn)


@njit(cache=True, inline="always")
def _contact_pairs(dh, x, fast, old, new, to, tn, ids, tp, G, coffs, cfd, Jn):
    """The contact ΔH when its sums are exact in any order (``exact.contact_sums_exact``): the per-neighbour
    terms are independent and are added in two interleaved accumulators, a dependency chain of ≈ Kn/2 + 1
    additions instead of 2·Kn (the sequential sum's). The value is the sequential one bit for bit: every
    partial sum of either order is exact. Sites off the fast path take the sequential sum. ``Jn``: one table
    (T1, T1+1) or one per neighbour column (Kn, T1, T1+1)."""
    if not fast:
        return _contact_seq(dh, x, fast, old, new, to, tn, ids, tp, G, coffs, cfd, Jn)
    kn = len(cfd)
    z = _u(Jn.shape[Jn.ndim - 1] - 1)
    un = _u(tn)
    uo = _u(to)
    a0 = 0.0
    a1 = 0.0
    if kn == 8:  # the 2-D Moore neighbourhood: a constant trip count, unrolled by the compiler
        for k in range(0, 8, 2):
            a0 += _contact_pair_term(k, x, old, new, un, uo, z, ids, tp, cfd, Jn)
            a1 += _contact_pair_term(k + 1, x, old, new, un, uo, z, ids, tp, cfd, Jn)
        return dh + (a0 + a1)
    k = 0
    while k + 1 < kn:
        a0 += _contact_pair_term(k, x, old, new, un, uo, z, ids, tp, cfd, Jn)
        a1 += _contact_pair_term(k + 1, x, old, new, un, uo, z, ids, tp, cfd, Jn)
        k += 2
    if k < kn:
        a0 += _contact_pair_term(k, x, old, new, un, uo, z, ids, tp, cfd, Jn)
    return dh + (a0 + a1)


def _contact_dh(dh, x, fast, old, new, to, tn, ids, tp, G, C):  # pragma: no cover - compiled (overload)
    """dh + the contact ΔH (``C`` = the contact tuple or None)."""


@overload(_contact_dh, inline="always")
def _contact_dh_impl(dh, x, fast, old, new, to, tn, ids, tp, G, C):
    if _absent(C):
        return lambda dh, x, fast, old, new, to, tn, ids, tp, G, C: dh
    exact = len(C) > 4 and not _absent(C[4])
    if exact and _absent(C[3]):
        return lambda dh, x, fast, old, new, to, tn, ids, tp, G, C: _contact_pairs(
            dh, x, fast, old, new, to, tn, ids, tp, G, C[0], C[1], C[2])
    if exact:
        return lambda dh, x, fast, old, new, to, tn, ids, tp, G, C: _contact_pairs(
            dh, x, fast, old, new, to, tn, ids, tp, G, C[0], C[1], C[3])
    if _absent(C[3]):
        return lambda dh, x, fast, old, new, to, tn, ids, tp, G, C: _contact_uniform(
            dh, x, fast, old, new, to, tn, ids, tp, G, C[0], C[1], C[2])
    return lambda dh, x, fast, old, new, to, tn, ids, tp, G, C: _contact_columns(
        dh, x, fast, old, new, to, tn, ids, tp, G, C[0], C[1], C[3])


@njit(cache=True, inline="always")
def _volume_sum(dh, old, new, to, tn, vol, lam, lamv):
    """dh + λ((V∓1−V*)² − (V−V*)²) summed over volume terms. The medium (id 0) has none: its term reads the
    row of type 0, whose λ and λ·V* are 0 (``exact.pack_params``), so it adds 0.0 — an integer select instead of
    a branch on whether the medium takes part (random on a boundary)."""
    io = _u(to if old != 0 else 0)
    i_n = _u(tn if new != 0 else 0)
    dh += lam[io] * (1.0 - 2.0 * vol[_u(old)]) + 2.0 * lamv[io]
    dh += lam[i_n] * (1.0 + 2.0 * vol[_u(new)]) - 2.0 * lamv[i_n]
    return dh


def _volume_dh(dh, old, new, to, tn, vol, V):  # pragma: no cover - compiled (overload)
    """dh + the volume ΔH (``V`` = the volume tuple or None)."""


@overload(_volume_dh, inline="always")
def _volume_dh_impl(dh, old, new, to, tn, vol, V):
    if _absent(V):
        return lambda dh, old, new, to, tn, vol, V: dh
    return lambda dh, old, new, to, tn, vol, V: _volume_sum(dh, old, new, to, tn, vol, V[0], V[1])


def _external_dh(dh, x, to, tn, E):  # pragma: no cover - compiled (overload)
    """dh + E[new type, x] − E[old type, x] (nothing when ``E`` is None)."""


@overload(_external_dh, inline="always")
def _external_dh_impl(dh, x, to, tn, E):
    if _absent(E):
        return lambda dh, x, to, tn, E: dh
    return lambda dh, x, to, tn, E: dh + (E[tn, x] - E[to, x])


@njit(cache=True, inline="always")
def surface_change(x, fast, old, new, ids, G, soffs, sfd):
    """Changes of the surfaces of ``old`` and ``new`` (unlike surface-neighbour pairs) when site ``x`` passes
    from cell ``old`` to cell ``new``: ``(d_old, d_new)`` (``soffs``, ``sfd``: the surface neighbourhood)."""
    n_old = 0
    n_new = 0
    n_valid = 0
    if fast:
        for j in range(len(sfd)):
            n_valid += 1
            s = ids[x + sfd[j]]
            if s == old:
                n_old += 1
            elif s == new:
                n_new += 1
    else:
        shape = G[0]
        c = coords_of(x, shape)
        for j in range(len(sfd)):
            y = nbr_slow(c, soffs, j, shape, G[1])
            if y < 0 or y == x:
                continue
            n_valid += 1
            s = ids[y]
            if s == old:
                n_old += 1
            elif s == new:
                n_new += 1
    return n_old - (n_valid - n_old), (n_valid - n_new) - n_new


@njit(cache=True, inline="always")
def _surface_sum(dh, x, fast, old, new, to, tn, ids, G, soffs, sfd, slam, star, surf):
    """S(c) = # (site in c, neighbour not in c) pairs; dh + ΔH of λ(S − S*)² for both cells."""
    d_old, d_new = surface_change(x, fast, old, new, ids, G, soffs, sfd)
    if old != 0 and slam[to] != 0.0:
        a = surf[old] - star[to]
        dh += slam[to] * ((a + d_old) * (a + d_old) - a * a)
    if new != 0 and slam[tn] != 0.0:
        a = surf[new] - star[tn]
        dh += slam[tn] * ((a + d_new) * (a + d_new) - a * a)
    return dh


def _surface_dh(dh, x, fast, old, new, to, tn, ids, G, S, surf):  # pragma: no cover - compiled (overload)
    """dh + the surface ΔH (``S`` = the surface tuple or None)."""


@overload(_surface_dh, inline="always")
def _surface_dh_impl(dh, x, fast, old, new, to, tn, ids, G, S, surf):
    if _absent(S):
        return lambda dh, x, fast, old, new, to, tn, ids, G, S, surf: dh
    return lambda dh, x, fast, old, new, to, tn, ids, G, S, surf: _surface_sum(
        dh, x, fast, old, new, to, tn, ids, G, S[0], S[1], S[2], S[3], surf)


def _dm_dh(dh, x, old, new, tp, vol, D, A):  # pragma: no cover - compiled (overload)
    """dh + the directed-motion ΔH (nothing when ``D`` is None)."""


@overload(_dm_dh, inline="always")
def _dm_dh_impl(dh, x, old, new, tp, vol, D, A):
    if _absent(D):
        return lambda dh, x, old, new, tp, vol, D, A: dh
    return lambda dh, x, old, new, tp, vol, D, A: dh + _dm_delta(x, old, new, tp, vol, D, A)


@njit(cache=True, inline="always")
def delta_core(x, fast, old, new, ids, tp, vol, G, P, A):
    """ΔH of copying cell ``new`` into flat site ``x`` now held by ``old != new``, analytic terms only
    (``fast``: ``x`` is at least ``M1`` from every edge)."""
    to = tp[old]
    tn = tp[new]
    dh = _contact_dh(0.0, x, fast, old, new, to, tn, ids, tp, G, P[0])
    dh = _volume_dh(dh, old, new, to, tn, vol, P[1])
    dh = _external_dh(dh, x, to, tn, P[2])
    dh = _surface_dh(dh, x, fast, old, new, to, tn, ids, G, P[3], A[0])
    return _dm_dh(dh, x, old, new, tp, vol, P[4], A)


@njit(**_HOT)
def delta_analytic(x, new, ids, tp, vol, G, P, A):
    """ΔH of copying cell ``new`` into flat site ``x`` (its current id is overwritten), analytic terms only.

    Deletion is not checked here (the caller refuses it). ``new == ids[x]`` gives 0.
    """
    old = ids[x]
    if old == new:
        return 0.0
    return delta_core(x, is_fast(x, G), old, new, ids, tp, vol, G, P, A)


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
def _dm_direction(t, a, cx, D):
    """Component ``a`` of the direction vector of type ``t`` for a cell whose centre has coordinate ``cx``
    along its band axis (ignored for constant directions). No allocation (callable from the hot loop)."""
    dm_mode = D[0]
    mode = dm_mode[t]
    if mode == 1:  # constant
        return D[1][t, a]
    if mode == 2 or mode == 3:  # band: inward (2) / outward (3)
        dm_band = D[2]
        ax = int(dm_band[t, 0])
        if a != ax:
            return 0.0
        size = D[4][ax]
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
        return sgn
    return 0.0


@njit(cache=True)
def _recompute_cell(c, A, D):
    """Reference site := the cell's smallest flat index; displacement sum recomputed over its members."""
    cm_ref = A[1]
    cm_sum = A[2]
    head = A[3]
    nxt = A[4]
    coords = D[5]
    shape = D[4]
    periodic = D[6]
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
def dm_init(ids, n_ids, D, A):
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
            _recompute_cell(c, A, D)


@njit(cache=True)
def _dm_delta(x, old, new, tp, vol, D, A):
    """Morpheus DirectedMotion: Σ over the gaining and losing cell of −s·V·((C_after − C_before)·d̂),
    V = volume before the copy, d̂ evaluated at the current centre (see ``analytic.DirectedMotion``)."""
    dm_mode = D[0]
    dm_band = D[2]
    strength = D[3]
    shape = D[4]
    coords = D[5]
    periodic = D[6]
    cm_ref = A[1]
    cm_sum = A[2]
    nd = coords.shape[1]
    dh = 0.0
    for k in range(2):
        c = new if k == 0 else old
        if c == 0:
            continue
        t = tp[c]
        st = strength[t]
        if t == 0 or st == 0.0 or dm_mode[t] == 0:
            continue
        v = vol[c]
        if k == 1 and v <= 1:
            continue
        r = cm_ref[c]
        # absolute (unwrapped) centre, computed as Σ positions / V like the numpy reference
        band_ax = 0
        if dm_mode[t] >= 2:
            band_ax = int(dm_band[t, 0])
        cb = (coords[r, band_ax] * v + cm_sum[c, band_ax]) / v
        if periodic:
            cb = cb % shape[band_ax]
        proj = 0.0
        for a in range(nd):
            cen = (coords[r, a] * v + cm_sum[c, a]) / v
            xi = coords[r, a] + _min_image(np.float64(coords[x, a] - coords[r, a]), shape[a], periodic)
            if k == 0:
                disp = (xi - cen) / (v + 1)
            else:
                disp = (cen - xi) / (v - 1)
            proj += disp * _dm_direction(t, a, cb, D)
        dh -= st * v * proj
    return dh


def dm_move(x, old, new, D, A):  # pragma: no cover - compiled (overload)
    """Directed-motion bookkeeping after site ``x`` moved from ``old`` to ``new`` (nothing when ``D`` is None)."""


@overload(dm_move, inline="always")
def _dm_move_impl(x, old, new, D, A):
    if _absent(D):
        return lambda x, old, new, D, A: None
    return lambda x, old, new, D, A: _dm_move(x, old, new, D, A)


@njit(cache=True)
def _dm_move(x, old, new, D, A):
    """Directed-motion bookkeeping after site ``x`` moved from cell ``old`` to ``new`` (ids already set)."""
    coords = D[5]
    shape = D[4]
    periodic = D[6]
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
                _recompute_cell(old, A, D)
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
            _recompute_cell(new, A, D)
        else:
            r = cm_ref[new]
            for a in range(nd):
                cm_sum[new, a] += _min_image(np.float64(coords[x, a] - coords[r, a]), shape[a], periodic)


# ----------------------------------------------------------------------------------------------------------
# applying a copy (incremental bookkeeping)
# ----------------------------------------------------------------------------------------------------------
@njit(cache=True, inline="always")
def _surface_update(x, fast, old, new, ids, G, soffs, sfd, surf):
    d_old, d_new = surface_change(x, fast, old, new, ids, G, soffs, sfd)
    surf[old] += d_old
    surf[new] += d_new


def _surface_apply(x, fast, old, new, ids, G, S, surf):  # pragma: no cover - compiled (overload)
    """Surface bookkeeping of a copy (before ``ids[x]`` changes); nothing when ``S`` is None."""


@overload(_surface_apply, inline="always")
def _surface_apply_impl(x, fast, old, new, ids, G, S, surf):
    if _absent(S):
        return lambda x, fast, old, new, ids, G, S, surf: None
    return lambda x, fast, old, new, ids, G, S, surf: _surface_update(x, fast, old, new, ids, G, S[0], S[1], surf)


@njit(cache=True, inline="always")
def _bnbr_update(y, idy, old, new, bflag):
    """Neighbour ``y`` (id ``idy``, ``y`` ≠ the site that passed from ``old`` to ``new``): update its
    unlike-neighbour count; returns 1 if ``y`` is now unlike that site."""
    bflag[y] += np.int32(idy == old) - np.int32(idy == new)  # no data-dependent branch for the count
    return np.int64(idy != new)


@njit(cache=True, inline="always")
def _boundary_update(x, fast, old, new, ids, G, bflag):
    """Boundary bookkeeping after ``ids[x]`` became ``new`` (copy neighbourhood): the unlike-neighbour counts
    of ``x`` and of its neighbours."""
    fd = G[3]
    c = np.int64(0)
    if fast and fd.shape[0] == 8:  # no neighbour wraps onto x; 2-D Moore: unrolled (constant trip count)
        for j in range(8):
            y = _u(x + fd[j])
            c += _bnbr_update(y, ids[y], old, new, bflag)
    elif fast:
        for j in range(fd.shape[0]):
            y = _u(x + fd[j])
            c += _bnbr_update(y, ids[y], old, new, bflag)
    else:
        shape = G[0]
        cx = coords_of(x, shape)
        for j in range(fd.shape[0]):
            y = nbr_slow(cx, G[2], j, shape, G[1])
            if y >= 0 and y != x:  # (a neighbour that wraps onto x itself is like x)
                c += _bnbr_update(y, ids[y], old, new, bflag)
    bflag[_u(x)] = c


def _boundary_apply(x, fast, old, new, ids, G, B):  # pragma: no cover - compiled (overload)
    """Boundary bookkeeping after ``ids[x]`` became ``new``; nothing for the classic proposal."""


@overload(_boundary_apply, inline="always")
def _boundary_apply_impl(x, fast, old, new, ids, G, B):
    if _absent(B):
        return lambda x, fast, old, new, ids, G, B: None
    return lambda x, fast, old, new, ids, G, B: _boundary_update(x, fast, old, new, ids, G, B[0])


@njit(cache=True, inline="always")
def apply_copy(x, fast, new, ids, vol, G, P, A, B):
    """Set ``ids[x] = new`` and update volumes, surfaces, centre sums and (boundary proposal) the boundary
    counts."""
    old = ids[x]
    _surface_apply(x, fast, old, new, ids, G, P[3], A[0])
    ids[x] = new
    vol[old] -= 1
    vol[new] += 1
    dm_move(x, old, new, P[4], A)
    _boundary_apply(x, fast, old, new, ids, G, B)


@njit(cache=True)
def init_boundary(ids, G, bflag, frame):
    """Boundary counts of the copy neighbourhood: ``bflag[y]`` = number of copy neighbours of y with another
    id (the boundary set: the sites with ``bflag > 0``); ``frame[y]`` = 1 for the sites
    less than ``M1`` from an edge (the slow neighbour path), 0 for the others (fast: no division for the
    coordinates in :func:`boundary_pick`)."""
    shape = G[0]
    for y in range(ids.shape[0]):
        c = 0
        cy = coords_of(y, shape)
        frame[y] = 0 if inside(cy, shape, G[4]) else 1
        for j in range(G[3].shape[0]):
            z = nbr_slow(cy, G[2], j, shape, G[1])
            if z >= 0 and ids[z] != ids[y]:
                c += 1
        bflag[y] = c


@njit(cache=True, inline="always")
def boundary_pick(x, r32, ids, G, bflag, frame):
    """The boundary proposal's new id for boundary site ``x``: its ``pick``-th unlike copy neighbour (offset
    order), ``pick`` uniform in ``0 .. bflag[x]-1`` from the 32-bit draw ``r32``. Returns ``(fast, new)``."""
    ux = _u(x)
    fast = frame[ux] == 0
    cx = ids[ux]
    pick = _below(r32, bflag[ux])
    new = cx
    fd = G[3]
    if fast:  # written without data-dependent branches (selects): which neighbours differ is unpredictable
        if len(fd) == 8:  # the 2-D Moore neighbourhood: a constant trip count, unrolled by the compiler
            for j in range(8):
                idy = ids[_u(x + fd[j])]
                unlike = np.int64(idy != cx)
                new = idy if (unlike & np.int64(pick == 0)) != 0 else new  # one select per neighbour
                pick -= unlike
            return fast, new
        for j in range(len(fd)):
            idy = ids[_u(x + fd[j])]
            unlike = idy != cx
            new = idy if (unlike and pick == 0) else new
            pick -= np.int64(unlike)
        return fast, new
    shape = G[0]
    c = coords_of(x, shape)
    for j in range(len(fd)):
        y = nbr_slow(c, G[2], j, shape, G[1])
        if y >= 0:
            idy = ids[y]
            unlike = idy != cx
            new = idy if (unlike and pick == 0) else new  # selects, as on the fast path
            pick -= np.int64(unlike)
    return fast, new


# ----------------------------------------------------------------------------------------------------------
# compiled neural terms
# ----------------------------------------------------------------------------------------------------------
@njit(cache=True, _nrt=False)  # no reference counting of NN's ~100 arrays around the calls
def neural_delta(x, new, ids, tp, NN):
    """ΔH of the compiled neural terms (scales included)."""
    dh = 0.0
    if NN[0][0]:
        dh += NN[1][0] * nh_delta(x, new, ids, tp, NN[2], NN[3])
    if NN[0][1]:
        dh += NN[1][1] * pooled_delta(x, new, ids, tp, NN[4], NN[5], NN[6], NN[7])
    return dh


@njit(cache=True, _nrt=False)  # no reference counting of NN's ~100 arrays around the calls
def neural_accept(x, new, ids, tp, NN):
    """Update the compiled neural terms' caches for an accepted copy (``ids`` still the before state)."""
    if NN[0][0]:
        nh_accept(x, new, ids, tp, NN[2], NN[3])
    if NN[0][1]:
        pooled_accept(x, new, ids, tp, NN[4], NN[5], NN[6], NN[7])


# ----------------------------------------------------------------------------------------------------------
# the sweep
# ----------------------------------------------------------------------------------------------------------
@njit(**_HOT)
def sweep(ids, tp, vol, G, P, A, B, rng, n_attempts, inv_t, stop_at_candidate, counters, NN=None):
    """Run up to ``n_attempts`` copy attempts.

    Classic proposal (``B is None``): source s uniform over the lattice, target t uniform over s's valid copy
    neighbours; same cell → the attempt ends (it counts); else t takes σ(s). Boundary proposal: site x
    uniform over the current boundary set (uniform sites drawn until one is on the boundary; the draws
    count as one attempt), it takes the id of a neighbour drawn uniformly among x's neighbours of another
    cell (the low 32 bits of x's draw). Deleting a cell (volume 1 → 0) is refused. Acceptance min(1, exp(−ΔH·inv_t)).

    With ``stop_at_candidate`` the sweep stops *before* deciding the first candidate copy (one that passed
    the same-cell and deletion checks) and returns it, so that Python can add a non-compiled ΔH; the
    caller then calls :func:`decide`. ``NN``: the compiled neural terms (module docstring); their ΔH is
    part of ``dh_analytic`` (the compiled ΔH). Returns ``(attempts_done, pending, site, new_id, dh_analytic)``;
    ``pending`` is 1 when a candidate is waiting (its attempt is counted in ``attempts_done``).

    counters (int64, length 4): attempts, candidates (ΔH evaluated), accepted, refused deletions.
    """
    n = ids.shape[0]
    s0 = rng[0]
    s1 = rng[1]
    s2 = rng[2]
    s3 = rng[3]
    done = 0
    cand = 0
    acc = 0
    refused = 0
    pending = 0
    px = -1
    pnew = -1
    pdh = 0.0
    while done < n_attempts:
        done += 1
        r, s0, s1, s2, s3 = _xo(s0, s1, s2, s3)
        if B is None:
            src = _below(r >> np.uint64(32), n)
            x, fast = propose_classic(src, r & _LO32, G)
            if x < 0:
                continue
            new = ids[src]
        else:
            if vol[_u(ids[0])] == n:  # one id fills the lattice: the boundary set is empty
                continue
            # x uniform over the boundary set: uniform sites until one has an unlike copy neighbour
            # (rejection; no list of boundary sites to keep, whose random accesses miss the cache)
            x = _below(r >> np.uint64(32), n)
            while B[0][_u(x)] == 0:
                r, s0, s1, s2, s3 = _xo(s0, s1, s2, s3)
                x = _below(r >> np.uint64(32), n)
            # Prefetch the next attempt's site, whose draw is already known (no random number is consumed: the
            # xoshiro256** output is a function of s1): the next draw, or the one after if this attempt draws a
            # Metropolis uniform. Prefetching changes no result.
            if n >= _PREFETCH_SITES:  # (smaller lattices stay in L1: measured, the hints cost more than they save)
                ra = _rotl(s1 * np.uint64(5), 7) * np.uint64(9)
                rb = _rotl((s1 ^ s2 ^ s0) * np.uint64(5), 7) * np.uint64(9)
                _prefetch_site(_u(_below(ra >> np.uint64(32), n)), ids, G, B[0], B[1])
                _prefetch_site(_u(_below(rb >> np.uint64(32), n)), ids, G, B[0], B[1])
            fast, new = boundary_pick(x, r & _LO32, ids, G, B[0], B[1])
        old = ids[x]
        if old == new:
            continue
        if old != 0 and vol[old] <= 1:
            refused += 1
            continue
        cand += 1
        dh = delta_core(x, fast, old, new, ids, tp, vol, G, P, A)
        if NN is not None:  # noqa: SIM102 (nested: numba prunes the branch when NN is None)
            if NN[0][0] or NN[0][1]:  # new as int64: the type the Python callers pass (one compiled variant)
                dh += neural_delta(x, np.int64(new), ids, tp, NN)
        if stop_at_candidate:
            pending = 1
            px = x
            pnew = new
            pdh = dh
            break
        if dh > 0.0:
            u, s0, s1, s2, s3 = _xo(s0, s1, s2, s3)
            if not below_exp(u >> np.uint64(11), dh * inv_t):
                continue
        if NN is not None:  # noqa: SIM102
            if NN[0][0] or NN[0][1]:
                neural_accept(x, np.int64(new), ids, tp, NN)
        apply_copy(x, fast, new, ids, vol, G, P, A, B)
        acc += 1
    rng[0] = s0
    rng[1] = s1
    rng[2] = s2
    rng[3] = s3
    counters[0] += done
    counters[1] += cand
    counters[2] += acc
    counters[3] += refused
    return done, pending, px, pnew, pdh


@njit(**_HOT)
def decide(x, new, dh, ids, tp, vol, G, P, A, B, rng, inv_t, counters, NN=None):
    """Metropolis decision for a candidate returned by :func:`sweep` (total ΔH ``dh``); applies it if
    accepted (updating the compiled neural terms' caches). Returns 1 if accepted."""
    if dh <= 0.0 or below_exp(rng_next(rng) >> np.uint64(11), dh * inv_t):
        if NN is not None:  # noqa: SIM102
            if NN[0][0] or NN[0][1]:
                neural_accept(x, new, ids, tp, NN)
        apply_copy(x, is_fast(x, G), new, ids, vol, G, P, A, B)
        counters[2] += 1
        return 1
    return 0


# ----------------------------------------------------------------------------------------------------------
# the paper's parallel sampler on the same compiled terms
# ----------------------------------------------------------------------------------------------------------
@njit(**_HOT)
def parallel_steps(ids, tp, vol, G, P, A, B, rng, n_steps, n_flips, inv_t, counters, work, NN=None):
    """``n_steps`` steps of the paper's parallel sampler (Algorithm 2; ``sampling.parallel``) on one lattice,
    with the exact sampler's compiled terms (analytic ``P``/``A``, boundary counts ``B``, neural ``NN``).

    One step: the boundary set is listed (sites with ``B[0] > 0``) and ``min(n_flips, its size)`` distinct
    sites drawn from it uniformly without replacement (partial Fisher–Yates); each takes the id of a copy
    neighbour of another cell drawn uniformly (:func:`boundary_pick`); every ΔH is computed against the same
    current state; each proposal is accepted independently with probability min(1, exp(−ΔH·inv_t)); a
    proposal that would remove the last site of a non-medium cell is refused, and so is every accepted
    removal from a cell whose accepted removals in this step reach its volume; the accepted copies are then
    applied one after another (the sites are distinct, so the order does not change the final state; each
    update of the neural caches and of the per-cell state sees the state it is applied to).

    ``work``: int64 scratch of length ≥ ``ids.shape[0] + 4·n_flips + len(vol)``, zero in the last
    ``len(vol)`` entries (left so). counters (int64, length 4): attempts (proposals made), candidates (the
    same), accepted, refused deletions.
    """
    n = ids.shape[0]
    nc = vol.shape[0]
    lst = work[:n]
    sx = work[n:n + n_flips]
    snew = work[n + n_flips:n + 2 * n_flips]
    sok = work[n + 2 * n_flips:n + 3 * n_flips]
    sfast = work[n + 3 * n_flips:n + 4 * n_flips]
    loss = work[n + 4 * n_flips:n + 4 * n_flips + nc]
    bflag = B[0]
    s0 = rng[0]
    s1 = rng[1]
    s2 = rng[2]
    s3 = rng[3]
    att = 0
    acc = 0
    refused = 0
    for _ in range(n_steps):
        nb = 0
        for y in range(n):
            if bflag[y] > 0:
                lst[nb] = y
                nb += 1
        m = min(n_flips, nb)
        for k in range(m):  # partial Fisher–Yates: lst[k] uniform over the sites not yet drawn
            r, s0, s1, s2, s3 = _xo(s0, s1, s2, s3)
            j = k + _below(r >> np.uint64(32), nb - k)
            x = lst[j]
            lst[j] = lst[k]
            lst[k] = x
            fast, new = boundary_pick(x, r & _LO32, ids, G, bflag, B[1])
            old = ids[x]
            sx[k] = x
            snew[k] = new
            sfast[k] = 1 if fast else 0
            sok[k] = 0
            if old != 0 and vol[old] <= 1:
                refused += 1
                continue
            dh = delta_core(x, fast, old, new, ids, tp, vol, G, P, A)
            if NN is not None:  # noqa: SIM102 (nested: numba prunes the branch when NN is None)
                if NN[0][0] or NN[0][1]:
                    dh += neural_delta(x, np.int64(new), ids, tp, NN)
            if dh > 0.0:
                u, s0, s1, s2, s3 = _xo(s0, s1, s2, s3)
                if not below_exp(u >> np.uint64(11), dh * inv_t):
                    continue
            sok[k] = 1
            if old != 0:
                loss[old] += 1
        att += m
        for k in range(m):  # joint deletion guard: a cell keeps all its sites if its accepted losses reach V
            old = ids[sx[k]]
            if sok[k] == 1 and old != 0 and loss[old] >= vol[old]:
                sok[k] = 0
                refused += 1
        for k in range(m):
            loss[ids[sx[k]]] = 0
        for k in range(m):
            if sok[k] == 1:
                x = sx[k]
                new = snew[k]
                if NN is not None:  # noqa: SIM102
                    if NN[0][0] or NN[0][1]:
                        neural_accept(x, np.int64(new), ids, tp, NN)
                apply_copy(x, sfast[k] == 1, new, ids, vol, G, P, A, B)
                acc += 1
    rng[0] = s0
    rng[1] = s1
    rng[2] = s2
    rng[3] = s3
    counters[0] += att
    counters[1] += att
    counters[2] += acc
    counters[3] += refused
    return acc


def _nrt_twin(dispatcher, name):
    """The same Python function compiled with reference counting (under another name, so that the on-disk
    caches stay apart): for runs with compiled neural terms, whose helpers may allocate."""
    fn = dispatcher.py_func
    twin = types.FunctionType(fn.__code__, fn.__globals__, name, fn.__defaults__, fn.__closure__)
    twin.__qualname__ = name
    twin.__doc__ = f"{fn.__doc__}\n\n(The :func:`{fn.__name__}` kernel with reference counting, for ``NN``.)"
    return njit(cache=True, error_model="numpy")(twin)


sweep_nrt = _nrt_twin(sweep, "sweep_nrt")
decide_nrt = _nrt_twin(decide, "decide_nrt")
parallel_steps_nrt = _nrt_twin(parallel_steps, "parallel_steps_nrt")


@njit(cache=True)
def surfaces_of(ids, snb, n_ids):
    """Surface per id from a neighbour table ``snb`` (``exact.neighbour_table(..., drop_self=True)``):
    number of (site of the id, neighbour of another id) pairs."""
    out = np.zeros(n_ids, np.int64)
    for i in range(ids.shape[0]):
        c = ids[i]
        for j in range(snb.shape[1]):
            y = snb[i, j]
            if y >= 0 and ids[y] != c:
                out[c] += 1
    return out


@njit(cache=True)
def surfaces_arith(ids, G, S, n_ids):
    """Surface per id by index arithmetic (the kernel's geometry ``G`` and surface tuple ``S``)."""
    out = np.zeros(n_ids, np.int64)
    shape = G[0]
    for i in range(ids.shape[0]):
        c = ids[i]
        ci = coords_of(i, shape)
        for j in range(len(S[1])):
            y = nbr_slow(ci, S[0], j, shape, G[1])
            if y >= 0 and y != i and ids[y] != c:
                out[c] += 1
    return out
