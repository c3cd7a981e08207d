"""The Hamiltonian-term interface shared by every term, sampler, trainer and exporter.

A :class:`Term` is a ``torch.nn.Module`` that answers, for a batch of lattice states:

* ``energy(batch)`` → ``[B]`` full energy, differentiable in the term's parameters;
* ``delta(batch, sites, new_ids)`` → ``[B, P]`` ΔH of copying cell ``new_ids[b, p]`` into the site with
  flat index ``sites[b, p]``, every proposal evaluated against the *same* current state (the batched form,
  used by the parallel sampler and training);
* ``delta_np(state, site, new_id, cache)`` → ``float`` for one attempt in plain numpy float64 (the generic
  callback form; slow, exact; the test oracle and the evaluator used inside host tools).

Analytic terms also expose ``numba_pack()`` for the compiled single-attempt form used by the exact sampler.

Every term carries a multiplicative ``scale`` (1 by default); the energy it reports already includes it.
Closure models (paper Eq. 5) share one learnable scale between all analytic terms (``w_a``) and one between
neural terms (``w_n``).

A copy that would delete a cell (volume 1 → 0) has ΔH = +inf; this is enforced by the samplers, not by
individual terms (see :func:`deletion_mask`).

Serialisation: ``spec()`` returns a JSON-able dict (kind, physical parameters, scale), ``tensors()`` the
large arrays (fields, network weights) stored in ``weights.safetensors``; ``Term.from_spec(spec, tensors,
lattice)`` rebuilds the term. Term kinds register themselves with :func:`register_term`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from ..errors import BundleError

__all__ = [
    "TERM_KINDS",
    "Batch",
    "Hamiltonian",
    "LatticeSpec",
    "Term",
    "deletion_mask",
    "register_term",
    "term_class",
]

TERM_KINDS: dict[str, type[Term]] = {}


def register_term(cls):
    """Class decorator: make a term kind loadable from bundles by its ``kind`` string."""
    if not getattr(cls, "kind", None):
        raise TypeError(f"{cls.__name__} has no 'kind'")
    TERM_KINDS[cls.kind] = cls
    return cls


def term_class(kind: str) -> type[Term]:
    # importing the submodules registers the built-in kinds
    from . import _register_builtin  # noqa: F401
    try:
        return TERM_KINDS[kind]
    except KeyError:
        raise BundleError(f"unknown Hamiltonian term kind {kind!r}; known kinds: "
                          f"{', '.join(sorted(TERM_KINDS))}") from None


@dataclass(frozen=True)
class LatticeSpec:
    """Lattice geometry shared by a model and its data.

    shape : lattice size, ``(H, W)`` or ``(D, H, W)``, in sites.
    periodic : torus boundaries.
    copy_order : neighbourhood order of copy attempts (CC3D Potts NeighborOrder; Morpheus CPM Neighborhood).
    contact_order : neighbourhood order of the contact energy.
    """

    shape: tuple[int, ...]
    periodic: bool = True
    copy_order: int = 2
    contact_order: int = 2

    def to_json(self) -> dict:
        return {"shape": list(self.shape), "periodic": self.periodic, "copy_order": self.copy_order,
                "contact_order": self.contact_order}

    @classmethod
    def from_json(cls, d: dict) -> LatticeSpec:
        return cls(tuple(int(x) for x in d["shape"]), bool(d.get("periodic", True)),
                   int(d.get("copy_order", 2)), int(d.get("contact_order", 2)))

    def with_shape(self, shape) -> LatticeSpec:
        return replace(self, shape=tuple(shape))


@dataclass
class Batch:
    """A batch of states in torch, the form samplers and terms work on.

    ids : LongTensor ``[B, *S]``; types : LongTensor ``[B, C]`` (C = max id + 1 over the batch, padded with
    0 for ids that do not exist); volumes : LongTensor ``[B, C]`` (kept incrementally by samplers; entry 0 is
    the medium's site count). ``periodic`` is the boundary condition.
    """

    ids: torch.Tensor
    types: torch.Tensor
    volumes: torch.Tensor
    periodic: bool = True

    @classmethod
    def from_states(cls, states, *, n_ids: int | None = None, device=None, periodic: bool = True) -> Batch:
        states = list(states)
        c = max(s.n_ids for s in states) if n_ids is None else int(n_ids)
        ids = torch.as_tensor(np.stack([s.ids for s in states]).astype(np.int64), device=device)
        types = torch.zeros((len(states), c), dtype=torch.long, device=device)
        for b, s in enumerate(states):
            types[b, : s.n_ids] = torch.as_tensor(s.types.astype(np.int64))
        vols = torch.zeros((len(states), c), dtype=torch.long, device=device)
        vols.scatter_add_(1, ids.flatten(1), torch.ones_like(ids.flatten(1)))
        return cls(ids, types, vols, periodic)

    @property
    def B(self) -> int:
        return self.ids.shape[0]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.ids.shape[1:])

    @property
    def device(self):
        return self.ids.device

    def recount_volumes(self) -> None:
        v = torch.zeros_like(self.volumes)
        v.scatter_add_(1, self.ids.flatten(1), torch.ones_like(self.ids.flatten(1)))
        self.volumes = v

    def to_states(self):
        from ..lattice import CellState
        ids = self.ids.cpu().numpy().astype(np.int32)
        types = self.types.cpu().numpy().astype(np.int32)
        return [CellState(ids[b], types[b]) for b in range(self.B)]

    def clone(self) -> Batch:
        return Batch(self.ids.clone(), self.types.clone(), self.volumes.clone(), self.periodic)


def deletion_mask(batch: Batch, sites: torch.Tensor, new_ids: torch.Tensor) -> torch.Tensor:
    """``[B, P]`` bool: the copy would remove the last site of a (non-medium) cell."""
    old = batch.ids.flatten(1).gather(1, sites)
    vol_old = batch.volumes.gather(1, old)
    return (old != 0) & (old != new_ids) & (vol_old <= 1)


class Term(nn.Module):
    """Base class of Hamiltonian terms; see the module docstring for the contract."""

    kind: ClassVar[str] = ""
    analytic: ClassVar[bool] = True
    #: a neural term whose :meth:`delta` is exact and differentiable in its parameters (the pseudo-likelihood
    #: then uses it instead of :meth:`delta_full`, which evaluates a whole lattice per proposal)
    delta_differentiable: ClassVar[bool] = False

    def __init__(self, scale: float | nn.Parameter = 1.0, learn_scale: bool = False):
        super().__init__()
        if isinstance(scale, nn.Parameter):
            self.scale = scale
        elif learn_scale:
            self.scale = nn.Parameter(torch.tensor(float(scale), dtype=torch.float64))
        else:
            self.register_buffer("scale", torch.tensor(float(scale), dtype=torch.float64))

    # --- the three forms of the ΔH interface -------------------------------------------------------
    def energy(self, batch: Batch) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def delta(self, batch: Batch, sites: torch.Tensor, new_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover

    def delta_np(self, state, site: tuple, new_id: int, cache: dict | None = None) -> float:
        raise NotImplementedError  # pragma: no cover

    def numba_pack(self):  # analytic terms only
        raise NotImplementedError(f"term {self.kind!r} has no compiled form")

    # --- serialisation -----------------------------------------------------------------------------
    def spec(self) -> dict:
        raise NotImplementedError  # pragma: no cover

    def tensors(self) -> dict[str, torch.Tensor]:
        return {}

    @classmethod
    def from_spec(cls, spec: dict, tensors: dict[str, torch.Tensor], lattice: LatticeSpec) -> Term:
        raise NotImplementedError  # pragma: no cover

    def scale_value(self) -> float:
        return float(self.scale.detach())

    def delta_full(self, batch: Batch, sites: torch.Tensor, new_ids: torch.Tensor, *, chunk: int = 64,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
        """ΔH = H(after) − H(before) by evaluating every proposed state with :meth:`energy`, in chunks of
        ``chunk`` states; float64 ``[B, P]``, 0 where ``mask`` (bool ``[B, P]``) is False.

        Exact for any term and differentiable in its parameters when gradients are enabled (the
        pseudo-likelihood of neural terms; samplers call it under no_grad as a fallback).
        """
        B, P = sites.shape
        if mask is None:
            bi = torch.arange(B, device=sites.device).repeat_interleave(P)
            pi = torch.arange(P, device=sites.device).repeat(B)
        else:
            bi, pi = torch.nonzero(mask, as_tuple=True)
        out = torch.zeros((B, P), dtype=torch.float64, device=sites.device)
        if not bi.numel():
            return out
        base = self.energy(batch).to(torch.float64)
        parts = []
        for lo in range(0, bi.numel(), chunk):
            b, p = bi[lo:lo + chunk], pi[lo:lo + chunk]
            ids = batch.ids[b].clone()
            ids.view(len(b), -1).scatter_(1, sites[b, p][:, None], new_ids[b, p][:, None].to(ids.dtype))
            sub = Batch(ids, batch.types[b], batch.volumes[b].clone(), batch.periodic)
            sub.recount_volumes()
            parts.append(self.energy(sub).to(torch.float64) - base[b])
        return out.index_put((bi, pi), torch.cat(parts))


class ConfigTerm(Term):
    """A term described by an architecture ``config`` dict plus its ``state_dict`` (the neural kinds).

    ``spec()["params"] = {"config": ...}``; ``tensors()`` = the state_dict without ``scale``. Subclasses are
    built as ``cls(config, scale=...)`` and keep their configuration in ``self.config``.
    """

    def spec(self) -> dict:
        return {"kind": self.kind, "scale": self.scale_value(), "params": {"config": copy.deepcopy(self.config)}}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if k != "scale"}

    @classmethod
    def from_spec(cls, spec: dict, tensors: dict[str, torch.Tensor], lattice: LatticeSpec | None = None):
        params = spec.get("params", {})
        if not isinstance(params, dict) or not isinstance(params.get("config"), dict):
            raise BundleError(f"term {cls.kind!r}: params must hold an architecture 'config' dict")
        term = cls(params["config"], scale=float(spec.get("scale", 1.0)))
        sd = {k: v for k, v in term.state_dict().items() if k == "scale"}
        sd.update(tensors)
        try:
            term.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            raise BundleError(f"term {cls.kind!r}: weights do not match the architecture config ({e})") from None
        return term


class Hamiltonian(nn.Module):
    """A sum of terms, H = Σ_k scale_k · H_k, with the same three-form ΔH interface."""

    def __init__(self, terms, lattice: LatticeSpec, temperature: float = 1.0, type_names=None):
        super().__init__()
        self.terms = nn.ModuleList(list(terms))
        self.lattice = lattice
        self.temperature = float(temperature)
        self.type_names = list(type_names) if type_names is not None else None

    @property
    def n_types(self) -> int:
        return len(self.type_names) - 1 if self.type_names else 0

    @property
    def is_analytic(self) -> bool:
        return all(t.analytic for t in self.terms)

    def energy(self, batch: Batch) -> torch.Tensor:
        out = torch.zeros(batch.B, dtype=torch.float64, device=batch.device)
        for t in self.terms:
            out = out + t.energy(batch).to(torch.float64)
        return out

    def delta(self, batch: Batch, sites: torch.Tensor, new_ids: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(sites.shape, dtype=torch.float64, device=batch.device)
        for t in self.terms:
            out = out + t.delta(batch, sites, new_ids).to(torch.float64)
        return out

    def delta_np(self, state, site, new_id, cache=None) -> float:
        return float(sum(t.delta_np(state, site, new_id, cache) for t in self.terms))

    def analytic_terms(self):
        return [t for t in self.terms if t.analytic]

    def neural_terms(self):
        return [t for t in self.terms if not t.analytic]

    def term(self, kind: str):
        """The first term of the given kind, or None."""
        for t in self.terms:
            if t.kind == kind:
                return t
        return None
