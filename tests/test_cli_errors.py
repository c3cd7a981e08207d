"""Every command line under bad input: one clear line naming the file/option, a non-zero exit, no traceback, and
nothing that existed before changed (the whole tmp tree is hashed before and after).

Categories (one table-driven test each): user mistakes on paths and options; outputs that already exist (never
overwritten without --overwrite / --resume); validation before work (degenerate data, configuration bounds,
the exporters' shared model/state validation); size-limited compressed and XML inputs; Ctrl-C; --debug; resume
checks; file permissions under the umask and stale temporaries.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from fit_helpers import ROOT, block_states, write_npz

import cc3d_steppables.export as cc3d_export
import morpheus_xml.export as morpheus_export
import morpheus_xml.run as morpheus_run
from neuralcpm_plugin.bundle import load_bundle, save_bundle
from neuralcpm_plugin.lattice import CellState
from training import evaluate, fit, generate

MAINS = {"fit": fit.main, "generate": generate.main, "evaluate": evaluate.main, "cc3d": cc3d_export.main,
         "morpheus": morpheus_export.main, "morpheus-run": morpheus_run.main}


# ------------------------------------------------------------------------------------------------ helpers
def tree_hash(root: Path) -> dict:
    """{relative path: (kind, mode, sha256)} of everything under ``root``."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        st = p.lstat()
        if p.is_symlink():
            out[rel] = ("link", os.readlink(p))
        elif p.is_dir():
            out[rel] = ("dir", stat.S_IMODE(st.st_mode))
        else:
            out[rel] = ("file", stat.S_IMODE(st.st_mode), hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def run_main(name, argv, capsys):
    """Run a command's main(argv) in-process; (exit code, stdout, stderr)."""
    try:
        code = MAINS[name]([str(a) for a in argv])
    except SystemExit as e:       # argparse
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_clean_error(code, err, must_name, expected=2):
    assert code == expected, err
    assert "Traceback" not in err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert lines, "no message"
    last = lines[-1]
    assert last.startswith(("error:", "usage:", "interrupted")) or "error:" in last, last
    for s in ([must_name] if isinstance(must_name, str) else must_name):
        assert s in err, f"{s!r} not named in: {err}"


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A small data file and a bundle of a 2-type analytic model on its 24x24 lattice (no fitting)."""
    d = tmp_path_factory.mktemp("assets")
    states = block_states(6, size=24)
    data = write_npz(d / "data.npz", states)
    cfg = fit.load_config(None, {"data": {"path": str(data)}})
    ham, _ = fit.build_model(cfg, states)
    bundle = save_bundle(d / "model", ham)
    three = write_npz(d / "three_types.npz", block_states(2, size=24, n_types=3))
    return {"dir": d, "data": data, "bundle": bundle, "three": three}


@pytest.fixture
def work(tmp_path, monkeypatch):
    """A working folder with an existing file, a non-empty folder and a previous fit run; cwd = it."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile.txt").write_text("keep me\n")
    (tmp_path / "adir").mkdir()
    (tmp_path / "adir" / "notes.txt").write_text("mine\n")
    run = tmp_path / "oldrun"
    (run / "model").mkdir(parents=True)
    (run / "config.toml").write_text('name = "old"\n')
    (run / "summary.json").write_text("{}\n")
    (tmp_path / "old.npz").write_bytes(b"previous data")
    (tmp_path / "old.xml").write_text("<previous/>\n")
    (tmp_path / "oldcc3d").mkdir()
    (tmp_path / "oldcc3d" / "NeuralCPM.cc3d").write_text("<previous/>\n")
    return tmp_path


def _check_case(name, argv, must_name, capsys, work, expected=2):
    before = tree_hash(work)
    code, _out, err = run_main(name, argv, capsys)
    assert_clean_error(code, err, must_name, expected)
    assert tree_hash(work) == before, "a failed command changed or left files"
    return err


