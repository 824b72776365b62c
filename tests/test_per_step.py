"""Per-step minibatches (bl.PerStep / bl.Minibatches), warm starts (state0 / res.state) and
bl.accumulate_grad: every estimator against a hand-written autograd loop over the same batches,
float64, tight tolerances."""

from __future__ import annotations

import pytest
import torch
from _problems import DT
from torch.func import vmap

import bilevel as bl

K, LR, MU = 7, 0.1, 0.6


def data(seed: int = 0, n: int = 30, d: int = 3):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, dtype=DT, generator=g)
    y = X @ torch.randn(d, dtype=DT, generator=g) + 0.3 * torch.randn(n, dtype=DT, generator=g)
    Xv = torch.randn(12, d, dtype=DT, generator=g)
    yv = Xv @ torch.randn(d, dtype=DT, generator=g)
    return X, y, (Xv, yv)


def inner(w, h, batch):
    X, y = batch
    return ((X @ w - y) ** 2).mean() + 0.5 * (torch.exp(h["ld"]) * w * w).sum()


def outer(w, h, batch):
    X, y = batch
    return ((X @ w - y) ** 2).mean() + 0.01 * (h["ld"] ** 2).sum()


PROBLEM = bl.BilevelProblem(inner, outer)


def hparams(with_lr: bool = True):
    h = {"ld": torch.tensor([-1.0, 0.5, 0.2], dtype=DT)}
    if with_lr:
        h["lr"] = torch.tensor(LR, dtype=DT)
    return h


def hand_unrolled(h, stream, val, w0, tracked: int = K, mu: float = MU, v0=None):
    """Heavy-ball unrolled by hand; the first K − tracked steps carry no graph."""
    h = {k: x.clone().requires_grad_(True) for k, x in h.items()}
    lr = h.get("lr", LR)
    w, v = w0.clone(), torch.zeros_like(w0) if v0 is None else v0.clone()
    for k in range(K):
        track = k >= K - tracked
        if not track:
            w, v = w.detach().requires_grad_(True), v.detach()
            hh = {n: x.detach() for n, x in h.items()}
            lr_k = hh.get("lr", LR)
        else:
            if k == K - tracked:
                w, v = w.detach().requires_grad_(True), v.detach()
            hh, lr_k = h, lr
        with torch.enable_grad():
            gw = torch.autograd.grad(inner(w, hh, stream.at(k)), w, create_graph=track)[0]
        v = mu * v + gw
        w = w - lr_k * v
        if not track:
            w, v = w.detach(), v.detach()
    f = outer(w, h, val)
    names = list(h)
    grads = torch.autograd.grad(f, [h[n] for n in names], allow_unused=True)
    return {n: torch.zeros_like(h[n]) if g is None else g for n, g in zip(names, grads)}, \
        w.detach(), v.detach()


@pytest.fixture
def setup():
    X, y, val = data()
    stream = bl.Minibatches(X, y, batch_size=8, seed=3)
    return stream, val, torch.zeros(3, dtype=DT)


SOLVER = bl.Momentum(lr="lr", steps=K, momentum=MU)


def close(a, b, tol=1e-12):
    for n in b:
        torch.testing.assert_close(a[n], b[n], rtol=tol, atol=tol)


@pytest.mark.parametrize("estimator", [bl.Unrolled(), bl.Checkpointed(), bl.Checkpointed(3),
                                       bl.Checkpointed(K), bl.ForwardMode()], ids=repr)
