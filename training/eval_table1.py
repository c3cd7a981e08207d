"""`python -m training.evaluate table1 --data DATA.npz --runs RUN [RUN ...]` — paper Table 1 (Cellular MNIST).

Roll-outs as the authors' ``experiments/generate_samples.py`` (SPEC.md → Metrics): each trajectory starts from
a real final frame (drawn at random from the data) whose cell types are randomly permuted among its cells,
and runs the paper's parallel sampler (P = 50 proposals per step); 100 frames are saved 134 steps apart
(= 0.67 MCS-equivalents of P·steps/(H·W) on 100 × 100; ``--mcs-per-frame`` keeps that ratio on other
lattices); 50 trajectories. Metrics:

* vol — fraction of states (every ``--every``-th frame of every trajectory, start included) whose every cell
  volume lies in [v_min − 0.1·v̄, v_max + 0.1·v̄] of the training data;
* frag — fraction of those states with at most 3 fragmented cells (mask dilated twice, ≠ 1 8-connected
  component, on the torus);
* CS — classifier score exp(E KL(p(y|x) ‖ p(y))) of the final frames, with the digit classifier trained on
  the data's type maps (``--classifier DIR``; trained and cached next to the data when absent).

Runs are grouped into table rows by model (the bundle's provenance ``model_kind``/``objective`` or the term
kinds; or ``LABEL=PATH``); a row's value is the mean over its runs (seeds) with a 95 % Student-t interval
over seeds. A row with a single run shows the interval over 5 disjoint groups of its trajectories instead
(marked ``†``). ``starts="paired"`` (the default; ``--starts paired``) rolls every run out from the same
type-permuted starts with the same sampler seeds (both from ``seed``, not from the run's place in ``--runs``, so
a run's row does not depend on the other runs given) and adds paired differences: per trajectory group, the CS of
one row minus another's on the same starts, with the 95 % interval over the groups — the statistic for "model A
scores above model B" (it removes the start-to-start spread both rows share). ``--starts independent`` draws each
run's starts and sampler seeds from ``seed·1000 + run index`` (the behaviour before paired starts).
The paper's numbers are printed beside ours. Results go to stdout and to ``--out`` (.md and
.json). ``--gif DIR`` writes the first trajectory of each run as an animated GIF.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from neuralcpm_plugin.errors import ConfigError, DataError
from neuralcpm_plugin.lattice import CellState

__all__ = [
    "PAPER_TABLE1",
    "ROW_ORDER",
    "SCALES",
    "add_arguments",
    "add_common_arguments",
    "evaluate_table1",
    "find_bundle",
    "group_values",
    "paired_bootstrap",
    "paired_differences",
    "permuted_starts",
    "rollout",
    "run",
    "run_label",
]

PAPER_TABLE1 = {  # vol, frag, CS (paper Table 1)
    "Cellsort Hamiltonian": (1.00, 1.00, 2.47),
    "Cellsort + External Potential": (1.00, 1.00, 3.11),
    "CNN": (0.00, 0.05, 3.70),
    "1 NH layer + CNN": (0.06, 0.87, 3.53),
    "Neural Hamiltonian": (0.11, 0.99, 4.91),
    "Neural Hamiltonian + closure": (1.00, 1.00, 4.35),
}
ROW_ORDER = ["real data", "permuted starts (no dynamics)", "Cellsort Hamiltonian", "Cellsort + External Potential", "CNN", "1 NH layer + CNN",
             "Neural Hamiltonian", "Neural Hamiltonian + closure", "Local NH", "Local NH + closure", "Pooled NH",
             "Pooled NH + closure", "Local + pooled NH + closure"]
SCALES = {  # roll-out presets (groups: disjoint trajectory groups of a one-run row's 95 % interval)
    "paper": {"trajectories": 50, "frames": 100, "mcs_per_frame": 0.67, "flips": 50, "every": 5, "chains": 10,
              "groups": 5},
    "cpu": {"trajectories": 20, "frames": 40, "mcs_per_frame": 0.67, "flips": 50, "every": 5, "chains": 10,
            "groups": 5},
    # the CPU-scale Table 1/2 of the README: 5x the trajectories, intervals over 10 groups of 10
    "cpu-wide": {"trajectories": 100, "frames": 40, "mcs_per_frame": 0.67, "flips": 50, "every": 5, "chains": 10,
                 "groups": 10},
    # the README's Table 2 (bipolar): 100 frames (the reference code's frame count) of 0.67 MCS = 67 MCS; the
    # data model itself needs more than cpu-wide's 27 MCS to reorganise a permuted start (README, Table 2)
    "cpu-long": {"trajectories": 100, "frames": 100, "mcs_per_frame": 0.67, "flips": 50, "every": 5, "chains": 10,
                 "groups": 10},
    "smoke": {"trajectories": 5, "frames": 4, "mcs_per_frame": 0.5, "flips": 50, "every": 2, "chains": 5,
              "groups": 5},
}
_KIND_LABEL = {"analytic": "Cellsort Hamiltonian", "cnn": "CNN", "nh1-cnn": "1 NH layer + CNN",
               "nh": "Neural Hamiltonian", "nh-closure": "Neural Hamiltonian + closure", "local-nh": "Local NH",
               "local-nh-closure": "Local NH + closure", "pooled-nh": "Pooled NH",
               "pooled-closure": "Pooled NH + closure", "local-pooled-closure": "Local + pooled NH + closure"}
WEIGHT_KEYS = ("w_a", "w_n", "w_l", "w_g")  # closure weights reported per row (hamiltonian.closure names)


# ------------------------------------------------------------------------------------------ run discovery
def find_bundle(run) -> Path:
    """The bundle directory of a run: ``run`` itself (has model.json), ``run/model``, or the newest
    ``model.json`` below ``run``."""
    run = Path(run)
    if (run / "model.json").exists():
        return run
    if (run / "model" / "model.json").exists():
        return run / "model"
    found = sorted(run.rglob("model.json"), key=lambda p: p.stat().st_mtime) if run.is_dir() else []
    if not found:
        raise DataError("no model bundle (model.json) here", path=run)
    return found[-1].parent


def run_label(bundle) -> str:
    """Table row of a loaded bundle: from its provenance (``model_kind``, ``objective``) or its term kinds."""
    ham = bundle.hamiltonian
    kinds = [t.kind for t in ham.terms]
    prov = bundle.provenance or {}
    mk = prov.get("model_kind")
    label = _KIND_LABEL.get(mk) if mk else None
    if label is None:
        neural = [k for k in kinds if k in ("nh", "cnn", "nh1_cnn", "local_nh", "pooled_nh")]
        analytic = any(t.analytic for t in ham.terms)
        if not neural:
            label = "Cellsort Hamiltonian"
        else:
            if "local_nh" in neural and "pooled_nh" in neural:
                base = "Local + pooled NH"
            else:
                base = {"nh": "Neural Hamiltonian", "cnn": "CNN", "nh1_cnn": "1 NH layer + CNN",
                        "local_nh": "Local NH", "pooled_nh": "Pooled NH"}[neural[0]]
            label = base + (" + closure" if analytic else "")
    if label == "Cellsort Hamiltonian" and "external" in kinds:
        label = "Cellsort + External Potential"
    if prov.get("objective") == "pl" and any(not t.analytic for t in ham.terms):
        label += " (PL)"
    return label


def closure_weights_of(ham) -> dict:
    """The closure weights of a model with neural terms, by group name (:mod:`~neuralcpm_plugin.hamiltonian.
    closure`): ``w_a`` (analytic terms, when there are neural ones too) and ``w_n`` (one neural group, the
    paper's Eq. 5) or ``w_l``/``w_g`` (local / pooled NH of a three-part closure); ``{}`` for analytic models."""
    from neuralcpm_plugin.hamiltonian.closure import closure_groups

    if all(t.analytic for t in ham.terms):
        return {}
    groups = closure_groups(ham)
    return {name: float(terms[0].scale_value()) for name, terms in groups.items()
            if name != "w_a" or len(groups) > 1}


def weights_text(d: dict, digits: int = 3) -> str:
    """``"w_a 0.93, w_l 1.02, w_g 0.87"`` from the closure weights in ``d`` (``–`` when it has none)."""
    parts = [f"{k} {d[k]:.{digits}g}" for k in WEIGHT_KEYS if d.get(k) is not None and np.isfinite(d[k])]
    return ", ".join(parts) if parts else "–"


def parse_runs(specs) -> list[tuple[str | None, Path]]:
    out = []
    for s in specs:
        if "=" in s and not Path(s).exists():
            label, path = s.split("=", 1)
            out.append((label, Path(path)))
        else:
            out.append((None, Path(s)))
    return out


# ------------------------------------------------------------------------------------------------ roll-outs
def permuted_starts(states, n: int, rng: np.random.Generator) -> list[CellState]:
    """``n`` start states: random data frames with their cells' types randomly permuted among the cells."""
    out = []
    for i in rng.integers(0, len(states), size=n):
        s = states[int(i)]
        types = s.types.copy()
        cells = s.cell_ids()
        types[cells] = rng.permutation(types[cells])
        out.append(CellState(s.ids.copy(), types, {"start_frame": int(i)}))
    return out


def rollout(hamiltonian, starts, *, frames: int, mcs_per_frame: float, flips: int = 50, seed: int = 0,
            chains: int = 10, device="cpu", sampler: str = "parallel", proposal: str = "boundary",
            progress: bool = False) -> np.ndarray:
    """Trajectories ``(n, frames + 1, 2, H, W)`` int32 (frame 0 = start) under ``hamiltonian``.

    ``sampler="parallel"``: :class:`~neuralcpm_plugin.sampling.parallel.ParallelSampler` with ``flips``
    proposals per step and ``round(mcs_per_frame·H·W/flips)`` steps between frames, ``chains`` trajectories per
    batch; Hamiltonians the exact sampler compiles (neural pooled / local NH terms, directed motion) run on the
    parallel sampler's "compiled" back end (``ParallelSampler(compiled_neural=True)``), purely analytic ones
    on its numba back end, others on torch. ``sampler="exact"``: the exact sequential sampler (``mcs_per_frame`` MCS per frame) with ``proposal``
    "boundary" (the data generators' boundary-site proposals) or "classic" (random site, random neighbour: the
    dynamics CompuCell3D and Morpheus run).
    """
    starts = list(starts)
    H, W = starts[0].shape
    out = np.zeros((len(starts), frames + 1, 2, H, W), np.int32)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(starts) * frames, desc="roll-out", unit="frame")
    if proposal not in ("boundary", "classic"):
        raise ConfigError(f"unknown proposal {proposal!r}; use 'boundary' or 'classic'")
    if sampler == "exact":
        from neuralcpm_plugin.sampling.exact import run_exact
        for k, s in enumerate(starts):
            res = run_exact(s, hamiltonian, frames * mcs_per_frame, seed=seed * 7919 + k, proposal=proposal,
                            record_every=mcs_per_frame)
            for f, st in enumerate(res.frames[: frames + 1]):
                out[k, f] = st.to_channels()
            if bar is not None:
                bar.update(frames)
    elif sampler == "parallel":
        from neuralcpm_plugin.hamiltonian.base import Batch
        from neuralcpm_plugin.sampling.parallel import ParallelSampler

        steps = max(1, round(mcs_per_frame * H * W / flips))
        mcs = steps * flips / (H * W)
        gen = torch.Generator(device=device).manual_seed(int(seed))
        ps = ParallelSampler(hamiltonian, n_flips=flips, compiled_neural=True)
        n_ids = max(s.n_ids for s in starts)
        for c0 in range(0, len(starts), chains):
            chunk = starts[c0:c0 + chains]
            batch = Batch.from_states(chunk, n_ids=n_ids, device=device, periodic=hamiltonian.lattice.periodic)
            types = batch.types.cpu().numpy()
            for f in range(frames + 1):
                if f > 0:
                    ps.sweep(batch, mcs, gen)
                    if bar is not None:
                        bar.update(len(chunk))
                ids = batch.ids.cpu().numpy()
                out[c0:c0 + len(chunk), f, 0] = ids
                out[c0:c0 + len(chunk), f, 1] = np.take_along_axis(types, ids.reshape(len(chunk), -1), 1).reshape(
                    ids.shape)
    else:
        raise ConfigError(f"unknown sampler {sampler!r}; use 'parallel' or 'exact'")
    if bar is not None:
        bar.close()
    return out


