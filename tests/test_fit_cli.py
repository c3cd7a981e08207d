"""`python -m training.fit` end to end (pl objective), `training.evaluate params`, and clear errors on bad input."""

import json

import numpy as np
import pytest
from fit_helpers import SHARED, block_states, write_npz

from neuralcpm_plugin.errors import ConfigError
from neuralcpm_plugin.lattice import CellState
from training.fit import main


def _run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_pl_fit_writes_bundle_with_provenance_and_evaluate_prints_rmse(tmp_path, capsys):
    data = write_npz(tmp_path / "d.npz", block_states(4, size=24))
    out = tmp_path / "run"
    code, _, se = _run(["--data", str(data), "--out", str(out), "--no-export", "--threads", "1",
                         "--truth", "P1"], capsys)
    assert code == 0, se
    mj = json.loads((out / "model" / "model.json").read_text())
    prov = mj["provenance"]
    assert prov["objective"] == "pl" and len(prov["data_sha256"]) == 64 and prov["seed"] == 0
    assert prov["config"]["model"]["kind"] == "analytic" and prov["package_version"]
    assert [t["kind"] for t in mj["terms"]] == ["contact", "volume"]
    assert (out / "config.toml").exists() and (out / "truth.json").exists()
    from training.evaluate import main as evaluate
    assert evaluate(["params", str(out)]) == 0
    text = capsys.readouterr().out
    assert "RMSE per pair: T=1" in text and "T*" in text and "J(1,2)" in text
    assert evaluate(["params", str(out), "--truth", "P2", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["per_pair"]["rmse_T1"] > 0 and res["per_pair"]["rmse_Tstar"] <= res["per_pair"]["rmse_T1"] + 1e-12


def test_reference_data_fit_reports_recovery(tmp_path, capsys):
    p1 = SHARED / "reference-data" / "P1_morpheus"
    if not p1.exists():
        pytest.skip("../shared/reference-data is not there")
    out = tmp_path / "p1"
    code, _, se = _run(["--data", str(p1), "--frames", "final", "--out", str(out), "--no-export",
                         "--threads", "1"], capsys)
    assert code == 0, se
    s = json.loads((out / "summary.json").read_text())
    assert s["rmse"]["per_pair"]["rmse_T1"] <= 0.04          # truth detected from the P1 file names


def test_empty_dataset_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, _, se = _run(["--data", str(tmp_path / "empty"), "--out", str(tmp_path / "r"), "--no-export"], capsys)
    assert code == 2 and "empty dataset" in se and str(tmp_path / "empty") in se
    assert not (tmp_path / "r" / "model").exists()


def test_mixed_lattice_sizes_are_a_clear_error(tmp_path, capsys):
    d = tmp_path / "mixed"
    d.mkdir()
    write_npz(d / "a.npz", block_states(2, size=24))
    write_npz(d / "b.npz", block_states(2, size=30))
    code, _, se = _run(["--data", str(d), "--out", str(tmp_path / "r"), "--no-export"], capsys)
    assert code == 2 and "shape" in se and "a.npz" in se and "b.npz" in se
    assert not (tmp_path / "r" / "model").exists()


def test_unknown_config_key_is_a_clear_error(tmp_path, capsys):
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[pcd]\nbacth = 16\n')
    code, _, se = _run(["--config", str(cfg)], capsys)
    assert code == 2 and "pcd.bacth" in se and "bad.toml" in se


def test_model_data_type_count_mismatch_is_a_clear_error(tmp_path, capsys):
    prior = sorted((SHARED / "reference-data" / "models" / "P1_morpheus").glob("*.xml"))
    states = block_states(2, size=24, n_types=3)
    data = write_npz(tmp_path / "three.npz", states)
    if prior:
        code, _, se = _run(["--data", str(data), "--prior", str(prior[0]), "--out", str(tmp_path / "r"),
                             "--no-export"], capsys)
        assert code == 2 and "2 cell types" in se and "3" in se and "incompatible" in se
    cfg = tmp_path / "nn.toml"
    cfg.write_text('[model]\nkind = "nh"\nneural = { n_types = 2 }\n')
    code, _, se = _run(["--config", str(cfg), "--data", str(data), "--out", str(tmp_path / "r2"), "--no-export"],
                        capsys)
    assert code == 2 and "3 cell types" in se
    assert not (tmp_path / "r" / "model").exists() and not (tmp_path / "r2" / "model").exists()


def test_resume_without_checkpoint_and_missing_data_are_errors(tmp_path, capsys):
    data = write_npz(tmp_path / "d.npz", block_states(2, size=24))
    code, _, se = _run(["--data", str(data), "--objective", "pcd", "--out", str(tmp_path / "r"), "--resume"], capsys)
    assert code == 2 and "no checkpoint" in se
    code, _, se = _run(["--data", str(tmp_path / "nope.npz"), "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and "nope.npz" in se


def test_state_without_cells_is_rejected(tmp_path, capsys):
    data = write_npz(tmp_path / "d.npz", [CellState(np.zeros((10, 10), np.int32), np.array([0], np.int32))])
    code, _, se = _run(["--data", str(data), "--out", str(tmp_path / "r"), "--no-export"], capsys)
    assert code == 2 and "no cell" in se


def test_default_flow_generates_data_fits_and_exports(tmp_path, capsys):
    pytest.importorskip("training.gen_cellsort")
    cfg = tmp_path / "small.toml"
    cfg.write_text('preset = "default"\n[generate]\ndataset = "cellsort"\n'
                   'options = { scenario = "b", scale = "cpu", n_snapshots = 4, size = 24, cells = 6, target = 40.0, '
                   'radius = 8.0, mcs = 30, proposal = "classic" }\n')
    out = tmp_path / "run"
    code, so, se = _run(["--config", str(cfg), "--out", str(out), "--threads", "1", "--no-progress"], capsys)
    assert code == 0, se
    assert (out / "data.npz").exists() and (out / "model" / "model.json").exists()
    truth = json.loads((out / "truth.json").read_text())
    assert "generator" in truth["source"] and len(truth["vector"]) == 6
    assert "bundle:" in so and "python -m training.evaluate params" in so
    # the exporters run when they are installed, and say so when they are not
    assert ("CC3D project" in so or "CC3D export" in so) and ("Morpheus" in so)


def test_a_fitted_bundle_is_a_prior_for_a_closure_model(tmp_path, capsys):
    from neuralcpm_plugin.bundle import load_bundle
    from neuralcpm_plugin.metrics.params import param_vector
    from training.config import load_config
    from training.fit import build_model
    data = write_npz(tmp_path / "d.npz", block_states(4, size=24))
    code, _, se = _run(["--data", str(data), "--out", str(tmp_path / "pl"), "--no-export", "--threads", "1"], capsys)
    assert code == 0, se
    fitted = param_vector(load_bundle(tmp_path / "pl" / "model").hamiltonian)
    states = [s for s in block_states(4, size=24)]
    for freeze in (False, True):
        cfg = load_config(None, overrides={"model": {"kind": "local-nh-closure", "prior": str(tmp_path / "pl" / "model"),
                                                     "freeze_prior": freeze}})
        ham, _ = build_model(cfg, states)
        analytic = [t for t in ham.terms if t.analytic]
        assert np.allclose(param_vector(ham), fitted)          # the prior's values, not the defaults
        assert any(not t.analytic for t in ham.terms)
        contact = next(t for t in analytic if t.kind == "contact")
        volume = next(t for t in analytic if t.kind == "volume")
        assert contact.J_triu.requires_grad != freeze and volume.lam.requires_grad != freeze
    cfg = load_config(None, overrides={"model": {"prior": str(tmp_path / "nowhere")}})
    with pytest.raises(ConfigError, match="nowhere: prior model not found"):
        build_model(cfg, states)


def test_a_cc3d_prior_is_learnable_unless_frozen():
    from training.config import load_config
    from training.fit import build_model
    prior = sorted((SHARED / "reference-data" / "models" / "P2_cc3d").glob("*.cc3d"))
    if not prior:
        pytest.skip("../shared/reference-data is not there")
    states = block_states(2, size=24)
    for freeze in (False, True):
        ham, info = build_model(load_config(None, {"model": {"prior": str(prior[0]), "freeze_prior": freeze}}), states)
        grads = {n: p.requires_grad for n, p in ham.named_parameters()}
        assert grads["terms.0.J_triu"] is not freeze and grads["terms.1.lam"] is not freeze
        assert info["V*"] == 90.0 and info["V*_source"] == "from the prior"
