"""Adam / AdamW / RMSprop inner solvers (float64): equal to torch.optim, hypergradients against
central finite differences through every exact estimator and under vmap, no NaN where a gradient
coordinate is exactly 0 (first and second order), warm starts, bad input, and the peers
(TorchOpt's functional Adam, higher's DifferentiableAdam), skipped when absent.

The data have an all-zero input feature and the start point has a zero weight row, so some
coordinates of ∇_w g are exactly 0 on the whole trajectory (the sqrt(0) trap) in every test.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from _problems import DT
from torch.func import vmap

import bilevel as bl
import bilevel.adaptive as adaptive
from bilevel.pytree import tree_from_vector, tree_leaves, tree_map, tree_to_vector
from bilevel.unroll import run

D_IN, D_OUT, N = 4, 3, 12


def make_data(seed: int = 0, n: int = N):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D_IN, dtype=DT, generator=g)
    x[:, 0] = 0.0  # feature 0 is always 0: ∇ of row 0 of W is exactly 0
    y = torch.randn(n, D_OUT, dtype=DT, generator=g)
    return x, y


def make_params(seed: int = 1, zero_row: bool = True):
    g = torch.Generator().manual_seed(seed)
    w = 0.5 * torch.randn(D_IN, D_OUT, dtype=DT, generator=g)
    if zero_row:
        w[0] = 0.0  # with coupled weight decay the gradient of row 0 stays exactly 0 too
    return {"W": w, "b": 0.1 * torch.randn(D_OUT, dtype=DT, generator=g)}


def net(p, x):
    return torch.tanh(x @ p["W"] + p["b"])


def mse(p, h, batch):
    x, y = batch
    return ((net(p, x) - y) ** 2).mean()


def inner_loss(p, h, batch):
    """Training loss with an L2 term whose strength is a hyperparameter (a loss hparam).
    (Written d·(S/2), not 0.5·d·S: in torch 2.13 ``torch.func.jvp`` of a 0-d float32 tensor
    times a Python float has a float64 tangent, which breaks float32 ForwardMode matmuls.)"""
    return mse(p, h, batch) + h["decay"] * ((p["W"] ** 2).sum() / 2)


PROBLEM = bl.BilevelProblem(inner_loss, mse)


def hp(**values) -> dict:
    return {k: torch.tensor(v, dtype=DT) for k, v in values.items()}


def finite_difference(fn, hparams, h=1e-6):
    vec = tree_to_vector(hparams)
    out = torch.empty_like(vec)
    for i in range(vec.numel()):
        e = torch.zeros_like(vec)
        e[i] = h
        out[i] = (fn(tree_from_vector(vec + e, hparams)) - fn(tree_from_vector(vec - e, hparams)))
        out[i] /= 2 * h
    return tree_from_vector(out, hparams)


def unrolled_value(problem, solver, inner_batch, outer_batch, params0):
    def F(h):
        w = bl.solve(problem, h, inner_batch, solver=solver, params0=params0)
        return problem.outer_loss(w, h, outer_batch)

    return F


def assert_tree_close(a, b, rtol, atol):
    for (x, y) in zip(tree_leaves(a), tree_leaves(b), strict=True):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol)


def all_finite(tree) -> bool:
    return all(bool(torch.isfinite(x).all()) for x in tree_leaves(tree))


# every coefficient a hyperparameter, at values where each derivative is well away from 0
def adam_all(steps):
    return bl.Adam("lr", steps, betas=("b1", "b2"), eps="eps", weight_decay="wd")


def adamw_all(steps):
    return bl.AdamW("lr", steps, betas=("b1", "b2"), eps="eps", weight_decay="wd")


def rmsprop_all(steps, centered=False):
    return bl.RMSprop("lr", steps, alpha="b2", eps="eps", weight_decay="wd", momentum="mu",
                      centered=centered)


SOLVERS = {
    "adam": (adam_all, hp(lr=0.05, b1=0.8, b2=0.9, eps=1e-3, wd=0.05, decay=0.1)),
    "adamw": (adamw_all, hp(lr=0.05, b1=0.8, b2=0.9, eps=1e-3, wd=0.3, decay=0.1)),
    "rmsprop": (rmsprop_all, hp(lr=0.02, b2=0.9, eps=1e-3, wd=0.05, mu=0.5, decay=0.1)),
    "rmsprop_centered": (lambda k: rmsprop_all(k, centered=True),
                         hp(lr=0.02, b2=0.9, eps=1e-3, wd=0.05, mu=0.5, decay=0.1)),
    "adam_amsgrad": (lambda k: bl.Adam("lr", k, betas=("b1", "b2"), eps="eps", weight_decay="wd",
                                       amsgrad=True),
                     hp(lr=0.05, b1=0.8, b2=0.9, eps=1e-3, wd=0.05, decay=0.1)),
    # per-parameter learning rates and beta1 (Meta-SGD style), tuned
    "adam_per_parameter": (
        lambda k: bl.Adam(lambda h: h["lrs"], k, betas=(lambda h: h["b1s"], 0.9), eps=1e-3),
        {"lrs": hp(W=0.05, b=0.02), "b1s": hp(W=0.8, b=0.6), **hp(decay=0.1)}),
    # defaults (beta2 = 0.999, eps = 1e-8) with a tuned lr and the loss hyperparameter
    "adam_defaults": (lambda k: bl.Adam("lr", k), hp(lr=0.01, decay=0.1)),
}

_FD_CACHE: dict = {}


def fd_reference(name, steps):
    key = (name, steps)
    if key not in _FD_CACHE:
        make, h = SOLVERS[name]
        F = unrolled_value(PROBLEM, make(steps), make_data(0), make_data(5), make_params())
        _FD_CACHE[key] = finite_difference(F, h)
    return _FD_CACHE[key]


# ----------------------------------------------------------------------------- torch.optim

def torch_optim_trajectory(opt_cls, groups, batches, **kw):
    """Run ``opt_cls`` on param groups [{'W': ..., **opts}, {'b': ..., **opts}]."""
    params = {k: v.clone().requires_grad_(True) for k, v in make_params().items()}
    opt = opt_cls([{"params": [params[k]], **opts} for k, opts in groups], **kw)
    for batch in batches:
        opt.zero_grad()
        inner_loss(params, hp(decay=0.0), batch).backward()
        opt.step()
    return {k: v.detach() for k, v in params.items()}, opt


TORCH_CASES = {
    "adam": (torch.optim.Adam, bl.Adam, dict(lr=0.03)),
    "adam_wd": (torch.optim.Adam, bl.Adam, dict(lr=0.03, betas=(0.8, 0.95), eps=1e-6,
                                                weight_decay=0.1)),
    "adam_amsgrad": (torch.optim.Adam, bl.Adam, dict(lr=0.03, weight_decay=0.1, amsgrad=True)),
    "adamw": (torch.optim.AdamW, bl.AdamW, dict(lr=0.03)),
    "adamw_amsgrad": (torch.optim.AdamW, bl.AdamW, dict(lr=0.03, amsgrad=True)),
    "adamw_wd": (torch.optim.AdamW, bl.AdamW, dict(lr=0.03, betas=(0.7, 0.99), weight_decay=0.5)),
    "rmsprop": (torch.optim.RMSprop, bl.RMSprop, dict(lr=0.01)),
    "rmsprop_all": (torch.optim.RMSprop, bl.RMSprop, dict(lr=0.01, alpha=0.9, eps=1e-6,
                                                          weight_decay=0.1, momentum=0.6,
                                                          centered=True)),
    "rmsprop_momentum": (torch.optim.RMSprop, bl.RMSprop, dict(lr=0.01, momentum=0.9)),
}


@pytest.mark.parametrize("per_step", [False, True], ids=["fixed_batch", "batch_per_step"])
@pytest.mark.parametrize("case", list(TORCH_CASES))
def test_trajectory_equals_torch_optim(case, per_step):
    opt_cls, ours_cls, kw = TORCH_CASES[case]
    steps = 30
    batches = [make_data(100 + k if per_step else 0) for k in range(steps)]
    ref, opt = torch_optim_trajectory(opt_cls, [("W", {}), ("b", {})], batches, **kw)
    solver = ours_cls(steps=steps, **kw)
    params = make_params()
    state = solver.init_state(params, {})
    grad_fn = lambda p, h, b: torch.func.grad_and_value(inner_loss)(p, h, b)  # noqa: E731
    for batch in batches:
        params, state, _ = solver.step(grad_fn, params, state, hp(decay=0.0), batch)
    for k in ref:
        assert (params[k] - ref[k]).abs().max() <= 1e-12, k
    # the moments are the same as torch's too
    torch_state = opt.state[opt.param_groups[0]["params"][0]]
    assert set(state) - {"step"} == set(torch_state) - {"step"}  # same names as torch.optim
    for key in set(state) - {"step"}:
        assert (state[key]["W"] - torch_state[key]).abs().max() <= 1e-12, key
    assert float(state["step"]) == float(torch_state["step"]) == steps


def test_per_parameter_rates_equal_torch_param_groups():
    """A per-parameter pytree of lr / betas / weight_decay = torch.optim param groups."""
    steps = 20
    batches = [make_data(k) for k in range(steps)]
    groups = [("W", dict(lr=0.02, betas=(0.8, 0.99), weight_decay=0.3)),
              ("b", dict(lr=0.05, betas=(0.6, 0.9), weight_decay=0.0))]
    ref, _ = torch_optim_trajectory(torch.optim.AdamW, groups, batches)
    h = {"lrs": {"W": torch.tensor(0.02, dtype=DT), "b": torch.tensor(0.05, dtype=DT)},
         "decay": torch.tensor(0.0, dtype=DT)}
    solver = bl.AdamW(lambda h: h["lrs"], steps, betas=({"W": 0.8, "b": 0.6},
                                                        {"W": 0.99, "b": 0.9}),
                      weight_decay={"W": 0.3, "b": 0.0})
    params, state = make_params(), None
    state = solver.init_state(params, h)
    grad_fn = lambda p, hh, b: torch.func.grad_and_value(inner_loss)(p, hh, b)  # noqa: E731
    for batch in batches:
        params, state, _ = solver.step(grad_fn, params, state, h, batch)
    for k in ref:
        assert (params[k] - ref[k]).abs().max() <= 1e-12, k


# ----------------------------------------------------------------------------- state

@pytest.mark.parametrize("solver", [bl.Adam(0.03, 30), bl.AdamW(0.03, 30),
                                    bl.RMSprop(0.01, 30, momentum=0.5, centered=True)], ids=repr)
def test_state_is_a_float_pytree_and_warm_start_continues_exactly(solver):
    params0, batch = make_params(), make_data(0)
    state0 = solver.init_state(params0, {})
    assert all(x.is_floating_point() for x in tree_leaves(state0))
    assert state0["step"].dtype == torch.float64 and state0["step"].shape == ()
    h = hp(decay=0.1)
    (w_all, s_all), _ = run(PROBLEM, solver, h, batch, (params0, state0), 30)
    (w_mid, s_mid), _ = run(PROBLEM, solver, h, batch, (params0, state0), 12)
    saved = tree_map(lambda x: x.clone(), (w_mid, s_mid))  # as a checkpoint would hold it
    (w_end, s_end), _ = run(PROBLEM, solver, h, batch, saved, 18)
    for a, b in zip(tree_leaves((w_end, s_end)), tree_leaves((w_all, s_all)), strict=True):
        assert torch.equal(a, b)
    assert float(s_end["step"]) == 30


def test_warm_start_through_hypergrad_state0():
    """With the core's ``state0`` keyword (issue 9): 12 + 18 warm-started steps = 30 steps."""
    if "state0" not in inspect.signature(bl.hypergrad).parameters:
        pytest.skip("bl.hypergrad has no state0 keyword in this tree (added by the core work)")
    solver, h, batch = bl.Adam(0.03, 30), hp(decay=0.1), make_data(0)
    first = bl.hypergrad(PROBLEM, h, batch, batch, solver=bl.Adam(0.03, 12),
                         params0=make_params())
    rest = bl.hypergrad(PROBLEM, h, batch, batch, solver=bl.Adam(0.03, 18),
                        params0=first.params, state0=first.state)
    whole = bl.hypergrad(PROBLEM, h, batch, batch, solver=solver, params0=make_params())
    assert_tree_close(rest.params, whole.params, rtol=0, atol=1e-15)


