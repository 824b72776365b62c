"""Refuse hyperparameters an estimator cannot differentiate (before any inner step runs).

The implicit hypergradient is ĝ = ∇_λ f(w*, λ) − ∇²_λw g(w*, λ) v with w* = argmin_w g(w, λ):
it differentiates the fixed point of the LOSSES only. So under Implicit/HistoryFree

- a leaf that neither g nor f reads (only init(λ)) gets exactly 0, whatever its effect on w_K;
- a leaf that the SOLVER reads is refused too, even if a loss reads it as well: the solver's
  fixed point may not be argmin g (Adam's coupled weight_decay converges to
  argmin g + wd/2‖w‖²), and where it is (a learning rate, a momentum, Adam's betas) it does not
  depend on the leaf, so the IFT gives 0 for the solver's part of it.

The first-order estimator ĝ = ∇_λ f + (∂w_0/∂λ)ᵀ ∇_w f gives 0 to a leaf that neither f nor
init reads. All are refused, naming the leaf.

Which leaves a function reads is decided structurally, not from values (a leaf whose gradient
happens to be 0 at this point is still read):

- at the top level (no ``torch.func`` transform active): one autograd pass over detached copies,
  ``torch.autograd.grad(outputs, leaves, allow_unused=True)`` is ``None`` for an unread leaf;
- under ``vmap``/``grad``/``jvp`` (autograd cannot mark transformed tensors): a
  ``TorchFunctionMode`` records which leaf objects enter any torch operation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from ..autodiff import _transform_active
from ..data import batch_at
from ..problem import BilevelError, call_loss
from ..pytree import (
    PyTree,
    tree_detach,
    tree_flatten,
    tree_leaves,
    tree_map,
    tree_paths,
    tree_unflatten,
)
from ..unroll import outer_value


class _Reads(TorchFunctionMode):
    """Records which of the watched tensor objects enter a torch function."""

    def __init__(self, watched: list[torch.Tensor]) -> None:
        super().__init__()
        self.ids = {id(t): i for i, t in enumerate(watched)}
        self.seen: set[int] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for x in tree_leaves((args, kwargs)):
            i = self.ids.get(id(x)) if isinstance(x, torch.Tensor) else None
            if i is not None:
                self.seen.add(i)
        return func(*args, **kwargs)


def _rng_untouched(leaves: list[torch.Tensor]):
    """The check's own forward must not consume random numbers (dropout): a run with the check
    draws the same masks as one without it (loop == vmap replays rely on it)."""
    cuda = sorted({x.device.index or 0 for x in leaves if x.device.type == "cuda"})
    return torch.random.fork_rng(devices=cuda)


def unread_leaves(fn: Callable[[PyTree], Any], hparams: PyTree) -> list[str]:
    """Paths of the leaves of ``hparams`` that no tensor output of ``fn(hparams)`` depends on."""
    leaves, spec = tree_flatten(hparams)
    paths = [p for p, _ in tree_paths(hparams)]
    if _transform_active():
        mode = _Reads(leaves)
        with _rng_untouched(leaves), mode:
            fn(hparams)
        return [p for i, p in enumerate(paths) if i not in mode.seen]
    copies = [x.detach().requires_grad_(True) for x in leaves]
    with _rng_untouched(leaves), torch.enable_grad():
        outs = [o for o in tree_leaves(fn(tree_unflatten(copies, spec)))
                if isinstance(o, torch.Tensor) and o.requires_grad]
        if not outs:
            return paths
        found = torch.autograd.grad([o.sum() for o in outs], copies, allow_unused=True)
    return [p for p, g in zip(paths, found, strict=True) if g is None]


def solver_reads(solver, hparams: PyTree, w0: PyTree, state: PyTree, batch: Any) -> list[str]:
    """Paths of the leaves of ``hparams`` that one ``solver.step`` reads (recorded structurally
    as they enter a torch op), with a dummy gradient map ∇g ≡ 1 that reads no hyperparameter, so
    the losses' reads are excluded. The step's output is discarded; the RNG is untouched."""
    leaves, _ = tree_flatten(hparams)
    paths = [p for p, _ in tree_paths(hparams)]
    w0 = tree_detach(w0)
    zero = torch.zeros(())  # made outside the recorder (even .dtype of a leaf is recorded)

    def ones_grad(p, h, b):
        return tree_map(torch.ones_like, p), zero

    mode = _Reads(leaves)
    with _rng_untouched(leaves), torch.no_grad(), mode:
        solver.step(ones_grad, w0, state, hparams, batch)
    return [p for i, p in enumerate(paths) if i in mode.seen]


def _names(paths: list[str]) -> str:
    return ", ".join(f"hparams{p}" for p in paths)


def _seen(est: object, key: tuple) -> bool:
    """True if ``est`` already checked this (problem, hparams structure); else remember it.
    The key holds the loss functions themselves (not their ids), so it cannot be reused."""
    checked = est.__dict__.setdefault("_checked_reads", [])
    if key in checked:
        return True
    if len(checked) >= 16:
        checked.clear()
    checked.append(key)
    return False


def _key(problem, hparams: PyTree, *extra) -> tuple:
    return (problem.inner_loss, problem.outer_loss, problem.init,
            tuple((p, tuple(x.shape)) for p, x in tree_paths(hparams)), _transform_active(),
            *extra)


def refuse_unread(est: object, problem, hparams: PyTree, w0: PyTree, inner_batch: Any,
                  outer_batch: Any, solver=None, state: PyTree = None) -> None:
    """Implicit/HistoryFree: every leaf must be read by g or f (evaluated at w_0, detached), and
    none by the solver (one dummy step from (w_0, s_0)).
    Checked once per estimator and (problem, solver, hparams structure); skipped while Dynamo
    traces (:class:`bilevel.CompiledHypergrad` runs it eagerly first, via ``precheck``)."""
    if torch.compiler.is_compiling():
        return
    key = _key(problem, hparams, None if solver is None else (type(solver), repr(solver)))
    if key in est.__dict__.get("_checked_reads", []):
        return
    w0 = tree_detach(w0)
    name = type(est).__name__
    by_solver = [] if solver is None or solver.steps == 0 else \
        solver_reads(solver, hparams, w0, state, batch_at(inner_batch, 0))

    def losses(h):
        return (call_loss(problem.inner_loss, "inner_loss", w0, h, batch_at(inner_batch, 0)),
                outer_value(problem, w0, h, outer_batch))

    unread = unread_leaves(losses, hparams)
    if by_solver:
        shared = [p for p in by_solver if p not in unread]
        only = [p for p in by_solver if p in unread]
        why = []
        if shared:
            why.append(f"{_names(shared)} is also read by a loss, but the solver's fixed point "
                       f"may differ from argmin g (e.g. Adam's coupled weight_decay converges to "
                       f"argmin g + wd/2‖w‖²), and the implicit hypergradient "
                       f"∇_λf − ∇²_λw g·v sees only the losses' part of it")
        if only:
            why.append(f"no loss reads {_names(only)} (e.g. a learning rate or momentum): the "
                       f"fixed point does not depend on it, so its implicit derivative is "
                       f"exactly 0")
        raise BilevelError(
            f"{name} cannot differentiate {_names(by_solver)}: the inner solver "
            f"{type(solver).__name__} reads it, and the implicit function theorem "
            f"differentiates only the fixed point of the losses, w* = argmin_w g(w, λ); "
            f"{'; '.join(why)}. Move the term into the inner loss (e.g. add "
            f"wd/2·‖w‖² to g and set the solver's weight_decay=0), or differentiate the "
            f"solver's steps: bl.Unrolled(), bl.Truncated(T) or bl.ForwardMode() (few "
            f"hyperparameters)")
    if unread:
        raise BilevelError(
            f"{name} cannot differentiate {_names(unread)}: neither the inner nor the outer loss "
            f"reads it (e.g. it only enters init(hparams)), and the implicit hypergradient "
            f"∇_λf − ∇²_λw g·v is exactly 0 for such a leaf (w* = argmin_w g does not depend on "
            f"it). Differentiate the solver's steps instead: bl.Unrolled(), bl.Truncated(T) or "
            f"bl.ForwardMode() (few hyperparameters); for MAML-type problems add a proximal "
            f"term (bl.proximal)")
    _seen(est, key)


def refuse_first_order(est: object, problem, solver, hparams: PyTree, params0: PyTree | None,
                       outer_batch: Any) -> None:
    """FirstOrder: every leaf must be read by f or by init (ĝ is 0 for the others)."""
    if solver.steps == 0 or torch.compiler.is_compiling():  # (compiled: prechecked eagerly)
        return  # w_K = w_0: the first-order hypergradient is exact
    key = _key(problem, hparams, params0 is None)
    if key in est.__dict__.get("_checked_reads", []):
        return

    def reads(h):
        w = problem.start(h, params0) if problem.init is not None else tree_detach(params0)
        f = outer_value(problem, tree_detach(w), h, outer_batch)
        return (f, w) if problem.init is not None else f

    unread = unread_leaves(reads, hparams)
    if unread:
        where = "neither the outer loss nor init(hparams) reads it" if problem.init is not None \
            else "the outer loss does not read it and the start point params0 is fixed"
        raise BilevelError(
            f"{est!r} cannot differentiate {_names(unread)}: {where}, so "
            f"its first-order hypergradient ∇_λf + (∂w_0/∂λ)ᵀ∇_w f is exactly 0 (dw_K/dλ is "
            f"dropped). Use bl.Unrolled(), bl.Truncated(T) or bl.ForwardMode(), or "
            f"bl.Implicit() if the inner loss reads it")
    _seen(est, key)
