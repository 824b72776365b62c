"""Reverse-mode derivatives with ``torch.func`` semantics, on plain autograd when that is safe.

``grad_and_value`` and ``vjp`` here have the signatures of their ``torch.func`` namesakes and
give the same numbers. When no ``torch.func`` transform is active (no enclosing ``vmap``,
``grad``, ``jvp``: the usual top-level call) they run on ``torch.autograd`` instead:

- a ``torch.func`` gradient always builds the graph of its own backward
  (``create_graph=True``), because an outer transform might differentiate it again. At the top
  level nothing will, unless an input (or a batch tensor passed as an argument) requires grad:
  here ``create_graph`` is ``torch.is_grad_enabled() and any(input.requires_grad)``, so the
  outermost backward of a hypergradient keeps no second-order graph;
- ``torch.func.grad`` re-dispatches every op of the differentiated function through its
  functorch wrapper; plain autograd does not.

Measured on Conv4 (64 filters), 8 tasks 5-way 1-shot, 15 queries, K=1, 1 CPU thread,
torch 2.13: one MAML meta-gradient 543 ms / 69 MiB with ``torch.func`` at every level, 269 ms
/ 21 MiB on plain autograd (= the hand-written PyTorch loop); ``benchmarks/`` has the full
comparison. Under a transform (``vmap`` over tasks, a user's ``torch.func.grad`` around
``bl.hypergrad``) both fall back to ``torch.func``, so composability is unchanged.

Inputs are aliased before differentiation (a detached leaf, or a view of a tensor that already
requires grad), so the derivative is the partial one with respect to that argument even when
the same tensor object also appears in another argument (MAML's w_0 = θ), as with
``torch.func``. Tensors captured in closures are seen by the differentiated function but do
not switch ``create_graph`` on: pass anything that must stay differentiable as an argument.
:func:`set_eager` (or ``BILEVEL_EAGER=0`` in the environment) switches the plain-autograd
path off.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.func as tf

from .pytree import tree_flatten, tree_leaves, tree_unflatten

__all__ = ["grad_and_value", "vjp", "eager", "set_eager"]

_EAGER = os.environ.get("BILEVEL_EAGER", "1") not in ("0", "false", "False", "")


def set_eager(enabled: bool) -> bool:
    """Use plain autograd at the top level (default ``True``); returns the previous setting."""
    global _EAGER
    previous, _EAGER = _EAGER, bool(enabled)
    return previous


def _transform_active() -> bool:
    level = getattr(torch._C._functorch, "maybe_current_level", None)
    if level is None:  # private API gone: assume a transform may be active (torch.func path)
        return True
    return level() is not None


def eager() -> bool:
    """True when derivatives here run on plain autograd (no torch.func transform active, not
    inside ``torch.compile``: Dynamo traces ``torch.func`` transforms, not
    ``torch.autograd.grad``)."""
    return _EAGER and not torch.compiler.is_compiling() and not _transform_active()


def _requires_grad(tree: Any) -> bool:
    return any(isinstance(x, torch.Tensor) and x.requires_grad for x in tree_leaves(tree))


def _alias(x: Any) -> Any:
    """A fresh autograd node for ``x``: the partial derivative w.r.t. it is well defined."""
    if not isinstance(x, torch.Tensor):
        return x
    return x.view_as(x) if x.requires_grad else x.detach().requires_grad_(True)


def _grads(outputs: Sequence[torch.Tensor], inputs: list[Any], cotangents, create_graph: bool,
           retain_graph: bool | None = None) -> list[Any]:
    """``torch.autograd.grad`` over the tensor inputs; zeros for unused/unreachable ones."""
    idx = [i for i, x in enumerate(inputs) if isinstance(x, torch.Tensor)]
    pairs = [(o, c) for o, c in zip(outputs, cotangents, strict=True) if o.requires_grad]
    found: Sequence[torch.Tensor | None] = [None] * len(idx)
    if pairs and idx:
        found = torch.autograd.grad([o for o, _ in pairs], [inputs[i] for i in idx],
                                    [c for _, c in pairs], retain_graph=retain_graph,
                                    create_graph=create_graph, allow_unused=True)
    out = [None] * len(inputs)
    for i, g in zip(idx, found, strict=True):
        out[i] = torch.zeros_like(inputs[i]) if g is None else g
        if not create_graph:
            out[i] = out[i].detach()
    return out


def grad_and_value(fn: Callable, argnums: int | tuple[int, ...] = 0, has_aux: bool = False
                   ) -> Callable:
    """``torch.func.grad_and_value``: ``(grads, value)`` or ``(grads, (value, aux))``."""

    def wrapped(*args):
        if not eager():
            return tf.grad_and_value(fn, argnums=argnums, has_aux=has_aux)(*args)
        create_graph = torch.is_grad_enabled() and _requires_grad(args)
        nums = (argnums,) if isinstance(argnums, int) else tuple(argnums)
        args = list(args)
        flat = {}
        for i in nums:
            leaves, spec = tree_flatten(args[i])
            leaves = [_alias(x) for x in leaves]
            flat[i] = (leaves, spec)
            args[i] = tree_unflatten(leaves, spec)
        with torch.enable_grad():
            out = fn(*args)
            value, aux = out if has_aux else (out, None)
            if not isinstance(value, torch.Tensor) or value.numel() != 1:
                raise RuntimeError(f"grad_and_value: the function must return a scalar tensor, "
                                   f"got {getattr(value, 'shape', type(value).__name__)}")
            inputs = [x for i in nums for x in flat[i][0]]
            grads = _grads([value], inputs, [torch.ones_like(value)], create_graph)
        per_arg, start = [], 0
        for i in nums:
            leaves, spec = flat[i]
            per_arg.append(tree_unflatten(grads[start:start + len(leaves)], spec))
            start += len(leaves)
        g = per_arg[0] if isinstance(argnums, int) else tuple(per_arg)
        if not create_graph:
            value = value.detach()
        return (g, (value, aux)) if has_aux else (g, value)

    return wrapped


def vjp(fn: Callable, *primals: Any, has_aux: bool = False) -> tuple[Any, ...]:
    """``torch.func.vjp``: ``(fn(*primals), pull)`` with ``pull(cotangents) -> tuple`` of one
    pytree per primal (``(out, pull, aux)`` with ``has_aux=True``, fn returning ``(out, aux)``).
    The graph is kept while ``pull`` lives (``pull`` may be called again).
    On plain autograd ``pull(cotangents, only=i)`` pulls back to primal ``i`` alone."""
    if not eager():
        return tf.vjp(fn, *primals, has_aux=has_aux)
    create_graph = torch.is_grad_enabled() and _requires_grad(primals)
    flat = [tree_flatten(p) for p in primals]
    aliased = [[_alias(x) for x in leaves] for leaves, _ in flat]
    with torch.enable_grad():
        out = fn(*[tree_unflatten(a, spec) for a, (_, spec) in zip(aliased, flat, strict=True)])
        aux = None
        if has_aux:
            out, aux = out
    out_leaves, out_spec = tree_flatten(out)

    def pull(cotangents: Any, only: int | None = None) -> tuple[Any, ...]:
        """One pytree per primal; with ``only=i`` just primal ``i``'s (the others ``None``:
        autograd then skips the parts of the graph only they need)."""
        cot = tree_leaves(cotangents)
        if len(cot) != len(out_leaves):
            raise RuntimeError(f"vjp: expected cotangents for {len(out_leaves)} outputs, got "
                               f"{len(cot)}")
        wanted = [i for i in range(len(aliased)) if only is None or i == only]
        inputs = [x for i in wanted for x in aliased[i]]
        with torch.enable_grad():
            grads = _grads(out_leaves, inputs, cot, create_graph, retain_graph=True)
        result: list[Any] = [None] * len(aliased)
        start = 0
        for i in wanted:
            n = len(aliased[i])
            result[i] = tree_unflatten(grads[start:start + n], flat[i][1])
            start += n
        return tuple(result)

    shown = out if create_graph else tree_unflatten(
        [x.detach() if isinstance(x, torch.Tensor) else x for x in out_leaves], out_spec)
    return (shown, pull, aux) if has_aux else (shown, pull)