@pytest.mark.usefixtures("autodiff_mode")
@pytest.mark.parametrize("estimator", ["unrolled", "checkpointed", "forward", "truncated_K"])
@pytest.mark.parametrize("name", ["adam", "rmsprop_centered"])
def test_per_step_minibatches_match_finite_differences(name, estimator):
    """With the core's ``bl.PerStep`` (issue 9): a different batch at every inner step, the
    reference a hand-written loop over the same batches."""
    if not hasattr(bl, "PerStep"):
        pytest.skip("bl.PerStep is not in this tree (added by the core work)")
    make, h = SOLVERS[name]
    K = 6
    solver, batches, val, params0 = make(K), [make_data(20 + k) for k in range(K)], \
        make_data(5), make_params()

    def F(hh):
        grad_fn = lambda p, h_, b: torch.func.grad_and_value(inner_loss)(p, h_, b)  # noqa: E731
        p, s = params0, solver.init_state(params0, hh)
        for k in range(K):
            p, s, _ = solver.step(grad_fn, p, s, hh, batches[k])
        return mse(p, hh, val)

    res = bl.hypergrad(PROBLEM, h, bl.PerStep(lambda k: batches[k]), val, solver=solver,
                       estimator=EXACT[estimator](K), params0=params0)
    assert_tree_close(res.grad, finite_difference(F, h), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("make", [adam_all, adamw_all, rmsprop_all], ids=["adam", "adamw",
                                                                         "rmsprop"])
def test_float32_estimators_agree(make):
    """float32 end to end (the float64 step counter is cast per leaf): ForwardMode and
    Checkpointed equal Unrolled to float32 rounding."""
    name = {adam_all: "adam", adamw_all: "adamw", rmsprop_all: "rmsprop"}[make]
    h = tree_map(lambda x: x.float(), SOLVERS[name][1])
    sb, qb = tree_map(lambda x: x.float(), make_data(0)), tree_map(lambda x: x.float(),
                                                                    make_data(5))
    params0 = tree_map(lambda x: x.float(), make_params())
    args = (PROBLEM, h, sb, qb)
    ref = bl.hypergrad(*args, solver=make(5), params0=params0)
    assert all(x.dtype == torch.float32 for x in tree_leaves((ref.grad, ref.params)))
    for est in (bl.ForwardMode(), bl.Checkpointed()):
        got = bl.hypergrad(*args, solver=make(5), params0=params0, estimator=est)
        assert_tree_close(got.grad, ref.grad, rtol=1e-4, atol=1e-5)


def test_float32_parameters_keep_their_dtype():
    params = {"W": torch.randn(D_IN, D_OUT), "s": torch.tensor(0.3)}  # a 0-d float32 leaf
    solver = bl.Adam(0.01, 3)

    def loss(p, h, batch):
        return (p["W"] ** 2).sum() * p["s"] ** 2

    prob = bl.BilevelProblem(loss, loss)
    (w, s), _ = run(prob, solver, {}, None, (params, solver.init_state(params, {})), 3)
    assert w["W"].dtype == w["s"].dtype == s["exp_avg"]["s"].dtype == torch.float32


# ----------------------------------------------------------------------------- hypergradients

EXACT = {"unrolled": lambda k: bl.Unrolled(), "checkpointed": lambda k: bl.Checkpointed(),
         "checkpointed2": lambda k: bl.Checkpointed(segments=2),
         "forward": lambda k: bl.ForwardMode(), "truncated_K": lambda k: bl.Truncated(k)}


@pytest.mark.usefixtures("autodiff_mode")
@pytest.mark.parametrize("steps", [1, 10])
@pytest.mark.parametrize("estimator", list(EXACT))
@pytest.mark.parametrize("name", list(SOLVERS))
def test_hypergradient_matches_finite_differences(name, estimator, steps):
    make, h = SOLVERS[name]
    res = bl.hypergrad(PROBLEM, h, make_data(0), make_data(5), solver=make(steps),
                       estimator=EXACT[estimator](steps), params0=make_params())
    fd = fd_reference(name, steps)
    for key in h:
        torch.testing.assert_close(res.grad[key], fd[key], rtol=1e-6, atol=1e-8,
                                   msg=lambda m, key=key: f"d/d{key}: {m}")
    assert all_finite(res.grad)


@pytest.mark.parametrize("name", list(SOLVERS))
def test_checkpointed_and_truncated_equal_unrolled(name):
    make, h = SOLVERS[name]
    K = 10
    args = (PROBLEM, h, make_data(0), make_data(5))
    kw = dict(solver=make(K), params0=make_params())
    ref = bl.hypergrad(*args, estimator=bl.Unrolled(), **kw)
    for est in (bl.Checkpointed(), bl.Checkpointed(segments=3), bl.Checkpointed(segments=K),
                bl.Truncated(K)):
        got = bl.hypergrad(*args, estimator=est, **kw)
        assert_tree_close(got.grad, ref.grad, rtol=1e-12, atol=1e-12)
        assert_tree_close(got.params, ref.params, rtol=0, atol=1e-15)
    short = bl.hypergrad(*args, estimator=bl.Truncated(3), **kw)
    gap = (tree_to_vector(short.grad) - tree_to_vector(ref.grad)).norm()
    assert gap > 1e-3 * tree_to_vector(ref.grad).norm()  # truncation really drops something


def test_sam_over_adam_matches_finite_differences():
    make, h = SOLVERS["adam"]
    solver = bl.SAM(make(4), rho=0.05)
    res = bl.hypergrad(PROBLEM, h, make_data(0), make_data(5), solver=solver,
                       params0=make_params())
    fd = finite_difference(unrolled_value(PROBLEM, solver, make_data(0), make_data(5),
                                          make_params()), h)
    assert_tree_close(res.grad, fd, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("estimator", [bl.Unrolled(), bl.Checkpointed(), bl.ForwardMode(),
                                       bl.Truncated(4)], ids=repr)
@pytest.mark.parametrize("name", ["adam", "adamw", "rmsprop_centered"])
def test_vmap_over_problems_equals_loop(name, estimator):
    make, h = SOLVERS[name]
    solver = make(6)
    data = [make_data(10 + i) for i in range(3)]
    xs, ys = torch.stack([d[0] for d in data]), torch.stack([d[1] for d in data])
    val, params0 = make_data(5), make_params()  # drawn outside vmap

    def one(x, y):
        return bl.hypergrad(PROBLEM, h, (x, y), val, solver=solver, estimator=estimator,
                            params0=params0)

    batched = vmap(one)(xs, ys)
    bl.check_result(batched)
    for i in range(3):
        looped = one(xs[i], ys[i])
        assert_tree_close(tree_map(lambda t, i=i: t[i], batched.grad), looped.grad,
                          rtol=1e-12, atol=1e-13)
        assert_tree_close(tree_map(lambda t, i=i: t[i], batched.params), looped.params,
                          rtol=1e-12, atol=1e-14)


def test_vmap_over_hyperparameters():
    """A batch of learning rates / betas (the state counter stays unbatched)."""
    solver = adam_all(5)
    base = SOLVERS["adam"][1]
    lrs = torch.tensor([0.01, 0.05, 0.1], dtype=DT)
    b1s = torch.tensor([0.5, 0.8, 0.9], dtype=DT)
    sb, qb, params0 = make_data(0), make_data(5), make_params()

    def one(lr, b1):
        h = dict(base, lr=lr, b1=b1)
        return bl.hypergrad(PROBLEM, h, sb, qb, solver=solver, params0=params0).grad

    batched = vmap(one)(lrs, b1s)
    for i in range(3):
        assert_tree_close(tree_map(lambda t, i=i: t[i], batched), one(lrs[i], b1s[i]),
                          rtol=1e-12, atol=1e-13)


# ----------------------------------------------------------------------------- sqrt(0)

def maml_problem():
    """w_0 = θ (a hyperparameter): the hypergradient needs d w_K / d w_0, and its derivative the
    second derivative of every Adam step, including at coordinates where v = 0."""
    return bl.BilevelProblem(inner_loss, mse, init=lambda h: h["theta"])


def maml_hparams():
    return {"theta": make_params(), **hp(lr=0.05, b1=0.8, b2=0.9, eps=1e-3, decay=0.1)}


def test_zero_gradient_coordinates_are_really_zero():
    """The test data do exercise the trap: row 0 of W gets an exactly-zero gradient and keeps
    v = 0 over the whole trajectory."""
    solver = bl.Adam(0.05, 10, weight_decay=0.1)
    params0 = make_params()
    (w, s), _ = run(PROBLEM, solver, hp(decay=0.1), make_data(0),
                    (params0, solver.init_state(params0, {})), 10)
    assert torch.equal(s["exp_avg_sq"]["W"][0], torch.zeros(D_OUT, dtype=DT))
    assert bool((s["exp_avg_sq"]["W"][1:] > 0).all())


@pytest.mark.parametrize("make", [adam_all, adamw_all, rmsprop_all,
                                  lambda k: rmsprop_all(k, centered=True)],
                         ids=["adam", "adamw", "rmsprop", "rmsprop_centered"])
def test_naive_sqrt_gives_nan_and_safe_sqrt_does_not(make, monkeypatch):
    prob, h = maml_problem(), dict(maml_hparams(), wd=torch.tensor(0.05, dtype=DT),
                                   mu=torch.tensor(0.5, dtype=DT))
    args = (prob, h, make_data(0), make_data(5))
    good = bl.hypergrad(*args, solver=make(5))
    assert all_finite(good.grad)
    fd = finite_difference(unrolled_value(prob, make(5), make_data(0), make_data(5), None), h)
    assert_tree_close(good.grad, fd, rtol=1e-6, atol=1e-8)
    monkeypatch.setattr(adaptive, "safe_sqrt", torch.sqrt)  # what torch.optim-style code does
    bad = bl.hypergrad(*args, solver=make(5), check=False)
    assert not all_finite(bad.grad)  # the trap is real on these data


@pytest.mark.parametrize("make", [adam_all, lambda k: rmsprop_all(k, centered=True)],
                         ids=["adam", "rmsprop_centered"])
def test_second_order_through_the_trajectory_is_finite_and_correct(make):
    """The Hessian of F(λ) = f(w_K(λ)) with w_0 = θ: forward-over-reverse (jvp of the Unrolled
    hypergradient, as ForwardMode/Implicit HVPs run) and reverse-over-reverse, both finite,
    equal, and equal to central differences of the hypergradient."""
    prob = maml_problem()
    h = dict(maml_hparams(), wd=torch.tensor(0.05, dtype=DT), mu=torch.tensor(0.5, dtype=DT))
    solver, sb, qb = make(4), make_data(0), make_data(5)

    def hgrad(hh):
        return bl.hypergrad(prob, hh, sb, qb, solver=solver).grad

    g = torch.Generator().manual_seed(7)
    direction = tree_map(lambda x: torch.randn(x.shape, dtype=DT, generator=g), h)
    direction["eps"] = 1e-3 * direction["eps"]  # a step relative to eps = 1e-3
    _, hvp_fwd = torch.func.jvp(hgrad, (h,), (direction,))

    def directional(hh):  # <∇F(λ), direction>, differentiated once more in reverse mode
        return sum((a * b).sum() for a, b in zip(tree_leaves(hgrad(hh)), tree_leaves(direction),
                                                 strict=True))
    hvp_rev = torch.func.grad(directional)(h)
    assert all_finite(hvp_fwd) and all_finite(hvp_rev)
    assert_tree_close(hvp_fwd, hvp_rev, rtol=1e-10, atol=1e-12)
    step = 1e-6  # FD error ~1e2·step² here (checked: it converges as step²)
    plus = hgrad(tree_map(lambda x, d: x + step * d, h, direction))
    minus = hgrad(tree_map(lambda x, d: x - step * d, h, direction))
    fd = tree_map(lambda a, b: (a - b) / (2 * step), plus, minus)
    assert_tree_close(hvp_fwd, fd, rtol=1e-5, atol=1e-7)
    # the zero-gradient row of θ: its second derivative is exactly the masked 0, not NaN
    assert torch.equal(hvp_fwd["theta"]["W"][0], torch.zeros(D_OUT, dtype=DT))


@pytest.mark.parametrize("make", [
    lambda: bl.Adam(0.1, 6, betas=(0.8, 0.9), eps=1.0),
    lambda: bl.AdamW(0.1, 6, betas=(0.8, 0.9), eps=1.0, weight_decay=0.0, amsgrad=True),
    lambda: bl.RMSprop(0.1, 6, eps=1.0, momentum=0.5, centered=True)],
    ids=["adam", "adamw_amsgrad", "rmsprop_centered"])
def test_gradient_zero_only_at_this_hyperparameter(make):
    """w_0 = λ₀ is the inner minimiser at λ = λ₀, so the trajectory stands still with v = 0 in
    every coordinate, but a perturbed λ moves it. With ε > 0 the step is differentiable there and
    the safe root gives the exact first derivative (m'/ε), equal to central differences. (ε is
    large so that the linearisation, which amplifies δ by ~lr/ε per step, stays valid over the
    finite-difference step.)"""
    lam0 = torch.tensor([1.0, -2.0], dtype=DT)
    target = torch.tensor([0.5, 0.5], dtype=DT)
    prob = bl.BilevelProblem(lambda w, h, b: 0.5 * ((w - h["lam"]) ** 2).sum(),
                             lambda w, h, b: 0.5 * ((w - target) ** 2).sum())
    solver, h = make(), {"lam": lam0}
    res = bl.hypergrad(prob, h, solver=solver, params0=lam0.clone())
    assert torch.equal(res.params, lam0)  # it did stand still
    fd = finite_difference(unrolled_value(prob, solver, None, None, lam0.clone()), h)
    torch.testing.assert_close(res.grad["lam"], fd["lam"], rtol=1e-6, atol=1e-9)
    assert float(res.grad["lam"].abs().min()) > 0.1  # m'/ε, not the trivial zero


def test_safe_sqrt_value_and_derivatives():
    x = torch.tensor([0.0, 1e-300, 0.25, 4.0, -1e-17], dtype=DT)
    assert torch.equal(adaptive.safe_sqrt(x)[:4], torch.sqrt(x[:4]))
    assert adaptive.safe_sqrt(x)[4] == 0
    d1 = torch.func.grad(lambda t: adaptive.safe_sqrt(t).sum())(x)
    d2 = torch.func.grad(lambda t: torch.func.grad(lambda u: adaptive.safe_sqrt(u).sum())(t)
                         .sum())(x)
    torch.testing.assert_close(d1[2:4], 0.5 / torch.sqrt(x[2:4]), rtol=1e-15, atol=0)
    torch.testing.assert_close(d2[2:4], -0.25 * x[2:4] ** -1.5, rtol=1e-15, atol=0)
    assert d1[0] == 0 and d2[0] == 0 and d1[4] == 0


def test_eps_root_is_inside_the_bias_corrected_root():
    """Adam(eps_root=r): w ← w − lr · m̂ / (√(v̂ + r) + ε), checked by hand for one step."""
    params, batch = make_params(), make_data(0)
    g = torch.func.grad(inner_loss)(params, hp(decay=0.1), batch)
    solver = bl.Adam(0.1, 1, betas=(0.8, 0.9), eps=1e-3, eps_root=1e-4)
    (w, _), _ = run(PROBLEM, solver, hp(decay=0.1), batch,
                    (params, solver.init_state(params, {})), 1)
    for k in params:  # one step: m̂ = g, v̂ = g²
        expected = params[k] - 0.1 * g[k] / (torch.sqrt(g[k] ** 2 + 1e-4) + 1e-3)
        torch.testing.assert_close(w[k], expected, rtol=1e-14, atol=1e-15)


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("make, match", [
    (lambda: bl.Adam(0.0, 3), "lr"),
    (lambda: bl.Adam(-1e-3, 3), "lr"),
    (lambda: bl.Adam(0.1, -1), "steps"),
    (lambda: bl.Adam(0.1, 3, betas=(1.0, 0.999)), r"betas\[0\]"),
    (lambda: bl.Adam(0.1, 3, betas=(0.9, -0.1)), r"betas\[1\]"),
    (lambda: bl.Adam(0.1, 3, betas=0.9), "pair"),
    (lambda: bl.Adam(0.1, 3, betas=(0.9, 0.99, 0.9)), "pair"),
    (lambda: bl.Adam(0.1, 3, eps=0.0), "eps"),
    (lambda: bl.Adam(0.1, 3, eps=-1e-8, eps_root=1e-8), "eps"),
    (lambda: bl.Adam(0.1, 3, eps_root=-1.0), "eps_root"),
    (lambda: bl.AdamW(0.1, 3, weight_decay=-0.1), "weight_decay"),
    (lambda: bl.Adam(0.1, 3, weight_decay=[0.1, -0.2]), "weight_decay"),
    (lambda: bl.Adam(torch.tensor(-0.1), 3), "lr"),
    (lambda: bl.Adam(None, 3), "lr"),
    (lambda: bl.RMSprop(0.1, 3, alpha=1.0), "alpha"),
    (lambda: bl.RMSprop(0.1, 3, momentum=-0.5), "momentum"),
    (lambda: bl.RMSprop(0.1, 3, eps=0.0), "eps"),
    (lambda: bl.RMSprop(0.1, 3, centered=1), "centered"),
    (lambda: bl.Adam(0.1, 3, amsgrad="yes"), "amsgrad"),
])
def test_bad_numbers_are_refused_naming_the_argument(make, match):
    with pytest.raises(bl.BilevelError, match=match):
        make()


def test_eps_zero_is_allowed_with_eps_root():
    bl.Adam(0.1, 3, eps=0.0, eps_root=1e-12)


def test_bad_hyperparameter_key_and_pytree_are_refused():
    args = (PROBLEM, hp(decay=0.1), make_data(0), make_data(5))
    with pytest.raises(bl.BilevelError, match="'b1'"):
        bl.hypergrad(*args, solver=bl.Adam(0.1, 2, betas=("b1", 0.999)), params0=make_params())
    with pytest.raises(bl.BilevelError, match=r"lr is a per-parameter pytree with leaves \["):
        bl.hypergrad(*args, solver=bl.Adam({"W": 0.1}, 2), params0=make_params())


def test_warm_start_with_a_foreign_state_is_refused():
    params = make_params()
    grad_fn = lambda p, h, b: torch.func.grad_and_value(inner_loss)(p, h, b)  # noqa: E731
    rms_state = bl.RMSprop(0.1, 1).init_state(params, {})
    with pytest.raises(bl.BilevelError, match="Adam state must be a dict with keys"):
        bl.Adam(0.1, 1).step(grad_fn, params, rms_state, hp(decay=0.1), make_data(0))
    other = bl.Adam(0.1, 1).init_state({"W": params["W"]}, {})
    with pytest.raises(bl.BilevelError, match=r"state\['exp_avg'\] has leaves"):
        bl.Adam(0.1, 1).step(grad_fn, params, other, hp(decay=0.1), make_data(0))
    momentum_state = bl.RMSprop(0.1, 1, momentum=0.9).init_state(params, {})
    with pytest.raises(bl.BilevelError, match="momentum_buffer"):
        bl.RMSprop(0.1, 1).step(grad_fn, params, momentum_state, hp(decay=0.1), make_data(0))


# ----------------------------------------------------------------------------- peers

class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        p = make_params(zero_row=False)
        self.W, self.b = torch.nn.Parameter(p["W"].clone()), torch.nn.Parameter(p["b"].clone())

    def forward(self, x):
        return net({"W": self.W, "b": self.b}, x)


PEER_K = 8
PEER_KW = dict(betas=(0.8, 0.9), eps=1e-3, weight_decay=0.05)


def ours(lr, decay, eps_root=0.0, **kw):
    h = {"lr": lr, "decay": decay}
    solver = bl.Adam("lr", PEER_K, eps_root=eps_root, **{**PEER_KW, **kw})
    res = bl.hypergrad(PROBLEM, h, make_data(0), make_data(5), solver=solver,
                       params0=make_params(zero_row=eps_root > 0))
    return res


def torchopt_adam(lr, decay, eps_root=0.0, **kw):
    torchopt = pytest.importorskip("torchopt")
    previous = torch.get_default_dtype()
    # TorchOpt computes 1 − βᵗ from its int64 step counter as a *default-dtype* tensor
    # (0.9 ** tensor(3) is float32), i.e. in float32 even for float64 parameters: ~1e-7
    # relative error in the step, 3e-6 absolute after 8 steps at β₂ = 0.999. Matched here
    # by making the default dtype float64 for the peer's run.
    torch.set_default_dtype(torch.float64)
    try:
        return _torchopt_adam(torchopt, lr, decay, eps_root, **kw)
    finally:
        torch.set_default_dtype(previous)


def _torchopt_adam(torchopt, lr, decay, eps_root, **kw):
    kw = {**PEER_KW, **kw}
    lr, decay = lr.clone().requires_grad_(), decay.clone().requires_grad_()
    opt = torchopt.adam(lr=lr, betas=kw["betas"], eps=kw["eps"], weight_decay=kw["weight_decay"],
                        eps_root=eps_root, use_accelerated_op=False)
    start = make_params(zero_row=eps_root > 0)
    params = (start["W"].requires_grad_(), start["b"].requires_grad_())
    state = opt.init(params)
    batch = make_data(0)
    for _ in range(PEER_K):
        loss = inner_loss({"W": params[0], "b": params[1]}, {"decay": decay}, batch)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        updates, state = opt.update(grads, state, params=params, inplace=False)
        params = torchopt.apply_updates(params, updates, inplace=False)
    f = mse({"W": params[0], "b": params[1]}, None, make_data(5))
    d_lr, d_decay = torch.autograd.grad(f, (lr, decay))
    return {"W": params[0].detach(), "b": params[1].detach()}, {"lr": d_lr, "decay": d_decay}


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")
@pytest.mark.parametrize("eps_root", [0.0, 1e-6], ids=["eps_root0", "eps_root1e-6"])
def test_torchopt_adam_same_trajectory_and_hypergradient(eps_root):
    """TorchOpt's functional Adam (use_accelerated_op=False) places ε and eps_root as we do
    (m̂/(√(v̂ + eps_root) + ε)). Its eps_root defaults to 0, where it has the sqrt(0) trap
    (torchopt#26): with eps_root = 0 the start point has no zero-gradient row; with eps_root > 0
    it has one and both libraries are finite."""
    lr, decay = torch.tensor(0.05, dtype=DT), torch.tensor(0.1, dtype=DT)
    w_peer, g_peer = torchopt_adam(lr, decay, eps_root)
    res = ours(lr, decay, eps_root)
    assert_tree_close(res.params, w_peer, rtol=0, atol=1e-12)
    assert_tree_close({k: res.grad[k] for k in g_peer}, g_peer, rtol=1e-10, atol=1e-12)


def higher_adam(lr, decay, eps):
    higher = pytest.importorskip("higher")
    model = _Net()
    opt = torch.optim.Adam(model.parameters(), lr=float(lr), betas=PEER_KW["betas"], eps=eps,
                           weight_decay=PEER_KW["weight_decay"])
    lr, decay = lr.clone().requires_grad_(), decay.clone().requires_grad_()
    with higher.innerloop_ctx(model, opt, copy_initial_weights=True,
                              override={"lr": [lr]}) as (fmodel, diffopt):
        batch = make_data(0)
        for _ in range(PEER_K):
            x, y = batch
            loss = ((fmodel(x) - y) ** 2).mean() + 0.5 * decay * (fmodel.W ** 2).sum()
            diffopt.step(loss)
        x, y = make_data(5)
        f = ((fmodel(x) - y) ** 2).mean()
        d_lr, d_decay = torch.autograd.grad(f, (lr, decay))
        w = {"W": fmodel.W.detach(), "b": fmodel.b.detach()}
    return w, {"lr": d_lr, "decay": d_decay}


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
def test_higher_adam_same_trajectory_and_hypergradient():
    """higher's DifferentiableAdam uses the *old* torch.optim ε placement,
    w ← w − lr·√(1−β₂ᵗ)/(1−β₁ᵗ) · m/(√v + ε), i.e. ε/√(1−β₂ᵗ) in today's m̂/(√v̂ + ε) form: no
    constant ε matches it. With ε = 1e-15 ≪ √v̂ (no zero-gradient row) the two conventions agree
    to ~1e-13, so the comparison is of everything else (bias correction, coupled weight decay,
    moments, the lr and loss-hyperparameter hypergradients)."""
    lr, decay = torch.tensor(0.05, dtype=DT), torch.tensor(0.1, dtype=DT)
    w_peer, g_peer = higher_adam(lr, decay, eps=1e-15)
    res = ours(lr, decay, eps=1e-15)
    assert_tree_close(res.params, w_peer, rtol=0, atol=1e-11)
    assert_tree_close({k: res.grad[k] for k in g_peer}, g_peer, rtol=1e-9, atol=1e-11)
    # and the conventions do differ at a visible ε (the reason for the tiny ε above)
    w_big, _ = higher_adam(lr, decay, eps=1e-2)
    res_big = ours(lr, decay, eps=1e-2)
    assert (res_big.params["W"] - w_big["W"]).abs().max() > 1e-6
