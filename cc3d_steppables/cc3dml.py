"""Small shared helpers for CC3DML text: type-name sanitising, number formatting, neighbour shells.

Kept free of the package's Hamiltonian code so that the file-based evaluator (:mod:`.evaluator`) computes
ΔH from the written text with its own arithmetic.
"""

from __future__ import annotations

import itertools
import re

__all__ = ["cc3d_neighbour_offsets", "cc3d_type_names", "fmt"]

_IDENT = re.compile(r"[^A-Za-z0-9_]")


def cc3d_type_names(type_names) -> list[str]:
    """CC3D cell-type names for the package's types: type 0 is ``Medium``; others made valid identifiers
    (letters, digits, underscores; not starting with a digit) and unique."""
    out = ["Medium"]
    seen = {"medium"}
    for i, name in enumerate(list(type_names)[1:], start=1):
        s = _IDENT.sub("_", str(name)) or f"T{i}"
        if s[0].isdigit():
            s = "T" + s
        base, k = s, 2
        while s.lower() in seen:
            s = f"{base}_{k}"
            k += 1
        seen.add(s.lower())
        out.append(s)
    return out


def fmt(x) -> str:
    """A float written with full precision (round-trips exactly through strtod)."""
    x = float(x)
    if x == int(x) and abs(x) < 1e15:
        return repr(float(int(x)))
    return repr(x)


def cc3d_neighbour_offsets(order: int, ndim: int = 2) -> list[tuple[int, ...]]:
    """Offsets of CC3D's neighbour order ``order`` on a square lattice (``BoundaryStrategy``): all offsets
    whose Euclidean distance is among the ``order`` smallest distinct non-zero distances of the lattice's
    own dimensionality. Returned in array order (``(dy, dx)`` / ``(dz, dy, dx)``)."""
    if order < 1:
        raise ValueError(f"neighbour order must be >= 1, got {order}")
    reach = int(order) + 1
    cands = [o for o in itertools.product(range(-reach, reach + 1), repeat=ndim) if any(o)]
    d2 = sorted({sum(c * c for c in o) for o in cands})[: int(order)]
    keep = set(d2)
    return [o for o in cands if sum(c * c for c in o) in keep]
