"""CompuCell3D PIFF files (Potts Initial File Format), read and write.

Each line is ``cell_id type_name x1 x2 y1 y2 z1 z2``: the box ``x1..x2 × y1..y2 × z1..z2`` (inclusive)
belongs to cell ``cell_id`` of type ``type_name``. A cell may span several lines (boxes); later boxes
overwrite earlier ones where they overlap. The clustered form with a leading cluster id (9 columns,
``cluster_id cell_id type x1 x2 y1 y2 z1 z2``) is read too (cluster ids are ignored). Blank lines and
lines starting with ``#`` are skipped. Type ``Medium`` (any case) sets sites to the medium.

Orientation: ``x`` is the column and ``y`` the row, so a box sets ``ids[y1:y2+1, x1:x2+1]`` (``[z, y, x]``
in 3-D) — the orientation of ``../shared/reference-data``.

Type numbers: from ``types=`` (``{name: number}``, medium = 0), else from a CC3DML file ``<stem>.xml``
beside the PIFF (its ``CellType`` plugin), else in order of first appearance (1, 2, ...).
Lattice shape: ``shape=``, else the CC3DML ``Potts/Dimensions``, else the bounding box of all boxes.
Cell ids are kept when they are all >= 1; otherwise (PIFF ids starting at 0) cells are renumbered 1..N in
order of first appearance and the PIFF ids are kept in ``meta["piff_ids"]`` (index = new id).
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..lattice import MAX_ID, CellState
from .typemap import check_n_types

__all__ = ["read_cc3dml_info", "read_piff", "save_piff"]

MAX_SITES = 2 ** 30
"""Largest lattice (sites) a PIFF may describe."""


def read_cc3dml_info(xml_path) -> tuple[tuple[int, ...] | None, dict[str, int] | None]:
    """``(shape, {type name: number})`` from a CC3DML file (``Potts/Dimensions``, ``CellType`` plugin).

    ``shape`` is ``(y, x)`` for ``z == 1`` and ``(z, y, x)`` otherwise; either entry is None when absent.
    """
    xml_path = Path(xml_path)
    try:
        root = ET.parse(xml_path).getroot()
    except ET.ParseError as e:
        raise DataError(f"corrupt CC3DML file ({e})", path=xml_path) from None
    except OSError as e:
        raise DataError(f"cannot read the CC3DML file ({e})", path=xml_path) from None
    shape = None
    dims = root.find("./Potts/Dimensions")
    if dims is not None:
        try:
            x, y, z = (int(dims.get(k, "1")) for k in ("x", "y", "z"))
        except ValueError:
            raise DataError(f"bad Potts/Dimensions {dict(dims.attrib)}", path=xml_path) from None
        shape = (y, x) if z == 1 else (z, y, x)
    names = None
    for plugin in root.iter("Plugin"):
        if plugin.get("Name") == "CellType":
            names = {}
            for ct in plugin.iter("CellType"):
                try:
                    names[ct.get("TypeName", "")] = int(ct.get("TypeId", ""))
                except ValueError:
                    raise DataError(f"bad CellType entry {dict(ct.attrib)}", path=xml_path) from None
    return shape, names


def _int(tok: str, what: str, path, lineno: int) -> int:
    try:
        v = int(tok)
    except ValueError:
        raise DataError(f"line {lineno}: {what} must be an integer, got {tok!r}", path=path) from None
    if v < 0:
        raise DataError(f"line {lineno}: negative {what} {v}", path=path)
    return v


def read_piff(path, *, types: dict | None = None, shape=None, n_types: int | None = None) -> list[CellState]:
    """Read a PIFF file → ``[state]``.

    Parameters
    ----------
    path : str or PathLike
    types : dict, optional
        ``{type name: type number}`` (``Medium`` → 0 implied). Default: the CC3DML ``<stem>.xml`` beside the
        file, else numbers in order of first appearance.
    shape : tuple, optional
        Lattice shape ``(H, W)`` or ``(D, H, W)``. Default: CC3DML ``Potts/Dimensions``, else the bounding box.
    n_types : int, optional
        Declared number of biological types (checked).
    """
    path = Path(path)
    xml_shape, xml_names = None, None
    side = path.with_suffix(".xml")
    if (types is None or shape is None) and side.is_file():
        xml_shape, xml_names = read_cc3dml_info(side)
    name_map: dict[str, int] = {}  # lower-case name -> number
    display: dict[int, str] = {}  # number -> name as first written
    src = "the types= map"
    if types is None and xml_names is not None:
        types, src = xml_names, str(side)
    if types is not None:
        if not isinstance(types, dict):
            raise DataError(f"types= for a PIFF file must be a dict {{type name: number}}, got {type(types).__name__}",
                            path=path)
        for k, v in types.items():
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0 or v > MAX_ID:
                raise DataError(f"type {k!r} in {src} must map to an integer >= 0, got {v!r}", path=path)
            name_map[str(k).lower()] = int(v)
            display.setdefault(int(v), str(k))
    name_map.setdefault("medium", 0)
    display.setdefault(0, "Medium")
    auto = types is None
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError("file not found", path=path) from None
    except UnicodeDecodeError as e:
        raise DataError(f"not a text PIFF file (byte {e.start} is not UTF-8)", path=path) from None
    except OSError as e:
        raise DataError(f"cannot read the PIFF file ({e})", path=path) from None
    boxes = []  # (pid, type number, x1, x2, y1, y2, z1, z2, lineno)
    type_of: dict[int, tuple[str, int]] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        toks = line.split()
        if not toks or toks[0].startswith("#"):
            continue
        if len(toks) == 9:
            toks = toks[1:]
        if len(toks) != 8:
            raise DataError(f"line {lineno}: expected 8 fields 'cell_id type x1 x2 y1 y2 z1 z2', got {len(toks)}: "
                            f"{line.strip()[:80]!r}", path=path)
        pid = _int(toks[0], "cell id", path, lineno)
        tname = toks[1]
        key = tname.lower()
        if key not in name_map:
            if not auto:
                known = ", ".join(display[v] for v in sorted(display))
                raise DataError(f"line {lineno}: unknown cell type {tname!r} (known from {src}: {known})",
                                path=path)
            name_map[key] = max(name_map.values()) + 1
        tnum = name_map[key]
        x1, x2, y1, y2, z1, z2 = (_int(t, n, path, lineno) for t, n in zip(toks[2:], ("x1", "x2", "y1", "y2", "z1",
                                                                                     "z2")))
        for a, b, n in ((x1, x2, "x"), (y1, y2, "y"), (z1, z2, "z")):
            if a > b:
                raise DataError(f"line {lineno}: empty box: {n}1 = {a} > {n}2 = {b}", path=path)
        display.setdefault(tnum, tname)
        if tnum != 0:
            if pid in type_of and type_of[pid][1] != tnum:
                raise DataError(f"line {lineno}: cell {pid} has type {tname!r} here but {type_of[pid][0]!r} on an "
                                "earlier line", path=path)
            type_of.setdefault(pid, (tname, tnum))
        boxes.append((pid, tnum, x1, x2, y1, y2, z1, z2, lineno))
    if not boxes:
        raise DataError("the PIFF file holds no cells", path=path)
    if shape is None:
        shape = xml_shape
    three_d = any(b[7] > 0 for b in boxes) or (shape is not None and len(shape) == 3)
    if shape is None:
        ext = (max(b[7] for b in boxes) + 1, max(b[5] for b in boxes) + 1, max(b[3] for b in boxes) + 1)
        shape = ext if three_d else ext[1:]
    shape = tuple(int(n) for n in shape)
    if len(shape) not in (2, 3) or min(shape) < 1:
        raise DataError(f"bad lattice shape {shape}", path=path)
    if three_d and len(shape) == 2:
        raise DataError(f"the PIFF has boxes at z > 0 but the lattice shape {shape} is 2-D", path=path)
    if int(np.prod(shape, dtype=np.float64)) > MAX_SITES:
        raise DataError(f"lattice shape {shape} is larger than the limit of {MAX_SITES} sites", path=path)
    full = shape if len(shape) == 3 else (1, *shape)
    # ids: keep the PIFF ids when all cells have ids >= 1, else renumber in order of first appearance
    cell_pids = list(dict.fromkeys(b[0] for b in boxes if b[1] != 0))
    renumber = 0 in type_of or (cell_pids and max(cell_pids) > max(4 * int(np.prod(full)), 2 ** 24))
    new_of = {p: i + 1 for i, p in enumerate(cell_pids)} if renumber else {p: p for p in cell_pids}
    ids = np.zeros(full, dtype=np.int32)
    for pid, tnum, x1, x2, y1, y2, z1, z2, lineno in boxes:
        if x2 >= full[2] or y2 >= full[1] or z2 >= full[0]:
            raise DataError(f"line {lineno}: box x {x1}..{x2}, y {y1}..{y2}, z {z1}..{z2} lies outside the lattice "
                            f"(x < {full[2]}, y < {full[1]}, z < {full[0]})", path=path)
        ids[z1:z2 + 1, y1:y2 + 1, x1:x2 + 1] = 0 if tnum == 0 else new_of[pid]
    table = np.zeros(max(new_of.values(), default=0) + 1, dtype=np.int32)
    for p, (_, t) in type_of.items():
        table[new_of[p]] = t
    meta = {"path": str(path), "frame": 0, "format": "piff",
            "type_names": dict(sorted(display.items()))}
    if renumber:
        meta["piff_ids"] = np.array([0, *cell_pids], dtype=np.int64)
    state = CellState(ids if len(shape) == 3 else ids[0], table, meta)
    check_n_types([state], n_types)
    return [state]


def save_piff(path, state: CellState, type_names) -> Path:
    """Write a state as PIFF; return the path.

    Each cell is written as runs of consecutive sites along x (one line per run); medium sites are not
    written (CC3D fills them with medium). ``type_names`` maps type numbers to names: a list indexed by
    type (medium first, e.g. ``["Medium", "T1", "T2"]``) or a dict ``{number: name}``.
    """
    path = Path(path)
    if isinstance(type_names, dict):
        names = {int(k): str(v) for k, v in type_names.items()}
    else:
        names = dict(enumerate(str(n) for n in type_names))
    for t in np.unique(state.types[state.cell_ids()]).tolist():
        if t not in names:
            raise DataError(f"type {t} has no name in type_names {names}", path=path)
        if not names[t] or any(c.isspace() for c in names[t]) or names[t].lower() == "medium":
            raise DataError(f"type {t} has the name {names[t]!r}; PIFF type names must be non-empty, without "
                            "spaces, and not 'Medium'", path=path)
    ids = state.ids if state.ndim == 3 else state.ids[None]
    lines = []
    for z in range(ids.shape[0]):
        for y in range(ids.shape[1]):
            row = ids[z, y]
            edges = np.flatnonzero(np.diff(row)) + 1
            starts = np.concatenate([[0], edges])
            ends = np.concatenate([edges, [len(row)]]) - 1
            for a, b in zip(starts.tolist(), ends.tolist()):
                c = int(row[a])
                if c:
                    lines.append((c, f"{c} {names[int(state.types[c])]} {a} {b} {y} {y} {z} {z}\n"))
    lines.sort(key=lambda cl: cl[0])  # stable: all boxes of a cell together, cells in id order
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(line for _, line in lines)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
