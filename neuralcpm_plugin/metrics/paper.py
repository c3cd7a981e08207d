"""The paper's roll-out metrics (NeuralCPM §4.3–4.4, ``../shared/SPEC.md`` → Metrics).

All functions take :class:`~neuralcpm_plugin.lattice.CellState` objects (2-D; the connectivity and volume
metrics are dimension-agnostic) and return plain floats / numpy arrays.

* :func:`volume_bounds`, :func:`volume_ok`, :func:`volume_metric` — fraction of states whose every cell has a
  volume (sites) within ``[v_min − m, v_max + m]`` of the training data, ``m = 0.1 · v̄`` (v̄ = mean training
  cell volume; the reference code's ±10 sites for MNIST and ±15 for bipolar are this rule at v̄ = 100 / 150).
* :func:`fragment_counts`, :func:`n_fragmented`, :func:`fragmentation_metric` — the reference code's rule:
  each cell's mask is dilated twice with the 8-connected (full) structure and the cell counts as fragmented
  when the dilated mask has ≠ 1 8-connected component (a vanished cell has 0). Components are counted on the
  torus when ``periodic``. A state passes when at most 3 cells are fragmented.
* :func:`bipolar_organisation` — PCA of the type-2 pixel positions; per type, the fraction of that type's
  positional variance along the principal axis (1 = all along the axis, 0.5 = isotropic).
* :func:`second_moments`, :func:`moment_error` — Table 2's error: per-cell centres of mass, aligned to the
  principal axes of the type-2 centres; per type, central second moments (along, across) in sites²; the error
  is the RMSE between the mean moments of sampled and real states.
* :func:`classifier_score` — exp(E_x KL(p(y|x) ‖ p(y))) from predicted class probabilities.

Coordinates are ``(y, x)`` in sites. On a periodic lattice the aggregate is first rolled so that its circular
mean sits at the lattice centre (a symmetry of the torus), so positions are not cut by the wrap.
"""

from __future__ import annotations

import itertools

import numpy as np
from scipy import ndimage

from ..errors import DataError
from ..lattice import CellState
from .stats import finite_column_means

__all__ = [
    "bipolar_organisation",
    "cell_centres",
    "centre_on_torus",
    "classifier_score",
    "count_components",
    "dilate",
    "fragment_counts",
    "fragmentation_metric",
    "mean_ci",
    "mean_second_moments",
    "moment_error",
    "n_fragmented",
    "second_moments",
    "volume_bounds",
    "volume_metric",
    "volume_ok",
]


# --------------------------------------------------------------------------------------------- volumes
def _biological_ids(state: CellState) -> np.ndarray:
    """Ids declared as cells (type ≥ 1 in the type table) plus any id present on the lattice."""
    declared = np.nonzero(state.types >= 1)[0]
    present = state.cell_ids()
    return np.union1d(declared, present).astype(np.int64)


def volume_bounds(train_states, rel_margin: float = 0.1, margin: float | None = None) -> tuple[float, float]:
    """Admissible cell-volume range ``(lo, hi)`` in sites from training states.

    ``lo = v_min − m``, ``hi = v_max + m`` where v_min/v_max are the smallest/largest cell volumes over all
    cells of all training states, and ``m = margin`` if given, else ``rel_margin · v̄`` (v̄ = mean cell volume).
    """
    vols = []
    for s in train_states:
        v = s.volumes()
        vols.append(v[s.cell_ids()])
    if not vols or sum(len(v) for v in vols) == 0:
        raise DataError("volume_bounds: the training states hold no cells")
    allv = np.concatenate(vols).astype(np.float64)
    m = float(margin) if margin is not None else float(rel_margin) * float(allv.mean())
    return float(allv.min() - m), float(allv.max() + m)


