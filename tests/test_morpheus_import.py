"""MorpheusML import and the evaluator, validated on the real Morpheus models of P1, and the bipolar model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from lxml import etree

from morpheus_xml import load_model
from morpheus_xml.evaluator import MorpheusEvaluator
from morpheus_xml.importer import parse_model
from neuralcpm_plugin.errors import ModelImportError
from neuralcpm_plugin.lattice import CellState

TESTS = Path(__file__).resolve().parent
FIX = TESTS / "fixtures" / "morpheus"
REF = TESTS / "fixtures" / "reference"
P1 = sorted((FIX / "P1").glob("P1_run_*.xml"))
SHARED = Path(__file__).resolve().parents[2] / "shared"
XSD = SHARED / "morpheus" / "morpheus-2.2.4-relaxed.xsd"
sys.path.insert(0, str(FIX))
from morpheus_test_helpers import random_attempts, voronoi_state

# shared/reference-data/README.md, scenario P1 (J per unordered Moore pair)
P1_J = np.array([[0.0, 0.625, 0.25], [0.625, 0.25, 1.125], [0.25, 1.125, 0.25]])
P1_LAM, P1_TARGET, P1_T = 0.5, 100.0, 1.0


def p1_energy(ids, types):
    """H of the README: Σ over unordered Moore pairs of J·[σi≠σj] + Σ_c λ (V − V*)², brute force."""
    e = 0.0
    for dy, dx in ((0, 1), (1, 0), (1, 1), (1, -1)):
        nb = np.roll(ids, (-dy, -dx), (0, 1))
        d = nb != ids
        e += P1_J[types[ids], types[nb]][d].sum()
    v = np.bincount(ids.ravel(), minlength=len(types))[1:]
    v = v[types[1:] > 0]
    return e + P1_LAM * ((v - P1_TARGET) ** 2).sum()


def test_p1_fixtures_are_the_shared_models():
    assert len(P1) == 16
    src = SHARED / "reference-data" / "models" / "P1_morpheus"
    if src.is_dir():
        for p in P1:
            assert p.read_bytes() == (src / p.name).read_bytes()


@pytest.mark.parametrize("path", P1[:4], ids=lambda p: p.stem)
def test_evaluator_on_real_p1_models_matches_readme_hamiltonian(path):
    """The text evaluator on Morpheus's own P1 models = H(after) − H(before) of the README's Hamiltonian."""
    ev = MorpheusEvaluator(path)
    assert ev.temperature == P1_T and ev.scaling == 1.0 and ev.surface_order == 2 and ev.copy_order == 2
    frames = np.load(REF / "initial_frames.npz")["P1_morpheus"]
    rng = np.random.default_rng(int(path.stem[-2:]))
    fr = frames[int(path.stem[-2:]) - 1]
    st0 = CellState.from_maps(fr[0], fr[1])
    for state in (st0, voronoi_state((100, 100), 40, 2, rng)):
        ids, types = state.ids, state.types
        h0 = p1_energy(ids, types)
        for site, new in random_attempts(state, rng, 60):
            after = ids.copy()
            after[site] = new
            want = p1_energy(after, types) - h0
            assert ev.delta(ids, types, site, new) == pytest.approx(want, rel=1e-12, abs=1e-9)


@pytest.mark.parametrize("path", P1[:4], ids=lambda p: p.stem)
def test_import_p1_gives_readme_parameters_and_frame0(path):
    m = load_model(path)
    terms = {t.kind: t for t in m.hamiltonian.terms}
    assert set(terms) == {"contact", "volume"}
    np.testing.assert_array_equal(terms["contact"].J.detach().numpy(), P1_J)
    assert terms["contact"].order == 2
    np.testing.assert_array_equal(terms["volume"].lam.detach().numpy()[1:], [P1_LAM] * 2)
    np.testing.assert_array_equal(terms["volume"].target.detach().numpy()[1:], [P1_TARGET] * 2)
    assert m.hamiltonian.temperature == P1_T and m.hamiltonian.type_names == ["medium", "ct1", "ct2"]
    assert m.meta["stepper"] == "random" and m.meta["copy_order"] == 2 and m.meta["random_seed"] == 1000 + int(
        path.stem[-2:])
    fr = np.load(REF / "initial_frames.npz")["P1_morpheus"][int(path.stem[-2:]) - 1]
    assert m.state == CellState.from_maps(fr[0], fr[1])


def test_exact_sampler_under_imported_p1_reproduces_p1_statistics():
    """16 runs (each P1 model, its own seed) to 500 MCS; statistics at 100 and 500 MCS agree with Morpheus's
    (|ours − theirs| ≤ 4·√(SE_ours² + SE_theirs²), the criterion of tests/test_reference_agreement.py)."""
    from neuralcpm_plugin.metrics.stats import summary_stats
    from neuralcpm_plugin.sampling.exact import ExactSampler
    ref = json.loads((REF / "summary_stats_subset.json").read_text())["scenarios"]["P1_morpheus"]
    check = (100, 500)
    rows = []
    for path in P1:
        m = load_model(path)
        s = ExactSampler(m.state, m.hamiltonian, seed=m.meta["seed"])
        done, r = 0, []
        for mcs in check:
            s.step(mcs - done)
            done = mcs
            r.append(summary_stats(s.state))
        rows.append(r)
    failures = []
    for k, theirs in ref["mean"].items():
        a = np.array([[r[j][k] for j in range(len(check))] for r in rows])
        m, se = a.mean(0), a.std(0, ddof=1) / np.sqrt(len(a))
        for j, mcs in enumerate(check):
            jj = ref["mcs"].index(mcs)
            tm, ts = theirs[jj], ref["se"][k][jj]
            ok = m[j] == tm if (se[j] == 0 and ts == 0) else abs(m[j] - tm) <= 4 * np.sqrt(se[j] ** 2 + ts ** 2)
            if not ok:
                failures.append(f"{k}@{mcs}: ours {m[j]:.4g}±{se[j]:.2g} vs Morpheus {tm:.4g}±{ts:.2g}")
    assert not failures, failures


# ------------------------------------------------------------------------------------------------------
_MODEL = """<?xml version='1.0' encoding='UTF-8'?>
<MorpheusModel version="4">
  <Global>{glob}</Global>
  <Space><Lattice class="square"><Size symbol="size" value="30, 24, 0"/>
    <BoundaryConditions><Condition type="periodic" boundary="x"/><Condition type="periodic" boundary="y"/>
    </BoundaryConditions><Neighborhood><Order>2</Order></Neighborhood></Lattice></Space>
  <Time><StartTime value="0"/><StopTime value="10"/><RandomSeed value="5"/></Time>
  <CellTypes><CellType name="medium" class="medium"/>
    <CellType name="A" class="biological"><VolumeConstraint target="20" strength="0.3"/>{ctA}</CellType>
    <CellType name="B" class="biological"><VolumeConstraint target="30" strength="0.7"/></CellType></CellTypes>
  <CPM><Interaction default="0.5"><Contact type1="A" type2="medium" value="3"/><Contact type1="A" type2="B"
      value="2*1.5"/><Contact type1="B" type2="B" value="1"/></Interaction>
    <MonteCarloSampler stepper="random"><MCSDuration value="1"/><Neighborhood><Order>1</Order></Neighborhood>
      <MetropolisKinetics temperature="1.5"/></MonteCarloSampler>
    {surface}</CPM>
  <CellPopulations><Population type="A" size="0">{popA}</Population>
    <Population type="B" size="0">{popB}</Population></CellPopulations>
