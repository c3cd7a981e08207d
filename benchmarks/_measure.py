"""Shared measurement helpers of the benchmarks: peak memory of *this* process, CPU beside wall time, and
running one figure in a fresh child process.

Peak memory: ``VmHWM`` of ``/proc/self/status`` — the high-water mark of this process's own address space.
``resource.getrusage(RUSAGE_SELF).ru_maxrss`` is not: on Linux it survives ``fork`` + ``exec``, so a child
started by a parent that had imported torch or run a large figure reports at least the parent's size.
(Fallback where /proc is missing: ru_maxrss.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time


def peak_rss_mib() -> float:
    """Peak resident memory of this process's address space, MiB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mib() -> float:
    """Current resident memory, MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def timed(fn, repeats: int):
    """Median wall and median process-CPU seconds of ``repeats`` calls of ``fn``."""
    ws, cs = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        ws.append(time.perf_counter() - w0)
        cs.append(time.process_time() - c0)
    ws.sort()
    cs.sort()
    return ws[len(ws) // 2], cs[len(cs) // 2]


def sampler_rates(sampler, mcs: float, repeats: int):
    """``repeats`` timed blocks of ``sampler.step(mcs)``: lists of MCS per wall-second and per CPU-second."""
    walls, cpus = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        sampler.step(mcs)
        walls.append(mcs / (time.perf_counter() - w0))
        cpus.append(mcs / (time.process_time() - c0))
    return walls, cpus


def run_child(script: str, args: list[str], timeout: float = 3600) -> dict:
    """Run ``python script *args`` in a fresh process; its last stdout line is a JSON dict (returned), or
    ``{"error": ...}``."""
    out = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, timeout=timeout,
                         check=False)
    if out.returncode != 0:
        tail = out.stderr.strip().splitlines()
        return {"error": tail[-1] if tail else f"exit status {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])
