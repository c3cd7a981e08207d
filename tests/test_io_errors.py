"""Every validation error path of the readers: a DataError naming the file (and frame or line)."""

from __future__ import annotations

import io
import json
import pickle
import re
import warnings
import zipfile

import numpy as np
import pytest
import tifffile

from neuralcpm_plugin.errors import DataError
from neuralcpm_plugin.io import (
    detect_format,
    load_dataset,
    load_states,
    read_cellpose,
    read_npz,
    read_piff,
    read_tiff,
    read_type_map,
    safe_unpickle,
    save_npz,
    save_piff,
    save_tiff,
)
from neuralcpm_plugin.lattice import CellState


def _err(fn, *a, match, **k) -> str:
    with pytest.raises(DataError, match=match) as ei:
        fn(*a, **k)
    return str(ei.value)


def _state(shape=(4, 5), seed=0):
    rng = np.random.default_rng(seed)
    return CellState(rng.integers(0, 4, size=shape), [0, 1, 2, 1])


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def _chan(ids, types):
    ids = np.asarray(ids)
    return np.stack([ids, np.asarray(types)[ids]])[None]


# ------------------------------------------------------------------ npz
def test_npz_truncated(tmp_path):
    p = save_npz(tmp_path / "a.npz", [_state()] * 3)
    raw = p.read_bytes()
    p.write_bytes(raw[: len(raw) // 2])
    msg = _err(read_npz, p, match=r"not a valid \.npz \(zip\) file, or truncated")
    assert msg.startswith(str(p) + ": ")


def test_npz_corrupt_member_data(tmp_path):
    p = save_npz(tmp_path / "a.npz", [_state()] * 3)
    raw = bytearray(p.read_bytes())
    with zipfile.ZipFile(p) as zf:
        info = zf.getinfo("data.npy")
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    raw[start + info.compress_size // 2] ^= 0xFF  # flip one byte of the compressed data
    p.write_bytes(bytes(raw))
    _err(read_npz, p, match=r"a\.npz: (corrupt \.npz archive|not a valid \.npz \(zip\) file, or truncated)")


def test_npz_not_a_zip(tmp_path):
    p = tmp_path / "a.npz"
    p.write_text("hello")
    _err(read_npz, p, match=r"a\.npz: not a valid \.npz \(zip\) file")


def test_npz_missing_data_key(tmp_path):
    p = _npz(tmp_path / "a.npz", frames=np.zeros((2, 2)))
    _err(read_npz, p, match=r"a\.npz: no 'data' array in the \.npz \(keys: frames\); expected data of shape")


def test_npz_object_array_refused(tmp_path):
    p = tmp_path / "a.npz"
    np.savez(p, data=np.array([{"x": 1}], dtype=object))
    _err(read_npz, p, match=r"member 'data\.npy': holds Python objects .*pickled data is never loaded")


def test_npz_header_declares_too_much(tmp_path):
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<i4", "fortran_order": False, "shape": (10 ** 6, 2, 9, 9)})
    with zipfile.ZipFile(tmp_path / "a.npz", "w") as zf:
        zf.writestr("data.npy", buf.getvalue() + b"\0" * 64)
    _err(read_npz, tmp_path / "a.npz", match=r"member 'data\.npy': truncated or corrupt: the header declares shape")


def test_npz_bad_npy_header(tmp_path):
    with zipfile.ZipFile(tmp_path / "a.npz", "w") as zf:
        zf.writestr("data.npy", b"\x93NUMPY\x01\x00\x10\x00{'descr': <<<<  }\n")
    _err(read_npz, tmp_path / "a.npz", match=r"member 'data\.npy': not a valid \.npy array")


@pytest.mark.parametrize(("data", "msg"), [
    (np.zeros((3, 3), np.int32), r"expected data of shape \(frames, 2, H, W\) or \(frames, H, W, 2\), got \(3, 3\)"),
    (np.zeros((2, 3, 4, 5), np.int32), r"no channel axis of length 2"),
    (np.zeros((0, 2, 4, 5), np.int32), r"the file holds no frames"),
    (np.full((1, 2, 2, 2), 0.5), r"frame 0: cell ids must be integers, got the value 0\.5 at index \[0, 0\]"),
    (np.array([[[[0, -1]], [[0, 1]]]]), r"frame 0: negative cell id -1 at index \[0, 1\]"),
    (np.array([[[[0, 1]], [[0, -1]]]]), r"frame 0: negative cell type -1"),
    (np.concatenate([_chan([[0, 1, 1]], [0, 1]), np.array([[[[0, 1, 1]], [[0, 1, 2]]]])]),
     r"frame 1: cell id 1 has sites of two types \(1 and 2\); a cell has one type"),
    (np.array([[[[0, 1]], [[3, 1]]]]), r"frame 0: medium sites \(id 0\) carry type 3, expected 0"),
    (np.array([[[[0, 1]], [[0, 0]]]]), r"frame 0: cell 1 has type 0, which is reserved for the medium"),
    (np.array([[[["a", "b"]], [["a", "b"]]]]), r"cell ids must be integers, got dtype <U1"),
])
def test_npz_content_errors(tmp_path, data, msg):
    p = _npz(tmp_path / "d.npz", data=data)
    _err(read_npz, p, match=r"d\.npz(, frame \d+)?: " + msg if not msg.startswith("frame") else r"d\.npz, " + msg)


def test_npz_types_outside_declared_range(tmp_path):
    p = _npz(tmp_path / "d.npz", data=np.concatenate([_chan([[0, 1, 2]], [0, 1, 2]), _chan([[0, 1, 2]], [0, 1, 3])]))
    _err(read_npz, p, n_types=2, match=r"d\.npz, frame 1: cell 2 has type 3, outside the declared range 1\.\.2$")
    assert len(read_npz(p, n_types=3)) == 2


def test_npz_bad_mcs(tmp_path):
    p = _npz(tmp_path / "d.npz", data=_chan([[0, 1]], [0, 1]), mcs=np.array([0, 50]))
    _err(read_npz, p, match=r"'mcs' must be an integer array of length 1 \(one entry per frame\), got shape \(2,\)")


def test_save_npz_errors(tmp_path):
    _err(save_npz, tmp_path / "a.npz", [], match="no states to write")
    _err(save_npz, tmp_path / "a.npz", [_state((2, 2)), _state((3, 3))], match="mixed lattice sizes")
    _err(save_npz, tmp_path / "a.npz", [_state()], mcs=[1, 2], match=r"'mcs' must have one entry per state \(1\)")
    _err(save_npz, tmp_path / "a.npz", [_state()], data=1, match=r"'data' is written from the states")
    _err(save_npz, tmp_path / "a.npz", [_state()], label=[{1: 2}], match=r"extra array 'label' holds Python objects")
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------ TIFF + type maps
def test_tiff_garbage(tmp_path):
    p = tmp_path / "g.tif"
    p.write_bytes(b"this is not a tiff file at all" * 10)
    _err(read_tiff, p, types=1, match=r"g\.tif: not a readable TIFF file")


def test_tiff_truncated(tmp_path):
    p, _ = save_tiff(tmp_path / "t.tif", [_state((40, 40), s) for s in range(3)])
    raw = p.read_bytes()
    p.write_bytes(raw[: len(raw) // 3])
    _err(read_tiff, p, match=r"t\.tif: (not a readable TIFF file|corrupt TIFF file|the TIFF file holds)")


def test_tiff_rgb_refused(tmp_path):
    tifffile.imwrite(tmp_path / "c.tif", np.zeros((4, 5, 3), np.uint8), photometric="rgb")
    _err(read_tiff, tmp_path / "c.tif", types=1, match=r"c\.tif: a colour \(RGB\) image of shape \(4, 5, 3\)")


def test_tiff_wrong_dimensions(tmp_path):
    tifffile.imwrite(tmp_path / "d.tif", np.ones((2, 3, 4, 5), np.uint16), photometric="minisblack")
    _err(read_tiff, tmp_path / "d.tif", types=1,
         match=r"d\.tif: wrong number of dimensions: image of shape \(2, 3, 4, 5\), expected \(H, W\) or \(frames, H, W\)")
    assert len(read_tiff(tmp_path / "d.tif", types=1, ndim=3)) == 2
    tifffile.imwrite(tmp_path / "e.tif", np.ones((1, 1, 7), np.uint16))  # singleton axes squeezed: (1, 7) frame
    assert read_tiff(tmp_path / "e.tif", types=1)[0].shape == (1, 7)


def test_tiff_plain_stack_of_three_frames(tmp_path):
    # tifffile stores a plain (3, H, W) array as planar RGB unless photometric is given: still 3 frames
    ids = np.arange(3 * 4 * 5, dtype=np.uint16).reshape(3, 4, 5) % 4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        tifffile.imwrite(tmp_path / "p.tif", ids)
    states = read_tiff(tmp_path / "p.tif", types=1)
    assert len(states) == 3
    np.testing.assert_array_equal(states[2].ids, ids[2])


def test_tiff_non_integer_and_negative(tmp_path):
    tifffile.imwrite(tmp_path / "f.tif", np.array([[[0, 1]], [[0, 1.5]]], np.float32))
    _err(read_tiff, tmp_path / "f.tif", types=1, match=r"f\.tif, frame 1: cell ids must be integers, got the value 1\.5 "
                                                         r"at index \[0, 1\]")
    tifffile.imwrite(tmp_path / "n.tif", np.array([[[0, 1]], [[-4, 1]]], np.int16))
    _err(read_tiff, tmp_path / "n.tif", types=1, match=r"n\.tif, frame 1: negative cell id -4 at index \[0, 0\]")
    tifffile.imwrite(tmp_path / "b.tif", np.array([[0, 1]], np.complex64))
    _err(read_tiff, tmp_path / "b.tif", types=1, match=r"b\.tif: cell ids must be integers, got pixel type complex64")


def test_tiff_type_map_errors(tmp_path):
    ids = np.array([[[0, 1, 2]], [[0, 3, 2]]], np.uint16)
    tifffile.imwrite(tmp_path / "s.tif", ids, photometric="minisblack")
    _err(read_tiff, tmp_path / "s.tif", match=r"s\.tif: no cell-type map: pass types= .* or put s\.types\.json beside")
    (tmp_path / "s.types.json").write_text(json.dumps({"1": 1, "2": 2}))
    msg = _err(read_tiff, tmp_path / "s.tif", match=r"s\.tif, frame 1: cell id 3 has no entry in the type map .*s\.types\.json$")
    assert "frame 1" in msg
    _err(read_tiff, tmp_path / "s.tif", types={1: 1, 2: 2, 3: 3}, n_types=2,
         match=r"s\.tif, frame 1: cell 3 has type 3, outside the declared range 1\.\.2")
    _err(read_tiff, tmp_path / "s.tif", types=[0, 1, 2], match=r"frame 1: cell id 3 has no entry in the type table")
    _err(read_tiff, tmp_path / "s.tif", types=[0, 1, 0, 1], match=r"frame 0: cell 2 has type 0 in the types= map; cell")
    _err(read_tiff, tmp_path / "s.tif", types=0, match=r"the single cell type must be >= 1, got 0")
    _err(read_tiff, tmp_path / "s.tif", types=True, match=r"types= must be a dict")
    _err(read_tiff, tmp_path / "s.tif", types=[[1]], match=r"a type table must be a 1-D integer sequence")
    _err(read_tiff, tmp_path / "s.tif", types={1: "x"}, match=r"type map entry 1: cell type must be an integer, got 'x'")
    _err(read_tiff, tmp_path / "s.tif", types={1: 0}, match=r"cell 1 has type 0, which is reserved for the medium")
    _err(read_tiff, tmp_path / "s.tif", types={0: 2}, match=r"the medium \(id 0\) must have type 0, got 2")
    # the sidecar CSV is used when there is no JSON
    (tmp_path / "s.types.json").unlink()
    (tmp_path / "s.types.csv").write_text("id,type\n1,1\n2,2\n3,1\n")
    assert read_tiff(tmp_path / "s.tif")[1].types[3] == 1


@pytest.mark.parametrize(("name", "text", "msg"), [
    ("m.json", "{1: 2}", r"corrupt JSON type map: Expecting property name enclosed in double quotes \(line 1, column 2\)"),
    ("m.json", "[1, 2]", r'a JSON type map must be an object \{"cell id": type, \.\.\.\}, got list'),
    ("m.json", '{"a": 1}', r"entry 'a': cell id must be an integer, got 'a'"),
    ("m.json", '{"1": -1}', r"entry '1': negative cell type -1"),
    ("m.json", '{"1": true}', r"entry '1': cell type must be an integer, got True"),
    ("m.json", '{"1": 1.5}', r"entry '1': cell type must be an integer, got 1\.5"),
    ("m.json", '{"1": 99999999999}', r"entry '1': cell type 99999999999 is too large"),
    ("m.csv", "id,type\n1,1\n1,2\n", r"line 3: cell 1 is given two types \(1 and 2\)"),
    ("m.csv", "1,1\n2\n", r"line 2: expected two columns 'id,type', got \['2'\]"),
    ("m.csv", "1,1\n2,x\n", r"line 2: cell type must be an integer, got 'x'"),
    ("m.csv", "1,1\n-2,1\n", r"line 2: negative cell id -2"),
    ("m.csv", "1,1,3\n", r"line 1: expected two columns"),
    ("m.txt", "1,1\n", r"a type map must be a \.json or \.csv file"),
])
def test_type_map_file_errors(tmp_path, name, text, msg):
    p = tmp_path / name
    p.write_text(text)
    m = _err(read_type_map, p, match=msg)
    assert m.startswith(str(p) + ": ")


def test_type_map_unreadable(tmp_path):
    _err(read_type_map, tmp_path / "none.json", match="type map file not found")
    (tmp_path / "b.json").write_bytes(b"\xff\xfe\xfa")
    _err(read_type_map, tmp_path / "b.json", match="type map is not UTF-8 text")
    (tmp_path / "d.json").mkdir()
    _err(read_type_map, tmp_path / "d.json", match="type map is a directory")


def test_save_tiff_errors(tmp_path):
    a = CellState(np.array([[0, 1]]), [0, 1])
    b = CellState(np.array([[0, 1]]), [0, 2])
    _err(save_tiff, tmp_path / "x.tif", [a, b], match=r"cell 1 has type 1 in frame 0 and type 2 in frame 1; one TIFF")
    _err(save_tiff, tmp_path / "x.tif", [], match="no states to write")
    _err(save_tiff, tmp_path / "x.tif", [a, CellState(np.zeros((2, 2), int), [0])], match="mixed lattice sizes")
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------ cellpose
class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("touch pwned",))


class _Custom:
    pass


def _seg(path, payload):
    """Write ``payload`` the way numpy.save writes a pickled dict (0-d object array)."""
    arr = np.empty((), dtype=object)
    arr[()] = payload
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "|O", "fortran_order": False, "shape": ()})
        pickle.dump(arr, f, protocol=3)
    return path


def test_cellpose_malicious_pickle_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = _seg(tmp_path / "evil_seg.npy", {"masks": np.zeros((2, 2), np.uint16), "x": _Evil()})
    msg = _err(read_cellpose, p, types=1, match=r"evil_seg\.npy: refused to unpickle (posix|os|nt)\.system: only "
                                                  r"numpy arrays and plain containers are read from pickled files; "
                                                  r"export the masks as a TIFF label image instead")
    assert "tifffile.imwrite" in msg
    assert not (tmp_path / "pwned").exists()


def test_cellpose_custom_class_refused(tmp_path):
    p = _seg(tmp_path / "c_seg.npy", {"masks": np.zeros((2, 2), np.uint16), "x": _Custom()})
    _err(read_cellpose, p, types=1, match=r"refused to unpickle .*_Custom")


def test_cellpose_protocol2_pickle_accepted(tmp_path):
    # protocol-2 pickles (old Python/numpy) encode bytes through _codecs.encode
    arr = np.empty((), dtype=object)
    arr[()] = {"masks": np.array([[0, 1], [2, 2]], np.uint16), "b": b"\x00\xff"}
    with open(tmp_path / "o_seg.npy", "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "|O", "fortran_order": False, "shape": ()})
        pickle.dump(arr, f, protocol=2)
    (s,) = read_cellpose(tmp_path / "o_seg.npy", types={1: 1, 2: 2})
    np.testing.assert_array_equal(s.ids, [[0, 1], [2, 2]])


@pytest.mark.parametrize(("payload", "msg"), [
    ({"outlines": np.zeros((2, 2))}, r"no 'masks' in the cellpose file \(keys: outlines\)"),
    ({"masks": [[0, 1]]}, r"'masks' must be an array, got list"),
    ({"masks": np.array([[0, 0.5]])}, r"cell ids must be integers, got the value 0\.5 at index \[0, 1\]"),
    ({"masks": np.array(["a"])}, r"'masks' must be an integer label image, got dtype <U1"),
    ({"masks": np.zeros(4, np.uint16)}, r"wrong number of dimensions: masks of shape \(4,\), expected \(H, W\)"),
    ({"masks": np.zeros((0, 4), np.uint16)}, r"empty masks of shape \(0, 4\)"),
    ([1, 2], r"expected a cellpose dict with 'masks', got list"),
])
def test_cellpose_content_errors(tmp_path, payload, msg):
    p = _seg(tmp_path / "x_seg.npy", payload)
    _err(read_cellpose, p, types=1, match=r"x_seg\.npy(, frame 0)?: " + msg)


def test_cellpose_corrupt_files(tmp_path):
    p = _seg(tmp_path / "t_seg.npy", {"masks": np.zeros((20, 20), np.uint16)})
    raw = p.read_bytes()
    p.write_bytes(raw[: len(raw) - 200])
    _err(read_cellpose, p, types=1, match=r"t_seg\.npy: corrupt or truncated pickle payload")
    p.write_bytes(b"garbage, not numpy")
    _err(read_cellpose, p, types=1, match=r"t_seg\.npy: cellpose \.npy file: not a valid \.npy array")
    np.save(p, np.zeros((3,), dtype=object))
    _err(read_cellpose, p, types=1, match=r"expected a pickled dict \(a 0-d object array\)")
    np.save(p, np.zeros((30, 30), np.uint16))
    p.write_bytes(p.read_bytes()[:-10])
    _err(read_cellpose, p, types=1, match=r"truncated or corrupt: the header declares shape \(30, 30\) of uint16 "
                                          r"\(1800 bytes\) but only 1790 bytes follow")


# ------------------------------------------------------------------ PIFF
@pytest.mark.parametrize(("text", "msg"), [
    ("1 A 0 1 0 1 0 0\n1 A 0 1 0 1\n", r"line 2: expected 8 fields 'cell_id type x1 x2 y1 y2 z1 z2', got 6"),
    ("1 A a 1 0 1 0 0\n", r"line 1: x1 must be an integer, got 'a'"),
    ("1 A 0 1 -3 1 0 0\n", r"line 1: negative y1 -3"),
    ("x A 0 1 0 1 0 0\n", r"line 1: cell id must be an integer, got 'x'"),
    ("\n1 A 2 1 0 1 0 0\n", r"line 2: empty box: x1 = 2 > x2 = 1"),
    ("1 A 0 1 0 1 0 0\n1 B 2 2 0 0 0 0\n", r"line 2: cell 1 has type 'B' here but 'A' on an earlier line"),
    ("# only a comment\n\n", r"the PIFF file holds no cells"),
    ("1 A 0 1 0 1 0 0\n2 A 0 9 0 0 0 0\n", (r"line 2: box x 0\.\.9, y 0\.\.0, z 0\.\.0 lies outside the lattice "
                                           r"\(x < 4, y < 3, z < 1\)")),
])
def test_piff_errors(tmp_path, text, msg):
    p = tmp_path / "c.piff"
    p.write_text(text)
    m = _err(read_piff, p, shape=(3, 4), match=msg)
    assert m.startswith(str(p) + ": ")


def test_piff_more_errors(tmp_path):
    p = tmp_path / "c.piff"
    p.write_text("1 A 0 1 0 1 0 0\n2 Foo 0 0 0 0 0 0\n")
    _err(read_piff, p, types={"A": 1}, match=r"line 2: unknown cell type 'Foo' \(known from the types= map: Medium, A\)")
    _err(read_piff, p, types={"A": 1, "Foo": 2}, n_types=1, match=r"cell 2 has type 2, outside the declared range 1\.\.1")
    _err(read_piff, p, types={"A": -1}, match=r"type 'A' in the types= map must map to an integer >= 0, got -1")
    _err(read_piff, p, types=[1], match=r"types= for a PIFF file must be a dict")
    p.write_text("1 A 0 1 0 1 0 2\n")
    _err(read_piff, p, shape=(5, 5), match=r"boxes at z > 0 but the lattice shape \(5, 5\) is 2-D")
    assert read_piff(p)[0].shape == (3, 2, 2)
    p.write_bytes(b"\xff\xfe\x00\x01 binary")
    _err(read_piff, p, match=r"not a text PIFF file \(byte 0 is not UTF-8\)")
    _err(read_piff, tmp_path / "missing.piff", match="file not found")
    # a corrupt CC3DML beside the PIFF
    p.write_text("1 A 0 1 0 1 0 0\n")
    (tmp_path / "c.xml").write_text("<CompuCell3D><Potts>")
    _err(read_piff, p, match=r"c\.xml: corrupt CC3DML file")
    (tmp_path / "c.xml").write_text('<CompuCell3D><Potts><Dimensions x="a" y="2"/></Potts></CompuCell3D>')
    _err(read_piff, p, match=r"c\.xml: bad Potts/Dimensions")


def test_save_piff_errors(tmp_path):
    s = CellState(np.array([[0, 1, 2]]), [0, 1, 2])
    _err(save_piff, tmp_path / "a.piff", s, ["Medium", "A"], match=r"type 2 has no name in type_names")
    _err(save_piff, tmp_path / "a.piff", s, ["Medium", "A", "B C"], match=r"type 2 has the name 'B C'; PIFF type names")
    _err(save_piff, tmp_path / "a.piff", s, ["Medium", "A", "medium"], match=r"not 'Medium'")
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------ dispatch and datasets
def test_dispatch_by_content(tmp_path):
    s = _state()
    save_npz(tmp_path / "a.npz", [s])
    (tmp_path / "a.dat").write_bytes((tmp_path / "a.npz").read_bytes())
    assert detect_format(tmp_path / "a.dat") == "npz" and load_states(tmp_path / "a.dat")[0] == s
    save_tiff(tmp_path / "b.tif", [s])
    (tmp_path / "b.img").write_bytes((tmp_path / "b.tif").read_bytes())
    assert detect_format(tmp_path / "b.img") == "tiff"
    assert load_states(tmp_path / "b.img", types=tmp_path / "b.types.json")[0] == s
    save_piff(tmp_path / "c.txt", s, ["Medium", "A", "B"])
    assert detect_format(tmp_path / "c.txt") == "piff"
    np.save(tmp_path / "d.bin", s.ids)
    (tmp_path / "d.raw").write_bytes((tmp_path / "d.bin.npy").read_bytes())
    assert detect_format(tmp_path / "d.raw") == "cellpose"
    (tmp_path / "e.dat").write_bytes(b"\x00\x01\x02 nothing known")
    _err(load_states, tmp_path / "e.dat", match=r"e\.dat: unrecognised file format; supported: \.npz")
    _err(load_states, tmp_path / "nope.npz", match=r"nope\.npz: file not found")
    _err(load_states, tmp_path, match=r"is a directory; use load_dataset\(\)")


def test_dataset_errors(tmp_path):
    _err(load_dataset, tmp_path, match=r"empty dataset: no snapshot files \(\*\.npz, \*\.tif, \*\.tiff, \*\.npy, "
                                       r"\*\.piff\) in ")
    _err(load_dataset, str(tmp_path / "*.npz"), match=r"empty dataset")
    _err(load_dataset, tmp_path / "missing", match=r"missing: no such file or directory")
    save_npz(tmp_path / "a.npz", [_state((4, 5))] * 2)
    save_npz(tmp_path / "b.npz", [_state((4, 6))])
    msg = _err(load_dataset, tmp_path, match=r"mixed lattice sizes in one dataset: ")
    assert re.search(r"a\.npz \(frame 0\) has shape \(4, 5\) but .*b\.npz \(frame 0\) has shape \(4, 6\)", msg)
    (tmp_path / "b.npz").write_bytes(b"PK\x03\x04 broken")
    _err(load_dataset, tmp_path, match=r"b\.npz: not a valid \.npz \(zip\) file, or truncated")
    (tmp_path / "b.npz").unlink()
    ds = load_dataset([tmp_path / "a.npz", tmp_path / "a.npz"])
    assert len(ds) == 4 and ds[0] == ds[2]
    _err(load_dataset, tmp_path, n_types=0, match=r"a\.npz, frame 0: cell \d has type \d, outside the declared range")


# ------------------------------------------------------------------ size limits and rarer paths
def test_size_limits(tmp_path, monkeypatch):
    from neuralcpm_plugin.io import cellpose as cp_mod
    from neuralcpm_plugin.io import npz as npz_mod
    from neuralcpm_plugin.io import piff as piff_mod
    from neuralcpm_plugin.io import tiff as tiff_mod

    s = _state((8, 8))
    save_npz(tmp_path / "a.npz", [s])
    save_tiff(tmp_path / "a.tif", [s, s])
    np.save(tmp_path / "a_seg.npy", {"masks": s.ids})
    save_piff(tmp_path / "a.piff", s, ["Medium", "A", "B"])
    monkeypatch.setattr(npz_mod, "MAX_BYTES", 100)
    _err(read_npz, tmp_path / "a.npz", match=r"member 'data\.npy' is \d+ bytes uncompressed, more than the limit 100")
    monkeypatch.setattr(tiff_mod, "MAX_SITES", 100)
    _err(read_tiff, tmp_path / "a.tif", match=r"the image of shape \(2, 8, 8\) is larger than the limit of 100 pixels")
    monkeypatch.setattr(cp_mod, "MAX_BYTES", 100)
    _err(read_cellpose, tmp_path / "a_seg.npy", types=1, match=r"the file is \d+ bytes, more than the limit 100")
    monkeypatch.setattr(piff_mod, "MAX_SITES", 10)
    _err(read_piff, tmp_path / "a.piff", shape=(8, 8), match=r"lattice shape \(8, 8\) is larger than the limit of 10")
    monkeypatch.undo()
    _err(read_piff, tmp_path / "a.piff", shape=(0, 8), match=r"bad lattice shape \(0, 8\)")


def test_tiff_pages_of_different_shapes(tmp_path):
    with tifffile.TiffWriter(tmp_path / "m.tif") as w:
        w.write(np.zeros((4, 5), np.uint16), photometric="minisblack")
        w.write(np.zeros((6, 5), np.uint16), photometric="minisblack")
    _err(read_tiff, tmp_path / "m.tif", types=1, match=r"page 1 has shape \(6, 5\) and pixel type uint16 but page 0 "
                                                         r"has \(4, 5\) and uint16; a label stack needs pages of one")


def test_cellpose_refused_content(tmp_path):
    structured = np.zeros(3, dtype=[("a", "<i4"), ("b", "<f4")])
    p = _seg(tmp_path / "s_seg.npy", {"masks": np.zeros((2, 2), np.uint16), "x": structured})
    _err(read_cellpose, p, types=1, match=r"refused pickle content \(refused (dtype|a structured)")
    p = _seg(tmp_path / "m_seg.npy", {"masks": np.ma.masked_array(np.zeros((2, 2), np.uint16))})
    _err(read_cellpose, p, types=1, match=r"refused to unpickle numpy\.ma\.core\._mareconstruct")
    np.save(tmp_path / "v_seg.npy", structured)  # a plain (non-pickled) structured array
    _err(read_cellpose, tmp_path / "v_seg.npy", types=1, match=r"'masks' must be an integer label image, got dtype")
    # bytearray(n) would allocate n bytes: refused
    bomb = (b"\x80\x02c__builtin__\nbytearray\nJ\x00\x00\x00\x40\x85R.")
    _err(safe_unpickle, bomb, path="b_seg.npy",
         match=r"b_seg\.npy: refused pickle content \(refused a bytes/bytearray call\)")


def test_cc3dml_bad_celltype(tmp_path):
    (tmp_path / "c.piff").write_text("1 A 0 1 0 1 0 0\n")
    (tmp_path / "c.xml").write_text('<CompuCell3D><Plugin Name="CellType"><CellType TypeName="A" TypeId="x"/>'
                                    "</Plugin></CompuCell3D>")
    _err(read_piff, tmp_path / "c.piff", match=r"c\.xml: bad CellType entry")
