"""Reading ``.npy`` array data defensively (never unpickling, never trusting declared sizes)."""

from __future__ import annotations

import math
import tokenize

import numpy as np

from ..errors import DataError

__all__ = ["read_npy_array", "read_npy_header"]


def read_npy_header(f, *, path, what: str):
    """Read the magic string and header of an ``.npy`` stream → ``(shape, fortran_order, dtype)``.

    Raises :class:`DataError` naming ``what`` (e.g. "member 'data.npy'") when the header is not valid.
    """
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            return np.lib.format.read_array_header_1_0(f)
        if version == (2, 0):
            return np.lib.format.read_array_header_2_0(f)
        if version == (3, 0):
            from numpy.lib import _format_impl  # the public module has no reader for 3.0 headers

            return _format_impl._read_array_header(f, version)
    except (ValueError, EOFError, SyntaxError, TypeError, UnicodeDecodeError, tokenize.TokenError) as e:
        # numpy raises ValueError for a bad magic string / header; its header parsing (tokenize + ast) may
        # raise TokenError or SyntaxError
        raise DataError(f"{what}: not a valid .npy array ({e})", path=path) from None
    raise DataError(f"{what}: unsupported .npy format version {version}", path=path)


def read_npy_array(f, shape, fortran: bool, dtype: np.dtype, available: int | None, *, path, what: str) -> np.ndarray:
    """Read the data part of an ``.npy`` stream whose header was read by :func:`read_npy_header`.

    ``available`` is the number of bytes the container says are left (file/member size minus header);
    a header declaring more data than that is refused *before* allocating (a truncated or corrupt file).
    """
    if dtype.hasobject:
        raise DataError(f"{what}: holds Python objects (dtype {dtype}); only plain numeric arrays are read "
                        "(pickled data is never loaded)", path=path)
    count = math.prod(int(n) for n in shape)
    nbytes = count * dtype.itemsize
    if available is not None and nbytes > available:
        raise DataError(f"{what}: truncated or corrupt: the header declares shape {tuple(shape)} of {dtype} "
                        f"({nbytes} bytes) but only {available} bytes follow", path=path)
    data = f.read(nbytes)
    if len(data) != nbytes:
        raise DataError(f"{what}: truncated: expected {nbytes} bytes of array data, got {len(data)}", path=path)
    try:
        return np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C").copy()
    except ValueError as e:  # e.g. a structured dtype numpy cannot view
        raise DataError(f"{what}: cannot interpret the array data ({e})", path=path) from None
