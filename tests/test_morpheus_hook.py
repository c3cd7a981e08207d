"""The energy hook (``python -m morpheus_xml.run``), with a stand-in Morpheus, and the opt-in real-Morpheus test.

The stand-in (``tests/fixtures/morpheus/fake_morpheus.py``) imports each chunk's model, runs the package's exact
sampler and writes a Morpheus-style checkpoint; like Morpheus 2.2.4 it fails (with exit status 0) on a model
whose medium Population lists a cell, and with ``FAKE_MORPHEUS_FAIL=1`` it exits 0 without finishing.

``MORPHEUS_BIN=/path/to/morpheus pytest tests/test_morpheus_hook.py`` runs the integration tests against a real
Morpheus 2.2.4 (skipped when the variable is unset).
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import numpy as np
import pytest
from lxml import etree

from morpheus_xml.export import export_model
from morpheus_xml.readers import read_checkpoint, read_tiff_stack
from morpheus_xml.run import FINISHED, main, run_hook, run_morpheus
from neuralcpm_plugin.bundle import save_bundle
from neuralcpm_plugin.errors import ExportError
from neuralcpm_plugin.hamiltonian.base import Hamiltonian, LatticeSpec

FIX = Path(__file__).resolve().parent / "fixtures" / "morpheus"
sys.path.insert(0, str(FIX))
from morpheus_test_helpers import ToyNeural, voronoi_state


def _fake(tmp_path) -> Path:
    exe = tmp_path / "morpheus"
    exe.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{FIX / "fake_morpheus.py"}" "$@"\n')
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return exe


def _p1_like(shape, *, neural=False, external=False, seed=0):
    from neuralcpm_plugin.hamiltonian.analytic import ContactEnergy, ExternalPotential, VolumeConstraint
    J = np.array([[0.0, 0.625, 0.25], [0.625, 0.25, 1.125], [0.25, 1.125, 0.25]])
    terms = [ContactEnergy(J, 2), VolumeConstraint([0, 0.5, 0.5], [0, 40.0, 40.0])]
    if external:
        rng = np.random.default_rng(seed)
        terms.append(ExternalPotential([0, 0.3, -0.2], rng.normal(size=shape)))
    if neural:
        terms.append(ToyNeural(2, shape, seed=seed))
    return Hamiltonian(terms, LatticeSpec(tuple(shape), True, 2, 2), 1.0, ["medium", "ct1", "ct2"])


def test_hook_runs_three_chunks_and_refreshes_fields(tmp_path):
    shape = (20, 22)
    ham = _p1_like(shape, neural=True)
    state = voronoi_state(shape, 8, 2, np.random.default_rng(1), medium_frac=0.5)
    out = tmp_path / "traj.npz"
    logs = []
    res = run_hook(ham, _fake(tmp_path), mcs=6, refresh=2, init=state, seed=3, out=out, log=logs.append)
    assert res.mcs == [0, 2, 4, 6] and len(res.states) == 4 and len(logs) == 3
    assert res.states[0] == state
    for s in res.states[1:]:
        assert set(s.cell_ids().tolist()) == set(state.cell_ids().tolist())
        assert not np.array_equal(s.ids, state.ids)
    assert len(res.fresh_rel_rmse) == 3 and len(res.stale_rel_rmse) == 3
    assert all(np.isfinite(res.fresh_rel_rmse)) and all(np.isfinite(res.stale_rel_rmse))
    z = np.load(out)
    assert z["data"].shape == (4, 2, 20, 22) and z["mcs"].tolist() == [0, 2, 4, 6]
    assert z["stale_rel_rmse"].shape == (3,)
    # chunk 1 continues chunk 0's checkpoint: no medium population, new seed, refreshed field data
    m0 = etree.parse(str(res.workdir / "chunk_000" / "model.xml")).getroot()
    m1 = etree.parse(str(res.workdir / "chunk_001" / "model.xml")).getroot()
    assert [p.get("type") for p in m1.findall("CellPopulations/Population")] == ["ct1", "ct2"]
    assert m1.find("Time/StartTime").get("value") == "2" and m1.find("Time/StopTime").get("value") == "4"
    assert m0.find("Time/RandomSeed").get("value") != m1.find("Time/RandomSeed").get("value")
    f0 = m0.find("Global/Field/Data").text
    f1 = m1.find("Global/Field/Data").text
    assert f0 != f1
    # a continuation model is a valid model for the importer too, holding the previous chunk's final state
    from morpheus_xml.importer import parse_model
    assert parse_model(res.workdir / "chunk_001" / "model.xml").state == res.states[1]


def test_hook_reruns_in_a_used_workdir(tmp_path):
    """Morpheus appends to old TIFFs and leaves old checkpoints: a second run in the same folder must not
    pick up the first run's checkpoint (seen with real Morpheus 2.2.4)."""
    ham = _p1_like((12, 12))
    state = voronoi_state((12, 12), 4, 2, np.random.default_rng(0))
    w = tmp_path / "w"
    first = run_hook(ham, _fake(tmp_path), mcs=4, refresh=2, init=state, workdir=w)
    assert first.mcs == [0, 2, 4]
    again = run_hook(ham, _fake(tmp_path), mcs=2, refresh=1, init=state, workdir=w)
    assert again.mcs == [0, 1, 2] and len(again.states) == 3