def test_exact_estimators_replay_the_batches(setup, estimator, autodiff_mode):
    stream, val, w0 = setup
    res = bl.hypergrad(PROBLEM, hparams(), stream, val, solver=SOLVER, estimator=estimator,
                       params0=w0)
    ref, w_K, v_K = hand_unrolled(hparams(), stream, val, w0)
    close(res.grad, ref)
    torch.testing.assert_close(res.params, w_K, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(res.state, v_K, rtol=1e-13, atol=1e-13)
    # the batches matter: one fixed batch gives another answer
    fixed = bl.hypergrad(PROBLEM, hparams(), stream.at(0), val, solver=SOLVER,
                         estimator=estimator, params0=w0)
    assert (fixed.grad["ld"] - ref["ld"]).norm() > 1e-3 * ref["ld"].norm()


@pytest.mark.parametrize("T", [0, 1, 4])
def test_truncated_replays_its_untracked_prefix(setup, T):
    stream, val, w0 = setup
    h = hparams(with_lr=T > 0)  # Truncated(0) = FirstOrder refuses the solver-only lr
    solver = SOLVER if T > 0 else bl.Momentum(lr=LR, steps=K, momentum=MU)
    res = bl.hypergrad(PROBLEM, h, stream, val, solver=solver, estimator=bl.Truncated(T),
                       params0=w0)
    ref, w_K, _ = hand_unrolled(h, stream, val, w0, tracked=T)
    close(res.grad, ref)
    torch.testing.assert_close(res.params, w_K, rtol=1e-13, atol=1e-13)


def test_first_order_on_per_step_batches(setup):
    stream, val, w0 = setup
    solver = bl.Momentum(lr=LR, steps=K, momentum=MU)
    res = bl.hypergrad(PROBLEM, hparams(False), stream, val, solver=solver,
                       estimator=bl.FirstOrder(), params0=w0)
    ref, w_K, _ = hand_unrolled(hparams(False), stream, val, w0, tracked=0)
    close(res.grad, ref)
    torch.testing.assert_close(res.grad["ld"], 0.02 * hparams(False)["ld"], rtol=1e-14, atol=0)


def hessian(w, h, batch):
    return torch.autograd.functional.hessian(lambda u: inner(u, h, batch), w)


def implicit_by_hand(w_K, h, system, val, solve):
    """ĝ = ∇_λ f − ∂_λ(∇_w g(w_K, λ; b_mixed))ᵀ v with v = solve(∇_w f)."""
    wf = w_K.clone().requires_grad_(True)
    gw_f = torch.autograd.grad(outer(wf, h, val), wf)[0]
    v = solve(gw_f)
    hh = {k: x.clone().requires_grad_(True) for k, x in h.items()}
    gh_f = torch.autograd.grad(outer(w_K, hh, val), hh["ld"])[0]
    wg = w_K.clone().requires_grad_(True)
    gw_g = torch.autograd.grad(inner(wg, hh, system), wg, create_graph=True)[0]
    mixed = torch.autograd.grad(gw_g, hh["ld"], v)[0]
    return gh_f - mixed


@pytest.mark.parametrize("which", ["last", "fixed"])
@pytest.mark.parametrize("cls", [bl.Implicit, bl.HistoryFree])
def test_implicit_system_batch_last_or_fixed(setup, which, cls, autodiff_mode):
    stream, val, w0 = setup
    X, y = stream.tensors
    solver = bl.Momentum(lr=0.3, steps=60, momentum=0.5)
    h = hparams(False)
    system = stream.at(59) if which == "last" else (X, y)
    if cls is bl.Implicit:
        est = bl.Implicit(bl.CG(iters=3, tol=0.0), stationarity_rtol=None,
                          system_batch="last" if which == "last" else (X, y))
    else:
        est = bl.HistoryFree(iters=3, system_batch="last" if which == "last" else (X, y))
    res = bl.hypergrad(PROBLEM, h, stream, val, solver=solver, estimator=est, params0=w0)
    w_K = bl.solve(PROBLEM, h, stream, solver=solver, params0=w0)
    torch.testing.assert_close(res.params, w_K, rtol=1e-14, atol=1e-14)
    H = hessian(w_K, h, system)
    ref = implicit_by_hand(w_K, h, system, val, lambda b: torch.linalg.solve(H, b))
    torch.testing.assert_close(res.grad["ld"], ref, rtol=1e-10, atol=1e-12)


def test_implicit_fresh_batches_per_hessian_vector_product(setup, autodiff_mode):
    stream, val, w0 = setup
    solver = bl.GradientDescent(lr=0.3, steps=40)
    h, n, alpha = hparams(False), 6, 0.2
    res = bl.hypergrad(PROBLEM, h, stream, val, solver=solver, params0=w0,
                       estimator=bl.Implicit(bl.Neumann(n, alpha), system_batch="fresh",
                                             stationarity_rtol=None))
    w_K = res.params

    def neumann_fresh(b):  # product j on batch K + j
        v, p = b, b
        for j in range(n):
            v = v - alpha * hessian(w_K, h, stream.at(40 + j)) @ v
            p = p + v
        return alpha * p

    ref = implicit_by_hand(w_K, h, stream.at(39), val, neumann_fresh)
    torch.testing.assert_close(res.grad["ld"], ref, rtol=1e-12, atol=1e-13)


def test_fresh_needs_a_stream(setup):
    _, val, w0 = setup
    with pytest.raises(bl.BilevelError, match="system_batch='fresh'.*bl.PerStep"):
        bl.hypergrad(PROBLEM, hparams(False), data()[:2], val,
                     solver=bl.GradientDescent(0.3, 5), params0=w0,
                     estimator=bl.Implicit(bl.Neumann(5, 0.1), system_batch="fresh"))
    with pytest.raises(bl.BilevelError, match="system_batch=...\\) got a bl.PerStep"):
        bl.Implicit(system_batch=bl.PerStep(lambda k: k))


ESTIMATORS = [bl.Unrolled(), bl.Truncated(3), bl.Checkpointed(3), bl.ForwardMode()]


@pytest.mark.parametrize("estimator", ESTIMATORS, ids=repr)
def test_vmap_over_problems_with_minibatch_streams(estimator):
    """Each problem has its own data set and stream; vmap equals the loop and the hand loop."""
    sets = [data(seed) for seed in range(3)]
    Xs = torch.stack([s[0] for s in sets])
    ys = torch.stack([s[1] for s in sets])
    _, _, val = sets[0]
    w0 = torch.zeros(3, dtype=DT)

    def one(X, y, ld):
        stream = bl.Minibatches(X, y, batch_size=8, seed=3)
        return bl.hypergrad(PROBLEM, {"ld": ld, "lr": torch.tensor(LR, dtype=DT)}, stream, val,
                            solver=SOLVER, estimator=estimator, params0=w0)

    lds = torch.stack([hparams()["ld"] + 0.1 * i for i in range(3)])
    batched = vmap(one)(Xs, ys, lds)
    bl.check_result(batched)
    for i in range(3):
        h = {"ld": lds[i], "lr": torch.tensor(LR, dtype=DT)}
        ref, w_K, v_K = hand_unrolled(h, bl.Minibatches(Xs[i], ys[i], batch_size=8, seed=3),
                                      val, w0, tracked=getattr(estimator, "steps", K))
        torch.testing.assert_close(batched.grad["ld"][i], ref["ld"], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(batched.grad["lr"][i], ref["lr"], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(batched.state[i], v_K, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("estimator", [bl.Implicit(bl.CG(3), stationarity_rtol=None),
                                       bl.Implicit(bl.Neumann(4, 0.2), system_batch="fresh",
                                                   stationarity_rtol=None)], ids=repr)
def test_vmap_implicit_with_streams(estimator):
    sets = [data(seed) for seed in range(3)]
    Xs, ys = torch.stack([s[0] for s in sets]), torch.stack([s[1] for s in sets])
    val, w0 = sets[0][2], torch.zeros(3, dtype=DT)
    solver = bl.GradientDescent(0.3, 30)

    def one(X, y):
        return bl.hypergrad(PROBLEM, hparams(False), bl.Minibatches(X, y, batch_size=8), val,
                            solver=solver, estimator=estimator, params0=w0)

    batched = vmap(one)(Xs, ys)
    for i in range(3):
        r = one(Xs[i], ys[i])
        torch.testing.assert_close(batched.grad["ld"][i], r.grad["ld"], rtol=1e-12, atol=1e-13)


def test_per_step_outer_batch_is_evaluated_at_step_zero(setup):
    stream, val, w0 = setup
    outer_stream = bl.PerStep(lambda k: val if k == 5 else stream.at(k))
    a = bl.hypergrad(PROBLEM, hparams(), stream, outer_stream.shifted(5), solver=SOLVER,
                     params0=w0)
    b = bl.hypergrad(PROBLEM, hparams(), stream, val, solver=SOLVER, params0=w0)
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)


# ------------------------------------------------------------------ warm starts
def test_warm_start_continues_the_trajectory(setup):
    """(params0, state0, stream.shifted(K)) from the previous call = one 2K-step run."""
    stream, val, w0 = setup
    h = hparams()
    first = bl.hypergrad(PROBLEM, h, stream, val, solver=SOLVER, params0=w0)
    second = bl.hypergrad(PROBLEM, h, stream.shifted(K), val, solver=SOLVER,
                          params0=first.params, state0=first.state)
    long = bl.Momentum(lr=LR, steps=2 * K, momentum=MU)
    w, s = bl.solve(PROBLEM, h, stream, solver=long, params0=w0, return_state=True)
    torch.testing.assert_close(second.params, w, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(second.state, s, rtol=1e-13, atol=1e-13)
    # the hypergradient of the second call: the K steps from (w_K, v_K), state as a constant
    ref, _, _ = hand_unrolled(h, stream.shifted(K), val, first.params, v0=first.state)
    close(second.grad, ref)
    # bl.solve: default return value unchanged, state0 honoured
    w2 = bl.solve(PROBLEM, h, stream.shifted(K), solver=SOLVER, params0=first.params,
                  state0=first.state)
    torch.testing.assert_close(w2, w, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("estimator", [bl.Checkpointed(2), bl.ForwardMode(),
                                       bl.Implicit(bl.CG(3), stationarity_rtol=None),
                                       bl.FirstOrder()], ids=repr)
def test_every_estimator_returns_and_accepts_the_state(setup, estimator):
    stream, val, w0 = setup
    h = hparams(with_lr=not isinstance(estimator, (bl.Implicit, bl.FirstOrder)))
    solver = SOLVER if "lr" in h else bl.Momentum(lr=LR, steps=K, momentum=MU)
    state0 = torch.full((3,), 0.25, dtype=DT)
    res = bl.hypergrad(PROBLEM, h, stream, val, solver=solver, estimator=estimator,
                       params0=w0, state0=state0)
    w, s = bl.solve(PROBLEM, h, stream, solver=solver, params0=w0, state0=state0,
                    return_state=True)
    torch.testing.assert_close(res.params, w, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(res.state, s, rtol=1e-13, atol=1e-13)
    assert not res.state.requires_grad


def test_bad_state0_names_the_leaf(setup):
    stream, val, w0 = setup
    with pytest.raises(bl.BilevelError, match=r"state0 has shape \(2,\), Momentum expects \(3,\)"):
        bl.hypergrad(PROBLEM, hparams(), stream, val, solver=SOLVER, params0=w0,
                     state0=torch.zeros(2, dtype=DT))
    with pytest.raises(bl.BilevelError, match="state0 does not have the structure"):
        bl.hypergrad(PROBLEM, hparams(), stream, val, solver=SOLVER, params0=w0,
                     state0={"v": torch.zeros(3, dtype=DT)})


# ------------------------------------------------------------------ detaching, accumulate_grad
def test_hparams_that_require_grad_give_a_plain_grad(setup):
    stream, val, w0 = setup
    h = {k: x.clone().requires_grad_(True) for k, x in hparams().items()}
    for est in (bl.Unrolled(), bl.Checkpointed(), bl.ForwardMode()):
        res = bl.hypergrad(PROBLEM, h, stream, val, solver=SOLVER, estimator=est, params0=w0)
        for leaf in [*res.grad.values(), res.params, res.outer_loss, res.state]:
            assert leaf.grad_fn is None and not leaf.requires_grad
        close(res.grad, hand_unrolled(hparams(), stream, val, w0)[0])
    assert all(x.grad is None for x in h.values())


def test_accumulate_grad_adds_by_path():
    h = {"a": torch.ones(2, dtype=DT, requires_grad=True),
         "b": torch.nn.Parameter(torch.zeros(3, dtype=DT))}
    bl.accumulate_grad(h, {"b": torch.ones(3, dtype=DT), "a": torch.full((2,), 2.0, dtype=DT)})
    bl.accumulate_grad(h, {"a": torch.ones(2, dtype=DT), "b": torch.ones(3, dtype=DT)})
    torch.testing.assert_close(h["a"].grad, torch.full((2,), 3.0, dtype=DT))
    torch.testing.assert_close(h["b"].grad, torch.full((3,), 2.0, dtype=DT))
    opt = torch.optim.SGD(h.values(), lr=0.5)
    opt.step()
    torch.testing.assert_close(h["a"].detach(), torch.full((2,), -0.5, dtype=DT))


def test_accumulate_grad_errors_name_the_leaf():
    g = {"a": torch.ones(2)}
    with pytest.raises(bl.BilevelError, match=r"missing \[\"grads\['b'\]\"\]"):
        bl.accumulate_grad({"a": torch.ones(2, requires_grad=True),
                            "b": torch.ones(1, requires_grad=True)}, g)
    with pytest.raises(bl.BilevelError, match=r"hparams\['a'\] has requires_grad=False"):
        bl.accumulate_grad({"a": torch.ones(2)}, g)
    leaf = torch.ones(2, requires_grad=True)
    with pytest.raises(bl.BilevelError, match=r"hparams\['a'\] is not a leaf tensor"):
        bl.accumulate_grad({"a": leaf * 2}, g)
    with pytest.raises(bl.BilevelError, match=r"grads\['a'\] has shape \(2,\), hparams\['a'\] "
                                              r"has \(3,\)"):
        bl.accumulate_grad({"a": torch.ones(3, requires_grad=True)}, g)


# ------------------------------------------------------------------ the streams themselves
def test_minibatches_epochs_are_permutations_and_replayable():
    X = torch.arange(10, dtype=DT)[:, None]
    s = bl.Minibatches(X, batch_size=4, seed=5)
    assert len(s) == s.batches_per_epoch == 3
    epoch0 = torch.cat([s.at(k) for k in range(3)])[:, 0]
    assert sorted(epoch0.tolist()) == list(range(10))
    assert s.at(2).shape == (2, 1)  # short last batch
    epoch1 = torch.cat([s.at(k) for k in range(3, 6)])[:, 0]
    assert sorted(epoch1.tolist()) == list(range(10)) and not torch.equal(epoch0, epoch1)
    again = bl.Minibatches(X, batch_size=4, seed=5)
    assert all(torch.equal(again.at(k), s.at(k)) for k in (7, 0, 4))  # any order
    assert all(torch.equal(s.shifted(4).at(k), s.at(4 + k)) for k in range(5))
    assert s.shifted(4).offset == 4 and s.shifted(4).epoch_of(1) == (1, 2)
    dropped = bl.Minibatches(X, batch_size=4, seed=5, drop_last=True)
    assert len(dropped) == 2 and all(dropped.at(k).shape == (4, 1) for k in range(6))
    other = bl.Minibatches(X, batch_size=4, seed=6)
    assert not torch.equal(torch.cat([other.at(k) for k in range(3)])[:, 0], epoch0)
    started = bl.Minibatches(X, batch_size=4, seed=5, offset=3)
    assert torch.equal(started.at(0), s.at(3))


def test_minibatches_bad_input():
    with pytest.raises(bl.BilevelError, match=r"tensors\[1\] has 3 examples"):
        bl.Minibatches(torch.ones(4, 2), torch.ones(3), batch_size=2)
    with pytest.raises(bl.BilevelError, match="batch_size must be a positive int"):
        bl.Minibatches(torch.ones(4), batch_size=0)
    with pytest.raises(bl.BilevelError, match="offset must be a non-negative int"):
        bl.Minibatches(torch.ones(4), batch_size=2, offset=-1)
    with pytest.raises(bl.BilevelError, match="needs a callable"):
        bl.PerStep(3)


class CountingGD(bl.InnerSolver):
    """GD whose state is a Python step counter (as meta's official iMAML solver)."""

    steps = 3

    def init_state(self, params, hparams):
        return 0

    def update(self, grads, params, state, hparams):
        return params - 0.1 * grads, state + 1


def test_python_number_state_comes_back_as_a_tensor(setup):
    stream, val, w0 = setup
    res = bl.hypergrad(PROBLEM, hparams(False), stream, val, solver=CountingGD(), params0=w0)
    assert isinstance(res.state, torch.Tensor) and int(res.state) == 3
    again = bl.hypergrad(PROBLEM, hparams(False), stream.shifted(3), val, solver=CountingGD(),
                         params0=res.params, state0=res.state)
    assert int(again.state) == 6
    batched = vmap(lambda ld: bl.hypergrad(PROBLEM, {"ld": ld}, stream, val, solver=CountingGD(),
                                           params0=w0))(torch.zeros(2, 3, dtype=DT))
    assert batched.state.tolist() == [3, 3]


@pytest.mark.parametrize("estimator", [bl.FirstOrder(), bl.HistoryFree(iters=3)], ids=repr)
def test_vmap_first_order_and_history_free_with_streams(estimator):
    sets = [data(seed) for seed in range(3)]
    Xs, ys = torch.stack([s[0] for s in sets]), torch.stack([s[1] for s in sets])
    val, w0 = sets[0][2], torch.zeros(3, dtype=DT)
    solver = bl.Momentum(lr=LR, steps=K, momentum=MU)

    def one(X, y):
        return bl.hypergrad(PROBLEM, hparams(False), bl.Minibatches(X, y, batch_size=8, seed=3),
                            val, solver=solver, estimator=estimator, params0=w0)

    batched = vmap(one)(Xs, ys)
    for i in range(3):
        stream = bl.Minibatches(Xs[i], ys[i], batch_size=8, seed=3)
        if isinstance(estimator, bl.FirstOrder):
            ref = hand_unrolled(hparams(False), stream, val, w0, tracked=0)[0]["ld"]
        else:
            ref = one(Xs[i], ys[i]).grad["ld"]
        torch.testing.assert_close(batched.grad["ld"][i], ref, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(batched.state[i], hand_unrolled(hparams(False), stream, val,
                                                                   w0)[2], rtol=1e-13, atol=1e-13)
