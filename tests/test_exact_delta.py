"""Property tests: the exact sampler's *compiled* single-attempt ΔH equals H(after) − H(before).

For every analytic kind (contact of orders 1..6 and 8, volume, external, surface, directed motion, and sums
with scales), on random states and random copy attempts, the numba ΔH is compared with

* the full energy difference by a tiny independent numpy energy written here (contact, volume, external,
  surface), and by the terms' own torch ``energy`` (all but directed motion, which has no energy);
* the term's ``delta_np`` (all kinds, including directed motion, whose ΔH is defined per attempt).

It is also checked after the sampler has run, so the incrementally kept volumes, surfaces and centre sums
are exercised, not just the freshly initialised ones.
"""

from __future__ import annotations

import numpy as np
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
from neuralcpm_plugin.hamiltonian.base import Batch, Hamiltonian, LatticeSpec
from neuralcpm_plugin.lattice import CellState, _shift, half_offsets, neighbour_offsets
from neuralcpm_plugin.sampling import _kernels as K
from neuralcpm_plugin.sampling.exact import ExactSampler, compiled_delta

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ----------------------------------------------------------------------------------------------------------
# an independent numpy energy (per unordered pair, counted once)
# ----------------------------------------------------------------------------------------------------------
def np_energy(ids, types, terms, periodic):
    e = 0.0
    tmap = types[ids]
    vols = np.bincount(ids.ravel(), minlength=len(types))
    for t in terms:
        sp = t.spec()
        sc = sp["scale"]
        p = sp["params"]
        if sp["kind"] == "contact":
            J = np.asarray(p["J"])
            for off in half_offsets(p["order"], ids.ndim):
                nb = _shift(ids, off, periodic, fill=-1)
                ok = (nb >= 0) & (nb != ids)
                e += sc * J[tmap[ok], types[nb[ok]]].sum()
        elif sp["kind"] == "volume":
            lam, tgt = np.asarray(p["lambda"]), np.asarray(p["target"])
            for c in range(1, len(types)):
                if vols[c] > 0:
                    e += sc * lam[types[c]] * (vols[c] - tgt[types[c]]) ** 2
        elif sp["kind"] == "external":
            mu = np.asarray(p["mu"]).copy()
            mu[0] = 0.0
            e += sc * (mu[tmap] * t.tensors()["field"].numpy()).sum()
        elif sp["kind"] == "surface":
            lam, tgt = np.asarray(p["lambda"]), np.asarray(p["target"])
            S = np.zeros(len(types))
            for off in neighbour_offsets(p["order"], ids.ndim):
                nb = _shift(ids, off, periodic, fill=-1)
                ok = (nb >= 0) & (nb != ids)
                np.add.at(S, ids[ok], 1)
            for c in range(1, len(types)):
                if vols[c] > 0:
                    e += sc * lam[types[c]] * (S[c] - tgt[types[c]]) ** 2
        else:
            raise AssertionError(sp["kind"])
    return e


@st.composite
def lattice_case(draw, min_size=5, max_size=9):
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    shape = (draw(st.integers(min_size, max_size)), draw(st.integers(min_size, max_size)))
    n_cells = draw(st.integers(1, 6))
    periodic = draw(st.booleans())
    if draw(st.booleans()):  # contiguous runs: realistic shapes
        ids = np.sort(rng.integers(0, n_cells + 1, int(np.prod(shape)))).reshape(shape)
        ids = np.roll(ids, (int(rng.integers(shape[0])), int(rng.integers(shape[1]))), (0, 1))
    else:
        ids = rng.integers(0, n_cells + 1, shape)
    types = np.concatenate([[0], rng.integers(1, 3, n_cells)]).astype(np.int32)
    return rng, CellState(ids.astype(np.int32), types), periodic


def random_attempts(rng, state, n=12):
    """Copy attempts (site, new_id) that are neither no-ops nor deletions; new_id any id present."""
    vols = np.bincount(state.ids.ravel(), minlength=state.n_ids)
    present = np.nonzero(vols)[0]
    out = []
    for _ in range(n * 4):
        site = tuple(int(rng.integers(s)) for s in state.shape)
        old = int(state.ids[site])
        new = int(rng.choice(present))
        if new == old or (old != 0 and vols[old] <= 1):
            continue
        out.append((site, new))
        if len(out) == n:
            break
    return out