def test_hook_reports_a_morpheus_failure_despite_exit_status_0(tmp_path, monkeypatch):
    ham = _p1_like((12, 12))
    state = voronoi_state((12, 12), 4, 2, np.random.default_rng(0))
    monkeypatch.setenv("FAKE_MORPHEUS_FAIL", "1")
    with pytest.raises(ExportError, match=FINISHED) as e:
        run_hook(ham, _fake(tmp_path), mcs=2, refresh=1, init=state, workdir=tmp_path / "w")
    assert "morpheus.log" in str(e.value)
    with pytest.raises(ExportError, match="not found"):
        run_morpheus(tmp_path / "no-such-morpheus", tmp_path / "m.xml", tmp_path / "o")


def test_hook_cli_with_a_bundle(tmp_path, capsys):
    ham = _p1_like((16, 16), external=True)
    b = save_bundle(tmp_path / "b", ham)
    init = tmp_path / "init.npz"
    from neuralcpm_plugin.io import save_npz
    save_npz(init, [voronoi_state((16, 16), 5, 2, np.random.default_rng(2))])
    out = tmp_path / "t.npz"
    rc = main([str(b), "--morpheus", str(_fake(tmp_path)), "--mcs", "3", "--refresh", "3", "--init", str(init),
               "--out", str(out)])
    assert rc == 0
    assert "2 frames" in capsys.readouterr().out
    assert np.load(out)["data"].shape == (2, 2, 16, 16)
    assert main([str(b), "--morpheus", "", "--mcs", "3", "--refresh", "1"]) == 2


# ------------------------------------------------------------------------------------------------------
# opt-in: a real Morpheus 2.2.4
# ------------------------------------------------------------------------------------------------------
MORPHEUS = os.environ.get("MORPHEUS_BIN")
needs_morpheus = pytest.mark.skipif(not MORPHEUS, reason="set MORPHEUS_BIN to a Morpheus 2.2.4 executable")


@pytest.mark.integration
@needs_morpheus
def test_real_morpheus_runs_an_exported_model(tmp_path):
    """Export (contact + volume + a site potential through Field/Haptotaxis), run 200 MCS headless, read the
    TIFF back: every cell survives, volumes relax to V*, frame 0 is the exported initial state."""
    from morpheus_xml.export import default_layout
    shape = (60, 60)
    ham = _p1_like(shape, external=True)
    init = default_layout(shape, 2, [0, 40, 40], cells_per_type=8, seed=5)
    model = tmp_path / "model.xml"
    rep = export_model(ham, model, init=init, mcs=200, seed=11, record_every=50, save_interval=200)
    assert rep.n_cells == 16
    outdir = tmp_path / "out"
    log = run_morpheus(MORPHEUS, model, outdir, timeout=600)
    assert FINISHED in log
    tifs = sorted(outdir.glob("*.tif"))
    assert [t.name for t in tifs] == ["cell.id_cell.type.tif"], [t.name for t in tifs]
    frames = read_tiff_stack(tifs[0])
    assert len(frames) == 5                   # t = 0, 50, ..., 200
    assert frames[0] == init
    last = frames[-1]
    assert set(last.cell_ids().tolist()) == set(init.cell_ids().tolist())
    vols = last.volumes()[last.cell_ids()]
    assert abs(vols.mean() - 40) < 3 and vols.min() > 25 and vols.max() < 55, vols
    assert np.array_equal(last.types[last.cell_ids()], init.types[init.cell_ids()])
    cps = sorted(outdir.glob("*.xml.gz"))
    assert cps, "no checkpoint written"
    cp = read_checkpoint(max(cps, key=lambda p: read_checkpoint(p).meta["time"]))
    assert cp.meta["time"] == 200 and set(cp.cell_ids().tolist()) == set(init.cell_ids().tolist())


