"""The thread policy (neuralcpm_plugin.threads) and the --threads flag of the command lines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import json, sys
from neuralcpm_plugin.threads import configure_threads
got = configure_threads(int(sys.argv[1]))
import torch, numba
from threadpoolctl import threadpool_info
blas = sorted({d["num_threads"] for d in threadpool_info() if d["user_api"] == "blas"})
print(json.dumps({"got": got, "torch": torch.get_num_threads(), "blas": blas, "numba": numba.get_num_threads()}))
"""


def _probe(n, **env):
    e = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}
    e.update(env)
    e["PYTHONPATH"] = str(ROOT)
    out = subprocess.run([sys.executable, "-c", PROBE, str(n)], capture_output=True, text=True, env=e, timeout=300,
                         check=False)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_explicit_threads_set_torch_blas_and_numba():
    r = _probe(2)
    assert r["torch"] == 2 and r["numba"] == 2 and r["blas"] in ([2], [])  # [] = numpy without a BLAS library
    assert r["got"] == {"torch": 2, "blas": 2, "numba": 2}


def test_default_is_available_cpus_for_torch_and_one_blas_thread_unless_the_environment_says_otherwise():
    from neuralcpm_plugin.threads import available_cpus
    r = _probe(0)
    assert r["torch"] == available_cpus() and r["blas"] in ([1], [])
    r = _probe(0, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="2")
    assert r["torch"] == 1 and r["got"]["blas"] == 2


def test_negative_threads_is_a_clear_error():
    from neuralcpm_plugin.errors import ConfigError
    from neuralcpm_plugin.threads import configure_threads
    for bad in (-1, 10 ** 6):
        with pytest.raises(ConfigError, match="--threads must be between 0"):
            configure_threads(bad)


@pytest.mark.parametrize("cmd", [["training.generate", "mnist"], ["morpheus_xml.run"]])
def test_command_lines_have_a_threads_flag(cmd):
    """(training.evaluate shares training.generate's dispatcher, morpheus_xml.export morpheus_xml.run's code;
    training.fit's flag is tested with the configuration.)"""
    out = subprocess.run([sys.executable, "-m", *cmd, "--help"], capture_output=True, text=True, cwd=ROOT,
                         timeout=300, check=False, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert "--threads" in out.stdout
