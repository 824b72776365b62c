"""meta with the user's own torch modules: BatchNorm1d/2d (running stats on and off), Dropout,
LayerNorm, a frozen submodule and a custom head name, for MAML, FOMAML, ANIL, iMAML and the
memory-reduced learner, looped and vmapped.

- meta-gradient == a hand-written autograd loop in float64 (rel. 1e-10) on a reference copy of
  the model whose batch-norm layers are rebuilt as batch-statistics layers (the policy of
  ``meta.algorithms.base``: transductive batch statistics everywhere);
- the model never changes (``state_dict`` and train/eval mode before == after) in
  ``meta_step``, ``evaluate``, ``adapt`` and ``predict``;
- dropout under vmap: ``randomness="same"`` loop == vmap, ``"different"`` the default;
- head/backbone by argument, deterministic head(features(x)) check;
- the first-batch errors, each on its exact message; estimator refusal (API and CLI).
"""

from __future__ import annotations

import copy
import io
import json
import math
import re
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import bilevel as bl
import meta
from meta.cli import main
from meta.train import TrainConfig, load_checkpoint, train

DT = torch.float64
WAYS, SHOTS, QUERIES, TASKS = 3, 1, 2, 3

pytestmark = [
    pytest.mark.filterwarnings("ignore:the inner loss grew:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:Implicit. the inner solver did not reach:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:HistoryFree. CG met:RuntimeWarning"),
    # iMAML with dropout active: CG can break down at its first step (v = 0), which bl reports
    # as "does not depend on the hyperparameters" (a bilevel message, see the notes)
    pytest.mark.filterwarnings("ignore:Implicit. the inner loss does not depend:RuntimeWarning"),
]


