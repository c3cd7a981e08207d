"""An independent ΔH evaluator for a CompuCell3D project, computed from the project's FILES.

It parses the CC3DML text (``xml.etree``, not the exporter's objects) and applies CompuCell3D 4.8's own
formulas (read from its C++ source), then adds the Python energy term exactly as CC3D would run it: by
loading the project's copy of ``NeuralCPMSteppables.py`` with its ``neuralcpm_config.json`` and arrays.

CompuCell3D semantics implemented here (commit 808676d9, the 4.8.0 used for ``../shared/reference-data``):

* Copy attempt: the target ("change pixel") x takes the source's cell ``new``; ``old`` = x's cell.
  CC3D asks the energy functions only when ``new != old``.
* ``Contact`` (``ContactPlugin::changeEnergy``): over the neighbours n of x of the plugin's
  ``NeighborOrder`` (default 1; ``Depth`` is not supported here), outside-lattice neighbours skipped for
  non-periodic axes: ``ΔH = Σ_n [σ(n) ≠ new]·J(τ(new), τ(n)) − [σ(n) ≠ old]·J(τ(old), τ(n))``, each term
  divided by the neighbour's distance when ``WeightEnergyByDistance`` is present. J pairs not listed are 0;
  a later ``Energy`` element overwrites an earlier one for the same (unordered) pair.
* ``Volume`` (``VolumePlugin::changeEnergyByCellType`` / ``changeEnergyGlobal``), V = volume before the
  copy: ``λ_new (1 + 2 (V_new − |V*_new|)) + λ_old (1 − 2 (V_old − |V*_old|))`` (medium excluded; types
  without parameters have λ = 0).
* Neighbour order n = all offsets at the n smallest distinct non-zero distances of the lattice's own
  dimensionality (``BoundaryStrategy`` on a 2-D field for z = 1).
* Acceptance (``DefaultAcceptanceFunction``): 1 if ΔH ≤ 0, else exp(−ΔH/T).

Anything else that contributes energy (other plugins, ``VolumeEnergyExpression``, per-type
``FluctuationAmplitude``, hexagonal lattices, ...) is reported by :func:`parse_cc3dml` in ``unsupported``;
:class:`ProjectEvaluator` refuses such files.
"""

from __future__ import annotations

import importlib.util
import math
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from neuralcpm_plugin._xmlsafe import read_xml_bytes
from neuralcpm_plugin.errors import ModelImportError

from .cc3dml import cc3d_neighbour_offsets

__all__ = ["CC3DMLModel", "ProjectEvaluator", "parse_cc3d_project", "parse_cc3dml"]

# plugins that add no energy and change no dynamics (trackers): accepted and listed in ``ignored``
ENERGY_FREE_PLUGINS = {"VolumeTracker", "CenterOfMass", "NeighborTracker", "PixelTracker",
                       "BoundaryPixelTracker", "MomentOfInertia", "CellTypeMonitor"}
POTTS_KNOWN = {"Dimensions", "Steps", "Temperature", "NeighborOrder", "Boundary_x", "Boundary_y", "Boundary_z",
               "RandomSeed", "Flip2DimRatio", "DebugOutputFrequency", "LatticeType", "FluctuationAmplitude",
               "Anneal", "MetropolisAlgorithm", "AcceptanceFunctionName", "Offset", "KBoltzman"}


@dataclass
class CC3DMLModel:
    """What a CC3DML file says, in CC3D's terms (types by CC3D TypeId, coordinates x, y, z)."""

    path: Path
    dims: tuple[int, int, int]  # (x, y, z)
    steps: int | None
    temperature: float
    copy_order: int
    boundary: dict  # {"x": "Periodic"|"NoFlux", ...}
    seed: int | None
    flip2dim_ratio: float
    type_ids: dict  # name -> CC3D TypeId
    contact: dict | None = None  # {"J": {(ta, tb): value}, "order": n, "weight_by_distance": bool}
    volume: dict | None = None  # {"lambda": {type: λ}, "target": {type: V*}}
    piff: str | None = None
    other_steppables: list = field(default_factory=list)
    unsupported: list = field(default_factory=list)  # human-readable items that change the energy/dynamics
    ignored: list = field(default_factory=list)  # energy-free items accepted as they are

    @property
    def shape(self) -> tuple[int, ...]:
        """The package's array shape: (y, x) for z = 1, else (z, y, x)."""
        x, y, z = self.dims
        return (y, x) if z == 1 else (z, y, x)

    @property
    def periodic(self) -> bool:
        axes = ["x", "y"] + (["z"] if self.dims[2] > 1 else [])
        return all(self.boundary.get(a) == "Periodic" for a in axes)


