"""Cell-type maps for label images: which type each cell id has.

A label image (TIFF, cellpose mask) holds only cell ids; the type of each cell comes from a *type map*:

* a JSON file ``{"1": 1, "2": 2, "7": 1}`` (keys: cell ids, values: types ``1..T``; key ``"0"`` may be
  given and must map to 0), or a JSON object ``{"types": {...}}`` with that mapping inside;
* a CSV file with two integer columns ``id,type`` (an optional header line ``id,type``; ``#`` comments);
* in Python: a ``dict`` ``{id: type}``, a per-id table (sequence/array, ``table[id]`` = type), or one
  ``int`` giving every cell that type.

Beside an image ``name.tif`` the reader looks for ``name.types.json`` then ``name.types.csv`` (sidecar).
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..lattice import MAX_ID

__all__ = ["check_n_types", "find_sidecar", "read_type_map", "states_from_labels", "type_table",
           "write_type_map"]

SIDECAR_SUFFIXES = (".types.json", ".types.csv")


def _int_value(v, what: str, path, where: str) -> int:
    """A JSON/CSV value as a non-negative int (``"3"``, ``3`` and ``3.0`` accepted)."""
    if isinstance(v, bool):
        raise DataError(f"{where}: {what} must be an integer, got {v!r}", path=path)
    if isinstance(v, int):
        out = v
    elif isinstance(v, float) and v.is_integer():
        out = int(v)
    elif isinstance(v, str):
        try:
            out = int(v.strip())
        except ValueError:
            raise DataError(f"{where}: {what} must be an integer, got {v!r}", path=path) from None
    else:
        raise DataError(f"{where}: {what} must be an integer, got {v!r}", path=path)
    if out < 0:
        raise DataError(f"{where}: negative {what} {out}", path=path)
    if out > MAX_ID:
        raise DataError(f"{where}: {what} {out} is too large (at most {MAX_ID})", path=path)
    return out


def _add(mapping: dict, cid: int, t: int, path, where: str) -> None:
    if cid == 0 and t != 0:
        raise DataError(f"{where}: the medium (id 0) must have type 0, got {t}", path=path)
    if cid != 0 and t == 0:
        raise DataError(f"{where}: cell {cid} has type 0, which is reserved for the medium", path=path)
    if cid in mapping and mapping[cid] != t:
        raise DataError(f"{where}: cell {cid} is given two types ({mapping[cid]} and {t})", path=path)
    mapping[cid] = t


def read_type_map(path) -> dict[int, int]:
    """Read a JSON or CSV type map file → ``{cell id: type}``.

    Raises
    ------
    DataError
        Unreadable file, bad JSON/CSV, non-integer or negative ids/types, an id given two types.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError("type map file not found", path=path) from None
    except UnicodeDecodeError as e:
        raise DataError(f"type map is not UTF-8 text ({e.reason} at byte {e.start})", path=path) from None
    except IsADirectoryError:
        raise DataError("type map is a directory, expected a JSON or CSV file", path=path) from None
    mapping: dict[int, int] = {}
    if path.suffix.lower() == ".json":
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"corrupt JSON type map: {e.msg} (line {e.lineno}, column {e.colno})",
                            path=path) from None
        if isinstance(doc, dict) and isinstance(doc.get("types"), dict):
            doc = doc["types"]
        if not isinstance(doc, dict):
            raise DataError('a JSON type map must be an object {"cell id": type, ...}, got '
                            f"{type(doc).__name__}", path=path)
        for k, v in doc.items():
            where = f"entry {k!r}"
            _add(mapping, _int_value(k, "cell id", path, where), _int_value(v, "cell type", path, where),
                 path, where)
        return mapping
    if path.suffix.lower() != ".csv":
        raise DataError("a type map must be a .json or .csv file", path=path)
    rows = csv.reader(text.splitlines())
    for lineno, row in enumerate(rows, start=1):
        cells = [c.strip() for c in row]
        if not cells or not any(cells) or cells[0].startswith("#"):
            continue
        where = f"line {lineno}"
        if len(cells) < 2 or any(cells[2:]):
            raise DataError(f"{where}: expected two columns 'id,type', got {row!r}", path=path)
        if lineno == 1 and not cells[0].lstrip("-").isdigit():
            continue  # header
        _add(mapping, _int_value(cells[0], "cell id", path, where), _int_value(cells[1], "cell type", path, where),
             path, where)
    return mapping


