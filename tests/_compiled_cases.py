"""Compiled hypergradients (``bl.compiled_hypergrad``) and learners (``compile=``).

The broad, opt-in set (``BILEVEL_TEST_COMPILE=1``; CI runs ``_compiled_quick.py``). Tiny
problems, Dynamo + a counting backend (the captured graph run as Python: tests the tracing,
the recompile count and the eager fallbacks without a C++ build) or ``aot_eager``
(AOTAutograd's functionalised joint graph, no code generation) broadly, and inductor
(generated C++) on one small case, skipped without a C++ compiler."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch._dynamo
from test_aux import AUX, ESTIMATORS, KW, data, hp, rel
from torch import nn

import bilevel as bl
import meta
from bilevel.compiled import compiler_missing

DT = torch.float64


class Counting:
    """A torch.compile backend that counts the graphs it is given (= compiles)."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# ----------------------------------------------------------------------------- bilevel

@pytest.mark.parametrize("est", ESTIMATORS, ids=repr)
def test_one_graph_for_every_problem_and_equal_to_eager(est):
    backend = Counting()
    hg = bl.compiled_hypergrad(AUX, solver=KW["solver"], estimator=est, backend=backend)
    for seed in range(3):  # new data, new hparams values, fresh tensors: no recompile
        support, query = data(seed)
        h = {k: v + 0.1 * seed for k, v in hp().items()}
        res = hg(h, support, query, params0=KW["params0"])
        ref = bl.hypergrad(AUX, h, support, query, estimator=est, **KW)
        assert rel(res.grad, ref.grad) < 1e-10
        assert rel(res.aux, ref.aux) < 1e-10
        assert float(abs(res.outer_loss - ref.outer_loss)) < 1e-12
    assert backend.graphs == 1
    assert not hg.eager


VMAP_COMPILED = [e for e in ESTIMATORS if not isinstance(e, (bl.ForwardMode, bl.HistoryFree))]


@pytest.mark.parametrize("est", VMAP_COMPILED, ids=repr)
def test_vmapped_compiled_graph_equals_the_eager_vmap(est):
    backend = Counting()
    hg = bl.compiled_hypergrad(AUX, solver=KW["solver"], estimator=est, backend=backend,
                               in_dims=(None, 0, 0))
    for seed in range(2):
        support, query = data(seed, tasks=3)
        res = hg(hp(), support, query, params0=KW["params0"])
        ref = torch.func.vmap(lambda s, q: bl.hypergrad(AUX, hp(), s, q, estimator=est,
                                                        check=False, **KW))(support, query)
        assert rel(res.grad, ref.grad) < 1e-10 and rel(res.aux, ref.aux) < 1e-10
    assert backend.graphs == 1 and not hg.eager


@pytest.mark.parametrize("est", [bl.ForwardMode(), bl.HistoryFree(iters=4)], ids=repr)
def test_what_dynamo_cannot_capture_under_vmap_falls_back_with_one_warning(est):
    """torch 2.13: vmap of ForwardMode's vmap-of-jvp fails in fake-tensor tracing; HistoryFree's
    vmapped CG is skipped by Dynamo. Either way: eager numbers, exactly one warning."""
    hg = bl.compiled_hypergrad(AUX, solver=KW["solver"], estimator=est, backend=Counting(),
                               in_dims=(None, 0, 0))
    support, query = data(0, tasks=3)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        res = [hg(hp(), support, query, params0=KW["params0"]) for _ in range(3)]
    ours = [w for w in seen if "running eagerly" in str(w.message)]
    if not hg.eager:
        pytest.skip(f"{est!r} compiles under vmap on torch {torch.__version__}")
    assert len(ours) == 1, [str(w.message) for w in ours]
    ref = torch.func.vmap(lambda s, q: bl.hypergrad(AUX, hp(), s, q, estimator=est,
                                                    check=False, **KW))(support, query)
    assert rel(res[-1].grad, ref.grad) < 1e-12


def test_cg_with_a_tolerance_runs_its_masked_fixed_iteration_path_under_compile():
    """The early exit ‖r‖ ≤ tol is data-dependent: under compile CG runs all iterations with
    converged systems frozen, which is the early-exit answer to rounding. (This case used to
    run in its own interpreter: after other tests, Dynamo sometimes fell back to eager on it.
    That was the dispatch-state corruption a failed trace left behind for the GC, now defused
    by ``guarded_compiled_call``; see test_compiled.py.)"""
    _cg_masked_path_case()


