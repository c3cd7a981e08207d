"""Every command line the README shows and the command-line tools print runs as written.

README.md: every line of every ```bash block is split into simple commands (``&&``, ``;``, ``|``, ``\\``
continuations, heredocs) and checked by what it calls:

* ``python -m MODULE ARGS`` / ``python SCRIPT.py ARGS`` / ``torchrun ... -m MODULE ARGS`` of this repository
  (``training.*``, ``cc3d_steppables.*``, ``morpheus_xml.*``, ``benchmarks/*.py``): the module runs as
  ``__main__`` up to its argument parser, which must accept ARGS (nothing is trained or written);
* ``python -m pytest FILES``: the test files exist; ``python -m pip install -c C -e ".[EXTRA]"``: C exists and
  EXTRA is an extra of pyproject.toml; ``python -c CODE``: CODE compiles;
* ``morpheus --file F --outdir D``: F is written by an earlier ``morpheus_xml.export --out F`` (or exists), the
  same line creates D first (``mkdir -p D &&``) and pins ``OMP_NUM_THREADS=1``;
* ``python -m cc3d.run_script -i P -o O``: P is ``OUT/NeuralCPM.cc3d`` of an earlier ``cc3d_steppables.export
  --out OUT`` (or exists) and O is outside OUT;
* ``cat > FILE.toml <<'END'``: the heredoc is a valid training configuration;
* anything else is a failure that names the line — teach this file the new command.

The tutorial section writes only under ``runs/tutorial/``, the paper experiments (``--out``, ``--gif``, ``cat >``)
only under ``runs/``. Printed commands (exporters, the energy hook,
``training.fit``) are *executed* as printed, with the test doubles of CompuCell3D
(``tests/fixtures/cc3d/fake_cc3d``) and Morpheus (``tests/fixtures/morpheus/fake_morpheus.py``, behind a
``morpheus`` on PATH that, like Morpheus 2.2.4, refuses an output folder that does not exist).
"""

from __future__ import annotations

import argparse
import os
import re
import runpy
import shlex
import subprocess
import sys
import warnings
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import tomllib
from fit_helpers import ROOT, block_states, write_npz

README = ROOT / "README.md"
FIX = ROOT / "tests" / "fixtures"
OWN_PACKAGES = ("training", "cc3d_steppables", "morpheus_xml", "neuralcpm_plugin", "benchmarks")


# ------------------------------------------------------------------------------------------ README parsing
def readme_blocks(text: str):
    """``(language, first line number, [lines])`` of every fenced code block."""
    out, lang, start, buf = [], None, 0, []
    for n, line in enumerate(text.splitlines(), 1):
        m = re.match(r"^\s*```(\w*)\s*$", line)
        if m and lang is None:
            lang, start, buf = m.group(1) or "text", n + 1, []
        elif line.strip().startswith("```") and lang is not None:
            out.append((lang, start, buf))
            lang = None
        elif lang is not None:
            buf.append(line)
    return out


def _section_of(text: str, line_no: int) -> str:
    title = ""
    for n, line in enumerate(text.splitlines(), 1):
        if n > line_no:
            break
        if line.startswith("## "):
            title = line[3:].strip()
    return title


def shell_commands(lines, first_line: int):
    """Simple commands of a bash block: ``(line number, env assignments, argv, heredoc body or None,
    [earlier commands of the same line])``."""
    out = []
    i = 0
    while i < len(lines):
        n = first_line + i
        logical = lines[i]
        while logical.rstrip().endswith("\\") and i + 1 < len(lines):
            i += 1
            logical = logical.rstrip()[:-1] + " " + lines[i]
        i += 1
        lex = shlex.shlex(logical, posix=True, punctuation_chars=True)
        lex.whitespace_split = True
        try:
            tokens = list(lex)
        except ValueError as e:
            raise AssertionError(f"README.md line {n}: cannot split {logical!r}: {e}") from None
        cmds, cur = [], []
        heredoc = None
        j = 0
        while j < len(tokens):
            t = tokens[j]
            if t in ("&&", "||", ";", "|", "&"):
                cmds.append(cur)
                cur = []
            elif t == "<<":
                heredoc = tokens[j + 1]
                j += 1
            elif t in (">", ">>", "<"):
                cur.append(t)
            else:
                cur.append(t)
            j += 1
        cmds.append(cur)
        body = None
        if heredoc is not None:
            body = []
            while i < len(lines) and lines[i].strip() != heredoc:
                body.append(lines[i])
                i += 1
            i += 1
        earlier = []
        for c in cmds:
            if not c:
                continue
            env = {}
            while c and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", c[0]):
                k, v = c.pop(0).split("=", 1)
                env[k] = v
            if c:
                out.append((n, env, c, body, list(earlier)))
                earlier.append((env, c))
    return out


