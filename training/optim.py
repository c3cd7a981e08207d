"""Small optimisers with plain-tensor state (checkpointable without pickle, no torch._dynamo import).

``torch.optim`` imports ``torch._dynamo`` on first use, which costs seconds per process; the trainer needs only
Adam (PCD, stochastic pseudo-likelihood) and a Newton solver (the convex pseudo-likelihood), written here.
"""

from __future__ import annotations

import math

import torch

__all__ = ["Adam", "newton_minimize"]


class Adam:
    """Adam (Kingma & Ba) exactly as ``torch.optim.Adam`` without weight decay / amsgrad.

    ``param_groups[0]["lr"]`` is the learning rate (same access path as torch optimisers). ``lr_scales``: one
    factor per parameter (default 1 each): parameter i steps with ``lr × lr_scales[i]`` (configuration, not
    optimiser state: not checkpointed).
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, lr_scales=None):
        self.params = list(params)
        self.lr_scales = [1.0] * len(self.params) if lr_scales is None else [float(f) for f in lr_scales]
        if len(self.lr_scales) != len(self.params):
            raise ValueError(f"Adam: {len(self.lr_scales)} lr_scales for {len(self.params)} parameters")
        self.param_groups = [{"lr": float(lr), "betas": tuple(betas), "eps": float(eps)}]
        self.step_count = 0
        self.exp_avg = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]

    def zero_grad(self, set_to_none: bool = False) -> None:
        for p in self.params:
            if p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        g0 = self.param_groups[0]
        lr, (b1, b2), eps = g0["lr"], g0["betas"], g0["eps"]
        self.step_count += 1
        t = self.step_count
        bc1 = 1.0 - b1 ** t
        bc2_sqrt = math.sqrt(1.0 - b2 ** t)
        for p, m, v, f in zip(self.params, self.exp_avg, self.exp_avg_sq, self.lr_scales):
            if p.grad is None:
                continue
            g = p.grad
            m.lerp_(g, 1.0 - b1)
            v.mul_(b2).addcmul_(g, g.conj(), value=1.0 - b2)
            denom = (v.sqrt() / bc2_sqrt).add_(eps)
            p.addcdiv_(m, denom, value=-lr * f / bc1)

    def to_tensors(self, prefix: str = "opt.") -> tuple[dict, dict]:
        t = {}
        for i, (m, v) in enumerate(zip(self.exp_avg, self.exp_avg_sq)):
            t[f"{prefix}{i}.exp_avg"] = m
            t[f"{prefix}{i}.exp_avg_sq"] = v
        g = dict(self.param_groups[0])
        g["betas"] = list(g["betas"])
        return t, {"step": self.step_count, "param_groups": [g]}

    @torch.no_grad()
    def load_tensors(self, tensors: dict, meta: dict, prefix: str = "opt.") -> None:
        for i, (m, v) in enumerate(zip(self.exp_avg, self.exp_avg_sq)):
            m.copy_(tensors[f"{prefix}{i}.exp_avg"])
            v.copy_(tensors[f"{prefix}{i}.exp_avg_sq"])
        if "step" in meta:
            self.step_count = int(meta["step"])
        else:  # checkpoints written through torch.optim.Adam's state_dict (per-parameter step tensors)
            self.step_count = int(float(tensors[f"{prefix}0.step"]))
        g = {k: v for k, v in dict(meta["param_groups"][0]).items() if k in ("lr", "betas", "eps")}
        g["betas"] = tuple(g["betas"])
        self.param_groups = [g]


def newton_minimize(fun_grad_hess, theta: torch.Tensor, *, max_iter: int = 100, tol: float = 1e-10):
    """Damped Newton for a smooth convex function of a small float64 vector.

    ``fun_grad_hess(theta) -> (f, g, H)``. Backtracking (Armijo) line search; a ridge is added when the Hessian
    is singular (flat directions). Stops when ``max|g| < tol`` or the decrease stalls. Returns
    ``(theta, f, n_iter, history)``.
    """
    theta = theta.detach().clone().to(torch.float64)
    f, g, H = fun_grad_hess(theta)
    hist = [float(f)]
    it = 0
    for it in range(1, max_iter + 1):
        if float(g.abs().max()) < tol:
            break
        n = theta.numel()
        ridge = 1e-12 * max(1.0, float(H.diagonal().abs().max()))
        step = None
        for _ in range(8):
            try:
                step = torch.linalg.solve(H + ridge * torch.eye(n, dtype=H.dtype), -g)
                break
            except RuntimeError:
                ridge *= 100.0
        if step is None or not torch.isfinite(step).all():
            step = -g
        slope = float(g @ step)
        if slope >= 0:          # not a descent direction (numerical trouble): steepest descent
            step, slope = -g, -float(g @ g)
        a = 1.0
        while True:
            cand = theta + a * step
            fc, gc, Hc = fun_grad_hess(cand)
            if math.isfinite(float(fc)) and float(fc) <= float(f) + 1e-4 * a * slope:
                break
            a *= 0.5
            if a < 1e-10:
                return theta, f, it, hist
        done = abs(float(f) - float(fc)) <= 1e-15 * max(1.0, abs(float(f)))
        theta, f, g, H = cand, fc, gc, Hc
        hist.append(float(f))
        if done:
            break
    return theta, f, it, hist
