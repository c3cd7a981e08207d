"""The closure model (paper Eq. 5): H_θ = w_a · H_analytic(σ; θ_a) + w_n · H_NN(σ; θ_n).

All analytic terms share one learnable scalar ``w_a`` and all neural terms one learnable scalar ``w_n``
(``nn.Parameter``, float64; the reference code initialises w_a = 0.25, w_n = 1.0). Sharing is done by
giving every term of a group the *same* Parameter object as its ``scale``, so each term's ``energy``/``delta``
already includes its group weight and ``Hamiltonian.parameters()`` lists each weight once.

In a bundle every term stores its scale as a plain float (``w_a`` on each analytic term, ``w_n`` on each
neural one); :func:`tie_closure_scales` re-ties them after :func:`~neuralcpm_plugin.bundle.load_bundle`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from .base import Hamiltonian, LatticeSpec

__all__ = ["closure_hamiltonian", "closure_weights", "tie_closure_scales"]


def _share(terms, param: nn.Parameter, what: str):
    for t in terms:
        if not isinstance(t.scale, nn.Parameter) and abs(float(t.scale) - 1.0) > 1e-12:
            raise ConfigError(f"closure model: {what} term {t.kind!r} already has scale {float(t.scale)}; "
                              "build the closure from unit-scale terms (the shared weight replaces it)")
        t.scale = param


def closure_hamiltonian(analytic_terms, neural_terms, lattice: LatticeSpec, T: float = 1.0, type_names=None,
                        w_a: float = 0.25, w_n: float = 1.0, *, learn_weights: bool = True) -> Hamiltonian:
    """Build H = w_a·ΣH_analytic + w_n·ΣH_neural with shared (learnable) weights.

    Parameters
    ----------
    analytic_terms, neural_terms : sequences of :class:`~.base.Term`
        Unit-scale terms (``analytic`` True / False respectively); their parameters stay as they are
        (learnable analytic parameters remain learnable).
    lattice, T, type_names
        As for :class:`~.base.Hamiltonian` (T = temperature).
    w_a, w_n : float
        Initial weights (reference code: 0.25 and 1.0).
    learn_weights : bool
        Make w_a, w_n ``nn.Parameter`` (True) or fixed.
    """
    analytic_terms = list(analytic_terms)
    neural_terms = list(neural_terms)
    for t in analytic_terms:
        if not t.analytic:
            raise ConfigError(f"closure model: term {t.kind!r} is neural, not analytic")
    for t in neural_terms:
        if t.analytic:
            raise ConfigError(f"closure model: term {t.kind!r} is analytic, not neural")
    pa = nn.Parameter(torch.tensor(float(w_a), dtype=torch.float64), requires_grad=learn_weights)
    pn = nn.Parameter(torch.tensor(float(w_n), dtype=torch.float64), requires_grad=learn_weights)
    _share(analytic_terms, pa, "analytic")
    _share(neural_terms, pn, "neural")
    return Hamiltonian(analytic_terms + neural_terms, lattice, T, type_names)


def tie_closure_scales(hamiltonian: Hamiltonian, *, learn_weights: bool = True) -> Hamiltonian:
    """Re-tie the scales of a loaded closure model: one shared Parameter per group (in place; returned).

    Raises :class:`ConfigError` if the terms of a group carry different scales (not a closure model).
    """
    for group, what in ((hamiltonian.analytic_terms(), "analytic"), (hamiltonian.neural_terms(), "neural")):
        if not group:
            continue
        vals = {round(float(t.scale.detach()), 15) for t in group}
        if len(vals) > 1:
            raise ConfigError(f"not a closure model: the {what} terms have different scales {sorted(vals)}")
        p = nn.Parameter(torch.tensor(float(group[0].scale.detach()), dtype=torch.float64),
                         requires_grad=learn_weights)
        for t in group:
            t.scale = p
    return hamiltonian


def closure_weights(hamiltonian: Hamiltonian) -> dict:
    """``{"w_a": float | None, "w_n": float | None}`` of a closure model (None where a group is empty)."""
    a, n = hamiltonian.analytic_terms(), hamiltonian.neural_terms()
    return {"w_a": float(a[0].scale.detach()) if a else None, "w_n": float(n[0].scale.detach()) if n else None}
