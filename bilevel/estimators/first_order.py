"""First-order approximation (FO-MAML), and the exact Sign-MAML meta-gradient.

.. math:: \\hat g = \\nabla_\\lambda f(w_K, \\lambda)
          + \\Big(\\tfrac{\\partial w_0}{\\partial \\lambda}\\Big)^\\top \\nabla_w f(w_K, \\lambda)

i.e. dw_K/dw_0 ≈ I and the inner steps' direct dependence on λ is dropped. With the signSGD
inner solver (:class:`bilevel.SignGD`) this is EXACT almost everywhere (Fan, Ram, Liu 2021):
d sign(u)/du = 0 for u ≠ 0, so every step's Jacobian is the identity. Memory O(d + A), flat
in K; cost K + 1 gradients. A hyperparameter leaf that neither f nor init reads (an inner
learning rate; any λ with a fixed ``params0`` and an outer loss that ignores it) would get
exactly 0 and is refused with a :class:`bilevel.BilevelError`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..unroll import tail_hypergrad
from .base import Estimator
from .refusals import refuse_first_order


@dataclass
class FirstOrder(Estimator):
    """FO-MAML: differentiate f(w_K, λ) with the inner trajectory held constant."""

    def precheck(self, problem, solver, hparams, inner_batch, outer_batch, params0,
                 state0=None):
        refuse_first_order(self, problem, solver, hparams, params0, outer_batch)

    def __call__(self, problem, solver, hparams, inner_batch, outer_batch, params0,
                 state0=None):
        refuse_first_order(self, problem, solver, hparams, params0, outer_batch)
        return tail_hypergrad(problem, solver, hparams, inner_batch, outer_batch, params0,
                              tracked=0, state0=state0)
