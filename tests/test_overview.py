"""The overview figure of training.fit: data runs replayed exactly, model roll-outs from the same starts."""

import numpy as np
import pytest
from fit_helpers import block_states, write_npz

from training.gen_cellsort import generate_cellsort, save_cellsort
from training.overview import overview, replay_cellsort, rollout

SMALL = {"size": 24, "cells": 6, "target": 20.0, "radius": 6.0, "mcs": 20.0}


@pytest.fixture(scope="module")
def cellsort(tmp_path_factory):
    d = tmp_path_factory.mktemp("cs")
    rep = {}
    states, ham = generate_cellsort("b", "cpu", 3, seed=4, proposal="classic", progress=False, report=rep, **SMALL)
    path = save_cellsort(d / "data.npz", states, ham, scenario="b", scale="cpu", report=rep)
    return path, states, ham


def test_replay_reproduces_the_stored_snapshots(cellsort):
    path, states, _ = cellsort
    times, runs, exact, proposal = replay_cellsort(path, 3, n_frames=4)
    assert exact and proposal == "classic"
    assert times == [0.0, 5.0, 10.0, 15.0, 20.0]
    assert len(replay_cellsort(path, 1)[0]) == 11            # default: 11 time points
    assert len(runs) == 3 and all(len(r) == 5 for r in runs)
    for r, s in zip(runs, states):
        assert np.array_equal(r[-1].ids, s.ids)
        assert len(r[0].cell_ids()) == SMALL["cells"] and r[0].volumes()[1:].max() == 1   # single-pixel starts


def test_replay_notices_a_snapshot_it_does_not_reproduce(cellsort, tmp_path):
    path, _, _ = cellsort
    z = dict(np.load(path))
    z["data"] = z["data"].copy()
    z["data"][1, 0] = np.roll(z["data"][1, 0], 1, axis=0)
    bad = tmp_path / "bad.npz"
    np.savez(bad, **z)
    assert replay_cellsort(bad, 3, n_frames=2)[2] is False
    assert replay_cellsort(write_npz(tmp_path / "plain.npz", block_states(2, size=24)), 3) is None


def test_rollout_records_the_requested_times_and_starts_at_the_start(cellsort):
    _, states, ham = cellsort
    frames = rollout(states[0], ham, [0, 1, 3], seed=1)
    assert len(frames) == 3 and np.array_equal(frames[0].ids, states[0].ids)
    assert not np.array_equal(frames[2].ids, states[0].ids)


def _info(path):
    return {"path": str(path), "files": [str(path)]}


def test_overview_of_generated_data_and_of_trajectories(cellsort, tmp_path):
    path, states, ham = cellsort
    msgs = []
    res = overview(tmp_path / "a", ham, states, _info(path), n_runs=3, log=msgs.append)
    assert res["replayed_exactly"] is True and "replayed from their seeds" in res["source"]
    assert (tmp_path / "a" / "overview.png").stat().st_size > 10_000
    assert res["n_runs"] == 3 and res["mcs"] == 20.0
    assert set(res["final_stats"]["data"]) == set(res["final_stats"]["model"])
    assert msgs and str(tmp_path / "a" / "overview.png") in msgs[-1]

    # trajectory files (frames with mcs): the model starts at each file's first frame
    _, runs, _, _ = replay_cellsort(path, 2, n_frames=20)
    from neuralcpm_plugin.io.npz import save_npz
    files = []
    for i, r in enumerate(runs):
        files.append(str(save_npz(tmp_path / f"traj{i}.npz", r, mcs=np.arange(21))))
    res = overview(tmp_path / "b", ham, [r[-1] for r in runs], {"path": str(tmp_path), "files": files})
    assert "2 data trajectories" in res["source"] and res["mcs"] == 20.0
    assert res["times"] == [float(t) for t in range(0, 21, 2)]           # 21 frames thinned to 11
    # the true model from the same starts keeps the data's mean volume (a loose check that it ran)
    fd, fm = res["final_stats"]["data"], res["final_stats"]["model"]
    assert abs(fd["mean cell volume (sites)"] - fm["mean cell volume (sites)"]) < 4


