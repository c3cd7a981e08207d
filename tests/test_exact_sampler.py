"""Behaviour of the exact sampler: proposals, Metropolis rule, bookkeeping, seeding, callback path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from numba import njit
from test_exact_delta import make_terms

from neuralcpm_plugin.errors import ConfigError
from neuralcpm_plugin.hamiltonian.analytic import ContactEnergy, SurfaceConstraint, VolumeConstraint
from neuralcpm_plugin.hamiltonian.base import Hamiltonian, LatticeSpec, Term
from neuralcpm_plugin.lattice import CellState, boundary_mask
from neuralcpm_plugin.sampling import _kernels as K
from neuralcpm_plugin.sampling.exact import ExactSampler, neighbour_table, run_exact


def blob_state(shape=(20, 20), n=6, seed=0):
    rng = np.random.default_rng(seed)
    ids = np.zeros(shape, np.int32)
    for c in range(1, n + 1):
        y, x = rng.integers(0, shape[0] - 3), rng.integers(0, shape[1] - 3)
        ids[y:y + 3, x:x + 3] = c
    ids, _ = np.unique(ids, return_inverse=True)[1].reshape(shape), None
    n_ids = int(ids.max()) + 1
    types = np.concatenate([[0], 1 + (np.arange(1, n_ids) % 2)]).astype(np.int32)
    return CellState(ids.astype(np.int32), types)


def cellsort_ham(shape, periodic=True, lam=0.5, target=9.0, J=None):
    J = np.array([[0, 1.0, 1.2], [1.0, 0.5, 1.5], [1.2, 1.5, 0.4]]) if J is None else J
    lat = LatticeSpec(tuple(shape), periodic)
    return Hamiltonian([ContactEnergy(J, 2, periodic=periodic), VolumeConstraint([0, lam, lam], [0, target, target],
                                                                                 periodic=periodic)], lat, 1.0)


def test_seeded_runs_are_reproducible_and_seed_dependent():
    st0 = blob_state()
    ham = cellsort_ham(st0.shape)
    a = run_exact(st0, ham, 5, seed=11).final
    b = run_exact(st0, ham, 5, seed=11).final
    c = run_exact(st0, ham, 5, seed=12).final
    assert a == b
    assert not np.array_equal(a.ids, c.ids)
    assert st0 == blob_state()  # the input state is not modified


def test_attempt_count_and_stepping_in_pieces():
    st0 = blob_state()
    ham = cellsort_ham(st0.shape)
    s = ExactSampler(st0, ham, seed=3)
    s.step(1.5)
    s.step(0.5)
    assert s.stats()["attempts"] == 2 * 400
    whole = ExactSampler(st0, ham, seed=3)
    whole.step(2)
    assert whole.state == s.state  # the same random stream, however it is cut


@pytest.mark.parametrize("proposal", ["classic", "boundary"])
@pytest.mark.parametrize("periodic", [True, False])
def test_incremental_bookkeeping_matches_recount(proposal, periodic):
    st0 = blob_state((16, 18), 8, seed=5)
    lat = LatticeSpec(st0.shape, periodic)
    ham = Hamiltonian([ContactEnergy(np.array([[0, 1.0, 1.2], [1.0, 0.5, 1.5], [1.2, 1.5, 0.4]]), 2,
                                     periodic=periodic),
                       VolumeConstraint([0, 0.5, 0.5], [0, 12, 12], periodic=periodic),
                       SurfaceConstraint([0, 0.05, 0.05], [0, 20, 20], 1, periodic=periodic)], lat, 1.0)
    s = ExactSampler(st0, ham, seed=1, proposal=proposal)
    s.step(20)
    ids = s.ids.ravel()
    assert np.array_equal(s.volumes, np.bincount(ids, minlength=s.n_ids))
    snb, _ = neighbour_table(st0.shape, 1, periodic, drop_self=True)
    assert np.array_equal(s._A[0], K.surfaces_of(ids, snb, s.n_ids))
    assert s.stats()["accepted"] > 50
    if proposal == "boundary":
        bm = boundary_mask(s.ids, 2, periodic).ravel()
        bflag, frame = s._B
        assert np.count_nonzero(bflag) == bm.sum() > 0
        assert np.array_equal(bflag.astype(bool), bm)
        nb, _ = neighbour_table(st0.shape, 2, periodic)  # exact count of unlike copy neighbours per site
        unlike = ((nb >= 0) & (ids[np.maximum(nb, 0)] != ids[:, None])).sum(1)
        assert np.array_equal(bflag, unlike)
        m1 = s._G[4]  # frame: the sites less than M1 from an edge (the kernels' slow neighbour path)
        rows, cols = np.indices(st0.shape).reshape(2, -1)
        edge = (rows < m1) | (rows >= st0.shape[0] - m1) | (cols < m1) | (cols >= st0.shape[1] - m1)
        assert 0 < edge.sum() < edge.size and np.array_equal(frame, edge.astype(np.uint8))


def test_cells_are_never_deleted():
    """A volume term with target 0 makes every cell want to vanish; the copy of its last site is refused."""
    st0 = blob_state((14, 14), 5, seed=2)
    ham = cellsort_ham(st0.shape, lam=2.0, target=0.0, J=np.zeros((3, 3)))
    s = ExactSampler(st0, ham, seed=0)
    n0 = len(st0.cell_ids())
    for _ in range(10):
        s.step(2)
        assert len(s.state.cell_ids()) == n0
    assert s.stats()["refused_deletions"] > 0


def _candidate_distribution(state, proposal, n_draws, seed=0):
    s = ExactSampler(state, None, seed=seed, terms=[], temperature=1.0, proposal=proposal)
    counts = {}
    for _ in range(n_draws):
        _done, pending, x, new, _dh = s._sweep(10**6, stop_at_candidate=True)
        assert pending == 1
        counts[(int(x), int(new))] = counts.get((int(x), int(new)), 0) + 1
    return s, counts


def test_classic_proposal_is_uniform_over_ordered_unlike_pairs():
    """The first candidate of a classic sweep: target t, new id σ(s), uniform over ordered unlike (s, t)."""
    ids = np.array([[0, 0, 1, 1], [0, 2, 1, 1], [0, 2, 2, 0], [0, 0, 0, 0]], np.int32)
    state = CellState(ids, np.array([0, 1, 2]))
    _s, counts = _candidate_distribution(state, "classic", 30000)
    nb, _ = neighbour_table(state.shape, 2, True)
    flat = ids.ravel()
    expect = {}
    for src in range(flat.size):
        for t in nb[src]:
            if flat[t] != flat[src]:
                expect[(int(t), int(flat[src]))] = expect.get((int(t), int(flat[src])), 0) + 1
    tot = sum(expect.values())
    assert set(counts) == set(expect)
    n = sum(counts.values())
    for k, e in expect.items():
        p = e / tot
        assert abs(counts[k] / n - p) < 5 * np.sqrt(p * (1 - p) / n) + 1e-9, k


def test_boundary_proposal_distribution():
    """Boundary proposal: site uniform over the boundary, new id ∝ its unlike neighbours of that id."""
    ids = np.array([[0, 0, 1, 1], [0, 2, 1, 1], [0, 2, 2, 0], [0, 0, 0, 0]], np.int32)
    state = CellState(ids, np.array([0, 1, 2]))
    _, counts = _candidate_distribution(state, "boundary", 30000, seed=4)
    nb, _ = neighbour_table(state.shape, 2, True)
    flat = ids.ravel()
    bnd = [x for x in range(flat.size) if any(flat[y] != flat[x] for y in nb[x])]
    expect = {}
    for x in bnd:
        unlike = [int(flat[y]) for y in nb[x] if flat[y] != flat[x]]
        for c in set(unlike):
            expect[(x, c)] = (1 / len(bnd)) * unlike.count(c) / len(unlike)
    n = sum(counts.values())
    assert set(counts) == set(expect)
    for k, p in expect.items():
        assert abs(counts[k] / n - p) < 5 * np.sqrt(p * (1 - p) / n), k


@pytest.mark.parametrize("dh", [-0.5, 0.0, 0.7, 2.0])
def test_metropolis_acceptance_probability(dh):
    ids = np.zeros((4, 4), np.int32)
    ids[1:3, 1:3] = 1
    state = CellState(ids, np.array([0, 1]))
    s = ExactSampler(state, None, seed=9, terms=[], temperature=1.3)
    n, acc = 20000, 0
    x = 5  # (1, 1), in cell 1; copying medium there keeps the cell alive
    for _ in range(n):
        a = s._decide(x, 0, dh)
        if a:
            acc += 1
            s._ids[x] = 1
            s._vol[:] = [12, 4]
    p = min(1.0, np.exp(-dh / 1.3))
    assert abs(acc / n - p) < 5 * np.sqrt(max(p * (1 - p), 1e-12) / n) + 1e-12


class _WrappedTerm(Term):
    """A term the sampler must call through ``delta_np`` (analytic = False)."""

    kind = "test_wrapped"
    analytic = False

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.calls = 0

    def delta_np(self, state, site, new_id, cache=None):
        self.calls += 1
        assert cache is not None and "volumes" in cache
        return self.inner.delta_np(state, site, new_id, cache)


def test_callback_path_reproduces_compiled_path():
    """A non-analytic term goes through Python; with the same seed the trajectory is the compiled one's."""
    st0 = blob_state((12, 12), 4, seed=1)
    ham = cellsort_ham(st0.shape)
    contact, volume = ham.terms
    mixed = Hamiltonian([_WrappedTerm(contact), volume], ham.lattice, 1.0)
    a = ExactSampler(st0, ham, seed=21)
    b = ExactSampler(st0, mixed, seed=21)
    a.step(3)
    b.step(3)
    assert b.callback_terms and b.callback_terms[0].calls == b.stats()["candidates"] > 0
    assert a.state == b.state
    assert a.stats() == b.stats()


