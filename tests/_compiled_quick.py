"""The quick compile cases that CI runs (``tests/test_compiled.py``, in a fresh interpreter).

Inductor (generated C++, skipped without a C++ compiler) on tiny float64 problems: the
compiled hypergradient of Unrolled and Implicit(CG), and MAML with BatchNorm, vmapped over
tasks, each equal to eager at 1e-10 with one graph for every problem / meta-iteration. Then
the property whose absence made these tests flaky and poisoned whole pytest processes: a
trace that fails cannot corrupt the thread's dispatch state afterwards, so eager
``torch.func`` and later compiles still work in the same process (torch 2.13 bug, worked
around in ``bilevel.compiled.guarded_compiled_call``; see its comment). About a minute on 2
cores, mostly inductor's C++ builds. The broad cases are in ``_compiled_cases.py``
(opt-in)."""

from __future__ import annotations

import gc
import warnings

import pytest
import torch
import torch._dynamo
from _compiled_cases import Counting, Net, grads_of, task_batch
from test_aux import AUX, KW, data, hp, rel
from torch._dynamo.utils import counters

import bilevel as bl
import meta
from bilevel.compiled import compiler_missing

DT = torch.float64
K = torch._C.DispatchKey
NO_CXX = compiler_missing("inductor", torch.device("cpu"))
needs_cxx = pytest.mark.skipif(NO_CXX is not None, reason=f"inductor: {NO_CXX}")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def graphs() -> int:
    return int(counters["stats"]["unique_graphs"])


def eager_fallbacks(seen) -> list[str]:
    return [str(w.message) for w in seen if "running eagerly" in str(w.message)]


# ----------------------------------------------------------------------------- inductor

@needs_cxx
@pytest.mark.parametrize("est", [bl.Unrolled(),
                                 bl.Implicit(bl.CG(iters=3, tol=0.0), stationarity_rtol=None)],
                         ids=["unrolled", "implicit-cg"])
def test_inductor_hypergrad_equals_eager_with_one_graph(est):
    solver = bl.GradientDescent(0.1, 2)
    hg = bl.compiled_hypergrad(AUX, solver=solver, estimator=est)  # inductor
    before = graphs()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for seed in range(3):  # new data and hparams values, fresh tensors: no recompile
            support, query = data(seed)
            h = {k: v + 0.1 * seed for k, v in hp().items()}
            res = hg(h, support, query, params0=KW["params0"])
            ref = bl.hypergrad(AUX, h, support, query, solver=solver, estimator=est,
                               params0=KW["params0"])
            assert rel(res.grad, ref.grad) < 1e-10, seed
            assert rel(res.aux, ref.aux) < 1e-10
            assert float(abs(res.outer_loss - ref.outer_loss)) < 1e-12
    assert not eager_fallbacks(seen) and not hg.eager, hg.fallback_error
    assert graphs() - before == 1


@needs_cxx
@pytest.mark.parametrize("name", ["SOBA-decay", "SRBA"])
def test_inductor_while_loop_runner_equals_eager(name):
    """bl.stochastic.run(compile=True) as inductor while_loop graphs with the C++ wrapper:
    the eager iterates (float64), with short last blocks (their own loop graphs) and SRBA's
    eager resets between loop calls; no fallback."""
    from test_stochastic import PROBLEM, logistic_data
    from test_stochastic_fused import MAKERS, _init, _same

    from bilevel.stochastic import Sampler, fused, run
    inner_data, outer_data, z0, x0 = logistic_data()
    si, so = Sampler(inner_data, 8, seed=3), Sampler(outer_data, 6, seed=4)
    alg = MAKERS[name]()
    ref, _ = run(alg, PROBLEM, _init(alg, z0, x0, si, so), si, so, 23)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        out, _ = run(alg, PROBLEM, _init(alg, z0, x0, si, so), si, so, 23, compile=True)
    assert not [str(w.message) for w in seen if "bl.stochastic.run" in str(w.message)]
    assert fused.uses_loop(alg, PROBLEM)
    _same(ref, out, tol=1e-12)


@needs_cxx
@pytest.mark.filterwarnings("ignore:.*stationary")
def test_inductor_maml_with_batch_norm_vmapped_equals_eager_with_one_graph():
    torch.manual_seed(0)
    model = Net().to(DT)  # Linear-BatchNorm1d-ReLU-Linear
    eager = meta.MAML(model, inner_steps=2, vectorize=True)
    compiled = meta.MAML(model, inner_steps=2, vectorize=True, compile=True)
    before = graphs()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for it in range(2):  # two meta-iterations, new task batches
            batch = task_batch(it)
            g_eager, out_eager = grads_of(eager, batch)
            g_comp, out_comp = grads_of(compiled, batch)
            assert rel(g_comp, g_eager) < 1e-10, it
            assert abs(out_comp["loss"] - out_eager["loss"]) < 1e-10
            assert abs(out_comp["accuracy"] - out_eager["accuracy"]) < 1e-12
    hgs = list(compiled._compiled.values())
    assert len(hgs) == 1 and hgs[0].in_dims is not None  # the vmapped graph
    assert not eager_fallbacks(seen) and not hgs[0].eager, hgs[0].fallback_error
    assert graphs() - before == 1


def test_no_cxx_compiler_falls_back_with_one_warning(monkeypatch):
    import torch._inductor.config as inductor_config

    monkeypatch.setattr("shutil.which", lambda name: None)
    with inductor_config.patch({"cpp.cxx": (None, "no-such-compiler")}):
        hg = bl.compiled_hypergrad(AUX, solver=KW["solver"])  # inductor
        support, query = data(0)
        with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler found.*running eagerly"):
            hg(hp(), support, query, params0=KW["params0"])
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # one warning, not one per call
            res = hg(hp(), support, query, params0=KW["params0"])
    assert hg.eager
    assert rel(res.grad, bl.hypergrad(AUX, hp(), support, query, **KW).grad) < 1e-12


