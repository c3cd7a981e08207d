"""The external energy hook: run Morpheus in chunks, refreshing the neural potential fields in between.

``python -m morpheus_xml.run BUNDLE --morpheus PATH --mcs N --refresh K [--init SNAPSHOT] [--out traj.npz]``

Morpheus 2.2.4 has no per-attempt plug-in hook and reads fields only at start, so the neural part of a
bundle runs through per-type potential fields (:func:`morpheus_xml.export.neural_potential_fields`) that are
recomputed from the network every K MCS:

1. chunk 0: export the model with ``StopTime = K`` and ``SaveInterval = K`` and run Morpheus headless
   (``morpheus --file model.xml --outdir DIR``, one OpenMP thread);
2. check that the log holds ``=== Simulation finished ===`` (Morpheus exits with status 0 even when a model
   fails to load), read the checkpoint ``*.xml.gz`` of time ``t + K``;
3. measure the stale fields' error on the new state (RMSE of the field ΔH against the network's exact ΔH over
   every boundary copy attempt, relative to the standard deviation of the exact ΔH — the CC3D issue's
   measure, here on Morpheus's own roll-out), recompute the fields, write them into the checkpoint's
   ``Global/Field`` data, **remove the checkpoint's medium ``Population``** (otherwise Morpheus 2.2.4 recreates
   an empty medium cell and stops with a fatal error), set ``StopTime = t + 2K`` and a fresh ``RandomSeed``,
   and continue from the checkpoint;
4. after N MCS, write the trajectory (the state at every chunk boundary, MCS 0, K, 2K, ..., N) as one
   ``.npz`` (key ``data`` (frames, 2, H, W), ``mcs``, and per-chunk ``stale_rel_rmse`` / ``fresh_rel_rmse``).

A pooled NH (``pooled_nh``, H = scale·F(Z)) enters the fields like any neural term, from its exact ΔH at the
refresh's state: its expansion around the Z of that state, ΔH = scale·(F(Z_r + ΔZ) − F(Z_r)) (to first order
scale·∇F(Z_r)·ΔZ); between refreshes the fields therefore see the pooled term with its global context frozen
at Z_r.  Its errors are also reported on their own: ``pooled_fresh_rel_rmse`` / ``pooled_stale_rel_rmse``
(the pooled part's fields against its exact ΔH, the measure above) and ``pooled_expansion_rel_rmse`` — at
the end of each chunk, the relative RMSE of scale·(F(Z_r + ΔZ) − F(Z_r)) against the exact ΔH (ΔZ exact at
the new state): the error of freezing the global context for K MCS, separate from the fields' per-type,
per-site approximation of ΔZ itself (which goes stale as cells move, as for every neural term).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from lxml import etree

from neuralcpm_plugin.cli import claim_output, command
from neuralcpm_plugin.errors import ExportError

from .export import build_xml, neural_potential_fields, resolve_model_and_state
from .readers import checkpoint_time, read_checkpoint

__all__ = ["HookResult", "continue_from_checkpoint", "main", "run_hook", "run_morpheus"]

FINISHED = "=== Simulation finished ==="


@dataclass
class HookResult:
    states: list
    mcs: list
    stale_rel_rmse: list = field(default_factory=list)
    fresh_rel_rmse: list = field(default_factory=list)
    pooled_fresh_rel_rmse: list = field(default_factory=list)
    pooled_stale_rel_rmse: list = field(default_factory=list)
    pooled_expansion_rel_rmse: list = field(default_factory=list)
    workdir: Path | None = None
    out: Path | None = None


def run_morpheus(morpheus, model: Path, outdir: Path, *, timeout: float | None = None) -> str:
    """Run Morpheus headless on ``model`` with output into ``outdir``; return its log (stdout + stderr).

    Raises :class:`ExportError` if the binary cannot be started, exits with an error, or its log lacks
    ``=== Simulation finished ===`` (Morpheus 2.2.4 exits with status 0 when a model fails to load).
    Morpheus runs on one OpenMP thread whatever ``OMP_NUM_THREADS`` says: its trajectory depends on the
    thread count, and one thread reproduces a run bit for bit.
    """
    outdir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    cmd = [str(morpheus), "--file", str(Path(model).resolve()), "--outdir", str(outdir.resolve())]
    try:
        proc = subprocess.run(cmd, check=False, cwd=outdir, env=env, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise ExportError(f"Morpheus binary not found: {morpheus}") from None
    except PermissionError:
        raise ExportError(f"Morpheus binary is not executable: {morpheus}") from None
    except subprocess.TimeoutExpired:
        raise ExportError(f"Morpheus did not finish {model} within {timeout} s") from None
    log = (proc.stdout or "") + "\n" + (proc.stderr or "")
    (outdir / "morpheus.log").write_text(log)
    tail = "\n".join(log.strip().splitlines()[-15:])
    if proc.returncode != 0:
        raise ExportError(f"Morpheus exited with status {proc.returncode} on {model}; log {outdir / 'morpheus.log'}"
                          f":\n{tail}")
    if FINISHED not in log:
        raise ExportError(f"Morpheus did not report '{FINISHED}' for {model} (it exits with status 0 even when a "
                          f"model fails); log {outdir / 'morpheus.log'}:\n{tail}")
    return log


def _latest_checkpoint(outdir: Path, want_time: float, model: Path) -> Path:
    files = sorted(outdir.glob("*.xml.gz"))
    if not files:
        raise ExportError(f"Morpheus wrote no checkpoint (*.xml.gz) into {outdir} for {model}")
    best = max(files, key=checkpoint_time)
    t = checkpoint_time(best)
    if abs(t - want_time) > 1e-6:
        raise ExportError(f"the last checkpoint in {outdir} is at time {t}, expected {want_time}")
    return best


def continue_from_checkpoint(checkpoint: Path, out: Path, *, stop_time: float, seed: int, save_interval: float,
                             fields: dict | None = None) -> Path:
    """Write a model that continues ``checkpoint``: the medium ``Population`` removed, ``StopTime``,
    ``RandomSeed`` and ``SaveInterval`` set, and the ``Global/Field`` data of ``fields`` (symbol → array [y, x])
    replaced. Returns ``out``."""
    from neuralcpm_plugin._xmlsafe import parse_xml_bytes, read_xml_bytes

    def error(msg):
        return ExportError(f"{checkpoint}: {msg}")
    root = parse_xml_bytes(read_xml_bytes(checkpoint, error), error)
    media = {c.get("name") for c in root.findall("CellTypes/CellType") if c.get("class") == "medium"}
    for pop in root.findall("CellPopulations/Population"):
        if pop.get("type") in media:
            pop.getparent().remove(pop)
    tm = root.find("Time")
    if tm is None:
        raise ExportError(f"{checkpoint}: no Time element")

    def set_child(tag, value):
        el = tm.find(tag)
        if el is None:
            el = etree.SubElement(tm, tag)
        el.set("value", str(value))

    set_child("StopTime", f"{stop_time:g}")
    set_child("RandomSeed", int(seed))
    set_child("SaveInterval", f"{save_interval:g}")
    import base64
    for sym, arr in (fields or {}).items():
        f = root.find(f"Global/Field[@symbol='{sym}']")
        if f is None:
            raise ExportError(f"{checkpoint}: no Global/Field {sym!r} to refresh")
        for d in f.findall("Data"):
            f.remove(d)
        d = etree.SubElement(f, "Data", encoding="base64")
        d.set("word-size", "8")
        d.text = base64.b64encode(np.ascontiguousarray(arr, dtype="<f8").tobytes()).decode("ascii")
    out.write_bytes(etree.tostring(root, pretty_print=True, xml_declaration=True, encoding="UTF-8"))
    return out


def _attempt_sample(state, order, periodic, sample, seed):
    from .export import boundary_attempts
    sites, new = boundary_attempts(state, order, periodic)
    if sample is not None and len(sites) > sample:
        pick = np.random.default_rng(seed).choice(len(sites), size=sample, replace=False)
        sites, new = sites[pick], new[pick]
    return sites, new


class _FrozenZ:
    """A pooled NH with its global context frozen at Z0 (one lattice): ``delta`` = scale·(F(Z0 + ΔZ) − F(Z0))."""

    def __init__(self, term, Z0):
        self.term, self.Z0 = term, Z0

    def delta(self, batch, sites, new_ids):
        return self.term.delta(batch, sites, new_ids, Z0=self.Z0)


def _current_Z(term, state, periodic, device):
    import torch

    from neuralcpm_plugin.hamiltonian.base import Batch
    with torch.no_grad():
        return term.Z(Batch.from_states([state], periodic=periodic, device=device))


def _expansion_error(frozen, state, order, periodic, sample=None, seed=0, device=None):
    """Relative RMSE of the pooled terms' ΔH with Z frozen (``frozen``: :class:`_FrozenZ`) against their exact ΔH
    over the boundary attempts of ``state``."""
    from .export import neural_delta
    sites, new = _attempt_sample(state, order, periodic, sample, seed)
    if len(sites) == 0:
        return 0.0
    exact = neural_delta([f.term for f in frozen], state, sites, new, periodic=periodic, device=device)
    approx = neural_delta(frozen, state, sites, new, periodic=periodic, device=device)
    std = exact.std()
    rmse = float(np.sqrt(np.mean((approx - exact) ** 2)))
    return rmse / std if std > 0 else (0.0 if rmse == 0 else float("inf"))


def _stale_error(phi, terms, state, order, periodic, sample=None, seed=0, device=None):
    """Relative RMSE of the fields' ΔH against the terms' exact ΔH over the boundary attempts of ``state``
    (a random sample of ``sample`` attempts when given)."""
    from .export import neural_delta
    sites, new = _attempt_sample(state, order, periodic, sample, seed)
    if len(sites) == 0:
        return 0.0
    D = neural_delta(terms, state, sites, new, periodic=periodic, device=device)
    W = state.shape[1]
    t_old = state.types[state.ids.ravel()[sites]]
    t_new = state.types[new]
    n = phi.shape[0]
    if t_new.max() >= n or t_old.max() >= n:
        return float("nan")
    approx = phi[t_new, sites // W, sites % W] - phi[t_old, sites // W, sites % W]
    std = D.std()
    rmse = float(np.sqrt(np.mean((approx - D) ** 2)))
    return rmse / std if std > 0 else (0.0 if rmse == 0 else float("inf"))


def run_hook(bundle, morpheus, *, mcs: int, refresh: int, init=None, frame: int = 0, seed: int = 1,
             workdir=None, out=None, cells_per_type: int = 20, timeout: float | None = None,
             field_attempts: int | None = None, device=None, log=print) -> HookResult:
    """Run ``bundle`` in Morpheus for ``mcs`` MCS in chunks of ``refresh`` MCS (see the module docstring).

    ``field_attempts`` bounds the network evaluations per refresh (see
    :func:`morpheus_xml.export.neural_potential_fields`); the stale-field error is then measured on a random
    sample of 200 attempts.
    """
    if mcs < 1 or refresh < 1:
        raise ExportError(f"--mcs and --refresh must be >= 1, got {mcs} and {refresh}")
    ham, n_types, state = resolve_model_and_state(bundle, init, frame, cells_per_type=cells_per_type, seed=seed)
    lat = ham.lattice
    if workdir is None:
        workdir = Path(out).with_name(Path(out).stem + "_chunks") if out is not None else Path("morpheus_chunks")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    neural = ham.neural_terms()
    if device is not None:
        for term in neural:
            term.to(device)
    pooled = [t for t in neural if t.kind == "pooled_nh"]
    frozen, phi_pooled = [], None
    sample = 200 if field_attempts else None
    res = HookResult([state], [0], workdir=workdir)
    t = 0
    phi = None
    checkpoint = None
    k = 0
    while t < mcs:
        step = min(refresh, mcs - t)
        cdir = workdir / f"chunk_{k:03d}"
        cdir.mkdir(parents=True, exist_ok=True)
        # Morpheus appends to an existing timelapse TIFF and leaves old checkpoints: clear what an earlier
        # run of the hook left in this chunk folder (the folder belongs to the hook).
        for stale in [*cdir.glob("*.xml.gz"), *cdir.glob("*.tif"), *cdir.glob("*.csv")]:
            stale.unlink()
        model = cdir / "model.xml"
        if neural:
            if phi is not None:
                res.stale_rel_rmse.append(_stale_error(phi, neural, state, lat.copy_order, lat.periodic, sample,
                                                       seed + k, device))
                if pooled:
                    _pooled_stale(res, phi_pooled, pooled, frozen, state, lat, sample, seed + k, device)
            frozen = [_FrozenZ(t, _current_Z(t, state, lat.periodic, device)) for t in pooled]
            phi, stats = neural_potential_fields(neural, state, n_types, order=lat.copy_order,
                                                 periodic=lat.periodic, max_attempts=field_attempts, seed=seed + k,
                                                 device=device, parts={"pooled": pooled} if pooled else None)
            res.fresh_rel_rmse.append(stats["rel_rmse"])
            if pooled:
                phi_pooled = stats["parts"]["pooled"]["phi"]
                res.pooled_fresh_rel_rmse.append(stats["parts"]["pooled"]["rel_rmse"])
        if checkpoint is None:
            root = build_xml(ham, state, mcs=step, seed=seed, record_every=step, save_interval=step,
                             neural_fields=phi, title="neuralcpm_chunk")
            model.write_bytes(etree.tostring(root, pretty_print=True, xml_declaration=True, encoding="UTF-8"))
            names = [c.get("name") for c in root.findall("CellTypes/CellType")]
            field_names = {f.get("symbol") for f in root.findall("Global/Field")}
        else:
            fields = {}
            if phi is not None:
                for ti in range(1, n_types + 1):
                    sym = f"phi_{names[ti]}"
                    if sym in field_names:
                        fields[sym] = phi[ti]
            continue_from_checkpoint(checkpoint, model, stop_time=t + step, seed=seed + k, save_interval=step,
                                     fields=fields)
        run_morpheus(morpheus, model, cdir, timeout=timeout)
        checkpoint = _latest_checkpoint(cdir, t + step, model)
        state = read_checkpoint(checkpoint)
        t += step
        k += 1
        res.states.append(state)
        res.mcs.append(t)
        msg = f"chunk {k}: MCS {t}/{mcs}, {len(state.cell_ids())} cells"
        if neural and res.stale_rel_rmse:
            msg += f", stale-field error of the previous chunk {res.stale_rel_rmse[-1]:.4g}"
        if res.pooled_stale_rel_rmse:
            msg += (f" (pooled NH part: fields {res.pooled_stale_rel_rmse[-1]:.4g}, frozen-Z "
                    f"{res.pooled_expansion_rel_rmse[-1]:.4g})")
        log(msg)
    if neural:
        res.stale_rel_rmse.append(_stale_error(phi, neural, state, lat.copy_order, lat.periodic, sample, seed + k,
                                               device))
        if pooled:
            _pooled_stale(res, phi_pooled, pooled, frozen, state, lat, sample, seed + k, device)
    if out is not None:
        from neuralcpm_plugin.io import save_npz
        n = max(s.n_ids for s in res.states)
        states = []
        for s in res.states:
            tt = np.zeros(n, np.int32)
            tt[: s.n_ids] = s.types
            states.append(type(s)(s.ids, tt, dict(s.meta)))
        extra = {"mcs": np.asarray(res.mcs, dtype=np.int64)}
        if neural:
            extra["stale_rel_rmse"] = np.asarray(res.stale_rel_rmse)
            extra["fresh_rel_rmse"] = np.asarray(res.fresh_rel_rmse)
        if pooled:
            for key in ("pooled_fresh_rel_rmse", "pooled_stale_rel_rmse", "pooled_expansion_rel_rmse"):
                extra[key] = np.asarray(getattr(res, key))
        res.out = save_npz(out, states, **extra)
    return res


def _pooled_stale(res, phi_pooled, pooled, frozen, state, lat, sample, seed, device):
    """Append the pooled part's stale-field error and frozen-Z expansion error at ``state`` (end of a chunk)."""
    res.pooled_stale_rel_rmse.append(_stale_error(phi_pooled, pooled, state, lat.copy_order, lat.periodic, sample,
                                                  seed, device))
    res.pooled_expansion_rel_rmse.append(_expansion_error(frozen, state, lat.copy_order, lat.periodic, sample, seed,
                                                          device))