def rand_J(rng, n=3):
    J = rng.normal(size=(n, n))
    J = (J + J.T) / 2
    J[0, 0] = 0.0
    return J


def make_terms(rng, kinds, shape, periodic):
    terms = []
    for k in kinds:
        sc = float(rng.uniform(0.3, 2.0))
        if k.startswith("contact"):
            order = int(k.split(":")[1]) if ":" in k else 2
            terms.append(ContactEnergy(rand_J(rng), order, scale=sc, periodic=periodic))
        elif k == "volume":
            terms.append(VolumeConstraint(rng.uniform(0.1, 1, 3), rng.uniform(2, 20, 3), scale=sc, periodic=periodic))
        elif k == "external":
            terms.append(ExternalPotential(rng.normal(size=3), rng.normal(size=shape), scale=sc, periodic=periodic))
        elif k.startswith("surface"):
            order = int(k.split(":")[1]) if ":" in k else 1
            terms.append(SurfaceConstraint(rng.uniform(0.1, 1, 3), rng.uniform(2, 20, 3), order, scale=sc,
                                           periodic=periodic))
        elif k == "dm_const":
            terms.append(DirectedMotion(rng.uniform(0.1, 1, 3), [None, {"mode": "constant", "vector": [1.0, -0.5]},
                                                                   {"mode": "constant", "vector": [0.0, 2.0]}],
                                        scale=sc, periodic=periodic))
        elif k == "dm_band":
            terms.append(DirectedMotion(rng.uniform(0.1, 1, 3),
                                        [None, {"mode": "band", "axis": 1, "lo": 0.3, "hi": 0.7, "sense": "inward"},
                                         {"mode": "band", "axis": 0, "lo": 0.2, "hi": 0.6, "sense": "outward"}],
                                        scale=sc, periodic=periodic))
    return terms


def torch_energy(terms, state, periodic):
    b = Batch.from_states([state], periodic=periodic)
    return float(sum(t.energy(b).detach() for t in terms))


def check_case(rng, state, periodic, kinds, *, with_energy=True, with_torch=True, steps=0):
    terms = make_terms(rng, kinds, state.shape, periodic)
    ham = Hamiltonian(terms, LatticeSpec(state.shape, periodic), 1.0)
    sampler = ExactSampler(state, ham, seed=int(rng.integers(1 << 30)))
    if steps:
        sampler.step(steps)  # exercise the incremental bookkeeping
    cur = sampler.state
    for site, new in random_attempts(rng, cur):
        d_comp = sampler.delta(site, new)
        ref = sum(t.delta_np(cur, site, new, {"periodic": periodic}) for t in terms)
        assert np.isclose(d_comp, ref, rtol=1e-9, atol=1e-9), (kinds, site, new, d_comp, ref)
        if with_energy:
            after = cur.copy()
            after.ids[site] = new
            e0 = np_energy(cur.ids, cur.types, terms, periodic)
            e1 = np_energy(after.ids, after.types, terms, periodic)
            assert np.isclose(d_comp, e1 - e0, rtol=1e-9, atol=1e-9), (kinds, site, new, d_comp, e1 - e0)
            if with_torch:
                t0 = torch_energy(terms, cur, periodic)
                t1 = torch_energy(terms, after, periodic)
                assert np.isclose(d_comp, t1 - t0, rtol=1e-9, atol=1e-9), (kinds, d_comp, t1 - t0)


@SETTINGS
@given(lattice_case(), st.sampled_from([1, 2, 3, 4, 5, 6, 8]))
def test_contact_delta_every_order(case, order):
    rng, state, periodic = case
    if order == 8 and min(state.shape) < 7:
        return
    check_case(rng, state, periodic, [f"contact:{order}"])


@SETTINGS
@given(lattice_case(), st.sampled_from(["volume", "external", "surface:1", "surface:2"]))
def test_single_kind_delta(case, kind):
    rng, state, periodic = case
    check_case(rng, state, periodic, [kind])


@SETTINGS
@given(lattice_case(), st.sampled_from(["dm_const", "dm_band"]))
def test_directed_motion_delta(case, kind):
    rng, state, periodic = case
    check_case(rng, state, periodic, [kind, "volume"], with_energy=False)


