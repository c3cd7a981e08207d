"""Import a CompuCell3D model (CC3DML + PIFF) as the package's analytic Hamiltonian and initial state.

Supported: ``Potts`` (Dimensions, Steps, Temperature / global FluctuationAmplitude, NeighborOrder,
Boundary_x/y/z, RandomSeed, Flip2DimRatio, DebugOutputFrequency), ``CellType``, ``Contact`` (NeighborOrder,
no division) and ``Volume`` (per type or global), the ``PIFInitializer`` steppable; energy-free tracker
plugins (VolumeTracker, CenterOfMass, ...) are accepted and listed in ``info["ignored"]``. Everything else
that would change the energy or the dynamics (other plugins, other steppables, ``WeightEnergyByDistance``,
``Depth``, per-type fluctuation amplitudes, frozen types, hexagonal lattices, mixed boundary conditions) is
named in a :class:`~neuralcpm_plugin.errors.ModelImportError` — never dropped silently. Python scripts and
steppables of a ``.cc3d`` project are reported in ``info["python_scripts"]`` (they may do anything; the
import covers the CC3DML part).

Mapping (exact; see :mod:`cc3d_steppables.evaluator` for the CC3D formulas):

* CC3D Contact with NeighborOrder n sums J over the n-th order neighbours of the target site with no
  division = the package's ``ContactEnergy(J, order=n)`` (J per unordered pair, counted once).
* CC3D Volume λ(V − |V*|)² per cell = ``VolumeConstraint(λ, |V*|)``.
* Potts NeighborOrder → ``LatticeSpec.copy_order``; Temperature → ``Hamiltonian.temperature``;
  periodic boundaries on every axis → ``periodic=True`` (all NoFlux → False).
* Cell types are renumbered 0..T in TypeId order (Medium = 0); ``info["type_ids"]`` keeps CC3D's ids.
* One MCS in CC3D = Flip2DimRatio × lattice-size attempts: ``info["mcs_scale"]`` = Flip2DimRatio package
  MCS per CC3D step; ``info["mcs"]`` = Steps − 1 (no sweep at step 0).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from neuralcpm_plugin.errors import DataError, ModelImportError
from neuralcpm_plugin.lattice import CellState

from .evaluator import CC3DMLModel, parse_cc3d_project, parse_cc3dml

__all__ = ["ImportedModel", "load_model"]


@dataclass
class ImportedModel:
    """Result of :func:`load_model`."""

    hamiltonian: object  # neuralcpm_plugin.hamiltonian.Hamiltonian
    initial_state: CellState | None
    info: dict = field(default_factory=dict)

    @property
    def lattice(self):
        return self.hamiltonian.lattice

    @property
    def temperature(self) -> float:
        return self.hamiltonian.temperature


def _resolve(path: Path):
    """→ (CC3DML path, PIFF path or None, python scripts)."""
    if path.is_dir():
        cands = sorted(path.glob("*.cc3d"))
        if len(cands) != 1:
            raise ModelImportError(f"{path}: expected one .cc3d project file in the directory, found {len(cands)}")
        path = cands[0]
    if not path.exists():
        raise ModelImportError(f"{path}: file not found")
    if path.suffix.lower() == ".cc3d":
        proj = parse_cc3d_project(path)
        scripts = [str(p) for p in proj["python"] + proj["resources"]]
        return proj["xml"], proj["piff"], scripts
    return path, None, []


def load_model(path, *, learnable: bool = False, read_initial_state: bool = True) -> ImportedModel:
    """Read a CC3D model (``.cc3d`` project, its directory, or a CC3DML ``.xml``) → :class:`ImportedModel`.

    Parameters
    ----------
    path : the project file, its directory, or a CC3DML file.
    learnable : make the imported parameters learnable (e.g. as the analytic prior of a closure model).
    read_initial_state : read the PIFF named by the ``PIFInitializer`` (or the project's ``PIFFile``).

    Raises
    ------
    ModelImportError
        Unsupported elements (all of them named in one message), inconsistent or missing parts.
    """
    from neuralcpm_plugin.hamiltonian.analytic import ContactEnergy, VolumeConstraint
    from neuralcpm_plugin.hamiltonian.base import Hamiltonian, LatticeSpec

    path = Path(path)
    xml, proj_piff, scripts = _resolve(path)
    m: CC3DMLModel = parse_cc3dml(xml)
    problems = list(m.unsupported)
    if m.contact is not None and m.contact["weight_by_distance"]:
        problems.append("Contact/WeightEnergyByDistance (the package's contact energy has no distance weights)")
    axes = ["x", "y"] + (["z"] if m.dims[2] > 1 else [])
    kinds = {m.boundary[a] for a in axes}
    if len(kinds) > 1:
        problems.append(f"mixed boundary conditions {', '.join(f'{a}={m.boundary[a]}' for a in axes)} "
                        "(the package has one periodic flag for all axes)")
    if m.temperature <= 0:
        problems.append(f"Potts Temperature {m.temperature} (must be > 0; CC3D's default is 0)")
    if problems:
        raise ModelImportError(f"{xml}: cannot import, unsupported CC3D model parts: {'; '.join(problems)}")

    # types renumbered 0..T by TypeId
    ordered = sorted(m.type_ids.items(), key=lambda kv: kv[1])
    names = [n for n, _ in ordered]
    cc3d_ids = [t for _, t in ordered]
    remap = {t: i for i, t in enumerate(cc3d_ids)}
    n = len(names)
    copy_order = m.copy_order
    contact_order = m.contact["order"] if m.contact is not None else copy_order
    lattice = LatticeSpec(m.shape, periodic=(kinds == {"Periodic"}), copy_order=int(copy_order),
                          contact_order=int(contact_order))
    terms = []
    if m.contact is not None:
        J = np.zeros((n, n))
        for (a, b), v in m.contact["J"].items():
            J[remap[a], remap[b]] = J[remap[b], remap[a]] = v
        if J[0, 0] != 0:
            problems.append(f"Contact Medium-Medium = {J[0, 0]} (no effect in CC3D; set to 0)")
            J[0, 0] = 0.0
        terms.append(ContactEnergy(J, int(contact_order), learnable=learnable, periodic=lattice.periodic))
    if m.volume is not None:
        lam = np.zeros(n)
        tgt = np.zeros(n)
        for t, v in m.volume["lambda"].items():
            lam[remap[t]] = v
        for t, v in m.volume["target"].items():
            tgt[remap[t]] = v
        lam[0] = 0.0
        terms.append(VolumeConstraint(lam, tgt, learnable=learnable, periodic=lattice.periodic))
    if not terms:
        raise ModelImportError(f"{xml}: the model has neither a Contact nor a Volume plugin: nothing to import")
    names_pkg = ["medium"] + names[1:]
    ham = Hamiltonian(terms, lattice, float(m.temperature), names_pkg)

    state = None
    piff_path = None
    if m.piff is not None:
        # CC3D resolves PIFName against the simulation's base path (the .cc3d file's folder) and also
        # accepts paths relative to the CC3DML file; try both
        base = path.parent if path.suffix.lower() == ".cc3d" else Path(xml).parent
        for cand in (base / m.piff, Path(xml).parent / m.piff, Path(xml).parent / Path(m.piff).name):
            if cand.is_file():
                piff_path = cand
                break
    if m.piff is None and proj_piff is not None and Path(proj_piff).is_file():
        piff_path = Path(proj_piff)  # no PIFInitializer in the CC3DML: the project's PIFFile entry
    if read_initial_state and piff_path is not None:
        from neuralcpm_plugin.io.piff import read_piff
        tmap = {nm: remap[t] for nm, t in m.type_ids.items()}
        try:
            state = read_piff(piff_path, types=tmap, shape=m.shape)[0]
        except DataError as e:
            raise ModelImportError(f"{xml}: initial state {piff_path}: {e}") from None
    elif read_initial_state and m.piff is not None:
        raise ModelImportError(f"{xml}: PIFInitializer names {m.piff!r}, which does not exist")
    info = {"source": str(xml), "piff": None if piff_path is None else str(piff_path),
            "type_names_cc3d": names, "type_ids": dict(m.type_ids),
            "mcs": None if m.steps is None else max(0, m.steps - 1), "steps": m.steps, "seed": m.seed,
            "mcs_scale": m.flip2dim_ratio, "flip2dim_ratio": m.flip2dim_ratio,
            "ignored": list(m.ignored), "notes": problems, "python_scripts": scripts}
    return ImportedModel(ham, state, info)
