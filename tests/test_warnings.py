"""Warnings that say what happened and what to change, are counted in res.info, are rate-limited
per estimator and kind, and never hide one another."""

from __future__ import annotations

import warnings

import pytest
import torch
from _problems import DT, IMAMLQuadratic
from torch.func import vmap

import bilevel as bl
from bilevel.diagnostics import quarter_means


def ridge(dtype=DT, n=40, noise=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 3, generator=g).to(dtype)
    y = (X @ torch.tensor([1.0, -2.0, 0.5]).to(dtype) + noise * torch.randn(n, generator=g)
         .to(dtype))
    inner = lambda w, h, b: ((b[0] @ w - b[1]) ** 2).mean() + h["decay"] * (w * w).sum()  # noqa
    outer = lambda w, h, b: ((X[:10] @ w - y[:10]) ** 2).mean()  # noqa: E731
    L = float(torch.linalg.eigvalsh(2 * X.T @ X / n).max())
    return bl.BilevelProblem(inner, outer), (X, y), L


def record(fn):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        out = fn()
    return out, [str(w.message) for w in seen if issubclass(w.category, RuntimeWarning)]


def suffix(kind: str, est, n: int = 1) -> str:
    return (f" [{kind}: occurrence {n} for this {type(est).__name__}; shown at "
            f"occurrences 1, 10, 100, ...]")


H = {"decay": torch.tensor(0.05, dtype=DT)}
W0 = torch.zeros(3, dtype=DT)


# ------------------------------------------------------------------ divergence
def test_real_divergence_warns_with_the_smoothed_values():
    prob, data, L = ridge()
    est = bl.Unrolled()
    lr = 2.3 / (L + 0.1)  # just above 2/λ_max: |1 − lr·λ_max| ≈ 1.15, the loss grows ×~10²
    res, seen = record(lambda: bl.hypergrad(prob, H, bl.Minibatches(*data, batch_size=40), None,
                                            solver=bl.GradientDescent(lr, 24), params0=W0,
                                            estimator=est))
    trace = res.info["inner_loss"]
    a, _, z = quarter_means(trace)
    assert float(z) > 10 * float(a)
    assert bool(res.info["warnings/diverging"])
    assert seen == [f"the inner loss grew from {a.item():.4g} to {z.item():.4g} (mean of the "
                    f"first vs the last quarter of 24 inner steps): the inner solver is "
                    f"diverging; lower its learning rate" + suffix("diverging", est)]


def test_divergence_on_minibatches_to_hundreds_warns():
    """The issue's case: minibatch SGD at a far too large lr, the loss reaching hundreds."""
    prob, data, L = ridge(noise=1.0)
    stream = bl.Minibatches(*data, batch_size=8, seed=1)
    res, seen = record(lambda: bl.hypergrad(
        prob, H, stream, None, solver=bl.GradientDescent(3.0 / L, 12), params0=W0))
    assert float(res.info["inner_loss"][-1]) > 100
    assert len(seen) == 1 and seen[0].startswith("the inner loss grew from")


@pytest.mark.parametrize("warm", [False, True])
def test_noisy_converging_sgd_does_not_warn(warm):
    """Minibatch noise: the last batch's loss is often above the first one's (the old check
    warned), the quarter means are not."""
    prob, data, L = ridge(noise=1.0)
    stream = bl.Minibatches(*data, batch_size=4, seed=2)
    w0 = bl.solve(prob, H, data, solver=bl.GradientDescent(0.5 / L, 500), params0=W0) \
        if warm else W0
    res, seen = record(lambda: bl.hypergrad(prob, H, stream, None, params0=w0,
                                            solver=bl.GradientDescent(0.3 / L, 80)))
    trace = res.info["inner_loss"]
    if warm:  # flat and noisy: the old last-vs-first comparison trips here
        assert float(trace[-1]) > float(trace[0])
    assert not bool(res.info["warnings/diverging"]) and seen == []


