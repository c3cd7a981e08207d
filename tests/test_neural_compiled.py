"""Compiled (numba) local and pooled NH: compiled ΔH == numpy ΔH == torch ΔH == H(after) − H(before), caches
== full recomputation after long accepted-copy sequences, invariances, and the exact sampler running them in
its compiled loop (same trajectory as the Python-callback path)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_neural_local import make_term as make_local
from test_neural_local import rand_state
from test_neural_pooled import make_term as make_pooled

from neuralcpm_plugin.hamiltonian import Batch, Hamiltonian, LatticeSpec
from neuralcpm_plugin.hamiltonian._local_nh_numba import LocalNHCompiled, PooledNHCompiled
from neuralcpm_plugin.hamiltonian.analytic import ContactEnergy, VolumeConstraint
from neuralcpm_plugin.hamiltonian.closure import closure_hamiltonian
from neuralcpm_plugin.lattice import CellState
from neuralcpm_plugin.sampling.exact import ExactSampler

HYP = settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LOCAL_CFGS = [{"n_types": 2, "stride": 3, "channels": 6, "kernel": 3},
              {"n_types": 2, "stride": 2, "channels": 5, "kernel": 5},
              {"n_types": 3, "stride": 4, "channels": 8, "kernel": 3}]


def _random_copy(ids, rng):
    """A copy attempt of a neighbour's id into a random site (often a no-op, as in a sampler)."""
    H, W = ids.shape
    i, j = int(rng.integers(H)), int(rng.integers(W))
    nid = int(ids[(i + rng.integers(-1, 2)) % H, (j + rng.integers(-1, 2)) % W])
    return (i, j), nid


def _torch_energy(term, ids, types):
    with torch.no_grad():
        return float(term.energy(Batch.from_states([CellState(ids, types)]))[0])


def _torch_delta(term, ids, types, site, nid):
    W = ids.shape[1]
    with torch.no_grad():
        return float(term.delta(Batch.from_states([CellState(ids, types)]),
                                torch.tensor([[site[0] * W + site[1]]]), torch.tensor([[nid]]))[0, 0])


@HYP
@given(seed=st.integers(0, 100_000), cfg=st.sampled_from(LOCAL_CFGS),
       shape=st.sampled_from([(18, 21), (24, 24), (8, 10), (13, 17)]))
def test_local_compiled_equals_numpy_torch_and_full_difference(seed, cfg, shape):
    """Property: compiled ΔH == numpy ΔH == torch ΔH == H(after) − H(before) on random states, including
    grids smaller than the kernel (outputs coincide) and lattices not divisible by the stride (unseen sites);
    accepting a random half of the attempts keeps the caches equal to a full recomputation."""
    rng = np.random.default_rng(seed)
    term = make_local(cfg, seed=seed % 5)
    ev = term.numpy_evaluator()
    s = rand_state(shape, int(rng.integers(3, 9)), rng)
    ids, types = s.ids.copy(), s.types.copy()
    types[1:] = rng.integers(1, cfg["n_types"] + 1, len(types) - 1)
    comp = LocalNHCompiled(ev, refresh_every=int(rng.integers(5, 50)))
    assert comp.delta(ids, types, (0, 0), int(ids[0, 0])) == 0.0
    assert comp.energy() == pytest.approx(_torch_energy(term, ids, types), abs=1e-10)
    big = 0.0
    for it in range(60):
        site, nid = _random_copy(ids, rng)
        d = comp.delta(ids, types, site, nid)
        after = ids.copy()
        after[site] = nid
        ref = ev.energy(after, types) - ev.energy(ids, types)
        assert d == pytest.approx(ref, abs=1e-10)
        assert d == pytest.approx(ev.delta(ids, types, site, nid), abs=1e-11)
        if it % 6 == 0:
            assert d == pytest.approx(_torch_delta(term, ids, types, site, nid), abs=1e-10)
        big = max(big, abs(d))
        if rng.random() < 0.5:
            comp.accept(site, nid)
            ids[site] = nid
    assert big > 1e-3  # not vacuous
    assert comp.cache_error() < 1e-11
    assert comp.energy() == pytest.approx(ev.energy(ids, types), abs=1e-10)


