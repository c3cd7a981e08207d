"""The paper's Neural Hamiltonian and its baselines: invariances, exact incremental ΔH, bundles."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from neuralcpm_plugin.bundle import load_bundle, save_bundle
from neuralcpm_plugin.errors import BundleError, ConfigError
from neuralcpm_plugin.hamiltonian import Batch, Hamiltonian, LatticeSpec
from neuralcpm_plugin.hamiltonian.neural import CNNHamiltonian, NeuralHamiltonian, NH1CNNHamiltonian, present_ids
from neuralcpm_plugin.lattice import CellState, boundary_mask

# small architectures (fast); float64 so that invariances hold to ~1e-12
SMALL_NH = {"n_types": 2, "embed_stride": 2, "hidden": [4, 6], "pools": [2, 1], "agg_channels": 6, "mlp": [6],
            "dtype": "float64"}
SMALL_NH3 = {"n_types": 2, "embed_stride": 3, "hidden": [4, 6, 6], "pools": [3, 1, 1], "agg_channels": 6,
             "mlp": [6, 6], "dtype": "float64"}
SMALL_NH1CNN = {"n_types": 2, "embed_stride": 2, "hidden": [4], "pools": [2], "agg_channels": 6,
                "conv_hidden": [6, 8], "conv_pools": [1, 2], "mlp": [6], "dtype": "float64"}
SMALL_CNN = {"n_types": 2, "n_ids": 16, "embed_stride": 2, "hidden": [4, 6], "pools": [1, 2], "agg_channels": 6,
             "mlp": [6], "dtype": "float64"}


def rand_state(shape, n_cells, rng, medium=0.4, n_extra_types=0):
    """Voronoi cells on a torus with some medium; optional padded (absent) ids in the type table."""
    H, W = shape
    pts = rng.integers(0, [H, W], size=(n_cells, 2))
    yy, xx = np.mgrid[:H, :W]
    best = np.full((H, W), np.inf)
    ids = np.zeros((H, W), np.int64)
    for k, (py, px) in enumerate(pts):
        dy = np.minimum(abs(yy - py), H - abs(yy - py))
        dx = np.minimum(abs(xx - px), W - abs(xx - px))
        d = dy ** 2 + dx ** 2 + rng.random((H, W)) * 0.5
        m = d < best
        best[m] = d[m]
        ids[m] = k + 1
    if medium:
        ids[best > np.quantile(best, 1 - medium)] = 0
    types = np.concatenate([[0], rng.integers(1, 3, n_cells + n_extra_types)])
    return CellState(ids, types)


def proposals(state, P, rng):
    """P boundary sites (flat) and, for each, the id of a Moore neighbour in another cell."""
    H, W = state.shape
    bm = np.flatnonzero(boundary_mask(state.ids).ravel())
    sites = rng.choice(bm, size=min(P, bm.size), replace=False)
    new = []
    for s in sites:
        i, j = divmod(int(s), W)
        cand = [state.ids[(i + a) % H, (j + b) % W] for a in (-1, 0, 1) for b in (-1, 0, 1)]
        cand = [c for c in cand if c != state.ids[i, j]]
        new.append(cand[rng.integers(len(cand))])
    return sites, np.array(new)


def energy(term, states):
    with torch.no_grad():
        return term.energy(Batch.from_states(states)).detach().numpy()


def relabel_random(state, rng, n_ids=None):
    """Random permutation of the cell ids (medium stays 0, types follow their cells)."""
    n = len(state.types)
    n_new = n if n_ids is None else n_ids
    perm = np.concatenate([[0], rng.permutation(np.arange(1, n_new))[: n - 1]])
    ids = perm[state.ids]
    types = np.zeros(n_new, np.int64)
    types[perm] = state.types
    return CellState(ids, types)


@pytest.fixture(scope="module")
def rng():
    return np.random.default_rng(1234)


def test_presets_build_and_run():
    st_ = rand_state((40, 40), 6, np.random.default_rng(0))
    for cls, preset in [(NeuralHamiltonian, "mnist"), (NeuralHamiltonian, "bipolar"), (NH1CNNHamiltonian, "mnist")]:
        term = cls(preset=preset, seed=0)
        e = energy(term, [st_])
        assert e.dtype == np.float64 and np.isfinite(e).all()
    nh = NeuralHamiltonian(preset="mnist")
    assert nh.config["hidden"] == [8, 16, 32, 32] and nh.config["pools"] == [3, 2, 1, 1]
    assert nh.total_stride == 18
    assert NeuralHamiltonian(preset="bipolar").total_stride == 40
    with pytest.raises(ConfigError):
        NeuralHamiltonian(preset="nope")
    with pytest.raises(ConfigError):
        NeuralHamiltonian({"hiden": [3]})
    with pytest.raises(ConfigError, match="smaller"):
        energy(NeuralHamiltonian(preset="bipolar"), [rand_state((30, 30), 4, np.random.default_rng(0))])


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000))
def test_nh_permutation_invariance(seed):
    rng = np.random.default_rng(seed)
    term = NeuralHamiltonian(SMALL_NH, seed=1)
    s = rand_state((16, 20), 7, rng)
    s2 = relabel_random(s, rng, n_ids=12)  # also spreads ids over a larger table with absent ids
    e1, e2 = energy(term, [s]), energy(term, [s2])
    np.testing.assert_allclose(e1, e2, rtol=1e-12, atol=1e-12)


def test_absent_ids_contribute_nothing(rng):
    """Padded type-table entries (any type) and zero-volume ids leave H unchanged."""
    term = NeuralHamiltonian(SMALL_NH, seed=2)
    s = rand_state((16, 16), 6, rng)
    padded = CellState(s.ids, np.concatenate([s.types, [1, 2, 2, 1]]))
    e = energy(term, [s, padded])
    assert e[0] == pytest.approx(e[1], abs=1e-13)
    # a batch mixing lattices with different numbers of cells: each H as if alone
    s_small = rand_state((16, 16), 3, rng)
    eb = energy(term, [s, s_small])
    assert eb[1] == pytest.approx(energy(term, [s_small])[0], abs=1e-12)
    # the medium absent: still finite and invariant
    full = rand_state((16, 16), 6, rng, medium=0)
    assert np.isfinite(energy(term, [full])).all()


def test_nh_translation_invariance(rng):
    term = NeuralHamiltonian(SMALL_NH3, seed=3)  # total stride 9
    s = rand_state((18, 27), 8, rng)
    e0 = energy(term, [s])[0]
    for dy, dx in [(9, 0), (0, 18), (9, 9)]:
        sh = CellState(np.roll(s.ids, (dy, dx), (0, 1)), s.types)
        assert energy(term, [sh])[0] == pytest.approx(e0, rel=1e-11, abs=1e-11)
    # a shift that is not a multiple of the stride generally changes H (sanity of the test)
    sh = CellState(np.roll(s.ids, (1, 0), (0, 1)), s.types)
    assert abs(energy(term, [sh])[0] - e0) > 1e-9


@pytest.mark.parametrize("config,shape", [(SMALL_NH, (30, 33)), (SMALL_NH3, (55, 56))])
def test_incremental_delta_is_exact(config, shape, rng):
    """ΔH with activation reuse == full recomputation (float64), incl. remainder rows the net does not see."""
    term = NeuralHamiltonian(config, seed=4)
    states = [rand_state(shape, 12, rng) for _ in range(2)]
    batch = Batch.from_states(states)
    S, N = zip(*[proposals(s, 14, rng) for s in states])
    sites = torch.as_tensor(np.stack(S))
    new = torch.as_tensor(np.stack(N))
    d_inc = term.delta_incremental(batch, sites, new, chunk=5)
    d_full = term.delta_full(batch, sites, new)
    assert d_inc.dtype == torch.float64 and d_inc.shape == sites.shape
    np.testing.assert_allclose(d_inc.detach().numpy(), d_full.detach().numpy(), rtol=1e-9, atol=1e-11)
    assert (d_full.abs() > 1e-8).any()
    # delta() picks the incremental path; delta_np agrees for one attempt
    np.testing.assert_allclose(term.delta(batch, sites, new).detach().numpy(), d_full.detach().numpy(), rtol=1e-9, atol=1e-11)
    W = shape[1]
    i, j = divmod(int(sites[0, 0]), W)
    assert term.delta_np(states[0], (i, j), int(new[0, 0])) == pytest.approx(float(d_full[0, 0].detach()), abs=1e-10)


@pytest.mark.parametrize("extra,shape", [
    ({"phi_final_activation": True}, (36, 36)),  # final SiLU: the last layer cannot be summed before phi2
    ({"pools": [2, 2]}, (36, 38)),  # pooled last layer; pool-aligned on rows, not on columns
    ({"hidden": [4], "pools": [3]}, (42, 45)),  # one layer: nothing after the patched layer-1 window
    ({"pools": [3, 1], "embed_stride": 2}, (42, 42)),  # blocks tile the torus (fast pooled write path)
])
def test_incremental_delta_exact_architecture_variants(extra, shape, rng):
    """The folded/summed fast paths of the incremental ΔH equal full recomputation (float64) per variant."""
    term = NeuralHamiltonian(dict(SMALL_NH, **extra), seed=8)
    states = [rand_state(shape, 10, rng) for _ in range(2)]
    batch = Batch.from_states(states)
    S, N = zip(*[proposals(s, 9, rng) for s in states])
    sites, new = torch.as_tensor(np.stack(S)), torch.as_tensor(np.stack(N))
    d_inc = term.delta_incremental(batch, sites, new, chunk=4)
    d_full = term.delta_full(batch, sites, new)
    assert (d_full.abs() > 1e-8).any()
    np.testing.assert_allclose(d_inc.detach().numpy(), d_full.detach().numpy(), rtol=1e-9, atol=1e-11)


def test_incremental_delta_edge_cases(rng):
    """Same-cell copies give 0; a vanishing cell or an id new to the lattice fall back to exact recomputation."""
    term = NeuralHamiltonian(SMALL_NH, seed=5, scale=0.5)  # fallback values carry the scale once
    s = rand_state((30, 30), 5, rng)
    ids = s.ids.copy()
    ids[3, 3] = 6  # a one-site cell (vanishes if overwritten)
    types = np.concatenate([s.types, [2, 1]])  # id 7: in the table, absent from the lattice
    s2 = CellState(ids, types)
    batch = Batch.from_states([s2])
    sites = torch.tensor([[3 * 30 + 3, 3 * 30 + 4, 5 * 30 + 5, 3 * 30 + 3]])
    new = torch.tensor([[int(ids[3, 4]), 6, 7, 6]])
    d = term.delta_incremental(batch, sites, new)
    full = term.delta_full(batch, sites, new)
    np.testing.assert_allclose(d.detach().numpy(), full.detach().numpy(), rtol=1e-9, atol=1e-11)
    assert float(d[0, 3].detach()) == 0.0


def test_float32_default_close_to_float64(rng):
    cfg32 = dict(SMALL_NH, dtype="float32")
    t64 = NeuralHamiltonian(SMALL_NH, seed=6)
    t32 = NeuralHamiltonian(cfg32, seed=6)
    s = rand_state((30, 30), 8, rng)
    batch = Batch.from_states([s])
    sites, new = proposals(s, 10, rng)
    sites, new = torch.as_tensor(sites)[None], torch.as_tensor(new)[None]
    e32 = t32.energy(batch)
    assert e32.dtype == torch.float64
    np.testing.assert_allclose(t32.delta(batch, sites, new).detach().numpy(), t64.delta(batch, sites, new).detach().numpy(),
                               atol=1e-4)


def test_cnn_baseline_is_not_permutation_invariant(rng):
    term = CNNHamiltonian(SMALL_CNN, seed=7)
    s = rand_state((16, 16), 6, rng)
    e0 = energy(term, [s])[0]
    diffs = [abs(energy(term, [relabel_random(s, rng, n_ids=14)])[0] - e0) for _ in range(3)]
    assert max(diffs) > 1e-6
    # ... while the NH is invariant under the same relabellings
    nh = NeuralHamiltonian(SMALL_NH, seed=7)
    e1 = energy(nh, [s])[0]
    for _ in range(3):
        assert energy(nh, [relabel_random(s, rng, n_ids=14)])[0] == pytest.approx(e1, abs=1e-11)
    with pytest.raises(ConfigError):
        energy(term, [relabel_random(s, rng, n_ids=40)])  # ids beyond n_ids


def test_nh1_cnn_invariance_and_delta(rng):
    term = NH1CNNHamiltonian(SMALL_NH1CNN, seed=8)
    s = rand_state((16, 16), 6, rng)
    assert energy(term, [relabel_random(s, rng, 10)])[0] == pytest.approx(energy(term, [s])[0], abs=1e-11)
    batch = Batch.from_states([s])
    sites, new = proposals(s, 6, rng)
    d = term.delta(batch, torch.as_tensor(sites)[None], torch.as_tensor(new)[None])
    for p in range(len(sites)):
        ids = s.ids.copy()
        ids.flat[sites[p]] = new[p]
        ref = energy(term, [CellState(ids, s.types)])[0] - energy(term, [s])[0]
        assert float(d[0, p].detach()) == pytest.approx(ref, abs=1e-10)


def test_gradients_flow(rng):
    term = NeuralHamiltonian(dict(SMALL_NH, dtype="float32"), seed=9, learn_scale=True)
    s = rand_state((16, 16), 5, rng)
    e = term.energy(Batch.from_states([s, s])).sum()
    e.backward()
    assert all(p.grad is not None for p in term.parameters())
    assert term.embed.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("cls,config", [(NeuralHamiltonian, SMALL_NH), (NH1CNNHamiltonian, SMALL_NH1CNN),
                                        (CNNHamiltonian, SMALL_CNN),
                                        (NeuralHamiltonian, dict(SMALL_NH, dtype="float32"))])
def test_bundle_round_trip(cls, config, tmp_path, rng):
    term = cls(config, seed=10, scale=0.7)
    lat = LatticeSpec((16, 16))
    ham = Hamiltonian([term], lat, 1.0, ["medium", "a", "b"])
    save_bundle(tmp_path / "m", ham)
    loaded = load_bundle(tmp_path / "m")
    t2 = loaded.hamiltonian.terms[0]
    assert type(t2) is cls and t2.kind == cls.kind and not t2.analytic
    assert t2.config == term.config and t2.scale_value() == pytest.approx(0.7)
    s = rand_state((16, 16), 5, rng)
    np.testing.assert_array_equal(energy(term, [s]), energy(t2, [s]))
    # spec/tensors/from_spec directly
    t3 = cls.from_spec(term.spec(), term.tensors(), lat)
    np.testing.assert_array_equal(energy(term, [s]), energy(t3, [s]))
    bad = dict(term.tensors())
    bad.pop(next(iter(bad)))
    with pytest.raises(BundleError):
        cls.from_spec(term.spec(), bad, lat)


def test_present_ids():
    ids = torch.tensor([[[0, 3], [3, 5]], [[1, 1], [1, 1]]])
    idl, pres, vol = present_ids(ids)
    assert idl.shape == (2, 3)
    assert idl[0].tolist() == [0, 3, 5] and pres[0].all()
    assert idl[1, 0] == 1 and pres[1].tolist() == [True, False, False]
    assert vol[0, 3] == 2
