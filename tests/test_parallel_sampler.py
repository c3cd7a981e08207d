"""The paper's parallel sampler (Algorithm 2): invariants, torus correctness, acceptance statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from neuralcpm_plugin.errors import ConfigError
from neuralcpm_plugin.hamiltonian.analytic import ContactEnergy, ExternalPotential, VolumeConstraint
from neuralcpm_plugin.hamiltonian.base import Batch, Hamiltonian, LatticeSpec
from neuralcpm_plugin.lattice import CellState, boundary_mask, neighbour_offsets
from neuralcpm_plugin.sampling.parallel import ParallelSampler

J = np.array([[0, 1.0, 1.5], [1.0, 0.4, 1.2], [1.5, 1.2, 0.3]])


def _ham(shape, periodic=True, lam=0.3, target=12.0, T=1.0, copy_order=2):
    lat = LatticeSpec(shape, periodic=periodic, copy_order=copy_order)
    return Hamiltonian([ContactEnergy(J, 2), VolumeConstraint([0, lam, lam], [0, target, target])], lat, T,
                       ["medium", "a", "b"])


def _torus_state():
    H, W = 12, 12
    ids = np.zeros((H, W), np.int32)
    for y in (10, 11, 0, 1):          # cell 1 straddles both wraps (the four corners)
        for x in (10, 11, 0, 1):
            ids[y, x] = 1
    ids[4:8, 3:6] = 2
    ids[4:7, 7:10] = 3
    ids[0:2, 5:7] = 4                 # touches the top edge, wraps to the bottom row's neighbours
    return CellState(ids, np.array([0, 1, 2, 1, 2], np.int32))


def _check_invariants(batch, n_cells_before):
    vols = batch.volumes.clone()
    batch.recount_volumes()
    assert torch.equal(vols, batch.volumes)
    assert int((batch.volumes[:, 1:n_cells_before] == 0).sum()) == 0


@pytest.mark.parametrize("periodic", [True, False])
def test_torch_step_invariants_and_proposals(periodic):
    s = _torus_state()
    ham = _ham(s.shape, periodic)
    batch = Batch.from_states([s, s, s], periodic=periodic)
    smp = ParallelSampler(ham, n_flips=7, backend="torch")
    smp.record = True
    g = torch.Generator().manual_seed(1)
    offs = neighbour_offsets(2)
    H, W = s.shape
    wrapped = 0
    for _ in range(40):
        before = batch.ids.clone()
        smp.step(batch, g)
        last = smp.last
        for b in range(batch.B):
            ids_b = before[b].numpy()
            bmask = boundary_mask(ids_b, 2, periodic).ravel()
            sites = last["sites"][b][last["valid"][b]].numpy()
            assert len(set(sites.tolist())) == len(sites)                 # distinct
            assert bmask[sites].all()                                      # only boundary sites
            assert len(sites) == min(7, int(bmask.sum()))
            for k, x in enumerate(last["sites"][b].tolist()):
                if not bool(last["valid"][b, k]):
                    continue
                y0, x0 = divmod(x, W)
                new = int(last["new_ids"][b, k])
                assert new != ids_b[y0, x0]
                cands = []
                for dy, dx in offs:
                    yy, xx = y0 + dy, x0 + dx
                    if not periodic and not (0 <= yy < H and 0 <= xx < W):
                        continue
                    cands.append(ids_b[yy % H, xx % W])
                    if (yy != yy % H or xx != xx % W) and ids_b[yy % H, xx % W] == new:
                        wrapped += 1
                assert new in cands                                        # a neighbour's cell
                if k < 2:  # ΔH used by the sampler equals the exact numpy ΔH (same state)
                    st = CellState(ids_b.astype(np.int32), s.types)
                    dn = ham.delta_np(st, (y0, x0), new, {"periodic": periodic})
                    assert float(last["delta"][b, k]) == pytest.approx(dn, abs=1e-9)
            after = batch.ids[b].numpy()
            changed = np.flatnonzero((after != ids_b).ravel())
            acc_sites = last["sites"][b][last["accepted"][b]].numpy()
            assert set(changed.tolist()) == set(acc_sites.tolist())
        assert torch.equal(smp._mask, smp.boundary_mask(batch))           # incremental == recount
        _check_invariants(batch, 5)
    if periodic:
        assert wrapped > 0   # proposals across the wrap were exercised


def test_numba_backend_invariants_on_torus():
    s = _torus_state()
    ham = _ham(s.shape, True)
    batch = Batch.from_states([s] * 4)
    smp = ParallelSampler(ham, n_flips=6)
    assert smp._use_numba(batch)
    g = torch.Generator().manual_seed(3)
    st = smp.sweep(batch, 5.0, g)
    assert st["steps"] == round(5.0 * 144 / 6) and st["attempts"] > 0
    _check_invariants(batch, 5)
    bset, _bpos, bcount = smp._nb
    fresh = smp.boundary_mask(batch).numpy()
    for b in range(batch.B):
        got = np.zeros(144, bool)
        got[bset[b, : bcount[b]]] = True
        assert np.array_equal(got, fresh[b])


@pytest.mark.parametrize("backend", ["torch", "numba", "compiled"])
def test_no_cell_is_deleted(backend):
    """Volume target 0 pushes every cell to vanish; the sampler must refuse every deletion."""
    rng = np.random.default_rng(0)
    ids = np.zeros((10, 10), np.int32)
    ids[0:2, 0:2] = 21
    free = np.flatnonzero(ids.ravel() == 0)
    ids.ravel()[rng.choice(free, 20, replace=False)] = np.arange(1, 21)
    s = CellState(ids, np.concatenate([[0], rng.integers(1, 3, 21)]).astype(np.int32))
    ham = _ham(s.shape, lam=5.0, target=0.0)
    batch = Batch.from_states([s, s])
    smp = ParallelSampler(ham, n_flips=30, backend=backend)
    st = smp.sweep(batch, 3.0, torch.Generator().manual_seed(0))
    assert st["refused_deletions"] > 0
    _check_invariants(batch, 22)
    assert int(batch.volumes[:, 1:].min()) >= 1


def _toy(c=1.0):
    """5x5 torus, medium + one cell of two adjacent sites; external potential μ(1)·φ with φ ≡ 1."""
    ids = np.zeros((5, 5), np.int32)
    ids[2, 2] = ids[2, 3] = 1
    s = CellState(ids, np.array([0, 1], np.int32))
    lat = LatticeSpec((5, 5))
    return s, lat, [ExternalPotential([0.0, c], np.ones((5, 5)))]


@pytest.mark.parametrize("backend", ["torch", "numba", "compiled"])
def test_acceptance_matches_analytic_toy(backend):
    """P = 1: the drawn site is uniform over the 12 boundary sites; a medium site receives the cell
    (ΔH = +c, accepted w.p. e^{-c/T}), a cell site receives medium (ΔH = −c, always accepted)."""
    c, T, B = 1.0, 2.0, 4000
    s, lat, terms = _toy(c)
    ham = Hamiltonian(terms, lat, T, ["medium", "a"])
    batch = Batch.from_states([s] * B)
    smp = ParallelSampler(ham, n_flips=1, backend=backend)
    smp.record = True
    st = smp.step(batch, torch.Generator().manual_seed(7))
    p_exp = (10 * math.exp(-c / T) + 2) / 12
    se = math.sqrt(p_exp * (1 - p_exp) / B)
    assert st["attempts"] == B
    assert abs(st["acceptance"] - p_exp) < 4 * se
    if backend == "torch":
        old = smp.last["old_ids"][:, 0]
        frac_cell = float((old == 1).double().mean())
        assert abs(frac_cell - 2 / 12) < 4 * math.sqrt(2 / 12 * 10 / 12 / B)
        acc_med = smp.last["accepted"][:, 0][old == 0].double().mean().item()
        assert abs(acc_med - math.exp(-c / T)) < 4 * math.sqrt(0.25 / int((old == 0).sum()))
        assert bool(smp.last["accepted"][:, 0][old == 1].all())


@pytest.mark.parametrize("backend", ["torch", "numba", "compiled"])
def test_all_boundary_sites_at_once_and_joint_deletion_guard(backend):
    """P ≥ boundary size: every boundary site is proposed once; the two removals that together would delete
    the cell are both refused; each of the 10 medium sites is accepted w.p. e^{-c/T}."""
    c, T, B = 1.0, 1.0, 400
    s, lat, terms = _toy(c)
    ham = Hamiltonian(terms, lat, T, ["medium", "a"])
    batch = Batch.from_states([s] * B)
    smp = ParallelSampler(ham, n_flips=50, backend=backend)
    st = smp.step(batch, torch.Generator().manual_seed(11))
    assert st["attempts"] == 12 * B
    assert st["refused_deletions"] == 2 * B
    assert bool((batch.ids.view(B, -1)[:, [12, 13]] == 1).all())
    gained = (batch.volumes[:, 1] - 2).double()
    p = math.exp(-c / T)
    assert abs(float(gained.mean()) - 10 * p) < 4 * math.sqrt(10 * p * (1 - p) / B)


@pytest.mark.parametrize("backend", ["torch", "numba", "compiled"])
def test_deterministic_given_seed(backend):
    s = _torus_state()
    ham = _ham(s.shape)
    outs = []
    for seed in (5, 5, 6):
        batch = Batch.from_states([s, s])
        ParallelSampler(ham, 8, backend=backend).sweep(batch, 2.0, torch.Generator().manual_seed(seed))
        outs.append(batch.ids.clone())
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])


def test_backends_agree_in_distribution():
    """Same state, one step, many chains: mean acceptance of the three back ends agrees."""
    s = _torus_state()
    ham = _ham(s.shape, T=2.0)
    rates = {}
    for backend in ("torch", "numba", "compiled"):
        batch = Batch.from_states([s] * 300)
        rates[backend] = ParallelSampler(ham, 10, backend=backend).step(batch, torch.Generator().manual_seed(2))
    a = rates["torch"]["acceptance"]
    n = rates["torch"]["attempts"]
    for other in ("numba", "compiled"):
        assert rates[other]["attempts"] == n
        assert abs(a - rates[other]["acceptance"]) < 5 * math.sqrt(2 * a * (1 - a) / n)


def test_cache_follows_external_changes():
    s = _torus_state()
    ham = _ham(s.shape)
    batch = Batch.from_states([s])
    smp = ParallelSampler(ham, 5, backend="torch")
    smp.record = True
    g = torch.Generator().manual_seed(0)
    smp.step(batch, g)
    batch.ids[0] = torch.zeros_like(batch.ids[0])   # in-place torch write: the sampler must notice
    batch.ids[0, 0:3, 0:3] = 1
    batch.recount_volumes()
    smp.step(batch, g)
    fresh = boundary_mask(batch.ids[0].numpy(), 2, True).ravel()
    sites = smp.last["sites"][0][smp.last["valid"][0]].numpy()
    assert len(sites) == 5 and fresh[sites].all()


def test_config_errors():
    from neuralcpm_plugin.hamiltonian.analytic import DirectedMotion
    s = _torus_state()
    lat = LatticeSpec(s.shape)
    ham = Hamiltonian([DirectedMotion([0, 1.0, 1.0], {"mode": "constant", "vector": [1.0, 0.0]})], lat, 1.0)
    with pytest.raises(ConfigError):
        ParallelSampler(ham, 5, backend="numba")
    with pytest.raises(ConfigError):
        ParallelSampler(ham, 0)
    smp = ParallelSampler(ham, 5)            # auto → torch for a non-conservative term
    assert not smp._use_numba(Batch.from_states([s]))
    st = smp.sweep(Batch.from_states([s]), 0.5, torch.Generator().manual_seed(0))
    assert st["steps"] == round(0.5 * 144 / 5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_step():
    s = _torus_state()
    ham = _ham(s.shape).to("cuda")
    batch = Batch.from_states([s] * 8, device="cuda")
    smp = ParallelSampler(ham, 6)
    st = smp.sweep(batch, 3.0, torch.Generator(device="cuda").manual_seed(0))
    assert st["attempts"] > 0
    _check_invariants(batch, 5)
    assert torch.equal(smp._mask, smp.boundary_mask(batch))


@pytest.mark.parametrize("n_true,N", [(400, 4000), (30, 60)])   # rejection path, exact top-k path
def test_draw_sites_uniform_without_replacement(n_true, N):
    from neuralcpm_plugin.sampling.parallel import _draw_sites
    B, P = 2000, 20
    g = torch.Generator().manual_seed(0)
    rows = torch.rand((1, N), generator=g).argsort(1)[0, :n_true]
    mask = torch.zeros((B, N), dtype=torch.bool)
    mask[:, rows] = True
    sites, valid = _draw_sites(mask, P, g)
    assert bool(valid.all()) and bool(mask.gather(1, sites).all())
    srt = sites.sort(1).values
    assert bool((srt[:, 1:] != srt[:, :-1]).all())                     # distinct within a chain
    counts = torch.bincount(sites.flatten(), minlength=N)[rows].double()
    expect = B * P / n_true
    chi2 = float(((counts - expect) ** 2 / expect).sum())
    dof = n_true - 1
    assert abs(chi2 - dof) < 5 * math.sqrt(2 * dof)


def test_numba_threads_match_serial():
    """Threaded chains give the same result as serial ones (per-chain random streams). Run in a subprocess:
    an OpenMP pool left behind in the test process would slow later torch work."""
    import subprocess
    import sys
    code = """
