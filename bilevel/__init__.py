"""bilevel: verified hypergradient estimators on torch.func.

min_λ f(w*(λ), λ)  s.t.  w*(λ) ≈ argmin_w g(w, λ); parameters and hyperparameters are pytrees.
"""

from . import autodiff, hpo, stochastic
from .adaptive import Adam, AdamW, RMSprop
from .compiled import CompiledHypergrad, compiled_hypergrad
from .data import Minibatches, PerStep
from .diagnostics import reset_warnings
from .estimators import (
    Checkpointed,
    Estimator,
    FirstOrder,
    ForwardMode,
    HistoryFree,
    Implicit,
    Truncated,
    Unrolled,
)
from .hypergrad import accumulate_grad, check_result, hypergrad, proximal, solve
from .linsolve import CG, Neumann
from .modules import ModuleBilevelProblem, ModuleProblem, ModuleSolver, module_problem
from .online import Online
from .problem import BilevelError, BilevelProblem, HypergradResult
from .solvers import SAM, GradientDescent, InnerSolver, Momentum, SignGD

__version__ = "0.1.0"

__all__ = [
    "BilevelError", "BilevelProblem", "HypergradResult", "hypergrad", "check_result", "proximal",
    "solve", "GradientDescent", "Momentum", "SignGD", "SAM", "Adam", "AdamW", "RMSprop",
    "InnerSolver", "CG", "Neumann",
    "Estimator", "Unrolled", "Truncated", "Checkpointed", "Implicit", "ForwardMode", "FirstOrder",
    "HistoryFree", "reset_warnings", "autodiff", "PerStep", "Minibatches", "accumulate_grad",
    "module_problem", "ModuleProblem", "ModuleBilevelProblem", "ModuleSolver", "Online",
    "stochastic", "hpo", "compiled_hypergrad", "CompiledHypergrad",
]
