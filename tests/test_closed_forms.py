"""Every estimator against the closed-form hypergradients of ALGORITHMS.md §9 (float64)."""

from __future__ import annotations

import warnings

import pytest
import torch
from _problems import DT, IMAMLQuadratic, MAMLQuadratic, mpow, rel, spd

import bilevel as bl

pytestmark = pytest.mark.usefixtures("autodiff_mode")

EXACT_UNROLL = [bl.Unrolled(), bl.Checkpointed(), bl.Checkpointed(segments=1),
                bl.Checkpointed(segments=4), bl.ForwardMode(), bl.ForwardMode(chunk_size=2)]


@pytest.fixture
def maml():
    return MAMLQuadratic.make(d=5, K=7, alpha=0.2)


@pytest.fixture
def theta():
    return torch.randn(5, dtype=DT, generator=torch.Generator().manual_seed(42))


# ---------------------------------------------------------------- §9.1 MAML on a quadratic
@pytest.mark.parametrize("estimator", EXACT_UNROLL + [bl.Truncated(7)], ids=repr)
def test_maml_exact_estimators_match_closed_form(maml, theta, estimator):
    res = bl.hypergrad(maml.problem(), {"theta": theta}, solver=maml.solver(), estimator=estimator)
    assert rel(res.grad["theta"], maml.maml_grad(theta)) < 1e-12
    assert rel(res.params["w"], maml.phi_K(theta)) < 1e-13
    expected_f = 0.5 * (maml.phi_K(theta) - maml.b) @ maml.Q @ (maml.phi_K(theta) - maml.b)
    assert abs(float(res.outer_loss - expected_f)) < 1e-12
    assert res.info["inner_loss"].shape == (maml.K,)


def test_first_order_is_gradient_at_adapted_point(maml, theta):
    res = bl.hypergrad(maml.problem(), {"theta": theta}, solver=maml.solver(),
                       estimator=bl.FirstOrder())
    assert rel(res.grad["theta"], maml.fo_grad(theta)) < 1e-13
    assert rel(res.grad["theta"], maml.maml_grad(theta)) > 1e-3  # really an approximation


@pytest.mark.parametrize("T", range(8))
def test_truncated_closed_form(maml, theta, T):
    res = bl.hypergrad(maml.problem(), {"theta": theta}, solver=maml.solver(),
                       estimator=bl.Truncated(T))
    assert rel(res.grad["theta"], maml.truncated_grad(theta, T)) < 1e-12


def test_truncated_zero_equals_first_order_and_full_equals_unrolled(maml, theta):
    h = {"theta": theta}
    run = lambda est: bl.hypergrad(maml.problem(), h, solver=maml.solver(),  # noqa: E731
                                   estimator=est).grad["theta"]
    assert torch.equal(run(bl.Truncated(0)), run(bl.FirstOrder()))
    assert rel(run(bl.Truncated(maml.K)), run(bl.Unrolled())) < 1e-15


def test_multitask_mean_of_per_task_formulas():
    tasks = [MAMLQuadratic.make(d=4, K=3, alpha=0.1, seed=s) for s in range(3)]
    theta = torch.randn(4, dtype=DT)

    def inner(p, h, i):
        t = tasks[i]
        return 0.5 * (p["w"] - t.a) @ t.A @ (p["w"] - t.a)

    def outer(p, h, i):
        t = tasks[i]
        return 0.5 * (p["w"] - t.b) @ t.Q @ (p["w"] - t.b)

    prob = bl.BilevelProblem(inner, outer, init=lambda h: {"w": h["theta"]})
    grads = [bl.hypergrad(prob, {"theta": theta}, i, i, solver=bl.GradientDescent(0.1, 3)).grad
             for i in range(3)]
    mean = sum(g["theta"] for g in grads) / 3
    expected = sum(t.maml_grad(theta) for t in tasks) / 3
    assert rel(mean, expected) < 1e-12


# ---------------------------------------------------------------- §9.3 iMAML
def test_imaml_cg_matches_closed_form(theta):
    pb = IMAMLQuadratic.make(d=5, reg=2.0)
    res = bl.hypergrad(pb.problem(), {"theta": theta}, solver=bl.GradientDescent(0.2, 400),
                       estimator=bl.Implicit(bl.CG(iters=5, tol=0.0)))
    assert rel(res.grad["theta"], pb.grad(theta)) < 1e-10
    assert rel(res.params["w"], pb.phi_star(theta)) < 1e-12
    assert float(res.info["linsolve_rel_residual"]) < 1e-10


