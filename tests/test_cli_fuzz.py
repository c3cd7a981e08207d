"""Fuzz the command lines and the configuration files (hypothesis): whatever the options, a command ends in
success, a usage error or ONE line of the package's own error — never a traceback, an internal error or an
out-of-memory; a few hostile inputs run in a subprocess under an address-space limit.

To stay fast the expensive work is cut off where it starts (samplers, the fit, data generation, the classifier):
reaching it counts as "the input passed validation" and ends the example.
"""

from __future__ import annotations

import contextlib
import gzip
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from fit_helpers import ROOT, block_states, write_npz
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cc3d_steppables.export as cc3d_export
import morpheus_xml.export as morpheus_export
import morpheus_xml.run as morpheus_run
from neuralcpm_plugin.bundle import save_bundle
from neuralcpm_plugin.errors import NeuralCPMError
from training import evaluate, fit, generate
from training.config import DEFAULTS, load_config

FUZZ = settings(max_examples=20, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])


class _Reached(BaseException):
    """The expensive part was reached: the input passed every check before it."""


def _reached(*a, **k):
    raise _Reached


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz_assets")
    states = block_states(4, size=24)
    data = write_npz(d / "data.npz", states)
    ham, _ = fit.build_model(load_config(None, {"data": {"path": str(data)}}), states)
    return {"data": str(data), "bundle": str(save_bundle(d / "model", ham))}


@contextlib.contextmanager
def _sandbox():
    """A fresh cwd with an existing file and folder; the expensive calls cut off."""
    import neuralcpm_plugin.classifier as clf
    import neuralcpm_plugin.sampling.exact as ex
    import neuralcpm_plugin.sampling.parallel as par
    import training.pseudolikelihood as pl
    from training import pcd
    with tempfile.TemporaryDirectory() as d, pytest.MonkeyPatch.context() as mp:
        mp.chdir(d)
        Path(d, "afile.txt").write_text("x")
        Path(d, "adir").mkdir()
        Path(d, "adir", "f").write_text("y")
        for mod, name in [(ex, "ExactSampler"), (ex, "run_exact"), (par, "ParallelSampler"), (pl, "fit_pl"),
                          (pcd, "PCDTrainer"), (fit, "_generate"), (clf, "train_classifier")]:
            mp.setattr(mod, name, _reached)
        old = torch.get_num_threads()
        try:
            yield Path(d)
        finally:
            torch.set_num_threads(old)