def states_of(traj: np.ndarray) -> list[CellState]:
    """``(n, 2, H, W)`` channels → states."""
    return [CellState.from_maps(t[0], t[1]) for t in traj]


def group_values(values_fn, n_items: int, n_groups: int = 5) -> list[float]:
    """``values_fn(index_array)`` on each of ``n_groups`` disjoint, contiguous groups of items (``[]`` if there
    are fewer items than groups). Runs rolled out from paired starts share the groups item by item."""
    if n_items < n_groups:
        return []
    return [float(values_fn(g)) for g in np.array_split(np.arange(n_items), n_groups)]


def groups_ci(values_fn, n_items: int, n_groups: int = 5):
    """95 % half-width of ``values_fn(index_array)`` over ``n_groups`` disjoint groups of items."""
    from neuralcpm_plugin.metrics.paper import mean_ci

    vals = group_values(values_fn, n_items, n_groups)
    return mean_ci(vals)[1] if vals else float("nan")


def paired_differences(results: dict, key: str = "group_cs", metric: str = "cs") -> list[dict]:
    """Score differences between rows rolled out from the same starts: for every two one-run rows with per-group
    values ``key`` (same groups of the same starts), the mean of row a − row b over the groups and its 95 %
    Student-t half-width (a paired comparison), as ``{metric}_diff`` / ``{metric}_diff_ci`` (Table 1: the CS,
    Table 2: ``key="group_err", metric="err"``). Rows in table order; each row is compared with every row above
    it (``a`` below ``b``)."""
    from neuralcpm_plugin.metrics.paper import mean_ci

    labs = [lab for lab in order_labels(results) if len(results[lab]) == 1 and results[lab][0].get(key)]
    out = []
    for j, a in enumerate(labs):
        for b in labs[:j]:
            va, vb = np.asarray(results[a][0][key]), np.asarray(results[b][0][key])
            if va.shape != vb.shape:
                continue
            m, h = mean_ci(va - vb)
            out.append({"a": a, "b": b, f"{metric}_diff": m, f"{metric}_diff_ci": h, "groups": int(va.size)})
    return out


