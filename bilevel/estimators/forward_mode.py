"""Exact hypergradient of the K-step trajectory by forward-mode (jvp) accumulation.

For every direction e_i of the hyperparameter space, push tangents through the trajectory,

.. math:: \\dot w_{k+1} = A_k \\dot w_k + B_k e_i,\\quad \\dot w_0 = \\tfrac{\\partial w_0}
          {\\partial\\lambda} e_i,\\qquad \\hat g_i = \\nabla_w f(w_K)^\\top \\dot w_K
          + \\partial_{\\lambda_i} f,

all P directions at once with ``vmap`` over ``jvp`` (HVPs forward-over-reverse). Memory is
independent of K (no trajectory is stored) but proportional to P (the number of hyperparameter
elements, bounded by ``chunk_size``); cost ∝ P·K. The right tool for a handful of
hyperparameters (learning rate, weight decay), not for MAML's millions.

Below float64, every loss sees its ``params``/``hparams`` (and returns its value) with tangents
cast back to the primal dtype: torch 2.13's jvp of a 0-d float32 tensor times a Python float
(``0.5 * h["decay"]``) gives a float64 tangent, which the next matmul would refuse.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from dataclasses import dataclass

import torch
from torch.func import jvp, vmap

from ..data import PerStep, batch_at
from ..problem import BilevelError, HypergradResult
from ..pytree import tree_basis, tree_detach, tree_from_vector, tree_leaves, tree_map, tree_numel
from ..unroll import outer_value_aux, run, stack_losses, start_carry, state_out
from .base import Estimator, warn_once


@functools.cache
def _quiet_jvp_import() -> None:
    """torch's first jvp imports its jvp decompositions, whose ``torch.jit.script`` calls emit
    ~18 "torch.jit.script is deprecated" DeprecationWarnings (torch internals, nothing the user
    can act on): import them once with only that message filtered."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated",
                                category=DeprecationWarning)
        try:
            import torch._decomp.decompositions_for_jvp  # noqa: F401
        except ImportError:  # another torch version: nothing to quieten
            pass


_quiet_jvp_import()  # at import time: never inside a traced (compiled) call


class _TangentAsPrimal(torch.autograd.Function):
    """Identity whose forward-mode tangent is cast to the primal's dtype."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.dtype = inputs[0].dtype

    @staticmethod
    def jvp(ctx, tangent):
        return tangent.to(ctx.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad


def _cast_tangents(tree):
    return tree_map(lambda x: _TangentAsPrimal.apply(x)
                    if isinstance(x, torch.Tensor) and x.is_floating_point() else x, tree)


def _dtype_safe(problem):
    """``problem`` with losses whose inputs' and value's tangents keep the primal dtype."""
    def wrap(loss):
        def cast_loss(w, h, b):
            return _TangentAsPrimal.apply(loss(_cast_tangents(w), _cast_tangents(h), b))
        return cast_loss
    return dataclasses.replace(problem, inner_loss=wrap(problem.inner_loss),
                               outer_loss=wrap(problem.outer_loss))


@dataclass
class ForwardMode(Estimator):
    """Forward-mode accumulation; ``chunk_size`` bounds how many directions run together."""

    chunk_size: int | None = None
    max_hparams: int = 10_000
    exact = True

    def __post_init__(self) -> None:
        if self.chunk_size is not None and self.chunk_size < 1:
            raise BilevelError(f"ForwardMode(chunk_size=...) must be >= 1, got {self.chunk_size}")

    def validate(self, problem, solver, hparams):
        n = tree_numel(hparams)
        if n > self.max_hparams:
            warn_once(self, "size", f"ForwardMode costs one tangent per hyperparameter element and "
                      f"hparams has {n}; reverse mode (Unrolled/Checkpointed) is far cheaper here")

    def __call__(self, problem, solver, hparams, inner_batch, outer_batch, params0,
                 state0=None):
        # per-step batches are drawn once, here, outside the vmap over tangents (a PerStep fn
        # then need not be vmap-safe, and every tangent sees the same batches)
        inner = [batch_at(inner_batch, k) for k in range(solver.steps)]
        outer = batch_at(outer_batch, 0)
        if any(x.dtype != torch.float64 for x in tree_leaves((hparams, params0))
               if isinstance(x, torch.Tensor) and x.is_floating_point()):
            problem = _dtype_safe(problem)

        def objective(h):
            carry = start_carry(problem, solver, h, params0, state0)
            (w_K, s_K), losses = run(problem, solver, h, PerStep(lambda k: inner[k]), carry,
                                     solver.steps)
            f, aux = outer_value_aux(problem, w_K, h, outer)
            return f, (tree_detach(w_K), state_out(s_K), stack_losses(losses, f), aux)

        def directional(tangent):
            f, df, aux = jvp(objective, (hparams,), (tangent,), has_aux=True)
            return df, f, aux

        dfs, f, (w_K, s_K, trace, aux) = vmap(directional, chunk_size=self.chunk_size)(
            tree_basis(hparams))
        grads = tree_from_vector(dfs, hparams)
        first = lambda t: t[0]  # noqa: E731  (vmap broadcast the primal outputs)
        return HypergradResult(grads, tree_map(first, w_K), f[0].detach(),
                               {"inner_loss": trace[0]}, tree_map(first, s_K),
                               tree_map(first, aux))
