"""Summary statistics on small hand-made states, and exact reproduction of the reference summary."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from neuralcpm_plugin.lattice import CellState
from neuralcpm_plugin.metrics.stats import (
    component_counts,
    finite_column_means,
    fragmented_fraction,
    mean_volume,
    n_cells,
    pair_counts,
    sorting_index,
    summary_keys,
    summary_stats,
)

SHARED = Path(__file__).resolve().parents[2] / "shared"
REF = SHARED / "reference-data"


def S(ids, types):
    return CellState(np.asarray(ids, np.int32), np.asarray(types, np.int32))


def test_pair_counts_two_touching_squares():
    ids = np.zeros((6, 6), int)
    ids[1:3, 1:3] = 1
    ids[3:5, 1:3] = 2
    s = S(ids, [0, 1, 2])
    pc = pair_counts(s)
    # shared edge between rows 2 and 3, columns 1-2: 2 vertical + 2 diagonal pairs
    assert pc[(1, 2)] == 4
    # each site of a 2x2 square has 8 Moore neighbours, 3 inside the square: 4 * 5 = 20 outside pairs per
    # square, 4 of which go to the other square
    assert pc[(0, 1)] == 20 - 4 and pc[(0, 2)] == 20 - 4
    assert pc[(1, 1)] == 0 and pc[(2, 2)] == 0
    assert (0, 0) not in pc
    assert pair_counts(s, order=1) == {(0, 1): 6, (0, 2): 6, (1, 1): 0, (1, 2): 2, (2, 2): 0}


def test_pair_counts_periodic_wrap_and_same_type_cells():
    ids = np.zeros((4, 5), int)
    ids[:, 0] = 1  # column 0 and column 4 touch through the periodic boundary
    ids[:, 4] = 2
    s = S(ids, [0, 1, 1])
    pc = pair_counts(s)
    # across the wrap: each of 4 rows has 1 horizontal + 2 diagonal pairs (torus in y too) = 12
    assert pc[(1, 1)] == 12
    assert pair_counts(s, periodic=False)[(1, 1)] == 0
    # a single cell's own pairs never count, only different cells
    assert pair_counts(S(np.ones((3, 3), int), [0, 1])) == {(0, 1): 0, (1, 1): 0}


def test_pair_counts_count_each_unordered_pair_once():
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 5, (7, 9))
    types = np.array([0, 1, 2, 1, 2])
    s = S(ids, types)
    total = sum(pair_counts(s).values())
    # brute force over all ordered neighbour pairs, halved
    brute = 0
    for y in range(7):
        for x in range(9):
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    if dy or dx:
                        brute += ids[y, x] != ids[(y + dy) % 7, (x + dx) % 9]
    assert brute % 2 == 0 and total == brute // 2


def test_fragmentation_on_the_torus():
    ids = np.zeros((8, 8), int)
    ids[3, 0] = ids[3, 7] = 1          # split by the boundary: one component on the torus
    ids[0, 3] = ids[1, 4] = 2          # diagonal contact: 8-connected
    ids[5, 2] = ids[5, 4] = 3          # gap of one site: two components
    ids[7, 6] = ids[0, 7] = 4          # corner wrap diagonally across both boundaries... (7,6)-(0,7)
    s = S(ids, [0, 1, 2, 1, 2])
    cc = component_counts(s)
    assert cc[1:].tolist() == [1, 1, 2, 1]
    assert fragmented_fraction(s) == 0.25
    # without periodic boundaries cells 1 and 4 are split too
    assert fragmented_fraction(s, periodic=False) == 0.75
    assert n_cells(s) == 4 and mean_volume(s) == 2.0


def test_sorting_index():
    ids = np.zeros((6, 6), int)
    ids[1:3, 1:3] = 1
    ids[3:5, 1:3] = 2
    assert sorting_index(S(ids, [0, 1, 2])) == 1.0
    assert sorting_index(S(ids, [0, 1, 1])) == 0.0
    assert np.isnan(sorting_index(S(np.zeros((3, 3), int), [0])))


def test_summary_keys_and_values():
    ids = np.zeros((6, 6), int)
    ids[1:3, 1:3] = 1
    ids[3:5, 1:3] = 2
    out = summary_stats(S(ids, [0, 1, 2]))
    assert list(out) == summary_keys(2) == ["mean_volume", "n_cells", "frac_fragmented", "1-1", "2-2", "1-2",
                                            "1-0", "2-0"]
    assert out["1-2"] == 4.0 and out["1-0"] == 16.0 and out["mean_volume"] == 4.0 and out["n_cells"] == 2.0


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_stats_invariant_under_relabelling_and_translation(seed):
    rng = np.random.default_rng(seed)
    shape = (int(rng.integers(3, 9)), int(rng.integers(3, 9)))
    n = int(rng.integers(1, 6))
    ids = rng.integers(0, n + 1, shape)
    types = np.concatenate([[0], rng.integers(1, 3, n)])
    s = S(ids, types)
    perm = np.concatenate([[0], rng.permutation(np.arange(1, n + 1))])
    t2 = np.zeros_like(types)
    t2[perm] = types  # types follow their cells
    s2 = S(perm[ids], t2)
    shift = (int(rng.integers(shape[0])), int(rng.integers(shape[1])))
    s3 = S(np.roll(ids, shift, (0, 1)), types)
    a, b, c = summary_stats(s, n_types=2), summary_stats(s2, n_types=2), summary_stats(s3, n_types=2)
    assert a == b == c


@pytest.mark.skipif(not REF.exists(), reason="../shared/reference-data is absent")
def test_reproduces_reference_summary_stats_exactly():
    """Our statistics, over all 21 frames of all 32 reference runs, give summary_stats.json exactly."""
    ref = json.loads((REF / "summary_stats.json").read_text())["scenarios"]
    for name, sc in ref.items():
        files = sorted((REF / name).glob("run_*.npz"))
        assert len(files) == sc["n_runs"]
        per_run = []
        for f in files:
            d = np.load(f)["data"]
            per_run.append([summary_stats(CellState.from_maps(d[i, 0], d[i, 1])) for i in range(d.shape[0])])
        for k in sc["mean"]:
            a = np.array([[fr[k] for fr in run] for run in per_run])
            np.testing.assert_allclose(a.mean(0), sc["mean"][k], rtol=0, atol=1e-9, err_msg=f"{name} {k}")
            np.testing.assert_allclose(a.std(0, ddof=1) / np.sqrt(len(files)), sc["se"][k], rtol=0, atol=1e-9,
                                       err_msg=f"{name} {k} SE")


def test_finite_column_means_values_and_no_warning_on_empty_columns():
    """Mean per column over the finite entries (NaN and ±inf left out); NaN for an all-NaN column and for no
    rows at all; never a RuntimeWarning (np.nanmean's "Mean of empty slice" is one even under np.errstate)."""
    a = np.array([[1.0, np.nan, 2.0, np.nan], [3.0, np.nan, np.inf, 5.0], [np.nan, np.nan, 4.0, -np.inf]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = finite_column_means(a)
        empty = finite_column_means(np.zeros((0, 3)))
        all_nan = finite_column_means(np.full((4, 2, 3), np.nan))
        one_d = finite_column_means([np.nan, 2.0, 4.0])
        one_d_nan = finite_column_means([np.nan, np.nan])
        no_rows = finite_column_means([])
    assert m.dtype == np.float64 and m.shape == (4,)
    np.testing.assert_array_equal(m, [2.0, np.nan, 3.0, 5.0])
    assert empty.shape == (3,) and np.isnan(empty).all()
    assert all_nan.shape == (2, 3) and np.isnan(all_nan).all()
    assert one_d.shape == () and float(one_d) == 3.0
    assert np.isnan(one_d_nan) and np.isnan(no_rows)
    with pytest.warns(RuntimeWarning, match="Mean of empty slice"), np.errstate(invalid="ignore"):
        np.nanmean(np.full((2, 1), np.nan), axis=0)  # the warning the helper avoids (np.errstate keeps it)
    with pytest.raises(ValueError, match="at least one dimension"):
        finite_column_means(1.0)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(st.one_of(st.floats(-1e6, 1e6), st.just(np.nan)), min_size=3, max_size=3),
                min_size=1, max_size=8))
def test_finite_column_means_equal_nanmean_where_a_column_has_a_value(rows):
    """Property: on finite-or-NaN data the helper is np.nanmean(axis=0) wherever a column has a finite entry."""
    a = np.array(rows, dtype=np.float64)
    m = finite_column_means(a)
    has = np.isfinite(a).any(0)
    assert np.array_equal(np.isnan(m), ~has)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ref = np.nanmean(a, axis=0)
    np.testing.assert_allclose(m[has], ref[has], rtol=1e-12, atol=1e-9)
