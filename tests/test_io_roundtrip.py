"""Round trips of every writer/reader pair on random states (hypothesis)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from neuralcpm_plugin.errors import DataError
from neuralcpm_plugin.io import (
    load_states,
    read_cellpose,
    read_npz,
    read_piff,
    read_tiff,
    read_type_map,
    save_npz,
    save_piff,
    save_tiff,
    write_type_map,
)
from neuralcpm_plugin.lattice import CellState

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def trajectories(draw, ndim=2, max_side=7, max_frames=3, max_cells=6, n_types=3):
    """Frames of one lattice shape sharing one type table (a cell keeps its type)."""
    shape = tuple(draw(st.integers(1, max_side)) for _ in range(ndim))
    n_cells = draw(st.integers(0, max_cells))
    types = np.array([0] + draw(st.lists(st.integers(1, n_types), min_size=n_cells, max_size=n_cells)))
    frames = draw(st.integers(1, max_frames))
    out = []
    for _ in range(frames):
        ids = draw(hnp.arrays(np.int32, shape, elements=st.integers(0, n_cells)))
        out.append(CellState(ids, types))
    return out


def _tmp():
    return Path(tempfile.mkdtemp(prefix="ncpm-io-"))


@SETTINGS
@given(trajectories(), st.booleans(), st.booleans())
def test_npz_round_trip(states, compress, with_mcs):
    d = _tmp()
    extra = {"mcs": np.arange(len(states)) * 50} if with_mcs else {}
    p = save_npz(d / "t.npz", states, compress=compress, label=np.int64(7), **extra)
    back = read_npz(p)
    assert len(back) == len(states) and all(a == b for a, b in zip(back, states))
    assert [s.meta["frame"] for s in back] == list(range(len(states)))
    assert all(s.meta["label"] == 7 for s in back)
    if with_mcs:
        assert [s.meta["mcs"] for s in back] == [50 * i for i in range(len(states))]
        # meta["mcs"] is written back when present in every state
        back2 = read_npz(save_npz(d / "u.npz", back))
        assert [s.meta["mcs"] for s in back2] == [s.meta["mcs"] for s in back]
    assert sorted(x.name for x in d.iterdir()) == (["t.npz", "u.npz"] if with_mcs else ["t.npz"])


@SETTINGS
@given(trajectories(ndim=3, max_side=4, max_frames=2))
def test_npz_round_trip_3d(states):
    back = read_npz(save_npz(_tmp() / "t.npz", states))
    assert all(a == b for a, b in zip(back, states)) and back[0].ndim == 3


def test_npz_channel_last_layout(tmp_path):
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 5, size=(2, 6, 7))
    types = np.array([0, 1, 2, 2, 1])
    np.savez(tmp_path / "a.npz", data=np.stack([ids, types[ids]], axis=-1))  # (frames, H, W, 2)
    np.savez(tmp_path / "b.npz", data=np.stack([ids, types[ids]], axis=1))  # (frames, 2, H, W)
    a, b = load_states(tmp_path / "a.npz"), load_states(tmp_path / "b.npz")
    assert all(x == y for x, y in zip(a, b)) and len(a) == 2
    np.testing.assert_array_equal(a[1].ids, ids[1])


@SETTINGS
@given(trajectories())
def test_tiff_round_trip(states):
    d = _tmp()
    tif, tmap = save_tiff(d / "t.tif", states)
    assert tmap == d / "t.types.json"
    back = load_states(tif)  # type map from the sidecar
    assert len(back) == len(states) and all(a == b for a, b in zip(back, states))
    assert back[0].meta["format"] == "tiff" and back[0].meta["type_map"] == str(tmap)
    # the same with an explicit type map argument, as a dict and as a CSV file
    m = read_type_map(tmap)
    assert all(a == b for a, b in zip(read_tiff(tif, types=m), states))
    csv = write_type_map(d / "other.csv", m)
    assert all(a == b for a, b in zip(read_tiff(tif, types=csv), states))


@SETTINGS
@given(trajectories(ndim=3, max_side=4, max_frames=2))
def test_tiff_round_trip_3d(states):
    tif, _ = save_tiff(_tmp() / "t.tiff", states)
    back = read_tiff(tif, ndim=3)
    assert all(a == b for a, b in zip(back, states)) and back[0].ndim == 3


def test_tiff_single_type_and_table(tmp_path):
    ids = np.array([[0, 3, 3], [1, 0, 2]], dtype=np.uint16)
    import tifffile

    tifffile.imwrite(tmp_path / "x.tif", ids)
    s = read_tiff(tmp_path / "x.tif", types=2)[0]
    np.testing.assert_array_equal(s.types, [0, 2, 2, 2])
    s = read_tiff(tmp_path / "x.tif", types=[0, 1, 2, 1])[0]
    np.testing.assert_array_equal(s.types, [0, 1, 2, 1])
    tifffile.imwrite(tmp_path / "f.tif", ids.astype(np.float32))  # integral floats are fine
    assert read_tiff(tmp_path / "f.tif", types=2)[0] == read_tiff(tmp_path / "x.tif", types=2)[0]


def test_tiff_huge_ids_are_relabelled(tmp_path):
    import tifffile

    ids = np.array([[0, 4_000_000_000], [17, 17]], dtype=np.uint32)
    tifffile.imwrite(tmp_path / "x.tif", ids)
    with pytest.raises(DataError, match=r"cell id 4000000000 at index \[0, 1\] is too large"):
        read_tiff(tmp_path / "x.tif", types=1)
    ids = np.array([[0, 2_000_000_000], [17, 17]], dtype=np.uint32)
    tifffile.imwrite(tmp_path / "y.tif", ids)
    s = read_tiff(tmp_path / "y.tif", types={2_000_000_000: 1, 17: 2})[0]
    np.testing.assert_array_equal(s.ids, [[0, 2], [1, 1]])
    np.testing.assert_array_equal(s.types, [0, 2, 1])
    np.testing.assert_array_equal(s.meta["original_ids"], [0, 17, 2_000_000_000])


@SETTINGS
@given(trajectories(max_frames=1), st.sampled_from(["dict", "plain"]))
def test_cellpose_round_trip(states, kind):
    (s,) = states
    d = _tmp()
    tm = {int(c): int(s.types[c]) for c in s.cell_ids()}
    if kind == "dict":  # what cellpose writes: a pickled dict with masks and other entries
        np.save(d / "img_seg.npy", {"masks": s.ids.astype(np.uint16), "outlines": np.zeros_like(s.ids),
                                    "filename": "img.png", "flows": [np.zeros((2, 3, 3), np.uint8)],
                                    "chan_choose": [0, 0], "ismanual": np.array([True]), "est_diam": np.float64(3.0),
                                    "diameter": 30.0, "zdraw": [], "misc": (1, 2.5, None, b"x", {3}, 1 + 2j)})
    else:
        np.save(d / "img_seg.npy", s.ids)
    write_type_map(d / "img.types.json", tm)  # sidecar without the _seg suffix
    (back,) = load_states(d / "img_seg.npy")
    assert back == s and back.meta["format"] == "cellpose"
    (back,) = read_cellpose(d / "img_seg.npy", types=tm)
    assert back == s


def test_cellpose_3d_masks(tmp_path):
    masks = np.zeros((2, 3, 4), np.uint16)
    masks[0, :2, :2] = 5
    masks[1, 1:, 2:] = 6
    np.save(tmp_path / "z_seg.npy", {"masks": masks})
    (s,) = read_cellpose(tmp_path / "z_seg.npy", types={5: 1, 6: 2})
    assert s.shape == (2, 3, 4)
    np.testing.assert_array_equal(s.types[[5, 6]], [1, 2])


@SETTINGS
@given(trajectories(max_frames=1), st.booleans())
def test_piff_round_trip(states, with_names):
    (s,) = states
    d = _tmp()
    names = ["Medium", "Alpha", "beta", "T3"]
    p = save_piff(d / "s.piff", s, names if with_names else dict(enumerate(names)))
    if not s.cell_ids().size:
        with pytest.raises(DataError, match="holds no cells"):
            read_piff(p, shape=s.shape)
        return
    (back,) = read_piff(p, shape=s.shape, types={n: i for i, n in enumerate(names)})
    assert back == s
    assert back.meta["type_names"][0] == "Medium"


@SETTINGS
@given(trajectories(ndim=3, max_side=4, max_frames=1))
def test_piff_round_trip_3d(states):
    (s,) = states
    if not s.cell_ids().size:
        return
    p = save_piff(_tmp() / "s.piff", s, ["Medium", "A", "B", "C"])
    (back,) = read_piff(p, shape=s.shape, types={"A": 1, "B": 2, "C": 3})
    assert back == s and back.ndim == 3


def test_piff_format_details(tmp_path):
    p = tmp_path / "c.piff"
    # multi-box cell, overwrite order, comments, clustered 9-column lines, Medium lines, auto type numbers
    p.write_text("# comment\n\n"
                 "3 Beta 0 3 0 0 0 0\n"
                 "3 Beta 0 0 1 1 0 0\n"
                 "1 1 Alpha 2 3 1 2 0 0\n"
                 "9 Medium 3 3 2 2 0 0\n")
    (s,) = read_piff(p)
    np.testing.assert_array_equal(s.ids, [[3, 3, 3, 3], [3, 0, 1, 1], [0, 0, 1, 0]])
    np.testing.assert_array_equal(s.types[[1, 3]], [2, 1])  # order of appearance: Beta = 1, Alpha = 2
    assert s.meta["type_names"] == {0: "Medium", 1: "Beta", 2: "Alpha"}
    (s2,) = read_piff(p, types={"alpha": 1, "BETA": 2}, shape=(4, 5))  # names are case-insensitive
    assert s2.shape == (4, 5) and s2.types[3] == 2 and s2.types[1] == 1


def test_piff_zero_based_ids_are_renumbered(tmp_path):
    p = tmp_path / "z.piff"
    p.write_text("0 A 0 0 0 0 0 0\n5 B 1 1 0 0 0 0\n0 A 2 2 0 0 0 0\n")
    (s,) = read_piff(p)
    np.testing.assert_array_equal(s.ids, [[1, 2, 1]])
    np.testing.assert_array_equal(s.meta["piff_ids"], [0, 0, 5])


def test_type_map_files(tmp_path):
    j = tmp_path / "m.json"
    j.write_text(json.dumps({"0": 0, "1": 2, "12": 1}))
    assert read_type_map(j) == {0: 0, 1: 2, 12: 1}
    j.write_text(json.dumps({"types": {"4": 3}}))
    assert read_type_map(j) == {4: 3}
    c = tmp_path / "m.csv"
    c.write_text("id,type\n# note\n1, 2\n\n12,1\n")
    assert read_type_map(c) == {1: 2, 12: 1}
    c.write_text("1,2\n3,1\n")  # no header
    assert read_type_map(c) == {1: 2, 3: 1}
    assert read_type_map(write_type_map(tmp_path / "w.csv", {1: 2, 0: 0, 5: 1})) == {1: 2, 5: 1}
