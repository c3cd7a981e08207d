"""One validation of a model and an initial state before an exporter writes anything.

Both exporters (:mod:`cc3d_steppables.export` and :mod:`morpheus_xml.export`, hence also
:mod:`morpheus_xml.run`) call :func:`check_export` so that they accept and refuse the same inputs:

* every weight of every term (and every term's scale) is finite — a diverged fit exported to a host tool
  would simulate nonsense without a word;
* per-type tables have one entry per type, medium included: contact ``J`` is ``(T+1)×(T+1)`` and symmetric,
  the volume term's ``lambda`` and ``target`` and an external term's ``mu`` have ``T+1`` entries, target
  volumes are not negative — where ``T`` is the model's number of cell types (``len(type_names) − 1``);
* the initial state has the model's lattice shape, at least one cell, and no cell type the model lacks;
* run lengths and intervals are positive integers (``--mcs`` ≥ 1, intervals ≥ 1 when given).

Every refusal is an :class:`~neuralcpm_plugin.errors.ExportError` naming the term/option and the problem.
"""

from __future__ import annotations

import math

import numpy as np

from .errors import ExportError

__all__ = ["MAX_MCS", "check_export", "check_run_options"]

MAX_MCS = 10**9          #: upper bound of --mcs (a run of 10⁹ MCS would take years; a typo, most likely)


# the numeric tables of the analytic terms' specs (other entries, e.g. a direction spec, may hold None)
_NUMERIC_PARAMS = ("J", "lambda", "target", "mu", "strength", "field", "lambda_surface", "target_surface")


def _finite(term, i: int) -> None:
    kind = getattr(term, "kind", type(term).__name__)
    try:
        scale = float(term.scale_value())
    except (TypeError, ValueError, AttributeError):
        scale = 1.0
    if not math.isfinite(scale):
        raise ExportError(f"term {i} ({kind}): its scale is {scale}: the model holds non-finite weights (a "
                          "diverged fit?); refit it or export an earlier checkpoint")
    arrays = {name: t.detach().cpu().double().numpy() for name, t in term.tensors().items()
              if t.is_floating_point()}
    try:
        params = term.spec().get("params", {})
    except Exception:  # noqa: BLE001 - a term without a spec has only its tensors to check
        params = {}
    for name, v in (params.items() if isinstance(params, dict) else ()):
        if name in _NUMERIC_PARAMS and isinstance(v, (int, float, list, tuple)) and not isinstance(v, bool):
            try:
                arrays[name] = np.asarray(v, dtype=np.float64)
            except (TypeError, ValueError):
                continue
    for name, a in arrays.items():
        if not np.isfinite(a).all():
            bad = int((~np.isfinite(a)).sum())
            raise ExportError(f"term {i} ({kind}): {name} holds {bad} non-finite value(s) (NaN or inf): the model "
                              "is broken (a diverged fit?); refit it or export an earlier checkpoint")


def _length(arr, n: int, what: str, i: int, kind: str) -> np.ndarray:
    a = np.asarray(arr, dtype=np.float64)
    if a.shape != (n,):
        raise ExportError(f"term {i} ({kind}): {what} has shape {a.shape}, the model has {n - 1} cell types "
                          f"({n} entries with the medium)")
    return a


def check_run_options(*, mcs=None, intervals: dict | None = None, counts: dict | None = None) -> None:
    """``mcs`` must be an integer in [1, MAX_MCS]; each ``intervals`` value (an option name → value) must be
    None or >= 1; each ``counts`` value must be >= 0."""
    if mcs is not None:
        if isinstance(mcs, float) and not math.isfinite(mcs):
            raise ExportError(f"--mcs must be a finite number, got {mcs}")
        if int(mcs) != mcs or not 1 <= int(mcs) <= MAX_MCS:
            raise ExportError(f"--mcs must be an integer from 1 to {MAX_MCS}, got {mcs}")
    for opt, v in (intervals or {}).items():
        if v is not None and (int(v) != v or int(v) < 1):
            raise ExportError(f"{opt} must be >= 1, got {v}")
    for opt, v in (counts or {}).items():
        if v is not None and (int(v) != v or int(v) < 0):
            raise ExportError(f"{opt} must be >= 0, got {v}")


def check_export(hamiltonian, state=None, *, mcs=None, intervals: dict | None = None,
                 counts: dict | None = None) -> int:
    """Validate ``hamiltonian`` (and the initial ``state``, and the run options) for export; return the number
    of cell types ``T``. Raises :class:`ExportError` (see the module docstring)."""
    check_run_options(mcs=mcs, intervals=intervals, counts=counts)
    ham = hamiltonian
    names = list(ham.type_names or [])
    n_types = len(names) - 1 if names else 0
    if not names:
        for t in ham.analytic_terms():
            n_types = max(n_types, int(getattr(t, "n_types", 0) or 0))
    n = n_types + 1
    for i, term in enumerate(ham.terms):
        _finite(term, i)
        if not getattr(term, "analytic", False):
            nt = getattr(term, "n_types", None)
            if isinstance(nt, int) and names and nt != n_types:
                raise ExportError(f"term {i} ({term.kind}): covers {nt} cell types, the model {n_types} "
                                  f"({', '.join(names[1:])})")
            continue
        p = term.spec().get("params", {})
        kind = term.kind
        if kind == "contact":
            J = np.asarray(p["J"], dtype=np.float64)
            if J.shape != (n, n):
                raise ExportError(f"term {i} (contact): J has shape {J.shape}, the model has {n_types} cell types "
                                  f"({n}x{n} with the medium)")
            if not np.allclose(J, J.T):
                raise ExportError(f"term {i} (contact): J is not symmetric")
        elif kind == "volume":
            _length(p["lambda"], n, "lambda", i, kind)
            tgt = _length(p["target"], n, "target", i, kind)
            if np.any(tgt[1:] < 0):
                raise ExportError(f"term {i} (volume): negative target volume {tgt.tolist()}")
        elif kind == "external":
            _length(p["mu"], n, "mu", i, kind)
        elif kind == "directed_motion":
            _length(p["strength"], n, "strength", i, kind)
    if state is not None:
        shape = tuple(int(s) for s in ham.lattice.shape)
        if tuple(state.shape) != shape:
            raise ExportError(f"the initial state has shape {tuple(state.shape)}, the model's lattice {shape}")
        cells = state.cell_ids()
        if len(cells) == 0:
            raise ExportError("the initial state holds no cell (only medium): nothing to simulate")
        used = np.unique(np.asarray(state.types)[cells])
        if len(used) and int(used.max()) > n_types:
            extra = sorted(int(t) for t in used if t > n_types)
            raise ExportError(f"the initial state has cell type(s) {extra}, the model only {n_types} type(s) "
                              f"({', '.join(names[1:]) or 'unnamed'}); give an initial state of this model's types")
        if len(used) and int(used.min()) < 0:
            raise ExportError(f"the initial state has negative cell type {int(used.min())}")
    return n_types
