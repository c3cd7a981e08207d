"""cellpose ``_seg.npy`` segmentations (``masks``: integer label image, 0 = background).

cellpose saves a Python dict with ``numpy.save``, i.e. as a *pickle*. Unpickling can run arbitrary code, so
this reader never calls ``numpy.load(allow_pickle=True)``: it parses the ``.npy`` header itself and unpickles
the payload with :class:`RestrictedUnpickler`, which admits only numpy arrays, dtypes and scalars and plain
Python containers (dict, list, tuple, set, str, bytes, numbers). Anything else is refused with a
:class:`~neuralcpm_plugin.errors.DataError` suggesting a TIFF export of the masks.

A plain (non-pickled) integer ``.npy`` array is read as a label image as well. A 2-D mask is one 2-D
frame; a 3-D mask ``(Z, Y, X)`` is one 3-D frame. cellpose has no cell types: they come from the ``types=``
argument or a sidecar ``<name>_seg.types.json`` / ``<name>.types.json`` (see :mod:`.typemap`).
"""

from __future__ import annotations

import codecs
import io
import pickle
import struct
import warnings
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..lattice import CellState
from ._npy import read_npy_array, read_npy_header
from .typemap import states_from_labels

__all__ = ["RestrictedUnpickler", "read_cellpose", "safe_unpickle"]

try:  # numpy >= 2
    from numpy._core.multiarray import _reconstruct, scalar
    from numpy._core.numeric import _frombuffer
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct, scalar
    from numpy.core.numeric import _frombuffer

MAX_BYTES = 2 ** 32
"""Largest ``_seg.npy`` file the reader accepts (bytes)."""

_EXPORT_HINT = ("export the masks as a TIFF label image instead, e.g. "
                "tifffile.imwrite('masks.tif', numpy.load(path, allow_pickle=True).item()['masks']) "
                "on a file you trust")


def _latin1_encode(obj, encoding="latin1", errors="strict"):
    """``_codecs.encode`` as used by protocol-2 pickles for ``bytes``; only the latin-1 codec."""
    if codecs.lookup(encoding).name != "iso8859-1":
        raise pickle.UnpicklingError(f"refused codec {encoding!r}")
    return codecs.encode(obj, "latin1", errors)


_SAFE_GLOBALS = {}
for _mod in ("numpy._core.multiarray", "numpy.core.multiarray"):
    _SAFE_GLOBALS[(_mod, "_reconstruct")] = _reconstruct
    _SAFE_GLOBALS[(_mod, "scalar")] = scalar
for _mod in ("numpy._core.numeric", "numpy.core.numeric"):
    _SAFE_GLOBALS[(_mod, "_frombuffer")] = _frombuffer
_SAFE_GLOBALS[("numpy", "ndarray")] = np.ndarray
_SAFE_GLOBALS[("numpy", "dtype")] = np.dtype
for _mod in ("builtins", "__builtin__"):
    for _name, _obj in (("complex", complex), ("set", set), ("frozenset", frozenset), ("slice", slice),
                        ("bytearray", bytearray)):
        _SAFE_GLOBALS[(_mod, _name)] = _obj
_SAFE_GLOBALS[("_codecs", "encode")] = _latin1_encode


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only numpy array/dtype/scalar constructors and plain builtins.

    Any other global (``os.system``, ``builtins.eval``, arbitrary classes) raises :class:`DataError`.
    """

    def __init__(self, file, *, path=None):
        super().__init__(file)
        self._path = path

    def find_class(self, module, name):
        try:
            return _SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise DataError(f"refused to unpickle {module}.{name}: only numpy arrays and plain containers are "
                            f"read from pickled files; {_EXPORT_HINT}", path=self._path) from None

    def persistent_load(self, pid):
        raise DataError(f"refused a persistent pickle id; {_EXPORT_HINT}", path=self._path)


# what pickle / numpy raise on a corrupt pickle stream (found by fuzzing)
_PICKLE_ERRORS = (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError, OverflowError,
                  struct.error, AttributeError, RecursionError)


def safe_unpickle(data: bytes, *, path=None):
    """Unpickle ``data`` with :class:`RestrictedUnpickler`; corrupt streams raise :class:`DataError`."""
    try:
        with warnings.catch_warnings():  # numpy warns about odd dtype arguments in corrupt streams
            warnings.simplefilter("ignore")
            return RestrictedUnpickler(io.BytesIO(data), path=path).load()
    except DataError:
        raise
    except MemoryError:
        raise DataError("corrupt pickle payload (it asks for more memory than is available)", path=path) from None
    except _PICKLE_ERRORS as e:
        raise DataError(f"corrupt or truncated pickle payload ({type(e).__name__}: {e})", path=path) from None


def _read_masks(path: Path) -> np.ndarray:
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise DataError(f"the file is {size} bytes, more than the limit {MAX_BYTES}", path=path)
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError("file not found", path=path) from None
    except OSError as e:
        raise DataError(f"cannot read the file ({e})", path=path) from None
    f = io.BytesIO(raw)
    shape, fortran, dtype = read_npy_header(f, path=path, what="cellpose .npy file")
    if not dtype.hasobject:
        return read_npy_array(f, shape, fortran, dtype, len(raw) - f.tell(), path=path, what="cellpose .npy file")
    if tuple(shape) != ():
        raise DataError(f"expected a pickled dict (a 0-d object array) as cellpose writes, got an object array of "
                        f"shape {tuple(shape)}; {_EXPORT_HINT}", path=path)
    obj = safe_unpickle(raw[f.tell():], path=path)
    if isinstance(obj, np.ndarray) and obj.dtype.hasobject and obj.shape == ():
        obj = obj.item()
    if not isinstance(obj, dict):
        raise DataError(f"expected a cellpose dict with 'masks', got {type(obj).__name__}", path=path)
    if "masks" not in obj:
        keys = ", ".join(sorted(map(str, obj))[:12]) or "none"
        raise DataError(f"no 'masks' in the cellpose file (keys: {keys})", path=path)
    masks = obj["masks"]
    if not isinstance(masks, np.ndarray):
        raise DataError(f"'masks' must be an array, got {type(masks).__name__}", path=path)
    return masks


def read_cellpose(path, *, types=None, n_types: int | None = None) -> list[CellState]:
    """Read a cellpose ``_seg.npy`` (or a plain integer ``.npy`` label array) → ``[state]``.

    Parameters
    ----------
    path : str or PathLike
    types : type map (dict ``{id: type}``, per-id table, one int, or a JSON/CSV file); default: the sidecar.
    n_types : int, optional
        Declared number of biological types (checked).
    """
    path = Path(path)
    masks = _read_masks(path)
    if masks.dtype.hasobject or masks.dtype == bool or masks.dtype.kind not in "iuf":
        raise DataError(f"'masks' must be an integer label image, got dtype {masks.dtype}", path=path)
    if masks.ndim not in (2, 3):
        raise DataError(f"wrong number of dimensions: masks of shape {masks.shape}, expected (H, W) or (Z, H, W)",
                        path=path)
    if min(masks.shape) == 0:
        raise DataError(f"empty masks of shape {masks.shape}", path=path)
    return states_from_labels(masks[None], types, path=path, n_types=n_types, meta={"format": "cellpose"})