@command
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m morpheus_xml.run",
                                description="Run a NeuralCPM bundle in Morpheus, refreshing the neural potential "
                                            "fields every K MCS (the external energy hook).")
    p.add_argument("bundle", help="model bundle directory")
    p.add_argument("--morpheus", default=os.environ.get("MORPHEUS_BIN"),
                   help="the Morpheus executable (default $MORPHEUS_BIN)")
    p.add_argument("--mcs", type=int, required=True, help="total MCS")
    p.add_argument("--refresh", type=int, required=True, help="chunk length K in MCS (fields recomputed between)")
    p.add_argument("--init", help="initial state (snapshot file or Morpheus checkpoint); default layout otherwise")
    p.add_argument("--frame", type=int, default=0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", default="morpheus_trajectory.npz", help="trajectory .npz (default %(default)s)")
    p.add_argument("--workdir", help="folder for the chunks' models and outputs (default <out>_chunks)")
    p.add_argument("--cells-per-type", type=int, default=20)
    p.add_argument("--field-attempts", type=int, default=0,
                   help="budget of network ΔH evaluations per refresh (0 = every boundary attempt)")
    p.add_argument("--device", help="torch device for the network (e.g. cuda)")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads for torch, BLAS and numba (default 0: torch/numba the available CPUs, BLAS 1)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file and --workdir")
    a = p.parse_args(argv)
    from neuralcpm_plugin.threads import configure_threads
    configure_threads(a.threads)
    if not a.morpheus:
        raise ExportError("no Morpheus executable: pass --morpheus PATH or set MORPHEUS_BIN")
    claim_output(a.out, overwrite=a.overwrite)
    claim_output(a.workdir or Path(a.out).with_name(Path(a.out).stem + "_chunks"), option="--workdir", kind="dir",
                 overwrite=a.overwrite)
    res = run_hook(a.bundle, a.morpheus, mcs=a.mcs, refresh=a.refresh, init=a.init, frame=a.frame, seed=a.seed,
                   workdir=a.workdir, out=a.out, cells_per_type=a.cells_per_type,
                   field_attempts=a.field_attempts or None, device=a.device)
    print(f"wrote {res.out}: {len(res.states)} frames at MCS {res.mcs}")
    if res.stale_rel_rmse:
        print("neural potential fields, relative RMSE of ΔH (fresh at each refresh → stale at the next): "
              + ", ".join(f"{a:.3g}→{b:.3g}" for a, b in zip(res.fresh_rel_rmse, res.stale_rel_rmse)))
    if res.pooled_stale_rel_rmse:
        print("  pooled NH part alone, fields (fresh → stale): "
              + ", ".join(f"{a:.3g}→{b:.3g}" for a, b in zip(res.pooled_fresh_rel_rmse, res.pooled_stale_rel_rmse)))
        print(f"  pooled NH expansion around the refresh's Z (global context frozen for {a.refresh} MCS), relative "
              "RMSE of ΔH at the next refresh: " + ", ".join(f"{x:.3g}" for x in res.pooled_expansion_rel_rmse))
    return 0



if __name__ == "__main__":
    sys.exit(main())
