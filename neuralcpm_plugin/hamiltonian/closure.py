"""The closure model (paper Eq. 5): H_θ = w_a · H_analytic(σ; θ_a) + w_n · H_NN(σ; θ_n), and its
three-part form H_θ = w_a · H_analytic + w_l · H_local + w_g · H_pooled (any subset).

Terms are grouped; each group shares one learnable scalar weight (``nn.Parameter``, float64; the reference
code initialises w_a = 0.25, w_n = 1.0). Sharing is done by giving every term of a group the *same*
Parameter object as its ``scale``, so each term's ``energy``/``delta`` already includes its group weight
and ``Hamiltonian.parameters()`` lists each weight once. Group names: ``w_a`` (all analytic terms),
``w_n`` (the neural part when it is one group — the paper's model, e.g. ``local-nh-closure``), and for a
closure with several neural groups one name per group, by convention ``w_l`` (local NH) and ``w_g``
(pooled NH).  Each term records its group in ``term.closure_weight``.

In a bundle every term stores its scale as a plain float and its group name under the optional key
``"weight"`` (bundles written before that key existed are read as w_a / w_n); :func:`tie_closure_scales`
re-ties the groups after :func:`~neuralcpm_plugin.bundle.load_bundle`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from .base import Hamiltonian, LatticeSpec

__all__ = ["closure_groups", "closure_hamiltonian", "closure_weights", "tie_closure_scales"]


def _share(terms, param: nn.Parameter, what: str, name: str):
    for t in terms:
        if not isinstance(t.scale, nn.Parameter) and abs(float(t.scale) - 1.0) > 1e-12:
            raise ConfigError(f"closure model: {what} term {t.kind!r} already has scale {float(t.scale)}; "
                              "build the closure from unit-scale terms (the shared weight replaces it)")
        t.scale = param
        t.closure_weight = name


def _group_of(t) -> str:
    return getattr(t, "closure_weight", None) or ("w_a" if t.analytic else "w_n")


def closure_hamiltonian(analytic_terms, neural_terms, lattice: LatticeSpec, T: float = 1.0, type_names=None,
                        w_a: float = 0.25, w_n: float = 1.0, *, learn_weights: bool = True,
                        weights: dict | None = None) -> Hamiltonian:
    """Build H = w_a·ΣH_analytic + Σ_groups w·ΣH_group with shared (learnable) weights.

    Parameters
    ----------
    analytic_terms : sequence of :class:`~.base.Term`
        Unit-scale analytic terms (may be empty); their parameters stay as they are.
    neural_terms : sequence of terms, or dict ``{weight name: sequence of terms}``
        A sequence: one neural group, weight ``w_n`` (paper Eq. 5).  A dict: one group per entry, e.g.
        ``{"w_l": [local_nh], "w_g": [pooled_nh]}`` for w_a·H_analytic + w_l·H_local + w_g·H_pooled.
    lattice, T, type_names
        As for :class:`~.base.Hamiltonian` (T = temperature).
    w_a, w_n : float
        Initial weights of the analytic group and of a neural group not named in ``weights`` (reference
        code: 0.25 and 1.0).
    learn_weights : bool
        Make the weights ``nn.Parameter`` with gradients (True) or fixed.
    weights : dict, optional
        Initial weight per neural group name.
    """
    analytic_terms = list(analytic_terms)
    groups = dict(neural_terms) if isinstance(neural_terms, dict) else {"w_n": list(neural_terms)}
    weights = dict(weights or {})
    for t in analytic_terms:
        if not t.analytic:
            raise ConfigError(f"closure model: term {t.kind!r} is neural, not analytic")
    if "w_a" in groups:
        raise ConfigError("closure model: 'w_a' names the analytic group; give the neural groups other names")
    seen = set()
    for name, terms in groups.items():
        for t in terms:
            if t.analytic:
                raise ConfigError(f"closure model: term {t.kind!r} (group {name}) is analytic, not neural")
            if id(t) in seen:
                raise ConfigError(f"closure model: term {t.kind!r} is in two groups")
            seen.add(id(t))
    unknown = set(weights) - set(groups)
    if unknown:
        raise ConfigError(f"closure model: initial weights for groups {sorted(unknown)} that have no terms")

    def param(v):
        return nn.Parameter(torch.tensor(float(v), dtype=torch.float64), requires_grad=learn_weights)

    _share(analytic_terms, param(w_a), "analytic", "w_a")
    neural = []
    for name, terms in groups.items():
        terms = list(terms)
        _share(terms, param(weights.get(name, w_n)), "neural", name)
        neural += terms
    return Hamiltonian(analytic_terms + neural, lattice, T, type_names)


def closure_groups(hamiltonian: Hamiltonian) -> dict:
    """``{weight name: [terms]}`` in term order (w_a for analytic terms, w_n for neural terms with no
    recorded group)."""
    out: dict = {}
    for t in hamiltonian.terms:
        out.setdefault(_group_of(t), []).append(t)
    return out


def tie_closure_scales(hamiltonian: Hamiltonian, *, learn_weights: bool = True) -> Hamiltonian:
    """Re-tie the scales of a loaded closure model: one shared Parameter per group (in place; returned).

    Raises :class:`ConfigError` if the terms of a group carry different scales (not a closure model).
    """
    for name, group in closure_groups(hamiltonian).items():
        vals = {round(float(t.scale.detach()), 15) for t in group}
        if len(vals) > 1:
            what = {"w_a": "analytic", "w_n": "neural"}.get(name, f"{name!r} group's")
            raise ConfigError(f"not a closure model: the {what} terms have different scales {sorted(vals)}")
        p = nn.Parameter(torch.tensor(float(group[0].scale.detach()), dtype=torch.float64),
                         requires_grad=learn_weights)
        for t in group:
            t.scale = p
            t.closure_weight = name
    return hamiltonian


def closure_weights(hamiltonian: Hamiltonian) -> dict:
    """``{"w_a": float | None, "w_n": float | None}`` of a closure model (None where a group is empty); a
    closure with named neural groups lists those instead of w_n, e.g. ``{"w_a", "w_l", "w_g"}``."""
    groups = closure_groups(hamiltonian)
    out = {"w_a": None}
    if not any(k not in ("w_a", "w_n") for k in groups):
        out["w_n"] = None
    for name, terms in groups.items():
        out[name] = float(terms[0].scale.detach())
    return out
