"""Local NH: crop ΔH == full ΔH, numpy == torch, invariances, locality, bundles, torch-free evaluator."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from neuralcpm_plugin.bundle import load_bundle, save_bundle
from neuralcpm_plugin.errors import BundleError, ConfigError
from neuralcpm_plugin.hamiltonian import Batch, Hamiltonian, LatticeSpec
from neuralcpm_plugin.hamiltonian.local_nh import LocalNeuralHamiltonian, LocalNHNumpy
from neuralcpm_plugin.lattice import CellState, boundary_mask

SMALL = {"n_types": 2, "stride": 3, "channels": 6, "kernel": 3}


def rand_state(shape, n_cells, rng, medium=0.4):
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
    return CellState(ids, np.concatenate([[0], rng.integers(1, 3, n_cells)]))


def proposals(state, P, rng):
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


def make_term(config=SMALL, seed=0, gain=3.0):
    """A term with enlarged weights, so that ΔH values are O(1) rather than tiny."""
    t = LocalNeuralHamiltonian(config, seed=seed)
    with torch.no_grad():
        for p in t.parameters():
            if p.dim() > 1:
                p.mul_(gain)
    return t


def energy(term, states):
    with torch.no_grad():
        return term.energy(Batch.from_states(states)).detach().numpy()


@pytest.fixture(scope="module")
def term():
    return make_term()


def test_defaults_meet_receptive_field_and_width():
    t = LocalNeuralHamiltonian()
    assert t.radius >= 5 and t.config["channels"] >= 16
    assert t.energy(Batch.from_states([rand_state((24, 24), 5, np.random.default_rng(0))])).dtype == torch.float64
    with pytest.raises(ConfigError):
        LocalNeuralHamiltonian({"kernel": 2})
    with pytest.raises(ConfigError):
        LocalNeuralHamiltonian({"strid": 2})


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                              HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 100_000), shape=st.sampled_from([(24, 27), (20, 16), (25, 23)]))
def test_crop_delta_equals_full_difference(term, seed, shape):
    """Property: crop ΔH (torch batched and numpy) == H(after) − H(before) computed on the whole lattice."""
    rng = np.random.default_rng(seed)
    s = rand_state(shape, int(rng.integers(3, 10)), rng)
    sites, new = proposals(s, 5, rng)
    batch = Batch.from_states([s])
    d = term.delta(batch, torch.as_tensor(sites)[None], torch.as_tensor(new)[None]).detach().numpy()[0]
    ev = term.numpy_evaluator()
    e0 = energy(term, [s])[0]
    for p, (site, nid) in enumerate(zip(sites, new)):
        after = s.ids.copy()
        after.flat[site] = nid
        ref = energy(term, [CellState(after, s.types)])[0] - e0
        tol = 1e-9 * max(1.0, abs(ref))
        assert d[p] == pytest.approx(ref, abs=tol)
        ij = divmod(int(site), shape[1])
        dn = ev.delta(s.ids, s.types, ij, int(nid))
        assert dn == pytest.approx(d[p], abs=1e-6 * max(1.0, abs(d[p])))
        assert dn == pytest.approx(ref, abs=tol)


def test_numpy_energy_matches_torch(term):
    rng = np.random.default_rng(5)
    ev = LocalNHNumpy.from_torch(term)
    states = [rand_state((24, 27), 8, rng) for _ in range(3)]
    e = energy(term, states)
    for s, et in zip(states, e):
        assert ev.energy(s.ids, s.types) == pytest.approx(et, abs=1e-9 * max(1, abs(et)))
    assert np.ptp(e) > 1e-6


def test_delta_magnitude_is_meaningful(term):
    rng = np.random.default_rng(3)
    s = rand_state((24, 24), 8, rng)
    sites, new = proposals(s, 20, rng)
    d = term.delta(Batch.from_states([s]), torch.as_tensor(sites)[None], torch.as_tensor(new)[None])
    assert d.abs().max() > 1e-3  # the equality tests above are not vacuous


def test_permutation_and_translation_invariance(term):
    rng = np.random.default_rng(7)
    s = rand_state((24, 27), 9, rng)
    e0 = energy(term, [s])[0]
    n = len(s.types)
    perm = np.concatenate([[0], rng.permutation(np.arange(1, n + 5))[: n - 1]])
    types = np.zeros(n + 5, np.int64)
    types[perm] = s.types
    relab = CellState(perm[s.ids], types)
    assert energy(term, [relab])[0] == pytest.approx(e0, abs=1e-10)
    for dy, dx in [(3, 0), (0, 6), (9, 3)]:  # multiples of the stride 3
        sh = CellState(np.roll(s.ids, (dy, dx), (0, 1)), s.types)
        assert energy(term, [sh])[0] == pytest.approx(e0, abs=1e-10)
    sh = CellState(np.roll(s.ids, (1, 0), (0, 1)), s.types)
    assert abs(energy(term, [sh])[0] - e0) > 1e-8


def test_absent_cells_contribute_nothing(term):
    rng = np.random.default_rng(8)
    s = rand_state((24, 24), 6, rng)
    padded = CellState(s.ids, np.concatenate([s.types, [2, 1, 2]]))
    e = energy(term, [s, padded])
    assert e[0] == e[1]
    ev = term.numpy_evaluator()
    assert ev.energy(s.ids, s.types) == ev.energy(padded.ids, padded.types)
    # a cell far from the copy (outside the crop) does not change the copy's ΔH
    site = (2, 2)
    nid = int(s.ids[2, 3]) if s.ids[2, 3] != s.ids[2, 2] else int(s.ids[3, 2])
    far = s.ids.copy()
    far[10:14, 10:14] = 99  # a new cell in patches 3–4, outside the crop (patches 6,7,0,1,2 on each axis)
    types = np.zeros(100, np.int64)
    types[: len(s.types)] = s.types
    types[99] = 2
    d1 = ev.delta(s.ids, s.types, site, nid)
    d2 = ev.delta(far, types, site, nid)
    assert d1 == d2


def test_batched_delta_many_chains_and_fallback(term):
    rng = np.random.default_rng(9)
    states = [rand_state((24, 24), 7, rng) for _ in range(3)]
    S, N = zip(*[proposals(s, 10, rng) for s in states])
    sites, new = torch.as_tensor(np.stack(S)), torch.as_tensor(np.stack(N))
    batch = Batch.from_states(states)
    d = term.delta(batch, sites, new, chunk=7)
    full = term.delta_full(batch, sites, new)
    np.testing.assert_allclose(d.detach().numpy(), full.detach().numpy(), atol=1e-9)
    # a lattice too small for the crop: exact full recomputation in both implementations
    small = rand_state((12, 12), 4, rng)
    ss, nn_ = proposals(small, 4, rng)
    ds = term.delta(Batch.from_states([small]), torch.as_tensor(ss)[None], torch.as_tensor(nn_)[None])[0]
    ev = term.numpy_evaluator()
    for p in range(len(ss)):
        assert ev.delta(small.ids, small.types, divmod(int(ss[p]), 12), int(nn_[p])) == pytest.approx(
            float(ds[p].detach()), abs=1e-9)


def test_delta_np_interface_and_cache_invalidation(term):
    rng = np.random.default_rng(10)
    s = rand_state((24, 24), 6, rng)
    sites, new = proposals(s, 3, rng)
    ij = divmod(int(sites[0]), 24)
    d0 = term.delta_np(s, ij, int(new[0]))
    assert isinstance(d0, float)
    with torch.no_grad():
        term.out.bias.add_(0.0)
        term.phi2.weight.mul_(1.5)
    d1 = term.delta_np(s, ij, int(new[0]))
    d1t = term.delta(Batch.from_states([s]), torch.as_tensor(sites[:1])[None], torch.as_tensor(new[:1])[None])
    assert d1 == pytest.approx(float(d1t[0, 0].detach()), abs=1e-9) and d1 != d0
    with torch.no_grad():
        term.phi2.weight.div_(1.5)


def test_gradients_and_float32():
    t = LocalNeuralHamiltonian(dict(SMALL, dtype="float32"), seed=1, learn_scale=True)
    s = rand_state((18, 18), 5, np.random.default_rng(11))
    e = t.energy(Batch.from_states([s]))
    assert e.dtype == torch.float64
    e.sum().backward()
    assert t.embed.weight.grad.abs().sum() > 0 and t.scale.grad is not None


def test_bundle_round_trip_and_torch_free_evaluator(term, tmp_path):
    lat = LatticeSpec((24, 24))
    save_bundle(tmp_path / "b", Hamiltonian([term], lat, 1.0, ["medium", "a", "b"]))
    t2 = load_bundle(tmp_path / "b").hamiltonian.terms[0]
    assert isinstance(t2, LocalNeuralHamiltonian) and t2.config == term.config
    s = rand_state((24, 24), 6, np.random.default_rng(12))
    assert energy(t2, [s])[0] == energy(term, [s])[0]
    bad = dict(term.tensors())
    bad["phi_a.weight"] = bad["phi_a.weight"][:, :, :1]
    with pytest.raises(BundleError):
        LocalNeuralHamiltonian.from_spec(term.spec(), bad, lat)
    # evaluate the bundle with the module file loaded on its own, torch blocked
    np.savez(tmp_path / "state.npz", ids=s.ids, types=s.types)
    src = Path(__file__).resolve().parents[1] / "neuralcpm_plugin" / "hamiltonian" / "local_nh.py"
    code = f"""