def test_minibatch_noise_at_the_optimum_never_flags_short_windows():
    """Review defect 4: logistic regression warm-started at its optimum, batch 8, 40 windows of
    K = 10 GD steps; 3 flipped labels make the batch losses heavy-tailed. Full-batch flat: no
    window may be flagged (the old quarter-mean rule flagged 6 of 40)."""
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(200, 5, dtype=DT, generator=gen)
    y = (X @ (3 * torch.randn(5, dtype=DT, generator=gen)) > 0).to(DT)
    y[:3] = 1 - y[:3]
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    prob = bl.BilevelProblem(lambda w, h, b: bce(b[0] @ w, b[1]) + h["wd"] * (w ** 2).sum(),
                             lambda w, h, b: bce(b[0] @ w, b[1]))
    h = {"wd": torch.tensor(1e-4, dtype=DT)}
    stream = bl.Minibatches(X, y, batch_size=8, seed=0)
    w = bl.solve(prob, h, (X, y), solver=bl.GradientDescent(1.0, 500),
                 params0=torch.zeros(5, dtype=DT))
    flagged, seen_all = 0, []
    for t in range(40):
        res, seen = record(lambda w=w, t=t: bl.hypergrad(
            prob, h, stream.shifted(10 * t), (X, y), solver=bl.GradientDescent(0.05, 10),
            estimator=bl.Truncated(2), params0=w))
        flagged += int(res.info["warnings/diverging"])
        seen_all += seen
        w = res.params
    assert flagged == 0 and seen_all == []


def test_the_trend_rule_on_synthetic_traces():
    """i.i.d. heavy-tailed noise does not trip it (measured null rate <= 2.4e-4 per trace for
    uniform noise, 5e4 traces each K); a steady 2x growth over 400 noisy steps and an explosive
    short trace do; a monotone rise of only 10 % does not."""
    from bilevel.diagnostics import diverging
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    for k, sigma in ((3, 1.0), (4, 1.0), (6, 1.0), (10, 2.0), (40, 2.0), (400, 2.0)):
        noise = torch.distributions.LogNormal(0.0, sigma).sample((500, k))  # heavy tails
        assert not bool(diverging(noise).any()), k
    steps = torch.arange(400, dtype=DT)
    steady = 1 + steps / 400 + 0.3 * torch.rand(400, dtype=DT, generator=gen)
    assert bool(diverging(steady))
    assert bool(diverging(torch.tensor([1.0, 10.0, 1e3, 1e5], dtype=DT)))
    assert not bool(diverging(torch.tensor([1.0, 10.0, 1e3], dtype=DT) * 0 + 1 + steps[:3]
                              / 1e3))
    assert not bool(diverging(1 + steps / 4000))  # monotone, but only +10 %
    batched = torch.stack([steady, 2 - steps / 400])
    assert diverging(batched).tolist() == [True, False]


def test_a_huge_step_size_on_a_quadratic_warns_even_for_few_steps():
    prob = bl.BilevelProblem(lambda w, h, b: h["c"] * (w ** 2).sum(), lambda w, h, b: w.sum())
    for k in (3, 5, 30):
        res, seen = record(lambda k=k: bl.hypergrad(
            prob, {"c": torch.tensor(1.0, dtype=DT)}, solver=bl.GradientDescent(50.0, k),
            params0=torch.ones(2, dtype=DT), estimator=bl.Unrolled()))
        assert bool(res.info["warnings/diverging"]), k
        assert len(seen) == 1 and seen[0].startswith("the inner loss grew from"), k
        bl.reset_warnings()


# ------------------------------------------------------------------ linear solves
def indefinite_problem():
    """g = ½(w₀² − w₁²) − a·w₀: stationary at (a, 0) but indefinite; ∇_w f = (2w₀, −2)."""
    inner = lambda w, h, b: 0.5 * (w[0] ** 2 - w[1] ** 2) - h["a"] * w[0]  # noqa: E731
    outer = lambda w, h, b: w[0] ** 2 + (w[1] - 1) ** 2  # noqa: E731
    return bl.BilevelProblem(inner, outer)