@pytest.mark.integration
@needs_morpheus
def test_real_morpheus_hook_three_chunks(tmp_path):
    """The energy hook for 3 chunks of 10 MCS with a neural term: checkpoints continue (medium Population
    removed), fields are refreshed, the trajectory holds the state after every chunk."""
    shape = (40, 40)
    ham = _p1_like(shape, neural=True)
    from morpheus_xml.export import default_layout
    init = default_layout(shape, 2, [0, 40, 40], cells_per_type=5, seed=2)
    res = run_hook(ham, MORPHEUS, mcs=30, refresh=10, init=init, seed=4, out=tmp_path / "traj.npz",
                   timeout=600)
    assert res.mcs == [0, 10, 20, 30] and len(res.states) == 4
    for s in res.states[1:]:
        assert set(s.cell_ids().tolist()) == set(init.cell_ids().tolist())
        assert s.volumes()[s.cell_ids()].mean() > init.volumes()[init.cell_ids()].mean()
    assert all(np.isfinite(res.stale_rel_rmse)) and len(res.stale_rel_rmse) == 3
    z = np.load(tmp_path / "traj.npz")
    assert z["data"].shape == (4, 2, 40, 40)


@pytest.mark.integration
@needs_morpheus
def test_real_morpheus_bipolar_model_matches_exact_sampler(tmp_path):
    """Our own bipolar test model (contact with "norm" scaling, VolumeConstraint, DirectedMotion with band
    directions, T = 2, classic stepper) run in real Morpheus and, from the same initial states, in the
    package's exact sampler under the imported model: the bipolar organisation (fraction of positional
    variance along the type-2 axis, per type) and the mean volume agree within 4 combined standard errors."""
    from morpheus_xml import load_model
    from neuralcpm_plugin.metrics.paper import bipolar_organisation
    from neuralcpm_plugin.sampling import run_exact

    mcs, runs = 300, 8
    real, ours = [], []
    for seed in range(1, runs + 1):
        root = etree.parse(str(FIX / "bipolar_test.xml")).getroot()
        root.find("Time/StopTime").set("value", str(mcs))
        rs = root.find("Time/RandomSeed")
        if rs is None:
            rs = etree.SubElement(root.find("Time"), "RandomSeed")
        rs.set("value", str(seed))
        d = tmp_path / f"run{seed}"
        d.mkdir()
        (d / "model.xml").write_bytes(etree.tostring(root))
        assert FINISHED in run_morpheus(MORPHEUS, d / "model.xml", d / "out", timeout=600)
        frames = read_tiff_stack(d / "out" / "cell.id_cell.type.tif")
        start, end = frames[0], frames[-1]
        assert set(end.cell_ids().tolist()) == set(start.cell_ids().tolist())
        org = bipolar_organisation(end)
        real.append((org[1], org[2], end.volumes()[end.cell_ids()].mean()))
        mine = run_exact(start, load_model(d / "model.xml").hamiltonian, mcs, seed=seed).final
        org = bipolar_organisation(mine)
        ours.append((org[1], org[2], mine.volumes()[mine.cell_ids()].mean()))
    real, ours = np.array(real), np.array(ours)
    se = np.sqrt(real.var(0, ddof=1) / runs + ours.var(0, ddof=1) / runs)
    diff = np.abs(real.mean(0) - ours.mean(0))
    print(f"bipolar after {mcs} MCS (org type 1, org type 2, mean volume): Morpheus {real.mean(0).round(3)}, "
          f"exact sampler {ours.mean(0).round(3)}, combined SE {se.round(3)}")
    assert np.all(diff <= 4 * se + 1e-9), (diff, se)
    assert real[:, 1].mean() > 0.6 and real[:, 0].mean() < 0.4     # it is bipolar in Morpheus itself


# ------------------------------------------------------------------------------------------------------
# the pooled NH through the hook
# ------------------------------------------------------------------------------------------------------
def _pooled_closure(shape, seed=0, gain=3.0):
    import torch

    from neuralcpm_plugin.hamiltonian.closure import closure_hamiltonian
    from neuralcpm_plugin.hamiltonian.local_nh import LocalNeuralHamiltonian
    from neuralcpm_plugin.hamiltonian.pooled_nh import PooledNeuralHamiltonian
    base = _p1_like(shape)
    loc = LocalNeuralHamiltonian({"n_types": 2, "stride": 3, "channels": 4}, seed=seed)
    pool = PooledNeuralHamiltonian({"n_types": 2, "stride": 3, "channels": 4, "hidden": 8, "position_dim": 2,
                                    "lattice_shape": list(shape)}, seed=seed)
    with torch.no_grad():
        for t in (loc, pool):
            for p in t.parameters():
                if p.dim() > 1:
                    p.mul_(gain)
    return closure_hamiltonian(list(base.terms), {"w_l": [loc], "w_g": [pool]}, base.lattice, 1.0,
                               base.type_names, w_a=1.0)