# ------------------------------------------------------------------------------------------------ 1. user mistakes
def _user_cases(a):
    B, D = a["bundle"], a["data"]
    return [
        ("fit", ["--data", "missing.npz", "--out", "r"], "missing.npz"),
        ("fit", ["--data", "afile.txt", "--out", "r", "--no-export"], "afile.txt"),
        ("fit", ["--config", "nope.toml", "--out", "r"], "nope.toml"),
        ("fit", ["--data", D, "--out", "r", "--prior", "afile.txt"], "afile.txt"),
        ("fit", ["--data", D, "--out", "r", "--truth", "nonsense"], "--truth"),
        ("fit", ["--data", D, "--out", "r", "--device", "cuda:x"], "device"),
        ("fit", ["--data", D, "--out", "afile.txt"], "afile.txt"),
        ("fit", ["--data", D, "--out", "afile.txt/sub"], "afile.txt"),
        ("fit", ["--data", D, "--out", "r", "--resume", "--overwrite"], "--resume"),
        ("fit", ["--bogus-option"], "--bogus-option"),
        ("generate", ["cellsort", "--scenario", "a", "--out", "adir"], "adir"),
        ("generate", ["cellsort", "--scenario", "a", "--out", "afile.txt/x.npz"], "afile.txt"),
        ("generate", ["mnist", "--out", "m.npz", "-n", "0"], "--snapshots"),
        ("evaluate", ["params", "missing_run"], "missing_run"),
        ("evaluate", ["params", B, "--truth", "P7"], "P7"),
        ("evaluate", ["table2", "--data", "missing.npz", "--runs", B], "missing.npz"),
        ("cc3d", ["missing_bundle", "--out", "c"], "missing_bundle"),
        ("cc3d", [B, "--out", "afile.txt"], "afile.txt"),
        ("cc3d", [B, "--out", "c", "--init", "afile.txt"], "afile.txt"),
        ("cc3d", [B, "--out", "c", "--init", D, "--init-frame", "999"], "999"),
        ("cc3d", [B, "--out", "c", "--name", "bad name"], "bad name"),
        ("morpheus", ["missing_bundle", "--out", "m.xml"], "missing_bundle"),
        ("morpheus", [B, "--out", "adir"], "adir"),
        ("morpheus", [B, "--out", "m.xml", "--init", D, "--frame", "999"], "999"),
        ("morpheus-run", [B, "--morpheus", "/nonexistent/morpheus", "--mcs", "10", "--refresh", "5",
                          "--out", "t.npz"], "/nonexistent/morpheus"),
        ("morpheus-run", [B, "--morpheus", "/bin/true", "--mcs", "10", "--refresh", "0", "--out", "t.npz"],
         "--refresh"),
    ]


@pytest.mark.parametrize("i", range(26))
def test_user_mistakes_give_one_clear_line(i, assets, work, capsys):
    cases = _user_cases(assets)
    assert len(cases) == 26
    name, argv, must = cases[i]
    _check_case(name, argv, must, capsys, work)


# ------------------------------------------------------------------------------------------------ 2. no overwrite
def test_existing_outputs_are_refused_without_overwrite(assets, work, capsys):
    B, D = assets["bundle"], assets["data"]
    cases = [
        ("fit", ["--data", D, "--out", "oldrun", "--no-export"], ["oldrun", "--overwrite", "--resume"]),
        ("fit", ["--data", D, "--out", "adir", "--no-export", "--overwrite"], ["adir", "not a training.fit run"]),
        ("generate", ["cellsort", "--scenario", "a", "--out", "old.npz"], ["old.npz", "--overwrite"]),
        ("cc3d", [B, "--out", "oldcc3d"], ["oldcc3d", "--overwrite"]),
        ("morpheus", [B, "--out", "old.xml"], ["old.xml", "--overwrite"]),
        ("morpheus-run", [B, "--morpheus", "/bin/true", "--mcs", "10", "--refresh", "5", "--out", "old.npz"],
         ["old.npz", "--overwrite"]),
        ("evaluate", ["table2", "--data", D, "--runs", B, "--out", "old"], ["old.", "--overwrite"]),
    ]
    (work / "old.md").write_text("previous table\n")
    for name, argv, must in cases:
        _check_case(name, argv, must, capsys, work)