def test_cg_breakdown_on_an_indefinite_hessian():
    est = bl.Implicit(bl.CG(10))
    res, seen = record(lambda: bl.hypergrad(indefinite_problem(), {"a": torch.tensor(0.5,
                                            dtype=DT)}, solver=bl.GradientDescent(0.5, 60),
                                            params0=torch.zeros(2, dtype=DT), estimator=est))
    assert bool(res.info["warnings/linsolve_breakdown"])
    assert not bool(res.info["warnings/linsolve_residual"])  # not reported twice
    assert seen == ["CG broke down after 0 iterations (curvature p·Hp <= 0, or its residual "
                    "blew up): the inner Hessian is singular or indefinite at w_K (not a strict "
                    "minimum); its least-residual iterate is used (relative residual 1, v = 0 "
                    "gives 1). More iterations "
                    "will not help: add damping (CG(damping=...) / HistoryFree(damping=...)), "
                    "run the inner solver to a minimum, or use Neumann or an unrolled estimator"
                    + suffix("linsolve_breakdown", est)]


def test_residual_too_large_to_use():
    pb = IMAMLQuadratic.make(d=5)
    est = bl.Implicit(bl.CG(iters=1))
    res, seen = record(lambda: bl.hypergrad(pb.problem(), {"theta": torch.ones(5, dtype=DT)},
                                            solver=bl.GradientDescent(0.2, 300), estimator=est))
    r = res.info["linsolve_rel_residual"].item()
    assert r > 1e-3 and bool(res.info["warnings/linsolve_residual"])
    assert seen == [f"the linear solve stopped at relative residual {r:.3g} after 1 "
                    f"iterations, above the usable level (CG(warn_rtol=...), default 1e-3): "
                    f"raise CG(iters=...), or add damping to improve the conditioning"
                    + suffix("linsolve_residual", est)]


def test_a_usable_residual_does_not_warn_in_float64():
    """Default float64 tol is 1e-10; a residual of 1e-4 misses it but is perfectly usable."""
    pb = IMAMLQuadratic.make(d=12, reg=5.0)
    theta = {"theta": torch.ones(12, dtype=DT)}
    res, seen = record(lambda: bl.hypergrad(pb.problem(), theta,
                                            solver=bl.GradientDescent(0.1, 600),
                                            estimator=bl.Implicit(bl.CG(iters=4))))
    r = res.info["linsolve_rel_residual"].item()
    assert 1e-5 < r < 1e-3 and not bool(res.info["linsolve_converged"])
    assert not bool(res.info["warnings/linsolve_residual"]) and seen == []
    assert rel_err(res.grad["theta"], pb.grad(theta["theta"])) < 1e-3  # it is usable
    res, seen = record(lambda: bl.hypergrad(pb.problem(), theta,
                                            solver=bl.GradientDescent(0.1, 600),
                                            estimator=bl.Implicit(bl.CG(iters=4,
                                                                        warn_rtol=1e-5))))
    assert len(seen) == 1 and "above the usable level" in seen[0]


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


def test_float32_default_cg_does_not_warn():
    prob, data, L = ridge(dtype=torch.float32)
    h = {"decay": torch.tensor(0.05)}
    res, seen = record(lambda: bl.hypergrad(prob, h, data, None, params0=torch.zeros(3),
                                            solver=bl.GradientDescent(0.5 / L, 400),
                                            estimator=bl.Implicit(bl.CG(10))))
    assert seen == [] and not bool(res.info["warnings/linsolve_residual"])


def test_neumann_divergence_warns():
    prob, data, L = ridge()
    est = bl.Implicit(bl.Neumann(20, alpha=3.0 / L), stationarity_rtol=None)
    res, seen = record(lambda: bl.hypergrad(prob, H, data, None, params0=W0, estimator=est,
                                            solver=bl.GradientDescent(0.5 / L, 300)))
    last = res.info["linsolve_last_term_norm"].item()
    assert bool(res.info["linsolve_diverging"]) and bool(res.info["warnings/neumann_diverging"])
    assert seen == [f"the Neumann series diverges (its last term, norm {last:.3g}, outgrew the "
                    f"first): alpha is above 2/lambda_max of the inner Hessian; lower "
                    f"Neumann(alpha=...), or use CG" + suffix("neumann_diverging", est)]


