"""Truncated back-propagation (K-RMD, Shaban et al. 2019): reverse through the last T steps.

.. math:: \\hat g_T = \\nabla_\\lambda f + \\sum_{k=K-T+1}^{K} B_k^\\top A_{k+1}^\\top\\cdots
          A_K^\\top \\nabla_w f(w_K)
          + \\Big(\\tfrac{\\partial w_0}{\\partial \\lambda}\\Big)^\\top A_{K-T+1}^\\top\\cdots
            A_K^\\top \\nabla_w f(w_K)

The first K − T steps run without a graph; where the start point depends on the
hyperparameters (w_0 = init(λ), MAML) the untracked prefix passes the identity, so T = K is
:class:`Unrolled` and T = 0 is :class:`FirstOrder`. Memory O(T·(d + A)); the bias decays like
(1 − γμ)^T on a μ-strongly convex inner problem with step γ.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..problem import BilevelError
from ..unroll import tail_hypergrad
from .base import Estimator
from .refusals import refuse_first_order


@dataclass
class Truncated(Estimator):
    """Reverse-mode through the last ``steps`` inner steps only."""

    steps: int

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or self.steps < 0:
            raise BilevelError(f"Truncated(steps=...) must be a non-negative int, got "
                               f"{self.steps!r}")

    def validate(self, problem, solver, hparams):
        if self.steps > solver.steps:
            raise BilevelError(f"Truncated(steps={self.steps}) tracks more steps than the solver "
                               f"runs ({solver.steps}); use at most {solver.steps} or Unrolled()")

    def precheck(self, problem, solver, hparams, inner_batch, outer_batch, params0,
                 state0=None):
        if self.steps == 0:
            refuse_first_order(self, problem, solver, hparams, params0, outer_batch)

    def __call__(self, problem, solver, hparams, inner_batch, outer_batch, params0,
                 state0=None):
        if self.steps == 0:  # = FirstOrder: the same exact-zero leaves are refused
            refuse_first_order(self, problem, solver, hparams, params0, outer_batch)
        return tail_hypergrad(problem, solver, hparams, inner_batch, outer_batch, params0,
                              tracked=self.steps, state0=state0)