def test_overwrite_replaces_and_fit_reruns_need_it(assets, work, capsys):
    B, D = assets["bundle"], assets["data"]
    code, _, err = run_main("morpheus", [B, "--out", "old.xml", "--overwrite"], capsys)
    assert code == 0, err
    assert "<MorpheusModel" in (work / "old.xml").read_text()
    args = ["--data", D, "--out", "newrun", "--no-export", "--no-figure", "--no-progress"]
    code, _, err = run_main("fit", args, capsys)
    assert code == 0, err
    err2 = _check_case("fit", args, ["newrun", "--overwrite"], capsys, work)
    assert "finished run" in err2
    (work / "newrun" / "stale.txt").write_text("from the old run")
    code, _out, err = run_main("fit", args + ["--overwrite"], capsys)
    assert code == 0, err
    assert not (work / "newrun" / "stale.txt").exists() and (work / "newrun" / "model" / "model.json").is_file()


@pytest.mark.parametrize("failure", [KeyboardInterrupt, "data", OSError])
def test_a_failed_overwrite_puts_the_old_output_back(assets, work, capsys, monkeypatch, failure):
    """--overwrite moves the old output aside; a run that then fails or is interrupted restores it untouched
    (and leaves no hidden copy behind); a successful one deletes it."""
    from neuralcpm_plugin.errors import DataError

    def boom(*_a, **_k):
        assert [p for p in work.iterdir() if ".replaced-" in p.name], "the old output was not moved aside"
        if failure == "data":
            raise DataError("bad.npz: corrupt (test)")
        raise failure() if failure is KeyboardInterrupt else OSError(28, "No space left on device", "x.npz")

    B, D = assets["bundle"], assets["data"]
    expected = 130 if failure is KeyboardInterrupt else 2
    with monkeypatch.context() as m:
        m.setattr(fit, "load_training_data", boom)
        m.setattr(cc3d_export, "export_project", boom)
        m.setattr(morpheus_export, "export_model", boom)
        for name, argv in [("fit", ["--data", D, "--out", "oldrun", "--no-export", "--overwrite"]),
                           ("cc3d", [B, "--out", "oldcc3d", "--overwrite"]),
                           ("morpheus", [B, "--out", "old.xml", "--overwrite"])]:
            before = tree_hash(work)
            code, _out, err = run_main(name, argv, capsys)
            assert code == expected, err
            assert "Traceback" not in err
            assert tree_hash(work) == before, f"{name}: the old output was not restored exactly"
    code, _out, err = run_main("cc3d", [B, "--out", "oldcc3d", "--overwrite"], capsys)
    assert code == 0, err
    assert "<previous/>" not in (work / "oldcc3d" / "NeuralCPM.cc3d").read_text()
    assert not [p for p in work.iterdir() if ".replaced-" in p.name], "a set-aside copy was left behind"


def _pcd_args(data, out, **extra):
    a = ["--data", str(data), "--out", str(out), "--objective", "pcd", "--iterations", "2", "--no-export",
         "--no-figure", "--no-progress", "--threads", "1"]
    for k, v in extra.items():
        a += [f"--{k}", str(v)]
    return a


def test_resume_refuses_other_configuration_or_data(assets, work, capsys, tmp_path):
    cfg = work / "pcd.toml"
    cfg.write_text('[pcd]\nbatch = 2\nmcs = 0.25\nflips = 10\nplot_every = 0\ncheckpoint_every = 1\n')
    base = ["--config", cfg] + _pcd_args(assets["data"], "prun")
    code, _, err = run_main("fit", base, capsys)
    assert code == 0, err
    cfg.write_text('[pcd]\nbatch = 2\nmcs = 0.25\nflips = 10\nplot_every = 0\ncheckpoint_every = 1\nlr = 0.5\n')
    _check_case("fit", base + ["--resume"], ["--resume", "pcd.lr", "prun"], capsys, work)
    cfg.write_text('[pcd]\nbatch = 2\nmcs = 0.25\nflips = 10\nplot_every = 0\ncheckpoint_every = 1\n')
    other = write_npz(tmp_path / "other.npz", block_states(6, size=24, seed=5))
    args = ["--config", cfg] + _pcd_args(other, "prun") + ["--resume"]
    _check_case("fit", args, ["--resume", "training data differ", "prun"], capsys, work)
    # the same configuration and data, more iterations: resumes
    code, _, err = run_main("fit", ["--config", cfg] + _pcd_args(assets["data"], "prun") + ["--iterations", "3",
                                                                                           "--resume"], capsys)
    assert code == 0, err


