"""The reference interchange form: ``.npz`` with ``data`` of shape ``(frames, 2, H, W)``.

Keys (``../shared/reference-data/README.md``):

* ``data`` — int array ``(frames, 2, *S)`` (channel 0 = cell id, 1 = cell type, indexed ``[f, c, y, x]``) or
  ``(frames, *S, 2)``; a single frame ``(2, H, W)`` / ``(H, W, 2)`` is accepted as well.
* ``mcs`` — optional, ``(frames,)`` int: the Monte Carlo step of each frame (→ ``state.meta["mcs"]``).
* ``label`` — optional, any plain array (e.g. a class label; → ``state.meta["label"]``).

Other plain arrays are kept in ``state.meta["extra"]``. The file is read member by member with size checks,
never with ``allow_pickle``.
"""

from __future__ import annotations

import io
import os
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np

from .._fsutil import clean_stale
from ..errors import DataError
from ..lattice import CellState, states_from_channels, states_to_channels
from ._npy import read_npy_array, read_npy_header
from .typemap import check_n_types

__all__ = ["read_npz", "save_npz"]

MAX_BYTES = 2 ** 32
"""Largest uncompressed array a reader accepts (bytes); larger members are refused before reading."""

# what zipfile / zlib raise for corrupt archives (besides our own DataError):
_ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, struct.error, OverflowError, NotImplementedError,
               ValueError)


def _read_members(path: Path) -> dict[str, np.ndarray]:
    arrays = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if info.is_dir():
                    continue
                name = info.filename
                key = name.removesuffix(".npy")
                what = f"member {name!r}"
                if info.file_size > MAX_BYTES:
                    raise DataError(f"{what} is {info.file_size} bytes uncompressed, more than the limit "
                                    f"{MAX_BYTES}", path=path)
                with zf.open(info) as f:
                    # the member is small relative to MAX_BYTES: read it whole, so zip errors surface here
                    buf = io.BytesIO(f.read())
                shape, fortran, dtype = read_npy_header(buf, path=path, what=what)
                arrays[key] = read_npy_array(buf, shape, fortran, dtype, info.file_size - buf.tell(), path=path,
                                             what=what)
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError("file not found", path=path) from None
    except OSError as e:  # unreadable file, or a seek outside it in a corrupt archive
        raise DataError(f"cannot read the .npz file ({e})", path=path) from None
    except zipfile.BadZipFile as e:
        raise DataError(f"not a valid .npz (zip) file, or truncated ({e})", path=path) from None
    except RuntimeError as e:  # zipfile: encrypted member
        raise DataError(f"cannot read the .npz archive ({e})", path=path) from None
    except _ZIP_ERRORS as e:
        raise DataError(f"corrupt .npz archive ({type(e).__name__}: {e})", path=path) from None
    return arrays


def read_npz(path, *, n_types: int | None = None) -> list[CellState]:
    """Read a reference ``.npz`` file → one :class:`CellState` per frame.

    Parameters
    ----------
    path : str or PathLike
    n_types : int, optional
        Declared number of biological types; a type above it is a :class:`DataError`.

    Returns
    -------
    list of CellState
        ``meta`` holds ``path``, ``frame`` and, when present in the file, ``mcs`` and ``label``.
    """
    path = Path(path)
    arrays = _read_members(path)
    if "data" not in arrays:
        keys = ", ".join(sorted(arrays)) or "none"
        raise DataError(f"no 'data' array in the .npz (keys: {keys}); expected data of shape (frames, 2, H, W)",
                        path=path)
    states = states_from_channels(arrays["data"], path=path)
    mcs = arrays.get("mcs")
    if mcs is not None and (mcs.ndim != 1 or len(mcs) != len(states) or mcs.dtype == bool
                            or not np.issubdtype(mcs.dtype, np.integer)):
        raise DataError(f"'mcs' must be an integer array of length {len(states)} (one entry per frame), got "
                        f"shape {mcs.shape} dtype {mcs.dtype}", path=path)
    label = arrays.get("label")
    extra = {k: v for k, v in arrays.items() if k not in ("data", "mcs", "label")}
    for f, s in enumerate(states):
        if mcs is not None:
            s.meta["mcs"] = int(mcs[f])
        if label is not None:
            s.meta["label"] = label.tolist()
        if extra:
            s.meta["extra"] = extra
    check_n_types(states, n_types)
    return states


def save_npz(path, states, *, compress: bool = True, **extra) -> Path:
    """Write states (one lattice size) as a reference ``.npz``; return the path.

    ``data`` is int32 ``(frames, 2, *S)``; ``mcs`` is written from ``extra["mcs"]`` or, when every state has
    ``meta["mcs"]``, from those. Further keyword arrays (e.g. ``label=3``) are stored as they are. The file
    is written to a temporary sibling and renamed into place (an existing file survives a failed write).
    """
    path = Path(path)
    if isinstance(states, CellState):
        states = [states]
    states = list(states)
    arrays = {"data": states_to_channels(states)}
    if "data" in extra:
        raise DataError("'data' is written from the states; pass other arrays as keywords", path=path)
    if "mcs" not in extra and states and all("mcs" in s.meta for s in states):
        arrays["mcs"] = np.array([s.meta["mcs"] for s in states], dtype=np.int64)
    for k, v in extra.items():
        a = np.asarray(v)
        if a.dtype.hasobject:
            raise DataError(f"extra array {k!r} holds Python objects; only plain arrays can be stored", path=path)
        arrays[k] = a
    if "mcs" in extra and (arrays["mcs"].shape != (len(states),)):
        raise DataError(f"'mcs' must have one entry per state ({len(states)}), got shape {arrays['mcs'].shape}",
                        path=path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path)           # temporaries of writes that were killed
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            (np.savez_compressed if compress else np.savez)(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
