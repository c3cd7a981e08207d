"""Free parameters of a Hamiltonian, with the physical constraints built in.

Optimisers (the pseudo-likelihood fit and PCD) work on *free* tensors; :class:`ParamMap` turns them into the
Hamiltonian's parameter tensors:

* contact ``J`` ((T+1)x(T+1)): the upper triangle without J(0,0) — J stays symmetric with J(0,0) = 0;
* volume ``λ`` ((T+1,)): entries 1..T, or one shared value when ``share_lambda`` (the paper shares one λ);
  entry 0 (medium) keeps its value; a learnable volume target likewise 1..T;
* external ``μ``: entries 1..T (μ(0) = 0);
* everything else (closure weights, neural weights): the parameter itself.

``functional_params()`` returns ``{name: tensor}`` for :func:`torch.func.functional_call`-style evaluation
with gradients to the free tensors; ``sync()`` writes the current values into the module (no gradient), so
samplers that call the Hamiltonian directly see the new parameters.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

__all__ = ["ParamMap", "using_params"]


class _Entry:
    __slots__ = ("base", "free", "index", "mirror", "name", "owned")

    def __init__(self, name, free, index=None, mirror=None, base=None, owned=True):
        self.name = name          # parameter name in the Hamiltonian
        self.free = free          # nn.Parameter optimised
        self.index = index        # flat indices written (None = identity)
        self.mirror = mirror      # flat indices mirrored (symmetric J), same length as index
        self.base = base          # constant full tensor the free values are written into
        self.owned = owned        # free is a new tensor (not the module's own parameter)

    def build(self):
        if self.index is None:
            return self.free
        flat = self.base.reshape(-1)
        vals = self.free.reshape(-1)
        if vals.numel() == 1 and len(self.index) > 1:
            vals = vals.expand(len(self.index))
        out = flat.index_put((self.index,), vals.to(flat.dtype))
        if self.mirror is not None:
            out = out.index_put((self.mirror,), vals.to(flat.dtype))
        return out.reshape(self.base.shape)


def _owner(ham, name):
    parts = name.split(".")
    if len(parts) >= 3 and parts[0] == "terms" and parts[1].isdigit():
        return ham.terms[int(parts[1])], parts[-1]
    return None, parts[-1]


class ParamMap:
    """Free, constrained parameters of ``hamiltonian`` (see the module docstring)."""

    def __init__(self, hamiltonian: nn.Module, *, share_lambda: bool = True):
        self.ham = hamiltonian
        self.entries: list[_Entry] = []
        seen = set()
        for name, p in hamiltonian.named_parameters():
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            term, attr = _owner(hamiltonian, name)
            kind = getattr(term, "kind", None)
            low = attr.lower()
            base = p.detach().clone()
            if kind == "contact" and p.ndim == 2 and p.shape[0] == p.shape[1] and "scale" not in low:
                n = p.shape[0]
                base[0, 0] = 0.0
                iu = [(a, b) for a in range(n) for b in range(a, n) if not (a == 0 and b == 0)]
                idx = torch.tensor([a * n + b for a, b in iu], device=p.device)
                mir = torch.tensor([b * n + a for a, b in iu], device=p.device)
                free = nn.Parameter(torch.stack([0.5 * (base[a, b] + base[b, a]) for a, b in iu]))
                self.entries.append(_Entry(name, free, idx, mir, base))
            elif kind in ("volume", "external", "surface") and p.ndim == 1 and p.shape[0] >= 2 \
                    and "scale" not in low:
                idx = torch.arange(1, p.shape[0], device=p.device)
                shared = share_lambda and kind in ("volume", "surface") and "target" not in low
                free = nn.Parameter(base[1:].mean().reshape(1) if shared else base[1:].clone())
                self.entries.append(_Entry(name, free, idx, None, base))
            else:
                self.entries.append(_Entry(name, p, None, None, None, owned=False))
        self.sync()

    def parameters(self) -> list[nn.Parameter]:
        """The free tensors to optimise."""
        return [e.free for e in self.entries]

    def named_free(self) -> dict[str, nn.Parameter]:
        return {e.name: e.free for e in self.entries}

    def functional_params(self) -> dict[str, torch.Tensor]:
        """``{name: full tensor}`` built from the free tensors, differentiable."""
        return {e.name: e.build() for e in self.entries if e.owned}

    @torch.no_grad()
    def sync(self) -> None:
        """Write the free values into the Hamiltonian's own parameters."""
        params = dict(self.ham.named_parameters())
        for e in self.entries:
            if e.owned:
                params[e.name].copy_(e.build().detach())

    def n_free(self) -> int:
        return sum(e.free.numel() for e in self.entries)

    def flat(self) -> torch.Tensor:
        return torch.cat([e.free.detach().reshape(-1).to(torch.float64) for e in self.entries]) \
            if self.entries else torch.zeros(0, dtype=torch.float64)

    @torch.no_grad()
    def set_flat(self, vec: torch.Tensor, *, sync: bool = True) -> None:
        """Write ``vec`` (laid out as :meth:`flat`) into the free tensors; with ``sync`` also into the
        Hamiltonian's own parameters."""
        o = 0
        for e in self.entries:
            k = e.free.numel()
            e.free.copy_(vec[o:o + k].reshape(e.free.shape).to(e.free.dtype))
            o += k
        if sync:
            self.sync()


@contextlib.contextmanager
def using_params(module: nn.Module, params: dict[str, torch.Tensor]):
    """Temporarily replace named parameters of ``module`` by (differentiable) tensors."""
    if not params:
        yield module
        return
    from torch.nn.utils.stateless import _reparametrize_module
    with _reparametrize_module(module, params):
        yield module
