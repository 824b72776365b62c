"""``hypergrad``: one call from a bilevel problem to its hypergradient, checked.

    res = hypergrad(problem, hparams, inner_batch, outer_batch,
                    solver=GradientDescent(lr=0.1, steps=100), estimator=Implicit(CG(iters=20)))

Composes with ``torch.func.vmap`` over a batch of problems (estimators use fixed iteration
counts; eager-only checks are skipped under vmap: call :func:`check_result` afterwards).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from .estimators import Estimator, Unrolled
from .estimators.base import warn_once
from .linsolve import concrete_bool
from .problem import BilevelError, BilevelProblem, HypergradResult, check_floating
from .pytree import PyTree, tree_detach, tree_leaves, tree_paths
from .solvers import InnerSolver
from .unroll import run, start_carry


def hypergrad(problem: BilevelProblem, hparams: PyTree, inner_batch: Any = None,
              outer_batch: Any = None, *, solver: InnerSolver,
              estimator: Estimator | None = None, params0: PyTree | None = None,
              check: bool = True) -> HypergradResult:
    """Hypergradient dF/dλ of F(λ) = f(w_K(λ), λ), w_K = ``solver`` run on g(·, λ).

    ``check=True`` raises :class:`FloatingPointError` naming the inner step (or the leaf) where
    NaN/inf appeared, and warns when a linear solve missed its tolerance; these checks need
    concrete values and are skipped under ``vmap`` (see :func:`check_result`).
    """
    if not isinstance(problem, BilevelProblem):
        raise BilevelError(f"problem must be a bl.BilevelProblem, got {type(problem).__name__}")
    if not isinstance(solver, InnerSolver):
        raise BilevelError(f"solver must be an inner solver such as bl.GradientDescent(lr, steps), "
                           f"got {type(solver).__name__}")
    estimator = Unrolled() if estimator is None else estimator
    if not isinstance(estimator, Estimator):
        raise BilevelError(f"estimator must be a bilevel estimator such as bl.Unrolled(), got "
                           f"{type(estimator).__name__}")
    check_floating(hparams, "hparams")
    if params0 is not None:
        check_floating(params0, "params0")
    estimator.validate(problem, solver, hparams)
    result = estimator(problem, solver, hparams, inner_batch, outer_batch, params0)
    if check:
        check_result(result, strict=False, owner=estimator)
    return result


def check_result(result: HypergradResult, strict: bool = True, owner: object = None) -> None:
    """Raise on NaN/inf (naming the inner step or the leaf) and warn on an unconverged solve.

    With ``strict=False`` values that are not concrete (under ``vmap``) are skipped silently;
    with ``strict=True`` (for calling it after a vmapped batch) every check runs. With an
    ``owner`` (the estimator) a warning is given once per owner, not at every call.
    """
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
        rows = trace.reshape(-1, trace.shape[-1])
        if rows.shape[-1] >= 2 and bool((rows[:, -1] > rows[:, 0]).any()):
            worst = int((rows[:, -1] - rows[:, 0]).argmax())
            _warn(owner, "diverging", f"the inner loss grew from {rows[worst, 0].item():.4g} to "
                  f"{rows[worst, -1].item():.4g} over {rows.shape[-1]} inner steps: the inner "
                  f"solver is diverging (lower its learning rate)")
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
    converged = result.info.get("linsolve_converged")
    if converged is not None and concrete_bool(converged.all()) is False:
        res = result.info["linsolve_rel_residual"]
        its = result.info["linsolve_iterations"].max().item()
        message = (f"the linear solve did not reach its tolerance (relative residual "
                   f"{res.max().item():.3g} after {its} iterations): raise CG(iters=...) or add "
                   f"damping")
        _warn(owner, "linsolve", message)


def _warn(owner: object, key: str, message: str) -> None:
    if owner is None:
        warnings.warn(message, RuntimeWarning, stacklevel=3)
    else:
        warn_once(owner, key, message)


def proximal(loss, reg: float | str, center=lambda h: h):
    """iMAML's proximal inner loss: g(w, λ, b) + (reg/2)‖w − center(λ)‖².

    ``reg`` may be a number or a key of hparams (a learnable regularisation strength)."""

    def g(params, hparams, batch):
        c = center(hparams)
        r = hparams[reg] if isinstance(reg, str) else reg
        sq = sum(((p - q) ** 2).sum() for p, q in zip(tree_leaves(params), tree_leaves(c),
                                                        strict=True))
        return loss(params, hparams, batch) + 0.5 * r * sq

    return g


def solve(problem: BilevelProblem, hparams: PyTree, inner_batch: Any = None, *,
          solver: InnerSolver, params0: PyTree | None = None) -> PyTree:
    """The inner solution w_K alone (no hypergradient, no graph)."""

    const = tree_detach(hparams)
    (w, _), _ = run(problem, solver, const, inner_batch,
                    start_carry(problem, solver, const, params0), solver.steps)
    return tree_detach(w)
