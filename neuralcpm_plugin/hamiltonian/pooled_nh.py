"""Pooled neural Hamiltonian (kind ``"pooled_nh"``): a global energy of summed local features,
H = scale · F(Z), Z = Σ_g z(g) — global context at the cost of a local one per copy attempt (DESIGN.md
decision 2, the third kind).

Definition (lattice H×W, stride s, patch grid G_h×G_w = ⌊H/s⌋×⌊W/s⌋, C channels, position dimension D)::

    q(g)  = Σ_c in_c(g) · (v_c(g) − v_∅(g)) ∈ R^C        the local NH's interaction branch before its read-out
                                                          (:mod:`.local_nh`; the local NH's energy is
                                                          scale · Σ_g w_o·q(g))
    z(g)  = [q(g), vec(q(g) ⊗ pos(g))] ∈ R^{C(1+D)}       pos : learned (G_h, G_w, D) embedding of the patch
                                                          position (D = 0: z = q, no position)
    Z     = Σ_g z(g)                                     vec(q ⊗ pos) is channel-major: index c·D + d
    F(Z)  = Linear(C(1+D)→h) · SiLU · Linear(h→h) · SiLU · Linear(h→1)
    H     = scale · F(Z)

Each q(g) reads the (k·s)×(k·s) sites around patch g (receptive-field radius (k·s − 1)//2 sites), so a copy
into site x (patch g0) changes only z(g) for g ∈ g0 ± r (r = k//2, the k×k "output" patches) and

    ΔH = scale · (F(Z + ΔZ) − F(Z)),  ΔZ = Σ_{g ∈ g0 ± r} [Δq(g), vec(Δq(g) ⊗ pos(g))]

is exact from one crop (the local NH's crop / lattice machinery gives Δq) plus one MLP evaluation.
Symmetries: H is invariant to relabelling cell ids; with D = 0 it is invariant to periodic shifts by
multiples of s (lattices divisible by s).  With D > 0 the patch grid is fixed by ``pos``: the term refuses
lattices with another ⌊H/s⌋×⌊W/s⌋ (configuration key ``lattice_shape``, set from the training data).
Boundaries: periodic only (the feature block's convolution is circular), like the local NH.

Tensors (bundle / safetensors names): ``features.*`` = the local NH's tensors without its read-out
(``features.embed.weight`` [C, 2+T, s, s], ``features.embed.bias``, ``features.psi1.*``, ``features.psi2.*``,
``features.phi_u.weight``, ``features.phi_a.*``, ``features.phi2.*``), ``pos`` [G_h, G_w, D] (D > 0 only),
``mlp.0.*``, ``mlp.2.*``, ``mlp.4.*`` (torch Linear convention: weight [out, in]).

Initialisation: the features as the local NH's (their q(g) start small, |q(g)| ≈ 0.02 at C = 8), ``pos`` ~
N(0, 1), the MLP with torch's defaults: |H| starts at ≈ 0.1 and a copy's |ΔH| at ≈ 1e-4 (measured on
24×24 lattices), far below the analytic terms of a closure, so training starts from the analytic model.

Position basis (configuration keys ``position_init``, ``position_trainable``):

* ``position_init = "random"`` (default): every column of ``pos`` ~ N(0, 1), learned free maps.
* ``position_init = "moments"``: the first min(D, 9) columns are the polynomial moment basis of
  :func:`moment_basis` — the monomials r, c, r², r·c, c², r³, r²·c, r·c², c³ of the patch coordinates
  (r: patch row, c: patch column, each scaled to [−1, 1] over the grid), each centred (mean 0 over the grid)
  and divided by its RMS; the remaining D − 9 columns are drawn as with ``"random"`` (the same numbers: the
  same draw, first columns overwritten).  Z then holds per channel the first to third moments of q_c over
  the lattice (Σ_g q_c(g)·m(g)), from which F can read an aggregate's centre and orientation; locally the
  term acts like an external potential Σ_d ∂F/∂Z_{c,d}·pos_d(g) in the span of these polynomials — e.g. a
  field (r cosθ + c sinθ)² along an axis θ that F chooses from the second moments.
* ``position_trainable`` (default true): false keeps ``pos`` fixed (not a free parameter of training).

Both keys only shape the initial ``pos`` and its training: a bundle stores ``pos`` itself and records the keys
in its config; the evaluators (numpy, compiled) read ``pos`` from the weights.  Defaults leave every tensor
bit-identical to terms built before the keys existed.

Implementations of the same formula:

* :meth:`PooledNeuralHamiltonian.energy` / :meth:`~PooledNeuralHamiltonian.delta` — torch, batched,
  differentiable;
* :class:`PooledNHNumpy` — pure numpy float64 (no torch needed: loads next to ``local_nh.py`` inside host
  tools), energy and single-attempt ΔH with Z cached per lattice and updated incrementally (see its
  docstring); :meth:`PooledNeuralHamiltonian.delta_np` uses it.
"""