def test_fields_of_the_parts_add_up_to_the_fields_of_the_whole():
    from morpheus_xml.export import neural_potential_fields
    ham = _pooled_closure((24, 24))
    state = voronoi_state((24, 24), 8, 2, np.random.default_rng(4), medium_frac=0.4)
    neural = ham.neural_terms()
    pooled = [t for t in neural if t.kind == "pooled_nh"]
    phi, st = neural_potential_fields(neural, state, 2, parts={"pooled": pooled}, max_attempts=300, seed=2)
    phi_rest, _ = neural_potential_fields([t for t in neural if t not in pooled], state, 2, max_attempts=300, seed=2)
    p = st["parts"]["pooled"]
    assert np.allclose(phi, phi_rest + p["phi"], atol=1e-12)
    assert np.abs(p["phi"]).max() > 1e-3 and np.isfinite(p["rel_rmse"]) and p["n_attempts"] == st["n_attempts"]


def test_hook_with_a_pooled_term_reports_its_field_and_expansion_errors(tmp_path, capsys):
    shape = (24, 24)
    ham = _pooled_closure(shape)
    b = save_bundle(tmp_path / "b", ham)
    init = tmp_path / "init.npz"
    from neuralcpm_plugin.io import save_npz
    save_npz(init, [voronoi_state(shape, 8, 2, np.random.default_rng(5), medium_frac=0.4)])
    out = tmp_path / "t.npz"
    rc = main([str(b), "--morpheus", str(_fake(tmp_path)), "--mcs", "4", "--refresh", "2", "--init", str(init),
               "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "pooled NH part alone, fields (fresh → stale): " in text
    assert "pooled NH expansion around the refresh's Z (global context frozen for 2 MCS)" in text
    z = np.load(out)
    for key in ("pooled_fresh_rel_rmse", "pooled_stale_rel_rmse", "pooled_expansion_rel_rmse"):
        assert z[key].shape == (2,) and np.isfinite(z[key]).all()
    # (the stand-in's random copies scramble the lattice: no bound on the errors here; the opt-in real-Morpheus
    # test and benchmarks/bench_pooled_fields.py measure them under real dynamics)
    assert z["pooled_fresh_rel_rmse"][0] < z["pooled_stale_rel_rmse"][0]


def _bench_pooled_closure(shape, seed=0):
    """The model of ``benchmarks/bench_pooled_fields.py`` (gain 1): contact + volume + local NH + pooled NH at
    their default architectures."""
    from neuralcpm_plugin.hamiltonian.closure import closure_hamiltonian
    from neuralcpm_plugin.hamiltonian.local_nh import LocalNeuralHamiltonian
    from neuralcpm_plugin.hamiltonian.pooled_nh import PooledNeuralHamiltonian
    base = _p1_like(shape)
    loc = LocalNeuralHamiltonian({"n_types": 2}, seed=seed)
    pool = PooledNeuralHamiltonian({"n_types": 2, "lattice_shape": list(shape)}, seed=seed)
    return closure_hamiltonian(list(base.terms), {"w_l": [loc], "w_g": [pool]}, base.lattice, 1.0,
                               base.type_names, w_a=1.0), base


@pytest.mark.integration
@needs_morpheus
def test_real_morpheus_hook_with_a_pooled_term(tmp_path, capsys):
    """A local + pooled closure (the model of ``benchmarks/bench_pooled_fields.py``, 32×32, 10 cells grown for
    10 MCS under the analytic part) in real Morpheus, refresh 10 MCS: the pooled part's error from freezing its
    global context Z between refreshes stays ≤ 0.05 at every refresh; its field errors (per-type fields, stale
    as cells move, like every neural term's) are printed. (How far the frozen-Z error is from 0.05 depends on
    how far Z moves in K MCS and on F's curvature: README, Morpheus.)"""
    from morpheus_xml.export import default_layout
    from neuralcpm_plugin.io import save_npz
    from neuralcpm_plugin.sampling import run_exact
    shape = (32, 32)
    ham, base = _bench_pooled_closure(shape)
    start = run_exact(default_layout(shape, 2, [0, 40, 40], cells_per_type=5, seed=0), base, 10, seed=0).final
    init = tmp_path / "init.npz"
    save_npz(init, [start])
    b = save_bundle(tmp_path / "b", ham)
    rc = main([str(b), "--morpheus", MORPHEUS, "--mcs", "30", "--refresh", "10", "--init", str(init),
               "--out", str(tmp_path / "t.npz")])
    out = capsys.readouterr().out
    print(out)
    assert rc == 0
    z = np.load(tmp_path / "t.npz")
    assert z["mcs"].tolist() == [0, 10, 20, 30]
    assert z["pooled_expansion_rel_rmse"].shape == (3,)
    assert (z["pooled_expansion_rel_rmse"] <= 0.05).all(), out