def test_overview_of_snapshots_and_of_neural_models(tmp_path):
    from neuralcpm_plugin.hamiltonian.analytic import ContactEnergy, VolumeConstraint
    from neuralcpm_plugin.hamiltonian.base import Hamiltonian, LatticeSpec
    from neuralcpm_plugin.hamiltonian.local_nh import LocalNeuralHamiltonian
    states = block_states(4, size=24)
    f = write_npz(tmp_path / "snap.npz", states)
    lat = LatticeSpec((24, 24), True, 2, 2)
    ham = Hamiltonian([ContactEnergy([[0, 2, 2], [2, 1, 2], [2, 2, 1]], 2),
                       VolumeConstraint([0, 0.5, 0.5], [0, 15, 15])], lat, 1.0, ["medium", "A", "B"])
    res = overview(tmp_path / "c", ham, states, _info(f), fallback_mcs=10)
    assert "data snapshots" in res["source"] and res["mcs"] == 10 and res["replayed_exactly"] is None
    nh = Hamiltonian(list(ham.terms) + [LocalNeuralHamiltonian({"n_types": 2, "stride": 4, "channels": 4,
                                                                "kernel": 3}, seed=0)], lat, 1.0)
    msgs = []
    assert overview(tmp_path / "d", nh, states, _info(f), log=msgs.append) is None
    assert "skipped" in msgs[0] and not (tmp_path / "d" / "overview.png").exists()


def test_overview_of_3d_data_shows_middle_planes(tmp_path):
    rep = {}
    states, ham = generate_cellsort("b", "cpu", 2, seed=1, proposal="classic", progress=False, report=rep, dim=3,
                                    size=10, cells=4, target=10.0, radius=3.0, mcs=4.0)
    path = save_cellsort(tmp_path / "d3.npz", states, ham, scenario="b", scale="cpu", report=rep)
    assert replay_cellsort(path, 2, n_frames=2)[2] is True
    res = overview(tmp_path / "o", ham, states, _info(path), n_runs=2)
    assert res["replayed_exactly"] is True and (tmp_path / "o" / "overview.png").is_file()


def test_overview_needs_matplotlib_only(tmp_path, monkeypatch):
    """`pip install .[experiments]` brings matplotlib, not pyvista: the figure must not import pyvista."""
    import sys
    monkeypatch.setitem(sys.modules, "pyvista", None)          # `import pyvista` raises ImportError
    states = block_states(2, size=24)
    f = write_npz(tmp_path / "snap.npz", states)
    from neuralcpm_plugin.hamiltonian.analytic import ContactEnergy, VolumeConstraint
    from neuralcpm_plugin.hamiltonian.base import Hamiltonian, LatticeSpec
    ham = Hamiltonian([ContactEnergy([[0, 2, 2], [2, 1, 2], [2, 2, 1]], 2),
                       VolumeConstraint([0, 0.5, 0.5], [0, 15, 15])], LatticeSpec((24, 24), True, 2, 2), 1.0)
    res = overview(tmp_path / "o", ham, states, _info(f), fallback_mcs=4)
    assert res is not None and (tmp_path / "o" / "overview.png").is_file()


def test_data_with_other_starts_is_not_replayed(tmp_path):
    """training.gen_tissue writes the cell-sorting format with Voronoi starts: not replayable by init_points."""
    from training.gen_tissue import generate_tissue
    rep = {}
    states, ham = generate_tissue("b", 1, 0, size=20, cells=16, target=20.0, mcs=2.0, progress=False, report=rep)
    path = save_cellsort(tmp_path / "t.npz", states, ham, scenario="b", scale="tissue", report=rep)
    assert replay_cellsort(path, 1) is None
    res = overview(tmp_path / "o", ham, states, _info(path), fallback_mcs=2)
    assert "data snapshots" in res["source"]