def volume_ok(state: CellState, bounds: tuple[float, float]) -> bool:
    """True when every cell (every id of type ≥ 1, present or vanished) has a volume within ``bounds``."""
    lo, hi = bounds
    ids = _biological_ids(state)
    if ids.size == 0:
        return True
    v = np.bincount(state.ids.ravel(), minlength=int(ids.max()) + 1)[ids]
    return bool(np.all((v >= lo) & (v <= hi)))


def volume_metric(states, bounds: tuple[float, float]) -> float:
    """Fraction of ``states`` passing :func:`volume_ok` (paper Tables 1–2, "vol")."""
    states = list(states)
    if not states:
        raise DataError("volume_metric: no states")
    return float(np.mean([volume_ok(s, bounds) for s in states]))


# ------------------------------------------------------------------------------------ fragmentation
def _full_offsets(ndim: int) -> list[tuple[int, ...]]:
    return [o for o in itertools.product((-1, 0, 1), repeat=ndim) if any(o)]


def dilate(mask: np.ndarray, iterations: int = 1, periodic: bool = True) -> np.ndarray:
    """Binary dilation with the full (8-connected in 2-D, 26 in 3-D) structure; wraps on the torus."""
    mask = np.asarray(mask, dtype=bool)
    if not periodic:
        st = ndimage.generate_binary_structure(mask.ndim, mask.ndim)
        return ndimage.binary_dilation(mask, st, iterations=iterations) if iterations > 0 else mask.copy()
    out = mask.copy()
    axes = tuple(range(mask.ndim))
    for _ in range(int(iterations)):
        # separable: the full structure is the product of 1-D [1,1,1] structures
        for ax in axes:
            out = out | np.roll(out, 1, axis=ax) | np.roll(out, -1, axis=ax)
    return out


def count_components(mask: np.ndarray, periodic: bool = True) -> int:
    """Number of 8-connected (full-connectivity) components of ``mask``, on the torus when ``periodic``."""
    mask = np.asarray(mask, dtype=bool)
    st = ndimage.generate_binary_structure(mask.ndim, mask.ndim)
    lab, n = ndimage.label(mask, structure=st)
    if not periodic or n <= 1:
        return int(n)
    parent = np.arange(n + 1)

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    # pairs of labels adjacent across the wrap: compare each boundary slab with the opposite slab shifted
    for off in _full_offsets(mask.ndim):
        if not any(o > 0 for o in off) or tuple(off) <= tuple(-o for o in off):
            continue
        nb = np.roll(lab, shift=tuple(-o for o in off), axis=tuple(range(mask.ndim)))
        sel = (lab > 0) & (nb > 0) & (lab != nb)
        if not sel.any():
            continue
        for a, b in set(zip(lab[sel].tolist(), nb[sel].tolist())):
            ra, rb = find(a), find(b)
            if ra != rb:
                parent[ra] = rb
    return len({find(i) for i in range(1, n + 1)})


def fragment_counts(state: CellState, dilations: int = 2, periodic: bool = True) -> dict[int, int]:
    """Per cell id (type ≥ 1, present or vanished): number of full-connectivity components of its mask
    after ``dilations`` dilations (reference code: 2). A vanished cell has 0."""
    out = {}
    ids = state.ids
    for c in _biological_ids(state):
        m = ids == c
        if not m.any():
            out[int(c)] = 0
            continue
        out[int(c)] = count_components(dilate(m, dilations, periodic), periodic)
    return out


def n_fragmented(state: CellState, dilations: int = 2, periodic: bool = True) -> int:
    """Number of cells whose (dilated) mask does not form exactly one component."""
    return int(sum(1 for k in fragment_counts(state, dilations, periodic).values() if k != 1))


def fragmentation_metric(states, max_fragmented: int = 3, dilations: int = 2, periodic: bool = True) -> float:
    """Fraction of states with at most ``max_fragmented`` fragmented cells (paper Tables 1–2, "frag")."""
    states = list(states)
    if not states:
        raise DataError("fragmentation_metric: no states")
    return float(np.mean([n_fragmented(s, dilations, periodic) <= max_fragmented for s in states]))


