"""An independent ΔH evaluator for MorpheusML text: parse the XML, apply Morpheus 2.2.4's formulas.

This module deliberately shares no code with the exporter or the importer (only the generic expression
parser :mod:`morpheus_xml.expr`): it reads the model text and evaluates one copy attempt exactly as
Morpheus's C++ does (sources: ``core/interaction_energy.cpp``, ``core/cpm_shape.cpp``,
``core/cpm_sampler.cpp``, ``plugins/shape/volume_constraint.cpp``, ``plugins/motility/haptotaxis.cpp``,
``plugins/motility/directed_motion.cpp``):

* Contact (``CPM/Interaction/Contact``): for the target site ``x`` and every offset ``o`` of the
  ``ShapeSurface`` neighbourhood, ``−J(τ_old, τ(σ(x+o)))`` if ``σ(x+o) ≠ old`` and ``+J(τ_new, τ(σ(x+o)))`` if
  ``σ(x+o) ≠ new``; the sum is divided by the boundary-length scaling: ``none`` → 1, ``size`` → number of
  neighbours, ``norm`` (the default) → Magno's table ``[0, 1, 3, 5, 11, 15, 18]`` by order (square lattice).
  Unlisted type pairs take ``Interaction/@default`` (0).
* ``VolumeConstraint`` (per CellType): ``s·((t − V_after)² − (t − V_before)²)`` for both cells.
* ``Haptotaxis`` (per CellType): ``−strength·c(x)`` for the cell gaining ``x``, ``+strength·c(x)`` for the cell
  losing it; ``c`` = the attractant Field (``Global/Field`` with base64 ``Data``) at the target site.
* ``DirectedMotion`` (per CellType): ``−s·V·((c_after − c_before)·d̂)`` for the gaining and the losing cell,
  ``V`` the cell's volume *before* the copy, ``c`` the cell centre (mean node position), ``d̂`` the unit
  direction (0 if the direction is 0), evaluated at the centre before the copy.

Lattices: ``square`` (2-D) and ``cubic`` (3-D). Cubic neighbourhood order n is Morpheus's table
(``Cubic_Lattice::get_all_neighbors_per_order``: 6, 12, 8, 6, 24, 24, 12, 30, 8 sites per order), i.e. the
shells at squared distances 1, 2, 3, 4, 5, 6, 8, 9, 12 — written here as those squared distances, not borrowed
from the package's neighbourhood code.

Coordinates: MorpheusML nodes are ``x, y, z`` with ``x`` the column; the package's arrays are ``[y, x]``
(``[z, y, x]`` on a cubic lattice).
Cell centres are the mean of node positions; Morpheus keeps positions *unwrapped* across periodic
boundaries (a node copied across the boundary is stored at ``source + direction``), so its centre of a
cell that has wandered across the boundary depends on the cell's history. For states given as arrays the
evaluator unwraps each cell's nodes to their images nearest the cell's first node in row-major order and
hands the direction expression that centre wrapped into the lattice: exactly Morpheus's value for every
cell whose unwrapped centre lies inside the lattice (e.g. any cell that has not crossed the boundary).
Type indices are CellType document positions (the medium must be first).
"""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np

from neuralcpm_plugin.errors import ModelImportError

from .expr import ExprError, evaluate, evaluate_vector

__all__ = ["MAGNO_SCALING", "SQUARE_NEIGHBOURS", "MorpheusEvaluator"]

# Morpheus core/lattice.cpp Square_Lattice::get_all_neighbors (x, y), grouped by order 1..6
SQUARE_NEIGHBOURS = [
    (1, 0), (0, 1), (-1, 0), (0, -1),
    (1, 1), (-1, 1), (1, -1), (-1, -1),
    (2, 0), (-2, 0), (0, 2), (0, -2),
    (2, 1), (-2, 1), (2, -1), (-2, -1), (1, 2), (-1, 2), (1, -2), (-1, -2),
    (2, 2), (-2, 2), (2, -2), (-2, -2),
    (3, 0), (0, 3), (-3, 0), (0, -3),
]
_PER_ORDER = [4, 4, 4, 8, 4, 4]
MAGNO_SCALING = [0, 1, 3, 5, 11, 15, 18, 26, 36]  # core/cpm_shape.cpp, square lattice
# Morpheus core/lattice.cpp, cubic lattice: the squared distance of each neighbourhood order 1..9
CUBIC_ORDER_D2 = [1, 2, 3, 4, 5, 6, 8, 9, 12]