def paired_bootstrap(results: dict, n_boot: int = 2000, seed: int = 0, *, key: str = "final_probs", stat=None,
                     name: str = "cs_diff") -> list[dict]:
    """The table's own statistic compared on the same starts: for every two one-run rows with the per-trajectory
    values ``key`` (paired starts: trajectory t of every row starts from the same frame), ``stat(a) − stat(b)``
    over all trajectories (stored as ``name``) and its 95 % percentile interval (``lo``, ``hi``) over ``n_boot``
    resamples of the trajectories (with replacement, the same indices for both rows). Rows in table order,
    ``a`` below ``b``.

    Table 1 (the defaults): the final frames' class probabilities and the classifier score. Unlike
    :func:`paired_differences` (mean of per-group CS, each from a few trajectories, where CS is lower because it
    rewards the diversity a small group cannot show), this interval is for the whole-set CS the rows print.
    Table 2 passes the final frames' second moments and the organisation error (a group's error, from the
    mean moments of a few trajectories, is larger than the whole set's for the same reason)."""
    if stat is None:
        from neuralcpm_plugin.metrics.paper import classifier_score as stat

    labs = [lab for lab in order_labels(results) if len(results[lab]) == 1 and results[lab][0].get(key)]
    vals = {lab: np.asarray(results[lab][0][key], dtype=np.float64) for lab in labs}
    n = {lab: len(v) for lab, v in vals.items()}
    out = []
    for j, a in enumerate(labs):
        for b in labs[:j]:
            if n[a] != n[b] or n[a] < 2:
                continue
            idx = np.random.default_rng(seed).integers(0, n[a], size=(int(n_boot), n[a]))
            d = np.array([stat(vals[a][i]) - stat(vals[b][i]) for i in idx])
            lo, hi = np.percentile(d, [2.5, 97.5])
            out.append({"a": a, "b": b, name: stat(vals[a]) - stat(vals[b]),
                        "lo": float(lo), "hi": float(hi), "trajectories": n[a], "resamples": int(n_boot)})
    return out


