"""CC3DML import and the file-based evaluator, validated on the real CompuCell3D 4.8 project P2.

``tests/fixtures/cc3d/P2_run_01`` is a copy of ``../shared/reference-data/models/P2_cc3d`` run 01 (its
``.cc3d``, CC3DML, PIFF and scripts); with ``../shared`` present all 16 runs are checked as well.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from cc3d_steppables import load_model
from cc3d_steppables.evaluator import ProjectEvaluator
from neuralcpm_plugin.errors import ModelImportError
from neuralcpm_plugin.lattice import CellState, half_offsets
from neuralcpm_plugin.metrics.stats import summary_stats
from neuralcpm_plugin.sampling.exact import run_exact

FIX = Path(__file__).resolve().parent / "fixtures"
P2 = FIX / "cc3d" / "P2_run_01" / "P2_run_01.cc3d"
SHARED = Path(__file__).resolve().parents[2] / "shared"
SHARED_P2 = SHARED / "reference-data" / "models" / "P2_cc3d"
# ../shared/reference-data/README.md, P2 column (energies per unordered Moore pair)
README_P2 = {"V*": 90.0, "lambda": 0.8, "T": 1.0, "J10": 2.0, "J20": 2.0, "J11": 1.0, "J22": 1.0, "J12": 1.6}


def readme_J():
    p = README_P2
    return np.array([[0, p["J10"], p["J20"]], [p["J10"], p["J11"], p["J12"]], [p["J20"], p["J12"], p["J22"]]])


def readme_energy(ids, types):
    """H of the README (pairs over the 4 Moore half-offsets on the torus, λ(V − V*)² per cell)."""
    J = readme_J()
    t = types[ids]
    e = 0.0
    for dy, dx in half_offsets(2):
        nb = np.roll(ids, (-dy, -dx), (0, 1))
        tn = types[nb]
        e += float(J[t, tn][nb != ids].sum())
    v = np.bincount(ids.ravel(), minlength=len(types))[1:]
    v = v[v > 0]
    return e + README_P2["lambda"] * float(((v - README_P2["V*"]) ** 2).sum())


def check_p2_parameters(m):
    h = m.hamiltonian
    assert h.temperature == README_P2["T"]
    assert h.lattice.shape == (100, 100) and h.lattice.periodic and h.lattice.copy_order == 2
    c, v = h.term("contact"), h.term("volume")
    assert c.order == 2 and np.array_equal(c.J.detach().numpy() * c.scale_value(), readme_J())
    assert v.lam.detach().numpy().tolist() == [0.0, 0.8, 0.8]
    assert v.target.detach().numpy().tolist() == [0.0, 90.0, 90.0]
    assert [t.kind for t in h.terms] == ["contact", "volume"]
    assert m.info["mcs"] == 1000 and m.info["mcs_scale"] == 1.0


def test_p2_parameters_and_initial_state():
    m = load_model(P2)
    check_p2_parameters(m)
    assert m.info["seed"] == 2001
    ref = np.load(FIX / "reference" / "initial_frames.npz")["P2_cc3d"][0]
    assert m.initial_state == CellState.from_maps(ref[0], ref[1])


@pytest.mark.skipif(not SHARED_P2.is_dir(), reason="../shared/reference-data not present")
def test_all_shared_p2_projects_import():
    frames = np.load(FIX / "reference" / "initial_frames.npz")["P2_cc3d"]
    for r in range(1, 17):
        m = load_model(SHARED_P2 / f"P2_run_{r:02d}.cc3d")
        check_p2_parameters(m)
        assert m.info["seed"] == 2000 + r
        assert m.initial_state == CellState.from_maps(frames[r - 1, 0], frames[r - 1, 1])


def test_evaluator_on_p2_equals_readme_energy_difference():
    """ΔH from the P2 files' text (CC3D's formulas) = H(after) − H(before) of the README's Hamiltonian, on the
    real CC3D frames (0 … 1000 MCS), and = the imported model's ΔH."""
    ev = ProjectEvaluator(P2)
    assert ev.temperature == 1.0 and ev.contact_order == 2
    m = load_model(P2)
    data = np.load(FIX / "io" / "P2_run_01.npz")["data"]
    rng = np.random.default_rng(0)
    offs = [(a, b) for a in (-1, 0, 1) for b in (-1, 0, 1) if (a, b) != (0, 0)]
    n = 0
    for f in (0, 2, 20):
        st = CellState.from_maps(data[f, 0], data[f, 1])
        e0 = readme_energy(st.ids, st.types)
        while n < 25 * (1 + (f > 0) + (f > 2)):
            y, x = rng.integers(0, 100, 2)
            dy, dx = offs[rng.integers(8)]
            src = st.ids[(y + dy) % 100, (x + dx) % 100]
            if src == st.ids[y, x]:
                continue
            after = st.ids.copy()
            after[y, x] = src
            ref = readme_energy(after, st.types) - e0
            got = ev.delta(st.ids, st.types, (y, x), src)
            assert abs(got - ref) <= 1e-9 * max(1, abs(ref)), (f, y, x, src, got, ref)
            assert abs(m.hamiltonian.delta_np(st, (y, x), int(src)) - got) <= 1e-9 * max(1, abs(ref))
            n += 1