class Net(nn.Module):
    """``body`` (torch modules) then the head ``fc``; ``image`` = 1x5x5 inputs."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        if kind.startswith("bn2d"):
            self.body = nn.Sequential(
                nn.Conv2d(1, 3, 3, padding=1),
                nn.BatchNorm2d(3, track_running_stats=kind == "bn2d-running"), nn.ReLU(),
                nn.AdaptiveAvgPool2d(1), nn.Flatten())
            width = 3
        else:
            width = 5
            layers: list[nn.Module] = [nn.Linear(4, width)]
            if kind.startswith("bn1d"):
                layers.append(nn.BatchNorm1d(width, track_running_stats=kind == "bn1d-running"))
            elif kind == "layernorm-dropout":
                layers += [nn.LayerNorm(width), nn.Dropout(0.3)]
            elif kind == "frozen":
                layers.append(nn.BatchNorm1d(width))
            layers.append(nn.Tanh())
            self.body = nn.Sequential(*layers)
            if kind == "frozen":
                self.body[0].requires_grad_(False)
        self.fc = nn.Linear(width, WAYS)
        if kind.startswith("bn"):  # non-trivial affine parameters and running statistics
            with torch.no_grad():
                for m in self.modules():
                    if isinstance(m, nn.modules.batchnorm._BatchNorm):
                        m.weight.uniform_(0.5, 1.5)
                        m.bias.normal_(0, 0.3)
                        if m.running_mean is not None:
                            m.running_mean.normal_(0, 3)
                            m.running_var.uniform_(5, 9)

    def forward(self, x):
        return self.fc(self.body(x))


KINDS = ["bn1d-running", "bn1d-batch", "bn2d-running", "bn2d-batch", "layernorm-dropout",
         "frozen"]
ALGOS = {
    "maml": (meta.MAML, dict(inner_lr=0.3, inner_steps=2)),
    "fomaml": (meta.FOMAML, dict(inner_lr=0.3, inner_steps=2)),
    "anil": (meta.ANIL, dict(inner_lr=0.3, inner_steps=3, head="fc")),
    "imaml": (meta.IMAML, dict(inner_lr=0.1, inner_steps=4, reg=2.0, cg_iters=3)),
    "memoryreduced": (meta.MemoryReducedMAML, dict(inner_lr=0.3, inner_steps=3, cg_iters=3,
                                                   head="fc")),
}


def make_model(kind: str, seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net(kind).to(DT)


def make_batch(kind: str, seed: int = 0, tasks: int = TASKS) -> meta.TaskBatch:
    g = torch.Generator().manual_seed(seed)
    shape = (1, 5, 5) if kind.startswith("bn2d") else (4,)
    ys = torch.arange(WAYS).repeat_interleave(SHOTS).repeat(tasks, 1)
    yq = torch.arange(WAYS).repeat_interleave(QUERIES).repeat(tasks, 1)
    xs = torch.randn(tasks, WAYS * SHOTS, *shape, dtype=DT, generator=g)
    xq = torch.randn(tasks, WAYS * QUERIES, *shape, dtype=DT, generator=g)
    return meta.TaskBatch((xs, ys), (xq, yq))


def batch_stats_copy(model: nn.Module) -> nn.Module:
    """The reference network: a deep copy whose batch-norm layers keep no running statistics
    (so torch itself normalises with batch statistics, in any mode)."""
    ref = copy.deepcopy(model)
    for m in ref.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.track_running_stats = False
            m.running_mean = m.running_var = m.num_batches_tracked = None
    return ref


def rel(a: dict, b: dict) -> float:
    assert set(a) == set(b), (sorted(a), sorted(b))
    num = math.sqrt(sum(float(((a[n] - b[n]) ** 2).sum()) for n in b))
    return num / max(math.sqrt(sum(float((b[n] ** 2).sum()) for n in b)), 1e-300)


def meta_grad(learner, batch) -> dict[str, torch.Tensor]:
    learner.model.zero_grad(set_to_none=True)
    learner.meta_step(batch)
    return {n: p.grad.clone() for n, p in learner.model.named_parameters()
            if p.grad is not None}


def cg(matvec, b: list, iters: int) -> list:
    """Plain conjugate gradients from 0, exactly ``iters`` steps."""
    x = [torch.zeros_like(t) for t in b]
    r = [t.clone() for t in b]
    p = [t.clone() for t in b]
    rs = sum((t * t).sum() for t in r)
    for _ in range(iters):
        ap = matvec(p)
        alpha = rs / sum((u * v).sum() for u, v in zip(p, ap))
        x = [xi + alpha * pi for xi, pi in zip(x, p)]
        r = [ri - alpha * ai for ri, ai in zip(r, ap)]
        rs_new = sum((t * t).sum() for t in r)
        p = [ri + rs_new / rs * pi for ri, pi in zip(r, p)]
        rs = rs_new
    return x


def reference(name: str, model: nn.Module, batch: meta.TaskBatch, **kw) -> dict:
    """The meta-gradient written out with torch.autograd on the batch-statistics copy."""
    ref = batch_stats_copy(model)
    named = dict(model.named_parameters())
    learned = [n for n, p in named.items() if p.requires_grad]
    frozen = {n: p.detach() for n, p in named.items() if not p.requires_grad}
    head = [n for n in learned if n.startswith("fc.")]
    lr, K = kw["inner_lr"], kw["inner_steps"]

    def loss(params, x, y):
        return F.cross_entropy(functional_call(ref, {**frozen, **params}, (x,)), y)

    def leaf(names):
        return {n: named[n].detach().clone().requires_grad_() for n in names}

    total = {n: torch.zeros_like(named[n]) for n in (learned if name != "memoryreduced"
                                                     else [n for n in learned
                                                           if n not in head])}
    for i in range(batch.num_tasks):
        (xs, ys), (xq, yq) = batch.task(i).support, batch.task(i).query
        if name in ("maml", "anil"):
            theta = leaf(learned)
            adapted = head if name == "anil" else learned
            phi = dict(theta)
            for _ in range(K):
                g = torch.autograd.grad(loss(phi, xs, ys), [phi[n] for n in adapted],
                                        create_graph=True)
                phi.update({n: phi[n] - lr * gi for n, gi in zip(adapted, g)})
            grads = torch.autograd.grad(loss(phi, xq, yq), list(theta.values()))
            names = list(theta)
        elif name == "fomaml":
            phi = leaf(learned)
            for _ in range(K):
                g = torch.autograd.grad(loss(phi, xs, ys), list(phi.values()))
                phi = {n: (p - lr * gi).detach().requires_grad_()
                       for (n, p), gi in zip(phi.items(), g)}
            grads = torch.autograd.grad(loss(phi, xq, yq), list(phi.values()))
            names = list(phi)
        elif name == "imaml":
            reg = kw["reg"]
            theta = {n: named[n].detach() for n in learned}
            phi = leaf(learned)

            def inner(p, theta=theta, xs=xs, ys=ys, reg=reg):
                sq = sum(((p[n] - theta[n]) ** 2).sum() for n in p)
                return loss(p, xs, ys) + 0.5 * reg * sq

            for _ in range(K):
                g = torch.autograd.grad(inner(phi), list(phi.values()))
                phi = {n: (p - lr * gi).detach().requires_grad_()
                       for (n, p), gi in zip(phi.items(), g)}
            gs = torch.autograd.grad(inner(phi), list(phi.values()), create_graph=True)
            bq = torch.autograd.grad(loss(phi, xq, yq), list(phi.values()))

            def hvp(v, gs=gs, phi=phi):
                return list(torch.autograd.grad(gs, list(phi.values()), v, retain_graph=True))

            v = cg(hvp, list(bq), kw["cg_iters"])
            grads = [reg * vi for vi in v]  # -d/dθ ∇_φ g = reg·I
            names = list(phi)
        elif name == "memoryreduced":
            body = leaf([n for n in learned if n not in head])
            y = {n: named[n].detach().clone() for n in head}
            for _ in range(K):
                yy = {n: t.requires_grad_() for n, t in y.items()}
                g = torch.autograd.grad(loss({**body, **yy}, xs, ys), list(yy.values()))
                y = {n: (t - lr * gi).detach() for (n, t), gi in zip(yy.items(), g)}
            y = {n: t.requires_grad_() for n, t in y.items()}
            fq = loss({**body, **y}, xq, yq)
            gx_f = torch.autograd.grad(fq, list(body.values()), retain_graph=True)
            gy_f = torch.autograd.grad(fq, list(y.values()))
            gy_g = torch.autograd.grad(loss({**body, **y}, xs, ys), list(y.values()),
                                       create_graph=True)

            mu = 1.0 / (lr * K)  # MemoryReducedMAML's default damping 1/(inner_lr·T)

            def hvp(v, gy_g=gy_g, y=y, mu=mu):
                hv = torch.autograd.grad(gy_g, list(y.values()), v, retain_graph=True)
                return [h + mu * vi for h, vi in zip(hv, v)]

            v = cg(hvp, list(gy_f), kw["cg_iters"])
            mixed = torch.autograd.grad(gy_g, list(body.values()), v, allow_unused=True)
            grads = [a - (torch.zeros_like(a) if m is None else m)
                     for a, m in zip(gx_f, mixed)]
            names = list(body)
        else:
            raise KeyError(name)
        for n, gi in zip(names, grads):
            total[n] = total[n] + gi.detach() / batch.num_tasks
    return total


def state(model: nn.Module) -> tuple[dict, list]:
    return (copy.deepcopy(model.state_dict()),
            [(n, m.training) for n, m in model.named_modules()])


def assert_unchanged(model: nn.Module, before) -> None:
    sd, modes = before
    now = model.state_dict()
    assert sd.keys() == now.keys()
    for k in sd:
        assert torch.equal(sd[k], now[k]), k
    assert [(n, m.training) for n, m in model.named_modules()] == modes


# ----------------------------------------------------------------------------- meta-gradients


@pytest.mark.parametrize("vectorize", [False, True], ids=["loop", "vmap"])
@pytest.mark.parametrize("algo", list(ALGOS))
@pytest.mark.parametrize("kind", KINDS)
def test_meta_gradient_equals_hand_written_reference(kind, algo, vectorize):
    cls, kw = ALGOS[algo]
    model, batch = make_model(kind), make_batch(kind)
    if kind == "layernorm-dropout":
        model.eval()  # dropout off: a deterministic reference (see test_dropout_*)
    before = state(model)
    learner = cls(model, vectorize=vectorize, **kw)
    got = meta_grad(learner, batch)
    model.zero_grad(set_to_none=True)
    want = reference(algo, model, batch, **{k: v for k, v in kw.items() if k != "head"})
    assert rel(got, want) < 1e-10
    if kind == "frozen":  # frozen parameters: neither adapted nor meta-learned
        assert "body.0.weight" not in got and model.body[0].weight.grad is None
    if algo == "memoryreduced":
        assert not any(n.startswith("fc.") for n in got)
    acc, ci = learner.evaluate(iter([make_batch(kind, 1)]), num_tasks=TASKS)
    assert 0 <= acc <= 1 and ci >= 0
    assert_unchanged(model, before)


@pytest.mark.parametrize("algo", list(ALGOS))
def test_the_model_never_changes(algo):
    """Running-stat BN + dropout in train mode, loop and vmap: meta_step, evaluate, adapt and
    predict write no parameter, buffer or mode; the BN buffers are never read either."""
    cls, kw = ALGOS[algo]
    for kind in ("bn2d-running", "bn1d-running"):
        model, batch = make_model(kind), make_batch(kind)
        model.body.insert(len(model.body) - 1, nn.Dropout(0.2))
        for mode in ("train", "eval"):
            getattr(model, mode)()
            before = state(model)
            for vectorize in (False, True):
                learner = cls(model, vectorize=vectorize, **kw)
                learner.meta_step(batch)
                learner.evaluate(iter([make_batch(kind, 2), make_batch(kind, 3)]), num_tasks=5)
                adapted = learner.adapt(batch.task(0).support)
                assert learner.predict(adapted, batch.task(0).query[0]).shape == (6, WAYS)
            model.zero_grad(set_to_none=True)
            assert_unchanged(model, before)


@pytest.mark.parametrize("kind", ["bn1d-running", "bn2d-running"])
def test_batch_norm_policy_is_batch_statistics_in_any_mode(kind):
    """Running-stat BN == the same layer without running stats, in train() and eval() mode."""
    batch = make_batch(kind)
    model = make_model(kind)
    train_mode = meta_grad(meta.MAML(model.train(), inner_steps=2, vectorize=False), batch)
    eval_mode = meta_grad(meta.MAML(model.eval(), inner_steps=2, vectorize=False), batch)
    plain = make_model(kind.replace("running", "batch"))
    plain.load_state_dict({k: v for k, v in model.state_dict().items()
                           if "running" not in k and "num_batches" not in k})
    no_stats = meta_grad(meta.MAML(plain, inner_steps=2, vectorize=False), batch)
    assert rel(train_mode, eval_mode) < 1e-14 and rel(train_mode, no_stats) < 1e-14
    with pytest.raises(ValueError, match=re.escape(
            "InstanceNorm1d '1' tracks running statistics, which meta learners never update; "
            "build it with track_running_stats=False (instance statistics, the same in train "
            "and eval mode)")):
        meta.MAML(nn.Sequential(nn.Linear(2, 2), nn.InstanceNorm1d(2, track_running_stats=True)))


# ----------------------------------------------------------------------------- randomness


@pytest.mark.parametrize("algo", list(ALGOS))
def test_dropout_under_vmap_same_equals_loop(algo):
    """Dropout active (train mode): randomness="same" replays the RNG per task in the loop,
    so loop == vmap for the same seed; "different" (the default) runs under vmap."""
    cls, kw = ALGOS[algo]
    model, batch = make_model("layernorm-dropout"), make_batch("layernorm-dropout")
    runs = {}
    for randomness in ("same", "different"):
        for vectorize in (False, True):
            learner = cls(model, vectorize=vectorize, randomness=randomness, **kw)
            torch.manual_seed(7)
            runs[randomness, vectorize] = meta_grad(learner, batch)
    assert rel(runs["same", True], runs["same", False]) < 1e-12
    assert all(torch.isfinite(g).all() for g in runs["different", True].values())
    assert rel(runs["different", True], runs["same", True]) > 1e-6  # other masks
    assert cls(model, **kw).randomness == "different"
    with pytest.raises(RuntimeError, match="randomness error mode"):
        meta_grad(cls(model, vectorize=True, randomness="error", **kw), batch)
    with pytest.raises(ValueError, match=re.escape(
            "randomness must be one of 'different', 'same', 'error' (torch.func.vmap's), got "
            "'per-task'")):
        cls(model, randomness="per-task", **kw)


# ----------------------------------------------------------------------------- head / backbone


@pytest.mark.parametrize("algo", ["anil", "memoryreduced"])
@pytest.mark.parametrize("vectorize", [False, True], ids=["loop", "vmap"])
def test_head_and_backbone_by_argument(algo, vectorize):
    cls, kw = ALGOS[algo]
    kind = "bn2d-running"
    batch = make_batch(kind)
    want = meta_grad(cls(make_model(kind), vectorize=vectorize, cache_features=False, **kw),
                     batch)
    for backbone in (None, "body", lambda m, x: m.body(x)):
        model = make_model(kind)
        learner = cls(model, vectorize=vectorize, backbone=backbone, **kw)
        assert learner.inner_names() == ["fc.weight", "fc.bias"]
        assert rel(meta_grad(learner, batch), want) < 1e-10
    with pytest.raises(ValueError, match=re.escape(
            "Net has no submodule 'head' (its children: body, fc); "
            f"{cls.__name__} adapts only the head: pass head='<name of the last layer>'")):
        cls(make_model(kind), **{k: v for k, v in kw.items() if k != "head"})


def test_head_check_is_deterministic_and_side_effect_free():
    """Dropout(0.3) in train mode and running-stat BN: head(features(x)) is accepted (same
    RNG state on both sides), the global RNG and the model are untouched."""
    model = make_model("bn1d-running")
    model.body.append(nn.Dropout(0.3))
    model.train()
    batch = make_batch("bn1d-running")
    before = state(model)
    learner = meta.ANIL(model, head="fc", vectorize=False)
    rng = torch.random.get_rng_state()
    learner._prepare(batch)  # the first-batch checks
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert_unchanged(model, before)
    learner.meta_step(batch)
    wrong = meta.ANIL(make_model("bn1d-running"), head="fc",
                      backbone=lambda m, x: m.body[0](x))
    with pytest.raises(ValueError, match=re.escape(
            "the model's output is not head(features(x)) with head 'fc', features = <lambda>, "
            "so the features cannot be computed once per task: pass backbone=... (a submodule "
            "name or a function (model, x) -> features), or cache_features=False")):
        wrong.meta_step(batch)
    with pytest.raises(TypeError, match="unexpected keyword argument .head."):
        meta.MAML(make_model("bn1d-running"), head="fc")


# ----------------------------------------------------------------------------- first-batch errors


def one_task_batch(ys=None, yq=None, x_shape=(4,)):
    g = torch.Generator().manual_seed(0)
    ys = torch.arange(WAYS).repeat(2, 1) if ys is None else ys
    yq = torch.arange(WAYS).repeat(2, 1) if yq is None else yq
    return meta.TaskBatch((torch.randn(2, WAYS, *x_shape, dtype=DT, generator=g), ys),
                          (torch.randn(2, WAYS, *x_shape, dtype=DT, generator=g), yq))


class Out(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.lin = nn.Linear(4, 10)
        self.fn = fn

    def forward(self, x):
        return self.fn(self.lin(x))


@pytest.mark.parametrize("model, batch, error, message", [
    (Net("bn1d-running"), one_task_batch(ys=torch.arange(5, 8).repeat(2, 1)), ValueError,
     "the support labels of task 0 are [5, 6, 7]: labels must lie in [0, 3) (ways = 3, the "
     "model's outputs); relabel each task's classes 0..ways-1"),
    (Out(lambda z: z[:, :5]), one_task_batch(ys=torch.arange(5, 10).repeat(2, 1)[:, :3]),
     ValueError, "the support labels of task 0 are [5, 6, 7]: labels must lie in [0, 5) "
     "(ways = 5, the model's outputs); relabel each task's classes 0..ways-1"),
    (Net("bn1d-running"), one_task_batch(yq=torch.tensor([[0, 1, 2], [0, 1, 5]])),
     ValueError, "the query labels of task 1 are [0, 1, 5]: labels must lie in [0, 3) (ways = "
     "3, the model's outputs); relabel each task's classes 0..ways-1"),
    (Net("bn1d-running"), one_task_batch(ys=torch.arange(WAYS).repeat(2, 1).double()),
     TypeError, "the support labels have dtype torch.float64: cross-entropy needs integer "
     "class labels 0..ways-1 (torch.long)"),
    (Out(lambda z: z), one_task_batch(), ValueError,
     "the model output has shape [3, 10] for the 3 support inputs [3, 4] of task 0, but the "
     "support labels use 3 classes (0..2): a 3-way task needs [n, ways] = [3, 3] (one logit "
     "per class: give the head 3 outputs)"),
    (Out(lambda z: z[:, :3, None, None]), one_task_batch(), ValueError,
     "the model output has shape [3, 3, 1, 1] for the 3 support inputs [3, 4] of task 0; "
     "cross-entropy needs [n, ways] = [3, 3]: flatten it (e.g. torch.flatten(out, 1) or "
     "nn.Flatten())"),
    (Out(lambda z: (z[:, :3], z)), one_task_batch(), TypeError,
     "the model output is a tuple of 2 (Tensor[3, 3], Tensor[3, 10]), not a tensor: meta "
     "learners need one tensor of logits [n, ways]; make the model return only that (e.g. "
     "out[0])"),
    (Net("bn1d-running"), one_task_batch().task(0), ValueError,
     "the support labels have shape [3]: a TaskBatch needs a leading task dimension (inputs "
     "[tasks, n, ...], labels [tasks, n]); for one task use batch.batched()"),
], ids=["labels-5..7", "labels-5..9-subset", "query-label", "float-labels", "10-outputs",
        "NC11-output", "tuple-output", "no-task-dim"])
def test_first_batch_errors(model, batch, error, message):
    learner = meta.MAML(model.to(DT), vectorize=False)
    with pytest.raises(error) as exc:
        learner.meta_step(batch)
    assert str(exc.value) == message
    with pytest.raises(error) as exc:  # evaluate checks its first batch too
        meta.MAML(model, vectorize=False).evaluate(iter([batch]), num_tasks=2)
    assert str(exc.value) == message


@pytest.mark.parametrize("vectorize", [False, True])
@pytest.mark.parametrize("batch, error, message", [
    (one_task_batch(ys=torch.arange(5, 8).repeat(2, 1)), ValueError,
     "the support labels of task 0 are [5, 6, 7]: labels must lie in [0, 3) (ways = 3, the "
     "model's outputs); relabel each task's classes 0..ways-1"),
    (one_task_batch(yq=torch.tensor([[0, 1, 2], [0, 1, 5]])), ValueError,
     "the query labels of task 1 are [0, 1, 5]: labels must lie in [0, 3) (ways = 3, the "
     "model's outputs); relabel each task's classes 0..ways-1"),
    (one_task_batch(ys=torch.tensor([[0, 1, 2], [-1, 1, 2]])), ValueError,
     "the support labels of task 1 are [-1, 1, 2]: labels must lie in [0, 3) (ways = 3, the "
     "model's outputs); relabel each task's classes 0..ways-1"),
    (one_task_batch(ys=torch.arange(WAYS).repeat(2, 1).double()), TypeError,
     "the support labels have dtype torch.float64: cross-entropy needs integer class labels "
     "0..ways-1 (torch.long)"),
], ids=["labels-5..7", "query-label", "negative", "float-labels"])
def test_a_later_batch_gets_the_first_batch_label_errors(batch, error, message, vectorize):
    """Review defect 6: a bad SECOND batch got a misleading structure hint (loop) or torch's raw
    'index 5 is out of bounds' (vmap); now the same message as on the first batch."""
    learner = meta.MAML(Net("bn1d-running").to(DT), vectorize=vectorize)
    learner.meta_step(one_task_batch())
    with pytest.raises(error) as exc:
        learner.meta_step(batch)
    assert str(exc.value) == message
    learner.meta_step(one_task_batch())  # the learner is still usable


def test_regression_without_task_dim_is_refused_against_the_model():
    """[n, 1] inputs and [n, 1] targets look like n tasks of one example: the model maps a
    task's inputs [1] (rank 1) to [1], not [n, k]."""
    model = meta.MLP(hidden=(4,)).to(DT)
    x = torch.randn(5, 1, dtype=DT)
    batch = meta.TaskBatch((x, torch.sin(x)), (x, torch.sin(x)))
    with pytest.raises(ValueError) as exc:
        meta.MAML(model, loss="mse", vectorize=False).meta_step(batch)
    assert str(exc.value) == (
        "the model output has shape [1] for the 1 support inputs [1] of task 0 and the "
        "targets [1]; MSE needs [n, k] outputs with n·k targets; is the task dimension "
        "missing? TaskBatch inputs are [tasks, n, ...]")


