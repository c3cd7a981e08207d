"""Code that runs INSIDE CompuCell3D (4.8): the Python energy term, the lattice mirror and the snapshot writer.

This file is copied verbatim into every exported project (as ``Simulation/NeuralCPMSteppables.py``), so it
depends on nothing but the standard library and numpy; ``cc3d`` is imported only here, and only when CC3D
runs it (importing this module without cc3d gives the pure-numpy part: :class:`LatticeMirror`,
:class:`PythonEnergy`, :func:`load_python_energy`, used by the exporter's tests and the file-based evaluator).

How the exported model splits its Hamiltonian
---------------------------------------------
Contact and Volume run in CC3D's C++ plugins (declared in the CC3DML). Every other term (per-site external
potential, directed motion, local neural Hamiltonian, the field approximation of a global neural
Hamiltonian) is evaluated here, once per copy attempt, through ``CompuCell.EnergyFunctionPyWrapper``:

* CC3D calls ``changeEnergy()`` (no arguments) only when the two sites belong to different cells; the
  wrapper gives ``getChangePoint()`` (the target site, the one overwritten), ``getFlipNeighbor()`` (the
  source site), ``getNewCell()`` (the source cell, ``None`` = medium) and ``getOldCell()``.
* ``ChangeWatcherPyWrapper.field3DChange()`` fires after every accepted copy; it keeps a numpy copy of the
  lattice (:class:`LatticeMirror`: ids indexed ``[y, x]`` like the package, types, volumes), which the
  numpy evaluators read.
* Local / pooled neural terms use the compiled evaluator (``neuralcpm_local_nh_numba.py``, numba, exact
  float64, per-lattice caches kept up to date by the change watcher: :meth:`PythonEnergy.accept` runs before
  the mirror is written) when ``numba`` imports in CC3D's Python; otherwise the numpy evaluators (about
  50–100× slower per call; add numba with ``conda install numba`` or ``pip install numba`` in CC3D's
  environment).  BLAS is limited to one thread: the project's main script sets ``OPENBLAS_NUM_THREADS`` etc.
  to 1 before CC3D imports numpy, and :func:`limit_blas_threads` (threadpoolctl, when importable) does it
  at ``start``: the numpy evaluators' matrices are tiny and OpenBLAS threads make them ≈ 8× slower.
* An exception inside a CC3D callback would kill CC3D: every callback is guarded. The first error is
  written to ``neuralcpm_error.txt`` in the output folder, the attempt is refused (ΔH = +inf), and the next
  ``step`` stops the run with a ``RuntimeError`` naming the error.

Conventions are the package's: ΔH of "copy cell ``new_id`` into ``site``", ``site`` a tuple in array order
(``(y, x)`` in 2-D, ``(z, y, x)`` in 3-D), energies in the bundle's physical units (scale included).
A copy that would delete a cell (volume 1 → 0) gets ΔH = +inf when ``forbid_deletion`` is set (the package's
samplers refuse such copies).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import traceback

import numpy as np

try:  # only inside CompuCell3D
    from cc3d.core.PySteppables import SteppableBasePy as _SteppableBase
    HAVE_CC3D = True
except Exception:  # the package's own tests run without cc3d  # noqa: BLE001
    class _SteppableBase:
        """Stand-in for ``SteppableBasePy`` so that this module imports (and is testable) without cc3d."""

        def __init__(self, frequency=1):
            self.frequency = frequency

    HAVE_CC3D = False

CONFIG_NAME = "neuralcpm_config.json"
ARRAYS_NAME = "neuralcpm_arrays.npz"
CONFIG_FORMAT = "neuralcpm-cc3d-project"
CONFIG_VERSION = 1

__all__ = [
    "HAVE_CC3D",
    "PY_TERM_KINDS",
    "LatticeMirror",
    "NeuralCPMEnergySteppable",
    "PythonEnergy",
    "SnapshotSteppable",
    "load_config",
    "load_python_energy",
]


_BLAS_LIMIT = None


def limit_blas_threads(n: int = 1):
    """Limit BLAS / OpenMP thread pools of this process to ``n`` threads (threadpoolctl, when importable;
    otherwise only the environment variables set before numpy's import act).  Returns the limiter or None."""
    global _BLAS_LIMIT
    try:
        from threadpoolctl import threadpool_limits
        _BLAS_LIMIT = threadpool_limits(limits=int(n))
    except Exception:  # noqa: BLE001
        _BLAS_LIMIT = None
    return _BLAS_LIMIT


# ------------------------------------------------------------------------------------------------------------
# lattice mirror
# ------------------------------------------------------------------------------------------------------------
class LatticeMirror:
    """A numpy copy of CC3D's cell field.

    ids : int64 array, shape ``(H, W)`` (or ``(D, H, W)``), indexed like the package (``[y, x]``); 0 = medium.
    types : int64 array indexed by id (grows when new ids appear); ``types[0] = 0``.
    volumes : int64 array indexed by id (entry 0 = medium sites).
    """

    def __init__(self, ids, types):
        self.ids = np.array(ids, dtype=np.int64)
        n = max(int(self.ids.max()) + 1, len(types))
        self.types = np.zeros(n, dtype=np.int64)
        self.types[: len(types)] = np.asarray(types, dtype=np.int64)
        self.volumes = np.bincount(self.ids.ravel(), minlength=n).astype(np.int64)
        self.version = 0  # incremented on every change (for caches)
        self._sites = None  # cell -> set of flat site indices (built on first use)
        self._cell_ver = {}

    def _build_sites(self):
        self._sites = {}
        flat = self.ids.ravel()
        order = np.argsort(flat, kind="stable")
        bounds = np.searchsorted(flat[order], np.arange(len(self.types) + 1))
        for c in np.unique(flat):
            c = int(c)
            if c != 0:
                self._sites[c] = set(order[bounds[c]:bounds[c + 1]].tolist())

    def cell_sites(self, cid: int) -> set:
        """Flat (row-major) indices of the sites of cell ``cid`` (kept incrementally after the first call)."""
        if self._sites is None:
            self._build_sites()
        return self._sites.get(int(cid), set())

    def cell_version(self, cid: int) -> int:
        """A counter that changes whenever cell ``cid`` gains or loses a site."""
        return self._cell_ver.get(int(cid), 0)

    @property
    def shape(self):
        return self.ids.shape

    def ensure_id(self, cid: int, ctype: int) -> None:
        """Make room for id ``cid`` (type ``ctype``) in the per-id tables."""
        cid = int(cid)
        if cid >= len(self.types):
            n = max(cid + 1, 2 * len(self.types))
            t = np.zeros(n, np.int64)
            t[: len(self.types)] = self.types
            v = np.zeros(n, np.int64)
            v[: len(self.volumes)] = self.volumes
            self.types, self.volumes = t, v
        if cid != 0:
            self.types[cid] = int(ctype)

    def set_site(self, site, new_id: int, new_type: int | None = None) -> None:
        """Record that ``site`` now belongs to ``new_id``."""
        new_id = int(new_id)
        if new_type is not None or new_id >= len(self.types):
            self.ensure_id(new_id, 0 if new_type is None else new_type)
        old = int(self.ids[site])
        if old == new_id:
            return
        self.ids[site] = new_id
        self.volumes[old] -= 1
        self.volumes[new_id] += 1
        self.version += 1
        self._cell_ver[old] = self._cell_ver.get(old, 0) + 1
        self._cell_ver[new_id] = self._cell_ver.get(new_id, 0) + 1
        if self._sites is not None:
            f = int(np.ravel_multi_index(tuple(int(c) for c in site), self.ids.shape))
            if old != 0:
                self._sites.get(old, set()).discard(f)
            if new_id != 0:
                self._sites.setdefault(new_id, set()).add(f)

    def type_of(self, cid: int) -> int:
        return int(self.types[cid]) if cid < len(self.types) else 0


# ------------------------------------------------------------------------------------------------------------
# numpy evaluators of the terms CC3D has no plugin for
# ------------------------------------------------------------------------------------------------------------
def _wrap(site, shape, periodic):
    return tuple(int(s) % n for s, n in zip(site, shape)) if periodic else tuple(int(s) for s in site)


class ExternalTerm:
    """H = Σ_i μ(τ(σ_i)) φ(i): ΔH = (μ[τ(new)] − μ[τ(old)]) · φ(site). ``mu`` includes the term's scale."""

    kind = "external"

    def __init__(self, mu, field):
        self.mu = np.asarray(mu, dtype=np.float64)
        self.field = np.asarray(field, dtype=np.float64)

    def delta(self, m: LatticeMirror, site, new_id: int) -> float:
        old = int(m.ids[site])
        mu_new = self.mu[m.type_of(new_id)] if m.type_of(new_id) < len(self.mu) else 0.0
        mu_old = self.mu[m.type_of(old)] if m.type_of(old) < len(self.mu) else 0.0
        return float((mu_new - mu_old) * self.field[site])


class TypeFieldTerm:
    """Per-type potential fields (the approximation of a global neural Hamiltonian).

    ``phi`` has shape ``(T + 1, *lattice)``; ΔH(copy ``new`` into ``x``) ≈ φ[τ(new), x] − φ[τ(old), x].
    The fields are recomputed from the network every ``recompute_every`` MCS when the package (with torch)
    can be imported inside CC3D; otherwise they stay as exported (see the export's printed error figures).
    """

    kind = "type_fields"

    def __init__(self, phi):
        self.phi = np.asarray(phi, dtype=np.float64)

    def delta(self, m: LatticeMirror, site, new_id: int) -> float:
        old = int(m.ids[site])
        idx_new = (m.type_of(new_id),) + tuple(site)
        idx_old = (m.type_of(old),) + tuple(site)
        return float(self.phi[idx_new] - self.phi[idx_old])


class DirectedMotionTerm:
    """Morpheus ``DirectedMotion`` with the package's conventions (``hamiltonian.analytic.DirectedMotion``).

    For the gaining cell a and the losing cell b of a copy into site x (medium, type-0 cells, types without a
    direction or with zero strength skipped): ΔH_c = − s_τ(c) · V(c) · ((C_after − C_before) · d̂_c), V the
    volume before the copy, C the centre of mass: C_after − C_before = (x − C)/(V + 1) for the gaining cell and
    (C − x)/(V − 1) for the losing one (0 when V = 1). Periodic centres: the cell's sites are unwrapped to the
    image nearest the cell's reference site (its smallest row-major flat index); x likewise. d̂ per type:
    ``{"mode": "constant", "vector": [dy, dx]}`` (normalised) or ``{"mode": "band", "axis": a, "lo", "hi",
    "sense"}`` with p = C[a] mod L: "inward" = sign(L/2 − p)·[p < lo·L or p > hi·L], "outward" =
    sign(p − L/2)·[lo·L < p < hi·L] along array axis a. ``strength`` includes the term's scale.

    Centres are kept per cell from a per-cell set of sites maintained by the mirror (recomputed only for
    cells that changed), so one evaluation costs O(volume) at most.
    """

    kind = "directed_motion"

    def __init__(self, strength, direction, shape, periodic=True):
        self.strength = np.asarray(strength, dtype=np.float64)
        self.direction = list(direction)
        self.shape = tuple(int(s) for s in shape)
        self.L = np.asarray(self.shape, dtype=np.float64)
        self.periodic = bool(periodic)
        self._cache = {}  # cell -> (cell version, ref, centre)

    def _centre(self, m: LatticeMirror, cell: int):
        sites = m.cell_sites(cell)
        ver = m.cell_version(cell)
        hit = self._cache.get(cell)
        if hit is not None and hit[0] == ver:
            return hit[1], hit[2]
        if not sites:
            self._cache[cell] = (ver, None, None)
            return None, None
        flat = np.fromiter(sites, dtype=np.int64, count=len(sites))
        pos = np.stack(np.unravel_index(flat, self.shape), -1).astype(np.float64)
        ref = pos[int(np.argmin(flat))].copy()
        if self.periodic:
            pos = pos - self.L * np.round((pos - ref) / self.L)
        c = pos.sum(0) / len(pos)
        self._cache[cell] = (ver, ref, c)
        return ref, c

    def _dhat(self, t: int, c):
        d = self.direction[t] if t < len(self.direction) else None
        if d is None or d.get("mode") == "none":
            return None
        if d["mode"] == "constant":
            v = np.asarray(d["vector"], dtype=np.float64)
            nv = np.linalg.norm(v)
            return v / nv if nv > 0 else v
        a = int(d["axis"])
        L = float(self.shape[a])
        p = c[a] % L
        out = np.zeros(len(self.shape))
        if d["sense"] == "inward":
            on = (p < d["lo"] * L) or (p > d["hi"] * L)
            out[a] = np.sign(L / 2 - p) * on
        else:
            on = (p > d["lo"] * L) and (p < d["hi"] * L)
            out[a] = np.sign(p - L / 2) * on
        return out

    def delta(self, m: LatticeMirror, site, new_id: int) -> float:
        old = int(m.ids[site])
        x = np.asarray(site, dtype=np.float64)
        total = 0.0
        for cell, gain in ((int(new_id), True), (old, False)):
            if cell == 0:
                continue
            t = m.type_of(cell)
            s = self.strength[t] if t < len(self.strength) else 0.0
            if t == 0 or s == 0.0:
                continue
            v = float(m.volumes[cell])
            if not gain and v <= 1:
                continue
            ref, c = self._centre(m, cell)
            if c is None:
                continue
            dh = self._dhat(t, c)
            if dh is None:
                continue
            xi = x - self.L * np.round((x - ref) / self.L) if self.periodic else x
            disp = (xi - c) / (v + 1.0) if gain else (c - xi) / (v - 1.0)
            total += -s * v * float(disp @ dh)
        return float(total)


class LocalNHTerm:
    """A local (or pooled) neural Hamiltonian evaluated by the package's numpy-only or compiled evaluator.

    ``evaluator`` is any object with ``delta(ids, types, site, new_id) -> float`` (numpy arrays in, ΔH out,
    scale included).  A compiled evaluator (``LocalNHCompiled`` / ``PooledNHCompiled``) also has ``bind`` and
    ``accept``: its caches are rebuilt when the mirror changed other than through :meth:`accept` (checked
    with the mirror's version counter).
    """

    kind = "local_nh"

    def __init__(self, evaluator, kind: str = "local_nh"):
        self.evaluator = evaluator
        self.kind = kind
        self.compiled = hasattr(evaluator, "accept") and hasattr(evaluator, "bind")
        self._version = None

    def _sync(self, m: LatticeMirror):
        if self._version != m.version:
            self.evaluator.bind(m.ids, m.types)
            self._version = m.version

    def delta(self, m: LatticeMirror, site, new_id: int) -> float:
        if self.compiled:
            self._sync(m)
        return float(self.evaluator.delta(m.ids, m.types, tuple(site), int(new_id)))

    def accept(self, m: LatticeMirror, site, new_id: int) -> None:
        """Called for an accepted copy before the mirror records it."""
        if not self.compiled or int(m.ids[site]) == int(new_id):
            return
        self._sync(m)
        self.evaluator.accept(tuple(site), int(new_id))
        self._version = m.version + 1  # the mirror's set_site increments it once


PY_TERM_KINDS = {"external": ExternalTerm, "type_fields": TypeFieldTerm, "directed_motion": DirectedMotionTerm,
                 "local_nh": LocalNHTerm, "pooled_nh": LocalNHTerm}


class PythonEnergy:
    """Sum of the Python-side terms over a :class:`LatticeMirror`; ``delta(site, new_id)`` → ΔH (float)."""

    def __init__(self, terms, mirror: LatticeMirror | None = None, *, forbid_deletion: bool = True):
        self.terms = list(terms)
        self.mirror = mirror
        self.forbid_deletion = bool(forbid_deletion)

    def delta(self, site, new_id: int) -> float:
        m = self.mirror
        old = int(m.ids[site])
        new_id = int(new_id)
        if old == new_id:
            return 0.0
        if self.forbid_deletion and old != 0 and m.volumes[old] <= 1:
            return math.inf
        return float(sum(t.delta(m, site, new_id) for t in self.terms))

    def prepare(self) -> None:
        """Bind the compiled neural terms to the mirror (their caches) and load their compiled ΔH (numba's disk
        cache, or a compilation on the first run) now, not at the first copy attempt.  Changes nothing."""
        m = self.mirror
        site = (0,) * m.ids.ndim
        for t in self.terms:
            if getattr(t, "compiled", False):
                t.delta(m, site, int(m.ids[site]))  # a no-op copy (same cell): ΔH 0

    def accept(self, site, new_id: int) -> None:
        """Tell the terms with caches about an accepted copy (call before ``mirror.set_site``)."""
        for t in self.terms:
            acc = getattr(t, "accept", None)
            if acc is not None:
                acc(self.mirror, site, new_id)

    @property
    def compiled(self) -> list:
        """Kinds of the terms that run through a compiled evaluator."""
        return [t.kind for t in self.terms if getattr(t, "compiled", False)]


def load_config(sim_dir) -> dict:
    """Read ``neuralcpm_config.json`` of an exported project's ``Simulation`` folder."""
    path = os.path.join(str(sim_dir), CONFIG_NAME)
    with open(path) as f:
        cfg = json.load(f)
    if cfg.get("format") != CONFIG_FORMAT or int(cfg.get("version", 0)) != CONFIG_VERSION:
        raise ValueError(f"{path}: not a NeuralCPM CC3D project configuration (version {CONFIG_VERSION})")
    return cfg


_VENDOR = "_neuralcpm_vendor"


def _vendor_module(sim_dir, module_file: str, as_name: str | None = None):
    """Import a numpy evaluator module shipped in the project (a copy of a package module) without the package:
    it is loaded as ``_neuralcpm_vendor.hamiltonian.<name>`` with a minimal ``_neuralcpm_vendor.errors``, so
    its relative imports of the package's error types resolve (torch-dependent parts stay disabled)."""
    import importlib.util
    import types as _types
    if _VENDOR not in sys.modules:
        root = _types.ModuleType(_VENDOR)
        root.__path__ = []
        errs = _types.ModuleType(_VENDOR + ".errors")

        class NeuralCPMError(Exception):
            pass

        class BundleError(NeuralCPMError, ValueError):
            pass

        class ConfigError(NeuralCPMError, ValueError):
            pass

        class DataError(NeuralCPMError, ValueError):
            pass

        for c in (NeuralCPMError, BundleError, ConfigError, DataError):
            setattr(errs, c.__name__, c)
        ham = _types.ModuleType(_VENDOR + ".hamiltonian")
        ham.__path__ = []
        sys.modules[_VENDOR] = root
        sys.modules[_VENDOR + ".errors"] = errs
        sys.modules[_VENDOR + ".hamiltonian"] = ham
    path = os.path.join(str(sim_dir), module_file)
    name = f"{_VENDOR}.hamiltonian.{as_name or os.path.splitext(os.path.basename(path))[0]}"
    mod = sys.modules.get(name)
    if mod is None or getattr(mod, "__file__", None) != path:
        mspec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(mspec)
        sys.modules[name] = mod
        mspec.loader.exec_module(mod)
    return mod


def _load_local_nh_evaluator(sim_dir, spec, arrays, compiled=None):
    """Build the evaluator of a local / pooled NH term from the module files shipped in the project: the
    compiled one when the spec names a ``compiled_module`` and numba imports (``compiled`` None = when
    possible, True = required, False = numpy only), else the numpy one."""
    for name, file in (spec.get("requires") or {}).items():  # e.g. the pooled term's local_nh.py
        _vendor_module(sim_dir, file, as_name=name)
    mod = _vendor_module(sim_dir, spec["module_file"], as_name=spec.get("module_name"))
    factory = getattr(mod, spec["factory"])
    weights = {k[len(spec["prefix"]):]: arrays[k] for k in arrays.files if k.startswith(spec["prefix"])}
    ev = factory(spec["config"], weights, float(spec.get("scale", 1.0)))
    cfile = spec.get("compiled_module")
    if compiled is False or not cfile:
        if compiled:
            raise ValueError(f"{sim_dir}: the {spec['kind']} term has no compiled evaluator in this project")
        return ev
    try:
        import numba  # noqa: F401
    except Exception:
        if compiled:
            raise
        sys.stderr.write(f"NeuralCPM: numba is not importable here: the {spec['kind']} term runs on the numpy "
                         "evaluator (slow). Add numba to this Python (conda install numba / pip install numba).\n")
        return ev
    return getattr(_compiled_module(sim_dir, cfile), spec["compiled_factory"])(ev)


def _compiled_module(sim_dir, cfile):
    """The project's compiled evaluator module; the package's own copy when it is importable and identical
    (so that numba's compilation cache is shared between projects)."""
    path = os.path.join(str(sim_dir), cfile)
    try:
        from neuralcpm_plugin.hamiltonian import _local_nh_numba as pk
        with open(pk.__file__, "rb") as a, open(path, "rb") as b:
            if a.read() == b.read():
                return pk
    except Exception:  # noqa: BLE001, S110 - no package here: the project's copy
        pass
    return _vendor_module(sim_dir, cfile, as_name="_local_nh_numba")


def load_python_energy(sim_dir, mirror: LatticeMirror | None = None, cfg: dict | None = None,
                       compiled: bool | None = None) -> PythonEnergy:
    """Build the :class:`PythonEnergy` described by an exported project's configuration and arrays.

    ``compiled``: neural terms on the compiled evaluator when numba imports (None, default), always (True:
    an error without numba) or never (False: the numpy evaluators)."""
    cfg = load_config(sim_dir) if cfg is None else cfg
    arrays_path = os.path.join(str(sim_dir), ARRAYS_NAME)
    arrays = np.load(arrays_path, allow_pickle=False) if os.path.exists(arrays_path) else None
    shape = tuple(cfg["shape"])
    periodic = bool(cfg.get("periodic", True))
    terms = []
    for spec in cfg.get("python_terms", []):
        kind = spec["kind"]
        if kind == "external":
            terms.append(ExternalTerm(spec["mu"], arrays[spec["field"]]))
        elif kind == "type_fields":
            terms.append(TypeFieldTerm(arrays[spec["phi"]]))
        elif kind == "directed_motion":
            terms.append(DirectedMotionTerm(spec["strength"], spec["direction"], shape, periodic))
        elif kind in ("local_nh", "pooled_nh"):
            terms.append(LocalNHTerm(_load_local_nh_evaluator(sim_dir, spec, arrays, compiled), kind))
        else:
            raise ValueError(f"{sim_dir}/{CONFIG_NAME}: unknown Python term kind {kind!r}")
    return PythonEnergy(terms, mirror, forbid_deletion=bool(cfg.get("forbid_deletion", True)))


# ------------------------------------------------------------------------------------------------------------
# CompuCell3D side
# ------------------------------------------------------------------------------------------------------------
def _sim_dir() -> str:
    return os.path.dirname(os.path.abspath(__file__))


def _read_cell_field(cell_field, dim, ndim):
    """(ids [y, x] or [z, y, x], types per id) from CC3D's cell field."""
    nx, ny, nz = int(dim.x), int(dim.y), int(dim.z)
    ids = np.zeros((nz, ny, nx), dtype=np.int64)
    tmap = {0: 0}
    for z in range(nz):
        for y in range(ny):
            for x in range(nx):
                c = cell_field[x, y, z]
                if c is not None:
                    ids[z, y, x] = c.id
                    tmap[int(c.id)] = int(c.type)
    types = np.zeros(max(tmap) + 1, dtype=np.int64)
    for k, v in tmap.items():
        types[k] = v
    return (ids[0] if ndim == 2 else ids), types


class _ErrorLog:
    """First error inside a CC3D callback: kept, written to the output folder, re-raised from ``step``."""

    def __init__(self):
        self.count = 0
        self.first = None
        self.where = None

    def record(self, where: str, out_dir: str | None):
        self.count += 1
        if self.first is None:
            self.first = traceback.format_exc()
            self.where = where
            msg = f"NeuralCPM: exception inside the CC3D {where} callback (copy refused):\n{self.first}"
            try:
                sys.stderr.write(msg + "\n")
                with open(os.path.join(out_dir or os.getcwd(), "neuralcpm_error.txt"), "w") as f:
                    f.write(msg)
            except Exception:  # noqa: BLE001, S110
                pass


class _EnergyCallback:
    """The object registered with ``EnergyFunctionPyWrapper``: ``changeEnergy()`` → ΔH (float)."""

    def __init__(self, owner):
        self.owner = owner
        self.calls = 0

    def changeEnergy(self):
        o = self.owner
        try:
            self.calls += 1
            w = o._energy_wrapper
            pt = w.getChangePoint()
            new = w.getNewCell()
            nid = 0 if new is None else int(new.id)
            m = o.mirror
            if new is not None and (nid >= len(m.types) or m.types[nid] != int(new.type)):
                m.ensure_id(nid, int(new.type))
            site = (int(pt.y), int(pt.x)) if o.ndim == 2 else (int(pt.z), int(pt.y), int(pt.x))
            return float(o.energy.delta(site, nid))
        except BaseException:  # noqa: BLE001
            o.errors.record("energy (changeEnergy)", o.out_dir())
            return math.inf


class _WatcherCallback:
    """The object registered with ``ChangeWatcherPyWrapper``: keeps the mirror up to date."""

    def __init__(self, owner):
        self.owner = owner

    def field3DChange(self):
        o = self.owner
        try:
            w = o._watcher_wrapper
            pt = w.getChangePoint()
            new = w.getNewCell()
            nid = 0 if new is None else int(new.id)
            site = (int(pt.y), int(pt.x)) if o.ndim == 2 else (int(pt.z), int(pt.y), int(pt.x))
            m = o.mirror
            if new is not None and (nid >= len(m.types) or m.types[nid] != int(new.type)):
                m.ensure_id(nid, int(new.type))
            o.energy.accept(site, nid)  # compiled neural caches: before the mirror changes
            m.set_site(site, nid, None if new is None else int(new.type))
        except BaseException:  # noqa: BLE001
            o.errors.record("change watcher (field3DChange)", o.out_dir())


class NeuralCPMEnergySteppable(_SteppableBase):
    """Registers the Python energy term and the lattice mirror; reports errors, speed and mirror checks.

    Reads ``neuralcpm_config.json`` (next to this file). At the end writes ``neuralcpm_run.json`` into the
    output folder: MCS run, ``setup_s`` (this steppable's ``start``: reading the lattice, loading the Python
    term, binding the compiled neural terms and loading their compiled code), wall time (s) and MCS/s by wall
    clock, CPU time of the CC3D process (s, all its threads) and MCS per CPU-second, both from the end of
    ``start`` to the end of the run (CC3D's start-up and ``setup_s`` excluded; the mirror checks and snapshots
    included), number of Python energy calls, callback errors, mirror checks.
    """

    def __init__(self, frequency=1, sim_dir=None):
        _SteppableBase.__init__(self, frequency=frequency)
        self.sim_dir = sim_dir or _sim_dir()
        self.cfg = load_config(self.sim_dir)
        self.ndim = len(self.cfg["shape"])
        self.errors = _ErrorLog()
        self.mirror = None
        self.energy = None
        self._energy_cb = None
        self._watcher_cb = None
        self._energy_wrapper = None
        self._watcher_wrapper = None
        self._t0 = None
        self._mcs_done = 0
        self.mirror_checks = []
        self._fields = None
        self._c0 = None
        self._setup_s = None

    def out_dir(self) -> str:
        return SteppableOutputDir.of(self)

    def start(self):
        from cc3d.cpp import CompuCell
        t_setup = time.time()
        limit_blas_threads(1)
        cfg = self.cfg
        if cfg.get("python_terms") or cfg.get("forbid_deletion_python", False):
            ids, types = _read_cell_field(self.cell_field, self.dim, self.ndim)
            self.mirror = LatticeMirror(ids, types)
            self.energy = load_python_energy(self.sim_dir, self.mirror, cfg)
            self.energy.prepare()  # compiled code loaded before the clock of the MCS/s starts
            # keep references alive: CC3D holds raw pointers to the wrappers and the Python objects
            self._energy_cb = _EnergyCallback(self)
            self._energy_wrapper = CompuCell.EnergyFunctionPyWrapper()
            self._energy_wrapper.setSimulator(self.simulator)
            self._energy_wrapper.setPotts(self.potts)
            self.potts.registerEnergyFunctionWithName(self._energy_wrapper.getEnergyFunctionPyWrapperPtr(),
                                                      "NeuralCPMPythonTerm")
            self._energy_wrapper.registerPyEnergyFunction(self._energy_cb)
            self._watcher_cb = _WatcherCallback(self)
            self._watcher_wrapper = CompuCell.ChangeWatcherPyWrapper()
            self._watcher_wrapper.setSimulator(self.simulator)
            self._watcher_wrapper.setPotts(self.potts)
            self.potts.registerCellGChangeWatcher(self._watcher_wrapper.getChangeWatcherPyWrapperPtr())
            self._watcher_wrapper.registerPyChangeWatcher(self._watcher_cb)
            self._fields = _FieldRecomputer.maybe(self.sim_dir, cfg, self.energy)
        self._t0 = time.time()
        self._c0 = time.process_time()
        self._setup_s = self._t0 - t_setup

    def step(self, mcs):
        self._mcs_done = mcs
        if self.errors.first is not None:
            raise RuntimeError(f"NeuralCPM: {self.errors.count} error(s) inside the CC3D {self.errors.where} "
                               f"callback; first:\n{self.errors.first}")
        every = int(self.cfg.get("verify_mirror_every", 0) or 0)
        if self.mirror is not None and every > 0 and mcs % every == 0:
            ids, _ = _read_cell_field(self.cell_field, self.dim, self.ndim)
            self.mirror_checks.append([int(mcs), int(np.sum(ids != self.mirror.ids))])
        if self._fields is not None and mcs > 0:
            self._fields.maybe_update(mcs, self.mirror)

    def _cache_error(self):
        """Max |cached − recomputed| of the compiled neural terms (None without such terms)."""
        errs = [t.evaluator.cache_error() for t in (self.energy.terms if self.energy else [])
                if getattr(t, "compiled", False) and t.evaluator.S is not None]
        return max(errs) if errs else None

    def _report(self):
        wall = time.time() - (self._t0 or time.time())
        cpu = time.process_time() - (self._c0 if self._c0 is not None else time.process_time())
        rep = {"mcs": int(self._mcs_done), "setup_s": self._setup_s, "wall_s": wall,
               "mcs_per_s": (self._mcs_done / wall) if wall > 0 else None,
               "cpu_s": cpu, "mcs_per_cpu_s": (self._mcs_done / cpu) if cpu > 0 else None,
               "python_term": self.energy is not None,
               "compiled_terms": [] if self.energy is None else self.energy.compiled,
               "neural_cache_error": self._cache_error(),
               "energy_calls": 0 if self._energy_cb is None else self._energy_cb.calls,
               "callback_errors": self.errors.count, "first_error": self.errors.first,
               "mirror_checks": self.mirror_checks,
               "field_updates": None if self._fields is None else self._fields.updates,
               "field_mode": None if self._fields is None else self._fields.mode}
        try:
            with open(os.path.join(self.out_dir(), "neuralcpm_run.json"), "w") as f:
                json.dump(rep, f, indent=1)
        except Exception:  # noqa: BLE001
            sys.stderr.write("NeuralCPM: could not write neuralcpm_run.json\n")
        sys.stdout.write(f"NeuralCPM: {rep['mcs']} MCS in {wall:.1f} s "
                         f"({rep['mcs_per_s'] or 0:.2f} MCS/s), {rep['callback_errors']} callback errors\n")

    def finish(self):
        self._report()

    def on_stop(self):
        self._report()


class _FieldRecomputer:
    """Recompute the per-type fields of a global NH approximation every k MCS (needs the package + torch)."""

    def __init__(self, sim_dir, spec, term: TypeFieldTerm, cfg: dict):
        self.k = int(spec.get("recompute_every", 0) or 0)
        self.n_types = len(cfg["type_names"]) - 1
        self.order = int(cfg.get("copy_order", 2))
        self.periodic = bool(cfg.get("periodic", True))
        self.term = term
        self.updates = 0
        self.mode = "fixed"
        self._ham = None
        self._types = None
        if self.k <= 0:
            return
        try:
            pkg_root = spec.get("package_root")
            if pkg_root and pkg_root not in sys.path:
                sys.path.append(pkg_root)
            from cc3d_steppables.approx import type_fields
            from neuralcpm_plugin.bundle import load_bundle
            self._ham = load_bundle(os.path.join(str(sim_dir), spec["bundle"])).hamiltonian
            self._type_fields = type_fields
            self.mode = f"recomputed every {self.k} MCS"
        except Exception as e:  # no torch / package in CC3D's python: keep the exported fields  # noqa: BLE001
            sys.stderr.write(f"NeuralCPM: cannot recompute the neural fields inside CC3D ({e!r}); "
                             "they stay as exported\n")
            self.k = 0

    @classmethod
    def maybe(cls, sim_dir, cfg, energy: PythonEnergy):
        spec = cfg.get("nh_fields")
        if not spec:
            return None
        term = next((t for t in energy.terms if isinstance(t, TypeFieldTerm)), None)
        return None if term is None else cls(sim_dir, spec, term, cfg)

    def maybe_update(self, mcs, mirror: LatticeMirror):
        if self.k <= 0 or mcs % self.k != 0:
            return
        ids = mirror.ids.copy()
        used = int(ids.max()) + 1
        self.term.phi = self._type_fields(self._ham, ids, mirror.types[:used].copy(), n_types=self.n_types,
                                          order=self.order, periodic=self.periodic)
        self.updates += 1


class SnapshotSteppable(_SteppableBase):
    """Records the lattice every ``every`` MCS (MCS 0 = the initial state, before any sweep) and the last MCS.

    Writes ``filename`` (default ``lattice.npz``) into the output folder in the package's format: ``data``
    int32 ``(frames, 2, H, W)`` (channel 0 = cell id, 1 = cell type; ``[y, x]``) and ``mcs`` int64.
    """

    def __init__(self, frequency=1, every=50, last_mcs=None, filename="lattice.npz"):
        _SteppableBase.__init__(self, frequency=frequency)
        self.every = int(every)
        self.last_mcs = last_mcs
        self.filename = filename
        self.frames = []
        self.mcs_list = []
        self._ndim = None

    def _snapshot(self):
        dim = self.dim
        ndim = 2 if int(dim.z) == 1 else 3
        ids, types = _read_cell_field(self.cell_field, dim, ndim)
        return np.stack([ids, types[ids]]).astype(np.int32)

    def step(self, mcs):
        if mcs % self.every == 0 or (self.last_mcs is not None and mcs == self.last_mcs):
            self.frames.append(self._snapshot())
            self.mcs_list.append(int(mcs))

    def _save(self):
        if not self.frames:
            return
        try:
            out = SteppableOutputDir.of(self)
            np.savez_compressed(os.path.join(out, self.filename), data=np.stack(self.frames),
                                mcs=np.array(self.mcs_list, dtype=np.int64))
        except Exception:  # noqa: BLE001
            sys.stderr.write("NeuralCPM: could not save the snapshots:\n" + traceback.format_exc())

    def finish(self):
        self._save()

    def on_stop(self):
        self._save()


class SteppableOutputDir:
    @staticmethod
    def of(steppable) -> str:
        try:
            d = steppable.output_dir
        except Exception:  # noqa: BLE001
            d = None
        d = d or os.getcwd()
        os.makedirs(d, exist_ok=True)
        return d
