"""CPU threads: one policy for torch, the BLAS libraries under numpy/scipy, and numba.

The command lines (``training.fit``, ``training.generate``, ``training.evaluate``, ``morpheus_xml.run``,
``morpheus_xml.export``) call :func:`configure_threads` once, with their ``--threads`` value:

* ``--threads N`` (N ≥ 1): torch's intra-op threads, the BLAS threads (OpenBLAS / MKL / BLIS, through
  ``threadpoolctl``) and numba's threads are all N.
* no ``--threads`` (or 0), the default: torch and numba use the CPUs this process may run on
  (``os.sched_getaffinity``; ``OMP_NUM_THREADS`` when it is set), BLAS uses **one** thread unless
  ``OPENBLAS_NUM_THREADS``, ``MKL_NUM_THREADS`` or ``OMP_NUM_THREADS`` says otherwise.  The package's numpy work
  is many small matrix products (the local and pooled NH's numpy evaluators multiply matrices of ~16×16 per
  copy attempt), for which BLAS threads cost far more than they gain: OpenBLAS's default threads made the
  local NH's numpy evaluator at kernel 7 ≈ 8× slower than one thread on this project's machine.

On a machine shared with other jobs, ``--threads 1`` per process and one process per core is usually fastest.
"""

from __future__ import annotations

import os
import sys

__all__ = ["available_cpus", "configure_threads"]

_LIMITER = None  # keeps threadpoolctl's limits alive for the process
MAX_THREADS = 1024  #: the largest --threads accepted


def available_cpus() -> int:
    """CPUs this process may run on (affinity mask; ``os.cpu_count()`` where that is unknown)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _env_int(name: str) -> int | None:
    try:
        v = int(os.environ.get(name, ""))
    except ValueError:
        return None
    return v if v > 0 else None


def configure_threads(n: int | None = None) -> dict:
    """Apply the thread policy of the module docstring; returns ``{"torch": .., "blas": .., "numba": ..}`` (the
    values set, None where a library is absent or was left alone).

    Raises :class:`~neuralcpm_plugin.errors.ConfigError` for n outside 0..:data:`MAX_THREADS`.
    """
    global _LIMITER
    if n is not None and not 0 <= int(n) <= MAX_THREADS:
        from .errors import ConfigError
        raise ConfigError(f"--threads must be between 0 (the default) and {MAX_THREADS}, got {n}")
    n = int(n or 0)
    out: dict = {"torch": None, "blas": None, "numba": None}
    compute = n or _env_int("OMP_NUM_THREADS") or available_cpus()
    try:
        import torch
        torch.set_num_threads(compute)
        out["torch"] = torch.get_num_threads()
    except ImportError:  # pragma: no cover - torch-free host tools
        pass
    blas = n or next((v for v in map(_env_int, ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS"))
                      if v), None) or 1
    try:
        from threadpoolctl import threadpool_limits
        _LIMITER = threadpool_limits(limits=blas, user_api="blas")
        out["blas"] = blas
    except ImportError:  # pragma: no cover - threadpoolctl missing: say so rather than fail
        out["blas"] = None
    numba = sys.modules.get("numba")
    if numba is None:  # not imported yet: its thread count is read from the environment at import
        if n or "NUMBA_NUM_THREADS" not in os.environ:
            os.environ["NUMBA_NUM_THREADS"] = str(compute)
        out["numba"] = int(os.environ["NUMBA_NUM_THREADS"])
    else:
        try:
            k = min(compute, int(numba.config.NUMBA_NUM_THREADS))
            numba.set_num_threads(k)
            out["numba"] = k
        except (AttributeError, ValueError):  # pragma: no cover
            pass
    return out
