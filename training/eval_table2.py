"""`python -m training.evaluate table2 --data DATA.npz --runs RUN [RUN ...]` — paper Table 2 (bipolar).

Roll-outs exactly as for Table 1 (:mod:`training.eval_table1`): real final frames with permuted cell types,
the parallel sampler (P = 50), ``frames`` frames ``mcs_per_frame`` apart. Metrics:

* vol, frag — as in Table 1 (volume margin 0.1·v̄ = ±15 sites at V* = 150; ≤ 3 fragmented cells);
* err — Table 2's organisation error: per-cell centres of mass aligned to the principal axes of the type-2
  centres, per-type central second moments (along, across; sites²) averaged over the final frames, RMSE
  against the same average over the real data (the authors' ``calc_moment(..., rotate_alignment_type=2)``);
  the averaged moments themselves are in the .json (``second_moments``, type × [along, across]) and the log;
* org1 / org2 — bipolar organisation: the fraction of type-1 / type-2 positional variance along the principal
  axis of the type-2 pixels (final frames; the real data's values are in the "real data" row).

The "real data" row compares two random halves of the data with each other (the error's noise floor).
The "permuted starts (no dynamics)" row scores the first run's start states (frame 0): what the dynamics
have to improve on. ``starts="paired"`` (the default, ``--starts paired``; as in Table 1) rolls every run out
from the same permuted starts with the same sampler seeds and adds paired error differences: per trajectory
group, the error of one row minus another's on the same starts, with the 95 % interval over the groups (< 0 with
the interval clear of 0: row a organises closer to the data than row b from the same starts), and the
difference of the rows' whole-set errors with a 95 % paired bootstrap interval (2,000 resamples of the
trajectories, the same for both rows; the per-trajectory final second moments are kept in the .json as
``final_m2``). A group's error, from the mean moments of a few trajectories, is larger than the whole set's,
so the group column tests another quantity than the one the rows print.
``--starts independent``: each run its own starts and seeds (``seed·1000 + run index``).
The paper's numbers (149 × 149 lattice) are printed beside ours; the error is in sites², so it only compares
at the same lattice scale.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from neuralcpm_plugin.metrics.stats import finite_column_means

from .eval_table1 import (
    SCALES,
    _dynamics,
    _not_run_row,
    add_common_arguments,
    claim_outputs,
    closure_weights_of,
    fmt,
    group_values,
    groups_ci,
    load_data,
    order_labels,
    overrides_of,
    paired_bootstrap,
    paired_differences,
    parse_runs,
    rollout_run,
    states_of,
    summarise,
    weights_text,
    write_outputs,
)

__all__ = ["PAPER_TABLE2", "add_arguments", "evaluate_table2", "run", "table2_markdown"]

PAPER_TABLE2 = {  # vol, frag, organisation error (paper Table 2)
    "Cellsort Hamiltonian": (1.00, 1.00, 147.2),
    "Cellsort + External Potential": (1.00, 1.00, 154.4),
    "CNN": (0.00, 0.07, 153.5),
    "1 NH layer + CNN": (0.00, 0.11, 329.1),
    "Neural Hamiltonian": (0.00, 0.17, 254.2),
    "Neural Hamiltonian + closure": (0.77, 1.00, 37.3),
}


def _org(states) -> tuple[float, float]:
    from neuralcpm_plugin.metrics.paper import bipolar_organisation

    o = [bipolar_organisation(s) for s in states]
    return float(finite_column_means([x[1] for x in o])), float(finite_column_means([x[2] for x in o]))


def evaluate_table2(data, runs, *, scale: str = "cpu", seed: int = 0, device: str = "cpu", sampler: str = "parallel",
                    proposal: str = "boundary", gif_dir=None, log=print, starts: str = "paired", **overrides) -> dict:
    """Compute Table 2 for ``runs`` (paths or ``(label, path)``); returns the result dict.

    ``starts``: "paired" (every run from the same permuted starts; the result's ``"paired"`` list holds the
    error differences between rows, ``err_diff`` / ``err_diff_ci``) or "independent" (each run its own starts)."""
    from neuralcpm_plugin.errors import ConfigError
    from neuralcpm_plugin.metrics.paper import (
        fragmentation_metric,
        mean_second_moments,
        moment_error,
        second_moments,
        volume_bounds,
        volume_metric,
    )

    if starts not in ("paired", "independent"):
        raise ConfigError(f"unknown starts {starts!r}; use 'paired' or 'independent'")
    cfg = dict(SCALES[scale])
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    data = Path(data)
    states, _ = load_data(data)
    bounds = volume_bounds(states)
    real_m2 = mean_second_moments(states)
    log(f"data: {len(states)} states {states[0].shape}, volume bounds [{bounds[0]:.1f}, {bounds[1]:.1f}], "
        f"mean second moments (type x [along, across]) {np.round(real_m2, 1).tolist()}; roll-outs: {cfg}")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(states))
    half_a = [states[i] for i in perm[: len(states) // 2]]
    half_b = [states[i] for i in perm[len(states) // 2:]]
    o1, o2 = _org(states)
    results = {"real data": [{"run": "data (half vs half)", "vol": volume_metric(states, bounds),
                              "frag": fragmentation_metric(states), "err": moment_error(half_a, half_b),
                              "org1": o1, "org2": o2, "groups": {}}]}

    def err_of_moments(m):  # the error of a set of trajectories from their final frames' second moments
        return moment_error(finite_column_means(m), real_m2)

    for i, (label, path) in enumerate(runs):
        lab, ham, traj, secs, vol_ok, frag_ok = rollout_run(i, label, path, states, bounds, cfg, seed=seed,
                                                            device=device, sampler=sampler, gif_dir=gif_dir,
                                                            table="table2", proposal=proposal,
                                                            paired=starts == "paired")
        n_t, ng = len(traj), int(cfg.get("groups", 5))
        finals = states_of(traj[:, -1])
        m2 = np.stack([second_moments(s) for s in finals])

        def err_of(g, m2=m2):
            return err_of_moments(m2[g])

        if i == 0:  # the starts of the first run, before any dynamics (every run's starts when paired)
            m0 = np.stack([second_moments(s) for s in states_of(traj[:, 0])])
            s1, s2 = _org(states_of(traj[:, 0]))
            results["permuted starts (no dynamics)"] = [{
                "run": "frame 0 of " + str(path), "vol": float(vol_ok[:, 0].mean()),
                "frag": float(frag_ok[:, 0].mean()), "err": err_of(np.arange(n_t), m0), "org1": s1, "org2": s2,
                "second_moments": finite_column_means(m0).tolist(),
                "groups": {"err": groups_ci(lambda g, m=m0: err_of(g, m), n_t, ng)},
                "group_err": group_values(lambda g, m=m0: err_of(g, m), n_t, ng),
                "final_m2": np.round(m0, 4).tolist()}]
        o1, o2 = _org(finals)
        row = {"run": str(path), "vol": float(vol_ok.mean()), "frag": float(frag_ok.mean()),
               "err": err_of(np.arange(n_t)), "org1": o1, "org2": o2, "seconds": round(secs, 1),
               "second_moments": finite_column_means(m2).tolist(),
               "groups": {"vol": groups_ci(lambda g, a=vol_ok: a[g].mean(), n_t, ng),
                          "frag": groups_ci(lambda g, a=frag_ok: a[g].mean(), n_t, ng),
                          "err": groups_ci(err_of, n_t, ng)},
               "group_err": group_values(err_of, n_t, ng),
               "final_m2": np.round(m2, 4).tolist(), **closure_weights_of(ham)}
        log(f"{lab} [{path}]: vol {row['vol']:.2f} frag {row['frag']:.2f} err {row['err']:.1f} "
            f"org {o1:.2f}/{o2:.2f}, mean second moments {np.round(row['second_moments'], 1).tolist()} "
            f"({secs:.0f} s roll-out)")
        results.setdefault(lab, []).append(row)
    summary = summarise(results, ["vol", "frag", "err", "org1", "org2"])
    paired = paired_differences(results, key="group_err", metric="err") if starts == "paired" else []
    boot = paired_bootstrap(results, key="final_m2", stat=err_of_moments, name="err_diff") if starts == "paired" else []
    whole = {(e["a"], e["b"]): f"; whole set {e['err_diff']:.1f} [{e['lo']:.1f}, {e['hi']:.1f}] (bootstrap)"
             for e in boot}
    for d in paired:
        log(f"paired error difference {d['a']} − {d['b']}: {fmt(d['err_diff'], d['err_diff_ci'], 1)} "
            f"({d['groups']} groups){whole.get((d['a'], d['b']), '')}")
    return {"table": "table2", "data": str(data), "rollout": cfg, "sampler": sampler,
            "proposal": proposal if sampler == "exact" else None, "starts": starts, "paired": paired,
            "paired_bootstrap": boot, "volume_bounds": bounds,
            "real_second_moments": real_m2.tolist(), "rows": summary, "raw": results}


def table2_markdown(res: dict) -> str:
    rows = res["rows"]
    lines = [("| Model | runs | vol | frag | error (sites²) | org type 1 | org type 2 | closure weights | paper vol | paper frag "
             "| paper error |"), "|---|---|---|---|---|---|---|---|---|---|---|"]
    for lab in order_labels(set(rows) | set(PAPER_TABLE2)):
        d = rows.get(lab)
        if d is None:
            p = PAPER_TABLE2[lab]
            lines.append(_not_run_row(lab, p, n_ours=6))
            continue
        p = PAPER_TABLE2.get(lab, (None, None, None))
        dag = "†" if d["n_runs"] == 1 and lab not in ("real data", "permuted starts (no dynamics)") else ""
        lines.append(f"| {lab} | {d['n_runs']} | {fmt(d['vol'], d['vol_ci'])}{dag} | {fmt(d['frag'], d['frag_ci'])}"
                     f"{dag} | {fmt(d['err'], d['err_ci'], 1)}{dag} | {fmt(d['org1'], None)} | {fmt(d['org2'], None)} "
                     f"| {weights_text(d)} | "
                     + " | ".join("–" if v is None else (f"{v:.1f}" if k == 2 else f"{v:.2f}")
                                  for k, v in enumerate(p)) + " |")
    cfg = res["rollout"]
    lines.append("")
    lines.append(f"Roll-outs: {cfg['trajectories']} trajectories per run × {cfg['frames']} frames, "
                 f"{cfg['mcs_per_frame']} {_dynamics(res)}; "
                 f"vol/frag on every {cfg['every']}th frame, error and organisation on final frames. ± = 95 % "
                 f"interval over seeds; † = one run: interval over {cfg.get('groups', 5)} groups of its trajectories. The "
                 "real-data row's "
                 "error compares two random halves of the data.")
    if res.get("paired"):
        note = (f"Paired starts: every run from the same {cfg['trajectories']} permuted starts. Error difference "
                f"row a − row b over the same {res['paired'][0]['groups']} trajectory groups (95 % interval over "
                "the groups; < 0 with the interval clear of 0: a is closer to the data than b from the same starts)")
        boot = {(e["a"], e["b"]): e for e in res.get("paired_bootstrap", [])}
        if boot:
            note += (" and, for the whole-set error the rows print, error(a) − error(b) with its 95 % paired "
                     "bootstrap interval (trajectories resampled, the same ones for both rows)")
        head = "| row a | row b | error(a) − error(b), groups (sites²) | error(a) − error(b), whole set [95 %] |"
        lines += ["", note + ":", "", head, "|---|---|---|---|"]
        for d in res["paired"]:
            e = boot.get((d["a"], d["b"]))
            whole = f"{e['err_diff']:.1f} [{e['lo']:.1f}, {e['hi']:.1f}]" if e else "–"
            lines.append(f"| {d['a']} | {d['b']} | {fmt(d['err_diff'], d['err_diff_ci'], 1)} | {whole} |")
    return "\n".join(lines)


def add_arguments(p) -> None:
    add_common_arguments(p, "runs/data/bipolar-cpu.npz")


def run(args) -> int:
    claim_outputs(args)
    res = evaluate_table2(args.data, parse_runs(args.runs), scale=args.scale, seed=args.seed, device=args.device,
                          sampler=args.sampler, proposal=args.proposal, gif_dir=args.gif, starts=args.starts,
                          **overrides_of(args))
    write_outputs(res, table2_markdown(res), args.out)
    return 0