# ------------------------------------------------------------------------------------------ argument parsing
class _Parsed(BaseException):
    """Raised by the patched ArgumentParser.parse_args once the arguments parsed (BaseException: no
    ``except Exception`` in a main() swallows it)."""


def parse_only(target: str, args: list[str], *, script: bool = False):
    """Run module (or script) ``target`` as ``__main__`` with ``args`` until its argument parser has parsed
    them; return None if they parse, else the parser's error message."""
    orig = argparse.ArgumentParser.parse_args

    def patched(self, a=None, namespace=None):
        orig(self, a, namespace)
        raise _Parsed

    errors = []

    def error(self, message):
        errors.append(f"{self.prog}: {message}")
        raise SystemExit(2)

    argv0 = target if script else target.replace(".", "/") + ".py"
    old_argv, old_path = sys.argv, list(sys.path)
    sys.argv = [argv0, *args]
    if script:
        sys.path.insert(0, str(Path(target).parent))
    try:
        with mock.patch.object(argparse.ArgumentParser, "parse_args", patched), \
                mock.patch.object(argparse.ArgumentParser, "error", error), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if script:
                runpy.run_path(target, run_name="__main__")
            else:
                runpy.run_module(target, run_name="__main__", alter_sys=True)
    except _Parsed:
        return None
    except SystemExit as e:
        return errors[-1] if errors else f"exited with {e.code} before its arguments were parsed"
    finally:
        sys.argv = old_argv
        sys.path[:] = old_path
    return "ran to the end without parsing its arguments (no argparse?)"


def _opt(argv, *names):
    for i, a in enumerate(argv):
        if a in names and i + 1 < len(argv):
            return argv[i + 1]
        for nm in names:
            if a.startswith(nm + "="):
                return a.split("=", 1)[1]
    return None


def _pyproject_extras() -> set:
    return set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])


