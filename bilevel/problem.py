"""The bilevel problem and the result of a hypergradient computation.

.. math::  \\min_\\lambda F(\\lambda) = f(w^*(\\lambda), \\lambda)
           \\quad\\text{s.t.}\\quad w^*(\\lambda) \\approx \\arg\\min_w g(w, \\lambda)

``g`` is the inner (lower-level) loss, ``f`` the outer (upper-level) loss; both take
``(params, hparams, batch)`` and return a scalar. Parameters ``w`` and hyperparameters
``lambda`` are pytrees of floating tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._pytree import register_pytree_node, tree_map

from .pytree import PyTree, tree_paths

Loss = Callable[[PyTree, PyTree, Any], torch.Tensor]


class BilevelError(ValueError):
    """Bad input to the bilevel machinery (the message names the problem and the leaf)."""


@dataclass(frozen=True)
class BilevelProblem:
    """``inner_loss`` = g(w, λ, batch), ``outer_loss`` = f(w, λ, batch), ``init`` = w_0(λ).

    ``init`` is for problems whose inner start point depends on the hyperparameters (MAML-type:
    ``init=lambda h: h``). Leave it ``None`` and pass ``params0`` to :func:`bilevel.hypergrad`
    when the start point is fixed (hyperparameter optimisation).

    ``has_aux=True``: ``outer_loss`` returns ``(f, aux)``, ``aux`` a pytree of tensors computed
    alongside f (e.g. the query accuracy from the same logits: no second forward). Every
    estimator returns it, detached, as ``res.aux`` (evaluated at w_K, like ``res.outer_loss``);
    under ``vmap`` it is stacked like the other outputs. Without aux ``res.aux`` is ``()``.
    """

    inner_loss: Loss
    outer_loss: Loss
    init: Callable[[PyTree], PyTree] | None = None
    has_aux: bool = False

    def __post_init__(self) -> None:
        for name in ("inner_loss", "outer_loss"):
            if not callable(getattr(self, name)):
                raise BilevelError(f"BilevelProblem.{name} must be callable, got "
                                   f"{type(getattr(self, name)).__name__}")
        if self.init is not None and not callable(self.init):
            raise BilevelError("BilevelProblem.init must be callable (hparams -> params) or None")

    def start(self, hparams: PyTree, params0: PyTree | None) -> PyTree:
        """w_0: ``init(hparams)`` or the given ``params0``; exactly one must be available."""
        if self.init is not None and params0 is not None:
            raise BilevelError("give either problem.init or params0, not both "
                               "(init(hparams) already defines the start point)")
        if self.init is None and params0 is None:
            raise BilevelError("no start point: pass params0=... or define problem.init")
        params = self.init(hparams) if self.init is not None else params0
        check_floating(params, "params0" if self.init is None else "init(hparams)")
        return params


@dataclass
class HypergradResult:
    """``grad``: pytree like hparams, dF/dλ as the estimator defines it; ``params``: w_K;
    ``outer_loss``: f(w_K, λ); ``info``: tensors (inner-loss trace, linear-solve residual,
    ``warnings/<kind>`` counts...); ``state``: the solver state s_K after the last inner step
    (detached; ``()`` for stateless solvers), to warm-start the next call with
    ``hypergrad(..., params0=res.params, state0=res.state)``; ``aux``: the outer loss's
    auxiliary output at w_K (detached) for a ``BilevelProblem(..., has_aux=True)``, else ``()``.
    A pytree: ``vmap`` returns it."""

    grad: PyTree
    params: PyTree
    outer_loss: torch.Tensor
    info: dict[str, torch.Tensor] = field(default_factory=dict)
    state: PyTree = ()
    aux: PyTree = ()


register_pytree_node(
    HypergradResult,
    lambda r: ([r.grad, r.params, r.outer_loss, r.info, r.state, r.aux], None),
    lambda c, _: HypergradResult(*c),
)


def check_floating(tree: PyTree, what: str) -> None:
    """Every leaf must be a floating-point tensor; the error names the offending leaf."""
    pairs = tree_paths(tree)
    if not pairs:
        raise BilevelError(f"{what} is empty: expected a pytree of floating tensors")
    for path, leaf in pairs:
        name = f"{what}{path}"
        if not isinstance(leaf, torch.Tensor):
            raise BilevelError(f"{name} is a {type(leaf).__name__}, expected a floating tensor "
                               f"(wrap numbers with torch.tensor(..., dtype=torch.float64))")
        if not leaf.is_floating_point():
            raise BilevelError(f"{name} has dtype {leaf.dtype}: hyperparameters and parameters "
                               f"must be floating tensors to be differentiable")


def describe_leaves(what: str, tree: PyTree, limit: int = 8) -> str:
    """``params['w'], params['b']`` (the first ``limit``), or ``params (a single tensor)``."""
    pairs = tree_paths(tree)
    if len(pairs) == 1 and pairs[0][0] == "":
        return f"{what} (a single tensor)"
    names = [f"{what}{p}" for p, _ in pairs[:limit]]
    more = f" and {len(pairs) - limit} more" if len(pairs) > limit else ""
    return (", ".join(names) + more) if names else f"{what} (empty)"


def call_loss(fn: Loss, name: str, params: PyTree, hparams: PyTree, batch: Any,
              has_aux: bool = False):
    """Evaluate a loss, turning structure mismatches and non-scalar outputs into clear errors;
    with ``has_aux`` the loss returns ``(scalar, aux)`` and ``(scalar, detached aux)`` is
    returned.

    A ``KeyError`` (a params/hparams lookup) is reported as a structure mismatch, naming the
    leaves; an ``IndexError``/``AttributeError`` is re-raised as :class:`BilevelError` naming
    the loss, without that hint (it may come from the batch or the loss itself); any other
    error keeps its type and gets a note naming the loss."""
    try:
        out = fn(params, hparams, batch)
    except KeyError as e:
        raise BilevelError(f"{name} failed with KeyError: {e} on params with leaves "
                           f"{describe_leaves('params', params)} and hparams with leaves "
                           f"{describe_leaves('hparams', hparams)}. Do params0/init(hparams) "
                           f"and hparams have the structure {name} expects?") from e
    except (IndexError, AttributeError) as e:
        raise BilevelError(f"{name}(params, hparams, batch) raised {type(e).__name__}: {e}") \
            from e
    except Exception as e:
        if hasattr(e, "add_note") and not isinstance(e, BilevelError):
            e.add_note(f"(raised in {name}(params, hparams, batch))")
        raise
    if has_aux:
        if not isinstance(out, tuple) or len(out) != 2:
            raise BilevelError(f"{name} must return a pair (loss, aux) for a "
                               f"BilevelProblem(..., has_aux=True), got "
                               f"{type(out).__name__}")
        out, aux = out
        _check_scalar(out, name)
        return out, tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, aux)
    _check_scalar(out, name)
    return out


def _check_scalar(out: Any, name: str) -> None:
    if not isinstance(out, torch.Tensor):
        raise BilevelError(f"{name} returned {type(out).__name__}, expected a scalar tensor")
    if out.dim() != 0:
        raise BilevelError(f"{name} returned a tensor of shape {tuple(out.shape)}; "
                           f"it must return a scalar (reduce with .mean() or .sum())")
    if not out.is_floating_point():
        raise BilevelError(f"{name} returned dtype {out.dtype}, expected a floating scalar")