# ----------------------------------------------------------------------------- estimators


IMPLICIT_MESSAGE = (
    "{est} differentiates at the inner solution and ignores the start point w_0, but {name}'s "
    "{why}, so the meta-gradient would be identically zero. Estimators that apply to {name}: "
    "unrolled, truncated:T, checkpointed, firstorder, forwardmode (bl.Unrolled(), "
    "bl.Truncated(T), bl.Checkpointed(), bl.FirstOrder(), bl.ForwardMode()); for implicit "
    "meta-gradients use imaml (or memoryreduced)")
MAML_WHY = "inner (support) loss depends on the meta-parameters only through the start point " \
    "w_0 = θ"


@pytest.mark.parametrize("cls, why", [
    (meta.MAML, MAML_WHY), (meta.FOMAML, MAML_WHY), (meta.SignMAML, MAML_WHY),
    (meta.SharpMAML, MAML_WHY),
    (meta.ANIL, "meta-learned head initialisation enters the inner problem only as its start "
                "point w_0 = θ_head")])
@pytest.mark.parametrize("estimator", [bl.Implicit(bl.CG(iters=5)), bl.HistoryFree()],
                         ids=["implicit", "historyfree"])
def test_implicit_estimators_refused_where_they_give_zero(cls, why, estimator):
    with pytest.raises(bl.BilevelError) as exc:
        cls(meta.Conv4(1, WAYS, hidden=4), estimator=estimator)
    assert str(exc.value) == IMPLICIT_MESSAGE.format(est=type(estimator).__name__,
                                                     name=cls.name, why=why)
    meta.IMAML(meta.Conv4(1, WAYS, hidden=4), estimator=estimator)  # these apply
    meta.MemoryReducedMAML(meta.Conv4(1, WAYS, hidden=4), estimator=estimator)