def _num(el, what, path, conv=float):
    try:
        return conv(el.text.strip() if hasattr(el, "text") else el)
    except (AttributeError, TypeError, ValueError):
        txt = getattr(el, "text", el)
        raise ModelImportError(f"{path}: {what} must be a number, got {txt!r}") from None


def _read_root(path: Path, what: str):
    """The root element of a CC3D XML file, read with the package's size limit (``_xmlsafe.MAX_XML_BYTES``)."""
    data = read_xml_bytes(path, lambda msg: ModelImportError(f"{path}: {what}: {msg}"), gz=False)
    try:
        return ET.fromstring(data)
    except ET.ParseError as e:
        raise ModelImportError(f"{path}: {what}: not well-formed XML ({e})") from None


def parse_cc3dml(path) -> CC3DMLModel:
    """Parse a CC3DML file into a :class:`CC3DMLModel` (no package objects involved)."""
    path = Path(path)
    root = _read_root(path, "CC3DML")
    if root.tag != "CompuCell3D":
        raise ModelImportError(f"{path}: root element is <{root.tag}>, expected <CompuCell3D>")
    unsupported, ignored = [], []
    potts = root.find("Potts")
    if potts is None:
        raise ModelImportError(f"{path}: no <Potts> element")
    d = potts.find("Dimensions")
    if d is None:
        raise ModelImportError(f"{path}: Potts has no <Dimensions>")
    dims = tuple(_num(d.get(k, "1"), f"Potts/Dimensions {k}", path, int) for k in ("x", "y", "z"))
    for child in potts:
        if child.tag not in POTTS_KNOWN:
            unsupported.append(f"Potts/{child.tag}")
    temperature = 0.0  # CC3D's default
    fa = potts.find("FluctuationAmplitude")
    if fa is not None:
        if fa.find("FluctuationAmplitudeParameters") is not None:
            unsupported.append("Potts/FluctuationAmplitude per type (FluctuationAmplitudeParameters)")
        else:
            temperature = _num(fa, "Potts/FluctuationAmplitude", path)
    elif potts.find("Temperature") is not None:
        temperature = _num(potts.find("Temperature"), "Potts/Temperature", path)
    for tag, ok in (("LatticeType", {"square"}), ("AcceptanceFunctionName", {"default"}),
                    ("MetropolisAlgorithm", {"fast", "default"})):
        el = potts.find(tag)
        if el is not None and (el.text or "").strip().lower() not in ok:
            unsupported.append(f"Potts/{tag} = {el.text.strip()!r}")
    for tag, default in (("Offset", 0.0), ("KBoltzman", 1.0), ("Anneal", 0.0)):
        el = potts.find(tag)
        if el is not None and _num(el, f"Potts/{tag}", path) != default:
            unsupported.append(f"Potts/{tag} = {el.text.strip()}")
    steps = _num(potts.find("Steps"), "Potts/Steps", path, int) if potts.find("Steps") is not None else None
    order = _num(potts.find("NeighborOrder"), "Potts/NeighborOrder", path, int) \
        if potts.find("NeighborOrder") is not None else 1
    seed = _num(potts.find("RandomSeed"), "Potts/RandomSeed", path, int) \
        if potts.find("RandomSeed") is not None else None
    f2d = _num(potts.find("Flip2DimRatio"), "Potts/Flip2DimRatio", path) \
        if potts.find("Flip2DimRatio") is not None else 1.0
    boundary = {}
    for ax in ("x", "y", "z"):
        el = potts.find(f"Boundary_{ax}")
        val = (el.text or "").strip() if el is not None else "NoFlux"
        if val not in ("Periodic", "NoFlux"):
            raise ModelImportError(f"{path}: Potts/Boundary_{ax} = {val!r} (CC3D knows 'Periodic' and 'NoFlux')")
        boundary[ax] = val

    type_ids: dict = {}
    contact = volume = None
    for el in root:
        if el.tag in ("Potts", "Metadata"):
            continue
        if el.tag == "Plugin":
            name = el.get("Name", "")
            if name == "CellType":
                for ct in el.findall("CellType"):
                    tname, tid = ct.get("TypeName"), ct.get("TypeId")
                    if tname is None or tid is None:
                        raise ModelImportError(f"{path}: CellType entry without TypeName/TypeId: {ct.attrib}")
                    type_ids[tname] = _num(tid, f"TypeId of {tname}", path, int)
                    if ct.get("Freeze") is not None:
                        unsupported.append(f"CellType {tname} Freeze")
            elif name == "Contact":
                contact = _parse_contact(el, path, unsupported)
            elif name == "Volume":
                volume = _parse_volume(el, path, unsupported)
            elif name in ENERGY_FREE_PLUGINS:
                ignored.append(f"Plugin {name}")
            else:
                unsupported.append(f"Plugin {name}")
        elif el.tag == "Steppable":
            st = el.get("Type", "")
            if st == "PIFInitializer":
                continue
            unsupported.append(f"Steppable {st}")
        else:
            unsupported.append(f"<{el.tag}>")
    if not type_ids:
        raise ModelImportError(f"{path}: no CellType plugin (cell types are required)")
    if type_ids.get("Medium", 0) != 0 or 0 not in type_ids.values():
        raise ModelImportError(f"{path}: the CellType plugin must define Medium with TypeId 0, got {type_ids}")
    # resolve type names in contact/volume
    def tid(name, where):
        if name not in type_ids:
            raise ModelImportError(f"{path}: {where} names cell type {name!r}, which the CellType plugin does not "
                                   f"define ({', '.join(type_ids)})")
        return type_ids[name]
    if contact is not None:
        contact["J"] = {tuple(sorted((tid(a, "Contact/Energy"), tid(b, "Contact/Energy")))): v
                        for (a, b), v in contact.pop("J_names").items()}
    if volume is not None and "by_name" in volume:
        by = volume.pop("by_name")
        volume["lambda"] = {tid(n, "Volume"): lv for n, (lv, tv) in by.items()}
        volume["target"] = {tid(n, "Volume"): tv for n, (lv, tv) in by.items()}
    elif volume is not None and "global" in volume:
        lv, tv = volume.pop("global")
        volume["lambda"] = {t: lv for t in type_ids.values() if t != 0}
        volume["target"] = {t: tv for t in type_ids.values() if t != 0}
    piff = None
    for st in root.findall("Steppable"):
        if st.get("Type") == "PIFInitializer":
            pn = st.find("PIFName")
            if pn is None or not (pn.text or "").strip():
                raise ModelImportError(f"{path}: PIFInitializer without PIFName")
            piff = pn.text.strip()
    return CC3DMLModel(path, dims, steps, float(temperature), int(order), boundary, seed, float(f2d), type_ids,
                       contact, volume, piff, [], unsupported, ignored)


