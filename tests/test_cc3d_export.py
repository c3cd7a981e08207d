"""CC3D export: the exported project's ΔH, computed from its FILES' TEXT, equals the bundle's ΔH.

The evaluator (:class:`cc3d_steppables.evaluator.ProjectEvaluator`) parses the written CC3DML with
``xml.etree`` and applies CompuCell3D's own Contact/Volume formulas, then adds the Python term by loading the
project's copy of ``NeuralCPMSteppables.py`` with its configuration and arrays — the code CC3D would run.
"""

from __future__ import annotations

import json
import math
import py_compile
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cc3d_steppables import load_model
from cc3d_steppables.evaluator import ProjectEvaluator
from cc3d_steppables.export import export_project
from cc3d_steppables.export import main as export_main
from neuralcpm_plugin.bundle import save_bundle
from neuralcpm_plugin.errors import ExportError
from neuralcpm_plugin.hamiltonian.analytic import (
    ContactEnergy,
    DirectedMotion,
    ExternalPotential,
    SurfaceConstraint,
    VolumeConstraint,
)
from neuralcpm_plugin.hamiltonian.base import Hamiltonian, LatticeSpec
from neuralcpm_plugin.io import load_states
from neuralcpm_plugin.lattice import CellState, neighbour_offsets

TOL = 1e-6


