"""Pooled NH: torch ΔH == numpy ΔH == H(after) − H(before), cached Z == recomputation, invariances,
bundles, the torch-free evaluator."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_neural_local import proposals, rand_state

from neuralcpm_plugin.bundle import load_bundle, save_bundle
from neuralcpm_plugin.errors import BundleError, ConfigError
from neuralcpm_plugin.hamiltonian import Batch, Hamiltonian, LatticeSpec
from neuralcpm_plugin.hamiltonian.pooled_nh import (
    MOMENT_MONOMIALS,
    PooledNeuralHamiltonian,
    PooledNHNumpy,
    moment_basis,
)
from neuralcpm_plugin.lattice import CellState

SMALL = {"n_types": 2, "stride": 3, "channels": 5, "kernel": 3, "hidden": 8}
HYP = settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])


def make_term(shape=(24, 24), position_dim=2, seed=0, gain=3.0, **cfg):
    """A term with enlarged weights, so that ΔH values are O(0.1–1) rather than tiny."""
    t = PooledNeuralHamiltonian(dict(SMALL, position_dim=position_dim, lattice_shape=list(shape), **cfg), seed=seed)
    with torch.no_grad():
        for name, p in t.named_parameters():
            if p.dim() > 1 and name.startswith(("features.", "mlp.")):
                p.mul_(gain)
    return t


def energy(term, states):
    with torch.no_grad():
        return term.energy(Batch.from_states(states)).numpy()


def after(s, site, nid):
    ids = s.ids.copy()
    ids.flat[site] = nid
    return CellState(ids, s.types)


@HYP
@given(seed=st.integers(0, 100_000), shape=st.sampled_from([(24, 27), (21, 18), (12, 12)]),
       D=st.sampled_from([0, 3]), method=st.sampled_from(["crop", "lattice", "auto"]))
def test_torch_numpy_delta_equal_full_difference(seed, shape, D, method):
    """Property: batched torch ΔH (crop and lattice forms) == numpy ΔH (cached Z) == H(after) − H(before).

    (12, 12) at stride 3 is a 4×4 patch grid, smaller than a crop: both fall back to full recomputation.)
    Periodic lattices only: the feature block's convolution is circular.
    """
    rng = np.random.default_rng(seed)
    t = make_term(shape, D, seed=seed % 7)
    s = rand_state(shape, int(rng.integers(3, 10)), rng)
    sites, new = proposals(s, 6, rng)
    with torch.no_grad():
        d = t.delta(Batch.from_states([s]), torch.as_tensor(sites)[None], torch.as_tensor(new)[None],
                    method=method).numpy()[0]
    ev = t.numpy_evaluator()
    e0 = energy(t, [s])[0]
    assert ev.energy(s.ids, s.types) == pytest.approx(e0, abs=1e-10 * max(1, abs(e0)))
    big = 0.0
    for p, (site, nid) in enumerate(zip(sites, new)):
        ref = energy(t, [after(s, site, nid)])[0] - e0
        big = max(big, abs(ref))
        tol = 1e-9 * max(1.0, abs(e0))
        assert d[p] == pytest.approx(ref, abs=tol)
        dn = ev.delta(s.ids, s.types, divmod(int(site), shape[1]), int(nid))
        assert dn == pytest.approx(ref, abs=tol)
    assert big > 1e-4  # the check is not vacuous


@HYP
@given(seed=st.integers(0, 100_000), D=st.sampled_from([0, 2]))
def test_cached_Z_equals_recomputation_after_long_accepted_sequences(seed, D):
    """Property: after hundreds of accepted copies (found by the cache itself, or told through accept),
    the cached Z equals Z recomputed from scratch to 1e-9 relative, and ΔH with the cache equals the uncached."""
    rng = np.random.default_rng(seed)
    shape = (24, 21)
    t = make_term(shape, D, seed=1)
    ev = t.numpy_evaluator()
    ev.refresh_every = 10**9  # measure the drift of the incremental updates alone
    s = rand_state(shape, 8, rng)
    ids, types = s.ids.copy(), s.types
    n_acc = 0
    for step in range(700):
        site, nid = proposals(CellState(ids, types), 1, rng)
        site, nid = int(site[0]), int(nid[0])
        ij = divmod(site, shape[1])
        dh = ev.delta(ids, types, ij, nid)
        if step % 97 == 0:
            assert dh == pytest.approx(ev.delta_uncached(ids, types, ij, nid), abs=1e-10)
        if rng.random() < 0.6:
            if step % 2:
                ev.accept(ij, nid)
            ids.flat[site] = nid
            n_acc += 1
    Zc, Zr = ev.cached_Z(ids, types), ev.Z(ids, types)
    assert n_acc > 300 and ev._c["n"] > 300  # really incremental
    assert np.abs(Zc - Zr).max() <= 1e-9 * max(1.0, np.abs(Zr).max())
    # a different lattice, new types, many changes: the cache starts over
    s2 = rand_state(shape, 5, rng)
    assert ev.cached_Z(s2.ids, s2.types) == pytest.approx(ev.Z(s2.ids, s2.types), abs=0)


def test_refresh_bounds_the_number_of_incremental_updates():
    t = make_term((24, 24), 0)
    ev = t.numpy_evaluator()
    ev.refresh_every = 5
    rng = np.random.default_rng(3)
    s = rand_state((24, 24), 6, rng)
    ids = s.ids.copy()
    for _ in range(40):
        site, nid = proposals(CellState(ids, s.types), 1, rng)
        ev.delta(ids, s.types, divmod(int(site[0]), 24), int(nid[0]))
        ids.flat[int(site[0])] = int(nid[0])
        ev.cached_Z(ids, s.types)
        assert ev._c["n"] <= 5


@HYP
@given(seed=st.integers(0, 100_000), D=st.sampled_from([0, 2]))
def test_permutation_invariance(seed, D):
    """Property: relabelling the cells (ids) leaves H unchanged, with or without position embedding."""
    rng = np.random.default_rng(seed)
    t = make_term((24, 24), D)
    s = rand_state((24, 24), 7, rng)
    perm = np.concatenate([[0], 1 + rng.permutation(7)])
    types2 = np.zeros_like(s.types)
    types2[perm] = s.types
    s2 = CellState(perm[s.ids], types2)
    e = energy(t, [s, s2])
    assert e[0] == pytest.approx(e[1], abs=1e-10)


@HYP
@given(seed=st.integers(0, 100_000), sy=st.integers(-3, 3), sx=st.integers(-3, 3))
def test_translation_invariance_without_position(seed, sy, sx):
    """Property: D = 0 → H invariant to periodic shifts by multiples of the stride; D > 0 generally not."""
    rng = np.random.default_rng(seed)
    s = rand_state((24, 27), 7, rng)
    sh = CellState(np.roll(s.ids, (3 * sy, 3 * sx), (0, 1)), s.types)
    t0 = make_term((24, 27), 0)
    e = energy(t0, [s, sh])
    assert e[0] == pytest.approx(e[1], abs=1e-10)
    if (sy, sx) != (0, 0):
        t2 = make_term((24, 27), 2)
        e2 = energy(t2, [s, sh])
        assert abs(e2[0] - e2[1]) > 1e-9


def test_position_embedding_fixes_the_grid_and_config_errors():
    t = make_term((24, 24), 2)
    s = rand_state((30, 30), 5, np.random.default_rng(1))
    with pytest.raises(ConfigError, match="8x8 patch grid"):
        t.energy(Batch.from_states([s]))
    with pytest.raises(ConfigError, match="8x8 patch grid"):
        t.numpy_evaluator().delta(s.ids, s.types, (3, 3), 1)
    # 25×26 has the same 8×8 grid at stride 3: accepted (the last sites are not seen)
    s25 = rand_state((25, 26), 5, np.random.default_rng(2))
    assert np.isfinite(energy(t, [s25])[0])
    with pytest.raises(ConfigError, match="lattice_shape"):
        PooledNeuralHamiltonian({"position_dim": 3})
    with pytest.raises(ConfigError, match="unknown"):
        PooledNeuralHamiltonian({"position_dim": 0, "hiden": 3})
    with pytest.raises(ConfigError, match="pooled_nh: kernel"):
        PooledNeuralHamiltonian({"position_dim": 0, "kernel": 2})
    t0 = PooledNeuralHamiltonian({"position_dim": 0})  # any lattice size
    assert np.isfinite(energy(t0, [s])[0])


def test_gradients_reach_every_parameter_through_energy_and_delta():
    t = make_term((24, 24), 2, seed=4)
    t.scale = torch.nn.Parameter(torch.tensor(1.0, dtype=torch.float64))
    s = rand_state((24, 24), 6, np.random.default_rng(5))
    sites, new = proposals(s, 8, np.random.default_rng(6))
    b = Batch.from_states([s])
    (t.energy(b).sum() + t.delta(b, torch.as_tensor(sites)[None], torch.as_tensor(new)[None]).sum()).backward()
    names = [n for n, p in t.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert names == []
    assert "features.out.weight" not in t.tensors() and "features.scale" not in t.tensors()


def test_bundle_round_trip_and_torch_free_evaluator(tmp_path):
    t = make_term((24, 24), 2, seed=3)
    lat = LatticeSpec((24, 24))
    save_bundle(tmp_path / "b", Hamiltonian([t], lat, 1.0, ["medium", "a", "b"]))
    t2 = load_bundle(tmp_path / "b").hamiltonian.terms[0]
    assert isinstance(t2, PooledNeuralHamiltonian) and t2.config == t.config
    s = rand_state((24, 24), 6, np.random.default_rng(12))
    assert energy(t2, [s])[0] == energy(t, [s])[0]
    bad = dict(t.tensors())
    bad["pos"] = bad["pos"][:, :3]
    with pytest.raises(BundleError):
        PooledNeuralHamiltonian.from_spec(t.spec(), bad, lat)
    with pytest.raises(BundleError, match="mlp.2.weight"):
        PooledNHNumpy({k: v for k, v in t.config.items()},
                      {k: v.numpy() for k, v in t.tensors().items() if k != "mlp.2.weight"})
    # the two module files copied into a folder, loaded on their own with torch blocked (a host tool)
    src = Path(__file__).resolve().parents[1] / "neuralcpm_plugin" / "hamiltonian"
    (tmp_path / "host").mkdir()
    for f in ("local_nh.py", "pooled_nh.py"):
        (tmp_path / "host" / f).write_text((src / f).read_text())
    np.savez(tmp_path / "state.npz", ids=s.ids, types=s.types)
    code = f"""
