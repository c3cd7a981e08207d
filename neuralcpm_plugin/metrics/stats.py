"""Summary statistics of lattice states (definitions of ``../shared/reference-data/README.md``).

* **pair counts**: unordered neighbour pairs of sites (neighbourhood order 2 = Moore by default, periodic
  unless told otherwise) whose two sites belong to *different cells*, tallied by the unordered type pair;
  each unordered site pair is counted once.
* **fragmented fraction**: fraction of the cells present whose sites do not form one 8-connected component
  (components counted on the torus when periodic).
* **mean volume**: mean number of sites per cell present (medium excluded).
* **sorting index**: fraction of cell–cell contacts (pairs of different, non-medium cells) that are
  heterotypic (different types). 0 = fully sorted interfaces only between like cells, ~0.5 = mixed.

:func:`finite_column_means` averages such per-state statistics over states (rows), skipping undefined
(NaN / ±inf) entries.

Examples
--------
>>> import numpy as np
>>> from neuralcpm_plugin.lattice import CellState
>>> ids = np.zeros((6, 6), int); ids[1:3, 1:3] = 1; ids[3:5, 1:3] = 2
>>> s = CellState(ids, np.array([0, 1, 2]))
>>> pair_counts(s)[(1, 2)]    # 2 vertical + 2 diagonal Moore pairs across the shared edge
4
>>> sorting_index(s)
1.0
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ..lattice import CellState, _shift, half_offsets

__all__ = [
    "component_counts",
    "finite_column_means",
    "fragmented_cells",
    "fragmented_fraction",
    "mean_volume",
    "n_cells",
    "pair_counts",
    "sorting_index",
    "summary_keys",
    "summary_stats",
]


def _state(state) -> CellState:
    if isinstance(state, CellState):
        return state
    ids, types = state
    return CellState(ids, types)


def pair_counts(state, order: int = 2, periodic: bool = True) -> dict:
    """Unordered type pair ``(a, b)`` with ``a <= b`` → number of neighbour site pairs of different cells.

    Every type pair ``0 <= a <= b <= T`` appears in the result (zero counts included), except ``(0, 0)``
    (the medium is one cell, so medium–medium pairs never count).
    """
    st = _state(state)
    ids = st.ids
    tmap = st.types[ids]
    n_t = int(st.types.max()) + 1
    counts = np.zeros((n_t, n_t), dtype=np.int64)
    for off in half_offsets(order, ids.ndim):
        nb = _shift(ids, off, periodic, fill=-1)
        ok = (nb != ids) & (nb >= 0)
        if not ok.any():
            continue
        ta = tmap[ok]
        tb = st.types[nb[ok]]
        lo = np.minimum(ta, tb)
        hi = np.maximum(ta, tb)
        counts += np.bincount(lo * n_t + hi, minlength=n_t * n_t).reshape(n_t, n_t)
    return {(a, b): int(counts[a, b]) for a in range(n_t) for b in range(a, n_t) if (a, b) != (0, 0)}


@njit(cache=True)
def _components(ids_flat, nb, n_ids):
    """Number of connected components of every id under the neighbour table (union–find)."""
    n = ids_flat.shape[0]
    parent = np.arange(n)
    for i in range(n):
        c = ids_flat[i]
        for j in range(nb.shape[1]):
            y = nb[i, j]
            if y < 0 or ids_flat[y] != c:
                continue
            # union(i, y)
            a = i
            while parent[a] != a:
                parent[a] = parent[parent[a]]
                a = parent[a]
            b = y
            while parent[b] != b:
                parent[b] = parent[parent[b]]
                b = parent[b]
            if a != b:
                if a < b:
                    parent[b] = a
                else:
                    parent[a] = b
    out = np.zeros(n_ids, np.int64)
    for i in range(n):
        a = i
        while parent[a] != a:
            a = parent[a]
        if a == i:
            out[ids_flat[i]] += 1
    return out


def component_counts(state, periodic: bool = True, connectivity: int = 2) -> np.ndarray:
    """Connected components per id (entry 0 = medium), shape ``(n_ids,)``; 0 for absent ids.

    ``connectivity`` is the neighbourhood order: 2 = 8-connected (2-D Moore), 1 = 4-connected.
    """
    from ..sampling.exact import neighbour_table
    st = _state(state)
    nb, _ = neighbour_table(st.shape, connectivity, periodic)
    return _components(np.ascontiguousarray(st.ids.ravel().astype(np.int64)), nb, st.n_ids)


def fragmented_cells(state, periodic: bool = True) -> np.ndarray:
    """Ids of the cells (medium excluded) whose sites form more than one 8-connected component."""
    cc = component_counts(state, periodic)
    cc[0] = 0
    return np.nonzero(cc > 1)[0]


def n_cells(state) -> int:
    """Number of distinct non-zero ids on the lattice."""
    return len(_state(state).cell_ids())


def fragmented_fraction(state, periodic: bool = True) -> float:
    """Fraction of the cells present that are not one 8-connected component (torus when periodic)."""
    n = n_cells(state)
    return float(len(fragmented_cells(state, periodic)) / n) if n else 0.0


def mean_volume(state) -> float:
    """Mean number of sites per cell present (medium excluded); nan without cells."""
    st = _state(state)
    v = st.volumes()[1:]
    v = v[v > 0]
    return float(v.mean()) if v.size else float("nan")


def sorting_index(state, order: int = 2, periodic: bool = True) -> float:
    """Fraction of cell–cell neighbour pairs (different non-medium cells) whose types differ; nan if none."""
    pc = pair_counts(state, order, periodic)
    cc = {k: v for k, v in pc.items() if k[0] >= 1}
    tot = sum(cc.values())
    het = sum(v for (a, b), v in cc.items() if a != b)
    return float(het / tot) if tot else float("nan")


def summary_keys(n_types: int) -> list[str]:
    """Keys of :func:`summary_stats` for biological types ``1..n_types`` (reference-data order)."""
    keys = ["mean_volume", "n_cells", "frac_fragmented"]
    keys += [f"{a}-{a}" for a in range(1, n_types + 1)]
    keys += [f"{a}-{b}" for a in range(1, n_types + 1) for b in range(a + 1, n_types + 1)]
    keys += [f"{a}-0" for a in range(1, n_types + 1)]
    return keys


def summary_stats(state, order: int = 2, periodic: bool = True, n_types: int | None = None) -> dict:
    """The statistics of ``shared/reference-data/summary_stats.json`` for one state.

    Keys: ``mean_volume``, ``n_cells``, ``frac_fragmented``, then pair counts ``"a-a"``, ``"a-b"`` (a<b) and
    ``"a-0"`` (type a with the medium), as floats.
    """
    st = _state(state)
    nt = int(st.types.max()) if n_types is None else int(n_types)
    pc = pair_counts(st, order, periodic)
    out = {"mean_volume": mean_volume(st), "n_cells": float(n_cells(st)),
           "frac_fragmented": fragmented_fraction(st, periodic)}
    for k in summary_keys(nt)[3:]:
        a, b = (int(v) for v in k.split("-"))
        out[k] = float(pc.get((min(a, b), max(a, b)), 0))
    return out


def finite_column_means(values) -> np.ndarray:
    """Mean of each column (axis 0) over its finite entries, without warnings.

    ``values``: array-like of shape ``(n, ...)``, e.g. one row per state or trajectory. Entries that are NaN
    or ±inf (a statistic that is undefined for that row, such as the sorting index of a state without
    cell–cell contacts) are left out of their column's mean. Convention: a column without any finite entry —
    all NaN, or ``n = 0`` rows — has mean **NaN**; no ``RuntimeWarning`` is emitted (``np.nanmean`` warns
    "Mean of empty slice" there, and ``np.errstate`` does not silence that warning).

    Returns a float64 array of shape ``values.shape[1:]`` (a 0-d array for 1-D input).

    >>> finite_column_means([[1.0, np.nan], [3.0, np.nan], [np.inf, np.nan]]).tolist()
    [2.0, nan]
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim == 0:
        raise ValueError("finite_column_means needs an array of at least one dimension (rows first)")
    ok = np.isfinite(values)
    counts = ok.sum(0)
    sums = np.where(ok, values, 0.0).sum(0)
    return np.divide(sums, counts, out=np.full(sums.shape, np.nan), where=counts > 0)
