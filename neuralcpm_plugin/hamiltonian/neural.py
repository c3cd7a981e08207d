"""Global neural Hamiltonians: the paper's NH (kind ``"nh"``) and its two baselines (``"cnn"``, ``"nh1_cnn"``).

Architecture (paper §3.1, App. B.2; details the paper leaves open follow the authors' public JAX code)::

    input per id c (medium included, ids absent from the lattice excluded):
        x_c = [ mask_c , one-hot type map (T+1 channels) ]              (2 + T channels, H×W)
    embedding : Conv(k = stride = s, no padding) per cell               → h1×w1 = ⌊H/s⌋×⌊W/s⌋
    NH layer ℓ (per cell, shared weights):
        z_c = down(x_c)                               1×1 conv  (in → edge)
        ψ_c = SiLU(Conv3(SiLU(Conv3(z_c))))           cell-wise branch
        A   = up(Σ_c ψ_c)                             1×1 conv on the permutation-invariant sum
        y_c = Conv3(SiLU(Conv3([x_c, A]))) + res(x_c) interaction branch (no final SiLU, as the reference code)
        x_c ← MaxPool_pℓ(y_c)
    read-out  : r = Σ_c Conv1×1(x_c)   (agg channels)  [→ CNN blocks on r for "nh1_cnn"]
                Σ over space → MLP with residual SiLU layers → Linear → scalar

3×3 convolutions use circular padding (the lattice is a torus); the embedding and the pools drop the
remainder rows/columns (``VALID``), as the reference code.  The energy is therefore invariant to any
relabelling of ids (types follow their cells) and to periodic shifts by multiples of the total stride
``s·Πpℓ`` on lattices divisible by it.

"cnn" (not permutation invariant): a CNN on the stacked one-hot of ids (``n_ids`` channels) and types.

Energies are returned in float64 (the network computes in its parameters' dtype, float32 by default) and
include the term's ``scale``.  Units: dimensionless energy, same units as the analytic terms it is summed with.

ΔH (:meth:`NeuralHamiltonian.delta`) reuses the base state's activations: a copy changes two cells' masks
and the type map at one site, i.e. one embedding pixel of every cell; only the first NH layer's window
around it is recomputed (for every cell, on a crop), the pooled result is patched into the cached input of
the second layer, and the (low-resolution) remaining layers are evaluated for all proposals in batches, with
their linear pieces folded (``down`` into ``psi1``, ``up`` into ``phi1``, ``phi1``'s aggregate half applied
once per state instead of once per cell, the last layer's ``phi2``/``res``/``to_agg`` applied after the
spatial sum).  Equal to full recomputation up to float rounding (~1e-12 relative in float64).
"""

from __future__ import annotations

import copy
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .base import Batch, ConfigTerm, register_term

__all__ = [
    "CNN_PRESETS",
    "NH1CNN_PRESETS",
    "NH_PRESETS",
    "CNNHamiltonian",
    "NH1CNNHamiltonian",
    "NeuralHamiltonian",
    "present_ids",
]

_silu = F.silu

# ------------------------------------------------------------------------------------------- presets
NH_PRESETS = {
    # reference code configs/experiment_1.py "nh"/"nch"
    "mnist": {"n_types": 2, "embed_stride": 3, "hidden": [8, 16, 32, 32], "edge": [8, 16, 32, 32],
              "pools": [3, 2, 1, 1], "agg_channels": 32, "mlp": [32, 32]},
    # reference code configs/experiment_2.py "nch"
    "bipolar": {"n_types": 2, "embed_stride": 5, "hidden": [16, 32, 32, 64, 64, 64],
                "edge": [16, 32, 32, 64, 64, 64], "pools": [2, 1, 2, 1, 2, 1], "agg_channels": 32, "mlp": [32, 32]},
}
NH1CNN_PRESETS = {
    # reference code configs/experiment_1.py "shallow_nh"
    "mnist": {"n_types": 2, "embed_stride": 3, "hidden": [8], "edge": [8], "pools": [3], "agg_channels": 32,
              "conv_hidden": [32, 64, 128], "conv_pools": [1, 2, 2], "conv_layers": 2, "mlp": [32, 32]},
    "bipolar": {"n_types": 2, "embed_stride": 5, "hidden": [16], "edge": [16], "pools": [2], "agg_channels": 32,
                "conv_hidden": [32, 64, 128], "conv_pools": [1, 2, 2], "conv_layers": 2, "mlp": [32, 32]},
}
CNN_PRESETS = {
    # reference code configs/experiment_1.py "conv_ham"
    "mnist": {"n_types": 2, "n_ids": 51, "embed_stride": 3, "hidden": [16, 16, 32, 32, 64, 64, 128],
              "pools": [1, 2, 1, 2, 1, 2, 1], "conv_layers": 2, "agg_channels": 64, "mlp": [32, 32]},
    "bipolar": {"n_types": 2, "n_ids": 41, "embed_stride": 5, "hidden": [16, 16, 32, 32, 64, 64, 128],
                "pools": [1, 2, 1, 2, 1, 2, 1], "conv_layers": 2, "agg_channels": 64, "mlp": [32, 32]},
}