@SETTINGS
@given(lattice_case())
def test_sum_of_terms_delta(case):
    rng, state, periodic = case
    check_case(rng, state, periodic, ["contact:2", "contact:1", "volume", "external", "surface:1"])


@SETTINGS
@given(lattice_case(min_size=6, max_size=10), st.sampled_from(["contact", "surface", "dm_const", "dm_band"]))
def test_delta_after_sampling(case, which):
    """After 3 MCS of sampling the incrementally kept per-cell state still gives exact ΔH."""
    rng, state, periodic = case
    kinds = {"contact": ["contact:2", "volume", "external"], "surface": ["contact:1", "surface:2", "volume"],
             "dm_const": ["contact:2", "volume", "dm_const"], "dm_band": ["contact:2", "volume", "dm_band"]}[which]
    check_case(rng, state, periodic, kinds, with_energy=which in ("contact", "surface"), with_torch=False, steps=3)


@SETTINGS
@given(lattice_case(min_size=2, max_size=4), st.sampled_from([1, 2, 6]))
def test_tiny_lattices_match_delta_np(case, order):
    """On lattices smaller than the stencil (wrapping onto duplicates or the site itself) the compiled ΔH
    still equals the terms' numpy ΔH."""
    rng, state, periodic = case
    check_case(rng, state, periodic, [f"contact:{order}", "volume", "surface:1"], with_energy=False)


def test_compiled_delta_function_low_level():
    """``compiled_delta`` with raw (spec, tensors) terms and a hand-computed value."""
    ids = np.zeros((5, 5), np.int32)
    ids[1:3, 1:3] = 1
    st_ = CellState(ids, np.array([0, 1]))
    J = [[0.0, 2.0], [2.0, 0.0]]
    terms = [({"kind": "contact", "scale": 1.0, "params": {"J": J, "order": 1}}, {}),
             ({"kind": "volume", "scale": 1.0, "params": {"lambda": [0, 1.0], "target": [0, 4.0]}}, {})]
    # copy cell 1 into (0, 1): the site gains 1 unlike neighbour pair inside... by hand:
    # site (0,1): neighbours (4,1)=0, (0,0)=0, (0,2)=0, (1,1)=1 → before: 1 unlike pair (with cell 1): +2
    # after (site = 1): 3 unlike pairs with medium: 6 → contact ΔH = 6 - 2 = 4; volume 4 → 5: +1
    assert compiled_delta(st_, site=(0, 1), new_id=1, terms=terms, periodic=True) == 5.0
    # medium into (1,1) (a corner of the 2x2 cell): contact 2 unlike before (up, left) → 2 after (down, right)
    # ΔH contact = 0·... : before 2 pairs ×2 = 4, after 2 pairs ×2 = 4 → 0; volume 4 → 3: +1
    assert compiled_delta(st_, site=(1, 1), new_id=0, terms=terms, periodic=True) == 1.0


def test_rng_is_uniform_and_seeded():
    a = K.rng_uniform_many(K.seed_state(7), 200000)
    b = K.rng_uniform_many(K.seed_state(7), 10)
    c = K.rng_uniform_many(K.seed_state(8), 10)
    assert np.array_equal(a[:10], b) and not np.array_equal(b, c)
    assert 0.0 <= a.min() and a.max() < 1.0
    assert abs(a.mean() - 0.5) < 0.005 and abs(a.var() - 1 / 12) < 0.002
    k = K.rng_below_many(K.seed_state(3), 80000, 8)
    counts = np.bincount(k, minlength=8)
    assert counts.min() > 9500 and counts.max() < 10500 and k.max() == 7