def test_zero_hamiltonian_accepts_every_candidate():
    st0 = blob_state((10, 10), 3)
    s = ExactSampler(st0, None, seed=0, terms=[], temperature=1.0)
    s.step(2)
    stt = s.stats()
    assert stt["accepted"] == stt["candidates"] > 0


def test_bad_inputs():
    st0 = blob_state((10, 10), 3)
    with pytest.raises(ConfigError):
        ExactSampler(st0, cellsort_ham(st0.shape), seed=0, proposal="nonsense")
    with pytest.raises(ConfigError):
        ExactSampler(st0, cellsort_ham(st0.shape), seed=0, temperature=0.0)
    with pytest.raises(ConfigError):  # contact table smaller than the state's types
        ExactSampler(CellState(st0.ids, np.array([0] + [3] * (st0.n_ids - 1))), cellsort_ham(st0.shape), seed=0)
    with pytest.raises(ConfigError):
        ExactSampler(st0, None, seed=0, terms=[({"kind": "mystery", "params": {}}, {})])


def test_run_exact_records_frames():
    st0 = blob_state((10, 10), 3)
    res = run_exact(st0, cellsort_ham(st0.shape), 5, seed=2, record_every=2)
    assert res.mcs == [0.0, 2.0, 4.0, 5.0]
    assert len(res.frames) == 4 and res.frames[0] == st0 and res.frames[-1] == res.final
    assert res.stats["attempts"] == 500


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 10_000), st.booleans())
def test_invariants_random_runs(seed, periodic):
    """Any run keeps ids valid, volumes positive for every initial cell and the types table unchanged."""
    st0 = blob_state((12, 13), 5, seed=seed % 50)
    ham = cellsort_ham(st0.shape, periodic=periodic)
    s = ExactSampler(st0, ham, seed=seed, proposal="boundary" if seed % 2 else "classic")
    s.step(2)
    fin = s.state
    assert np.array_equal(fin.types, st0.types)
    assert set(fin.cell_ids().tolist()) == set(st0.cell_ids().tolist())
    assert torch.is_tensor(torch.as_tensor(fin.ids))


