"""Closure model H = w_a·H_analytic + w_n·H_NN with shared learnable weights (paper Eq. 5)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neuralcpm_plugin.bundle import load_bundle, save_bundle
from neuralcpm_plugin.errors import ConfigError
from neuralcpm_plugin.hamiltonian import Batch, LatticeSpec
from neuralcpm_plugin.hamiltonian.closure import closure_hamiltonian, closure_weights, tie_closure_scales
from neuralcpm_plugin.hamiltonian.local_nh import LocalNeuralHamiltonian
from neuralcpm_plugin.hamiltonian.neural import NeuralHamiltonian
from neuralcpm_plugin.lattice import CellState

analytic = pytest.importorskip("neuralcpm_plugin.hamiltonian.analytic")

J = [[0.0, 2.0, 2.0], [2.0, 1.0, 3.0], [2.0, 3.0, 1.0]]


def _state(seed=0, shape=(30, 30)):
    rng = np.random.default_rng(seed)
    ids = np.zeros(shape, np.int64)
    k = 1
    for y in range(1, shape[0] - 5, 7):
        for x in range(1, shape[1] - 5, 7):
            ids[y:y + 5 + rng.integers(0, 2), x:x + 5] = k
            k += 1
    return CellState(ids, np.concatenate([[0], rng.integers(1, 3, k - 1)]))


def _terms():
    a = [analytic.ContactEnergy(J, 2), analytic.VolumeConstraint([0, 1.0, 1.0], [0, 25.0, 25.0])]
    n = [NeuralHamiltonian({"n_types": 2, "embed_stride": 2, "hidden": [4], "pools": [1], "agg_channels": 4,
                            "mlp": [4], "dtype": "float64"}, seed=0),
         LocalNeuralHamiltonian({"n_types": 2, "stride": 3, "channels": 4}, seed=0)]
    return a, n


def test_closure_energy_delta_and_shared_weights():
    a, n = _terms()
    b = Batch.from_states([_state()])
    with torch.no_grad():
        ea = sum(t.energy(b) for t in a)
        en = sum(t.energy(b) for t in n)
    ham = closure_hamiltonian(a, n, LatticeSpec((30, 30)), 1.0, ["medium", "a", "b"])
    assert closure_weights(ham) == {"w_a": 0.25, "w_n": 1.0}
    e = ham.energy(b)
    assert float(e.detach()) == pytest.approx(float(0.25 * ea + en), rel=1e-12)
    # one shared Parameter per group, listed once
    assert a[0].scale is a[1].scale and n[0].scale is n[1].scale and a[0].scale is not n[0].scale
    names = [nme for nme, _ in ham.named_parameters()]
    assert sum("scale" in x for x in names) == 2
    e.sum().backward()
    assert a[0].scale.grad is not None and n[0].scale.grad is not None
    assert float(a[0].scale.grad) == pytest.approx(float(ea), rel=1e-9)
    # ΔH (weights included) == H(after) − H(before) of the closure model
    st = _state()
    sites = torch.tensor([[1 * 30 + 6, 8 * 30 + 7]])
    new = torch.tensor([[int(st.ids[1, 5]), int(st.ids[8, 8])]])
    with torch.no_grad():
        d = ham.delta(b, sites, new)
        for p in range(2):
            ids = st.ids.copy()
            ids.flat[int(sites[0, p])] = int(new[0, p])
            ref = ham.energy(Batch.from_states([CellState(ids, st.types)])) - ham.energy(b)
            assert float(d[0, p]) == pytest.approx(float(ref), abs=1e-9)
    assert abs(float(d[0, 0])) > 1e-6


def test_closure_bundle_round_trip_and_retie(tmp_path):
    a, n = _terms()
    ham = closure_hamiltonian(a, n, LatticeSpec((30, 30)), 1.0, ["medium", "a", "b"], w_a=0.3, w_n=0.9)
    save_bundle(tmp_path / "c", ham)
    h2 = tie_closure_scales(load_bundle(tmp_path / "c").hamiltonian)
    assert closure_weights(h2)["w_a"] == pytest.approx(0.3) and closure_weights(h2)["w_n"] == pytest.approx(0.9)
    an = h2.analytic_terms()
    assert an[0].scale is an[1].scale and isinstance(an[0].scale, torch.nn.Parameter)
    b = Batch.from_states([_state(1)])
    with torch.no_grad():
        assert float(h2.energy(b)) == pytest.approx(float(ham.energy(b)), rel=1e-12)


def test_closure_rejects_bad_groups():
    a, n = _terms()
    with pytest.raises(ConfigError):
        closure_hamiltonian(n, a, LatticeSpec((30, 30)))
    a2 = [analytic.ContactEnergy(J, 2, scale=2.0)]
    with pytest.raises(ConfigError):
        closure_hamiltonian(a2, [], LatticeSpec((30, 30)))
