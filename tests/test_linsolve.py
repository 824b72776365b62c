"""Conjugate gradients and Neumann series on explicit matrices (float64)."""

from __future__ import annotations

import pytest
import torch
from _problems import DT, rel, spd
from torch.func import vmap

import bilevel as bl


def matvec_of(H):
    return lambda v: H @ v


@pytest.fixture
def system():
    g = torch.Generator().manual_seed(0)
    return spd(6, g), torch.randn(6, dtype=DT, generator=g)


def test_cg_exact_in_dim_steps(system):
    H, b = system
    x, info = bl.CG(iters=6, tol=0.0)(matvec_of(H), b)
    assert rel(x, torch.linalg.solve(H, b)) < 1e-12
    assert float(info["rel_residual"]) < 1e-12


def test_cg_returns_updated_iterate_when_stopping_on_tolerance(system):
    H, b = system
    x, info = bl.CG(iters=50, tol=1e-8)(matvec_of(H), b)
    assert bool(info["converged"])
    # the returned x is the one whose residual met the tolerance (not the previous iterate)
    assert float((b - H @ x).norm() / b.norm()) <= 1e-8
    assert float(info["residual"]) == pytest.approx(float((b - H @ x).norm()), rel=1e-6)
    assert 1 <= int(info["iterations"]) <= 6


def test_cg_error_non_increasing_in_iterations(system):
    H, b = system
    exact = torch.linalg.solve(H, b)
    errs = [rel(bl.CG(iters=n, tol=0.0)(matvec_of(H), b)[0], exact) for n in range(7)]
    # CG minimises the H-norm of the error: check that norm, monotone
    herr = []
    for n in range(7):
        e = bl.CG(iters=n, tol=0.0)(matvec_of(H), b)[0] - exact
        herr.append(float(e @ H @ e))
    assert all(b2 <= a2 * (1 + 1e-9) + 1e-28 for a2, b2 in zip(herr, herr[1:]))
    assert errs[0] == pytest.approx(1.0) and errs[-1] < 1e-12


def test_cg_damping(system):
    H, b = system
    x, _ = bl.CG(iters=6, tol=0.0, damping=0.5)(matvec_of(H), b)
    assert rel(x, torch.linalg.solve(H + 0.5 * torch.eye(6, dtype=DT), b)) < 1e-12


def test_cg_warm_start_from_exact_solution_needs_no_iteration(system):
    H, b = system
    x, info = bl.CG(iters=10, tol=1e-10)(matvec_of(H), b, torch.linalg.solve(H, b))
    assert int(info["iterations"]) == 0
    cg = bl.CG(iters=10, tol=1e-10, warm_start=True)
    cg(matvec_of(H), b)
    _, info2 = cg(matvec_of(H), b)  # starts from the previous solution
    assert int(info2["iterations"]) == 0


def test_cg_singular_inconsistent_system_breakdown_is_detected():
    """§9.11: H = diag(2, 1, .5, 0, 0), b with a component outside range(H)."""
    H = torch.diag(torch.tensor([2.0, 1.0, 0.5, 0.0, 0.0], dtype=DT))
    b = torch.tensor([1.0, 1.0, 1.0, 1e-3, 0.0], dtype=DT)
    x, info = bl.CG(iters=20, tol=0.0)(matvec_of(H), b)
    assert bool(info["breakdown"])
    assert float(x.norm()) < 10  # the official code's CG reaches ~3e23 at iteration 4
    assert int(info["iterations"]) == 3
    x, info = bl.CG(iters=20, tol=0.0, damping=1e-2)(matvec_of(H), b)
    assert not bool(info["breakdown"])
    assert rel(x, torch.linalg.solve(H + 1e-2 * torch.eye(5, dtype=DT), b)) < 1e-10


def test_cg_indefinite_flags_breakdown():
    H = torch.diag(torch.tensor([1.0, -1.0], dtype=DT))
    _, info = bl.CG(iters=5, tol=0.0)(matvec_of(H), torch.tensor([0.0, 1.0], dtype=DT))
    assert bool(info["breakdown"])


def test_cg_on_pytrees(system):
    H, b = system

    def mv(v):
        x = torch.cat([v["a"], v["b"]["c"].reshape(-1)])
        y = H @ x
        return {"a": y[:2], "b": {"c": y[2:].reshape(2, 2)}}

    tree_b = {"a": b[:2], "b": {"c": b[2:].reshape(2, 2)}}
    x, _ = bl.CG(iters=6, tol=0.0)(mv, tree_b)
    flat = torch.cat([x["a"], x["b"]["c"].reshape(-1)])
    assert rel(flat, torch.linalg.solve(H, b)) < 1e-12


def test_cg_under_vmap_matches_loop():
    g = torch.Generator().manual_seed(3)
    Hs = torch.stack([spd(4, g) for _ in range(3)])
    bs = torch.randn(3, 4, dtype=DT, generator=g)
    cg = bl.CG(iters=10, tol=1e-9)
    xs = vmap(lambda H, b: cg(matvec_of(H), b)[0])(Hs, bs)
    for i in range(3):
        torch.testing.assert_close(xs[i], cg(matvec_of(Hs[i]), bs[i])[0], rtol=1e-12, atol=0)


def test_neumann_series_value_and_divergence_flag(system):
    H, b = system
    alpha = 0.2
    x, info = bl.Neumann(iters=3, alpha=alpha)(matvec_of(H), b)
    M = torch.eye(6, dtype=DT) - alpha * H
    expected = alpha * sum(torch.linalg.matrix_power(M, j) @ b for j in range(4))
    assert rel(x, expected) < 1e-14
    assert not bool(info["diverging"])
    _, info = bl.Neumann(iters=10, alpha=1.0)(matvec_of(H), b)  # ‖I − H‖ > 1: diverges
    assert bool(info["diverging"])