def test_imaml_neumann_converges_as_iters_grow(theta):
    pb = IMAMLQuadratic.make(d=5, reg=2.0)
    solver = bl.GradientDescent(0.2, 400)
    errors = []
    for n in (0, 2, 5, 10, 20, 50, 100, 200):
        res = bl.hypergrad(pb.problem(), {"theta": theta}, solver=solver,
                           estimator=bl.Implicit(bl.Neumann(iters=n, alpha=0.2)))
        errors.append(rel(res.grad["theta"], pb.grad(theta)))
    assert all(b <= a * (1 + 1e-9) for a, b in zip(errors, errors[1:]))
    assert errors[0] > 1e-2 and errors[-1] < 1e-10


def test_history_free_reduces_to_imaml(theta):
    pb = IMAMLQuadratic.make(d=5, reg=2.0)
    res = bl.hypergrad(pb.problem(), {"theta": theta}, solver=bl.GradientDescent(0.2, 400),
                       estimator=bl.HistoryFree(iters=5))
    assert rel(res.grad["theta"], pb.grad(theta)) < 1e-10


def test_imaml_large_reg_tends_to_gradient_at_theta(theta):
    pb = IMAMLQuadratic.make(d=5, reg=1e6)
    res = bl.hypergrad(pb.problem(), {"theta": theta}, solver=bl.GradientDescent(1e-6, 50),
                       estimator=bl.Implicit(bl.CG(iters=5)))
    assert rel(res.grad["theta"], pb.Q @ (theta - pb.b)) < 1e-4


# ---------------------------------------------------------------- §9.4 AID vs ITD
@pytest.fixture
def linear_term():
    g = torch.Generator().manual_seed(3)
    p, q = 3, 4
    return dict(A=spd(q, g), B=torch.randn(q, p, dtype=DT, generator=g),
                c=torch.randn(q, dtype=DT, generator=g), yt=torch.randn(q, dtype=DT, generator=g),
                x=torch.randn(p, dtype=DT, generator=g), y0=torch.randn(q, dtype=DT, generator=g),
                rho=0.3, beta=0.25)


def _linear_term_problem(P):
    A, B, c, yt, rho = P["A"], P["B"], P["c"], P["yt"], P["rho"]
    return bl.BilevelProblem(
        inner_loss=lambda y, h, batch: 0.5 * y @ A @ y - y @ (B @ h["x"] + c),
        outer_loss=lambda y, h, b: 0.5 * ((y - yt) ** 2).sum() + 0.5 * rho * (h["x"] ** 2).sum(),
    )


@pytest.mark.parametrize("T", [1, 5, 30])
def test_itd_and_aid_closed_forms(linear_term, T):
    P = linear_term
    A, B, yt, rho, x = P["A"], P["B"], P["yt"], P["rho"], P["x"]
    prob, solver = _linear_term_problem(P), bl.GradientDescent(P["beta"], T)
    h = {"x": x}
    y_star = torch.linalg.solve(A, B @ x + P["c"])
    PT = mpow(torch.eye(4, dtype=DT) - P["beta"] * A, T)
    y_T = y_star + PT @ (P["y0"] - y_star)
    itd = rho * x + B.T @ torch.linalg.solve(A, (torch.eye(4, dtype=DT) - PT) @ (y_T - yt))
    aid = rho * x + B.T @ torch.linalg.solve(A, y_T - yt)
    for est in (bl.Unrolled(), bl.Checkpointed(), bl.ForwardMode()):
        res = bl.hypergrad(prob, h, solver=solver, estimator=est, params0=P["y0"])
        assert rel(res.grad["x"], itd) < 1e-12, est
        assert rel(res.params, y_T) < 1e-13
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # few inner steps: not stationary, warned on purpose
        for est in (bl.Implicit(bl.CG(iters=4, tol=0.0)), bl.HistoryFree(iters=4)):
            res = bl.hypergrad(prob, h, solver=solver, estimator=est, params0=P["y0"])
            assert rel(res.grad["x"], aid) < 1e-10, est
    first_order = bl.hypergrad(prob, h, solver=solver, estimator=bl.FirstOrder(),
                               params0=P["y0"]).grad["x"]
    assert rel(first_order, rho * x) < 1e-14  # no init(λ): only the direct term survives


