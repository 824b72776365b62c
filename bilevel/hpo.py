"""Optuna bridge: black-box search outside, hypergradient refinement inside each trial.

Optuna samples the discrete or low-dimensional hyperparameters (architecture, batch size, a
learning rate, the start value of a decay); inside the trial :func:`refine` tunes the
high-dimensional continuous ones (per-feature decays, per-example weights) online with
:class:`bilevel.Online`, reports intermediate values with ``trial.report`` and stops the trial
with ``optuna.TrialPruned`` when ``trial.should_prune()`` says so::

    def objective(trial):
        lr = trial.suggest_float("lr", 1e-4, 3e-2, log=True)
        hp = {"log_wd": torch.full((64,), trial.suggest_float("log_wd0", -12, -2),
                                   requires_grad=True)}
        tuner = bl.Online(problem, hp, w0, solver=bl.Adam(lr, steps=30),
                          estimator=bl.Unrolled())
        out = bl.hpo.refine(trial, tuner, n_steps=10, inner=stream, outer=val,
                            hopt=torch.optim.Adam(hp.values(), lr=0.05), report_every=1)
        return out.value

    optuna.create_study(pruner=optuna.pruners.MedianPruner()).optimize(objective, 50)

One refinement step t = 1, ..., n_steps is one :meth:`bilevel.Online.step` (K inner steps,
dF/dλ added into ``.grad``) followed by ``hopt.step()``:

.. math:: \\lambda_{t} = \\lambda_{t-1} - \\mathrm{opt}\\big(\\hat g_t\\big), \\qquad
          v_t = \\mathrm{validate}() \\;\\; (\\text{or } f(w_t, \\lambda_{t-1}; b^{out}_t))

and every ``report_every`` steps (and at the last one) ``trial.report(v_t, step=s)`` with
``s`` the tuner's count of hyper-steps done, so a resumed tuner keeps numbering its reports.
Needs the ``hpo`` extra (``pip install 'bilevel-meta[hpo]'``) only for the pruning exception;
any object with ``report`` / ``should_prune`` (``optuna.trial.FixedTrial`` too) is accepted.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .online import Online
from .problem import BilevelError, HypergradResult
from .stochastic.online import Online as StochasticOnline

__all__ = ["RefineResult", "refine"]


@dataclass
class RefineResult:
    """``value``: the last value computed (reported unless pruned); ``history``: (step, value)
    of every report; ``steps``: refinement steps taken in this call; ``last``: the last
    :class:`bilevel.HypergradResult`."""

    value: float
    history: list[tuple[int, float]] = field(default_factory=list)
    steps: int = 0
    last: HypergradResult | dict | None = None  # a dict: a bl.stochastic.Online's info


def _pruned(message: str) -> Exception:
    try:
        import optuna
    except ImportError as e:  # pragma: no cover - should_prune() said True without optuna
        raise BilevelError("the trial asked to prune but optuna is not installed: "
                           "pip install 'bilevel-meta[hpo]'") from e
    return optuna.TrialPruned(message)


Tuner = Online | StochasticOnline


def refine(trial: Any, tuner: Tuner | Callable[[Any], Tuner], n_steps: int, *,
           inner: Any = None, outer: Any = None, hopt: torch.optim.Optimizer | float = 1e-2,
           validate: Callable[[Online], float] | None = None, report_every: int = 1,
           on_nonfinite: str = "raise",
           callback: Callable[[int, HypergradResult], None] | None = None) -> RefineResult:
    """Refine a trial's continuous hyperparameters with ``n_steps`` online hyper-steps.

    ``trial``: an ``optuna.Trial`` (or anything with ``report(value, step)`` and
    ``should_prune()``). ``tuner``: a :class:`bilevel.Online`, or a callable ``trial ->
    Online`` (built here, so that it can read ``trial.suggest_*``). A
    :class:`bilevel.stochastic.Online` is accepted too: one refinement step is then
    one iteration of its algorithm, which updates x itself (``hopt``, ``inner``, ``outer``
    are not used; ``validate`` is required). ``inner`` / ``outer``: the batches or streams
    passed to every ``tuner.step`` (pass a ``bl.Minibatches``/``PerStep`` stream from its
    start: the tuner advances it). ``hopt``: the optimiser of the hyperparameters, or a
    learning rate for ``torch.optim.Adam`` over the tuner's hparams.
    ``validate(tuner) -> float``: the value to report (default: the outer loss of the step,
    f on the step's outer batch). ``report_every``: report (and ask whether to prune) every so
    many steps, and always after the last. ``on_nonfinite``: a NaN/inf value raises
    :class:`bilevel.BilevelError` naming the step (``"raise"``) or prunes the trial
    (``"prune"``; for samplers that propose diverging learning rates). ``callback(step, res)``
    runs after each step. Raises ``optuna.TrialPruned`` when ``trial.should_prune()``.
    """
    if not (isinstance(n_steps, int) and n_steps >= 1):
        raise BilevelError(f"n_steps must be a positive int (hyper-steps), got {n_steps!r}")
    if not (isinstance(report_every, int) and report_every >= 1):
        raise BilevelError(f"report_every must be a positive int, got {report_every!r}")
    if on_nonfinite not in ("raise", "prune"):
        raise BilevelError(f"on_nonfinite must be 'raise' or 'prune', got {on_nonfinite!r}")
    if not (hasattr(trial, "report") and hasattr(trial, "should_prune")):
        raise BilevelError(f"trial must be an optuna.Trial (report / should_prune), got "
                           f"{type(trial).__name__}")
    if not isinstance(tuner, (Online, StochasticOnline)):
        if not callable(tuner):
            raise BilevelError(f"tuner must be a bl.Online or a callable trial -> bl.Online, got "
                               f"{type(tuner).__name__}")
        tuner = tuner(trial)
        if not isinstance(tuner, (Online, StochasticOnline)):
            raise BilevelError(f"the tuner factory must return a bl.Online, got "
                               f"{type(tuner).__name__}")
    if isinstance(tuner, StochasticOnline):
        return _refine_stochastic(trial, tuner, n_steps, validate, report_every, on_nonfinite,
                                  callback)
    if isinstance(hopt, (int, float)) and not isinstance(hopt, bool):
        leaves = torch.utils._pytree.tree_leaves(tuner.hparams)
        hopt = torch.optim.Adam(leaves, lr=float(hopt))
    elif not isinstance(hopt, torch.optim.Optimizer):
        raise BilevelError(f"hopt must be a torch.optim optimiser or a learning rate, got "
                           f"{type(hopt).__name__}")
    out = RefineResult(value=math.nan)
    for i in range(n_steps):
        hopt.zero_grad()
        res = tuner.step(inner, outer)
        hopt.step()
        out.steps, out.last = i + 1, res
        if callback is not None:
            callback(tuner.hyper_steps, res)
        if (i + 1) % report_every == 0 or i + 1 == n_steps:
            value = float(validate(tuner)) if validate is not None else float(res.outer_loss)
            _report(trial, out, value, tuner.hyper_steps, i + 1, n_steps, on_nonfinite)
    return out


def _refine_stochastic(trial: Any, loop: StochasticOnline, n_steps: int,
                       validate: Callable | None, report_every: int,
                       on_nonfinite: str, callback: Callable | None) -> RefineResult:
    if validate is None:
        raise BilevelError("refine over a bl.stochastic.Online needs validate=(loop -> float): "
                           "its iterations do not compute the outer loss")
    out = RefineResult(value=math.nan)
    for i in range(n_steps):
        out.last = loop.step(1)
        out.steps = i + 1
        if callback is not None:
            callback(loop.t, out.last)
        if (i + 1) % report_every == 0 or i + 1 == n_steps:
            _report(trial, out, float(validate(loop)), loop.t, i + 1, n_steps, on_nonfinite)
    return out


def _report(trial: Any, out: RefineResult, value: float, step: int, i: int, n_steps: int,
            on_nonfinite: str) -> None:
    """Report one value (refusing NaN/inf), then prune if the trial says so."""
    out.value = value
    if not math.isfinite(value):
        msg = (f"refine: the reported value is {value} at hyper-step {step} "
               f"(step {i} of {n_steps} in this trial)")
        if on_nonfinite == "prune":
            raise _pruned(msg)
        raise BilevelError(msg + ": lower the learning rates, or pass on_nonfinite='prune' "
                           "to prune such trials")
    trial.report(value, step)
    out.history.append((step, value))
    if trial.should_prune():
        raise _pruned(f"pruned at hyper-step {step} with value {value:.6g}")