import sys, json
sys.modules['torch'] = None
sys.path.insert(0, {str(tmp_path / 'host')!r})
import numpy as np
from safetensors.numpy import load_file
import pooled_nh as m
doc = json.load(open({str(tmp_path / 'b' / 'model.json')!r}))
t = doc['terms'][0]
arr = {{k.split('.', 2)[2]: v for k, v in load_file({str(tmp_path / 'b' / 'weights.safetensors')!r}).items()}}
ev = m.PooledNHNumpy.from_arrays(t['params']['config'], arr, t['scale'])
z = np.load({str(tmp_path / 'state.npz')!r})
print(repr(ev.energy(z['ids'], z['types'])), repr(ev.delta(z['ids'], z['types'], (5, 5), int(z['ids'][5, 6]))))
assert 'torch' not in [k for k, v in sys.modules.items() if v is not None]
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    e_np, d_np = (float(x) for x in out.stdout.split())
    assert e_np == pytest.approx(energy(t, [s])[0], abs=1e-10)
    assert d_np == pytest.approx(t.delta_np(s, (5, 5), int(s.ids[5, 6])), abs=1e-12)
    ref = energy(t, [after(s, 5 * 24 + 5, int(s.ids[5, 6]))])[0] - energy(t, [s])[0]
    assert d_np == pytest.approx(ref, abs=1e-10)


