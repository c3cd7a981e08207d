"""Speed of the compiled (numba) neural terms: the exact sampler with neural closures, the pooled term's ΔH,
and the numpy evaluator the CompuCell3D export falls back to.

Figures (one thread; each in a fresh child process, which also gives its peak resident memory; medians of
``--repeats`` runs, rates per CPU-second with the wall-clock rate beside):

* ``exact-local``: exact sampler (classic proposal, T = 1) with contact + volume + local NH (stride 4,
  16 channels, kernel 3 → receptive-field radius 5 sites), 100×100 lattice, 50 cells: candidates (copy
  attempts between different cells, whose ΔH is evaluated) per second; ``exact-local-callback``: the same
  with ``compiled_neural=False`` (one Python ``delta_np`` call per candidate, as before);
* ``exact-local-pooled``: the same closure plus a pooled NH (position_dim 4, hidden 32);
* ``pooled-delta``: compiled pooled-NH ΔH of single attempts (features + MLP, from the caches) per second,
  at boundary sites of that state; ``local-delta``: the same for the local NH.  A second line gives every
  repeat's rate, a compute-only *canary* measured between the repeats (SiLU per CPU-second on L1-resident
  data: it scatters with the machine's own speed, not with the code), the CPU the process ran on, and how
  much of the caches' block got transparent huge pages;
* ``numpy-k7``: the numpy evaluator (``LocalNHNumpy.delta``) with kernel 7, one BLAS thread
  (threadpoolctl), and ``numpy-k7-threads``: with the BLAS default threads (what CC3D's Python did).

Every figure is spot-checked (compiled ΔH against the numpy evaluator; sampler caches against a full
recomputation) and the error printed.  The machine may be shared: the load average is printed.

    python benchmarks/bench_compiled_neural.py [--repeats 5] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

FIGURES = ["exact-local", "exact-local-callback", "exact-local-pooled", "local-delta", "pooled-delta", "numpy-k7",
           "numpy-k7-threads"]


def _state():
    import numpy as np

    from benchmarks.bench_neural import mnist_like_state
    return mnist_like_state(np.random.default_rng(0))


def _closure(pooled: bool):
    from neuralcpm_plugin.hamiltonian import LatticeSpec
    from neuralcpm_plugin.hamiltonian.analytic import ContactEnergy, VolumeConstraint
    from neuralcpm_plugin.hamiltonian.closure import closure_hamiltonian
    from neuralcpm_plugin.hamiltonian.local_nh import LocalNeuralHamiltonian
    from neuralcpm_plugin.hamiltonian.pooled_nh import PooledNeuralHamiltonian
    a = [ContactEnergy([[0, 2, 2], [2, 1, 1.6], [2, 1.6, 1]], 2), VolumeConstraint([0, 0.8, 0.8], [0, 100, 100])]
    n = [LocalNeuralHamiltonian({"n_types": 2, "stride": 4, "channels": 16, "kernel": 3}, seed=0)]
    if pooled:
        n.append(PooledNeuralHamiltonian({"n_types": 2, "stride": 4, "channels": 16, "kernel": 3, "position_dim": 4,
                                          "hidden": 32, "lattice_shape": [100, 100]}, seed=1))
    return closure_hamiltonian(a, n, LatticeSpec((100, 100)), 1.0, ["medium", "a", "b"], w_a=1.0, w_n=1.0)


def _attempts(state, n, seed=0):
    import numpy as np

    from neuralcpm_plugin.lattice import boundary_mask
    rng = np.random.default_rng(seed)
    H, W = state.shape
    bm = np.flatnonzero(boundary_mask(state.ids).ravel())
    xs, news = [], []
    while len(xs) < n:
        x = int(rng.choice(bm))
        i, j = divmod(x, W)
        nid = int(state.ids[(i + rng.integers(-1, 2)) % H, (j + rng.integers(-1, 2)) % W])
        if nid != state.ids[i, j]:
            xs.append(x)
            news.append(nid)
    return np.array(xs, np.int64), np.array(news, np.int64)


def _time(fn, repeats):
    """[(cpu_s, wall_s, count)] of ``repeats`` calls of fn() → count."""
    out = []
    for _ in range(repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        n = fn()
        out.append((time.process_time() - c0, time.perf_counter() - w0, n))
    return out


def _canary(NB):
    """A compute-only yardstick of this process's CPU speed: SiLU/CPU-s over 384 L1-resident float64 values
    (the kernel the ΔH figures spend most time in).  On this shared 2-vCPU machine the speed of pure compute
    itself varies by up to ≈ 1.3× over time (other vCPU / host load); a low ΔH figure with a low canary is the
    machine, not the code.  Returns a callable giving one measurement."""
    import numpy as np
    from numba import njit
    sf = NB._silu_flat

    @njit
    def run(n, f, ref):
        for _ in range(n):
            for i in range(ref.shape[0]):
                f[i] = ref[i]
            sf(f, ref.shape[0])

    ref = np.linspace(-5.0, 5.0, 384)
    f = ref.copy()
    run(10, f, ref)

    def one():
        c0 = time.process_time()
        run(20000, f, ref)
        return 20000 * 384 / max(time.process_time() - c0, 1e-9)
    return one


def _last_cpu() -> int:
    """The CPU this process last ran on (/proc/self/stat field 39; −1 where unreadable)."""
    try:
        with open("/proc/self/stat") as fh:
            return int(fh.read().rsplit(")", 1)[1].split()[36])
    except (OSError, ValueError, IndexError):
        return -1


def _huge_pages(addr: int) -> str:
    """'huge pages N of M kB' of the mapping holding ``addr`` (the compiled caches' block), from /proc/self/smaps."""
    size = huge = None
    inside = False
    try:
        with open("/proc/self/smaps") as fh:
            for ln in fh:
                f = ln.split()
                if f and "-" in f[0] and not f[0].endswith(":"):
                    lo, hi = (int(t, 16) for t in f[0].split("-"))
                    inside = lo <= addr < hi
                elif inside and f[0] == "Size:":
                    size = f[1]
                elif inside and f[0] == "AnonHugePages:":
                    huge = f[1]
    except OSError:
        pass
    return f"huge pages {huge} of {size} kB" if size is not None else "huge pages: unknown"


def run_one(name: str, repeats: int, quick: bool) -> dict:
    import numpy as np
    from threadpoolctl import threadpool_limits

    from neuralcpm_plugin.sampling.exact import ExactSampler
    res = {"figure": name}
    limit = None if name == "numpy-k7-threads" else threadpool_limits(1)
    import torch
    torch.set_num_threads(1)
    state = _state()
    if name.startswith("exact"):
        ham = _closure(pooled=name == "exact-local-pooled")
        compiled = name != "exact-local-callback"
        s = ExactSampler(state, ham, seed=1, compiled_neural=compiled)
        s.attempts(2000)  # compile / warm up
        n_att = (2000 if quick else 20000) if not compiled else (100_000 if quick else 1_000_000)

        def go():
            c0 = int(s.counters[1])
            s.attempts(n_att)
            return int(s.counters[1]) - c0
        res["runs"] = _time(go, repeats)
        res["unit"] = "candidates"
        res["check"] = ("neural cache error", s.neural_cache_error() if compiled else 0.0)
        res["acceptance"] = s.stats()["acceptance"]
    elif name in ("local-delta", "pooled-delta"):
        from numba import njit

        from neuralcpm_plugin.hamiltonian import _local_nh_numba as NB
        ham = _closure(pooled=True)
        term = ham.terms[-1] if name == "pooled-delta" else ham.terms[2]
        ev = term.numpy_evaluator()
        comp = (NB.PooledNHCompiled if name == "pooled-delta" else NB.LocalNHCompiled)(ev)
        ids = state.ids.astype(np.int64)
        types = state.types.astype(np.int64)
        comp.bind(ids, types)
        xs, news = _attempts(state, 20000)
        flat = ids.reshape(-1)
        if name == "pooled-delta":
            @njit
            def loop(xs, news, ids, types, W, S, P, PS):
                t = 0.0
                for k in range(xs.shape[0]):
                    t += NB.pooled_delta(xs[k], news[k], ids, types, W, S, P, PS)
                return t
            args = (flat, types, comp.W, comp.S, comp.P, comp.PS)
        else:
            @njit
            def loop(xs, news, ids, types, W, S):
                t = 0.0
                for k in range(xs.shape[0]):
                    t += NB.nh_delta(xs[k], news[k], ids, types, W, S)
                return t
            args = (flat, types, comp.W, comp.S)
        loop(xs[:5], news[:5], *args)
        canary = _canary(NB)
        res["runs"], res["canary"] = [], []
        for _ in range(repeats):  # the ΔH repeats interleaved with the compute canary
            res["runs"] += _time(lambda: (loop(xs, news, *args), len(xs))[1], 1)
            res["canary"].append(canary())
        res["unit"] = "ΔH"
        res["cpu"] = _last_cpu()
        res["huge"] = _huge_pages(comp.S[NB._S_UW].ctypes.data)
        err = 0.0
        for k in range(200):
            site = divmod(int(xs[k]), ids.shape[1])
            ref = ev.delta_uncached(ids, types, site, int(news[k])) if name == "pooled-delta" else \
                ev.delta(ids, types, site, int(news[k]))
            err = max(err, abs(comp.delta(ids, types, site, int(news[k])) - ref))
        res["check"] = ("max |compiled − numpy| over 200 attempts", err)
    else:  # numpy-k7*
        from neuralcpm_plugin.hamiltonian.local_nh import LocalNeuralHamiltonian
        term = LocalNeuralHamiltonian({"n_types": 2, "stride": 4, "channels": 16, "kernel": 7}, seed=0)
        ev = term.numpy_evaluator()
        ids = state.ids.astype(np.int64)
        types = state.types.astype(np.int64)
        n = 100 if quick else 400
        xs, news = _attempts(state, n)
        W = ids.shape[1]
        ev.delta(ids, types, divmod(int(xs[0]), W), int(news[0]))

        def go():
            for x, a in zip(xs, news):
                ev.delta(ids, types, divmod(int(x), W), int(a))
            return n
        res["runs"] = _time(go, repeats)
        res["unit"] = "ΔH"
        from neuralcpm_plugin.hamiltonian._local_nh_numba import LocalNHCompiled
        comp = LocalNHCompiled(ev)
        err = max(abs(comp.delta(ids, types, divmod(int(x), W), int(a)) - ev.delta(ids, types, divmod(int(x), W),
                                                                                   int(a))) for x, a in
                  zip(xs[:50], news[:50]))
        res["check"] = ("max |compiled − numpy| over 50 attempts (kernel 7)", err)
        res["blas_threads"] = "1 (threadpoolctl)" if limit is not None else "default"
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="fewer attempts per repeat")
    ap.add_argument("--only", nargs="*", default=None, help=f"figures to run (default all): {FIGURES}")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print("RESULT " + json.dumps(run_one(a.child, a.repeats, a.quick)))
        return
    print(f"load average {os.getloadavg()}; one thread per figure, each in a fresh process")
    env = dict(os.environ)
    for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        env[v] = "1"
    for name in a.only or FIGURES:
        e = dict(env)
        if name == "numpy-k7-threads":
            e.pop("OPENBLAS_NUM_THREADS", None)
            e.pop("OMP_NUM_THREADS", None)
        else:
            e["OPENBLAS_NUM_THREADS"] = "1"
        cmd = [sys.executable, os.path.abspath(__file__), "--child", name, "--repeats", str(a.repeats)]
        if a.quick:
            cmd.append("--quick")
        r = subprocess.run(cmd, capture_output=True, text=True, env=e, check=False)
        line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            print(f"{name}: failed\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
            continue
        res = json.loads(line[7:])
        runs = res["runs"]
        import statistics
        cpu = statistics.median(n / c for c, w, n in runs if c > 0)
        wall = statistics.median(n / w for c, w, n in runs)
        extra = f", acceptance {res['acceptance']:.3f}" if "acceptance" in res else ""
        extra += f", BLAS threads {res['blas_threads']}" if "blas_threads" in res else ""
        print(f"{name:22s} {cpu:12,.0f} {res['unit']}/CPU-s   {wall:12,.0f} {res['unit']}/wall-s   "
              f"(median of {len(runs)} × {runs[0][2]:,}; peak RSS {res['peak_rss_mb']:.0f} MB{extra}; "
              f"{res['check'][0]}: {res['check'][1]:.2e})")
        if "canary" in res:  # every repeat, so one slow repeat or a slow machine phase shows
            rates = ", ".join(f"{n / c:,.0f}" for c, w, n in runs)
            can = ", ".join(f"{v / 1e6:.0f}M" for v in res["canary"])
            print(f"{'':22s} repeats {res['unit']}/CPU-s: {rates}; canary SiLU/CPU-s: {can}; "
                  f"CPU {res['cpu']}; caches {res['huge']}")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
