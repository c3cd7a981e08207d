"""Local NH at tissue scale: memory that does not grow with the number of cells, per-patch labels that give the
same energy as lattice-wide ones, and a pseudo-likelihood that uses the local ΔH (not a whole lattice per
proposal) with the same value and gradient."""

from __future__ import annotations

import copy
import tracemalloc

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_neural_local import rand_state
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from neuralcpm_plugin.hamiltonian import Batch
from neuralcpm_plugin.hamiltonian import _local_nh_numba as NB
from neuralcpm_plugin.hamiltonian.local_nh import LocalNeuralHamiltonian, _patch_labels_np
from neuralcpm_plugin.lattice import CellState
from training import pseudolikelihood as PL
from training.config import DEFAULTS, load_config
from training.fit import build_model


class _TensorBytes(TorchDispatchMode):
    """Records the largest tensor and the total bytes of the tensors produced by every torch op."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                n = t.numel() * t.element_size()
                self.largest = max(self.largest, n)
                self.total += n
        return out


def _two_tissues():
    """The same 96×96 lattice tiled by 16 and by ~900 cells (~10 sites each)."""
    rng = np.random.default_rng(0)
    few, many = rand_state((96, 96), 16, rng), rand_state((96, 96), 900, rng)
    assert len(np.unique(many.ids)) > 40 * len(np.unique(few.ids))
    return few, many


def test_memory_does_not_grow_with_the_number_of_cells():
    """Before the per-patch labels the (patch, cell) slot tables were patches × cells: 20× the numpy peak and
    12× the largest torch tensor for 900 cells instead of 16 on this lattice (10,001 cells on 1000²: 40 GB).
    Now the tables are patches × (cells in one patch ≤ s²): the lattice's size, whatever the cell count."""
    few, many = _two_tissues()
    t = LocalNeuralHamiltonian({"n_types": 2}, seed=0)
    ev = t.numpy_evaluator()
    peaks, largest, total = [], [], []
    for s in (few, many):
        tracemalloc.start()
        ev.energy(s.ids, s.types)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        with _TensorBytes() as m:  # the PCD path: energy of a batch and its gradient
            t.energy(Batch.from_states([s, s])).sum().backward()
        largest.append(m.largest)
        total.append(m.total)
    assert peaks[1] < 2.5 * peaks[0], peaks
    assert largest[1] <= 1.5 * largest[0], largest
    assert total[1] < 2.5 * total[0], total
    # the compiled sampler's cache is sized by the lattice only
    W = NB.weights_from_numpy(ev)
    sizes = []
    for s in (few, many):
        S = NB.new_state(W, s.ids.shape)
        NB.full_init(s.ids.reshape(-1).astype(np.int64), np.asarray(s.types, np.int64), W, S)
        sizes.append(sum(a.nbytes for a in S))
    assert sizes[0] == sizes[1]


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 100_000), s=st.sampled_from([2, 3, 4]), n_ids=st.integers(1, 40))
def test_patch_labels_rank_ids_inside_each_patch(seed, s, n_ids):
    """Property: the label of a site is the rank of its id among the distinct ids of its own patch."""
    rng = np.random.default_rng(seed)
    pat = rng.integers(0, n_ids, size=(7, s * s)) * 1000 + 5  # arbitrary, sparse id values
    lab, nc = _patch_labels_np(pat)
    for g in range(pat.shape[0]):
        distinct = np.unique(pat[g])
        np.testing.assert_array_equal(lab[g], np.searchsorted(distinct, pat[g]))
    assert nc == max(len(np.unique(p)) for p in pat) <= s * s


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 100_000), cells=st.integers(2, 200))
def test_energy_unchanged_by_relabelling_ids(seed, cells):
    """Property: the energy (torch batch and numpy) does not depend on the id values (large, sparse ids: a
    cell's id enters only through its per-patch rank)."""
    rng = np.random.default_rng(seed)
    s0 = rand_state((36, 40), cells, rng)
    n = len(s0.types)
    perm = np.concatenate([[0], 1 + rng.permutation(n - 1)])
    spread = perm * 37  # ids up to 37·cells, most of them absent
    types = np.zeros(spread.max() + 1, np.int64)
    types[spread] = s0.types
    s1 = CellState(spread[s0.ids], types)
    t = LocalNeuralHamiltonian({"n_types": 2, "channels": 5}, seed=seed % 5)
    with torch.no_grad():
        e = t.energy(Batch.from_states([s0, s1], n_ids=len(types))).numpy()
    assert e[1] == pytest.approx(e[0], abs=1e-10 * max(1.0, abs(e[0])))
    ev = t.numpy_evaluator()
    assert ev.energy(s1.ids, s1.types) == pytest.approx(ev.energy(s0.ids, s0.types), abs=1e-10 * max(1.0, abs(e[0])))
    assert ev.energy(s0.ids, s0.types) == pytest.approx(e[0], abs=1e-9 * max(1.0, abs(e[0])))


