"""The estimator protocol: ``estimator(problem, solver, hparams, inner_batch, outer_batch,
params0, state0=None) -> HypergradResult`` (``state0``: the solver state to start from, None
for ``solver.init_state``; the result's ``state`` is the final one, detached);
``validate(problem, solver, hparams)`` rejects combinations that make no sense before any work
is done."""

from __future__ import annotations

from typing import Any

from ..diagnostics import reset_warnings, warn  # noqa: F401  (re-exported)
from ..problem import BilevelProblem, HypergradResult
from ..pytree import PyTree
from ..solvers import InnerSolver


class Estimator:
    """Base class of the hypergradient estimators (one module each)."""

    #: True if the estimator returns the exact derivative of the K-step trajectory.
    exact: bool = False

    def validate(self, problem: BilevelProblem, solver: InnerSolver, hparams: PyTree) -> None:
        """Raise or warn on estimator/solver combinations that make no sense."""

    def precheck(self, problem: BilevelProblem, solver: InnerSolver, hparams: PyTree,
                 inner_batch: Any, outer_batch: Any, params0: PyTree | None,
                 state0: PyTree | None = None) -> None:
        """The once-per-problem structural checks of :meth:`__call__` (refusals), run ahead
        of a compiled call (they need concrete values; the call then finds them done)."""

    def __call__(self, problem: BilevelProblem, solver: InnerSolver, hparams: PyTree,
                 inner_batch: Any, outer_batch: Any, params0: PyTree | None,
                 state0: PyTree | None = None) -> HypergradResult:
        raise NotImplementedError

    def __repr__(self) -> str:
        fields = getattr(self, "__dataclass_fields__", {})
        args = ", ".join(f"{k}={getattr(self, k)!r}" for k in fields if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


def warn_once(owner: object, key: str, message: str, category=RuntimeWarning) -> None:
    """A rate-limited warning of kind ``key`` for this estimator (occurrences 1, 10, 100, ...
    are shown; see :mod:`bilevel.diagnostics`). :func:`reset_warnings` re-arms them."""
    warn(owner, key, message, category, stacklevel=5)
