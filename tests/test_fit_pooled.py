"""The pooled NH in closures and in training: every subset of w_a·H_analytic + w_l·H_local + w_g·H_pooled,
named weights through bundles, the --model names, pcd and pl fits."""

from __future__ import annotations

import csv
import itertools

import numpy as np
import pytest
import torch
from fit_helpers import block_states, write_npz

from neuralcpm_plugin.bundle import load_bundle, save_bundle
from neuralcpm_plugin.errors import ConfigError
from neuralcpm_plugin.hamiltonian import Batch, LatticeSpec, analytic
from neuralcpm_plugin.hamiltonian.closure import closure_hamiltonian, closure_weights, tie_closure_scales
from neuralcpm_plugin.hamiltonian.local_nh import LocalNeuralHamiltonian
from neuralcpm_plugin.hamiltonian.pooled_nh import PooledNeuralHamiltonian
from neuralcpm_plugin.lattice import CellState
from training.config import load_config
from training.fit import build_model, fit


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _parts(seed=0):
    J = np.array([[0.0, 1.0, 1.2], [1.0, 0.8, 1.5], [1.2, 1.5, 0.6]])
    a = [analytic.ContactEnergy(J, 2), analytic.VolumeConstraint([0, 0.5, 0.5], [0, 16.0, 16.0])]
    loc = LocalNeuralHamiltonian({"n_types": 2, "stride": 3, "channels": 4}, seed=seed)
    pool = PooledNeuralHamiltonian({"n_types": 2, "stride": 3, "channels": 4, "hidden": 6, "position_dim": 2,
                                    "lattice_shape": [24, 24]}, seed=seed)
    with torch.no_grad():  # O(1) neural energies, so that every part visibly contributes
        for t in (loc, pool):
            for p in t.parameters():
                if p.dim() > 1:
                    p.mul_(3.0)
    return a, loc, pool


@pytest.mark.parametrize("subset", [s for r in (1, 2, 3) for s in itertools.combinations("alg", r)])
def test_closure_subsets_energy_delta_weights_and_bundle(subset, tmp_path):
    a, loc, pool = _parts()
    s = block_states(1, size=24)[0]
    b = Batch.from_states([s])
    with torch.no_grad():
        parts = {"a": sum(t.energy(b) for t in a), "l": loc.energy(b), "g": pool.energy(b)}
    w = {"a": 0.3, "l": 0.7, "g": 1.9}
    groups = {}
    if "l" in subset:
        groups["w_l"] = [loc]
    if "g" in subset:
        groups["w_g"] = [pool]
    ham = closure_hamiltonian(a if "a" in subset else [], groups, LatticeSpec((24, 24)), 1.0,
                              ["medium", "a", "b"], w_a=w["a"], weights={k: w[k[-1]] for k in groups})
    with torch.no_grad():
        e = float(ham.energy(b))
    assert e == pytest.approx(float(sum(w[k] * parts[k] for k in subset)), rel=1e-12)
    cw = closure_weights(ham)
    assert cw["w_a"] == (w["a"] if "a" in subset else None)
    for k in "lg":
        assert cw.get(f"w_{k}") == (w[k] if k in subset else None)
    # one Parameter per group, each with its gradient = the group's energy
    ham.energy(b).sum().backward()
    for k in subset:
        t = {"a": a[0], "l": loc, "g": pool}[k]
        assert float(t.scale.grad) == pytest.approx(float(parts[k]), rel=1e-9)
    # ΔH of the closure == H(after) − H(before)
    rng = np.random.default_rng(1)
    sites = torch.as_tensor(rng.choice(np.flatnonzero(s.ids.ravel() >= 0), 6))[None]
    new = torch.as_tensor(s.ids.ravel()[(sites[0] + 1) % (24 * 24)])[None]
    with torch.no_grad():
        d = ham.delta(b, sites, new)[0]
        for p in range(6):
            ids = s.ids.copy()
            ids.flat[int(sites[0, p])] = int(new[0, p])
            ref = float(ham.energy(Batch.from_states([CellState(ids, s.types)]))) - e
            assert float(d[p]) == pytest.approx(ref, abs=1e-9 * max(1, abs(e)))
    # the groups survive a bundle
    save_bundle(tmp_path / "m", ham)
    h2 = tie_closure_scales(load_bundle(tmp_path / "m").hamiltonian)
    assert closure_weights(h2) == pytest.approx(cw)
    with torch.no_grad():
        assert float(h2.energy(b)) == pytest.approx(e, rel=1e-12)


def test_old_style_closure_keeps_one_neural_weight_and_bad_groups_are_errors():
    a, loc, pool = _parts()
    ham = closure_hamiltonian(a, [loc, pool], LatticeSpec((24, 24)), w_n=0.5)
    assert closure_weights(ham) == {"w_a": 0.25, "w_n": 0.5} and loc.scale is pool.scale
    a, loc, pool = _parts()
    with pytest.raises(ConfigError, match="w_a"):
        closure_hamiltonian(a, {"w_a": [loc]}, LatticeSpec((24, 24)))
    with pytest.raises(ConfigError, match="no terms"):
        closure_hamiltonian(a, {"w_l": [loc]}, LatticeSpec((24, 24)), weights={"w_g": 1.0})
    with pytest.raises(ConfigError, match="two groups"):
        closure_hamiltonian(a, {"w_l": [loc], "w_g": [loc]}, LatticeSpec((24, 24)))


