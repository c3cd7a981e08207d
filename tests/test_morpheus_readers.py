"""Morpheus outputs as snapshots: TiffPlotter stacks and .xml.gz checkpoints."""

from __future__ import annotations

import gzip
import sys
from pathlib import Path

import numpy as np
import pytest
from lxml import etree

from morpheus_xml.export import build_xml
from morpheus_xml.readers import checkpoint_time, find_checkpoints, read_checkpoint, read_tiff_stack
from morpheus_xml.run import continue_from_checkpoint
from neuralcpm_plugin.errors import DataError

FIX = Path(__file__).resolve().parent / "fixtures" / "morpheus"
sys.path.insert(0, str(FIX))
from morpheus_test_helpers import random_analytic_hamiltonian, voronoi_state


def _write_morpheus_tiff(path, frames, medium_id=7):
    """Morpheus's TiffPlotter layout: one int16 page per (time, channel), channels cell.id then cell.type."""
    import tifffile
    with tifffile.TiffWriter(path) as tw:
        for s in frames:
            ids = np.where(s.ids == 0, medium_id, s.ids).astype(np.int16)   # Morpheus's medium cell has an id
            tw.write(ids, contiguous=False)
            tw.write(s.type_map().astype(np.int16), contiguous=False)


def test_tiff_stack_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    frames = [voronoi_state((12, 15), 6, 2, rng) for _ in range(3)]
    p = tmp_path / "cell.id_cell.type.tif"
    _write_morpheus_tiff(p, frames)
    got = read_tiff_stack(p)
    assert len(got) == 3
    for a, b in zip(got, frames):
        assert a == b
    q = tmp_path / "other.tif"
    _write_morpheus_tiff(q, frames)
    with pytest.raises(DataError, match="channels"):
        read_tiff_stack(q)
    assert read_tiff_stack(q, channels=["cell.id", "cell.type"])[1] == frames[1]


def test_tiff_stack_errors_name_the_file(tmp_path):
    import tifffile
    p = tmp_path / "cell.id_cell.type.tif"
    with tifffile.TiffWriter(p) as tw:
        for _ in range(3):
            tw.write(np.zeros((5, 5), np.int16), contiguous=False)
    with pytest.raises(DataError, match="whole number") as e:
        read_tiff_stack(p)
    assert str(p) in str(e.value)
    bad = tmp_path / "cell.id_cell.type_x.tif"
    bad.write_bytes(b"not a tiff")
    with pytest.raises(DataError, match="TIFF"):
        read_tiff_stack(bad, channels=["cell.id", "cell.type"])


def _checkpoint_from(root, path, time, shift_cell=None, W=None, H=None):
    root.find("Time/StartTime").set("value", str(time))
    medium = root.find("CellTypes/CellType").get("name")
    pops = root.find("CellPopulations")
    mp = etree.Element("Population", type=medium, size="1")
    etree.SubElement(mp, "Cell", id="0")
    pops.insert(0, mp)
    if shift_cell is not None:   # Morpheus stores nodes unwrapped after boundary crossings
        for c in root.iter("Cell"):
            if c.get("id") == str(shift_cell):
                nodes = [[int(v) for v in n.split(",")] for n in c.findtext("Nodes").split(";")]
                c.find("Nodes").text = ";".join(f"{x + W}, {y - 2 * H}, {z}" for x, y, z in nodes)
    with gzip.open(path, "wb") as f:
        f.write(etree.tostring(root))


def test_checkpoint_reading_and_continuation(tmp_path):
    rng = np.random.default_rng(4)
    ham = random_analytic_hamiltonian(rng, (14, 16), 2)
    state = voronoi_state((14, 16), 5, 2, rng)
    root = build_xml(ham, state, mcs=10, save_interval=10)
    cp = tmp_path / "neuralcpm00010.xml.gz"
    _checkpoint_from(root, cp, 10, shift_cell=int(state.cell_ids()[0]), W=16, H=14)
    _checkpoint_from(build_xml(ham, state, mcs=10), tmp_path / "neuralcpm00005.xml.gz", 5)
    got = read_checkpoint(cp)
    assert got == state and got.meta["time"] == 10.0
    assert checkpoint_time(cp) == 10.0
    assert [p.name for p in find_checkpoints(tmp_path)] == ["neuralcpm00005.xml.gz", "neuralcpm00010.xml.gz"]
    # continuation: medium population removed, time/seed set, field data replaced bit-exactly
    sym = root.find("Global/Field").get("symbol")
    new = rng.normal(size=(14, 16))
    out = continue_from_checkpoint(cp, tmp_path / "next.xml", stop_time=20, seed=77, save_interval=10,
                                   fields={sym: new})
    r = etree.parse(str(out)).getroot()
    assert [p.get("type") for p in r.findall("CellPopulations/Population")] == ["type1", "type2"]
    assert r.find("Time/StartTime").get("value") == "10" and r.find("Time/StopTime").get("value") == "20"
    assert r.find("Time/RandomSeed").get("value") == "77" and r.find("Time/SaveInterval").get("value") == "10"
    from morpheus_xml.evaluator import MorpheusEvaluator
    ev = MorpheusEvaluator(out)
    cts = r.findall("CellTypes/CellType")
    t = next(i for i, c in enumerate(cts) if c.find("Haptotaxis") is not None and
             c.find("Haptotaxis").get("attractant") == sym)
    assert np.array_equal(ev.hapto[t][0][1], new)
    assert read_checkpoint(out) == state


def test_checkpoint_errors(tmp_path):
    p = tmp_path / "x.xml.gz"
    p.write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(DataError, match="gzip"):
        read_checkpoint(p)
    p.write_bytes(gzip.compress(b"<Other/>"))
    with pytest.raises(DataError, match="MorpheusModel"):
        read_checkpoint(p)