</MorpheusModel>
"""

CELLS = (('<Cell id="3"><Nodes>1, 1, 0;2, 1, 0;2, 2, 0</Nodes></Cell>'
         '<Cell id="7"><Nodes>29, 5, 0;30, 5, 0;-1, 6, 0</Nodes></Cell>'), '<Cell id="4"><Nodes>10, 10, 0</Nodes></Cell>')


def _model(tmp_path, name="m.xml", glob="", ctA="", surface=None, popA=CELLS[0], popB=CELLS[1]):
    if surface is None:
        surface = '<ShapeSurface scaling="none"><Neighborhood><Order>2</Order></Neighborhood></ShapeSurface>'
    p = tmp_path / name
    p.write_text(_MODEL.format(glob=glob, ctA=ctA, surface=surface, popA=popA, popB=popB))
    return p


@pytest.mark.parametrize("scaling,order,div", [("none", 2, 1), ("size", 2, 8), ("norm", 2, 3), ("norm", 6, 18),
                                               ("size", 6, 28), ("norm", 3, 5), (None, 4, 11)])
def test_contact_scaling_conversion_matches_morpheus_formula(tmp_path, scaling, order, div):
    attr = f' scaling="{scaling}"' if scaling else ""
    surf = f'<ShapeSurface{attr}><Neighborhood><Order>{order}</Order></Neighborhood></ShapeSurface>'
    p = _model(tmp_path, surface=surf)
    m = load_model(p)
    J = m.hamiltonian.term("contact").J.detach().numpy()
    want = np.array([[0, 3, 0.5], [3, 0.5, 3], [0.5, 3, 1]]) / div   # unlisted pairs: default 0.5
    want[0, 0] = 0.0
    np.testing.assert_allclose(J, want, rtol=1e-15)
    assert m.meta["contact_order"] == order and m.meta["copy_order"] == 1
    assert m.meta["scaling"] == (scaling or "norm")
    # the converted package Hamiltonian and Morpheus's formula (evaluator) agree attempt by attempt
    ev = MorpheusEvaluator(p)
    rng = np.random.default_rng(order)
    state = voronoi_state((24, 30), 9, 2, rng)
    for site, new in random_attempts(state, rng, 40, order=1):
        want = ev.delta(state.ids, state.types, site, new)
        assert m.hamiltonian.delta_np(state, site, new) == pytest.approx(want, rel=1e-12, abs=1e-12)


def test_cells_nodes_ids_and_wrapping(tmp_path):
    m = load_model(_model(tmp_path))
    s = m.state
    assert s.ids[1, 1] == 3 and s.ids[2, 2] == 3 and s.types[3] == 1
    assert s.ids[5, 29] == 7 and s.ids[5, 0] == 7 and s.ids[6, 29] == 7    # 30 → 0, −1 → 29
    assert s.ids[10, 10] == 4 and s.types[4] == 2
    assert sorted(s.cell_ids().tolist()) == [3, 4, 7]


def test_haptotaxis_field_and_medium_folding(tmp_path):
    glob = '<Field symbol="c" value="0.1*l.x + l.y*l.y"/><Constant symbol="k" value="2"/>'
    ctA = '<Haptotaxis attractant="c" strength="k"/>'
    p = _model(tmp_path, glob=glob, ctA=ctA)
    m = load_model(p)
    ext = m.hamiltonian.term("external")
    assert ext.spec()["params"]["mu"] == [0.0, -2.0, 0.0]
    f = ext.field.numpy()
    assert f[3, 7] == pytest.approx(0.7 + 9)
    # a medium Haptotaxis becomes +strength on every biological type (H changes by a constant only)
    text = p.read_text().replace('<CellType name="medium" class="medium"/>',
                                 '<CellType name="medium" class="medium"><Haptotaxis attractant="c" strength="1"/>'
                                 '</CellType>')
    p2 = tmp_path / "m2.xml"
    p2.write_text(text)
    assert load_model(p2).hamiltonian.term("external").spec()["params"]["mu"] == [0.0, -1.0, 1.0]


@pytest.mark.parametrize("snippet,where,name", [
    ("ctA", "<Chemotaxis field=\"c\" strength=\"1\"/>", "Chemotaxis"),
    ("ctA", "<ConnectivityConstraint/>", "ConnectivityConstraint"),
    ("glob", "<System solver=\"euler\" time-step=\"1\"/>", "System"),
    ("popA", "<InitVoronoi/>", "InitVoronoi"),
])
def test_unsupported_elements_are_named(tmp_path, snippet, where, name):
    kw = {snippet: where}
    if snippet == "ctA":
        kw["glob"] = '<Field symbol="c" value="1"/>'
    p = _model(tmp_path, **kw)
    with pytest.raises(ModelImportError, match=name) as e:
        load_model(p)
    assert str(p) in str(e.value)


def test_bad_files_are_model_import_errors(tmp_path):
    p = tmp_path / "bad.xml"
    p.write_text("<MorpheusModel version='4'><Space>")
    with pytest.raises(ModelImportError, match="well-formed"):
        load_model(p)
    p.write_text("<MorpheusModel version='3'/>")
    with pytest.raises(ModelImportError, match="version"):
        load_model(p)
    text = _model(tmp_path).read_text().replace('type="periodic" boundary="y"', 'type="noflux" boundary="y"')
    p.write_text(text)
    with pytest.raises(ModelImportError, match="periodic"):
        load_model(p)


def test_init_circle_and_rectangle_layouts(tmp_path):
    popA = ('<InitCircle mode="random" number-of-cells="15"><Dimensions center="size.x/2, size.y/2, 0" '
            'radius="size.y/4"/></InitCircle>')
    popB = ('<InitRectangle mode="grid" number-of-cells="6"><Dimensions origin="0, 0, 0" size="12, 8, 0"/>'
            '</InitRectangle><InitCircle mode="regular" number-of-cells="7"><Dimensions center="25, 4, 0" '
            'radius="3"/></InitCircle>')
    s = load_model(_model(tmp_path, popA=popA, popB=popB)).state
    a = [c for c in s.cell_ids() if s.types[c] == 1]
    b = [c for c in s.cell_ids() if s.types[c] == 2]
    assert len(a) == 15 and len(b) == 13
    assert all(s.volumes()[c] == 1 for c in s.cell_ids())
    for c in a:
        y, x = np.argwhere(s.ids == c)[0]
        assert np.hypot(x - 15, y - 12) <= 6
    grid = sorted(tuple(np.argwhere(s.ids == c)[0]) for c in b[:6])
    assert grid == [(2, 2), (2, 6), (2, 10), (6, 2), (6, 6), (6, 10)]   # 3 x 2 grid of 4x4 blocks, (y, x) centres
    # same seed → same layout; another seed → another
    s2 = load_model(_model(tmp_path, name="m2.xml", popA=popA, popB=popB)).state
    assert s2 == s
    s3 = parse_model(_model(tmp_path, name="m3.xml", popA=popA, popB=popB), seed=99).state
    assert not np.array_equal(s3.ids, s.ids)


def test_tiff_reader_population(tmp_path):
    import tifffile
    img = np.zeros((6, 8), np.uint16)
    img[1:3, 1:3] = 40
    img[4, 5:7] = 9
    tifffile.imwrite(tmp_path / "cells.tif", img)
    keep = '<TIFFReader filename="cells.tif" keepIDs="true" offset="2, 3, 0"/>'
    s = load_model(_model(tmp_path, popA=keep, popB="")).state
    assert s.ids[4, 3] == 40 and s.ids[7, 7] == 9 and s.types[40] == 1 and s.volumes()[40] == 4
    renum = '<TIFFReader filename="cells.tif"/>'       # no offset: centred, as Morpheus does
    s = load_model(_model(tmp_path, name="n.xml", popA=renum, popB="")).state
    assert sorted(s.cell_ids().tolist()) == [1, 2]
    assert s.ids[9 + 1, 11 + 1] == 1 and s.ids[9 + 4, 11 + 5] == 2
    bad = '<TIFFReader filename="cells.tif" keep_ID="true"/>'
    with pytest.raises(ModelImportError, match="keepIDs"):
        load_model(_model(tmp_path, name="k.xml", popA=bad, popB=""))
    with pytest.raises(ModelImportError, match="cannot read TIFF"):
        load_model(_model(tmp_path, name="k2.xml", popA='<TIFFReader filename="nope.tif"/>', popB=""))


# ------------------------------------------------------------------------------------------------------
def test_bipolar_model_imports_with_norm_scaling_and_directed_motion():
    path = FIX / "bipolar_test.xml"
    if XSD.is_file():
        assert etree.XMLSchema(etree.parse(str(XSD))).validate(etree.parse(str(path)))
    m = load_model(path)
    assert m.meta["scaling"] == "norm" and m.meta["contact_order"] == 6 and m.hamiltonian.temperature == 2.0
    J = m.hamiltonian.term("contact").J.detach().numpy()
    np.testing.assert_allclose(J, np.array([[0, 18, 18], [18, 5.4, 18], [18, 18, 5.4]]) / 18.0 * (1 - np.eye(3) *
                                                                                               [1, 0, 0]), rtol=1e-14)
    dm = m.hamiltonian.term("directed_motion").spec()["params"]
    assert dm["strength"] == [0.0, 1.0, 1.0]
    assert dm["direction"][1] == {"mode": "band", "axis": 1, "lo": 0.4, "hi": 0.6, "sense": "inward"}
    assert dm["direction"][2] == {"mode": "band", "axis": 1, "lo": 0.4, "hi": 0.6, "sense": "outward"}
    s = m.state
    assert len(s.cell_ids()) == 24 and (s.volumes()[1:] == 1).all()
    assert np.bincount(s.types[s.cell_ids()]).tolist() == [0, 12, 12]


def test_package_sampler_under_bipolar_model_produces_bipolar_organisation():
    """Type 2 at the two poles of the x axis, type 1 in the centre band: the fraction of positional variance
    along the principal axis of the type-2 pixels (SPEC.md → Metrics) is high for type 2, low for type 1."""
    from neuralcpm_plugin.metrics.paper import bipolar_organisation
    from neuralcpm_plugin.sampling.exact import run_exact
    m = load_model(FIX / "bipolar_test.xml")
    before = bipolar_organisation(m.state)
    assert 0.35 < before[1] < 0.65 and 0.35 < before[2] < 0.65
    res = run_exact(m.state, m.hamiltonian, 400, seed=1)
    after = bipolar_organisation(res.final)
    assert after[2] > 0.65 and after[1] < 0.35, after
    # and the axis is x: type-1 pixels sit nearer the centre column than type-2 pixels (torus distance)
    tm = res.final.type_map()
    W = tm.shape[1]
    xs = np.arange(W)
    colfrac = {t: (tm == t).sum(0) / (tm == t).sum() for t in (1, 2)}
    # circular spread of each type's columns around its own circular mean
    spread = {}
    for t, w in colfrac.items():
        ang = 2 * np.pi * xs / W
        r = np.hypot((w * np.cos(ang)).sum(), (w * np.sin(ang)).sum())
        spread[t] = 1 - r
    assert spread[1] < spread[2]


def test_cell_type_properties_feed_expressions_and_checkpoint_boundary_values_are_accepted(tmp_path):
    ctA = ('<Property symbol="s" value="0.25"/><DirectedMotion strength="2*s" direction="1, 0, 0"/>')
    p = _model(tmp_path, ctA=ctA)
    text = p.read_text().replace("</CellPopulations>", "<BoundaryValues/></CellPopulations>")
    p.write_text(text)
    dm = load_model(p).hamiltonian.term("directed_motion").spec()["params"]
    assert dm["strength"] == [0.0, 0.5, 0.0]
    assert dm["direction"][1] == {"mode": "constant", "vector": [0.0, 1.0]}
    bad = _model(tmp_path, name="b.xml", ctA='<DirectedMotion strength="cell.volume" direction="1, 0, 0"/>')
    with pytest.raises(ModelImportError, match="cell.volume"):
        load_model(bad)
