"""Readers and writers of lattice snapshots, with validation.

Supported formats (:func:`load_states` picks one by suffix, then by content):

========================  ==================================  ======================================
format                    read                                write
========================  ==================================  ======================================
reference ``.npz``        ``data`` (frames,2,H,W)/(frames,    :func:`save_npz`
                          H,W,2), optional ``mcs``, ``label``
TIFF label image/stack    ids per pixel + type map            :func:`save_tiff` (+ ``.types.json``)
                          (``types=`` or sidecar)
cellpose ``_seg.npy``     ``masks`` + type map; restricted    –
                          unpickler (numpy + containers only)
CompuCell3D PIFF          ``id type x1 x2 y1 y2 z1 z2``       :func:`save_piff`
directory / glob          :func:`load_dataset`                –
========================  ==================================  ======================================

Every problem with the input is a :class:`~neuralcpm_plugin.errors.DataError` whose message names the file
(and frame or line) and the problem.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import DataError
from ..lattice import CellState
from .cellpose import RestrictedUnpickler, read_cellpose, safe_unpickle
from .dataset import SNAPSHOT_SUFFIXES, Dataset, load_dataset
from .npz import read_npz, save_npz
from .piff import read_cc3dml_info, read_piff, save_piff
from .tiff import read_tiff, save_tiff
from .typemap import check_n_types, find_sidecar, read_type_map, type_table, write_type_map

__all__ = [
    "SNAPSHOT_SUFFIXES", "Dataset", "RestrictedUnpickler", "check_n_types", "detect_format", "find_sidecar",
    "load_dataset", "load_states", "read_cc3dml_info", "read_cellpose", "read_npz", "read_piff", "read_tiff",
    "read_type_map", "safe_unpickle", "save_npz", "save_piff", "save_tiff", "type_table", "write_type_map",
]

_SUFFIX_FORMAT = {".npz": "npz", ".tif": "tiff", ".tiff": "tiff", ".npy": "cellpose", ".piff": "piff"}


def detect_format(path) -> str:
    """``"npz"``, ``"tiff"``, ``"cellpose"`` or ``"piff"`` from the suffix, else from the first bytes."""
    path = Path(path)
    fmt = _SUFFIX_FORMAT.get(path.suffix.lower())
    if fmt is not None:
        return fmt
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except FileNotFoundError:
        raise DataError("file not found", path=path) from None
    except IsADirectoryError:
        raise DataError("is a directory; use load_dataset() to read a directory of snapshots", path=path) from None
    except OSError as e:
        raise DataError(f"cannot read the file ({e})", path=path) from None
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "npz"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if head.startswith(b"\x93NUMPY"):
        return "cellpose"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None:
        first = next((ln.split() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")), [])
        if len(first) in (8, 9) and all(t.lstrip("-").isdigit() for t in first[-6:]):
            return "piff"
    raise DataError("unrecognised file format; supported: .npz (reference interchange), .tif/.tiff (label "
                    "image + type map), _seg.npy (cellpose), .piff (CompuCell3D)", path=path)


def load_states(path, *, types=None, n_types: int | None = None, shape=None, ndim: int = 2,
                anisotropic: str = "error") -> list[CellState]:
    """Read one snapshot file → a list of :class:`CellState` (one per frame), validated.

    Parameters
    ----------
    path : str or PathLike
        ``.npz``, ``.tif``/``.tiff``, ``.npy`` (cellpose ``_seg.npy`` or a plain label array), ``.piff``; other
        suffixes are recognised by content.
    types : optional
        For label images (TIFF, cellpose): the cell-type map — dict ``{id: type}``, per-id table, one int for
        all cells, or a JSON/CSV file; default the sidecar ``<stem>.types.json|csv``. For PIFF: a dict
        ``{type name: number}`` (other forms are ignored for PIFF). Ignored for ``.npz`` (which carries its
        types).
    n_types : int, optional
        Declared number of biological types; a cell of a higher type is an error.
    shape : tuple, optional
        Lattice shape for PIFF (which does not store it).
    ndim : 2 or 3
        Lattice dimension for TIFF stacks: 2 reads ``(frames, H, W)`` as a time series, 3 reads ``(D, H, W)``
        as one volume (a contradiction with the file's ImageJ/OME metadata is an error). Other formats carry
        their dimension (npz ``(frames, 2, D, H, W)``, PIFF z ranges, cellpose 3-D masks ``(Z, Y, X)``).
    anisotropic : "error" or "ignore"
        TIFF only: a non-cubic voxel size in the metadata is an error (default) or ignored.

    Raises
    ------
    DataError
        Any problem with the file; the message names the file, and the frame or line.
    """
    path = Path(path)
    if path.is_dir():
        raise DataError("is a directory; use load_dataset() to read a directory of snapshots", path=path)
    if not path.exists():
        raise DataError("file not found", path=path)
    fmt = detect_format(path)
    if fmt == "npz":
        return read_npz(path, n_types=n_types)
    if fmt == "tiff":
        return read_tiff(path, types=types, n_types=n_types, ndim=ndim, anisotropic=anisotropic)
    if fmt == "cellpose":
        return read_cellpose(path, types=types, n_types=n_types)
    # for PIFF only a {type name: number} map applies (an {id: type} map for label images is ignored)
    names = types if isinstance(types, dict) and types and all(isinstance(k, str) for k in types) else None
    return read_piff(path, types=names, shape=shape, n_types=n_types)

