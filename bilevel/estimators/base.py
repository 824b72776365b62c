"""The estimator protocol: ``estimator(problem, solver, hparams, inner_batch, outer_batch,
params0) -> HypergradResult``; ``validate(problem, solver, hparams)`` rejects combinations that
make no sense before any work is done."""

from __future__ import annotations

import warnings
from typing import Any

from ..problem import BilevelProblem, HypergradResult
from ..pytree import PyTree
from ..solvers import InnerSolver


class Estimator:
    """Base class of the hypergradient estimators (one module each)."""

    #: True if the estimator returns the exact derivative of the K-step trajectory.
    exact: bool = False

    def validate(self, problem: BilevelProblem, solver: InnerSolver, hparams: PyTree) -> None:
        """Raise or warn on estimator/solver combinations that make no sense."""

    def __call__(self, problem: BilevelProblem, solver: InnerSolver, hparams: PyTree,
                 inner_batch: Any, outer_batch: Any, params0: PyTree | None) -> HypergradResult:
        raise NotImplementedError

    def __repr__(self) -> str:
        fields = getattr(self, "__dataclass_fields__", {})
        args = ", ".join(f"{k}={getattr(self, k)!r}" for k in fields if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


_WARNED: set[tuple[str, str]] = set()


def warn_once(owner: object, key: str, message: str, category=RuntimeWarning) -> None:
    """Warn once per process for each (estimator class, kind of problem): training loops call
    us every step, often with a fresh estimator object. :func:`reset_warnings` re-arms them."""
    tag = (type(owner).__name__, key)
    if tag not in _WARNED:
        _WARNED.add(tag)
        warnings.warn(message + " [shown once; values are in res.info]", category, stacklevel=4)


def reset_warnings() -> None:
    """Show every once-only warning again."""
    _WARNED.clear()
