"""Speed of exported models inside a real CompuCell3D: MCS/s by wall clock and per CPU-second, one process at a time.

Needs ``CC3D_PYTHON`` (a Python that imports ``cc3d``, CompuCell3D 4.8; or ``--cc3d-python``). The models are
those of the opt-in test ``tests/test_cc3d_integration.py`` on its 32×32 lattice (cell sorting, Contact +
Volume in C++, 8 + 8 cells of V* = 40 from the export's default start): ``local-numpy`` adds its local NH
(stride 4, 8 channels, kernel 3) with ``numba`` made unimportable in CC3D's Python (a blocking ``numba``
package first on ``PYTHONPATH``), so the project's Python energy term runs the numpy evaluator: the setup of
the 68.6 MCS/s estimate of issue 12; ``local-compiled`` the same on the compiled evaluator; ``local-pooled``
the local NH + pooled NH closure (position_dim 2, hidden 16) on the compiled evaluator; ``cellsort`` the
C++ plugins only.

Each run: ``$CC3D_PYTHON -m cc3d.run_script -i X.cc3d -o OUT`` for ``--mcs`` MCS, without mirror checks and
with one snapshot at the end. Printed per model, medians over ``--repeats`` runs (different seeds):
MCS/s by wall clock and per CPU-second of the CC3D process from the steppable's ``start`` to the end
(``neuralcpm_run.json``: CC3D's start-up, the project's loading and numba's compilation excluded), the
Python energy calls per MCS and µs of CPU per call, and the whole process's wall and CPU time (start-up
included; CPU from ``getrusage`` of the child).

    CC3D_PYTHON=/path/to/python python benchmarks/bench_cc3d_run.py [--mcs 200] [--repeats 3]
        [--models local-numpy local-compiled local-pooled cellsort]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_cc3d_integration import _sorting_hamiltonian  # the opt-in test's models

MODELS = {"local-numpy": (True, False, False), "local-compiled": (True, False, True),
          "local-pooled": (True, True, True), "cellsort": (False, False, True)}


def _child_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_one(cc3d_python: str, project: Path, out: Path, block_numba: Path | None, timeout: float) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1",
               NUMBA_NUM_THREADS="1")
    if block_numba is not None:
        env["PYTHONPATH"] = str(block_numba) + os.pathsep + env.get("PYTHONPATH", "")
    c0, t0 = _child_cpu(), time.perf_counter()
    p = subprocess.run([cc3d_python, "-m", "cc3d.run_script", "-i", str(project), "-o", str(out)],
                       capture_output=True, text=True, env=env, cwd=str(project.parent), timeout=timeout,
                       check=False)
    wall, cpu = time.perf_counter() - t0, _child_cpu() - c0
    if p.returncode != 0 or not (out / "neuralcpm_run.json").is_file():
        raise RuntimeError(f"{project}: CompuCell3D exited with {p.returncode}:\n{(p.stdout + p.stderr)[-3000:]}")
    rep = json.loads((out / "neuralcpm_run.json").read_text())
    if rep["callback_errors"]:
        raise RuntimeError(f"{project}: error inside the Python energy term:\n{rep['first_error']}")
    rep["process_wall_s"], rep["process_cpu_s"] = wall, cpu
    rep["numba_note"] = "numba is not importable here" in (p.stdout + p.stderr)
    return rep


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cc3d-python", default=os.environ.get("CC3D_PYTHON"),
                    help="Python that imports cc3d (default: $CC3D_PYTHON)")
    ap.add_argument("--mcs", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per CC3D run")
    a = ap.parse_args(argv)
    if not a.cc3d_python:
        ap.error("set CC3D_PYTHON (or --cc3d-python) to a Python that imports cc3d (CompuCell3D)")
    if a.mcs < 1 or a.repeats < 1:
        ap.error("--mcs and --repeats must be >= 1")
    from cc3d_steppables.export import export_project
    from neuralcpm_plugin.bundle import save_bundle

    shape = (a.size, a.size)
    print(f"CompuCell3D: {a.cc3d_python}; {a.size}x{a.size}, {a.mcs} MCS per run, {a.repeats} runs per model "
          f"(one at a time); load average before: {os.getloadavg()[0]:.2f}")
    print(f"{'model':15s} {'MCS/s wall':>11s} {'MCS/s CPU':>10s} {'calls/MCS':>10s} {'CPU µs/call':>12s} "
          f"{'process wall s':>15s} {'process CPU s':>14s} {'compiled terms':>22s}")
    with tempfile.TemporaryDirectory(prefix="bench_cc3d_") as td:
        td = Path(td)
        block = td / "no_numba" / "numba"
        block.mkdir(parents=True)
        (block / "__init__.py").write_text('raise ImportError("numba blocked by bench_cc3d_run.py")\n')
        for name in a.models:
            local, pooled, compiled = MODELS[name]
            ham = _sorting_hamiltonian(shape, local, pooled)
            bundle = save_bundle(td / f"{name}-bundle", ham)
            reps = []
            for r in range(a.repeats):
                res = export_project(bundle, td / f"{name}-p{r}", mcs=a.mcs, seed=1001 + r, snapshot_every=a.mcs,
                                     verify_mirror_every=0, quiet=True, measure_cost=False)
                reps.append(run_one(a.cc3d_python, res.project, td / f"{name}-out{r}",
                                    None if compiled else block.parent, a.timeout))
            med = {k: float(np.median([x[k] for x in reps])) for k in
                   ("mcs_per_s", "mcs_per_cpu_s", "process_wall_s", "process_cpu_s")}
            calls = float(np.median([x["energy_calls"] / x["mcs"] for x in reps]))
            us = float(np.median([1e6 * x["cpu_s"] / x["energy_calls"] for x in reps])) if calls > 0 else float("nan")
            terms = ",".join(reps[0]["compiled_terms"]) or "-"
            print(f"{name:15s} {med['mcs_per_s']:11.1f} {med['mcs_per_cpu_s']:10.1f} {calls:10.0f} {us:12.1f} "
                  f"{med['process_wall_s']:15.1f} {med['process_cpu_s']:14.1f} {terms:>22s}", flush=True)
            if compiled and local and not reps[0]["compiled_terms"]:
                print(f"  note: {name} ran on the numpy evaluator (numba not importable in {a.cc3d_python})")
    print("CPU µs/call: the CC3D process's CPU time from start to end over the Python energy calls (the C++ "
          "Metropolis step, the change watcher and the snapshot included: an upper bound on one call)")
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