def test_delta_np_in_a_hamiltonian_and_many_chains():
    t = make_term((24, 24), 2, seed=8)
    rng = np.random.default_rng(9)
    states = [rand_state((24, 24), 6, rng) for _ in range(3)]
    props = [proposals(s, 5, rng) for s in states]
    sites = torch.as_tensor(np.stack([p[0] for p in props]))
    new = torch.as_tensor(np.stack([p[1] for p in props]))
    with torch.no_grad():
        d = t.delta(Batch.from_states(states), sites, new).numpy()
    ham = Hamiltonian([t], LatticeSpec((24, 24)), 1.0, ["medium", "a", "b"])
    for b, s in enumerate(states):
        for p in range(5):
            dn = ham.delta_np(s, divmod(int(sites[b, p]), 24), int(new[b, p]), {})
            assert dn == pytest.approx(d[b, p], abs=1e-10)


def test_delta_with_a_frozen_Z_is_the_expansion_around_it():
    """delta(Z0=...) = scale·(F(Z0 + ΔZ) − F(Z0)) with ΔZ exact at the current state; Z0 = own Z: plain ΔH."""
    t = make_term((24, 24), 2, seed=5)
    rng = np.random.default_rng(7)
    s0, s1 = rand_state((24, 24), 6, rng), rand_state((24, 24), 6, rng)
    sites, new = proposals(s1, 6, rng)
    b1 = Batch.from_states([s1])
    S, N = torch.as_tensor(sites)[None], torch.as_tensor(new)[None]
    ev = t.numpy_evaluator()
    with torch.no_grad():
        Z0 = t.Z(Batch.from_states([s0]))
        assert torch.allclose(t.delta(b1, S, N, Z0=t.Z(b1)), t.delta(b1, S, N), atol=1e-13)
        d = t.delta(b1, S, N, Z0=Z0)[0].numpy()
    z0 = Z0[0].numpy()
    for p, (site, nid) in enumerate(zip(sites, new)):
        dZ = ev.delta_Z(s1.ids, s1.types, divmod(int(site), 24), int(nid))
        assert d[p] == pytest.approx(float(ev.F(z0 + dZ) - ev.F(z0)), abs=1e-10)
    assert np.abs(d - t.delta(b1, S, N)[0].detach().numpy()).max() > 1e-6  # the frozen context matters


