"""``bl.Online``: warm-started hyperparameter tuning of a training loop, in one object.

    tuner = bl.Online(problem, hparams, params0, solver=bl.AdamW(lr=1e-3, steps=20),
                      estimator=bl.Truncated(20))
    hopt = torch.optim.Adam(hparams.values(), lr=1e-2)
    for it in range(n):
        hopt.zero_grad()
        res = tuner.step(inner_batch, outer_batch)   # K warm-started inner steps, then
        hopt.step()                                  # dF/dλ ADDED to each hparam's .grad

Hyper-step t (t = 0, 1, ...) continues the inner training from where step t − 1 left it
(Lorraine et al.'s online schedule; "short-horizon" hypergradients):

.. math:: (w_{t+1}, s_{t+1}) = \\Phi^{K}(w_t, s_t, \\lambda_t; b_{tK}, \\dots, b_{tK+K-1}),
          \\qquad \\hat g_t = \\widehat{\\tfrac{d}{d\\lambda}} f(w_{t+1}(\\lambda), \\lambda;
          b^{out}_t)\\Big|_{\\lambda_t}

with (w_t, s_t) constants for the derivative (the estimator sees a fixed start point ``params0
= w_t`` and solver state ``state0 = s_t``). What the tuner carries from call to call:

- the inner weights w_t and the solver state s_t (Adam moments and step counter): ``params``,
  ``state``;
- the data streams: a :class:`bilevel.PerStep` / :class:`bilevel.Minibatches` ``inner_batch``
  is advanced by the K·t steps already taken (pass the stream from its start at every call),
  a PerStep ``outer_batch`` by t (one outer batch per hyper-step); plain batches are used as
  they are;
- for :class:`bilevel.Implicit` / :class:`bilevel.HistoryFree` with :class:`bilevel.CG`, the
  solution v of the last linear system, from which the next CG starts (the tuner works on a
  copy of the estimator with ``warm_start=True``; the user's object is not modified).
  :class:`bilevel.Neumann` has no start point, so nothing is carried for it.

``state_dict()`` / ``load_state_dict()`` save and restore all of this (the hyperparameters
themselves and the outer optimiser are the caller's, saved with their own ``state_dict``): a
tuner resumed from a checkpoint takes exactly the steps an uninterrupted one takes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .data import PerStep
from .estimators import Estimator, HistoryFree, Implicit, Unrolled
from .hypergrad import accumulate_grad, hypergrad
from .linsolve import CG
from .modules import ModuleProblem
from .problem import BilevelError, BilevelProblem, HypergradResult, check_floating
from .pytree import PyTree, tree_detach, tree_paths, tree_structure
from .solvers import InnerSolver

__all__ = ["Online"]


def _check_hparams(hparams: PyTree) -> None:
    check_floating(hparams, "hparams")
    for path, leaf in tree_paths(hparams):
        if not (leaf.is_leaf and leaf.requires_grad):
            raise BilevelError(f"hparams{path} must be a leaf tensor with requires_grad=True "
                               f"(bl.Online adds dF/dλ to its .grad for your optimiser): create "
                               f"it as torch.tensor(..., requires_grad=True)"
                               + ("" if leaf.is_leaf else ", not as the result of an operation"))


def _warm_linsolve(estimator: Estimator) -> Estimator:
    """A copy of an implicit estimator whose CG starts from the previous solution."""
    if isinstance(estimator, HistoryFree):
        return dataclasses.replace(estimator, warm_start=True)
    if isinstance(estimator, Implicit) and isinstance(estimator.linsolve, CG):
        return dataclasses.replace(estimator,
                                   linsolve=dataclasses.replace(estimator.linsolve,
                                                                warm_start=True))
    return estimator


class Online:
    """Online (warm-started) hypergradient tuning; see :mod:`bilevel.online`.

    ``problem`` is a :class:`bilevel.BilevelProblem` (then ``params0`` is required: the first
    start point) or a :class:`bilevel.ModuleProblem` (``params0`` defaults to the module's
    current weights, and ``solver`` is wrapped by ``mp.solver`` if it is not already).
    ``hparams``: a pytree of leaf tensors with ``requires_grad=True``. ``warm_linsolve``:
    carry the implicit estimators' CG solution from call to call (default True).
    """

    def __init__(self, problem: BilevelProblem | ModuleProblem, hparams: PyTree,
                 params0: PyTree | None = None, *, solver: InnerSolver,
                 estimator: Estimator | None = None, warm_linsolve: bool = True,
                 check: bool = True) -> None:
        self.module = problem if isinstance(problem, ModuleProblem) else None
        if self.module is not None:
            problem = self.module.problem
            params0 = self.module.params0() if params0 is None else params0
            if isinstance(solver, InnerSolver):
                solver = self.module._wrap(solver)  # buffers follow the inner loop
        if not isinstance(problem, BilevelProblem):
            raise BilevelError(f"bl.Online needs a bl.BilevelProblem or bl.module_problem(...), "
                               f"got {type(problem).__name__}")
        if problem.init is not None:
            raise BilevelError("bl.Online warm-starts the inner weights from one call to the "
                               "next, but this problem restarts from init(hparams) (MAML-type); "
                               "call bl.hypergrad for each task instead")
        if params0 is None:
            raise BilevelError("bl.Online needs params0: the inner weights to start training from")
        if not isinstance(solver, InnerSolver):
            raise BilevelError(f"solver must be an inner solver such as bl.Adam(lr, steps), got "
                               f"{type(solver).__name__}")
        estimator = Unrolled() if estimator is None else estimator
        if not isinstance(estimator, Estimator):
            raise BilevelError(f"estimator must be a bilevel estimator such as bl.Truncated(20), "
                               f"got {type(estimator).__name__}")
        _check_hparams(hparams)
        check_floating(params0, "params0")
        self.problem, self.hparams, self.solver = problem, hparams, solver
        self.estimator = _warm_linsolve(estimator) if warm_linsolve else estimator
        self.check = check
        self.params: PyTree = tree_detach(params0)
        self.state: PyTree = None  # None: solver.init_state at the first call
        self.hyper_steps = 0  # calls of step() so far
        self.inner_steps = 0  # inner steps taken so far = offset of the inner stream

    # -- one hyper-step --------------------------------------------------------------------------
    def step(self, inner_batch: Any = None, outer_batch: Any = None) -> HypergradResult:
        """``solver.steps`` inner steps from the current (params, state), the hypergradient of
        the outer loss at their end, ADDED to each hparam's ``.grad``. Returns the result
        (``res.info`` gains ``online_step``, ``inner_steps_total`` and ``stream_offset``)."""
        inner = inner_batch.shifted(self.inner_steps) if isinstance(inner_batch, PerStep) \
            else inner_batch
        outer = outer_batch.shifted(self.hyper_steps) if isinstance(outer_batch, PerStep) \
            else outer_batch
        res = hypergrad(self.problem, tree_detach(self.hparams), inner, outer,
                        solver=self.solver, estimator=self.estimator, params0=self.params,
                        state0=self.state, check=self.check)
        accumulate_grad(self.hparams, res.grad)
        self.params, self.state = tree_detach(res.params), tree_detach(res.state)
        offset = self.inner_steps
        self.hyper_steps += 1
        self.inner_steps += self.solver.steps
        res.info["online_step"] = torch.tensor(self.hyper_steps - 1)
        res.info["stream_offset"] = torch.tensor(offset)
        res.info["inner_steps_total"] = torch.tensor(self.inner_steps)
        return res

    def write_back(self, model: torch.nn.Module | None = None) -> torch.nn.Module:
        """Load the current inner weights into the module (module problems only)."""
        if self.module is None:
            raise BilevelError("write_back needs a tuner built from bl.module_problem(...)")
        return self.module.write_back(self.params, model)

    # -- checkpoints -----------------------------------------------------------------------------
    def _linsolve(self) -> CG | None:
        ls = getattr(self.estimator, "linsolve", None)
        return ls if isinstance(ls, CG) and ls.warm_start else None

    def state_dict(self) -> dict[str, Any]:
        """Everything the tuner carries (tensors are detached copies; ``torch.save`` works)."""
        ls = self._linsolve()
        clone = lambda t: None if t is None else torch.utils._pytree.tree_map(  # noqa: E731
            lambda x: x.detach().clone() if isinstance(x, torch.Tensor) else x, t)
        return {"params": clone(self.params), "state": clone(self.state),
                "hyper_steps": self.hyper_steps, "inner_steps": self.inner_steps,
                "linsolve_x": clone(ls._last) if ls is not None else None}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (the structure of the weights must match)."""
        keys = {"params", "state", "hyper_steps", "inner_steps", "linsolve_x"}
        if not isinstance(state_dict, dict) or set(state_dict) != keys:
            got = sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict).__name__
            raise BilevelError(f"not a bl.Online state_dict: expected keys {sorted(keys)}, got "
                               f"{got}")
        params = state_dict["params"]
        if tree_structure(params) != tree_structure(self.params):
            raise BilevelError(f"the saved params have the leaves "
                               f"{[p for p, _ in tree_paths(params)]}, this tuner's have "
                               f"{[p for p, _ in tree_paths(self.params)]}")
        for (path, a), (_, b) in zip(tree_paths(params), tree_paths(self.params), strict=True):
            if a.shape != b.shape:
                raise BilevelError(f"saved params{path} has shape {tuple(a.shape)}, this tuner's "
                                   f"{tuple(b.shape)}")
        self.params = params
        self.state = state_dict["state"]
        self.hyper_steps = int(state_dict["hyper_steps"])
        self.inner_steps = int(state_dict["inner_steps"])
        ls = self._linsolve()
        if ls is not None:
            ls._last = state_dict["linsolve_x"]

    def __repr__(self) -> str:
        return (f"Online(solver={self.solver!r}, estimator={self.estimator!r}, "
                f"hyper_steps={self.hyper_steps}, inner_steps={self.inner_steps})")