import sys, json, importlib.util
sys.modules['torch'] = None
import numpy as np
from safetensors.numpy import load_file
spec = importlib.util.spec_from_file_location('lnh', {str(src)!r})
m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
doc = json.load(open({str(tmp_path / 'b' / 'model.json')!r}))
t = doc['terms'][0]
arr = {{k.split('.', 2)[2]: v for k, v in load_file({str(tmp_path / 'b' / 'weights.safetensors')!r}).items()}}
ev = m.LocalNHNumpy.from_arrays(t['params']['config'], arr, t['scale'])
z = np.load({str(tmp_path / 'state.npz')!r})
print(repr(ev.energy(z['ids'], z['types'])), repr(ev.delta(z['ids'], z['types'], (5, 5), int(z['ids'][5, 6]))))
assert 'torch' not in [k for k, v in sys.modules.items() if v is not None]
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    e_np, d_np = (float(x) for x in out.stdout.split())
    assert e_np == pytest.approx(energy(term, [s])[0], abs=1e-9)
    assert d_np == pytest.approx(term.delta_np(s, (5, 5), int(s.ids[5, 6])), abs=1e-12)


def test_delta_is_differentiable_for_pseudo_likelihood():
    """With gradients enabled, the batched crop ΔH backpropagates into the parameters."""
    t = make_term(seed=2)
    s = rand_state((24, 24), 6, np.random.default_rng(13))
    sites, new = proposals(s, 4, np.random.default_rng(14))
    d = t.delta(Batch.from_states([s]), torch.as_tensor(sites)[None], torch.as_tensor(new)[None])
    d.sum().backward()
    assert t.psi1.weight.grad is not None and t.psi1.weight.grad.abs().sum() > 0


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                              HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 100_000), cfg=st.sampled_from([SMALL, {"stride": 4, "channels": 5, "kernel": 3},
                                                          {"stride": 2, "channels": 4, "kernel": 5}]),
       shape=st.sampled_from([(24, 27), (21, 26), (30, 20)]))
