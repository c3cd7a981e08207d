"""The code that runs inside CompuCell3D: lattice mirror, numpy evaluators, callbacks and snapshots.

Without CompuCell3D here, the exported project is run by ``tests/fixtures/cc3d/fake_cc3d`` — a test double of
CC3D 4.8's Python API (``CompuCellSetup``, ``SteppableBasePy``, ``EnergyFunctionPyWrapper``,
``ChangeWatcherPyWrapper``) with the same call protocol (see its docstring). The real thing is exercised by
the opt-in ``tests/test_cc3d_integration.py`` (``CC3D_PYTHON``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cc3d_steppables import steppables as stp
from cc3d_steppables.export import export_project
from neuralcpm_plugin.hamiltonian.analytic import ContactEnergy, DirectedMotion, ExternalPotential, VolumeConstraint
from neuralcpm_plugin.hamiltonian.base import Hamiltonian, LatticeSpec
from neuralcpm_plugin.io import load_states
from neuralcpm_plugin.lattice import CellState

FAKE = Path(__file__).resolve().parent / "fixtures" / "cc3d" / "fake_cc3d"


def model(shape=(16, 18), periodic=True):
    lat = LatticeSpec(shape, periodic, 2, 2)
    rng = np.random.default_rng(0)
    dirs = [None, {"mode": "band", "axis": 1, "lo": 0.4, "hi": 0.6, "sense": "inward"},
            {"mode": "constant", "vector": [1.0, -0.5]}]
    terms = [ContactEnergy([[0, 2, 2], [2, 1, 1.6], [2, 1.6, 1]], 2),
             VolumeConstraint([0, 0.5, 0.5], [0, 12, 12]),
             ExternalPotential([0, 0.4, -0.3], rng.normal(size=shape)),
             DirectedMotion([0, 0.5, 0.8], dirs, periodic=periodic)]
    return Hamiltonian(terms, lat, 1.5, ["medium", "A", "B"])


def blocks(shape, n=8, seed=0):
    rng = np.random.default_rng(seed)
    ids = np.zeros(shape, np.int32)
    for c in range(1, n + 1):
        y, x = rng.integers(0, shape[0] - 3), rng.integers(0, shape[1] - 3)
        ids[y:y + 3, x:x + 3] = c
    st = CellState(ids, np.concatenate([[0], rng.integers(1, 3, n)]).astype(np.int32))
    return st.relabelled()


def test_mirror_and_directed_motion_stay_exact_under_copies():
    """Incremental mirror (volumes, per-cell site sets, centre caches) = recomputation, after many copies."""
    ham = model()
    dm = ham.term("directed_motion")
    st = blocks((16, 18))
    m = stp.LatticeMirror(st.ids, st.types)
    spec = dm.spec()["params"]
    term = stp.DirectedMotionTerm(spec["strength"], spec["direction"], st.shape, True)
    rng = np.random.default_rng(1)
    offs = [(a, b) for a in (-1, 0, 1) for b in (-1, 0, 1) if (a, b) != (0, 0)]
    checked = 0
    for _ in range(600):
        y, x = rng.integers(0, 16), rng.integers(0, 18)
        dy, dx = offs[rng.integers(8)]
        src = int(m.ids[(y + dy) % 16, (x + dx) % 18])
        if src == m.ids[y, x]:
            continue
        cur = CellState(m.ids.astype(np.int32), m.types.astype(np.int32))
        ref = dm.delta_np(cur, (y, x), src)
        assert abs(term.delta(m, (y, x), src) - ref) <= 1e-9 * max(1, abs(ref))
        checked += 1
        if m.volumes[m.ids[y, x]] > 1 or m.ids[y, x] == 0:
            m.set_site((y, x), src)
    assert checked > 100
    assert np.array_equal(m.volumes[: m.ids.max() + 1], np.bincount(m.ids.ravel(), minlength=m.ids.max() + 1))
    for c in range(1, int(m.ids.max()) + 1):
        assert m.cell_sites(c) == set(np.flatnonzero(m.ids.ravel() == c).tolist())


def test_python_energy_forbids_deletion():
    st = CellState(np.array([[0, 1], [2, 2]], np.int32), np.array([0, 1, 1], np.int32))
    e = stp.PythonEnergy([stp.ExternalTerm([0, 1.0], np.ones((2, 2)))], stp.LatticeMirror(st.ids, st.types))
    assert e.delta((0, 1), 2) == float("inf")
    assert e.delta((1, 0), 1) == 0.0  # type 1 → type 1
    assert e.delta((0, 0), 1) == 1.0


def _run_fake(project, out, timeout=240):
    env = dict(os.environ, PYTHONPATH=str(FAKE) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "cc3d.run_script", "-i", str(project), "-o", str(out)],
                          check=False, capture_output=True, text=True, env=env, timeout=timeout)


def test_project_runs_under_cc3d_api_double(tmp_path):
    ham = model()
    st = blocks((16, 18))
    res = export_project(ham, tmp_path / "p", init=st, mcs=6, seed=4, snapshot_every=2, verify_mirror_every=1,
                         quiet=True, measure_cost=False)
    r = _run_fake(res.project, tmp_path / "out")
    assert r.returncode == 0, r.stdout + r.stderr
    frames = load_states(tmp_path / "out" / "lattice.npz")
    z = np.load(tmp_path / "out" / "lattice.npz")
    assert z["mcs"].tolist() == [0, 2, 4, 6] and z["data"].dtype == np.int32
    assert frames[0] == res.initial_state
    assert not np.array_equal(frames[-1].ids, frames[0].ids)  # it moved
    rep = json.loads((tmp_path / "out" / "neuralcpm_run.json").read_text())
    assert rep["callback_errors"] == 0 and rep["python_term"] and rep["energy_calls"] > 100
    assert rep["mcs"] == 6 and [c for c, _ in rep["mirror_checks"]] == list(range(7))
    assert rep["cpu_s"] > 0 and rep["mcs_per_cpu_s"] == pytest.approx(6 / rep["cpu_s"]) and rep["setup_s"] >= 0
    assert all(mis == 0 for _, mis in rep["mirror_checks"]), rep["mirror_checks"]
    assert "MCS/s" in r.stdout


def test_local_and_pooled_nh_project_runs_compiled_under_cc3d_api_double(tmp_path):
    """Local + pooled NH closure in the CC3D double: the compiled evaluator runs (caches kept by the change
    watcher: equal to a full recomputation at the end), the mirror equals the field at every MCS."""
    pytest.importorskip("torch")
    from test_cc3d_export import _neural_closure
    ham = _neural_closure((18, 18))
    st = blocks((18, 18), n=10)
    res = export_project(ham, tmp_path / "p", init=st, mcs=4, seed=2, snapshot_every=2, verify_mirror_every=1,
                         quiet=True, measure_cost=False)
    r = _run_fake(res.project, tmp_path / "out", timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    rep = json.loads((tmp_path / "out" / "neuralcpm_run.json").read_text())
    assert rep["callback_errors"] == 0 and rep["energy_calls"] > 100
    assert rep["compiled_terms"] == ["local_nh", "pooled_nh"]
    assert rep["neural_cache_error"] is not None and rep["neural_cache_error"] < 1e-10
    assert all(mis == 0 for _, mis in rep["mirror_checks"]) and len(rep["mirror_checks"]) == 5
    frames = load_states(tmp_path / "out" / "lattice.npz")
    assert not np.array_equal(frames[-1].ids, frames[0].ids)


def test_prepare_binds_the_compiled_terms_and_changes_nothing(tmp_path):
    """``PythonEnergy.prepare`` (called in the steppable's ``start``, before the MCS/s clock starts) binds the
    compiled neural terms to the mirror, so the first copy attempt does not rebuild their caches; the mirror
    and the ΔH are unchanged."""
    pytest.importorskip("torch")
    from test_cc3d_export import _neural_closure
    ham = _neural_closure((18, 18))
    st = blocks((18, 18), n=10)
    res = export_project(ham, tmp_path / "p", init=st, mcs=2, seed=2, quiet=True, measure_cost=False)
    sim = res.project.parent / "Simulation"
    m = stp.LatticeMirror(st.ids, st.types)
    e = stp.load_python_energy(sim, m, compiled=True)
    terms = [t for t in e.terms if t.compiled]
    assert [t.kind for t in terms] == ["local_nh", "pooled_nh"]
    assert all(t.evaluator.S is None for t in terms)
    ids0, v0 = m.ids.copy(), m.version
    e.prepare()
    assert np.array_equal(m.ids, ids0) and m.version == v0
    for t in terms:
        assert t.evaluator.S is not None and t._version == m.version
        assert t.evaluator.cache_error() < 1e-12
    ref = stp.load_python_energy(sim, stp.LatticeMirror(st.ids, st.types), compiled=False)
    rng = np.random.default_rng(0)
    for _ in range(30):
        y, x = int(rng.integers(18)), int(rng.integers(18))
        new = int(m.ids[(y + 1) % 18, x])
        assert e.delta((y, x), new) == pytest.approx(ref.delta((y, x), new), rel=1e-9, abs=1e-9)
    assert all(t._version == m.version for t in terms)  # no rebind on the way


def test_exception_in_energy_term_is_caught_and_reported(tmp_path):
    ham = model()
    res = export_project(ham, tmp_path / "p", init=blocks((16, 18)), mcs=3, seed=4, quiet=True, measure_cost=False)
    arrays = tmp_path / "p" / "Simulation" / stp.ARRAYS_NAME
    z = dict(np.load(arrays))
    key = next(k for k in z if k.endswith("_field"))
    z[key] = np.zeros(3)  # a field of the wrong shape: IndexError inside changeEnergy
    np.savez(arrays, **z)
    r = _run_fake(res.project, tmp_path / "out")
    assert r.returncode == 1, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])  # not the crash code 134
    assert "NeuralCPM" in r.stdout + r.stderr and "IndexError" in r.stdout + r.stderr
    err = (tmp_path / "out" / "neuralcpm_error.txt").read_text()
    assert "changeEnergy" in err and "IndexError" in err
