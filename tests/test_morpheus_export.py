"""MorpheusML export: ΔH equivalence from the written text, round trip, schema validity, neural fields, CLI."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lxml import etree

from morpheus_xml.evaluator import MorpheusEvaluator
from morpheus_xml.export import build_xml, default_layout, direction_expression, export_model, main
from morpheus_xml.importer import load_model, parse_model
from neuralcpm_plugin.bundle import save_bundle
from neuralcpm_plugin.errors import ExportError
from neuralcpm_plugin.hamiltonian.base import Hamiltonian, LatticeSpec
from neuralcpm_plugin.lattice import CellState

FIX = Path(__file__).resolve().parent / "fixtures" / "morpheus"
sys.path.insert(0, str(FIX))
from morpheus_test_helpers import ToyNeural, random_analytic_hamiltonian, random_attempts, voronoi_state

SHARED = Path(__file__).resolve().parents[2] / "shared"
XSD = SHARED / "morpheus" / "morpheus-2.2.4-relaxed.xsd"


@pytest.fixture(scope="module")
def schema():
    if not XSD.is_file():
        pytest.skip("../shared/morpheus schema not available")
    return etree.XMLSchema(etree.parse(str(XSD)))


def _text(root) -> str:
    return etree.tostring(root, pretty_print=True, xml_declaration=True, encoding="UTF-8").decode()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2 ** 32 - 1), contact_order=st.integers(1, 4), copy_order=st.integers(1, 2),
       n_types=st.integers(1, 3), H=st.integers(9, 16), W=st.integers(9, 16))
def test_delta_from_exported_text_equals_bundle(seed, contact_order, copy_order, n_types, H, W):
    """Morpheus's formulas applied to the *written XML* give the bundle's ΔH for random states and attempts."""
    rng = np.random.default_rng(seed)
    ham = random_analytic_hamiltonian(rng, (H, W), n_types, contact_order=contact_order, copy_order=copy_order,
                                      T=float(rng.uniform(0.5, 3)))
    state = voronoi_state((H, W), int(rng.integers(2, 9)), n_types, rng)
    text = _text(build_xml(ham, state, mcs=10, seed=int(rng.integers(1000))))
    ev = MorpheusEvaluator(text)
    assert ev.temperature == pytest.approx(ham.temperature, abs=0, rel=0)
    # evaluate on other random states of the same lattice too: the model text, not its population, matters
    for s in (state, voronoi_state((H, W), int(rng.integers(2, 9)), n_types, rng)):
        for site, new in random_attempts(s, rng, 25, order=copy_order):
            want = ham.delta_np(s, site, new)
            got = ev.delta(s.ids, s.types, site, new)
            assert abs(got - want) <= 1e-6 * max(1.0, abs(want)), (site, new, got, want)


def test_round_trip_parameters_and_state(tmp_path, schema):
    rng = np.random.default_rng(7)
    ham = random_analytic_hamiltonian(rng, (24, 30), 2, contact_order=3, copy_order=2, T=1.7)
    state = voronoi_state((24, 30), 10, 2, rng)
    root = build_xml(ham, state, mcs=50, seed=3)
    path = tmp_path / "m.xml"
    path.write_text(_text(root))
    assert schema.validate(etree.parse(str(path))), schema.error_log
    imp = load_model(path)
    assert imp.state == state
    assert imp.meta["temperature"] == 1.7 and imp.meta["stepper"] == "random"
    assert imp.meta["copy_order"] == 2 and imp.meta["contact_order"] == 3 and imp.meta["scaling"] == "none"
    orig = {t.kind: t for t in ham.terms}
    got = {t.kind: t for t in imp.hamiltonian.terms if t.kind != "external"}
    np.testing.assert_allclose(got["contact"].J.detach().numpy(),
                               orig["contact"].J.detach().numpy() * orig["contact"].scale_value(), rtol=1e-15)
    np.testing.assert_array_equal(got["volume"].lam.detach().numpy()[1:], orig["volume"].lam.detach().numpy()[1:])
    np.testing.assert_array_equal(got["volume"].target.detach().numpy()[1:],
                                  orig["volume"].target.detach().numpy()[1:])
    dm_o, dm_g = orig["directed_motion"].spec()["params"], got["directed_motion"].spec()["params"]
    np.testing.assert_allclose(dm_g["strength"], dm_o["strength"], rtol=1e-15)
    for a, b in zip(dm_o["direction"][1:], dm_g["direction"][1:]):
        if a["mode"] == "constant":
            va = np.asarray(a["vector"]) / np.linalg.norm(a["vector"])
            np.testing.assert_allclose(np.asarray(b["vector"]) / np.linalg.norm(b["vector"]), va, rtol=1e-12)
        else:
            assert a == b
    # external potential: per-type site potential μ_τ·scale·φ is reproduced
    ext = orig["external"]
    want = np.outer(ext.spec()["params"]["mu"], ext.field.numpy().ravel()) * ext.scale_value()
    have = np.zeros_like(want)
    for t in imp.hamiltonian.terms:
        if t.kind == "external":
            have += np.outer(t.spec()["params"]["mu"], t.field.numpy().ravel())
    np.testing.assert_allclose(have[1:], want[1:], rtol=1e-14, atol=0)


def test_exported_models_validate_and_carry_the_documented_elements(tmp_path, schema):
    rng = np.random.default_rng(1)
    ham = random_analytic_hamiltonian(rng, (20, 20), 2)
    root = build_xml(ham, voronoi_state((20, 20), 6, 2, rng), mcs=200, seed=9, save_interval=50)
    assert schema.validate(root), schema.error_log
    assert root.get("version") == "4"
    assert root.find("CPM/ShapeSurface").get("scaling") == "none"
    assert root.find("CPM/MonteCarloSampler").get("stepper") == "random"
    assert root.find("Time/RandomSeed").get("value") == "9"
    assert root.find("Time/SaveInterval").get("value") == "50"
    tp = root.find("Analysis/TiffPlotter")
    assert tp.get("OME-header") == "false" and [c.get("symbol-ref") for c in tp] == ["cell.id", "cell.type"]
    assert root.find("Analysis/Logger/Output/TextOutput").get("file-format") == "csv"
    for ct in root.findall("CellTypes/CellType")[1:]:
        h = ct.find("Haptotaxis")
        assert h.get("strength") == "-1" and root.find(f"Global/Field[@symbol='{h.get('attractant')}']") is not None
    assert [c.get("class") for c in root.findall("CellTypes/CellType")] == ["medium", "biological", "biological"]


def test_wrapped_cells_are_written_unwrapped_and_read_back_wrapped(tmp_path):
    ids = np.zeros((10, 12), np.int32)
    ids[4:6, [0, 1, 11]] = 1      # straddles the x boundary
    ids[[0, 9], 5] = 2            # straddles the y boundary
    state = CellState(ids, np.array([0, 1, 2], np.int32))
    ham = random_analytic_hamiltonian(np.random.default_rng(0), (10, 12), 2, with_external=False)
    root = build_xml(ham, state, mcs=5)
    nodes = {c.get("id"): c.findtext("Nodes") for c in root.iter("Cell")}
    assert "-1, 4, 0" in nodes["1"] and "11, 4, 0" not in nodes["1"]
    assert "5, -1, 0" in nodes["2"] or "5, 10, 0" in nodes["2"]
    p = tmp_path / "w.xml"
    p.write_text(_text(root))
    assert load_model(p).state == state


def test_direction_expressions_are_the_authors_form():
    e = direction_expression({"mode": "band", "axis": 1, "lo": 0.4, "hi": 0.6, "sense": "inward"})
    assert e == "sign(size.x/2-cell.center.x)*((cell.center.x<size.x*0.4) or (cell.center.x>size.x*0.6)), 0, 0"
    assert direction_expression({"mode": "constant", "vector": [0.5, -1.0]}) == "-1, 0.5, 0"


def test_neural_terms_become_potential_fields_with_measured_error(tmp_path, capsys):
    rng = np.random.default_rng(3)
    shape = (16, 18)
    base = random_analytic_hamiltonian(rng, shape, 2, with_external=False, with_dm=False)
    toy = ToyNeural(2, shape, seed=1)
    ham = Hamiltonian(list(base.terms) + [toy], base.lattice, 1.0, base.type_names)
    state = voronoi_state(shape, 8, 2, rng)
    rep = export_model(ham, tmp_path / "n.xml", init=state, mcs=20)
    assert rep.neural and rep.n_attempts > 0
    assert 0 <= rep.approx_rel_rmse < 1.0
    s = rep.summary()
    assert "potential fields" in s and "RMSE/std" in s
    ev = MorpheusEvaluator(tmp_path / "n.xml")
    # the exported model = analytic part exactly + fields; its error over all boundary attempts is what was printed
    from morpheus_xml.export import boundary_attempts
    sites, new = boundary_attempts(state, 2)
    W = shape[1]
    exact, approx = [], []
    for x, c in zip(sites.tolist(), new.tolist()):
        site = (x // W, x % W)
        old = int(state.ids[site])
        if old != 0 and state.volumes()[old] <= 1:
            continue
        a = base.delta_np(state, site, c)
        exact.append(toy.delta_np(state, site, c))
        approx.append(ev.delta(state.ids, state.types, site, c) - a)
    exact, approx = np.array(exact), np.array(approx)
    rel = np.sqrt(np.mean((approx - exact) ** 2)) / exact.std()
    assert rel == pytest.approx(rep.approx_rel_rmse, rel=0.2, abs=0.02)
    # heterotypic attempts with one candidate cell of that type are exact
    assert np.median(np.abs(approx - exact)) < np.median(np.abs(exact))


def test_cli_exports_a_bundle(tmp_path, capsys, schema):
    rng = np.random.default_rng(5)
    ham = random_analytic_hamiltonian(rng, (40, 40), 2)
    b = save_bundle(tmp_path / "bundle", ham)
    out = tmp_path / "cli.xml"
    assert main([str(b), "--out", str(out), "--mcs", "30", "--seed", "4", "--cells-per-type", "4"]) == 0
    printed = capsys.readouterr().out
    assert "analytic terms only" in printed and str(out) in printed
    doc = etree.parse(str(out))
    assert schema.validate(doc), schema.error_log
    parsed = parse_model(out)
    assert len(parsed.state.cell_ids()) == 8 and parsed.meta["stop_time"] == 30


def test_default_layout_is_documented_squares():
    s = default_layout((60, 60), 2, [0, 100, 64], cells_per_type=5, seed=0)
    vols = s.volumes()[1:]
    assert len(s.cell_ids()) == 10
    assert set(vols.tolist()) == {25, 16}
    assert all(vols[c - 1] == (25 if s.types[c] == 1 else 16) for c in s.cell_ids())


def test_export_refuses_what_morpheus_cannot_run():
    rng = np.random.default_rng(0)
    ham = random_analytic_hamiltonian(rng, (12, 12), 2, with_external=False, with_dm=False)
    st0 = voronoi_state((12, 12), 4, 2, rng)
    open_lat = Hamiltonian(list(ham.terms), LatticeSpec((12, 12), False, 2, 2), 1.0, ham.type_names)
    with pytest.raises(ExportError, match="periodic"):
        build_xml(open_lat, st0)
    big = Hamiltonian(list(ham.terms), LatticeSpec((12, 12), True, 2, 7), 1.0, ham.type_names)
    with pytest.raises(ExportError, match="order 7"):
        build_xml(big, st0)
    with pytest.raises(ExportError, match="shape"):
        build_xml(ham, voronoi_state((10, 12), 4, 2, rng))


def test_neural_field_budget_uses_whole_sites_and_a_held_out_error_sample():
    from morpheus_xml.export import boundary_attempts, neural_potential_fields
    rng = np.random.default_rng(11)
    shape = (14, 16)
    toy = ToyNeural(2, shape, seed=2)
    state = voronoi_state(shape, 7, 2, rng)
    sites, _new = boundary_attempts(state, 2)
    phi, stats = neural_potential_fields([toy], state, 2, max_attempts=60, holdout=80, seed=1)
    assert stats["error_sample"] == "held-out" and stats["n_evaluated"] <= 60
    assert stats["n_boundary_attempts"] == len(sites) and stats["n_attempts"] == 80
    assert np.all(phi[0] == 0) and np.isfinite(stats["rel_rmse"])
    _full, s_all = neural_potential_fields([toy], state, 2)
    assert s_all["error_sample"] == "all boundary attempts" and s_all["n_evaluated"] == len(sites)
    # more evaluations → a better fit at the initial state
    assert s_all["rel_rmse"] <= stats["rel_rmse"] + 1e-12
