"""Running the inner solver, and the reverse-mode unroll shared by Unrolled/Truncated/FirstOrder.

The inner trajectory is w_0 = init(λ) (or params0), (w_{k+1}, s_{k+1}) = Φ(w_k, s_k, λ).
:func:`tail_hypergrad` runs the first K − T steps with no graph (a constant in λ except through
the identity path of w_0 = init(λ)) and differentiates the last T steps in reverse mode:

    w_{K−T} ≈ init(λ) + stopgrad(w_{K−T} − init(λ)),   ĝ = d f(w_K(λ), λ) / dλ.

T = K is exact unrolled backprop (MAML), T = 0 the first-order approximation (FO-MAML).
"""

from __future__ import annotations

from typing import Any

import torch

from .autodiff import grad_and_value
from .data import batch_at
from .problem import BilevelError, BilevelProblem, HypergradResult, call_loss
from .pytree import PyTree, tree_detach, tree_map, tree_norm, tree_paths, tree_structure, tree_sub
from .solvers import InnerSolver

Carry = tuple[PyTree, PyTree]  # (params, solver state)


def inner_grad_fn(problem: BilevelProblem):
    """(w, λ, batch) -> (∇_w g(w, λ, batch), g(w, λ, batch))."""

    def loss(params: PyTree, hparams: PyTree, batch: Any) -> torch.Tensor:
        return call_loss(problem.inner_loss, "inner_loss", params, hparams, batch)

    def fn(params: PyTree, hparams: PyTree, batch: Any):
        return grad_and_value(loss)(params, hparams, batch)

    return fn


def run(problem: BilevelProblem, solver: InnerSolver, hparams: PyTree, batch: Any,
        carry: Carry, steps: int, first_grad_norm: list | None = None, start: int = 0
        ) -> tuple[Carry, list[torch.Tensor]]:
    """``steps`` solver iterations from ``carry``; returns the new carry and the inner losses.

    Iteration i is inner step k = ``start + i`` of the call and uses ``batch_at(batch, k)``
    (a :class:`bilevel.PerStep` gives each step its own batch; replays pass their ``start``).
    A ``first_grad_norm`` list receives ‖∇_w g(w_0)‖ from the solver's first gradient call."""
    grad_fn = inner_grad_fn(problem)
    if first_grad_norm is not None:
        plain_grad_fn = grad_fn

        def grad_fn(params, hparams, batch):
            grads, loss = plain_grad_fn(params, hparams, batch)
            if not first_grad_norm:
                first_grad_norm.append(tree_norm(tree_detach(grads)))
            return grads, loss
    params, state = carry
    losses = []
    for i in range(steps):
        params, state, loss = solver.step(grad_fn, params, state, hparams,
                                          batch_at(batch, start + i))
        losses.append(loss.detach())
    return (params, state), losses


def stack_losses(losses: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    if not losses:
        return like.new_zeros((0,)).detach()
    return torch.stack(losses)


def start_carry(problem: BilevelProblem, solver: InnerSolver, hparams: PyTree,
                params0: PyTree | None, state0: PyTree | None = None) -> Carry:
    """(w_0, s_0): w_0 = init(λ) or params0; s_0 = ``state0`` or ``solver.init_state(w_0, λ)``."""
    params = problem.start(hparams, params0)
    fresh = solver.init_state(params, hparams)
    if state0 is None:
        return params, fresh
    check_state(state0, fresh, solver)
    return params, state0


def check_state(state0: PyTree, fresh: PyTree, solver: InnerSolver) -> None:
    """``state0`` must look like ``solver.init_state(...)`` (the error names the leaf)."""
    if tree_structure(state0) != tree_structure(fresh):
        raise BilevelError(f"state0 does not have the structure of {type(solver).__name__}'s "
                           f"state (leaves {[p for p, _ in tree_paths(fresh)]}, got "
                           f"{[p for p, _ in tree_paths(state0)]}); pass res.state of an earlier "
                           f"call with the same solver, or None for a fresh state")
    for (path, a), (_, b) in zip(tree_paths(state0), tree_paths(fresh), strict=True):
        if isinstance(b, torch.Tensor) and (not isinstance(a, torch.Tensor)
                                            or a.shape != b.shape):
            raise BilevelError(f"state0{path} has shape {tuple(getattr(a, 'shape', ()))}, "
                               f"{type(solver).__name__} expects {tuple(b.shape)}")


def state_out(state: PyTree) -> PyTree:
    """The solver state as a result carries it: detached, Python numbers (a step counter) as
    0-d tensors, so that transforms (grad's aux, vmap's outputs) can return it."""
    return tree_map(lambda x: x.detach() if isinstance(x, torch.Tensor) else
                    torch.tensor(x) if isinstance(x, (bool, int, float)) else x, state)


def outer_value(problem: BilevelProblem, params: PyTree, hparams: PyTree, batch: Any):
    """f(w, λ, b^out); a :class:`bilevel.PerStep` outer batch is evaluated at k = 0."""
    return outer_value_aux(problem, params, hparams, batch)[0]


def outer_value_aux(problem: BilevelProblem, params: PyTree, hparams: PyTree, batch: Any):
    """``(f(w, λ, b^out), aux)``: aux (detached) of a ``has_aux`` problem, else ``()``."""
    out = call_loss(problem.outer_loss, "outer_loss", params, hparams, batch_at(batch, 0),
                    has_aux=problem.has_aux)
    return out if problem.has_aux else (out, ())


def tail_hypergrad(problem: BilevelProblem, solver: InnerSolver, hparams: PyTree,
                   inner_batch: Any, outer_batch: Any, params0: PyTree | None,
                   tracked: int, state0: PyTree | None = None) -> HypergradResult:
    """Reverse-mode hypergradient through the last ``tracked`` of ``solver.steps`` steps
    (steps K − T .. K − 1 replay batches K − T .. K − 1 of a per-step ``inner_batch``)."""
    steps = solver.steps
    const = tree_detach(hparams)
    (w_pre, s_pre), pre_losses = run(problem, solver, const, inner_batch,
                                     start_carry(problem, solver, const, params0, state0),
                                     steps - tracked)
    w_pre, s_pre = tree_detach(w_pre), tree_detach(s_pre)
    delta = None
    if problem.init is not None and tracked < steps:  # keep the identity path through w_0
        delta = tree_detach(tree_sub(w_pre, problem.init(const)))

    def objective(h: PyTree, inner_batch: Any, outer_batch: Any):
        if problem.init is None:
            w = w_pre
        elif delta is None:  # nothing untracked: w_0 = init(λ) itself
            w = problem.init(h)
        else:
            w = tree_map(torch.add, problem.init(h), delta)
        (w_K, s_K), losses = run(problem, solver, h, inner_batch, (w, s_pre), tracked,
                                 start=steps - tracked)
        f, aux = outer_value_aux(problem, w_K, h, outer_batch)
        return f, (tree_detach(w_K), state_out(s_K), losses, aux)

    grads, (f, (w_K, s_K, losses, aux)) = grad_and_value(objective, has_aux=True)(
        hparams, inner_batch, outer_batch)
    trace = stack_losses(pre_losses + list(losses), f)
    return HypergradResult(grads, w_K, f.detach(), {"inner_loss": trace}, s_K, aux)
