"""How much to trust a pseudo-likelihood fit (training/diagnostics.py): intervals, coverage, stationarity,
identifiability, the ``--frames auto`` default, truth files by parameter name, and ``evaluate params``."""

from __future__ import annotations

import glob
import json

import numpy as np
import pytest
from fit_helpers import SHARED, block_states, write_npz

from neuralcpm_plugin.hamiltonian.analytic import cellsort_hamiltonian
from neuralcpm_plugin.hamiltonian.base import LatticeSpec
from neuralcpm_plugin.io import load_dataset
from neuralcpm_plugin.lattice import CellState
from neuralcpm_plugin.metrics.params import KNOWN_TRUTHS, truth_from_source
from training.diagnostics import auto_frames, diagnose_pl, time_series_files, truth_coverage
from training.pseudolikelihood import fit_pl

REF = SHARED / "reference-data"


def _files(name):
    files = sorted(glob.glob(str(REF / name / "run_*.npz")))
    if not files:
        pytest.skip("../shared/reference-data is not there")
    return files


def _fit(states, shape=None):
    vstar = float(np.mean(np.concatenate([s.volumes()[s.cell_ids()] for s in states])))
    J = np.ones((3, 3))
    J[0, 0] = 0
    ham = cellsort_hamiltonian(J, 0.1, vstar, LatticeSpec(shape or states[0].shape))
    res = fit_pl(ham, states)
    return ham, res, diagnose_pl(res, ham, states)


def test_doubling_independent_data_halves_the_variance():
    """The same snapshots twice (as independent snapshots): same estimate, covariance × ½ up to G/(G−1)."""
    states = block_states(4, size=24, seed=3)
    _, _, d1 = _fit(states)
    twice = [s.copy() for s in states] + [s.copy() for s in states]
    _, _, d2 = _fit(twice)
    u1, u2 = d1["uncertainty"], d2["uncertainty"]
    np.testing.assert_allclose(u2["estimate"], u1["estimate"], atol=1e-7)
    g1, g2 = u1["clusters"], u2["clusters"]
    assert g2 == 2 * g1
    ratio = 0.5 * (g2 / (g2 - 1)) / (g1 / (g1 - 1))
    np.testing.assert_allclose(np.asarray(u2["cov"]), ratio * np.asarray(u1["cov"]), rtol=1e-5, atol=1e-12)
    assert all(lo < e < hi for lo, e, hi in zip(u1["lo"], u1["estimate"], u1["hi"]))


@pytest.mark.slow
def test_coverage_of_the_95_percent_intervals_on_disjoint_run_subsets():
    """P1 and P2, final frames, 4 disjoint subsets of 4 runs each: 2 × 4 × 6 = 48 intervals.

    If every interval covered with probability 0.95 independently, P(count ≤ 40) = 0.0024 (binomial(48, 0.95));
    intervals of one fit are correlated, which widens the count's spread, so 41 is a lenient lower bound that
    still fails a procedure covering at 85 % (P(count ≥ 41 | 0.85) ≈ 0.2) most of the time. The intervals must
    also be useful: median width ≤ 60 % of the true value for every parameter (these are 4-snapshot fits).
    """
    inside, n, widths = 0, 0, {}
    for name, key in (("P1_morpheus", "P1"), ("P2_cc3d", "P2")):
        files = _files(name)
        truth = np.asarray(KNOWN_TRUTHS[key]["vector"])
        for k in range(4):
            states = load_dataset(files[4 * k:4 * k + 4]).states
            states, _ = auto_frames(states)
            assert len(states) == 4
            _, _, d = _fit(states)
            u = d["uncertainty"]
            c = truth_coverage(u, truth)
            inside += c["count"]
            n += c["n"]
            widths.setdefault(key, []).append(np.asarray(u["hi"]) - np.asarray(u["lo"]))
        w = np.median(widths[key], axis=0)
        assert np.all(w <= 0.6 * np.abs(truth)), (key, w)
    assert n == 48
    assert inside >= 41, f"{inside} of {n} true parameters inside the 95 % intervals"