def test_not_stationary_message():
    pb = IMAMLQuadratic.make(d=3)
    est = bl.Implicit(bl.CG(5))
    res, seen = record(lambda: bl.hypergrad(pb.problem(), {"theta": torch.ones(3, dtype=DT)},
                                            solver=bl.GradientDescent(0.01, 2), estimator=est))
    gK, g0 = res.info["inner_grad_norm"].item(), res.info["inner_grad_norm0"].item()
    assert seen == [f"Implicit: the inner solver did not reach a stationary point (|grad g(w_K)| "
                    f"= {gK:.3g} vs {g0:.3g} at w_0); the implicit hypergradient assumes grad "
                    f"g(w_K) = 0. Run more inner steps or a larger step size"
                    + suffix("not_stationary", est)]


# ------------------------------------------------------------------ no warning hides another
def test_two_warnings_in_one_run_both_show():
    prob, data, L = ridge()
    est = bl.Implicit(bl.Neumann(20, alpha=3.0 / L))
    res, seen = record(lambda: bl.hypergrad(prob, H, data, None, params0=W0, estimator=est,
                                            solver=bl.GradientDescent(0.01 / L, 3)))
    assert bool(res.info["warnings/neumann_diverging"])
    assert bool(res.info["warnings/not_stationary"])
    assert len(seen) == 2
    assert seen[0].startswith("the Neumann series diverges")
    assert seen[1].startswith("Implicit: the inner solver did not reach a stationary point")


def test_a_first_warning_does_not_use_up_the_slot_of_a_later_one():
    """Spurious-then-real: one estimator, one kind shown first, then another kind, then the
    first kind again for a differently configured estimator: all three show."""
    prob, data, L = ridge()
    est = bl.Unrolled()
    diverge = dict(solver=bl.GradientDescent(2.3 / (L + 0.1), 24), params0=W0)
    _, first = record(lambda: bl.hypergrad(prob, H, data, None, estimator=est, **diverge))
    _, later = record(lambda: bl.hypergrad(indefinite_problem(), {"a": torch.tensor(0.5,
                                           dtype=DT)}, solver=bl.GradientDescent(0.5, 60),
                                           params0=torch.zeros(2, dtype=DT),
                                           estimator=bl.Implicit(bl.CG(10))))
    _, other = record(lambda: bl.hypergrad(prob, H, data, None, estimator=bl.Checkpointed(2),
                                           **diverge))
    assert len(first) == len(later) == len(other) == 1
    assert "inner loss grew" in first[0] and "CG broke down" in later[0]
    assert "inner loss grew" in other[0]


def test_rate_limit_per_estimator_and_kind_with_fresh_estimators():
    """A loop that builds a fresh (equal) estimator each step sees occurrences 1 and 10 only;
    res.info flags every call."""
    prob, data, L = ridge()
    seen_all, flags = [], 0
    for _ in range(12):
        est = bl.Implicit(bl.Neumann(20, alpha=3.0 / L), stationarity_rtol=None)
        res, seen = record(lambda est=est: bl.hypergrad(
            prob, H, data, None, params0=W0, estimator=est,
            solver=bl.GradientDescent(0.5 / L, 300)))
        seen_all += seen
        flags += int(res.info["warnings/neumann_diverging"])
    assert flags == 12 and len(seen_all) == 2
    assert seen_all[1].endswith(suffix("neumann_diverging", est, 10))


