"""The overview figure of a training run: data beside roll-outs of the fitted model from the same starts.

:func:`overview` answers "does my fitted model look like my cells?" in one picture, ``RUN/overview.png``
(drawn by :func:`neuralcpm_plugin.render.plot_rollout_comparison`): the final states of a few data runs above
the fitted model's roll-outs from the same initial states (exact sequential sampler, the proposal of the
dynamics that made the data), and the summary statistics of :mod:`neuralcpm_plugin.metrics.stats` over time
(mean ± standard deviation over up to ``n_runs`` runs) for data and model.

Where the data's runs come from, in this order:

1. **a cell-sorting data set made by** ``training.gen_cellsort`` with the exact sampler (the default job's
   data): its ``.npz`` records each snapshot's seed and the generator's options, so each run is replayed
   from its start (single-pixel cells, ``init_points``) with the true Hamiltonian, recording frames; the
   replay is checked to end in the stored snapshot (``replayed_exactly`` in the result);
2. **trajectory files** (several frames per file with their ``mcs``, e.g. Morpheus or CC3D runs): the data
   frames over time; the model starts from each file's first frame and is recorded at the same MCS;
3. otherwise (independent snapshots): the model starts from data snapshots and runs ``fallback_mcs`` MCS;
   the data's statistics are then a constant band (the model should keep them).

Only models whose terms are all analytic are rolled out (the compiled exact sampler: seconds); for neural
models :func:`overview` returns ``None`` and says why (their roll-outs come from ``training.evaluate``).
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import numpy as np

from neuralcpm_plugin.errors import DataError

__all__ = ["overview", "replay_cellsort", "rollout"]

MAX_ATTEMPTS = 5e7  # copy attempts for all model roll-outs together (a few seconds of the compiled sampler)
MAX_TIMES = 11      # time points of the statistics (frames of longer trajectories are thinned)
STATS_SITES = 2e7   # lattice sites over all states whose statistics are computed (bounds the time points)
_REPLAY_KEYS = ("scenario", "size", "cells", "target", "radius", "mcs", "proposal")


def rollout(start, ham, times, *, seed: int, proposal: str = "classic"):
    """States of the exact sampler from ``start`` at the MCS in ``times`` (ascending, from 0)."""
    from neuralcpm_plugin.sampling.exact import ExactSampler
    smp = ExactSampler(start, ham, seed=int(seed), proposal=proposal)
    out, done = [], 0.0
    for t in times:
        if t > done:
            smp.step(float(t) - done)
            done = float(t)
        out.append(smp.state)
    return out


def _params_json(path) -> dict | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            if "params_json" not in z.files or "seed" not in z.files:
                return None
            params = json.loads(bytes(z["params_json"].astype(np.uint8)).decode())
            params["_seeds"] = z["seed"].astype(np.int64).tolist()
            params["_finals"] = z["data"][:, 0].copy()
            return params
    except (OSError, ValueError, KeyError):
        return None


def replay_cellsort(path, n_runs: int, n_frames: int = MAX_TIMES - 1):
    """Runs ``0..n_runs-1`` of a ``training.gen_cellsort`` data set (exact sampler) replayed with frames:
    ``(times, [[state at each time] per run], replayed_exactly, proposal)``, or ``None`` when ``path`` is not
    such a data set. ``replayed_exactly``: every replay ends in the stored snapshot (same seeds, same sampler)."""
    p = _params_json(path)
    if p is None or p.get("dataset") != "cellsort" or p.get("sampler") != "exact" or "start" in p or \
            any(k not in p for k in _REPLAY_KEYS):   # other starts (e.g. training.gen_tissue): not replayable here
        return None
    from .gen_cellsort import cellsort_hamiltonian_for, init_points
    shape = (int(p["size"]),) * int(p.get("dim", 2))
    ham = cellsort_hamiltonian_for(p["scenario"], shape, float(p["target"]))
    total = float(p["mcs"])
    times = [total * k / n_frames for k in range(n_frames + 1)]
    runs, exact = [], True
    for i, s in enumerate(p["_seeds"][:n_runs]):
        start = init_points(np.random.default_rng(s), shape, int(p["cells"]), float(p["radius"]))
        frames = rollout(start, ham, times, seed=s, proposal=p["proposal"])
        exact &= bool(np.array_equal(frames[-1].ids, p["_finals"][i]))
        runs.append(frames)
    return times, runs, exact, p["proposal"]


def _trajectory_files(files, n_runs: int, n_times: int = MAX_TIMES):
    """Data trajectories from files holding ≥ 3 frames with increasing ``mcs``; ``None`` if there are none."""
    from neuralcpm_plugin.io import load_states
    runs, times = [], None
    for f in files:
        if len(runs) >= n_runs:
            break
        try:
            frames = load_states(f)
        except (DataError, OSError, ValueError):
            return None
        mcs = [s.meta.get("mcs") for s in frames]
        if len(frames) < 3 or any(m is None for m in mcs):
            return None
        t = [float(m) - float(mcs[0]) for m in mcs]
        if any(b <= a for a, b in itertools.pairwise(t)):
            return None
        if len(t) > n_times:                 # thin to at most n_times frames, keeping the first and last
            keep = sorted({round(k * (len(t) - 1) / (n_times - 1)) for k in range(n_times)})
            frames, t = [frames[k] for k in keep], [t[k] for k in keep]
        if times is None:
            times = t
        elif t != times:
            continue          # runs recorded at other times: not comparable frame by frame
        runs.append(frames)
    return (times, runs) if runs else None


def _mid_plane(state):
    """The middle plane ``ids[D // 2]`` of a 3-D state as a 2-D state (same type table)."""
    from neuralcpm_plugin.lattice import CellState
    return CellState(np.ascontiguousarray(state.ids[state.shape[0] // 2]), state.types)


def _stats(runs, n_types: int) -> dict:
    """``{name: array (runs, times)}`` of the summary statistics plotted."""
    from neuralcpm_plugin.metrics.stats import sorting_index, summary_stats
    names = ["sorting index", "mean cell volume (sites)", "cell–medium contacts", "fragmented cells (fraction)"]
    out = {n: np.zeros((len(runs), len(runs[0]))) for n in names}
    for i, frames in enumerate(runs):
        for j, s in enumerate(frames):
            st = summary_stats(s, n_types=n_types)
            out[names[0]][i, j] = sorting_index(s)
            out[names[1]][i, j] = st["mean_volume"]
            out[names[2]][i, j] = sum(st[f"{a}-0"] for a in range(1, n_types + 1))
            out[names[3]][i, j] = st["frac_fragmented"]
    return out


def overview(run_dir, ham, states, data_info: dict, *, proposal: str = "classic", n_show: int = 4,
             n_runs: int = 16, fallback_mcs: float = 200.0, seed: int = 0, log=print) -> dict | None:
    """Write ``run_dir/overview.png`` (see the module docstring); return ``{"path", "source", ...}`` or None.

    ``ham``: the fitted Hamiltonian; ``states``: the training states; ``data_info``: from
    :func:`training.fit.load_training_data` (``path``, ``files``). ``proposal``: the copy proposal of the
    data's dynamics ("classic" = CompuCell3D/Morpheus). Model roll-outs use seeds ``seed·1000 + 500 + i``
    (never the data's seeds).
    """
    t0 = time.perf_counter()
    if any(not t.analytic for t in ham.terms):
        log("overview figure: skipped (neural terms: the exact sampler's roll-outs would take minutes; "
            "see python -m training.evaluate)")
        return None
    try:
        import matplotlib  # noqa: F401

        from neuralcpm_plugin.render import plot_rollout_comparison
    except ImportError:
        log("overview figure: skipped (needs matplotlib: pip install matplotlib)")
        return None
    n_sites = int(np.prod(states[0].shape))
    n_runs = max(4, min(int(n_runs), int(n_runs * 4096 / n_sites)))   # bigger lattices: fewer runs (statistics cost)
    n_times = int(np.clip(STATS_SITES / (2 * n_runs * n_sites), 3, MAX_TIMES))
    n_types = max(s.n_types for s in states)
    files = data_info.get("files") or []
    src = replay_cellsort(files[0], n_runs, n_times - 1) if len(files) == 1 and files[0].endswith(".npz") else None
    replayed = None
    if src is not None:
        times, data_runs, replayed, proposal = src
        source = (f"{len(data_runs)} runs of the data set replayed from their seeds (true Hamiltonian, exact "
                  f"sampler, {proposal} proposals){'' if replayed else ' — WARNING: a replay differs from the data'}")
    else:
        tr = _trajectory_files(files, n_runs, n_times)
        if tr is not None:
            times, data_runs = tr
            source = "{n} data trajectories (first frame = the model's start)"
        else:
            times, data_runs = None, None
            source = "data snapshots (the model starts from them; the data band is their mean ± sd)"
    if data_runs is not None:
        n = max(2, min(len(data_runs), int(MAX_ATTEMPTS // max(1.0, n_sites * times[-1]))))
        data_runs = data_runs[:n]
        source = source.replace("{n}", str(len(data_runs)))
        starts = [r[0] for r in data_runs]
        model_times = times
    else:
        rng = np.random.default_rng(seed)
        pick = rng.choice(len(states), size=min(n_runs, len(states)), replace=False)
        mcs = min(float(fallback_mcs), MAX_ATTEMPTS / (n_sites * len(pick)))
        model_times = [mcs * k / (n_times - 1) for k in range(n_times)]
        starts = [states[i] for i in pick]
    model_runs = [rollout(s, ham, model_times, seed=seed * 1000 + 500 + i, proposal=proposal)
                  for i, s in enumerate(starts)]
    model_stats = _stats(model_runs, n_types)
    if data_runs is not None:
        data_stats, data_times = _stats(data_runs, n_types), times
        data_show = [r[-1] for r in data_runs[:n_show]]
    else:
        flat = _stats([[states[i] for i in pick]], n_types)      # the same number of data snapshots
        data_stats = {k: v.reshape(-1, 1) for k, v in flat.items()}      # (snapshots, 1): a constant band
        data_times = None
        data_show = [r[0] for r in model_runs[:n_show]]
    model_show = [r[-1] for r in model_runs[:n_show]]
    slice_note = ""
    if model_show[0].ndim == 3:          # 3-D: the pictures show the middle z-plane (statistics are 3-D)
        data_show, model_show = [_mid_plane(s) for s in data_show], [_mid_plane(s) for s in model_show]
        slice_note = "; pictures: middle z-plane"
    t_end = model_times[-1]
    path = Path(run_dir) / "overview.png"
    title = (f"{Path(str(data_info.get('path', 'data'))).name}: data vs the fitted model "
             f"({', '.join(t.kind for t in ham.terms)}) from the same starts, {t_end:g} MCS{slice_note}")
    plot_rollout_comparison(data_show, model_show, data_stats, model_stats, path, data_times=data_times,
                            model_times=model_times, title=title,
                            data_label="data" if data_runs is not None else "data snapshot (start)",
                            model_label=f"fitted model, {t_end:g} MCS")
    secs = time.perf_counter() - t0
    log(f"overview figure: {path}  ({source}; {len(model_runs)} model roll-outs, {secs:.1f} s)")
    return {"path": str(path), "source": source, "n_runs": len(model_runs), "mcs": t_end, "times": list(model_times),
            "replayed_exactly": replayed, "seconds": round(secs, 2),
            "final_stats": {"data": {k: float(np.mean(v[:, -1])) for k, v in data_stats.items()},
                            "model": {k: float(np.mean(v[:, -1])) for k, v in model_stats.items()}}}