from __future__ import annotations

import copy

import numpy as np

try:
    from ..errors import BundleError, ConfigError
    from .local_nh import LOCAL_NH_DEFAULTS, LocalNHNumpy, _silu_np
    from .local_nh import _complete as _local_complete
except ImportError:  # loaded on its own inside a host tool, next to local_nh.py
    from local_nh import LOCAL_NH_DEFAULTS, BundleError, ConfigError, LocalNHNumpy, _silu_np  # type: ignore
    from local_nh import _complete as _local_complete  # type: ignore

__all__ = ["MOMENT_MONOMIALS", "POOLED_NH_DEFAULTS", "POSITION_INITS", "PooledNHNumpy", "PooledNeuralHamiltonian",
           "moment_basis"]

POOLED_NH_DEFAULTS = {**LOCAL_NH_DEFAULTS, "position_dim": 4, "hidden": 32, "lattice_shape": [],
                      "position_init": "random", "position_trainable": True}

#: Values of the ``position_init`` key (see the module docstring, "Initialisation").
POSITION_INITS = ("random", "moments")
#: The monomials of the ``"moments"`` basis, in column order (r = patch row, c = patch column coordinate).
MOMENT_MONOMIALS = ("r", "c", "r^2", "r*c", "c^2", "r^3", "r^2*c", "r*c^2", "c^3")


def moment_basis(grid_shape, dim: int) -> np.ndarray:
    """The ``"moments"`` position basis: float64 [G_h, G_w, min(dim, 9)].

    Patch coordinates r = (i − (G_h−1)/2)/((G_h−1)/2), c = (j − (G_w−1)/2)/((G_w−1)/2) ∈ [−1, 1] (patch
    row i, column j; a coordinate of a one-patch axis is 0); column k is the k-th monomial of
    :data:`MOMENT_MONOMIALS` (degree 1, 2, 3), centred (mean 0 over the grid) and divided by its root mean
    square (RMS 1, like the N(0, 1) columns of ``"random"``); a monomial that is constant on the grid stays 0.
    With this basis Z holds, per channel c, Σ_g q_c(g)·(centred monomial)(g): the channel's first, second and
    third moments over the lattice, from which F can read the orientation of an aggregate.
    """
    Gh, Gw = int(grid_shape[0]), int(grid_shape[1])
    i = np.arange(Gh, dtype=np.float64)
    j = np.arange(Gw, dtype=np.float64)
    r = (i - (Gh - 1) / 2) / ((Gh - 1) / 2) if Gh > 1 else np.zeros(1)
    c = (j - (Gw - 1) / 2) / ((Gw - 1) / 2) if Gw > 1 else np.zeros(1)
    R, C = np.meshgrid(r, c, indexing="ij")
    cols = [R, C, R ** 2, R * C, C ** 2, R ** 3, R ** 2 * C, R * C ** 2, C ** 3][:max(0, int(dim))]
    out = np.zeros((Gh, Gw, len(cols)))
    for k, m in enumerate(cols):
        m = m - m.mean()
        rms = float(np.sqrt((m ** 2).mean()))
        out[..., k] = m / rms if rms > 1e-12 else 0.0
    return out