@njit(cache=True)
def _below_exp_pair(r53, a):
    """(the kernels' table test, the plain test u < exp(-a) with u = r53 * 2**-53), both compiled."""
    return K.below_exp(r53, a), np.float64(r53) * K._TWO53 < np.exp(-a)


def _check_below_exp(r53, a):
    fast, plain = _below_exp_pair(np.uint64(r53), float(a))
    assert fast == plain, (r53, a)


@settings(max_examples=400, deadline=None)
@given(st.integers(0, 2 ** 53 - 1), st.floats(1e-300, 1e3, allow_nan=False, allow_infinity=False))
def test_metropolis_table_is_the_exp_test(r53, a):
    """The Metropolis decision without exp (integer bounds per 1/16 of ΔH/T) equals u < exp(-ΔH/T) exactly."""
    _check_below_exp(r53, a)


def test_metropolis_table_at_its_edges():
    """The adversarial inputs: u at and next to exp(-a), at both ends of every table band, a on the grid k/16,
    just below it, at the table's end and beyond, and a = inf; plus a dense random sweep."""
    rng = np.random.default_rng(0)
    two53 = 2.0 ** 53
    a_vals = [np.nextafter(k / 16.0, 0.0) for k in range(1, 520)] + [k / 16.0 for k in range(1, 520)]
    a_vals += [1e-300, 5e-324, 31.99, 32.0, 35.0, 700.0, 745.2, 800.0, np.inf]
    for a in a_vals:
        k = min(int(a * 16.0), K._EXP_N) if np.isfinite(a) else K._EXP_N
        lo, w = int(K._EXP_LO[k]), int(K._EXP_WIDTH[k])
        p = int(np.exp(-a) * two53) if np.isfinite(a) else 0
        for r in (lo - 1, lo, lo + w - 1, lo + w, p - 1, p, p + 1, 0, 2 ** 53 - 1):
            if 0 <= r < 2 ** 53:
                _check_below_exp(r, a)
    r = rng.integers(0, 2 ** 53, 200000, dtype=np.uint64)
    a = rng.exponential(3.0, r.size)
    fast, plain = _below_exp_many(r, a)
    assert np.array_equal(fast, plain)
    assert 0.05 < fast.mean() < 0.95  # both outcomes occur


