"""``hypergrad``: one call from a bilevel problem to its hypergradient, checked.

    res = hypergrad(problem, hparams, inner_batch, outer_batch,
                    solver=GradientDescent(lr=0.1, steps=100), estimator=Implicit(CG(iters=20)))

Composes with ``torch.func.vmap`` over a batch of problems (estimators use fixed iteration
counts; eager-only checks are skipped under vmap: call :func:`check_result` afterwards).
"""

from __future__ import annotations

from typing import Any

import torch

from .autodiff import _transform_active as transform_active
from .diagnostics import flags, problem_scope, warn_flags
from .estimators import Estimator, Unrolled
from .linsolve import concrete_bool
from .problem import BilevelError, BilevelProblem, HypergradResult, check_floating
from .pytree import PyTree, tree_detach, tree_leaves, tree_map, tree_paths
from .solvers import InnerSolver
from .unroll import run, start_carry, state_out


def hypergrad(problem: BilevelProblem, hparams: PyTree, inner_batch: Any = None,
              outer_batch: Any = None, *, solver: InnerSolver,
              estimator: Estimator | None = None, params0: PyTree | None = None,
              state0: PyTree | None = None, check: bool = True,
              differentiable: bool = False) -> HypergradResult:
    """Hypergradient dF/dλ of F(λ) = f(w_K(λ), λ), w_K = ``solver`` run on g(·, λ).

    ``inner_batch`` is the batch of every inner step, or a :class:`bilevel.PerStep` /
    :class:`bilevel.Minibatches` stream (step k uses ``inner_batch.at(k)``); a per-step
    ``outer_batch`` is evaluated at k = 0 (advance it between calls with ``.shifted(1)``).
    ``state0`` starts the solver from a given state s_0 (default ``solver.init_state(w_0, λ)``),
    e.g. ``res.state`` of the previous call to warm-start momentum; it is a constant (no
    derivative flows into it). ``res.state`` is the final solver state, detached, as a pytree
    of tensors (Python numbers in it, e.g. a step counter, come back as 0-d tensors).

    At the top level (no ``torch.func`` transform active) the computation runs on detached
    copies of ``hparams`` and everything returned is detached: hyperparameters that require
    grad (``nn.Parameter``) give a plain ``res.grad``; write it into their ``.grad`` with
    :func:`accumulate_grad`. ``differentiable=True`` keeps the graph instead (res.grad is then
    a function of the caller's tensors, for a higher-order derivative with
    ``torch.autograd``). Under ``vmap``/``grad`` nothing is detached (composability).

    ``check=True`` raises :class:`FloatingPointError` naming the inner step (or the leaf) where
    NaN/inf appeared, and warns on divergence or an unusable linear solve; these checks need
    concrete values and are skipped under ``vmap`` (see :func:`check_result`).
    """
    if not isinstance(problem, BilevelProblem):
        raise BilevelError(f"problem must be a bl.BilevelProblem, got {type(problem).__name__}")
    if not isinstance(solver, InnerSolver):
        raise BilevelError(f"solver must be an inner solver such as bl.GradientDescent(lr, steps), "
                           f"got {type(solver).__name__}")
    solver = adapt_solver(problem, solver)
    estimator = Unrolled() if estimator is None else estimator
    if not isinstance(estimator, Estimator):
        raise BilevelError(f"estimator must be a bilevel estimator such as bl.Unrolled(), got "
                           f"{type(estimator).__name__}")
    check_floating(hparams, "hparams")
    if params0 is not None:
        check_floating(params0, "params0")
    top = not transform_active() and not differentiable
    if top:  # no graph into the caller's tensors: res.grad is a plain tensor
        hparams, params0, state0 = tree_detach(hparams), tree_detach(params0), \
            tree_detach(state0)
    with problem_scope(problem):  # warnings are counted per estimator configuration and problem
        estimator.validate(problem, solver, hparams)
        result = estimator(problem, solver, hparams, inner_batch, outer_batch, params0, state0)
        result.info.update(flags(result))
        result.state = state_out(result.state)  # tensors only (vmap returns it, results stack)
        if top:
            result = tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, result)
        if check:
            _check_result(result, False, estimator)
    return result


def adapt_solver(problem: BilevelProblem, solver: InnerSolver) -> InnerSolver:
    """``problem.adapt_solver(solver)`` where the problem defines it, else ``solver`` (a module
    problem wraps a plain solver: it moves the weights, the BatchNorm buffers follow)."""
    adapt = getattr(problem, "adapt_solver", None)
    return solver if adapt is None else adapt(solver)


