"""CG on singular / indefinite systems: never worse than the start, always flagged (float64)."""

from __future__ import annotations

import warnings

import pytest
import torch
from _problems import DT, rel, spd
from torch.func import grad, hessian, vmap

import bilevel as bl

ce = torch.nn.functional.cross_entropy


def head_problem():
    """The review's case: an unregularised linear softmax head, rank(H) = 12 of 27."""
    g = torch.Generator().manual_seed(0)
    C, F, n = 3, 8, 6
    fs = torch.randn(n, F, dtype=DT, generator=g)
    fq = torch.randn(9, F, dtype=DT, generator=g)
    ys, yq = torch.arange(C).repeat_interleave(2), torch.arange(C).repeat_interleave(3)
    inner = lambda w, h, b: ce((fs * h["s"]) @ w["W"].T + w["b"], ys)  # noqa: E731
    outer = lambda w, h, b: ce((fq * h["s"]) @ w["W"].T + w["b"], yq)  # noqa: E731
    w0 = {"W": 0.1 * torch.randn(C, F, dtype=DT, generator=g), "b": torch.zeros(C, dtype=DT)}
    return bl.BilevelProblem(inner, outer), {"s": torch.ones(F, dtype=DT)}, w0, (C, F)


def dense_system():
    problem, h, w0, (C, F) = head_problem()
    wK = bl.hypergrad(problem, h, None, None, solver=bl.GradientDescent(0.1, 20),
                      estimator=bl.Unrolled(), params0=w0).params
    unf = lambda v: {"W": v[:C * F].view(C, F), "b": v[C * F:]}  # noqa: E731
    flat = torch.cat([wK["W"].flatten(), wK["b"]])
    H = hessian(lambda v: problem.inner_loss(unf(v), h, None))(flat)
    b = grad(lambda v: problem.outer_loss(unf(v), h, None))(flat)
    return H, b


def plain_cg(H, b, iters):
    """Textbook CG, no guard (the reference on SPD systems)."""
    x, r = torch.zeros_like(b), b.clone()
    p = r.clone()
    for _ in range(iters):
        Ap = H @ p
        a = (r @ r) / (p @ Ap)
        x, r_new = x + a * p, r - a * Ap
        p = r_new + (r_new @ r_new) / (r @ r) * p
        r = r_new
    return x


def test_review_singular_head_system_no_worse_than_zero_and_flagged():
    H, b = dense_system()
    assert int(torch.linalg.matrix_rank(H)) == 12 and H.shape[0] == 27
    # unguarded CG explodes: the 12th iterate's residual is 9x that of v = 0
    assert float((b - H @ plain_cg(H, b, 12)).norm() / b.norm()) > 5
    for iters in (3, 10, 20, 40):
        x, info = bl.CG(iters=iters, tol=0.0)(lambda v: H @ v, b)
        true = float((b - H @ x).norm() / b.norm())
        assert torch.isfinite(x).all()
        assert true <= 1.0 + 1e-12  # never worse than v = 0
        assert float(info["rel_residual"]) == pytest.approx(true, rel=1e-8, abs=1e-12)
        assert not bool(info["usable"])  # flagged even though tol = 0
        if iters >= 20:
            assert bool(info["breakdown"])


def test_review_singular_head_from_x0_no_worse_than_x0():
    H, b = dense_system()
    g = torch.Generator().manual_seed(1)
    x0 = 0.1 * torch.randn(b.shape, dtype=DT, generator=g)
    x, info = bl.CG(iters=20, tol=0.0)(lambda v: H @ v, b, x0)
    assert float((b - H @ x).norm()) <= float((b - H @ x0).norm()) * (1 + 1e-12)
    assert bool(info["breakdown"])


