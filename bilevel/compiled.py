"""Compiled hypergradients: the whole per-problem computation in one ``torch.compile`` graph.

    hg = bl.compiled_hypergrad(problem, solver=bl.GradientDescent(0.1, 5),
                               estimator=bl.Unrolled())
    for task in tasks:                       # one graph serves every task and every call
        res = hg(hparams, task.support, task.query)

:func:`compiled_hypergrad` returns a :class:`CompiledHypergrad`: the same numbers as
:func:`bilevel.hypergrad` (float64: to rounding, tested at 1e-10 relative for every exact
estimator), with the inner loop, its reverse (or forward) sweep, the CG/Neumann iterations of
:class:`Implicit`/:class:`HistoryFree` and the outer gradient traced by TorchDynamo into one
graph and handed to a compiler backend (``"inductor"``: generated C++/OpenMP on CPU, Triton
on CUDA). Inside the compiled region every derivative runs on ``torch.func`` (Dynamo cannot
trace ``torch.autograd.grad``) and linear solves take their fixed-iteration masked path (the
early exit ``if ‖r‖ ≤ tol`` is data-dependent control flow: CG/Neumann then run all
``iters`` iterations with converged systems frozen by a mask, the same result as the early
exit to rounding).

No recompiles: the problem, solver and estimator are fixed when the object is built (no
fresh closures per call), tensors are graph inputs guarded on dtype/shape/device only, so
new tasks and new meta-parameter values reuse the graph; a new shape (another way/shot
count) compiles once more (``dynamic=False``, the default: exact-shape kernels).
Support and query may have different sizes and dtypes of labels; each gets its own
(static) shape in the one graph.

Fallbacks (one warning each, never a crash): no C++ compiler for inductor on CPU (the one
``torch._inductor.config.cpp.cxx`` names, or ``g++``/``c++``/``clang++`` on PATH), no
Triton on CUDA, or a first call the compiler cannot handle: the object then runs the eager
estimator. Over a batch of problems: ``compiled_hypergrad(..., in_dims=(None, 0, 0))``
compiles ``vmap(hypergrad)`` (one graph for the batch); a compiled object called inside a
user's ``vmap`` runs eagerly (one warning: Dynamo does not trace inside functorch
transforms).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import shutil
import threading
import traceback
import warnings
from typing import Any

import torch

from .autodiff import _transform_active as transform_active
from .diagnostics import flags
from .estimators import Estimator, Unrolled
from .hypergrad import _check_result
from .problem import BilevelError, BilevelProblem, HypergradResult, check_floating
from .pytree import PyTree, tree_detach, tree_leaves, tree_map
from .solvers import InnerSolver
from .unroll import state_out

__all__ = ["CompiledHypergrad", "compiled_hypergrad", "compiler_missing", "compile_fallback",
           "guarded_compiled_call"]

BACKENDS_WITH_CXX = ("inductor",)

log = logging.getLogger(__name__)


def _describe(e: BaseException, limit: int = 4) -> str:
    """One line for the fallback warning: the error and its causes (Dynamo wraps the real
    error: TorchRuntimeError <- Unsupported <- the operator's own RuntimeError), each by the
    first non-empty line of its message."""
    def first(x: BaseException) -> str:
        lines = [ln.strip() for ln in str(x).splitlines() if ln.strip()]
        return f"{type(x).__name__}: {lines[0][:160] if lines else ''}"
    chain = _exception_chain(e)
    text = " <- ".join(first(x) for x in chain[:limit])
    return text + (" <- ..." if len(chain) > limit else "")


def compiler_missing(backend: Any, device: torch.device | None = None) -> str | None:
    """Why ``backend`` cannot compile here (no C++ compiler for inductor on CPU, no Triton on
    CUDA), or None if it can (other backends, e.g. ``"aot_eager"``, need no toolchain)."""
    if backend not in BACKENDS_WITH_CXX:
        return None
    if device is not None and device.type == "cuda":
        try:
            from torch.utils._triton import has_triton
        except ImportError:  # pragma: no cover - very old torch
            return "torch has no Triton support"
        return None if has_triton() else "Triton is not installed (inductor's CUDA code generator)"
    try:
        import torch._inductor.config as cfg
        named = [c for c in cfg.cpp.cxx if c]
    except Exception:  # pragma: no cover - private config moved
        named = []
    for cxx in [*named, "g++", "c++", "clang++"]:
        if shutil.which(cxx):
            return None
    return ("no C++ compiler found (inductor generates C++ on CPU: install g++ or clang++, or "
            "set torch._inductor.config.cpp.cxx)")


def compile_fallback(owner: str, reason: str) -> None:
    """The one warning of a compiled object that runs eagerly instead (``owner`` names it)."""
    warnings.warn(f"{owner}: torch.compile unavailable ({reason}); running eagerly (same "
                  f"numbers, no speed-up)", RuntimeWarning, stacklevel=3)


# ------------------------------------------------------------------------------------------
# A failed trace must not poison the thread afterwards (torch 2.13 workaround)
# ------------------------------------------------------------------------------------------
# torch/_tensor_str.py::_str keeps ``guard = torch._C._DisableFuncTorch()`` in a local variable.
# That guard, when destroyed, sets the thread's excluded dispatch keys back to what they were
# when it was made. Fake-tensor tracing formats its errors with ``repr(tensor)``; inside a
# functorch level (grad/vmap/jvp being traced) almost every key is excluded at that moment, and
# the repr itself can raise (``unpack_dual`` -> ``_fw_primal``: "InferenceMode::is_enabled() &&
# self.is_inference() INTERNAL ASSERT FAILED"). The raised exception's traceback then keeps the
# ``_str`` frame, hence the guard, alive; Dynamo wraps it twice (the chain is full of reference
# cycles: exception -> traceback -> frame -> exception) and restores the dispatch-key TLS on
# its way out, so all looks well. Whenever Python's cyclic GC later
# frees that garbage -- at an arbitrary moment: during the next compile, or in the middle of an
# eager ``torch.func`` call -- the guard writes its stale key set (31 keys excluded: autograd,
# ADInplaceOrView, Functionalize, FuncTorchGradWrapper, FuncTorchBatched, ...) into the
# thread's TLS, and every later transform/compile in that thread fails ("Please convert all
# Tensors to FakeTensors first ... GradTrackingTensor", "RuntimeError when making fake tensor
# call", "element 0 of tensors does not require grad"). That was the intermittent, order-
# dependent failure of the compile tests (tests/_compiled_quick.py reproduces the mechanism
# without Dynamo's bug: ``FailingLikeTorch213``).
# :func:`guarded_compiled_call` defuses it: no cyclic GC while the compiled function runs;
# afterwards, if anything was traced, the frames of the raised exception chain are cleared and
# the garbage collected *inside* ``_PreserveDispatchKeyGuard``, which then puts the thread's
# (good) dispatch-key sets back; functorch levels and grad modes are restored as well.

_GC_LOCK = threading.Lock()
_GC_PAUSE = {"depth": 0, "was_enabled": False}


@contextlib.contextmanager
def _gc_paused():
    """No automatic cyclic GC inside the block (nesting- and thread-safe; ``gc.collect()`` still
    runs when called explicitly)."""
    with _GC_LOCK:
        if _GC_PAUSE["depth"] == 0:
            _GC_PAUSE["was_enabled"] = gc.isenabled()
            gc.disable()
        _GC_PAUSE["depth"] += 1
    try:
        yield
    finally:
        with _GC_LOCK:
            _GC_PAUSE["depth"] -= 1
            if _GC_PAUSE["depth"] == 0 and _GC_PAUSE["was_enabled"]:
                gc.enable()


def _exception_chain(e: BaseException | None) -> list[BaseException]:
    chain: list[BaseException] = []
    while e is not None and all(e is not c for c in chain):
        chain.append(e)
        e = e.__cause__ or e.__context__
    return chain


def _frames_count() -> int:
    """Frames Dynamo has been asked to compile so far in this process (its own counter)."""
    from torch._dynamo.utils import counters
    return int(counters["frames"]["total"])


def _defuse(error: BaseException | None) -> None:
    """Release what a trace left behind (the exception chain's frame locals, cyclic garbage)
    now, under a guard that restores the thread's dispatch-key sets afterwards."""
    with torch._C._PreserveDispatchKeyGuard():
        for exc in _exception_chain(error):
            if exc.__traceback__ is not None:
                traceback.clear_frames(exc.__traceback__)
        gc.collect()


def guarded_compiled_call(fn: Any, *args: Any) -> Any:
    """``fn(*args)`` for a ``torch.compile``'d ``fn``, so that a trace that failed (raised, or
    was abandoned by Dynamo for eager) cannot corrupt this thread's dispatch state later (the
    torch 2.13 bug described above): the cost, a ``gc.collect()``, is paid only on calls that
    traced something."""
    from torch._C._functorch import get_dynamic_layer_stack_depth

    frames = _frames_count()
    depth = get_dynamic_layer_stack_depth()
    grad, fwd_grad = torch.is_grad_enabled(), torch._C._is_fwd_grad_enabled()
    error: BaseException | None = None
    with _gc_paused():
        try:
            return fn(*args)
        except BaseException as e:
            error = e
            raise
        finally:
            if error is not None or _frames_count() != frames:
                _defuse(error)
            if error is not None:  # a trace that raised: its transforms' state is undone
                if get_dynamic_layer_stack_depth() > depth:
                    torch._C._functorch.pop_dynamic_layer_stack_and_undo_to_depth(depth)
                torch.set_grad_enabled(grad)
                torch._C._set_fwd_grad_enabled(fwd_grad)
            error = None  # no reference cycle through this frame


class CompiledHypergrad:
    """``hg(hparams, inner_batch, outer_batch, *, params0=None, state0=None)`` =
    :func:`bilevel.hypergrad` ``(problem, hparams, inner_batch, outer_batch, solver=...,
    estimator=..., params0=..., state0=...)`` through one compiled graph (module docstring).

    ``backend``/``mode``/``dynamic``/``fullgraph`` are ``torch.compile``'s. ``check=True``
    runs :func:`bilevel.check_result`'s eager checks on the returned (concrete) result.
    ``in_dims``: compile ``torch.func.vmap(hypergrad, in_dims)`` instead (a batch of
    problems per call, results stacked; ``randomness`` is vmap's). Called inside a user's own
    ``vmap``/``grad`` the object runs eagerly (Dynamo does not trace inside a functorch
    transform in torch 2.13: one warning), which is why ``in_dims`` exists.
    ``eager`` is True once the object has fallen back to the eager estimator; after a failed
    compile ``fallback_error`` holds its traceback as text (also logged at INFO on the
    ``bilevel.compiled`` logger); the warning names the outer error and its root cause.
    """

    def __init__(self, problem: BilevelProblem, *, solver: InnerSolver,
                 estimator: Estimator | None = None, backend: Any = "inductor",
                 mode: str | None = None, dynamic: bool | None = False,
                 fullgraph: bool = False, check: bool = True,
                 in_dims: tuple | None = None, randomness: str = "error"):
        if not isinstance(problem, BilevelProblem):
            raise BilevelError(f"problem must be a bl.BilevelProblem, got "
                               f"{type(problem).__name__}")
        if not isinstance(solver, InnerSolver):
            raise BilevelError(f"solver must be an inner solver such as "
                               f"bl.GradientDescent(lr, steps), got {type(solver).__name__}")
        estimator = Unrolled() if estimator is None else estimator
        if not isinstance(estimator, Estimator):
            raise BilevelError(f"estimator must be a bilevel estimator such as bl.Unrolled(), "
                               f"got {type(estimator).__name__}")
        self.problem, self.solver, self.estimator = problem, solver, estimator
        self.backend, self.check = backend, check
        self.eager = False
        self.fallback_error: str | None = None  # the failed compile's traceback (text), if any
        self.in_dims = None if in_dims is None else _pad_dims(in_dims)
        self._core_fn = self._core if in_dims is None else torch.func.vmap(
            self._core, in_dims=self.in_dims, randomness=randomness)
        self._compiled = torch.compile(self._core_fn, backend=backend, mode=mode,
                                       dynamic=dynamic, fullgraph=fullgraph)
        self._prechecked: list = []
        self._calls = 0

    def _core(self, hparams, inner_batch, outer_batch, params0, state0) -> HypergradResult:
        result = self.estimator(self.problem, self.solver, hparams, inner_batch, outer_batch,
                                params0, state0)
        result.info.update(flags(result))
        result.state = state_out(result.state)
        return result

    def _fallback(self, reason: str) -> None:
        if not self.eager:
            self.eager = True
            compile_fallback(f"compiled_hypergrad({self.estimator!r})", reason)

    def _precheck(self, hparams, inner_batch, outer_batch, params0, state0) -> None:
        """The estimator's once-per-problem structural checks (refusals), eagerly: they
        differentiate concrete values, which the compiled graph need not repeat."""
        key = (transform_active(), tuple((tuple(x.shape), x.dtype) for x in
                                         tree_leaves(hparams)))
        if key in self._prechecked:
            return
        self.estimator.validate(self.problem, self.solver, hparams)
        check = lambda *a: self.estimator.precheck(self.problem, self.solver, *a)  # noqa: E731
        args = (hparams, inner_batch, outer_batch, params0, state0)
        if self.in_dims is None:
            check(*args)
        else:  # as the compiled graph sees it: inside vmap (its own cache key)
            torch.func.vmap(lambda *a: (check(*a), torch.zeros(()))[1],
                            in_dims=self.in_dims, randomness="different")(*args)
        self._prechecked.append(key)

    def __call__(self, hparams: PyTree, inner_batch: Any = None, outer_batch: Any = None, *,
                 params0: PyTree | None = None, state0: PyTree | None = None) -> HypergradResult:
        check_floating(hparams, "hparams")
        if params0 is not None:
            check_floating(params0, "params0")
        top = not transform_active()
        if not top and not self.eager:
            self._fallback("called inside a torch.func transform (vmap/grad), where Dynamo does "
                           "not trace; to compile a vmap over problems build the object with "
                           "in_dims=...")
        if top:
            hparams, params0, state0 = tree_detach(hparams), tree_detach(params0), \
                tree_detach(state0)
        self._precheck(hparams, inner_batch, outer_batch, params0, state0)
        if not self.eager:
            device = next(iter(tree_leaves(hparams))).device
            missing = compiler_missing(self.backend, device)
            if missing is not None:
                self._fallback(missing)
        if self.eager or not top:
            result = self._core_fn(hparams, inner_batch, outer_batch, params0, state0)
        else:
            graphs = _graph_count()
            try:
                result = guarded_compiled_call(self._compiled, hparams, inner_batch,
                                               outer_batch, params0, state0)
            except (BilevelError, FloatingPointError):
                raise
            except Exception as e:  # the compiler failed: eager gives the same numbers
                self.fallback_error = "".join(traceback.format_exception(e))
                log.info("compiled_hypergrad(%r): the compile failed, running eagerly:\n%s",
                         self.estimator, self.fallback_error)
                self._fallback(_describe(e))
                result = self._core_fn(hparams, inner_batch, outer_batch, params0, state0)
            else:
                if not self._calls and _graph_count() == graphs:
                    # Dynamo skipped the frame (an untraceable construct, e.g. a transform
                    # it cannot capture): nothing is compiled, say so and stop retrying
                    self._fallback("Dynamo captured no graph for this estimator/solver "
                                   "combination in this torch version")
                self._calls += 1
        if top:
            result = tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t,
                              result)
        if self.check:
            _check_result(result, self.in_dims is not None, self.estimator)
        return result

    def __repr__(self) -> str:
        return (f"CompiledHypergrad(estimator={self.estimator!r}, solver={self.solver!r}, "
                f"backend={self.backend!r}, eager={self.eager})")


def compiled_hypergrad(problem: BilevelProblem, *, solver: InnerSolver,
                       estimator: Estimator | None = None, backend: Any = "inductor",
                       mode: str | None = None, dynamic: bool | None = False,
                       fullgraph: bool = False, check: bool = True, in_dims: tuple | None = None,
                       randomness: str = "error") -> CompiledHypergrad:
    """A compiled :func:`bilevel.hypergrad` for a fixed (problem, solver, estimator): build it
    once, call it for every problem instance (see :class:`CompiledHypergrad`); with
    ``in_dims`` (``torch.func.vmap``'s, for ``(hparams, inner_batch, outer_batch, params0,
    state0)``) it computes a batch of problems, ``vmap`` inside the one compiled graph."""
    return CompiledHypergrad(problem, solver=solver, estimator=estimator, backend=backend,
                             mode=mode, dynamic=dynamic, fullgraph=fullgraph, check=check,
                             in_dims=in_dims, randomness=randomness)



def _pad_dims(in_dims: tuple) -> tuple:
    """``in_dims`` for (hparams, inner_batch, outer_batch[, params0[, state0]]), padded with
    None (shared) to the five arguments of the core."""
    if not isinstance(in_dims, tuple) or not 1 <= len(in_dims) <= 5:
        raise BilevelError(f"in_dims must be a tuple of 1 to 5 entries for (hparams, "
                           f"inner_batch, outer_batch, params0, state0), got {in_dims!r}")
    return tuple(in_dims) + (None,) * (5 - len(in_dims))


def _graph_count() -> int:
    """Graphs Dynamo has captured so far in this process (its own counter)."""
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])