@HYP
@given(seed=st.integers(0, 100_000), D=st.sampled_from([0, 3]), shape=st.sampled_from([(24, 27), (12, 12)]))
def test_pooled_compiled_equals_numpy_torch_and_full_difference(seed, D, shape):
    """Property: compiled pooled ΔH == numpy (uncached) == torch == H(after) − H(before); Z cache == Z."""
    rng = np.random.default_rng(seed)
    term = make_pooled(shape, D, seed=seed % 7)
    ev = term.numpy_evaluator()
    s = rand_state(shape, int(rng.integers(3, 9)), rng)
    ids, types = s.ids.copy(), s.types.copy()
    comp = PooledNHCompiled(ev, refresh_every=int(rng.integers(5, 50)), z_refresh_every=int(rng.integers(5, 50)))
    comp.bind(ids, types)
    assert comp.energy() == pytest.approx(_torch_energy(term, ids, types), abs=1e-10)
    big = 0.0
    for it in range(60):
        site, nid = _random_copy(ids, rng)
        d = comp.delta(ids, types, site, nid)
        after = ids.copy()
        after[site] = nid
        ref = ev.energy(after, types) - ev.energy(ids, types)
        assert d == pytest.approx(ref, abs=1e-10)
        assert d == pytest.approx(ev.delta_uncached(ids, types, site, nid), abs=1e-11)
        if it % 6 == 0:
            assert d == pytest.approx(_torch_delta(term, ids, types, site, nid), abs=1e-9)
        big = max(big, abs(d))
        if rng.random() < 0.5:
            comp.accept(site, nid)
            ids[site] = nid
    assert big > 1e-3
    assert comp.cache_error() < 1e-11
    np.testing.assert_allclose(comp.Z(), ev.Z(ids, types), rtol=0, atol=1e-11)


@pytest.mark.parametrize("kind", ["local", "pooled"])
def test_caches_equal_recomputation_after_2000_accepted_copies(kind):
    """2,000 accepted random copies (default refresh periods): caches == full recomputation, relative
    drift of the cached energy / Z < 1e-9."""
    rng = np.random.default_rng(3)
    shape = (24, 24)
    if kind == "local":
        term = make_local({"n_types": 2, "stride": 4, "channels": 16, "kernel": 3}, seed=1)
        comp = LocalNHCompiled(term.numpy_evaluator())
    else:
        term = make_pooled(shape, 2, seed=1)
        comp = PooledNHCompiled(term.numpy_evaluator())
    s = rand_state(shape, 8, rng)
    ids, types = s.ids.copy(), s.types
    comp.bind(ids, types)
    n = 0
    while n < 2000:
        site, nid = _random_copy(ids, rng)
        if nid == ids[site]:
            continue
        comp.delta(ids, types, site, nid)
        comp.accept(site, nid)
        ids[site] = nid
        n += 1
    assert comp.cache_error() < 1e-11
    e = _torch_energy(term, ids, types)
    assert abs(comp.energy() - e) <= 1e-9 * max(1.0, abs(e))


def test_accept_without_delta_and_rebind_on_new_array():
    """accept() of an attempt that was not the last evaluated one computes it itself; another ids array
    rebuilds the caches."""
    rng = np.random.default_rng(0)
    term = make_local(LOCAL_CFGS[0], seed=2)
    ev = term.numpy_evaluator()
    s = rand_state((18, 18), 5, rng)
    ids = s.ids.copy()
    comp = LocalNHCompiled(ev)
    comp.delta(ids, s.types, (0, 0), 1)
    for _ in range(50):
        site, nid = _random_copy(ids, rng)
        comp.delta(ids, s.types, (3, 3), int(ids[4, 4]))  # another attempt in between
        comp.accept(site, nid)
        ids[site] = nid
    assert comp.cache_error() < 1e-11
    other = ids.copy()
    other[5, 5] = 0
    assert comp.delta(other, s.types, (6, 6), 2) == pytest.approx(ev.delta(other, s.types, (6, 6), 2), abs=1e-11)
    with pytest.raises(ValueError, match="type"):
        comp.bind(ids, np.array([0, 1, 7, 1, 1, 1]))


@HYP
@given(seed=st.integers(0, 100_000), D=st.sampled_from([0, 2]))
def test_compiled_permutation_and_translation_invariance(seed, D):
    """Relabelling ids leaves every compiled ΔH unchanged; a periodic shift by a multiple of the stride
    too (local NH, and the pooled NH without position embedding)."""
    rng = np.random.default_rng(seed)
    shape = (24, 24)
    lt = make_local(LOCAL_CFGS[0], seed=seed % 3)
    pt = make_pooled(shape, D, seed=seed % 3)
    s = rand_state(shape, 6, rng)
    perm = np.concatenate([[0], rng.permutation(np.arange(1, len(s.types)))])
    ids_p = perm[s.ids]
    types_p = np.zeros_like(s.types)
    types_p[perm] = s.types
    shift = 3 * int(rng.integers(1, 4))
    ids_t = np.roll(s.ids, (shift, -shift), (0, 1))
    for term in (lt, pt):
        cls = LocalNHCompiled if term is lt else PooledNHCompiled
        a, b, c = cls(term.numpy_evaluator()), cls(term.numpy_evaluator()), cls(term.numpy_evaluator())
        for _ in range(15):
            site, nid = _random_copy(s.ids, rng)
            d = a.delta(s.ids, s.types, site, nid)
            assert b.delta(ids_p, types_p, site, int(perm[nid])) == pytest.approx(d, abs=1e-11)
            if term is lt or D == 0:
                st_ = ((site[0] + shift) % 24, (site[1] - shift) % 24)
                assert c.delta(ids_t, s.types, st_, nid) == pytest.approx(d, abs=1e-11)