@pytest.mark.parametrize("name", ["P1_morpheus", "P2_cc3d"])
def test_stationarity_warning_fires_with_all_frames_and_not_with_final(name):
    files = _files(name)[:4]
    states = load_dataset(files).states                # 4 runs × 21 frames (0 … 1000 MCS)
    assert len(time_series_files(states)) == 4
    _, _, d = _fit(states)
    st = d["stationarity"]
    assert st is not None and st["warn"] and st["p"] < 1e-6
    assert any("not stationary" in w for w in d["warnings"])
    assert "0–450" in st["message"] and max(abs(z) for z in st["z"]) > 3
    final, note = auto_frames(states)
    assert len(final) == 4 and "time series" in note
    _, _, d = _fit(final)
    assert d["stationarity"] is None and not any("stationary" in w for w in d["warnings"])


def test_auto_frames_keeps_independent_snapshots_and_unlabelled_stacks():
    states = block_states(6, size=24)
    for i, s in enumerate(states):
        s.meta.update(path="gen.npz", frame=i, mcs=200)          # independent runs written into one file
    kept, note = auto_frames(states)
    assert len(kept) == 6 and note is None and not time_series_files(states)
    for i, s in enumerate(states):
        s.meta.update(mcs=50 * i)                              # a recorded time series
    kept, note = auto_frames(states)
    assert kept == [states[-1]] and "time series" in note
    for s in states:
        del s.meta["mcs"]                                      # frames without times: kept, but checked
    kept, note = auto_frames(states)
    assert len(kept) == 6 and note is None and len(time_series_files(states)) == 1


def test_unidentified_parameters_are_named():
    """Types 1 and 2 never touch and no type-2 cell touches another: J(1,2), J(2,2) are not identified (the
    warning for a pair that never touches is training.fit's data check; diagnostics leave the interval infinite)."""
    out = []
    for f in range(3):
        ids = np.zeros((30, 30), np.int32)
        ids[2:8, 2 + f:8 + f] = 1
        ids[8:14, 2 + f:8 + f] = 2            # 1 and 2 touch (type 1 both)
        ids[20:26, 18:24 - f] = 3             # type 2, alone
        out.append(CellState(ids, np.array([0, 1, 1, 2], np.int32)))
    _ham, _res, d = _fit(out)
    unc = d["uncertainty"]
    names = unc["names"]
    for bad in ("J(1,2)", "J(2,2)"):
        i = names.index(bad)
        assert unc["se"][i] == float("inf") and unc["lo"][i] == float("-inf")
        assert {"name": bad, "sites": 0} in d["identifiability"]["unidentified"]
    assert np.isfinite(unc["se"][names.index("J(1,0)")])
    assert any("clusters" in w for w in d["warnings"])         # 3 tiny snapshots: few clusters


def test_truth_by_parameter_names(tmp_path):
    t = truth_from_source({"J(1,0)": 2.5, "J(0,2)": 1, "J(1,1)": 1, "J(2,1)": 4.5, "J(2,2)": 1, "lambda": 0.5,
                           "scaling": "paper"})
    np.testing.assert_allclose(t["vector"], KNOWN_TRUTHS["cellsort-b"]["vector"])
    with pytest.raises(ValueError, match=r"missing parameter\(s\) \['J\(1,2\)'\]"):
        truth_from_source({"J(1,0)": 1, "J(2,0)": 1, "J(1,1)": 1, "J(2,2)": 1, "lambda": 1})
    with pytest.raises(ValueError, match="unknown parameter name"):
        truth_from_source({"J(1,0)": 1, "lam": 1})