def write_type_map(path, mapping) -> Path:
    """Write ``{cell id: type}`` (medium excluded) as JSON (``.json``) or CSV (``.csv``); return the path."""
    path = Path(path)
    items = sorted((int(k), int(v)) for k, v in dict(mapping).items() if int(k) != 0)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        if path.suffix.lower() == ".csv":
            f.write("id,type\n")
            f.writelines(f"{k},{v}\n" for k, v in items)
        else:
            json.dump({str(k): v for k, v in items}, f, indent=0)
            f.write("\n")
    os.replace(tmp, path)
    return path


def find_sidecar(image_path) -> Path | None:
    """The type-map file beside ``image_path`` (``<stem>.types.json`` / ``.csv``), or None.

    For a cellpose ``name_seg.npy`` both ``name_seg.types.*`` and ``name.types.*`` are tried.
    """
    p = Path(image_path)
    stems = [p.name[: -len(p.suffix)] if p.suffix else p.name]
    if stems[0].endswith("_seg"):
        stems.append(stems[0][: -len("_seg")])
    for stem in stems:
        for suf in SIDECAR_SUFFIXES:
            cand = p.with_name(stem + suf)
            if cand.is_file():
                return cand
    return None


def _normalise(types, *, path=None):
    """``types=`` argument → ``(kind, value, source)`` with kind in {"const", "dict", "table"}."""
    source = None
    if isinstance(types, (str, os.PathLike)):
        source = str(types)
        types = read_type_map(types)
    if isinstance(types, (bool, np.bool_)) or types is None:
        raise DataError(f"types= must be a dict {{id: type}}, a per-id table, an int or a JSON/CSV file, got "
                        f"{types!r}", path=path)
    if isinstance(types, (int, np.integer)):
        if types < 1:
            raise DataError(f"the single cell type must be >= 1, got {types}", path=path)
        return "const", int(types), source
    if isinstance(types, dict):
        mapping: dict[int, int] = {}
        for k, v in types.items():
            where = f"type map entry {k!r}"
            _add(mapping, _int_value(k, "cell id", path, where), _int_value(v, "cell type", path, where), path,
                 where)
        return "dict", mapping, source
    arr = np.asarray(types)
    if arr.ndim != 1 or arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"a type table must be a 1-D integer sequence (table[id] = type), got shape {arr.shape} "
                        f"dtype {arr.dtype}", path=path)
    return "table", arr.astype(np.int64), source


def _lookup(spec, cells: np.ndarray, *, path=None, frame=None) -> np.ndarray:
    """Types of the (non-zero) cell ids ``cells`` under a normalised type map."""
    kind, value, source = spec
    src = f" in the type map {source}" if source else " in the types= map"
    if kind == "const":
        return np.full(len(cells), value, dtype=np.int64)
    if kind == "dict":
        missing = [int(c) for c in cells if int(c) not in value]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise DataError(f"cell id {missing[0]}{more} has no entry{src}", path=path, frame=frame)
        return np.array([value[int(c)] for c in cells], dtype=np.int64)
    if cells.size and cells.max() >= len(value):
        raise DataError(f"cell id {int(cells.max())} has no entry in the type table (length {len(value)})",
                        path=path, frame=frame)
    out = value[cells]
    if out.size and out.min() < 1:
        bad = int(np.argmax(out < 1))
        raise DataError(f"cell {int(cells[bad])} has type {int(out[bad])}{src}; cell types must be >= 1 "
                        "(0 is the medium)", path=path, frame=frame)
    return out


