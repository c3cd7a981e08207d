"""The checkerboard (multi-core) sampler: bookkeeping invariants, thread-count independence, the shared-cell
rule, and statistics that agree with the sequential exact sampler (volumes, pair counts, sorting over time)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_reference_agreement import FIX, PARAMS, reference_terms

from neuralcpm_plugin.errors import ConfigError
from neuralcpm_plugin.lattice import CellState
from neuralcpm_plugin.metrics.stats import sorting_index, summary_stats
from neuralcpm_plugin.sampling.checkerboard import CheckerboardSampler
from neuralcpm_plugin.sampling.exact import ExactSampler

ROOT = Path(__file__).resolve().parents[1]
TERMS = reference_terms(PARAMS["P1_morpheus"])
KW = {"terms": TERMS, "temperature": 1.0, "periodic": True, "copy_order": 2}


def _frames():
    return np.load(FIX / "initial_frames.npz")["P1_morpheus"]


def _start(i=0) -> CellState:
    fr = _frames()[i]
    return CellState.from_maps(fr[0].astype(np.int32), fr[1].astype(np.int32))


def _digest(ids) -> str:
    return hashlib.sha256(np.ascontiguousarray(ids, np.int32).tobytes()).hexdigest()


def test_bookkeeping_and_counters():
    s = CheckerboardSampler(_start(), None, seed=3, block=16, **KW)
    assert s.m == 3 and s.stats()["strips"] == 6
    v0 = np.bincount(s.ids.ravel(), minlength=len(s.volumes))
    st = s.step(30)
    v = np.bincount(s.ids.ravel(), minlength=len(s.volumes))
    np.testing.assert_array_equal(v, s.volumes)  # incremental volumes (medium included) match the lattice
    assert np.all(v[1:][v0[1:] > 0] > 0)  # no cell deleted
    n = 30 * s.n_sites
    assert st["refused_shared"] < 1e-3 * n  # a cell is shared only if it spans a 16-row strip minus 2 rows
    assert abs(st["attempts"] - n) < 5 * np.sqrt(n)  # the sequential attempt rate, in expectation
    assert 0 < st["accepted"] <= st["candidates"] <= st["attempts"]
    assert abs(float(np.mean(v[1:])) - 100) < 10  # cells grew from 25 towards V* = 100


def test_same_result_for_any_thread_count_and_deterministic():
    a = CheckerboardSampler(_start(1), None, seed=5, block=8, threads=1, **KW)
    b = CheckerboardSampler(_start(1), None, seed=5, block=8, threads=2, **KW)
    c = CheckerboardSampler(_start(1), None, seed=6, block=8, threads=1, **KW)
    for s in (a, b, c):
        s.step(5)
    np.testing.assert_array_equal(a.ids, b.ids)
    assert not np.array_equal(a.ids, c.ids)


def test_narrow_ids_give_the_int32_lattice():
    """uint16 ids / uint8 types (``narrow_ids``, the default) give the int32 run's lattice, volumes and
    counters bit for bit, on 1 and 2 worker threads."""
    import numba
    runs = {}
    for threads in (1, 2):
        for narrow in (False, True):
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(numba.config, "NUMBA_NUM_THREADS", 2)
                s = CheckerboardSampler(_start(4), None, seed=13, block=8, threads=threads, narrow_ids=narrow, **KW)
                assert s.ids.dtype == (np.uint16 if narrow else np.int32)
                s.step(4)
            runs[threads, narrow] = s
    ref = runs[1, False]
    for s in runs.values():
        np.testing.assert_array_equal(ref.ids, s.ids)
        np.testing.assert_array_equal(ref.volumes, s.volumes)
        assert ref.stats()["accepted"] == s.stats()["accepted"] > 0
    assert runs[1, True].state == ref.state and runs[1, True].state.ids.dtype == np.int32


def test_two_real_threads_give_the_single_thread_result():
    """Race freedom, observed: with a pool of 2 numba threads the lattice equals the 1-thread run's."""
    code = ("import sys, hashlib, numpy as np; sys.path.insert(0, 'tests');"
            "from test_checkerboard import _start, KW, _digest;"
            "from neuralcpm_plugin.sampling.checkerboard import CheckerboardSampler;"
            "import numba; assert numba.config.NUMBA_NUM_THREADS == 2;"
            "s = CheckerboardSampler(_start(2), None, seed=9, block=8, threads=2, **KW); s.step(10);"
            "print(_digest(s.ids))")
    env = dict(os.environ, NUMBA_NUM_THREADS="2", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=False, env=env, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    s = CheckerboardSampler(_start(2), None, seed=9, block=8, threads=1, **KW)
    s.step(10)
    assert out.stdout.strip().splitlines()[-1] == _digest(s.ids)


def test_a_cell_spanning_every_strip_is_never_changed():
    """A column cell reaches into every strip: it is shared in every phase, so all its attempts are refused
    (its sites stay exactly as they were), while the other cells keep moving."""
    base = _start(3)
    ids = base.ids.copy()
    new_id = len(base.types)
    ids[:, 40:42] = new_id
    types = np.concatenate([base.types, [1]]).astype(np.int32)
    s = CheckerboardSampler(CellState(ids, types), None, seed=1, block=8, **KW)
    s.step(10)
    np.testing.assert_array_equal(s.ids == new_id, ids == new_id)
    assert s.stats()["refused_shared"] > 0
    assert s.stats()["accepted"] > 1000
    np.testing.assert_array_equal(np.bincount(s.ids.ravel(), minlength=len(types)), s.volumes)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1), h=st.integers(8, 24), w=st.integers(3, 20), n=st.integers(1, 12),
       block=st.integers(2, 6), periodic=st.booleans())
