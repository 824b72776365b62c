"""bl.module_problem: nn.Module in, nn.Module out, checked in float64 against a hand-written
PyTorch loop (functional_call + torch.autograd, BatchNorm updating its buffers in place)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call

import bilevel as bl

DT = torch.float64


def convnet(seed: int = 0, momentum: float | None = 0.1) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3, momentum=momentum), nn.ReLU(),
        nn.Conv2d(3, 4, 3, stride=2), nn.BatchNorm2d(4, momentum=momentum), nn.Tanh(),
        nn.Flatten(), nn.Linear(4 * 3 * 3, 5), nn.BatchNorm1d(5, momentum=momentum),
    ).to(DT)


def data(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g, dtype=DT), torch.randint(0, 5, (n,), generator=g)


BATCHES = [data(6, 10 + k) for k in range(4)]
VAL = data(7, 99)
CE = nn.functional.cross_entropy


def train_loss(out, y, h):
    return CE(out, y) * torch.exp(h["temp"])


def reg(params, h):
    return sum(torch.exp(h["wd"][i]) * params[k].pow(2).sum()
               for i, k in enumerate(["0.weight", "3.weight", "7.weight"]))


def val_loss(out, y, h):
    return CE(out, y)


HP = {"temp": torch.tensor(0.3, dtype=DT), "wd": torch.tensor([-3.0, -2.0, -4.0], dtype=DT)}


def hand_loop(model, hparams, lr, batches, outer_mode="eval"):
    """The plain PyTorch loop: functional_call on tensors that require grad, create_graph,
    BatchNorm updating (clones of) its running buffers in place in train mode."""
    model = copy.deepcopy(model)
    h = {k: v.clone().requires_grad_() for k, v in hparams.items()}
    w = {k: v.detach().clone() for k, v in model.named_parameters()}
    bufs = {k: v.clone() for k, v in model.named_buffers()}
    model.train()
    for x, y in batches:
        w = {k: v if v.requires_grad else v.requires_grad_() for k, v in w.items()}
        out = functional_call(model, {**w, **bufs}, (x,))
        loss = train_loss(out, y, h) + reg(w, h)
        g = torch.autograd.grad(loss, list(w.values()), create_graph=True)
        w = {k: v - lr * gi for (k, v), gi in zip(w.items(), g)}
    model.train(outer_mode == "train")
    outer_bufs = {k: v.clone() for k, v in bufs.items()}  # the val forward updates nothing
    f = val_loss(functional_call(model, {**w, **outer_bufs}, (VAL[0],)), VAL[1], h)
    grads = torch.autograd.grad(f, list(h.values()))
    return dict(zip(h, grads)), w, bufs, f


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("outer_mode", ["eval", "train"])
def test_unrolled_equals_hand_written_loop(momentum, outer_mode):
    model = convnet(momentum=momentum)
    mp = bl.module_problem(model, train_loss, val_loss, regularizer=reg, outer_mode=outer_mode)
    # one fixed batch for every step (per-step data is tested in test_online)
    batches = [BATCHES[0]] * 3
    ref_g, ref_w, ref_b, ref_f = hand_loop(model, HP, 0.1, batches, outer_mode)
    res = bl.hypergrad(mp.problem, HP, BATCHES[0], VAL,
                       solver=mp.solver(bl.GradientDescent(lr=0.1, steps=3)),
                       estimator=bl.Unrolled(), params0=mp.params0())
    for k in HP:
        torch.testing.assert_close(res.grad[k], ref_g[k], rtol=1e-10, atol=1e-12)
    for k, v in ref_w.items():
        torch.testing.assert_close(res.params["params"][k], v.detach(), rtol=1e-10, atol=1e-12)
    for k, v in ref_b.items():
        torch.testing.assert_close(res.params["buffers"][k], v.to(DT), rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(res.outer_loss, ref_f.detach(), rtol=1e-12, atol=0)
    assert float(res.params["buffers"]["1.num_batches_tracked"]) == 3.0


@pytest.mark.parametrize("estimator", [bl.Checkpointed(segments=2), bl.ForwardMode(),
                                       bl.Truncated(3)])
def test_estimators_agree_on_a_module_problem(estimator):
    model = convnet()
    mp = bl.module_problem(model, train_loss, val_loss, regularizer=reg)
    solver = mp.solver(bl.Momentum(lr=0.05, steps=3, momentum=0.8))
    ref = bl.hypergrad(mp.problem, HP, BATCHES[1], VAL, solver=solver, estimator=bl.Unrolled(),
                       params0=mp.params0())
    res = bl.hypergrad(mp.problem, HP, BATCHES[1], VAL, solver=solver, estimator=estimator,
                       params0=mp.params0())
    for k in HP:
        torch.testing.assert_close(res.grad[k], ref.grad[k], rtol=1e-9, atol=1e-12)


def test_unrolled_matches_finite_differences_train_mode():
    """outer_mode='train' (the default): no buffer enters f, so the hypergradient is the full
    derivative."""
    model = convnet()
    mp = bl.module_problem(model, train_loss, val_loss, regularizer=reg)
    assert mp.outer_mode == "train"
    solver = mp.solver(bl.GradientDescent(lr=0.1, steps=2))
    res = bl.hypergrad(mp.problem, HP, BATCHES[2], VAL, solver=solver, params0=mp.params0())

    def F(h):
        w = bl.solve(mp.problem, h, BATCHES[2], solver=solver, params0=mp.params0())
        return float(mp.problem.outer_loss(w, h, VAL))

    eps = 1e-6
    for i in range(3):
        hp = {**HP, "wd": HP["wd"].clone()}
        hm = {**HP, "wd": HP["wd"].clone()}
        hp["wd"][i] += eps
        hm["wd"][i] -= eps
        fd = (F(hp) - F(hm)) / (2 * eps)
        assert abs(fd - float(res.grad["wd"][i])) <= 1e-7 * max(1.0, abs(fd))


def test_implicit_runs_with_buffers_in_params():
    """Buffers have zero gradient and zero curvature: CG works on the weights alone."""
    model = convnet()
    mp = bl.module_problem(model, train_loss, val_loss, regularizer=reg)
    solver = mp.solver(bl.GradientDescent(lr=0.1, steps=2))
    res = bl.hypergrad(mp.problem, HP, BATCHES[0], VAL, solver=solver,
                       estimator=bl.Implicit(bl.CG(iters=3), stationarity_rtol=None),
                       params0=mp.params0(), check=False)
    assert torch.isfinite(res.grad["wd"]).all()


def test_write_back_and_forward():
    model = convnet()
    mp = bl.module_problem(model, train_loss, val_loss, regularizer=reg)
    solver = mp.solver(bl.GradientDescent(lr=0.1, steps=2))
    w = bl.solve(mp.problem, HP, BATCHES[0], solver=solver, params0=mp.params0())
    target = convnet(seed=5)
    mp.write_back(w, target)
    assert target.get_buffer("1.num_batches_tracked").dtype == torch.long
    assert int(target.get_buffer("1.num_batches_tracked")) == 2
    target.eval()
    torch.testing.assert_close(target(VAL[0]), mp.forward(w, VAL[0]), rtol=1e-13, atol=1e-13)
    # the problem's own module is untouched until written back, and the mode is restored
    assert int(model.get_buffer("1.num_batches_tracked")) == 0 and model.training
    mp.write_back(w)
    assert int(model.get_buffer("1.num_batches_tracked")) == 2


def test_vmap_over_hyperparameters():
    model = convnet()
    mp = bl.module_problem(model, train_loss, val_loss, regularizer=reg)
    solver = mp.solver(bl.GradientDescent(lr=0.1, steps=2))
    temps = torch.tensor([0.1, 0.3], dtype=DT)

    def one(t):
        h = {"temp": t, "wd": HP["wd"]}
        return bl.hypergrad(mp.problem, h, BATCHES[0], VAL, solver=solver,
                            params0=mp.params0()).grad["temp"]

    batched = torch.func.vmap(one)(temps)
    for i, t in enumerate(temps):
        torch.testing.assert_close(batched[i], one(t), rtol=1e-10, atol=1e-12)


def test_refusals():
    with pytest.raises(bl.BilevelError, match="Dropout"):
        bl.module_problem(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5)), val_loss, val_loss)
    with pytest.raises(bl.BilevelError, match="InstanceNorm"):
        bl.module_problem(nn.Sequential(nn.Conv2d(1, 2, 1),
                                        nn.InstanceNorm2d(2, track_running_stats=True)),
                          val_loss, val_loss)
    mp = bl.module_problem(convnet(), train_loss, val_loss)
    with pytest.raises(bl.BilevelError, match="inputs, target"):
        mp.problem.inner_loss(mp.params0(), HP, VAL[0])
    with pytest.raises(bl.BilevelError, match="missing"):
        mp.forward({"params": {}, "buffers": {}}, VAL[0])


def test_convenience_wrappers_equal_the_plain_calls():
    mp = bl.module_problem(convnet(), train_loss, val_loss, regularizer=reg)
    base = bl.GradientDescent(lr=0.1, steps=2)
    a = mp.hypergrad(HP, BATCHES[0], VAL, solver=base)
    b = bl.hypergrad(mp.problem, HP, BATCHES[0], VAL, solver=mp.solver(base),
                     params0=mp.params0())
    torch.testing.assert_close(a.grad["wd"], b.grad["wd"], rtol=0, atol=0)
    w = mp.solve(HP, BATCHES[0], solver=base)
    torch.testing.assert_close(w["buffers"]["1.running_mean"],
                               b.params["buffers"]["1.running_mean"])
    other = bl.module_problem(convnet(), train_loss, val_loss)
    with pytest.raises(bl.BilevelError, match="another"):
        mp.hypergrad(HP, BATCHES[0], VAL, solver=other.solver(base))


def test_vmap_over_inner_batches_updates_batched_buffers():
    """vmap over problems with different data: the running statistics come back batched, each
    equal to its own unbatched run (no in-place write to a captured buffer)."""
    model = convnet()
    mp = bl.module_problem(model, train_loss, val_loss, regularizer=reg)
    solver = mp.solver(bl.GradientDescent(lr=0.1, steps=2))
    xs = torch.stack([BATCHES[0][0], BATCHES[1][0]])
    ys = torch.stack([BATCHES[0][1], BATCHES[1][1]])

    def one(x, y):
        res = bl.hypergrad(mp.problem, HP, (x, y), VAL, solver=solver, params0=mp.params0())
        return res.grad["wd"], res.params["buffers"]["4.running_var"]

    g, rv = torch.func.vmap(one)(xs, ys)
    for i in range(2):
        gi, rvi = one(xs[i], ys[i])
        torch.testing.assert_close(g[i], gi, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(rv[i], rvi, rtol=1e-12, atol=1e-13)


def test_plain_solver_with_mp_problem_is_wrapped():
    """bl.hypergrad / bl.solve on mp.problem with a PLAIN solver wrap it as mp.solver(base)
    does: the buffers follow the inner loop (not treated as weights, not decayed by AdamW)."""
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2)).to(DT)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 3, generator=g, dtype=DT) + 2.0, torch.randint(0, 2, (16,), generator=g)
    mp = bl.module_problem(model, lambda o, t, h: CE(o, t) * h["s"].exp(),
                           lambda o, t, h: CE(o, t))
    assert isinstance(mp.problem, bl.ModuleBilevelProblem)
    h = {"s": torch.tensor(0.2, dtype=DT)}
    base = bl.AdamW(0.01, 4, weight_decay=0.5)
    plain = bl.hypergrad(mp.problem, h, (x, y), (x, y), solver=base, params0=mp.params0())
    wrapped = bl.hypergrad(mp.problem, h, (x, y), (x, y), solver=mp.solver(base),
                           params0=mp.params0())
    for a, b in zip(bl.pytree.tree_leaves(plain.params), bl.pytree.tree_leaves(wrapped.params)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(plain.grad["s"], wrapped.grad["s"], rtol=0, atol=0)
    # = torch.optim.AdamW on the model in train mode (BatchNorm updating its buffers in place,
    # the optimiser seeing the parameters only)
    ref = copy.deepcopy(model).train()
    opt = torch.optim.AdamW(ref.parameters(), lr=0.01, weight_decay=0.5)
    for _ in range(4):
        opt.zero_grad()
        (CE(ref(x), y) * h["s"].exp()).backward()
        opt.step()
    # (Adam's m/√v amplifies the reduction-order rounding of other thread counts: 2e-12 seen)
    for k, v in ref.named_parameters():
        torch.testing.assert_close(plain.params["params"][k], v.detach(), rtol=1e-10, atol=1e-11)
    for k, v in ref.named_buffers():
        torch.testing.assert_close(plain.params["buffers"][k], v.to(DT), rtol=1e-10, atol=1e-11)
    assert float(plain.params["buffers"]["1.num_batches_tracked"]) == 4.0
    w = bl.solve(mp.problem, h, (x, y), solver=base, params0=mp.params0())
    torch.testing.assert_close(w["buffers"]["1.running_var"],
                               wrapped.params["buffers"]["1.running_var"], rtol=0, atol=0)
    # the solver state is the weights' state alone, and continues a wrapped run
    res2 = bl.hypergrad(mp.problem, h, (x, y), (x, y), solver=base, params0=plain.params,
                        state0=wrapped.state)
    assert float(res2.params["buffers"]["1.num_batches_tracked"]) == 8.0
    other = bl.module_problem(copy.deepcopy(model), val_loss, val_loss)
    with pytest.raises(bl.BilevelError, match="another"):
        bl.hypergrad(mp.problem, h, (x, y), (x, y), solver=other.solver(base),
                     params0=mp.params0())
    with pytest.raises(bl.BilevelError, match="plain inner solver"):
        bl.solve(mp.problem, h, (x, y), solver="adam", params0=mp.params0())