def summarise(rows: dict, metric_keys, per_group_key="groups") -> dict:
    """Per label: mean over runs and 95 % CI over runs (or over trajectory groups for one run)."""
    from neuralcpm_plugin.metrics.paper import mean_ci

    out = {}
    for label, runs in rows.items():
        d = {"n_runs": len(runs), "runs": [r["run"] for r in runs]}
        for k in metric_keys:
            vals = [r[k] for r in runs]
            m, h = mean_ci(vals)
            if len(runs) == 1:
                h = runs[0].get(per_group_key, {}).get(k, float("nan"))
                d[k + "_ci_over"] = "trajectory groups"
            else:
                d[k + "_ci_over"] = "seeds"
            d[k] = m
            d[k + "_ci"] = h
        for k in WEIGHT_KEYS:
            vals = [r[k] for r in runs if k in r]
            if vals:
                d[k] = float(np.mean(vals))
        out[label] = d
    return out


def _dynamics(res: dict) -> str:
    """'MCS-equivalents per frame (parallel sampler, P = 50)' or 'MCS per frame (exact sampler, ... proposals)'."""
    cfg = res["rollout"]
    if res["sampler"] == "exact":
        return f"MCS per frame (exact sampler, {res.get('proposal') or 'boundary'} proposals)"
    return f"MCS-equivalents per frame ({res['sampler']} sampler, P = {cfg['flips']})"


