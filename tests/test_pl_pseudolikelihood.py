"""The proposal-aware pseudo-likelihood: candidate sets, the objective against a brute-force oracle, recovery."""

import glob
import time

import numpy as np
import pytest
import torch
from fit_helpers import SHARED, block_states
from hypothesis import given, settings
from hypothesis import strategies as st

from neuralcpm_plugin.hamiltonian.analytic import cellsort_hamiltonian
from neuralcpm_plugin.hamiltonian.base import LatticeSpec
from neuralcpm_plugin.lattice import CellState, neighbour_offsets, states_from_channels
from neuralcpm_plugin.metrics.params import KNOWN_TRUTHS, param_rmse, param_vector
from training.parammap import ParamMap
from training.pseudolikelihood import build_candidates, fit_pl, pl_nll


def _brute_candidates(state, order=2):
    H, W = state.shape
    out = {}
    for y in range(H):
        for x in range(W):
            own = state.ids[y, x]
            ks = {}
            for dy, dx in neighbour_offsets(order):
                c = int(state.ids[(y + dy) % H, (x + dx) % W])
                ks[c] = ks.get(c, 0) + 1
            if ks.get(own, 0) == 0 or set(ks) == {own}:
                continue
            out[y * W + x] = (ks[own], {c: k for c, k in ks.items() if c != own})
    return out


@st.composite
def small_states(draw):
    h = draw(st.integers(3, 7))
    w = draw(st.integers(3, 7))
    n = draw(st.integers(1, 4))
    ids = np.array(draw(st.lists(st.integers(0, n), min_size=h * w, max_size=h * w)), np.int32).reshape(h, w)
    types = np.array([0] + [1 + (i % 2) for i in range(n)], np.int32)
    return CellState(ids, types)


@settings(max_examples=40, deadline=None)
@given(small_states())
def test_candidate_sets_match_brute_force(state):
    c = build_candidates([state])
    want = _brute_candidates(state)
    got = {}
    S = c.group_mask.shape[1]
    own_k = torch.exp(c.own_log_k[0]).round().long()
    for p in range(c.sites.shape[1]):
        g = int(c.group[0, p])
        if g == S:
            continue
        site = int(c.sites[0, p])
        got.setdefault(site, (int(own_k[g]), {}))[1][int(c.new_ids[0, p])] = round(float(torch.exp(c.log_k[0, p])))
    assert got == want
    assert c.n_sites == len(want)


def _brute_nll(ham, states, proposal_aware=True):
    tot, n = 0.0, 0
    for s in states:
        vols = s.volumes()
        for site, (k_own, cands) in _brute_candidates(s).items():
            y, x = divmod(site, s.shape[1])
            logits = [np.log(k_own) if proposal_aware else 0.0]
            for c, k in cands.items():
                dh = ham.delta_np(s, (y, x), c, {"volumes": vols})
                logits.append((np.log(k) if proposal_aware else 0.0) - dh / ham.temperature)
            logits = np.array(logits)
            m = logits.max()
            tot += m + np.log(np.exp(logits - m).sum()) - logits[0]
            n += 1
    return tot / n


@pytest.mark.parametrize("aware", [True, False])
def test_objective_equals_brute_force_oracle(aware):
    states = block_states(2, size=14, grid=2, side=4)
    J = np.array([[0.0, 1.2, 0.7], [1.2, 0.4, 0.9], [0.7, 0.9, 0.3]])
    ham = cellsort_hamiltonian(J, [0.0, 0.3, 0.5], 14.0, LatticeSpec((14, 14)))
    got = float(pl_nll(ham, build_candidates(states), proposal_aware=aware).detach())
    assert got == pytest.approx(_brute_nll(ham, states, aware), rel=1e-10)


