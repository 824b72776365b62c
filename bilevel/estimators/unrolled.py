"""Unrolled reverse-mode hypergradient (MAML; ITD of Grazzi et al. 2020).

.. math:: \\hat g = \\nabla_\\lambda f(w_K, \\lambda)
          + \\sum_{k=1}^{K} B_k^\\top A_{k+1}^\\top \\cdots A_K^\\top \\nabla_w f(w_K, \\lambda)
          + \\Big(\\tfrac{\\partial w_0}{\\partial \\lambda}\\Big)^\\top A_1^\\top\\cdots A_K^\\top
            \\nabla_w f(w_K, \\lambda)

with A_k = ∂Φ/∂w and B_k = ∂Φ/∂λ at step k. Exact for the K-step trajectory. Memory O(K·(d + A))
(every step's graph is kept); cost ≈ K gradients forward + K Hessian-vector products backward.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..unroll import tail_hypergrad
from .base import Estimator


@dataclass
class Unrolled(Estimator):
    """Reverse-mode through all K inner steps (second-order MAML)."""

    exact = True

    def __call__(self, problem, solver, hparams, inner_batch, outer_batch, params0,
                 state0=None):
        return tail_hypergrad(problem, solver, hparams, inner_batch, outer_batch, params0,
                              tracked=solver.steps, state0=state0)