def _parse_contact(el, path, unsupported) -> dict:
    J = {}
    for e in el.findall("Energy"):
        a, b = e.get("Type1"), e.get("Type2")
        if a is None or b is None:
            raise ModelImportError(f"{path}: Contact/Energy without Type1/Type2: {e.attrib}")
        J[(a, b)] = _num(e, f"Contact energy {a}-{b}", path)
        J.pop((b, a), None) if (b, a) != (a, b) else None  # a later entry overwrites the pair
    order = 1
    if el.find("Depth") is not None:
        unsupported.append("Contact/Depth (use NeighborOrder)")
    if el.find("NeighborOrder") is not None:
        order = _num(el.find("NeighborOrder"), "Contact/NeighborOrder", path, int)
    known = {"Energy", "NeighborOrder", "Depth", "WeightEnergyByDistance"}
    for c in el:
        if c.tag not in known:
            unsupported.append(f"Contact/{c.tag}")
    return {"J_names": J, "order": int(order), "weight_by_distance": el.find("WeightEnergyByDistance") is not None}


def _parse_volume(el, path, unsupported) -> dict:
    if el.find("VolumeEnergyExpression") is not None:
        unsupported.append("Volume/VolumeEnergyExpression")
    params = el.findall("VolumeEnergyParameters")
    if params:
        by = {}
        for p in params:
            n = p.get("CellType")
            try:
                by[n] = (float(p.get("LambdaVolume")), abs(float(p.get("TargetVolume"))))
            except (TypeError, ValueError):
                raise ModelImportError(f"{path}: Volume parameters of {n!r} are not numbers: {p.attrib}") from None
        return {"by_name": by}
    if el.find("TargetVolume") is not None:
        return {"global": (_num(el.find("LambdaVolume"), "Volume/LambdaVolume", path),
                           _num(el.find("TargetVolume"), "Volume/TargetVolume", path))}
    unsupported.append("Volume without parameters (per-cell volume parameters set from Python)")
    return {"lambda": {}, "target": {}}


