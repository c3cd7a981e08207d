"""Property tests: every analytic term's local ΔH (batched torch and numpy forms) equals H(after) − H(before)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from neuralcpm_plugin.hamiltonian.analytic import (
    ContactEnergy,
    DirectedMotion,
    ExternalPotential,
    SurfaceConstraint,
    VolumeConstraint,
)
from neuralcpm_plugin.hamiltonian.base import Batch
from neuralcpm_plugin.lattice import CellState

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def scenario(draw, ndim=2):
    """Two random states of one shape (torus or not), a type table, P random copy attempts per state."""
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    shape = tuple(int(draw(st.integers(3, 7))) for _ in range(ndim)) if ndim == 2 else (3, 4, 3)
    n_cells = draw(st.integers(1, 5))
    n_types = 2
    periodic = draw(st.booleans())
    blocky = draw(st.booleans())
    states = []
    types = np.concatenate([[0], rng.integers(1, n_types + 1, n_cells)]).astype(np.int32)
    for _ in range(2):
        if blocky:  # cells as contiguous runs of sites (more realistic shapes)
            ids = np.sort(rng.integers(0, n_cells + 1, int(np.prod(shape)))).reshape(shape)
        else:
            ids = rng.integers(0, n_cells + 1, shape)
        states.append(CellState(ids.astype(np.int32), types))
    P = draw(st.integers(1, 6))
    N = int(np.prod(shape))
    sites = rng.integers(0, N, (2, P))
    new_ids = rng.integers(0, n_cells + 1, (2, P))
    return states, periodic, sites, new_ids, seed


def _terms(shape, seed, with_dm=True):
    rng = np.random.default_rng(seed + 1)
    J = rng.uniform(-1, 3, (3, 3))
    J = (J + J.T) / 2
    J[0, 0] = 0
    out = [ContactEnergy(J, order=2, scale=1.3), ContactEnergy(J, order=1),
           VolumeConstraint(rng.uniform(0.1, 2, 3), rng.uniform(1, 8, 3), scale=0.7),
           ExternalPotential([0.0, 1.5, -2.0], rng.normal(size=shape)),
           SurfaceConstraint(rng.uniform(0.1, 1, 3), rng.uniform(2, 12, 3), order=2)]
    if with_dm and len(shape) == 2:
        out.append(DirectedMotion([0.0, 0.4, 0.25], [None, {"mode": "constant", "vector": [1.0, -2.0]},
                                                     {"mode": "band", "axis": 1, "lo": 0.3, "hi": 0.7,
                                                      "sense": "outward"}], scale=1.5))
        out.append(DirectedMotion([0.0, 0.3, 0.2], [None, {"mode": "band", "axis": 1, "lo": 0.4, "hi": 0.6,
                                                           "sense": "inward"},
                                                    {"mode": "band", "axis": 0, "lo": 0.2, "hi": 0.9,
                                                     "sense": "outward"}]))
    return out


def _check(states, periodic, sites, new_ids, seed):
    shape = states[0].shape
    batch = Batch.from_states(states, periodic=periodic)
    s_t = torch.as_tensor(sites)
    n_t = torch.as_tensor(new_ids)
    for term in _terms(shape, seed):
        d = term.delta(batch, s_t, n_t).detach()
        assert d.dtype == torch.float64 and d.shape == s_t.shape
        for b in range(2):
            for p in range(sites.shape[1]):
                site = np.unravel_index(int(sites[b, p]), shape)
                new = int(new_ids[b, p])
                dn = term.delta_np(states[b], site, new, {"periodic": periodic})
                assert abs(float(d[b, p]) - dn) <= 1e-9 * max(1.0, abs(dn)), (term.kind, b, p)
                if term.kind == "directed_motion":
                    continue
                after = states[b].copy()
                after.ids[site] = new
                pair = Batch.from_states([states[b], after], n_ids=batch.types.shape[1], periodic=periodic)
                e = term.energy(pair).detach()
                full = float(e[1] - e[0])
                assert abs(full - dn) <= 1e-9 * max(1.0, abs(full)), (term.kind, site, new, full, dn)


@SETTINGS
@given(scenario())
def test_delta_equals_energy_difference_2d(sc):
    _check(*sc)


@settings(max_examples=8, deadline=None)
@given(scenario(ndim=3))
def test_delta_equals_energy_difference_3d(sc):
    _check(*sc)


def test_volume_cache_matches_recount():
    rng = np.random.default_rng(3)
    s = CellState(rng.integers(0, 4, (5, 6)).astype(np.int32), np.array([0, 1, 2, 1], np.int32))
    t = VolumeConstraint([0, 1.0, 2.0], [0, 4.0, 6.0])
    for _ in range(10):
        site = (int(rng.integers(5)), int(rng.integers(6)))
        new = int(rng.integers(4))
        assert t.delta_np(s, site, new, {"volumes": s.volumes()}) == t.delta_np(s, site, new)


def test_directed_motion_matches_centre_displacement_on_torus():
    """A compact cell straddling the wrap: ΔH = −s·V·(ΔC·d̂) with ΔC from centres recomputed after unrolling."""
    H, W = 12, 10
    ids = np.zeros((H, W), np.int32)
    ids[3:7, 8:10] = 1
    ids[3:7, 0:2] = 1           # cell 1 = columns 8,9,0,1 (wraps in x)
    ids[10:12, 4:7] = 2
    ids[0:1, 4:7] = 2           # cell 2 wraps in y
    types = np.array([0, 1, 2], np.int32)
    s = CellState(ids, types)
    vec = np.array([0.6, -0.8])
    dm = DirectedMotion([0.0, 0.7, 0.3], {"mode": "constant", "vector": vec.tolist()})

    def centre_unrolled(state, cell, shift):
        rolled = np.roll(state.ids, shift, axis=(0, 1))
        return np.argwhere(rolled == cell).mean(0) - np.array(shift)

    batch = Batch.from_states([s])
    for site, new, shift in [((5, 2), 1, (0, 4)), ((4, 7), 1, (0, 4)), ((2, 5), 2, (4, 0)),
                             ((0, 5), 0, (4, 0)), ((5, 9), 0, (0, 4))]:
        after = s.copy()
        after.ids[site] = new
        old = int(s.ids[site])
        expect = 0.0
        for cell, strength in ((1, 0.7), (2, 0.3)):
            if cell not in (old, new):
                continue
            V = int((s.ids == cell).sum())
            dc = centre_unrolled(after, cell, shift) - centre_unrolled(s, cell, shift)
            expect += -strength * V * float(dc @ vec)
        got = float(dm.delta(batch, torch.tensor([[site[0] * W + site[1]]]), torch.tensor([[new]])))
        assert got == pytest.approx(expect, abs=1e-12)
        assert dm.delta_np(s, site, new) == pytest.approx(expect, abs=1e-12)


def test_directed_motion_band_direction():
    """Band mode follows the bipolar model: 'inward' pushes towards the centre outside the band."""
    W = 20
    ids = np.zeros((10, W), np.int32)
    ids[4:6, 2:4] = 1            # centre x = 2.5 < 0.4 W → pushed towards +x
    ids[4:6, 9:11] = 2           # centre x = 9.5 inside band, left of middle → 'outward' pushes to −x
    s = CellState(ids, np.array([0, 1, 2], np.int32))
    dm = DirectedMotion([0, 1.0, 1.0], [None, {"mode": "band", "axis": 1, "lo": 0.4, "hi": 0.6, "sense": "inward"},
                                        {"mode": "band", "axis": 1, "lo": 0.4, "hi": 0.6, "sense": "outward"}])
    assert dm.delta_np(s, (4, 4), 1) < 0 < dm.delta_np(s, (4, 1), 1)      # extending right is favoured
    assert dm.delta_np(s, (4, 8), 2) < 0 < dm.delta_np(s, (4, 11), 2)     # extending left is favoured
    with pytest.raises(NotImplementedError):
        dm.energy(Batch.from_states([s]))


def test_gradients_flow_and_symmetry():
    rng = np.random.default_rng(0)
    s = CellState(rng.integers(0, 4, (6, 6)).astype(np.int32), np.array([0, 1, 2, 2], np.int32))
    b = Batch.from_states([s, s])
    J = np.array([[0, 1, 2], [1, 0.5, 0.7], [2, 0.7, 0.3]])
    terms = [ContactEnergy(J), VolumeConstraint([0, 1.0, 2.0], [0, 5.0, 9.0], learn_target=True),
             ExternalPotential([0, 1.0, -2.0], rng.normal(size=(6, 6))),
             SurfaceConstraint([0, 0.5, 0.5], [0, 6.0, 6.0])]
    sites = torch.tensor([[3, 8], [14, 20]])
    new = torch.tensor([[1, 2], [3, 0]])
    for t in terms:
        (t.energy(b).sum() + t.delta(b, sites, new).sum()).backward()
        params = list(t.parameters())
        assert params and all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
        assert any(float(p.grad.abs().sum()) > 0 for p in params), t.kind
    c = terms[0]
    with torch.no_grad():
        c.J_triu.add_(torch.randn_like(c.J_triu))
    Jm = c.J.detach()
    assert torch.equal(Jm, Jm.T) and float(Jm[0, 0]) == 0.0


def test_bad_parameters_raise_config_error():
    from neuralcpm_plugin.errors import ConfigError
    with pytest.raises(ConfigError, match="symmetric"):
        ContactEnergy([[0, 1], [2, 0]])
    with pytest.raises(ConfigError):
        VolumeConstraint([0, 1], [0, 1, 2])
    with pytest.raises(ConfigError):
        DirectedMotion([0, 1], [None, {"mode": "spiral"}])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_delta_on_cuda_matches_cpu():
    rng = np.random.default_rng(1)
    states = [CellState(rng.integers(0, 5, (8, 9)).astype(np.int32), np.array([0, 1, 2, 1, 2], np.int32))
              for _ in range(3)]
    sites = torch.as_tensor(rng.integers(0, 72, (3, 7)))
    new = torch.as_tensor(rng.integers(0, 5, (3, 7)))
    for periodic in (True, False):
        bc = Batch.from_states(states, periodic=periodic)
        bg = Batch.from_states(states, periodic=periodic, device="cuda")
        for t in _terms((8, 9), 5):
            tg = t.to("cuda")
            d_cpu = t.to("cpu").delta(bc, sites, new)
            d_gpu = tg.to("cuda").delta(bg, sites.cuda(), new.cuda()).cpu()
            assert torch.allclose(d_cpu, d_gpu, atol=1e-9)
            t.to("cpu")
