"""The proposal-aware pseudo-likelihood (SPEC.md → "Proposal-aware pseudo-likelihood").

The classic CPM proposes "copy a random copy-neighbour's cell into site i", so cell c is proposed for site i
with weight ``k_c`` = the number of i's copy neighbours that belong to c. With the neighbours frozen, Metropolis
with these proposals leaves site i in detailed balance with

    p(σ_i = c | rest) ∝ k_c · exp(−ΔH_c / T),   ΔH_c = H(σ with σ_i := c) − H(σ),

over the candidates c ∈ {σ_i} ∪ {cells among i's copy neighbours}. The fit minimises the mean negative
log-likelihood of the observed values over the boundary sites of the data states (sites whose own value has
k = 0 are skipped; candidates that would delete a cell are excluded). ΔH comes from the Hamiltonian's batched
interface ``delta(batch, sites, new_ids)`` — the same evaluations the parallel sampler makes.

* Analytic models (ΔH linear in the parameters): the problem is convex. A learnable target volume V*
  (``[model] learn_target_volume``) is fitted as κ = λ·V*, in which ΔH is linear (then V* = κ/λ). ΔH = c + F·θ is tabulated once
  (n_free + 1 batched ΔH evaluations, linearity verified) and θ is fitted by Newton's method in float64
  (exact gradient and Hessian of the log-sum-exp; a handful of steps). Because k_c
  carries no 1/T the temperature scale is identifiable (RMSE at T=1 is meaningful).
* Neural and closure models: stochastic — each step samples a few states and a few hundred boundary sites
  per state and takes an Adam step on the same objective.

``proposal_aware=False`` drops k_c (the plain Boltzmann pseudo-likelihood; biased on classic-CPM data,
DESIGN.md) — kept for comparison only.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from neuralcpm_plugin.errors import ConfigError
from neuralcpm_plugin.hamiltonian.base import Batch
from neuralcpm_plugin.lattice import _shift, neighbour_offsets

from .optim import Adam, newton_minimize
from .parammap import ParamMap, using_params

__all__ = ["Candidates", "LinearPL", "PLResult", "build_candidates", "fit_pl", "pl_nll"]


@dataclass
class Candidates:
    """Per-site candidate sets of a list of states, padded into tensors.

    sites, new_ids : LongTensor [B, P]   proposals (flat site index, candidate cell); padding repeats a valid
                                         proposal and is routed to the dummy group ``S``.
    log_k : float64 [B, P]               log k_c of each proposal.
    group, slot : LongTensor [B, P]      site group (0..S-1; S = dummy) and slot 1..K inside it.
    own_log_k : float64 [B, S]           log k of the observed value per site group.
    group_mask : bool [B, S]             real groups.
    group_site : LongTensor [B, S]       flat site index of each group (0 for padding).
    """

    batch: Batch
    sites: torch.Tensor
    new_ids: torch.Tensor
    log_k: torch.Tensor
    group: torch.Tensor
    slot: torch.Tensor
    own_log_k: torch.Tensor
    group_mask: torch.Tensor
    n_slots: int
    group_site: torch.Tensor | None = None

    @property
    def n_sites(self) -> int:
        return int(self.group_mask.sum())

    @property
    def n_proposals(self) -> int:
        return int((self.group < self.group_mask.shape[1]).sum())


def _log_weight(k: np.ndarray, K: int, proposal: str) -> np.ndarray:
    """Log proposal weight of a value held by ``k`` of the site's ``K`` copy neighbours.

    classic (random site, random neighbour): w = k.  boundary (random boundary site, random neighbour of another
    cell — the exact sampler's ``proposal="boundary"`` and, one flip at a time, the parallel sampler): the
    proposal a → c has probability ∝ k_c / (K − k_a), and detailed balance at the site holds with
    w = k (K − k) (changes of the boundary-set size are neglected).
    """
    if proposal == "classic":
        return np.log(k)
    if proposal == "boundary":
        return np.log(k) + np.log(K - k)
    raise ValueError(f"proposal must be 'classic' or 'boundary', got {proposal!r}")


def _state_candidates(ids: np.ndarray, offs: np.ndarray, periodic: bool, rng=None, max_sites=None,
                      proposal: str = "classic"):
    K = len(offs)
    nb = np.stack([_shift(ids, o, periodic, fill=-1) for o in offs]).reshape(K, -1)
    own = ids.reshape(-1)
    k_own = (nb == own[None]).sum(0)
    boundary = ((nb != own[None]) & (nb >= 0)).any(0)
    sites = np.flatnonzero(boundary & (k_own > 0))
    if max_sites is not None and len(sites) > max_sites:
        sites = np.sort(rng.choice(sites, size=max_sites, replace=False))
    nv = nb[:, sites].T                                    # [S, K]
    ov = own[sites]
    srt = np.sort(nv, axis=1)
    first = np.ones_like(srt, dtype=bool)
    first[:, 1:] = srt[:, 1:] != srt[:, :-1]
    cand = first & (srt != ov[:, None]) & (srt >= 0)
    counts = (srt[:, :, None] == srt[:, None, :]).sum(2)
    g, k = np.nonzero(cand)
    rank = np.cumsum(cand, axis=1)          # slot of a candidate = its rank among the site's candidates
    return {"sites": sites[g], "new_ids": srt[g, k], "log_k": _log_weight(counts[g, k], K, proposal), "group": g,
            "slot": rank[g, k], "own_log_k": _log_weight(k_own[sites], K, proposal), "n_groups": len(sites),
            "group_site": sites}


def build_candidates(states, *, copy_order: int = 2, periodic: bool = True, device=None, n_ids=None,
                     max_sites_per_state: int | None = None, rng: np.random.Generator | None = None,
                     proposal: str = "classic") -> Candidates:
    """Candidate sets of the boundary sites of ``states`` (optionally a random subset per state).

    ``log_k`` / ``own_log_k`` hold the log proposal weights of :func:`_log_weight` for ``proposal``.
    """
    states = list(states)
    offs = neighbour_offsets(copy_order, states[0].ndim)
    per = [_state_candidates(s.ids, offs, periodic, rng, max_sites_per_state, proposal) for s in states]
    B = len(states)
    S = max(1, max(p["n_groups"] for p in per))
    P = max(1, max(len(p["sites"]) for p in per))
    sites = np.zeros((B, P), np.int64)
    new_ids = np.zeros((B, P), np.int64)
    log_k = np.zeros((B, P), np.float64)
    group = np.full((B, P), S, np.int64)
    slot = np.ones((B, P), np.int64)
    own = np.zeros((B, S), np.float64)
    gmask = np.zeros((B, S), bool)
    gsite = np.zeros((B, S), np.int64)
    for b, p in enumerate(per):
        n = len(p["sites"])
        if n:
            sites[b, :n] = p["sites"]
            new_ids[b, :n] = p["new_ids"]
            log_k[b, :n] = p["log_k"]
            group[b, :n] = p["group"]
            slot[b, :n] = p["slot"]
            sites[b, n:] = p["sites"][0]
            new_ids[b, n:] = p["new_ids"][0]
        else:  # no boundary site: a harmless self-proposal, routed to the dummy group
            new_ids[b, :] = int(states[b].ids.reshape(-1)[0])
        own[b, : p["n_groups"]] = p["own_log_k"]
        gmask[b, : p["n_groups"]] = True
        gsite[b, : p["n_groups"]] = p["group_site"]
    batch = Batch.from_states(states, n_ids=n_ids, device=device, periodic=periodic)
    t = lambda a: torch.as_tensor(a, device=device)
    return Candidates(batch, t(sites), t(new_ids), t(log_k), t(group), t(slot), t(own), t(gmask),
                      int(slot.max()) + 1, t(gsite))


def _nll_from_delta(c: Candidates, dH: torch.Tensor, T: float, proposal_aware: bool = True) -> torch.Tensor:
    B, S = c.group_mask.shape
    logit = -dH / T
    own = c.own_log_k
    if proposal_aware:
        logit = logit + c.log_k
    else:
        own = torch.zeros_like(own)
    dense = torch.full((B, S + 1, c.n_slots), -math.inf, dtype=logit.dtype, device=logit.device)
    dense[:, :S, 0] = own
    bidx = torch.arange(B, device=logit.device)[:, None].expand_as(c.group)
    dense = dense.index_put((bidx, c.group, c.slot), logit)
    lz = torch.logsumexp(dense[:, :S], dim=-1)
    nll = (lz - own)[c.group_mask]
    return nll.mean() if nll.numel() else torch.zeros((), dtype=logit.dtype, device=logit.device)


def _delta_with_grad(hamiltonian, batch: Batch, sites: torch.Tensor, new_ids: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(sites.shape, dtype=torch.float64, device=batch.device)
    for t in hamiltonian.terms:
        if t.analytic or t.delta_differentiable:  # local ΔH (the local NH: a crop per proposal, any lattice size)
            out = out + t.delta(batch, sites, new_ids).to(torch.float64)
        else:
            out = out + t.delta_full(batch, sites, new_ids, chunk=256)  # through energy(): with gradients
    return out


def pl_nll(hamiltonian, cands: Candidates, *, proposal_aware: bool = True, params=None) -> torch.Tensor:
    """Mean negative log pseudo-likelihood per boundary site (differentiable in the parameters).

    Analytic terms and terms with an exact differentiable ``delta`` (``delta_differentiable``: the local NH)
    use the batched ``delta``; other neural terms ``energy(after) − energy(before)`` (differentiable).
    """
    with using_params(hamiltonian, params or {}):
        dH = _delta_with_grad(hamiltonian, cands.batch, cands.sites, cands.new_ids)
    return _nll_from_delta(cands, dH.to(torch.float64), hamiltonian.temperature, proposal_aware)


@dataclass
class PLResult:
    nll: float
    iterations: int
    seconds: float
    method: str
    n_sites: int
    history: list = field(default_factory=list)
    #: convex fits only (not serialised): the fit coordinates at the optimum, the tabulated problem
    #: (:class:`LinearPL`, for uncertainty and per-window refits: ``training.diagnostics``) and the ParamMap
    theta: torch.Tensor | None = None
    problem: LinearPL | None = None
    param_map: ParamMap | None = None
    #: fit coordinates → free parameters when V* is learned (``theta`` then holds κ = λ·V*); None otherwise
    to_free: Callable | None = None


def _volume_target_pairs(pmap: ParamMap):
    """``[(i_lambda, i_target)]``: indices into ``pmap.entries`` of a volume term whose λ and V* are both free.

    ΔH is bilinear in (λ, V*) but linear in (λ, κ = λ·V*) for every candidate the fit uses (no copy creates or
    deletes a cell), so the convex fit works in κ and returns V* = κ/λ."""
    by_term: dict = {}
    for i, e in enumerate(pmap.entries):
        parts = e.name.split(".")
        if len(parts) == 3 and parts[0] == "terms" and getattr(pmap.ham.terms[int(parts[1])], "kind", "") == "volume":
            by_term.setdefault(parts[1], {})[parts[2]] = i
    return [(d["lam"], d["target"]) for d in by_term.values() if "lam" in d and "target" in d]


def _to_coords(pmap: ParamMap, pairs, theta: torch.Tensor) -> torch.Tensor:
    """Free parameters → fit coordinates (V* entries replaced by κ = λ·V*)."""
    out = theta.clone()
    offs = np.cumsum([0] + [e.free.numel() for e in pmap.entries])
    for il, it in pairs:
        lam = theta[offs[il]:offs[il + 1]]
        out[offs[it]:offs[it + 1]] = lam * theta[offs[it]:offs[it + 1]]
    return out


def _from_coords(pmap: ParamMap, pairs, coords: torch.Tensor) -> torch.Tensor:
    """Fit coordinates → free parameters (V* = κ/λ; λ must not be 0)."""
    out = coords.clone()
    offs = np.cumsum([0] + [e.free.numel() for e in pmap.entries])
    for il, it in pairs:
        lam = coords[offs[il]:offs[il + 1]]
        if torch.any(lam == 0):
            raise ConfigError("pseudo-likelihood: λ = 0 leaves the learned target volume V* undefined")
        out[offs[it]:offs[it + 1]] = coords[offs[it]:offs[it + 1]] / lam
    return out


def _linear_tabulate(ham, pmap: ParamMap, c: Candidates, pairs=()):
    """ΔH = c0 + F θ over the fit coordinates (the free parameters, with κ = λ·V* in place of a free V*; see
    :func:`_volume_target_pairs`), or None if ΔH is not linear in them."""
    free = pmap.parameters()
    sizes = [p.numel() for p in free]
    n = sum(sizes)
    saved = [p.detach().clone() for p in free]
    offs = np.cumsum([0] + sizes)

    def at(vec):
        pmap.set_flat(_from_coords(pmap, pairs, vec), sync=False)
        with torch.no_grad(), using_params(ham, pmap.functional_params()):
            return ham.delta(c.batch, c.sites, c.new_ids).to(torch.float64)

    try:
        base = torch.zeros(n, dtype=torch.float64)
        for il, _ in pairs:   # evaluate where λ != 0 (V* = κ/λ)
            base[offs[il]:offs[il + 1]] = 1.0
        g0 = at(base)
        cols = []
        for j in range(n):
            e = base.clone()
            e[j] += 1.0
            cols.append(at(e) - g0)
        F = torch.stack(cols, dim=-1)                       # [B, P, n]
        c0 = g0 - F @ base
        probe = torch.linspace(0.3, 1.7, n, dtype=torch.float64)
        ok = torch.allclose(at(probe), c0 + F @ probe, rtol=1e-9, atol=1e-9)
    finally:
        with torch.no_grad():
            for p, s in zip(free, saved):
                p.copy_(s)
    return (c0, F) if ok else None


class LinearPL:
    """The convex pseudo-likelihood of an analytic model, ΔH = c0 + F θ, on a dense [sites, slots] layout.

    Row i is one boundary site of one state (``row_state[i]``, flat site ``row_site[i]``); slot 0 holds its
    observed value (ΔH = 0), slots 1.. its candidates. ``ℓ_i(θ) = logsumexp_k z_ik(θ) − z_i0`` is the site's
    negative log conditional likelihood; the fit minimises their mean.
    """

    def __init__(self, c: Candidates, c0: torch.Tensor, F: torch.Tensor, T: float, proposal_aware: bool):
        B, S = c.group_mask.shape
        K = c.n_slots
        n = F.shape[-1]
        real = c.group < S
        bidx = torch.arange(B, device=c.group.device)[:, None].expand_as(c.group)
        gidx = (bidx * S + c.group)[real]
        slot = c.slot[real]
        own = c.own_log_k if proposal_aware else torch.zeros_like(c.own_log_k)
        base = torch.full((B * S, K), -math.inf, dtype=torch.float64, device=c0.device)
        base[:, 0] = own.reshape(-1)
        lk = c.log_k[real] if proposal_aware else torch.zeros_like(c.log_k[real])
        base[gidx, slot] = lk - c0[real] / T
        feat = torch.zeros((B * S, K, n), dtype=torch.float64, device=c0.device)
        feat[gidx, slot] = -F[real] / T                     # d logit / d theta
        keep = c.group_mask.reshape(-1)
        self.base, self.feat, self.own = base[keep], feat[keep], own.reshape(-1)[keep]
        rows = torch.arange(B * S, device=c0.device)[keep]
        self.row_state = (rows // S).cpu().numpy()
        gs = c.group_site if c.group_site is not None else torch.zeros((B, S), dtype=torch.long)
        self.row_site = gs.reshape(-1)[keep].cpu().numpy()
        self.n_params = n

    @property
    def n_rows(self) -> int:
        return self.base.shape[0]

    def subset(self, rows) -> LinearPL:
        """The same problem over the sites ``rows`` only (a copy)."""
        out = LinearPL.__new__(LinearPL)
        r = torch.as_tensor(np.asarray(rows), dtype=torch.long, device=self.base.device)
        out.base, out.feat, out.own = self.base[r], self.feat[r], self.own[r]
        rn = np.asarray(rows)
        out.row_state, out.row_site, out.n_params = self.row_state[rn], self.row_site[rn], self.n_params
        return out

    def _probs(self, theta):
        z = self.base + self.feat @ theta
        lse = torch.logsumexp(z, dim=1)
        p = torch.exp(z - lse[:, None])                   # [m, K]
        ef = torch.bmm(p[:, None, :], self.feat)[:, 0]    # E_p[dz/dθ] = ∇ℓ_i, [m, n]
        return lse, p, ef

    def __call__(self, theta):
        """``(f, ∇f, ∇²f)`` of the mean NLL over the rows."""
        lse, p, ef = self._probs(theta)
        m, n = self.n_rows, self.n_params
        f = (lse - self.own).mean()
        g = ef.mean(0)
        w = (self.feat * p.sqrt()[:, :, None]).reshape(-1, n)
        h = (w.T @ w - ef.T @ ef) / m
        return f, g, h

    def scores(self, theta) -> torch.Tensor:
        """Per-site gradients ∇ℓ_i(θ), [m, n] (they sum to zero at the unweighted optimum)."""
        return self._probs(theta)[2]

    def support(self) -> np.ndarray:
        """Per free parameter: the number of sites whose candidate ΔH depends on it (0 = not identified)."""
        return (self.feat != 0).any(1).sum(0).cpu().numpy()


def _dense_linear_problem(c: Candidates, c0: torch.Tensor, F: torch.Tensor, T: float, proposal_aware: bool):
    """``theta -> (nll, grad, hessian)`` for ΔH = c0 + F θ (a :class:`LinearPL`)."""
    return LinearPL(c, c0, F, T, proposal_aware)


def fit_pl(hamiltonian, states, *, share_lambda: bool = True, proposal_aware: bool = True,
           max_iter: int = 200, tolerance: float = 1e-10, stochastic: bool | None = None, steps: int = 200,
           lr: float = 1e-2, sites_per_state: int = 256, states_per_step: int = 4, seed: int = 0,
           device=None, log=None, progress: bool = False, param_map: ParamMap | None = None,
           proposal: str = "classic", max_sites: int | None = None, status_every: float = 30.0) -> PLResult:
    """Fit ``hamiltonian`` (in place) to ``states`` by the proposal-aware pseudo-likelihood.

    Parameters
    ----------
    hamiltonian : Hamiltonian
        Its learnable parameters (``requires_grad``) are fitted; frozen ones (a frozen prior) are kept.
    states : list of CellState
        Data states, one lattice shape.
    proposal : {"classic", "boundary"}
        The copy-proposal scheme of the dynamics that made the data: "classic" (CompuCell3D, Morpheus: random
        site, random neighbour; the default) or "boundary" (random boundary site, random neighbour of another
        cell: the paper's generator / parallel sampler).
    stochastic : bool, optional
        Force the stochastic (Adam, sampled sites) or the convex (Newton, all sites) solver; by default the
        convex one is used when ΔH is linear in the free parameters (analytic terms), else the stochastic one.
    max_sites : int, optional
        Convex fit only: use at most this many boundary sites — ``max_sites // len(states)`` per state, drawn
        uniformly without replacement (``seed``) from each state's boundary sites — to bound memory (the dense
        layout takes ~200 bytes per site and free parameter). ``None``: every boundary site.
    log : callable, optional
        Receives the result line and, for the stochastic solver without ``progress``, a status line every
        ``status_every`` seconds (step, nll, steps/s, ETA; :class:`training.status.StatusLine`).
    """
    t0 = time.perf_counter()
    states = list(states)
    lat = hamiltonian.lattice
    T = hamiltonian.temperature
    pmap = param_map or ParamMap(hamiltonian, share_lambda=share_lambda)
    free = pmap.parameters()
    if not free:
        raise ConfigError("the model has no learnable parameter (a frozen prior and nothing else?); nothing to fit")
    n_ids = max(s.n_ids for s in states)
    history = []
    if stochastic is None:
        stochastic = not getattr(hamiltonian, "is_analytic", False)
    if not stochastic:
        per_state = None
        if max_sites is not None:
            if int(max_sites) < len(states):
                raise ConfigError(f"max_sites = {max_sites} is fewer than one site per state ({len(states)} states)")
            per_state = int(max_sites) // len(states)
        cands = build_candidates(states, copy_order=lat.copy_order, periodic=lat.periodic, device=device,
                                 n_ids=n_ids, proposal=proposal, max_sites_per_state=per_state,
                                 rng=np.random.default_rng(seed))
        pairs = _volume_target_pairs(pmap)
        tab = _linear_tabulate(hamiltonian, pmap, cands, pairs)
        if tab is None:
            stochastic = True
    if not stochastic:
        c0, F = tab
        theta0 = pmap.flat()
        fgh = _dense_linear_problem(cands, c0, F, T, proposal_aware)
        coords, final, n_it, history = newton_minimize(fgh, _to_coords(pmap, pairs, theta0), max_iter=max_iter,
                                                       tol=tolerance)
        pmap.set_flat(_from_coords(pmap, pairs, coords))
        final = float(final)
        res = PLResult(final, n_it, time.perf_counter() - t0, "convex Newton (float64)", cands.n_sites, history,
                       theta=coords.detach(), problem=fgh, param_map=pmap,
                       to_free=(lambda c: _from_coords(pmap, pairs, c)) if pairs else None)
        if log:
            log(f"pl: convex fit over {cands.n_sites} boundary sites of {len(states)} states: "
                f"nll {final:.6f} after {n_it} Newton steps, {res.seconds:.2f} s")
        return res
    # stochastic version (neural / closure / non-linear terms)
    rng = np.random.default_rng(seed)
    opt = Adam(free, lr=lr)
    it = range(steps)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc="pl (stochastic)", unit="step")
    from .status import StatusLine
    line = StatusLine("pl (stochastic)", steps, every=status_every, emit=log) if log and not progress else None
    loss_v = float("nan")
    for step in it:
        pick = rng.choice(len(states), size=min(states_per_step, len(states)), replace=False)
        cands = build_candidates([states[i] for i in pick], copy_order=lat.copy_order, periodic=lat.periodic,
                                 device=device, n_ids=n_ids, max_sites_per_state=sites_per_state, rng=rng,
                                 proposal=proposal)
        opt.zero_grad()
        loss = pl_nll(hamiltonian, cands, proposal_aware=proposal_aware, params=pmap.functional_params())
        loss.backward()
        opt.step()
        pmap.sync()
        loss_v = float(loss.detach())
        history.append(loss_v)
        if progress:
            it.set_postfix(nll=f"{loss_v:.4f}")
        if line is not None:
            line.update(step + 1, nll=loss_v)
    res = PLResult(loss_v, steps, time.perf_counter() - t0, "stochastic Adam", sites_per_state * len(pick),
                   history)
    if log:
        log(f"pl: stochastic fit, {steps} steps of {states_per_step} states x {sites_per_state} sites: "
            f"last nll {loss_v:.6f}, {res.seconds:.2f} s")
    return res