def _closure(shape, pooled=False, T=2.0):
    a = [ContactEnergy([[0.0, 2.0, 2.0], [2.0, 1.0, 3.0], [2.0, 3.0, 1.0]], 2),
         VolumeConstraint([0, 1.0, 1.0], [0, 25.0, 25.0])]
    n = [make_local({"n_types": 2, "stride": 3, "channels": 6, "kernel": 3}, seed=0, gain=2.0)]
    if pooled:
        n.append(make_pooled(shape, 2, seed=0, gain=2.0))
    return closure_hamiltonian(a, n, LatticeSpec(shape), T, ["medium", "a", "b"], w_a=1.0, w_n=1.0)


@pytest.mark.parametrize("pooled", [False, True])
@pytest.mark.parametrize("proposal", ["classic", "boundary"])
def test_exact_sampler_compiled_neural_same_trajectory_as_callback(pooled, proposal):
    """Same seed → the compiled neural path and the Python-callback path give the same lattice after every
    step (ΔH agree to ~1e-13, so no Metropolis decision differs), and the caches stay exact."""
    shape = (18, 18)
    ham = _closure(shape, pooled)
    rng = np.random.default_rng(5)
    s = rand_state(shape, 8, rng, medium=0.3)
    fast = ExactSampler(s, ham, seed=11, proposal=proposal)
    slow = ExactSampler(s, ham, seed=11, proposal=proposal, compiled_neural=False)
    assert len(fast.compiled_terms) == (2 if pooled else 1) and not fast.callback_terms
    assert len(slow.callback_terms) == (2 if pooled else 1) and not slow.compiled_terms
    for _ in range(2):
        fast.step(0.4)
        slow.step(0.4)
        np.testing.assert_array_equal(fast.ids, slow.ids)
    st_f, st_s = fast.stats(), slow.stats()
    assert st_f["accepted"] == st_s["accepted"] > 20
    assert fast.neural_cache_error() < 1e-11
    # the sampler's ΔH (analytic + compiled neural) == the Hamiltonian's
    for _ in range(5):
        site, nid = _random_copy(fast.ids, rng)
        ref = float(ham.delta_np(fast.state, site, nid)) if hasattr(ham, "delta_np") else None
        if ref is not None:
            assert fast.delta(site, nid) == pytest.approx(ref, abs=1e-9)
        assert fast.delta(site, nid) == pytest.approx(slow.delta(site, nid), abs=1e-10)


def test_exact_sampler_mixed_compiled_and_callback_terms():
    """A second local NH (not compiled: one per kind) goes through the callback path next to the compiled
    one; trajectories equal the all-callback run."""
    shape = (18, 18)
    ham = _closure(shape)
    extra = make_local({"n_types": 2, "stride": 3, "channels": 4, "kernel": 3}, seed=4)
    ham2 = Hamiltonian(list(ham.terms) + [extra], ham.lattice, ham.temperature, ham.type_names)
    s = rand_state(shape, 6, np.random.default_rng(2), medium=0.3)
    fast = ExactSampler(s, ham2, seed=3)
    slow = ExactSampler(s, ham2, seed=3, compiled_neural=False)
    assert len(fast.compiled_terms) == 1 and len(fast.callback_terms) == 1
    fast.step(1.0)
    slow.step(1.0)
    np.testing.assert_array_equal(fast.ids, slow.ids)
    assert fast.neural_cache_error() < 1e-11


@settings(max_examples=30, deadline=None)
@given(shapes=st.lists(st.tuples(st.integers(0, 5), st.integers(1, 9), st.sampled_from(["f8", "i8"])),
                       min_size=1, max_size=8), big=st.booleans())
