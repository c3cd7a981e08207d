"""Serialisation and paper-scale helpers of the analytic terms."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from neuralcpm_plugin.bundle import load_bundle, save_bundle
from neuralcpm_plugin.hamiltonian.analytic import (
    ContactEnergy,
    DirectedMotion,
    ExternalPotential,
    SurfaceConstraint,
    VolumeConstraint,
    cellsort_hamiltonian,
    from_paper_scale,
    reference_lambda,
    to_paper_scale,
)
from neuralcpm_plugin.hamiltonian.base import Batch, Hamiltonian, LatticeSpec
from neuralcpm_plugin.lattice import CellState


def _model(periodic=True):
    rng = np.random.default_rng(0)
    lat = LatticeSpec((8, 9), periodic=periodic)
    J = np.array([[0, 1.0, 2.0], [1.0, 0.5, 0.7], [2.0, 0.7, 0.3]])
    terms = [ContactEnergy(J, 2, scale=1.5), VolumeConstraint([0, 0.5, 0.8], [0, 10.0, 12.0]),
             ExternalPotential([0, 1.0, -3.0], rng.normal(size=(8, 9)), scale=0.25),
             DirectedMotion([0, 0.2, 0.2], [None, {"mode": "band", "axis": 1, "lo": 0.4, "hi": 0.6, "sense": "inward"},
                                            {"mode": "constant", "vector": [0.0, 1.0]}]),
             SurfaceConstraint([0, 0.1, 0.2], [0, 14.0, 16.0], order=1)]
    return Hamiltonian(terms, lat, 2.0, ["medium", "a", "b"])


@pytest.mark.parametrize("periodic", [True, False])
def test_bundle_round_trip(tmp_path, periodic):
    ham = _model(periodic)
    path = save_bundle(tmp_path / "m", ham)
    doc = json.loads((path / "model.json").read_text())
    assert [t["kind"] for t in doc["terms"]] == ["contact", "volume", "external", "directed_motion", "surface"]
    assert doc["terms"][0]["params"]["J"][1][2] == 0.7 and doc["terms"][0]["scale"] == 1.5
    back = load_bundle(path).hamiltonian
    for a, b in zip(ham.terms, back.terms):
        assert a.spec() == b.spec()
        assert b.periodic == periodic
    rng = np.random.default_rng(2)
    s = CellState(rng.integers(0, 5, (8, 9)).astype(np.int32), np.array([0, 1, 2, 1, 2], np.int32))
    batch = Batch.from_states([s], periodic=periodic)
    sites = torch.as_tensor(rng.integers(0, 72, (1, 10)))
    new = torch.as_tensor(rng.integers(0, 5, (1, 10)))
    assert torch.equal(ham.delta(batch, sites, new), back.delta(batch, sites, new))
    for t in (0, 1, 2, 4):
        assert torch.equal(ham.terms[t].energy(batch), back.terms[t].energy(batch))
    site = (3, 4)
    assert ham.delta_np(s, site, 2, {"periodic": periodic}) == back.delta_np(s, site, 2)


def test_paper_scale_round_trip():
    lat = LatticeSpec((20, 20))
    paper = {"J": {"1-0": 0.5, "2-0": 0.5, "1-1": 0.333333, "1-2": 0.2, "2-2": 0.266667}, "lambda": 0.1,
             "target": 200}
    ham = from_paper_scale(paper, lat)
    c = ham.term("contact")
    Jd = c.J.detach()
    assert float(Jd[1, 0]) == pytest.approx(0.125) and float(Jd[0, 0]) == 0.0
    back = to_paper_scale(ham)
    assert back["theta"] == pytest.approx([0.5, 0.5, 0.333333, 0.2, 0.266667, 0.1])
    assert back["J_pairs"]["0-1"] == pytest.approx(0.5)
    ham2 = from_paper_scale(back, lat)
    assert torch.allclose(ham2.term("contact").J, c.J)


def test_cellsort_hamiltonian_and_reference_lambda():
    lat = LatticeSpec((10, 10), contact_order=2)
    ham = cellsort_hamiltonian({(1, 0): 0.625, (2, 0): 0.25, (1, 1): 0.25, (2, 2): 0.25, (1, 2): 1.125}, 0.5,
                               100, lat, T=1.0, type_names=["medium", "t1", "t2"])
    assert ham.is_analytic and ham.temperature == 1.0 and ham.type_names == ["medium", "t1", "t2"]
    J = ham.term("contact").J.detach()
    assert float(J[2, 1]) == 1.125 and float(J[0, 2]) == 0.25
    assert ham.term("volume").lam.tolist() == [0.0, 0.5, 0.5]
    assert to_paper_scale(ham)["J"][1][0] == pytest.approx(2.5)
    # the authors' MNIST model: lambda parameter 0.5 through softplus, plus eps 1e-3
    assert reference_lambda(0.5) == pytest.approx(np.log1p(np.exp(0.5)) + 1e-3)