def _cfg(tmp_path, data, kind, objective="pcd", **model):
    pcd = {"batch": 3, "iterations": 4, "mcs": 0.25, "flips": 10, "lr": 0.05, "checkpoint_every": 2,
           "reset_prob": 0.3, "plot_every": 0, "ema": 0.0}
    return load_config(None, {"name": "t", "out": str(tmp_path / kind / objective), "threads": 1,
                              "data": {"path": str(data)}, "objective": {"name": objective}, "pcd": pcd,
                              "pl": {"steps": 6, "sites_per_state": 24, "states_per_step": 2, "lr": 0.05},
                              "model": {"kind": kind, **model},
                              "export": {"cc3d": False, "morpheus": False}})


@pytest.fixture
def data(tmp_path):
    return write_npz(tmp_path / "d.npz", block_states(6, size=24))


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_model_names_build_the_expected_terms(tmp_path, data):
    states = block_states(2, size=24)
    small = {"stride": 3, "channels": 4}
    for kind, kinds, weights in [("pooled-nh", ["pooled_nh"], {"w_n"}),
                                 ("pooled-closure", ["contact", "volume", "pooled_nh"], {"w_a", "w_n"}),
                                 ("local-pooled-closure", ["contact", "volume", "local_nh", "pooled_nh"],
                                  {"w_a", "w_l", "w_g"})]:
        ham, _ = build_model(load_config(None, {"model": {"kind": kind, "pooled": small, "w_l": 0.5}}), states)
        assert [t.kind for t in ham.terms] == kinds
        pool = ham.term("pooled_nh")
        assert pool.config["lattice_shape"] == [24, 24] and pool.config["channels"] == 4
        got = {k for k, v in closure_weights(ham).items() if v is not None}
        assert got == weights
        if kind == "local-pooled-closure":
            assert closure_weights(ham)["w_l"] == 0.5 and closure_weights(ham)["w_g"] == 1.0
    # model.neural works for the single-pooled kinds too; both tables, or pooled on another kind: errors
    ham, _ = build_model(load_config(None, {"model": {"kind": "pooled-nh", "neural": {"position_dim": 0}}}), states)
    assert ham.terms[0].pos is None
    with pytest.raises(ConfigError, match="not both"):
        load_config(None, {"model": {"kind": "pooled-nh", "neural": {"hidden": 3}, "pooled": {"hidden": 4}}})
    with pytest.raises(ConfigError, match="model.pooled configures"):
        load_config(None, {"model": {"kind": "local-nh-closure", "pooled": {"hidden": 4}}})
    with pytest.raises(ConfigError, match="model.pooled: pooled_nh: unknown"):
        build_model(load_config(None, {"model": {"kind": "pooled-closure", "pooled": {"hiddn": 4}}}), states)


def test_pcd_fit_with_pooled_closure_changes_the_weights_and_reports_them(tmp_path, data, capsys):
    cfg = _cfg(tmp_path, data, "pooled-closure", pooled={"stride": 3, "channels": 4, "hidden": 8})
    ham0, _ = build_model(cfg, block_states(6, size=24), seed=0)
    before = {k: v.detach().clone() for k, v in ham0.state_dict().items()}
    summary = fit(cfg, progress=False)
    out = capsys.readouterr().out
    assert "closure weights: w_a = " in out and ", w_n = " in out
    assert "threads: torch 1, BLAS 1" in out
    assert summary["closure_weights"]["w_n"] != 1.0 and summary["closure_weights"]["w_a"] != 0.25
    ham = load_bundle(tmp_path / "pooled-closure" / "pcd" / "model").hamiltonian
    after = ham.state_dict()
    moved = [k for k in before if "terms.2." in k and not torch.equal(before[k], after[k])]
    assert any("mlp" in k for k in moved) and any("features" in k for k in moved) and any("pos" in k for k in moved)
    rows = _rows(tmp_path / "pooled-closure" / "pcd" / "metrics.csv")
    assert len(rows) == 4 and all(np.isfinite(float(r["loss"])) for r in rows) and "w_n" in rows[0]


def test_pcd_local_pooled_closure_and_pl_pooled_nh(tmp_path, data, capsys):
    small = {"stride": 3, "channels": 4, "hidden": 8}
    cfg = _cfg(tmp_path, data, "local-pooled-closure", pooled=small, neural={"stride": 3, "channels": 4})
    cfg["pcd"].update(sampler="exact", proposal="boundary")  # as the pooled presets: compiled neural terms
    fit(cfg, progress=False)
    out = capsys.readouterr().out
    assert "closure weights: " in out and "w_l = " in out and "w_g = " in out
    rows = _rows(tmp_path / "local-pooled-closure" / "pcd" / "metrics.csv")
    assert {"w_a", "w_l", "w_g"} <= set(rows[0])
    ham0, _ = build_model(_cfg(tmp_path, data, "pooled-nh", "pl", pooled=small), block_states(6, size=24))
    w0 = {k: v.detach().clone() for k, v in ham0.state_dict().items()}
    fit(_cfg(tmp_path, data, "pooled-nh", "pl", pooled=small), progress=False)
    ham = load_bundle(tmp_path / "pooled-nh" / "pl" / "model").hamiltonian
    assert any(not torch.equal(w0[k], v) for k, v in ham.state_dict().items() if "mlp" in k)