def test_torch_energy_available_for_all_but_dm():
    """Sanity of the test itself: the torch and numpy energies of this file agree on a random state."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 4, (6, 7)).astype(np.int32)
    state = CellState(ids, np.array([0, 1, 2, 1]))
    terms = make_terms(rng, ["contact:2", "volume", "external", "surface:1"], state.shape, True)
    assert np.isclose(np_energy(state.ids, state.types, terms, True), torch_energy(terms, state, True))
    assert torch.isfinite(torch.tensor(torch_energy(terms, state, True)))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**31 - 1), st.booleans(), st.sampled_from([1, 2, 3]))
def test_three_dimensional_lattices(seed, periodic, order):
    """The kernels are dimension-agnostic: 3-D contact (orders 1–3), volume, surface and external ΔH are exact
    too. (The term kinds are test_three_d's cache test's, so the two share their compiled kernels.)"""
    rng = np.random.default_rng(seed)
    shape = tuple(int(v) for v in rng.integers(5, 7, 3))
    ids = np.sort(rng.integers(0, 5, int(np.prod(shape)))).reshape(shape)
    state = CellState(ids.astype(np.int32), np.array([0, 1, 2, 1, 2], np.int32))
    terms = [ContactEnergy(rand_J(rng), order, periodic=periodic),
             VolumeConstraint(rng.uniform(0.1, 1, 3), rng.uniform(5, 30, 3), periodic=periodic),
             SurfaceConstraint(rng.uniform(0.01, 0.1, 3), rng.uniform(5, 30, 3), 1, periodic=periodic),
             ExternalPotential(rng.normal(size=3), rng.normal(size=shape), periodic=periodic)]
    ham = Hamiltonian(terms, LatticeSpec(shape, periodic), 1.0)
    sampler = ExactSampler(state, ham, seed=seed)
    sampler.step(1)
    cur = sampler.state
    for site, new in random_attempts(rng, cur, 8):
        d = sampler.delta(site, new)
        after = cur.copy()
        after.ids[site] = new
        e = np_energy(after.ids, after.types, terms, periodic) - np_energy(cur.ids, cur.types, terms, periodic)
        assert np.isclose(d, e, rtol=1e-9, atol=1e-9)


def test_contact_sums_exact_flag():
    """J tables whose entries share a coarse binary grid (k/8, k/16) sum exactly in any order; entries on a
    fine grid (0.1, 1.3: their doubles need 2⁻⁵⁵), a huge range or a non-finite entry do not."""
    from neuralcpm_plugin.sampling.exact import contact_sums_exact
    assert contact_sums_exact(np.array([[[0.0, 0.625, 0.25, 0.0], [0.625, 0.25, 1.125, 0.0]]]))
    assert contact_sums_exact(np.full((3, 2, 3), -7.5))
    assert not contact_sums_exact(np.array([[[0.1, 1.3]]]))
    assert contact_sums_exact(np.array([[[0.0, 0.1]]]))  # 0.1 alone: its own grid, sums of 2 exact
    assert not contact_sums_exact(np.array([[[2.0 ** 50, 2.0 ** -4]]]))
    assert not contact_sums_exact(np.array([[[np.inf, 1.0]]]))


@SETTINGS
@given(st.integers(0, 2**31 - 1), st.booleans(), st.sampled_from([(2,), (1, 2), (2, 3), (3,)]))
def test_exact_contact_sums_in_pairs_equal_the_sequential_sum(seed, periodic, orders):
    """With dyadic J (``contact_sums_exact``) the kernel adds the per-neighbour contact terms in two
    accumulators; its ΔH equals the sequential sum's (the kernel with the flag removed) bit for bit, on every
    site (fast and frame) and candidate, for one table or one per neighbour column (several orders)."""
    rng = np.random.default_rng(seed)
    shape = (int(rng.integers(9, 14)), int(rng.integers(9, 14)))
    ids = rng.integers(0, 6, shape)
    state = CellState(ids.astype(np.int32), np.array([0, 1, 2, 1, 2, 2], np.int32))
    terms = []
    for o in orders:
        J = rng.integers(-24, 40, (3, 3)) / 16.0
        terms.append(ContactEnergy((J + J.T) / 2, o, periodic=periodic))
    terms.append(VolumeConstraint(rng.uniform(0.1, 1, 3), rng.uniform(5, 30, 3), periodic=periodic))
    ham = Hamiltonian(terms, LatticeSpec(shape, periodic), 1.0)
    s = ExactSampler(state, ham, seed=seed)
    C = s.pack.P[0]
    assert C[4] is not None and (C[3] is None) == (len(orders) == 1)
    P_seq = ((*C[:4], None), *s.pack.P[1:])
    for site in range(s.n_sites):
        for new in (0, 1, 3, 5):
            a = K.delta_analytic(site, new, s._ids, s._types, s._vol, s._G, s.pack.P, s._A)
            b = K.delta_analytic(site, new, s._ids, s._types, s._vol, s._G, P_seq, s._A)
            assert a == b, (site, new, a, b)
