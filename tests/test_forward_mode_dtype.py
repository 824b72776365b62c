"""ForwardMode below float64 (review defect 5): torch's jvp of a 0-d float32 tensor times a Python
float gives a float64 tangent; ForwardMode casts tangents back to the primal dtype."""

from __future__ import annotations

import pytest
import torch

import bilevel as bl


@pytest.mark.parametrize("solver", [bl.GradientDescent(0.1, 5), bl.Adam(0.05, 5),
                                    bl.Momentum(0.1, 5, momentum="mu")], ids=repr)
def test_float32_forward_mode_matches_unrolled_on_a_half_decay_term(solver):
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(16, 3, generator=g), torch.randn(16, generator=g)
    prob = bl.BilevelProblem(
        lambda w, h, b: ((b[0] @ w - b[1]) ** 2).mean() + 0.5 * h["decay"] * (w ** 2).sum(),
        lambda w, h, b: ((b[0] @ w - b[1]) ** 2).mean() + 0.5 * h["decay"] * w.sum())
    h = {"decay": torch.tensor(0.1), "mu": torch.tensor(0.5)}
    if not isinstance(solver, bl.Momentum):
        del h["mu"]
    kw = dict(solver=solver, params0=torch.zeros(3))
    fwd = bl.hypergrad(prob, h, (X, y), (X, y), estimator=bl.ForwardMode(), **kw)
    rev = bl.hypergrad(prob, h, (X, y), (X, y), estimator=bl.Unrolled(), **kw)
    for key in h:
        assert fwd.grad[key].dtype == torch.float32
        torch.testing.assert_close(fwd.grad[key], rev.grad[key], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fwd.params, rev.params, rtol=1e-6, atol=1e-7)
    # float64 reference of the same problem: float32 is within float32 accuracy
    h64 = {k: v.double() for k, v in h.items()}
    ref = bl.hypergrad(prob, h64, (X.double(), y.double()), (X.double(), y.double()),
                       solver=solver, params0=torch.zeros(3, dtype=torch.float64),
                       estimator=bl.ForwardMode())
    for key in h:
        torch.testing.assert_close(fwd.grad[key].double(), ref.grad[key], rtol=1e-4, atol=1e-6)
