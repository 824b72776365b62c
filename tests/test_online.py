"""bl.Online: warm-started online tuning, checked in float64 against a hand-written loop."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

import bilevel as bl

DT = torch.float64
g = torch.Generator().manual_seed(0)
X = torch.randn(24, 5, generator=g, dtype=DT)
Y = X @ torch.randn(5, generator=g, dtype=DT) + 0.3 * torch.randn(24, generator=g, dtype=DT)
XV = torch.randn(9, 5, generator=g, dtype=DT)
YV = XV @ torch.randn(5, generator=g, dtype=DT)
PERMS = [torch.randperm(24, generator=torch.Generator().manual_seed(e)) for e in range(20)]


def my_batches(t: int):
    """Batch t of a hand-rolled shuffled stream: 4 batches of 6 per epoch."""
    idx = PERMS[t // 4][(t % 4) * 6:(t % 4 + 1) * 6]
    return X[idx], Y[idx]


def inner(w, h, batch):
    x, y = batch
    return ((x @ w["w"] + w["b"] - y) ** 2).mean() + 0.5 * (h["log_wd"].exp() * w["w"] ** 2).sum()


def outer(w, h, batch):
    x, y = batch
    return ((x @ w["w"] + w["b"] - y) ** 2).mean()


PROBLEM = bl.BilevelProblem(inner, outer)
W0 = {"w": torch.zeros(5, dtype=DT), "b": torch.tensor(0.1, dtype=DT)}


def fresh_hparams(lr: bool = True):
    h = {"log_wd": torch.full((5,), -1.0, dtype=DT, requires_grad=True)}
    if lr:  # a solver-only hyperparameter: Unrolled/Truncated/ForwardMode only
        h["log_lr"] = torch.tensor(math.log(0.05), dtype=DT, requires_grad=True)
    return h


def solver(K, lr: bool = True):
    return bl.Adam(lr=(lambda h: h["log_lr"].exp()) if lr else 0.05, steps=K, betas=(0.8, 0.9))


def hand_adam_run(w, m, v, t, h, batches, b1=0.8, b2=0.9, eps=1e-8):
    """Differentiable Adam written out by hand (torch.optim's update rule)."""
    for batch in batches:
        loss = inner(w, h, batch)
        grads = torch.autograd.grad(loss, list(w.values()), create_graph=True)
        t = t + 1
        lr = h["log_lr"].exp()
        nw, nm, nv = {}, {}, {}
        for (k, p), gk in zip(w.items(), grads):
            nm[k] = b1 * m[k] + (1 - b1) * gk
            nv[k] = b2 * v[k] + (1 - b2) * gk * gk
            denom = nv[k].sqrt() / math.sqrt(1 - b2 ** t) + eps
            nw[k] = p - lr / (1 - b1 ** t) * nm[k] / denom
        w, m, v = nw, nm, nv
    return w, m, v, t


def hand_online(n, K, stream_at, outer_at, tracked=None):
    """n hyper-steps; each: K Adam steps from the detached (w, m, v, t), grad, outer Adam
    (``tracked`` = T: the first K − T of the K steps run with constant hyperparameters)."""
    T = K if tracked is None else tracked
    h = fresh_hparams()
    hopt = torch.optim.Adam(h.values(), lr=0.1)
    w = {k: v.clone() for k, v in W0.items()}
    m = {k: torch.zeros_like(v) for k, v in W0.items()}
    v = {k: torch.zeros_like(x) for k, x in W0.items()}
    t = 0
    for it in range(n):
        w = {k: x.detach().requires_grad_() for k, x in w.items()}
        m = {k: x.detach() for k, x in m.items()}
        v = {k: x.detach() for k, x in v.items()}
        batches = [stream_at(it * K + k) for k in range(K)]
        if T < K:  # untracked prefix: hyperparameters as constants, then cut the graph
            const = {k: x.detach() for k, x in h.items()}
            w, m, v, t = hand_adam_run(w, m, v, t, const, batches[:K - T])
            w = {k: x.detach().requires_grad_() for k, x in w.items()}
            m = {k: x.detach() for k, x in m.items()}
            v = {k: x.detach() for k, x in v.items()}
        w, m, v, t = hand_adam_run(w, m, v, t, h, batches[K - T:])
        hopt.zero_grad()
        f = outer(w, h, outer_at(it))
        f.backward()
        hopt.step()
    return h, {k: x.detach() for k, x in w.items()}, m, v, t


def run_tuner(n, K, inner_batch, outer_batch, estimator=None, tuner=None, h=None, hopt=None,
              lr=True):
    h = fresh_hparams(lr) if h is None else h
    hopt = torch.optim.Adam(h.values(), lr=0.1) if hopt is None else hopt
    tuner = tuner or bl.Online(PROBLEM, h, W0, solver=solver(K, lr), estimator=estimator)
    for _ in range(n):
        hopt.zero_grad()
        res = tuner.step(inner_batch, outer_batch)
        hopt.step()
    return tuner, h, hopt, res


def assert_tree_close(a, b, rtol=1e-10, atol=1e-12):
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol)


