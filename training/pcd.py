"""Persistent contrastive divergence (paper §3.2, Eq. 6; App. B.1) with exact resume and scale-out.

Per iteration, for every persistent chain b (global index 0..B-1):

1. with probability ``reset_prob`` the chain is reset to a random data state whose cell types are permuted
   among its cells;
2. a positive sample x⁺_b is drawn from the data;
3. the chain is advanced by ``mcs`` MCS of the parallel sampler (no gradient through the sampler) → x⁻_b.

Then ``L = mean_b H(x⁺_b) − mean_b H(x⁻_b) + α (mean_b H(x⁺_b)² + mean_b H(x⁻_b)²)`` is minimised by Adam on the
free parameters (:class:`~training.parammap.ParamMap`: symmetric J, shared λ, V* fixed to the data's mean
volume, closure weights learnable), followed by a weight EMA.

Randomness is keyed by the *global chain index*: chain b owns two torch generators (trainer decisions and
its sampler) seeded from ``(seed, b)``. A run split over K processes (torchrun; chains b ∈ [rB/K, (r+1)B/K)
on rank r, gradients all-reduced) therefore makes the same draws as one process, and a resumed run makes
the same draws as an uninterrupted one (every generator state is checkpointed). The price: one sampler call
per chain. ``chain_rng = "batched"`` advances all chains of a process in one sampler call (much faster for
neural Hamiltonians, whose ΔH is evaluated batched) with one generator per process: still exactly
resumable, but the chains' streams then depend on the number of processes.

Divergence guard: a non-finite loss or an energy above ``energy_limit`` rolls the run back to the last good
checkpoint and multiplies the learning rate by ``lr_decay`` (logged to ``train.log`` and the console);
after ``max_rollbacks`` the run stops with an error.
"""

from __future__ import annotations

import csv
import json
import math
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch

from neuralcpm_plugin.errors import NeuralCPMError
from neuralcpm_plugin.hamiltonian.base import Batch

from .checkpoint import load_checkpoint, save_checkpoint
from .optim import Adam
from .parammap import ParamMap, using_params

__all__ = ["ExactChainSampler", "MixedChainSampler", "PCDTrainer", "TrainingDiverged", "chain_seed", "lr_scales"]


def lr_scales(pmap: ParamMap, table: dict) -> list[float]:
    """Per-free-parameter Adam step factors from ``pcd.lr_scale`` ({name: factor}; default 1).

    A name matches the learnable tensor whose dotted name equals it or ends with ``"." + name`` (``pos`` →
    ``terms.3.pos``); a name that matches none is an error naming the learnable tensors.
    """
    names = list(pmap.named_free())
    out = [1.0] * len(names)
    for key, f in table.items():
        hit = [i for i, n in enumerate(names) if n == key or n.endswith("." + key)]
        if not hit:
            raise NeuralCPMError(f"pcd.lr_scale: {key!r} matches no learnable parameter of this model; learnable: "
                                 f"{', '.join(names)}")
        for i in hit:
            out[i] = float(f)
    return out


class TrainingDiverged(NeuralCPMError, RuntimeError):
    """The divergence guard rolled back more often than allowed."""


def chain_seed(seed: int, chain: int, stream: int) -> int:
    """Seed of generator ``stream`` (0 = trainer, 1 = sampler) of global chain ``chain``."""
    return int(np.random.SeedSequence([int(seed), int(chain), int(stream), 0x5EED]).generate_state(1,
                                                                                                     np.uint64)[0]
               & ((1 << 63) - 1))