def parse_cc3d_project(path) -> dict:
    """Read a ``.cc3d`` project file → {"xml": Path, "python": [Path], "resources": [Path], "piff": Path|None}."""
    path = Path(path)
    root = _read_root(path, "the CC3D project file")
    base = path.parent
    xml = root.find("XMLScript")
    out = {"xml": None if xml is None else base / xml.text.strip(),
           "python": [base / e.text.strip() for e in root.findall("PythonScript")],
           "resources": [base / e.text.strip() for e in root.findall("Resource")],
           "piff": None if root.find("PIFFile") is None else base / root.find("PIFFile").text.strip()}
    if out["xml"] is None:
        raise ModelImportError(f"{path}: the project has no XMLScript (CC3DML)")
    return out


def _load_project_steppables(sim_dir: Path):
    """Import the project's own copy of NeuralCPMSteppables.py (the file CC3D would run)."""
    f = sim_dir / "NeuralCPMSteppables.py"
    name = f"_neuralcpm_project_steppables_{abs(hash(str(f.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, f)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


class ProjectEvaluator:
    """ΔH of copy attempts under a CC3D project, from its files' text.

    ``path``: the ``.cc3d`` file, the project directory, or a CC3DML file. Use :meth:`delta` with a state
    (ids ``[y, x]`` + per-id types, the package's orientation) and a copy attempt (``site`` = target,
    ``new_id`` = the source's cell). :meth:`parts` gives the per-plugin contributions.
    """

    def __init__(self, path):
        path = Path(path)
        if path.is_dir():
            cands = sorted(path.glob("*.cc3d"))
            if len(cands) != 1:
                raise ModelImportError(f"{path}: expected one .cc3d file, found {len(cands)}")
            path = cands[0]
        if path.suffix == ".cc3d":
            proj = parse_cc3d_project(path)
            xml = proj["xml"]
        else:
            xml = path
        self.model = parse_cc3dml(xml)
        if self.model.unsupported:
            raise ModelImportError(f"{xml}: cannot evaluate, unsupported: {', '.join(self.model.unsupported)}")
        m = self.model
        self.ndim = 2 if m.dims[2] == 1 else 3
        self.shape = m.shape
        self.temperature = m.temperature
        ntab = max(m.type_ids.values()) + 1
        self.J = np.zeros((ntab, ntab))
        self.contact_order = None
        if m.contact is not None:
            for (a, b), v in m.contact["J"].items():
                self.J[a, b] = self.J[b, a] = v
            self.contact_order = m.contact["order"]
            self.weight_by_distance = m.contact["weight_by_distance"]
            self._offs = cc3d_neighbour_offsets(self.contact_order, self.ndim)
        self.lam = np.zeros(ntab)
        self.target = np.zeros(ntab)
        if m.volume is not None:
            for t, v in m.volume["lambda"].items():
                self.lam[t] = v
            for t, v in m.volume["target"].items():
                self.target[t] = abs(v)
        axes = ["z", "y", "x"][-self.ndim:]
        self.periodic_axes = [m.boundary[a] == "Periodic" for a in axes]
        # the Python energy term, as CC3D would load it
        sim_dir = Path(xml).parent
        self.python = None
        self._stp = None
        if (sim_dir / "neuralcpm_config.json").is_file() and (sim_dir / "NeuralCPMSteppables.py").is_file():
            self._stp = _load_project_steppables(sim_dir)
            self._cfg = self._stp.load_config(sim_dir)
            if self._cfg.get("python_terms") or self._cfg.get("forbid_deletion_python"):
                self.python = sim_dir

    # ---- CC3D formulas ------------------------------------------------------------------------------------
    def _neighbours(self, site):
        for off in self._offs:
            q = []
            for c, o, n, per in zip(site, off, self.shape, self.periodic_axes):
                v = int(c) + int(o)
                if per:
                    v %= n
                elif v < 0 or v >= n:
                    q = None
                    break
                q.append(v)
            if q is not None:
                yield tuple(q), math.sqrt(sum(int(o) ** 2 for o in off))

    def contact_delta(self, ids, types, site, new_id) -> float:
        if self.contact_order is None:
            return 0.0
        old = int(ids[site])
        t_new, t_old = int(types[new_id]), int(types[old])
        e = 0.0
        for q, dist in self._neighbours(site):
            n = int(ids[q])
            w = dist if self.weight_by_distance else 1.0
            tn = int(types[n])
            if n != old:
                e -= self.J[t_old, tn] / w
            if n != new_id:
                e += self.J[t_new, tn] / w
        return e

    def volume_delta(self, ids, types, site, new_id, volumes=None) -> float:
        old = int(ids[site])
        if old == new_id:
            return 0.0
        vol = np.bincount(np.asarray(ids).ravel(), minlength=len(types)) if volumes is None else volumes
        e = 0.0
        if new_id != 0:
            t = int(types[new_id])
            e += self.lam[t] * (1 + 2 * (float(vol[new_id]) - self.target[t]))
        if old != 0:
            t = int(types[old])
            e += self.lam[t] * (1 - 2 * (float(vol[old]) - self.target[t]))
        return e

    def python_delta(self, ids, types, site, new_id) -> float:
        if self.python is None:
            return 0.0
        mirror = self._stp.LatticeMirror(ids, types)
        energy = self._stp.load_python_energy(self.python, mirror, self._cfg)
        return float(energy.delta(tuple(site), int(new_id)))

    def parts(self, ids, types, site, new_id) -> dict:
        """{"contact", "volume", "python"} contributions to ΔH (0 each when the cells are the same)."""
        ids = np.asarray(ids)
        types = np.asarray(types)
        site = tuple(int(s) for s in site)
        new_id = int(new_id)
        if int(ids[site]) == new_id:
            return {"contact": 0.0, "volume": 0.0, "python": 0.0}
        return {"contact": self.contact_delta(ids, types, site, new_id),
                "volume": self.volume_delta(ids, types, site, new_id),
                "python": self.python_delta(ids, types, site, new_id)}

    def delta(self, ids, types, site, new_id) -> float:
        """Total ΔH that CC3D computes for copying ``new_id`` into ``site`` (array order)."""
        return float(sum(self.parts(ids, types, site, new_id).values()))

    def acceptance(self, dH: float) -> float:
        """CC3D's default acceptance probability at the CC3DML temperature."""
        if self.temperature <= 0:
            return 0.0 if dH > 0 else (0.5 if dH == 0 else 1.0)
        return 1.0 if dH <= 0 else math.exp(-dH / self.temperature)