def test_cli_refuses_implicit_maml(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--algorithm", "maml", "--estimator", "implicit:cg:5",
              "--out", str(tmp_path / "run")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == "meta-train: error: maml: " + IMPLICIT_MESSAGE.format(
        est="Implicit", name="maml", why=MAML_WHY)
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- meta-train


FACTORY = """
import torch
from torch import nn

def make(ways, in_channels):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(in_channels, 16), nn.BatchNorm1d(16), nn.Tanh(),
                         nn.Dropout(0.1), nn.Linear(16, ways))
"""


@pytest.fixture
def factory_module(tmp_path, monkeypatch):
    (tmp_path / "i10_user_nets.py").write_text(textwrap.dedent(FACTORY))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "i10_user_nets:make"
    sys.modules.pop("i10_user_nets", None)


def tiny(out, iterations, *extra):
    return ["--iterations", str(iterations), "--meta-batch", "3", "--val-every", "2",
            "--val-tasks", "3", "--test-tasks", "4", "--dtype", "float64", "--seed", "1",
            "--no-progress", "--log-every", "1", "--out", str(out), *extra]


def test_meta_train_with_a_model_factory_resumes_exactly(factory_module, tmp_path, capsys):
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert main(tiny(whole, 4, "--model", factory_module)) == 0
    assert main(tiny(part, 2, "--model", factory_module)) == 0
    capsys.readouterr()
    assert main(["--out", str(part), "--resume", "--iterations", "4"]) == 0  # factory reused
    err = capsys.readouterr().err
    a, b = load_checkpoint(whole / "checkpoint.pt"), load_checkpoint(part / "checkpoint.pt")
    assert a["config"]["model"] == factory_module and a["config"]["hidden"] is None
    assert a["model_record"] == {"factory": factory_module, "class":
                                 "torch.nn.modules.container.Sequential"}
    assert a["model"].keys() == b["model"].keys() and "1.running_mean" in a["model"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert torch.equal(a["model"]["1.running_mean"], torch.zeros(16, dtype=DT))  # never written
    res = json.loads((part / "results.json").read_text())
    assert res["model"]["factory"] == factory_module and res["args"]["model"] == factory_module
    assert (part / "curve.png").is_file()
    rows = list(csv_rows(part))
    assert [r["split"] for r in rows].count("val") == 3  # 0, 2, 4
    # the running loss after --resume continues: iteration 3 averages iterations 1..3
    losses = [float(r["loss"]) for r in rows if r["split"] == "train"]
    line = [ln for ln in err.splitlines() if ln.startswith("iter 3/4")][0]
    assert f"mse {sum(losses[:3]) / 3:.4f}" in line
    # a factory given to train(model=...) is recorded and rebuilt on resume
    from i10_user_nets import make

    out = tmp_path / "api"
    kw = dict(iterations=2, meta_batch=2, val_every=0, test_tasks=2, out=str(out),
              progress=False)
    first = train(TrainConfig(**kw), model=make, stream=io.StringIO())
    assert first["model"]["factory"] == factory_module
    again = train(TrainConfig(out=str(out), iterations=3), resume=True, stream=io.StringIO())
    assert again["iterations"] == 3 and again["model"]["factory"] == factory_module
    with pytest.raises(SystemExit):  # --hidden does not apply to a user model
        main(tiny(tmp_path / "x", 2, "--model", factory_module, "--hidden", "8"))
    with pytest.raises(SystemExit):
        main(tiny(tmp_path / "y", 2, "--model", "i10_user_nets:nothing"))
    assert "has no 'nothing'" in capsys.readouterr().err


def csv_rows(out):
    import csv
    with open(out / "metrics.csv", newline="") as f:
        yield from csv.DictReader(f)


def test_train_with_a_model_instance(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 1))
    out = tmp_path / "run"
    kw = dict(algorithm="anil", iterations=2, meta_batch=2, val_every=1, val_tasks=2,
              test_tasks=2, head="3", out=str(out), progress=False, dtype="float64")
    res = train(TrainConfig(**kw), model=net, stream=io.StringIO())
    assert res["model"]["class"] == "torch.nn.modules.container.Sequential"
    assert res["model"]["factory"] is None and net[0].weight.dtype == DT
    assert res["test"]["inner_steps"] == 10  # ANIL: max(10, 5), as meta.ANIL(...)
    with pytest.raises(Exception, match="pass model=... again"):
        train(TrainConfig(out=str(out), iterations=3), resume=True, stream=io.StringIO())
    again = train(TrainConfig(out=str(out), iterations=3), resume=True, model=net,
                  stream=io.StringIO())
    assert again["iterations"] == 3


def test_meta_test_defaults_agree_between_api_and_cli():
    from meta.train import resolve

    model = meta.Conv4(1, WAYS, hidden=4)
    for name in ("maml", "fomaml", "anil", "reptile", "imaml", "signmaml", "sharpmaml",
                 "memoryreduced"):
        c = resolve(TrainConfig(algorithm=name, dataset="omniglot"))
        learner = meta.make_learner(name, model, inner_steps=c.inner_steps)
        assert learner.eval_inner_steps == c.eval_inner_steps, name
        assert learner.eval_inner_steps == (20 if name == "memoryreduced"
                                            else max(10, c.inner_steps))
    assert meta.MAML(model).eval_inner_steps == 10


def test_torch_batch_norm_exact_under_grad_of_vmap():
    """The pattern grad(vmap(task).mean()) (the functorch MAML example, pytorch/functorch#534)
    through the learner's functional model: torch's BatchNorm2d is rerouted to plain ops under
    vmap, so it agrees with the loop; plain functional_call does not (skips if torch fixed it)."""
    from torch.func import grad, vmap

    model = make_model("bn2d-running")
    batch = make_batch("bn2d-running")
    fmodel = meta.MAML(model).fmodel
    theta = {n: p.detach() for n, p in model.named_parameters()}

    def make_task(forward):
        def loss(p, x, y):
            return F.cross_entropy(forward(p, x), y)

        def task(th, xs, ys, xq, yq):
            phi = th
            for _ in range(2):
                g = grad(loss)(phi, xs, ys)
                phi = {n: phi[n] - 0.3 * g[n] for n in phi}
            return loss(phi, xq, yq)
        return task

    data = (*batch.support, *batch.query)
    errors = {}
    ref = batch_stats_copy(model)
    for kind, forward in (("policy", fmodel),
                          ("plain", lambda p, x: functional_call(ref, p, (x,)))):
        task = make_task(forward)
        batched = grad(lambda th, task=task: vmap(task, in_dims=(None, 0, 0, 0, 0))(
            th, *data).mean())(theta)
        looped = [grad(task)(theta, *(t[i] for t in data)) for i in range(TASKS)]
        errors[kind] = rel(batched, {n: sum(g[n] for g in looped) / TASKS for n in theta})
    assert errors["policy"] < 1e-10, errors
    if errors["plain"] < 1e-9:
        pytest.skip(f"F.batch_norm under grad(vmap) is exact on torch {torch.__version__}")
    assert errors["plain"] > 1e-6, errors


def test_a_model_that_fails_on_the_first_batch_is_named_with_its_input():
    model = Out(lambda z: z[:, :WAYS]).to(DT)
    with pytest.raises(ValueError) as exc:
        meta.MAML(model, vectorize=False).meta_step(one_task_batch(x_shape=(7,)))
    assert str(exc.value).startswith(
        "the model failed on the 3 support inputs [3, 7] of task 0 (a task's inputs: [n, ...], "
        "the TaskBatch's task dimension removed): RuntimeError: ")
    assert isinstance(exc.value.__cause__, RuntimeError)


@pytest.mark.parametrize("name", ["reptile", "signmaml", "sharpmaml"])
def test_other_learners_with_a_user_model(name):
    """Running-stat BN + dropout (train mode): "same" loop == vmap, the model unchanged."""
    model, batch = make_model("bn1d-running"), make_batch("bn1d-running")
    model.body.append(nn.Dropout(0.2))
    before = state(model)
    kw = dict(inner_steps=2, randomness="same")
    grads = []
    for vectorize in (False, True):
        torch.manual_seed(3)
        grads.append(meta_grad(meta.make_learner(name, model, vectorize=vectorize, **kw), batch))
    assert rel(grads[1], grads[0]) < 1e-12
    model.zero_grad(set_to_none=True)
    meta.make_learner(name, model, **kw).evaluate(iter([batch]), num_tasks=TASKS)
    assert_unchanged(model, before)
