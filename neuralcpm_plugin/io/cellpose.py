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

import io
import math
import pickle
import re
import struct
from pathlib import Path
from typing import ClassVar

import numpy as np

from ..errors import DataError
from ..lattice import CellState
from ._npy import read_npy_array, read_npy_header
from .typemap import states_from_labels

__all__ = ["RestrictedUnpickler", "read_cellpose", "safe_unpickle"]

MAX_BYTES = 2 ** 32
"""Largest ``_seg.npy`` file the reader accepts (bytes)."""

_EXPORT_HINT = ("export the masks as a TIFF label image instead, e.g. "
                "tifffile.imwrite('masks.tif', numpy.load(path, allow_pickle=True).item()['masks']) "
                "on a file you trust")

# Plain dtypes an array in a pickle may have (numpy's own pickle codes): bool, ints, floats, complex,
# object (for the dict holder and lists of objects), fixed-length strings/bytes.
_DTYPE_CODE = re.compile(r"^(b1|[iu][1248]|f[248]|c(8|16)|O8?|[US]\d{1,7})$")
_MAX_DEPTH = 64


class _Refused(pickle.UnpicklingError):
    """A pickle stream asking for something the restricted unpickler does not build."""


class _DtypeStub:
    """Stands in for ``numpy.dtype(code, align, copy)`` + ``__setstate__``; builds only plain dtypes."""

    def __init__(self, code="", align=False, copy=True, *rest):
        if not isinstance(code, str) or not _DTYPE_CODE.match(code):
            raise _Refused(f"refused dtype {code!r}")
        self.code = code
        self.order = "="

    def __setstate__(self, state):
        if not isinstance(state, tuple) or len(state) < 5 or any(x is not None for x in state[2:5]):
            raise _Refused("refused a structured or sub-array dtype")
        if state[1] in ("<", ">"):
            self.order = state[1]

    def build(self) -> np.dtype:
        d = np.dtype(self.code)
        if self.order in ("<", ">") and d.kind not in "bOS":
            d = d.newbyteorder(self.order)
        return d


class _ArrayStub:
    """Stands in for ``numpy.core.multiarray._reconstruct(ndarray, ...)`` + ``ndarray.__setstate__``."""

    def __init__(self):
        self.state = None

    def __setstate__(self, state):
        self.state = state


_NDARRAY = object()  # stands in for the class numpy.ndarray (only ever passed to _reconstruct)


def _reconstruct_stub(cls, shape=None, code=None):
    if cls is not _NDARRAY:
        raise _Refused("refused an ndarray subclass")
    return _ArrayStub()


def _check_shape(shape) -> tuple[int, ...]:
    if not isinstance(shape, tuple) or len(shape) > 32 or not all(
            isinstance(n, int) and not isinstance(n, bool) and 0 <= n < 2 ** 40 for n in shape):
        raise _Refused(f"bad array shape {shape!r}")
    return shape


def _from_bytes(raw, dtype: np.dtype, shape, fortran: bool) -> np.ndarray:
    if not isinstance(raw, (bytes, bytearray)):
        raise _Refused(f"array data must be bytes, got {type(raw).__name__}")
    count = math.prod(shape)
    if count * dtype.itemsize != len(raw):
        raise _Refused(f"array data has {len(raw)} bytes, expected {count * dtype.itemsize} for shape {shape} "
                       f"of {dtype}")
    return np.frombuffer(bytes(raw), dtype=dtype).reshape(shape, order="F" if fortran else "C").copy(order="K")


def _scalar_stub(dtype, raw=None):
    if not isinstance(dtype, _DtypeStub):
        raise _Refused("bad numpy scalar")
    d = dtype.build()
    if d.kind == "O":
        return raw
    return _from_bytes(raw, d, (), False)[()]


def _frombuffer_stub(buf, dtype, shape, order="C"):
    if not isinstance(dtype, _DtypeStub) or dtype.build().kind == "O":
        raise _Refused("bad array buffer")
    return _from_bytes(buf, dtype.build(), _check_shape(shape), order == "F")


def _latin1_encode(obj, encoding="latin1", errors="strict"):
    """``_codecs.encode`` as used by protocol-2 pickles for ``bytes``; only the latin-1 codec."""
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1", "iso8859-1") or errors != "strict":
        raise _Refused(f"refused codec call encode({type(obj).__name__}, {encoding!r})")
    return obj.encode("latin1")


def _bytes_stub(data=b"", encoding=None):
    """``bytes`` from bytes or a latin-1 string only (never ``bytes(n)``, which allocates n bytes)."""
    if isinstance(data, (bytes, bytearray)) and encoding is None:
        return bytes(data)
    if isinstance(data, str) and encoding in ("latin1", "latin-1", "iso8859-1"):
        return data.encode("latin1")
    raise _Refused("refused a bytes/bytearray call")


def _bytearray_stub(data=b"", encoding=None):
    return bytearray(_bytes_stub(data, encoding))