def _complete(config):
    cfg = dict(POOLED_NH_DEFAULTS)
    if config:
        unknown = set(config) - set(POOLED_NH_DEFAULTS)
        if unknown:
            raise ConfigError(f"pooled_nh: unknown configuration key(s) {sorted(unknown)}; known keys: "
                              f"{sorted(POOLED_NH_DEFAULTS)}")
        cfg.update(copy.deepcopy(dict(config)))
    cfg["position_dim"] = int(cfg["position_dim"])
    if cfg["position_dim"] < 0:
        raise ConfigError(f"pooled_nh: position_dim must be >= 0, got {cfg['position_dim']}")
    cfg["hidden"] = int(cfg["hidden"])
    if cfg["hidden"] < 1:
        raise ConfigError(f"pooled_nh: hidden must be >= 1, got {cfg['hidden']}")
    shape = [int(x) for x in (cfg["lattice_shape"] or [])]
    if shape and (len(shape) != 2 or min(shape) < 1):
        raise ConfigError(f"pooled_nh: lattice_shape must be [H, W] (sites), got {cfg['lattice_shape']}")
    cfg["lattice_shape"] = shape
    if cfg["position_init"] not in POSITION_INITS:
        raise ConfigError(f"pooled_nh: position_init must be one of {', '.join(map(repr, POSITION_INITS))}, "
                          f"got {cfg['position_init']!r}")
    if not isinstance(cfg["position_trainable"], bool):
        raise ConfigError(f"pooled_nh: position_trainable must be true or false, got "
                          f"{cfg['position_trainable']!r}")
    try:
        cfg.update(_local_complete(_feature_config(cfg)))
    except ConfigError as e:
        raise ConfigError(str(e).replace("local_nh:", "pooled_nh:")) from None
    if cfg["position_dim"] > 0:
        if not shape:
            raise ConfigError("pooled_nh: a position embedding (position_dim > 0) needs the lattice shape: set "
                              "lattice_shape = [H, W] (training sets it from the data), or position_dim = 0 "
                              "for a translation-invariant term")
        s = cfg["stride"]
        if shape[0] // s < 1 or shape[1] // s < 1:
            raise ConfigError(f"pooled_nh: lattice {shape[0]}x{shape[1]} is smaller than one {s}x{s} patch")
    return cfg


def _feature_config(cfg):
    return {k: cfg[k] for k in LOCAL_NH_DEFAULTS}


def _grid_error(cfg, shape):
    s = cfg["stride"]
    H, W = cfg["lattice_shape"]
    return ConfigError(f"pooled_nh: the position embedding was built for a {H // s}x{W // s} patch grid "
                       f"(lattice {H}x{W}, stride {s}); this lattice is {shape[0]}x{shape[1]} "
                       f"({shape[0] // s}x{shape[1] // s} patches). Retrain for this size, or use "
                       "position_dim = 0 (translation invariant, any size)")