@njit(cache=True)
def _below_exp_many(r, a):
    fast = np.empty(r.size, np.bool_)
    plain = np.empty(r.size, np.bool_)
    for i in range(r.size):
        fast[i], plain[i] = _below_exp_pair(r[i], a[i])
    return fast, plain


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**31 - 1), st.sampled_from(["classic", "boundary"]), st.booleans())
def test_narrow_ids_give_the_int32_trajectory(seed, proposal, periodic):
    """``narrow_ids`` (default): uint16 ids and uint8 types in the compiled loop, the same trajectory bit for
    bit as the int32 lattice (every analytic kind at once, both proposals, periodic or not); ``state`` stays
    int32."""
    rng = np.random.default_rng(seed)
    st0 = blob_state((int(rng.integers(8, 20)), int(rng.integers(8, 20))), int(rng.integers(2, 9)), seed=seed)
    terms = make_terms(rng, ["contact:3", "volume", "surface:2", "external", "dm_band"], st0.shape, periodic)
    ham = Hamiltonian(terms, LatticeSpec(st0.shape, periodic), float(rng.uniform(0.5, 3)))
    wide = ExactSampler(st0, ham, seed=seed, proposal=proposal, narrow_ids=False)
    narrow = ExactSampler(st0, ham, seed=seed, proposal=proposal)
    assert wide.ids.dtype == np.int32 and narrow.ids.dtype == np.uint16 and narrow._types.dtype == np.uint8
    for _ in range(3):
        wide.step(1.5)
        narrow.step(1.5)
        np.testing.assert_array_equal(wide.ids, narrow.ids)
        np.testing.assert_array_equal(wide.volumes, narrow.volumes)
        assert wide.stats() == narrow.stats()
    assert narrow.stats()["accepted"] > 0
    out = narrow.state
    assert out.ids.dtype == np.int32 and out.types.dtype == np.int32 and out == wide.state
    x = int(rng.integers(narrow.n_sites))
    assert narrow.delta(x, int(out.ids.max())) == wide.delta(x, int(out.ids.max()))


def test_narrow_lattice_only_where_the_values_fit():
    from neuralcpm_plugin.sampling.exact import narrow_lattice
    ids = np.array([0, 3, 65535], np.int32)
    a, t = narrow_lattice(ids, np.zeros(65536, np.int32))
    assert a.dtype == np.uint16 and t.dtype == np.uint8 and a.tolist() == [0, 3, 65535]
    a, t = narrow_lattice(ids, np.zeros(65537, np.int32))  # 65,537 ids: id 65,536 would not fit
    assert a.dtype == np.int32
    a, t = narrow_lattice(ids, np.array([0, 255, 256], np.int32))
    assert a.dtype == np.uint16 and t.dtype == np.int32
    # callback (Python) terms see the live lattice: it stays int32 for them
    st0 = blob_state((10, 10), 3)
    ham = cellsort_ham(st0.shape)
    mixed = Hamiltonian([_WrappedTerm(ham.terms[0]), ham.terms[1]], ham.lattice, 1.0)
    assert ExactSampler(st0, mixed, seed=1).ids.dtype == np.int32


