"""The outer loss's auxiliary output (``BilevelProblem(..., has_aux=True)``, ``res.aux``).

Every estimator returns aux = the aux of f(w_K, λ) (equal to a separate evaluation at
``res.params``), looped and vmapped, with the hypergradient unchanged; the learners take the
query accuracy from it, so ``meta_step`` runs no extra query forward (counted with a hook)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import vmap

import bilevel as bl
import meta

DT = torch.float64
N, D = 12, 4

ESTIMATORS = [bl.Unrolled(), bl.Truncated(2), bl.Checkpointed(), bl.ForwardMode(),
              bl.Implicit(bl.CG(iters=4, tol=0.0), stationarity_rtol=None),
              bl.HistoryFree(iters=4), bl.FirstOrder()]


def data(seed: int = 0, tasks: int | None = None):
    g = torch.Generator().manual_seed(seed)
    shape = () if tasks is None else (tasks,)
    mk = lambda *s: torch.randn(*shape, *s, dtype=DT, generator=g)  # noqa: E731
    return (mk(N, D), mk(N)), (mk(N, D), mk(N))


def inner(w, h, b):
    x, y = b
    return ((x @ w - y) ** 2).mean() + torch.exp(h["decay"]) * ((w - h["shift"]) ** 2).sum()


def outer_terms(w, h, b):
    x, y = b
    pred = x @ w
    loss = ((pred - y) ** 2).mean() + 1e-2 * h["decay"] ** 2 + 1e-2 * h["shift"].sum()
    return loss, {"pred": pred, "sign_acc": ((pred > 0) == (y > 0)).to(DT).mean()}


PLAIN = bl.BilevelProblem(inner, lambda w, h, b: outer_terms(w, h, b)[0])
AUX = bl.BilevelProblem(inner, outer_terms, has_aux=True)


def hp():
    return {"decay": torch.tensor(-1.0, dtype=DT), "shift": torch.linspace(-0.5, 0.5, D,
                                                                           dtype=DT)}


def rel(a, b):
    la, lb = bl.pytree.tree_leaves(a), bl.pytree.tree_leaves(b)
    num = sum(float(((x - y) ** 2).sum()) for x, y in zip(la, lb, strict=True)) ** 0.5
    den = sum(float((y ** 2).sum()) for y in lb) ** 0.5
    return num / max(den, 1e-300)


KW = dict(solver=bl.GradientDescent(0.1, 4), params0=torch.zeros(D, dtype=DT))


@pytest.mark.parametrize("est", ESTIMATORS, ids=repr)
def test_aux_is_the_outer_loss_aux_at_w_K_and_the_hypergradient_is_unchanged(est):
    support, query = data()
    res = bl.hypergrad(AUX, hp(), support, query, estimator=est, **KW)
    ref = bl.hypergrad(PLAIN, hp(), support, query, estimator=est, **KW)
    assert rel(res.grad, ref.grad) < 1e-12
    assert float(abs(res.outer_loss - ref.outer_loss)) < 1e-14
    _, separate = outer_terms(res.params, hp(), query)
    assert set(res.aux) == {"pred", "sign_acc"}
    assert rel(res.aux, separate) < 1e-12
    assert not any(t.requires_grad for t in bl.pytree.tree_leaves(res.aux))
    assert ref.aux == ()


@pytest.mark.parametrize("est", ESTIMATORS, ids=repr)
def test_aux_under_vmap_equals_the_loop(est):
    B = 3
    support, query = data(1, tasks=B)
    batched = vmap(lambda s, q: bl.hypergrad(AUX, hp(), s, q, estimator=est, check=False,
                                             **KW))(support, query)
    plain = vmap(lambda s, q: bl.hypergrad(PLAIN, hp(), s, q, estimator=est, check=False,
                                           **KW))(support, query)
    assert rel(batched.grad, plain.grad) < 1e-12
    assert batched.aux["pred"].shape == (B, N)
    for i in range(B):
        one = bl.hypergrad(AUX, hp(), (support[0][i], support[1][i]),
                           (query[0][i], query[1][i]), estimator=est, **KW)
        assert rel({k: v[i] for k, v in batched.aux.items()}, one.aux) < 1e-12
        assert rel({k: v[i] for k, v in batched.grad.items()}, one.grad) < 1e-12


def test_an_outer_loss_without_the_pair_is_refused():
    bad = bl.BilevelProblem(inner, lambda w, h, b: outer_terms(w, h, b)[0], has_aux=True)
    support, query = data()
    with pytest.raises(bl.BilevelError, match=r"outer_loss must return a pair \(loss, aux\)"):
        bl.hypergrad(bad, hp(), support, query, **KW)


# ---------------------------------------------------------------------------- learners

WAYS, SHOTS, QUERIES, TASKS = 3, 2, 4, 3


class Counted(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(),
                                  nn.Linear(8, WAYS))
        self.calls = 0
        self.register_forward_pre_hook(lambda m, a: setattr(m, "calls", m.calls + 1))

    def forward(self, x):
        return self.body(x)


def task_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(TASKS, WAYS * SHOTS, 5, generator=g, dtype=DT)
    xq = torch.randn(TASKS, WAYS * QUERIES, 5, generator=g, dtype=DT)
    ys = torch.arange(WAYS).repeat_interleave(SHOTS).expand(TASKS, -1)
    yq = torch.arange(WAYS).repeat_interleave(QUERIES).expand(TASKS, -1)
    return meta.TaskBatch((xs, ys), (xq, yq))


LEARNERS = {
    "maml": (meta.MAML, dict(inner_steps=2)),
    "fomaml": (meta.FOMAML, dict(inner_steps=2)),
    "imaml": (meta.IMAML, dict(inner_steps=2, cg_iters=2)),
}


@pytest.mark.parametrize("vectorize", [False, True], ids=["loop", "vmap"])
@pytest.mark.parametrize("name", sorted(LEARNERS))
def test_meta_step_runs_no_extra_query_forward(name, vectorize):
    """Forwards per meta_step: K support steps + 1 query per task (looped; under vmap one
    call serves every task), and the accuracy equals a separate forward's. Before the aux
    output there was one more query forward per task; before the problem cache the
    once-per-problem refusal check of iMAML's fresh proximal closure ran on every task."""
    torch.manual_seed(0)
    cls, kw = LEARNERS[name]
    model = Counted().to(DT)
    learner = cls(model, vectorize=vectorize, **kw)
    batch = task_batch()
    learner.meta_step(batch)  # the first batch is checked (extra forwards, once)
    model.calls = 0
    out = learner.meta_step(batch)
    K = learner.solver(True).steps
    per_task = K + 1
    if name == "imaml":  # + ∇g(w_K) for H·v and the mixed term: one graph on plain autograd,
        per_task += 1 if not vectorize else 2  # two under torch.func (H·v with λ constant)
    expected = per_task * (1 if vectorize else TASKS)
    assert model.calls == expected, (model.calls, expected)
    _, res = learner.meta_gradient(batch, accuracy=False, keep_adapted=True)
    acc = torch.stack([learner._query_metric({n: v[i] for n, v in res.params.items()},
                                             learner.hparams(), batch.task(i).query)
                       for i in range(TASKS)])
    assert abs(out["accuracy"] - float(acc.mean())) < 1e-12
