"""The benchmark's bilevel problems (benchopt benchmark_bilevel), as ``BilevelProblem``s.

- :func:`logreg_l2` (ijcnn1): g = mean log(1 + e^{−y aᵀz}) + ½ Σ_j e^{x_j} z_j²,
  f = the logistic loss on the outer set; x ∈ R^d (per-feature L2).
- :func:`multinomial_l2` (covtype): g = mean CE(Xz) + ½ Σ_k e^{x_k} ‖z_{:,k}‖², f = CE on val;
  z ∈ R^{d×K}, x ∈ R^K (per-class L2).
- :func:`hyper_cleaning` (MNIST/digits): g = mean_i σ(x_i) CE_i(z) + c‖z‖² (c = 0.2), f = CE
  on the clean val set; x ∈ R^{n_train}, one weight per training example (batches carry the
  row indices).

Each returns a :class:`Bench` with the problem, the inner/outer data pytrees (leading sample
dimension, for :class:`~bilevel.stochastic.Sampler`), start points and an evaluation function.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.nn.functional import cross_entropy, softplus

from ..problem import BilevelProblem


@dataclass
class Bench:
    name: str
    problem: BilevelProblem
    inner_data: Any
    outer_data: Any
    z0: torch.Tensor
    x0: torch.Tensor
    evaluate: Callable[[torch.Tensor, torch.Tensor], dict[str, float]]
    metric: str
    extra: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------
def _logistic(z, X, y):
    return softplus(-y * (X @ z)).mean()


def logreg_g(z, x, batch):
    X, y = batch
    return _logistic(z, X, y) + 0.5 * torch.dot(torch.exp(x) * z, z)


def logreg_f(z, x, batch):
    X, y = batch
    return _logistic(z, X, y)


def _newton_logreg(X, y, x, z=None, iters=30):
    """z*(x) = argmin g by Newton's method (small d), float64."""
    d = X.shape[1]
    z = torch.zeros(d, dtype=X.dtype) if z is None else z.clone()
    lam = torch.exp(x)
    for _ in range(iters):
        m = y * (X @ z)
        s = torch.sigmoid(-m)
        grad = -(X.T @ (y * s)) / len(y) + lam * z
        H = (X.T * (s * (1 - s))) @ X / len(y) + torch.diag(lam)
        step = torch.linalg.solve(H, grad)
        z = z - step
        if float(step.abs().max()) < 1e-14:
            break
    return z, H


def logreg_value_and_grad(split, x):
    """h(x) = f(z*(x)) and ∇h(x) = −diag(e^x z*) H⁻¹∇_z f (exact, implicit function theorem)."""
    (Xt, yt), (Xv, yv) = split["train"], split["val"]
    z, H = _newton_logreg(Xt, yt, x)
    zz = z.detach().requires_grad_(True)
    fz = torch.autograd.grad(logreg_f(zz, x, (Xv, yv)), zz)[0]
    w = torch.linalg.solve(H, fz)
    return float(logreg_f(z, x, (Xv, yv))), -(torch.exp(x) * z) * w


def logreg_optimum(split, x0) -> tuple[float, torch.Tensor]:
    """h* = min_x h(x) by L-BFGS (scipy) on the exact value and gradient."""
    from scipy.optimize import minimize

    def fun(xn):
        v, g = logreg_value_and_grad(split, torch.as_tensor(xn, dtype=torch.float64))
        return v, g.numpy()

    res = minimize(fun, x0.double().numpy(), jac=True, method="L-BFGS-B",
                   options={"maxiter": 500, "gtol": 1e-12, "ftol": 1e-15})
    return float(res.fun), torch.as_tensor(res.x)


def logreg_l2(split, seed: int = 0, dtype=torch.float64, h_star: float | None = None) -> Bench:
    """ijcnn1 problem. Start z0 ~ N(0, I), x0 = log U(0, 1) (the benchmark's ``init_var``)."""
    (Xt, yt), (Xv, yv) = split["train"], split["val"]
    d = Xt.shape[1]
    gen = torch.Generator().manual_seed(seed)
    z0 = torch.randn(d, generator=gen, dtype=torch.float64).to(dtype)
    x0 = torch.log(torch.rand(d, generator=gen, dtype=torch.float64)).to(dtype)
    split64 = {k: (a.double(), b.double()) for k, (a, b) in split.items()}
    extra = {}
    if h_star is None:
        h_star, x_star = logreg_optimum(split64, x0)
        extra["x_star"] = x_star
    extra["h_star"] = h_star

    def evaluate(z, x):
        v, g = logreg_value_and_grad(split64, x.detach().double())
        return {"value": v, "subopt": v - h_star, "grad_norm2": float(g @ g)}

    return Bench("ijcnn1", BilevelProblem(logreg_g, logreg_f), (Xt.to(dtype), yt.to(dtype)),
                 (Xv.to(dtype), yv.to(dtype)), z0, x0, evaluate, "subopt", extra)


# ------------------------------------------------------------------------------------------
def multinomial_g(z, x, batch):
    X, y = batch
    return cross_entropy(X @ z, y) + 0.5 * torch.dot(torch.exp(x), (z * z).sum(0))


def multinomial_f(z, x, batch):
    X, y = batch
    return cross_entropy(X @ z, y)


def _error(z, X, y) -> float:
    return float(((X @ z).argmax(1) != y).double().mean())


