"""Local Neural Hamiltonian (kind ``"local_nh"``): the NH's permutation-invariant blocks with a bounded
receptive field, so that the ΔH of a copy attempt is exact from a small crop (DESIGN.md decision 2).

Definition (lattice H×W, stride s, coarse grid G = ⌊H/s⌋×⌊W/s⌋ of s×s patches, kernel k odd, r = k//2,
C channels, T biological types; sites beyond G·s are not seen, as in the NH)::

    u_c(g) = SiLU(E · [mask_c, onehot(type map)] on patch g + b)    per-cell branch (ids incl. medium)
    u_∅(g) = same with an empty mask                                 ("ghost": what an absent cell would see)
    in_c(g)  = 1 if cell c has a site in patch g
    A(g)   = Σ_c in_c(g) · (ψ(u_c(g)) − ψ(u_∅(g)))                   ψ = [Linear, SiLU]×2, sum aggregation
    v_c(g) = SiLU(W2 · SiLU(W_u u_c(g) + Conv_k×k(A)(g) + b) + b2)   interaction branch (circular on G)
    ρ_c(g) = w_o · v_c(g) + b_o                                      read-out
    H = scale · Σ_g Σ_c in_c(g) · (ρ_c(g) − ρ_∅(g))

(the k×k convolution is on A only: a cell's own features enter its term at its own patch, other cells
enter through the aggregate of the patches around it; all sums run over ids present — medium included).
Every term e(g) reads only the (k·s)×(k·s) sites of the patches around g (receptive-field radius
R = (k·s − 1)//2 sites; default s = 4, k = 3: a 12×12 window, R = 5) and a cell absent from that window
contributes exactly nothing (the gates are 0).  H is invariant to any relabelling of ids and to periodic
shifts by multiples of s on lattices divisible by s.

ΔH of copying cell ``b`` into site x (in patch g0): only u(g0), A(g0) change, hence only e(g) for
g ∈ g0 ± r (the k×k "output" patches), which read the (2k−1)×(2k−1) patches around g0.  Evaluations:

* numpy (:meth:`LocalNHNumpy.delta`, one attempt): the crop's patches plus the after-state centre patch are
  stacked; the cells of a patch are its distinct ids (equality masks, no relabelling); stage 2 runs only on
  the output patches' rows, before and after, in one pass (≈ 50 small numpy calls per attempt);
* torch, ``method="lattice"`` (default when the proposals' crops hold more patches than the lattices):
  per-patch u, A, conv(A) and e(g) of every lattice once, then per proposal only the after-state centre
  patch, conv(A) at the outputs updated by ΔA(g0), and the outputs' e(g) after;
* torch, ``method="crop"``: before and after from the stacked crop of each proposal.

Implementations of the same formula:

* :meth:`LocalNeuralHamiltonian.energy` / :meth:`~LocalNeuralHamiltonian.delta` — torch, batched;
* :class:`LocalNHNumpy` — pure numpy float64 (no torch import needed; this file can be loaded on its own,
  without the package), for host tools (CompuCell3D); :meth:`LocalNeuralHamiltonian.delta_np` uses it.
"""

from __future__ import annotations

import copy

import numpy as np

try:
    from ..errors import BundleError, ConfigError
except ImportError:  # this file loaded on its own (inside a host tool, without the package or torch)
    class ConfigError(ValueError):
        """Invalid architecture configuration."""

    class BundleError(ValueError):
        """Weights that do not match the configuration."""

__all__ = ["LOCAL_NH_DEFAULTS", "LocalNHNumpy", "LocalNeuralHamiltonian"]  # LocalNeuralHamiltonian needs torch

LOCAL_NH_DEFAULTS = {"n_types": 2, "stride": 4, "channels": 16, "kernel": 3, "dtype": "float64"}


def _complete(config):
    cfg = dict(LOCAL_NH_DEFAULTS)
    if config:
        unknown = set(config) - set(LOCAL_NH_DEFAULTS)
        if unknown:
            raise ConfigError(f"local_nh: unknown configuration key(s) {sorted(unknown)}; known keys: "
                              f"{sorted(LOCAL_NH_DEFAULTS)}")
        cfg.update(copy.deepcopy(dict(config)))
    for key in ("n_types", "stride", "channels", "kernel"):
        if int(cfg[key]) < 1:
            raise ConfigError(f"local_nh: {key} must be >= 1, got {cfg[key]}")
        cfg[key] = int(cfg[key])
    if cfg["kernel"] % 2 != 1:
        raise ConfigError(f"local_nh: kernel must be odd, got {cfg['kernel']}")
    if cfg["dtype"] not in ("float32", "float64"):
        raise ConfigError(f"local_nh: dtype must be 'float32' or 'float64', got {cfg['dtype']!r}")
    return cfg


# =========================================================================================== numpy
def _patch_labels_np(pat):
    """Per-patch cell labels of patches ``pat`` int [G, s*s] (ids, patch-major): each site's rank among the
    distinct ids of its own patch (0..n−1, in increasing id order) → ``(lab [G, s*s], nc)``, nc = the largest
    number of ids in one patch (≤ s*s).

    The network only tells cells apart inside a patch (u_c(g) reads the mask of c on g; A and q sum over the
    cells of g), so these labels give the same rows, in the same order, as a lattice-wide relabelling — but
    the (patch, cell) slot tables are sized G·nc ≤ G·s² (the lattice), not G·(number of cells)."""
    G, ss = pat.shape
    if G == 0:
        return np.zeros((0, ss), np.int64), 1
    order = np.argsort(pat, axis=1, kind="stable")
    sv = np.take_along_axis(pat, order, 1)
    first = np.ones(sv.shape, bool)
    first[:, 1:] = sv[:, 1:] != sv[:, :-1]
    rk = np.cumsum(first, 1) - 1
    lab = np.empty((G, ss), np.int64)
    np.put_along_axis(lab, order, rk, 1)
    return lab, int(rk[:, -1].max()) + 1


def _silu_np(x):
    return x / (1.0 + np.exp(-x))


def _nsilu(y):
    """−SiLU(−y) = y / (1 + e^y), in three ufunc calls (bitwise equal to −_silu_np(−y))."""
    t = np.exp(y)
    t += 1.0
    return np.divide(y, t, out=t)