def _cubic_offsets_xyz(order: int):
    if not 1 <= order <= len(CUBIC_ORDER_D2):
        raise ModelImportError(f"cubic-lattice neighbourhood order {order} is outside Morpheus's 1..9")
    keep = set(CUBIC_ORDER_D2[:order])
    r = range(-3, 4)
    return [(x, y, z) for x in r for y in r for z in r if x * x + y * y + z * z in keep]


def _square_offsets_xy(order: int):
    if not 1 <= order <= len(_PER_ORDER):
        raise ModelImportError(f"square-lattice neighbourhood order {order} is outside Morpheus's 1..6")
    return SQUARE_NEIGHBOURS[: sum(_PER_ORDER[:order])]


def _read_text(source) -> str:
    if isinstance(source, (bytes, bytearray)):
        return bytes(source).decode()
    s = str(source)
    if s.lstrip().startswith("<"):
        return s
    from neuralcpm_plugin._xmlsafe import read_xml_bytes
    p = Path(s)
    data = read_xml_bytes(p, lambda msg: ModelImportError(f"{p}: {msg}"), gz=True if p.suffix == ".gz" else None)
    return data.decode()


def _order_of(nb, where):
    if nb is None:
        return None
    o = nb.find("Order")
    if o is None or not (o.text or "").strip():
        raise ModelImportError(f"{where}: Neighborhood without Order is not supported by the evaluator")
    return int(o.text.strip())