def _run(main, argv, capsys):
    """Run ``main(argv)``; return (code or 'reached', stderr). Any other exception fails the test."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    except _Reached:
        code = "reached"
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    assert "internal error" not in err, err
    assert "out of memory" not in err, err
    assert code in (0, 2, "reached"), (code, argv, err)
    if code == 2:
        lines = [ln for ln in err.strip().splitlines() if ln.strip()]
        assert lines and (lines[-1].startswith("error:") or "error:" in lines[-1]), err
    return code, err


# ------------------------------------------------------------------------------------------------ strategies
INTS = st.one_of(st.integers(-3, 40), st.sampled_from([0, -1, 10**6, 10**9, 10**12, 2**63]))
FLOATS = st.one_of(st.floats(-10, 1e3, allow_nan=False), st.sampled_from(["nan", "inf", "-inf", "1e308", "-0"]))
TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=8)


def _paths(assets, outputs=False):
    pool = ["missing.npz", "afile.txt", "adir", "adir/f", "new_out", "new/deep/out.npz", "out.xml", "."]
    if not outputs:
        pool += [assets["data"], assets["bundle"], assets["bundle"] + "/model.json"]
    return st.one_of(st.sampled_from(pool), TEXT)


def _argv(options: dict, positional=()):
    """argv strategies: the positional values, then a random subset of ``options`` (flag → value strategy or
    None for a switch), in random order."""
    def build(pos, chosen):
        out = [str(p) for p in pos]
        for flag, val in chosen:
            out.append(flag)
            if val is not None:
                out.append(str(val))
        return out
    items = [st.tuples(st.just(f), s if s is not None else st.none()) for f, s in options.items()]
    return st.builds(build, st.tuples(*positional), st.lists(st.one_of(*items), max_size=6))


def _fit_options(a):
    return {"--config": st.one_of(st.sampled_from(["default", "cellsort-a-cpu", "nope", "afile.txt"]), TEXT),
            "--data": _paths(a), "--frames": st.one_of(st.sampled_from(["all", "final", "last:2", "last:0"]), TEXT),
            "--model": st.sampled_from(["analytic", "nh", "local-nh-closure", "bogus"]),
            "--objective": st.sampled_from(["pl", "pcd", "x"]), "--prior": _paths(a), "--freeze-prior": None,
            "--out": _paths(a, outputs=True), "--resume": None, "--overwrite": None,
            "--device": st.sampled_from(["cpu", "cuda", "cuda:0", "cuda:x", "tpu"]), "--seed": INTS,
            "--iterations": INTS, "--truth": st.one_of(st.sampled_from(["P1", "P9", "cellsort-a"]), _paths(a)),
            "--threads": INTS, "--no-export": None, "--no-figure": None, "--no-progress": None}


@given(data=st.data())
@FUZZ
def test_fuzz_fit_command_line(assets, capsys, data):
    argv = data.draw(_argv(_fit_options(assets)) | _argv(_fit_options(assets)).map(
        lambda v: ["--data", assets["data"], "--no-export", "--no-progress"] + v))
    with _sandbox():
        _run(fit.main, argv, capsys)


@given(data=st.data())
@FUZZ
def test_fuzz_generate_and_evaluate_command_lines(assets, capsys, data):
    gen = {"--scale": st.sampled_from(["cpu", "paper", "huge"]), "--out": _paths(assets, outputs=True),
           "--seed": INTS, "--size": INTS, "--cells": INTS, "--mcs": FLOATS, "--no-progress": None,
           "--overwrite": None}
    which = data.draw(st.sampled_from(["cellsort", "mnist", "bipolar", "params", "table1", "table2"]))
    if which == "cellsort":
        argv = data.draw(_argv(dict(gen, **{"--snapshots": INTS, "--target": FLOATS, "--radius": FLOATS,
                                            "--sampler": st.sampled_from(["exact", "parallel", "z"]),
                                            "--flips": INTS}),
                               (st.just("cellsort"), st.just("--scenario"), st.sampled_from(["a", "b", "c"]))))
        main = generate.main
    elif which in ("mnist", "bipolar"):
        argv = data.draw(_argv(dict(gen, **{"-n": INTS}), (st.just(which),)))
        main = generate.main
    elif which == "params":
        argv = data.draw(_argv({"--truth": st.one_of(st.sampled_from(["P1", "P2", "cellsort-b"]), _paths(assets)),
                                "--json": None}, (st.just("params"), _paths(assets))))
        main = evaluate.main
    else:
        argv = data.draw(_argv({"--data": _paths(assets), "--runs": _paths(assets), "--out": _paths(assets, True),
                                "--gif": _paths(assets, True), "--seed": INTS, "--overwrite": None},
                               (st.just(which),)))
        main = evaluate.main
    with _sandbox():
        _run(main, argv, capsys)


@given(data=st.data())
@FUZZ
def test_fuzz_exporter_command_lines(assets, capsys, data):
    common = {"--init": _paths(assets), "--mcs": INTS, "--seed": INTS, "--overwrite": None}
    which = data.draw(st.sampled_from(["cc3d", "morpheus", "run"]))
    bundle = st.one_of(st.just(assets["bundle"]), _paths(assets))
    if which == "cc3d":
        opts = dict(common, **{"--out": _paths(assets, True), "--init-frame": INTS, "--name": TEXT,
                               "--snapshot-every": INTS, "--nh-recompute-every": INTS, "--verify-mirror-every": INTS})
        main = cc3d_export.main
    elif which == "morpheus":
        opts = dict(common, **{"--out": _paths(assets, True), "--frame": INTS, "--record-every": INTS,
                               "--save-interval": INTS, "--cells-per-type": INTS, "--field-attempts": INTS})
        main = morpheus_export.main
    else:
        opts = dict(common, **{"--out": _paths(assets, True), "--refresh": INTS, "--frame": INTS,
                               "--morpheus": st.sampled_from(["/bin/true", "/bin/false", "/nonexistent"]),
                               "--cells-per-type": INTS, "--workdir": _paths(assets, True)})
        main = morpheus_run.main
    argv = data.draw(_argv(opts, (bundle,)))
    if which != "run" and "--out" not in argv:
        argv += ["--out", "o.xml" if which == "morpheus" else "o_dir"]
    if which == "run" and "--morpheus" not in argv:
        argv += ["--morpheus", "/bin/true"]
    with _sandbox():
        _run(main, argv, capsys)


# ------------------------------------------------------------------------------------------------ config files
def _toml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v == math.inf else "-inf" if v == -math.inf else repr(v))
    if isinstance(v, int):
        return str(v)
    return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'


_SECTIONS = {k: v for k, v in DEFAULTS.items() if isinstance(v, dict)}
_VALUES = st.one_of(st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from(["", "cpu", "cuda:x", "pcd", "all", "last:3", "x" * 300]), TEXT)


@given(data=st.data())
@settings(max_examples=100, deadline=None, derandomize=True)
def test_fuzz_configuration_files(tmp_path_factory, data):
    lines = []
    for key in data.draw(st.lists(st.sampled_from(["name", "seed", "device", "threads", "out", "bogus"]),
                                  max_size=3, unique=True)):
        lines.append(f"{key} = {_toml_value(data.draw(_VALUES))}")
    for sec in data.draw(st.lists(st.sampled_from([*_SECTIONS, "nosuch"]), max_size=3, unique=True)):
        keys = [k for k, v in _SECTIONS.get(sec, {"k": 0}).items() if not isinstance(v, dict)] + ["typo"]
        lines.append(f"[{sec}]")
        for key in data.draw(st.lists(st.sampled_from(keys), max_size=4, unique=True)):
            lines.append(f"{key} = {_toml_value(data.draw(_VALUES))}")
    if data.draw(st.booleans()):
        lines.insert(0, f"preset = {_toml_value(data.draw(st.sampled_from(['default', 'nope', 'mnist-cpu'])))}")
    f = tmp_path_factory.mktemp("cfg") / "c.toml"
    f.write_text("\n".join(lines) + "\n", encoding="utf-8")
    try:
        cfg = load_config(str(f))
    except NeuralCPMError as e:
        assert str(f) in str(e) or "preset" in str(e), str(e)        # the message names the file
        return
    # accepted: every number is finite and within its bound
    for sec in ("pcd", "pl"):
        for v in cfg[sec].values():
            if isinstance(v, float):
                assert math.isfinite(v)
    assert 1 <= cfg["pcd"]["batch"] <= 65536 and 0 <= cfg["threads"] <= 1024


# ------------------------------------------------------------------------------------------------ memory limit
_LIMITED = r"""
import importlib, json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
codes = []
for mod, *argv in json.loads(sys.argv[1]):
    print("=== case", len(codes), file=sys.stderr, flush=True)
    codes.append(importlib.import_module(mod).main(argv))
