"""A dataset: the snapshots in a directory (or matching a glob), validated together.

Every file with a supported suffix (``.npz``, ``.tif``/``.tiff``, ``.npy``, ``.piff``) is read with
:func:`~neuralcpm_plugin.io.load_states`; type-map sidecars (``*.types.json|csv``) and CC3DML files are
used by the readers, not read as snapshots. All states must share one lattice shape.
"""

from __future__ import annotations

import glob as _glob
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..lattice import CellState, states_to_channels

__all__ = ["SNAPSHOT_SUFFIXES", "Dataset", "load_dataset"]

SNAPSHOT_SUFFIXES = (".npz", ".tif", ".tiff", ".npy", ".piff")


@dataclass
class Dataset:
    """Validated snapshots of one lattice shape.

    Attributes
    ----------
    states : list of CellState
        All frames of all files, file by file in sorted order (``meta["path"]``, ``meta["frame"]`` say where
        each came from).
    files : list of Path
        The files read, in order.
    """

    states: list[CellState]
    files: list[Path]
    source: str = ""

    def __len__(self) -> int:
        return len(self.states)

    def __iter__(self):
        return iter(self.states)

    def __getitem__(self, i):
        return self.states[i]

    @property
    def shape(self) -> tuple[int, ...]:
        """Lattice shape shared by every state."""
        return self.states[0].shape

    @property
    def n_types(self) -> int:
        """Largest cell type present in any state."""
        return max(s.n_types for s in self.states)

    def trajectories(self) -> dict[Path, list[CellState]]:
        """States grouped by file (a trajectory per file, frames in order)."""
        out: dict[Path, list[CellState]] = {}
        for s in self.states:
            out.setdefault(Path(s.meta.get("path", "")), []).append(s)
        return out

    def to_channels(self) -> np.ndarray:
        """All states as the interchange array ``(frames, 2, *S)`` int32."""
        return states_to_channels(self.states)


def _expand(source) -> tuple[list[Path], str]:
    if isinstance(source, (list, tuple)):
        return [Path(p) for p in source], f"{len(source)} listed files"
    text = os.fspath(source)
    p = Path(text)
    if p.is_dir():
        files = sorted(q for q in p.iterdir() if q.is_file() and not q.name.startswith(".")
                       and q.suffix.lower() in SNAPSHOT_SUFFIXES)
        return files, text
    if _glob.has_magic(text):
        files = sorted(Path(q) for q in _glob.glob(text, recursive=True) if Path(q).is_file()
                       and Path(q).suffix.lower() in SNAPSHOT_SUFFIXES)
        return files, text
    if p.is_file():
        return [p], text
    raise DataError("no such file or directory", path=text)


def load_dataset(source, *, types=None, n_types: int | None = None, shape=None, ndim: int = 2,
                 anisotropic: str = "error") -> Dataset:
    """Read every snapshot file of a directory, a glob pattern or a list of files into one :class:`Dataset`.

    Parameters
    ----------
    source : str, PathLike or list of them
        A directory (its files with a supported suffix, sorted by name), a glob such as ``"runs/*.npz"``
        (``**`` recursive), or explicit files.
    types, n_types, shape, ndim, anisotropic : passed to :func:`~neuralcpm_plugin.io.load_states` for every
        file (``ndim=3``: TIFF stacks are 3-D volumes).

    Raises
    ------
    DataError
        No snapshot files; a file that does not load; lattices of different shapes (the message names a file
        of each shape); a type above ``n_types``.
    """
    from . import load_states

    files, where = _expand(source)
    if not files:
        raise DataError(f"empty dataset: no snapshot files ({', '.join('*' + s for s in SNAPSHOT_SUFFIXES)}) in "
                        f"{where}")
    states: list[CellState] = []
    first = None  # (shape, file, frame) of the first state
    for f in files:
        got = load_states(f, types=types, n_types=n_types, shape=shape, ndim=ndim, anisotropic=anisotropic)
        for s in got:
            if first is None:
                first = (s.shape, f, s.meta.get("frame"))
            elif s.shape != first[0]:
                raise DataError(f"mixed lattice sizes in one dataset: {first[1]} (frame {first[2]}) has shape "
                                f"{first[0]} but {f} (frame {s.meta.get('frame')}) has shape {s.shape}", path=where)
        states.extend(got)
    return Dataset(states, files, where)
