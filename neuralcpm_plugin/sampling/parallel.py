"""The paper's approximate parallel sampler (Minartz et al. 2025, App. B.1, Algorithm 2), batched over chains.

One step, for every chain independently (``../shared/SPEC.md`` → Sampler):

1. draw ``P`` distinct sites uniformly without replacement from the chain's *boundary set* (sites with a
   neighbour of another id in the copy neighbourhood, order ``hamiltonian.lattice.copy_order``, periodic or
   not as ``batch.periodic``); a chain with fewer than ``P`` boundary sites uses all it has;
2. every drawn site x picks uniformly one of its copy neighbours that belongs to a different cell and proposes
   to copy that neighbour's cell **into x** (the paper's direction; x is overwritten);
3. all ΔH are computed against the *same* current state (``hamiltonian.delta``);
4. each proposal is accepted independently with probability ``min(1, exp(-ΔH/T))``;
5. copies that would delete a cell are refused: a proposal whose cell has volume 1 (``deletion_mask``), and —
   because the accepted copies are applied together — every removal from a cell whose accepted removals in
   this step would reach its volume (conservative: such a cell keeps all its sites this step);
6. all accepted copies are applied at once (the drawn sites are distinct, so no two write the same site);
   volumes are updated incrementally, and so is the boundary set.

This is not detailed balance (the paper says so), and the boundary proposal itself carries no Hastings
correction: even with P = 1 the stationary statistics differ from the classic sampler's (``python
benchmarks/bench_parallel.py --drift --vs-exact`` measures it against the reference runs). ``m`` MCS =
``round(m·H·W/P)`` steps.

Two back ends, same algorithm:

* ``"torch"`` — any Hamiltonian (neural terms included), CPU or CUDA, vectorised over chains and proposals;
  random numbers from the ``torch.Generator`` passed to :meth:`ParallelSampler.step`.
* ``"numba"`` — CPU fast path for purely analytic Hamiltonians made of ``contact``, ``volume`` and
  ``external`` terms: one compiled loop per chain (serial by default; ``threads=True`` runs chains in numba
  threads), per-chain splitmix64 random streams seeded from the torch generator, the boundary set kept as an
  index list with positions (O(1) insert/remove), P distinct sites by a partial Fisher–Yates shuffle of it.
  Same proposal and acceptance rules as the torch back end, different random streams (results agree in
  distribution, not bit for bit). ``backend="auto"`` (default) picks it whenever it applies.
  Sites of the torch back end: see :func:`_draw_sites`.
* ``"compiled"`` — CPU, every Hamiltonian the exact sampler compiles without Python callbacks (analytic
  contact, volume, surface, external and directed-motion terms, plus at most one ``local_nh`` and one
  ``pooled_nh`` term on a 2-D lattice): the step of :func:`~neuralcpm_plugin.sampling._kernels.parallel_steps`
  on the exact sampler's compiled ΔH and incremental caches (one lattice at a time; the neural terms' per-patch
  caches are updated per accepted copy instead of recomputing every lattice's features at every step, as the
  torch back end does). Same algorithm and rules, its own xoshiro256** stream per chain and call (seeded from
  the torch generator), so it agrees with the torch back end in distribution, not bit for bit. Chosen by
  ``backend="compiled"``, or by ``"auto"`` with ``compiled_neural=True`` for a Hamiltonian the numba back end
  does not cover. The compiled state is rebuilt from ``batch`` at every :meth:`ParallelSampler.sweep` /
  :meth:`ParallelSampler.step` call (so parameter changes between calls are always seen) and written back.

Both are deterministic given the generator's seed. The sampler caches the boundary set of the batch it last
touched; it notices a replaced ``batch.ids`` tensor or in-place torch writes to it (tensor version counter),
but not writes through a numpy view — call :meth:`ParallelSampler.reset` after those.
"""

from __future__ import annotations

import math
import weakref

import numba
import numpy as np
import torch