@pytest.mark.parametrize("stream", ["perstep", "minibatches"])
@pytest.mark.parametrize("estimator", [bl.Unrolled(), bl.Checkpointed(segments=2),
                                       bl.ForwardMode(), bl.Truncated(2)])
def test_online_equals_hand_written_warm_started_loop(stream, estimator):
    n, K = 5, 3  # 15 inner steps: across epoch boundaries of the stream
    if stream == "perstep":
        inner_batch, at = bl.PerStep(my_batches), my_batches
    else:
        inner_batch = bl.Minibatches(X, Y, batch_size=5, seed=3)  # 5 batches/epoch, last of 4
        at = inner_batch.at
    outer_batch = bl.PerStep(lambda t: (XV[t % 3::3], YV[t % 3::3]))  # one per hyper-step
    tracked = estimator.steps if isinstance(estimator, bl.Truncated) else None
    ref_h, ref_w, ref_m, ref_v, ref_t = hand_online(n, K, at, outer_batch.at, tracked)
    tuner, h, _, res = run_tuner(n, K, inner_batch, outer_batch, estimator)
    assert_tree_close(h, ref_h)
    assert_tree_close(tuner.params, ref_w)
    assert_tree_close(tuner.state["exp_avg"], ref_m)
    assert_tree_close(tuner.state["exp_avg_sq"], ref_v)
    assert float(tuner.state["step"]) == ref_t == n * K
    assert tuner.inner_steps == n * K and tuner.hyper_steps == n
    assert int(res.info["online_step"]) == n - 1 and int(res.info["stream_offset"]) == (n - 1) * K


def test_grad_is_added_not_assigned():
    h = fresh_hparams()
    h["log_wd"].grad = torch.full((5,), 7.0, dtype=DT)
    tuner = bl.Online(PROBLEM, h, W0, solver=solver(2))
    res = tuner.step(bl.PerStep(my_batches), (XV, YV))
    torch.testing.assert_close(h["log_wd"].grad, res.grad["log_wd"] + 7.0, rtol=0, atol=1e-15)
    assert h["log_lr"].grad is not None
    assert not h["log_wd"].grad.requires_grad


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # short, unconverged inner solves
@pytest.mark.parametrize("estimator", [bl.Truncated(2), bl.Implicit(bl.CG(iters=4)),
                                       bl.HistoryFree(iters=3, warm_start=False)])