def fmt(m, h, digits=2) -> str:
    if m is None or not np.isfinite(m):
        return "–"
    s = f"{m:.{digits}f}"
    if h is not None and np.isfinite(h):
        s += f" ± {h:.{digits}f}"
    return s


def order_labels(labels) -> list[str]:
    def key(lab):
        base = lab.replace(" (PL)", "")
        return (ROW_ORDER.index(base) if base in ROW_ORDER else len(ROW_ORDER), lab.endswith("(PL)"), lab)
    return sorted(labels, key=key)


# ------------------------------------------------------------------------------------------------ table 1
def _classifier_for(data_path: Path, states, labels, clf_path, seed: int, log):
    from neuralcpm_plugin.classifier import load_classifier, save_classifier, train_classifier

    path = Path(clf_path) if clf_path else data_path.with_suffix(".classifier")
    if (path / "classifier.json").exists():
        model, info = load_classifier(path)
        log(f"classifier: {path} (test accuracy {info.get('test_acc', float('nan')):.3f})")
        return model, info
    if labels is None:
        raise DataError("the data have no 'label' array: cannot train the digit classifier", path=data_path)
    log(f"classifier: training on {len(states)} labelled type maps (80/10/10 split) ...")
    t0 = time.perf_counter()
    model, info = train_classifier(states, labels, seed=seed, progress=False)
    info["seconds"] = round(time.perf_counter() - t0, 1)
    save_classifier(model, path, info)
    log(f"classifier: val/test accuracy {info['val_acc']:.3f}/{info['test_acc']:.3f} in {info['seconds']} s; "
        f"saved to {path}")
    return model, info


def load_data(path):
    from neuralcpm_plugin.io.npz import read_npz

    path = Path(path)
    states = read_npz(path)
    labels = states[0].meta.get("label")
    labels = None if labels is None else np.asarray(labels).ravel()
    if labels is not None and len(labels) != len(states):
        labels = None
    return states, labels


def rollout_run(i: int, label, path, states, bounds, cfg: dict, *, seed: int, device: str, sampler: str,
                gif_dir=None, table: str = "table", proposal: str = "boundary", paired: bool = False):
    """Load the run at ``path``, roll it out from type-permuted real states and score every ``cfg["every"]``-th
    frame for the volume and fragmentation metrics (the part shared by Tables 1 and 2).

    The starts and the sampler's seeds come from ``seed·1000`` when ``paired`` (the same starts and random
    streams for every run ``i``: a paired comparison with common random numbers), else from ``seed·1000 + i``;
    run 0 is rolled out the same way either way.

    Returns ``(label, hamiltonian, traj [n_traj, frames+1, 2, H, W], seconds, vol_ok, frag_ok)`` with
    ``vol_ok``/``frag_ok`` boolean arrays ``[n_traj, n_scored_frames]``; writes one GIF into ``gif_dir`` if given.
    """
    from neuralcpm_plugin.bundle import load_bundle
    from neuralcpm_plugin.metrics.paper import n_fragmented, volume_ok
    b = load_bundle(find_bundle(path))
    lab = label or run_label(b)
    ham = b.hamiltonian.to(device)
    if tuple(ham.lattice.shape) != tuple(states[0].shape):
        raise ConfigError(f"{path}: model lattice {ham.lattice.shape} differs from the data {states[0].shape}")
    run_seed = seed * 1000 + (0 if paired else i)
    starts = permuted_starts(states, cfg["trajectories"], np.random.default_rng(run_seed))
    t0 = time.perf_counter()
    traj = rollout(ham, starts, frames=cfg["frames"], mcs_per_frame=cfg["mcs_per_frame"], flips=cfg["flips"],
                   seed=run_seed, chains=cfg["chains"], device=device, sampler=sampler, proposal=proposal)
    secs = time.perf_counter() - t0
    sel = list(range(0, cfg["frames"] + 1, cfg["every"]))
    n_t = len(starts)
    vol_ok = np.array([[volume_ok(CellState.from_maps(*traj[k, f]), bounds) for f in sel] for k in range(n_t)])
    frag_ok = np.array([[n_fragmented(CellState.from_maps(*traj[k, f])) <= 3 for f in sel] for k in range(n_t)])
    if gif_dir:
        from neuralcpm_plugin.render import render_trajectory
        safe = "".join(c if c.isalnum() else "_" for c in lab)
        render_trajectory(states_of(traj[0]), Path(gif_dir) / f"{table}_{safe}_{i}.gif", fps=8,
                          titles=[f"{lab}: frame {f}" for f in range(traj.shape[1])])
    return lab, ham, traj, secs, vol_ok, frag_ok