class ReadmeChecker:
    """Checks the README's commands in order (exports seen earlier feed the checks of tool runs)."""

    def __init__(self, text: str, tmp: Path, base: Path = ROOT, where: str = "README.md"):
        self.text = text
        self.tmp = tmp
        self.base = base            # where relative paths of existing files are looked up
        self.where = where
        self.morpheus_models: set[str] = set()
        self.cc3d_projects: dict[str, str] = {}     # project file -> project folder
        self.problems: list[str] = []
        self.checked: list[str] = []

    def fail(self, n, argv, why):
        self.problems.append(f"{self.where} line {n}: `{shlex.join(argv)}`: {why}")

    def python_module(self, n, module, args):
        top = module.split(".")[0]
        if module == "pytest":
            missing = [a for a in args if a.endswith(".py") and not (self.base / a.split("::")[0]).exists()]
            if missing:
                self.fail(n, ["python", "-m", module, *args], f"no such test file(s) {missing}")
            return
        if module == "pip":
            c = _opt(args, "-c", "--constraint")
            if c is not None and not (self.base / c).exists():
                self.fail(n, ["pip", *args], f"constraints file {c} is not in the repository")
            for a in args:
                m = re.match(r"^\.\[([\w,-]+)\]$", a)
                if m:
                    bad = set(m.group(1).split(",")) - _pyproject_extras()
                    if bad:
                        self.fail(n, ["pip", *args], f"extra(s) {sorted(bad)} not in pyproject.toml")
            return
        if module == "cc3d.run_script":
            p, o = _opt(args, "-i", "--input"), _opt(args, "-o", "--output-dir")
            argv = ["python", "-m", module, *args]
            if p is None or o is None:
                self.fail(n, argv, "needs -i PROJECT.cc3d and -o OUTDIR")
            elif p not in self.cc3d_projects and not (self.base / p).exists():
                self.fail(n, argv, f"{p} is not written by an earlier cc3d_steppables.export in the README")
            elif (self.base / o).resolve().is_relative_to((self.base / self.cc3d_projects.get(p, Path(p).parent)).resolve()):
                self.fail(n, argv, "CC3D 4.8 refuses an output folder inside the project folder")
            return
        if top not in OWN_PACKAGES:
            self.fail(n, ["python", "-m", module, *args], f"unknown module {module!r}: teach tests/test_commands.py "
                                                          "how to check it")
            return
        err = parse_only(module, args)
        if err:
            self.fail(n, ["python", "-m", module, *args], f"arguments rejected: {err}")
            return
        out = _opt(args, "--out")
        if module == "morpheus_xml.export" and out:
            self.morpheus_models.add(out)
        if module == "cc3d_steppables.export" and out:
            name = _opt(args, "--name") or "NeuralCPM"
            self.cc3d_projects[f"{out.rstrip('/')}/{name}.cc3d"] = out

    def command(self, n, env, argv, body, earlier):
        prog = argv[0]
        self.checked.append(f"{n}: {shlex.join(argv)}")
        if prog in ("python", "python3"):
            if len(argv) >= 3 and argv[1] == "-m":
                return self.python_module(n, argv[2], argv[3:])
            if len(argv) >= 3 and argv[1] == "-c":
                try:
                    compile(argv[2], f"README.md line {n}", "exec")
                except SyntaxError as e:
                    self.fail(n, argv, f"python -c code does not compile: {e}")
                return
            if len(argv) >= 2 and argv[1].endswith(".py"):
                script = self.base / argv[1]
                if not script.exists():
                    return self.fail(n, argv, f"no such script {argv[1]}")
                err = parse_only(str(script), argv[2:], script=True)
                if err:
                    self.fail(n, argv, f"arguments rejected: {err}")
                return
            return self.fail(n, argv, "unrecognised python invocation")
        if prog == "torchrun":
            if "-m" not in argv:
                return self.fail(n, argv, "torchrun without -m MODULE")
            k = argv.index("-m")
            return self.python_module(n, argv[k + 1], argv[k + 2:])
        if prog == "morpheus":
            f, d = _opt(argv, "--file"), _opt(argv, "--outdir")
            if f is None or d is None:
                return self.fail(n, argv, "needs --file MODEL.xml and --outdir DIR")
            if f not in self.morpheus_models and not (self.base / f).exists():
                self.fail(n, argv, f"{f} is not written by an earlier morpheus_xml.export in the README")
            made = any(c[:2] == ["mkdir", "-p"] and d in c[2:] for _, c in earlier)
            if not made:
                self.fail(n, argv, f"Morpheus 2.2.4 refuses an output folder that does not exist: write "
                                   f"`mkdir -p {d} && ...` before it")
            if env.get("OMP_NUM_THREADS") != "1":
                self.fail(n, argv, "Morpheus's trajectory depends on its thread count: prefix OMP_NUM_THREADS=1")
            return
        if prog == "mkdir":
            return
        if prog == "cat" and ">" in argv and body is not None:
            target = argv[argv.index(">") + 1]
            if target.endswith(".toml"):
                from training.config import load_config
                f = self.tmp / Path(target).name
                f.write_text("\n".join(body) + "\n")
                try:
                    load_config(str(f))
                except Exception as e:  # noqa: BLE001 - reported with the line
                    self.fail(n, argv, f"the heredoc is not a valid training configuration: {e}")
            return
        self.fail(n, argv, f"unknown command {prog!r}: teach tests/test_commands.py how to check it")