class ExactChainSampler:
    """The classic sequential sampler (:class:`~neuralcpm_plugin.sampling.exact.ExactSampler`) behind the
    parallel sampler's ``sweep`` API.

    ``pcd.sampler = "exact"``: chains follow the same dynamics as CompuCell3D / Morpheus (random site, random
    neighbour, Metropolis), so PCD targets the distribution the classic-CPM data came from (``pcd.proposal =
    "boundary"``: the boundary-site proposal of the cell-sorting generator instead).  Analytic terms and the
    compiled neural terms (one ``local_nh``, one ``pooled_nh``, 2-D) run inside the sampler's compiled loop,
    from per-lattice caches; any other neural term goes through ``delta_np`` once per candidate (slow).

    Per :meth:`sweep` the current parameters are read once: the numpy evaluators and the compiled weight
    tuples of the neural terms are built once and shared by every chain of the batch (they are cached on the
    terms until a parameter changes), then each chain gets a sampler whose caches are filled from its lattice
    (one compiled pass, O(sites)).  The caches cannot outlive a sweep: the optimiser changes the weights
    between sweeps, and every cached per-patch quantity depends on them.

    Randomness: one seed per chain and sweep is drawn from the chain's sampler generator, and the sampler's
    state at the start of a sweep is a function of (chain lattice, parameters, seed) only, so runs stay
    reproducible and ``--resume`` continues exactly as an uninterrupted run.
    """

    def __init__(self, hamiltonian, n_flips: int = 0, *, proposal: str = "classic"):
        self.hamiltonian = hamiltonian
        self.proposal = proposal

    @torch.no_grad()
    def sweep(self, batch: Batch, mcs: float, generator: torch.Generator | None = None) -> dict:
        from neuralcpm_plugin.lattice import CellState
        from neuralcpm_plugin.sampling.exact import ExactSampler
        acc = cand = 0
        ids_all = batch.ids.cpu().numpy()
        types_all = batch.types.cpu().numpy()
        for b in range(batch.B):
            seed = int(torch.randint(0, 2 ** 62, (), generator=generator))
            state = CellState(ids_all[b].astype(np.int32), types_all[b].astype(np.int32))
            sampler = ExactSampler(state, self.hamiltonian, seed=seed, proposal=self.proposal)
            st = sampler.step(float(mcs))
            batch.ids[b].copy_(torch.from_numpy(sampler.ids.astype(np.int64)))
            acc += int(st.get("accepted", 0))
            cand += int(st.get("candidates", 0))
        batch.recount_volumes()
        return {"acceptance": acc / cand if cand else float("nan")}


class MixedChainSampler:
    """``pcd.sampler = "mixed"``: per sweep, the first half of the batch's chains (``B // 2``) follow the exact
    sequential sampler (:class:`ExactChainSampler`, with ``proposal``) and the rest the paper's parallel sampler
    (:class:`~neuralcpm_plugin.sampling.parallel.ParallelSampler`, ``n_flips`` proposals per step), so that one
    model is contrasted against the negatives of both dynamics it is rolled out under. Needs batched chains
    (``pcd.chain_rng = "batched"``: one sweep per iteration over all chains); a batch of one chain goes to the
    parallel sampler. Both samplers draw their randomness from the one generator passed in, exact part first.
    Returns the acceptance of the two parts (``acceptance_exact``, ``acceptance_parallel``) and their mean
    (``acceptance``)."""

    def __init__(self, hamiltonian, n_flips: int, *, proposal: str = "classic"):
        from neuralcpm_plugin.sampling.parallel import ParallelSampler
        self.exact = ExactChainSampler(hamiltonian, n_flips, proposal=proposal)
        self.parallel = ParallelSampler(hamiltonian, n_flips=n_flips)

    def reset(self):
        self.parallel.reset()

    @torch.no_grad()
    def sweep(self, batch: Batch, mcs: float, generator: torch.Generator | None = None) -> dict:
        k = batch.B // 2
        out: dict = {}
        if k:
            ex = Batch(batch.ids[:k].clone(), batch.types[:k], batch.volumes[:k].clone(), batch.periodic)
            st = self.exact.sweep(ex, mcs, generator)
            batch.ids[:k].copy_(ex.ids)
            out["acceptance_exact"] = st["acceptance"]
        par = Batch(batch.ids[k:].clone(), batch.types[k:], batch.volumes[k:].clone(), batch.periodic)
        self.parallel.reset()
        st = self.parallel.sweep(par, mcs, generator)
        batch.ids[k:].copy_(par.ids)
        out["acceptance_parallel"] = st["acceptance"]
        batch.recount_volumes()
        parts = [v for v in (out.get("acceptance_exact"), out["acceptance_parallel"])
                 if v is not None and math.isfinite(v)]
        out["acceptance"] = float(np.mean(parts)) if parts else float("nan")
        return out