@pytest.mark.parametrize("seed", range(5))
def test_random_singular_inconsistent_systems(seed):
    g = torch.Generator().manual_seed(seed)
    d, r = 12, 5
    Q, _ = torch.linalg.qr(torch.randn(d, d, dtype=DT, generator=g))
    H = Q[:, :r] @ torch.diag(torch.logspace(-2, 0, r, dtype=DT)) @ Q[:, :r].T
    b = torch.randn(d, dtype=DT, generator=g)
    x, info = bl.CG(iters=30, tol=0.0)(lambda v: H @ v, b)
    assert torch.isfinite(x).all() and float(x.norm()) < 1e6
    assert float((b - H @ x).norm()) <= float(b.norm()) * (1 + 1e-12)
    assert bool(info["breakdown"]) and not bool(info["usable"])


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("iters", [2, 5, 8])
def test_spd_results_unchanged(seed, iters):
    g = torch.Generator().manual_seed(seed)
    H, b = spd(8, g, lo=0.05, hi=3.0), torch.randn(8, dtype=DT, generator=g)
    x, info = bl.CG(iters=iters, tol=0.0)(lambda v: H @ v, b)
    ref = plain_cg(H, b, iters)
    if float((b - H @ ref).norm()) <= float(b.norm()):
        assert rel(x, ref) < 1e-12  # plain CG's answer whenever it is no worse than v = 0
    else:  # (a short budget on SPD can end above ‖b‖): the least-residual iterate instead
        best = min([plain_cg(H, b, k) for k in range(iters)],
                   key=lambda z: float((b - H @ z).norm()))
        assert rel(x, best) < 1e-12 if float(best.norm()) > 0 else float(x.norm()) == 0
    assert not bool(info["breakdown"])
    assert float(info["rel_residual"]) == pytest.approx(
        float((b - H @ x).norm() / b.norm()), rel=1e-8)
    assert bool(info["usable"]) == (float(info["rel_residual"]) <= 1e-3)


def test_vmap_equals_loop_on_mixed_singular_and_spd():
    H1, b1 = dense_system()
    g = torch.Generator().manual_seed(2)
    H2, b2 = spd(27, g), torch.randn(27, dtype=DT, generator=g)
    Hs, bs = torch.stack([H1, H2]), torch.stack([b1, b2])
    cg = bl.CG(iters=20, tol=0.0)
    xs, infos = vmap(lambda H, b: cg(lambda v: H @ v, b))(Hs, bs)
    for i in range(2):
        x, info = cg(lambda v, H=Hs[i]: H @ v, bs[i])
        torch.testing.assert_close(xs[i], x, rtol=1e-10, atol=1e-12)
        for k in ("breakdown", "usable", "iterations"):
            assert bool((infos[k][i] == info[k]).all()), k
    assert infos["breakdown"].tolist() == [True, False]


def test_historyfree_singular_head_is_flagged_and_bounded():
    problem, h, w0, _ = head_problem()
    bl.reset_warnings()
    with warnings.catch_warnings(record=True) as wl:
        warnings.simplefilter("always")
        r = bl.hypergrad(problem, h, None, None, solver=bl.GradientDescent(0.1, 20),
                         estimator=bl.HistoryFree(iters=20), params0=w0)
    assert bool(r.info["warnings/linsolve_breakdown"])
    assert any("CG broke down" in str(m.message) for m in wl)
    assert float(r.info["linsolve_rel_residual"]) <= 1.0 + 1e-12
    # v = 0 at worst: the hypergradient is bounded by the direct term's scale, not 1e3
    assert float(r.grad["s"].norm()) < 10


def test_historyfree_unusable_residual_flagged_with_tol_zero():
    g = torch.Generator().manual_seed(0)
    A = spd(10, g, lo=1e-3, hi=1.0)
    c = torch.randn(10, dtype=DT, generator=g)
    problem = bl.BilevelProblem(lambda w, h, b: 0.5 * w @ A @ w - h["x"] @ w,
                                lambda w, h, b: 0.5 * ((w - c) ** 2).sum())
    h = {"x": torch.randn(10, dtype=DT, generator=g)}
    bl.reset_warnings()
    with warnings.catch_warnings(record=True) as wl:
        warnings.simplefilter("always")
        r = bl.hypergrad(problem, h, None, None, solver=bl.GradientDescent(0.5, 5),
                         estimator=bl.HistoryFree(iters=2), params0=torch.zeros(10, dtype=DT))
    assert float(r.info["linsolve_rel_residual"]) > 1e-3
    assert bool(r.info["warnings/linsolve_residual"])
    assert any("relative residual" in str(m.message) for m in wl)