def test_pseudolikelihood_uses_the_local_delta_same_value_and_gradient(monkeypatch):
    """The local NH's pl loss goes through its exact local ΔH (a crop per proposal), not a whole-lattice energy
    per proposal; value and gradient equal the whole-lattice form's."""
    rng = np.random.default_rng(3)
    states = [rand_state((40, 44), 12, rng) for _ in range(2)]
    cfg = copy.deepcopy(DEFAULTS)
    cfg["model"].update(kind="local-nh-closure", neural={"channels": 6})

    def closure():
        return build_model(cfg, states, seed=2)[0]

    cands = PL.build_candidates(states, rng=np.random.default_rng(0), max_sites_per_state=60)
    calls = []
    orig = LocalNeuralHamiltonian.delta_full

    def spy(self, *a, **k):
        calls.append(1)
        return orig(self, *a, **k)

    monkeypatch.setattr(LocalNeuralHamiltonian, "delta_full", spy)
    out = []
    for local in (True, False):
        monkeypatch.setattr(LocalNeuralHamiltonian, "delta_differentiable", local)
        ham = closure()
        loss = PL.pl_nll(ham, cands)
        loss.backward()
        out.append((float(loss.detach()), {n: p.grad.clone() for n, p in ham.named_parameters() if p.grad is not None}))
        assert bool(calls) is not local  # the local form never evaluates whole lattices
    (l0, g0), (l1, g1) = out
    assert l0 == pytest.approx(l1, rel=1e-12)
    assert g0.keys() == g1.keys() and any("phi_a" in k for k in g0)
    for k in g0:
        torch.testing.assert_close(g0[k], g1[k], rtol=1e-7, atol=1e-10)


def test_tissue_local_nh_preset_runs_end_to_end(tmp_path, monkeypatch, capsys):
    """The ``tissue-local-nh`` preset (small tissue, 3 steps): a local NH + closure fitted by the stochastic
    pseudo-likelihood; summary.json keeps the loss curve (one nll per step)."""
    import json

    from training.fit import main as fit_main
    from training.generate import main as generate_main
    cfg = load_config("tissue-local-nh")
    assert (cfg["model"]["kind"], cfg["objective"]["name"], cfg["data"]["frames"]) == \
        ("local-nh-closure", "pl", "all")
    monkeypatch.chdir(tmp_path)
    assert generate_main(["tissue", "--size", "64", "--cells", "36", "--mcs", "3", "--snapshots", "2", "--out",
                          "t.npz", "--no-progress"]) == 0
    assert fit_main(["--config", "tissue-local-nh", "--data", "t.npz", "--iterations", "3", "--threads", "1",
                     "--truth", "t.truth.json", "--out", "run", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "local-nh-closure (contact, volume, local_nh)" in out and "parameter RMSE per pair" in out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    hist = summary["pl_nll_history"]
    assert len(hist) == 3 and all(np.isfinite(hist)) and summary["objective"] == "pl"
    assert not (tmp_path / "run" / "cc3d").exists() and "figure" not in summary  # the preset's exports are off