import torch, sys
sys.path.insert(0, {here!r})
from test_parallel_sampler import _torus_state, _ham
from neuralcpm_plugin.hamiltonian.base import Batch
from neuralcpm_plugin.sampling.parallel import ParallelSampler
s = _torus_state(); ham = _ham(s.shape); out = []
for threads in (False, True):
    batch = Batch.from_states([s] * 3)
    ParallelSampler(ham, 6, backend="numba", threads=threads).sweep(batch, 2.0, torch.Generator().manual_seed(4))
    out.append(batch.ids.clone())
print("SAME" if torch.equal(out[0], out[1]) else "DIFFERENT")
""".format(here=str(__import__("pathlib").Path(__file__).parent))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().endswith("SAME")


# --------------------------------------------------------------------------- the "compiled" back end
def _pooled_closure(shape=(24, 24), seed=0, directed=False, local=False):
    """Contact + volume (+ directed motion) + a pooled NH with enlarged weights (ΔH of order 0.1–1)
    (+ a local NH)."""
    from neuralcpm_plugin.hamiltonian.analytic import DirectedMotion
    from neuralcpm_plugin.hamiltonian.closure import closure_hamiltonian
    from neuralcpm_plugin.hamiltonian.pooled_nh import PooledNeuralHamiltonian
    t = PooledNeuralHamiltonian({"n_types": 2, "stride": 3, "channels": 5, "kernel": 3, "hidden": 8,
                                 "position_dim": 2, "lattice_shape": list(shape)}, seed=seed)
    with torch.no_grad():
        for name, p in t.named_parameters():
            if p.dim() > 1 and name.startswith(("features.", "mlp.")):
                p.mul_(3.0)
    terms = [ContactEnergy(J, 2), VolumeConstraint([0, 0.5, 0.5], [0, 30, 30])]
    if directed:
        terms.append(DirectedMotion([0, 1.0, 2.0], {"mode": "constant", "vector": [1.0, 0.0]}))
    groups = {"w_g": [t]}
    if local:
        from neuralcpm_plugin.hamiltonian.local_nh import LocalNeuralHamiltonian
        groups["w_l"] = [LocalNeuralHamiltonian({"n_types": 2, "stride": 3, "channels": 5, "kernel": 3}, seed=seed + 1)]
    return closure_hamiltonian(terms, groups, LatticeSpec(shape), 1.0, ["medium", "a", "b"], w_a=1.0,
                               weights={"w_l": 3.0} if local else None), t


def _voronoi(shape, n_cells, seed, medium=0.2):
    rng = np.random.default_rng(seed)
    H, W = shape
    pts = rng.integers(0, [H, W], size=(n_cells, 2))
    yy, xx = np.mgrid[:H, :W]
    best = np.full((H, W), np.inf)
    ids = np.zeros((H, W), np.int32)
    for k, (py, px) in enumerate(pts):
        d = (np.minimum(abs(yy - py), H - abs(yy - py)) ** 2 + np.minimum(abs(xx - px), W - abs(xx - px)) ** 2
             + rng.random((H, W)) * 0.5)
        m = d < best
        best[m] = d[m]
        ids[m] = k + 1
    ids[best > np.quantile(best, 1 - medium)] = 0
    return CellState(ids, np.concatenate([[0], rng.integers(1, 3, n_cells)]).astype(np.int32))


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 10_000), P=st.sampled_from([1, 7, 40, 500]), directed=st.booleans(), local=st.booleans())
def test_compiled_step_properties_with_a_pooled_closure(seed, P, directed, local):
    """Property (one step of the compiled back end on a pooled closure, with and without directed motion):
    at most min(P, boundary size) sites change, each to the id one of its copy neighbours had before the
    step, no cell is deleted, the volumes are the recount, and the compiled neural caches still equal a
    recomputation from the new lattice."""
    ham, _ = _pooled_closure(directed=directed, local=local)
    s = _voronoi((24, 24), 12, seed)
    batch = Batch.from_states([s, s])
    smp = ParallelSampler(ham, n_flips=P, backend="compiled")
    g = torch.Generator().manual_seed(seed)
    offs = neighbour_offsets(2)
    for _ in range(3):
        before = batch.ids.clone().numpy()
        st_ = smp.step(batch, g)
        assert st_["attempts"] <= 2 * P
        after = batch.ids.numpy()
        for b in range(2):
            nb_ = int(boundary_mask(before[b], 2, True).sum())
            changed = np.argwhere(after[b] != before[b])
            assert len(changed) <= min(P, nb_)
            for y, x in changed:
                neigh = {int(before[b][(y + dy) % 24, (x + dx) % 24]) for dy, dx in offs}
                assert int(after[b][y, x]) in neigh
        _check_invariants(batch, 13)
        for ex, _w in smp._nb[1]:
            assert ex.neural_cache_error() < 1e-8
            assert np.array_equal(ex._ids, batch.ids[smp._nb[1].index((ex, _w))].numpy().ravel())


@pytest.mark.parametrize("local", [False, True])
def test_compiled_and_torch_agree_in_distribution_with_a_pooled_closure(local):
    """The same pooled closure (with and without a local NH), the same start, 150 chains: one step's acceptance,
    and the mean energy after 20 steps, agree between the torch back end (batched exact ΔH) and the compiled one
    (within 5 s.e.)."""
    ham, _ = _pooled_closure(local=local)
    s = _voronoi((24, 24), 12, 5)
    res = {}
    for backend in ("torch", "compiled"):
        batch = Batch.from_states([s] * 150)
        smp = ParallelSampler(ham, n_flips=10, backend=backend)
        g = torch.Generator().manual_seed(3)
        first = smp.step(batch, g)
        smp._run(batch, 19, g)
        with torch.no_grad():
            e = ham.energy(batch).numpy()
        res[backend] = (first, e)
    a, b = res["torch"][0]["acceptance"], res["compiled"][0]["acceptance"]
    n = res["torch"][0]["attempts"]
    assert res["compiled"][0]["attempts"] == n == 1500
    assert abs(a - b) < 5 * math.sqrt(2 * a * (1 - a) / n)
    ea, eb = res["torch"][1], res["compiled"][1]
    se = math.sqrt(ea.var() / len(ea) + eb.var() / len(eb))
    assert abs(ea.mean() - eb.mean()) < 5 * se
    e0 = float(ham.energy(Batch.from_states([s])).detach())
    assert ea.mean() < e0 - 5 * se and eb.mean() < e0 - 5 * se   # both moved the state (downhill on average)


def test_compiled_directed_motion_agrees_with_torch():
    """Directed motion (no energy, ΔH only) with contact and volume: one step's acceptance over 300 chains."""
    from neuralcpm_plugin.hamiltonian.analytic import DirectedMotion
    s = _torus_state()
    lat = LatticeSpec(s.shape)
    ham = Hamiltonian([ContactEnergy(J, 2), VolumeConstraint([0, 0.3, 0.3], [0, 12, 12]),
                       DirectedMotion([0, 1.5, 0.5], {"mode": "constant", "vector": [1.0, 0.0]})], lat, 1.0)
    rates = {}
    for backend in ("torch", "compiled"):
        batch = Batch.from_states([s] * 300)
        rates[backend] = ParallelSampler(ham, 10, backend=backend).step(batch, torch.Generator().manual_seed(4))
    a, b, n = rates["torch"]["acceptance"], rates["compiled"]["acceptance"], rates["torch"]["attempts"]
    assert rates["compiled"]["attempts"] == n
    assert abs(a - b) < 5 * math.sqrt(2 * a * (1 - a) / n)


