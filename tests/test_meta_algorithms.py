"""meta learners: .grad == an independent bl.hypergrad / autograd / closed-form computation,
vmap == loop with batch norm, estimator overrides, Sign-/Sharp-MAML conventions, evaluate/adapt.

All float64 and tiny (Conv4 hidden 4, 8x8 inputs, 3 tasks, 3-way 1-shot, 2 queries per class).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import bilevel as bl
import meta

DT = torch.float64
WAYS, SHOTS, QUERIES, TASKS = 3, 1, 2, 3

# Tiny random problems trip bl's advisory warnings (an inner loss that grows over a step on
# noise data, a non-stationary iMAML inner solution, CG breakdown on the singular head Hessian
# of the memory-reduced algorithm); these tests check values, not advice.
pytestmark = [
    pytest.mark.filterwarnings("ignore:the inner loss grew:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:Implicit. the inner solver did not reach:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:CG broke down:RuntimeWarning"),
]


def make_batch(seed: int = 0, tasks: int = TASKS, hw: int = 8) -> meta.TaskBatch:
    g = torch.Generator().manual_seed(seed)
    ys = torch.arange(WAYS).repeat_interleave(SHOTS).repeat(tasks, 1)
    yq = torch.arange(WAYS).repeat_interleave(QUERIES).repeat(tasks, 1)
    xs = torch.randn(tasks, WAYS * SHOTS, 1, hw, hw, dtype=DT, generator=g)
    xq = torch.randn(tasks, WAYS * QUERIES, 1, hw, hw, dtype=DT, generator=g)
    return meta.TaskBatch((xs, ys), (xq, yq))


def make_model(seed: int = 0, hidden: int = 4) -> torch.nn.Module:
    torch.manual_seed(seed)
    return meta.Conv4(1, WAYS, hidden=hidden).to(DT)


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def rel(a: dict, b: dict) -> float:
    assert set(a) == set(b), (sorted(a), sorted(b))
    num = math.sqrt(sum(float(((a[n] - b[n]) ** 2).sum()) for n in b))
    return num / max(math.sqrt(sum(float((b[n] ** 2).sum()) for n in b)), 1e-300)


def meta_grad(learner, batch) -> dict[str, torch.Tensor]:
    learner.model.zero_grad(set_to_none=True)
    learner.meta_step(batch)
    return grads(learner.model)


# ----------------------------------------------------------------- independent references
def ce(model):
    """(adapted params, hparams, (x, y)) -> CE with adapted params overriding hparams."""
    return lambda p, h, b: F.cross_entropy(functional_call(model, {**h, **p}, (b[0],)), b[1])


def direct(model, batch, problem, solver, estimator, hparams=None, params0=None):
    """Mean over tasks of a direct bl.hypergrad per task."""
    hparams = meta.params_of(model) if hparams is None else hparams
    out = None
    for i in range(batch.num_tasks):
        task = batch.task(i)
        g = bl.hypergrad(problem, hparams, task.support, task.query, solver=solver,
                         estimator=estimator, params0=params0).grad
        out = g if out is None else {n: out[n] + g[n] for n in g}
    return {n: v / batch.num_tasks for n, v in out.items()}


def maml_problem(model, inner=None):
    loss = ce(model)
    return bl.BilevelProblem(inner or loss, loss, init=lambda h: dict(h))


def head_init(h):
    return {n: v for n, v in h.items() if n.startswith("head.")}


def reference(name, model, batch, **kw):
    """The meta-gradient each learner must write, built from bilevel primitives directly."""
    loss = ce(model)
    K, lr = kw["inner_steps"], kw["inner_lr"]
    if name in ("maml", "fomaml", "signmaml"):
        solver = bl.SignGD(lr, K) if name == "signmaml" else bl.GradientDescent(lr, K)
        est = bl.Unrolled() if name == "maml" else bl.FirstOrder()
        return direct(model, batch, maml_problem(model), solver, est)
    if name == "anil":
        problem = bl.BilevelProblem(loss, loss, init=head_init)
        return direct(model, batch, problem, bl.GradientDescent(lr, K), bl.Unrolled())
    if name == "imaml":
        problem = maml_problem(model, bl.proximal(loss, kw["reg"]))
        est = bl.Implicit(bl.CG(iters=kw["cg_iters"], tol=0.0))
        return direct(model, batch, problem, bl.GradientDescent(lr, K), est)
    if name == "sharpmaml":
        solver = bl.SAM(bl.GradientDescent(lr, K), kw["rho_inner"], stop_gradient=False)
        theta = meta.params_of(model)
        g = direct(model, batch, maml_problem(model), solver, bl.Unrolled(), theta)
        norm = math.sqrt(sum(float((v * v).sum()) for v in g.values()))
        shifted = {n: theta[n] + kw["rho_outer"] / (norm + 1e-12) * g[n] for n in theta}
        return direct(model, batch, maml_problem(model), solver, bl.Unrolled(), shifted)
    if name == "memoryreduced":
        body, head = meta.split_params(model)
        problem = bl.BilevelProblem(loss, loss)
        return direct(model, batch, problem, bl.GradientDescent(lr, K),
                      bl.HistoryFree(iters=kw["cg_iters"], damping=1.0 / (lr * K)), body, head)
    if name == "reptile":  # closed form θ − mean φ, φ by a hand-written GD loop
        theta = meta.params_of(model)
        phis = []
        for i in range(batch.num_tasks):
            xs, ys = batch.task(i).support
            phi = {n: t.clone().requires_grad_() for n, t in theta.items()}
            for _ in range(K):
                g = torch.autograd.grad(loss(phi, {}, (xs, ys)), list(phi.values()))
                phi = {n: (p - lr * gi).detach().requires_grad_()
                       for (n, p), gi in zip(phi.items(), g)}
            phis.append(phi)
        return {n: theta[n] - sum(p[n] for p in phis).detach() / len(phis) for n in theta}
    raise KeyError(name)


SETTINGS = {
    "maml": dict(inner_lr=0.3, inner_steps=2),
    "fomaml": dict(inner_lr=0.3, inner_steps=2),
    "anil": dict(inner_lr=0.3, inner_steps=3),
    "reptile": dict(inner_lr=0.3, inner_steps=3),
    "imaml": dict(inner_lr=0.1, inner_steps=4, reg=2.0, cg_iters=3),
    "signmaml": dict(inner_lr=0.01, inner_steps=3),
    "sharpmaml": dict(inner_lr=0.3, inner_steps=2, rho_inner=0.05, rho_outer=0.05),
    "memoryreduced": dict(inner_lr=0.3, inner_steps=3, cg_iters=4),
}


def test_registry_names():
    assert list(meta.ALGORITHMS) == ["maml", "fomaml", "anil", "reptile", "imaml", "signmaml",
                                     "sharpmaml", "memoryreduced"]
    model = make_model()
    assert isinstance(meta.make_learner("MAML", model), meta.MAML)
    assert isinstance(meta.make_learner("memory-reduced", model), meta.MemoryReducedMAML)
    with pytest.raises(ValueError, match="unknown algorithm"):
        meta.make_learner("protonet", model)


@pytest.mark.parametrize("name", list(SETTINGS))
def test_grad_equals_direct_computation(name):
    model, batch = make_model(), make_batch()
    kw = SETTINGS[name]
    learner = meta.make_learner(name, model, vectorize=False, **kw)
    got = meta_grad(learner, batch)
    want = reference(name, model, batch, **kw)
    assert rel(got, want) < 1e-9
    if name == "memoryreduced":  # only the backbone is meta-learned
        assert all(model.get_parameter(n).grad is None for n in ("head.weight", "head.bias"))


def test_maml_equals_double_backward_loop():
    model, batch = make_model(), make_batch()
    lr, K = 0.3, 3
    got = meta_grad(meta.MAML(model, inner_lr=lr, inner_steps=K, vectorize=False), batch)
    theta = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    total = {n: torch.zeros_like(t) for n, t in theta.items()}
    losses = []
    for i in range(batch.num_tasks):
        (xs, ys), (xq, yq) = batch.task(i).support, batch.task(i).query
        phi = dict(theta)
        for _ in range(K):
            inner = F.cross_entropy(functional_call(model, phi, (xs,)), ys)
            g = torch.autograd.grad(inner, list(phi.values()), create_graph=True)
            phi = {n: p - lr * gi for (n, p), gi in zip(phi.items(), g)}
        outer = F.cross_entropy(functional_call(model, phi, (xq,)), yq)
        losses.append(float(outer.detach()))
        for n, gi in zip(theta, torch.autograd.grad(outer, list(theta.values()))):
            total[n] += gi / batch.num_tasks
    assert rel(got, total) < 1e-9
    out = meta.MAML(model, inner_lr=lr, inner_steps=K, vectorize=False).meta_step(batch)
    assert out["loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-12)
    assert 0 <= out["accuracy"] <= 1


def _linear_tasks(d=4, tasks=3, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs, xq = torch.randn(tasks, n, d, dtype=DT, generator=g), torch.randn(tasks, n, d,
                                                                          dtype=DT, generator=g)
    ts, tq = torch.randn(tasks, n, dtype=DT, generator=g), torch.randn(tasks, n, dtype=DT,
                                                                       generator=g)
    return meta.TaskBatch((xs, ts), (xq, tq))


def _quadratic(x, t):
    """mse(Xw, t) = ½wᵀAw − bᵀw + c with A = 2XᵀX/n, b = 2Xᵀt/n."""
    n = x.shape[0]
    return 2 * x.T @ x / n, 2 * x.T @ t / n


@pytest.mark.parametrize("K", [1, 3])
def test_maml_linear_closed_form(K):
    """§9.1: φ_K = (I − αA)φ_{K-1} + αb; ∇F = Π(I − αA) ∇L^q(φ_K), averaged over tasks."""
    d, lr = 4, 0.1
    torch.manual_seed(0)
    model = torch.nn.Linear(d, 1, bias=False).to(DT)
    batch = _linear_tasks(d)
    got = meta_grad(meta.MAML(model, inner_lr=lr, inner_steps=K, loss="mse",
                              vectorize=False), batch)["weight"]
    theta = model.weight.detach()[0]
    want = torch.zeros(d, dtype=DT)
    for i in range(batch.num_tasks):
        A, b = _quadratic(*batch.task(i).support)
        Aq, bq = _quadratic(*batch.task(i).query)
        P = torch.eye(d, dtype=DT) - lr * A
        phi = theta
        for _ in range(K):
            phi = P @ phi + lr * b
        want += torch.linalg.matrix_power(P, K) @ (Aq @ phi - bq) / batch.num_tasks
    torch.testing.assert_close(got[0], want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("official", [False, True])
def test_imaml_linear_closed_form(official):
    """§9.3: exact (I + A/λ)⁻¹∇L^q(φ*); imaml_dev ((1+c)I + A/(λ+10))⁻¹∇L^q(φ_dev)."""
    d, lr, lam, c = 4, 0.2, 2.0, 1.0
    torch.manual_seed(0)
    model = torch.nn.Linear(d, 1, bias=False).to(DT)
    batch = _linear_tasks(d)
    steps = 120 if not official else 5
    learner = meta.IMAML(model, inner_lr=lr, inner_steps=steps, reg=lam, cg_iters=d,
                         official=official, cg_damping=c, loss="mse", vectorize=False)
    got = meta_grad(learner, batch)["weight"][0]
    theta, eye = model.weight.detach()[0], torch.eye(d, dtype=DT)
    want = torch.zeros(d, dtype=DT)
    for i in range(batch.num_tasks):
        A, b = _quadratic(*batch.task(i).support)
        Aq, bq = _quadratic(*batch.task(i).query)
        if official:
            phi = theta
            for _ in range(steps):
                phi = phi - lr * (A @ phi - b)
            phi = phi - lr * lam * (phi - theta)
            M = (1 + c) * eye + A / (lam + 10)
        else:
            phi = torch.linalg.solve(A + lam * eye, b + lam * theta)
            M = eye + A / lam
        want += torch.linalg.solve(M, Aq @ phi - bq) / batch.num_tasks
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_imaml_official_equals_hand_cg():
    """The imaml_dev recipe written out with autograd: SGD, pull-back, CG on (1+c)I + H/(λ+10)."""
    model, batch = make_model(), make_batch()
    lr, K, lam, c, iters = 0.1, 3, 2.0, 1.0, 4
    learner = meta.IMAML(model, inner_lr=lr, inner_steps=K, reg=lam, cg_iters=iters,
                         official=True, cg_damping=c, vectorize=False)
    got = meta_grad(learner, batch)
    loss = ce(model)
    theta = meta.params_of(model)
    want = {n: torch.zeros_like(t) for n, t in theta.items()}
    for i in range(batch.num_tasks):
        task = batch.task(i)
        phi = {n: t.clone().requires_grad_() for n, t in theta.items()}
        for _ in range(K):
            g = torch.autograd.grad(loss(phi, {}, task.support), list(phi.values()))
            phi = {n: (p - lr * gi).detach().requires_grad_() for (n, p), gi in zip(phi.items(), g)}
        phi = {n: (p - lr * lam * (p - theta[n])).detach().requires_grad_() for n, p in phi.items()}
        gs = torch.autograd.grad(loss(phi, {}, task.support), list(phi.values()), create_graph=True)
        bq = torch.autograd.grad(loss(phi, {}, task.query), list(phi.values()))

        def matvec(v, gs=gs, phi=phi):
            hv = torch.autograd.grad(gs, list(phi.values()), v, retain_graph=True)
            return [(1 + c) * vi + hvi / (lam + 10) for vi, hvi in zip(v, hv)]

        x = [torch.zeros_like(t) for t in bq]
        r = [t.clone() for t in bq]
        p = [t.clone() for t in bq]
        rs = sum(float((t * t).sum()) for t in r)
        for _ in range(iters):
            Ap = matvec(p)
            alpha = rs / sum(float((a * b).sum()) for a, b in zip(p, Ap))
            x = [xi + alpha * pi for xi, pi in zip(x, p)]
            r = [ri - alpha * api for ri, api in zip(r, Ap)]
            rs_new = sum(float((t * t).sum()) for t in r)
            p = [ri + rs_new / rs * pi for ri, pi in zip(r, p)]
            rs = rs_new
        for n, xi in zip(phi, x):
            want[n] += xi / batch.num_tasks
    assert rel(got, want) < 1e-9
    vmapped = meta.IMAML(make_model(), inner_lr=lr, inner_steps=K, reg=lam, cg_iters=iters,
                         official=True, cg_damping=c, vectorize=True)
    assert rel(meta_grad(vmapped, batch), want) < 1e-9


@pytest.mark.parametrize("name", ["maml", "anil", "imaml", "memoryreduced", "fomaml", "reptile",
                                  "signmaml", "sharpmaml"])
def test_vmap_equals_loop_with_batch_norm(name):
    """Conv4 WITH batch norm, K >= 2, second order where the algorithm is: vmap == loop."""
    batch = make_batch(1)
    kw = dict(SETTINGS[name])
    kw["inner_steps"] = max(kw["inner_steps"], 2)
    looped = meta_grad(meta.make_learner(name, make_model(1, hidden=6), vectorize=False, **kw),
                       batch)
    model = make_model(1, hidden=6)
    learner = meta.make_learner(name, model, vectorize=True, **kw)
    vmapped = meta_grad(learner, batch)
    assert rel(vmapped, looped) < 1e-9
    acc, ci = learner.evaluate(iter([batch]), num_tasks=TASKS)
    acc_loop, ci_loop = meta.make_learner(name, model, vectorize=False, **kw).evaluate(
        iter([batch]), num_tasks=TASKS)
    assert acc == pytest.approx(acc_loop) and ci == pytest.approx(ci_loop)


def test_estimator_overrides():
    batch = make_batch(2)
    model = make_model(2)
    default = meta_grad(meta.MAML(model, inner_lr=0.3, inner_steps=3, vectorize=False), batch)
    for est in (bl.Checkpointed(), bl.Truncated(3)):
        learner = meta.MAML(model, inner_lr=0.3, inner_steps=3, estimator=est, vectorize=False)
        assert learner.estimator is est
        assert rel(meta_grad(learner, batch), default) < 1e-12
    fo = meta_grad(meta.FOMAML(model, inner_lr=0.3, inner_steps=3, vectorize=False), batch)
    maml_fo = meta_grad(meta.MAML(model, inner_lr=0.3, inner_steps=3, vectorize=False,
                                  estimator=bl.FirstOrder()), batch)
    assert rel(fo, maml_fo) < 1e-14 and rel(fo, default) > 1e-3
    with pytest.raises(ValueError, match="no estimator"):
        meta.Reptile(model, estimator=bl.Unrolled())
    with pytest.raises(ValueError, match="Checkpointed"):
        meta.IMAML(model, official=True, estimator=bl.Checkpointed())
    with pytest.raises(TypeError, match="estimator"):
        meta.MAML(model, estimator="unrolled")


def test_sign_maml_second_order_equals_first_order():
    batch, model = make_batch(3), make_model(3)
    first = meta_grad(meta.SignMAML(model, inner_lr=0.01, inner_steps=3, vectorize=False), batch)
    second = meta_grad(meta.SignMAML(model, inner_lr=0.01, inner_steps=3, vectorize=False,
                                     estimator=bl.Unrolled()), batch)
    assert rel(second, first) < 1e-12


def test_sharp_maml_conventions_and_rho_zero():
    batch, model = make_batch(4), make_model(4)
    kw = dict(inner_lr=0.3, inner_steps=2, vectorize=False)
    maml = meta_grad(meta.MAML(model, **kw), batch)
    zero = meta_grad(meta.SharpMAML(model, rho_inner=0.0, rho_outer=0.0, **kw), batch)
    assert rel(zero, maml) < 1e-12
    diff = meta_grad(meta.SharpMAML(model, rho_inner=0.1, rho_outer=0.0, **kw), batch)
    stop = meta_grad(meta.SharpMAML(model, rho_inner=0.1, rho_outer=0.0,
                                    differentiable_perturbation=False, **kw), batch)
    assert rel(diff, stop) > 1e-6 and rel(diff, maml) > 1e-6
    # the stop-gradient convention equals bl.SAM(stop_gradient=True) unrolled, by construction
    solver = bl.SAM(bl.GradientDescent(0.3, 2), 0.1, stop_gradient=True)
    assert rel(stop, direct(model, batch, maml_problem(model), solver, bl.Unrolled())) < 1e-9
    up = meta_grad(meta.SharpMAML(model, rho_inner=0.0, rho_outer=0.1, **kw), batch)
    assert rel(up, maml) > 1e-6


def test_meta_step_accumulates_like_backward():
    batch, model = make_batch(5), make_model(5)
    learner = meta.MAML(model, inner_lr=0.3, inner_steps=1, vectorize=False)
    once = meta_grad(learner, batch)
    learner.meta_step(batch)  # on top of the existing .grad
    twice = grads(model)
    assert rel(twice, {n: 2 * g for n, g in once.items()}) < 1e-14


@pytest.mark.parametrize("name", list(SETTINGS))
def test_evaluate_and_adapt(name):
    model = make_model(6)
    learner = meta.make_learner(name, model, **SETTINGS[name])
    batches = iter([make_batch(7, tasks=2), make_batch(8, tasks=2), make_batch(9, tasks=2)])
    acc, ci = learner.evaluate(batches, num_tasks=5)
    assert 0.0 <= acc <= 1.0 and ci >= 0.0
    adapted = learner.adapt(make_batch(7).task(0).support)
    assert list(adapted) == [n for n, _ in model.named_parameters()]
    assert all(not t.requires_grad for t in adapted.values())
    logits = functional_call(model, adapted, (make_batch(7).task(0).query[0],))
    assert logits.shape == (WAYS * QUERIES, WAYS)


def test_evaluate_refuses_a_diverged_adaptation():
    model = make_model(6)
    learner = meta.MAML(model, inner_lr=0.1, inner_steps=1, eval_inner_lr=1e30,
                        eval_inner_steps=5, vectorize=False)
    with pytest.raises(FloatingPointError, match="NaN/inf"):
        learner.evaluate(iter([make_batch(7, tasks=2)]), num_tasks=2)


def test_memory_reduced_adapts_only_the_head_at_test_time():
    model = make_model(10)
    learner = meta.MemoryReducedMAML(model)
    assert (learner.eval_inner_steps, learner.eval_inner_lr) == (20, 0.05)
    adapted = learner.adapt(make_batch(10).task(0).support)
    body, head = meta.split_params(model)
    assert all(torch.equal(adapted[n], body[n]) for n in body)
    assert not torch.equal(adapted["head.weight"], head["head.weight"])


def test_regression_mse_and_float32():
    torch.manual_seed(0)
    model = meta.MLP(hidden=(8, 8))
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 5, 1, generator=g) * 10 - 5
    batch = meta.TaskBatch((x, torch.sin(x)[..., 0]), (x, torch.sin(x)))  # [n] and [n, 1] targets
    learner = meta.MAML(model, inner_lr=0.01, inner_steps=2, loss="mse")
    out = learner.meta_step(batch)
    assert math.isnan(out["accuracy"]) and out["loss"] > 0
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())
    mse, ci = learner.evaluate(iter([batch]), num_tasks=2)
    assert mse > 0 and ci >= 0


def test_vmapped_nonfinite_is_reported():
    model, batch = make_model(11), make_batch(11)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(FloatingPointError):
            meta.MAML(model, inner_lr=1e200, inner_steps=2, vectorize=True).meta_step(batch)


@pytest.mark.parametrize("name", ["anil", "memoryreduced"])
@pytest.mark.parametrize("vectorize", [False, True])
def test_head_only_feature_cache_equals_per_step_backbone(name, vectorize):
    """Backbone once per task (features as hyperparameters, one VJP) == the backbone inside
    every head step; meta-test adaptation too."""
    batch, kw = make_batch(11), SETTINGS[name]
    cached = meta.make_learner(name, make_model(3), vectorize=vectorize, **kw)
    plain = meta.make_learner(name, make_model(3), vectorize=vectorize, cache_features=False,
                              **kw)
    assert cached.cache_features and not plain.cache_features
    assert rel(meta_grad(cached, batch), meta_grad(plain, batch)) < 1e-10
    support = batch.task(0).support
    assert rel(cached.adapt(support), plain.adapt(support)) < 1e-10


def test_head_only_feature_cache_refuses_a_model_it_would_get_wrong():
    class Skip(torch.nn.Module):  # forward is not head(features(x))
        def __init__(self):
            super().__init__()
            self.features = torch.nn.Linear(4, 4)
            self.head = torch.nn.Linear(4, WAYS)

        def forward(self, x):
            return self.head(self.features(x) + x)

    model = Skip().to(DT)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, WAYS, 4, dtype=DT, generator=g)
    y = torch.arange(WAYS).repeat(2, 1)
    batch = meta.TaskBatch((x, y), (x, y))
    with pytest.raises(ValueError, match="cache_features=False"):
        meta.ANIL(model, backbone="features", vectorize=False).meta_step(batch)
    # the default features are what the model feeds its head: right for this model too
    cached = meta.ANIL(model, vectorize=False)
    plain = meta.ANIL(model, vectorize=False, cache_features=False)
    assert rel(meta_grad(cached, batch), meta_grad(plain, batch)) < 1e-10
    with pytest.raises(ValueError, match="has no submodule 'body'"):
        meta.ANIL(model, backbone="body")