from ..errors import ConfigError
from ..hamiltonian.analytic import ContactEnergy, ExternalPotential, VolumeConstraint, _rows, neighbour_table
from ..hamiltonian.base import Batch, deletion_mask
from ..lattice import neighbour_offsets

__all__ = ["ParallelSampler"]


def _boundary_of(ids_flat: torch.Tensor, tab: torch.Tensor, sites: torch.Tensor | None = None) -> torch.Tensor:
    """Boundary flag of ``sites`` [B, M] (or of every site): a valid neighbour with another id."""
    B = ids_flat.shape[0]
    if sites is None:
        nbr = tab[None].expand(B, *tab.shape)
        own = ids_flat
    else:
        nbr = _rows(tab, sites)
        own = ids_flat.gather(1, sites)
    M, K = nbr.shape[1], nbr.shape[2]
    nb = ids_flat.gather(1, nbr.clamp(min=0).reshape(B, M * K)).view(B, M, K)
    return ((nb != own[..., None]) & (nbr >= 0)).any(-1)


def _draw_sites(mask: torch.Tensor, P: int, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, P]`` distinct sites drawn uniformly without replacement from each row's boundary set.

    Rows with fewer than ``P`` boundary sites get all of them (the rest of the row is marked invalid).
    Common case (every row has many boundary sites): iid uniform lattice sites are drawn, non-boundary draws
    and repeats are discarded and the first ``P`` survivors kept — the kept set is a uniform random P-subset
    of the boundary set (the procedure is invariant under permutations of the boundary sites). Otherwise:
    the ``P`` smallest of iid random keys over the boundary sites (exact, O(lattice) per step).
    """
    B, N = mask.shape
    dev = mask.device
    count = mask.sum(1)
    cmin = int(count.min())
    M = int(1.5 * P * N / max(cmin, 1)) + 32
    if cmin < 2 * P or M > N // 4:
        keys = torch.rand((B, N), generator=generator, device=dev, dtype=torch.float32)
        keys.masked_fill_(~mask, 2.0)
        kv, sites = torch.topk(keys, P, dim=1, largest=False, sorted=False)
        return sites, kv < 2.0
    draws = torch.randint(0, N, (B, M), generator=generator, device=dev)
    for _ in range(64):
        ok = mask.gather(1, draws)
        sv, order = torch.sort(draws, dim=1, stable=True)
        dup_sorted = torch.zeros_like(ok)
        dup_sorted[:, 1:] = sv[:, 1:] == sv[:, :-1]
        dup = torch.zeros_like(ok).scatter_(1, order, dup_sorted)
        good = ok & ~dup
        rank = good.cumsum(1)
        if bool((rank[:, -1] >= P).all()):
            break
        draws = torch.cat([draws, torch.randint(0, N, (B, M), generator=generator, device=dev)], 1)
    else:  # pragma: no cover - astronomically unlikely
        raise RuntimeError("boundary-site sampling did not converge")
    sites = draws[good & (rank <= P)].view(B, P)
    return sites, torch.ones((B, P), dtype=torch.bool, device=dev)


class ParallelSampler:
    """Paper Algorithm 2: ``n_flips`` simultaneous boundary copy attempts per chain and step.

    Parameters
    ----------
    hamiltonian : Hamiltonian
        Any Hamiltonian with the batched ``delta``; its ``lattice.copy_order`` sets the copy neighbourhood.
    n_flips : int
        P, proposals per chain and step.
    temperature : float, optional
        Metropolis temperature; defaults to ``hamiltonian.temperature``.
    backend : {"auto", "torch", "numba"}
        See the module docstring. "numba" raises :class:`ConfigError` if the Hamiltonian has other terms.
    threads : bool
        numba back end only: run the chains in parallel numba threads (OpenMP layer). Off by default: idle
        OpenMP worker threads spin after a parallel region and slow down torch work in the same process.
    compiled_neural : bool
        With ``backend="auto"``: use the "compiled" back end for a Hamiltonian the numba back end does not
        cover but the exact sampler compiles (neural ``local_nh`` / ``pooled_nh`` terms, directed motion,
        surface). Off by default (training keeps the torch back end's random streams).
    """

    def __init__(self, hamiltonian, n_flips: int = 50, temperature: float | None = None, *, backend: str = "auto",
                 threads: bool = False, compiled_neural: bool = False):
        if int(n_flips) < 1:
            raise ConfigError(f"n_flips must be >= 1, got {n_flips}")
        if backend not in ("auto", "torch", "numba", "compiled"):
            raise ConfigError(f"backend must be 'auto', 'torch', 'numba' or 'compiled', got {backend!r}")
        self.hamiltonian = hamiltonian
        self.P = int(n_flips)
        self.temperature = float(hamiltonian.temperature if temperature is None else temperature)
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        self.backend = backend
        self.threads = bool(threads)
        self.compiled_neural = bool(compiled_neural)
        if backend == "numba" and not self.numba_capable():
            raise ConfigError("backend='numba' needs a Hamiltonian made only of contact, volume and external terms; "
                              f"got {[t.kind for t in hamiltonian.terms]}")
        if backend == "compiled" and not self.compiled_capable():
            raise ConfigError("backend='compiled' needs a Hamiltonian whose every term the exact sampler compiles "
                              "(analytic terms, at most one local_nh and one pooled_nh on a 2-D lattice); got "
                              f"{[t.kind for t in hamiltonian.terms]}")
        self.record = False   # keep the last step's proposals in self.last (tests, diagnostics)
        self.last: dict | None = None
        self.reset()

    # ------------------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the cached boundary set (recomputed at the next step)."""
        self._key = None
        self._ref = None
        self._mask = None
        self._nb = None
        self._tab_key = None
        self._tab = None

    def numba_capable(self) -> bool:
        return all(type(t) in (ContactEnergy, VolumeConstraint, ExternalPotential) for t in self.hamiltonian.terms)

    def compiled_capable(self) -> bool:
        """Every term runs in the exact sampler's compiled kernels (no Python callback terms)."""
        from .exact import _compiled_neural, _split_hamiltonian

        _, other = _split_hamiltonian(self.hamiltonian)
        shape = tuple(getattr(self.hamiltonian.lattice, "shape", ()) or ())
        if not other:
            return True
        if len(shape) != 2:
            return False
        return not _compiled_neural(other, shape)[2]

    def _use_compiled(self, batch: Batch) -> bool:
        if self.backend == "compiled":
            if batch.device.type != "cpu":
                raise ConfigError("backend='compiled' runs on CPU batches only")
            return True
        return (self.backend == "auto" and self.compiled_neural and batch.device.type == "cpu"
                and not self._use_numba(batch) and self.compiled_capable())

    def _use_numba(self, batch: Batch) -> bool:
        if self.backend in ("torch", "compiled"):
            return False
        if batch.device.type != "cpu":
            if self.backend == "numba":
                raise ConfigError("backend='numba' runs on CPU batches only")
            return False
        layout_ok = all(t.dtype == torch.int64 and t.is_contiguous() and not t.requires_grad
                        for t in (batch.ids, batch.types, batch.volumes))
        if not layout_ok:
            if self.backend == "numba":
                raise ConfigError("backend='numba' needs contiguous int64 ids, types and volumes "
                                  "(Batch.from_states makes them)")
            return False
        return self.numba_capable()

    def _copy_table(self, batch: Batch) -> torch.Tensor:
        order = getattr(self.hamiltonian.lattice, "copy_order", 2)
        key = (batch.shape, batch.periodic, str(batch.device), order)
        if self._tab_key != key:
            tab = neighbour_table(batch.shape, neighbour_offsets(order, len(batch.shape)), batch.periodic,
                                  batch.device)
            # a neighbour that is the site itself (lattice dimension too small for the stencil) is no neighbour
            self_ = tab == torch.arange(tab.shape[0], device=tab.device)[:, None]
            self._tab = torch.where(self_, torch.full_like(tab, -1), tab)
            self._tab_key = key
        return self._tab

    def _cache_key(self, batch: Batch, kind: str):
        return (kind, batch.ids.data_ptr(), batch.ids._version, tuple(batch.ids.shape), batch.periodic)

    def _cache_valid(self, batch: Batch, kind: str) -> bool:
        # a weak reference, so that a new tensor that reuses a freed one's address is never mistaken for it
        ref = self._ref() if self._ref is not None else None
        return ref is batch.ids and self._key == self._cache_key(batch, kind)

    def _remember(self, batch: Batch, kind: str) -> None:
        self._ref = weakref.ref(batch.ids)
        self._key = self._cache_key(batch, kind)

    # ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, batch: Batch, generator: torch.Generator | None = None) -> dict:
        """One parallel step on every chain, in place on ``batch``; returns counts (see :meth:`sweep`)."""
        return self._run(batch, 1, generator)

    @torch.no_grad()
    def sweep(self, batch: Batch, mcs: float, generator: torch.Generator | None = None) -> dict:
        """``round(mcs·n_sites/P)`` steps. Returns ``{"steps", "attempts", "accepted", "acceptance",
        "refused_deletions"}`` summed over chains and steps (attempts = proposals actually made)."""
        n_sites = math.prod(batch.shape)
        return self._run(batch, round(float(mcs) * n_sites / self.P), generator)

    def _run(self, batch: Batch, n_steps: int, generator) -> dict:
        if batch.ids.dim() < 3:
            raise ValueError(f"batch.ids must be [B, *lattice], got {tuple(batch.ids.shape)}")
        if self._use_compiled(batch):
            att, acc, ref = self._run_compiled(batch, n_steps, generator)
        elif self._use_numba(batch):
            att, acc, ref = self._run_numba(batch, n_steps, generator)
        else:
            att = acc = ref = 0
            for _ in range(n_steps):
                a, c, r = self._step_torch(batch, generator)
                att += a
                acc += c
                ref += r
        return {"steps": n_steps, "attempts": int(att), "accepted": int(acc),
                "acceptance": float(acc) / float(att) if att else 0.0, "refused_deletions": int(ref)}

    # ------------------------------------------------------------------------------------------------
    # torch back end
    # ------------------------------------------------------------------------------------------------
    def _step_torch(self, batch: Batch, generator):
        tab = self._copy_table(batch)
        B = batch.B
        ids = batch.ids.view(B, -1)
        N = ids.shape[1]
        if not self._cache_valid(batch, "torch") or self._mask is None:
            self._mask = _boundary_of(ids, tab)
        mask = self._mask
        dev = batch.device
        P = min(self.P, N)
        # 1. P distinct boundary sites per chain, uniformly without replacement
        sites, valid = _draw_sites(mask, P, generator)
        # 2. a uniformly chosen neighbour of another cell
        nbr = _rows(tab, sites)  # [B, P, K]
        K = nbr.shape[-1]
        nb_ids = ids.gather(1, nbr.clamp(min=0).view(B, -1)).view(B, P, K)
        old = ids.gather(1, sites)
        other = (nb_ids != old[..., None]) & (nbr >= 0)
        ck = torch.rand((B, P, K), generator=generator, device=dev, dtype=torch.float32)
        ck.masked_fill_(~other, -1.0)
        pick = ck.argmax(-1, keepdim=True)
        new = nb_ids.gather(2, pick).squeeze(-1)
        valid = valid & other.any(-1)
        new = torch.where(valid, new, old)  # invalid slots propose a no-op
        # 3. ΔH against the same state; 4. independent Metropolis
        dH = self.hamiltonian.delta(batch, sites, new).to(torch.float64)
        u = torch.rand((B, P), generator=generator, device=dev, dtype=torch.float64)
        dele = deletion_mask(batch, sites, new)
        acc = valid & ~dele & (u < torch.exp(-dH / self.temperature))
        # 5. joint deletion guard: refuse every removal from a cell whose accepted removals reach its volume
        losses = torch.zeros_like(batch.volumes).scatter_add_(1, old, acc.long())
        dying = (losses >= batch.volumes) & (losses > 0)
        dying[:, 0] = False
        doomed = acc & dying.gather(1, old)
        acc = acc & ~doomed
        refused = int((valid & dele).sum()) + int(doomed.sum())
        # 6. apply at once
        acc_l = acc.long()
        batch.volumes.scatter_add_(1, old, -acc_l)
        batch.volumes.scatter_add_(1, new, acc_l)
        ids.scatter_(1, sites, torch.where(acc, new, old))
        # boundary flags can change only at the changed sites and their neighbours
        bi, pi = acc.nonzero(as_tuple=True)
        if bi.numel():
            x = sites[bi, pi]
            xn = nbr[bi, pi]
            touched = torch.cat([x[:, None], torch.where(xn >= 0, xn, x[:, None])], 1)  # [M, K+1]
            tn = _rows(tab, touched)  # [M, K+1, K]
            flat = ids.reshape(-1)
            base = (bi * N)[:, None]
            own = flat[base + touched]
            nb = flat[(base[..., None] + tn.clamp(min=0)).reshape(-1)].view(tn.shape)
            flag = ((nb != own[..., None]) & (tn >= 0)).any(-1)
            mask.view(-1)[(base + touched).reshape(-1)] = flag.reshape(-1)
        self._remember(batch, "torch")
        if self.record:
            self.last = {"sites": sites.clone(), "new_ids": new.clone(), "old_ids": old.clone(),
                         "valid": valid.clone(), "accepted": acc.clone(), "delta": dH.clone()}
        return int(valid.sum()), int(acc.sum()), refused

    # ------------------------------------------------------------------------------------------------
    # numba back end
    # ------------------------------------------------------------------------------------------------
    def _pack(self, batch: Batch):
        n_t = int(batch.types.max()) + 1
        for t in self.hamiltonian.terms:
            n_t = max(n_t, getattr(t, "n_types", 0) + 1)
        N = math.prod(batch.shape)
        J = np.zeros((n_t, n_t))
        lam = np.zeros(n_t)
        tgt = np.zeros(n_t)
        mu = np.zeros(n_t)
        phi = np.zeros(N)
        contact_orders = []
        Js = []
        for t in self.hamiltonian.terms:
            if isinstance(t, ContactEnergy):
                Jt = (t.J.detach().cpu().double() * t.scale_value()).numpy()
                Js.append((t.order, Jt))
                contact_orders.append(t.order)
            elif isinstance(t, VolumeConstraint):
                lt = t.lam.detach().cpu().double().numpy() * t.scale_value()
                k = len(lt)
                lam_t = lam.copy()
                lam_t[:k] = lt
                lam_t[0] = 0.0
                if np.any(lam != 0) and not np.allclose(tgt[:k], t.target.detach().cpu().numpy()):
                    raise ConfigError("the numba back end supports one volume target table")
                lam += lam_t
                tgt[:k] = t.target.detach().cpu().double().numpy()
            elif isinstance(t, ExternalPotential):
                m = t._mu().detach().cpu().double().numpy()
                mu[: len(m)] += m
                if tuple(t.field.shape) != tuple(batch.shape):
                    raise ValueError(f"external field has shape {tuple(t.field.shape)}, the lattice {batch.shape}")
                phi = phi + t.field.detach().cpu().double().numpy().ravel()
        # contact terms of several orders: one table per distinct order (usually exactly one)
        orders = sorted(set(contact_orders))
        if len(orders) > 1:
            raise ConfigError("the numba back end supports contact terms of one neighbourhood order")
        if orders:
            for _, Jt in Js:
                J[: Jt.shape[0], : Jt.shape[1]] += Jt
            ctab = neighbour_table(batch.shape, neighbour_offsets(orders[0], len(batch.shape)), batch.periodic)
            self_ = ctab == torch.arange(ctab.shape[0])[:, None]
            ctab = torch.where(self_, torch.full_like(ctab, -1), ctab).numpy()
        else:
            ctab = np.full((N, 1), -1, dtype=np.int64)
        return (np.ascontiguousarray(J.ravel()), lam, tgt, mu, phi, np.ascontiguousarray(ctab), n_t,
                bool(orders), bool(np.any(lam != 0)), bool(np.any(mu != 0) and np.any(phi != 0)))

    def _run_numba(self, batch: Batch, n_steps: int, generator):
        B = batch.B
        ids = batch.ids.view(B, -1).numpy()
        types = batch.types.numpy()
        vols = batch.volumes.numpy()
        if types.dtype != np.int64 or vols.dtype != np.int64 or ids.dtype != np.int64:
            raise ValueError("numba back end expects int64 ids, types and volumes (Batch.from_states makes them)")
        if int(ids.max()) >= types.shape[1]:
            raise ValueError("an id on the lattice has no entry in batch.types")
        copy_tab = np.ascontiguousarray(self._copy_table(batch).numpy())
        J, lam, tgt, mu, phi, ctab, n_t, use_c, use_v, use_e = self._pack(batch)
        if not self._cache_valid(batch, "numba") or self._nb is None:
            bset = np.empty(ids.shape, dtype=np.int64)
            bpos = np.empty(ids.shape, dtype=np.int64)
            bcount = np.zeros(B, dtype=np.int64)
            _init_boundary(ids, copy_tab, bset, bpos, bcount)
            self._nb = (bset, bpos, bcount)
        bset, bpos, bcount = self._nb
        seeds = torch.randint(0, 2**62, (B,), generator=generator, dtype=torch.int64).numpy().astype(np.uint64)
        counts = np.zeros((B, 3), dtype=np.int64)
        run = _run_steps_threaded if self.threads else _run_steps
        run(ids, types, vols, bset, bpos, bcount, copy_tab, ctab, J, n_t, lam, tgt, mu, phi,
                    use_c, use_v, use_e, 1.0 / self.temperature, self.P, n_steps, seeds, counts)
        self._remember(batch, "numba")
        self._mask = None
        return counts[:, 0].sum(), counts[:, 1].sum(), counts[:, 2].sum()

    # ------------------------------------------------------------------------------------------------
    # compiled back end (the exact sampler's kernels)
    # ------------------------------------------------------------------------------------------------
    def _run_compiled(self, batch: Batch, n_steps: int, generator):
        from ..lattice import CellState
        from . import _kernels as K
        from .exact import ExactSampler

        B = batch.B
        seeds = torch.randint(0, 2**62, (B,), generator=generator, dtype=torch.int64).tolist()
        # the compiled states of the last call are reused while the batch is untouched since (same tensor,
        # same version) and the parameters are unchanged; else rebuilt from the batch
        params = (tuple(int(p._version) for p in self.hamiltonian.parameters())
                  + tuple(float(t.scale_value()) for t in self.hamiltonian.terms if hasattr(t, "scale_value"))
                  + (self.temperature, self.P))
        if not (self._cache_valid(batch, "compiled") and self._nb is not None and self._nb[0] == params):
            ids_all = batch.ids.detach().cpu().view(B, -1)
            types_all = batch.types.detach().cpu()
            exs = []
            for b in range(B):
                st = CellState(ids_all[b].numpy().reshape(batch.shape).astype(np.int32),
                               types_all[b].numpy().astype(np.int32))
                ex = ExactSampler(st, self.hamiltonian, proposal="boundary", periodic=batch.periodic,
                                  temperature=self.temperature, narrow_ids=False)
                if ex.callback_terms:  # pragma: no cover - compiled_capable() rules this out
                    raise ConfigError("backend='compiled': a term has no compiled form")
                exs.append((ex, np.zeros(ex.n_sites + 4 * self.P + ex.n_ids, dtype=np.int64)))
            self._nb = (params, exs)
        counts = np.zeros(4, dtype=np.int64)
        for b, (ex, work) in enumerate(self._nb[1]):
            ex._rng = K.seed_state(int(seeds[b]))
            fn = K.parallel_steps if ex._NN is None else K.parallel_steps_nrt
            fn(ex._ids, ex._types, ex._vol, ex._G, ex.pack.P, ex._A, ex._B, ex._rng, int(n_steps), self.P,
               1.0 / self.temperature, counts, work, ex._NN)
            batch.ids[b].copy_(torch.from_numpy(ex._ids.reshape(batch.shape)))
            batch.volumes[b, : ex.n_ids].copy_(torch.from_numpy(ex._vol))
        self._remember(batch, "compiled")
        self._mask = None
        return counts[0], counts[2], counts[3]

    def boundary_mask(self, batch: Batch) -> torch.Tensor:
        """The boundary set as a ``[B, n_sites]`` bool tensor (fresh recount; for checks)."""
        return _boundary_of(batch.ids.view(batch.B, -1), self._copy_table(batch))


# ----------------------------------------------------------------------------------------------------------
# compiled kernels (numba back end)
# ----------------------------------------------------------------------------------------------------------
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


@numba.njit(cache=True, inline="always")
def _uniform(state, b):
    """splitmix64 step of chain b's stream → float64 in [0, 1)."""
    z = state[b] + _GOLDEN
    state[b] = z
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    z = z ^ (z >> np.uint64(31))
    return float(z >> np.uint64(11)) * (1.0 / 9007199254740992.0)


@numba.njit(cache=True, inline="always")
def _is_boundary(ids, b, q, tab):
    own = ids[b, q]
    for k in range(tab.shape[1]):
        n = tab[q, k]
        if n >= 0 and ids[b, n] != own:
            return True
    return False


@numba.njit(cache=True)
def _init_boundary(ids, tab, bset, bpos, bcount):
    B, N = ids.shape
    for b in range(B):
        c = 0
        for q in range(N):
            if _is_boundary(ids, b, q, tab):
                bset[b, c] = q
                bpos[b, q] = c
                c += 1
            else:
                bpos[b, q] = -1
        bcount[b] = c


@numba.njit(cache=True, inline="always")
def _set_flag(b, q, flag, bset, bpos, bcount):
    p = bpos[b, q]
    if flag and p < 0:
        c = bcount[b]
        bset[b, c] = q
        bpos[b, q] = c
        bcount[b] = c + 1
    elif not flag and p >= 0:
        last = bcount[b] - 1
        moved = bset[b, last]
        bset[b, p] = moved
        bpos[b, moved] = p
        bpos[b, q] = -1
        bcount[b] = last


@numba.njit(cache=True)
def _run_steps(ids, types, vols, bset, bpos, bcount, ctab_copy, ctab, J, n_t, lam, tgt, mu, phi,
               use_c, use_v, use_e, inv_t, P, n_steps, seeds, counts):
    for b in range(ids.shape[0]):
        _chain_steps(b, ids, types, vols, bset, bpos, bcount, ctab_copy, ctab, J, n_t, lam, tgt, mu, phi,
                     use_c, use_v, use_e, inv_t, P, n_steps, seeds, counts)


@numba.njit(cache=True, parallel=True)
def _run_steps_threaded(ids, types, vols, bset, bpos, bcount, ctab_copy, ctab, J, n_t, lam, tgt, mu, phi,
                        use_c, use_v, use_e, inv_t, P, n_steps, seeds, counts):
    for b in numba.prange(ids.shape[0]):
        _chain_steps(b, ids, types, vols, bset, bpos, bcount, ctab_copy, ctab, J, n_t, lam, tgt, mu, phi,
                     use_c, use_v, use_e, inv_t, P, n_steps, seeds, counts)


@numba.njit(cache=True)
def _chain_steps(b, ids, types, vols, bset, bpos, bcount, ctab_copy, ctab, J, n_t, lam, tgt, mu, phi,
                 use_c, use_v, use_e, inv_t, P, n_steps, seeds, counts):
    """All ``n_steps`` steps of chain ``b`` (chains are independent)."""
    Kc = ctab_copy.shape[1]
    rng = np.empty(1, dtype=np.uint64)
    rng[0] = seeds[b]
    sel = np.empty(P, dtype=np.int64)
    new = np.empty(P, dtype=np.int64)
    old = np.empty(P, dtype=np.int64)
    acc = np.zeros(P, dtype=np.bool_)
    loss = np.zeros(vols.shape[1], dtype=np.int64)
    cand = np.empty(Kc, dtype=np.int64)
    att = 0
    nacc = 0
    nref = 0
    for _step in range(n_steps):
        m = min(P, bcount[b])
        # partial Fisher-Yates over the boundary list: m distinct uniform boundary sites
        for i in range(m):
            j = i + int(_uniform(rng, 0) * (bcount[b] - i))
            qi = bset[b, i]
            qj = bset[b, j]
            bset[b, i] = qj
            bset[b, j] = qi
            bpos[b, qj] = i
            bpos[b, qi] = j
            sel[i] = qj
        # proposals and ΔH against the same state
        for i in range(m):
            x = sel[i]
            o = ids[b, x]
            nc = 0
            for k in range(Kc):
                n = ctab_copy[x, k]
                if n >= 0 and ids[b, n] != o:
                    cand[nc] = ids[b, n]
                    nc += 1
            old[i] = o
            acc[i] = False
            if nc == 0:
                new[i] = o
                continue
            a = cand[int(_uniform(rng, 0) * nc)]
            new[i] = a
            att += 1
            to = types[b, o]
            ta = types[b, a]
            dh = 0.0
            if use_c:
                for k in range(ctab.shape[1]):
                    n = ctab[x, k]
                    if n >= 0:
                        nid = ids[b, n]
                        tn = types[b, nid]
                        if nid != a:
                            dh += J[ta * n_t + tn]
                        if nid != o:
                            dh -= J[to * n_t + tn]
            if use_v:
                if a != 0:
                    v = vols[b, a]
                    dh += lam[ta] * ((v + 1 - tgt[ta]) ** 2 - (v - tgt[ta]) ** 2)
                if o != 0:
                    v = vols[b, o]
                    if v > 1:
                        dh += lam[to] * ((v - 1 - tgt[to]) ** 2 - (v - tgt[to]) ** 2)
                    else:
                        dh -= lam[to] * (v - tgt[to]) ** 2
            if use_e:
                dh += phi[x] * (mu[ta] - mu[to])
            u = _uniform(rng, 0)
            if o != 0 and vols[b, o] <= 1:
                nref += 1
                continue
            if dh <= 0.0 or u < np.exp(-dh * inv_t):
                acc[i] = True
                loss[o] += 1
        # joint deletion guard, then apply
        for i in range(m):
            if acc[i]:
                o = old[i]
                if o != 0 and loss[o] >= vols[b, o]:
                    acc[i] = False
                    nref += 1
        for i in range(m):
            loss[old[i]] = 0
        for i in range(m):
            if acc[i]:
                x = sel[i]
                ids[b, x] = new[i]
                vols[b, old[i]] -= 1
                vols[b, new[i]] += 1
                nacc += 1
        for i in range(m):
            if acc[i]:
                x = sel[i]
                _set_flag(b, x, _is_boundary(ids, b, x, ctab_copy), bset, bpos, bcount)
                for k in range(Kc):
                    n = ctab_copy[x, k]
                    if n >= 0:
                        _set_flag(b, n, _is_boundary(ids, b, n, ctab_copy), bset, bpos, bcount)
    counts[b, 0] = att
    counts[b, 1] = nacc
    counts[b, 2] = nref
