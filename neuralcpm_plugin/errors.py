"""Exception types of the package.

Every error caused by bad input is a :class:`NeuralCPMError` (or a subclass) whose message names the
file (and frame, where there is one) and the problem, so a user can fix the input without a debugger.
"""

from __future__ import annotations

import os


class NeuralCPMError(Exception):
    """Base class of every error the package raises on purpose."""


class DataError(NeuralCPMError, ValueError):
    """Invalid lattice data: wrong shape/dtype, inconsistent type map, corrupt or truncated file.

    Parameters
    ----------
    message : str
        What is wrong.
    path : str or os.PathLike, optional
        The file the data came from; prefixed to the message.
    frame : int, optional
        The frame index inside that file; added to the prefix.
    """

    def __init__(self, message: str, *, path: str | os.PathLike | None = None, frame: int | None = None):
        self.path = None if path is None else os.fspath(path)
        self.frame = frame
        self.reason = message
        where = []
        if self.path is not None:
            where.append(self.path)
        if frame is not None:
            where.append(f"frame {frame}")
        prefix = (", ".join(where) + ": ") if where else ""
        super().__init__(prefix + message)


class BundleError(NeuralCPMError, ValueError):
    """A model bundle that cannot be read or written (unknown version, unknown term kind, bad weights)."""


class ConfigError(NeuralCPMError, ValueError):
    """A training/export configuration that is invalid (unknown key, incompatible model and data)."""


class ModelImportError(NeuralCPMError, ValueError):
    """A CC3D or Morpheus model that cannot be imported (unsupported element, bad value)."""


class ExportError(NeuralCPMError):
    """A model that cannot be exported to a host tool, or a host tool run that failed."""