def test_resumed_tuner_equals_uninterrupted(estimator):
    lr = not isinstance(estimator, bl.Implicit)  # the implicit ones refuse a solver-only lr
    stream = bl.Minibatches(X, Y, batch_size=5, seed=1)
    full, h_full, _, _ = run_tuner(6, 3, stream, (XV, YV), estimator, lr=lr)
    first, h1, hopt1, _ = run_tuner(3, 3, stream, (XV, YV), estimator, lr=lr)
    buf = io.BytesIO()
    torch.save({"tuner": first.state_dict(), "hopt": hopt1.state_dict(),
                "h": {k: v.detach() for k, v in h1.items()}}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    h2 = {k: v.clone().requires_grad_() for k, v in saved["h"].items()}
    hopt2 = torch.optim.Adam(h2.values(), lr=0.1)
    hopt2.load_state_dict(saved["hopt"])
    resumed = bl.Online(PROBLEM, h2, W0, solver=solver(3, lr), estimator=estimator)
    resumed.load_state_dict(saved["tuner"])
    if isinstance(estimator, bl.Implicit):
        assert saved["tuner"]["linsolve_x"] is not None
    run_tuner(3, 3, stream, (XV, YV), tuner=resumed, h=h2, hopt=hopt2)
    assert_tree_close(h2, h_full, rtol=0, atol=0)
    assert_tree_close(resumed.params, full.params, rtol=0, atol=0)
    assert_tree_close(resumed.state["exp_avg"], full.state["exp_avg"], rtol=0, atol=0)
    assert float(full.state["step"]) == float(resumed.state["step"]) == 18  # state carried


def test_implicit_linear_system_is_warm_started():
    user_est = bl.Implicit(bl.CG(iters=200, tol=1e-12), stationarity_rtol=None)
    h = fresh_hparams(lr=False)
    lm = bl.GradientDescent(lr=0.3, steps=200)  # full batch, converged inner solves
    tuner = bl.Online(PROBLEM, h, W0, solver=lm, estimator=user_est)
    assert user_est.linsolve.warm_start is False  # the user's object is left alone
    res1 = tuner.step((X, Y), (XV, YV))
    assert tuner.state_dict()["linsolve_x"] is not None
    w_before, s_before = tuner.params, tuner.state
    res2 = tuner.step((X, Y), (XV, YV))
    cold = bl.hypergrad(PROBLEM, {k: v.detach() for k, v in h.items()}, (X, Y), (XV, YV),
                        solver=lm, estimator=bl.Implicit(bl.CG(iters=200, tol=1e-12),
                                                         stationarity_rtol=None),
                        params0=w_before, state0=s_before)
    torch.testing.assert_close(res2.grad["log_wd"], cold.grad["log_wd"], rtol=1e-9, atol=1e-12)
    # warm start: the second system starts next to its solution
    assert int(res2.info["linsolve_iterations"]) < int(cold.info["linsolve_iterations"])
    assert int(res1.info["linsolve_iterations"]) >= int(res2.info["linsolve_iterations"])


def convnet():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(),
                         nn.Linear(2 * 4 * 4, 3)).to(DT)


