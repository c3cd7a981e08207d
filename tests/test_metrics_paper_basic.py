"""The paper's roll-out metrics on small hand-made states with known answers."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from neuralcpm_plugin.errors import DataError
from neuralcpm_plugin.lattice import CellState
from neuralcpm_plugin.metrics import paper


def _state(ids, types):
    return CellState(np.asarray(ids, np.int32), np.asarray(types, np.int32))


# ------------------------------------------------------------------------------------------- volume
def test_volume_bounds_and_metric():
    ids = np.zeros((10, 10), int)
    ids[0:2, 0:2] = 1          # volume 4
    ids[5:7, 5:8] = 2          # volume 6
    train = _state(ids, [0, 1, 2])
    lo, hi = paper.volume_bounds([train])            # mean 5 → margin 0.5
    assert (lo, hi) == (3.5, 6.5)
    assert paper.volume_bounds([train], margin=10) == (-6, 16)
    assert paper.volume_ok(train, (lo, hi))
    big = ids.copy()
    big[5:7, 8] = 2            # volume 8 > 6.5
    assert not paper.volume_ok(_state(big, [0, 1, 2]), (lo, hi))
    gone = ids.copy()
    gone[gone == 1] = 0        # cell 1 vanished: volume 0 < 3.5
    assert not paper.volume_ok(_state(gone, [0, 1, 2]), (lo, hi))
    assert paper.volume_metric([train, _state(big, [0, 1, 2]), _state(gone, [0, 1, 2]), train], (lo, hi)) == 0.5


def test_volume_bounds_no_cells():
    with pytest.raises(DataError):
        paper.volume_bounds([_state(np.zeros((4, 4), int), [0])])


# ------------------------------------------------------------------------------------ fragmentation
def test_dilate_periodic_wraps():
    m = np.zeros((7, 7), bool)
    m[0, 0] = True
    d = paper.dilate(m, 1, periodic=True)
    assert d.sum() == 9 and d[6, 6] and d[1, 1] and d[0, 6]
    d2 = paper.dilate(m, 2, periodic=False)
    assert d2.sum() == 9 and not d2[6, 6]   # 3x3 corner block only


def test_count_components_torus():
    m = np.zeros((8, 8), bool)
    m[3, 0] = m[3, 7] = True               # adjacent across the x wrap
    assert paper.count_components(m, periodic=False) == 2
    assert paper.count_components(m, periodic=True) == 1
    m2 = np.zeros((8, 8), bool)
    m2[0, 0] = m2[7, 7] = True             # diagonal neighbours across the corner
    assert paper.count_components(m2, periodic=True) == 1
    m3 = np.zeros((8, 8), bool)
    m3[0, 0] = m3[4, 4] = True
    assert paper.count_components(m3, periodic=True) == 2
    m4 = np.zeros((8, 8), bool)
    m4[:, 2] = True                         # a ring around the torus is still one component
    assert paper.count_components(m4, periodic=True) == 1


@pytest.mark.parametrize("gap,expected", [(4, 0), (5, 1)])
def test_fragmented_gap_rule(gap, expected):
    """Two pieces of one cell merge after two dilations iff at most 4 empty sites separate them."""
    ids = np.zeros((20, 30), int)
    ids[5:8, 2:5] = 1
    ids[5:8, 5 + gap:8 + gap] = 1
    ids[12:15, 20:23] = 2
    s = _state(ids, [0, 1, 2])
    assert paper.n_fragmented(s, periodic=False) == expected
    assert paper.fragment_counts(s, periodic=False)[2] == 1


def test_fragmentation_torus_and_vanished():
    ids = np.zeros((12, 12), int)
    ids[4:7, 0:2] = 1
    ids[4:7, 10:12] = 1                     # one compact cell across the x wrap
    s = _state(ids, [0, 1, 2])              # id 2 declared, absent: vanished → 0 components
    counts = paper.fragment_counts(s, periodic=True)
    assert counts == {1: 1, 2: 0}
    assert paper.n_fragmented(s, periodic=True) == 1
    # without wrap the wrapped cell reads as two pieces (12 - 4 = 8 sites apart)
    assert paper.fragment_counts(s, periodic=False)[1] == 2


def test_fragmentation_metric_threshold():
    ids = np.zeros((40, 40), int)
    types = [0]
    for c in range(1, 6):                   # 5 cells, each in two far-apart pieces
        ids[2 * c, 1] = c
        ids[2 * c, 20] = c
        types.append(1)
    bad = _state(ids, types)
    assert paper.n_fragmented(bad) == 5
    good = bad.ids.copy()
    good[:, 20] = 0
    good_s = _state(good, types)
    assert paper.n_fragmented(good_s) == 0
    three = bad.ids.copy()
    three[2, 20] = three[4, 20] = 0         # 3 fragmented cells remain: passes (≤ 3)
    assert paper.fragmentation_metric([bad, good_s, _state(three, types)]) == pytest.approx(2 / 3)
    assert paper.fragmentation_metric([bad], max_fragmented=5) == 1.0


# ---------------------------------------------------------------------------------- bipolar metrics
def test_bipolar_organisation_lines():
    ids = np.zeros((21, 21), int)
    ids[10, 2:6] = 1                        # type 2 on one row: all variance along x
    ids[10, 15:19] = 2
    ids[6:10, 10] = 3                       # type 1 on one column: no variance along x
    ids[11:15, 10] = 4
    s = _state(ids, [0, 2, 2, 1, 1])
    org = paper.bipolar_organisation(s)
    assert org[2] == pytest.approx(1.0)
    assert org[1] == pytest.approx(0.0, abs=1e-12)


def test_bipolar_organisation_isotropic_and_missing():
    ids = np.zeros((20, 20), int)
    ids[5:15, 5:15] = 1                     # a square of type 2: isotropic
    s = _state(ids, [0, 2])
    org = paper.bipolar_organisation(s)
    assert org[2] == pytest.approx(0.5)
    assert np.isnan(org[1])


def test_bipolar_organisation_across_wrap():
    ids = np.zeros((21, 21), int)
    ids[10, 0:3] = 1                        # the row of type-2 pixels wraps in x
    ids[10, 18:21] = 2
    s = _state(ids, [0, 2, 2])
    assert paper.bipolar_organisation(s)[2] == pytest.approx(1.0)


def test_second_moments_known():
    ids = np.zeros((21, 21), int)
    ids[10, 5] = 1                          # type 2 at x = 5 and 15 → along-axis moment 25
    ids[10, 15] = 2
    ids[8, 10] = 3                          # type 1 at y = 8 and 12 on the centre column
    ids[12, 10] = 4
    s = _state(ids, [0, 2, 2, 1, 1])
    m = paper.second_moments(s)             # rows: types (1, 2); columns: (along, across)
    np.testing.assert_allclose(m, [[0.0, 4.0], [25.0, 0.0]], atol=1e-9)
    # rotation by 90° does not change the aligned moments
    r = _state(np.rot90(ids).copy(), [0, 2, 2, 1, 1])
    np.testing.assert_allclose(paper.second_moments(r), m, atol=1e-9)
    un = paper.second_moments(s, align_type=None)   # raw (y, x) axes
    np.testing.assert_allclose(un, [[4.0, 0.0], [0.0, 25.0]], atol=1e-9)


def test_moment_error():
    ids = np.zeros((21, 21), int)
    ids[10, 5] = 1
    ids[10, 15] = 2
    ids[8, 10] = 3
    ids[12, 10] = 4
    a = _state(ids, [0, 2, 2, 1, 1])
    ids2 = ids.copy()
    ids2[10, 15] = 0
    ids2[10, 17] = 2                        # type 2 at x = 5, 17: along = 36
    b = _state(ids2, [0, 2, 2, 1, 1])
    assert paper.moment_error([a, a], [a]) == 0.0
    # differences: type 2 along 25 vs 36 → 11; others 0 → RMSE = sqrt(121 / 4) = 5.5
    assert paper.moment_error([a], [b]) == pytest.approx(5.5)
    assert paper.moment_error([a, b], [a]) == pytest.approx(np.sqrt(5.5 ** 2 / 4))


def test_second_moments_missing_type():
    ids = np.zeros((10, 10), int)
    ids[2, 2] = 1
    s = _state(ids, [0, 1])
    assert np.isnan(paper.second_moments(s)).all()


# --------------------------------------------------------------------------------- classifier score
def test_classifier_score_extremes():
    assert paper.classifier_score(np.full((7, 10), 0.1)) == pytest.approx(1.0)
    eye = np.eye(10)
    assert paper.classifier_score(eye) == pytest.approx(10.0)
    assert paper.classifier_score(np.repeat(eye[:4], 3, axis=0)) == pytest.approx(4.0)
    # every sample confident in the same class: no diversity → 1
    assert paper.classifier_score(np.tile(eye[3], (5, 1))) == pytest.approx(1.0)


def test_classifier_score_rejects_bad_input():
    with pytest.raises(DataError):
        paper.classifier_score(np.zeros((0, 10)))
    with pytest.raises(DataError):
        paper.classifier_score(-np.ones((2, 3)))


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 12), st.integers(2, 10), st.integers(0, 2 ** 31 - 1))
def test_classifier_score_bounds(n, k, seed):
    p = np.random.default_rng(seed).dirichlet(np.ones(k), size=n)
    cs = paper.classifier_score(p)
    assert 1.0 - 1e-9 <= cs <= min(n, k) + 1e-9


# ------------------------------------------------------------------------------------------- helpers
def test_mean_ci():
    m, h = paper.mean_ci([1.0, 2.0, 3.0])
    assert m == 2.0
    assert h == pytest.approx(4.302652729911275 * 1.0 / np.sqrt(3))
    m1, h1 = paper.mean_ci([5.0])
    assert m1 == 5.0 and np.isnan(h1)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2 ** 31 - 1), st.integers(-7, 7), st.integers(-7, 7))
def test_metrics_translation_invariant_on_torus(seed, dy, dx):
    """Periodic metrics do not change when the whole state is rolled on the torus."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((16, 16), int)
    types = [0]
    for c in range(1, 6):
        y, x = rng.integers(0, 6, 2)        # a compact aggregate (the realistic case)
        h, w = rng.integers(1, 4, 2)
        ids[y:y + h, x:x + w] = c
        types.append(1 + c % 2)
    s = _state(ids, types)
    r = _state(np.roll(ids, (dy, dx), axis=(0, 1)), types)
    assert paper.fragment_counts(s) == paper.fragment_counts(r)
    np.testing.assert_allclose(paper.second_moments(s), paper.second_moments(r), atol=1e-6)


def test_cell_centres_across_wrap():
    ids = np.zeros((10, 10), int)
    ids[2, 8:10] = 1
    ids[2, 0:2] = 1                          # cell 1 spans x = 8, 9, 0, 1 → centre between 9 and 0
    ids[6, 3:6] = 2
    s = _state(ids, [0, 1, 1])
    _, _, c = paper.cell_centres(s)
    # relative positions survive the wrap: cell 2 is 4 rows below and 4.5 columns right of cell 1
    np.testing.assert_allclose(c[1] - c[0], [4.0, 4.5])
    _, _, c_plain = paper.cell_centres(s, periodic=False)
    np.testing.assert_allclose(c_plain[0], [2.0, 4.5])    # the naive mean lands in the middle
