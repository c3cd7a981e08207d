"""Opt-in: exported projects run in a real CompuCell3D 4.8 and agree with the package's exact sampler.

Set ``CC3D_PYTHON`` to a Python interpreter that imports ``cc3d`` (CompuCell3D 4.8, e.g. the ``python`` of
its conda environment); skipped otherwise. For each model: 8 projects exported with seeds 1001…1008 (each
with its own default initial state), run headless ``$CC3D_PYTHON -m cc3d.run_script -i X.cc3d -o OUT`` for
200 MCS (in parallel, at most ``NEURALCPM_CC3D_JOBS`` processes at once, default one per core), then from the saved snapshots (``OUT/lattice.npz``):

* every cell of the start is still present after 200 MCS;
* the mean cell volume is within 5 % of the target volume, in every run;
* the mean sorting index (fraction of heterotypic cell–cell contacts) over the 8 CC3D runs is within 4
  combined standard errors of the package's exact sampler (2 seeds from each of the same 8 starts);
* no error inside the Python callbacks; the Python term's lattice mirror equals CC3D's field (checked every
  50 MCS); the speed (MCS/s, from ``neuralcpm_run.json``) is printed (``pytest -s`` shows it).

Models: cell sorting (Contact + Volume, C++ plugins only), the same with a local NH term (Python energy
term through ``EnergyFunctionPyWrapper``), and with a local NH + pooled NH closure (the compiled evaluator when
numba imports in ``CC3D_PYTHON`` — asserted then, with its caches equal to a full recomputation at the end —
the numpy one otherwise; mirror checked every 10 MCS). Expected duration with a real CC3D on 8+ cores: a few
minutes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest

CC3D_PYTHON = os.environ.get("CC3D_PYTHON")
pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not CC3D_PYTHON, reason="set CC3D_PYTHON to a python that imports cc3d (CompuCell3D)")]

N_RUNS = 8
MCS = 200
EXACT_SEEDS_PER_START = 2
RUN_TIMEOUT_S = 3600


def max_jobs() -> int:
    """Processes run at once (CC3D runs, exact-sampler workers): ``NEURALCPM_CC3D_JOBS`` (e.g. 1 on a busy
    machine), default one per core."""
    v = os.environ.get("NEURALCPM_CC3D_JOBS", "")
    try:
        n = int(v) if v else (os.cpu_count() or 1)
    except ValueError:
        raise ValueError(f"NEURALCPM_CC3D_JOBS={v!r}: expected a positive integer") from None
    if n < 1:
        raise ValueError(f"NEURALCPM_CC3D_JOBS={v!r}: expected a positive integer")
    return n


def _sorting_hamiltonian(shape, with_local_nh: bool, with_pooled: bool = False):
    from neuralcpm_plugin.hamiltonian.analytic import ContactEnergy, VolumeConstraint
    from neuralcpm_plugin.hamiltonian.base import Hamiltonian, LatticeSpec
    lat = LatticeSpec(shape, True, 2, 2)
    # differential adhesion: J(1,2) > (J(1,1) + J(2,2))/2 → sorting; per unordered Moore pair
    J = [[0.0, 2.0, 2.0], [2.0, 1.0, 2.0], [2.0, 2.0, 1.0]]
    terms = [ContactEnergy(J, 2), VolumeConstraint([0.0, 0.8, 0.8], [0.0, 40.0, 40.0])]
    if with_local_nh:
        from neuralcpm_plugin.hamiltonian.local_nh import LocalNeuralHamiltonian
        terms.append(LocalNeuralHamiltonian({"n_types": 2, "stride": 4, "channels": 8, "kernel": 3}, seed=0,
                                            scale=0.3))
    if with_pooled:
        from neuralcpm_plugin.hamiltonian.pooled_nh import PooledNeuralHamiltonian
        terms.append(PooledNeuralHamiltonian({"n_types": 2, "stride": 4, "channels": 8, "kernel": 3,
                                              "position_dim": 2, "hidden": 16, "lattice_shape": list(shape)},
                                             seed=1, scale=3.0))
    return Hamiltonian(terms, lat, 1.0, ["medium", "A", "B"])


def _exact_worker(args):
    bundle, ids, types, seed = args
    from neuralcpm_plugin.bundle import load_bundle
    from neuralcpm_plugin.lattice import CellState
    from neuralcpm_plugin.sampling.exact import run_exact
    ham = load_bundle(bundle).hamiltonian
    res = run_exact(CellState(ids, types), ham, MCS, seed=seed)
    return res.final.ids, res.final.types


def _run_cc3d_projects(projects, outs, logs):
    """Run the projects headless, at most :func:`max_jobs` at a time; return the return codes."""
    env = dict(os.environ)
    procs, codes = [], [None] * len(projects)
    limit = max_jobs()
    pending = list(range(len(projects)))
    running = {}
    while pending or running:
        while pending and len(running) < limit:
            i = pending.pop(0)
            f = open(logs[i], "w")  # noqa: SIM115
            p = subprocess.Popen([CC3D_PYTHON, "-m", "cc3d.run_script", "-i", str(projects[i]), "-o", str(outs[i])],
                                 stdout=f, stderr=subprocess.STDOUT, env=env, cwd=str(projects[i].parent))
            running[i] = (p, f)
            procs.append(p)
        for i, (p, f) in list(running.items()):
            try:
                p.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                continue
            f.close()
            codes[i] = p.returncode
            del running[i]
    return codes


def _cc3d_has_numba() -> bool:
    r = subprocess.run([CC3D_PYTHON, "-c", "import numba"], capture_output=True, check=False)
    return r.returncode == 0


def _check_model(tmp_path, with_local_nh: bool, shape, with_pooled: bool = False):
    from cc3d_steppables.export import export_project
    from neuralcpm_plugin.bundle import save_bundle
    from neuralcpm_plugin.io import load_states
    from neuralcpm_plugin.metrics.stats import n_cells, sorting_index

    label = ("local NH + pooled NH" if with_pooled else "local NH") if with_local_nh else "cell sorting"
    ham = _sorting_hamiltonian(shape, with_local_nh, with_pooled)
    check_every = 10 if with_pooled else 50
    target = 40.0
    bundle = save_bundle(tmp_path / "bundle", ham)
    projects, outs, logs, starts = [], [], [], []
    for i in range(N_RUNS):
        res = export_project(bundle, tmp_path / f"proj{i}", mcs=MCS, seed=1001 + i, snapshot_every=50,
                             verify_mirror_every=check_every if with_local_nh else 0, quiet=(i > 0))
        projects.append(res.project)
        outs.append(tmp_path / f"out{i}")
        logs.append(tmp_path / f"run{i}.log")
        starts.append(res.initial_state)
        assert res.mode == ("cpp+python" if with_local_nh else "cpp")
    codes = _run_cc3d_projects(projects, outs, logs)
    for i, c in enumerate(codes):
        tail = Path(logs[i]).read_text()[-3000:]
        assert c == 0, f"{label} run {i}: CompuCell3D exited with {c}:\n{tail}"
        assert (outs[i] / "lattice.npz").is_file(), f"{label} run {i}: no lattice.npz written:\n{tail}"

    cc3d_si, speeds = [], []
    for i in range(N_RUNS):
        frames = load_states(outs[i] / "lattice.npz")
        mcs = np.load(outs[i] / "lattice.npz")["mcs"].tolist()
        assert mcs[0] == 0 and mcs[-1] == MCS, mcs
        assert frames[0] == starts[i], f"{label} run {i}: frame 0 differs from the exported initial state"
        final = frames[-1]
        assert n_cells(final) == n_cells(starts[i]), f"{label} run {i}: cells lost ({n_cells(final)} of " \
                                                      f"{n_cells(starts[i])})"
        mv = float(final.volumes()[final.cell_ids()].mean())
        assert abs(mv - target) <= 0.05 * target, f"{label} run {i}: mean volume {mv:.2f}, target {target}"
        cc3d_si.append(sorting_index(final))
        rep = json.loads((outs[i] / "neuralcpm_run.json").read_text())
        assert rep["callback_errors"] == 0, rep["first_error"]
        assert all(m == 0 for _, m in rep["mirror_checks"]), rep["mirror_checks"]
        if with_local_nh:
            assert len(rep["mirror_checks"]) >= MCS // check_every, rep["mirror_checks"]
        if with_pooled and _cc3d_has_numba():
            assert rep["compiled_terms"] == ["local_nh", "pooled_nh"], rep
            assert rep["neural_cache_error"] < 1e-9, rep
        speeds.append(rep["mcs_per_s"])

    jobs = [(str(bundle), s.ids, s.types, 7000 + 100 * i + r)
            for i, s in enumerate(starts) for r in range(EXACT_SEEDS_PER_START)]
    with ProcessPoolExecutor(max_workers=max_jobs()) as pool:
        from neuralcpm_plugin.lattice import CellState
        exact_si = [sorting_index(CellState(ids, types)) for ids, types in pool.map(_exact_worker, jobs)]

    a, b = np.array(cc3d_si), np.array(exact_si)
    se_a, se_b = a.std(ddof=1) / np.sqrt(len(a)), b.std(ddof=1) / np.sqrt(len(b))
    tol = 4 * np.hypot(se_a, se_b)
    msg = (f"{label} on {shape[0]}x{shape[1]}: sorting index after {MCS} MCS — CC3D {a.mean():.4f} ± {se_a:.4f} "
           f"({len(a)} runs), exact sampler {b.mean():.4f} ± {se_b:.4f} ({len(b)} runs); CC3D speed "
           f"{np.median(speeds):.1f} MCS/s (median of {len(speeds)} runs"
           + (f", compiled neural terms: {_cc3d_has_numba()})" if with_local_nh else ")"))
    print(msg, file=sys.stderr)
    print(msg)
    assert abs(a.mean() - b.mean()) <= tol, msg


def test_cell_sorting_model_in_cc3d(tmp_path):
    _check_model(tmp_path, with_local_nh=False, shape=(48, 48))


def test_local_nh_model_in_cc3d(tmp_path):
    _check_model(tmp_path, with_local_nh=True, shape=(32, 32))


def test_local_and_pooled_nh_closure_in_cc3d(tmp_path):
    _check_model(tmp_path, with_local_nh=True, shape=(32, 32), with_pooled=True)
