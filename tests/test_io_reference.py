"""Readers on real Morpheus / CompuCell3D output: ../shared/reference-data and copies in tests/fixtures/io."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from neuralcpm_plugin.io import load_dataset, load_states, read_cc3dml_info, read_piff, save_npz, save_piff

SHARED = Path(__file__).resolve().parents[2] / "shared"
REF = SHARED / "reference-data"
FIX = Path(__file__).resolve().parent / "fixtures" / "io"


def _need_shared():
    if not REF.is_dir():
        pytest.skip("../shared/reference-data is not available")


# ---------------------------------------------------------------- fixtures (always run)
@pytest.mark.parametrize("name", ["P1_run_01.npz", "P2_run_01.npz"])
def test_fixture_npz(name):
    states = load_states(FIX / name)
    assert len(states) == 21
    assert all(s.shape == (100, 100) for s in states)
    assert [s.meta["mcs"] for s in states] == list(range(0, 1001, 50))
    s0 = states[0]
    # initial state: 40 squares of 5 x 5, 20 of each type
    assert s0.cell_ids().tolist() == list(range(1, 41))
    assert set(s0.volumes()[1:41].tolist()) == {25}
    assert sorted(np.bincount(s0.types[1:41]).tolist()) == [0, 20, 20]
    # a cell keeps its type in every frame
    for s in states:
        np.testing.assert_array_equal(s.types[s.cell_ids()], s0.types[s.cell_ids()])


def test_fixture_piff_equals_frame0_yx_orientation():
    (p,) = read_piff(FIX / "P2_run_01.piff")  # shape and type numbers from the CC3DML beside it
    frame0 = load_states(FIX / "P2_run_01.npz")[0]
    assert p.shape == (100, 100)
    assert p == frame0
    # orientation: PIFF x is the column, y the row -> transposing would not match
    assert not np.array_equal(p.ids, frame0.ids.T)
    # first line "1 T2 51 55 27 31 0 0": cell 1 (type T2 = 2) covers x 51..55, y 27..31
    assert (frame0.ids[27:32, 51:56] == 1).all() and frame0.types[1] == 2
    assert p.meta["type_names"] == {0: "Medium", 1: "T1", 2: "T2"}


def test_fixture_cc3dml_info():
    shape, names = read_cc3dml_info(FIX / "P2_run_01.xml")
    assert shape == (100, 100)
    assert names == {"Medium": 0, "T1": 1, "T2": 2}


def test_fixture_piff_without_cc3dml_needs_type_map(tmp_path):
    # without the CC3DML beside it, names are numbered in order of appearance: the first line is T2
    (tmp_path / "a.piff").write_bytes((FIX / "P2_run_01.piff").read_bytes())
    (auto,) = read_piff(tmp_path / "a.piff", shape=(100, 100))
    (given,) = read_piff(tmp_path / "a.piff", shape=(100, 100), types={"Medium": 0, "T1": 1, "T2": 2})
    frame0 = load_states(FIX / "P2_run_01.npz")[0]
    assert given == frame0 and auto != frame0
    np.testing.assert_array_equal(auto.ids, frame0.ids)
    # the PIFF writer reproduces a file that reads back to the same state
    save_piff(tmp_path / "b.piff", frame0, ["Medium", "T1", "T2"])
    assert read_piff(tmp_path / "b.piff", shape=(100, 100), types={"T1": 1, "T2": 2})[0] == frame0


def test_fixture_npz_rewrite_identical(tmp_path):
    states = load_states(FIX / "P2_run_01.npz")
    save_npz(tmp_path / "x.npz", states)
    with np.load(FIX / "P2_run_01.npz") as a, np.load(tmp_path / "x.npz") as b:
        np.testing.assert_array_equal(a["data"], b["data"])
        np.testing.assert_array_equal(a["mcs"], b["mcs"])
        assert b["data"].dtype == np.int32


def test_fixture_dataset():
    ds = load_dataset(FIX)  # 2 npz (21 frames each) + 1 PIFF (one frame)
    assert len(ds) == 43 and ds.shape == (100, 100) and ds.n_types == 2
    assert [f.name for f in ds.files] == ["P1_run_01.npz", "P2_run_01.npz", "P2_run_01.piff"]
    assert ds.to_channels().shape == (43, 2, 100, 100)
    assert [len(v) for v in ds.trajectories().values()] == [21, 21, 1]


# ---------------------------------------------------------------- ../shared (skipped when absent)
def test_shared_all_runs_load():
    _need_shared()
    for scen in ("P1_morpheus", "P2_cc3d"):
        ds = load_dataset(REF / scen)
        assert len(ds.files) == 16 and len(ds) == 16 * 21 and ds.shape == (100, 100) and ds.n_types == 2


def test_shared_piff_equals_frame0_every_run():
    _need_shared()
    for i in range(1, 17):
        (p,) = load_states(REF / "models" / "P2_cc3d" / "Simulation" / f"P2_run_{i:02d}.piff")
        f0 = load_states(REF / "P2_cc3d" / f"run_{i:02d}.npz")[0]
        assert p == f0, f"run {i:02d}"


def test_shared_summary_mean_volume_and_cells():
    """The states read reproduce the published per-frame mean cell volume and cell count (16-run means)."""
    _need_shared()
    stats = json.loads((REF / "summary_stats.json").read_text())["scenarios"]
    for scen in ("P1_morpheus", "P2_cc3d"):
        ds = load_dataset(REF / scen)
        traj = list(ds.trajectories().values())
        for f in (0, 10, 20):
            vols = [s.volumes()[s.cell_ids()].mean() for s in (t[f] for t in traj)]
            cells = [len(t[f].cell_ids()) for t in traj]
            assert np.mean(vols) == pytest.approx(stats[scen]["mean"]["mean_volume"][f], abs=1e-9)
            assert np.mean(cells) == pytest.approx(stats[scen]["mean"]["n_cells"][f], abs=1e-9)