def test_exact_sampler_runs_a_pooled_closure_and_the_cache_follows_its_lattice():
    """The exact sampler evaluates the pooled term per candidate through delta_np (the cached numpy Z, synced
    with the sampler's live lattice): after a run its ΔH still equals H(after) − H(before)."""
    from neuralcpm_plugin.hamiltonian import analytic
    from neuralcpm_plugin.hamiltonian.closure import closure_hamiltonian
    from neuralcpm_plugin.sampling.exact import ExactSampler
    t = make_term((24, 24), 2, seed=2)
    J = np.array([[0.0, 1.0, 1.0], [1.0, 0.5, 1.5], [1.0, 1.5, 0.5]])
    ham = closure_hamiltonian([analytic.ContactEnergy(J, 2), analytic.VolumeConstraint([0, 0.5, 0.5], [0, 30, 30])],
                              {"w_g": [t]}, LatticeSpec((24, 24)), 1.0, ["medium", "a", "b"], w_a=1.0)
    s = rand_state((24, 24), 10, np.random.default_rng(3), medium=0.2)
    smp = ExactSampler(s, ham, seed=1)
    smp.step(1.0)
    assert smp.stats()["accepted"] > 20
    st = smp.state
    ev = t.numpy_evaluator()
    assert np.allclose(ev.cached_Z(st.ids, st.types), ev.Z(st.ids, st.types), rtol=0, atol=1e-10)
    rng = np.random.default_rng(4)
    sites, new = proposals(st, 5, rng)
    for site, nid in zip(sites, new):
        ij = divmod(int(site), 24)
        with torch.no_grad():
            ref = float(ham.energy(Batch.from_states([after(st, site, nid)])) - ham.energy(Batch.from_states([st])))
        assert smp.delta(ij, int(nid)) == pytest.approx(ref, abs=1e-8)


# --------------------------------------------------------------------------- position_init = "moments"
def _monomials(Gh, Gw):
    """The 9 monomials of the moment basis on a Gh×Gw patch grid, written out independently (uncentred)."""
    r = np.linspace(-1.0, 1.0, Gh) if Gh > 1 else np.zeros(1)
    c = np.linspace(-1.0, 1.0, Gw) if Gw > 1 else np.zeros(1)
    R, C = np.meshgrid(r, c, indexing="ij")
    return {"r": R, "c": C, "r^2": R * R, "r*c": R * C, "c^2": C * C, "r^3": R ** 3, "r^2*c": R * R * C,
            "r*c^2": R * C * C, "c^3": C ** 3}


@HYP
@given(Gh=st.integers(1, 30), Gw=st.integers(1, 30), D=st.integers(0, 12))
def test_moment_basis_is_the_centred_normalised_polynomials(Gh, Gw, D):
    """Property: column k is monomial k (r, c, r², rc, c², r³, r²c, rc², c³ of the patch coordinates in [−1, 1])
    minus its grid mean, over its RMS: mean 0 and RMS 1 (0 where the monomial is constant on the grid)."""
    b = moment_basis((Gh, Gw), D)
    assert b.shape == (Gh, Gw, min(D, 9))
    mono = _monomials(Gh, Gw)
    for k in range(b.shape[-1]):
        m = mono[MOMENT_MONOMIALS[k]]
        m = m - m.mean()
        rms = np.sqrt((m ** 2).mean())
        if rms < 1e-12:
            assert np.all(b[..., k] == 0)
            continue
        assert abs(b[..., k].mean()) < 1e-12
        assert np.sqrt((b[..., k] ** 2).mean()) == pytest.approx(1.0, abs=1e-12)
        assert np.allclose(b[..., k] * rms, m, atol=1e-12)