def test_invariants_on_random_states(seed, h, w, n, block, periodic):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, n + 1, size=(h, w)).astype(np.int32)
    types = np.concatenate([[0], rng.integers(1, 3, n)]).astype(np.int32)
    kw = dict(KW, periodic=periodic)
    if h < 2 * max(block, 2):
        with pytest.raises(ConfigError, match="strips"):
            CheckerboardSampler(CellState(ids, types), None, seed=seed, block=block, **kw)
        return
    s = CheckerboardSampler(CellState(ids, types), None, seed=seed, block=block, **kw)
    present = np.bincount(ids.ravel(), minlength=n + 1) > 0
    s.step(3)
    v = np.bincount(s.ids.ravel(), minlength=n + 1)
    np.testing.assert_array_equal(v, s.volumes)
    assert np.all(v[1:][present[1:]] > 0)  # deletions refused
    assert set(np.unique(s.ids)) <= set(np.flatnonzero(present))  # only existing ids spread


def test_three_dimensional_lattice():
    rng = np.random.default_rng(0)
    ids = np.zeros((16, 10, 10), np.int32)
    for c in range(1, 9):  # 8 cubes of 3x3x3
        z, y, x = rng.integers(0, 13), rng.integers(0, 7), rng.integers(0, 7)
        ids[z:z + 3, y:y + 3, x:x + 3] = c
    types = np.array([0] + [1, 2] * 4, np.int32)
    terms = [({"kind": "contact", "scale": 1.0, "params": {"J": [[0, 1, 1], [1, 0.5, 1.5], [1, 1.5, 0.5]],
                                                           "order": 1}}, {}),
             ({"kind": "volume", "scale": 1.0, "params": {"lambda": [0, 1, 1], "target": [0, 27, 27]}}, {})]
    s = CheckerboardSampler(CellState(ids, types), None, seed=2, block=4, terms=terms, temperature=1.0,
                            periodic=True, copy_order=1)
    s.step(20)
    v = np.bincount(s.ids.ravel(), minlength=9)
    np.testing.assert_array_equal(v, s.volumes)
    assert s.stats()["accepted"] > 0