def test_fit_cli_prints_intervals_and_evaluate_shows_them(tmp_path, capsys):
    from training.evaluate import main as evaluate
    from training.fit import main as fit
    data = write_npz(tmp_path / "d.npz", block_states(4, size=24))
    truth = tmp_path / "truth.json"
    truth.write_text(json.dumps({"J(1,0)": 1.0, "J(2,0)": 1.0, "J(1,1)": 1.0, "J(1,2)": 1.0, "J(2,2)": 1.0,
                                 "lambda": 0.2}))
    out = tmp_path / "run"
    assert fit(["--data", str(data), "--out", str(out), "--no-export", "--no-figure", "--truth", str(truth)]) == 0
    text = capsys.readouterr().out
    assert "uncertainty (cluster sandwich" in text and "95 % interval" in text
    assert "true parameters inside the 95 % intervals:" in text
    s = json.loads((out / "summary.json").read_text())
    unc = s["diagnostics"]["uncertainty"]
    assert len(unc["se"]) == 6 and all(se > 0 for se in unc["se"])
    assert s["coverage"]["n"] == 6
    prov = json.loads((out / "model" / "model.json").read_text())["provenance"]
    assert prov["diagnostics"]["uncertainty"]["lo"] == unc["lo"]
    assert evaluate(["params", str(out)]) == 0
    text = capsys.readouterr().out
    assert "95 % interval" in text and "inside" in text and "after dividing by T*" in text
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"J(1,0)": 1.0}))
    assert fit(["--data", str(data), "--out", str(tmp_path / "r2"), "--no-export", "--no-figure", "--truth", str(bad)]) == 2
    assert "--truth" in capsys.readouterr().err


def test_default_frames_on_reference_time_series_is_the_final_frame(tmp_path, capsys):
    from training.fit import main as fit
    p1 = REF / "P1_morpheus"
    _files("P1_morpheus")
    out = tmp_path / "p1"
    assert fit(["--data", str(p1), "--out", str(out), "--no-export", "--no-figure"]) == 0
    text = capsys.readouterr().out
    assert "keeps the final frame of each (16 of 336 states)" in text
    s = json.loads((out / "summary.json").read_text())
    assert s["rmse"]["per_pair"]["rmse_T1"] <= 0.04            # the all-frames error was 0.20
    assert s["diagnostics"]["stationarity"] is None


@pytest.mark.slow
def test_convex_fit_learns_vstar_through_lambda_vstar():
    """V* learnable: ΔH is linear in (J, λ, λV*), so the fit stays convex; on the 16 final P2 frames it finds
    V* = 90 (the data's mean volume is 89.65) and the intervals of V* hold 90 (8-run halves: z of the 8 V*
    estimates of P1 and P2 between −2.1 and 1.3, measured)."""
    import torch
    files = _files("P2_cc3d")
    states, _ = auto_frames(load_dataset(files).states)
    J = np.ones((3, 3))
    J[0, 0] = 0
    ham = cellsort_hamiltonian(J, 0.1, 89.65, LatticeSpec((100, 100)))
    vol = ham.term("volume")
    vol.target = torch.nn.Parameter(vol.target.detach().clone())
    res = fit_pl(ham, states)
    assert res.method.startswith("convex") and res.to_free is not None
    tgt = vol.target.detach().numpy()[1:]
    assert np.all(np.abs(tgt - 90.0) < 0.3), tgt
    d = diagnose_pl(res, ham, states)
    tg = d["uncertainty"]["targets"]
    assert tg["names"] == ["V*(1)", "V*(2)"] and all(lo <= 90.0 <= hi for lo, hi in zip(tg["lo"], tg["hi"]))
    np.testing.assert_allclose(tg["estimate"], tgt, atol=1e-9)


def test_bench_abc_without_pyabc_says_so_and_exits_0(monkeypatch, capsys):
    import importlib.util
    import sys

    from fit_helpers import ROOT
    spec = importlib.util.spec_from_file_location("bench_abc", ROOT / "benchmarks" / "bench_abc.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setitem(sys.modules, "pyabc", None)           # import pyabc → ImportError
    assert mod.main(["--sims", "1"]) == 0
    assert "pyabc is not installed" in capsys.readouterr().out