def test_readme_command_parsing_handles_the_shell_forms():
    lines = ["A=1 B=2 python -m x --a 1 \\", "   --b 2   # comment", "mkdir -p d && OMP_NUM_THREADS=1 morpheus --file f",
             "cat > c.toml <<'END'", "[pcd]", "lr = 1", "END", "python -c \"print('a b')\""]
    cmds = shell_commands(lines, 10)
    assert [(n, c) for n, _, c, _, _ in cmds] == [
        (10, ["python", "-m", "x", "--a", "1", "--b", "2"]), (12, ["mkdir", "-p", "d"]),
        (12, ["morpheus", "--file", "f"]), (13, ["cat", ">", "c.toml"]), (17, ["python", "-c", "print('a b')"])]
    assert cmds[0][1] == {"A": "1", "B": "2"} and cmds[2][1] == {"OMP_NUM_THREADS": "1"}
    assert cmds[2][4] == [({}, ["mkdir", "-p", "d"])]
    assert cmds[3][3] == ["[pcd]", "lr = 1"]


def test_parse_only_reports_a_bad_option_and_accepts_good_ones():
    assert parse_only("training.fit", ["--out", "runs/x", "--objective", "pl"]) is None
    err = parse_only("training.fit", ["--no-such-option", "pl"])
    assert err is not None and "--no-such-option" in err
    assert parse_only("training.generate", ["mnist", "--scale", "cpu"]) is None
    assert "invalid choice" in parse_only("training.generate", ["mnist", "--scale", "huge"])


def test_every_readme_command_line_is_valid(tmp_path):
    text = README.read_text()
    checker = ReadmeChecker(text, tmp_path)
    n_bash = 0
    for lang, first, lines in readme_blocks(text):
        if lang == "python":
            try:
                compile("\n".join(lines), f"README.md line {first}", "exec")
            except SyntaxError as e:
                checker.problems.append(f"README.md python block at line {first} does not compile: {e}")
            continue
        if lang not in ("bash", "sh", "shell", "console"):
            continue
        n_bash += 1
        for n, env, argv, body, earlier in shell_commands(lines, first):
            checker.command(n, env, argv, body, earlier)
            if _section_of(text, n).startswith("Five-minute tutorial"):
                for flag in ("--out", "-o", "--outdir"):
                    v = _opt(argv, flag)
                    if v is not None and not v.startswith("runs/tutorial/"):
                        checker.problems.append(f"README.md line {n}: the tutorial writes {v}; keep everything "
                                                "under runs/tutorial/ (git-ignored)")
            if _section_of(text, n).startswith("Paper experiments"):
                targets = [_opt(argv, f) for f in ("--out", "--gif")] + [_opt(argv, ">")]
                for v in targets:
                    if v is not None and not v.startswith("runs/"):
                        checker.problems.append(f"README.md line {n}: the paper experiments write {v}; keep "
                                                "everything under runs/ (git-ignored)")
    assert n_bash >= 4 and len(checker.checked) >= 20, checker.checked
    assert not checker.problems, "\n".join(checker.problems)


def test_readme_shows_the_overview_figure_at_the_top():
    text = README.read_text()
    first_section = text.index("\n## ")
    m = re.search(r"!\[[^\]]*\]\((docs/[^)]+\.png)\)", text[:first_section])
    assert m, "the overview figure is not shown above the first section of README.md"
    assert (ROOT / m.group(1)).is_file(), m.group(1)
    assert "runs/" in (ROOT / ".gitignore").read_text().split()


# ------------------------------------------------------------------------------------------ printed commands
def _printed_commands(text: str) -> list[str]:
    """Command lines in printed output: after ``run:``, ``fit:``, ``evaluate:``, ``resume with:``, ``make it with:``
    or ``(the energy hook):``, up to three spaces or the end of the line."""
    out = []
    for line in text.splitlines():
        m = re.search(r"(?:^|\s)(?:run|fit|evaluate|resume with|make it with|energy hook\)):\s+(.+)$", line)
        if m:
            out.append(re.split(r"\s{3,}", m.group(1).strip())[0])
    return out