def test_crop_and_lattice_methods_agree_with_full_recomputation(seed, cfg, shape):
    """Property: both batched torch paths ("crop", "lattice") and numpy give H(after) − H(before), several
    chains at once, on lattices not divisible by the stride (unseen rows/columns included)."""
    rng = np.random.default_rng(seed)
    t = make_term(cfg, seed=seed % 7)
    states = [rand_state(shape, int(rng.integers(3, 10)), rng) for _ in range(2)]
    S, N = zip(*[proposals(s, 4, rng) for s in states])
    sites, new = torch.as_tensor(np.stack(S)), torch.as_tensor(np.stack(N))
    batch = Batch.from_states(states)
    with torch.no_grad():
        dc = t.delta(batch, sites, new, method="crop", chunk=3).numpy()
        dl = t.delta(batch, sites, new, method="lattice").numpy()
        full = t.delta_full(batch, sites, new).detach().numpy()
    tol = 1e-9 * max(1.0, np.abs(full).max())
    np.testing.assert_allclose(dc, full, rtol=0, atol=tol)
    np.testing.assert_allclose(dl, full, rtol=0, atol=tol)
    ev = t.numpy_evaluator()
    for b, s in enumerate(states):
        for p in range(sites.shape[1]):
            dn = ev.delta(s.ids.astype(np.int32), s.types, divmod(int(sites[b, p]), shape[1]), int(new[b, p]))
            assert dn == pytest.approx(full[b, p], abs=tol)
    assert np.abs(full).max() > 1e-4  # not vacuous