class _Dist:
    def __init__(self):
        import torch.distributed as dist
        self.on = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.on else 0
        self.world = dist.get_world_size() if self.on else 1
        self.dist = dist if self.on else None

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.on:
            self.dist.all_reduce(t, op=self.dist.ReduceOp.SUM)
        return t

    def gather_cat(self, t: torch.Tensor) -> torch.Tensor:
        if not self.on:
            return t
        parts = [torch.empty_like(t) for _ in range(self.world)]
        self.dist.all_gather(parts, t.contiguous())
        return torch.cat(parts, 0)

    def barrier(self):
        if self.on:
            self.dist.barrier()


class PCDTrainer:
    """Persistent contrastive divergence on a Hamiltonian (in place).

    Parameters
    ----------
    hamiltonian : Hamiltonian
    data : list of CellState
        Training states (one lattice shape).
    cfg : dict
        The ``[pcd]`` section of the configuration (:mod:`training.config`).
    sampler_factory : callable
        ``sampler_factory(hamiltonian, n_flips)`` → an object with ``sweep(batch, mcs, generator) -> dict``
        (the parallel sampler).
    run_dir : path
        Metrics CSV, plots, checkpoints and log go here (rank 0 writes).
    seed : int
    device : torch.device or str
    param_map : ParamMap, optional
    on_checkpoint : callable, optional
        ``on_checkpoint(trainer, tag)`` called on rank 0 after each checkpoint (e.g. write the bundle).
    param_columns : callable, optional
        ``param_columns(hamiltonian) -> dict[str, float]`` extra CSV columns (analytic parameters).
    """

    def __init__(self, hamiltonian, data, cfg: dict, *, sampler_factory, run_dir, seed: int = 0,
                 device="cpu", param_map: ParamMap | None = None, share_lambda: bool = True, on_checkpoint=None,
                 param_columns=None, log=None, progress: bool = True, status_every: float = 30.0):
        self.ham = hamiltonian
        self.cfg = dict(cfg)
        self.device = torch.device(device)
        self.run_dir = Path(run_dir)
        self.seed = int(seed)
        self.dist = _Dist()
        self.pmap = param_map or ParamMap(hamiltonian, share_lambda=share_lambda)
        self.free = self.pmap.parameters()
        if not self.free:
            raise NeuralCPMError("pcd: the model has no learnable parameter (everything frozen?)")
        self.opt = Adam(self.free, lr=float(cfg["lr"]), lr_scales=lr_scales(self.pmap, cfg.get("lr_scale") or {}))
        self.ema = [p.detach().clone() for p in self.free]
        self.sampler = sampler_factory(hamiltonian, int(cfg["flips"]))
        self.on_checkpoint = on_checkpoint
        self.param_columns = param_columns or (lambda h: {})
        self._log = log or (lambda m: print(m, file=sys.stderr))
        self.progress = progress and self.dist.rank == 0
        self.status_every = float(status_every)
        self.B = int(cfg["batch"])
        if self.B % self.dist.world:
            raise NeuralCPMError(f"pcd.batch = {self.B} chains cannot be split evenly over {self.dist.world} "
                                 "processes")
        per = self.B // self.dist.world
        self.local = list(range(self.dist.rank * per, (self.dist.rank + 1) * per))
        self.n_ids = max(s.n_ids for s in data)
        self.data = Batch.from_states(data, n_ids=self.n_ids, device=self.device,
                                      periodic=hamiltonian.lattice.periodic)
        self.n_data = self.data.B
        self.iteration = 0
        self.lr_scale = 1.0
        self.rollbacks = 0
        self.ckpt_dir = self.run_dir / "checkpoint"
        self.csv_path = self.run_dir / "metrics.csv"
        self._stop = False
        self._init_chains()

    # ------------------------------------------------------------------ chains and randomness
    def _gen(self, seed, device):
        g = torch.Generator(device=device)
        g.manual_seed(seed)
        return g

    def _init_chains(self):
        self.g_train = {b: self._gen(chain_seed(self.seed, b, 0), "cpu") for b in self.local}
        self.g_samp = {b: self._gen(chain_seed(self.seed, b, 1), self.device) for b in self.local}
        # "batched" sampling: one sampler call for all local chains, one generator per process
        self.batched = self.cfg.get("chain_rng", "per_chain") == "batched"
        self.g_batch = self._gen(chain_seed(self.seed, 1_000_000 + self.dist.rank, 1), self.device)
        perm = bool(self.cfg.get("init_permute", True))
        self.chains = {b: self._data_state(int(torch.randint(self.n_data, (), generator=self.g_train[b])),
                                           self.g_train[b] if perm else None) for b in self.local}

    def _data_state(self, idx: int, g: torch.Generator | None) -> Batch:
        ids = self.data.ids[idx:idx + 1].clone()
        types = self.data.types[idx:idx + 1].clone()
        if g is not None:
            mask = types[0] > 0
            vals = types[0][mask]
            perm = torch.randperm(vals.numel(), generator=g).to(vals.device)
            types[0][mask] = vals[perm]
        vols = self.data.volumes[idx:idx + 1].clone()
        return Batch(ids, types, vols, self.data.periodic)

    def _stack(self, batches) -> Batch:
        return Batch(torch.cat([b.ids for b in batches]), torch.cat([b.types for b in batches]),
                     torch.cat([b.volumes for b in batches]), self.data.periodic)

    # ------------------------------------------------------------------ one iteration
    def _advance(self):
        p = float(self.cfg["reset_prob"])
        pos_idx, accs = [], []
        for b in self.local:
            g = self.g_train[b]
            u = float(torch.rand((), generator=g, dtype=torch.float64))
            if u < p:
                self.chains[b] = self._data_state(int(torch.randint(self.n_data, (), generator=g)),
                                                  g if self.cfg.get("reset_permute", True) else None)
            pos_idx.append(int(torch.randint(self.n_data, (), generator=g)))
            if self.batched:
                continue
            with torch.no_grad():
                if hasattr(self.sampler, "reset"):
                    self.sampler.reset()    # its boundary cache is keyed by tensor identity: start clean per chain
                st = self.sampler.sweep(self.chains[b], float(self.cfg["mcs"]), self.g_samp[b]) or {}
            acc = st.get("acceptance", st.get("acceptance_rate", float("nan")))
            accs.append(float(acc) if acc is not None else float("nan"))
        if self.batched:
            stacked = self._stack([self.chains[b] for b in self.local])
            with torch.no_grad():
                if hasattr(self.sampler, "reset"):
                    self.sampler.reset()
                st = self.sampler.sweep(stacked, float(self.cfg["mcs"]), self.g_batch) or {}
            for i, b in enumerate(self.local):
                self.chains[b] = Batch(stacked.ids[i:i + 1], stacked.types[i:i + 1], stacked.volumes[i:i + 1],
                                       stacked.periodic)
            accs = [float(st.get("acceptance", float("nan")))] * len(self.local)
        return pos_idx, accs

    def step(self) -> dict:
        """One PCD iteration; returns the metrics row (global means)."""
        pos_idx, accs = self._advance()
        idx = torch.as_tensor(pos_idx, device=self.device)
        pos = Batch(self.data.ids[idx], self.data.types[idx], self.data.volumes[idx], self.data.periodic)
        neg = self._stack([self.chains[b] for b in self.local])
        alpha = float(self.cfg["alpha"])
        self.opt.zero_grad(set_to_none=False)
        with using_params(self.ham, self.pmap.functional_params()):
            e_pos = self.ham.energy(pos).to(torch.float64)
            e_neg = self.ham.energy(neg).to(torch.float64)
        loss_local = (e_pos.sum() - e_neg.sum()) / self.B + alpha * ((e_pos ** 2).sum() + (e_neg ** 2).sum()) / self.B
        emax = float(torch.maximum(e_pos.abs().max(), e_neg.abs().max()).detach())
        stats = torch.tensor([float(loss_local.detach()), float(e_pos.detach().sum()), float(e_neg.detach().sum()),
                              float(np.nansum(accs)), float(np.sum(np.isfinite(accs))),
                              float(not math.isfinite(float(loss_local.detach())) or not math.isfinite(emax)
                                    or emax > float(self.cfg["energy_limit"]))], dtype=torch.float64)
        self.dist.all_reduce(stats)
        row = {"iteration": self.iteration + 1, "loss": float(stats[0]), "e_pos": float(stats[1]) / self.B,
               "e_neg": float(stats[2]) / self.B,
               "acceptance": float(stats[3] / stats[4]) if stats[4] > 0 else float("nan"),
               "lr": self.opt.param_groups[0]["lr"], "diverged": bool(stats[5] > 0)}
        if row["diverged"]:
            return row
        loss_local.backward()
        if self.dist.on:
            for p in self.free:
                if p.grad is not None:
                    self.dist.all_reduce(p.grad)
        self.opt.step()
        self.pmap.sync()
        d = float(self.cfg["ema"])
        with torch.no_grad():
            for e, p in zip(self.ema, self.free):
                if d > 0:
                    e.mul_(d).add_(p.detach(), alpha=1.0 - d)
                else:
                    e.copy_(p.detach())
        self.iteration += 1
        return row

    # ------------------------------------------------------------------ checkpoints
    def _gen_state(self, gens: dict) -> torch.Tensor:
        return torch.stack([gens[b].get_state().cpu() for b in self.local])

    def state_tensors(self) -> dict:
        """All tensors of the run (chains gathered from every rank)."""
        t = {}
        for name, v in self.ham.state_dict().items():
            t[f"model.{name}"] = v
        for i, p in enumerate(self.free):
            t[f"free.{i}"] = p.detach()
            t[f"ema.{i}"] = self.ema[i]
        ot, _ = self.opt.to_tensors()
        t.update(ot)
        neg = self._stack([self.chains[b] for b in self.local])
        t["chains.ids"] = self.dist.gather_cat(neg.ids)
        t["chains.types"] = self.dist.gather_cat(neg.types)
        t["chains.volumes"] = self.dist.gather_cat(neg.volumes)
        t["rng.train"] = self.dist.gather_cat(self._gen_state(self.g_train).to(self.device)).cpu()
        t["rng.sampler"] = self.dist.gather_cat(self._gen_state(self.g_samp).to(self.device)).cpu()
        t["rng.sampler_batched"] = self.dist.gather_cat(self.g_batch.get_state()[None].to(self.device)).cpu()
        return t

    def meta(self) -> dict:
        _, om = self.opt.to_tensors()
        return {"iteration": self.iteration, "lr_scale": self.lr_scale, "rollbacks": self.rollbacks,
                "batch": self.B, "seed": self.seed, "n_free": len(self.free), "optimizer": om,
                "world_size": self.dist.world}

    def save(self, tag: str = "checkpoint") -> None:
        tensors = self.state_tensors()      # collective: every rank takes part
        if self.dist.rank == 0:
            save_checkpoint(self.ckpt_dir, tensors, self.meta())
            if self.on_checkpoint is not None:
                self.on_checkpoint(self, tag)
        self.dist.barrier()

    def load(self, path=None) -> None:
        tensors, meta = load_checkpoint(path or self.ckpt_dir)
        if meta["batch"] != self.B or meta["n_free"] != len(self.free):
            raise NeuralCPMError(f"{path or self.ckpt_dir}: checkpoint of a different run (batch "
                                 f"{meta['batch']}, {meta['n_free']} free tensors) cannot be resumed here")
        model_sd = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        self.ham.load_state_dict(model_sd, strict=False)
        with torch.no_grad():
            for i, p in enumerate(self.free):
                p.copy_(tensors[f"free.{i}"].to(p.device, p.dtype))
                self.ema[i].copy_(tensors[f"ema.{i}"].to(p.device, p.dtype))
        self.pmap.sync()
        self.opt = Adam(self.free, lr=float(self.cfg["lr"]))
        self.opt.load_tensors(tensors, meta["optimizer"])
        self.iteration = int(meta["iteration"])
        self.lr_scale = float(meta["lr_scale"])
        self.rollbacks = int(meta.get("rollbacks", 0))
        for b_pos, b in enumerate(self.local):
            self.chains[b] = Batch(tensors["chains.ids"][b:b + 1].to(self.device),
                                   tensors["chains.types"][b:b + 1].to(self.device),
                                   tensors["chains.volumes"][b:b + 1].to(self.device), self.data.periodic)
            self.g_train[b].set_state(tensors["rng.train"][b].clone().contiguous())
            self.g_samp[b].set_state(tensors["rng.sampler"][b].clone().contiguous().to(self.g_samp[b].get_state().device))
        if "rng.sampler_batched" in tensors and tensors["rng.sampler_batched"].shape[0] > self.dist.rank:
            self.g_batch.set_state(tensors["rng.sampler_batched"][self.dist.rank].clone().contiguous())
        self._set_lr()

    def _set_lr(self):
        for g in self.opt.param_groups:
            g["lr"] = float(self.cfg["lr"]) * self.lr_scale

    # ------------------------------------------------------------------ metrics
    def _csv_open(self, resume: bool):
        if self.dist.rank != 0:
            return None
        rows = []
        if resume and self.csv_path.exists():
            with open(self.csv_path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["iteration"]) <= self.iteration]
        cols = ["iteration", "loss", "e_pos", "e_neg", "acceptance", "lr", "seconds"] + \
            list(self.param_columns(self.ham))
        f = open(self.csv_path, "w", newline="")  # noqa: SIM115 - kept open for the run, closed in run()
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)
        f.flush()
        return f, w

    def plot(self) -> Path | None:
        if self.dist.rank != 0:
            return None
        from .plots import plot_metrics
        return plot_metrics(self.csv_path, self.run_dir)

    def log(self, msg: str, *, console: bool = True) -> None:
        """``msg`` to the console (unless ``console=False``) and, time-stamped, to ``RUN/train.log``."""
        if self.dist.rank == 0:
            if console:
                self._log(msg)
            self.run_dir.mkdir(parents=True, exist_ok=True)
            with open(self.run_dir / "train.log", "a") as f:
                f.write(time.strftime("%Y-%m-%d %H:%M:%S ") + msg + "\n")

    # ------------------------------------------------------------------ the loop
    def _signal(self, signum, frame):
        self._stop = True
        self._signum = signum

    def run(self, iterations: int, *, resume: bool = False) -> dict:
        """Train until ``iterations`` (total, counting resumed ones); return a summary dict."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            self.load()
            self.log(f"resumed from {self.ckpt_dir} at iteration {self.iteration}")
        else:
            self.save("initial")
        c = self.cfg
        self.log(f"pcd: iterations {self.iteration} → {iterations}; {self.B} chains over {self.dist.world} "
                 f"process(es), {c['mcs']} MCS per iteration, lr {float(c['lr']) * self.lr_scale:.3g}, checkpoint "
                 f"every {c['checkpoint_every']}; log {self.run_dir / 'train.log'}, metrics {self.csv_path}",
                 console=not self.progress)
        self._set_lr()
        csvf = self._csv_open(resume)
        old = {}
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                old[s] = signal.signal(s, self._signal)
            except ValueError:  # not the main thread
                pass
        bar = None
        if self.progress:
            from tqdm import tqdm
            bar = tqdm(total=iterations, initial=self.iteration, desc="pcd", unit="it", dynamic_ncols=True)
        t0 = time.perf_counter()
        # one status line every status_every s: the console only without the progress bar, train.log always
        from .status import StatusLine
        line = StatusLine("pcd", iterations, every=self.status_every, start=self.iteration,
                          emit=lambda m: self.log(m, console=not self.progress))
        status = "finished"
        every = int(self.cfg["checkpoint_every"])
        plot_every = int(self.cfg.get("plot_every", 0) or 0)
        try:
            while self.iteration < iterations:
                row = self.step()
                if row["diverged"]:
                    self.rollbacks += 1
                    if self.rollbacks > int(self.cfg["max_rollbacks"]):
                        self.log(f"divergence at iteration {row['iteration']}: giving up after "
                                 f"{self.rollbacks - 1} roll-backs")
                        raise TrainingDiverged(f"training diverged {self.rollbacks} times (last at iteration "
                                               f"{row['iteration']}); lower pcd.lr or raise pcd.energy_limit")
                    n_rb = self.rollbacks
                    self.load()
                    self.rollbacks = n_rb
                    self.lr_scale *= float(self.cfg["lr_decay"])
                    self._set_lr()
                    self.log(f"divergence guard: non-finite or exploding energies at iteration {row['iteration']} "
                             f"(loss {row['loss']:.4g}, E+ {row['e_pos']:.4g}, E- {row['e_neg']:.4g}); rolled back "
                             f"to iteration {self.iteration}, learning rate now {self.opt.param_groups[0]['lr']:.3g}")
                    if bar is not None:
                        bar.n = self.iteration
                        bar.refresh()
                    continue
                row["seconds"] = time.perf_counter() - t0
                row.update(self.param_columns(self.ham))
                if csvf is not None:
                    csvf[1].writerow(row)
                    csvf[0].flush()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{row['loss']:.4g}", acc=f"{row['acceptance']:.3f}")
                line.update(self.iteration, loss=float(row["loss"]), acceptance=float(row["acceptance"]))
                stop = torch.tensor([1.0 if self._stop else 0.0], dtype=torch.float64)
                self.dist.all_reduce(stop)
                if stop.item() > 0:
                    status = "interrupted"
                    self.save("interrupted")
                    self.log(f"interrupted at iteration {self.iteration}: checkpoint written to {self.ckpt_dir}; "
                             "continue with --resume")
                    break
                if self.iteration % every == 0 or self.iteration == iterations:
                    self.save(f"iteration {self.iteration}")
                if plot_every and self.iteration % plot_every == 0:
                    self.plot()
        finally:
            if bar is not None:
                bar.close()
            if csvf is not None:
                csvf[0].close()
            for s, h in old.items():
                signal.signal(s, h)
        if status == "finished" and plot_every:
            self.plot()
        if status == "finished":
            self.log(f"pcd: finished at iteration {self.iteration} in {time.perf_counter() - t0:.1f} s "
                     f"({self.rollbacks} roll-backs)", console=not self.progress)
        return {"status": status, "iteration": self.iteration, "rollbacks": self.rollbacks,
                "seconds": time.perf_counter() - t0,
                "signal": getattr(self, "_signum", None)}

    # ------------------------------------------------------------------ EMA
    def use_ema(self):
        """Context manager: the model holds the EMA weights inside (``ema = 0`` → the current weights)."""
        trainer = self

        class _Ctx:
            def __enter__(self_):
                self_.saved = [p.detach().clone() for p in trainer.free]
                with torch.no_grad():
                    for p, e in zip(trainer.free, trainer.ema):
                        p.copy_(e)
                trainer.pmap.sync()
                return trainer.ham

            def __exit__(self_, *exc):
                with torch.no_grad():
                    for p, s in zip(trainer.free, self_.saved):
                        p.copy_(s)
                trainer.pmap.sync()
                return False

        return _Ctx()


def write_rank_info(run_dir, trainer: PCDTrainer) -> None:
    """``ranks/rank{r}.json``: which global chains this process holds (for the scale-out test)."""
    d = Path(run_dir) / "ranks"
    d.mkdir(parents=True, exist_ok=True)
    (d / f"rank{trainer.dist.rank}.json").write_text(json.dumps(
        {"rank": trainer.dist.rank, "world_size": trainer.dist.world, "chains": trainer.local,
         "n_chains": len(trainer.local), "batch": trainer.B}))