@pytest.fixture
def tools(tmp_path):
    """PATH with a ``morpheus`` that refuses a missing --outdir (as Morpheus 2.2.4 does) and runs the fake;
    PYTHONPATH with the fake ``cc3d`` and this repository."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    exe = bindir / "morpheus"
    exe.write_text("#!/bin/sh\n"
                   'out=""; prev=""; for a in "$@"; do [ "$prev" = "--outdir" ] && out="$a"; prev="$a"; done\n'
                   'if [ ! -d "$out" ]; then echo "Error: output directory $out does not exist" >&2; exit 255; fi\n'
                   f'exec "{sys.executable}" "{FIX / "morpheus" / "fake_morpheus.py"}" "$@"\n')
    exe.chmod(0o755)
    (bindir / "python").symlink_to(sys.executable)
    env = dict(os.environ)
    env["PATH"] = f"{bindir}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join([str(FIX / "cc3d" / "fake_cc3d"), str(ROOT)])
    env["OMP_NUM_THREADS"] = "4"   # the printed Morpheus command must pin its own
    return env


def _sh(cmd: str, cwd: Path, env: dict, timeout=300) -> subprocess.CompletedProcess:
    r = subprocess.run(["bash", "-c", cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                       check=False)
    assert r.returncode == 0, f"printed command failed ({r.returncode}): {cmd}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r


def _small_bundle(path, neural: bool = False):
    from neuralcpm_plugin.bundle import save_bundle
    from neuralcpm_plugin.hamiltonian.analytic import ContactEnergy, VolumeConstraint
    from neuralcpm_plugin.hamiltonian.base import Hamiltonian, LatticeSpec
    terms = [ContactEnergy([[0, 2, 2], [2, 1, 2], [2, 2, 1]], 2), VolumeConstraint([0, 0.5, 0.5], [0, 12, 12])]
    if neural:
        from neuralcpm_plugin.hamiltonian.local_nh import LocalNeuralHamiltonian
        terms.append(LocalNeuralHamiltonian({"n_types": 2, "stride": 4, "channels": 4, "kernel": 3}, seed=0,
                                            scale=0.3))
    ham = Hamiltonian(terms, LatticeSpec((24, 24), True, 2, 2), 1.0, ["medium", "A", "B"])
    save_bundle(path, ham)
    return path


def test_exporters_print_commands_that_run_as_printed(tmp_path, tools):
    """The CC3D and Morpheus run lines printed by the exporters' CLIs, executed verbatim from the folder they
    were printed in (fake CC3D / Morpheus): outputs appear where the commands say."""
    work = tmp_path / "work"
    work.mkdir()
    _small_bundle(work / "model")
    write_npz(work / "init.npz", block_states(1, size=24))
    r = _sh("python -m cc3d_steppables.export model --out proj --init init.npz --mcs 20 --seed 3", work, tools)
    cmds = _printed_commands(r.stdout)
    assert len(cmds) == 1 and cmds[0].startswith("python -m cc3d.run_script"), r.stdout
    _sh(cmds[0], work, tools)
    out = _opt(shlex.split(cmds[0]), "-o")
    assert (work / out / "lattice.npz").is_file()

    r = _sh("python -m morpheus_xml.export model --out m/model.xml --init init.npz --mcs 20", work, tools)
    cmds = _printed_commands(r.stdout)
    assert len(cmds) == 1 and "morpheus --file" in cmds[0] and "OMP_NUM_THREADS=1" in cmds[0], r.stdout
    outdir = _opt(shlex.split(cmds[0].split("&&")[-1]), "--outdir")
    assert not (work / outdir).exists()
    # the stand-in refuses a missing folder, as Morpheus does: the bare command fails, the printed one runs
    bare = cmds[0].split("&&", 1)[1]
    assert subprocess.run(["bash", "-c", bare], cwd=work, env=tools, capture_output=True,
                          check=False).returncode != 0
    _sh(cmds[0], work, tools)
    assert (work / outdir / "cell.id_cell.type.tif").is_file()


def test_neural_export_prints_an_energy_hook_command_with_every_required_flag(tmp_path, tools):
    work = tmp_path / "work"
    work.mkdir()
    _small_bundle(work / "model", neural=True)
    write_npz(work / "init.npz", block_states(1, size=24))
    r = _sh("python -m morpheus_xml.export model --out nh.xml --init init.npz --mcs 10 --field-attempts 50",
            work, tools)
    cmds = _printed_commands(r.stdout)
    hook = [c for c in cmds if "morpheus_xml.run" in c]
    assert len(cmds) == 2 and len(hook) == 1, r.stdout
    argv = shlex.split(hook[0])
    for flag in ("--morpheus", "--mcs", "--refresh", "--out", "--init"):
        assert _opt(argv, flag) is not None, (flag, hook[0])
    assert parse_only("morpheus_xml.run", argv[3:]) is None
    hook_run = hook[0].replace("--refresh 50", "--refresh 5")   # two chunks instead of one: same flags
    _sh(hook_run + " --field-attempts 50", work, tools)
    z = np.load(work / _opt(argv, "--out"))
    assert list(z["mcs"]) == [0, 5, 10]


def test_training_fit_prints_commands_that_are_valid(tmp_path, monkeypatch, capsys):
    """A small pl fit through the CLI: every printed command line parses (python -m ...) or refers to files the
    run wrote, creates Morpheus's output folder and pins its thread count (the same lines are executed in
    the two tests above); the overview figure is written and recorded in summary.json."""
    import json

    from training.fit import main
    work = tmp_path / "work"
    work.mkdir()
    write_npz(work / "d.npz", block_states(6, size=24))
    (work / "truth.json").write_text(json.dumps({"J": [[0, 1, 1], [1, 1, 1], [1, 1, 1]], "lambda": 0.5}))
    monkeypatch.chdir(work)
    assert main(["--data", "d.npz", "--out", "runs/small", "--no-progress", "--threads", "1",
                 "--truth", "truth.json"]) == 0
    out = capsys.readouterr().out
    cmds = _printed_commands(out)
    kinds = {"cc3d.run_script", "morpheus --file", "training.evaluate params"}
    assert all(any(k in c for c in cmds) for k in kinds), out
    checker = ReadmeChecker(out, tmp_path, base=work, where="training.fit output")
    for i, c in enumerate(cmds):
        for n, env, argv, body, earlier in shell_commands([c], i + 1):
            checker.command(n, env, argv, body, earlier)
    assert not checker.problems, "\n".join(checker.problems)
    summary = json.loads((work / "runs/small/summary.json").read_text())
    assert (work / summary["figure"]).is_file()
    assert f"overview figure: {summary['figure']}" in out
    log = (work / "runs/small/train.log").read_text()
    assert log.count("pl: convex fit") == 1 and log.count("data: 6 states") == 1
    assert "overview figure:" in log and "done in" in log.splitlines()[-1]


def test_missing_preset_data_hint_is_a_runnable_command(tmp_path):
    from neuralcpm_plugin.errors import DataError
    from training.config import load_config
    from training.fit import load_training_data
    cfg = load_config("mnist-cpu", {"data": {"path": str(tmp_path / "nope.npz")}})
    with pytest.raises(DataError) as e:
        load_training_data(cfg, tmp_path)
    cmd = re.search(r"make it with: (.+?)\)", str(e.value)).group(1)
    argv = shlex.split(cmd)
    assert argv[:3] == ["python", "-m", "training.generate"]
    assert parse_only("training.generate", argv[3:]) is None
    assert _opt(argv, "--out") == str(tmp_path / "nope.npz") and _opt(argv, "--scale") == "cpu"


def test_generators_print_fit_commands_that_parse(tmp_path, monkeypatch, capsys):
    from training.generate import main
    monkeypatch.chdir(tmp_path)
    assert main(["tissue", "--size", "20", "--cells", "16", "--target", "20", "--snapshots", "1", "--mcs", "2",
                 "--out", "my data/t.npz", "--no-progress"]) == 0
    cmds = _printed_commands(capsys.readouterr().out)
    assert len(cmds) == 1, cmds
    argv = shlex.split(cmds[0])
    assert argv[:3] == ["python", "-m", "training.fit"] and parse_only("training.fit", argv[3:]) is None
    assert (tmp_path / _opt(argv, "--data")).is_file() and (tmp_path / _opt(argv, "--truth")).is_file()


def test_the_energy_hook_runs_morpheus_on_one_thread_whatever_the_environment(tmp_path, monkeypatch):
    from morpheus_xml.run import FINISHED, run_morpheus
    exe = tmp_path / "morpheus"
    exe.write_text(f'#!/bin/sh\necho "$OMP_NUM_THREADS" > "{tmp_path / "threads.txt"}"\necho "{FINISHED}"\n')
    exe.chmod(0o755)
    monkeypatch.setenv("OMP_NUM_THREADS", "8")
    model = tmp_path / "m.xml"
    model.write_text("<MorpheusModel/>")
    run_morpheus(exe, model, tmp_path / "out")
    assert (tmp_path / "threads.txt").read_text().strip() == "1"


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("NEURALCPM_TEST_FRESH_CLONE"),
                    reason="opt-in (NEURALCPM_TEST_FRESH_CLONE=1): numba compiles everything afresh in a new copy, "
                           "minutes")
def test_tutorial_in_a_fresh_clone_leaves_git_status_clean(tmp_path):
    """The tutorial's commands (all but the CompuCell3D / Morpheus runs and the lines reading their output), run
    as written in a fresh copy of the repository (its tracked files, committed) with ../shared beside it: each
    succeeds and `git status` stays clean afterwards. Opt-in: the copy has no numba cache, so the first
    sampler calls compile (≈ 6 min on a loaded 2-core machine)."""
    shared = ROOT.parent / "shared"
    if not (shared / "reference-data" / "P1_morpheus").is_dir():
        pytest.skip("../shared/reference-data is not there")
    files = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True, check=True).stdout
    clone = tmp_path / "clone"
    import shutil
    for f in files.decode().split("\0"):
        if f and (ROOT / f).is_file():
            (clone / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, clone / f)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(clone)]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "clone"], check=True)
    (tmp_path / "shared").symlink_to(shared)
    env = dict(os.environ, PYTHONPATH=str(clone), OMP_NUM_THREADS="1")
    text = (clone / "README.md").read_text()
    ran = []
    for lang, first, lines in readme_blocks(text):
        if not _section_of(text, first).startswith("Five-minute tutorial"):
            continue
        if lang == "python":
            r = subprocess.run([sys.executable, "-c", "\n".join(lines)], cwd=clone, env=env, capture_output=True,
                               text=True, check=False)
            assert r.returncode == 0, f"README.md python block at line {first}:\n{r.stderr[-2000:]}"
            continue
        for i, line in enumerate(lines):
            needs_tool = re.search(r"\bmorpheus --file|cc3d\.run_script|_out/", line)
            if needs_tool or not line.strip() or line.lstrip().startswith("#"):
                continue
            r = subprocess.run(["bash", "-c", line], cwd=clone, env=env, capture_output=True, text=True, check=False)
            assert r.returncode == 0, f"README.md line {first + i}: {line}\n{r.stdout[-1500:]}\n{r.stderr[-2000:]}"
            ran.append(line)
    assert len(ran) >= 4, ran
    status = subprocess.run([*git, "status", "--porcelain"], capture_output=True, text=True, check=True).stdout
    assert status == "", f"the tutorial left files outside git-ignored folders:\n{status}"
    assert (clone / "runs" / "tutorial" / "p1" / "overview.png").is_file()