def test_delta_methods_same_gradients_and_bad_method(term):
    rng = np.random.default_rng(21)
    s = rand_state((24, 24), 6, rng)
    sites, new = proposals(s, 6, rng)
    args = (Batch.from_states([s]), torch.as_tensor(sites)[None], torch.as_tensor(new)[None])
    grads = []
    for method in ("crop", "lattice"):
        t = make_term(seed=4)
        t.delta(*args, method=method).sum().backward()
        grads.append({k: p.grad.clone() for k, p in t.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and "phi_a.weight" in grads[0]
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=1e-9, atol=1e-12)
    with pytest.raises(ConfigError):
        term.delta(*args, method="fast")


def test_numpy_delta_new_cell_and_types_change(term):
    """A copy of an id absent from the crop, and a change of the types table, are seen by the numpy ΔH."""
    rng = np.random.default_rng(22)
    s = rand_state((24, 24), 5, rng)
    ev = term.numpy_evaluator()
    types = np.concatenate([s.types, [1]])
    new_id = len(s.types)  # a cell that exists nowhere on the lattice
    after = s.ids.copy()
    after[4, 7] = new_id
    ref = energy(term, [CellState(after, types)])[0] - energy(term, [CellState(s.ids, types)])[0]
    assert ev.delta(s.ids, types, (4, 7), new_id) == pytest.approx(ref, abs=1e-9 * max(1, abs(ref)))
    types2 = types.copy()
    types2[new_id] = 2
    ref2 = energy(term, [CellState(after, types2)])[0] - energy(term, [CellState(s.ids, types2)])[0]
    assert ev.delta(s.ids, types2, (4, 7), new_id) == pytest.approx(ref2, abs=1e-9 * max(1, abs(ref2)))
    assert abs(ref2 - ref) > 1e-9


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                              HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 100_000), cfg=st.sampled_from([SMALL, {"stride": 2, "channels": 4, "kernel": 5},
                                                          {"stride": 2, "channels": 3, "kernel": 7}]))
def test_numpy_lattice_cache_equals_crop_and_rebuild_along_accepted_copies(seed, cfg):
    """Property: the numpy evaluator's per-lattice cache (ΔH from the changed patch and the k×k outputs) gives
    the crop's ΔH along hundreds of accepted copies found by itself, and its per-patch quantities then equal
    a rebuild from scratch; ΔH == H(after) − H(before) at the end."""
    rng = np.random.default_rng(seed)
    cfg = dict(cfg, n_types=2)
    shape = (31, 28) if cfg["stride"] == 2 else (26, 24)  # (rows beyond the patch grid are not seen)
    t = make_term(cfg, seed=seed % 5)
    ev = t.numpy_evaluator()
    ev.cache_refresh_every = 10 ** 9
    s = rand_state(shape, 9, rng)
    ids = s.ids.copy()
    for _ in range(250):
        site, nid = proposals(CellState(ids, s.types), 1, rng)
        site, nid = int(site[0]), int(nid[0])
        ij = divmod(site, shape[1])
        d = ev.delta(ids, s.types, ij, nid)
        assert d == pytest.approx(ev.delta_crop(ids, s.types, ij, nid), abs=1e-10)
        if rng.random() < 0.5:
            ids.flat[site] = nid
    ev._cache_sync(ids, s.types)  # apply the last accepted copies
    c = {k: v.copy() if isinstance(v, np.ndarray) else v for k, v in ev._cache.items()}
    assert c["n"] > 80
    ev._cache_build(ids, s.types)
    for key in ("CA", "q", "A", "ugW", "cnt"):
        assert np.allclose(c[key], ev._cache[key], rtol=0, atol=1e-10), key
    cur = CellState(ids, s.types)
    for site, nid in zip(*proposals(cur, 3, rng)):
        ref = energy(t, [CellState(np.where(np.arange(ids.size).reshape(ids.shape) == site, nid, ids), s.types)])[0] \
            - energy(t, [cur])[0]
        assert ev.delta(ids, s.types, divmod(int(site), shape[1]), int(nid)) == pytest.approx(ref, abs=1e-9)


def test_numpy_cache_is_not_rebuilt_by_callers_alternating_between_lattices(term):
    """Alternating lattices use the crop form (no rebuild per call); a lattice seen twice in a row is cached."""
    rng = np.random.default_rng(21)
    ev = LocalNHNumpy.from_torch(term)
    a, b = rand_state((24, 24), 6, rng), rand_state((24, 24), 7, rng)
    builds = []
    orig = ev._cache_build
    ev._cache_build = lambda ids, types: (builds.append(1), orig(ids, types))
    for s in (a, b, a, b, a, b):
        site, nid = proposals(s, 1, rng)
        d = ev.delta(s.ids, s.types, divmod(int(site[0]), 24), int(nid[0]))
        assert d == pytest.approx(ev.delta_crop(s.ids, s.types, divmod(int(site[0]), 24), int(nid[0])), abs=1e-10)
    assert builds == []
    for _ in range(2):
        site, nid = proposals(a, 1, rng)
        ev.delta(a.ids, a.types, divmod(int(site[0]), 24), int(nid[0]))
    assert builds == [1] and np.array_equal(ev._cache["ids"], a.ids)
