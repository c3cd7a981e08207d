"""Opt-in: the Table-1 (Cellular MNIST) neural closure rolled out in a real CompuCell3D scores like the package.

Set ``CC3D_PYTHON`` to a Python interpreter that imports ``cc3d`` (CompuCell3D 4.8); skipped otherwise. The
model, data and classifier are those of the README's Table-1 commands (section "Paper experiments"); paths
can be overridden with ``NEURALCPM_TABLE1_RUN`` (run folder or bundle; default ``runs/t1/mixed``, the README's
best Table-1 model ``mnist-cpu-table1-mixed``, else ``runs/t1/pooled``, the ``mnist-cpu-table1`` model it starts from),
``NEURALCPM_TABLE1_DATA`` (default ``runs/data/mnist-cpu.npz``) and ``NEURALCPM_TABLE1_CLASSIFIER`` (default
``runs/t1/clf``; trained there from the data when absent, a few minutes). Skipped, naming what is missing,
when the model or the data are not there.

From ``N_STARTS`` type-permuted real final frames (:func:`training.eval_table1.permuted_starts`, the Table-1
starts), each start is

* exported with :func:`cc3d_steppables.export.export_project` (``init`` = the start; the local and pooled NH
  run as CC3D's Python energy term, compiled when numba imports in ``CC3D_PYTHON``) and run headless for
  ``MCS`` MCS (``$CC3D_PYTHON -m cc3d.run_script``; ``NEURALCPM_CC3D_JOBS`` processes at once, default one per
  core);
* rolled out by the package's exact sampler with classic proposals (random site, random neighbour: CC3D's
  Metropolis dynamics) for the same ``MCS`` (:func:`training.eval_table1.rollout`).

Checked: every CC3D run exits 0 with no error inside the Python callbacks and keeps all its cells; the
classifier score (CS) of the CC3D final frames and that of the package's final frames agree within their 95 %
intervals (each over ``GROUPS`` disjoint groups of trajectories, as the table's †-intervals: the two
intervals overlap), and both are printed (``pytest -s``). MCS = 27 ≈ the table's 40 frames × 0.67 MCS.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

CC3D_PYTHON = os.environ.get("CC3D_PYTHON")
pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not CC3D_PYTHON, reason="set CC3D_PYTHON to a python that imports cc3d (CompuCell3D)")]

ROOT = Path(__file__).resolve().parents[1]
N_STARTS = int(os.environ.get("NEURALCPM_TABLE1_STARTS", "40"))  # fewer: a quick dry run (intervals too wide)
GROUPS = 5
MCS = 27
SEED = 17


def _paths():
    default = ROOT / "runs" / "t1" / "mixed"
    if not default.exists() and (ROOT / "runs" / "t1" / "pooled").exists():
        default = ROOT / "runs" / "t1" / "pooled"
    run = Path(os.environ.get("NEURALCPM_TABLE1_RUN", default))
    data = Path(os.environ.get("NEURALCPM_TABLE1_DATA", ROOT / "runs" / "data" / "mnist-cpu.npz"))
    clf = Path(os.environ.get("NEURALCPM_TABLE1_CLASSIFIER", ROOT / "runs" / "t1" / "clf"))
    missing = [f"{what} {p} (README, 'Paper experiments': {how})" for what, p, how in (
        ("model", run, "the Table-1 training commands"),
        ("data", data, "python -m training.generate mnist --scale cpu")) if not p.exists()]
    if missing:
        pytest.skip("Table-1 inputs missing: " + "; ".join(missing))
    return run, data, clf


def test_table1_closure_in_cc3d_scores_like_the_exact_sampler(tmp_path):
    from test_cc3d_integration import _run_cc3d_projects

    from cc3d_steppables.export import export_project
    from neuralcpm_plugin.bundle import load_bundle
    from neuralcpm_plugin.classifier import predict_proba
    from neuralcpm_plugin.io import load_states
    from neuralcpm_plugin.metrics.paper import classifier_score
    from neuralcpm_plugin.metrics.stats import n_cells
    from training import eval_table1

    run, data, clf_dir = _paths()
    bundle = eval_table1.find_bundle(run)
    ham = load_bundle(bundle).hamiltonian
    assert any(t.kind == "pooled_nh" for t in ham.terms), f"{bundle}: not a pooled-NH closure"
    states, labels = eval_table1.load_data(data)
    clf, _ = eval_table1._classifier_for(data, states, labels, clf_dir, 0, print)
    starts = eval_table1.permuted_starts(states, N_STARTS, np.random.default_rng(SEED))

    projects, outs, logs, exported = [], [], [], []
    for i, s in enumerate(starts):
        res = export_project(bundle, tmp_path / f"proj{i}", init=s, mcs=MCS, seed=2001 + i, snapshot_every=MCS,
                             measure_cost=(i == 0), quiet=(i > 0))
        assert res.mode.startswith("cpp+python"), res.mode
        projects.append(res.project)
        outs.append(tmp_path / f"out{i}")
        logs.append(tmp_path / f"run{i}.log")
        exported.append(res.initial_state)
    codes = _run_cc3d_projects(projects, outs, logs)
    cc3d_final = []
    for i, c in enumerate(codes):
        tail = Path(logs[i]).read_text()[-3000:]
        assert c == 0, f"run {i}: CompuCell3D exited with {c}:\n{tail}"
        frames = load_states(outs[i] / "lattice.npz")
        assert frames[0] == exported[i], f"run {i}: frame 0 differs from the exported start"
        rep = json.loads((outs[i] / "neuralcpm_run.json").read_text())
        assert rep["callback_errors"] == 0, rep["first_error"]
        final = frames[-1]
        assert n_cells(final) == n_cells(exported[i]), f"run {i}: cells lost"
        cc3d_final.append(final.to_channels()[1])

    traj = eval_table1.rollout(ham, starts, frames=1, mcs_per_frame=float(MCS), seed=SEED, sampler="exact",
                               proposal="classic")
    p_cc3d = predict_proba(clf, np.stack(cc3d_final))
    p_pkg = predict_proba(clf, traj[:, -1, 1])
    cs_cc3d, cs_pkg = classifier_score(p_cc3d), classifier_score(p_pkg)
    ci_cc3d = eval_table1.groups_ci(lambda g: classifier_score(p_cc3d[g]), N_STARTS, GROUPS)
    ci_pkg = eval_table1.groups_ci(lambda g: classifier_score(p_pkg[g]), N_STARTS, GROUPS)
    msg = (f"Table-1 model {bundle}: CS after {MCS} MCS from {N_STARTS} permuted starts — CompuCell3D "
           f"{cs_cc3d:.2f} ± {ci_cc3d:.2f}, package exact sampler (classic proposals) {cs_pkg:.2f} ± {ci_pkg:.2f}")
    print(msg, file=sys.stderr)
    assert abs(cs_cc3d - cs_pkg) <= ci_cc3d + ci_pkg, msg