_SAFE_GLOBALS = {}
for _mod in ("numpy._core.multiarray", "numpy.core.multiarray"):
    _SAFE_GLOBALS[(_mod, "_reconstruct")] = _reconstruct_stub
    _SAFE_GLOBALS[(_mod, "scalar")] = _scalar_stub
for _mod in ("numpy._core.numeric", "numpy.core.numeric"):
    _SAFE_GLOBALS[(_mod, "_frombuffer")] = _frombuffer_stub
_SAFE_GLOBALS[("numpy", "ndarray")] = _NDARRAY
_SAFE_GLOBALS[("numpy", "dtype")] = _DtypeStub
for _mod in ("builtins", "__builtin__"):
    for _name, _obj in (("complex", complex), ("set", set), ("frozenset", frozenset), ("bytearray", _bytearray_stub),
                        ("bytes", _bytes_stub)):
        _SAFE_GLOBALS[(_mod, _name)] = _obj
_SAFE_GLOBALS[("_codecs", "encode")] = _latin1_encode


class RestrictedUnpickler(pickle._Unpickler):  # the pure-Python unpickler, see below
    """An unpickler that admits only numpy arrays/dtypes/scalars and plain Python containers.

    numpy objects are never built by the pickle machinery: stand-ins record the constructor arguments and
    :func:`safe_unpickle` builds the arrays afterwards with ``numpy.frombuffer`` from validated dtypes,
    shapes and byte counts. Any other global (``os.system``, ``builtins.eval``, arbitrary classes) raises
    :class:`DataError`.

    It derives from the pure-Python unpickler: the C one (``_pickle``) allocates its memo table by the largest
    memo index in the stream (a corrupt ``LONG_BINPUT`` asks for gigabytes and hangs) and misbehaves on some
    corrupt ``BYTEARRAY8`` streams; the Python one keeps the memo in a dict and only reads what is there.
    """

    dispatch: ClassVar[dict] = dict(pickle._Unpickler.dispatch)

    def __init__(self, file, *, path=None, limit: int | None = None):
        super().__init__(file)
        self._path = path
        self._limit = limit  # no byte string may be longer than the stream itself

    def _load_bytearray8(self):
        # pickle's version allocates bytearray(n) before reading: a corrupt n would ask for exabytes
        (n,) = struct.unpack("<Q", self.read(8))
        if self._limit is not None and n > self._limit:
            raise _Refused(f"BYTEARRAY8 of {n} bytes in a stream of {self._limit} bytes")
        data = self.read(n)
        if len(data) != n:
            raise pickle.UnpicklingError("pickle data was truncated")
        self.append(bytearray(data))

    dispatch[pickle.BYTEARRAY8[0]] = _load_bytearray8

    def find_class(self, module, name):
        try:
            return _SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise DataError(f"refused to unpickle {module}.{name}: only numpy arrays and plain containers are "
                            f"read from pickled files; {_EXPORT_HINT}", path=self._path) from None

    def persistent_load(self, pid):
        raise DataError(f"refused a persistent pickle id; {_EXPORT_HINT}", path=self._path)


def _materialise(obj, depth: int = 0):
    """Replace the stand-ins in an unpickled object by real numpy arrays (validated)."""
    if depth > _MAX_DEPTH:
        raise _Refused("nesting too deep")
    if isinstance(obj, _ArrayStub):
        st = obj.state
        if not isinstance(st, tuple) or len(st) != 5 or not isinstance(st[2], _DtypeStub):
            raise _Refused("bad array state")
        _, shape, dtype, fortran, raw = st
        shape, dtype = _check_shape(shape), dtype.build()
        if dtype.kind == "O":
            if not isinstance(raw, list) or len(raw) != math.prod(shape):
                raise _Refused("bad object-array state")
            out = np.empty(len(raw), dtype=object)
            for i, x in enumerate(raw):
                out[i] = _materialise(x, depth + 1)
            return out.reshape(shape, order="F" if fortran else "C")
        return _from_bytes(raw, dtype, shape, bool(fortran))
    if isinstance(obj, (_DtypeStub,)):
        return obj.build()
    if isinstance(obj, dict):
        return {k: _materialise(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_materialise(v, depth + 1) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_materialise(v, depth + 1) for v in obj)
    return obj


# what the pure-Python unpickler raises on a corrupt stream (found by fuzzing 40,000 mutated cellpose pickles):
# KeyError (unknown opcode, missing memo entry), UnicodeDecodeError/ValueError (bad text or number literals),
# EOFError / UnpicklingError (truncated), IndexError (empty stack), struct.error (short length fields),
# TypeError / AttributeError (an opcode applied to the wrong kind of object), OverflowError (absurd sizes)
_PICKLE_ERRORS = (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError, OverflowError,
                  AttributeError, struct.error)


def safe_unpickle(data: bytes, *, path=None):
    """Unpickle ``data`` with :class:`RestrictedUnpickler` and build its arrays; errors are :class:`DataError`."""
    try:
        return _materialise(RestrictedUnpickler(io.BytesIO(data), path=path, limit=len(data)).load())
    except DataError:
        raise
    except _Refused as e:
        raise DataError(f"refused pickle content ({e}); {_EXPORT_HINT}", path=path) from None
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