def _cg_masked_path_case():
    est = bl.Implicit(bl.CG(iters=6, tol=1e-6), stationarity_rtol=None)  # exits at <= D = 4
    backend = Counting()
    hg = bl.compiled_hypergrad(AUX, solver=bl.GradientDescent(0.1, 4), estimator=est,
                               backend=backend)
    support, query = data(0)
    res = hg(hp(), support, query, params0=KW["params0"])
    ref = bl.hypergrad(AUX, hp(), support, query, estimator=est,
                       solver=bl.GradientDescent(0.1, 4), params0=KW["params0"])
    assert rel(res.grad, ref.grad) < 1e-10 and backend.graphs == 1 and not hg.eager


def test_a_user_vmap_around_a_compiled_object_runs_eagerly_with_one_warning():
    hg = bl.compiled_hypergrad(AUX, solver=KW["solver"], backend=Counting())
    support, query = data(0, tasks=2)
    with pytest.warns(RuntimeWarning, match="inside a torch.func transform.*in_dims"):
        res = torch.func.vmap(lambda s, q: hg(hp(), s, q, params0=KW["params0"]))(support, query)
    ref = torch.func.vmap(lambda s, q: bl.hypergrad(AUX, hp(), s, q, check=False, **KW))(
        support, query)
    assert rel(res.grad, ref.grad) < 1e-12


def test_no_cxx_compiler_falls_back_with_a_warning(monkeypatch):
    import torch._inductor.config as inductor_config

    monkeypatch.setattr("shutil.which", lambda name: None)
    # config.patch restores the entry; monkeypatch.setattr on the config module deletes it on
    # undo, which breaks every later inductor compile in the process
    with inductor_config.patch({"cpp.cxx": (None, "no-such-compiler")}):
        assert "no C++ compiler" in compiler_missing("inductor", torch.device("cpu"))
        assert compiler_missing("aot_eager") is None
        hg = bl.compiled_hypergrad(AUX, solver=KW["solver"])  # inductor
        support, query = data(0)
        with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler found.*running eagerly"):
            res = hg(hp(), support, query, params0=KW["params0"])
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # one warning, not one per call
            res = hg(hp(), support, query, params0=KW["params0"])
    assert hg.eager
    assert rel(res.grad, bl.hypergrad(AUX, hp(), support, query, **KW).grad) < 1e-12


def test_refusals_still_apply_to_a_compiled_hypergradient():
    prob = bl.BilevelProblem(lambda w, h, b: (w ** 2).sum(), lambda w, h, b: (w ** 2).sum())
    hg = bl.compiled_hypergrad(prob, solver=bl.GradientDescent(0.1, 2),
                               estimator=bl.FirstOrder(), backend=Counting())
    with pytest.raises(bl.BilevelError, match=r"hparams\['lr'\]"):
        hg({"lr": torch.tensor(0.1, dtype=DT)}, params0=torch.ones(2, dtype=DT))


@pytest.mark.skipif(compiler_missing("inductor", torch.device("cpu")) is not None,
                    reason="no C++ compiler for inductor")
def test_inductor_on_a_small_case(monkeypatch):
    import torch._inductor.config as inductor_config
    monkeypatch.setattr(inductor_config, "fx_graph_cache", False)  # no shared on-disk cache
    hg = bl.compiled_hypergrad(AUX, solver=bl.GradientDescent(0.1, 2), estimator=bl.Unrolled())
    support, query = data(0)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        res = hg(hp(), support, query, params0=KW["params0"])
    assert not hg.eager, [str(w.message) for w in seen if "eagerly" in str(w.message)]
    ref = bl.hypergrad(AUX, hp(), support, query, estimator=bl.Unrolled(),
                       solver=bl.GradientDescent(0.1, 2), params0=KW["params0"])
    assert not hg.eager
    assert rel(res.grad, ref.grad) < 1e-10


# ----------------------------------------------------------------------------- learners

WAYS, SHOTS, QUERIES, TASKS = 3, 2, 3, 3


class Net(nn.Module):
    def __init__(self, bn: bool = True):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6) if bn else nn.Identity(),
                                  nn.ReLU())
        self.head = nn.Linear(6, WAYS)

    def forward(self, x):
        return self.head(self.body(x))