class MorpheusEvaluator:
    """ΔH of single copy attempts under a MorpheusML model, computed from the model's text.

    Parameters
    ----------
    source : str or path
        The XML text or a path to ``.xml`` / ``.xml.gz``.
    """

    def __init__(self, source):
        text = _read_text(source)
        from neuralcpm_plugin._xmlsafe import parse_xml_bytes
        root = parse_xml_bytes(text.encode(), lambda msg: ModelImportError(f"evaluator: {msg}"))
        self.root = root
        lat = root.find("Space/Lattice")
        if lat is None or lat.get("class") not in ("square", "cubic"):
            raise ModelImportError("evaluator: only Space/Lattice class='square' or 'cubic' is supported")
        self.cubic = lat.get("class") == "cubic"
        size = [float(v) for v in lat.find("Size").get("value").split(",")]
        self.size_xy = (int(size[0]), int(size[1]))
        if not self.cubic and len(size) > 2 and int(size[2]) > 1:
            raise ModelImportError("evaluator: a square lattice with size z > 1")
        self.size_z = int(size[2]) if self.cubic else 0
        if self.cubic and self.size_z < 1:
            raise ModelImportError("evaluator: a cubic lattice needs size z >= 1")
        # the package's array shape: (y, x) or (z, y, x)
        self.shape = (self.size_z, self.size_xy[1], self.size_xy[0]) if self.cubic else \
            (self.size_xy[1], self.size_xy[0])
        conds = {c.get("boundary"): c.get("type") for c in lat.findall("BoundaryConditions/Condition")}
        axes = "xyz" if self.cubic else "xy"
        self.periodic = all(conds.get(a) == "periodic" for a in axes)
        self.env = {"size.x": float(self.size_xy[0]), "size.y": float(self.size_xy[1]), "size.z": float(self.size_z)}
        for c in root.findall("Global/Constant"):
            self.env[c.get("symbol")] = evaluate(c.get("value"), self.env)
        default_order = _order_of(lat.find("Neighborhood"), "Space/Lattice")
        cpm = root.find("CPM")
        ss = cpm.find("ShapeSurface") if cpm is not None else None
        self.surface_order = _order_of(ss.find("Neighborhood"), "CPM/ShapeSurface") if ss is not None \
            else default_order
        scaling = ss.get("scaling", "norm") if ss is not None else "norm"
        offs = _cubic_offsets_xyz(self.surface_order) if self.cubic else _square_offsets_xy(self.surface_order)
        if scaling == "none":
            self.scaling = 1.0
        elif scaling == "size":
            self.scaling = float(len(offs))
        elif scaling in ("norm", "magno") and not self.cubic:
            self.scaling = float(MAGNO_SCALING[self.surface_order])
        else:
            raise ModelImportError(f"evaluator: ShapeSurface scaling {scaling!r} is not supported on this lattice")
        # offsets in array order: (dy, dx) or (dz, dy, dx)
        self.offsets_yx = np.array([tuple(reversed(o)) for o in offs], dtype=np.int64)
        mcs = cpm.find("MonteCarloSampler")
        self.temperature = float(evaluate(mcs.find("MetropolisKinetics").get("temperature"), self.env))
        self.copy_order = _order_of(mcs.find("Neighborhood"), "MonteCarloSampler")
        # cell types in document order
        cts = root.findall("CellTypes/CellType")
        self.type_names = [c.get("name") for c in cts]
        if not cts or cts[0].get("class") != "medium":
            raise ModelImportError("evaluator: the first CellType must be the medium")
        nt = len(cts)
        idx = {n: i for i, n in enumerate(self.type_names)}
        inter = cpm.find("Interaction")
        default = float(inter.get("default", "0")) if inter is not None else 0.0
        self.J = np.full((nt, nt), default)
        if inter is not None:
            for c in inter.findall("Contact"):
                a, b = idx[c.get("type1")], idx[c.get("type2")]
                self.J[a, b] = self.J[b, a] = evaluate(c.get("value"), self.env)
        fields = {}
        for f in root.findall("Global/Field"):
            fields[f.get("symbol")] = f
        self.volume = {}     # type -> (strength, target)
        self.hapto = {}      # type -> (strength, field [y, x])
        self.directed = {}   # type -> (strength expr, direction expr)
        for t, ct in enumerate(cts):
            for child in ct:
                if not isinstance(child.tag, str):
                    continue
                if child.tag == "VolumeConstraint":
                    self.volume[t] = (evaluate(child.get("strength"), self.env),
                                      evaluate(child.get("target"), self.env))
                elif child.tag == "Haptotaxis":
                    sym = child.get("attractant")
                    if sym not in fields:
                        raise ModelImportError(f"evaluator: Haptotaxis attractant {sym!r} is not a Global/Field")
                    self.hapto.setdefault(t, []).append((evaluate(child.get("strength"), self.env),
                                                         self._field(fields[sym])))
                elif child.tag == "DirectedMotion":
                    if child.get("protrusion", "true") != "true" or child.get("retraction", "true") != "true":
                        raise ModelImportError("evaluator: DirectedMotion protrusion/retraction flags unsupported")
                    self.directed[t] = (child.get("strength"), child.get("direction"))
                elif child.tag in ("Property", "Constant", "Annotation"):
                    continue
                else:
                    raise ModelImportError(f"evaluator: CellType child <{child.tag}> is not supported")

    # ------------------------------------------------------------------------------------------------
    def _field(self, node) -> np.ndarray:
        data = node.find("Data")
        if data is None:
            val = evaluate(node.get("value"), self.env)
            return np.full(self.shape, float(val))
        if data.get("encoding") != "base64":
            raise ModelImportError("evaluator: only base64 Field Data is supported")
        raw = base64.b64decode("".join((data.text or "").split()))
        arr = np.frombuffer(raw, dtype="<f8")
        n = int(np.prod(self.shape))
        if arr.size != n:
            raise ModelImportError(f"evaluator: Field {node.get('symbol')!r} holds {arr.size} values, "
                                   f"expected {n}")
        return arr.reshape(self.shape).copy()  # x fastest: row-major [y, x] / [z, y, x]

    def _wrap(self, y, x):
        w, h = self.size_xy
        return y % h, x % w

    def cell_positions(self, ids: np.ndarray, cell: int) -> np.ndarray:
        """Unwrapped (y, x) node positions of a cell: each node's image nearest the cell's first node in
        row-major order (``p − L·round((p − r)/L)``)."""
        pos = np.argwhere(ids == cell).astype(np.float64)
        if len(pos) == 0 or not self.periodic:
            return pos
        L = np.asarray(ids.shape, dtype=np.float64)
        return pos - L * np.round((pos - pos[0]) / L)

    def _directed_term(self, t, ids, cell, site, add: bool):
        s_expr, d_expr = self.directed[t]
        pos = self.cell_positions(ids, cell)
        V = pos.shape[0]
        if V == 0 or (not add and V == 1):
            return 0.0
        c_before = pos.mean(0)
        L = np.asarray(ids.shape, dtype=np.float64)
        x = np.asarray(site, dtype=np.float64)
        node = x - L * np.round((x - pos[0]) / L) if self.periodic else x
        if add:
            c_after = (pos.sum(0) + node) / (V + 1)
        else:
            c_after = (pos.sum(0) - node) / (V - 1)
        # the centre seen by the direction expression: Morpheus's cell.center, wrapped into the lattice
        c_seen = np.mod(c_before, L) if self.periodic else c_before
        env = dict(self.env)
        cz = float(c_seen[0]) if self.cubic else 0.0
        env.update({"cell.center.x": c_seen[-1], "cell.center.y": c_seen[-2], "cell.center.z": cz,
                    "cell.volume": float(V), "cell.id": float(cell)})
        try:
            s = evaluate(s_expr, env)
            d = evaluate_vector(d_expr, env)
        except ExprError as e:
            raise ModelImportError(f"evaluator: DirectedMotion: {e}") from None
        dvec = np.array([d[2], d[1], d[0]] if self.cubic else [d[1], d[0]])  # array order (z,) y, x
        n = float(np.sqrt(np.sum(dvec ** 2)))
        dhat = dvec / n if n > 0 else np.zeros(len(dvec))
        return -s * V * float(np.dot(c_after - c_before, dhat))

    def delta(self, ids, types, site, new_id) -> float:
        """ΔH of copying cell ``new_id`` into ``site`` = (y, x) — (z, y, x) on a cubic lattice — of the state
        ``(ids [y, x] or [z, y, x], types)``.

        Returns 0 when the site already belongs to ``new_id`` (Morpheus skips such attempts). Deletions
        (a cell's last node) are refused by Morpheus before any energy is computed; this returns ``inf``.
        """
        ids = np.asarray(ids)
        types = np.asarray(types)
        if ids.shape != self.shape:
            raise ValueError(f"state of shape {ids.shape}, the model's lattice is {self.shape}")
        site = tuple(int(v) for v in site)
        old = int(ids[site])
        new = int(new_id)
        if old == new:
            return 0.0
        if old != 0 and np.count_nonzero(ids == old) == 1:
            return float("inf")
        t_old, t_new = int(types[old]), int(types[new])
        dims = ids.shape
        # contact
        d = 0.0
        for off in self.offsets_yx:
            q = tuple(int(c) + int(o) for c, o in zip(site, off))
            if self.periodic:
                q = tuple(c % n for c, n in zip(q, dims))
            elif not all(0 <= c < n for c, n in zip(q, dims)):
                continue
            nb = int(ids[q])
            tn = int(types[nb])
            if nb != old:
                d -= self.J[t_old, tn]
            if nb != new:
                d += self.J[t_new, tn]
        d /= self.scaling
        # volume
        for cell, t, sign in ((new, t_new, +1), (old, t_old, -1)):
            if t in self.volume:
                s, tgt = self.volume[t]
                vb = int(np.count_nonzero(ids == cell))
                va = vb + sign
                d += s * ((tgt - va) ** 2 - (tgt - vb) ** 2)
        # haptotaxis
        for t, sign in ((t_new, -1.0), (t_old, +1.0)):
            for strength, field in self.hapto.get(t, ()):
                d += sign * strength * field[site]
        # directed motion
        if t_new in self.directed:
            d += self._directed_term(t_new, ids, new, site, add=True)
        if t_old in self.directed:
            d += self._directed_term(t_old, ids, old, site, add=False)
        return float(d)

    def copy_offsets_yx(self) -> np.ndarray:
        """Offsets (dy, dx) — (dz, dy, dx) on a cubic lattice — of the copy (MonteCarloSampler) neighbourhood."""
        offs = _cubic_offsets_xyz(self.copy_order) if self.cubic else _square_offsets_xy(self.copy_order)
        return np.array([tuple(reversed(o)) for o in offs], dtype=np.int64)
