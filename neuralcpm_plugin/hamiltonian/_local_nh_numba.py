"""Compiled (numba, float64) local NH: per-lattice caches, ΔH of one copy attempt, cache update on accept.

The local NH (``local_nh.py``; same notation) written through its per-patch *feature vector*

    q(g) = Σ_c in_c(g) · (v_c(g) − v_∅(g)) ∈ R^C          (interaction-branch output before the read-out)
    H    = scale · Σ_g w_o · q(g)                           (the read-out bias b_o cancels in ρ_c − ρ_∅)

A lattice's cache (:func:`new_state` + :func:`full_init`) holds, per patch g of the coarse Gh×Gw grid: its
distinct cells (ids, medium included), each cell's ψ(u_c(g)) and W_u·u_c(g), the ghost's ψ(u_∅(g)) and
W_u·u_∅(g), A(g), CA(g) = conv_k×k(A)(g) + b_A (circular on the grid) and q(g).

Copying cell ``new`` into flat site x (patch g0) changes u, A only at g0, hence CA and q only at the output
patches g0 − (a−r, b−r), a, b ∈ 0..k−1 (deduplicated: on grids smaller than k they coincide).
:func:`nh_delta` evaluates the after-state of g0 from scratch, CA at the outputs as CA + W_ab·ΔA, q at the
outputs from scratch given CA, and returns Σ_o w_o·(q'(o) − q(o)) (without ``scale``); the after-state
quantities stay in the scratch part of the cache and :func:`nh_accept` commits them (it recomputes the ΔH
first when the scratch belongs to another attempt).  Δq per output patch (:func:`nh_delta` leaves it in
``S[_S_DQ]`` with the patch indices in ``S[_S_OUT]``) is what the pooled term's ΔZ is built from.

CA is the only incrementally updated quantity (u, A, q are recomputed from scratch where they change);
every ``refresh_every`` accepted copies CA and q are recomputed from A, so float drift stays ≲ 1e-14.

Conventions: ``ids`` flat (row-major) int array of an H×W lattice, ``types`` int array indexed by id,
``ids`` must still hold the *before* state when :func:`nh_accept` is called (the caller writes the copy
after).  Sites in rows ≥ Gh·s or columns ≥ Gw·s are not seen (ΔH 0), as in the NH.

This file imports only numpy and numba, so it can be shipped into a CompuCell3D project next to
``local_nh.py``.
"""

from __future__ import annotations

import functools

import numpy as np
from llvmlite import ir
from numba import njit, typed, types
from numba.core import cgutils
from numba.extending import intrinsic

try:
    from ..errors import ConfigError
except ImportError:  # loaded on its own (inside a host tool)
    ConfigError = ValueError

# error_model="numpy": no ZeroDivisionError checks, so LLVM can vectorize the loops; "contract": FMA
_jit = functools.partial(njit, cache=True, error_model="numpy", fastmath={"contract"})
# the per-attempt functions: also without numba's reference counting (_nrt=False: they allocate nothing; with it,
# every array of the W / S tuples would be counted up and down around each call, ≈ 100 atomic operations per ΔH)
_hot = _jit(_nrt=False)

# weights tuple W (see weights_from_numpy)
# 0 dims int64 [s, k, C, T, ss, r]; 1 Em [ss, C]; 2 Et [ss, T+1, C]; 3 b [C]; 4 W1 [C, C] (in, out); 5 b1;
# 6 W2; 7 b2; 8 Wu; 9 WAb [C, k*k*C] (in; a, b, out: column (a·k + b)·C + out); 10 bA; 11 W3; 12 b3; 13 Wo [C]

# state tuple S (see new_state)
_S_GEO = 0     # int64 [8]: H, W, Gh, Gw, G, version, accepts since refresh, refresh_every
_S_PN = 1      # int64 [G] cells per patch
_S_PCELL = 2   # int64 [G, ss] their ids
_S_PSI = 3     # [ss, G, C] ψ(u_c) of the patches' m-th cells (cell-slot major: see new_state)
_S_UW = 4      # [ss, G, C] W_u·u_c
_S_GPSI = 5    # [G, C] ψ(u_∅)
_S_GUW = 6     # [G, C] W_u·u_∅
_S_A = 7       # [G, C]
_S_CA = 8      # [G, C] conv(A) + b_A
_S_Q = 9       # [G, C] q(g)
_S_KEY = 10    # int64 [8]: x, new, version, valid, cells in the after-centre patch, outputs, g0, changed
_S_CELL = 11   # int64 [ss] after-centre cells
_S_CPSI = 12   # [ss, C]
_S_CUW = 13    # [ss, C]
_S_CG = 14     # [3, C]: ghost ψ, ghost W_u·u, A' of the after-centre patch
_S_OUT = 15    # int64 [k*k] output patches of the last attempt
_S_OCA = 16    # [k*k, C] CA' at the outputs
_S_OQ = 17     # [k*k, C] q' at the outputs
_S_DQ = 18     # [k*k, C] q' − q
_S_MARK = 19   # int64 [G] output slot of a patch during an attempt (−1 otherwise)
_S_TMP = 20    # [6, C] work rows
_S_PIDS = 21   # int64 [ss] work: ids of a patch
_S_T1 = 22     # [k*k*(ss+1), C] work rows (batched stage 1 / stage 2)
_S_T2 = 23     # [k*k*(ss+1), C]
_S_T3 = 24     # [k*k*(ss+1), C]
_S_ROWO = 25   # int64 [k*k*(ss+1)] output slot (stage 2) / cell slot (stage 1, −1 = ghost) of each work row
_S_ROWW = 26   # [k*k*(ss+1)] weight of each stage-2 row (+1 cell, −n ghost)
_S_T1F = 27    # flat aliases of _S_T1, _S_T2 (same memory: SiLU runs over them in one loop)
_S_T2F = 28
_S_ZERO = 29   # [C] zeros (the bias of phi_u, which has none)
_S_CUW3 = 30   # [ss, 1, C]: _S_CUW as a one-patch 3-D array (same memory), for _patch_rows
_S_KSLOT = 31  # int64 [k*k] output slot of each kernel offset (a, b) during an attempt
_S_DCA = 32    # [k*k*C] W_ab·ΔA of every kernel offset (a, b) during an attempt
_S_PSLOT = 33  # int64 [2, ss] stage-1 work: cell slot of each patch position, work row of each cell slot


def _aligned(a, dtype=np.float64) -> np.ndarray:
    """A C-contiguous copy of ``a`` whose data start on a 64-byte boundary (a cache line): rows of 8·k float64
    then never straddle lines, so the vector loads do not split and one prefetch per line suffices."""
    a = np.asarray(a, dtype=dtype)
    buf = np.empty(a.nbytes + 64, np.uint8)
    off = (-buf.ctypes.data) % 64
    out = buf[off:off + a.nbytes].view(dtype).reshape(a.shape)
    out[...] = a
    return out