def task_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(TASKS, WAYS * SHOTS, 5, generator=g, dtype=DT)
    xq = torch.randn(TASKS, WAYS * QUERIES, 5, generator=g, dtype=DT)
    ys = torch.arange(WAYS).repeat_interleave(SHOTS).expand(TASKS, -1)
    yq = torch.arange(WAYS).repeat_interleave(QUERIES).expand(TASKS, -1)
    return meta.TaskBatch((xs, ys), (xq, yq))


LEARNERS = {
    "maml": (meta.MAML, dict(inner_steps=2)),
    "maml-checkpointed": (meta.MAML, dict(inner_steps=2, estimator=bl.Checkpointed())),
    "fomaml": (meta.FOMAML, dict(inner_steps=2)),
    "imaml": (meta.IMAML, dict(inner_steps=2, cg_iters=2)),
    "anil": (meta.ANIL, dict(inner_steps=2)),
    "memoryreduced": (meta.MemoryReducedMAML, dict(inner_steps=2, cg_iters=2)),
    "signmaml": (meta.SignMAML, dict(inner_steps=2)),
    "sharpmaml": (meta.SharpMAML, dict(inner_steps=2)),
}


def grads_of(learner, batch):
    learner.model.zero_grad(set_to_none=True)
    out = learner.meta_step(batch)
    return {n: p.grad.clone() for n, p in learner.model.named_parameters()
            if p.grad is not None}, out


CASES = [(n, False) for n in sorted(LEARNERS)] + [(n, True) for n in ("maml", "imaml", "anil")]


@pytest.mark.filterwarnings("ignore:.*stationary")
@pytest.mark.parametrize("name,vectorize", CASES,
                         ids=[f"{n}-{'vmap' if v else 'loop'}" for n, v in CASES])
def test_compiled_learner_equals_eager_with_batch_norm(name, vectorize):
    """float64, BatchNorm: compiled meta-gradient == eager to 1e-10; one graph for all tasks
    and all meta-iterations (2 steps, new batches). Vmapped: MAML and iMAML (one graph of the
    vmapped step), ANIL (the head-only vmapped step falls back: one warning)."""
    cls, kw = LEARNERS[name]
    torch.manual_seed(0)
    model = Net().to(DT)
    backend = Counting()
    eager = cls(model, vectorize=vectorize, **kw)
    compiled = cls(model, vectorize=vectorize, compile={"backend": backend}, **kw)
    head_only_vmap = vectorize and name in ("anil", "memoryreduced")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for it in range(2):
            batch = task_batch(it)
            g_eager, out_eager = grads_of(eager, batch)
            g_comp, out_comp = grads_of(compiled, batch)
            assert rel(g_comp, g_eager) < 1e-10, it
            assert abs(out_comp["accuracy"] - out_eager["accuracy"]) < 1e-12
            assert abs(out_comp["loss"] - out_eager["loss"]) < 1e-10
    fallbacks = [w for w in seen if "running eagerly" in str(w.message)]
    if head_only_vmap:  # documented: the head-only vmapped step is not compiled
        assert len(fallbacks) == 1 and backend.graphs == 0
        return
    assert not fallbacks, [str(w.message) for w in fallbacks]
    hgs = list(compiled._compiled.values())
    assert len(hgs) == 1 and not hgs[0].eager
    assert backend.graphs == 1, backend.graphs  # no recompiles over tasks and iterations


def test_learner_aot_eager_equals_eager():
    """AOTAutograd (functionalised joint graph, decompositions) on MAML + BN, looped."""
    torch.manual_seed(0)
    model = Net().to(DT)
    eager = meta.MAML(model, inner_steps=2, vectorize=False)
    compiled = meta.MAML(model, inner_steps=2, vectorize=False,
                         compile={"backend": "aot_eager"})
    for it in range(2):
        batch = task_batch(it)
        assert rel(grads_of(compiled, batch)[0], grads_of(eager, batch)[0]) < 1e-10


def test_learner_compile_argument_is_checked_and_reptile_says_it_is_not_compiled():
    with pytest.raises(TypeError, match="compile must be True, False or a dict"):
        meta.MAML(Net().to(DT), compile="yes")
    with pytest.warns(RuntimeWarning, match="Reptile.*running eagerly"):
        meta.Reptile(Net().to(DT), compile=True)


@pytest.mark.skipif(compiler_missing("inductor") is not None, reason="no C++ compiler")
@pytest.mark.parametrize("name", ["SOBA-decay", "SABA", "SABA-copy", "SRBA", "AmIGO", "StocBiO",
                                  "F2SA"])