def test_growth_validation():
    with pytest.raises(bl.BilevelError, match="CG growth must be > 1"):
        bl.CG(growth=1.0)


def _memreduced_batch():
    import meta
    T, W, S, Q = 3, 3, 2, 3
    g = torch.Generator().manual_seed(0)
    ys = torch.arange(W).repeat_interleave(S).repeat(T, 1)
    yq = torch.arange(W).repeat_interleave(Q).repeat(T, 1)
    xs = torch.randn(T, W * S, 4, generator=g, dtype=DT)
    xq = torch.randn(T, W * Q, 4, generator=g, dtype=DT)
    return meta.TaskBatch((xs, ys), (xq, yq))


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8),
                                        torch.nn.ReLU(), torch.nn.Dropout(0.0))
        self.clf = torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.clf(self.body(x))


@pytest.mark.parametrize("damping", [None, 0.0])
def test_memoryreduced_defaults_on_user_model_sane_and_loop_equals_vmap(damping):
    """The review's d_memreduced_defaults setting: |meta-grad| was 1.8e12 (loop) vs 2.3e5."""
    import meta
    batch = _memreduced_batch()
    grads, infos = {}, {}
    for vec in (False, True):
        torch.manual_seed(0)
        model = _Net().to(DT).eval()
        learner = meta.MemoryReducedMAML(model, vectorize=vec, head="clf", damping=damping)
        assert learner.damping == (1.0 / (0.1 * 20) if damping is None else 0.0)
        bl.reset_warnings()
        with warnings.catch_warnings(record=True) as wl:
            warnings.simplefilter("always")
            g, res = learner.meta_gradient(batch)
        grads[vec] = torch.cat([t.flatten() for t in g.values()])
        infos[vec] = res.info
        broke = res.info["warnings/linsolve_breakdown"]
        assert broke.shape == (3,)  # one flag per task, in both modes
        assert bool(broke.all()) == (damping == 0.0)
        assert any("CG broke down" in str(m.message) for m in wl) == (damping == 0.0)
    for vec in (False, True):
        assert torch.isfinite(grads[vec]).all()
        assert float(grads[vec].norm()) < (10 if damping is None else 1e3)
    torch.testing.assert_close(grads[True], grads[False], rtol=1e-9, atol=1e-12)
    assert infos[True]["linsolve_usable"].tolist() == infos[False]["linsolve_usable"].tolist()


def _ill_quadratic():
    g = torch.Generator().manual_seed(0)
    A = spd(10, g, lo=1e-3, hi=1.0)
    c = torch.randn(10, dtype=DT, generator=g)
    problem = bl.BilevelProblem(lambda w, h, b: 0.5 * w @ A @ w - h["x"] @ w,
                                lambda w, h, b: 0.5 * ((w - c) ** 2).sum())
    h = {"x": torch.randn(10, dtype=DT, generator=g)}
    return problem, h, torch.linalg.solve(A, h["x"])


def test_implicit_at_solution_flags_and_warns():
    problem, h, w_star = _ill_quadratic()
    est = bl.Implicit(bl.CG(2))
    bl.reset_warnings()
    with warnings.catch_warnings(record=True) as wl:
        warnings.simplefilter("always")
        r = est.at_solution(problem, h, w_star, None, None)
    assert bool(r.info["warnings/linsolve_residual"])
    assert [str(m.message)[:36] for m in wl] == ["the linear solve stopped at relative"]


def test_hypergrad_warns_once_per_call_not_twice():
    problem, h, _ = _ill_quadratic()
    est = bl.Implicit(bl.CG(2), stationarity_rtol=None)
    bl.reset_warnings()
    with warnings.catch_warnings(record=True) as wl:
        warnings.simplefilter("always")
        for _ in range(9):  # occurrences 1..9: only the first is shown
            bl.hypergrad(problem, h, None, None, solver=bl.GradientDescent(0.5, 3),
                         estimator=est, params0=torch.zeros(10, dtype=DT))
        assert len(wl) == 1
        bl.hypergrad(problem, h, None, None, solver=bl.GradientDescent(0.5, 3), estimator=est,
                     params0=torch.zeros(10, dtype=DT))
    assert len(wl) == 2 and "occurrence 10" in str(wl[1].message)