def evaluate_table1(data, runs, *, scale: str = "cpu", classifier=None, seed: int = 0, device: str = "cpu",
                    sampler: str = "parallel", proposal: str = "boundary", gif_dir=None, log=print,
                    starts: str = "paired", **overrides) -> dict:
    """Compute Table 1 for ``runs`` (paths or ``(label, path)``); returns the result dict (see module doc).

    ``starts``: "paired" (every run from the same permuted starts; the result's ``"paired"`` list holds the CS
    differences between rows, see :func:`paired_differences`) or "independent" (each run its own starts)."""
    from neuralcpm_plugin.classifier import predict_proba
    from neuralcpm_plugin.metrics.paper import classifier_score, volume_bounds

    if starts not in ("paired", "independent"):
        raise ConfigError(f"unknown starts {starts!r}; use 'paired' or 'independent'")
    cfg = dict(SCALES[scale])
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    data = Path(data)
    states, labels = load_data(data)
    bounds = volume_bounds(states)
    clf, clf_info = _classifier_for(data, states, labels, classifier, seed, log)
    log(f"data: {len(states)} states {states[0].shape}, volume bounds [{bounds[0]:.1f}, {bounds[1]:.1f}]; "
        f"roll-outs: {cfg}")
    results = {"real data": [_real_row(states, bounds, clf, int(cfg.get("groups", 5)))]}
    for i, (label, path) in enumerate(runs):
        lab, ham, traj, secs, vol_ok, frag_ok = rollout_run(i, label, path, states, bounds, cfg, seed=seed,
                                                            device=device, sampler=sampler, gif_dir=gif_dir,
                                                            table="table1", proposal=proposal,
                                                            paired=starts == "paired")
        n_t, ng = len(traj), int(cfg.get("groups", 5))
        probs = predict_proba(clf, traj[:, -1, 1])
        if i == 0:  # the starts of the first run, before any dynamics (every run's starts when paired)
            p0 = predict_proba(clf, traj[:, 0, 1])
            g0 = group_values(lambda g, p=p0: classifier_score(p[g]), n_t, ng)
            results["permuted starts (no dynamics)"] = [{
                "run": "frame 0 of " + str(path), "vol": float(vol_ok[:, 0].mean()),
                "frag": float(frag_ok[:, 0].mean()), "cs": classifier_score(p0),
                "groups": {"cs": groups_ci(lambda g, p=p0: classifier_score(p[g]), n_t, ng)}, "group_cs": g0,
                "final_probs": np.round(p0, 6).tolist()}]
        row = {"run": str(path), "vol": float(vol_ok.mean()), "frag": float(frag_ok.mean()),
               "cs": classifier_score(probs), "seconds": round(secs, 1),
               "groups": {"vol": groups_ci(lambda g, a=vol_ok: a[g].mean(), n_t, ng),
                          "frag": groups_ci(lambda g, a=frag_ok: a[g].mean(), n_t, ng),
                          "cs": groups_ci(lambda g, p=probs: classifier_score(p[g]), n_t, ng)},
               "group_cs": group_values(lambda g, p=probs: classifier_score(p[g]), n_t, ng),
               "final_probs": np.round(probs, 6).tolist(), **closure_weights_of(ham)}
        wn = f"  {weights_text(row)}" if any(k in row for k in WEIGHT_KEYS) else ""
        log(f"{lab} [{path}]: vol {row['vol']:.2f} frag {row['frag']:.2f} CS {row['cs']:.2f} "
            f"({secs:.0f} s roll-out){wn}")
        results.setdefault(lab, []).append(row)
    summary = summarise(results, ["vol", "frag", "cs"])
    paired = paired_differences(results) if starts == "paired" else []
    boot = paired_bootstrap(results) if starts == "paired" else []
    whole = {(e["a"], e["b"]): f"; whole set {e['cs_diff']:.2f} [{e['lo']:.2f}, {e['hi']:.2f}] (bootstrap)"
             for e in boot}
    for d in paired:
        log(f"paired CS difference {d['a']} − {d['b']}: {fmt(d['cs_diff'], d['cs_diff_ci'])} "
            f"({d['groups']} groups){whole.get((d['a'], d['b']), '')}")
    return {"table": "table1", "data": str(data), "rollout": cfg, "sampler": sampler,
            "proposal": proposal if sampler == "exact" else None, "starts": starts, "paired": paired,
            "paired_bootstrap": boot,
            "volume_bounds": bounds,
            "classifier": {k: v for k, v in clf_info.items() if k != "curve"}, "rows": summary, "raw": results}