def _azeros(*shape, dtype=np.float64) -> np.ndarray:
    return _aligned(np.zeros(shape, dtype), dtype)


def weights_from_numpy(ev) -> tuple:
    """The weights tuple of a :class:`~neuralcpm_plugin.hamiltonian.local_nh.LocalNHNumpy` evaluator."""
    s, k, C, T = ev.s, ev.k, ev.C, ev.T
    f = _aligned
    WAb = ev.WA.reshape(k, k, C, C).transpose(2, 0, 1, 3).reshape(C, k * k * C)  # in → (a, b, out)
    dims = np.array([s, k, C, T, s * s, k // 2], np.int64)
    return (dims, f(ev.Em), f(ev.Et), f(ev.b), f(ev.W1), f(ev.b1), f(ev.W2), f(ev.b2), f(ev.Wu), f(WAb),
            f(ev.bA), f(ev.W3), f(ev.b3), f(np.zeros(C) if ev.Wo is None else ev.Wo))


def dummy_weights() -> tuple:
    """A weights tuple of the right types for an absent term (C = 1, never evaluated)."""
    z = lambda *sh: np.zeros(sh, np.float64)
    return (np.array([1, 1, 1, 0, 1, 0], np.int64), z(1, 1), z(1, 1, 1), z(1), z(1, 1), z(1), z(1, 1), z(1),
            z(1, 1), z(1, 1), z(1), z(1, 1), z(1), z(1))


_HUGE = 2 << 20  # a transparent huge page (x86-64)


def _block_arrays(specs) -> list:
    """Zeroed C-contiguous arrays (``specs``: (shape, dtype) pairs) carved out of one buffer, each starting on
    a 64-byte line, in the given order.

    Buffers of ≥ 256 KiB are an anonymous mmap that starts on a 2 MiB boundary and is advised
    ``MADV_HUGEPAGE`` (Linux; the machine's THP mode is often ``madvise``, where numpy advises only its own
    large arrays).  Backed by huge pages, the caches' cache-set placement no longer depends on which 4 KiB
    physical pages a process happens to get.  (Measured: no change of the ΔH rate on the benchmark's 100×100
    lattice; the up to 1.5× scatter between runs there follows the machine's own compute speed — see the
    README.)  Regions never written (cell slots no patch uses) take no memory."""
    sizes = [int(np.prod(sh, dtype=np.int64)) * np.dtype(dt).itemsize for sh, dt in specs]
    offs = []
    total = 0
    for nb in sizes:
        offs.append(total)
        total += -(-max(nb, 1) // 64) * 64
    buf = None
    if total >= 256 << 10:
        try:
            import mmap
            span = -(-total // _HUGE) * _HUGE  # whole huge pages (the last one too)
            mm = mmap.mmap(-1, span + _HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # private: THP-able
            raw = np.frombuffer(mm, np.uint8)
            start = (-raw.ctypes.data) % _HUGE
            if hasattr(mm, "madvise") and hasattr(mmap, "MADV_HUGEPAGE"):
                mm.madvise(mmap.MADV_HUGEPAGE, start, span)
            buf = raw[start:start + total]
        except (OSError, ValueError, AttributeError):  # no private anonymous mmap here: plain allocation below
            buf = None
    if buf is None:
        raw = np.zeros(total + 64, np.uint8)
        start = (-raw.ctypes.data) % 64
        buf = raw[start:start + total]
    return [buf[o:o + nb].view(dt).reshape(sh) for (sh, dt), o, nb in zip(specs, offs, sizes)]


def new_state(W, shape, refresh_every: int = 4096) -> tuple:
    """Empty cache tuple for an H×W lattice (fill it with :func:`full_init`).

    Memory layout (one block, :func:`_block_arrays`): the per-patch rows an attempt reads (conv(A), q, the
    ghost's rows, A, the cell counts and ids) come first, then ψ and W_u·u *cell-slot major* ([ss, G, C]:
    the rows of every patch's m-th cell are contiguous).  Most patches hold ≤ 3 cells, so the rows in use
    form a dense region instead of 3 rows out of every 2 KiB (the former [G, ss, C] order, whose used lines
    fell into 3/16 of the L2 cache sets), and the slots no patch uses are never touched: a 1000×1000
    lattice's caches take 126 MiB resident instead of 299 MiB."""
    dims = W[0]
    s, k, C, ss = int(dims[0]), int(dims[1]), int(dims[2]), int(dims[4])
    H, Wd = int(shape[0]), int(shape[1])
    Gh, Gw = H // s, Wd // s
    G = Gh * Gw
    f, i8 = np.float64, np.int64
    R = k * k * (ss + 1)
    # index into the list below: the tuple order of the _S_* constants
    order = [_S_GEO, _S_KEY, _S_OUT, _S_KSLOT, _S_CELL, _S_PIDS, _S_PSLOT, _S_ZERO, _S_TMP, _S_CG, _S_CPSI,
             _S_CUW, _S_OCA, _S_OQ, _S_DQ, _S_DCA, _S_ROWO, _S_ROWW, _S_T1, _S_T2, _S_T3,
             _S_CA, _S_Q, _S_GUW, _S_PN, _S_MARK, _S_A, _S_GPSI, _S_PCELL, _S_UW, _S_PSI]
    spec = {_S_GEO: ((8,), i8), _S_PN: ((G,), i8), _S_PCELL: ((G, ss), i8), _S_PSI: ((ss, G, C), f),
            _S_UW: ((ss, G, C), f), _S_GPSI: ((G, C), f), _S_GUW: ((G, C), f), _S_A: ((G, C), f),
            _S_CA: ((G, C), f), _S_Q: ((G, C), f), _S_KEY: ((8,), i8), _S_CELL: ((ss,), i8),
            _S_CPSI: ((ss, C), f), _S_CUW: ((ss, C), f), _S_CG: ((3, C), f), _S_OUT: ((k * k,), i8),
            _S_OCA: ((k * k, C), f), _S_OQ: ((k * k, C), f), _S_DQ: ((k * k, C), f), _S_MARK: ((G,), i8),
            _S_TMP: ((6, C), f), _S_PIDS: ((ss,), i8), _S_T1: ((R, C), f), _S_T2: ((R, C), f),
            _S_T3: ((R, C), f), _S_ROWO: ((R,), i8), _S_ROWW: ((R,), f), _S_ZERO: ((C,), f),
            _S_KSLOT: ((k * k,), i8), _S_DCA: ((k * k * C,), f), _S_PSLOT: ((2, ss), i8)}
    arrs = dict(zip(order, _block_arrays([spec[i] for i in order])))
    arrs[_S_GEO][:] = [H, Wd, Gh, Gw, G, 0, 0, max(int(refresh_every), 1)]
    arrs[_S_MARK][:] = -1
    arrs[_S_T1F] = arrs[_S_T1].reshape(-1)
    arrs[_S_T2F] = arrs[_S_T2].reshape(-1)
    arrs[_S_CUW3] = arrs[_S_CUW].reshape(ss, 1, C)
    return tuple(arrs[i] for i in range(len(arrs)))


# ---------------------------------------------------------------------------------------------- helpers
_LOG2E = 1.4426950408889634
_LN2HI = 6.93147180369123816490e-01
_LN2LO = 1.90821492927058770002e-10
_MAGIC = 6755399441055744.0  # 1.5·2^52: x + _MAGIC − _MAGIC rounds x to the nearest integer


_MAGIC_BITS = int(np.float64(_MAGIC).view(np.int64))
# coefficients of e^r ≈ Σ_k E_k r^k, k = 0..11, on |r| ≤ ln2/2: weighted least squares at 400 Chebyshev nodes
# in 60-digit arithmetic (near-minimax; relative error of the double-rounded polynomial 2.5e-17, against 4e-18
# for the degree-13 Taylor polynomial used before, 3 operations more); E_0 = E_1 = 1
_E2, _E3, _E4, _E5 = 0.5000000000000018, 0.16666666666666147, 0.04166666666649316, 0.008333333333569098
_E6, _E7, _E8 = 0.0013888888951133485, 0.00019841269413815112, 2.480148660775664e-05
_E9, _E10, _E11 = 2.7557638344026344e-06, 2.763226447373137e-07, 2.4989491355772434e-08


@_jit(inline="always")
def _exp(x):
    """e^x for |x| ≤ 700 (clamped beyond), within 2 ulp of the exact value: Cody–Waite reduction
    x = n·ln2 + r, |r| ≤ ln2/2, a degree-11 near-minimax polynomial in Estrin's form (short dependency chains;
    11 % faster SiLU loops than Horner's form or the former degree-13 Taylor polynomial), 2^n from the
    exponent bits.  n is read from the bits of x·log2(e) + 1.5·2^52 (no float → int conversion, which AVX2
    cannot vectorize).  Written without calls so that LLVM vectorizes the loops that use it (numba has no
    vector exp without Intel SVML)."""
    x = min(x, 700.0)
    x = max(x, -700.0)
    t = x * _LOG2E + _MAGIC
    n = t - _MAGIC
    r = (x - n * _LN2HI) - n * _LN2LO
    r2 = r * r
    r4 = r2 * r2
    lo = ((1.0 + r) + (_E2 + r * _E3) * r2) + ((_E4 + r * _E5) + (_E6 + r * _E7) * r2) * r4
    hi = (_E8 + r * _E9) + (_E10 + r * _E11) * r2
    p = lo + hi * (r4 * r4)
    ni = np.float64(t).view(np.int64) - _MAGIC_BITS
    return p * np.int64((ni + 1023) << 52).view(np.float64)


@intrinsic
def _prefetch(typingctx, arr, idx):
    """Hint the CPU to fetch the cache line holding ``arr.flat[idx]`` (C-contiguous ``arr``; no effect on
    results).  The per-lattice caches exceed the L2 cache, so the rows an attempt reads are fetched while its
    changed patch is evaluated instead of stalling the stage-2 loop."""
    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        p8 = builder.bitcast(builder.gep(ary.data, [args[1]]), ir.IntType(8).as_pointer())
        i32 = ir.IntType(32)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [p8.type, i32, i32, i32]),
                                            "llvm.prefetch.p0")
        builder.call(fn, [p8, i32(0), i32(3), i32(1)])  # read, keep in all levels, data
        return context.get_dummy_value()
    return types.void(arr, types.intp), codegen


@_hot
def _vecmat_add(x, M, out):
    """out += x @ M, four input rows per pass over ``out`` (four FMAs per load and store of an output)."""
    C = out.shape[0]
    K = x.shape[0]
    i = 0
    while i + 4 <= K:
        x0 = x[i]
        x1 = x[i + 1]
        x2 = x[i + 2]
        x3 = x[i + 3]
        for o in range(C):
            out[o] += ((x0 * M[i, o] + x1 * M[i + 1, o]) + (x2 * M[i + 2, o] + x3 * M[i + 3, o]))
        i += 4
    while i < K:
        xi = x[i]
        for o in range(C):
            out[o] += xi * M[i, o]
        i += 1


@_jit(inline="always")
def _prefetch_row(arr, start, n):
    """Prefetch ``arr.flat[start:start + n]`` (8-byte items, eight per 64-byte line: the arrays of
    :func:`new_state` start on a line)."""
    for i in range(0, n, 8):
        _prefetch(arr, start + i)


@_jit(inline="always")
def _silu(x):
    return x / (1.0 + _exp(-x))


@_hot
def _mm_rows(X, R, M, bias, OUT):
    """OUT[:R] = X[:R] @ M + bias.  Four input channels per pass over the rows (four FMAs per load and store
    of an output element; consecutive updates hit different rows, so no store→load chain)."""
    C = M.shape[1]
    K = M.shape[0]
    i = 0
    if K >= 4:  # the first pass writes OUT (bias included) instead of adding to it
        for r in range(R):
            x0 = X[r, 0]
            x1 = X[r, 1]
            x2 = X[r, 2]
            x3 = X[r, 3]
            for o in range(C):
                OUT[r, o] = bias[o] + ((x0 * M[0, o] + x1 * M[1, o]) + (x2 * M[2, o] + x3 * M[3, o]))
        i = 4
    else:
        for r in range(R):
            for o in range(C):
                OUT[r, o] = bias[o]
    while i + 4 <= K:
        for r in range(R):
            x0 = X[r, i]
            x1 = X[r, i + 1]
            x2 = X[r, i + 2]
            x3 = X[r, i + 3]
            for o in range(C):
                OUT[r, o] += (x0 * M[i, o] + x1 * M[i + 1, o]) + (x2 * M[i + 2, o] + x3 * M[i + 3, o])
        i += 4
    while i < K:
        for r in range(R):
            xi = X[r, i]
            for o in range(C):
                OUT[r, o] += xi * M[i, o]
        i += 1


@_hot
def _silu_flat(f, n):
    """f[:n] = SiLU(f[:n]) (``f`` 1-D: the flat alias of a work array; one vectorized loop)."""
    for i in range(n):
        f[i] = _silu(f[i])


@_jit(inline="always")
def _patch_features(pids, types, W, cells, psi, uw, gpsi, guw, A, S, g_reuse, keep_a, keep_b):
    """Stage 1 of one patch (ids ``pids`` [ss], patch-major positions): its distinct cells, their ψ and
    W_u·u, the ghost's, and A.  Returns the number of cells.

    ``g_reuse`` ≥ 0: the patch's types are those of cached patch ``g_reuse`` (a copy between two cells of one
    type), so the ghost and every cell other than ``keep_a``/``keep_b`` keep their cached rows.
    (Every array is taken from its tuple once, outside the loops: each extraction costs numba a reference
    count increment and decrement.)"""
    dims = W[0]
    C = dims[2]
    ss = dims[4]
    Em = W[1]
    Et = W[2]
    b = W[3]
    tmp = S[_S_TMP]
    U = S[_S_T1]
    T2 = S[_S_T2]
    T3 = S[_S_T3]
    Uf = S[_S_T1F]
    T2f = S[_S_T2F]
    rowm = S[_S_ROWO]
    c_pn = S[_S_PN]
    c_pcell = S[_S_PCELL]
    c_psi = S[_S_PSI]
    c_uw = S[_S_UW]
    c_gpsi = S[_S_GPSI]
    c_guw = S[_S_GUW]
    for c in range(C):
        tmp[0, c] = b[c]
    p = 0
    while p + 4 <= ss:  # the type embedding, four positions per pass
        t0 = types[pids[p]]
        t1 = types[pids[p + 1]]
        t2 = types[pids[p + 2]]
        t3 = types[pids[p + 3]]
        for c in range(C):
            tmp[0, c] += (Et[p, t0, c] + Et[p + 1, t1, c]) + (Et[p + 2, t2, c] + Et[p + 3, t3, c])
        p += 4
    while p < ss:
        ty = types[pids[p]]
        for c in range(C):
            tmp[0, c] += Et[p, ty, c]
        p += 1
    pslot = S[_S_PSLOT]  # [0]: cell slot of each position; [1]: work row of each cell slot (−1: none)
    n = 0
    for p in range(ss):
        cid = pids[p]
        m = 0
        while m < n and cells[m] != cid:
            m += 1
        if m == n:
            cells[n] = cid
            n += 1
        pslot[0, p] = m
    nr = 0
    if g_reuse < 0:
        for c in range(C):
            U[nr, c] = tmp[0, c]
        rowm[nr] = -1
        nr += 1
    else:
        for c in range(C):
            gpsi[c] = c_gpsi[g_reuse, c]
            guw[c] = c_guw[g_reuse, c]
    for m in range(n):
        cid = cells[m]
        pslot[1, m] = -1
        if g_reuse >= 0 and cid != keep_a and cid != keep_b:
            for mm in range(c_pn[g_reuse]):
                if c_pcell[g_reuse, mm] == cid:
                    for c in range(C):
                        psi[m, c] = c_psi[mm, g_reuse, c]
                        uw[m, c] = c_uw[mm, g_reuse, c]
                    break
            continue
        for c in range(C):
            U[nr, c] = tmp[0, c]
        pslot[1, m] = nr
        rowm[nr] = m
        nr += 1
    for p in range(ss):  # each position's shape embedding into its cell's row (positions in order)
        row = pslot[1, pslot[0, p]]
        if row >= 0:
            for c in range(C):
                U[row, c] += Em[p, c]
    _silu_flat(Uf, nr * C)
    _mm_rows(U, nr, W[8], S[_S_ZERO], T3)  # W_u·u (phi_u has no bias)
    _mm_rows(U, nr, W[4], W[5], T2)
    _silu_flat(T2f, nr * C)
    _mm_rows(T2, nr, W[6], W[7], U)
    _silu_flat(Uf, nr * C)
    for r in range(nr):
        m = rowm[r]
        if m < 0:
            for c in range(C):
                gpsi[c] = U[r, c]
                guw[c] = T3[r, c]
        else:
            for c in range(C):
                psi[m, c] = U[r, c]
                uw[m, c] = T3[r, c]
    for c in range(C):
        A[c] = -n * gpsi[c]
    for m in range(n):
        for c in range(C):
            A[c] += psi[m, c]
    return n


@_jit(inline="always")
def _gather_patch(ids, S, W, g, pids):
    geo = S[_S_GEO]
    Wd = geo[1]
    Gw = geo[3]
    s = W[0][0]
    gi = g // Gw
    gj = g - gi * Gw
    for a in range(s):
        base = (gi * s + a) * Wd + gj * s
        for b in range(s):
            pids[a * s + b] = ids[base + b]


@_jit(inline="always")
def _patch_rows(T1, rowo, roww, nr, o, UW, g, no, GUW, gg, CAS, ca):
    """Append the stage-2 rows of one patch: its ``no`` cells' W_u·u (``UW[m, g]``) and its ghost's
    (``GUW[gg]``), each plus the patch's conv row ``CAS[ca]``; they sum into output ``o`` with weight +1 per
    cell and −no for the ghost.  Returns the new row count."""
    C = T1.shape[1]
    for m in range(no):
        for c in range(C):
            T1[nr + m, c] = UW[m, g, c] + CAS[ca, c]
        rowo[nr + m] = o
        roww[nr + m] = 1.0
    for c in range(C):
        T1[nr + no, c] = GUW[gg, c] + CAS[ca, c]
    rowo[nr + no] = o
    roww[nr + no] = -float(no)
    return nr + no + 1


@_jit(inline="always")
def _rows_to_q(S, W, nr, nout, oq):
    """oq[:nout] = Σ_rows weight · v(row), v = SiLU(W3ᵀ SiLU(T1[row]) + b3): the q of the patches whose
    rows :func:`_patch_rows` put into the work arrays (batched: one product for every row)."""
    C = W[0][2]
    T2 = S[_S_T2]
    rowo = S[_S_ROWO]
    roww = S[_S_ROWW]
    _silu_flat(S[_S_T1F], nr * C)
    _mm_rows(S[_S_T1], nr, W[11], W[12], T2)
    _silu_flat(S[_S_T2F], nr * C)
    for o in range(nout):
        for c in range(C):
            oq[o, c] = 0.0
    for r in range(nr):
        o = rowo[r]
        w = roww[r]
        for c in range(C):
            oq[o, c] += w * T2[r, c]


@_hot
def _conv_all(S, W):
    """CA = circular k×k conv of A + b_A, and q, of every patch (from A and the per-cell rows)."""
    geo = S[_S_GEO]
    Gh = geo[2]
    Gw = geo[3]
    dims = W[0]
    k = dims[1]
    C = dims[2]
    r = dims[5]
    A = S[_S_A]
    CA = S[_S_CA]
    WAb = W[9]
    bA = W[10]
    for gi in range(Gh):
        for gj in range(Gw):
            g = gi * Gw + gj
            for c in range(C):
                CA[g, c] = bA[c]
            for a in range(k):
                ri = (gi + a - r) % Gh
                for b in range(k):
                    h = ri * Gw + (gj + b - r) % Gw
                    col = (a * k + b) * C
                    for i in range(C):
                        ai = A[h, i]
                        for o in range(C):
                            CA[g, o] += ai * WAb[i, col + o]
    # q of every patch, k·k patches per batch (the work arrays hold the rows of k·k patches)
    G = Gh * Gw
    PN = S[_S_PN]
    UW = S[_S_UW]
    GUW = S[_S_GUW]
    Q = S[_S_Q]
    T1 = S[_S_T1]
    rowo = S[_S_ROWO]
    roww = S[_S_ROWW]
    g0 = 0
    while g0 < G:
        nb = min(k * k, G - g0)
        nr = 0
        for o in range(nb):
            nr = _patch_rows(T1, rowo, roww, nr, o, UW, g0 + o, PN[g0 + o], GUW, g0 + o, CA, g0 + o)
        _rows_to_q(S, W, nr, nb, Q[g0:g0 + nb])
        g0 += nb


@_hot
def full_init(ids, types, W, S):
    """Fill every cache of ``S`` from the lattice ``ids`` (flat) and ``types``."""
    geo = S[_S_GEO]
    G = geo[4]
    pids = S[_S_PIDS]
    C = W[0][2]
    psi = S[_S_PSI]
    uw = S[_S_UW]
    cpsi = S[_S_CPSI]
    cuw = S[_S_CUW]
    for g in range(G):
        _gather_patch(ids, S, W, g, pids)
        n = _patch_features(pids, types, W, S[_S_PCELL][g], cpsi, cuw, S[_S_GPSI][g], S[_S_GUW][g], S[_S_A][g], S,
                            -1, -1, -1)
        S[_S_PN][g] = n
        for m in range(n):  # the scratch rows into the cell-slot-major caches
            for c in range(C):
                psi[m, g, c] = cpsi[m, c]
                uw[m, g, c] = cuw[m, c]
    _conv_all(S, W)
    geo[5] += 1
    geo[6] = 0
    S[_S_KEY][3] = 0


@_jit
def total_features(S):
    """Σ_g q(g) [C] from the cache."""
    q = S[_S_Q]
    out = np.zeros(q.shape[1])
    for g in range(q.shape[0]):
        for c in range(q.shape[1]):
            out[c] += q[g, c]
    return out


@_jit
def energy_from_cache(W, S):
    """Σ_g w_o·q(g) (without ``scale``)."""
    Wo = W[13]
    q = S[_S_Q]
    e = 0.0
    for g in range(q.shape[0]):
        for c in range(q.shape[1]):
            e += Wo[c] * q[g, c]
    return e


# ------------------------------------------------------------------------------------------- one attempt
@_hot
def nh_delta_q(x, new, ids, types, W, S):
    """Evaluate the attempt "copy ``new`` into flat site ``x``" into the scratch of ``S``: the outputs'
    patches ``S[_S_OUT][:n]``, their q' and Δq = q' − q.  Returns n (0: nothing seen changes)."""
    geo = S[_S_GEO]
    key = S[_S_KEY]
    Wd = geo[1]
    Gh = geo[2]
    Gw = geo[3]
    G = geo[4]
    dims = W[0]
    s = dims[0]
    k = dims[1]
    C = dims[2]
    r = dims[5]
    old = ids[x]
    i = x // Wd
    j = x - i * Wd
    key[0] = x
    key[1] = new
    key[2] = geo[5]
    key[3] = 1
    if old == new or i >= Gh * s or j >= Gw * s:
        key[4] = 0
        key[5] = 0
        key[7] = 0
        return 0
    gi = i // s
    gj = j // s
    g0 = gi * Gw + gj
    A = S[_S_A]
    CA = S[_S_CA]
    q = S[_S_Q]
    UW = S[_S_UW]
    GUW = S[_S_GUW]
    PN = S[_S_PN]
    ss = dims[4]
    mark = S[_S_MARK]
    out = S[_S_OUT]
    oca = S[_S_OCA]
    WAb = W[9]
    # the output patches first, with their cached rows prefetched (they are read after stage 1)
    nout = 0
    slot = S[_S_KSLOT]  # output slot of each kernel offset (a, b)
    for a in range(s):  # the changed patch's sites
        _prefetch(ids, (gi * s + a) * Wd + gj * s)
        _prefetch(ids, (gi * s + a) * Wd + gj * s + s - 1)
    _prefetch_row(A, g0 * C, C)
    if types[old] == types[new]:  # stage 1 then reuses the changed patch's cached rows
        for m in range(min(ss, 3)):
            _prefetch_row(S[_S_PSI], (m * G + g0) * C, C)
        _prefetch_row(S[_S_PCELL], g0 * ss, ss)
        _prefetch_row(S[_S_GPSI], g0 * C, C)
    for a in range(k):
        ro = gi - (a - r)  # periodic wrap without integer division (|a − r| ≤ r; grids may be smaller than k)
        while ro < 0:
            ro += Gh
        while ro >= Gh:
            ro -= Gh
        for b in range(k):
            co = gj - (b - r)
            while co < 0:
                co += Gw
            while co >= Gw:
                co -= Gw
            go = ro * Gw + co
            o = mark[go]
            if o < 0:
                o = nout
                mark[go] = o
                out[o] = go
                nout += 1
                _prefetch_row(CA, go * C, C)
                _prefetch_row(q, go * C, C)
                _prefetch_row(GUW, go * C, C)
                _prefetch(PN, go)
                for m in range(min(ss, 3)):  # most patches hold ≤ 3 cells (not waiting for PN)
                    _prefetch_row(UW, (m * G + go) * C, C)
            slot[a * k + b] = o
    pids = S[_S_PIDS]
    _gather_patch(ids, S, W, g0, pids)
    pids[(i - gi * s) * s + (j - gj * s)] = new
    tmp = S[_S_TMP]
    cg = S[_S_CG]
    g_reuse = g0 if types[old] == types[new] else -1
    n = _patch_features(pids, types, W, S[_S_CELL], S[_S_CPSI], S[_S_CUW], cg[0], cg[1], cg[2], S, g_reuse, old,
                        new)
    for c in range(C):
        tmp[5, c] = cg[2, c] - A[g0, c]
    for o in range(nout):
        go = out[o]
        for c in range(C):
            oca[o, c] = CA[go, c]
    # CA' = CA + W_ab·ΔA: every (a, b) block in one product ΔA·WAb (one long row), then added per output
    dca = S[_S_DCA]
    for c in range(dca.shape[0]):
        dca[c] = 0.0
    _vecmat_add(tmp[5], WAb, dca)
    for ab in range(k * k):
        o = slot[ab]
        base = ab * C
        for oo in range(C):
            oca[o, oo] += dca[base + oo]
    # stage 2 of every output patch at once: rows (output, cell or ghost) → v, accumulated into q'
    q = S[_S_Q]
    oq = S[_S_OQ]
    dq = S[_S_DQ]
    T1 = S[_S_T1]
    rowo = S[_S_ROWO]
    roww = S[_S_ROWW]
    nr = 0
    for o in range(nout):
        go = out[o]
        mark[go] = -1
        if go == g0:  # the changed patch: its after-state rows (ghost = row 1 of CG)
            nr = _patch_rows(T1, rowo, roww, nr, o, S[_S_CUW3], 0, n, cg, 1, oca, o)
        else:
            nr = _patch_rows(T1, rowo, roww, nr, o, S[_S_UW], go, S[_S_PN][go], S[_S_GUW], go, oca, o)
    _rows_to_q(S, W, nr, nout, oq)
    for o in range(nout):
        go = out[o]
        for c in range(C):
            dq[o, c] = oq[o, c] - q[go, c]
    key[4] = n
    key[5] = nout
    key[6] = g0
    key[7] = 1
    return nout


@_hot
def nh_delta(x, new, ids, types, W, S):
    """Σ_o w_o·Δq(o) of the attempt (ΔH without ``scale``); leaves the after-state in the scratch."""
    nout = nh_delta_q(x, new, ids, types, W, S)
    Wo = W[13]
    dq = S[_S_DQ]
    e = 0.0
    for o in range(nout):
        for c in range(Wo.shape[0]):
            e += Wo[c] * dq[o, c]
    return e


@_hot
def scratch_matches(x, new, S):
    key = S[_S_KEY]
    return key[3] == 1 and key[0] == x and key[1] == new and key[2] == S[_S_GEO][5]


@_hot
def nh_accept(x, new, ids, types, W, S):
    """Commit the accepted copy "``new`` into flat site ``x``" to the caches (``ids`` still the before
    state).  Uses the scratch of the last :func:`nh_delta` when it belongs to this attempt."""
    if not scratch_matches(x, new, S):
        nh_delta_q(x, new, ids, types, W, S)
    geo = S[_S_GEO]
    key = S[_S_KEY]
    key[3] = 0
    geo[5] += 1
    if key[7] == 0:
        return
    C = W[0][2]
    g0 = key[6]
    n = key[4]
    S[_S_PN][g0] = n
    cells = S[_S_CELL]
    cpsi = S[_S_CPSI]
    cuw = S[_S_CUW]
    cg = S[_S_CG]
    pcell = S[_S_PCELL]
    psi = S[_S_PSI]
    uw = S[_S_UW]
    gpsi = S[_S_GPSI]
    guw = S[_S_GUW]
    A = S[_S_A]
    CA = S[_S_CA]
    q = S[_S_Q]
    oca = S[_S_OCA]
    oq = S[_S_OQ]
    for m in range(n):
        pcell[g0, m] = cells[m]
        for c in range(C):
            psi[m, g0, c] = cpsi[m, c]
            uw[m, g0, c] = cuw[m, c]
    for c in range(C):
        gpsi[g0, c] = cg[0, c]
        guw[g0, c] = cg[1, c]
        A[g0, c] = cg[2, c]
    out = S[_S_OUT]
    for o in range(key[5]):
        go = out[o]
        for c in range(C):
            CA[go, c] = oca[o, c]
            q[go, c] = oq[o, c]
    geo[6] += 1
    if geo[6] >= geo[7]:
        _conv_all(S, W)
        geo[6] = 0


@_jit
def _maxdiff(a, b):
    err = 0.0
    for g in range(a.shape[0]):
        for c in range(a.shape[1]):
            d = abs(a[g, c] - b[g, c])
            err = max(err, d)
    return err


@_jit
def cache_error(ids, types, W, S, S2):
    """Max |cache − full recomputation| over A, CA, q (S2: a scratch state of the same shape)."""
    full_init(ids, types, W, S2)
    return max(_maxdiff(S[_S_A], S2[_S_A]), _maxdiff(S[_S_CA], S2[_S_CA]), _maxdiff(S[_S_Q], S2[_S_Q]))


# ------------------------------------------------------------------------------------------- pooled term
# pooled weights tuple P: 0 dims int64 [C, D, hidden]; 1 pos [G, D] (patch-major; [1, 0] when D = 0);
# 2 W0 [C(1+D), h] (in, out; rows in the internal Z order below); 3 b0; 4 W2 [h, h]; 5 b2; 6 w4 [h]; 7 b4 [1]
# pooled state tuple PS: 0 Z [C(1+D)]; 1 Z + ΔZ of the last attempt; 2 float [2]: F(Z), F(Z + ΔZ);
# 3 int64 [6]: x, new, feature version, valid, accepts since the refresh of Z, refresh_every; 4 tmp [6, h]
# Internal Z order: [q (C), then position block d-major: index C + d·C + c] (contiguous over channels, so
# ΔZ's outer products vectorize); the term's own order is channel-major (C + c·D + d): :meth:`Z` converts.


def pooled_weights(ev) -> tuple:
    """The pooled weights tuple of a :class:`~neuralcpm_plugin.hamiltonian.pooled_nh.PooledNHNumpy`."""
    f = _aligned
    D = int(ev.D)
    pos = ev.pos.reshape(-1, D) if D else np.zeros((1, 0))
    h = ev.W2.shape[0]
    C = int(ev.C)
    W0 = np.asarray(ev.W0, dtype=np.float64)
    W0 = np.concatenate([W0[:C], W0[C:].reshape(C, D, h).transpose(1, 0, 2).reshape(D * C, h)])  # internal order
    return (np.array([C, D, h], np.int64), f(pos), f(W0), f(ev.b0), f(ev.W2), f(ev.b2),
            f(ev.W4.reshape(-1)), f(np.asarray(ev.b4).reshape(1)))


def dummy_pooled_weights() -> tuple:
    z = lambda *sh: np.zeros(sh, np.float64)
    return (np.array([1, 0, 1], np.int64), z(1, 0), z(1, 1), z(1), z(1, 1), z(1), z(1), z(1))


def new_pooled_state(P, refresh_every: int = 1000) -> tuple:
    dims = P[0]
    dim = int(dims[0]) * (1 + int(dims[1]))
    return (_azeros(dim), _azeros(dim), np.zeros(2), np.array([0, 0, 0, 0, 0, max(int(refresh_every), 1)],
                                                                np.int64), _azeros(6, int(dims[2])))


@_hot
def _matvec4(x, M, bias, out, acc):
    """out = x @ M + bias (:func:`_vecmat_add`; acc unused, kept for the signature)."""
    for o in range(out.shape[0]):
        out[o] = bias[o]
    _vecmat_add(x, M, out)


@_hot
def pooled_F(Z, P, tmp):
    """F(Z) (without scale); tmp [6, hidden] work rows."""
    h1 = tmp[0]
    h2 = tmp[1]
    acc = tmp[2:6]
    _matvec4(Z, P[2], P[3], h1, acc)
    for c in range(h1.shape[0]):
        h1[c] = _silu(h1[c])
    _matvec4(h1, P[4], P[5], h2, acc)
    for c in range(h2.shape[0]):  # SiLU in its own loop: vectorized (the sum below is an ordered chain)
        h2[c] = _silu(h2[c])
    e = P[7][0]
    w4 = P[6]
    for c in range(h2.shape[0]):
        e += h2[c] * w4[c]
    return e


@_jit(inline="always")
def _z_add(Z, Q, n, pos, gidx, ident, C, D):
    """Z += Σ_{r<n} [Q[r], Q[r] ⊗ pos[g_r]] (internal order): the z of the patches g_r (g_r = r when
    ``ident``, else ``gidx[r]``) with q = Q[r].  Four rows per pass over Z."""
    r = 0
    while r + 4 <= n:
        for c in range(C):
            Z[c] += (Q[r, c] + Q[r + 1, c]) + (Q[r + 2, c] + Q[r + 3, c])
        g0 = r if ident else gidx[r]
        g1 = r + 1 if ident else gidx[r + 1]
        g2 = r + 2 if ident else gidx[r + 2]
        g3 = r + 3 if ident else gidx[r + 3]
        for d in range(D):
            p0 = pos[g0, d]
            p1 = pos[g1, d]
            p2 = pos[g2, d]
            p3 = pos[g3, d]
            base = C + d * C
            for c in range(C):
                Z[base + c] += (p0 * Q[r, c] + p1 * Q[r + 1, c]) + (p2 * Q[r + 2, c] + p3 * Q[r + 3, c])
        r += 4
    while r < n:
        g = r if ident else gidx[r]
        for c in range(C):
            Z[c] += Q[r, c]
        for d in range(D):
            pd = pos[g, d]
            base = C + d * C
            for c in range(C):
                Z[base + c] += Q[r, c] * pd
        r += 1


@_hot
def _pooled_Z_from_q(P, S, PS):
    dims = P[0]
    C = dims[0]
    D = dims[1]
    pos = P[1]
    q = S[_S_Q]
    Z = PS[0]
    for i in range(Z.shape[0]):
        Z[i] = 0.0
    _z_add(Z, q, q.shape[0], pos, S[_S_OUT], True, C, D)
    PS[2][0] = pooled_F(Z, P, PS[4])
    PS[3][4] = 0
    PS[3][3] = 0


@_jit
def pooled_init(ids, types, Wf, S, P, PS):
    """Fill the feature caches and Z, F(Z) from the lattice."""
    full_init(ids, types, Wf, S)
    _pooled_Z_from_q(P, S, PS)


@_hot
def pooled_delta(x, new, ids, types, Wf, S, P, PS):
    """F(Z + ΔZ) − F(Z) (ΔH without scale) of copying ``new`` into flat site ``x``."""
    nout = nh_delta_q(x, new, ids, types, Wf, S)
    key = PS[3]
    key[0] = x
    key[1] = new
    key[2] = S[_S_GEO][5]
    key[3] = 1
    Z = PS[0]
    Zn = PS[1]
    for i in range(Z.shape[0]):
        Zn[i] = Z[i]
    if nout == 0:
        PS[2][1] = PS[2][0]
        return 0.0
    dims = P[0]
    C = dims[0]
    D = dims[1]
    pos = P[1]
    dq = S[_S_DQ]
    out = S[_S_OUT]
    _z_add(Zn, dq, nout, pos, out, False, C, D)
    f = pooled_F(Zn, P, PS[4])
    PS[2][1] = f
    return f - PS[2][0]


@_hot
def pooled_accept(x, new, ids, types, Wf, S, P, PS):
    """Commit an accepted copy (``ids`` still the before state) to the feature caches and Z."""
    key = PS[3]
    if not (key[3] == 1 and key[0] == x and key[1] == new and key[2] == S[_S_GEO][5]):
        pooled_delta(x, new, ids, types, Wf, S, P, PS)
    nh_accept(x, new, ids, types, Wf, S)
    key[3] = 0
    Z = PS[0]
    Zn = PS[1]
    for i in range(Z.shape[0]):
        Z[i] = Zn[i]
    PS[2][0] = PS[2][1]
    key[4] += 1
    if key[4] >= key[5] or S[_S_GEO][6] == 0:  # also right after the features' own refresh
        _pooled_Z_from_q(P, S, PS)


# ------------------------------------------------------------------------------------------- packed calls
# One Python → numba call per ΔH (CompuCell3D): the arrays travel in a numba typed List (one cheap argument)
# instead of tuples of ~30 arrays, each of which numba would unbox on every call.
@_jit
def _type_ok(new, types, W):
    return new >= 0 and new < types.shape[0] and types[new] <= W[0][3]


@_jit
def local_delta_packed(x, new, L):
    """nh_delta with (ids, types, W, S) = L[0]; NaN when ``new`` has no valid type."""
    ids, types, W, S = L[0]
    if not _type_ok(new, types, W):
        return np.nan
    return nh_delta(x, new, ids, types, W, S)


@_jit
def local_accept_packed(x, new, L):
    ids, types, W, S = L[0]
    nh_accept(x, new, ids, types, W, S)


@_jit
def pooled_delta_packed(x, new, L, LP):
    """pooled_delta with (ids, types, W, S) = L[0], (P, PS) = LP[0]; NaN for an invalid ``new``."""
    ids, types, W, S = L[0]
    P, PS = LP[0]
    if not _type_ok(new, types, W):
        return np.nan
    return pooled_delta(x, new, ids, types, W, S, P, PS)


@_jit
def pooled_accept_packed(x, new, L, LP):
    ids, types, W, S = L[0]
    P, PS = LP[0]
    pooled_accept(x, new, ids, types, W, S, P, PS)


@_jit
def pack_lattice(ids, types, W, S):
    """``[(ids, types, W, S)]`` as a numba typed List (the same buffers), built by compiled code: numba caches
    this on disk, whereas a typed List filled from Python compiles its ``append`` for the element type afresh
    in every process (3–7 s per evaluator on this machine, paid by every CompuCell3D run)."""
    L = typed.List()
    L.append((ids, types, W, S))
    return L


@_jit
def pack_pooled(P, PS):
    """``[(P, PS)]`` as a numba typed List (the same buffers); compiled and cached as :func:`pack_lattice`."""
    L = typed.List()
    L.append((P, PS))
    return L


# ------------------------------------------------------------------------------------------- Python face
def _cached_on(evaluator, build):
    """``build(evaluator)``, kept on the evaluator (its weights never change: a parameter update makes a new
    evaluator), so every sampler built from one evaluator shares one weights tuple.  Keyed by the builder
    function itself, so another copy of this module (e.g. the one a CompuCell3D project ships) never picks up
    a tuple of a different layout."""
    cache = getattr(evaluator, "_compiled_weights", None)
    if cache is None:
        cache = {}
        try:
            evaluator._compiled_weights = cache
        except AttributeError:  # an evaluator with __slots__: no sharing
            return build(evaluator)
    w = cache.get(build)
    if w is None:
        w = cache[build] = build(evaluator)
    return w


class LocalNHCompiled:
    """Compiled ΔH of a local NH for one lattice, with caches kept by :meth:`accept`.

    ``LocalNHCompiled(evaluator)`` with a :class:`~neuralcpm_plugin.hamiltonian.local_nh.LocalNHNumpy`.
    :meth:`delta` has the numpy evaluator's signature ``delta(ids, types, site, new_id)``; the caches are
    (re)built whenever ``ids`` is another array object (or has another shape) than the bound one, or when
    :meth:`bind` is called.  After every accepted copy call :meth:`accept` *before* writing it into
    ``ids``: the caches then stay equal to a full recomputation (:meth:`cache_error`).
    """

    def __init__(self, evaluator, refresh_every: int = 4096):
        self.evaluator = evaluator
        self.scale = float(evaluator.scale)
        self.W = _cached_on(evaluator, weights_from_numpy)
        self.T = int(evaluator.T)
        self.refresh_every = int(refresh_every)
        self.S = None
        self._ids = None
        self._types = None
        self.shape = None

    @property
    def radius(self) -> int:
        return self.evaluator.radius

    def bind(self, ids, types) -> None:
        """Build the caches for the lattice ``ids`` (2-D array, kept by reference) and ``types``."""
        ids = np.asarray(ids)
        if ids.ndim != 2:
            raise ConfigError(f"local_nh compiled: needs a 2-D lattice, got shape {ids.shape}")
        types = np.asarray(types)
        if types.size and int(types.max()) > self.T:
            raise ConfigError(f"local_nh: the states hold cell type {int(types.max())} but the network was "
                             f"built for types 0..{self.T}")
        self._ids = ids
        self._types = types
        self.shape = ids.shape
        self.S = new_state(self.W, ids.shape, self.refresh_every)
        full_init(ids.reshape(-1), types, self.W, self.S)
        self._L_cache = None
        self._Wd = int(ids.shape[1])

    @property
    def _L(self):
        """(ids, types, W, S) in a numba typed List (one cheap argument for the packed calls; built on first
        use by :func:`pack_lattice`, which the exact sampler, which never uses it, need not pay)."""
        if self._L_cache is None:
            self._L_cache = pack_lattice(self._ids.reshape(-1), self._types, self.W, self.S)  # same buffers
        return self._L_cache

    def _flat(self, ids, types, site):
        if ids is not self._ids or types is not self._types or self.S is None:
            self.bind(ids, types)
        if type(site) is int or np.isscalar(site):
            return int(site)
        return int(site[0]) * self._Wd + int(site[1])

    def _bad(self, new_id):
        return ConfigError(f"{type(self).__name__}: id {new_id} has no cell type in 0..{self.T}")

    def delta(self, ids, types, site, new_id) -> float:
        """ΔH (scale included) of copying ``new_id`` into ``site`` ((row, col) or flat index)."""
        d = local_delta_packed(self._flat(ids, types, site), int(new_id), self._L)
        if d != d:  # noqa: PLR0124 (NaN: an id without a valid type)
            raise self._bad(new_id)
        return self.scale * d

    def accept(self, site, new_id) -> None:
        """Record the accepted copy of ``new_id`` into ``site`` (``ids`` still holds the before state)."""
        local_accept_packed(self._flat(self._ids, self._types, site), int(new_id), self._L)

    def energy(self) -> float:
        """H of the bound lattice from the caches (scale included)."""
        return self.scale * energy_from_cache(self.W, self.S)

    def cache_error(self) -> float:
        """Max |cached − recomputed| over A, conv(A) and q of every patch."""
        S2 = new_state(self.W, self.shape, self.refresh_every)
        return float(cache_error(self._ids.reshape(-1), self._types, self.W, self.S, S2))


class PooledNHCompiled(LocalNHCompiled):
    """Compiled ΔH of a pooled NH (ΔH = scale·(F(Z + ΔZ) − F(Z)), Z cached) for one lattice.

    ``PooledNHCompiled(evaluator)`` with a :class:`~neuralcpm_plugin.hamiltonian.pooled_nh.PooledNHNumpy`;
    same interface as :class:`LocalNHCompiled` (:meth:`delta`, :meth:`accept` before the write,
    :meth:`energy`, :meth:`cache_error` — which here also compares Z).
    """

    def __init__(self, evaluator, refresh_every: int = 4096, z_refresh_every: int = 1000):
        LocalNHCompiled.__init__(self, evaluator.features, refresh_every)
        self.pooled = evaluator
        self.scale = float(evaluator.scale)
        self.P = _cached_on(evaluator, pooled_weights)
        self.z_refresh_every = int(z_refresh_every)
        self.PS = None

    def bind(self, ids, types) -> None:
        ids = np.asarray(ids)
        self.pooled._check_shape(ids.shape)
        LocalNHCompiled.bind(self, ids, types)
        self.PS = new_pooled_state(self.P, self.z_refresh_every)
        _pooled_Z_from_q(self.P, self.S, self.PS)
        self._LP_cache = None

    @property
    def _LP(self):
        """(P, PS) in a numba typed List (built on first use, as :attr:`_L`)."""
        if self._LP_cache is None:
            self._LP_cache = pack_pooled(self.P, self.PS)
        return self._LP_cache

    def delta(self, ids, types, site, new_id) -> float:
        d = pooled_delta_packed(self._flat(ids, types, site), int(new_id), self._L, self._LP)
        if d != d:  # noqa: PLR0124 (NaN: an id without a valid type)
            raise self._bad(new_id)
        return self.scale * d

    def accept(self, site, new_id) -> None:
        pooled_accept_packed(self._flat(self._ids, self._types, site), int(new_id), self._L, self._LP)

    def Z(self) -> np.ndarray:
        """The cached Z (a copy, in the term's order: q, then q ⊗ pos channel-major)."""
        Z = self.PS[0]
        C, D = int(self.P[0][0]), int(self.P[0][1])
        return np.concatenate([Z[:C], Z[C:].reshape(D, C).T.reshape(-1)])

    def energy(self) -> float:
        return self.scale * float(self.PS[2][0])

    def cache_error(self) -> float:
        """Max of the feature caches' error and |Z − Z recomputed| / max(1, |Z|)."""
        err = LocalNHCompiled.cache_error(self)
        S2 = new_state(self.W, self.shape)
        PS2 = new_pooled_state(self.P)
        pooled_init(self._ids.reshape(-1), self._types, self.W, S2, self.P, PS2)
        dz = float(np.max(np.abs(self.PS[0] - PS2[0])) / max(1.0, float(np.max(np.abs(PS2[0])))))
        return max(err, dz)
