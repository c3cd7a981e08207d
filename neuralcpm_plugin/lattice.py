"""Lattice state, neighbourhoods and elementary per-state quantities.

Conventions (``../shared/SPEC.md``):

* A state is an integer array ``ids`` of shape ``(H, W)`` (2-D) or ``(D, H, W)`` (3-D) holding cell ids,
  ``0`` = medium, plus a type table ``types`` of shape ``(N + 1,)`` with ``types[0] == 0`` (medium type)
  and ``types[c]`` the type of cell ``c`` (biological types are ``1..T``).
* Arrays are indexed ``[y, x]`` (``[z, y, x]`` in 3-D), the orientation of the reference data.
* Boundaries are periodic (a torus) unless ``periodic=False``.
* Neighbourhood *order* n is the CC3D/Morpheus convention: the sites at the n smallest distinct non-zero
  Euclidean distances. 2-D order 1 = 4 sites, order 2 = 8 (Moore), order 6 = 28.

Everything here is plain numpy and dimension-agnostic.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from functools import cache

import numpy as np

from .errors import DataError

__all__ = [
    "MAX_ID",
    "CellState",
    "boundary_mask",
    "half_offsets",
    "neighbour_offsets",
    "relabel",
    "states_from_channels",
    "states_to_channels",
    "validate_state",
    "volumes",
]


@cache
def _offsets(order: int, ndim: int) -> tuple[tuple[int, ...], ...]:
    if order < 1:
        raise ValueError(f"neighbourhood order must be >= 1, got {order}")
    if ndim < 1:
        raise ValueError(f"lattice dimension must be >= 1, got {ndim}")
    reach = int(np.ceil(np.sqrt(order))) + 2
    while True:
        cands = [o for o in itertools.product(range(-reach, reach + 1), repeat=ndim) if any(o)]
        dists = sorted({sum(c * c for c in o) for o in cands})
        # every squared distance <= reach**2 is complete inside the cube; beyond that some may be missing
        if len(dists) >= order and dists[order - 1] <= reach * reach:
            break
        reach *= 2
    allowed = set(dists[:order])
    chosen = [o for o in cands if sum(c * c for c in o) in allowed]
    # deterministic order: by distance, then lexicographic
    chosen.sort(key=lambda o: (sum(c * c for c in o), o))
    return tuple(chosen)


def neighbour_offsets(order: int = 2, ndim: int = 2) -> np.ndarray:
    """Offsets of the neighbourhood of the given order, shape ``(K, ndim)``, int64.

    >>> neighbour_offsets(1).tolist()
    [[-1, 0], [0, -1], [0, 1], [1, 0]]
    >>> len(neighbour_offsets(2)), len(neighbour_offsets(6))
    (8, 28)
    """
    return np.array(_offsets(int(order), int(ndim)), dtype=np.int64)


def half_offsets(order: int = 2, ndim: int = 2) -> np.ndarray:
    """One offset of each ``±o`` pair: iterating over them visits every unordered neighbour pair once."""
    offs = neighbour_offsets(order, ndim)
    keep = [o for o in offs.tolist() if tuple(o) > tuple(-c for c in o)]
    return np.array(keep, dtype=np.int64)


def _shift(a: np.ndarray, off, periodic: bool, fill=-1) -> np.ndarray:
    """``out[x] = a[x + off]`` (periodic wrap, or ``fill`` outside the lattice; where ``fill`` does not fit
    ``a``'s dtype, e.g. -1 for a sampler's uint16 ids, ``out`` is int64)."""
    if periodic:
        return np.roll(a, shift=tuple(-int(o) for o in off), axis=tuple(range(a.ndim)))
    fits = np.can_cast(np.min_scalar_type(fill), a.dtype)
    out = np.full(a.shape, fill, a.dtype if fits else np.int64)
    src, dst = [], []
    for o, n in zip(off, a.shape):
        o = int(o)
        if abs(o) >= n:  # the whole lattice is shifted out
            return out
        if o >= 0:
            src.append(slice(o, n))
            dst.append(slice(0, n - o))
        else:
            src.append(slice(0, n + o))
            dst.append(slice(-o, n))
    out[tuple(dst)] = a[tuple(src)]
    return out


def boundary_mask(ids: np.ndarray, order: int = 2, periodic: bool = True) -> np.ndarray:
    """Boolean mask of sites with at least one neighbour (of the given order) in another cell.

    >>> ids = np.zeros((4, 4), int); ids[1:3, 1:3] = 1
    >>> int(boundary_mask(ids, order=1).sum())
    12
    """
    ids = np.asarray(ids)
    mask = np.zeros(ids.shape, dtype=bool)
    for off in neighbour_offsets(order, ids.ndim):
        nb = _shift(ids, off, periodic, fill=-1)
        mask |= (nb != ids) & (nb >= 0)
    return mask


def volumes(ids: np.ndarray, n_ids: int | None = None) -> np.ndarray:
    """Number of sites of each id, shape ``(max(ids)+1,)`` or ``(n_ids,)``; entry 0 is the medium."""
    ids = np.asarray(ids)
    if n_ids is None:
        n_ids = int(ids.max()) + 1 if ids.size else 1
    return np.bincount(ids.ravel(), minlength=int(n_ids)).astype(np.int64)


def relabel(ids: np.ndarray, types: np.ndarray | None = None):
    """Relabel ids to ``0..N`` contiguous, keeping their order (increasing old id; 0 stays medium).

    Returns ``(new_ids, new_types, old_of_new)``; ``new_types`` is ``None`` when ``types`` is.
    """
    ids = np.asarray(ids)
    present = np.unique(ids)
    present = present[present != 0]
    old_of_new = np.concatenate([[0], present]).astype(np.int64)
    lut = np.zeros(int(ids.max()) + 1 if ids.size else 1, dtype=np.int64)
    lut[old_of_new] = np.arange(len(old_of_new))
    new_ids = lut[ids].astype(np.int32)
    new_types = None
    if types is not None:
        new_types = np.asarray(types)[old_of_new].astype(np.int32)
    return new_ids, new_types, old_of_new


MAX_ID = np.iinfo(np.int32).max
"""Largest cell id / type a state can hold (states are stored as int32)."""
MAX_TABLE = 2 ** 24
"""Ids above ``max(MAX_TABLE, 4 * sites)`` are refused by :meth:`CellState.from_maps` (type table size)."""


def _as_int_array(a, what: str, *, path=None, frame=None) -> np.ndarray:
    """``a`` as an integer array; integral floats are converted, anything else is a :class:`DataError`."""
    a = np.asarray(a)
    if a.dtype != bool and np.issubdtype(a.dtype, np.integer):
        return a
    if np.issubdtype(a.dtype, np.floating):
        finite = np.isfinite(a)
        bad = ~finite | (a != np.round(np.where(finite, a, 0))) | (np.abs(np.where(finite, a, 0)) > 2.0 ** 62)
        if bad.any():
            pos = tuple(int(i) for i in np.argwhere(bad)[0])
            raise DataError(f"{what} must be integers, got the value {a[pos].item()!r} at index {list(pos)} "
                            f"(dtype {a.dtype})", path=path, frame=frame)
        return a.astype(np.int64)
    raise DataError(f"{what} must be integers, got dtype {a.dtype}", path=path, frame=frame)


def _check_id_range(ids: np.ndarray, what: str, *, path=None, frame=None) -> None:
    """Ids must lie in ``0..MAX_ID``; the message names the first offending site (index order [y, x])."""
    if not ids.size:
        return
    lo, hi = ids.min(), ids.max()
    if lo < 0:
        pos = [int(i) for i in np.argwhere(ids == lo)[0]]
        raise DataError(f"negative {what} {int(lo)} at index {pos}", path=path, frame=frame)
    if int(hi) > MAX_ID:
        pos = [int(i) for i in np.argwhere(ids == hi)[0]]
        raise DataError(f"{what} {int(hi)} at index {pos} is too large (at most {MAX_ID})", path=path, frame=frame)


def validate_state(ids, types, *, path=None, frame=None, n_types: int | None = None, ndim=(2, 3)):
    """Check a state and return it as ``(int32 ids, int32 types)``; raise :class:`DataError` otherwise.

    Checks: integer dtype, 2-D/3-D, non-negative ids, a type for every id present, ``types[0] == 0``
    (medium), biological cells of type >= 1, types within ``0..n_types`` if given.
    """
    ids = _as_int_array(ids, "cell ids", path=path, frame=frame)
    types = np.asarray(types)
    if ids.ndim not in ndim:
        raise DataError(f"a lattice must have {' or '.join(map(str, ndim))} dimensions, got shape "
                        f"{ids.shape}", path=path, frame=frame)
    if ids.size == 0 or min(ids.shape) == 0:
        raise DataError(f"empty lattice of shape {ids.shape}", path=path, frame=frame)
    _check_id_range(ids, "cell id", path=path, frame=frame)
    if types.ndim != 1 or (types.size and not np.issubdtype(types.dtype, np.integer)):
        raise DataError(f"the type table must be a 1-D integer array, got shape {types.shape} dtype "
                        f"{types.dtype}", path=path, frame=frame)
    if ids.max() >= len(types):
        raise DataError(f"cell id {int(ids.max())} has no entry in the type table (length {len(types)})",
                        path=path, frame=frame)
    if len(types) == 0 or types[0] != 0:
        raise DataError("the medium (id 0) must have type 0", path=path, frame=frame)
    if types.min() < 0:
        raise DataError(f"negative cell type {int(types.min())}", path=path, frame=frame)
    if types.max() > MAX_ID:
        raise DataError(f"cell type {int(types.max())} is too large (at most {MAX_ID})", path=path, frame=frame)
    present = np.unique(ids)
    present = present[present != 0]
    if present.size and types[present].min() < 1:
        bad = int(present[types[present] < 1][0])
        raise DataError(f"cell {bad} has type 0, which is reserved for the medium", path=path, frame=frame)
    if n_types is not None and types.max() > n_types:
        raise DataError(f"cell type {int(types.max())} is outside the declared range 0..{n_types}",
                        path=path, frame=frame)
    return ids.astype(np.int32), types.astype(np.int32)


def _types_from_maps(ids, type_map, *, path=None, frame=None):
    """Per-id type table from a per-site type map; an id whose sites carry two types is an error."""
    n = int(ids.max()) + 1
    types = np.zeros(n, dtype=np.int64)
    flat_ids = ids.ravel().astype(np.int64)
    flat_t = type_map.ravel().astype(np.int64)
    lo = np.full(n, np.iinfo(np.int64).max)
    hi = np.full(n, np.iinfo(np.int64).min)
    np.minimum.at(lo, flat_ids, flat_t)
    np.maximum.at(hi, flat_ids, flat_t)
    present = np.bincount(flat_ids, minlength=n) > 0
    bad = np.nonzero(present & (lo != hi))[0]
    if bad.size:
        c = int(bad[0])
        raise DataError(f"cell id {c} has sites of two types ({int(lo[c])} and {int(hi[c])}); a cell has one type",
                        path=path, frame=frame)
    types[present] = lo[present]
    if present[0] and types[0] != 0:
        raise DataError(f"medium sites (id 0) carry type {int(types[0])}, expected 0", path=path, frame=frame)
    return types


@dataclass
class CellState:
    """One lattice configuration: cell ids and the per-id type table.

    Attributes
    ----------
    ids : ndarray of int32, shape (H, W) or (D, H, W)
        Cell id per site, 0 = medium.
    types : ndarray of int32, shape (N + 1,)
        Type of each id; ``types[0] == 0``. Ids may be absent from the lattice (e.g. after a cell vanished).
    """

    ids: np.ndarray
    types: np.ndarray
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.ids, self.types = validate_state(self.ids, self.types, path=self.meta.get("path"),
                                              frame=self.meta.get("frame"))

    @classmethod
    def from_maps(cls, ids, type_map, *, path=None, frame=None, meta=None) -> CellState:
        """Build from an id map and a per-site type map of the same shape (the interchange channels)."""
        ids = np.asarray(ids)
        type_map = np.asarray(type_map)
        if ids.shape != type_map.shape:
            raise DataError(f"id map {ids.shape} and type map {type_map.shape} differ in shape",
                            path=path, frame=frame)
        if ids.size == 0:
            raise DataError(f"empty lattice of shape {ids.shape}", path=path, frame=frame)
        ids = _as_int_array(ids, "cell ids", path=path, frame=frame)
        type_map = _as_int_array(type_map, "cell types", path=path, frame=frame)
        _check_id_range(ids, "cell id", path=path, frame=frame)
        _check_id_range(type_map, "cell type", path=path, frame=frame)
        if int(ids.max()) > max(MAX_TABLE, 4 * ids.size):
            raise DataError(f"cell id {int(ids.max())} is too large for a lattice of {ids.size} sites (the type "
                            "table would not fit in memory); relabel the ids to 0..N first", path=path, frame=frame)
        types = _types_from_maps(ids, type_map, path=path, frame=frame)
        m = dict(meta or {})
        m.setdefault("path", None if path is None else str(path))
        m.setdefault("frame", frame)
        return cls(ids, types, m)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.ids.shape)

    @property
    def ndim(self) -> int:
        return self.ids.ndim

    @property
    def n_ids(self) -> int:
        """Length of the type table (N + 1, medium included)."""
        return len(self.types)

    @property
    def n_types(self) -> int:
        """Largest biological type present in the type table."""
        return int(self.types.max()) if len(self.types) else 0

    def cell_ids(self) -> np.ndarray:
        """Ids of the cells present on the lattice (medium excluded), sorted."""
        u = np.unique(self.ids)
        return u[u != 0]

    def volumes(self) -> np.ndarray:
        """Sites per id, shape ``(N + 1,)``; entry 0 = medium."""
        return volumes(self.ids, self.n_ids)

    def type_map(self) -> np.ndarray:
        """Per-site cell type, same shape as ``ids``."""
        return self.types[self.ids]

    def boundary_mask(self, order: int = 2, periodic: bool = True) -> np.ndarray:
        return boundary_mask(self.ids, order, periodic)

    def relabelled(self) -> CellState:
        """Copy with ids ``0..N`` contiguous (absent ids dropped)."""
        ids, types, _ = relabel(self.ids, self.types)
        return CellState(ids, types, dict(self.meta))

    def to_channels(self) -> np.ndarray:
        """Interchange form: array ``(2, *shape)`` with channel 0 = id, 1 = type."""
        return np.stack([self.ids, self.type_map()]).astype(np.int32)

    def copy(self) -> CellState:
        return CellState(self.ids.copy(), self.types.copy(), dict(self.meta))

    def __eq__(self, other):
        if not isinstance(other, CellState):
            return NotImplemented
        n = max(len(self.types), len(other.types))
        a = np.zeros(n, np.int64)
        b = np.zeros(n, np.int64)
        a[: len(self.types)] = self.types
        b[: len(other.types)] = other.types
        present = np.unique(np.concatenate([self.ids.ravel(), other.ids.ravel()])) if self.shape == other.shape \
            else None
        return (self.shape == other.shape and np.array_equal(self.ids, other.ids)
                and np.array_equal(a[present], b[present]))


def states_from_channels(data, *, path=None, channel_axis: int | None = None) -> list[CellState]:
    """Reference interchange form → states.

    ``data`` has shape ``(frames, 2, *S)`` (channel 0 = id, 1 = type) or ``(frames, *S, 2)``; a single
    frame ``(2, *S)`` / ``(*S, 2)`` is accepted too. ``channel_axis`` forces the layout (1 or -1).
    """
    data = np.asarray(data)
    if data.ndim in (3, 4) and (data.shape[0] == 2 or data.shape[-1] == 2) and data.ndim == 3:
        data = data[None]
    if data.ndim not in (4, 5):
        raise DataError(f"expected data of shape (frames, 2, H, W) or (frames, H, W, 2), got {data.shape}",
                        path=path)
    if channel_axis is None:
        if data.shape[1] == 2:
            channel_axis = 1
        elif data.shape[-1] == 2:
            channel_axis = -1
        else:
            raise DataError(f"no channel axis of length 2 in data of shape {data.shape} (expected (frames, 2, "
                            "H, W) or (frames, H, W, 2))", path=path)
    if channel_axis == -1:
        data = np.moveaxis(data, -1, 1)
    if data.shape[0] == 0:
        raise DataError("the file holds no frames", path=path)
    return [CellState.from_maps(data[f, 0], data[f, 1], path=path, frame=f) for f in range(data.shape[0])]


def states_to_channels(states) -> np.ndarray:
    """States (all of one shape) → ``(frames, 2, *S)`` int32 interchange array."""
    states = list(states)
    if not states:
        raise DataError("no states to write")
    shapes = {s.shape for s in states}
    if len(shapes) > 1:
        raise DataError(f"states of mixed lattice sizes cannot share one array: {sorted(shapes)}")
    return np.stack([s.to_channels() for s in states]).astype(np.int32)