def random_state(rng, shape, n_types, n_cells):
    ids = np.zeros(shape, np.int32)
    for c in range(1, n_cells + 1):
        h, w = rng.integers(1, max(2, shape[0] // 2)), rng.integers(1, max(2, shape[1] // 2))
        y, x = rng.integers(0, shape[0] - h + 1), rng.integers(0, shape[1] - w + 1)
        ids[y:y + h, x:x + w] = c
    # sprinkle single sites (small cells, volume-1 cells, ragged boundaries)
    m = rng.random(shape) < 0.08
    ids[m] = rng.integers(0, n_cells + 1, size=int(m.sum()))
    types = np.concatenate([[0], rng.integers(1, n_types + 1, size=n_cells)]).astype(np.int32)
    return CellState(ids, types).relabelled()


def random_direction(rng, ndim=2):
    k = rng.integers(0, 4)
    if k == 0:
        return None
    if k == 1:
        return {"mode": "constant", "vector": rng.normal(size=ndim).tolist()}
    lo = float(rng.uniform(0.1, 0.5))
    return {"mode": "band", "axis": int(rng.integers(0, ndim)), "lo": lo, "hi": float(rng.uniform(lo, 0.9)),
            "sense": "inward" if k == 2 else "outward"}


def random_model(rng, shape, n_types, periodic, contact_order, copy_order, external, directed):
    n = n_types + 1
    J = rng.uniform(0, 3, (n, n))
    J = (J + J.T) / 2
    J[0, 0] = 0
    lat = LatticeSpec(tuple(shape), periodic, copy_order, contact_order)
    lam = np.concatenate([[0], rng.uniform(0.05, 1.0, n_types)])
    tgt = np.concatenate([[0], rng.uniform(5, 40, n_types)])
    terms = [ContactEnergy(J, contact_order, scale=float(rng.uniform(0.5, 2)), periodic=periodic),
             VolumeConstraint(lam, tgt, scale=float(rng.uniform(0.5, 2)), periodic=periodic)]
    if external:
        mu = np.concatenate([[0], rng.normal(size=n_types)])
        terms.append(ExternalPotential(mu, rng.normal(size=shape), scale=float(rng.uniform(0.2, 2)),
                                       periodic=periodic))
    if directed:
        strength = np.concatenate([[0], rng.uniform(0, 1, n_types)])
        dirs = [None] + [random_direction(rng) for _ in range(n_types)]
        terms.append(DirectedMotion(strength, dirs, scale=float(rng.uniform(0.5, 2)), periodic=periodic))
    names = ["medium"] + [f"type {i}" for i in range(1, n)]  # a space: must be sanitised for CC3D
    return Hamiltonian(terms, lat, float(rng.uniform(0.3, 3)), names)


def attempts(rng, state, copy_order, periodic, n):
    """(target site, source cell) pairs of copy attempts with different cells (CC3D's classic proposals)."""
    offs = neighbour_offsets(copy_order, state.ndim)
    shape = np.asarray(state.shape)
    out = []
    for _ in range(50 * n):
        if len(out) >= n:
            break
        s = rng.integers(0, shape)
        t = s + offs[rng.integers(len(offs))]
        if periodic:
            t = t % shape
        elif np.any(t < 0) or np.any(t >= shape):
            continue
        a, b = int(state.ids[tuple(s)]), int(state.ids[tuple(t)])
        if a != b:
            out.append((tuple(int(v) for v in t), a))  # copy s's cell into t
    # plus arbitrary (non-neighbour) copies: ΔH is defined for any pair
    for _ in range(n // 4):
        t = tuple(int(v) for v in rng.integers(0, shape))
        a = int(rng.integers(0, state.n_ids))
        if a != state.ids[t] and (a == 0 or np.any(state.ids == a)):
            out.append((t, a))
    return out


def check_equivalence(ham, state, out_dir, rng, n_attempts=40):
    res = export_project(ham, out_dir, init=state, mcs=7, seed=5, measure_cost=False, quiet=True)
    ev = ProjectEvaluator(res.project)
    st0 = res.initial_state
    assert st0 == state.relabelled()
    vols = st0.volumes()
    has_py = any(t.kind not in ("contact", "volume") for t in ham.terms)
    n_checked = 0
    for site, a in attempts(rng, st0, ham.lattice.copy_order, ham.lattice.periodic, n_attempts):
        old = int(st0.ids[site])
        ref = ham.delta_np(st0, site, a)
        got = ev.delta(st0.ids, st0.types, site, a)
        if old != 0 and vols[old] == 1:  # a deletion: the package's samplers refuse it
            assert (got == math.inf) if has_py else np.isfinite(got)
            continue
        assert abs(got - ref) <= TOL * max(1.0, abs(ref)), (site, a, got, ref, ev.parts(st0.ids, st0.types, site, a))
        n_checked += 1
    return res, n_checked


@settings(max_examples=14, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**31 - 1), n_types=st.integers(1, 3), periodic=st.booleans(),
       contact_order=st.integers(1, 4), copy_order=st.integers(1, 3), external=st.booleans(),
       directed=st.booleans(), h=st.integers(9, 16), w=st.integers(9, 16))
def test_exported_files_reproduce_bundle_delta(tmp_path_factory, seed, n_types, periodic, contact_order, copy_order,
                                               external, directed, h, w):
    rng = np.random.default_rng(seed)
    ham = random_model(rng, (h, w), n_types, periodic, contact_order, copy_order, external, directed)
    state = random_state(rng, (h, w), n_types, int(rng.integers(2, 9)))
    out = tmp_path_factory.mktemp("proj")
    _, n = check_equivalence(ham, state, out, rng)
    assert n > 0


def test_exported_project_is_complete(tmp_path):
    rng = np.random.default_rng(1)
    ham = random_model(rng, (20, 24), 2, True, 2, 2, True, True)
    state = random_state(rng, (20, 24), 2, 6)
    res = export_project(ham, tmp_path / "p", init=state, mcs=123, seed=77, snapshot_every=10, quiet=True)
    proj = ET.parse(res.project).getroot()
    base = res.project.parent
    for tag in ("XMLScript", "PythonScript", "PIFFile"):
        assert (base / proj.find(tag).text).is_file(), tag
    for r in proj.findall("Resource"):
        assert (base / r.text).is_file()
    xml = ET.parse(base / proj.find("XMLScript").text).getroot()
    potts = xml.find("Potts")
    assert potts.find("Dimensions").attrib == {"x": "24", "y": "20", "z": "1"}
    assert int(potts.find("Steps").text) == 124  # no sweep at step 0
    assert float(potts.find("Temperature").text) == ham.temperature
    assert potts.find("NeighborOrder").text == "2" and potts.find("Flip2DimRatio").text == "1"
    assert potts.find("Boundary_x").text == potts.find("Boundary_y").text == "Periodic"
    assert potts.find("RandomSeed").text == "77"
    names = [c.get("TypeName") for c in xml.find("Plugin[@Name='CellType']")]
    assert names == ["Medium", "type_1", "type_2"]
    assert xml.find("Plugin[@Name='Contact']/NeighborOrder").text == "2"
    assert len(xml.findall("Plugin[@Name='Volume']/VolumeEnergyParameters")) == 2
    assert xml.find("Plugin[@Name='Contact']/WeightEnergyByDistance") is None
    sim = base / "Simulation"
    py_compile.compile(str(sim / "NeuralCPM.py"), doraise=True)
    py_compile.compile(str(sim / "NeuralCPMSteppables.py"), doraise=True)
    main = (sim / "NeuralCPM.py").read_text()
    assert "CompuCellSetup.run()" in main and "every=10" in main and "last_mcs=123" in main
    cfg = json.loads((sim / "neuralcpm_config.json").read_text())
    assert [t["kind"] for t in cfg["python_terms"]] == ["external", "directed_motion"]
    assert cfg["forbid_deletion"] is True
    # the PIFF reproduces the initial state (the io reader, and our importer)
    piff = load_states(sim / "NeuralCPM.piff", types={"Medium": 0, "type_1": 1, "type_2": 2}, shape=(20, 24))[0]
    assert piff == state.relabelled()
    imp = load_model(res.project)
    assert imp.initial_state == state.relabelled()
    assert imp.info["mcs"] == 123 and imp.info["seed"] == 77
    # import of the C++ part gives back the contact/volume parameters (scale folded in)
    c_ref = ham.term("contact").J.detach().numpy() * ham.term("contact").scale_value()
    assert np.allclose(imp.hamiltonian.term("contact").J.detach().numpy(), c_ref, rtol=1e-15, atol=0)
    assert res.mode == "cpp+python"
    assert (base / "initial_state.npz").is_file()


def test_pure_cpp_export_and_cli(tmp_path, capsys):
    """Contact + volume only: no Python term; the CLI prints mode and cost; the default layout is used."""
    lat = LatticeSpec((40, 40), True, 2, 2)
    J = [[0, 2, 2], [2, 1, 1.6], [2, 1.6, 1]]
    ham = Hamiltonian([ContactEnergy(J, 2), VolumeConstraint([0, 0.8, 0.8], [0, 90, 90])], lat, 1.0,
                      ["medium", "T1", "T2"])
    save_bundle(tmp_path / "b", ham)
    assert export_main([str(tmp_path / "b"), "--out", str(tmp_path / "p"), "--mcs", "50", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "mode: cpp " in out and "C++ plugins only" in out
    cfg = json.loads((tmp_path / "p" / "Simulation" / "neuralcpm_config.json").read_text())
    assert cfg["python_terms"] == [] and cfg["forbid_deletion"] is False
    st0 = load_states(tmp_path / "p" / "initial_state.npz")[0]
    assert st0.shape == (40, 40) and len(st0.cell_ids()) >= 2
    assert set(np.unique(st0.types[1:]).tolist()) == {1, 2}
    rng = np.random.default_rng(0)
    check_equivalence(ham, st0, tmp_path / "p2", rng, n_attempts=60)
    # --forbid-deletion adds the Python term for the guard alone
    res = export_project(ham, tmp_path / "p3", init=st0, forbid_deletion=True, quiet=True, measure_cost=False)
    assert res.mode == "cpp+python"


def test_local_nh_export_matches_torch_delta(tmp_path):
    torch = pytest.importorskip("torch")
    from neuralcpm_plugin.hamiltonian.base import Batch
    from neuralcpm_plugin.hamiltonian.local_nh import LocalNeuralHamiltonian
    rng = np.random.default_rng(3)
    lat = LatticeSpec((24, 28), True, 2, 2)
    J = [[0, 2, 2], [2, 1, 1.6], [2, 1.6, 1]]
    lnh = LocalNeuralHamiltonian({"n_types": 2, "stride": 4, "channels": 8, "kernel": 3}, seed=0, scale=0.7)
    ham = Hamiltonian([ContactEnergy(J, 2), VolumeConstraint([0, 0.8, 0.8], [0, 20, 20]), lnh], lat, 1.0,
                      ["medium", "a", "b"])
    state = random_state(rng, (24, 28), 2, 10)
    res, n = check_equivalence(ham, state, tmp_path / "p", rng, n_attempts=40)
    assert n > 10 and res.python_terms == ["local_nh"]
    assert (tmp_path / "p" / "Simulation" / "neuralcpm_local_nh.py").is_file()
    # the Python part alone equals the network's batched torch ΔH (an independent implementation)
    ev = ProjectEvaluator(res.project)
    st0 = res.initial_state
    b = Batch.from_states([st0])
    atts = [(s, a) for s, a in attempts(rng, st0, 2, True, 20) if st0.volumes()[st0.ids[s]] > 1 or st0.ids[s] == 0]
    sites = torch.tensor([[np.ravel_multi_index(s, st0.shape) for s, _ in atts]])
    new = torch.tensor([[a for _, a in atts]])
    with torch.no_grad():
        ref = lnh.delta(b, sites, new)[0].detach().numpy()
    got = np.array([ev.parts(st0.ids, st0.types, s, a)["python"] for s, a in atts])
    assert np.allclose(got, ref, rtol=1e-6, atol=1e-9)


def _neural_closure(shape, pooled=True, D=2):
    from neuralcpm_plugin.hamiltonian.local_nh import LocalNeuralHamiltonian
    from neuralcpm_plugin.hamiltonian.pooled_nh import PooledNeuralHamiltonian
    J = [[0, 2, 2], [2, 1, 1.6], [2, 1.6, 1]]
    terms = [ContactEnergy(J, 2), VolumeConstraint([0, 0.8, 0.8], [0, 20, 20]),
             LocalNeuralHamiltonian({"n_types": 2, "stride": 4, "channels": 8, "kernel": 3}, seed=0, scale=3.0)]
    if pooled:
        terms.append(PooledNeuralHamiltonian({"n_types": 2, "stride": 3, "channels": 5, "kernel": 3, "hidden": 8,
                                              "position_dim": D, "lattice_shape": list(shape)}, seed=1, scale=40.0))
    return Hamiltonian(terms, LatticeSpec(shape, True, 2, 2), 1.0, ["medium", "a", "b"])


def test_local_and_pooled_nh_export_matches_bundle_compiled_and_numpy(tmp_path):
    """Local + pooled NH closure: the exported files' ΔH (compiled evaluator) == the bundle's; the project's
    numpy evaluators give the same ΔH; along 200 accepted copies told to the energy through ``accept`` (as
    the change watcher does) the compiled caches stay equal to a full recomputation."""
    pytest.importorskip("torch")
    from cc3d_steppables import steppables as stp
    rng = np.random.default_rng(4)
    shape = (24, 24)
    ham = _neural_closure(shape)
    state = random_state(rng, shape, 2, 10)
    res, n = check_equivalence(ham, state, tmp_path / "p", rng, n_attempts=40)
    assert n > 10 and res.python_terms == ["local_nh", "pooled_nh"]
    sim = tmp_path / "p" / "Simulation"
    for f in ("neuralcpm_local_nh.py", "neuralcpm_pooled_nh.py", "neuralcpm_local_nh_numba.py"):
        assert (sim / f).is_file()
    st0 = res.initial_state
    m_c = stp.LatticeMirror(st0.ids, st0.types)
    m_n = stp.LatticeMirror(st0.ids, st0.types)
    e_c = stp.load_python_energy(sim, m_c, compiled=True)
    e_n = stp.load_python_energy(sim, m_n, compiled=False)
    assert e_c.compiled == ["local_nh", "pooled_nh"] and e_n.compiled == []
    acc = big = 0
    while acc < 200:
        atts = attempts(rng, CellState(m_c.ids, m_c.types), 2, True, 1)
        if not atts:
            continue
        site, a = atts[0]
        d_c, d_n = e_c.delta(site, a), e_n.delta(site, a)
        if not np.isfinite(d_n):
            assert d_c == d_n
            continue
        assert abs(d_c - d_n) <= 1e-9 * max(1.0, abs(d_n))
        big = max(big, abs(d_n))
        if rng.random() < 0.6:
            e_c.accept(site, a)
            m_c.set_site(site, a)
            m_n.set_site(site, a)
            acc += 1
    assert big > 0.01
    for t in e_c.terms:
        if getattr(t, "compiled", False):
            assert t.evaluator.cache_error() < 1e-10
    # a change the energy was not told about (another writer): caches rebuilt from the mirror
    m_c.set_site((0, 0), int(m_c.ids[0, 1]))
    m_n.set_site((0, 0), int(m_n.ids[0, 1]))
    assert e_c.delta((5, 5), int(m_c.ids[5, 6])) == pytest.approx(e_n.delta((5, 5), int(m_n.ids[5, 6])), abs=1e-9)


def test_unsupported_term_is_an_export_error(tmp_path):
    lat = LatticeSpec((12, 12), True, 2, 2)
    ham = Hamiltonian([ContactEnergy([[0, 1], [1, 0.5]], 2), SurfaceConstraint([0, 1.0], [0, 10.0])], lat, 1.0,
                      ["medium", "a"])
    with pytest.raises(ExportError, match="surface"):
        export_project(ham, tmp_path / "p", quiet=True)


def test_global_nh_field_approximation(tmp_path, capsys):
    """A global NH goes through per-type fields: exact at the export state for attempts whose source is the only
    neighbouring cell of its type; the export prints mode, measured error and cost; the files' ΔH = the fields'."""
    pytest.importorskip("torch")
    from cc3d_steppables.approx import _candidates, _exact_deltas
    from neuralcpm_plugin.hamiltonian.neural import NeuralHamiltonian
    lat = LatticeSpec((12, 12), True, 2, 2)
    J = [[0, 2, 2], [2, 1, 1.6], [2, 1.6, 1]]
    nh = NeuralHamiltonian({"n_types": 2, "embed_stride": 3, "hidden": [4], "pools": [1], "agg_channels": 4,
                            "mlp": [8]}, seed=0, scale=3.0)
    ham = Hamiltonian([ContactEnergy(J, 2), VolumeConstraint([0, 0.8, 0.8], [0, 12, 12]), nh], lat, 1.0,
                      ["medium", "a", "b"])
    rng = np.random.default_rng(2)
    state = random_state(rng, (12, 12), 2, 5)
    res = export_project(ham, tmp_path / "p", init=state, mcs=2, nh_recompute_every=1, nh_error_attempts=40)
    out = capsys.readouterr().out
    assert res.mode == "cpp+python+nh-fields" and "global NH approximation" in out and "× std of the exact" in out
    e = res.nh_error
    assert e["n"] >= 30 and np.isfinite(e["rel_rmse"]) and e["std_exact"] > 0
    cfg = json.loads((tmp_path / "p" / "Simulation" / "neuralcpm_config.json").read_text())
    assert cfg["nh_fields"]["recompute_every"] == 1 and cfg["python_terms"][-1]["kind"] == "type_fields"
    ev = ProjectEvaluator(res.project)
    st0 = res.initial_state
    vols = st0.volumes()
    sites, cand = _candidates(st0.ids, st0.types)
    # attempts whose source is the only neighbouring cell of its type (and of another type than the target's)
    pick = []
    for x, a in zip(sites, cand):
        site = np.unravel_index(int(x), st0.shape)
        old = int(st0.ids[site])
        same_type = {int(c) for x2, c in zip(sites, cand) if x2 == x and st0.types[c] == st0.types[a]}
        if len(same_type) == 1 and st0.types[a] != st0.types[old] and (old == 0 or vols[old] > 1):
            pick.append((int(x), int(a)))
    assert len(pick) > 10
    pick = pick[:25]
    exact = _exact_deltas([nh], st0.ids, st0.types, np.array([p[0] for p in pick]), np.array([p[1] for p in pick]))
    analytic = Hamiltonian(ham.terms[:2], lat, 1.0, ham.type_names)
    for (x, a), d in zip(pick, exact):
        site = np.unravel_index(x, st0.shape)
        got = ev.delta(st0.ids, st0.types, site, a)
        ref = analytic.delta_np(st0, site, a) + d
        assert abs(got - ref) <= 1e-6 * max(1, abs(ref))  # exact at the update state

    # inside CC3D (here: the API double of tests/test_cc3d_steppables.py) the fields are recomputed every k MCS
    from test_cc3d_steppables import _run_fake
    r = _run_fake(res.project, tmp_path / "out")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rep = json.loads((tmp_path / "out" / "neuralcpm_run.json").read_text())
    assert rep["field_mode"] == "recomputed every 1 MCS" and rep["field_updates"] == 2 and rep["callback_errors"] == 0