@njit(cache=True)
def _slow_neighbours(shape, offs, periodic, n):
    """Every site's neighbours by the kernels' slow path (coordinates + per-axis wrap)."""
    out = np.empty((n, offs.shape[0]), np.int64)
    for x in range(n):
        c = K.coords_of(x, shape)
        for j in range(offs.shape[0]):
            out[x, j] = K.nbr_slow(c, offs, j, shape, periodic)
    return out


_SHAPES = st.one_of(st.tuples(st.integers(1, 7), st.integers(1, 7)),
                    st.tuples(st.integers(1, 4), st.integers(1, 4), st.integers(1, 4)))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_SHAPES, st.booleans(), st.integers(1, 4))
def test_slow_neighbour_path_equals_the_table(shape, periodic, order):
    """The kernels' slow neighbour path (one period added or taken off, ``%`` only where an offset is longer
    than the lattice) gives the reference table's neighbours, tiny lattices included."""
    from neuralcpm_plugin.lattice import neighbour_offsets
    offs = np.ascontiguousarray(neighbour_offsets(order, len(shape)))
    tab, _ = neighbour_table(shape, order, periodic)
    got = _slow_neighbours(tuple(shape), offs, periodic, int(np.prod(shape)))
    assert np.array_equal(got, tab.astype(np.int64))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_SHAPES, st.booleans(), st.integers(1, 3), st.integers(0, 2 ** 31 - 1), st.integers(2, 5))
def test_boundary_counts_equal_a_recount_after_random_runs(shape, periodic, order, seed, n_ids):
    """After a long boundary-proposal run on a random lattice (2-D or 3-D, tiny ones included, any copy
    order), the incrementally kept unlike-neighbour counts equal a recount from scratch, and the volumes the
    lattice's; the sampler never hangs, also once one id fills the lattice (an empty boundary set)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, n_ids, size=shape).astype(np.int32)
    types = np.array([0] + [1 + i % 2 for i in range(1, n_ids)], np.int32)
    J = [[0.0, 1.0, 1.2], [1.0, 0.5, 1.5], [1.2, 1.5, 0.4]]
    terms = [({"kind": "contact", "scale": 1.0, "params": {"J": J, "order": 2}}, {}),
             ({"kind": "volume", "scale": 1.0, "params": {"lambda": [0.0, 0.3, 0.3], "target": [0.0, 6.0, 6.0]}}, {})]
    s = ExactSampler(CellState(ids, types), None, seed=seed, terms=terms, temperature=2.0, periodic=periodic,
                     copy_order=order, proposal="boundary")
    nb, _ = neighbour_table(shape, order, periodic)
    for _ in range(3):
        s.attempts(400 * ids.size)
        flat = s.ids.ravel()
        unlike = ((nb >= 0) & (flat[np.maximum(nb, 0)] != flat[:, None])).sum(1)
        assert np.array_equal(s._B[0], unlike)
        assert np.array_equal(s.volumes, np.bincount(flat, minlength=len(types)))
    assert s.stats()["attempts"] == 3 * 400 * ids.size


def test_boundary_proposal_stops_proposing_once_one_id_fills_the_lattice():
    """The medium may vanish (cells may not): a volume term that wants the one cell to fill the lattice
    empties the boundary set; the remaining attempts are counted and propose nothing."""
    ids = np.zeros((6, 7), np.int32)
    ids[2:4, 2:5] = 1
    terms = [({"kind": "volume", "scale": 1.0, "params": {"lambda": [0.0, 1.0], "target": [0.0, 42.0]}}, {})]
    s = ExactSampler(CellState(ids, np.array([0, 1], np.int32)), None, seed=3, terms=terms, temperature=1.0,
                     proposal="boundary")
    s.attempts(20_000)
    assert (s.ids == 1).all() and not s._B[0].any()
    cand = s.stats()["candidates"]
    s.attempts(1000)
    assert s.stats()["attempts"] == 21_000 and s.stats()["candidates"] == cand