def test_online_module_problem_with_batchnorm_equals_hand_loop():
    """A convnet with BatchNorm2d, per-step minibatches, warm-started: bl.Online vs the plain
    PyTorch loop (functional_call, create_graph, BN updating clones of its buffers in place)."""
    gen = torch.Generator().manual_seed(4)
    xs = torch.randn(20, 1, 6, 6, generator=gen, dtype=DT)
    ys = torch.randint(0, 3, (20,), generator=gen)
    xv, yv = torch.randn(8, 1, 6, 6, generator=gen, dtype=DT), torch.randint(0, 3, (8,),
                                                                              generator=gen)
    ce = nn.functional.cross_entropy
    reg = lambda p, h: 0.5 * h["wd"].exp() * p["4.weight"].pow(2).sum()  # noqa: E731
    stream = bl.Minibatches(xs, ys, batch_size=6, seed=2)
    n, K, lr = 3, 2, 0.2
    model = convnet()
    # hand-written
    h_ref = {"wd": torch.tensor(-2.0, dtype=DT, requires_grad=True)}
    hopt = torch.optim.SGD(h_ref.values(), lr=0.5)
    w = {k: v.detach().clone() for k, v in model.named_parameters()}
    bufs = {k: v.clone() for k, v in model.named_buffers()}
    for it in range(n):
        w = {k: v.detach().requires_grad_() for k, v in w.items()}
        model.train()
        for k in range(K):
            x, y = stream.at(it * K + k)
            loss = ce(functional_call(model, {**w, **bufs}, (x,)), y) + reg(w, h_ref)
            grads = torch.autograd.grad(loss, list(w.values()), create_graph=True)
            w = {name: p - lr * gk for (name, p), gk in zip(w.items(), grads)}
        model.eval()
        f = ce(functional_call(model, {**w, **bufs}, (xv,)), yv)
        hopt.zero_grad()
        f.backward()
        hopt.step()
    # bl.Online on the module problem
    model = convnet()
    mp = bl.module_problem(model, lambda o, y, h: ce(o, y), lambda o, y, h: ce(o, y),
                           regularizer=reg, outer_mode="eval")  # the hand loop's model.eval()
    h = {"wd": torch.tensor(-2.0, dtype=DT, requires_grad=True)}
    hopt = torch.optim.SGD(h.values(), lr=0.5)
    tuner = bl.Online(mp, h, solver=bl.GradientDescent(lr=lr, steps=K))
    for _ in range(n):
        hopt.zero_grad()
        tuner.step(stream, (xv, yv))
        hopt.step()
    torch.testing.assert_close(h["wd"], h_ref["wd"], rtol=1e-10, atol=1e-12)
    assert_tree_close(tuner.params["params"], {k: v.detach() for k, v in w.items()})
    assert_tree_close(tuner.params["buffers"], {k: v.to(DT) for k, v in bufs.items()})
    tuner.write_back()
    assert int(model.get_buffer("1.num_batches_tracked")) == n * K


def test_refusals():
    h = fresh_hparams()
    with pytest.raises(bl.BilevelError, match="requires_grad"):
        bl.Online(PROBLEM, {"log_wd": h["log_wd"].detach(), "log_lr": h["log_lr"]}, W0,
                  solver=solver(2))
    with pytest.raises(bl.BilevelError, match="not as the result"):
        bl.Online(PROBLEM, {"log_wd": h["log_wd"] * 2, "log_lr": h["log_lr"]}, W0,
                  solver=solver(2))
    with pytest.raises(bl.BilevelError, match="init"):
        bl.Online(bl.BilevelProblem(inner, outer, init=lambda hp: W0), h, None, solver=solver(2))
    with pytest.raises(bl.BilevelError, match="params0"):
        bl.Online(PROBLEM, h, None, solver=solver(2))
    tuner = bl.Online(PROBLEM, h, W0, solver=solver(2))
    sd = tuner.state_dict()
    with pytest.raises(bl.BilevelError, match="leaves"):
        tuner.load_state_dict({**sd, "params": {"w": W0["w"]}})
    with pytest.raises(bl.BilevelError, match="state_dict"):
        tuner.load_state_dict({"params": W0})


def test_module_online_refuses_a_solver_only_lr_under_implicit():
    ce = nn.functional.cross_entropy
    mp = bl.module_problem(convnet(), lambda o, y, h: ce(o, y), lambda o, y, h: ce(o, y),
                           regularizer=lambda p, h: h["wd"].exp() * p["4.weight"].pow(2).sum())
    h = {"wd": torch.tensor(-2.0, dtype=DT, requires_grad=True),
         "lr": torch.tensor(-3.0, dtype=DT, requires_grad=True)}
    tuner = bl.Online(mp, h, solver=bl.Adam(lr=lambda hp: hp["lr"].exp(), steps=2),
                      estimator=bl.Implicit())
    x = torch.randn(6, 1, 6, 6, dtype=DT)
    y = torch.randint(0, 3, (6,))
    with pytest.raises(bl.BilevelError, match=r"hparams\['lr'\].*Unrolled"):
        tuner.step((x, y), (x, y))
    assert tuner.hyper_steps == 0 and h["wd"].grad is None  # nothing half-done
