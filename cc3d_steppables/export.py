"""Export a model bundle as a runnable CompuCell3D (4.8) project.

Command line::

    python -m cc3d_steppables.export BUNDLE --out DIR [--init SNAPSHOT] [--mcs N] [--seed S]

writes::

    DIR/NAME.cc3d                        the project file (open it in CC3D, or run it headless:
                                         python -m cc3d.run_script -i DIR/NAME.cc3d -o OUTDIR)
    DIR/Simulation/NAME.xml              CC3DML: Potts (dimensions, Steps = MCS + 1, Temperature,
                                         NeighborOrder, periodic boundaries, RandomSeed, Flip2DimRatio 1),
                                         CellType, Volume (per type), Contact (matching NeighborOrder),
                                         PIFInitializer
    DIR/Simulation/NAME.piff             the initial state
    DIR/Simulation/NAME.py               the main script (registers the steppables)
    DIR/Simulation/NeuralCPMSteppables.py  Python energy term + lattice mirror + snapshot writer
    DIR/Simulation/neuralcpm_config.json the Python-side terms and run settings
    DIR/Simulation/neuralcpm_arrays.npz  their arrays (fields, network weights), plain numpy
    DIR/Simulation/bundle/               a copy of the bundle (provenance; global-NH field updates)
    DIR/initial_state.npz                the initial state in the package's format

How each term is exported (ΔH identical to the bundle's for every copy attempt unless stated):

* ``contact`` → CC3D ``Contact`` plugin, ``NeighborOrder`` = the term's order, no
  ``WeightEnergyByDistance``: CC3D sums J over the neighbours of the target site with no division, which is
  the package's per-unordered-pair energy. J includes the term's scale.
* ``volume`` → CC3D ``Volume`` plugin, ``VolumeEnergyParameters`` per type (λ includes the scale).
* ``external``, ``directed_motion``, ``local_nh``, ``pooled_nh`` → the Python energy term
  (``EnergyFunctionPyWrapper``) with evaluators over a lattice mirror (see :mod:`cc3d_steppables.steppables`).
  The neural ones run exactly, per copy attempt, on the compiled evaluator (``neuralcpm_local_nh_numba.py``,
  caches kept by the change watcher) when numba imports in CC3D's Python — ``conda install numba`` (or
  ``pip install numba``) in CC3D's environment — and on the numpy evaluators (same ΔH, ≈ 50–100× slower)
  otherwise.
* global neural terms (``nh``, ``cnn``, ``nh1_cnn``) → an approximation: per-type potential fields
  recomputed from the network every k MCS (:mod:`cc3d_steppables.approx`); its error is measured on
  roll-outs and printed.

When the Python term is present, a copy that would delete a cell gets ΔH = +inf (as in the package's
samplers); ``--forbid-deletion`` adds the Python term for that alone.

Frames: CC3D performs no Potts sweep at step 0, so ``Steps = MCS + 1``; the snapshot steppable records MCS
0 (the initial state) and every ``--snapshot-every`` MCS into ``OUTDIR/lattice.npz``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np

from neuralcpm_plugin.cli import claim_output, command
from neuralcpm_plugin.errors import ExportError
from neuralcpm_plugin.export_checks import check_export, check_run_options
from neuralcpm_plugin.lattice import CellState, neighbour_offsets

from . import steppables as _stp
from .cc3dml import cc3d_type_names, fmt

__all__ = ["NEURAL_GLOBAL_KINDS", "ExportResult", "cc3d_command", "default_initial_state", "default_outdir",
           "export_project", "main"]

NEURAL_GLOBAL_KINDS = ("nh", "cnn", "nh1_cnn")
CPP_KINDS = ("contact", "volume")
PY_KINDS = ("external", "directed_motion", "local_nh", "pooled_nh")


@dataclass
class ExportResult:
    """What :func:`export_project` wrote and measured."""

    project: Path  # the .cc3d file
    directory: Path
    mode: str  # "cpp" | "cpp+python" | "cpp+python+nh-fields"
    cpp_terms: list = field(default_factory=list)
    python_terms: list = field(default_factory=list)
    nh_error: dict | None = None  # {"rel_rmse": ..., "rmse": ..., "std_exact": ..., "n": ..., "k": ...}
    cost: dict = field(default_factory=dict)
    initial_state: CellState | None = None
    mcs: int = 0
    seed: int = 0

    def summary(self) -> str:
        mode = (f"mode: {self.mode} (C++ plugins: {', '.join(self.cpp_terms) or '-'}; Python term: "
                f"{', '.join(self.python_terms) or '-'})")
        lines = [f"CC3D project: {self.project}", mode]
        if self.nh_error is not None:
            e = self.nh_error
            lines.append(f"global NH approximation: per-type fields recomputed every {e['k']} MCS; ΔH error "
                         f"RMSE {e['rmse']:.4g} = {e['rel_rmse']:.3f} × std of the exact ΔH ({e['std_exact']:.4g}) "
                         f"over {e['n']} copy attempts from roll-outs ({e['rel_rmse_at_update']:.3f} right after an "
                         f"update); one field update takes {e['update_s']:.3g} s here (≈ {e['update_s'] / e['k']:.3g} "
                         f"s per MCS, needs torch + this package inside CC3D, else the fields stay as exported)")
            if e.get("by_age"):
                lines.append("  relative ΔH error by MCS since the last field update: " + ", ".join(
                    f"{a['age_mcs']:g} MCS: {a['rel_rmse']:.3f}" for a in e["by_age"]))
            if not e["rel_rmse"] < 0.5:
                lines.append(f"  WARNING: the field approximation is poor for this model at k = {e['k']} MCS (relative "
                             "error >= 0.5); lower --nh-recompute-every (see the error by age), or train a local NH "
                             "(exact inside CC3D)")
        if self.cost:
            c = self.cost
            if c.get("python_us_per_call") is not None:
                lines.append(f"expected cost: {c['python_us_per_call']:.1f} µs per Python ΔH call (+ ~1 µs CC3D "
                             f"call overhead) × ~{c['calls_per_mcs']:.0f} calls/MCS (after 20 MCS of the analytic part) "
                             f"≈ {c['python_s_per_mcs']:.3g} s "
                             f"per MCS in the Python term (≤ {c['mcs_per_s_bound']:.3g} MCS/s)")
            else:
                lines.append("expected cost: C++ plugins only (CC3D's native speed)")
        out = default_outdir(self.project)
        lines.append(f"run: {cc3d_command(self.project, out)}   ({self.mcs} MCS, seed {self.seed}, one thread: "
                     f"NumberOfProcessors 1; snapshots → {out}/lattice.npz; in the Python of your CC3D installation)")
        return "\n".join(lines)


def default_outdir(project) -> Path:
    """The output folder the printed command uses: ``<project folder>_out`` beside the project folder (CC3D 4.8
    refuses an output folder inside the project folder)."""
    d = Path(project).parent
    return d.with_name(d.name + "_out")


def cc3d_command(project, outdir=None) -> str:
    """The shell command that runs an exported project headless (CC3D's ``run_script`` creates ``outdir``)."""
    out = outdir if outdir is not None else default_outdir(project)
    return f"python -m cc3d.run_script -i {shlex.quote(str(project))} -o {shlex.quote(str(out))}"


# ------------------------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------------------------
def _load_bundle(bundle):
    from neuralcpm_plugin.bundle import ModelBundle, load_bundle
    from neuralcpm_plugin.hamiltonian.base import Hamiltonian
    if isinstance(bundle, ModelBundle):
        return bundle
    if isinstance(bundle, Hamiltonian):
        return ModelBundle(bundle)
    return load_bundle(bundle)


def _load_states(path):
    from neuralcpm_plugin.io import load_states
    return load_states(Path(path))


def default_initial_state(hamiltonian, *, seed: int = 0, n_cells: int | None = None,
                          extra: dict | None = None) -> CellState:
    """A start like the training data: square seeds placed at random, without overlap, in a centred disc.

    ``extra["init"]`` of the bundle may fix ``n_cells`` (total), ``side`` (square side in sites) and
    ``radius``; otherwise: ⌊√V*/2⌋-sided squares (the reference data's 5×5 for V* = 90–100), as many cells as
    fill about 45 % of the lattice at the target volume, equal numbers per type, the disc just large enough to
    hold the squares at 40 % packing. Types are assigned by a random permutation.
    """
    lat = hamiltonian.lattice
    shape = tuple(lat.shape)
    n_t = max(1, len(hamiltonian.type_names or ["medium", "cell"]) - 1)
    init = dict((extra or {}).get("init", {}))
    vt = None
    vol = hamiltonian.term("volume")
    if vol is not None:
        tg = vol.target.detach().cpu().numpy()[1:]
        vt = float(np.mean(tg)) if len(tg) else None
    vt = vt or 25.0
    side = int(init.get("side", max(1, int(np.sqrt(vt) // 2))))
    area = float(np.prod(shape))
    n = int(init.get("n_cells", n_cells or max(n_t, round(0.45 * area / vt))))
    n = max(n_t, n - n % n_t) if n >= n_t else n_t
    radius = float(init.get("radius", np.sqrt(n * side ** len(shape) / 0.4 / np.pi) + side))
    rng = np.random.default_rng(seed)
    ids = np.zeros(shape, np.int32)
    centre = (np.asarray(shape, float) - 1) / 2
    placed, tries = 0, 0
    while placed < n:
        tries += 1
        if tries > 200000:
            raise ExportError(f"cannot place {n} cells of side {side} in a disc of radius {radius:.1f} on a "
                              f"{shape} lattice; pass an initial state with --init")
        lo = rng.integers(0, np.asarray(shape) - side + 1)
        sl = tuple(slice(int(a), int(a) + side) for a in lo)
        corners = np.stack(np.meshgrid(*[np.arange(s.start, s.stop) for s in sl], indexing="ij"), -1)
        if np.any(np.linalg.norm(corners - centre, axis=-1) > radius) or np.any(ids[sl] != 0):
            continue
        placed += 1
        ids[sl] = placed
    types = np.zeros(n + 1, np.int32)
    types[1:] = rng.permutation(np.arange(n) % n_t + 1)
    return CellState(ids, types, {"layout": "default", "seed": seed})


# ------------------------------------------------------------------------------------------------------------
# writers
# ------------------------------------------------------------------------------------------------------------
def _write_piff(path: Path, state: CellState, names) -> None:
    from neuralcpm_plugin.io.piff import save_piff  # the io engineer's writer (cells in id order)
    save_piff(path, state, names)


def _cc3dml(name, shape, periodic, temperature, copy_order, mcs, seed, cnames, contact, volume, notes) -> str:
    ndim = len(shape)
    dims = {"x": shape[-1], "y": shape[-2], "z": shape[-3] if ndim == 3 else 1}
    b = "Periodic" if periodic else "NoFlux"
    L = ["<CompuCell3D>",
         "    <!-- Exported by neuralcpm_plugin (cc3d_steppables.export) from a NeuralCPM model bundle.",
         *[f"         {escape(n)}" for n in notes],
         "    -->",
         "    <Metadata>",
         "        <NumberOfProcessors>1</NumberOfProcessors>",
         "    </Metadata>",
         "    <Potts>",
         f'        <Dimensions x="{dims["x"]}" y="{dims["y"]}" z="{dims["z"]}"/>',
         f"        <Steps>{int(mcs) + 1}</Steps>",
         f"        <Temperature>{fmt(temperature)}</Temperature>",
         f"        <NeighborOrder>{int(copy_order)}</NeighborOrder>",
         "        <Flip2DimRatio>1</Flip2DimRatio>",
         f"        <Boundary_x>{b}</Boundary_x>",
         f"        <Boundary_y>{b}</Boundary_y>"]
    if ndim == 3:
        L.append(f"        <Boundary_z>{b}</Boundary_z>")
    L += [f"        <RandomSeed>{int(seed)}</RandomSeed>",
          "    </Potts>",
          '    <Plugin Name="CellType">']
    L += [f'        <CellType TypeName="{n}" TypeId="{i}"/>' for i, n in enumerate(cnames)]
    L.append("    </Plugin>")
    if volume is not None:
        lam, tgt = volume
        L.append('    <Plugin Name="Volume">')
        for t in range(1, len(cnames)):
            L.append(f'        <VolumeEnergyParameters CellType="{cnames[t]}" TargetVolume="{fmt(tgt[t])}" '
                     f'LambdaVolume="{fmt(lam[t])}"/>')
        L.append("    </Plugin>")
    if contact is not None:
        J, order = contact
        L.append('    <Plugin Name="Contact">')
        for a in range(len(cnames)):
            for c in range(a, len(cnames)):
                L.append(f'        <Energy Type1="{cnames[a]}" Type2="{cnames[c]}">{fmt(J[a][c])}</Energy>')
        L.append(f"        <NeighborOrder>{int(order)}</NeighborOrder>")
        L.append("    </Plugin>")
    L += ['    <Steppable Type="PIFInitializer">',
          f"        <PIFName>Simulation/{name}.piff</PIFName>",
          "    </Steppable>",
          "</CompuCell3D>", ""]
    return "\n".join(L)


_MAIN = '''"""Main script of an exported NeuralCPM model (run: python -m cc3d.run_script -i {name}.cc3d -o OUTDIR)."""
import os

# one BLAS thread (set before numpy loads): the Python energy term's matrices are tiny, threads only cost
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

from cc3d import CompuCellSetup
from NeuralCPMSteppables import NeuralCPMEnergySteppable, SnapshotSteppable

# Python energy term (external potential / directed motion / neural terms) over a lattice mirror, if any;
# writes neuralcpm_run.json (MCS/s, callback errors) into the output folder at the end
CompuCellSetup.register_steppable(steppable=NeuralCPMEnergySteppable(frequency=1))
# lattice snapshots (package .npz format) at MCS 0, every {every} MCS and at MCS {mcs}
CompuCellSetup.register_steppable(steppable=SnapshotSteppable(frequency=1, every={every}, last_mcs={mcs},
                                                              filename="lattice.npz"))
CompuCellSetup.run()
'''


def _cc3d_file(name) -> str:
    return "\n".join([
        '<Simulation version="4.8.0">',
        f'    <XMLScript Type="XMLScript">Simulation/{name}.xml</XMLScript>',
        f'    <PythonScript Type="PythonScript">Simulation/{name}.py</PythonScript>',
        '    <Resource Type="Python">Simulation/NeuralCPMSteppables.py</Resource>',
        f"    <PIFFile>Simulation/{name}.piff</PIFFile>",
        "</Simulation>", ""])


# ------------------------------------------------------------------------------------------------------------
# cost estimate
# ------------------------------------------------------------------------------------------------------------
def _estimate_cost(sim_dir: Path, cfg: dict, state: CellState, copy_order: int, *, n_calls: int = 300,
                   seed: int = 0, analytic_terms=(), relax_mcs: float = 20.0) -> dict:
    """Time the exported Python term (in this process) on copy attempts of the initial state after
    ``relax_mcs`` MCS of the model's analytic part (the exact sampler), where the cell boundaries — and so the
    number of calls per MCS — are closer to those of the run."""
    if not cfg.get("python_terms") and not cfg.get("forbid_deletion"):
        return {"python_us_per_call": None}
    if analytic_terms:  # boundaries grow from the seeds: measure on a state relaxed by the analytic part
        from neuralcpm_plugin.sampling.exact import ExactSampler
        lat_periodic = bool(cfg.get("periodic", True))
        smp = ExactSampler(state, None, seed=seed, terms=analytic_terms, temperature=float(cfg["temperature"]),
                           periodic=lat_periodic, copy_order=copy_order,
                           contact_order=int(cfg.get("contact_order", copy_order)))
        smp.step(relax_mcs)
        state = smp.state
    m = _stp.LatticeMirror(state.ids, state.types)
    energy = _stp.load_python_energy(sim_dir, m, cfg)
    rng = np.random.default_rng(seed)
    offs = neighbour_offsets(copy_order, state.ndim)
    shape = np.asarray(state.shape)
    # fraction of (site, copy neighbour) pairs in different cells = fraction of attempts CC3D hands to Python
    diff = 0.0
    for o in offs:
        diff += np.mean(np.roll(state.ids, tuple(-int(c) for c in o), axis=tuple(range(state.ndim))) != state.ids)
    frac = diff / len(offs)
    attempts = []
    for _ in range(200 * n_calls):
        if len(attempts) >= n_calls:
            break
        s = tuple(int(v) for v in rng.integers(0, shape))
        src = tuple(int(v) for v in (np.asarray(s) + offs[rng.integers(len(offs))]) % shape)
        if state.ids[s] != state.ids[src]:
            attempts.append((s, int(state.ids[src])))
    if not attempts:
        return {"python_us_per_call": None}
    energy.delta(*attempts[0])  # warm-up (caches)
    t0 = time.perf_counter()
    for s, a in attempts:
        energy.delta(s, a)
    us = (time.perf_counter() - t0) / len(attempts) * 1e6
    calls = float(np.prod(shape)) * frac
    s_per_mcs = calls * (us + 1.0) * 1e-6
    return {"python_us_per_call": us, "calls_per_mcs": calls, "python_s_per_mcs": s_per_mcs,
            "mcs_per_s_bound": (1.0 / s_per_mcs) if s_per_mcs > 0 else float("inf"), "diff_fraction": frac}


# ------------------------------------------------------------------------------------------------------------
# main entry point
# ------------------------------------------------------------------------------------------------------------
def export_project(bundle, out, *, init=None, init_frame: int = 0, mcs: int = 1000, seed: int = 1,
                   name: str | None = None, snapshot_every: int | None = None, forbid_deletion: bool = False,
                   nh_recompute_every: int = 10, nh_error_mcs: float | None = None, nh_error_attempts: int = 200,
                   verify_mirror_every: int = 0, measure_cost: bool = True, quiet: bool = False) -> ExportResult:
    """Write a CC3D project for ``bundle`` into directory ``out``; see the module docstring.

    Parameters
    ----------
    bundle : path to a bundle directory, a :class:`~neuralcpm_plugin.bundle.ModelBundle` or a Hamiltonian.
    out : output directory (created; files inside it are overwritten).
    init : initial state — a :class:`CellState`, a snapshot file (``.npz``, PIFF, anything
        ``neuralcpm_plugin.io`` reads; frame ``init_frame``), or ``None`` for :func:`default_initial_state`.
    mcs : Monte Carlo steps to run (CC3D ``Steps`` = mcs + 1: no sweep at step 0).
    seed : CC3D ``Potts/RandomSeed`` (also seeds the default layout).
    snapshot_every : MCS between recorded frames (default: mcs // 20, at least 1).
    forbid_deletion : add the Python term even without Python-side energies, to refuse cell deletion.
    nh_recompute_every : k, MCS between field updates of the global-NH approximation.
    nh_error_mcs, nh_error_attempts : length of the roll-out (default: k MCS, one update interval) and number
        of copy attempts for its measured error.
    verify_mirror_every : if > 0, the steppable compares its mirror with CC3D's field every so many MCS.
    """
    mb = _load_bundle(bundle)
    ham = mb.hamiltonian
    lat = ham.lattice
    shape = tuple(int(s) for s in lat.shape)
    if len(shape) not in (2, 3):
        raise ExportError(f"CC3D export needs a 2-D or 3-D lattice, got shape {shape}")
    type_names = list(ham.type_names or ["medium"] + [f"type{i}" for i in range(1, 2)])
    cnames = cc3d_type_names(type_names)
    n_t1 = len(cnames)
    out = Path(out)
    name = name or "NeuralCPM"
    if not name.isidentifier():
        raise ExportError(f"project name {name!r} must be a valid Python identifier (it names the main script)")
    check_run_options(mcs=mcs, intervals={"--snapshot-every": snapshot_every,
                                          "--nh-recompute-every": nh_recompute_every},
                      counts={"--verify-mirror-every": verify_mirror_every})
    mcs = int(mcs)
    every = int(snapshot_every) if snapshot_every else max(1, mcs // 20)

    # ---- initial state ---------------------------------------------------------------------------------
    if init is None:
        state = default_initial_state(ham, seed=seed, extra=mb.extra)
    elif isinstance(init, CellState):
        state = init
    else:
        states = _load_states(init)
        try:
            state = states[init_frame]
        except IndexError:
            raise ExportError(f"{init}: has {len(states)} frames, no frame {init_frame}") from None
    check_export(ham, state)    # the validation shared with the Morpheus exporter
    state = state.relabelled()  # ids 1..N: CC3D creates cells with the PIFF ids, snapshots report them

    # ---- terms -----------------------------------------------------------------------------------------
    contact = volume = None
    cpp_terms, py_specs, py_kinds, arrays = [], [], [], {}
    nh_terms = []
    notes = []
    for i, term in enumerate(ham.terms):
        spec = term.spec()
        kind = spec.get("kind", term.kind)
        scale = float(term.scale_value())
        p = spec.get("params", {})
        if kind == "contact":
            if contact is not None:
                raise ExportError("the model has two contact terms; CC3D has one Contact plugin")
            J = np.asarray(p["J"], dtype=np.float64) * scale
            contact = (J.tolist(), int(p.get("order", lat.contact_order)))
            cpp_terms.append("Contact")
        elif kind == "volume":
            if volume is not None:
                raise ExportError("the model has two volume terms; CC3D has one Volume plugin")
            lam = np.asarray(p["lambda"], dtype=np.float64) * scale
            tgt = np.asarray(p["target"], dtype=np.float64)
            volume = (lam.tolist(), tgt.tolist())
            cpp_terms.append("Volume")
        elif kind == "external":
            mu = np.asarray(p["mu"], dtype=np.float64) * scale
            mu[0] = 0.0
            key = f"t{i}_field"
            arrays[key] = term.tensors()["field"].detach().cpu().numpy().astype(np.float64)
            py_specs.append({"kind": "external", "mu": mu.tolist(), "field": key})
            py_kinds.append("external")
        elif kind == "directed_motion":
            st = np.asarray(p["strength"], dtype=np.float64) * scale
            st[0] = 0.0
            py_specs.append({"kind": "directed_motion", "strength": st.tolist(), "direction": p["direction"]})
            py_kinds.append("directed_motion")
        elif kind in ("local_nh", "pooled_nh"):
            py_specs.append(_local_nh_spec(term, i, arrays))
            py_kinds.append(kind)
        elif kind in NEURAL_GLOBAL_KINDS or not getattr(term, "analytic", True):
            nh_terms.append(term)
        else:
            raise ExportError(f"term {i} of kind {kind!r} has no CC3D export (supported: "
                              f"{', '.join(CPP_KINDS + PY_KINDS + NEURAL_GLOBAL_KINDS)})")

    # ---- write the project -----------------------------------------------------------------------------
    sim = out / "Simulation"
    sim.mkdir(parents=True, exist_ok=True)
    if (sim / "bundle").exists():
        shutil.rmtree(sim / "bundle")
    from neuralcpm_plugin.bundle import save_bundle
    save_bundle(sim / "bundle", ham, provenance=dict(mb.provenance, exported_to="cc3d"), extra=mb.extra)

    nh_error = None
    nh_cfg = None
    if nh_terms:
        from .approx import measure_error, type_fields
        phi = type_fields(nh_terms, state.ids, state.types, n_types=n_t1 - 1)
        arrays["nh_phi"] = phi
        py_specs.append({"kind": "type_fields", "phi": "nh_phi"})
        py_kinds.append("nh-fields(" + ",".join(t.kind for t in nh_terms) + ")")
        nh_error = measure_error(ham, nh_terms, state, k=nh_recompute_every,
                                 mcs=nh_recompute_every if nh_error_mcs is None else nh_error_mcs,
                                 n_attempts=nh_error_attempts, seed=seed)
        nh_cfg = {"recompute_every": int(nh_recompute_every), "bundle": "bundle",
                  "package_root": str(Path(__file__).resolve().parents[1]),
                  "error": nh_error}
        notes.append(f"Global neural term(s) approximated by per-type fields recomputed every {nh_recompute_every} "
                     f"MCS; measured relative ΔH error {nh_error['rel_rmse']:.3f}.")

    has_py = bool(py_specs) or forbid_deletion
    cfg = {"format": _stp.CONFIG_FORMAT, "version": _stp.CONFIG_VERSION, "shape": list(shape),
           "periodic": bool(lat.periodic), "type_names": type_names, "cc3d_type_names": cnames,
           "temperature": float(ham.temperature), "copy_order": int(lat.copy_order),
           "contact_order": int(lat.contact_order),
           "python_terms": py_specs, "forbid_deletion": bool(has_py),
           "forbid_deletion_python": bool(forbid_deletion),
           "verify_mirror_every": int(verify_mirror_every), "mcs": mcs, "seed": int(seed),
           "snapshot_every": every}
    if nh_cfg:
        cfg["nh_fields"] = nh_cfg
    for spec in py_specs:
        for src, dst in spec.pop("_copy", []):
            shutil.copyfile(src, sim / dst)
    if any(spec.get("compiled_module") for spec in py_specs):
        notes.append("Neural terms: compiled evaluator when numba imports in CC3D's Python (else numpy, slow: "
                     "conda install numba / pip install numba in CC3D's environment).")
    (sim / _stp.CONFIG_NAME).write_text(json.dumps(cfg, indent=1))
    if arrays:
        np.savez(sim / _stp.ARRAYS_NAME, **arrays)
    elif (sim / _stp.ARRAYS_NAME).exists():
        (sim / _stp.ARRAYS_NAME).unlink()
    shutil.copyfile(Path(_stp.__file__), sim / "NeuralCPMSteppables.py")

    notes.insert(0, f"Model: {', '.join(t.kind for t in ham.terms)}; temperature {ham.temperature}; "
                    f"types {', '.join(cnames)}.")
    (sim / f"{name}.xml").write_text(_cc3dml(name, shape, lat.periodic, ham.temperature, lat.copy_order, mcs,
                                             seed, cnames, contact, volume, notes))
    _write_piff(sim / f"{name}.piff", state, cnames)
    (sim / f"{name}.py").write_text(_MAIN.format(name=name, every=every, mcs=mcs))
    (out / f"{name}.cc3d").write_text(_cc3d_file(name))
    from neuralcpm_plugin.io.npz import save_npz
    save_npz(out / "initial_state.npz", [state])

    mode = "cpp" if not has_py else ("cpp+python+nh-fields" if nh_terms else "cpp+python")
    cost = {}
    if measure_cost:
        cost = _estimate_cost(sim, cfg, state, lat.copy_order, seed=seed,
                              analytic_terms=[(t.spec(), t.tensors()) for t in ham.terms if t.analytic])
    res = ExportResult(out / f"{name}.cc3d", out, mode, cpp_terms, py_kinds, nh_error, cost, state, mcs, int(seed))
    if not quiet:
        print(res.summary())
    return res


def _local_nh_spec(term, i: int, arrays: dict) -> dict:
    """Spec of a local / pooled NH term for the project.  Its pure-numpy evaluator (``LocalNHNumpy`` in
    ``neuralcpm_plugin/hamiltonian/local_nh.py``, ``PooledNHNumpy`` in ``pooled_nh.py``) and the compiled one
    (``_local_nh_numba.py``) are copied into the project (``neuralcpm_local_nh.py``, ``neuralcpm_pooled_nh.py``,
    ``neuralcpm_local_nh_numba.py``) and loaded there without the package (see ``steppables._vendor_module``)."""
    from neuralcpm_plugin.hamiltonian import _local_nh_numba as _nb
    from neuralcpm_plugin.hamiltonian import local_nh as _lnh
    if not hasattr(_lnh, "LocalNHNumpy"):
        raise ExportError("neuralcpm_plugin.hamiltonian.local_nh has no LocalNHNumpy evaluator")
    prefix = f"t{i}_w."
    for k, v in term.tensors().items():
        arrays[prefix + k] = v.detach().cpu().double().numpy()
    spec = term.spec()
    lnh = ("neuralcpm_local_nh.py", str(Path(_lnh.__file__).resolve()))
    nb = ("neuralcpm_local_nh_numba.py", str(Path(_nb.__file__).resolve()))
    out = {"kind": term.kind, "prefix": prefix, "config": spec["params"]["config"],
           "scale": float(term.scale_value()), "compiled_module": nb[0]}
    if term.kind == "local_nh":
        out.update(module_file=lnh[0], factory="LocalNHNumpy", compiled_factory="LocalNHCompiled",
                   _copy=[lnh[::-1], nb[::-1]])
    else:
        from neuralcpm_plugin.hamiltonian import pooled_nh as _pnh
        pnh = ("neuralcpm_pooled_nh.py", str(Path(_pnh.__file__).resolve()))
        out.update(module_file=pnh[0], module_name="pooled_nh", factory="PooledNHNumpy",
                   compiled_factory="PooledNHCompiled", requires={"local_nh": lnh[0]},
                   _copy=[lnh[::-1], pnh[::-1], nb[::-1]])
    return out


@command
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cc3d_steppables.export",
                                 description="Export a NeuralCPM model bundle as a runnable CompuCell3D project.")
    ap.add_argument("bundle", help="model bundle directory (model.json + weights.safetensors)")
    ap.add_argument("--out", required=True, help="output directory for the CC3D project")
    ap.add_argument("--init", default=None, help="initial state: snapshot file (.npz, PIFF, ...); default: a "
                                                 "layout like the training data")
    ap.add_argument("--init-frame", "--frame", dest="init_frame", type=int, default=0,
                    help="frame of --init to start from (default 0)")
    ap.add_argument("--mcs", type=int, default=1000, help="Monte Carlo steps to run (default 1000)")
    ap.add_argument("--seed", type=int, default=1, help="CC3D RandomSeed (default 1)")
    ap.add_argument("--name", default="NeuralCPM", help="project name (default NeuralCPM)")
    ap.add_argument("--snapshot-every", type=int, default=None, help="MCS between saved frames (default mcs/20)")
    ap.add_argument("--forbid-deletion", action="store_true",
                    help="refuse copies that delete a cell (adds the Python term if the model has none)")
    ap.add_argument("--nh-recompute-every", type=int, default=10,
                    help="global NH: MCS between updates of the per-type fields (default 10)")
    ap.add_argument("--verify-mirror-every", type=int, default=0,
                    help="compare the lattice mirror with CC3D's field every N MCS (debugging; 0 = never)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing project in --out")
    a = ap.parse_args(argv)
    claim_output(a.out, kind="dir", overwrite=a.overwrite)
    export_project(a.bundle, a.out, init=a.init, init_frame=a.init_frame, mcs=a.mcs, seed=a.seed, name=a.name,
                   snapshot_every=a.snapshot_every, forbid_deletion=a.forbid_deletion,
                   nh_recompute_every=a.nh_recompute_every, verify_mirror_every=a.verify_mirror_every)
    return 0


if __name__ == "__main__":
    sys.exit(main())
