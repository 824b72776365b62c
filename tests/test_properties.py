"""Property tests: random sizes, step counts and pytree shapes against the closed forms."""

from __future__ import annotations

import torch
from _problems import DT, mpow, rel, spd
from hypothesis import given, settings
from hypothesis import strategies as st

import bilevel as bl


def split_tree(vec: torch.Tensor, cuts: list[int], nested: bool):
    """Split a vector into a (possibly nested) dict of leaves with various shapes."""
    pieces, start = [], 0
    for c in sorted(set(cuts)) + [vec.numel()]:
        if c > start:
            pieces.append(vec[start:c])
            start = c
    leaves = {f"p{i}": (p.reshape(1, -1) if i % 2 else p) for i, p in enumerate(pieces)}
    return {"outer": {"inner": leaves}} if nested else leaves


def flatten(tree) -> torch.Tensor:
    return torch.cat([x.reshape(-1) for x in torch.utils._pytree.tree_leaves(tree)])


@st.composite
def maml_cases(draw):
    d = draw(st.integers(1, 6))
    K = draw(st.integers(0, 6))
    cuts = draw(st.lists(st.integers(1, max(d - 1, 1)), max_size=3)) if d > 1 else []
    return d, K, cuts, draw(st.booleans()), draw(st.integers(0, 10_000))


@settings(max_examples=40, deadline=None)
@given(maml_cases())
def test_exact_estimators_on_random_pytrees(case):
    d, K, cuts, nested, seed = case
    g = torch.Generator().manual_seed(seed)
    A, Q = spd(d, g), spd(d, g)
    a, b, theta = (torch.randn(d, dtype=DT, generator=g) for _ in range(3))
    alpha = 0.25
    like = split_tree(theta, cuts, nested)
    unflatten = lambda v: split_tree(v, cuts, nested)  # noqa: E731
    prob = bl.BilevelProblem(
        inner_loss=lambda p, h, batch: 0.5 * (flatten(p) - a) @ A @ (flatten(p) - a),
        outer_loss=lambda p, h, batch: 0.5 * (flatten(p) - b) @ Q @ (flatten(p) - b),
        init=lambda h: h)
    P = mpow(torch.eye(d, dtype=DT) - alpha * A, K)
    phi = a + P @ (theta - a)
    expected = P.T @ Q @ (phi - b)
    solver = bl.GradientDescent(alpha, K)
    segs = max(1, (seed % 4))
    for est in (bl.Unrolled(), bl.Checkpointed(segs), bl.ForwardMode(), bl.Truncated(K)):
        res = bl.hypergrad(prob, like, solver=solver, estimator=est)
        assert torch.utils._pytree.tree_structure(res.grad) == \
            torch.utils._pytree.tree_structure(unflatten(theta))
        assert rel(flatten(res.grad), expected) < 1e-11, est
    T = seed % (K + 1)
    res = bl.hypergrad(prob, like, solver=solver, estimator=bl.Truncated(T))
    assert rel(flatten(res.grad), mpow(torch.eye(d, dtype=DT) - alpha * A, T).T @ Q @ (phi - b)) \
        < 1e-11


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 6), st.floats(0.5, 5.0), st.integers(0, 10_000))
def test_implicit_cg_on_random_imaml(d, reg, seed):
    g = torch.Generator().manual_seed(seed)
    A, Q = spd(d, g), spd(d, g)
    a, b, theta = (torch.randn(d, dtype=DT, generator=g) for _ in range(3))
    prob = bl.BilevelProblem(
        inner_loss=bl.proximal(lambda p, h, batch: 0.5 * (p - a) @ A @ (p - a), reg),
        outer_loss=lambda p, h, batch: 0.5 * (p - b) @ Q @ (p - b),
        init=lambda h: h)
    eye = torch.eye(d, dtype=DT)
    phi = torch.linalg.solve(A + reg * eye, A @ a + reg * theta)
    expected = reg * torch.linalg.solve(A + reg * eye, Q @ (phi - b))
    lr = 1.0 / (3.0 + reg)
    res = bl.hypergrad(prob, theta, solver=bl.GradientDescent(lr, 800),
                       estimator=bl.Implicit(bl.CG(iters=d, tol=0.0)))
    assert rel(res.grad, expected) < 1e-9
