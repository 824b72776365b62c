"""Functional inner solvers: fixed-step update maps w_{k+1}, s_{k+1} = Φ(w_k, s_k, λ).

No ``torch.optim`` state: a solver is a small object with ``steps`` and a pure
``step(grad_fn, params, state, hparams, batch) -> (params, state, loss)``; ``grad_fn`` returns
``(∇_w g(w, λ, batch), g(w, λ, batch))``. Learning rates (and momentum) may be numbers, or
hyperparameters to be tuned by hypergradient: a key of ``hparams`` (``lr="lr"``), a callable
``hparams -> tensor``, or a pytree like ``params`` of per-parameter rates (Meta-SGD).

- :class:`GradientDescent`  w ← w − α ∇g
- :class:`Momentum`         v ← μ v + ∇g;  w ← w − α v   (Nesterov: w ← w − α(∇g + μ v))
- :class:`SignGD`           w ← w − α sign(∇g)                      (Sign-MAML lower level)
- :class:`SAM`              ε = ρ ∇g/‖∇g‖;  base step with ∇g(w + ε)   (Sharp-MAML lower level)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .problem import BilevelError
from .pytree import PyTree, tree_detach, tree_map, tree_norm, tree_structure, tree_zeros_like

Rate = float | str | torch.Tensor | Callable[[PyTree], Any] | dict
GradFn = Callable[[PyTree, PyTree, Any], tuple[PyTree, torch.Tensor]]


def resolve(rate: Rate, hparams: PyTree, name: str = "lr") -> Any:
    """A number, a tensor, ``hparams[key]``, ``rate(hparams)`` or a per-parameter pytree."""
    if isinstance(rate, str):
        if not isinstance(hparams, dict) or rate not in hparams:
            raise BilevelError(f"{name}={rate!r} names a hyperparameter, but hparams has no key "
                               f"{rate!r}")
        return hparams[rate]
    if callable(rate):
        return rate(hparams)
    return rate


def _scaled_step(params: PyTree, direction: PyTree, rate: Any) -> PyTree:
    """``params - rate * direction`` with a scalar rate or a per-parameter pytree of rates."""
    if isinstance(rate, (dict, list, tuple)):
        if tree_structure(rate) != tree_structure(params):
            raise BilevelError("a per-parameter learning-rate pytree must have the structure of "
                               "params")
        return tree_map(lambda p, d, r: p - r * d, params, direction, rate)
    return tree_map(lambda p, d: p - rate * d, params, direction)


def _check_steps(steps: int) -> None:
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise BilevelError(f"steps must be a non-negative int, got {steps!r}")


def _check_rate(rate: Rate, name: str, allow_zero: bool = False) -> None:
    if isinstance(rate, (int, float)) and not (rate > 0 or (allow_zero and rate == 0)):
        raise BilevelError(f"{name} must be {'>= 0' if allow_zero else 'positive'}, got {rate!r}")


class InnerSolver:
    """Base class: subclasses define :meth:`update` (and :meth:`init_state` if stateful)."""

    steps: int

    def init_state(self, params: PyTree, hparams: PyTree) -> PyTree:
        return ()

    def update(self, grads: PyTree, params: PyTree, state: PyTree, hparams: PyTree):
        raise NotImplementedError

    def step(self, grad_fn: GradFn, params: PyTree, state: PyTree, hparams: PyTree, batch: Any):
        grads, loss = grad_fn(params, hparams, batch)
        params, state = self.update(grads, params, state, hparams)
        return params, state, loss


@dataclass(frozen=True)
class GradientDescent(InnerSolver):
    """``steps`` iterations of w ← w − lr ∇_w g(w, λ)."""

    lr: Rate
    steps: int

    def __post_init__(self) -> None:
        _check_steps(self.steps)
        _check_rate(self.lr, "lr")

    def update(self, grads, params, state, hparams):
        return _scaled_step(params, grads, resolve(self.lr, hparams)), state


@dataclass(frozen=True)
class Momentum(InnerSolver):
    """Heavy ball / Nesterov: v ← μ v + ∇g; w ← w − lr·v (Nesterov: w ← w − lr(∇g + μ v))."""

    lr: Rate
    steps: int
    momentum: Rate = 0.9
    nesterov: bool = False

    def __post_init__(self) -> None:
        _check_steps(self.steps)
        _check_rate(self.lr, "lr")

    def init_state(self, params, hparams):
        return tree_zeros_like(tree_detach(params))

    def update(self, grads, params, state, hparams):
        mu = resolve(self.momentum, hparams, "momentum")
        velocity = tree_map(lambda v, g: mu * v + g, state, grads)
        if self.nesterov:
            direction = tree_map(lambda g, v: g + mu * v, grads, velocity)
        else:
            direction = velocity
        return _scaled_step(params, direction, resolve(self.lr, hparams)), velocity


@dataclass(frozen=True)
class SignGD(InnerSolver):
    """signSGD lower level (Sign-MAML): w ← w − lr·sign(∇g). ``d sign/du = 0`` a.e., so the
    exact derivative of the trajectory w.r.t. its start point is the identity."""

    lr: Rate
    steps: int

    def __post_init__(self) -> None:
        _check_steps(self.steps)
        _check_rate(self.lr, "lr")

    def update(self, grads, params, state, hparams):
        return _scaled_step(params, tree_map(torch.sign, grads), resolve(self.lr, hparams)), state


@dataclass(frozen=True)
class SAM(InnerSolver):
    """Sharpness-aware inner step (Foret et al. 2021; Sharp-MAML lower level, Abbas et al. 2022).

    ε = ρ ∇g(w)/‖∇g(w)‖, then the base solver's update with the gradient taken at w + ε
    (gradient-descent base: w ← w − lr ∇g(w + ε)). ``stop_gradient=False`` (default, as the
    official Sharp-MAML code) differentiates through ε, including the Jacobian of the normalised
    gradient; ``stop_gradient=True`` treats ε as a constant (the SAM paper's convention).
    The reported inner loss is g(w), at the unperturbed point.
    """

    base: InnerSolver
    rho: Rate
    stop_gradient: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.base, InnerSolver) or isinstance(self.base, SAM):
            raise BilevelError("SAM(base, rho) needs a plain inner solver as base "
                               "(GradientDescent, Momentum or SignGD)")
        _check_rate(self.rho, "rho", allow_zero=True)

    @property
    def steps(self) -> int:  # type: ignore[override]
        return self.base.steps

    def init_state(self, params, hparams):
        return self.base.init_state(params, hparams)

    def step(self, grad_fn, params, state, hparams, batch):
        rho = resolve(self.rho, hparams, "rho")

        def perturbed_grad(p, h, b):
            g, loss = grad_fn(p, h, b)
            scale = rho / (tree_norm(g) + 1e-12)
            eps = tree_map(lambda x: x * scale, g)
            if self.stop_gradient:
                eps = tree_detach(eps)
            g_sharp, _ = grad_fn(tree_map(torch.add, p, eps), h, b)
            return g_sharp, loss

        return self.base.step(perturbed_grad, params, state, hparams, batch)