def test_itd_minus_aid_and_limit(linear_term):
    P = linear_term
    A, B, yt, x = P["A"], P["B"], P["yt"], P["x"]
    prob = _linear_term_problem(P)
    y_star = torch.linalg.solve(A, B @ x + P["c"])
    exact = P["rho"] * x + B.T @ torch.linalg.solve(A, y_star - yt)
    solver = bl.GradientDescent(P["beta"], 600)
    for est in (bl.Unrolled(), bl.Implicit(bl.CG(iters=4))):
        res = bl.hypergrad(prob, {"x": x}, solver=solver, estimator=est, params0=P["y0"])
        assert rel(res.grad["x"], exact) < 1e-10


# ---------------------------------------------------------------- §9.5 K-RMD == Neumann
@pytest.mark.parametrize("K", [1, 2, 5, 12])
def test_truncated_equals_neumann_at_fixed_point(K):
    g = torch.Generator().manual_seed(5)
    d, gamma = 4, 0.2
    H, c, wt = spd(d, g), torch.randn(d, dtype=DT, generator=g), torch.randn(d, dtype=DT,
                                                                              generator=g)
    lam = torch.tensor(0.5, dtype=DT)
    Hl = H + lam * torch.eye(d, dtype=DT)
    w_star = torch.linalg.solve(Hl, c)
    prob = bl.BilevelProblem(
        inner_loss=lambda w, h, b: 0.5 * w @ H @ w - c @ w + 0.5 * h["lam"] * (w @ w),
        outer_loss=lambda w, h, b: 0.5 * ((w - wt) ** 2).sum())
    solver = bl.GradientDescent(gamma, K)
    trunc = bl.hypergrad(prob, {"lam": lam}, solver=solver, estimator=bl.Truncated(K),
                         params0=w_star).grad["lam"]
    neumann = bl.hypergrad(prob, {"lam": lam}, solver=solver, params0=w_star,
                           estimator=bl.Implicit(bl.Neumann(iters=K - 1, alpha=gamma))).grad["lam"]
    closed = -gamma * sum(w_star @ mpow(torch.eye(d, dtype=DT) - gamma * Hl, j) @ (w_star - wt)
                          for j in range(K))
    assert abs(float(trunc - closed)) <= 1e-13 * abs(float(closed)) + 1e-15
    assert abs(float(neumann - closed)) <= 1e-13 * abs(float(closed)) + 1e-15
    exact = -w_star @ torch.linalg.solve(Hl, w_star - wt)
    long = bl.hypergrad(prob, {"lam": lam}, solver=bl.GradientDescent(gamma, 300), params0=w_star,
                        estimator=bl.Truncated(300)).grad["lam"]
    assert abs(float(long - exact)) < 1e-10 * abs(float(exact))


# ---------------------------------------------------------------- §9.7 backbone x ridge head
def test_history_free_meta_representation_closed_form():
    g = torch.Generator().manual_seed(7)
    d0, p, ns, nq, mu = 6, 3, 10, 8, 0.1
    Xs, Xq = torch.randn(ns, d0, dtype=DT, generator=g), torch.randn(nq, d0, dtype=DT, generator=g)
    ts, tq = torch.randn(ns, dtype=DT, generator=g), torch.randn(nq, dtype=DT, generator=g)
    W = 0.5 * torch.randn(d0, p, dtype=DT, generator=g)
    inner = lambda y, h, b: ((Xs @ h["W"] @ y - ts) ** 2).sum() / (2 * ns) + 0.5 * mu * (y @ y)  # noqa: E731
    outer = lambda y, h, b: ((Xq @ h["W"] @ y - tq) ** 2).sum() / (2 * nq)  # noqa: E731
    prob = bl.BilevelProblem(inner, outer)
    As, bs = Xs.T @ Xs / ns, Xs.T @ ts / ns
    Aq, bq = Xq.T @ Xq / nq, Xq.T @ tq / nq
    H = W.T @ As @ W + mu * torch.eye(p, dtype=DT)
    y = torch.linalg.solve(H, W.T @ bs)
    v = torch.linalg.solve(H, W.T @ (Aq @ W @ y - bq))
    closed = (torch.outer(Aq @ W @ y - bq, y) - As @ W @ (torch.outer(y, v) + torch.outer(v, y))
              + torch.outer(bs, v))
    lr = 1.0 / float(torch.linalg.eigvalsh(H).max())
    errors = {}
    for T in (5, 50, 3000):
        res = bl.hypergrad(prob, {"W": W}, solver=bl.GradientDescent(lr, T),
                           estimator=bl.HistoryFree(iters=p), params0=torch.zeros(p, dtype=DT))
        errors[T] = rel(res.grad["W"], closed)
    assert errors[5] > errors[50] > errors[3000]
    assert errors[3000] < 1e-10


