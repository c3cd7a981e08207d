"""Opt-in: 3-D exports run in a real CompuCell3D 4.8 / Morpheus 2.2.4 and agree with the package's exact sampler.

Skipped unless ``CC3D_PYTHON`` (a Python that imports ``cc3d``) or ``MORPHEUS_BIN`` (a Morpheus 2.2.4
executable) is set. Model: 3-D cell sorting (scenario b's per-pair J, λ = 0.5, V* = 64, order 2 = 18
neighbours, periodic 20³, 24 cells from the generator's single-voxel start relaxed for 30 MCS by the exact
sampler). For each tool: ``N_RUNS`` runs of ``MCS`` MCS from the same start with different seeds; the package's
exact sampler makes ``N_RUNS`` runs from that start too. Checks, on the final states:

* every cell of the start is still present (no cell lost);
* the mean cell volume of the tool's runs is within 3 % of the exact sampler's;
* the mean sorting index (fraction of heterotypic cell–cell contacts) is within 4 combined standard errors.

CC3D: ``$CC3D_PYTHON -m cc3d.run_script -i X.cc3d -o OUT``, snapshots from ``OUT/lattice.npz``. Morpheus:
``$MORPHEUS_BIN --file model.xml --outdir OUT`` with a checkpoint at the end (``SaveInterval``), read with
:func:`morpheus_xml.readers.read_checkpoint` (3-D). Expected duration with the real tools: a few minutes.
"""

from __future__ import annotations

import os
import subprocess

import numpy as np
import pytest

CC3D_PYTHON = os.environ.get("CC3D_PYTHON")
MORPHEUS = os.environ.get("MORPHEUS_BIN")
pytestmark = pytest.mark.integration

N_RUNS = 6
MCS = 100
SHAPE = (20, 20, 20)


def _model_and_start():
    from neuralcpm_plugin.sampling.exact import run_exact
    from training.gen_cellsort import cellsort_hamiltonian_for, init_points
    ham = cellsort_hamiltonian_for("b", SHAPE, 64.0)
    start = init_points(np.random.default_rng(3), SHAPE, 24, 7.0)
    start = run_exact(start, ham, 30, seed=11, proposal="classic").final.relabelled()
    return ham, start


def _stats(states):
    from neuralcpm_plugin.metrics.stats import sorting_index
    vols = [float(s.volumes()[s.cell_ids()].mean()) for s in states]
    si = [sorting_index(s) for s in states]
    return np.array(vols), np.array(si)


def _compare(tool_finals, ham, start):
    from neuralcpm_plugin.sampling.exact import run_exact
    exact = [run_exact(start, ham, MCS, seed=500 + k, proposal="classic").final for k in range(N_RUNS)]
    n0 = len(start.cell_ids())
    for s in tool_finals:
        assert len(s.cell_ids()) == n0, "a cell was lost"
    v_t, si_t = _stats(tool_finals)
    v_e, si_e = _stats(exact)
    print(f"mean volume: tool {v_t.mean():.2f}, exact {v_e.mean():.2f}; sorting index: tool {si_t.mean():.4f} "
          f"± {si_t.std(ddof=1) / np.sqrt(len(si_t)):.4f}, exact {si_e.mean():.4f} ± "
          f"{si_e.std(ddof=1) / np.sqrt(len(si_e)):.4f}")
    assert abs(v_t.mean() - v_e.mean()) <= 0.03 * v_e.mean()
    se = np.sqrt(si_t.var(ddof=1) / len(si_t) + si_e.var(ddof=1) / len(si_e))
    assert abs(si_t.mean() - si_e.mean()) <= 4 * se + 1e-3


@pytest.mark.skipif(not CC3D_PYTHON, reason="set CC3D_PYTHON to a python that imports cc3d (CompuCell3D)")
def test_cc3d_3d_matches_exact_sampler(tmp_path):
    from cc3d_steppables.export import export_project
    from neuralcpm_plugin.io import load_states
    ham, start = _model_and_start()
    finals = []
    for k in range(N_RUNS):
        res = export_project(ham, tmp_path / f"p{k}", init=start, mcs=MCS, seed=1001 + k, quiet=True)
        out = tmp_path / f"out{k}"
        proc = subprocess.run([CC3D_PYTHON, "-m", "cc3d.run_script", "-i", str(res.project), "-o", str(out)],
                              check=False, capture_output=True, text=True, timeout=3600,
                              cwd=str(res.project.parent))
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        frames = load_states(out / "lattice.npz")
        assert frames[-1].shape == SHAPE
        finals.append(frames[-1])
    _compare(finals, ham, start)


@pytest.mark.skipif(not MORPHEUS, reason="set MORPHEUS_BIN to a Morpheus 2.2.4 executable")
def test_morpheus_3d_matches_exact_sampler(tmp_path):
    from morpheus_xml.export import export_model
    from morpheus_xml.readers import find_checkpoints, read_checkpoint
    from morpheus_xml.run import run_morpheus
    ham, start = _model_and_start()
    finals = []
    for k in range(N_RUNS):
        model = tmp_path / f"m{k}.xml"
        export_model(ham, model, init=start, mcs=MCS, seed=2001 + k, save_interval=MCS)
        out = tmp_path / f"out{k}"
        run_morpheus(MORPHEUS, model, out, timeout=3600)
        cps = find_checkpoints(out)
        assert cps, f"no checkpoint in {out}"
        st = read_checkpoint(cps[-1])
        assert st.shape == SHAPE
        finals.append(st)
    _compare(finals, ham, start)