_NH_DEFAULTS = {"n_types": 2, "embed_stride": 3, "hidden": [8], "edge": None, "pools": None, "agg_channels": 32,
                "conv_hidden": [], "conv_pools": None, "conv_layers": 2, "mlp": [32, 32], "padding": "circular",
                "phi_final_activation": False, "dtype": "float32"}
_CNN_DEFAULTS = {"n_types": 2, "n_ids": 51, "embed_stride": 3, "hidden": [16], "pools": None, "conv_layers": 2,
                 "agg_channels": 64, "mlp": [32, 32], "padding": "circular", "dtype": "float32"}

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _complete_config(config, preset, presets, defaults, kind):
    cfg = dict(defaults)
    if preset is not None:
        if preset not in presets:
            raise ConfigError(f"{kind}: unknown preset {preset!r}; known presets: {', '.join(sorted(presets))}")
        cfg.update(copy.deepcopy(presets[preset]))
    if config:
        unknown = set(config) - set(defaults)
        if unknown:
            raise ConfigError(f"{kind}: unknown configuration key(s) {sorted(unknown)}; known keys: "
                              f"{sorted(defaults)}")
        cfg.update(copy.deepcopy(dict(config)))
    n = len(cfg["hidden"])
    if n < 1:
        raise ConfigError(f"{kind}: 'hidden' needs at least one entry")
    if cfg.get("pools") is None:
        cfg["pools"] = [1] * n
    if "edge" in cfg and cfg["edge"] is None:
        cfg["edge"] = list(cfg["hidden"])
    if len(cfg["pools"]) != n or ("edge" in cfg and len(cfg["edge"]) != n):
        raise ConfigError(f"{kind}: 'pools' (and 'edge') must have one entry per hidden layer ({n})")
    if "conv_hidden" in cfg:
        if cfg.get("conv_pools") is None:
            cfg["conv_pools"] = [1] * len(cfg["conv_hidden"])
        if len(cfg["conv_pools"]) != len(cfg["conv_hidden"]):
            raise ConfigError(f"{kind}: 'conv_pools' must have one entry per 'conv_hidden' entry")
    if cfg["padding"] not in ("circular", "zeros"):
        raise ConfigError(f"{kind}: padding must be 'circular' or 'zeros', got {cfg['padding']!r}")
    if cfg["dtype"] not in _DTYPES:
        raise ConfigError(f"{kind}: dtype must be one of {sorted(_DTYPES)}, got {cfg['dtype']!r}")
    for key in ("n_types", "embed_stride", "agg_channels"):
        if int(cfg[key]) < 1:
            raise ConfigError(f"{kind}: {key} must be >= 1, got {cfg[key]}")
    return cfg


# ------------------------------------------------------------------------------------------- helpers
def _conv(x, conv: nn.Conv2d, padding: str):
    """3×3 (or k×k) 'same' convolution with circular or zero padding; x: [N, C, h, w]."""
    k = conv.kernel_size[0]
    if k == 1:
        return conv(x)
    p = k // 2
    if padding == "circular":
        x = F.pad(x, (p, p, p, p), mode="circular")
        return F.conv2d(x, conv.weight, conv.bias)
    return F.conv2d(x, conv.weight, conv.bias, padding=p)


def _pool(x, p: int):
    return x if p == 1 else F.max_pool2d(x, p, p)


def present_ids(ids: torch.Tensor, n_ids: int | None = None):
    """Ids present on each lattice of a batch, padded.

    Returns ``(idlist [B, K] long, present [B, K] bool, volumes [B, C] long)``: the ids with positive volume
    in increasing order, padded (``present`` False) with the last id; K = the largest count in the batch.
    """
    B = ids.shape[0]
    flat = ids.reshape(B, -1)
    c = int(flat.max()) + 1 if n_ids is None else max(int(n_ids), int(flat.max()) + 1)
    vol = torch.zeros((B, c), dtype=torch.long, device=ids.device)
    vol.scatter_add_(1, flat, torch.ones_like(flat))
    pres = vol > 0
    k = int(pres.sum(1).max())
    order = torch.argsort((~pres).to(torch.int8), dim=1, stable=True)[:, :k]
    present = pres.gather(1, order)
    return order, present, vol


class _MLPHead(nn.Module):
    """MLP with residual SiLU hidden layers (reference ``MLP`` with use_residual) and a linear output."""

    def __init__(self, n_in: int, hidden):
        super().__init__()
        self.layers = nn.ModuleList()
        self.res = nn.ModuleList()
        c = n_in
        for h in hidden:
            self.layers.append(nn.Linear(c, h))
            self.res.append(nn.Linear(c, h) if c != h else nn.Identity())
            c = h
        self.out = nn.Linear(c, 1)

    def forward(self, x):
        for lin, res in zip(self.layers, self.res):
            x = _silu(lin(x)) + res(x)
        return self.out(x)[..., 0]


class _ConvBlock(nn.Module):
    """[Conv3, SiLU] × n with a residual (1×1 conv when channels change): reference ``ConvNet``."""

    def __init__(self, c_in: int, c_out: int, n_layers: int):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(c_in if i == 0 else c_out, c_out, 3) for i in range(n_layers)])
        self.res = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x, padding):
        y = x
        for conv in self.convs:
            y = _silu(_conv(y, conv, padding))
        return y + (self.res(x) if self.res is not None else x)


