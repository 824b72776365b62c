"""``bl.hypergrad`` under ``torch.func.vmap`` equals a Python loop over the problems."""

from __future__ import annotations

import pytest
import torch
from _problems import DT, IMAMLQuadratic, MAMLQuadratic
from torch.func import vmap

import bilevel as bl
from bilevel.pytree import tree_map

ESTIMATORS = [bl.Unrolled(), bl.Truncated(2), bl.Checkpointed(), bl.ForwardMode(),
              bl.FirstOrder(), bl.Implicit(bl.CG(iters=5)), bl.Implicit(bl.Neumann(10, 0.2)),
              bl.HistoryFree(iters=5)]


def _batched_problem(is_implicit: bool):
    """Tasks differ in their data (a_i, b_i); the quadratic forms are shared."""
    base = IMAMLQuadratic.make(d=4) if is_implicit else MAMLQuadratic.make(d=4, K=4)
    A, Q = base.A, base.Q

    def support(p, h, batch):
        return 0.5 * (p["w"] - batch) @ A @ (p["w"] - batch)

    inner = bl.proximal(support, 2.0, center=lambda h: {"w": h["theta"]}) if is_implicit \
        else support
    outer = lambda p, h, batch: 0.5 * (p["w"] - batch) @ Q @ (p["w"] - batch)  # noqa: E731
    return bl.BilevelProblem(inner, outer, init=lambda h: {"w": h["theta"]})


@pytest.mark.parametrize("estimator", ESTIMATORS, ids=repr)
def test_vmap_equals_loop(estimator):
    implicit = isinstance(estimator, bl.Implicit)
    prob = _batched_problem(implicit)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 4, dtype=DT, generator=g), torch.randn(5, 4, dtype=DT, generator=g)
    theta = torch.randn(4, dtype=DT, generator=g)
    solver = bl.GradientDescent(0.2, 60 if implicit else 4)

    def one(ai, bi):
        return bl.hypergrad(prob, {"theta": theta}, ai, bi, solver=solver, estimator=estimator)

    batched = vmap(one)(a, b)  # the whole HypergradResult comes back batched
    bl.check_result(batched)
    looped = [one(a[i], b[i]) for i in range(5)]
    for i, r in enumerate(looped):
        torch.testing.assert_close(batched.grad["theta"][i], r.grad["theta"], rtol=1e-12,
                                   atol=1e-14)
        torch.testing.assert_close(batched.params["w"][i], r.params["w"], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(batched.outer_loss[i], r.outer_loss, rtol=1e-12, atol=1e-14)


def test_vmap_over_hparams_and_data():
    prob = _batched_problem(False)
    g = torch.Generator().manual_seed(1)
    thetas, a = torch.randn(3, 4, dtype=DT, generator=g), torch.randn(3, 4, dtype=DT, generator=g)
    f = lambda th, ai: bl.hypergrad(prob, {"theta": th}, ai, ai,  # noqa: E731
                                    solver=bl.GradientDescent(0.2, 3)).grad
    batched = vmap(f)(thetas, a)
    for i in range(3):
        torch.testing.assert_close(batched["theta"][i], f(thetas[i], a[i])["theta"])


def test_vmap_nonfinite_is_reported_by_check_result():
    prob = _batched_problem(False)
    a = torch.randn(3, 4, dtype=DT)
    res = vmap(lambda ai: bl.hypergrad(prob, {"theta": torch.zeros(4, dtype=DT)}, ai, ai,
                                       solver=bl.GradientDescent(1e200, 3)))(a)
    with pytest.raises(FloatingPointError, match="inner step"):
        bl.check_result(res)


def test_result_is_a_pytree():
    prob = _batched_problem(False)
    res = bl.hypergrad(prob, {"theta": torch.zeros(4, dtype=DT)}, torch.ones(4, dtype=DT),
                       torch.ones(4, dtype=DT), solver=bl.GradientDescent(0.1, 2))
    doubled = tree_map(lambda t: 2 * t, res)
    assert isinstance(doubled, bl.HypergradResult)
    torch.testing.assert_close(doubled.grad["theta"], 2 * res.grad["theta"])
