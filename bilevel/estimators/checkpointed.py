"""Exact unrolled hypergradient with O(√K) memory by recomputation (checkpointing).

Forward: run the K steps with no graph, keeping only the carry (w, s) at the start of each of
S segments. Backward, segment by segment from the last: recompute the segment from its
checkpoint under ``torch.func.vjp`` and pull the adjoint back,

.. math:: (u_w, u_s) \\leftarrow \\Big(\\tfrac{\\partial c_{end}}{\\partial c_{start}}\\Big)^\\top
          (u_w, u_s), \\qquad \\hat g \\mathrel{+}= \\Big(\\tfrac{\\partial c_{end}}
          {\\partial \\lambda}\\Big)^\\top (u_w, u_s),

starting from u_w = ∇_w f(w_K, λ), ĝ = ∇_λ f(w_K, λ), and finishing with
ĝ += (∂w_0/∂λ)ᵀ u_w. A per-step ``inner_batch`` is replayed by global step index (segment i
recomputes steps k_i .. k_i + n_i − 1 with their own batches). Same value as
:class:`Unrolled`; memory O(S·d + (K/S)·(d + A)), minimal at S ≈ √K (the default);
cost ≈ 2K gradients + K Hessian-vector products.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..autodiff import vjp
from ..problem import BilevelError, HypergradResult
from ..pytree import tree_add, tree_detach, tree_zeros_like
from ..unroll import outer_value_aux, run, stack_losses, start_carry, state_out
from .base import Estimator


@dataclass
class Checkpointed(Estimator):
    """Exact reverse mode, storing only ``segments`` checkpoints (default ⌈√K⌉)."""

    segments: int | None = None
    exact = True

    def __post_init__(self) -> None:
        if self.segments is not None and (not isinstance(self.segments, int) or self.segments < 1):
            raise BilevelError(f"Checkpointed(segments=...) must be a positive int or None, got "
                               f"{self.segments!r}")

    def segment_lengths(self, steps: int) -> list[int]:
        if steps == 0:
            return []
        n = min(self.segments or math.ceil(math.sqrt(steps)), steps)
        base, extra = divmod(steps, n)
        return [base + (i < extra) for i in range(n)]

    def __call__(self, problem, solver, hparams, inner_batch, outer_batch, params0,
                 state0=None):
        const = tree_detach(hparams)
        carry = tree_detach(start_carry(problem, solver, const, params0, state0))
        checkpoints, losses = [], []
        lengths = self.segment_lengths(solver.steps)
        starts = [sum(lengths[:i]) for i in range(len(lengths))]  # global first step of each
        for n, k0 in zip(lengths, starts, strict=True):
            checkpoints.append(carry)
            carry, seg_losses = run(problem, solver, const, inner_batch, carry, n, start=k0)
            carry = tree_detach(carry)
            losses += seg_losses
        w_K, s_K = carry

        f, pull_outer, aux = vjp(lambda w, h: outer_value_aux(problem, w, h, outer_batch),
                                 w_K, hparams, has_aux=True)
        u_w, grads = pull_outer(torch.ones_like(f))
        u = (u_w, tree_zeros_like(s_K))
        for n, k0, checkpoint in zip(reversed(lengths), reversed(starts), reversed(checkpoints),
                                     strict=True):
            segment = lambda c, h, n=n, k0=k0: run(  # noqa: E731  (replays steps k0 .. k0+n-1)
                problem, solver, h, inner_batch, c, n, start=k0)[0]
            _, pull_segment = vjp(segment, checkpoint, hparams)
            u, g_seg = pull_segment(u)
            grads = tree_add(grads, g_seg)
        if problem.init is not None:
            _, pull_init = vjp(problem.init, hparams)
            grads = tree_add(grads, pull_init(u[0])[0])
        info = {"inner_loss": stack_losses(losses, f), "segments": torch.tensor(len(lengths))}
        return HypergradResult(grads, w_K, f.detach(), info, state_out(s_K), aux)