# =========================================================================================== numpy
class PooledNHNumpy:
    """Pure-numpy float64 evaluator of a pooled NH: energy, Z and single-attempt ΔH.

    Build with :meth:`from_torch` or :meth:`from_arrays` (config + the term's tensors as numpy arrays;
    no torch needed).  Conventions as :class:`~.local_nh.LocalNHNumpy`: ``ids`` int (H, W), ``types``
    int (N+1,) with ``types[0] = 0``, periodic lattice, ``site`` = (row, col).

    Cached Z: :meth:`delta` keeps Z of the last lattice it saw (a private copy of its ids and types).  At the
    next call the lattice is compared with that copy; sites that changed since (accepted copies, ≤
    ``max_incremental`` of them) are applied one by one as exact single-site ΔZ (the ΔZ of the last
    evaluated attempt is reused when it is the copy that was accepted), anything else (another lattice, new
    types, many changes) recomputes Z from scratch, and so does every ``refresh_every``-th incremental
    update, which bounds float drift (measured: relative error ≈ 1e-15 after 3,000 updates; the tests
    check ≤ 1e-9 after hundreds).
    :meth:`accept` tells the cache about an accepted copy explicitly (optional).
    """

    refresh_every = 1000
    max_incremental = 16

    def __init__(self, config: dict, arrays: dict, scale: float = 1.0):
        cfg = _complete(config)
        self.config = cfg
        self.scale = float(scale)
        feats = {k[len("features."):]: v for k, v in arrays.items() if k.startswith("features.")}
        try:
            self.features = LocalNHNumpy(_feature_config(cfg), feats, 1.0)
        except KeyError as e:
            raise BundleError(f"pooled_nh: tensor features.{e.args[0]} is missing") from None
        self.s, self.C, self.k, self.r = self.features.s, self.features.C, self.features.k, self.features.r
        self.D = cfg["position_dim"]
        f = lambda name: np.asarray(arrays[name], dtype=np.float64)
        try:
            self.pos = f("pos") if self.D else None
            self.W0, self.b0 = f("mlp.0.weight").T.copy(), f("mlp.0.bias")
            self.W2, self.b2 = f("mlp.2.weight").T.copy(), f("mlp.2.bias")
            self.W4, self.b4 = f("mlp.4.weight").T.copy(), f("mlp.4.bias")
        except KeyError as e:
            raise BundleError(f"pooled_nh: tensor {e.args[0]} is missing") from None
        if self.D:
            s = self.s
            grid = (cfg["lattice_shape"][0] // s, cfg["lattice_shape"][1] // s, self.D)
            if self.pos.shape != grid:
                raise BundleError(f"pooled_nh: pos has shape {self.pos.shape}, expected {grid}")
            self._posflat = self.pos.reshape(-1, self.D)
        dim = self.C * (1 + self.D)
        if self.W0.shape != (dim, cfg["hidden"]):
            raise BundleError(f"pooled_nh: mlp.0.weight has shape {self.W0.shape[::-1]}, expected "
                              f"{(cfg['hidden'], dim)}")
        dk = np.arange(-self.r, self.r + 1)
        self._dk = dk
        self._c = None  # the cache (see the class docstring)
        self._last = None  # (site flat index, old id, new id, ΔZ) of the last evaluated attempt

    @classmethod
    def from_torch(cls, term) -> PooledNHNumpy:
        arrays = {k: v.detach().cpu().double().numpy() for k, v in term.tensors().items()}
        return cls(term.config, arrays, term.scale_value())

    @classmethod
    def from_arrays(cls, config: dict, arrays: dict, scale: float = 1.0) -> PooledNHNumpy:
        return cls(config, arrays, scale)

    @property
    def radius(self) -> int:
        return self.features.radius

    # --- the pieces --------------------------------------------------------------------------------------
    def _check_shape(self, shape):
        if self.D:
            s = self.s
            H, W = self.config["lattice_shape"]
            if (shape[0] // s, shape[1] // s) != (H // s, W // s):
                raise _grid_error(self.config, shape)

    def F(self, Z):
        """The MLP F (without ``scale``) of Z [..., C(1+D)] → [...]."""
        h = _silu_np(Z @ self.W0 + self.b0)
        h = _silu_np(h @ self.W2 + self.b2)
        return (h @ self.W4 + self.b4)[..., 0]

    def Z(self, ids, types):
        """Z = Σ_g z(g) [C(1+D)] of one state, from scratch."""
        ids = np.asarray(ids)
        self._check_shape(ids.shape)
        q = self.features.patch_q(ids, np.asarray(types))  # [G, C]
        if not self.D:
            return q.sum(0)
        return np.concatenate([q.sum(0), (q.T @ self._posflat).ravel()])

    def energy(self, ids, types) -> float:
        """Full energy H = scale·F(Z) (float) of one periodic state."""
        return self.scale * float(self.F(self.Z(ids, types)))

    def delta_Z(self, ids, types, site, new_id, *, crop: bool = False):
        """ΔZ [C(1+D)] of copying ``new_id`` into ``site`` (exact): from the feature block's per-lattice cache
        (:meth:`LocalNHNumpy.cached_dq`), or with ``crop=True`` from the crop around the site, no cache."""
        ids = np.asarray(ids)
        types = np.asarray(types)
        s = self.s
        H, W = ids.shape
        i, j = int(site[0]), int(site[1])
        Gh, Gw = H // s, W // s
        if ids[i, j] == new_id or i >= Gh * s or j >= Gw * s:
            return np.zeros(self.C * (1 + self.D))
        f = self.features
        if Gh < 2 * self.k - 1 or Gw < 2 * self.k - 1:  # the crop would wrap onto itself: in full
            after = np.array(ids, copy=True)
            after[i, j] = new_id
            return self.Z(after, types) - self.Z(ids, types)
        if crop:
            idx, c = f._crop_index((H, W), (i, j))
            dq = f._crop_dq(ids.reshape(-1)[idx], types, c, new_id)  # [k*k, C]
            gi, gj = i // s, j // s
            og = (((gi + self._dk) % Gh)[:, None] * Gw + ((gj + self._dk) % Gw)[None]).ravel()
        else:  # the feature block's per-lattice cache (synchronised with ids)
            dq, og = f.cached_dq(ids, types, (i, j), new_id)
        if not self.D:
            return dq.sum(0)
        return np.concatenate([dq.sum(0), (dq.T @ self._posflat[og]).ravel()])

    # --- the cache ---------------------------------------------------------------------------------------
    def reset(self, ids, types):
        """(Re)compute the cached Z for this state."""
        ids = np.asarray(ids)
        types = np.asarray(types)
        Z = self.Z(ids, types)
        self._c = {"ids": np.array(ids, copy=True), "types": np.array(types, copy=True), "Z": Z,
                   "FZ": float(self.F(Z)), "n": 0}
        self._last = None

    def cached_Z(self, ids, types):
        """Z of this state from the cache (synchronised first; a copy)."""
        self._sync(np.asarray(ids), np.asarray(types))
        return self._c["Z"].copy()

    def _sync(self, ids, types):
        c = self._c
        if (c is None or c["ids"].shape != ids.shape or c["types"].shape != types.shape
                or not np.array_equal(c["types"], types)):
            self.reset(ids, types)
            return
        cf, nf = c["ids"].reshape(-1), ids.reshape(-1)
        diff = np.flatnonzero(cf != nf)
        if diff.size == 0:
            return
        if diff.size > self.max_incremental or c["n"] + diff.size > self.refresh_every:
            self.reset(ids, types)
            return
        W = ids.shape[1]
        last = self._last
        for x in diff:
            x = int(x)
            new = nf[x]
            if last is not None and diff.size == 1 and last[0] == x and last[1] == cf[x] and last[2] == new:
                dZ = last[3]
            else:
                dZ = self.delta_Z(c["ids"], types, divmod(x, W), new)
            cf[x] = new
            c["Z"] = c["Z"] + dZ
            c["n"] += 1
        c["FZ"] = float(self.F(c["Z"]))
        self._last = None

    def accept(self, site, new_id):
        """Record an accepted copy (optional: :meth:`delta` also finds changes by itself)."""
        c = self._c
        if c is None:
            return
        i, j = int(site[0]), int(site[1])
        x = i * c["ids"].shape[1] + j
        old = c["ids"].reshape(-1)[x]
        if old == new_id:
            return
        last = self._last
        if last is not None and last[0] == x and last[1] == old and last[2] == new_id:
            dZ = last[3]
        else:
            dZ = self.delta_Z(c["ids"], c["types"], (i, j), new_id)
        c["ids"].reshape(-1)[x] = new_id
        c["Z"] = c["Z"] + dZ
        c["n"] += 1
        c["FZ"] = float(self.F(c["Z"]))
        self._last = None
        if c["n"] >= self.refresh_every:
            self.reset(c["ids"], c["types"])

    def delta(self, ids, types, site, new_id) -> float:
        """ΔH (float, scale included) of copying cell ``new_id`` into ``site`` = (row, col), with the cached Z."""
        ids = np.asarray(ids)
        types = np.asarray(types)
        i, j = int(site[0]), int(site[1])
        if ids[i, j] == new_id:
            return 0.0
        self._sync(ids, types)
        dZ = self.delta_Z(ids, types, (i, j), new_id)
        self._last = (i * ids.shape[1] + j, ids[i, j], new_id, dZ)
        c = self._c
        return self.scale * (float(self.F(c["Z"] + dZ)) - c["FZ"])

    def delta_uncached(self, ids, types, site, new_id) -> float:
        """ΔH with Z recomputed from scratch and ΔZ from the crop (slow; the oracle of the caches)."""
        Z = self.Z(ids, types)
        dZ = self.delta_Z(ids, types, site, new_id, crop=True)
        return self.scale * (float(self.F(Z + dZ)) - float(self.F(Z)))


# =========================================================================================== torch
try:  # the numpy evaluator above must stay importable without torch (inside host tools)
    import torch
    from torch import nn

    from .base import Batch, ConfigTerm, register_term
    from .local_nh import LocalNeuralHamiltonian
except ImportError:  # pragma: no cover - torch-free environment, or this file loaded on its own
    torch = None

if torch is not None:

    @register_term
    class PooledNeuralHamiltonian(ConfigTerm):
        """Pooled NH term (kind ``"pooled_nh"``); see the module docstring for the definition.

        Parameters
        ----------
        config : dict, optional
            The local NH's keys for the feature block (``n_types``, ``stride``, ``channels``, ``kernel``,
            ``dtype``), ``position_dim`` (D, default 4; 0 = no position embedding, translation invariant),
            ``lattice_shape`` ([H, W] sites; required when D > 0), ``hidden`` (MLP width, 32),
            ``position_init`` (``"random"`` | ``"moments"``, default ``"random"``) and ``position_trainable``
            (bool, default true): the position basis (module docstring).
        scale : float or nn.Parameter
            Multiplies the energy (``w_g`` of a closure model when shared).
        seed : int, optional
            Deterministic initialisation.
        """

        kind = "pooled_nh"
        analytic = False

        def __init__(self, config=None, *, scale=1.0, learn_scale=False, seed=None):
            super().__init__(scale, learn_scale)
            self.config = _complete(config)
            cfg = self.config
            C, D, hid = cfg["channels"], cfg["position_dim"], cfg["hidden"]
            with torch.random.fork_rng(devices=[], enabled=seed is not None):
                if seed is not None:
                    torch.manual_seed(int(seed))
                self.features = LocalNeuralHamiltonian(_feature_config(cfg))
                self.features.out = None  # the feature block stops before the local NH's read-out
                self.features.scale = None
                dt = self.features.dtype
                if D:
                    s = cfg["stride"]
                    H, W = cfg["lattice_shape"]
                    pos = torch.randn((H // s, W // s, D), dtype=dt)
                    if cfg["position_init"] == "moments":
                        basis = moment_basis((H // s, W // s), D)
                        pos[..., :basis.shape[-1]] = torch.from_numpy(basis).to(dt)
                    self.pos = nn.Parameter(pos, requires_grad=cfg["position_trainable"])
                else:
                    self.pos = None
                self.mlp = nn.Sequential(nn.Linear(C * (1 + D), hid), nn.SiLU(), nn.Linear(hid, hid), nn.SiLU(),
                                         nn.Linear(hid, 1)).to(dt)
            self._np = None
            self._np_version = None

        @property
        def dtype(self):
            return self.features.dtype

        @property
        def radius(self) -> int:
            """Receptive-field radius (k·s − 1)//2 sites of each z(g)."""
            return self.features.radius

        def _check_shape(self, shape):
            if self.pos is not None:
                s = self.config["stride"]
                if (shape[0] // s, shape[1] // s) != tuple(self.pos.shape[:2]):
                    raise _grid_error(self.config, shape)

        def _z(self, q, og=None):
            """Σ over patches of z = [q, vec(q ⊗ pos)]: q [N, G', C] at patches og [N, G'] (None: all, in
            order) → [N, C(1+D)]."""
            if self.pos is None:
                return q.sum(1)
            pos = self.pos.reshape(-1, self.pos.shape[-1])
            pos = pos[og] if og is not None else pos.expand(q.shape[0], -1, -1)
            return torch.cat([q.sum(1), torch.einsum("ngc,ngd->ncd", q, pos).flatten(1)], 1)

        def Z(self, batch: Batch) -> torch.Tensor:
            """Z [B, C(1+D)] (network dtype), differentiable."""
            self._check_shape(batch.shape)
            return self._z(self.features.patch_q(batch))

        def F(self, Z):
            """The MLP F (without scale) → Z.shape[:-1]."""
            return self.mlp(Z)[..., 0]

        # --- the three forms of the ΔH interface ----------------------------------------------
        def energy(self, batch: Batch) -> torch.Tensor:
            """Full energy [B] float64 (scale included), differentiable in the parameters."""
            return self.F(self.Z(batch)).to(torch.float64) * self.scale

        def delta(self, batch: Batch, sites: torch.Tensor, new_ids: torch.Tensor, *, chunk: int = 4096,
                  method: str = "auto", Z0: torch.Tensor | None = None):
            """ΔH [B, P] float64 (scale included) = scale·(F(Z + ΔZ) − F(Z)), exact, batched.

            Δq of each proposal from the local NH's crop or lattice machinery (``method`` as
            :meth:`LocalNeuralHamiltonian.delta`), one MLP evaluation per proposal.  Differentiable.
            ``Z0`` [B, C(1+D)] (optional): use this Z instead of the lattices' own — the term with its global
            context frozen at an earlier state (scale·(F(Z0 + ΔZ) − F(Z0)), ΔZ exact at the current state).
            """
            B, P = sites.shape
            out = torch.zeros((B, P), dtype=torch.float64, device=batch.device)
            bidx, pidx, dZ, Z = self.delta_Z(batch, sites, new_ids, chunk=chunk, method=method)
            if not bidx.numel():
                return out
            if Z0 is not None:
                Z = Z0.to(dZ.dtype)
            Zb = Z[bidx]
            dh = self.F(Zb + dZ) - self.F(Zb)
            return out.index_put((bidx, pidx), dh.to(torch.float64)) * self.scale

        def delta_Z(self, batch: Batch, sites: torch.Tensor, new_ids: torch.Tensor, *, chunk: int = 4096,
                    method: str = "auto"):
            """ΔZ of the proposals that can change the energy: ``(bidx, pidx, dZ [n, C(1+D)], Z [B, C(1+D)])``
            (network dtype; Z = the lattices' current Z).  Lattices whose patch grid is smaller than a crop
            are recomputed in full."""
            self._check_shape(batch.shape)
            f = self.features
            f._check_types(batch.types)
            res = f.proposal_dq(batch, sites, new_ids, chunk=chunk, method=method)
            if res is not None:
                bidx, pidx, dq, og, q = res
                Z = self._z(q) if q is not None else self.Z(batch)
                return bidx, pidx, self._z(dq, og), Z
            bidx, pidx = torch.nonzero(f._todo(batch, sites, new_ids), as_tuple=True)
            Z = self.Z(batch)
            parts = []
            for lo in range(0, bidx.numel(), 64):
                b, p = bidx[lo:lo + 64], pidx[lo:lo + 64]
                ids = batch.ids[b].clone()
                ids.view(len(b), -1).scatter_(1, sites[b, p][:, None], new_ids[b, p][:, None].to(ids.dtype))
                parts.append(self.Z(Batch(ids, batch.types[b], batch.volumes[b], batch.periodic)) - Z[b])
            dZ = torch.cat(parts) if parts else Z.new_zeros((0, Z.shape[1]))
            return bidx, pidx, dZ, Z

        def numpy_evaluator(self) -> PooledNHNumpy:
            """A :class:`PooledNHNumpy` with the current weights (rebuilt when the parameters change)."""
            version = tuple(int(p._version) for p in self.parameters()) + (self.scale_value(),)
            if self._np is None or self._np_version != version:
                self._np = PooledNHNumpy.from_torch(self)
                self._np_version = version
            return self._np

        def delta_np(self, state, site, new_id, cache=None) -> float:
            """ΔH of one copy attempt in pure numpy float64 (via :class:`PooledNHNumpy`, Z cached)."""
            return self.numpy_evaluator().delta(np.asarray(state.ids), np.asarray(state.types), site, int(new_id))