print(json.dumps(codes))
"""


def test_hostile_inputs_under_a_memory_limit(assets, tmp_path):
    """Under a 3 GiB address-space limit, inputs that would need far more are refused by the package's bounds
    (the message names the bound), never by running out of memory."""
    import json
    member = gzip.compress(b" " * (1 << 20), 9)
    bomb = tmp_path / "bomb.xml.gz"
    bomb.write_bytes(b"".join([member] * 600))            # ~600 MiB of XML from a ~0.6 MB file
    assert bomb.stat().st_size < 2_000_000
    cfg = tmp_path / "huge.toml"
    cfg.write_text("[pcd]\nbatch = 10000000\n[pl]\nsites_per_state = 1000000000000\n")
    cases = [
        (["training.generate", "cellsort", "--scenario", "a", "--size", "4096", "--snapshots", "100000",
          "--out", str(tmp_path / "g.npz")], "lattice sites exceeds"),
        (["morpheus_xml.export", assets["bundle"], "--out", str(tmp_path / "m.xml"), "--init", str(bomb)],
         "limit of 536870912 bytes"),
        (["training.fit", "--config", str(cfg), "--data", assets["data"], "--out", str(tmp_path / "r")],
         "65536"),
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-c", _LIMITED, json.dumps([c for c, _ in cases])], capture_output=True,
                       text=True, env=env, cwd=tmp_path, timeout=300, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads(p.stdout.strip().splitlines()[-1]) == [2] * len(cases), p.stderr
    assert "Traceback" not in p.stderr and "out of memory" not in p.stderr
    parts = p.stderr.split("=== case")[1:]
    for (_, must), part in zip(cases, parts):
        assert must in part, part
    assert not (tmp_path / "g.npz").exists() and not (tmp_path / "m.xml").exists() and not (tmp_path / "r").exists()