def _real_row(states, bounds, clf, n_groups: int = 5) -> dict:
    from neuralcpm_plugin.classifier import predict_proba
    from neuralcpm_plugin.metrics.paper import classifier_score, fragmentation_metric, volume_metric

    probs = predict_proba(clf, states)
    n = len(states)
    return {"run": "data", "vol": volume_metric(states, bounds), "frag": fragmentation_metric(states),
            "cs": classifier_score(probs),
            "groups": {"cs": groups_ci(lambda g: classifier_score(probs[g]), n, n_groups)}}


def table1_markdown(res: dict) -> str:
    rows = res["rows"]
    lines = ["| Model | runs | vol | frag | CS | closure weights | paper vol | paper frag | paper CS |",
             "|---|---|---|---|---|---|---|---|---|"]
    for lab in order_labels(set(rows) | set(PAPER_TABLE1)):
        d = rows.get(lab)
        if d is None:
            p = PAPER_TABLE1[lab]
            lines.append(_not_run_row(lab, p))
            continue
        p = PAPER_TABLE1.get(lab, (None, None, None))
        dag = "†" if d["n_runs"] == 1 and lab not in ("real data", "permuted starts (no dynamics)") else ""
        lines.append(f"| {lab} | {d['n_runs']} | {fmt(d['vol'], d['vol_ci'])}{dag} | {fmt(d['frag'], d['frag_ci'])}"
                     f"{dag} | {fmt(d['cs'], d['cs_ci'])}{dag} | {weights_text(d)} | "
                     + " | ".join("–" if v is None else f"{v:.2f}" for v in p) + " |")
    cfg = res["rollout"]
    lines.append("")
    lines.append(f"Roll-outs: {cfg['trajectories']} trajectories per run × {cfg['frames']} frames, "
                 f"{cfg['mcs_per_frame']} {_dynamics(res)}, "
                 f"metrics on every {cfg['every']}th frame; CS on final frames. ± = 95 % interval over seeds; "
                 f"† = one run: interval over {cfg.get('groups', 5)} groups of its trajectories. The permuted-starts "
                 "row scores the first run's start frames (real final frames, cell types permuted), before any "
                 "dynamics.")
    if res.get("paired"):
        note = (f"Paired starts: every run from the same {cfg['trajectories']} permuted starts. CS difference "
                f"row a − row b over the same {res['paired'][0]['groups']} trajectory groups (95 % interval over "
                "the groups; > 0 with the interval clear of 0: a scores above b on the same starts)")
        boot = {(e["a"], e["b"]): e for e in res.get("paired_bootstrap", [])}
        if boot:
            note += (" and, for the whole-set CS the rows print, CS(a) − CS(b) with its 95 % paired bootstrap "
                     "interval (trajectories resampled, the same ones for both rows)")
        note += ":"
        lines += ["", note, "", "| row a | row b | CS(a) − CS(b), groups | CS(a) − CS(b), whole set [95 %] |",
                  "|---|---|---|---|"]
        for d in res["paired"]:
            e = boot.get((d["a"], d["b"]))
            whole = f"{e['cs_diff']:.2f} [{e['lo']:.2f}, {e['hi']:.2f}]" if e else "–"
            lines.append(f"| {d['a']} | {d['b']} | {fmt(d['cs_diff'], d['cs_diff_ci'])} | {whole} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------ CLI
def add_common_arguments(p: argparse.ArgumentParser, default_data: str) -> None:
    p.add_argument("--runs", nargs="+", required=True,
                   help="run folders or bundles (LABEL=PATH to name the row); several runs of one model = seeds")
    p.add_argument("--data", default=default_data, help=f"training data .npz (default {default_data})")
    p.add_argument("--scale", choices=sorted(SCALES), default="cpu",
                   help="roll-out preset: paper (50 traj x 100 frames), cpu (20 x 40), cpu-wide (100 x 40, "
                        "10 groups), smoke (5 x 4)")
    p.add_argument("--trajectories", type=int, default=None)
    p.add_argument("--frames", type=int, default=None)
    p.add_argument("--mcs-per-frame", type=float, default=None)
    p.add_argument("--flips", type=int, default=None, help="parallel proposals per step (P)")
    p.add_argument("--every", type=int, default=None, help="metrics on every k-th frame")
    p.add_argument("--chains", type=int, default=None, help="trajectories simulated together")
    p.add_argument("--sampler", choices=["parallel", "exact"], default="parallel")
    p.add_argument("--proposal", choices=["boundary", "classic"], default="boundary",
                   help="exact sampler's copy proposals: boundary (the data generators') or classic (random site "
                        "and neighbour: CompuCell3D's and Morpheus's dynamics)")
    p.add_argument("--groups", type=int, default=None,
                   help="disjoint trajectory groups for a one-run row's 95 %% interval (preset: 5; cpu-wide: 10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is fastest on a busy machine)")
    p.add_argument("--out", default=None, help="write the table (.md) and the numbers (.json) here")
    p.add_argument("--gif", default=None, help="folder for one roll-out GIF per run")
    p.add_argument("--starts", choices=["paired", "independent"], default="paired",
                   help="paired (default): every run from the same permuted starts and sampler seeds, plus paired "
                        "differences of the score (Table 1: CS, Table 2: error) between rows; independent: each run "
                        "its own (seed*1000 + run index)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common_arguments(p, "runs/data/mnist-cpu.npz")
    p.add_argument("--classifier", default=None,
                   help="digit classifier folder (default: DATA.classifier/, trained there if absent)")


def overrides_of(args) -> dict:
    if getattr(args, "threads", None):
        torch.set_num_threads(int(args.threads))
    return {"trajectories": args.trajectories, "frames": args.frames, "mcs_per_frame": args.mcs_per_frame,
            "flips": args.flips, "every": args.every, "chains": args.chains, "groups": args.groups}


def claim_outputs(args) -> None:
    """Refuse existing ``--out`` .md/.json files (unless ``--overwrite``) and a non-empty ``--gif`` folder before
    the roll-outs; remove them again if the evaluation fails."""
    from neuralcpm_plugin.cli import claim_output
    if args.out:
        for suffix in (".md", ".json"):
            claim_output(Path(args.out).with_suffix(suffix), overwrite=args.overwrite)
    if args.gif:
        claim_output(args.gif, option="--gif", kind="dir", overwrite=args.overwrite)


def write_outputs(res: dict, md: str, out) -> None:
    print(md)
    if out:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".md").write_text(md + "\n")
        out.with_suffix(".json").write_text(json.dumps(res, indent=1, default=float))
        print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}")


def run(args) -> int:
    claim_outputs(args)
    res = evaluate_table1(args.data, parse_runs(args.runs), scale=args.scale, classifier=args.classifier,
                          seed=args.seed, device=args.device, sampler=args.sampler, proposal=args.proposal,
                          gif_dir=args.gif, starts=args.starts, **overrides_of(args))
    write_outputs(res, table1_markdown(res), args.out)
    return 0


def _not_run_row(lab: str, paper_vals, n_ours: int = 4) -> str:
    """A table row for a paper model without runs here (its paper numbers only)."""
    vals = " | ".join("–" if v is None else (f"{v:.1f}" if v > 10 else f"{v:.2f}") for v in paper_vals)
    return f"| {lab} | 0 | " + " | ".join(["not run"] * (n_ours - 1)) + " | – | " + vals + " |"