# ------------------------------------------------- a failed trace cannot poison the process

class Unprintable(torch.Tensor):
    """A tensor whose printing raises inside ``Tensor.__repr__`` (as a functorch-wrapped fake
    tensor's did in torch 2.13, in ``unpack_dual``)."""

    @staticmethod
    def __new__(cls, t):
        return torch.Tensor._make_wrapper_subclass(cls, t.shape, dtype=t.dtype)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError(f"cannot run {func} on this tensor")


def stale_key_set() -> torch._C.DispatchKeySet:
    keys = torch._C.DispatchKeySet(K.AutogradCPU)
    for k in (K.ADInplaceOrView, K.FuncTorchGradWrapper, K.FuncTorchBatched, K.Functionalize):
        keys = keys | torch._C.DispatchKeySet(k)
    return keys


class FailingLikeTorch213:
    """A backend that fails the way fake-tensor tracing failed in torch 2.13: while a
    transform's dispatch keys are excluded, an error message prints a tensor, the print
    raises, and the traceback keeps ``Tensor.__repr__``'s ``_DisableFuncTorch`` guard alive
    (it restores that stale key set whenever it is freed). One such error is chained to the
    raised one, one is dropped inside a reference cycle (freed by some later GC), one is kept
    alive by the user (``_KEEP``) after its frames were cleared by the library."""

    def __call__(self, gm, example_inputs):
        errors = []
        for _ in range(2):
            with torch._C._ExcludeDispatchKeyGuard(stale_key_set()):
                try:
                    repr(Unprintable(torch.zeros(2)))
                except RuntimeError as e:
                    errors.append(e)
        cycle = {"error": errors[1]}
        cycle["self"] = cycle
        del cycle
        raise RuntimeError("forced compile failure") from errors[0]


def tls() -> tuple[str, str]:
    return (str(torch._C._dispatch_tls_local_include_set()),
            str(torch._C._dispatch_tls_local_exclude_set()))


def assert_eager_torch_func_works():
    x = torch.tensor([1.0, 2.0], dtype=DT)
    f = lambda t: (t ** 3).sum()  # noqa: E731
    want = 3 * x ** 2
    assert torch.equal(torch.func.grad(f)(x), want)
    assert torch.equal(torch.func.vmap(torch.func.grad(f))(x[:, None])[:, 0], want)
    y = x.clone().requires_grad_()
    assert torch.equal(torch.autograd.grad(f(y), y)[0], want)
    support, query = data(3)
    for est in (bl.Unrolled(), bl.Implicit(bl.CG(iters=4, tol=0.0), stationarity_rtol=None)):
        a = bl.hypergrad(AUX, hp(), support, query, estimator=est, **KW)
        b = torch.func.vmap(lambda s, q, est=est: bl.hypergrad(AUX, hp(), s, q, estimator=est,
                                                               check=False, **KW))(
            *data(3, tasks=1))
        assert rel({k: v[0] for k, v in b.grad.items()}, a.grad) < 1e-12


def assert_a_later_compile_works():
    backend = Counting()
    hg = bl.compiled_hypergrad(AUX, solver=KW["solver"], estimator=bl.Unrolled(),
                               backend=backend)
    support, query = data(1)
    res = hg(hp(), support, query, params0=KW["params0"])
    ref = bl.hypergrad(AUX, hp(), support, query, **KW)
    assert not hg.eager and backend.graphs == 1, hg.fallback_error
    assert rel(res.grad, ref.grad) < 1e-10


def test_a_failed_compile_cannot_poison_later_eager_torch_func_or_compiles():
    clean = tls()
    hg = bl.compiled_hypergrad(AUX, solver=KW["solver"], backend=FailingLikeTorch213())
    support, query = data(0)
    with pytest.warns(RuntimeWarning,
                      match="forced compile failure.*<- RuntimeError: cannot run.*running eagerly"):
        res = hg(hp(), support, query, params0=KW["params0"])
    assert hg.eager and "forced compile failure" in hg.fallback_error
    assert rel(res.grad, bl.hypergrad(AUX, hp(), support, query, **KW).grad) < 1e-12
    gc.collect()  # frees whatever the failure left in cycles: must change nothing now
    assert tls() == clean
    assert torch._C._functorch.get_dynamic_layer_stack_depth() == 0
    assert torch.is_grad_enabled() and torch._C._is_fwd_grad_enabled()
    assert_eager_torch_func_works()
    assert_a_later_compile_works()
    assert tls() == clean


def test_the_torch_213_trigger_vmap_of_forward_mode_cannot_poison_the_process():
    """The real trigger in these tests: vmap of ForwardMode (vmap of jvp) fails in Dynamo's
    fake-tensor tracing; before the workaround, the next GC left autograd, ADInplaceOrView,
    Functionalize and the functorch keys excluded in this thread (every later inductor compile
    failed: "Please convert all Tensors to FakeTensors first ... GradTrackingTensor")."""
    clean = tls()
    hg = bl.compiled_hypergrad(AUX, solver=KW["solver"], estimator=bl.ForwardMode(),
                               backend=Counting(), in_dims=(None, 0, 0))
    support, query = data(0, tasks=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hg(hp(), support, query, params0=KW["params0"])
    if not hg.eager:
        pytest.skip(f"vmap of ForwardMode compiles on torch {torch.__version__}")
    del hg
    gc.collect()
    assert tls() == clean
    assert_eager_torch_func_works()
    assert_a_later_compile_works()