def test_refuses_what_it_cannot_run():
    with pytest.raises(ConfigError, match="classic"):
        CheckerboardSampler(_start(), None, proposal="boundary", **KW)
    with pytest.raises(ConfigError, match="strips"):
        CheckerboardSampler(_start(), None, block=60, **KW)
    with pytest.raises(ConfigError, match="threads"):
        CheckerboardSampler(_start(), None, threads=0, **KW)

    class Neural:
        def delta_np(self, *a):
            return 0.0
    with pytest.raises(ConfigError, match="analytic terms only"):
        CheckerboardSampler(_start(), None, callback_terms=[Neural()], **KW)
    # a Hamiltonian with a local NH (which the sequential sampler would run compiled) is refused, not ignored
    from neuralcpm_plugin.hamiltonian.base import Hamiltonian, LatticeSpec
    from neuralcpm_plugin.hamiltonian.local_nh import LocalNeuralHamiltonian
    ham = Hamiltonian([LocalNeuralHamiltonian(seed=0)], LatticeSpec((100, 100)), 1.0, ["medium", "a", "b"])
    with pytest.raises(ConfigError, match="LocalNeuralHamiltonian"):
        CheckerboardSampler(_start(), ham, block=16)


CHECK = (50, 150, 300)


def _run_stats(make, starts, seed0):
    rows = []
    for i, st_ in enumerate(starts):
        s = make(st_, seed0 + i)
        done, r = 0, []
        for m in CHECK:
            s.step(m - done)
            done = m
            d = summary_stats(s.state)
            d["sorting_index"] = sorting_index(s.state)
            d["volume_sd"] = float(np.std(s.volumes[1:][s.volumes[1:] > 0]))
            r.append(d)
        rows.append(r)
    keys = list(rows[0][0])
    return {k: np.array([[row[k] for row in run] for run in rows]) for k in keys}


@pytest.mark.slow
def test_statistics_agree_with_the_sequential_sampler():
    """16 starts (Morpheus P1 frame 0: 40 cells of 25 sites, 100x100) under P1, one run each with either
    sampler: mean volume, cell count, fragmentation, every pair count, the sorting index and the volume spread
    at 50 / 150 / 300 MCS agree within 4 combined standard errors (exactly where both have none), and the
    pooled Σ z² stays below 2 × the number of compared statistics. Power, measured: the checkerboard at
    T = 1.3 instead of 1 fails both checks (fragmentation z = 6.3, volume spread z = 4.2, Σ z² ≈ 180 against a
    bound of 54); at T = 1.15 neither (16 runs are not enough to see it)."""
    starts = [CellState.from_maps(f[0].astype(np.int32), f[1].astype(np.int32)) for f in _frames()]
    seq = _run_stats(lambda st_, sd: ExactSampler(st_, None, seed=sd, **KW), starts, 100)
    chk = _run_stats(lambda st_, sd: CheckerboardSampler(st_, None, seed=sd, block=8, threads=2, **KW), starts, 500)
    n = len(starts)
    failures = []
    z2 = []
    for k in seq:
        for j, m in enumerate(CHECK):
            a, b = seq[k][:, j], chk[k][:, j]
            sa, sb = a.std(ddof=1) / np.sqrt(n), b.std(ddof=1) / np.sqrt(n)
            if sa == 0 and sb == 0:
                ok = a.mean() == b.mean()
            else:
                z2.append((a.mean() - b.mean()) ** 2 / (sa ** 2 + sb ** 2))
                ok = abs(a.mean() - b.mean()) <= 4 * np.sqrt(sa ** 2 + sb ** 2)
            if not ok:
                failures.append(f"{k} @ {m}: sequential {a.mean():.4g}±{sa:.2g}, checkerboard {b.mean():.4g}±{sb:.2g}")
    assert not failures, "; ".join(failures)
    assert sum(z2) <= 2 * len(z2), f"pooled sum of z^2 = {sum(z2):.1f} over {len(z2)} statistics"
    # sorting progresses in both (the statistic is not trivially flat)
    assert chk["sorting_index"][:, -1].mean() < chk["sorting_index"][:, 0].mean()


def test_profile_accounts_for_the_threads_time():
    """``profile()``: stamping, barrier waits and attempts are parts of the workers' time in ``step``; one
    thread never waits."""
    s = CheckerboardSampler(_start(), None, seed=3, block=16, **KW)
    s.step(4)
    p = s.profile()
    assert set(p) == {"mark", "wait", "attempts", "other", "total", "wait_fraction"}
    assert 0 <= p["wait"] < 0.01 * p["total"] and p["wait_fraction"] < 0.01  # no barrier: reading the clock
    assert 0 < p["mark"] < p["attempts"] < p["total"]
    assert p["mark"] + p["attempts"] <= p["total"] * (1 + 1e-9)