# ---------------------------------------------------------------- §9.8 Sign-MAML
def test_sign_maml_second_order_equals_first_order(maml, theta):
    solver = bl.SignGD(lr=0.05, steps=5)
    h = {"theta": theta}
    unrolled = bl.hypergrad(maml.problem(), h, solver=solver, estimator=bl.Unrolled())
    first = bl.hypergrad(maml.problem(), h, solver=solver, estimator=bl.FirstOrder())
    assert torch.equal(unrolled.grad["theta"], first.grad["theta"])
    phi = theta.clone()
    for _ in range(5):
        phi = phi - 0.05 * torch.sign(maml.A @ (phi - maml.a))
    assert rel(first.params["w"], phi) < 1e-15
    assert rel(first.grad["theta"], maml.Q @ (phi - maml.b)) < 1e-14


# ---------------------------------------------------------------- §9.9 Sharp-MAML lower level
@pytest.mark.parametrize("stop_gradient", [False, True])
def test_sam_inner_step_jacobian_closed_form(maml, theta, stop_gradient):
    rho, beta, K = 0.05, 0.3, 2
    A, Q, a, b = maml.A, maml.Q, maml.a, maml.b
    solver = bl.SAM(bl.GradientDescent(beta, K), rho=rho, stop_gradient=stop_gradient)
    res = bl.hypergrad(maml.problem(), {"theta": theta}, solver=solver)
    eye = torch.eye(maml.d, dtype=DT)
    phi, jacobians = theta.clone(), []
    for _ in range(K):
        gk = A @ (phi - a)
        n = gk / gk.norm()
        J = eye - beta * A
        if not stop_gradient:
            J = J - (beta * rho / gk.norm()) * A @ (eye - torch.outer(n, n)) @ A
        jacobians.append(J)
        phi = phi - beta * A @ (phi + rho * n - a)
    u = Q @ (phi - b)
    for J in reversed(jacobians):
        u = J.T @ u
    # the library adds 1e-12 to ‖g‖ in ε = ρ g/‖g‖ (safe at g = 0): 1e-12 relative agreement
    assert rel(res.params["w"], phi) < 1e-11
    assert rel(res.grad["theta"], u) < 1e-10


def test_sam_conventions_differ(maml, theta):
    grads = [bl.hypergrad(maml.problem(), {"theta": theta},
                          solver=bl.SAM(bl.GradientDescent(0.3, 2), 0.05, stop_gradient=s)
                          ).grad["theta"] for s in (False, True)]
    assert rel(grads[0], grads[1]) > 1e-3


# ---------------------------------------------------------------- momentum / Nesterov
@pytest.mark.parametrize("nesterov", [False, True])
def test_momentum_unroll_matches_hand_recursion(maml, theta, nesterov):
    A, mu, lr, K = maml.A, 0.7, 0.1, 5
    solver = bl.Momentum(lr=lr, steps=K, momentum=mu, nesterov=nesterov)
    eye = torch.eye(maml.d, dtype=DT)
    # linear recursion on (φ, v): v' = μv + A(φ−a); φ' = φ − lr·(v' or ∇+μv')
    M = torch.zeros(2 * maml.d, 2 * maml.d, dtype=DT)
    Mv = torch.cat([A, mu * eye], 1)  # v' as a function of (φ, v)
    if nesterov:
        Mphi = torch.cat([eye, torch.zeros_like(eye)], 1) - lr * (torch.cat([A, 0 * eye], 1)
                                                                  + mu * Mv)
    else:
        Mphi = torch.cat([eye, torch.zeros_like(eye)], 1) - lr * Mv
    M[: maml.d], M[maml.d:] = Mphi, Mv
    J = mpow(M, K)[: maml.d, : maml.d]  # dφ_K/dθ (v_0 = 0)
    res = bl.hypergrad(maml.problem(), {"theta": theta}, solver=solver)
    ck = bl.hypergrad(maml.problem(), {"theta": theta}, solver=solver,
                      estimator=bl.Checkpointed(2))
    expected = J.T @ maml.Q @ (res.params["w"] - maml.b)
    assert rel(res.grad["theta"], expected) < 1e-12
    assert rel(ck.grad["theta"], expected) < 1e-12


