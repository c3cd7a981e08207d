"""Fuzzing the readers: random bytes and mutated valid files either load valid states or raise DataError.

No other exception type may escape, the message must name the file, and nothing may hang (deadline).
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
import tifffile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from neuralcpm_plugin.errors import DataError
from neuralcpm_plugin.io import load_states, safe_unpickle, save_npz, save_piff, save_tiff
from neuralcpm_plugin.lattice import CellState, validate_state

FUZZ = settings(max_examples=120, deadline=5000, suppress_health_check=[HealthCheck.too_slow],
                derandomize=True)


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    """Small valid files of every format (bytes), and a directory to write mutants into."""
    d = tmp_path_factory.mktemp("fuzz")
    rng = np.random.default_rng(0)
    s = CellState(rng.integers(0, 6, size=(9, 11)), [0, 1, 2, 1, 2, 1])
    out = {}
    out["npz"] = save_npz(d / "a.npz", [s, s]).read_bytes()
    out["npz_stored"] = save_npz(d / "b.npz", [s], compress=False).read_bytes()
    out["tif"] = save_tiff(d / "c.tif", [s, s])[0].read_bytes()
    tifffile.imwrite(d / "z.tif", np.stack([s.ids] * 2).astype(np.uint16), compression="zlib",
                     photometric="minisblack")
    out["tif_zlib"] = (d / "z.tif").read_bytes()
    np.save(d / "e_seg.npy", {"masks": s.ids.astype(np.uint16), "flows": [np.zeros((2, 2))], "filename": "e.png",
                              "est_diam": np.float64(3.0)})
    out["seg"] = (d / "e_seg.npy").read_bytes()
    out["piff"] = save_piff(d / "f.piff", s, ["Medium", "A", "B"]).read_bytes()
    work = d / "work"
    work.mkdir()
    tm = '{"1": 1, "2": 2, "3": 1, "4": 2, "5": 1}'
    for stem in ("m", "m_seg"):
        (work / f"{stem}.types.json").write_text(tm)
    logging.getLogger("tifffile").setLevel(logging.CRITICAL)  # tifffile logs warnings for corrupt tags
    return out, work


@st.composite
def mutants(draw, seed: bytes):
    n = len(seed)
    kind = draw(st.sampled_from(["random", "truncate", "flip", "insert", "delete", "splice_header"]))
    if kind == "random":
        return draw(st.binary(max_size=400))
    if kind == "truncate":
        return seed[: draw(st.integers(0, n - 1))]
    if kind == "flip":
        b = bytearray(seed)
        for i, v in draw(st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, 255)), min_size=1, max_size=8)):
            b[i] = v
        return bytes(b)
    if kind == "insert":
        i = draw(st.integers(0, n))
        return seed[:i] + draw(st.binary(min_size=1, max_size=16)) + seed[i:]
    if kind == "delete":
        i = draw(st.integers(0, n - 1))
        return seed[:i] + seed[i + draw(st.integers(1, 32)):]
    # keep the first bytes (magic numbers pass), randomise the rest of the header region
    k = draw(st.integers(4, min(64, n)))
    return seed[:4] + draw(st.binary(min_size=k - 4, max_size=k - 4)) + seed[k:]


def _check(path: Path, **kw):
    try:
        states = load_states(path, **kw)
    except DataError as e:
        msg = str(e)
        assert msg.startswith(str(path)), msg
        assert len(e.reason) >= 10, msg
        return
    assert states
    for s in states:
        assert isinstance(s, CellState)
        validate_state(s.ids, s.types)


def _fuzz(seeds, key, name, data, **kw):
    _, work = seeds
    p = work / name
    p.write_bytes(data)
    _check(p, **kw)


@pytest.mark.parametrize("key", ["npz", "npz_stored"])
@FUZZ
@given(data=st.data())
def test_fuzz_npz(seeds, key, data):
    _fuzz(seeds, key, "m.npz", data.draw(mutants(seeds[0][key])))


@pytest.mark.parametrize("key", ["tif", "tif_zlib"])
@FUZZ
@given(data=st.data())
def test_fuzz_tiff(seeds, key, data):
    _fuzz(seeds, key, "m.tif", data.draw(mutants(seeds[0][key])))


@FUZZ
@given(data=st.data())
def test_fuzz_cellpose(seeds, data):
    _fuzz(seeds, "seg", "m_seg.npy", data.draw(mutants(seeds[0]["seg"])))


@FUZZ
@given(data=st.data())
def test_fuzz_piff(seeds, data):
    _fuzz(seeds, "piff", "m.piff", data.draw(mutants(seeds[0]["piff"])), shape=(9, 11), types={"A": 1, "B": 2})


@FUZZ
@given(data=st.data())
def test_fuzz_unknown_suffix(seeds, data):
    # content sniffing on an unknown suffix, from any seed
    key = data.draw(st.sampled_from(sorted(seeds[0])))
    _fuzz(seeds, key, "m.dat", data.draw(mutants(seeds[0][key])), shape=(9, 11))


_PLAIN = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8)
    | st.binary(max_size=8) | st.complex_numbers(allow_nan=False),
    lambda kids: st.lists(kids, max_size=4) | st.tuples(kids, kids)
    | st.dictionaries(st.text(max_size=4), kids, max_size=4),
    max_leaves=12)
_ARRAYS = st.sampled_from([np.zeros((2, 3), ">i4"), np.arange(5, dtype=np.uint16), np.array(["ab", "c"]),
                           np.asfortranarray(np.arange(6.0).reshape(2, 3)), np.array([1, "x", None], object),
                           np.float32(2.5), np.int64(-3), np.array(True)])


@settings(max_examples=60, deadline=5000, derandomize=True)
@given(st.lists(_PLAIN | _ARRAYS, max_size=4), st.integers(2, 5))
def test_restricted_unpickler_round_trip(objs, protocol):
    """Plain containers and numpy arrays come back equal, for every pickle protocol numpy/cellpose use."""
    holder = np.empty((), dtype=object)
    holder[()] = {"masks": np.arange(6, dtype=np.uint16).reshape(2, 3), "objs": objs}
    back = safe_unpickle(pickle.dumps(holder, protocol=protocol)).item()
    np.testing.assert_array_equal(back["masks"], holder[()]["masks"])
    assert len(back["objs"]) == len(objs)
    for a, b in zip(back["objs"], objs):
        if isinstance(b, (np.ndarray, np.generic)):
            assert type(a) is type(b) and a.dtype == b.dtype
            np.testing.assert_array_equal(a, b)
        else:
            assert a == b


@settings(max_examples=150, deadline=5000, derandomize=True)
@given(st.data())
def test_restricted_unpickler_mutated(data):
    holder = np.empty((), dtype=object)
    holder[()] = {"masks": np.arange(12, dtype=np.uint16).reshape(3, 4), "l": [np.zeros(2), "x", {1, 2}, 1 + 2j]}
    seed = pickle.dumps(holder, protocol=data.draw(st.integers(2, 5)))
    blob = data.draw(mutants(seed))
    try:
        safe_unpickle(blob, path="x_seg.npy")
    except DataError as e:
        assert str(e).startswith("x_seg.npy: ")