def test_two_workers_pad_the_per_cell_arrays_and_agree(monkeypatch):
    """With two worker threads the volume (and surface) arrays hold one cell per 64-byte cache line (no false
    sharing between the threads); the run equals the one-thread run bit for bit, volumes and surfaces too."""
    import numba
    monkeypatch.setattr(numba.config, "NUMBA_NUM_THREADS", 2)
    terms = [*TERMS, ({"kind": "surface", "scale": 1.0,
                       "params": {"lambda": [0, 0.2, 0.2], "target": [0, 30.0, 30.0], "order": 2}}, {})]
    kw = dict(KW, terms=terms)
    one = CheckerboardSampler(_start(4), None, seed=8, block=8, threads=1, **kw)
    two = CheckerboardSampler(_start(4), None, seed=8, block=8, threads=2, **kw)
    assert one.volumes.strides == (8,) and two.volumes.strides == (64,) and two._A[0].strides == (64,)
    for s in (one, two):
        s.step(4)
    np.testing.assert_array_equal(one.ids, two.ids)
    np.testing.assert_array_equal(one.volumes, two.volumes)
    np.testing.assert_array_equal(two.volumes, np.bincount(two.ids.ravel(), minlength=len(two.volumes)))
    np.testing.assert_array_equal(one._A[0], two._A[0])
    assert two.stats()["threads"] == 2 and two.profile()["attempts"] > 0


def test_predicted_speedup_from_strip_times():
    """Per-strip CPU times replayed on K workers: 1 worker gives exactly 1, K workers at most K (and more than
    1 with 3 strips per colour to share); nothing recorded → a clear error."""
    s = CheckerboardSampler(_start(), None, seed=3, block=16, **KW)
    with pytest.raises(ValueError, match="record_strips"):
        s.predicted_speedup(2)
    s.record_strips = True
    s.step(3)
    p1, p2, p3 = (s.predicted_speedup(k) for k in (1, 2, 3))
    assert p1["speedup"] == pytest.approx(1.0) and p1["phases"] == 12
    assert 1.0 < p2["speedup"] <= 2.0 and 1.0 < p3["speedup"] <= 3.0
    assert 0 < p1["work_s"] < 60


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no sched_setaffinity on this platform")
def test_pinned_workers_give_the_same_result_and_restore_the_cpu_set(monkeypatch):
    """``pin_cpus``: each worker runs pinned to one CPU (a 1-thread run too); the lattice equals the unpinned
    run's, and the calling thread's CPU set is restored afterwards. ``spin_seconds = 0`` (sleep at once at a
    barrier) gives the same lattice too."""
    import numba
    monkeypatch.setattr(numba.config, "NUMBA_NUM_THREADS", 2)
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs 2 CPUs to tell a pinned thread's CPU set from the restored one")
    real, calls = os.sched_setaffinity, []

    def recorder(pid, mask):
        calls.append(set(mask))
        real(pid, mask)
    monkeypatch.setattr(os, "sched_setaffinity", recorder)
    runs = []
    for threads, pin, spin in ((1, None, None), (1, cpus[-1:], None), (2, cpus, None), (2, None, 0.0)):
        calls.clear()
        s = CheckerboardSampler(_start(3), None, seed=11, block=8, threads=threads, **KW)
        s.pin_cpus = pin
        if spin is not None:  # no spin: every barrier wait sleeps on the futex at once
            s.spin_seconds = spin
        s.step(3)
        runs.append(s)
        assert sorted(os.sched_getaffinity(0)) == cpus
        pinned = [c for c in calls if len(c) == 1]  # each worker's own CPU, then its old set restored
        assert sorted(min(c) for c in pinned) == (sorted(pin[w % len(pin)] for w in range(threads)) if pin else [])
    for s in runs[1:]:
        np.testing.assert_array_equal(runs[0].ids, s.ids)
        np.testing.assert_array_equal(runs[0].volumes, s.volumes)
