"""Single- and two-loop stochastic bilevel algorithms (the benchopt bilevel benchmark's).

Each algorithm is an optax-like pair of functions::

    alg = bl.stochastic.SOBA(inner_step=0.1, outer_step=0.01)
    state = alg.init(z0, x0)
    state, info = alg.step(state, problem, inner_batches, outer_batches)

with ``problem = bl.BilevelProblem(inner_loss=g, outer_loss=f)``, losses ``loss(z, x, batch)``,
and ``alg.batches_per_step`` fresh minibatches per iteration (a :class:`Sampler` draws them,
:func:`run` drives the loop). Equations in each module's docstring.
"""

from . import datasets, problems
from ._common import (
                      Minibatch,
                      Sampler,
                      Schedule,
                      StochasticAlgorithm,
                      cross_vjp,
                      hvp,
                      inner_grad,
                      inner_oracles,
                      outer_grads,
)
from .amigo import AmIGO, AmIGOState
from .f2sa import F2SA, F2SAState
from .fused import precompile
from .loop import Draws, next_batches, run
from .online import Online
from .saba import SABA, SABAState
from .soba import SOBA, SOBAState
from .srba import SRBA, SRBAState, srba_period
from .stocbio import StocBiO, StocBiOState

__all__ = ["datasets", "problems", "SOBA", "SABA", "SRBA", "AmIGO", "StocBiO", "F2SA",
           "Schedule", "Sampler", "Online", "precompile",
           "Minibatch", "StochasticAlgorithm", "run", "next_batches", "Draws", "srba_period",
           "inner_oracles", "inner_grad", "outer_grads", "hvp", "cross_vjp", "SOBAState",
           "SABAState", "SRBAState", "AmIGOState", "StocBiOState", "F2SAState"]