def test_compiled_backend_selection_and_cache():
    """auto picks "compiled" only with compiled_neural=True; the compiled state is kept between calls and
    rebuilt after an in-place parameter change or an outside write to the batch."""
    ham, t = _pooled_closure()
    s = _voronoi((24, 24), 12, 1)
    batch = Batch.from_states([s])
    assert not ParallelSampler(ham, 5)._use_compiled(batch)
    smp = ParallelSampler(ham, 5, compiled_neural=True)
    assert smp.compiled_capable() and smp._use_compiled(batch)
    g = torch.Generator().manual_seed(0)
    smp.step(batch, g)
    first = smp._nb[1][0][0]
    smp.step(batch, g)
    assert smp._nb[1][0][0] is first                       # reused
    with torch.no_grad():
        t.mlp[0].weight.mul_(1.5)
    smp.step(batch, g)
    second = smp._nb[1][0][0]
    assert second is not first                             # parameters changed: rebuilt
    assert second.neural_cache_error() < 1e-8
    batch.ids[0, :4, :4] = 1
    batch.recount_volumes()
    smp.step(batch, g)
    assert smp._nb[1][0][0] is not second                  # the batch changed outside: rebuilt
    # an analytic Hamiltonian stays on numba under auto; a term with no compiled form is refused
    assert ParallelSampler(_ham(s.shape), 5, compiled_neural=True)._use_numba(batch)

    class Odd(ContactEnergy):
        kind = "odd"
        analytic = False
    odd = Hamiltonian([Odd(J, 2)], LatticeSpec(s.shape), 1.0)
    with pytest.raises(ConfigError, match="compiled"):
        ParallelSampler(odd, 5, backend="compiled")
    assert not ParallelSampler(odd, 5, compiled_neural=True)._use_compiled(batch)