# ------------------------------------------------------------------------------------------------ 3. validation
def _degenerate_files(d: Path):
    one_site = write_npz(d / "one_site.npz", [CellState(np.ones((1, 1), np.int32), np.array([0, 1], np.int32))] * 3)
    full = np.ones((8, 8), np.int32)
    one_cell_everywhere = write_npz(d / "full.npz", [CellState(full, np.array([0, 1], np.int32))] * 2)
    return {"one_site": one_site, "full": one_cell_everywhere}


def test_degenerate_data_and_out_of_bounds_configuration_are_refused(assets, work, capsys):
    deg = _degenerate_files(work / "adir")
    D = assets["data"]
    (work / "nan.toml").write_text("[pcd]\nlr = nan\n")
    (work / "big.toml").write_text("[pcd]\nbatch = 100000000\n")
    (work / "orders.toml").write_text("[model]\ncopy_order = 1000\n")
    (work / "wide.toml").write_text('[model]\nkind = "local-nh"\n[model.neural]\nchannels = 1000000\n')
    (work / "layers.toml").write_text('[model]\nkind = "nh"\n[model.neural]\nhidden = [8, 16, 10000000]\n')
    cases = [
        ("fit", ["--data", deg["one_site"], "--out", "r"], ["one_site.npz", "too small", "at least 3"]),
        ("fit", ["--data", deg["full"], "--out", "r"], ["full.npz", "no boundary site"]),
        ("fit", ["--data", D, "--out", "r", "--iterations", "-1"], ["--iterations", "pcd.iterations"]),
        ("fit", ["--data", D, "--out", "r", "--threads", "100000"], ["threads", "1024"]),
        ("fit", ["--config", "nan.toml", "--data", D, "--out", "r"], ["nan.toml", "pcd.lr", "finite"]),
        ("fit", ["--config", "big.toml", "--data", D, "--out", "r"], ["big.toml", "pcd.batch", "65536"]),
        ("fit", ["--config", "orders.toml", "--data", D, "--out", "r"], ["orders.toml", "copy_order", "20"]),
        ("fit", ["--config", "wide.toml", "--data", D, "--out", "r"], ["wide.toml", "model.neural.channels", "4096"]),
        ("fit", ["--config", "layers.toml", "--data", D, "--out", "r"], ["layers.toml", "model.neural.hidden[2]"]),
        ("generate", ["cellsort", "--scenario", "a", "--out", "g.npz", "--size", "100000"], ["--size", "4096"]),
        ("generate", ["cellsort", "--scenario", "a", "--out", "g.npz", "--target", "-3"], ["--target"]),
        ("generate", ["bipolar", "--out", "g.npz", "-n", "100000", "--size", "4000"], ["--snapshots", "sites"]),
        ("generate", ["mnist", "--out", "g.npz", "--mcs", "nan"], ["--mcs", "finite"]),
    ]
    for name, argv, must in cases:
        _check_case(name, argv, must, capsys, work)


def test_absent_types_are_warned_about_and_not_reported_as_learned(assets, work, capsys):
    states = block_states(4, size=24, n_types=2)
    states = [CellState(s.ids, np.where(s.types == 2, 3, s.types).astype(np.int32)) for s in states]
    data = write_npz(work / "absent.npz", states)
    code, out, err = run_main("fit", ["--data", data, "--out", "r", "--no-export", "--no-figure", "--no-progress"],
                              capsys)
    assert code == 0, err
    assert "warning: cell type(s) [2] never occur" in out
    learned = next(ln for ln in out.splitlines() if ln.startswith("learned parameters"))
    assert "J(2,0) = not identified" in learned and "J(1,2) = not identified" in learned
    assert "J(1,0) = not identified" not in learned
    prov = json.loads((work / "r" / "model" / "model.json").read_text())["provenance"]
    assert "J(2,2)" in prov["unidentified_parameters"]


EXPORTERS = [("cc3d", lambda B, extra: [B, "--out", "x_out"] + extra),
             ("morpheus", lambda B, extra: [B, "--out", "x_out.xml"] + extra)]