def test_block_arrays_are_disjoint_aligned_and_zeroed(shapes, big):
    """Property: the caches' one-block allocator gives zeroed, 64-byte aligned arrays of the asked shapes that
    do not overlap (each filled with its own index reads back intact); a ≥ 256 KiB block starts on 2 MiB."""
    from neuralcpm_plugin.hamiltonian._local_nh_numba import _block_arrays
    specs = [((a, b), np.dtype(t)) for a, b, t in shapes]
    if big:
        specs.append((((300 << 10) // 8,), np.dtype("f8")))
    arrs = _block_arrays(specs)
    assert [a.shape for a in arrs] == [sh for sh, _ in specs]
    assert all(a.dtype == dt and a.flags.c_contiguous for a, (_, dt) in zip(arrs, specs))
    assert all(a.ctypes.data % 64 == 0 and not a.any() for a in arrs)
    for i, a in enumerate(arrs):
        a[...] = i + 1
    assert all((a == i + 1).all() for i, a in enumerate(arrs))
    if big:
        import sys
        if sys.platform.startswith("linux"):
            assert arrs[0].ctypes.data % (2 << 20) == 0


@pytest.mark.parametrize("kind", ["local", "pooled"])
def test_block_backed_caches_equal_recomputation_and_numpy(kind):
    """A lattice whose caches take the huge-page block path (64×64, 16 channels: ≈ 1.4 MiB): 1,500 accepted
    copies keep the caches equal to a full recomputation, and the compiled ΔH equals the numpy evaluator's."""
    from neuralcpm_plugin.hamiltonian import _local_nh_numba as NB
    rng = np.random.default_rng(5)
    shape = (64, 64)
    if kind == "local":
        term = make_local({"n_types": 2, "stride": 4, "channels": 16, "kernel": 3}, seed=4)
        ev = term.numpy_evaluator()
        comp, ref = LocalNHCompiled(ev), ev.delta
    else:
        term = make_pooled(shape, 2, seed=4)
        ev = term.numpy_evaluator()
        comp, ref = PooledNHCompiled(ev), ev.delta_uncached
    s = rand_state(shape, 30, rng)
    ids, types = s.ids.copy(), s.types
    comp.bind(ids, types)
    S = comp.S
    assert sum(a.nbytes for a in S) >= 256 << 10
    assert all(np.shares_memory(S[NB._S_UW], a) is False for a in (S[NB._S_PSI], S[NB._S_CA]))
    n = err = 0
    while n < 1500:
        site, nid = _random_copy(ids, rng)
        if nid == ids[site]:
            continue
        d = comp.delta(ids, types, site, nid)
        if n % 50 == 0:
            err = max(err, abs(d - ref(ids, types, site, nid)))
        comp.accept(site, nid)
        ids[site] = nid
        n += 1
    assert err < 1e-11
    assert comp.cache_error() < 1e-11


_PACK_SCRIPT = """
import json, sys
import numpy as np
sys.path.insert(0, {tests!r})
from test_neural_local import rand_state
from test_neural_pooled import make_term
from neuralcpm_plugin.hamiltonian import _local_nh_numba as M
comp = M.PooledNHCompiled(make_term((16, 16), 2, seed=1).numpy_evaluator())
s = rand_state((16, 16), 5, np.random.default_rng(0))
comp.bind(s.ids.copy(), s.types)
comp._L, comp._LP
print(json.dumps({{f.__name__: [sum(f.stats.cache_hits.values()), sum(f.stats.cache_misses.values())]
                  for f in (M.pack_lattice, M.pack_pooled)}}))
"""


def test_packed_lists_share_the_buffers_and_come_from_numbas_disk_cache():
    """The typed Lists of the packed (CompuCell3D) calls hold the evaluator's own arrays, and are built by
    compiled code that numba loads from its disk cache in a fresh process (a typed List filled from Python
    compiles its append afresh in every process: seconds per CC3D run)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    rng = np.random.default_rng(1)
    comp = PooledNHCompiled(make_pooled((16, 16), 2, seed=1).numpy_evaluator())
    s = rand_state((16, 16), 5, rng)
    ids = s.ids.copy()
    comp.bind(ids, s.types)
    L, LP = comp._L[0], comp._LP[0]
    assert np.shares_memory(L[0], ids) and np.shares_memory(L[1], comp._types)
    assert all(np.shares_memory(a, b) for a, b in zip(L[3], comp.S) if isinstance(a, np.ndarray))
    assert all(np.shares_memory(a, b) for a, b in zip(LP[1], comp.PS) if isinstance(a, np.ndarray))
    for _ in range(20):  # the packed calls see the accepted copies through the shared buffers
        site, nid = _random_copy(ids, rng)
        if nid == ids[site]:
            continue
        comp.delta(ids, s.types, site, nid)
        comp.accept(site, nid)
        ids[site] = nid
    assert comp.cache_error() < 1e-11
    tests = str(Path(__file__).resolve().parent)
    code = _PACK_SCRIPT.format(tests=tests)
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=False)
            for _ in range(2)]  # the first fills the cache if needed
    for r in runs:
        assert r.returncode == 0, r.stderr[-3000:]
    stats = json.loads(runs[1].stdout.strip().splitlines()[-1])
    assert stats == {"pack_lattice": [1, 0], "pack_pooled": [1, 0]}, stats