# ------------------------------------------------------------------------------- positions, bipolar
def centre_on_torus(state: CellState) -> CellState:
    """Roll the lattice so that the circular mean of all cell sites sits at the lattice centre.

    A translation is a symmetry of the periodic lattice; after it, plain (non-wrapped) coordinates of an
    aggregate that straddled the boundary are contiguous. States without cells are returned unchanged.
    """
    occ = state.ids > 0
    if not occ.any():
        return state
    shifts = []
    for ax, n in enumerate(state.shape):
        coord = np.nonzero(occ)[ax].astype(np.float64)
        ang = 2 * np.pi * coord / n
        mean = np.arctan2(np.sin(ang).mean(), np.cos(ang).mean()) * n / (2 * np.pi)
        shifts.append(int(np.floor(n // 2 - mean + 0.5)) % n)
    ids = np.roll(state.ids, shift=tuple(shifts), axis=tuple(range(state.ndim)))
    return CellState(ids, state.types.copy(), dict(state.meta))


def cell_centres(state: CellState, periodic: bool = True):
    """Per-cell centres of mass (sites, ``(y, x)``) after :func:`centre_on_torus` when ``periodic``.

    Returns ``(ids, types, centres)``: present cell ids, their types, and an array ``(n, ndim)``.
    """
    s = centre_on_torus(state) if periodic else state
    ids = s.cell_ids()
    n = s.n_ids
    flat = s.ids.ravel()
    vol = np.bincount(flat, minlength=n).astype(np.float64)
    cents = []
    for ax, size in enumerate(s.shape):
        coord = np.indices(s.shape)[ax].ravel().astype(np.float64)
        if periodic:
            # per-cell circular mean (a cell cut by the wrap keeps its true centre), then the image nearest
            # to the lattice centre, where the aggregate now sits
            ang = 2 * np.pi * coord / size
            sn = np.bincount(flat, weights=np.sin(ang), minlength=n)[ids]
            cs = np.bincount(flat, weights=np.cos(ang), minlength=n)[ids]
            circ = np.zeros(n)
            circ[ids] = np.mod(np.arctan2(sn, cs) * size / (2 * np.pi), size)
            # arithmetic mean of the sites unwrapped around the circular mean (exact for cells < size / 2)
            d = np.mod(coord - circ[flat] + size / 2, size) - size / 2
            c = circ[ids] + np.bincount(flat, weights=d, minlength=n)[ids] / vol[ids]
            mid = size // 2
            c = np.mod(c - mid + size / 2, size) - size / 2 + mid
        else:
            c = np.bincount(flat, weights=coord, minlength=n)[ids] / vol[ids]
        cents.append(c)
    return ids, s.types[ids], np.stack(cents, axis=1) if len(ids) else np.zeros((0, s.ndim))


def _principal_axes(points: np.ndarray) -> np.ndarray | None:
    """Eigenvectors (columns) of the covariance of ``points`` sorted by decreasing eigenvalue."""
    if len(points) < 2:
        return None
    cov = np.cov(points - points.mean(0), rowvar=False)
    w, v = np.linalg.eigh(cov)
    return v[:, np.argsort(w)[::-1]]


def bipolar_organisation(state: CellState, axis_type: int = 2, types=(1, 2), periodic: bool = True) -> dict:
    """Fraction of each type's positional variance along the principal axis of the ``axis_type`` pixels.

    Returns ``{type: fraction}`` with fractions in [0, 1] (NaN for a type with < 2 pixels, or when the
    ``axis_type`` has < 2 pixels). In the bipolar pattern type 2 (two poles) is high and type 1 (the band
    between them) is low.
    """
    s = centre_on_torus(state) if periodic else state
    tmap = s.type_map()
    pts2 = np.argwhere(tmap == axis_type).astype(np.float64)
    axes = _principal_axes(pts2)
    out = {}
    for t in types:
        pts = np.argwhere(tmap == t).astype(np.float64)
        if axes is None or len(pts) < 2:
            out[int(t)] = float("nan")
            continue
        proj = (pts - pts.mean(0)) @ axes
        var = proj.var(axis=0)
        out[int(t)] = float(var[0] / var.sum()) if var.sum() > 0 else float("nan")
    return out


def second_moments(state: CellState, types=(1, 2), align_type: int | None = 2, periodic: bool = True) -> np.ndarray:
    """Per-type central second moments of cell centres, ``(len(types), ndim)`` in sites².

    Centres are expressed in the principal axes of the ``align_type`` centres (column 0 = principal axis)
    when ``align_type`` is given, as in the reference code's ``calc_moment(..., rotate_alignment_type=2)``.
    NaN where a type has no cells (or the alignment type has < 2 cells).
    """
    _ids, ctypes, cents = cell_centres(state, periodic)
    ndim = state.ndim
    out = np.full((len(types), ndim), np.nan)
    if align_type is not None:
        ref = cents[ctypes == align_type]
        axes = _principal_axes(ref)
        if axes is None:
            return out
        cents = (cents - ref.mean(0)) @ axes
    for i, t in enumerate(types):
        c = cents[ctypes == t]
        if len(c):
            out[i] = ((c - c.mean(0)) ** 2).mean(0)
    return out


def mean_second_moments(states, types=(1, 2), align_type: int | None = 2, periodic: bool = True) -> np.ndarray:
    """Mean of :func:`second_moments` over states (:func:`finite_column_means`: a type absent from a state
    leaves that state out; NaN where no state has it)."""
    return finite_column_means(np.stack([second_moments(s, types, align_type, periodic) for s in states]))


def moment_error(sampled, real, types=(1, 2), align_type: int | None = 2, periodic: bool = True) -> float:
    """Table 2's organisation error: RMSE (sites²) between the mean second moments of sampled and real
    states. ``sampled``/``real`` are iterables of states or precomputed ``(len(types), ndim)`` mean moments."""
    a = sampled if isinstance(sampled, np.ndarray) else mean_second_moments(list(sampled), types, align_type,
                                                                            periodic)
    b = real if isinstance(real, np.ndarray) else mean_second_moments(list(real), types, align_type, periodic)
    return float(np.sqrt(finite_column_means(((a - b) ** 2).ravel())))


# ----------------------------------------------------------------------------------- classifier score
def classifier_score(probs, eps: float = 1e-12) -> float:
    """exp(E_x KL(p(y|x) ‖ p(y))), p(y) = mean over x of p(y|x); between 1 and the number of classes.

    ``probs``: array ``(n_states, n_classes)`` of class probabilities (rows are renormalised).
    """
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] == 0:
        raise DataError(f"classifier_score: expected probabilities of shape (n, classes), got {p.shape}")
    if np.any(p < 0) or not np.all(np.isfinite(p)):
        raise DataError("classifier_score: probabilities must be finite and non-negative")
    p = p / p.sum(1, keepdims=True)
    py = p.mean(0)
    kl = np.sum(np.where(p > 0, p * (np.log(np.maximum(p, eps)) - np.log(np.maximum(py, eps))), 0.0), axis=1)
    return float(np.exp(kl.mean()))


# ------------------------------------------------------------------------------------------ intervals
def mean_ci(values, level: float = 0.95) -> tuple[float, float]:
    """Mean and half-width of the two-sided Student-t confidence interval over ``values`` (e.g. seeds).

    With one value the half-width is NaN (no interval).
    """
    from scipy import stats

    v = np.asarray([x for x in values if np.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan")
    if v.size == 1:
        return float(v[0]), float("nan")
    half = stats.t.ppf(0.5 + level / 2, v.size - 1) * v.std(ddof=1) / np.sqrt(v.size)
    return float(v.mean()), float(half)