class LocalNHNumpy:
    """Pure-numpy float64 evaluator of a local NH (energy and single-attempt ΔH).

    Build with :meth:`from_torch` (a :class:`LocalNeuralHamiltonian`) or :meth:`from_arrays` (the config
    and the term's tensors as numpy arrays, e.g. read with ``safetensors.numpy.load_file``) — the latter
    needs no torch.

    Conventions: ``ids`` int array (H, W) of cell ids, ``types`` int array (N+1,) with ``types[0] = 0``,
    periodic lattice, ``site`` = (row, col), copying cell ``new_id`` into ``site``.
    """

    def __init__(self, config: dict, arrays: dict, scale: float = 1.0):
        cfg = _complete(config)
        self.config = cfg
        self.scale = float(scale)
        s, C, k, T = cfg["stride"], cfg["channels"], cfg["kernel"], cfg["n_types"]
        self.s, self.C, self.k, self.r, self.T = s, C, k, k // 2, T
        f = lambda name: np.asarray(arrays[name], dtype=np.float64)
        ew = f("embed.weight")  # [C, 2+T, s, s]
        if ew.shape != (C, 2 + T, s, s):
            raise BundleError(f"local_nh: embed.weight has shape {ew.shape}, expected {(C, 2 + T, s, s)}")
        self.Em = np.ascontiguousarray(ew[:, 0].reshape(C, s * s).T)  # [s*s, C]
        # type table: Et[pos, type, C]
        self.Et = np.ascontiguousarray(ew[:, 1:].reshape(C, T + 1, s * s).transpose(2, 1, 0))
        self.Et_flat = np.ascontiguousarray(self.Et.reshape(s * s * (T + 1), C))
        self._types = np.arange(T + 1)
        self.b = f("embed.bias")
        self.W1, self.b1 = f("psi1.weight").T.copy(), f("psi1.bias")
        self.W2, self.b2 = f("psi2.weight").T.copy(), f("psi2.bias")
        self.Wu = f("phi_u.weight").T.copy()
        aw = f("phi_a.weight")  # [C, C, k, k]
        self.WA = np.ascontiguousarray(aw.transpose(2, 3, 1, 0).reshape(k * k * C, C))
        self.bA = f("phi_a.bias")
        self.W3, self.b3 = f("phi2.weight").T.copy(), f("phi2.bias")
        # the read-out (absent from a pooled term's feature block, which uses q(g) itself)
        self.Wo = f("out.weight")[0].copy() if "out.weight" in arrays else None
        self.bo = float(f("out.bias")[0]) if "out.bias" in arrays else 0.0
        self._pos = np.arange(s * s)
        # pattern tables: the mask embedding of any occupancy pattern of a chunk of ≤ 16 patch positions
        nq = -(-(s * s) // 16)
        size = -(-(s * s) // nq)
        self._chunk_w, self._tabm = [], []
        for q in range(nq):
            pos = np.arange(q * size, min((q + 1) * size, s * s))
            w = np.zeros(s * s)
            w[pos] = 2.0 ** np.arange(pos.size)
            bits = (np.arange(2 ** pos.size)[:, None] >> np.arange(pos.size)[None]) & 1
            self._chunk_w.append(w)
            self._tabm.append(np.ascontiguousarray(bits.astype(np.float64) @ self.Em[pos]))
        self._mnp = np.arange(4 * 25 * 25)  # grows on demand (see _terms)
        self._geom = {}
        self._init_delta_tables()

    def _init_delta_tables(self):
        """Per-evaluator constants of :meth:`delta`: crop geometry (index arrays), the type one-hot table."""
        s, k, r, T = self.s, self.k, self.r, self.T
        ss = s * s
        n = 2 * k - 1  # crop side in patches
        NP = n * n
        c = NP // 2
        self._d_NP, self._d_c = NP, c
        orow = np.arange(r, n - r)  # the k×k output patches (those whose term can change)
        ri = orow[:, None] + np.arange(-r, r + 1)[None]
        gidx = (ri[:, None, :, None] * n + ri[None, :, None, :]).reshape(orow.size * orow.size, k * k)
        op = (orow[:, None] * n + orow[None, :]).ravel()
        NO = op.size
        # stacked patches: rows 0..NP-1 the before crop, row NP the after-state centre patch
        self._d_rows = np.r_[np.arange(NP), c]
        after = np.arange(NP)
        after[c] = NP
        self._d_gidx = np.concatenate([gidx, after[gidx]])  # [2*NO, k*k] aggregates read by each output
        D = 2 * NO  # a dummy output row: patches that are not outputs (weight 0)
        oidx = np.full(NP + 1, D)
        oidx[op] = np.arange(NO)
        oB = oidx.copy()
        oB[NP] = D
        oA = np.where(oidx < D, oidx + NO, D)
        oA[c], oA[NP] = D, oidx[c] + NO
        self._d_oB, self._d_oA = oB, oA  # output row (before / after) of each stacked patch
        self._d_wB, self._d_wA = -(oB < D).astype(np.float64), (oA < D).astype(np.float64)
        self._d_pcol = np.arange(NP + 1)[:, None]
        self._d_ghost = np.concatenate([op, after[op]])  # ghost rows of the outputs, before then after
        self._d_NO = NO
        self._d_ar = np.arange(ss)
        self._d_ss = ss
        self._d_eyeT = np.eye(T + 1)
        self._d_arR = np.arange(4 * NP * ss)  # ≥ any number of rows
        self._d_oBA = np.concatenate([oB, oA])  # output row of a (stacked patch, before/after) pair
        self._d_wBA = np.concatenate([self._d_wB, self._d_wA])
        self._d_ar2 = np.arange(2 * NO)
        # negated tables: the network is evaluated on y = −z (exactly: negation commutes with every
        # product and sum), so that SiLU(z) = −y/(1+e^y) costs three ufunc calls (see _nsilu)
        self._n_Em = -self.Em
        self._n_Et = -(self.Et_flat + self.b / ss)  # every site has exactly one type: the bias rides along
        self._n_b1, self._n_b2, self._n_bA, self._n_b3 = -self.b1, -self.b2, -self.bA, -self.b3

    @classmethod
    def from_torch(cls, term) -> LocalNHNumpy:
        arrays = {k: v.detach().cpu().double().numpy() for k, v in term.tensors().items()}
        return cls(term.config, arrays, term.scale_value())

    @classmethod
    def from_arrays(cls, config: dict, arrays: dict, scale: float = 1.0) -> LocalNHNumpy:
        return cls(config, arrays, scale)

    @property
    def radius(self) -> int:
        return (self.k * self.s - 1) // 2

    # --- core: per-crop energy terms ------------------------------------------------------------
    def _out_geometry(self, Pr, Pc, valid: bool):
        """(patch indices [NO, k*k] read by each output's k×k conv, output patches [NO], is-output [NP],
        output index of each patch [NP] (-1 if not an output))."""
        key = ("out", Pr, Pc, valid)
        g = self._geom.get(key)
        if g is None:
            r = self.r
            if valid:
                orow, ocol = np.arange(r, Pr - r), np.arange(r, Pc - r)
            else:
                orow, ocol = np.arange(Pr), np.arange(Pc)
            ri = (orow[:, None] + np.arange(-r, r + 1)[None]) % Pr  # [Po, k]
            ci = (ocol[:, None] + np.arange(-r, r + 1)[None]) % Pc
            gidx = (ri[:, None, :, None] * Pc + ci[None, :, None, :]).reshape(len(orow) * len(ocol), -1)
            op = (orow[:, None] * Pc + ocol[None, :]).ravel()
            oidx = np.full(Pr * Pc, -1)
            oidx[op] = np.arange(op.size)
            g = (gidx, op, oidx >= 0, oidx)
            self._geom[key] = g
        return g[:3]

    def _terms(self, lp, tp, nc: int, Pr: int, Pc: int, valid: bool):
        """Σ of e(g) = w_o·q(g) over the output patches of one or more crops → [M] (see :meth:`_terms_q`)."""
        M = lp.shape[0]
        return (self._terms_q(lp, tp, nc, Pr, Pc, valid) @ self.Wo).reshape(M, -1).sum(1)

    def _terms_q(self, lp, tp, nc: int, Pr: int, Pc: int, valid: bool):
        """q(g) = Σ_c in_c(g)·(v_c(g) − v_∅(g)) of the output patches of one or more crops.

        lp : int [M, NP, s*s] local cell labels 0..nc-1 of the sites of each patch (patch-major order);
        tp : int [M, NP, s*s] their types.  valid=True: the outputs are the interior patches (valid k×k
        conv); False: all patches, circular.  Returns [M*NO, C] float64 (crop-major, outputs in row-major
        order of the patch grid); the energy terms are e(g) = w_o·q(g) (without ``scale``).
        Only the occupied (crop, patch, cell) rows are evaluated; the ghost once per (crop, patch).
        """
        M, NP, _ = lp.shape
        C = self.C
        if self._mnp.size < M * NP:
            self._mnp = np.arange(M * NP)
        gidx, op, isout = self._out_geometry(Pr, Pc, valid)
        NO = len(op)
        silu = _silu_np
        toh = (tp[..., None] == self._types).reshape(M * NP, -1).astype(np.float64)  # [M*NP, s*s*(T+1)]
        tpart = toh @ self.Et_flat
        tpart += self.b  # [M*NP, C]
        # occupancy bit patterns of every (crop, patch, cell): one bincount per chunk of ≤ 16 positions
        key = (self._mnp[: M * NP].reshape(M, NP, 1) * nc + lp).reshape(-1)
        n_slots = M * NP * nc
        R = np.flatnonzero(np.bincount(key, minlength=n_slots))  # occupied slots, sorted by (crop, patch)
        mp = R // nc
        nR = R.size
        pre = np.empty((nR + M * NP, C))
        pre[:nR] = tpart[mp]
        for q, (w, tab) in enumerate(zip(self._chunk_w, self._tabm)):
            wt = self._geom.get(("w", q, M * NP))
            if wt is None:
                wt = self._geom[("w", q, M * NP)] = np.tile(w, M * NP)
            pat = np.bincount(key, weights=wt, minlength=n_slots)[R].astype(np.int64)
            pre[:nR] += tab[pat]
        pre[nR:] = tpart
        u = silu(pre)  # rows: occupied cells, then the ghost of every (crop, patch)
        psi = silu(silu(u @ self.W1 + self.b1) @ self.W2 + self.b2)
        full = np.zeros((n_slots, C))
        full[R] = psi[:nR]
        full[R] -= psi[nR:][mp]
        A = full.reshape(M * NP, nc, C).sum(1)
        mI = mp // NP
        pI = mp - mI * NP
        CA = A.reshape(M, NP, C)[:, gidx].reshape(M * NO, -1) @ self.WA
        CA += self.bA  # [M*NO, C]
        sel = np.flatnonzero(isout[pI])  # occupied rows at output patches
        orow = mI[sel] * NO + self._geom[("out", Pr, Pc, valid)][3][pI[sel]]
        ug = u[nR:].reshape(M, NP, C)[:, op].reshape(M * NO, C)
        h = np.concatenate([u[sel], ug]) @ self.Wu
        h[: sel.size] += CA[orow]
        h[sel.size:] += CA
        v = silu(silu(h) @ self.W3 + self.b3)  # (the read-out bias cancels in ρ_c − ρ_∅)
        q = -np.bincount(orow, minlength=M * NO)[:, None] * v[sel.size:]  # − n_cells(g)·v_∅(g)
        np.add.at(q, orow, v[: sel.size])
        return q

    def _patch_order(self, Sr, Sc):
        """Flat indices that reorder an (Sr, Sc) crop into patch-major order [NP, s*s]."""
        key = ("po", Sr, Sc)
        g = self._geom.get(key)
        if g is None:
            s = self.s
            rr, cc = np.arange(Sr), np.arange(Sc)
            idx = (rr[:, None] * Sc + cc[None]).reshape(Sr // s, s, Sc // s, s).transpose(0, 2, 1, 3)
            g = idx.reshape((Sr // s) * (Sc // s), s * s)
            self._geom[key] = g
        return g

    # --- public API -------------------------------------------------------------------------------
    def energy(self, ids, types) -> float:
        """Full energy H (float, scale included) of one periodic state."""
        return self.scale * float((self.patch_q(ids, types) @ self.Wo).sum())

    def patch_q(self, ids, types):
        """q(g) [Gh*Gw, C] of every patch of one periodic state (row-major on the ⌊H/s⌋×⌊W/s⌋ grid); the
        energy is scale·Σ_g w_o·q(g)."""
        ids = np.asarray(ids)
        types = np.asarray(types)
        s = self.s
        Gh, Gw = ids.shape[0] // s, ids.shape[1] // s
        seen = ids[: Gh * s, : Gw * s]
        po = self._patch_order(Gh * s, Gw * s)
        pat = seen.reshape(-1)[po]  # [G, s*s] patch-major
        lab, nc = _patch_labels_np(pat)
        t = types[pat]
        return self._terms_q(lab[None], t[None], nc, Gh, Gw, valid=False)

    def _crop_index(self, shape, site):
        """Flat lattice indices [NP+1, s*s] of the crop around ``site`` in patch-major order followed by its
        centre patch once more (the stacked patches of :meth:`_crop_delta`), and the site's position in the
        centre patch."""
        s, r = self.s, self.r
        Gh, Gw = shape[0] // s, shape[1] // s
        i, j = int(site[0]), int(site[1])
        gi, gj = i // s, j // s
        key = (shape, gi, gj)
        g = self._geom.get(key)
        if g is None:
            d = np.arange(-2 * r, 2 * r + 1)
            rows = (((gi + d) % Gh)[:, None] * s + np.arange(s)).ravel()
            cols = (((gj + d) % Gw)[:, None] * s + np.arange(s)).ravel()
            flat = rows[:, None] * shape[1] + cols[None, :]
            g = flat.reshape(-1)[self._patch_order(len(rows), len(cols))]
            g = g[self._d_rows]  # stacked: the crop's patches, then its centre patch again (the after state)
            if len(self._geom) > 200000:
                self._geom.clear()
            self._geom[key] = g
        return g, (i - gi * s) * s + (j - gj * s)

    def delta(self, ids, types, site, new_id) -> float:
        """ΔH (float, scale included) of copying cell ``new_id`` into ``site`` = (row, col).

        On lattices of at least 2k−1 patches per side from the per-lattice cache (see :meth:`cached_dq`;
        synchronised with ``ids`` first), else by full recomputation.  :meth:`delta_crop` is the cache-free
        form (the crop of (2k−1)² patches around the site; the tests' oracle).
        """
        ids = np.asarray(ids)
        i, j = int(site[0]), int(site[1])
        if ids[i, j] == new_id:
            return 0.0
        s, k = self.s, self.k
        if ids.shape[0] // s < 2 * k - 1 or ids.shape[1] // s < 2 * k - 1:
            return self.delta_crop(ids, types, site, new_id)
        dq, _ = self.cached_dq(ids, np.asarray(types), site, new_id)
        return self.scale * float(dq.sum(0) @ self.Wo)

    def delta_crop(self, ids, types, site, new_id) -> float:
        """ΔH of one attempt from the crop around the site, no cache (full recomputation on small lattices)."""
        s = self.s
        H, W = ids.shape
        i, j = int(site[0]), int(site[1])
        old = ids[i, j]
        if old == new_id:
            return 0.0
        Gh, Gw = H // s, W // s
        if i >= Gh * s or j >= Gw * s:
            return 0.0  # a site the network does not see
        if Gh < 2 * self.k - 1 or Gw < 2 * self.k - 1:  # the crop would wrap onto itself: evaluate in full
            after = np.array(ids, copy=True)
            after[i, j] = new_id
            return self.energy(after, types) - self.energy(ids, types)
        idx, c = self._crop_index((H, W), (i, j))
        return self.scale * self._crop_delta(ids.reshape(-1)[idx], np.asarray(types), c, new_id)

    # --- per-lattice cache: the "lattice" form of ΔH -----------------------------------------------------
    #: incremental cache updates between two rebuilds from scratch (bounds float drift)
    cache_refresh_every = 1000
    #: more changed sites than this since the last call: rebuild instead of updating
    max_incremental = 16

    def _v(self, h):
        """Interaction-branch output v = SiLU(W3·SiLU(h) + b3) of pre-activations h = φ_u(u) + conv(A)."""
        return _silu_np(_silu_np(h) @ self.W3 + self.b3)

    def _stage1_patches(self, pat, tp):
        """Stage 1 of M patches (ids / types [M, s*s], row-major sites): ``(pr [nR] patch of each (patch, cell)
        row, u [nR, C], ug [M, C] ghost features, A [M, C] aggregate, cnt [M] cells per patch)``."""
        M, ss = pat.shape
        eq = pat[:, :, None] == pat[:, None, :]
        first = eq.argmax(2) == self._d_ar
        R = first.ravel().nonzero()[0]
        pr = R // ss
        cnt = first.sum(1)
        tpart = self._d_eyeT[tp].reshape(M, -1) @ self.Et_flat + self.b
        u = _silu_np(eq.reshape(-1, ss)[R] @ self.Em + tpart[pr])
        ug = _silu_np(tpart)

        def psi(x):
            return _silu_np(_silu_np(x @ self.W1 + self.b1) @ self.W2 + self.b2)

        A = -cnt[:, None] * psi(ug)
        np.add.at(A, pr, psi(u))
        return pr, u, ug, A, cnt

    def _q_rows(self, uW, cnt, ugW, CA):
        """q of N patches from their padded rows φ_u(u) [N, K, C] (the first cnt[n] valid), ghosts' φ_u(u_∅)
        [N, C] and conv(A) [N, C] (bias included) → [N, C]."""
        K = uW.shape[1]
        v = self._v(uW + CA[:, None])
        v *= (np.arange(K) < cnt[:, None])[..., None]
        return v.sum(1) - cnt[:, None] * self._v(ugW + CA)

    def _cache_build(self, ids, types):
        """Per-patch quantities of one lattice: padded rows φ_u(u) [G, K, C], cell counts, ghosts' φ_u(u_∅), A,
        conv(A), q — the state :meth:`cached_dq` updates."""
        s, C, k, r = self.s, self.C, self.k, self.r
        Gh, Gw = ids.shape[0] // s, ids.shape[1] // s
        G = Gh * Gw
        pat = ids[: Gh * s, : Gw * s].reshape(Gh, s, Gw, s).transpose(0, 2, 1, 3).reshape(G, s * s)
        pr, u, ug, A, cnt = self._stage1_patches(pat, types[pat])
        K = max(int(cnt.max()), 1)
        rank = np.arange(pr.size) - (np.cumsum(cnt) - cnt)[pr]
        uW = np.zeros((G, K, C))
        uW[pr, rank] = u @ self.Wu
        ugW = ug @ self.Wu
        g = np.arange(G)
        dk = np.arange(-r, r + 1)
        win = ((((g // Gw)[:, None, None] + dk[:, None]) % Gh) * Gw + ((g % Gw)[:, None, None] + dk[None, :]) % Gw)
        win = win.reshape(G, k * k)  # the k×k patches around each patch, row-major offsets −r..r
        CA = A[win].reshape(G, k * k * C) @ self.WA + self.bA
        if not hasattr(self, "_Wcat"):
            # ΔCA at the outputs g0 + (dy, dx) of a change ΔA at g0: ΔA @ W[kernel position (r−dy, r−dx)]
            Wk = self.WA.reshape(k * k, C, C)
            self._Wcat = np.ascontiguousarray(Wk[::-1].transpose(1, 0, 2).reshape(C, k * k * C))
        self._cache = {"ids": np.array(ids, copy=True), "types": np.array(types, copy=True), "uW": uW,
                       "cnt": cnt, "ugW": ugW, "A": A, "CA": CA, "q": self._q_rows(uW, cnt, ugW, CA), "win": win,
                       "Gw": Gw, "n": 0}
        self._clast = None

    def _cache_sync(self, ids, types) -> bool:
        """Bring the cache to this lattice: sites changed since (≤ max_incremental) are applied as accepted
        copies; a refresh that is due rebuilds.  Another lattice (or new types, or many changes) is cached only
        when the next call sees it again (≤ max_incremental changes later): callers that alternate between
        lattices keep the crop form instead of rebuilding at every call.  Returns whether the cache holds
        ``ids`` now."""
        c = getattr(self, "_cache", None)
        if (c is None or c["ids"].shape != ids.shape or c["types"].shape != types.shape
                or not np.array_equal(c["types"], types)):
            return self._cache_pending(ids, types)
        cf, nf = c["ids"].reshape(-1), ids.reshape(-1)
        diff = np.flatnonzero(cf != nf)
        if diff.size == 0:
            return True
        if diff.size > self.max_incremental:
            return self._cache_pending(ids, types)
        if c["n"] + diff.size > self.cache_refresh_every:
            self._cache_build(ids, types)
            return True
        W = ids.shape[1]
        for x in diff:
            x = int(x)
            last = self._clast
            if not (last is not None and last[0] == x and last[1] == cf[x] and last[2] == nf[x]):
                self._cached_dq_of(c["ids"], types, divmod(x, W), nf[x])
            if self._clast is None:  # a site the network does not see
                cf[x] = nf[x]
                continue
            self._cache_apply()
        return True

    def _cache_pending(self, ids, types) -> bool:
        p = getattr(self, "_pend", None)
        if (p is not None and p[0].shape == ids.shape and p[1].shape == types.shape and np.array_equal(p[1], types)
                and np.count_nonzero(p[0] != ids) <= self.max_incremental):
            self._pend = None
            self._cache_build(ids, types)
            return True
        self._pend = (np.array(ids, copy=True), np.array(types, copy=True))
        return False

    def _cache_apply(self):
        """Write the last evaluated attempt (``_clast``) into the cache: it was accepted."""
        c = self._cache
        x, _, new, g0, og, uWc, n0, ugWc, A0, CAo, qa = self._clast
        K = c["uW"].shape[1]
        if n0 > K:
            c["uW"] = np.concatenate([c["uW"], np.zeros((c["uW"].shape[0], n0 - K, self.C))], 1)
        c["uW"][g0] = 0.0
        c["uW"][g0, :n0] = uWc
        c["cnt"][g0] = n0
        c["ugW"][g0] = ugWc
        c["A"][g0] = A0
        c["CA"][og] = CAo
        c["q"][og] = qa
        c["ids"].reshape(-1)[x] = new
        c["n"] += 1
        self._clast = None

    def cached_dq(self, ids, types, site, new_id):
        """Δq [k*k, C] of the k×k output patches around ``site`` (row-major offsets) and their patch indices
        [k*k], from the per-lattice cache (synchronised with ``ids`` first).

        Per attempt: stage 1 of the changed patch only, conv(A) at the outputs updated by its ΔA, stage 2 on
        the outputs' cell rows — the numpy twin of the torch ``method="lattice"``.  The cache follows the
        lattice by itself (it compares ``ids`` with its own copy and applies the changed sites as accepted
        copies, reusing this evaluation when it is the one accepted) and is rebuilt from scratch every
        :attr:`cache_refresh_every` updates.
        """
        if self._cache_sync(ids, types):
            return self._cached_dq_of(ids, types, site, new_id)
        # not cached (yet): the crop form
        s, r = self.s, self.r
        i, j = int(site[0]), int(site[1])
        H, W = ids.shape
        Gh, Gw = H // s, W // s
        gi, gj = i // s, j // s
        dk = np.arange(-r, r + 1)
        og = (((gi + dk) % Gh)[:, None] * Gw + ((gj + dk) % Gw)[None]).ravel()
        if ids[i, j] == new_id or i >= Gh * s or j >= Gw * s:
            return np.zeros((self.k * self.k, self.C)), og
        idx, c = self._crop_index((H, W), (i, j))
        return self._crop_dq(ids.reshape(-1)[idx], types, c, new_id), og

    def _cached_dq_of(self, ids, types, site, new_id):
        c = self._cache
        s, C, k = self.s, self.C, self.k
        kk = k * k
        i, j = int(site[0]), int(site[1])
        if ids[i, j] == new_id or i >= (ids.shape[0] // s) * s or j >= (ids.shape[1] // s) * s:
            self._clast = None  # no change, or a site the network does not see
            return np.zeros((kk, C)), c["win"][0]
        gi, gj = i // s, j // s
        g0 = gi * c["Gw"] + gj
        og = c["win"][g0]
        pat = np.array(ids[gi * s:(gi + 1) * s, gj * s:(gj + 1) * s]).reshape(1, s * s)
        pat[0, (i - gi * s) * s + (j - gj * s)] = new_id
        _, u, ug, A0, cnt0 = self._stage1_patches(pat, types[pat])
        CAo = c["CA"][og] + ((A0[0] - c["A"][g0]) @ self._Wcat).reshape(kk, C)
        n0 = int(cnt0[0])
        uWo = c["uW"][og]
        if n0 > uWo.shape[1]:
            uWo = np.concatenate([uWo, np.zeros((kk, n0 - uWo.shape[1], C))], 1)
        jc = kk // 2
        uWc, ugWc = u @ self.Wu, ug[0] @ self.Wu
        uWo[jc] = 0.0
        uWo[jc, :n0] = uWc
        cnto = c["cnt"][og].copy()
        cnto[jc] = n0
        ugWo = c["ugW"][og].copy()
        ugWo[jc] = ugWc
        qa = self._q_rows(uWo, cnto, ugWo, CAo)
        self._clast = (i * ids.shape[1] + j, ids[i, j], new_id, g0, og, uWc, n0, ugWc, A0[0], CAo, qa)
        return qa - c["q"][og], og

    def _crop_delta(self, crop, types, c: int, new_id) -> float:
        """e(after) − e(before) (without ``scale``) of a crop; see :meth:`_crop_nv`."""
        nv, oc, w = self._crop_nv(crop, types, c, new_id)
        nrho = nv @ self.Wo  # −ρ (the read-out bias cancels in ρ_c − ρ_∅)
        # ΔH = Σ_after rows (ρ_c − ρ_∅) − Σ_before rows (ρ_c − ρ_∅)
        n2 = oc.size
        return float(np.bincount(oc, weights=w, minlength=2 * self._d_NO) @ nrho[n2:] - w @ nrho[:n2])

    def _crop_dq(self, crop, types, c: int, new_id):
        """Δq = q(after) − q(before) [k*k, C] of the k×k output patches around the copied site (row-major,
        offsets −r..r from its patch); same arguments as :meth:`_crop_delta`."""
        nv, oc, w = self._crop_nv(crop, types, c, new_id)
        n2, NO = oc.size, self._d_NO
        # Q[o] = Σ_{rows at o} w·v − (Σ_{rows at o} w)·v_∅(o): −q(before) at o < NO, q(after) at NO + o
        Q = ((oc == self._d_ar2[:, None]) * w) @ nv[:n2]
        Q -= np.bincount(oc, weights=w, minlength=2 * NO)[:, None] * nv[n2:]
        return -(Q[:NO] + Q[NO:])

    def _crop_nv(self, crop, types, c: int, new_id):
        """The interaction-branch outputs of a crop before and after a copy (the core of :meth:`_crop_delta`). whose site ``c`` (position in the centre patch)
        takes ``new_id``.  ``crop`` [NP+1, s*s]: the cell ids of the crop's NP patches (patch-major) followed
        by its centre patch once more (overwritten here with the after state; pass a fresh array).

        Only the centre patch differs between the two states, so stage 1 (per-cell features u, aggregate A)
        runs on the NP before-patches plus the one after-centre patch; cells are the distinct ids of each
        patch (first occurrence in the patch), their masks are equality rows — no relabelling needed.
        Stage 2 runs on the k×k output patches of both states at once.

        Returns ``(nv, oc, w)``: −v of the n2 = ``oc.size`` cell rows of the output patches (before and
        after) followed by the 2·NO ghost rows (outputs before, then after); ``oc`` [n2] the output row of each
        cell row (0..NO−1 before, NO..2NO−1 after), ``w`` [n2] −1 before, +1 after.
        """
        NP = self._d_NP
        pat = crop  # [NP+1, ss] stacked patches (a fresh array: gathered by the caller)
        pat[NP, c] = new_id
        eq = pat[:, :, None] == pat[:, None, :]  # [NP+1, ss, ss] same cell
        first = eq.argmax(2) == self._d_ar  # the first site of each (patch, cell)
        R = first.ravel().nonzero()[0]  # one row per (patch, cell), sorted by patch
        pr = R // self._d_ss
        cnt = first.sum(1)  # cells per patch (≥ 1)
        nR = pr.size
        # y = −(pre-activation of u): rows of the cells, then the ghosts
        ty = self._d_eyeT[types[pat]].reshape(NP + 1, -1) @ self._n_Et  # [NP+1, C] −(type part + bias)
        y = ty[np.concatenate([pr, self._d_arR[:NP + 1]])]
        y[:nR] += np.take(eq.reshape(-1, self._d_ss), R, axis=0) @ self._n_Em
        nu = _nsilu(y)  # −u
        y = nu @ self.W1
        y += self._n_b1
        y = _nsilu(y) @ self.W2
        y += self._n_b2
        npsi = _nsilu(y)  # −ψ(u)
        # −A of each stacked patch: Σ_cells −ψ(u_c) − n_cells·(−ψ(u_∅))
        nA = (pr == self._d_pcol) @ npsi[:nR]
        nA -= cnt[:, None] * npsi[nR:]
        NO = self._d_NO
        nCA = nA[self._d_gidx].reshape(2 * NO, -1) @ self.WA  # −conv(A) at the outputs before, then after
        nCA += self._n_bA
        # rows of stage 2: the cell rows of the output patches before, and after, then the ghosts
        idx = np.concatenate([pr, pr + (NP + 1)])  # (stacked patch, before/after) of each candidate row
        sel = np.flatnonzero(self._d_wBA[idx])
        idx = idx[sel]
        oc = self._d_oBA[idx]  # its output
        w = self._d_wBA[idx]  # −1 before, +1 after
        y = (nu @ self.Wu)[np.concatenate([sel % nR, nR + self._d_ghost])]
        y += nCA[np.concatenate([oc, self._d_ar2])]
        y = _nsilu(y) @ self.W3
        y += self._n_b3
        return _nsilu(y), oc, w  # −v


# =========================================================================================== torch
try:  # the numpy evaluator above must stay importable without torch (inside host tools)
    import torch
    import torch.nn.functional as F
    from torch import nn

    from .base import Batch, ConfigTerm, register_term
except ImportError:  # pragma: no cover - torch-free environment, or this file loaded on its own
    torch = None

if torch is not None:

    _DT = {"float32": torch.float32, "float64": torch.float64}

    @register_term
    class LocalNeuralHamiltonian(ConfigTerm):
        """Local NH term (kind ``"local_nh"``); see the module docstring for the definition.

        Parameters
        ----------
        config : dict, optional
            ``n_types`` (T), ``stride`` (s, sites per patch side; default 4), ``channels`` (C, 16),
            ``kernel`` (k, odd, coarse interaction kernel; 3), ``dtype`` ("float64" default).
        scale : float or nn.Parameter
            Multiplies the energy (w_n of a closure model when shared).
        seed : int, optional
            Deterministic initialisation.
        """

        kind = "local_nh"
        analytic = False
        delta_differentiable = True  # delta(): exact from crops / per-patch quantities, autograd-friendly

        def __init__(self, config=None, *, scale=1.0, learn_scale=False, seed=None):
            super().__init__(scale, learn_scale)
            self.config = _complete(config)
            cfg = self.config
            s, C, k, T = cfg["stride"], cfg["channels"], cfg["kernel"], cfg["n_types"]
            with torch.random.fork_rng(devices=[], enabled=seed is not None):
                if seed is not None:
                    torch.manual_seed(int(seed))
                self.embed = nn.Conv2d(2 + T, C, s, stride=s)
                self.psi1 = nn.Linear(C, C)
                self.psi2 = nn.Linear(C, C)
                self.phi_u = nn.Linear(C, C, bias=False)
                self.phi_a = nn.Conv2d(C, C, k)
                self.phi2 = nn.Linear(C, C)
                self.out = nn.Linear(C, 1)
            for m in (self.embed, self.psi1, self.psi2, self.phi_u, self.phi_a, self.phi2, self.out):
                m.to(_DT[cfg["dtype"]])
            self._np = None
            self._np_version = None

        # --- helpers --------------------------------------------------------------------------
        @property
        def dtype(self):
            return self.embed.weight.dtype

        @property
        def radius(self) -> int:
            """Receptive-field radius R = (k·s − 1)//2 sites of each energy term."""
            return (self.config["kernel"] * self.config["stride"] - 1) // 2

        def _check_types(self, types):
            if types.numel() and int(types.max()) > self.config["n_types"]:
                raise ConfigError(f"local_nh: the states hold cell type {int(types.max())} but the network was "
                                  f"built for types 0..{self.config['n_types']}")

        def _stage1(self, lab, tmap, nc: int):
            """Per-patch quantities of crops: lab, tmap long [M, Sr, Sc] (Sr, Sc multiples of s).

            Returns ``(tpart [M*NP, C] type part + bias, mpR [nR] crop*NP + patch of each occupied
            (crop, patch, cell) row, uR [nR, C] its per-cell features, A [M*NP, C] aggregate)``.
            """
            cfg = self.config
            s, C, T = cfg["stride"], cfg["channels"], cfg["n_types"]
            M, Sr, Sc = lab.shape
            Pr, Pc = Sr // s, Sc // s
            NP = Pr * Pc
            dev = lab.device
            dt = self.dtype
            rr, cc = torch.arange(Sr, device=dev), torch.arange(Sc, device=dev)
            pidx = ((rr // s)[:, None] * Pc + (cc // s)[None]).reshape(-1)  # patch of each crop site
            pos = ((rr % s)[:, None] * s + (cc % s)[None]).reshape(-1)  # position inside its patch
            # a cell's (or a type's) occupancy of a patch is a bit pattern, split into chunks of 8 positions;
            # the embedding of a pattern is a table lookup (tables = bits @ weights, differentiable)
            nq = (s * s + 7) // 8
            q = pos // 8
            bit = torch.bitwise_left_shift(torch.ones_like(pos), pos % 8)
            W = self.embed.weight
            wpos = torch.cat([W.reshape(C, 2 + T, s * s),
                              torch.zeros((C, 2 + T, nq * 8 - s * s), dtype=dt, device=dev)], 2)
            bits = ((torch.arange(256, device=dev)[:, None] >> torch.arange(8, device=dev)) & 1).to(dt)  # [256, 8]
            tab = torch.einsum("pb,cjqb->jqpc", bits, wpos.view(C, 2 + T, nq, 8))  # [2+T, nq, 256, C]
            mbase = torch.arange(M, device=dev)[:, None] * NP + pidx[None]  # [M, S]
            # type part (shared by all cells of a patch, and the ghost)
            k2 = ((mbase * (T + 1) + tmap.reshape(M, -1)) * nq + q[None]).reshape(-1)
            pat_t = torch.zeros(M * NP * (T + 1) * nq, dtype=torch.long, device=dev).index_add_(
                0, k2, bit.repeat(M)).view(M * NP, T + 1, nq)
            tt = torch.arange(T + 1, device=dev)[:, None]
            qq = torch.arange(nq, device=dev)[None]
            tpart = tab[1 + tt, qq, pat_t].sum((1, 2)) + self.embed.bias  # [M*NP, C]
            # mask part, on occupied (crop, patch, cell) rows only
            k1 = ((mbase * nc + lab.reshape(M, -1)) * nq + q[None]).reshape(-1)
            pat_m = torch.zeros(M * NP * nc * nq, dtype=torch.long, device=dev).index_add_(
                0, k1, bit.repeat(M)).view(M * NP * nc, nq)
            R = torch.nonzero(pat_m.any(1))[:, 0]
            mp = tab[0, qq, pat_m[R]].sum(1)  # [nR, C]
            mpR = R // nc  # crop*NP + patch
            uR = F.silu(mp + tpart[mpR])
            ug = F.silu(tpart)
            psiR = F.silu(self.psi2(F.silu(self.psi1(uR))))
            psig = F.silu(self.psi2(F.silu(self.psi1(ug))))
            A = torch.zeros((M * NP, C), dtype=dt, device=dev).index_add(0, mpR, psiR - psig[mpR])
            return tpart, mpR, uR, A

        def _stage2(self, tpart, mpR, uR, A, M: int, Pr: int, Pc: int, valid: bool):
            """Σ_g Σ_c in_c(g)·(ρ_c(g) − ρ_∅(g)) = Σ_g w_o·q(g) over the output patches → [M]."""
            return self._readout(self._stage2_q(tpart, mpR, uR, A, M, Pr, Pc, valid)).view(M, -1).sum(1)

        def _readout(self, q):
            """w_o·q (the read-out bias cancels in ρ_c − ρ_∅) → q.shape[:-1]."""
            return F.linear(q, self.out.weight)[..., 0]

        def _v(self, h):
            """Interaction-branch output v = SiLU(φ2(SiLU(h))) of pre-activations h = φ_u(u) + conv(A)."""
            return F.silu(self.phi2(F.silu(h)))

        def _stage2_q(self, tpart, mpR, uR, A, M: int, Pr: int, Pc: int, valid: bool):
            """q(g) = Σ_c in_c(g)·(v_c(g) − v_∅(g)) of the output patches → [M*NO, C] (crop-major, outputs
            row-major on the patch grid; valid=True: the interior patches, else all, circular conv)."""
            cfg = self.config
            C, k = cfg["channels"], cfg["kernel"]
            r = k // 2
            NP = Pr * Pc
            dev, dt = A.device, A.dtype
            # k×k conv of A at the output patches as one gather + matmul (valid: interior; else circular)
            off = r if valid else 0
            orow = torch.arange(off, Pr - off, device=dev)
            ocol = torch.arange(off, Pc - off, device=dev)
            NO = orow.numel() * ocol.numel()
            dk = torch.arange(-r, r + 1, device=dev)
            ri = (orow[:, None] + dk) % Pr
            ci = (ocol[:, None] + dk) % Pc
            gidx = (ri[:, None, :, None] * Pc + ci[None, :, None, :]).reshape(NO, k * k)
            WA = self.phi_a.weight.permute(2, 3, 1, 0).reshape(k * k * C, C)
            CA = torch.addmm(self.phi_a.bias, A.view(M, NP, C)[:, gidx].reshape(M * NO, k * k * C), WA)
            opatch = (orow[:, None] * Pc + ocol[None]).reshape(-1)
            outidx = torch.full((NP,), -1, dtype=torch.long, device=dev)
            outidx[opatch] = torch.arange(NO, device=dev)
            mR = mpR // NP
            oR = outidx[mpR % NP]
            sel = oR >= 0
            g = mR[sel] * NO + oR[sel]
            v = self._v(self.phi_u(uR[sel]) + CA[g])
            ugo = F.silu(tpart.view(M, NP, C)[:, opatch].reshape(M * NO, C))
            vg = self._v(self.phi_u(ugo) + CA)
            return torch.zeros((M * NO, C), dtype=dt, device=dev).index_add(0, g, v - vg[g])

        def patch_q(self, batch: Batch) -> torch.Tensor:
            """q(g) of every patch of every lattice → [B, Gh*Gw, C] (network dtype; patches row-major on the
            ⌊H/s⌋×⌊W/s⌋ grid).  The local NH's energy is scale·Σ_g w_o·q(g); the pooled term reads q(g)."""
            lab, tmap, nc = self._local_labels(batch)
            s, C = self.config["stride"], self.config["channels"]
            M, Sr, Sc = lab.shape
            return self._stage2_q(*self._stage1(lab, tmap, nc), M, Sr // s, Sc // s, False).view(M, -1, C)

        def _local_labels(self, batch: Batch):
            """(lab, tmap, nc): each seen site's rank among the ids present in its own s×s patch (increasing
            id order), its type, and the largest number of ids in one patch (≤ s², whatever the number of
            cells; the crop is the part ⌊H/s⌋·s × ⌊W/s⌋·s the network sees).

            Cells are only told apart inside a patch, so per-patch ranks give the same (patch, cell) rows in
            the same order as lattice-wide ranks, and :meth:`_stage1`'s slot tables (M·patches·nc) scale with
            the lattice instead of with lattice × cells (see :func:`_patch_labels_np`)."""
            self._check_types(batch.types)
            s = self.config["stride"]
            Gh, Gw = batch.shape[0] // s, batch.shape[1] // s
            ids = batch.ids[:, : Gh * s, : Gw * s]
            B = ids.shape[0]
            pat = ids.reshape(B, Gh, s, Gw, s).permute(0, 1, 3, 2, 4).reshape(B * Gh * Gw, s * s)
            if pat.numel():
                sv, order = torch.sort(pat, dim=-1, stable=True)
                first = torch.ones_like(sv, dtype=torch.bool)
                first[:, 1:] = sv[:, 1:] != sv[:, :-1]
                rk = torch.cumsum(first, 1) - 1
                nc = int(rk[:, -1].max()) + 1
                lab = torch.empty_like(rk).scatter_(1, order, rk)
            else:
                lab, nc = pat.long(), 1
            lab = lab.view(B, Gh, Gw, s, s).permute(0, 1, 3, 2, 4).reshape(ids.shape)
            tmap = batch.types.gather(1, ids.reshape(B, -1)).view(ids.shape)
            return lab, tmap, nc

        def _terms(self, lab, tmap, nc: int, valid: bool):
            """Torch twin of :meth:`LocalNHNumpy._terms` (sparse over the occupied (cell, patch) pairs).

            lab, tmap : long [M, Sr, Sc] → [M] (network dtype).
            """
            s = self.config["stride"]
            M, Sr, Sc = lab.shape
            return self._stage2(*self._stage1(lab, tmap, nc), M, Sr // s, Sc // s, valid)

        def _delta_geometry(self, dev):
            """Index tables of :meth:`delta` (crop of 2k−1 patches per side; cached per device)."""
            cache = self.__dict__.setdefault("_geo_cache", {})
            key = str(dev)
            if key not in cache:
                cfg = self.config
                s, k = cfg["stride"], cfg["kernel"]
                r = k // 2
                n = 2 * k - 1
                NP = n * n
                c = NP // 2
                pp = torch.arange(NP + 1)
                pp[NP] = c
                a = torch.arange(s)
                prow = (pp // n)[:, None, None] * s + a[None, :, None]  # [NP+1, s, s]
                pcol = (pp % n)[:, None, None] * s + a[None, None, :]
                orow = torch.arange(r, n - r)
                ri = orow[:, None] + torch.arange(-r, r + 1)[None]
                gidx = (ri[:, None, :, None] * n + ri[None, :, None, :]).reshape(k * k, k * k)
                op = (orow[:, None] * n + orow[None, :]).reshape(-1)
                after = torch.arange(NP)
                after[c] = NP
                NO = op.numel()
                D = 2 * NO  # dummy output index: patches that are not outputs
                oidx = torch.full((NP + 1,), D)
                oidx[op] = torch.arange(NO)
                oB = oidx.clone()
                oB[NP] = D
                oA = torch.where(oidx < D, oidx + NO, D)
                oA[c], oA[NP] = D, oidx[c] + NO
                tril = torch.ones((s * s, s * s), dtype=torch.bool).tril(-1)
                cache[key] = {
                    "NP": NP, "c": c, "NO": NO, "prow": (prow.expand(NP + 1, s, s).reshape(NP + 1, -1)).to(dev),
                    "pcol": pcol.expand(NP + 1, s, s).reshape(NP + 1, -1).to(dev),
                    "gidx": torch.cat([gidx, after[gidx]]).to(dev), "ghost": torch.cat([op, after[op]]).to(dev),
                    "oB": oB.to(dev), "oA": oA.to(dev), "tril": tril.to(dev),
                    "tcode": (torch.arange(s * s) * (cfg["n_types"] + 1)).to(dev)}
            return cache[key]

        def _patch_rows(self, pat, tmap):
            """Stage 1 of patches pat, tmap long [M, s*s] (ids / types): one row per (patch, cell).

            Returns ``(mp [nR] patch of each row, rank [nR] its order in the patch, cnt [M] cells per patch,
            uR [nR, C] per-cell features, ug [M, C] ghost features, A [M, C] aggregate)``.
            """
            cfg = self.config
            s, C, T = cfg["stride"], cfg["channels"], cfg["n_types"]
            ss = s * s
            M = pat.shape[0]
            dt, dev = self.dtype, pat.device
            sv = torch.sort(pat, -1)[0]  # the distinct ids of a patch: its sorted ids where they change
            first = torch.ones_like(sv, dtype=torch.bool)
            first[:, 1:] = sv[:, 1:] != sv[:, :-1]
            cnt = first.sum(-1)
            R = torch.nonzero(first.view(-1))[:, 0]
            mp = R // ss
            rank = (torch.cumsum(first.view(-1).long(), 0) - 1)[R] - (torch.cumsum(cnt, 0) - cnt)[mp]
            mask = pat[mp] == sv.view(-1)[R, None]  # [nR, ss] sites of each (patch, cell)
            W = self.embed.weight  # [C, 2+T, s, s]
            Em = W[:, 0].reshape(C, ss)
            Et = W[:, 1:].reshape(C, T + 1, ss).permute(2, 1, 0).reshape(ss * (T + 1), C)
            oh = (tmap.unsqueeze(-1) == torch.arange(T + 1, device=dev)).to(dt).view(M, ss * (T + 1))
            tpart = torch.addmm(self.embed.bias, oh, Et)  # [M, C]
            uR = F.silu(F.linear(mask.to(dt), Em) + tpart[mp])
            ug = F.silu(tpart)
            psiR = F.silu(self.psi2(F.silu(self.psi1(uR))))
            psig = F.silu(self.psi2(F.silu(self.psi1(ug))))
            cnt = cnt.to(dt)
            A = torch.zeros((M, C), dtype=dt, device=dev).index_add(0, mp, psiR) - cnt[:, None] * psig
            return mp, rank, cnt, uR, ug, A

        def _lattice_delta(self, batch, b, sites, new_ids):
            """ΔH (without scale) of n proposals (chain b [n], flat site [n], new id [n]) → [n]; see
            :meth:`_lattice_dq`."""
            return self._readout(self._lattice_dq(batch, b, sites, new_ids)[0]).sum(1)

        def _lattice_dq(self, batch, b, sites, new_ids):
            """Δq of n proposals (chain b [n], flat site [n], new id [n]) from per-patch quantities of whole
            lattices: q_before is the lattice's per-patch q(g) at the k×k output patches around the site;
            q_after re-evaluates those patches with the after-state centre patch (new rows and A) and conv(A)
            updated by the centre's change of A.  Returns ``(dq [n, k*k, C], og [n, k*k] flat patch index
            b·G + g of each output (row-major offsets −r..r), q [B*G, C] q(g) of every patch)`` (network dtype).
            """
            cfg = self.config
            s, C, k = cfg["stride"], cfg["channels"], cfg["kernel"]
            r = k // 2
            ss = s * s
            dt, dev = self.dtype, batch.device
            B = batch.ids.shape[0]
            H, W = batch.shape
            Gh, Gw = H // s, W // s
            G = Gh * Gw
            n = b.numel()
            dk = torch.arange(-r, r + 1, device=dev)
            # --- per-patch quantities of every lattice
            ids = batch.ids[:, : Gh * s, : Gw * s].reshape(B, Gh, s, Gw, s).permute(0, 1, 3, 2, 4).reshape(B * G, ss)
            ids = ids.long()
            tm = batch.types.gather(1, ids.view(B, G * ss)).view(B * G, ss).long()
            mp, rank, cnt, uR, ug, A = self._patch_rows(ids, tm)
            # circular k×k conv of A on the coarse grid, as one gather + matmul (float64 conv2d is slow on CPU)
            ri = (torch.arange(Gh, device=dev)[:, None] + dk) % Gh
            ci = (torch.arange(Gw, device=dev)[:, None] + dk) % Gw
            gidx = (ri[:, None, :, None] * Gw + ci[None, :, None, :]).reshape(G, k * k)
            WA = self.phi_a.weight.permute(2, 3, 1, 0).reshape(k * k * C, C)
            # (the product is taken as Wᵀ·Xᵀ: much faster than X·W for MKL with 16 output columns)
            CA = (WA.t() @ A.view(B, G, C)[:, gidx].reshape(B * G, k * k * C).t()).t() + self.phi_a.bias
            uW = self.phi_u(uR)
            ugW = self.phi_u(ug)
            q_lat = torch.zeros((B * G, C), dtype=dt, device=dev).index_add(0, mp, self._v(uW + CA[mp]))
            q_lat = q_lat - cnt[:, None] * self._v(ugW + CA)  # q(g) of every patch
            K = int(cnt.max())
            rowid = torch.full((B * G, K), -1, dtype=torch.long, device=dev)  # rows of each patch, -1: none
            rowid[mp, rank] = torch.arange(mp.numel(), device=dev)
            # --- per proposal
            i, j = sites // W, sites % W
            gi, gj = i // s, j // s
            og = ((((gi[:, None, None] + dk[:, None]) % Gh) * Gw + (gj[:, None, None] + dk[None, :]) % Gw)
                  .reshape(n, k * k) + b[:, None] * G)  # flat patch index of the k×k outputs
            jc = (k * k) // 2
            G0 = og[:, jc]
            pc = ids[G0].clone()  # the after-state centre patch
            ar = torch.arange(n, device=dev)
            pc[ar, (i - gi * s) * s + (j - gj * s)] = new_ids.long()
            tc = batch.types[b].gather(1, pc).long()
            mpc, _, cntc, uRc, ugc, Ac = self._patch_rows(pc, tc)
            dA = Ac - A[G0]
            Wblk = self.phi_a.weight.flip(2, 3).permute(2, 3, 1, 0).reshape(k * k, C, C)  # [j, in, out]
            CAa = CA[og] + torch.einsum("ni,jio->njo", dA, Wblk)  # conv(A) after, at the outputs [n, k*k, C]
            nc = torch.cat([torch.arange(jc), torch.arange(jc + 1, k * k)]).to(dev)
            ogn = og[:, nc]  # non-centre outputs: same rows, new conv(A)
            CAn = CAa[:, nc]
            rows = rowid[ogn]  # [n, k*k-1, K]
            m_, o_, q_ = torch.nonzero(rows >= 0, as_tuple=True)
            kk = k * k
            q_a = torch.zeros((n, kk, C), dtype=dt, device=dev)
            q_a[:, nc] = -cnt[ogn][..., None] * self._v(ugW[ogn] + CAn)
            q_a[:, jc] = -cntc[:, None] * self._v(self.phi_u(ugc) + CAa[:, jc])
            q_a = q_a.view(n * kk, C).index_add(0, m_ * kk + nc[o_], self._v(uW[rows[m_, o_, q_]] + CAn[m_, o_]))
            q_a = q_a.index_add(0, mpc * kk + jc, self._v(self.phi_u(uRc) + CAa[mpc, jc]))
            return q_a.view(n, kk, C) - q_lat[og], og, q_lat

        def _crop_delta(self, pat, tmap, geo):
            """e(after) − e(before) of n crops → [n]; see :meth:`_crop_dq`."""
            return self._readout(self._crop_dq(pat, tmap, geo)).sum(1)

        def _crop_dq(self, pat, tmap, geo):
            """Δq = q(after) − q(before) [n, k*k, C] of the k×k output patches of n crops (row-major offsets
            −r..r from the site's patch), twin of :meth:`LocalNHNumpy._crop_dq`.

            pat, tmap : long [n, NP+1, s*s] cell ids / types of the stacked patches (patch-major: the NP
            patches of the before crop, then the after-state centre patch).  Cells are the distinct ids of
            each patch (one row per (crop, patch, cell), at its first site); network dtype.
            """
            cfg = self.config
            s, C, k, T = cfg["stride"], cfg["channels"], cfg["kernel"], cfg["n_types"]
            ss = s * s
            n = pat.shape[0]
            NP, NO = geo["NP"], geo["NO"]
            dt, dev = self.dtype, pat.device
            eq = pat.unsqueeze(-1) == pat.unsqueeze(-2)  # [n, NP+1, ss, ss] same cell
            first = ~(eq & geo["tril"]).any(-1)  # the first site of each (crop, patch, cell)
            cnt = first.sum(-1).to(dt)  # [n, NP+1] cells per patch
            R = torch.nonzero(first.view(-1))[:, 0]
            mp = R // ss  # crop*(NP+1) + stacked patch
            W = self.embed.weight  # [C, 2+T, s, s]
            Em = W[:, 0].reshape(C, ss)
            Et = W[:, 1:].reshape(C, T + 1, ss).permute(2, 1, 0).reshape(ss * (T + 1), C)
            code = (tmap + geo["tcode"]).view(-1, ss)  # [n*(NP+1), ss] row of Et of each site
            oh = torch.zeros((code.shape[0], ss * (T + 1)), dtype=dt, device=dev)
            oh.scatter_(1, code, 1.0)
            tpart = torch.addmm(self.embed.bias, oh, Et)  # [n*(NP+1), C]
            uR = F.silu(F.linear(eq.view(-1, ss)[R].to(dt), Em) + tpart[mp])
            ug = F.silu(tpart)
            psiR = F.silu(self.psi2(F.silu(self.psi1(uR))))
            psig = F.silu(self.psi2(F.silu(self.psi1(ug))))
            A = torch.zeros((n * (NP + 1), C), dtype=dt, device=dev).index_add(0, mp, psiR)
            A = A - cnt.view(-1, 1) * psig  # Σ_cells ψ(u_c) − n_cells·ψ(u_∅)
            gidx = geo["gidx"]
            WA = self.phi_a.weight.permute(2, 3, 1, 0).reshape(k * k * C, C)
            CA = torch.addmm(self.phi_a.bias, A.view(n, NP + 1, C)[:, gidx].reshape(n * 2 * NO, k * k * C), WA)
            CA = CA.view(n, 2 * NO, C)
            # rows of the output patches, before (oB) and after (oA)
            m = mp // (NP + 1)
            pp = mp - m * (NP + 1)
            oB, oA = geo["oB"][pp], geo["oA"][pp]
            selB, selA = oB < 2 * NO, oA < 2 * NO
            mB, mA = m[selB], m[selA]
            uWB = self.phi_u(uR[selB])
            uWA = self.phi_u(uR[selA])
            vB = self._v(uWB + CA[mB, oB[selB]])
            vA = self._v(uWA + CA[mA, oA[selA]])
            ugo = ug.view(n, NP + 1, C)[:, geo["ghost"]]  # [n, 2*NO, C]
            vg = self._v(self.phi_u(ugo) + CA)  # [n, 2*NO, C]
            cg = cnt[:, geo["ghost"]]  # cells at each output patch, before then after
            Q = torch.zeros((n * 2 * NO, C), dtype=dt, device=dev)
            Q = Q.index_add(0, mA * 2 * NO + oA[selA], vA).index_add(0, mB * 2 * NO + oB[selB], vB)
            Q = Q.view(n, 2 * NO, C) - cg[..., None] * vg  # q(g) before at 0..NO−1, after at NO..2NO−1
            return Q[:, NO:] - Q[:, :NO]

        # --- the three forms of the ΔH interface ----------------------------------------------
        def energy(self, batch: Batch) -> torch.Tensor:
            """Full energy [B] float64 (scale included), differentiable in the parameters."""
            lab, tmap, nc = self._local_labels(batch)
            e = self._terms(lab, tmap, nc, valid=False)
            return e.to(torch.float64) * self.scale

        def delta(self, batch: Batch, sites: torch.Tensor, new_ids: torch.Tensor, *, chunk: int = 4096,
                  method: str = "auto"):
            """ΔH [B, P] float64 (scale included) of each proposal, exact (batched).

            ``method``: ``"crop"`` evaluates before and after on the crop of (2k−1)² patches around each
            proposal; ``"lattice"`` evaluates the per-patch quantities (u, A, conv(A), e) of every lattice once
            and, per proposal, only the changed centre patch and the k×k output patches after the copy;
            ``"auto"`` picks ``"lattice"`` when the crops together hold more patches than the lattices.
            Both give the same ΔH (to rounding).  Differentiable in the parameters when gradients are
            enabled (e.g. for a pseudo-likelihood fit); samplers call it under ``torch.no_grad()``.
            """
            self._check_types(batch.types)
            B, P = sites.shape
            out = torch.zeros((B, P), dtype=torch.float64, device=batch.device)
            res = self.proposal_dq(batch, sites, new_ids, chunk=chunk, method=method)
            if res is None:  # crops would wrap onto themselves: full recomputation
                return self.delta_full(batch, sites, new_ids, mask=self._todo(batch, sites, new_ids))
            bidx, pidx, dq = res[:3]
            out[bidx, pidx] = self._readout(dq).sum(1).to(torch.float64)
            return out * self.scale

        def _todo(self, batch, sites, new_ids):
            """[B, P] bool: the proposals that can change the energy (a different id, at a seen site)."""
            s = self.config["stride"]
            H, W = batch.shape
            old = batch.ids.flatten(1).gather(1, sites)
            return (old != new_ids) & (sites // W < (H // s) * s) & (sites % W < (W // s) * s)

        def proposal_dq(self, batch: Batch, sites: torch.Tensor, new_ids: torch.Tensor, *, chunk: int = 4096,
                        method: str = "auto"):
            """Δq(g) of the k×k output patches around each proposal that can change the energy.

            Returns ``None`` when the lattice's patch grid is smaller than 2k−1 (crops would wrap onto
            themselves; callers recompute in full), else ``(bidx, pidx, dq, og, q)``: the proposals [n] (chain,
            index in P), dq [n, k*k, C] (network dtype) q(after) − q(before) at the output patches, og [n, k*k]
            their patch index on the Gh×Gw grid (row-major offsets −r..r from the site's patch), and q
            [B, Gh*Gw, C] the per-patch q(g) of every lattice when the lattice method computed it, else None.
            ``method`` as in :meth:`delta`.
            """
            if method not in ("auto", "crop", "lattice"):
                raise ConfigError(f"local_nh: delta method must be 'auto', 'crop' or 'lattice', got {method!r}")
            cfg = self.config
            s, k, C = cfg["stride"], cfg["kernel"], cfg["channels"]
            r = k // 2
            dev = batch.device
            B = sites.shape[0]
            H, W = batch.shape
            Gh, Gw = H // s, W // s
            if Gh < 2 * k - 1 or Gw < 2 * k - 1:
                return None
            si, sj = sites // W, sites % W
            bidx, pidx = torch.nonzero(self._todo(batch, sites, new_ids), as_tuple=True)
            geo = self._delta_geometry(dev)
            dk = torch.arange(-r, r + 1, device=dev)
            if method == "lattice" or (method == "auto" and bidx.numel() * geo["NP"] > B * Gh * Gw):
                dq, og, q = self._lattice_dq(batch, bidx, sites[bidx, pidx], new_ids[bidx, pidx])
                return bidx, pidx, dq, og - bidx[:, None] * (Gh * Gw), q.view(B, Gh * Gw, C)
            d = torch.arange(-2 * r, 2 * r + 1, device=dev)
            t = torch.arange(s, device=dev)
            NP, ss = geo["NP"], s * s
            parts, ogs = [], []
            for lo in range(0, bidx.numel(), chunk):
                b, p = bidx[lo:lo + chunk], pidx[lo:lo + chunk]
                n = b.numel()
                i, j = si[b, p], sj[b, p]
                gi, gj = i // s, j // s
                rows = (((gi[:, None] + d) % Gh)[:, :, None] * s + t).reshape(n, -1)  # [n, S]
                cols = (((gj[:, None] + d) % Gw)[:, :, None] * s + t).reshape(n, -1)
                # stacked patches [n, NP+1, s*s], patch-major: the before crop, then the after-state centre
                pr_, pc_ = geo["prow"], geo["pcol"]  # [NP+1, s*s] crop row / column of each stacked site
                pat = batch.ids[b[:, None, None], rows[:, pr_], cols[:, pc_]]
                q = (i - gi * s) * s + (j - gj * s)  # position of the site inside its patch
                pat[torch.arange(n, device=dev), NP, q] = new_ids[b, p].to(pat.dtype)
                tmap = batch.types[b].gather(1, pat.view(n, -1).long()).view(n, NP + 1, ss).long()
                parts.append(self._crop_dq(pat, tmap, geo))
                ogs.append((((gi[:, None, None] + dk[:, None]) % Gh) * Gw + (gj[:, None, None] + dk[None, :]) % Gw)
                           .reshape(n, k * k))
            if not parts:
                return (bidx, pidx, torch.zeros((0, k * k, C), dtype=self.dtype, device=dev),
                        torch.zeros((0, k * k), dtype=torch.long, device=dev), None)
            return bidx, pidx, torch.cat(parts), torch.cat(ogs), None

        def numpy_evaluator(self) -> LocalNHNumpy:
            """A :class:`LocalNHNumpy` with the current weights (cached until the parameters change)."""
            version = tuple(int(p._version) for p in self.parameters()) + (self.scale_value(),)
            if self._np is None or self._np_version != version:
                self._np = LocalNHNumpy.from_torch(self)
                self._np_version = version
            return self._np

        def delta_np(self, state, site, new_id, cache=None) -> float:
            """ΔH of one copy attempt in pure numpy float64 (via :class:`LocalNHNumpy`)."""
            return self.numpy_evaluator().delta(np.asarray(state.ids), np.asarray(state.types), site, int(new_id))

