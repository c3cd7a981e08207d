"""Morpheus outputs as snapshots: TiffPlotter stacks and ``.xml.gz`` checkpoints.

* :func:`read_tiff_stack` — a ``TiffPlotter`` file (``timelapse="true"``): Morpheus writes one page per
  (time, z-slice, channel), channels innermost, 16-bit signed integers (``format="16bit"``), rows = y, no
  flip. With channels ``cell.id`` and ``cell.type`` (the exporter's choice, and the file name
  ``cell.id_cell.type.tif`` says so) every time point becomes one :class:`CellState`. ``cell.type`` is the
  CellType's document position (medium first), which is the package's type index for models written by
  :mod:`morpheus_xml.export`.
* :func:`read_checkpoint` — a checkpoint (``Time/SaveInterval``; file ``[Title][time].xml.gz``): the full
  model with every cell's ``Nodes``. Node coordinates may lie outside the lattice (Morpheus stores them
  unwrapped across periodic boundaries); they are wrapped. ``state.meta["time"]`` is the checkpoint time.

Bad files raise :class:`~neuralcpm_plugin.errors.DataError` naming the file (and frame).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from neuralcpm_plugin.errors import DataError
from neuralcpm_plugin.lattice import CellState

__all__ = ["checkpoint_time", "find_checkpoints", "read_checkpoint", "read_tiff_stack"]


def _channels_from_name(path: Path):
    stem = path.name[:-4] if path.name.endswith(".tif") else path.stem
    stem = re.sub(r"_\d+(\.\d+)?$", "", stem)   # non-timelapse files carry "_<time>"
    parts = stem.split("_")
    # symbols contain dots ("cell.id"); split on '_' only between symbols
    return parts


def read_tiff_stack(path, *, channels=None, id_channel: str = "cell.id", type_channel: str = "cell.type"):
    """Read a Morpheus TiffPlotter stack into a list of :class:`CellState` (one per time point).

    Parameters
    ----------
    path : str or Path
        The ``.tif`` file.
    channels : list of str, optional
        The channel symbols in the order of the ``TiffPlotter``'s ``Channel`` elements; default: parsed from
        the file name (``cell.id_cell.type.tif`` → ``["cell.id", "cell.type"]``).
    """
    import tifffile

    path = Path(path)
    try:
        with tifffile.TiffFile(path) as tf:
            pages = [p.asarray() for p in tf.pages]
    except FileNotFoundError:
        raise DataError("no such file", path=path) from None
    except (OSError, ValueError, tifffile.TiffFileError) as e:
        raise DataError(f"not a readable TIFF file ({e})", path=path) from None
    if not pages:
        raise DataError("the TIFF file holds no pages", path=path)
    channels = list(channels) if channels is not None else _channels_from_name(path)
    if id_channel not in channels or type_channel not in channels:
        raise DataError(f"cannot tell the channels: expected {id_channel!r} and {type_channel!r} among {channels} "
                        "(pass channels=[...] in the order of the TiffPlotter's Channel elements)", path=path)
    nc = len(channels)
    if len(pages) % nc:
        raise DataError(f"{len(pages)} pages are not a whole number of time points of {nc} channels "
                        "(a truncated file, or a 3-D stack?)", path=path)
    shapes = {p.shape for p in pages}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise DataError(f"pages must be 2-D single-channel images of one size, got shapes {sorted(shapes)}",
                        path=path)
    ci, ct = channels.index(id_channel), channels.index(type_channel)
    states = []
    for f in range(len(pages) // nc):
        ids = np.asarray(pages[f * nc + ci]).astype(np.int64)
        tmap = np.asarray(pages[f * nc + ct]).astype(np.int64)
        if tmap.min() < 0:
            raise DataError(f"negative cell type {int(tmap.min())}", path=path, frame=f)
        ids = np.where(tmap == 0, 0, ids)      # the medium is one "cell" with id 0 in the package
        if np.any((ids <= 0) & (tmap > 0)):
            raise DataError("a biological site carries cell id <= 0 (clashes with the medium)", path=path, frame=f)
        states.append(CellState.from_maps(ids.astype(np.int32), tmap.astype(np.int32), path=path, frame=f))
    return states


def _read_xml(path: Path):
    """The root element; size-limited (gzip decompressed in chunks), lxml without huge_tree or entities."""
    from neuralcpm_plugin._xmlsafe import parse_xml_bytes, read_xml_bytes

    def error(msg):
        return DataError(msg, path=path)
    return parse_xml_bytes(read_xml_bytes(path, error), error)


def checkpoint_time(path) -> float:
    """The simulation time stored in a checkpoint (``Time/StartTime``)."""
    root = _read_xml(Path(path))
    el = root.find("Time/StartTime")
    if el is None:
        raise DataError("no Time/StartTime in the checkpoint", path=path)
    return float(el.get("value"))


def read_checkpoint(path) -> CellState:
    """A Morpheus checkpoint (or any MorpheusML model whose populations are ``Cell/Nodes``) as a state.

    Type indices: the medium CellType is 0, biological CellTypes 1..T in document order. A cubic lattice
    (``Size`` x, y, z with z > 1) gives a 3-D state ``ids[z, y, x]``; node positions are wrapped into the lattice.
    """
    path = Path(path)
    root = _read_xml(path)
    if root.tag != "MorpheusModel":
        raise DataError(f"root element <{root.tag}> is not <MorpheusModel>", path=path)
    size = root.find("Space/Lattice/Size")
    if size is None:
        raise DataError("no Space/Lattice/Size", path=path)
    try:
        sx, sy, *rest = [int(float(v)) for v in size.get("value").split(",")]
    except (ValueError, AttributeError):
        raise DataError(f"cannot read the lattice size {size.get('value')!r}", path=path) from None
    sz = rest[0] if rest and rest[0] > 1 else 0
    cts = root.findall("CellTypes/CellType")
    bio = [c.get("name") for c in cts if c.get("class") != "medium"]
    tindex = {n: i + 1 for i, n in enumerate(bio)}
    for c in cts:
        if c.get("class") == "medium":
            tindex[c.get("name")] = 0
    ids = np.zeros((sz, sy, sx) if sz else (sy, sx), dtype=np.int64)
    types = {}
    for pop in root.findall("CellPopulations/Population"):
        t = tindex.get(pop.get("type"))
        if t is None:
            raise DataError(f"population of unknown cell type {pop.get('type')!r}", path=path)
        if t == 0:
            continue
        for cell in pop.findall("Cell"):
            cid = int(cell.get("id"))
            if cid < 1:
                raise DataError(f"cell id {cid} < 1", path=path)
            types[cid] = t
            text = cell.findtext("Nodes") or ""
            for chunk in text.split(";"):
                chunk = chunk.strip()
                if not chunk:
                    continue
                v = [int(float(p)) for p in chunk.replace(",", " ").split()]
                if len(v) < 2 or (sz and len(v) < 3):
                    raise DataError(f"cell {cid}: bad node {chunk!r}", path=path)
                if sz:
                    ids[v[2] % sz, v[1] % sy, v[0] % sx] = cid
                else:
                    ids[v[1] % sy, v[0] % sx] = cid
    n = max([0] + list(types)) + 1
    tt = np.zeros(n, dtype=np.int32)
    for cid, t in types.items():
        tt[cid] = t
    st = root.find("Time/StartTime")
    meta = {"path": str(path), "frame": None, "time": float(st.get("value")) if st is not None else None}
    return CellState(ids.astype(np.int32), tt, meta)


def find_checkpoints(outdir) -> list[Path]:
    """The checkpoint files in a Morpheus output folder, sorted by their stored time."""
    files = sorted(Path(outdir).glob("*.xml.gz"))
    return sorted(files, key=checkpoint_time)
