"""Import a MorpheusML (version 4) model as the package's analytic Hamiltonian + lattice + initial state.

``load_model(path)`` → :class:`ImportedModel` ``(hamiltonian, state, meta)``.

What is read, and how it is converted (Morpheus 2.2.4 semantics, see :mod:`morpheus_xml.evaluator`):

* ``Space/Lattice``: square (periodic in x and y; ``Size`` x, y → array shape ``(y, x)``) or cubic (periodic in
  x, y and z; ``Size`` x, y, z → array shape ``(z, y, x)``), its ``Neighborhood`` (the default for the others;
  square orders 1..6, cubic 1..8, where Morpheus's order n is the package's).
* ``CPM/Interaction/Contact`` + ``CPM/ShapeSurface``: Morpheus divides the neighbour sum by the scaling
  (``none`` → 1, ``size`` → the number of neighbours, ``norm`` → Magno's 1, 3, 5, 11, 15, 18 by order on
  square lattices, 1, 5, 9, 11, 23, 39, 47, 70 on cubic ones), so the package's per-pair J is
  ``value / scaling`` over the ShapeSurface order (``contact_order``).
* ``CPM/MonteCarloSampler``: ``Neighborhood`` → ``copy_order``; ``MetropolisKinetics/@temperature`` → T;
  ``stepper`` is recorded in ``meta["stepper"]`` (``random`` = the classic sampler, ``edgelist`` = proposals on
  cell boundaries: the exact sampler's ``proposal="boundary"``).
* ``CellType`` children: ``VolumeConstraint`` → ``VolumeConstraint`` (λ = strength, V* = target);
  ``Haptotaxis`` (attractant = a ``Global/Field``) → ``ExternalPotential`` with μ(τ) = −strength (a medium
  Haptotaxis is folded into the biological types: H differs by a constant); ``DirectedMotion`` →
  ``DirectedMotion`` (constant directions, or band directions recognised by evaluating the expression).
* ``CellPopulations/Population``: ``Cell/Nodes`` (ids kept; node coordinates wrapped into the lattice),
  ``InitCircle`` (random, regular), ``InitRectangle`` (random, grid) and ``TIFFReader`` (``keepIDs``); on cubic
  lattices ``Cell/Nodes`` and ``InitRectangle`` random (Morpheus's InitCircle is 2-D). The
  random layouts follow Morpheus's documented algorithms with this package's random generator, seeded by
  ``Time/RandomSeed`` (or ``seed=``) — the same layout family, not Morpheus's random stream.
* ``Global/Constant`` values (and, per type, constant ``CellType/Property``/``Constant`` values) feed
  expressions; ``Global/Field`` feeds Haptotaxis (base64 ``Data``, or a ``value`` expression of the space
  symbol). ``Description`` and ``Analysis`` (outputs only) are recorded in
  ``meta["ignored"]``.

Anything else — any element that would change the dynamics — raises
:class:`~neuralcpm_plugin.errors.ModelImportError` naming the element and the file.
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from neuralcpm_plugin.errors import ModelImportError
from neuralcpm_plugin.lattice import CellState

from .expr import ExprError, evaluate, evaluate_vector, symbols_of

__all__ = [
    "CUBIC_MAGNO_NORM",
    "CUBIC_ORDER_SIZES",
    "MAGNO_NORM",
    "SQUARE_ORDER_SIZES",
    "ImportedModel",
    "ParsedModel",
    "build_hamiltonian",
    "load_model",
    "parse_model",
]

MAGNO_NORM = {1: 1.0, 2: 3.0, 3: 5.0, 4: 11.0, 5: 15.0, 6: 18.0}  # core/cpm_shape.cpp (square)
SQUARE_ORDER_SIZES = {1: 4, 2: 8, 3: 12, 4: 20, 5: 24, 6: 28}       # core/lattice.cpp (square)
CUBIC_MAGNO_NORM = {1: 1.0, 2: 5.0, 3: 9.0, 4: 11.0, 5: 23.0, 6: 39.0, 7: 47.0, 8: 70.0}    # cpm_shape.cpp (cubic)
CUBIC_ORDER_SIZES = {1: 6, 2: 18, 3: 26, 4: 32, 5: 56, 6: 80, 7: 92, 8: 122}   # orders 1..8 = the package's
# the distances of the neighbour shells, by order (square, cubic)
_SHELLS = {2: [1.0, math.sqrt(2), 2.0, math.sqrt(5), math.sqrt(8), 3.0],
           3: [1.0, math.sqrt(2), math.sqrt(3), 2.0, math.sqrt(5), math.sqrt(6), math.sqrt(8), 3.0]}


@dataclass
class ParsedModel:
    """The model as plain data (term spec dicts in the bundle format + numpy tensors)."""

    shape: tuple
    periodic: bool
    copy_order: int
    contact_order: int
    temperature: float
    type_names: list
    terms: list                    # spec dicts {"kind", "scale", "params"}
    tensors: list                  # per term: dict name -> np.ndarray
    state: CellState | None
    meta: dict = field(default_factory=dict)

    def lattice_spec(self):
        from neuralcpm_plugin.hamiltonian.base import LatticeSpec
        return LatticeSpec(tuple(self.shape), self.periodic, self.copy_order, self.contact_order)


@dataclass
class ImportedModel:
    """``hamiltonian`` (analytic terms), ``state`` (initial CellState or None), ``meta`` (dict)."""

    hamiltonian: object
    state: CellState | None
    meta: dict


def _err(path, msg):
    return ModelImportError(f"{path}: {msg}")


def _xml_path(el) -> str:
    parts = []
    while el is not None and isinstance(el.tag, str):
        parts.append(el.tag)
        el = el.getparent()
    return "/".join(reversed(parts))


def _children(el):
    return [c for c in el if isinstance(c.tag, str)]


def _read_root(path: Path):
    """The root element; size-limited (gzip decompressed in chunks), lxml without huge_tree or entities."""
    from neuralcpm_plugin._xmlsafe import parse_xml_bytes, read_xml_bytes

    def error(msg):
        return ModelImportError(f"{path}: {msg}")
    data = read_xml_bytes(path, error, gz=True if path.suffix == ".gz" else None)
    return parse_xml_bytes(data, error)


def _order(nb, path, default=None, nd: int = 2):
    if nb is None:
        return default
    o = nb.find("Order")
    if o is not None and (o.text or "").strip():
        try:
            return int(o.text.strip())
        except ValueError:
            raise _err(path, f"{_xml_path(o)}: order {o.text!r} is not an integer") from None
    d = nb.find("Distance")
    if d is not None and (d.text or "").strip():
        dist = float(d.text)
        n = sum(1 for x in _SHELLS[nd] if x < dist + 1e-5)
        if n == 0:
            raise _err(path, f"{_xml_path(d)}: neighbourhood distance {dist} holds no neighbours")
        return n
    raise _err(path, f"{_xml_path(nb)}: only Neighborhood/Order or Neighborhood/Distance are supported")


class _Ctx:
    def __init__(self, path, seed):
        self.path = path
        self.env = {}
        self.seed = seed
        self.ignored = []

    def num(self, text, el, what, env=None):
        if text is None:
            raise _err(self.path, f"{_xml_path(el)}: missing {what}")
        try:
            return float(evaluate(text, env or self.env))
        except (ExprError, ZeroDivisionError, ValueError, OverflowError) as e:
            raise _err(self.path, f"{_xml_path(el)}: cannot evaluate {what} {text!r} ({e})") from None

    def vec(self, text, el, what, env=None):
        if text is None:
            raise _err(self.path, f"{_xml_path(el)}: missing {what}")
        try:
            return evaluate_vector(text, env or self.env)
        except (ExprError, ZeroDivisionError, ValueError, OverflowError) as e:
            raise _err(self.path, f"{_xml_path(el)}: cannot evaluate {what} {text!r} ({e})") from None


# ------------------------------------------------------------------------------------------------------
# fields
# ------------------------------------------------------------------------------------------------------
def _read_field(ctx: _Ctx, el, shape, space_symbol) -> np.ndarray:
    n_sites = int(np.prod(shape))
    for c in _children(el):
        if c.tag not in ("Data", "Annotation"):
            raise _err(ctx.path, f"{_xml_path(c)}: <{c.tag}> in a Field is not supported (only static fields "
                                 "given by 'value' or base64 <Data> can be imported)")
    data = el.find("Data")
    if data is not None:
        if data.get("filename"):
            raise _err(ctx.path, f"{_xml_path(data)}: Field data in an external file is not supported")
        if data.get("encoding") != "base64":
            raise _err(ctx.path, f"{_xml_path(data)}: Field data encoding {data.get('encoding')!r} is not "
                                 "supported (use base64)")
        ws = int(data.get("word-size", "8"))
        if ws != 8:
            raise _err(ctx.path, f"{_xml_path(data)}: word-size {ws} is not supported (Morpheus writes 8)")
        try:
            raw = base64.b64decode("".join((data.text or "").split()), validate=True)
        except ValueError as e:
            raise _err(ctx.path, f"{_xml_path(data)}: corrupt base64 data ({e})") from None
        arr = np.frombuffer(raw, dtype="<f8")
        if arr.size != n_sites:
            raise _err(ctx.path, f"{_xml_path(data)}: Field {el.get('symbol')!r} holds {arr.size} values, the "
                                 f"lattice has {n_sites}")
        return arr.reshape(shape).astype(np.float64)      # x fastest, then y (then z): the array's row-major order
    expr = el.get("value")
    if expr is None:
        raise _err(ctx.path, f"{_xml_path(el)}: Field without 'value'")
    try:
        syms = symbols_of(expr)
    except ExprError as e:
        raise _err(ctx.path, f"{_xml_path(el)}: cannot parse value {expr!r} ({e})") from None
    if not any(s.startswith(space_symbol + ".") for s in syms):
        return np.full(shape, ctx.num(expr, el, "value"))
    out = np.empty(shape)
    env = dict(ctx.env)
    for idx in np.ndindex(*shape):
        xyz = tuple(float(v) for v in reversed(idx)) + (0.0,) * (3 - len(shape))     # array (z, y, x) → x, y, z
        env[space_symbol + ".x"], env[space_symbol + ".y"], env[space_symbol + ".z"] = xyz
        out[idx] = ctx.num(expr, el, "value", env)
    return out


# ------------------------------------------------------------------------------------------------------
# directed motion directions
# ------------------------------------------------------------------------------------------------------
def _direction(ctx: _Ctx, el, size_xyz, env=None):
    """The package's direction spec of a DirectedMotion: constant (array order ``[dy, dx]`` / ``[dz, dy, dx]``)
    or a band along one axis of ``cell.center``. ``size_xyz``: the lattice size (x, y, z; z = 0 in 2-D)."""
    nd = 3 if size_xyz[2] else 2
    text = el.get("direction")
    if text is None:
        raise _err(ctx.path, f"{_xml_path(el)}: missing direction")
    try:
        syms = symbols_of(text)
    except ExprError as e:
        raise _err(ctx.path, f"{_xml_path(el)}: cannot parse direction {text!r} ({e})") from None
    base_env = dict(env if env is not None else ctx.env)
    cell_syms = {s for s in syms if s.startswith("cell.")}
    if not cell_syms:
        v = ctx.vec(text, el, "direction", base_env)
        return {"mode": "constant", "vector": [v[k] for k in reversed(range(nd))]}
    allowed = ("cell.center.x", "cell.center.y", "cell.center.z")[:nd]
    if len(cell_syms) != 1 or next(iter(cell_syms)) not in allowed:
        raise _err(ctx.path, f"{_xml_path(el)}: DirectedMotion direction {text!r} depends on "
                             f"{sorted(cell_syms)}; only constant directions or bands in "
                             f"{'/'.join(allowed)} can be imported")
    sym = next(iter(cell_syms))
    axis_xyz = "xyz".index(sym[-1])
    axis = nd - 1 - axis_xyz      # array axis: x -> nd-1, y -> nd-2, z -> 0
    L = float(size_xyz[axis_xyz])

    def f(p):
        e = dict(base_env)
        e[sym] = p
        return ctx.vec(text, el, "direction", e)

    grid = (np.arange(int(L * 8)) + 0.5) / 8.0
    vals = np.array([f(p) for p in grid])
    if np.any(np.abs(np.delete(vals, axis_xyz, axis=1)) > 0):
        raise _err(ctx.path, f"{_xml_path(el)}: DirectedMotion direction {text!r} is not along one lattice axis")
    comp = np.sign(vals[:, axis_xyz])

    def edge(a, b, pred):
        # bisection for the switch point of pred between a (False) and b (True)
        for _ in range(60):
            m = 0.5 * (a + b)
            if pred(m):
                b = m
            else:
                a = m
        return 0.5 * (a + b)

    nz = np.nonzero(comp)[0]
    if nz.size == 0:
        return None
    left, right = comp[: len(comp) // 2], comp[len(comp) // 2:]
    spec = None
    if comp[0] > 0 and comp[-1] < 0:      # inward: +1 below lo, 0 in the band, -1 above hi
        i_lo = int(np.argmax(comp <= 0))
        i_hi = len(comp) - int(np.argmax(comp[::-1] >= 0))
        lo = edge(grid[i_lo - 1], grid[i_lo], lambda p: np.sign(f(p)[axis_xyz]) <= 0)
        hi = edge(grid[i_hi - 1], grid[i_hi], lambda p: np.sign(f(p)[axis_xyz]) < 0)
        spec = {"mode": "band", "axis": axis, "lo": lo / L, "hi": hi / L, "sense": "inward"}
    elif comp[0] == 0 and comp[-1] == 0 and (left <= 0).all() and (right >= 0).all():  # outward, in band
        i_lo, i_hi = int(nz[0]), int(nz[-1]) + 1
        lo = edge(grid[i_lo - 1], grid[i_lo], lambda p: f(p)[axis_xyz] != 0)
        hi = edge(grid[i_hi - 1], grid[i_hi], lambda p: f(p)[axis_xyz] == 0)
        spec = {"mode": "band", "axis": axis, "lo": lo / L, "hi": hi / L, "sense": "outward"}
    if spec is not None:
        # verify the recognised band reproduces the expression on the grid (away from the switch points)
        lo, hi = spec["lo"] * L, spec["hi"] * L
        if spec["sense"] == "inward":
            want = np.sign(L / 2 - grid) * ((grid < lo) | (grid > hi))
        else:
            want = np.sign(grid - L / 2) * ((grid > lo) & (grid < hi))
        far = (np.abs(grid - lo) > 1e-6) & (np.abs(grid - hi) > 1e-6)
        if np.array_equal(want[far], comp[far]):
            spec["lo"], spec["hi"] = round(spec["lo"], 12), round(spec["hi"], 12)
            return spec
    raise _err(ctx.path, f"{_xml_path(el)}: DirectedMotion direction {text!r} is neither constant nor a "
                         "band (inward/outward) along one axis; it cannot be imported")


# ------------------------------------------------------------------------------------------------------
# populations
# ------------------------------------------------------------------------------------------------------
def _parse_nodes(ctx, el, text, shape):
    """The sites of ``x, y, z; …`` as array indices ``(y, x)`` / ``(z, y, x)``, wrapped into the lattice."""
    nd = len(shape)
    out = []
    for chunk in (text or "").replace("\n", " ").split(";"):
        chunk = chunk.strip()
        if not chunk:
            continue
        parts = [p for p in chunk.replace(",", " ").split() if p]
        try:
            v = [int(float(p)) for p in parts]
        except ValueError:
            raise _err(ctx.path, f"{_xml_path(el)}: bad node {chunk!r}") from None
        if len(v) < 2:
            raise _err(ctx.path, f"{_xml_path(el)}: bad node {chunk!r} (expected 'x, y, z')")
        if nd == 2 and len(v) > 2 and v[2] != 0:
            raise _err(ctx.path, f"{_xml_path(el)}: node {chunk!r} has z != 0 on a 2-D lattice")
        if nd == 3 and len(v) < 3:
            raise _err(ctx.path, f"{_xml_path(el)}: node {chunk!r} has no z on a 3-D lattice (expected 'x, y, z')")
        out.append(tuple(v[nd - 1 - a] % shape[a] for a in range(nd)))
    return out


class _Layout:
    def __init__(self, ctx, shape):
        self.ctx = ctx
        self.shape = shape
        self.ids = np.zeros(shape, dtype=np.int64)
        self.types = {}
        self.next_id = 1
        self.rng = np.random.default_rng(ctx.seed)
        self.skipped = 0

    def new_id(self, t, want=None):
        cid = int(want) if want is not None else self.next_id
        if cid in self.types:
            raise _err(self.ctx.path, f"cell id {cid} is defined twice")
        self.types[cid] = t
        self.next_id = max(self.next_id, cid + 1)
        return cid

    def put(self, *site_and_cid):
        *site, cid = site_and_cid
        site = tuple(site)
        if self.ids[site] != 0:
            self.skipped += 1
            return False
        self.ids[site] = cid
        return True


def _from_orth(p):
    return math.floor(p + 0.5)


def _init_circle(ctx, lay: _Layout, el, t):
    H, W = lay.shape
    n = round(ctx.num(el.get("number-of-cells"), el, "number-of-cells"))
    mode = el.get("mode", "regular")
    dims = el.find("Dimensions")
    if dims is None:
        raise _err(ctx.path, f"{_xml_path(el)}: missing Dimensions")
    cx, cy, _ = ctx.vec(dims.get("center"), dims, "center")
    r = ctx.num(dims.get("radius"), dims, "radius")

    def place(y, x):
        if 0 <= y < H and 0 <= x < W and lay.ids[y, x] == 0:
            lay.put(y, x, lay.new_id(t))

    if mode == "random":
        made, attempts = 0, 100000
        while made < n and attempts > 0:
            x, y = int(lay.rng.integers(W)), int(lay.rng.integers(H))
            dx = x - cx
            dy = y - cy
            if math.hypot(dx, dy) <= r and lay.ids[y, x] == 0:
                lay.put(y, x, lay.new_id(t))
                made += 1
            attempts -= 1
    elif mode == "regular":
        lines = _circle_lines(r, n)
        dist_lines = r / lines
        all_circ = sum(2 * math.pi * i * dist_lines for i in range(1, lines + 1))
        dist_num = all_circ / n
        per = [1] + [round(2 * math.pi * i * dist_lines / dist_num) for i in range(1, lines + 1)]
        per[-1] += n - sum(per)
        place(_from_orth(cy), _from_orth(cx))
        for i in range(1, lines + 1):
            rad = i * dist_lines
            for j in range(per[i]):
                a = 2 * math.pi * (j + 0.5 * (i % 2)) / per[i]
                place(_from_orth(cy + math.sin(a) * rad), _from_orth(cx + math.cos(a) * rad))
    else:
        raise _err(ctx.path, f"{_xml_path(el)}: InitCircle mode {mode!r} is not supported")


def _circle_lines(radius, n):
    diffs = [radius]
    for i in range(1, int(radius) + 1):
        dl = radius / i
        circ = sum(j * dl * 2 * math.pi for j in range(1, i + 1))
        diffs.append(abs(dl - circ / n))
    best, idx = diffs[1] if len(diffs) > 1 else diffs[0], 1
    for i in range(1, math.ceil(radius)):
        if i < len(diffs) and diffs[i] < best:
            best, idx = diffs[i], i
    return max(idx, 1)


def _grid_shape(size_x, size_y, n):
    ratio = size_x / size_y
    cols, rows = math.sqrt(n * ratio), math.sqrt(n / ratio)
    if cols <= 1:
        return 1, n
    if rows <= 1:
        return n, 1
    cands = [(math.floor(cols), math.ceil(rows)), (math.ceil(cols), math.floor(rows)),
             (math.ceil(cols), math.ceil(rows))]
    cands = [c for c in cands if c[0] * c[1] >= n]
    return min(cands, key=lambda c: c[0] * c[1])


def _init_rectangle(ctx, lay: _Layout, el, t):
    nd = len(lay.shape)
    L = lay.shape[::-1]            # lattice size in x, y (, z)
    n = round(ctx.num(el.get("number-of-cells"), el, "number-of-cells"))
    mode = el.get("mode", "regular")
    dims = el.find("Dimensions")
    if dims is None:
        raise _err(ctx.path, f"{_xml_path(el)}: missing Dimensions")
    o = [int(v) for v in ctx.vec(dims.get("origin"), dims, "origin")][:nd]
    sz = [min(max(int(v), 1), L[k]) for k, v in enumerate(ctx.vec(dims.get("size"), dims, "size")[:nd])]
    if any(o[k] + sz[k] > L[k] for k in range(nd)):
        raise _err(ctx.path, f"{_xml_path(el)}: origin + size exceeds the lattice")
    off = ctx.num(el.get("random-offset", "0"), el, "random-offset")
    if mode == "random":
        for _ in range(n):
            for _try in range(1001):
                xyz = [o[k] + int(lay.rng.integers(max(sz[k] - 1, 0) + 1)) for k in range(nd)]
                site = tuple(reversed(xyz))
                if lay.ids[site] == 0:
                    lay.put(*site, lay.new_id(t))
                    break
    elif nd == 3:
        raise _err(ctx.path, f"{_xml_path(el)}: InitRectangle mode {mode!r} is not supported on a cubic lattice "
                             "(random only; or give the cells as Cell/Nodes)")
    elif mode == "grid":
        (ox, oy), (sx, sy), (W, H) = o, sz, L
        gx, gy = _grid_shape(sx, sy, n)
        made = 0
        for j in range(gy):
            for i in range(gx):
                px = ox + (i + 0.5) * sx / gx + off * (lay.rng.random() - 0.5)
                py = oy + (j + 0.5) * sy / gy + off * (lay.rng.random() - 0.5)
                y, x = _from_orth(py) % H, _from_orth(px) % W
                if lay.ids[y, x] == 0:
                    lay.put(y, x, lay.new_id(t))
                made += 1
                if made == n:
                    return
    else:
        raise _err(ctx.path, f"{_xml_path(el)}: InitRectangle mode {mode!r} is not supported (random, grid)")


def _tiff_reader(ctx, lay: _Layout, el, t, base_dir: Path):
    if el.get("keep_ID") is not None:
        raise _err(ctx.path, f"{_xml_path(el)}: attribute 'keep_ID' is ignored by Morpheus 2.2.4, whose "
                             "TIFFReader reads 'keepIDs' (its schema is wrong); rename the attribute to keepIDs "
                             "so the model means what it says")
    fn = el.get("filename")
    if not fn:
        raise _err(ctx.path, f"{_xml_path(el)}: TIFFReader without filename")
    fp = Path(fn) if Path(fn).is_absolute() else base_dir / fn
    import tifffile
    try:
        with tifffile.TiffFile(fp) as tf:
            pages = [p.asarray() for p in tf.pages]
    except (OSError, ValueError, tifffile.TiffFileError) as e:
        raise _err(ctx.path, f"{_xml_path(el)}: cannot read TIFF {fp} ({e})") from None
    if len(pages) != 1:
        raise _err(ctx.path, f"{_xml_path(el)}: TIFF {fp} has {len(pages)} pages; a 2-D lattice needs one")
    img = pages[0]
    if img.ndim != 2 or not np.issubdtype(img.dtype, np.integer):
        raise _err(ctx.path, f"{_xml_path(el)}: TIFF {fp} must be a single-channel integer image (8 or 16 bit), "
                             f"got shape {img.shape} dtype {img.dtype}")
    h, w = img.shape
    H, W = lay.shape
    if el.get("offset") is not None:
        ox, oy, _ = [int(v) for v in ctx.vec(el.get("offset"), el, "offset")]
    else:
        ox, oy = (W - w) // 2, (H - h) // 2
    if ox + w > W or oy + h > H or ox < 0 or oy < 0:
        raise _err(ctx.path, f"{_xml_path(el)}: TIFF {fp} ({w}x{h}) does not fit the lattice at offset ({ox}, {oy})")
    keep = el.get("keepIDs", "false").strip().lower() in ("true", "1")
    colour_to_id = {}
    for row in range(h):
        for col in range(w):
            c = int(img[row, col])
            if c == 0:
                continue
            if c not in colour_to_id:
                colour_to_id[c] = lay.new_id(t, c if keep else None)
            lay.put(oy + row, ox + col, colour_to_id[c])


# ------------------------------------------------------------------------------------------------------
# main parser
# ------------------------------------------------------------------------------------------------------
_TOP = {"Description", "Global", "Space", "Time", "CellTypes", "CPM", "CellPopulations", "Analysis"}


def parse_model(path, *, seed: int | None = None) -> ParsedModel:
    """Parse a MorpheusML file (``.xml`` or ``.xml.gz``) into plain data; see the module docstring."""
    path = Path(path)
    root = _read_root(path)
    if root.tag != "MorpheusModel":
        raise _err(path, f"root element is <{root.tag}>, expected <MorpheusModel>")
    if root.get("version") != "4":
        raise _err(path, f"MorpheusModel version {root.get('version')!r} is not supported (version 4 only)")
    ctx = _Ctx(path, seed)
    for c in _children(root):
        if c.tag not in _TOP:
            raise _err(path, f"unsupported element <{c.tag}>")
        if c.tag in ("Description", "Analysis"):
            ctx.ignored.append(c.tag)
    # --- space
    lat = root.find("Space/Lattice")
    if lat is None:
        raise _err(path, "no Space/Lattice")
    if lat.get("class") not in ("square", "cubic"):
        raise _err(path, f"Space/Lattice class {lat.get('class')!r} is not supported (square, cubic)")
    nd = 3 if lat.get("class") == "cubic" else 2
    for c in _children(root.find("Space")):
        if c.tag not in ("Lattice", "SpaceSymbol"):
            raise _err(path, f"unsupported element <{_xml_path(c)}>")
    space_symbol = "l"
    ss_el = root.find("Space/SpaceSymbol")
    if ss_el is not None and ss_el.get("symbol"):
        space_symbol = ss_el.get("symbol")
    size_el = lat.find("Size")
    if size_el is None:
        raise _err(path, "Space/Lattice has no Size")
    sz = ctx.vec(size_el.get("value"), size_el, "size")
    W, H, D = int(sz[0]), int(sz[1]), int(sz[2])
    if nd == 2 and D > 1:
        raise _err(path, f"Space/Lattice class 'square' with size z = {D}: use class 'cubic' for a 3-D lattice")
    if W < 1 or H < 1 or (nd == 3 and D < 1):
        raise _err(path, f"bad lattice size {sz}")
    shape = (H, W) if nd == 2 else (D, H, W)
    size_sym = (size_el.get("symbol") or "size")
    ctx.env.update({f"{size_sym}.x": float(W), f"{size_sym}.y": float(H), f"{size_sym}.z": float(D if nd == 3 else 0)})
    conds = {c.get("boundary"): c.get("type") for c in lat.findall("BoundaryConditions/Condition")}
    axes = "xyz"[:nd]
    if any(conds.get(a) != "periodic" for a in axes):
        raise _err(path, f"Space/Lattice/BoundaryConditions {conds} are not supported: the importer needs "
                         f"periodic boundaries in {' and '.join(axes)}")
    for c in _children(lat):
        if c.tag not in ("Size", "BoundaryConditions", "Neighborhood", "NodeLength", "Annotation"):
            raise _err(path, f"unsupported element <{_xml_path(c)}>")
    default_order = _order(lat.find("Neighborhood"), path, default=1, nd=nd)
    order_sizes, magno = (SQUARE_ORDER_SIZES, MAGNO_NORM) if nd == 2 else (CUBIC_ORDER_SIZES, CUBIC_MAGNO_NORM)
    # --- global
    fields_el = {}
    glob = root.find("Global")
    if glob is not None:
        for c in _children(glob):
            if c.tag == "Constant":
                ctx.env[c.get("symbol")] = ctx.num(c.get("value"), c, "value")
            elif c.tag == "Field":
                fields_el[c.get("symbol")] = c
            elif c.tag == "Annotation":
                continue
            else:
                raise _err(path, f"unsupported element <{_xml_path(c)}>")
    # --- time
    meta = {"path": str(path), "ignored": ctx.ignored}
    time_el = root.find("Time")
    if time_el is not None:
        for c in _children(time_el):
            if c.tag in ("StartTime", "StopTime", "RandomSeed", "SaveInterval"):
                meta[{"StartTime": "start_time", "StopTime": "stop_time", "RandomSeed": "random_seed",
                      "SaveInterval": "save_interval"}[c.tag]] = ctx.num(c.get("value"), c, "value")
            elif c.tag in ("TimeSymbol", "Annotation"):
                continue
            else:
                raise _err(path, f"unsupported element <{_xml_path(c)}>")
    if ctx.seed is None and "random_seed" in meta:
        ctx.seed = int(meta["random_seed"])
    # --- cell types
    cts = root.findall("CellTypes/CellType")
    if not cts:
        raise _err(path, "no CellTypes/CellType")
    media = [i for i, c in enumerate(cts) if c.get("class") == "medium"]
    if len(media) > 1:
        raise _err(path, "more than one medium CellType")
    medium_el = cts[media[0]] if media else None
    bio = [c for c in cts if c.get("class") != "medium"]
    for c in bio:
        if c.get("class") != "biological":
            raise _err(path, f"<{_xml_path(c)}> class {c.get('class')!r} is not supported (biological, medium)")
    type_names = [medium_el.get("name") if medium_el is not None else "medium"] + [c.get("name") for c in bio]
    tindex = {n: i for i, n in enumerate(type_names)}
    nt = len(type_names)
    lam, tgt = np.zeros(nt), np.zeros(nt)
    has_volume = False
    hapto = {}      # field symbol -> mu array
    dm_strength, dm_dir, has_dm = np.zeros(nt), [None] * nt, False
    for t, ct in ([(0, medium_el)] if medium_el is not None else []) + [(i + 1, c) for i, c in enumerate(bio)]:
        # constant cell properties feed this type's expressions (nothing imported can change them)
        tenv = dict(ctx.env)
        for c in _children(ct):
            if c.tag in ("Property", "Constant"):
                tenv[c.get("symbol")] = ctx.num(c.get("value"), c, "value", tenv)
        for c in _children(ct):
            if c.tag == "VolumeConstraint":
                if t == 0:
                    raise _err(path, f"<{_xml_path(c)}>: a VolumeConstraint on the medium is not supported")
                lam[t] = ctx.num(c.get("strength"), c, "strength", tenv)
                tgt[t] = ctx.num(c.get("target"), c, "target", tenv)
                has_volume = True
            elif c.tag == "Haptotaxis":
                sym = c.get("attractant")
                if sym not in fields_el:
                    raise _err(path, f"<{_xml_path(c)}>: attractant {sym!r} is not a Global/Field (only field "
                                     "attractants can be imported)")
                s = ctx.num(c.get("strength"), c, "strength", tenv)
                mu = hapto.setdefault(sym, np.zeros(nt))
                if t == 0:
                    mu[1:] += s       # medium term folded into the biological types (+ a constant)
                else:
                    mu[t] += -s
            elif c.tag == "DirectedMotion":
                if t == 0:
                    raise _err(path, f"<{_xml_path(c)}>: DirectedMotion on the medium is not supported")
                for flag in ("protrusion", "retraction"):
                    if c.get(flag, "true").strip().lower() != "true":
                        raise _err(path, f"<{_xml_path(c)}>: {flag}='{c.get(flag)}' is not supported")
                dm_strength[t] = ctx.num(c.get("strength"), c, "strength", tenv)
                dm_dir[t] = _direction(ctx, c, (W, H, D if nd == 3 else 0), tenv)
                has_dm = True
            elif c.tag in ("Annotation", "Property", "Constant"):
                continue
            else:
                raise _err(path, f"unsupported element <{_xml_path(c)}> (CellType {ct.get('name')!r})")
    # --- CPM
    cpm = root.find("CPM")
    if cpm is None:
        raise _err(path, "no CPM element")
    for c in _children(cpm):
        if c.tag not in ("Interaction", "MonteCarloSampler", "ShapeSurface", "Annotation"):
            raise _err(path, f"unsupported element <{_xml_path(c)}>")
    ss = cpm.find("ShapeSurface")
    contact_order = (_order(ss.find("Neighborhood"), path, default_order, nd) if ss is not None
                     else default_order)
    scaling = ss.get("scaling", "norm") if ss is not None else "norm"
    if contact_order not in order_sizes:
        raise _err(path, f"ShapeSurface neighbourhood order {contact_order} is outside 1..{max(order_sizes)} "
                         f"(the {lat.get('class')} orders whose neighbourhoods match the package's)")
    if scaling == "none":
        div = 1.0
    elif scaling == "size":
        div = float(order_sizes[contact_order])
    elif scaling in ("norm", "magno"):
        div = magno[contact_order]
    else:
        raise _err(path, f"CPM/ShapeSurface scaling {scaling!r} is not supported (none, size, norm)")
    J = np.zeros((nt, nt))
    inter = cpm.find("Interaction")
    if inter is not None:
        if inter.get("negative", "false").strip().lower() == "true":
            raise _err(path, "CPM/Interaction negative='true' is not supported")
        default = ctx.num(inter.get("default", "0"), inter, "default")
        J[:] = default
        for c in _children(inter):
            if c.tag == "Annotation":
                continue
            if c.tag != "Contact":
                raise _err(path, f"unsupported element <{_xml_path(c)}>")
            if _children(c):
                raise _err(path, f"unsupported element <{_xml_path(_children(c)[0])}> inside a Contact")
            a, b = c.get("type1"), c.get("type2")
            for n in (a, b):
                if n not in tindex:
                    raise _err(path, f"<{_xml_path(c)}>: unknown cell type {n!r}")
            J[tindex[a], tindex[b]] = J[tindex[b], tindex[a]] = ctx.num(c.get("value"), c, "value")
    J = J / div
    J[0, 0] = 0.0
    mcs = cpm.find("MonteCarloSampler")
    if mcs is None:
        raise _err(path, "no CPM/MonteCarloSampler")
    stepper = mcs.get("stepper", "edgelist")
    if stepper not in ("random", "edgelist"):
        raise _err(path, f"MonteCarloSampler stepper {stepper!r} is not supported")
    for c in _children(mcs):
        if c.tag not in ("MCSDuration", "Neighborhood", "MetropolisKinetics", "Annotation"):
            raise _err(path, f"unsupported element <{_xml_path(c)}>")
    copy_order = _order(mcs.find("Neighborhood"), path, None, nd)
    if copy_order is None:
        raise _err(path, "CPM/MonteCarloSampler has no Neighborhood")
    if copy_order not in order_sizes:
        raise _err(path, f"CPM/MonteCarloSampler neighbourhood order {copy_order} is outside 1..{max(order_sizes)} "
                         f"(the {lat.get('class')} orders whose neighbourhoods match the package's)")
    mk = mcs.find("MetropolisKinetics")
    if mk is None:
        raise _err(path, "CPM/MonteCarloSampler has no MetropolisKinetics")
    if mk.get("yield") is not None and ctx.num(mk.get("yield"), mk, "yield") != 0:
        raise _err(path, "MetropolisKinetics yield != 0 is not supported")
    temperature = ctx.num(mk.get("temperature"), mk, "temperature")
    if not temperature > 0:
        raise _err(path, f"MetropolisKinetics temperature must be > 0, got {temperature}")
    dur = mcs.find("MCSDuration")
    meta.update({"stepper": stepper, "scaling": scaling, "contact_scaling_divisor": div,
                 "mcs_duration": ctx.num(dur.get("value"), dur, "value") if dur is not None else 1.0,
                 "type_names": type_names})
    # --- terms
    terms, tens = [], []
    terms.append({"kind": "contact", "scale": 1.0, "params": {"J": J.tolist(), "order": int(contact_order)}})
    tens.append({})
    if has_volume:
        terms.append({"kind": "volume", "scale": 1.0, "params": {"lambda": lam.tolist(), "target": tgt.tolist()}})
        tens.append({})
    for sym, mu in hapto.items():
        mu = mu.copy()
        mu[0] = 0.0
        terms.append({"kind": "external", "scale": 1.0, "params": {"mu": mu.tolist()}})
        tens.append({"field": _read_field(ctx, fields_el[sym], shape, space_symbol)})
    if has_dm:
        terms.append({"kind": "directed_motion", "scale": 1.0,
                      "params": {"strength": dm_strength.tolist(), "direction": dm_dir}})
        tens.append({})
    # --- populations
    state = _populations(ctx, root, shape, tindex, path)
    meta["seed"] = ctx.seed
    return ParsedModel(shape, True, int(copy_order), int(contact_order), float(temperature), type_names, terms,
                       tens, state, meta)


def _populations(ctx, root, shape, tindex, path):
    pops = root.findall("CellPopulations/Population")
    if root.find("CellPopulations") is None:
        return None
    for c in _children(root.find("CellPopulations")):
        if c.tag in ("BoundaryValue", "BoundaryValues") and not len(c):
            continue   # empty, as in Morpheus checkpoints; boundary values matter only off a torus
        if c.tag not in ("Population", "Annotation"):
            raise _err(path, f"unsupported element <{_xml_path(c)}>")
    lay = _Layout(ctx, shape)
    # explicit ids first, so that generated ids do not collide with them (Morpheus would refuse a clash)
    for pop in pops:
        for cell in pop.findall("Cell"):
            if cell.get("id") is not None:
                lay.next_id = max(lay.next_id, int(cell.get("id")) + 1)
    for pop in pops:
        tname = pop.get("type")
        if tname not in tindex:
            raise _err(path, f"<{_xml_path(pop)}>: unknown cell type {tname!r}")
        t = tindex[tname]
        for c in _children(pop):
            if t == 0:
                # the medium population of a checkpoint lists the medium cell; the medium is id 0 here
                if c.tag in ("Cell", "Annotation"):
                    continue
                raise _err(path, f"unsupported element <{_xml_path(c)}> in the medium population")
            if c.tag == "Cell":
                cid = c.get("id")
                if cid is None:
                    raise _err(path, f"<{_xml_path(c)}> without id")
                cid = lay.new_id(t, int(cid))
                if cid < 1:
                    raise _err(path, f"<{_xml_path(c)}>: cell id must be >= 1")
                for sub in _children(c):
                    if sub.tag not in ("Nodes", "Center", "Property", "PropertyVector", "Annotation"):
                        raise _err(path, f"unsupported element <{_xml_path(sub)}>")
                for site in _parse_nodes(ctx, c, c.findtext("Nodes"), shape):
                    lay.put(*site, cid)
            elif c.tag in ("InitCircle", "TIFFReader") and len(shape) == 3:
                raise _err(path, f"<{_xml_path(c)}> is not supported on a cubic lattice (Cell/Nodes and "
                                 "InitRectangle random are)")
            elif c.tag == "InitCircle":
                _init_circle(ctx, lay, c, t)
            elif c.tag == "InitRectangle":
                _init_rectangle(ctx, lay, c, t)
            elif c.tag == "TIFFReader":
                _tiff_reader(ctx, lay, c, t, Path(path).parent)
            elif c.tag == "Annotation":
                continue
            else:
                raise _err(path, f"unsupported element <{_xml_path(c)}>")
    n = max([0] + list(lay.types)) + 1
    types = np.zeros(n, dtype=np.int32)
    for cid, t in lay.types.items():
        types[cid] = t
    if lay.skipped:
        ctx.ignored.append(f"{lay.skipped} node(s) of overlapping cells (Morpheus skips occupied nodes too)")
    return CellState(lay.ids.astype(np.int32), types, {"path": str(path), "frame": None, "periodic": True})


def build_hamiltonian(parsed: ParsedModel):
    """The package Hamiltonian of a parsed model (term kinds from the registry)."""
    import torch

    from neuralcpm_plugin.hamiltonian.base import Hamiltonian, term_class
    lattice = parsed.lattice_spec()
    terms = []
    for spec, tens in zip(parsed.terms, parsed.tensors):
        t = {k: torch.as_tensor(np.asarray(v, dtype=np.float64)) for k, v in tens.items()}
        terms.append(term_class(spec["kind"]).from_spec(spec, t, lattice))
    return Hamiltonian(terms, lattice, parsed.temperature, parsed.type_names)


def load_model(path, *, seed: int | None = None) -> ImportedModel:
    """Read a MorpheusML model into ``ImportedModel(hamiltonian, state, meta)``.

    Parameters
    ----------
    path : str or Path
        ``.xml`` or a Morpheus checkpoint ``.xml.gz``.
    seed : int, optional
        Seed of the random initial layouts (InitCircle/InitRectangle random); default ``Time/RandomSeed``.

    Raises
    ------
    ModelImportError
        An unsupported element or value, naming it and the file.
    """
    parsed = parse_model(path, seed=seed)
    meta = dict(parsed.meta)
    meta.update({"copy_order": parsed.copy_order, "contact_order": parsed.contact_order,
                 "temperature": parsed.temperature, "shape": tuple(parsed.shape)})
    return ImportedModel(build_hamiltonian(parsed), parsed.state, meta)