def test_rate_limits_are_per_problem_too():
    """Review defect 8: two unrelated problems, each with a fresh (equal) estimator: problem B's
    first divergence is shown. A loop building a fresh estimator AND a fresh BilevelProblem of
    the same functions every step is still rate-limited (occurrences 1 and 10 of 12)."""
    prob_a, data, L = ridge()
    prob_b = bl.BilevelProblem(lambda w, h, b: 3 * ((b[0] @ w - b[1]) ** 2).mean()
                               + h["decay"] * (w * w).sum(), lambda w, h, b: w.sum())
    diverge = dict(solver=bl.GradientDescent(2.3 / (L + 0.1), 24), params0=W0)
    res_a, seen_a = record(lambda: bl.hypergrad(prob_a, H, data, None, estimator=bl.Unrolled(),
                                                **diverge))
    res_b, seen_b = record(lambda: bl.hypergrad(prob_b, H, data, None, estimator=bl.Unrolled(),
                                                **diverge))
    assert bool(res_a.info["warnings/diverging"]) and bool(res_b.info["warnings/diverging"])
    assert len(seen_a) == 1 and len(seen_b) == 1
    assert seen_b[0].endswith(suffix("diverging", bl.Unrolled()))
    seen_all = []
    for _ in range(12):
        fresh = bl.BilevelProblem(prob_a.inner_loss, prob_a.outer_loss)
        _, seen = record(lambda fresh=fresh: bl.hypergrad(fresh, H, data, None,
                                                          estimator=bl.Unrolled(), **diverge))
        seen_all += seen
    # occurrence 1 was problem A's above; this loop makes occurrences 2..13: 10 is shown
    assert len(seen_all) == 1 and seen_all[0].endswith(suffix("diverging", bl.Unrolled(), 10))


def test_flags_under_vmap_count_the_problems():
    prob, data, L = ridge()
    alpha = 2.0 / (L + 10.0)  # diverges for decay 10 (λ_max = L + 20), not for decay 0

    def one(decay):
        return bl.hypergrad(prob, {"decay": decay}, data, None, params0=W0,
                            solver=bl.GradientDescent(0.2 / (L + 20), 400),
                            estimator=bl.Implicit(bl.Neumann(40, alpha), stationarity_rtol=None))

    res = vmap(one)(torch.tensor([0.0, 10.0, 10.0], dtype=DT))
    assert res.info["warnings/neumann_diverging"].tolist() == [False, True, True]
    assert int(res.info["warnings/neumann_diverging"].sum()) == 2
    _, seen = record(lambda: bl.check_result(res))
    assert len(seen) == 1 and seen[0].startswith("the Neumann series diverges")


def test_fresh_batches_with_cg_warn():
    X = torch.randn(16, 3, dtype=DT)
    stream = bl.Minibatches(X, torch.zeros(16, dtype=DT), batch_size=4)
    prob = bl.BilevelProblem(lambda w, h, b: ((b[0] @ w - 1) ** 2).mean() + h["d"] * (w @ w),
                             lambda w, h, b: (w ** 2).sum())
    est = bl.Implicit(bl.CG(3), system_batch="fresh", stationarity_rtol=None)
    _, seen = record(lambda: bl.hypergrad(prob, {"d": torch.tensor(0.1, dtype=DT)}, stream,
                                          params0=torch.zeros(3, dtype=DT), estimator=est,
                                          solver=bl.GradientDescent(0.1, 20)))
    assert seen[0] == ("Implicit(system_batch='fresh') with CG: every Hessian-vector product "
                       "sees another minibatch, which breaks CG's conjugacy (it assumes one "
                       "fixed matrix); use bl.Neumann(...) for stochastic products, or CG on a "
                       "fixed batch (system_batch=batch)" + suffix("fresh_cg", est))


def test_stationarity_on_a_stream_compares_the_same_batch():
    """‖∇g(w_0; b)‖ and ‖∇g(w_K; b)‖ on the system batch b (here the last inner batch)."""
    prob, data, L = ridge()
    stream = bl.Minibatches(*data, batch_size=8, seed=4)
    res = bl.hypergrad(prob, H, stream, None, params0=W0, solver=bl.GradientDescent(0.3 / L, 30),
                       estimator=bl.Implicit(bl.CG(3)))
    b = stream.at(29)
    for w, key in ((W0, "inner_grad_norm0"), (res.params, "inner_grad_norm")):
        w = w.clone().requires_grad_(True)
        g = torch.autograd.grad(prob.inner_loss(w, H, b), w)[0]
        torch.testing.assert_close(res.info[key], g.norm(), rtol=1e-13, atol=0)