# ---------------------------------------------------------------- ridge, per-feature log decay
@pytest.fixture
def ridge():
    g = torch.Generator().manual_seed(11)
    n, nv, D = 40, 30, 6
    w_true = torch.randn(D, dtype=DT, generator=g)
    X = torch.randn(n, D, dtype=DT, generator=g)
    Xv = torch.randn(nv, D, dtype=DT, generator=g)
    t = X @ w_true + 0.5 * torch.randn(n, dtype=DT, generator=g)
    tv = Xv @ w_true + 0.5 * torch.randn(nv, dtype=DT, generator=g)
    eta = torch.linspace(-1.0, 1.0, D, dtype=DT)
    return (X, t), (Xv, tv), eta


def _ridge_problem():
    def inner(w, h, batch):
        X, t = batch
        return 0.5 * ((X @ w - t) ** 2).sum() + 0.5 * (torch.exp(h["log_decay"]) * w * w).sum()

    def outer(w, h, batch):
        X, t = batch
        return 0.5 * ((X @ w - t) ** 2).sum()

    return bl.BilevelProblem(inner, outer)


def test_ridge_implicit_matches_closed_form(ridge):
    (X, t), (Xv, tv), eta = ridge
    lam = torch.exp(eta)
    M = X.T @ X + torch.diag(lam)
    w_star = torch.linalg.solve(M, X.T @ t)
    closed = -w_star * torch.linalg.solve(M, Xv.T @ (Xv @ w_star - tv)) * lam  # chain rule e^η
    lr = 1.0 / float(torch.linalg.eigvalsh(M).max())
    for est in (bl.Implicit(bl.CG(iters=6)), bl.HistoryFree(iters=6)):
        res = bl.hypergrad(_ridge_problem(), {"log_decay": eta}, (X, t), (Xv, tv),
                           solver=bl.GradientDescent(lr, 3000), estimator=est,
                           params0=torch.zeros(6, dtype=DT))
        assert rel(res.grad["log_decay"], closed) < 1e-9


def test_ridge_unrolled_matches_plain_autograd_loop(ridge):
    (X, t), (Xv, tv), eta = ridge
    K, lr = 25, 0.005
    e = eta.clone().requires_grad_(True)
    w = torch.zeros(6, dtype=DT)
    for _ in range(K):
        w = w - lr * (X.T @ (X @ w - t) + torch.exp(e) * w)
    loss = 0.5 * ((Xv @ w - tv) ** 2).sum()
    (expected,) = torch.autograd.grad(loss, e)
    for est in (bl.Unrolled(), bl.Checkpointed(), bl.ForwardMode()):
        res = bl.hypergrad(_ridge_problem(), {"log_decay": eta}, (X, t), (Xv, tv),
                           solver=bl.GradientDescent(lr, K), estimator=est,
                           params0=torch.zeros(6, dtype=DT))
        assert rel(res.grad["log_decay"], expected) < 1e-12, est


def test_ridge_forward_recursion_for_decay_and_learning_rate(ridge):
    """§9.6 forward-mode recursion for a scalar decay λ and the step size γ as hyperparameters."""
    (X, t), (Xv, tv), _ = ridge
    K = 30
    lam, gamma = torch.tensor(0.7, dtype=DT), torch.tensor(0.004, dtype=DT)
    M = X.T @ X + lam * torch.eye(6, dtype=DT)
    w, D_lam, D_gam = torch.zeros(6, dtype=DT), torch.zeros(6, dtype=DT), torch.zeros(6, dtype=DT)
    for _ in range(K):
        step = M @ w - X.T @ t
        D_lam = D_lam - gamma * (M @ D_lam) - gamma * w
        D_gam = D_gam - gamma * (M @ D_gam) - step
        w = w - gamma * step
    r = Xv.T @ (Xv @ w - tv)
    expected = torch.stack([D_lam @ r, D_gam @ r])
    prob = bl.BilevelProblem(
        lambda w, h, b: 0.5 * ((b[0] @ w - b[1]) ** 2).sum() + 0.5 * h["lam"] * (w @ w),
        lambda w, h, b: 0.5 * ((b[0] @ w - b[1]) ** 2).sum())
    for est in (bl.ForwardMode(), bl.Unrolled(), bl.Checkpointed()):
        res = bl.hypergrad(prob, {"lam": lam, "lr": gamma}, (X, t), (Xv, tv),
                           solver=bl.GradientDescent(lr="lr", steps=K), estimator=est,
                           params0=torch.zeros(6, dtype=DT))
        got = torch.stack([res.grad["lam"], res.grad["lr"]])
        assert rel(got, expected) < 1e-11, est