def multinomial_l2(split, dtype=torch.float64) -> Bench:
    """covtype problem; z0 = 0, x0 = −2 (the benchmark's defaults)."""
    (Xt, yt), (Xv, yv), (Xs, ys) = split["train"], split["val"], split["test"]
    d, k = Xt.shape[1], int(yt.max()) + 1
    z0 = torch.zeros(d, k, dtype=dtype)
    x0 = torch.full((k,), -2.0, dtype=dtype)

    def evaluate(z, x):
        return {"test_error": _error(z, Xs, ys), "val_error": _error(z, Xv, yv)}

    return Bench("covtype", BilevelProblem(multinomial_g, multinomial_f),
                 (Xt.to(dtype), yt), (Xv.to(dtype), yv), z0, x0, evaluate, "test_error")


# ------------------------------------------------------------------------------------------
def make_hyper_cleaning_g(reg: float = 0.2):
    """g(z, x) = mean_i σ(x_i) ℓ_i(z) + reg ‖z‖², ℓ_i the cross-entropy of example i. ℓ_i is
    −log_softmax(X z)[i, y_i] (a gather), not ``cross_entropy(..., reduction="none")``: torch
    2.13 cannot trace the double backward of that op inside a compiled ``while_loop`` body
    (NllLossBackwardBackward "returned an invalid gradient"), which would send every compiled
    run of this problem to the slower unrolled graphs."""
    def g(z, x, batch):
        X, y, idx = batch
        losses = -torch.log_softmax(X @ z, dim=1).gather(1, y.unsqueeze(1)).squeeze(1)
        return (torch.sigmoid(x[idx]) * losses).mean() + reg * (z * z).sum()
    return g


def hyper_cleaning(split, reg: float = 0.2, dtype=torch.float64, name="hyper-cleaning"
                   ) -> Bench:
    """Hyper-cleaning; z0 = 0, x0 = −2 (benchmark defaults). Inner batches carry row indices."""
    (Xt, yt), (Xv, yv), (Xs, ys) = split["train"], split["val"], split["test"]
    d, k, n = Xt.shape[1], 10, Xt.shape[0]
    z0 = torch.zeros(d, k, dtype=dtype)
    x0 = torch.full((n,), -2.0, dtype=dtype)

    def evaluate(z, x):
        return {"test_error": _error(z, Xs, ys), "val_error": _error(z, Xv, yv)}

    return Bench(name, BilevelProblem(make_hyper_cleaning_g(reg), multinomial_f),
                 (Xt.to(dtype), yt, torch.arange(n)), (Xv.to(dtype), yv), z0, x0, evaluate,
                 "test_error", {"corrupted": split.get("corrupted")})


def quadratic_bench(n_inner=1024, n_outer=1024, d=10, p=10, mu=0.1, seed=0, dtype=torch.float64
                    ) -> Bench:
    """Stochastic bilevel quadratic with a closed-form optimum:
    g_i = ½(a_iᵀz − y_i − b_iᵀx)² + ½μ‖z‖², f_j = ½(a'_jᵀz − y'_j)² + ½ρ‖x‖² (ρ = 0.1);
    suboptimality h(x) − h* exactly."""
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(n_inner, d, generator=gen, dtype=torch.float64) / d ** 0.5
    B = torch.randn(n_inner, p, generator=gen, dtype=torch.float64) / p ** 0.5
    y = torch.randn(n_inner, generator=gen, dtype=torch.float64)
    Ao = torch.randn(n_outer, d, generator=gen, dtype=torch.float64) / d ** 0.5
    yo = torch.randn(n_outer, generator=gen, dtype=torch.float64)
    rho = 0.1
    M = A.T @ A / n_inner + mu * torch.eye(d, dtype=torch.float64)
    P = torch.linalg.solve(M, A.T @ B / n_inner)
    zc = torch.linalg.solve(M, A.T @ y / n_inner)
    Q, q = Ao.T @ Ao / n_outer, Ao.T @ yo / n_outer
    c0 = float(yo @ yo) / (2 * n_outer)

    def h(x):
        z = zc + P @ x
        return float(0.5 * z @ Q @ z - q @ z + c0 + 0.5 * rho * x @ x)

    xs = -torch.linalg.solve(P.T @ Q @ P + rho * torch.eye(p, dtype=torch.float64),
                             P.T @ (Q @ zc - q))
    h_star = h(xs)

    def g(z, x, batch):
        Ab, yb, Bb = batch
        return 0.5 * ((Ab @ z - yb - Bb @ x) ** 2).mean() + 0.5 * mu * (z * z).sum()

    def f(z, x, batch):
        Ab, yb = batch
        return 0.5 * ((Ab @ z - yb) ** 2).mean() + 0.5 * rho * (x * x).sum()

    def evaluate(z, x):
        return {"subopt": h(x.detach().double()) - h_star}

    cast = lambda t: t.to(dtype)  # noqa: E731
    return Bench("quadratic", BilevelProblem(g, f), (cast(A), cast(y), cast(B)),
                 (cast(Ao), cast(yo)), torch.zeros(d, dtype=dtype), torch.ones(p, dtype=dtype),
                 evaluate, "subopt", {"x_star": xs, "h_star": h_star, "mu": mu})


def as_numpy(tree):
    return tuple(np.asarray(t) for t in tree)
