"""training.optim.Adam's per-parameter step factors (``pcd.lr_scale``)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from training.optim import Adam


@settings(max_examples=25, deadline=None)
@given(factor=st.floats(1e-3, 1e3), steps=st.integers(1, 6), seed=st.integers(0, 2**31 - 1))
def test_a_scaled_parameter_moves_factor_times_as_far(factor, steps, seed):
    """Adam's moments do not depend on lr, so with the same gradients the factor-f tensor's displacement is
    exactly f × the unscaled one's, and the unscaled tensor moves as with plain Adam."""
    g = torch.Generator().manual_seed(seed)
    p0 = torch.randn(5, generator=g, dtype=torch.float64)
    q0 = torch.randn(3, generator=g, dtype=torch.float64)
    grads = [(torch.randn(5, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64))
             for _ in range(steps)]
    runs = []
    for scales in (None, [factor, 1.0]):
        p, q = p0.clone().requires_grad_(), q0.clone().requires_grad_()
        opt = Adam([p, q], lr=1e-2, lr_scales=scales)
        for gp, gq in grads:
            p.grad, q.grad = gp.clone(), gq.clone()
            opt.step()
        runs.append((p.detach(), q.detach()))
    (p1, q1), (pf, qf) = runs
    torch.testing.assert_close(pf - p0, factor * (p1 - p0), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(qf, q1, rtol=0, atol=0)


def test_lr_scales_must_match_the_parameters():
    p = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match="lr_scales"):
        Adam([p], lr_scales=[1.0, 2.0])