@pytest.mark.parametrize("exporter", ["cc3d", "morpheus"])
def test_both_exporters_apply_the_same_validation(exporter, assets, work, capsys):
    mb = load_bundle(assets["bundle"])
    ham = mb.hamiltonian
    with torch.no_grad():
        ham.term("contact").J_triu.fill_(float("inf"))
    nan_b = save_bundle(work / "adir" / "inf_model", ham)
    make = dict(EXPORTERS)[exporter]
    B = assets["bundle"]
    cases = [
        (make(nan_b, []), ["inf_model", "non-finite"]),
        (make(B, ["--mcs", "-5"]), ["--mcs"]),
        (make(B, ["--mcs", "10000000000"]), ["--mcs", "1000000000"]),
        (make(B, ["--init", assets["three"]]), ["cell type(s) [3]", "only 2"]),
    ]
    for argv, must in cases:
        _check_case(exporter, argv, must, capsys, work)


def test_shared_validation_refuses_wrong_sized_tables():
    """check_export, called by both exporters: a J that does not match the model's type count is refused."""
    from neuralcpm_plugin.errors import ExportError
    from neuralcpm_plugin.export_checks import check_export
    from neuralcpm_plugin.hamiltonian.analytic import ContactEnergy, VolumeConstraint
    from neuralcpm_plugin.hamiltonian.base import Hamiltonian, LatticeSpec
    lat = LatticeSpec((24, 24), True, 2, 2)
    J = np.ones((3, 3))
    J[0, 0] = 0
    ham = Hamiltonian([ContactEnergy(J, 2), VolumeConstraint([0, 1, 1], [0, 16, 16])], lat, 1.0,
                      ["medium", "a", "b", "c"])
    with pytest.raises(ExportError, match=r"J has shape \(3, 3\), the model has 3 cell types"):
        check_export(ham)
    ok = Hamiltonian([ContactEnergy(J, 2), VolumeConstraint([0, 1, 1], [0, 16, 16])], lat, 1.0, ["medium", "a", "b"])
    assert check_export(ok, block_states(1, size=24)[0], mcs=10) == 2
    with pytest.raises(ExportError, match="no cell"):
        check_export(ok, CellState(np.zeros((24, 24), np.int32), np.zeros(1, np.int32)))


# ------------------------------------------------------------------------------------------------ 4. limits
def test_compressed_xml_inputs_are_size_limited(assets, work, capsys, monkeypatch):
    import neuralcpm_plugin._xmlsafe as xs
    monkeypatch.setattr(xs, "MAX_XML_BYTES", 10_000)
    bomb = work / "adir" / "bomb.xml.gz"
    bomb.write_bytes(gzip.compress(b"<MorpheusModel>" + b" " * 1_000_000 + b"</MorpheusModel>"))
    assert bomb.stat().st_size < 5_000
    ent = work / "adir" / "entities.xml"
    ent.write_text('<?xml version="1.0"?><!DOCTYPE l [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;">]>'
                   "<MorpheusModel>&b;</MorpheusModel>")
    big_cc3d = work / "adir" / "big.cc3d"        # CompuCell3D project files are size-limited too
    big_cc3d.write_text("<Simulation><XMLScript>" + "x" * 20_000 + "</XMLScript></Simulation>")
    cases = [
        ("morpheus", [assets["bundle"], "--out", "m.xml", "--init", bomb], ["bomb.xml.gz", "limit of 10000"]),
        ("fit", ["--data", assets["data"], "--out", "r", "--prior", bomb], ["bomb.xml.gz", "limit of 10000"]),
        ("fit", ["--data", assets["data"], "--out", "r", "--prior", big_cc3d], ["big.cc3d", "limit of 10000"]),
    ]
    for name, argv, must in cases:
        _check_case(name, argv, must, capsys, work)
    from lxml import etree
    root = xs.parse_xml_bytes(ent.read_bytes(), ValueError)
    assert "aaaaaaaaaa" not in etree.tostring(root).decode()      # entities are not expanded