def test_param_map_keeps_constraints_and_skips_frozen():
    J = np.ones((3, 3))
    J[0, 0] = 0
    ham = cellsort_hamiltonian(J, 0.2, 20.0, LatticeSpec((10, 10)))
    pm = ParamMap(ham, share_lambda=True)
    assert pm.n_free() == 5 + 1                      # J upper triangle without (0,0), one shared λ
    with torch.no_grad():
        for p in pm.parameters():
            p.add_(torch.arange(p.numel(), dtype=p.dtype).reshape(p.shape) * 0.1)
    pm.sync()
    Jt = ham.term("contact").J.detach()
    assert torch.equal(Jt, Jt.T) and float(Jt[0, 0]) == 0.0
    lam = ham.term("volume").lam.detach()
    assert float(lam[1]) == float(lam[2])
    ham.term("volume").lam.requires_grad_(False)
    assert ParamMap(ham).n_free() == 5


def _final_frames(name):
    files = sorted(glob.glob(str(SHARED / "reference-data" / name / "run_*.npz")))
    if not files:
        pytest.skip("../shared/reference-data is not there")
    return [states_from_channels(np.load(f)["data"][-1:])[0] for f in files]


@pytest.mark.parametrize("name,key", [("P1_morpheus", "P1"), ("P2_cc3d", "P2")])
def test_recovers_real_simulator_parameters_at_T1(name, key):
    """Final frames of the 16 runs, V* = data mean (as training.fit): RMSE at T=1 <= 0.04 per pair, < 1 min."""
    states = _final_frames(name)
    vstar = float(np.mean(np.concatenate([s.volumes()[s.cell_ids()] for s in states])))
    J = np.ones((3, 3))
    J[0, 0] = 0
    ham = cellsort_hamiltonian(J, 0.1, vstar, LatticeSpec((100, 100)))
    t0 = time.perf_counter()
    res = fit_pl(ham, states)
    dt = time.perf_counter() - t0
    r1, _, ts = param_rmse(param_vector(ham), KNOWN_TRUTHS[key]["vector"])
    assert r1 <= 0.04, (r1, param_vector(ham))
    assert abs(ts - 1.0) < 0.05          # the temperature scale is identified
    assert dt < 60 and res.method.startswith("convex")


def test_plain_boltzmann_pl_is_biased_on_classic_cpm_data():
    states = _final_frames("P1_morpheus")
    J = np.ones((3, 3))
    J[0, 0] = 0
    ham = cellsort_hamiltonian(J, 0.1, 99.8, LatticeSpec((100, 100)))
    fit_pl(ham, states, proposal_aware=False)
    v = param_vector(ham)
    assert param_rmse(v, KNOWN_TRUTHS["P1"]["vector"])[0] > 0.2
    assert np.all(v[:5] > np.array(KNOWN_TRUTHS["P1"]["vector"][:5]) + 0.15)   # every J biased upwards


def test_stochastic_version_approaches_the_convex_optimum():
    states = _final_frames("P2_cc3d")[:8]
    J = np.ones((3, 3))
    J[0, 0] = 0
    exact = cellsort_hamiltonian(J, 0.1, 89.65, LatticeSpec((100, 100)))
    fit_pl(exact, states)
    target = param_vector(exact)
    ham = cellsort_hamiltonian(J, 0.1, 89.65, LatticeSpec((100, 100)))
    start = np.linalg.norm(param_vector(ham) - target)
    res = fit_pl(ham, states, stochastic=True, steps=150, lr=0.05, sites_per_state=300, states_per_step=2, seed=1)
    assert res.method == "stochastic Adam"
    assert np.linalg.norm(param_vector(ham) - target) < 0.35 * start


@settings(max_examples=20, deadline=None)
@given(small_states())
def test_boundary_proposal_weights_are_k_times_K_minus_k(state):
    c = build_candidates([state], proposal="classic")
    b = build_candidates([state], proposal="boundary")
    k, ko = torch.exp(c.log_k), torch.exp(c.own_log_k)
    real = c.group < c.group_mask.shape[1]
    assert torch.allclose(b.log_k[real], torch.log(k[real]) + torch.log(8 - k[real]))
    m = c.group_mask
    assert torch.allclose(b.own_log_k[m], torch.log(ko[m]) + torch.log(8 - ko[m]))
    with pytest.raises(ValueError, match="proposal"):
        build_candidates([state], proposal="metropolis")