def test_position_init_moments_sets_the_first_columns_and_keeps_the_rest():
    base = dict(SMALL, position_dim=12, lattice_shape=[24, 27])  # stride 3: an 8×9 patch grid
    t = PooledNeuralHamiltonian(dict(base, position_init="moments"), seed=5)
    r = PooledNeuralHamiltonian(base, seed=5)
    r2 = PooledNeuralHamiltonian(dict(base, position_init="random"), seed=5)
    pos = t.pos.detach().numpy()
    assert np.array_equal(pos[..., :9], moment_basis((8, 9), 12))
    # the default is unchanged (every tensor bit-identical with and without the key) and the rest of "moments"
    # is what "random" draws
    assert all(torch.equal(a, b) for a, b in zip(r.tensors().values(), r2.tensors().values()))
    assert torch.equal(t.pos[..., 9:], r.pos[..., 9:])
    assert all(torch.equal(a, b) for (k, a), (_, b) in zip(t.tensors().items(), r.tensors().items()) if k != "pos")
    # expected polynomials: r varies along rows only, c along columns, the r·c column is their product's shape
    assert np.allclose(pos[:, :1, 0], pos[:, 5:6, 0]) and np.all(np.diff(pos[:, 0, 0]) > 0)
    assert np.allclose(pos[:1, :, 1], pos[3:4, :, 1]) and np.all(np.diff(pos[0, :, 1]) > 0)
    rc = pos[..., 0:1] * pos[..., 1:2]
    assert np.allclose(pos[..., 3], rc[..., 0] / np.sqrt((rc ** 2).mean()))
    # D < 9: only the first D monomials
    t2 = PooledNeuralHamiltonian(dict(base, position_dim=2, position_init="moments"), seed=5)
    assert np.array_equal(t2.pos.detach().numpy(), moment_basis((8, 9), 9)[..., :2])
    # Z's position part is each channel's moment: Z[C + c·D + d] = Σ_g q_c(g)·pos_d(g)
    s = rand_state((24, 27), 6, np.random.default_rng(2))
    ev = t.numpy_evaluator()
    q = ev.features.patch_q(s.ids, s.types)
    Z = ev.Z(s.ids, s.types)
    C = q.shape[1]
    assert np.allclose(Z[C:].reshape(C, 12)[:, :9], q.T @ pos[..., :9].reshape(-1, 9), atol=1e-12)


def test_position_init_and_trainable_config_errors():
    base = dict(SMALL, position_dim=4, lattice_shape=[24, 24])
    with pytest.raises(ConfigError, match=r"position_init must be one of 'random', 'moments', got 'poly'"):
        PooledNeuralHamiltonian(dict(base, position_init="poly"))
    with pytest.raises(ConfigError, match="position_init"):
        PooledNeuralHamiltonian(dict(base, position_init=3))
    with pytest.raises(ConfigError, match="position_trainable must be true or false, got 'yes'"):
        PooledNeuralHamiltonian(dict(base, position_trainable="yes"))
    with pytest.raises(ConfigError, match="position_init"):
        PooledNHNumpy(dict(base, position_init="Moments"), {})
    from training.config import load_config
    cfg = load_config("bipolar-cpu-table2-moments")
    assert cfg["model"]["pooled"]["position_init"] == "moments"


def test_fixed_moment_basis_gets_no_gradient_and_survives_a_bundle_round_trip(tmp_path):
    from training.parammap import ParamMap
    t = make_term((24, 24), 12, seed=6, position_init="moments", position_trainable=False)
    assert not t.pos.requires_grad
    assert all(p.requires_grad for n, p in t.named_parameters() if n != "pos")
    ham = Hamiltonian([t], LatticeSpec((24, 24)), 1.0, ["medium", "a", "b"])
    assert "terms.0.pos" not in ParamMap(ham).named_free()
    s = rand_state((24, 24), 6, np.random.default_rng(12))
    t.energy(Batch.from_states([s])).sum().backward()
    assert t.pos.grad is None and t.mlp[0].weight.grad.abs().sum() > 0
    save_bundle(tmp_path / "b", ham)
    t2 = load_bundle(tmp_path / "b").hamiltonian.terms[0]
    assert t2.config == t.config and t2.config["position_init"] == "moments"
    assert not t2.pos.requires_grad and torch.equal(t2.pos, t.pos)
    assert energy(t2, [s])[0] == energy(t, [s])[0]
    # a trained (moved) embedding is what the bundle keeps, not the basis the key names
    t3 = make_term((24, 24), 12, seed=6, position_init="moments")
    with torch.no_grad():
        t3.pos.add_(0.25)
    save_bundle(tmp_path / "c", Hamiltonian([t3], LatticeSpec((24, 24)), 1.0, ["medium", "a", "b"]))
    t4 = load_bundle(tmp_path / "c").hamiltonian.terms[0]
    assert torch.equal(t4.pos, t3.pos) and t4.pos.requires_grad
    assert energy(t4, [s])[0] == energy(t3, [s])[0]