class _NHLayer(nn.Module):
    """One NH layer (reference ``NHLayer`` with edge downsampling factor 1)."""

    def __init__(self, c_in: int, c_node: int, c_edge: int, phi_final_activation: bool = False):
        super().__init__()
        self.down = nn.Conv2d(c_in, c_edge, 1)
        self.psi1 = nn.Conv2d(c_edge, c_edge, 3)
        self.psi2 = nn.Conv2d(c_edge, c_edge, 3)
        self.up = nn.Conv2d(c_edge, c_edge, 1)
        self.phi1 = nn.Conv2d(c_in + c_edge, c_node, 3)
        self.phi2 = nn.Conv2d(c_node, c_node, 3)
        self.res = nn.Conv2d(c_in, c_node, 1) if c_in != c_node else None
        self.phi_final_activation = phi_final_activation

    def psi(self, x, padding):
        z = self.down(x)
        return _silu(_conv(_silu(_conv(z, self.psi1, padding)), self.psi2, padding))

    def phi(self, x, a, padding):
        y = _conv(_silu(_conv(torch.cat([x, a], 1), self.phi1, padding)), self.phi2, padding)
        if self.phi_final_activation:
            y = _silu(y)
        return y + (self.res(x) if self.res is not None else x)

    def forward(self, x, pres, padding):
        """x: [B, K, C, h, w]; pres: [B, K] float (1 present, 0 padding) → [B, K, C', h, w] (before pooling)."""
        B, K = x.shape[:2]
        xf = x.flatten(0, 1)
        p = self.psi(xf, padding)
        p = p.view(B, K, *p.shape[1:])
        s = (p * pres[:, :, None, None, None]).sum(1)
        a = self.up(s)
        a = a[:, None].expand(B, K, *a.shape[1:]).flatten(0, 1)
        y = self.phi(xf, a, padding)
        return y.view(B, K, *y.shape[1:])


# ------------------------------------------------------------------------------------------- common Term base
class _NeuralTerm(ConfigTerm):
    analytic = False
    _presets: ClassVar[dict] = {}
    _defaults: ClassVar[dict] = {}

    def __init__(self, config=None, *, preset=None, scale=1.0, learn_scale=False, seed=None):
        super().__init__(scale, learn_scale)
        self.config = _complete_config(config, preset, self._presets, self._defaults, self.kind)

    def _finish_init(self, seed):
        if seed is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(seed))
                for m in self.modules():
                    if isinstance(m, (nn.Conv2d, nn.Linear)):
                        m.reset_parameters()
        self.to(_DTYPES[self.config["dtype"]])
        # the scale stays float64
        if isinstance(self.scale, nn.Parameter):
            self.scale.data = self.scale.data.to(torch.float64)
        else:
            self.scale = self.scale.to(torch.float64)

    def _network_parameters(self):
        return [p for n, p in self.named_parameters() if n != "scale"]

    @property
    def dtype(self):
        return next(iter(self._network_parameters())).dtype

    def _check_types(self, batch: Batch):
        t = int(batch.types.max()) if batch.types.numel() else 0
        if t > self.config["n_types"]:
            raise ConfigError(f"{self.kind}: the states hold cell type {t} but the network was built for "
                              f"types 0..{self.config['n_types']}")

    def _check_size(self, batch: Batch):
        need = int(self.config["embed_stride"]) * int(np.prod(self.config["pools"]))
        need *= int(np.prod(self.config.get("conv_pools") or [1]))
        if min(batch.shape) < need:
            raise ConfigError(f"{self.kind}: lattice {batch.shape} is smaller than the network's total stride "
                              f"{need} (embedding stride × pools)")

    def _type_onehot(self, batch: Batch):
        tmap = batch.types.gather(1, batch.ids.flatten(1)).view(batch.ids.shape)
        oh = F.one_hot(tmap, self.config["n_types"] + 1).permute(0, 3, 1, 2)
        return oh.to(self.dtype)

    def delta(self, batch: Batch, sites: torch.Tensor, new_ids: torch.Tensor) -> torch.Tensor:
        return self.delta_full(batch, sites, new_ids)

    def delta_np(self, state, site, new_id, cache=None) -> float:
        """ΔH of one copy attempt (evaluates the network on the state before and after; slow, exact)."""
        ids = np.asarray(state.ids)
        dev = next(iter(self._network_parameters())).device
        after = ids.copy()
        after[tuple(site)] = new_id
        types = torch.as_tensor(np.asarray(state.types, dtype=np.int64), device=dev)
        st = torch.as_tensor(np.stack([ids, after]).astype(np.int64), device=dev)
        b = Batch(st, types[None].expand(2, -1).contiguous(), torch.zeros((2, len(types)), dtype=torch.long), True)
        with torch.no_grad():
            e = self.energy(b)
        return float(e[1] - e[0])