def test_stochastic_compiled_chunks_inductor_equal_eager(name):
    """bl.stochastic.run(compile=True): inductor's generated C++ gives the eager iterates
    (float64), short blocks included (chunks of 2 and 1, and eager steps; loop graphs of
    at most 2 iterations for all but in-place SABA)."""
    from test_stochastic import PROBLEM, logistic_data
    from test_stochastic_fused import MAKERS, _init, _same

    from bilevel.stochastic import Sampler, run
    inner_data, outer_data, z0, x0 = logistic_data()
    si, so = Sampler(inner_data, 8, seed=3), Sampler(outer_data, 6, seed=4)
    alg = MAKERS[name]()
    ref, _ = run(alg, PROBLEM, _init(alg, z0, x0, si, so), si, so, 13)
    out, _ = run(alg, PROBLEM, _init(alg, z0, x0, si, so), si, so, 13, compile=True, chunk=2)
    _same(ref, out, tol=1e-12)


@pytest.mark.parametrize("compile, last", [(True, "short"), ({"mode": "default"}, "short"),
                                           (True, "overlap")])
def test_compiled_saba_updates_its_tables_in_place(compile, last):
    """No full copy of a SAGA table per compiled call (inductor re-places the table writes;
    regression: reorder_for_locality moved the M[k] read after the write, and every call copied
    every table twice): the generated code has no loop over a whole table. Also with an
    "overlap" sampler (block weights computed in the graph)."""
    import re

    from test_stochastic import PROBLEM, logistic_data
    from torch._inductor.utils import run_and_get_code

    from bilevel.stochastic import SABA, Sampler, run
    odd = last == "overlap"  # 75 / 39 rows: the last block of each side overlaps
    inner_data, outer_data, z0, x0 = logistic_data(n_in=74 + odd, n_out=38 + odd)
    si = Sampler(inner_data, 2, seed=3, last=last)  # 37 or 38 blocks
    so = Sampler(outer_data, 2, seed=4, last=last)  # 19 or 20 blocks
    alg = SABA(0.2, 0.1)
    state = alg.init(z0, x0, len(si), len(so))
    tables = [state.memory[k].table for k in state.memory]
    (out, _), code = run_and_get_code(run, alg, PROBLEM, state, si, so, 8, compile=compile,
                                      chunk=4)
    assert code, "nothing was compiled"
    for n in {t.numel() for t in tables}:  # blocks · 4 elements
        assert not re.search(rf"<static_cast<int64_t>\({n}L\)", "\n".join(code)), n
    assert all(out.memory[k].table is t for k, t in zip(out.memory, tables))  # in place
    ref, _ = run(alg, PROBLEM, alg.init(z0, x0, len(si), len(so)), si, so, 8)
    assert torch.allclose(out.x, ref.x, rtol=0, atol=1e-12)


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(4, WAYS)

    def forward(self, x):
        return self.head(self.body(x))


@pytest.mark.parametrize("vectorize", [False, True])
def test_compiled_learner_on_a_channels_last_model_same_meta_gradient(vectorize):
    """The recommended CPU layout for compiled conv nets: the model in channels-last. The
    compiled graph sees that layout; float64 meta-gradient equal to eager's (NCHW model)."""
    torch.manual_seed(0)
    model = ConvNet().to(DT)
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(TASKS, WAYS * SHOTS, 2, 6, 6, generator=g, dtype=DT)
    xq = torch.randn(TASKS, WAYS * QUERIES, 2, 6, 6, generator=g, dtype=DT)
    ys = torch.arange(WAYS).repeat_interleave(SHOTS).expand(TASKS, -1)
    yq = torch.arange(WAYS).repeat_interleave(QUERIES).expand(TASKS, -1)
    batch = meta.TaskBatch((xs, ys), (xq, yq))
    ref = grads_of(meta.MAML(model, inner_steps=2, vectorize=vectorize), batch)[0]
    seen = []

    def backend(gm, example_inputs):
        seen.extend(x for x in example_inputs if isinstance(x, torch.Tensor)
                    and tuple(x.shape[-4:]) == (4, 2, 3, 3))
        return gm.forward

    cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    learner = meta.MAML(cl, inner_steps=2, vectorize=vectorize, compile={"backend": backend})
    got = grads_of(learner, batch)[0]
    assert rel(got, ref) < 1e-10
    assert seen and all(x.is_contiguous(memory_format=torch.channels_last) for x in seen)