# ------------------------------------------------------------------------------------------------ 5. Ctrl-C, --debug
def test_ctrl_c_prints_one_line_and_removes_unfinished_outputs(assets, work, capsys, monkeypatch):
    import training.gen_cellsort as gc
    import training.gen_mnist as gm

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(gc, "generate_cellsort", interrupted)
    monkeypatch.setattr(gm, "generate_mnist", interrupted)
    monkeypatch.setattr(fit, "check_identifiable", interrupted)
    before = tree_hash(work)
    for name, argv in [("generate", ["cellsort", "--scenario", "a", "--out", "new/sub/g.npz"]),
                       ("generate", ["mnist"]),
                       ("fit", ["--data", assets["data"], "--out", "deep/run", "--no-progress"])]:
        code, _out, err = run_main(name, argv, capsys)
        assert code == 130, err
        assert "Traceback" not in err and err.strip().startswith("interrupted (Ctrl-C)")
        assert tree_hash(work) == before, f"{name}: unfinished output left behind"
    assert not (work / "runs").exists() and not (work / "deep").exists()


def test_debug_shows_the_traceback(assets, work, capsys):
    with pytest.raises(Exception, match="missing_bundle"):
        MAINS["morpheus"](["missing_bundle", "--out", "m.xml", "--debug"])


def test_sigint_during_data_generation_in_a_real_process(tmp_path):
    """SIGINT while the generator runs (numba code included): exit 130, one line, no file and no folder left."""
    env = dict(os.environ, OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    out = tmp_path / "gen" / "data.npz"
    # a run far longer than the test (≈ 400 s of generation on an idle core): the interrupt lands in it whatever
    # the machine's speed (the output folder is only made when the data are written, so it cannot be waited for)
    p = subprocess.Popen([sys.executable, "-m", "training.generate", "cellsort", "--scenario", "a", "--out",
                          str(out), "--snapshots", "200", "--size", "48", "--mcs", "2000"], cwd=tmp_path,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         # a shell that starts pytest in the background ignores SIGINT, and children inherit that
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # noqa: PLW1509
    try:
        time.sleep(12.0)
        assert p.poll() is None, p.communicate()
        p.send_signal(signal.SIGINT)
        _o, e = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == 130, e
    assert "Traceback" not in e and "interrupted (Ctrl-C)" in e
    assert not (tmp_path / "gen").exists()


# ------------------------------------------------------------------------------------------------ 6. files on disk
def test_written_files_follow_the_umask_and_stale_temporaries_are_cleaned(assets, tmp_path):
    from neuralcpm_plugin._fsutil import make_temp_dir
    from training.checkpoint import save_checkpoint
    old = os.umask(0o022)
    try:
        b = save_bundle(tmp_path / "m", load_bundle(assets["bundle"]).hamiltonian)
        assert stat.S_IMODE(b.stat().st_mode) == 0o755
        assert stat.S_IMODE((b / "model.json").stat().st_mode) == 0o644
        # a write killed by SIGKILL leaves a temporary folder (of a process that no longer runs) ...
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True)
        stale = tmp_path / f".checkpoint.tmp-{int(dead.stdout)}-abc"
        stale.mkdir()
        (stale / "state.json").write_text("{")
        old_dir = tmp_path / f"checkpoint.old-{int(dead.stdout)}"
        old_dir.mkdir()
        live = make_temp_dir(tmp_path / "checkpoint")        # ours: alive, kept
        ck = save_checkpoint(tmp_path / "checkpoint", {"x": torch.zeros(2)}, {"iteration": 1})
        assert not stale.exists() and not old_dir.exists() and live.exists()
        assert stat.S_IMODE(ck.stat().st_mode) == 0o755
        os.umask(0o077)
        b2 = save_bundle(tmp_path / "private", load_bundle(assets["bundle"]).hamiltonian)
        assert stat.S_IMODE(b2.stat().st_mode) == 0o700
    finally:
        os.umask(old)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder_is_a_clear_error(assets, work, capsys):
    ro = work / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        _check_case("morpheus", [assets["bundle"], "--out", ro / "m.xml"], ["ro", "permission"], capsys, work)
        _check_case("fit", ["--data", assets["data"], "--out", ro / "r"], ["ro", "permission"], capsys, work)
    finally:
        ro.chmod(0o755)