def accumulate_grad(hparams: PyTree, grads: PyTree) -> None:
    """``leaf.grad += grads[path]`` for every leaf of ``hparams`` (``.grad`` is created if it is
    None), as ``loss.backward()`` would: then ``torch.optim`` steps the hyperparameters.

    Leaves are matched by pytree path (``hparams["lr"]`` ↔ ``grads["lr"]``), not by order;
    the leaves must be leaf tensors with ``requires_grad=True`` (``nn.Parameter`` or
    ``torch.tensor(..., requires_grad=True)``). Errors name the leaf."""
    want = dict(tree_paths(hparams))
    got = dict(tree_paths(grads))
    if set(want) != set(got):
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        raise BilevelError(f"accumulate_grad: grads does not match hparams: missing "
                           f"{['grads' + p for p in missing]}, unexpected "
                           f"{['grads' + p for p in extra]}")
    for path, leaf in want.items():
        g = got[path]
        name = f"hparams{path}"
        if not isinstance(leaf, torch.Tensor):
            raise BilevelError(f"accumulate_grad: {name} is a {type(leaf).__name__}, not a tensor")
        if not leaf.requires_grad:
            raise BilevelError(f"accumulate_grad: {name} has requires_grad=False: create it with "
                               f"requires_grad=True (or as an nn.Parameter) to receive a .grad")
        if not leaf.is_leaf:
            raise BilevelError(f"accumulate_grad: {name} is not a leaf tensor (it was computed "
                               f"from other tensors), so its .grad is not kept: pass the leaf "
                               f"itself (the tensor the optimiser updates)")
        if not isinstance(g, torch.Tensor) or g.shape != leaf.shape:
            raise BilevelError(f"accumulate_grad: grads{path} has shape "
                               f"{tuple(getattr(g, 'shape', ()))}, {name} has "
                               f"{tuple(leaf.shape)}")
        g = g.detach().to(dtype=leaf.dtype, device=leaf.device)
        with torch.no_grad():
            if leaf.grad is None:
                leaf.grad = g.clone()
            else:
                leaf.grad.add_(g)


def check_result(result: HypergradResult, strict: bool = True, owner: object = None) -> None:
    """Raise on NaN/inf (naming the inner step or the leaf); warn on every problem flagged in
    ``result.info["warnings/<kind>"]`` (see :mod:`bilevel.diagnostics`: divergence, CG
    breakdown, unusable residual, diverging Neumann series, non-stationary inner solution).

    With ``strict=False`` values that are not concrete (under ``vmap``) are skipped silently;
    with ``strict=True`` (for calling it after a vmapped batch) every check runs. With an
    ``owner`` (the estimator) warnings are rate-limited per owner and kind (occurrences 1, 10,
    100, ... are shown); without one every warning is shown.
    """
    _check_result(result, strict, owner)


def _check_result(result: HypergradResult, strict: bool, owner: object) -> None:
    """:func:`check_result`; called directly by the public functions (warnings point at their
    caller)."""
    trace = result.info.get("inner_loss")
    if trace is not None and trace.numel():
        finite = torch.isfinite(trace)
        ok = concrete_bool(finite.all())
        if ok is False:
            rows = trace.reshape(-1, trace.shape[-1])
            bad = int((~torch.isfinite(rows)).any(0).nonzero()[0])
            raise FloatingPointError(f"the inner loss became {rows[:, bad].tolist()} at inner step "
                                     f"{bad} (0-based) of {trace.shape[-1]}: lower the inner "
                                     f"learning rate or check the inner loss")
        if ok is None:
            return
    trees = (("inner solution params", result.params), ("hypergradient", result.grad),
             ("outer loss", result.outer_loss))
    sums = [leaf.sum() for _, tree in trees for leaf in tree_leaves(tree)]
    # one check for all leaves (a NaN/inf anywhere makes its leaf's sum non-finite), then
    # leaf by leaf only to name the culprit
    if sums and concrete_bool(torch.isfinite(torch.stack(sums)).all()) is False:
        for what, tree in trees:
            for path, leaf in tree_paths(tree):
                if concrete_bool(torch.isfinite(leaf).all()) is False:
                    raise FloatingPointError(f"the {what}{path} holds NaN/inf")
    warn_flags(result, owner)


def proximal(loss, reg: float | str, center=lambda h: h):
    """iMAML's proximal inner loss: g(w, λ, b) + (reg/2)‖w − center(λ)‖².

    ``reg`` may be a number or a key of hparams (a learnable regularisation strength). The
    leaves of ``params`` and ``center(hparams)`` are paired by pytree path (key), not by order;
    a structure mismatch raises :class:`BilevelError` naming the keys."""

    def g(params, hparams, batch):
        c = dict(tree_paths(center(hparams)))
        w = dict(tree_paths(params))
        if set(c) != set(w) or len(c) != len(tree_leaves(params)):
            raise BilevelError(f"proximal: params and center(hparams) must have the same keys; "
                               f"only in params: {sorted(set(w) - set(c))}, only in center: "
                               f"{sorted(set(c) - set(w))}")
        for path, p in w.items():
            if p.shape != c[path].shape:
                raise BilevelError(f"proximal: params{path} has shape {tuple(p.shape)}, "
                                   f"center{path} has {tuple(c[path].shape)}")
        r = hparams[reg] if isinstance(reg, str) else reg
        sq = sum(((p - c[path]) ** 2).sum() for path, p in w.items())
        return loss(params, hparams, batch) + 0.5 * r * sq

    return g


def solve(problem: BilevelProblem, hparams: PyTree, inner_batch: Any = None, *,
          solver: InnerSolver, params0: PyTree | None = None, state0: PyTree | None = None,
          return_state: bool = False) -> PyTree:
    """The inner solution w_K alone (no hypergradient, no graph); ``(w_K, s_K)`` with
    ``return_state=True``. ``inner_batch`` may be a :class:`bilevel.PerStep` stream and
    ``state0`` a solver state to start from, as in :func:`hypergrad`."""

    solver = adapt_solver(problem, solver)
    const = tree_detach(hparams)
    (w, s), _ = run(problem, solver, const, inner_batch,
                    start_carry(problem, solver, const, tree_detach(params0),
                                tree_detach(state0)), solver.steps)
    return (tree_detach(w), state_out(s)) if return_state else tree_detach(w)