# ------------------------------------------------------------------------------------------- the paper's NH
@register_term
class NeuralHamiltonian(_NeuralTerm):
    """The paper's Neural Hamiltonian (kind ``"nh"``); see the module docstring.

    Parameters
    ----------
    config : dict, optional
        Architecture: ``n_types`` (biological types T; the input has 2+T channels), ``embed_stride`` (s),
        ``hidden`` (channels per NH layer), ``edge`` (channels of the aggregate A per layer, default = hidden),
        ``pools`` (max-pool size after each layer), ``agg_channels`` (1×1 read-out before the sum over cells),
        ``conv_hidden``/``conv_pools``/``conv_layers`` (CNN blocks after the cell sum: the "nh1_cnn"
        baseline), ``mlp`` (residual hidden layers), ``padding`` ("circular"), ``phi_final_activation``
        (False, as the reference code), ``dtype`` ("float32" or "float64").
    preset : {"mnist", "bipolar"}, optional
        Start from the reference code's configuration of that experiment; ``config`` entries override it.
    scale : float or nn.Parameter
        Multiplies the energy (w_n of a closure model when shared).
    seed : int, optional
        Deterministic initialisation (uniform ±1/√fan_in, the reference code's scheme).
    """

    kind = "nh"
    _presets = NH_PRESETS
    _defaults = _NH_DEFAULTS

    def __init__(self, config=None, *, preset=None, scale=1.0, learn_scale=False, seed=None):
        super().__init__(config, preset=preset, scale=scale, learn_scale=learn_scale, seed=seed)
        cfg = self.config
        T = int(cfg["n_types"])
        s = int(cfg["embed_stride"])
        hidden = [int(c) for c in cfg["hidden"]]
        self.embed = nn.Conv2d(2 + T, hidden[0], s, stride=s)
        chans = [hidden[0]] + hidden
        self.layers = nn.ModuleList([_NHLayer(chans[i], chans[i + 1], int(cfg["edge"][i]),
                                              bool(cfg["phi_final_activation"])) for i in range(len(hidden))])
        self.to_agg = nn.Conv2d(hidden[-1], int(cfg["agg_channels"]), 1)
        cc = [int(cfg["agg_channels"])] + [int(c) for c in cfg["conv_hidden"]]
        self.conv_blocks = nn.ModuleList([_ConvBlock(cc[i], cc[i + 1], int(cfg["conv_layers"]))
                                          for i in range(len(cfg["conv_hidden"]))])
        self.head = _MLPHead(cc[-1], [int(c) for c in cfg["mlp"]])
        self._finish_init(seed)

    @property
    def total_stride(self) -> int:
        """Embedding stride × product of the pools: the period of exact translation invariance (sites)."""
        return int(self.config["embed_stride"]) * int(np.prod(self.config["pools"]))

    # --- forward pieces --------------------------------------------------------------------------
    def _inputs(self, batch: Batch):
        """Per-cell embedding: (x1 [B, K, C, h1, w1], pres [B, K] float, idlist [B, K])."""
        self._check_types(batch)
        self._check_size(batch)
        ids = batch.ids
        idlist, present, _ = present_ids(ids)
        B, K = idlist.shape
        masks = (ids[:, None] == idlist[:, :, None, None]).to(self.dtype)  # [B, K, H, W]
        W = self.embed.weight
        em = F.conv2d(masks.flatten(0, 1)[:, None], W[:, :1], None, stride=self.embed.stride)
        et = F.conv2d(self._type_onehot(batch), W[:, 1:], self.embed.bias, stride=self.embed.stride)
        x = em.view(B, K, *em.shape[1:]) + et[:, None]
        return x, present.to(self.dtype), idlist

    def _run_layers(self, x, pres, start: int = 0):
        pad = self.config["padding"]
        for li in range(start, len(self.layers)):
            y = self.layers[li](x, pres, pad)
            p = int(self.config["pools"][li])
            if p > 1:
                B, K = y.shape[:2]
                y = _pool(y.flatten(0, 1), p)
                y = y.view(B, K, *y.shape[1:])
            x = y
        return x

    def _readout(self, x, pres):
        B, K = x.shape[:2]
        r = self.to_agg(x.flatten(0, 1))
        r = (r.view(B, K, *r.shape[1:]) * pres[:, :, None, None, None]).sum(1)
        for blk, p in zip(self.conv_blocks, self.config["conv_pools"]):
            r = _pool(blk(r, self.config["padding"]), int(p))
        return self.head(r.sum((-2, -1)))

    def energy_nn(self, batch: Batch) -> torch.Tensor:
        """Network output [B] in the network dtype, without ``scale``."""
        x, pres, _ = self._inputs(batch)
        return self._readout(self._run_layers(x, pres), pres)

    def energy(self, batch: Batch) -> torch.Tensor:
        return self.energy_nn(batch).to(torch.float64) * self.scale

    # --- fast batched ΔH --------------------------------------------------------------------------
    def delta(self, batch: Batch, sites: torch.Tensor, new_ids: torch.Tensor, *, chunk: int = 12) -> torch.Tensor:
        """ΔH [B, P] (float64, scale included) of copying ``new_ids`` into ``sites`` (flat), against one state.

        Reuses the base state's activations; see :meth:`delta_incremental`. Falls back to full
        recomputation for architectures the incremental path does not cover (CNN blocks after the sum).
        """
        if len(self.conv_blocks) or self.config["padding"] != "circular" or not self._crop_fits(batch.shape):
            return self.delta_full(batch, sites, new_ids)
        return self.delta_incremental(batch, sites, new_ids, chunk=chunk)

    def _crop_fits(self, shape) -> bool:
        """The layer-1 crop of the incremental ΔH must not wrap onto itself on the embedding grid."""
        s, p1 = int(self.config["embed_stride"]), int(self.config["pools"][0])
        d = 2 * (4 + (p1 - 1) + 2) + 1
        return min(shape[0] // s, shape[1] // s) >= d

    def _fast_weights(self):
        """Per-layer weights of the incremental path: ``down`` folded into ``psi1`` and stacked with the
        cell part of ``phi1`` (one 3×3 conv on x_c), the aggregate part of ``phi1`` applied to A once."""
        out = []
        for L in self.layers:
            C = L.down.in_channels
            Wd = L.down.weight[:, :, 0, 0]  # [E, C]
            Wf = torch.einsum("oekl,ec->ockl", L.psi1.weight, Wd)
            bf = L.psi1.bias + torch.einsum("oekl,e->o", L.psi1.weight, L.down.bias)
            Wx = L.phi1.weight[:, :C]
            Wcat = torch.cat([Wf, Wx], 0)
            bcat = torch.cat([bf, torch.zeros_like(L.phi1.bias)], 0)
            # phi1 on A = up(S): fold the 1×1 'up' into phi1's A part
            Wa = L.phi1.weight[:, C:]
            Wu = L.up.weight[:, :, 0, 0]
            WA = torch.einsum("oakl,ae->oekl", Wa, Wu)
            bA = L.phi1.bias + torch.einsum("oakl,a->o", Wa, L.up.bias)
            out.append((Wcat, bcat, Wf.shape[0], WA, bA))
        return out

    def _fast_rest(self, x, pres, fw):
        """Network output [n] for layer-2 inputs ``x`` [n, K, C, h, w] (layers 2.. and the read-out).

        Same function as ``_readout(_run_layers(x, pres, 1), pres)`` (exact up to float rounding); uses the
        folded weights ``fw`` and, for a last layer without pooling/final activation, sums before ``phi2``.
        """
        n, K = x.shape[:2]
        pw = pres[:, :, None, None, None]
        nl = len(self.layers)
        for li in range(1, nl):
            L = self.layers[li]
            Wcat, bcat, E, WA, bA = fw[li]
            h, w = x.shape[-2:]
            xf = x.flatten(0, 1)
            u = F.conv2d(F.pad(xf, (1, 1, 1, 1), mode="circular"), Wcat, bcat)
            z = _silu(u[:, :E])
            ps = _silu(F.conv2d(F.pad(z, (1, 1, 1, 1), mode="circular"), L.psi2.weight, L.psi2.bias))
            S = (ps.view(n, K, *ps.shape[1:]) * pw).sum(1)
            aA = F.conv2d(F.pad(S, (1, 1, 1, 1), mode="circular"), WA, bA)  # [n, node, h, w]
            g = _silu(u[:, E:].view(n, K, -1, h, w) + aA[:, None])
            p = int(self.config["pools"][li])
            last = li == nl - 1
            if last and p == 1 and not L.phi_final_activation and not len(self.conv_blocks):
                # Σ_c pres_c Σ_space (phi2(g_c) + res(x_c)): a circular conv's spatial sum is a matmul
                # (accumulated in float64: the sums run over all cells and pixels)
                d = torch.float64
                gs = (g * pw).sum((1, 3, 4), dtype=d)  # [n, node]
                xs = (x * pw).sum((1, 3, 4), dtype=d)
                npres = pres.sum(1, dtype=d)[:, None] * (h * w)
                y = gs @ L.phi2.weight.sum((2, 3), dtype=d).T + npres * L.phi2.bias.to(d)
                if L.res is not None:
                    y = y + xs @ L.res.weight[:, :, 0, 0].to(d).T + npres * L.res.bias.to(d)
                else:
                    y = y + xs
                r = y @ self.to_agg.weight[:, :, 0, 0].to(d).T + npres * self.to_agg.bias.to(d)
                hd = self.head
                for lin, res in zip(hd.layers, hd.res):
                    lr = F.linear(r, res.weight.to(d), res.bias.to(d)) if isinstance(res, nn.Linear) else r
                    r = _silu(F.linear(r, lin.weight.to(d), lin.bias.to(d))) + lr
                return F.linear(r, hd.out.weight.to(d), hd.out.bias.to(d))[..., 0]
            y = F.conv2d(F.pad(g.flatten(0, 1), (1, 1, 1, 1), mode="circular"), L.phi2.weight, L.phi2.bias)
            if L.phi_final_activation:
                y = _silu(y)
            y = y + (L.res(xf) if L.res is not None else xf)
            if p > 1:
                y = _pool(y, p)
            x = y.view(n, K, *y.shape[1:])
        return self._readout(x, pres)

    def delta_incremental(self, batch: Batch, sites: torch.Tensor, new_ids: torch.Tensor, *, chunk: int = 12):
        """ΔH reusing activations outside each proposal's region of influence (exact up to float rounding).

        A copy at site (i, j) changes one embedding pixel e = (i//s, j//s) of every cell (linearly: the type
        one-hot and the two affected masks).  In NH layer 1 the cell-wise branch ψ changes within radius 2 of
        e, the aggregate within radius 2, the interaction branch within radius 4: this window is recomputed
        for every cell on a crop (ψ before the copy is taken from the cache), max-pooled and written into the
        cached input of layer 2; layers 2.. and the read-out are evaluated in full for all proposals (they run
        at 1/(s·p1)² of the lattice resolution and change everywhere), with linear pieces folded: ``down``
        into ``psi1``, ``up`` into ``phi1``, ``phi1``'s aggregate part evaluated once per proposal rather than
        per cell, and the last layer's ``phi2``/``res``/``to_agg`` summed over space before being applied.
        Proposals that need a cell absent from the base state fall back to full recomputation.
        """
        if not self._crop_fits(batch.shape):
            raise ConfigError(f"nh: lattice {batch.shape} too small for the incremental ΔH; use delta_full")
        if self.config["padding"] != "circular":
            raise ConfigError("nh: the incremental ΔH needs circular padding; use delta_full")
        dev = batch.device
        B, P = sites.shape
        W = batch.shape[1]
        s = int(self.config["embed_stride"])
        x1, pres, idlist = self._inputs(batch)
        _, K, C1, h1, w1 = x1.shape
        L0 = self.layers[0]
        p1 = int(self.config["pools"][0])
        fw = self._fast_weights()
        # --- base: layer-1 caches
        # (same arithmetic as the proposals below, so that rounding errors largely cancel in the difference)
        Wf0, bf0, E0, WA0, bA0 = fw[0]
        xf = x1.flatten(0, 1)
        u = F.conv2d(F.pad(xf, (1, 1, 1, 1), mode="circular"), Wf0, bf0)
        z = _silu(u[:, :E0])
        psi = _silu(F.conv2d(F.pad(z, (1, 1, 1, 1), mode="circular"), L0.psi2.weight, L0.psi2.bias))
        psi = psi.view(B, K, -1, h1, w1)
        S1 = (psi * pres[:, :, None, None, None]).sum(1)  # [B, E, h1, w1]
        aA = F.conv2d(F.pad(S1, (1, 1, 1, 1), mode="circular"), WA0, bA0)
        g = _silu(u[:, E0:].view(B, K, -1, h1, w1) + aA[:, None]).flatten(0, 1)
        y1 = F.conv2d(F.pad(g, (1, 1, 1, 1), mode="circular"), L0.phi2.weight, L0.phi2.bias)
        if L0.phi_final_activation:
            y1 = _silu(y1)
        y1 = y1 + (L0.res(xf) if L0.res is not None else xf)
        x2 = _pool(y1, p1) if p1 > 1 else y1
        x2 = x2.view(B, K, *x2.shape[1:])
        h2, w2 = x2.shape[-2:]
        base_nn = self._fast_rest(x2, pres, fw)  # [B]

        out = torch.zeros((B, P), dtype=torch.float64, device=dev)
        flat_ids = batch.ids.flatten(1)
        si, sj = sites // W, sites % W
        old = flat_ids.gather(1, sites)
        ei, ej = si // s, sj // s
        seen = (ei < h1) & (ej < w1)  # sites in the remainder rows/cols are not seen by the network
        # slot of old / new id in idlist
        match_old = (idlist[:, None, :] == old[:, :, None]) & (pres[:, None, :] > 0)
        match_new = (idlist[:, None, :] == new_ids[:, :, None]) & (pres[:, None, :] > 0)
        has_new = match_new.any(-1)
        same = old == new_ids
        vol = torch.zeros((B, int(flat_ids.max()) + 2), dtype=torch.long, device=dev)
        vol.scatter_add_(1, flat_ids, torch.ones_like(flat_ids))
        vanish = vol.gather(1, old) == 1
        # a vanishing cell or a new cell changes the set of cells everywhere: recompute those in full
        fallback = ~same & (~has_new | vanish)
        todo = seen & ~same & ~fallback
        if fallback.any():
            out = self.delta_full(batch, sites, new_ids, mask=fallback)  # only those proposals, 0 elsewhere
        if not todo.any():
            return out
        # geometry of the layer-1 window
        rr = 4 + (p1 - 1)  # crop radius (layer-1 px) of the recomputed interaction output
        rx = rr + 2  # crop radius of the inputs
        # circularly padded caches, cropped by slicing (crop_fits guarantees the crops do not self-overlap)
        x1p = F.pad(xf, (rx, rx, rx, rx), mode="circular").view(B, K, C1, h1 + 2 * rx, w1 + 2 * rx)
        S1p = F.pad(S1, (rx, rx, rx, rx), mode="circular")
        psip = F.pad(psi.flatten(0, 1), (2, 2, 2, 2), mode="circular").view(B, K, -1, h1 + 4, w1 + 4)
        # the interaction branch's cell part before the copy (phi1 on x_c, no bias), radius rx-1
        ra = rx - 1
        uxp = F.pad(u[:, E0:], (ra, ra, ra, ra), mode="circular").view(B, K, -1, h1 + 2 * ra, w1 + 2 * ra)
        Wstamp = Wf0[E0:].flip(2, 3)  # [node, C1, 3, 3]: a change at the centre reaches its 3×3 neighbours
        D = 2 * rx + 1
        Wm = self.embed.weight[:, 0]  # [C1, s, s]
        Wt = self.embed.weight[:, 1:]  # [C1, T+1, s, s]
        bidx, pidx = torch.nonzero(todo, as_tuple=True)
        n_all = bidx.numel()
        dq = torch.arange(-4, 5, device=dev)
        aligned = h1 % p1 == 0 and w1 % p1 == 0
        nb = -(-(8 + p1) // p1)  # most pooled blocks a 9-row window can touch
        tnb = torch.arange(nb, device=dev)
        extra = max(0, p1 - 1 + nb * p1 - (2 * rr + 1))  # zero rows/cols so that every slice is full size
        x2p = F.pad(x2, (0, 1, 0, 1))  # one extra row/col catches the dropped remainder and unused blocks
        for lo in range(0, n_all, chunk):
            b = bidx[lo:lo + chunk]
            pp = pidx[lo:lo + chunk]
            n = b.numel()
            ci, cj = ei[b, pp], ej[b, pp]
            di, dj = si[b, pp] - ci * s, sj[b, pp] - cj * s
            bl, cil, cjl = b.tolist(), ci.tolist(), cj.tolist()
            xc = torch.stack([x1p[q, :, :, i:i + D, j:j + D] for q, i, j in zip(bl, cil, cjl)])  # [n,K,C1,D,D]
            Sc = torch.stack([S1p[q, :, i:i + D, j:j + D] for q, i, j in zip(bl, cil, cjl)])  # [n, E, D, D]
            psb = torch.stack([psip[q, :, :, i:i + 5, j:j + 5] for q, i, j in zip(bl, cil, cjl)])  # [n,K,E,5,5]
            t_old = batch.types[b, old[b, pp]]
            t_new = batch.types[b, new_ids[b, pp]]
            dt = Wt[:, t_new, di, dj].T - Wt[:, t_old, di, dj].T  # [n, C1]
            wm = Wm[:, di, dj].T  # [n, C1]
            kold = match_old[b, pp].to(self.dtype)  # [n, K]
            knew = match_new[b, pp].to(self.dtype)
            dx = dt[:, None, :] + (knew - kold)[:, :, None] * wm[:, None, :]  # [n, K, C1]
            xa = xc.clone()
            xa[:, :, :, rx, rx] += dx
            pres_a = pres[b]
            pw = pres_a[:, :, None, None, None]
            # ψ after on the centre (radius 2), for all cells; ψ before from the cache
            cen = slice(rx - 4, rx + 5)
            z = _silu(F.conv2d(xa[..., cen, cen].flatten(0, 1), Wf0[:E0], bf0[:E0]))
            ps = _silu(F.conv2d(z, L0.psi2.weight, L0.psi2.bias)).view(n, K, -1, 5, 5)
            dS = ((ps - psb) * pw).sum(1)
            Sc[..., rx - 2:rx + 3, rx - 2:rx + 3] += dS
            # interaction branch, valid convolutions: radius rx → rx-1 → rx-2 = rr; A part once per proposal
            aA = F.conv2d(Sc, WA0, bA0)  # [n, node, D-2, D-2]
            # phi1 on x_c after the copy = before (cached) + the 3×3 stamp of the centre change dx
            ux = torch.stack([uxp[q, :, :, i:i + D - 2, j:j + D - 2] for q, i, j in zip(bl, cil, cjl)])
            ux[..., ra - 1:ra + 2, ra - 1:ra + 2] += torch.einsum("ocab,nkc->nkoab", Wstamp, dx)
            g = _silu(ux + aA[:, None]).flatten(0, 1)
            yc = F.conv2d(g, L0.phi2.weight, L0.phi2.bias)
            if L0.phi_final_activation:
                yc = _silu(yc)
            xin = xa.flatten(0, 1)[..., 2:-2, 2:-2]
            yc = yc + (L0.res(xin) if L0.res is not None else xin)
            yc = yc.view(n, K, -1, 2 * rr + 1, 2 * rr + 1)  # after-state layer-1 output, radius rr around e
            # pooled outputs that intersect the changed region (radius 4); gather their p1×p1 blocks
            C2 = yc.shape[2]
            if aligned:
                # blocks tile the torus: nb consecutive blocks from the one holding row ci-4 (local row st)
                mi, mj = (ci - 4) % p1, (cj - 4) % p1
                sti, stj = (p1 - 1 - mi).tolist(), (p1 - 1 - mj).tolist()
                ycp = F.pad(yc.flatten(1, 2), (0, extra, 0, extra)) if extra else yc.flatten(1, 2)
                blk = torch.stack([ycp[k, :, a:a + nb * p1, c:c + nb * p1] for k, (a, c) in enumerate(zip(sti, stj))])
                blk = F.max_pool2d(blk, p1, p1) if p1 > 1 else blk
                blk = blk.view(n, K, C2, nb, nb)
                qi = ((ci - 4) // p1)[:, None] + tnb
                qj = ((cj - 4) // p1)[:, None] + tnb
                # blocks past the changed rows (ci+4) hold partial garbage: send them to the dummy row/col
                qi = torch.where(qi * p1 <= (ci + 4)[:, None], qi % h2, torch.full_like(qi, h2))
                qj = torch.where(qj * p1 <= (cj + 4)[:, None], qj % w2, torch.full_like(qj, w2))
            else:
                r_abs = (ci[:, None] + dq) % h1  # [n, 9]
                c_abs = (cj[:, None] + dq) % w1
                qi, qj = r_abs // p1, c_abs // p1
                st_i = (dq + rr)[None] - (r_abs % p1)  # local start row of the block
                st_j = (dq + rr)[None] - (c_abs % p1)
                tpool = torch.arange(p1, device=dev)
                ri = (st_i[:, :, None] + tpool).reshape(n, -1)  # [n, 9*p1]
                rj = (st_j[:, :, None] + tpool).reshape(n, -1)
                blk = yc.gather(3, ri[:, None, None, :, None].expand(n, K, C2, ri.shape[1], yc.shape[-1]))
                blk = blk.gather(4, rj[:, None, None, None, :].expand(n, K, C2, ri.shape[1], rj.shape[1]))
                if p1 > 1:
                    blk = F.max_pool2d(blk.flatten(0, 1), p1, p1)
                blk = blk.view(n, K, C2, 9, 9)
                qi = torch.where(qi < h2, qi, torch.full_like(qi, h2))
                qj = torch.where(qj < w2, qj, torch.full_like(qj, w2))
            # write into a copy of the cached layer-2 input (one extra row/col catches the dropped remainder)
            x2n = x2p[b]
            nn_i = torch.arange(n, device=dev)[:, None, None]
            x2n = x2n.permute(0, 3, 4, 1, 2)  # [n, h2+1, w2+1, K, C2]
            x2n[nn_i, qi[:, :, None], qj[:, None, :]] = blk.permute(0, 3, 4, 1, 2)
            x2n = x2n.permute(0, 3, 4, 1, 2)[..., :h2, :w2]
            e_after = self._fast_rest(x2n.contiguous(), pres_a, fw)
            out[b, pp] = (e_after - base_nn[b]).to(torch.float64) * self.scale
        return out


# ------------------------------------------------------------------------------------------- baselines
@register_term
class NH1CNNHamiltonian(NeuralHamiltonian):
    """Baseline "1 NH layer + invariant pooling over cells + CNN" (kind ``"nh1_cnn"``; reference "shallow_nh")."""

    kind = "nh1_cnn"
    _presets = NH1CNN_PRESETS

    def __init__(self, config=None, *, preset=None, scale=1.0, learn_scale=False, seed=None):
        if preset is None and not config:
            preset = "mnist"
        super().__init__(config, preset=preset, scale=scale, learn_scale=learn_scale, seed=seed)


@register_term
class CNNHamiltonian(_NeuralTerm):
    """Baseline plain CNN on the stacked one-hot of ids and types (kind ``"cnn"``; NOT permutation invariant).

    Input channels: ``n_ids`` (one-hot of the cell id; ids ≥ n_ids are an error) + ``n_types + 1`` (type
    one-hot). Embedding conv k = stride = s, blocks of [Conv3, SiLU]×``conv_layers`` with residuals and
    max-pools, 1×1 conv to ``agg_channels``, sum over space, residual MLP (reference ``SimpleConvNeuralHamiltonian``).
    """

    kind = "cnn"
    _presets = CNN_PRESETS
    _defaults = _CNN_DEFAULTS

    def __init__(self, config=None, *, preset=None, scale=1.0, learn_scale=False, seed=None):
        super().__init__(config, preset=preset, scale=scale, learn_scale=learn_scale, seed=seed)
        cfg = self.config
        T = int(cfg["n_types"])
        s = int(cfg["embed_stride"])
        hidden = [int(c) for c in cfg["hidden"]]
        self.embed = nn.Conv2d(int(cfg["n_ids"]) + T + 1, hidden[0], s, stride=s)
        chans = [hidden[0]] + hidden
        self.blocks = nn.ModuleList([_ConvBlock(chans[i], chans[i + 1], int(cfg["conv_layers"]))
                                     for i in range(len(hidden))])
        self.to_agg = nn.Conv2d(hidden[-1], int(cfg["agg_channels"]), 1)
        self.head = _MLPHead(int(cfg["agg_channels"]), [int(c) for c in cfg["mlp"]])
        self._finish_init(seed)

    def energy(self, batch: Batch) -> torch.Tensor:
        self._check_types(batch)
        self._check_size(batch)
        n_ids = int(self.config["n_ids"])
        if int(batch.ids.max()) >= n_ids:
            raise ConfigError(f"cnn: cell id {int(batch.ids.max())} exceeds the network's n_ids = {n_ids}")
        x = torch.cat([F.one_hot(batch.ids, n_ids).permute(0, 3, 1, 2).to(self.dtype), self._type_onehot(batch)], 1)
        x = self.embed(x)
        for blk, p in zip(self.blocks, self.config["pools"]):
            x = _pool(blk(x, self.config["padding"]), int(p))
        e = self.head(self.to_agg(x).sum((-2, -1)))
        return e.to(torch.float64) * self.scale