def test_exact_sampler_under_imported_p2_reproduces_cc3d_statistics():
    """16 starts (the P2 initial states) × 2 seeds, 100 and 500 MCS, under the IMPORTED model: every summary
    statistic within 4 combined standard errors of CompuCell3D's (exact match where both SEs are 0)."""
    m = load_model(P2)
    ref = json.loads((FIX / "reference" / "summary_stats_subset.json").read_text())["scenarios"]["P2_cc3d"]
    frames = np.load(FIX / "reference" / "initial_frames.npz")["P2_cc3d"]
    checks = (100, 500)
    idx = [ref["mcs"].index(c) for c in checks]
    rows = []
    for i, fr in enumerate(frames):
        st = CellState.from_maps(fr[0], fr[1])
        for r in range(2):
            res = run_exact(st, m.hamiltonian, checks[-1], seed=7919 * r + i, record_every=checks[0])
            rows.append([summary_stats(res.frames[res.mcs.index(float(c))]) for c in checks])
    failures = []
    for key, theirs in ref["mean"].items():
        a = np.array([[row[j][key] for j in range(len(checks))] for row in rows])
        mean, se = a.mean(0), a.std(0, ddof=1) / np.sqrt(len(a))
        for j, c in enumerate(checks):
            tm, ts = theirs[idx[j]], ref["se"][key][idx[j]]
            ok = mean[j] == tm if (se[j] == 0 and ts == 0) else abs(mean[j] - tm) <= 4 * np.hypot(se[j], ts)
            if not ok:
                failures.append(f"{key}@{c}: ours {mean[j]:.4g}±{se[j]:.2g}, CC3D {tm:.4g}±{ts:.2g}")
    assert not failures, failures


def _edit(tmp_path, old, new):
    d = tmp_path / "P2"
    shutil.copytree(P2.parent, d)
    xml = d / "Simulation" / "P2_run_01.xml"
    text = xml.read_text()
    assert old in text
    xml.write_text(text.replace(old, new))
    return d / "P2_run_01.cc3d"


@pytest.mark.parametrize("old,new,names", [
    ("</CompuCell3D>", ('<Plugin Name="Chemotaxis"><ChemicalField Name="c"/></Plugin>\n'
                        '<Steppable Type="UniformInitializer"/>\n</CompuCell3D>'), ["Chemotaxis", "UniformInitializer"]),
    ("<NeighborOrder>2</NeighborOrder>\n    </Plugin>",
     "<NeighborOrder>2</NeighborOrder><WeightEnergyByDistance/>\n    </Plugin>", ["WeightEnergyByDistance"]),
    ('<CellType TypeName="T2" TypeId="2"/>', '<CellType TypeName="T2" TypeId="2" Freeze=""/>', ["Freeze"]),
    ("<Temperature>1.0</Temperature>",
     ("<FluctuationAmplitude><FluctuationAmplitudeParameters CellType=\"T1\" FluctuationAmplitude=\"2\"/>"
      "</FluctuationAmplitude>"), ["FluctuationAmplitude"]),
    ("<Boundary_y>Periodic</Boundary_y>", "<Boundary_y>NoFlux</Boundary_y>", ["mixed boundary"]),
    ('<Plugin Name="Volume">', ('<Plugin Name="Surface"><TargetSurface>20</TargetSurface></Plugin>\n'
                                '    <Plugin Name="Volume">'), ["Surface"]),
])
def test_unsupported_parts_are_named(tmp_path, old, new, names):
    with pytest.raises(ModelImportError) as e:
        load_model(_edit(tmp_path, old, new))
    for nm in names:
        assert nm in str(e.value)


def test_trackers_are_accepted_and_listed(tmp_path):
    m = load_model(_edit(tmp_path, "</CompuCell3D>", '<Plugin Name="CenterOfMass"/>\n</CompuCell3D>'))
    assert m.info["ignored"] == ["Plugin CenterOfMass"]
    check_p2_parameters(m)


def test_bad_files(tmp_path):
    bad = tmp_path / "x.xml"
    bad.write_text("<CompuCell3D><Potts>")
    with pytest.raises(ModelImportError, match="x.xml"):
        load_model(bad)
    p = _edit(tmp_path, "Simulation/P2_run_01.piff", "Simulation/missing.piff")
    with pytest.raises(ModelImportError, match="missing.piff"):
        load_model(p)
    p2 = tmp_path / "P2" / "Simulation" / "P2_run_01.xml"
    p2.write_text(p2.read_text().replace('Type1="T1" Type2="T2"', 'Type1="T1" Type2="T9"')
                  .replace("missing.piff", "P2_run_01.piff"))
    with pytest.raises(ModelImportError, match="T9"):
        load_model(p)
