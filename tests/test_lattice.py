"""Lattice state, neighbourhoods, boundary masks, relabelling, volumes and validation errors."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from neuralcpm_plugin.errors import DataError
from neuralcpm_plugin.lattice import (
    MAX_ID,
    CellState,
    boundary_mask,
    half_offsets,
    neighbour_offsets,
    relabel,
    states_from_channels,
    states_to_channels,
    validate_state,
    volumes,
)

# CC3D / Morpheus neighbour counts per order (2-D square lattice; 3-D cubic)
COUNTS_2D = {1: 4, 2: 8, 3: 12, 4: 20, 5: 24, 6: 28}
COUNTS_3D = {1: 6, 2: 18}


@pytest.mark.parametrize(("order", "count"), sorted(COUNTS_2D.items()))
def test_neighbour_counts_2d(order, count):
    offs = neighbour_offsets(order, 2)
    assert offs.shape == (count, 2)
    assert len({tuple(o) for o in offs.tolist()}) == count
    # symmetric, and exactly the `order` smallest distinct distances
    assert {tuple(-o) for o in offs} == {tuple(o) for o in offs}
    d = sorted({int((o * o).sum()) for o in offs})
    assert len(d) == order


@pytest.mark.parametrize(("order", "count"), sorted(COUNTS_3D.items()))
def test_neighbour_counts_3d(order, count):
    offs = neighbour_offsets(order, 3)
    assert offs.shape == (count, 3)
    assert {tuple(-o) for o in offs} == {tuple(o) for o in offs}


def test_neighbour_order_values():
    assert sorted(map(tuple, neighbour_offsets(1).tolist())) == [(-1, 0), (0, -1), (0, 1), (1, 0)]
    moore = {(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)} - {(0, 0)}
    assert {tuple(o) for o in neighbour_offsets(2).tolist()} == moore
    # order 3 adds the distance-2 sites
    assert {tuple(o) for o in neighbour_offsets(3).tolist()} - moore == {(-2, 0), (2, 0), (0, -2), (0, 2)}


def test_neighbour_offsets_high_order_1d_is_complete():
    # regression: the candidate cube used to be too small for high orders in 1-D
    assert sorted(neighbour_offsets(9, 1)[:, 0].tolist()) == [i for i in range(-9, 10) if i]


def test_neighbour_order_invalid():
    with pytest.raises(ValueError, match="order must be >= 1"):
        neighbour_offsets(0)


@pytest.mark.parametrize(("order", "ndim"), [(1, 2), (2, 2), (6, 2), (1, 3), (2, 3)])
def test_half_offsets_cover_each_pair_once(order, ndim):
    full = {tuple(o) for o in neighbour_offsets(order, ndim).tolist()}
    half = [tuple(o) for o in half_offsets(order, ndim).tolist()]
    assert len(half) * 2 == len(full)
    assert {o for o in half} | {tuple(-c for c in o) for o in half} == full
    assert not {o for o in half} & {tuple(-c for c in o) for o in half}


def _boundary_brute(ids, order, periodic):
    out = np.zeros(ids.shape, bool)
    offs = neighbour_offsets(order, ids.ndim)
    for idx in itertools.product(*(range(n) for n in ids.shape)):
        for o in offs:
            j = [a + b for a, b in zip(idx, o)]
            if periodic:
                j = [a % n for a, n in zip(j, ids.shape)]
            elif any(a < 0 or a >= n for a, n in zip(j, ids.shape)):
                continue
            if ids[tuple(j)] != ids[idx]:
                out[idx] = True
                break
    return out


def test_boundary_mask_torus_vs_open():
    ids = np.zeros((5, 6), int)
    ids[1:4, 0:2] = 1  # touches the left edge
    torus = boundary_mask(ids, order=1, periodic=True)
    opened = boundary_mask(ids, order=1, periodic=False)
    # the right column sees the cell across the periodic edge only on the torus
    assert torus[2, 5] and not opened[2, 5]
    # the cell's sites on the left edge: on the torus their left neighbour (x = 5) is medium
    assert torus[2, 0] and not opened[2, 0]
    np.testing.assert_array_equal(torus, _boundary_brute(ids, 1, True))
    np.testing.assert_array_equal(opened, _boundary_brute(ids, 1, False))


def test_boundary_mask_doc_example():
    ids = np.zeros((4, 4), int)
    ids[1:3, 1:3] = 1
    assert int(boundary_mask(ids, order=1).sum()) == 12
    assert int(boundary_mask(ids, order=2).sum()) == 16


def test_boundary_mask_stencil_larger_than_lattice():
    # regression: non-periodic shifts by more than the lattice size used to crash
    ids = np.array([[0, 1], [1, 1]])
    np.testing.assert_array_equal(boundary_mask(ids, order=6, periodic=False), _boundary_brute(ids, 6, False))
    np.testing.assert_array_equal(boundary_mask(ids, order=6, periodic=True), _boundary_brute(ids, 6, True))


@settings(max_examples=25, deadline=None)
@given(hnp.arrays(np.int32, hnp.array_shapes(min_dims=2, max_dims=3, min_side=1, max_side=5),
                  elements=st.integers(0, 3)),
       st.integers(1, 3), st.booleans())
def test_boundary_mask_matches_brute_force(ids, order, periodic):
    np.testing.assert_array_equal(boundary_mask(ids, order, periodic), _boundary_brute(ids, order, periodic))


def test_volumes():
    ids = np.array([[0, 2, 2], [5, 2, 0]])
    np.testing.assert_array_equal(volumes(ids), [2, 0, 3, 0, 0, 1])
    np.testing.assert_array_equal(volumes(ids, 8), [2, 0, 3, 0, 0, 1, 0, 0])
    s = CellState(ids, [0, 1, 2, 1, 1, 2])
    np.testing.assert_array_equal(s.volumes(), [2, 0, 3, 0, 0, 1])
    assert volumes(np.zeros((0,), int)).tolist() == [0]


@settings(max_examples=30, deadline=None)
@given(hnp.arrays(np.int64, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=6),
                  elements=st.integers(0, 30)))
def test_relabel_properties(ids):
    types = np.arange(31) % 3 + 1
    types[0] = 0
    new, new_types, old_of_new = relabel(ids, types)
    # same partition, contiguous, order kept, types follow the cells
    np.testing.assert_array_equal(old_of_new[new], ids)
    assert set(np.unique(new).tolist()) <= set(range(len(old_of_new)))
    assert np.all(np.diff(old_of_new) > 0) and old_of_new[0] == 0
    np.testing.assert_array_equal(new_types, types[old_of_new])
    assert (new == 0).sum() == (ids == 0).sum()


def test_relabelled_state():
    s = CellState(np.array([[0, 7], [3, 7]]), [0, 1, 1, 2, 1, 1, 1, 1])
    r = s.relabelled()
    np.testing.assert_array_equal(r.ids, [[0, 2], [1, 2]])
    np.testing.assert_array_equal(r.types, [0, 2, 1])
    assert r.ids.dtype == np.int32 and r.types.dtype == np.int32


def test_from_maps_and_channels_round_trip():
    ids = np.array([[0, 1, 1], [2, 2, 0]])
    tmap = np.array([[0, 2, 2], [1, 1, 0]])
    s = CellState.from_maps(ids, tmap, path="f.npz", frame=3)
    np.testing.assert_array_equal(s.types, [0, 2, 1])
    np.testing.assert_array_equal(s.to_channels(), np.stack([ids, tmap]))
    assert s.meta == {"path": "f.npz", "frame": 3}
    assert s.n_types == 2 and s.n_ids == 3 and s.ndim == 2 and s.shape == (2, 3)
    np.testing.assert_array_equal(s.type_map(), tmap)
    np.testing.assert_array_equal(s.cell_ids(), [1, 2])
    # integral floats are accepted (label images saved as float)
    assert CellState.from_maps(ids.astype(float), tmap.astype(np.float32)) == s


def test_from_maps_errors():
    ids = np.array([[0, 1, 1], [2, 2, 0]])
    with pytest.raises(DataError, match=r"f\.npz, frame 4: cell id 1 has sites of two types \(1 and 2\)"):
        CellState.from_maps(ids, np.array([[0, 1, 2], [1, 1, 0]]), path="f.npz", frame=4)
    with pytest.raises(DataError, match=r"medium sites \(id 0\) carry type 2, expected 0"):
        CellState.from_maps(ids, np.array([[2, 1, 1], [1, 1, 2]]))
    with pytest.raises(DataError, match=r"differ in shape"):
        CellState.from_maps(ids, np.zeros((3, 2), int))
    with pytest.raises(DataError, match=r"negative cell id -1 at index \[0, 0\]"):
        CellState.from_maps(-np.ones((2, 2), int), np.zeros((2, 2), int))
    with pytest.raises(DataError, match=r"negative cell type -3"):
        CellState.from_maps(np.ones((2, 2), int), -3 * np.ones((2, 2), int))
    with pytest.raises(DataError, match=r"cell ids must be integers, got the value 1\.5 at index \[0, 1\]"):
        CellState.from_maps(np.array([[0, 1.5]]), np.zeros((1, 2)))
    with pytest.raises(DataError, match=r"cell ids must be integers, got the value nan"):
        CellState.from_maps(np.array([[0, np.nan]]), np.zeros((1, 2)))
    with pytest.raises(DataError, match=r"cell types must be integers, got dtype <U1"):
        CellState.from_maps(np.zeros((1, 2), int), np.array([["a", "b"]]))
    with pytest.raises(DataError, match=r"cell ids must be integers, got dtype bool"):
        CellState.from_maps(np.zeros((1, 2), bool), np.zeros((1, 2), int))
    with pytest.raises(DataError, match=r"empty lattice"):
        CellState.from_maps(np.zeros((0, 3), int), np.zeros((0, 3), int))
    with pytest.raises(DataError, match=r"cell id 2147483648 at index \[0, 0\] is too large"):
        CellState.from_maps(np.array([[2 ** 31, 0]]), np.array([[1, 0]]))
    with pytest.raises(DataError, match=r"too large for a lattice of 2 sites .* relabel"):
        CellState.from_maps(np.array([[2 ** 30, 0]]), np.array([[1, 0]]))
    with pytest.raises(DataError, match=r"cell 1 has type 0, which is reserved for the medium"):
        CellState.from_maps(np.array([[1, 0]]), np.array([[0, 0]]))


def test_validate_state_errors():
    ok = np.array([[0, 1]])
    assert validate_state(ok, [0, 1])[0].dtype == np.int32
    cases = [
        (np.zeros(4, int), [0], r"a lattice must have 2 or 3 dimensions, got shape \(4,\)"),
        (np.zeros((1, 1, 1, 1), int), [0], r"must have 2 or 3 dimensions"),
        (np.zeros((0, 2), int), [0], r"empty lattice of shape \(0, 2\)"),
        (np.array([[0, -2]]), [0, 1], r"negative cell id -2 at index \[0, 1\]"),
        (np.array([[0, 3]]), [0, 1], r"cell id 3 has no entry in the type table \(length 2\)"),
        (ok, [1, 1], r"the medium \(id 0\) must have type 0"),
        (ok, [0, -1], r"negative cell type -1"),
        (ok, [0, 0], r"cell 1 has type 0, which is reserved for the medium"),
        (ok, np.array([[0, 1]]), r"the type table must be a 1-D integer array"),
        (ok, np.array([0.0, 1.0]), r"the type table must be a 1-D integer array"),
        (np.array([["a", "b"]]), [0, 1], r"cell ids must be integers, got dtype <U1"),
        (ok, np.array([0, 2 ** 40]), r"cell type 1099511627776 is too large"),
    ]
    for ids, types, msg in cases:
        with pytest.raises(DataError, match=msg):
            validate_state(ids, np.asarray(types), path="x.tif", frame=2)
    with pytest.raises(DataError, match=r"^x\.tif, frame 2: cell type 3 is outside the declared range 0\.\.2$"):
        validate_state(ok, [0, 3], path="x.tif", frame=2, n_types=2)


def test_ids_beyond_int32_do_not_wrap():
    # regression: ids > 2**31-1 used to be silently wrapped by astype(int32)
    with pytest.raises(DataError, match="too large"):
        validate_state(np.array([[2 ** 32 + 1, 0]], dtype=np.int64), np.zeros(3, int))
    assert MAX_ID == 2 ** 31 - 1


def test_states_from_channels_layouts():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 4, size=(3, 5, 6))
    types = np.array([0, 1, 2, 1])
    chan_first = np.stack([ids, types[ids]], axis=1)  # (frames, 2, H, W)
    chan_last = np.moveaxis(chan_first, 1, -1)  # (frames, H, W, 2)
    a = states_from_channels(chan_first, path="a.npz")
    b = states_from_channels(chan_last)
    assert len(a) == 3 and all(x == y for x, y in zip(a, b))
    assert [s.meta["frame"] for s in a] == [0, 1, 2]
    np.testing.assert_array_equal(states_to_channels(a), chan_first)
    single = states_from_channels(chan_first[0])
    assert len(single) == 1 and single[0] == a[0]
    # 3-D lattices
    ids3 = rng.integers(0, 4, size=(2, 3, 4, 5))
    s3 = states_from_channels(np.stack([ids3, types[ids3]], axis=1))
    assert s3[0].shape == (3, 4, 5)


def test_states_from_channels_errors():
    with pytest.raises(DataError, match=r"a\.npz: expected data of shape \(frames, 2, H, W\)"):
        states_from_channels(np.zeros((5, 5), int), path="a.npz")
    with pytest.raises(DataError, match=r"no channel axis of length 2"):
        states_from_channels(np.zeros((3, 3, 4, 5), int))
    with pytest.raises(DataError, match=r"the file holds no frames"):
        states_from_channels(np.zeros((0, 2, 4, 5), int))
    with pytest.raises(DataError, match=r"frame 1: cell id 1 has sites of two types"):
        d = np.zeros((2, 2, 3, 3), int)
        d[1, 0, 0, :2] = 1
        d[1, 1, 0, 0], d[1, 1, 0, 1] = 1, 2
        states_from_channels(d)


def test_states_to_channels_errors():
    with pytest.raises(DataError, match="no states to write"):
        states_to_channels([])
    a = CellState(np.zeros((2, 2), int), [0])
    b = CellState(np.zeros((2, 3), int), [0])
    with pytest.raises(DataError, match=r"mixed lattice sizes"):
        states_to_channels([a, b])


def test_cellstate_equality_and_copy():
    a = CellState(np.array([[0, 1]]), [0, 2])
    b = CellState(np.array([[0, 1]]), [0, 2, 1])  # extra absent id: same state
    c = CellState(np.array([[0, 1]]), [0, 1])
    assert a == b and a != c
    assert a != CellState(np.array([[0, 1, 0]]), [0, 2])
    d = a.copy()
    d.ids[0, 0] = 1
    assert a.ids[0, 0] == 0
    assert (a == "x") is False