def type_table(types, ids_present, *, path=None, frame=None) -> np.ndarray:
    """Per-id type table (length ``max id + 1``) for the ids present in an image.

    Parameters
    ----------
    types : dict, sequence/ndarray, int, str or PathLike
        ``{id: type}``; a per-id table; one type for every cell; or a JSON/CSV type map file.
    ids_present : array of int
        The ids in the image (medium and repeats allowed).
    path, frame : where the ids came from (for messages).
    """
    ids_present = np.unique(np.asarray(ids_present, dtype=np.int64))
    cells = ids_present[ids_present != 0]
    table = np.zeros(int(ids_present.max()) + 1 if ids_present.size else 1, dtype=np.int64)
    table[cells] = _lookup(_normalise(types, path=path), cells, path=path, frame=frame)
    return table


def check_n_types(states, n_types: int | None) -> None:
    """Raise :class:`DataError` (naming file and frame) if a present cell has a type above ``n_types``."""
    if n_types is None:
        return
    for s in states:
        cells = s.cell_ids()
        if cells.size:
            t = s.types[cells]
            if t.max() > n_types:
                i = int(np.argmax(t))
                raise DataError(f"cell {int(cells[i])} has type {int(t[i])}, outside the declared range 1..{n_types}",
                                path=s.meta.get("path"), frame=s.meta.get("frame"))


def states_from_labels(stack, types, *, path, n_types: int | None = None, meta: dict | None = None):
    """Label images (one type map for all frames) → states.

    Parameters
    ----------
    stack : ndarray of int, shape ``(frames, *S)``
        Cell ids per frame (0 = medium).
    types : type map argument (see :func:`type_table`), or None to use the sidecar beside ``path``.
    path : the image file (messages, sidecar lookup).
    n_types : declared number of biological types (checked).
    meta : extra entries for every state's ``meta``.

    Ids larger than ``max(2**24, 4 × sites)`` are relabelled to ``1..N`` jointly over the frames (so a cell
    keeps one id across frames); the original ids are then in ``meta["original_ids"]`` (index = new id).
    """
    from ..lattice import MAX_TABLE, CellState, _as_int_array, _check_id_range

    path = Path(path)
    stack = np.asarray(stack)
    if not (stack.dtype != bool and np.issubdtype(stack.dtype, np.integer)):
        stack = np.stack([_as_int_array(stack[f], "cell ids", path=path, frame=f) for f in range(stack.shape[0])])
    for f in range(stack.shape[0]):
        _check_id_range(stack[f], "cell id", path=path, frame=f)
    if types is None:
        side = find_sidecar(path)
        if side is None:
            raise DataError("no cell-type map: pass types= (a dict {id: type}, a JSON/CSV file, or one int for a "
                            f"single type) or put {path.stem}.types.json beside the image", path=path)
        types = side
    spec = _normalise(types, path=path)
    present = np.unique(stack)
    n_sites = int(np.prod(stack.shape[1:]))
    original = None
    if present.size and int(present.max()) > max(MAX_TABLE, 4 * n_sites):
        original = present if present[0] == 0 else np.concatenate([[0], present])
        new_stack = np.searchsorted(original, stack).astype(np.int32)
    else:
        new_stack = stack.astype(np.int32)
    n = int(new_stack.max()) + 1 if new_stack.size else 1
    states = []
    for f in range(stack.shape[0]):
        cells = np.unique(stack[f])
        cells = cells[cells != 0]
        table = np.zeros(n, dtype=np.int32)
        new_cells = cells if original is None else np.searchsorted(original, cells)
        table[new_cells] = _lookup(spec, cells, path=path, frame=f)
        m = {"path": str(path), "frame": f, **(meta or {})}
        if spec[2] is not None:
            m["type_map"] = spec[2]
        if original is not None:
            m["original_ids"] = original
        states.append(CellState(new_stack[f], table, m))
    check_n_types(states, n_types)
    return states
