"""iMAML (Rajeswaran, Finn, Kakade, Levine 2019), exact paper form and the official imaml_dev
variant (ALGORITHMS.md §3.1, §9.3)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

import bilevel as bl

from .base import MetaLearner


@dataclass(frozen=True)
class PullBackGD(bl.InnerSolver):
    """The imaml_dev inner loop: ``sgd_steps`` GD steps of size ``lr`` on the RAW support loss
    (no proximal term), then one "pull-back" step φ ← φ − lr·reg·(φ − θ).

    ``loss(params, hparams, batch)`` is the raw support loss (the problem's inner loss is the
    reparametrised proximal loss that defines the official CG matrix, not what this solver
    descends). The step counter is a Python int carried as the solver state, so the estimators
    that differentiate through solver states (``bl.Checkpointed``) do not apply.
    """

    lr: float
    sgd_steps: int
    reg: float
    loss: Callable[[Any, Any, Any], Any]

    @property
    def steps(self) -> int:  # type: ignore[override]
        return self.sgd_steps + 1

    def init_state(self, params, hparams):
        return 0

    def step(self, grad_fn, params, state, hparams, batch):
        if state < self.sgd_steps:
            grads, value = bl.autodiff.grad_and_value(self.loss)(params, hparams, batch)
            return {n: params[n] - self.lr * grads[n] for n in params}, state + 1, value
        value = self.loss(params, hparams, batch)
        return ({n: params[n] - self.lr * self.reg * (params[n] - hparams[n]) for n in params},
                state + 1, value)


class IMAML(MetaLearner):
    """Implicit MAML.

    Exact paper form (default, ``official=False``): inner problem
    φ*(θ) = argmin_φ L^s(φ) + (reg/2)‖φ − θ‖² (``bl.proximal``), ``inner_steps`` GD steps of
    ``inner_lr`` from φ_0 = θ, then ``bl.Implicit(bl.CG(cg_iters, tol=0))`` at φ_K: ``.grad``
    receives (1/B) Σ_i (I + H_i/reg)⁻¹ ∇L_i^q(φ_K^i), H_i = ∇²L_i^s(φ_K^i), with the inverse
    replaced by exactly ``cg_iters`` CG steps (the paper's fixed count; CG still stops on
    curvature breakdown). The meta-test adaptation is the same proximal GD from θ.

    Official imaml_dev variant (``official=True``): the inner loop is ``inner_steps`` GD steps on
    the raw support loss, then one pull-back step φ ← φ − inner_lr·reg·(φ − θ)
    (:class:`PullBackGD`); the meta-gradient is ((1 + c)I + H/(reg + 10))⁻¹ ∇L^q(φ)
    (c = ``cg_damping``, H at φ), obtained with the same ``bl.Implicit(bl.CG)`` on the
    reparametrised proximal problem L^s/(reg + 10) + ((1 + c)/2)‖φ − θ/(1 + c)‖², whose Hessian
    is that matrix and whose mixed derivative is −I. Meta-test as measure_accuracy.py: plain GD
    on the support loss (lam = 0), ``eval_inner_steps`` steps. The official CG stops when
    rᵀr < 1e-10 (absolute) and returns ∇L^q itself for cg_steps ≤ 1; here exactly
    ``cg_iters`` steps run (cg_iters = 1 is one CG step).

    Defaults ``reg=2.0, cg_iters=5, inner_lr=0.1, inner_steps=16`` (paper Table 2 caption for
    Omniglot: λ = 2, 16 inner GD steps, 5 CG steps; imaml_dev README 5-way 1-shot run:
    inner_lr 0.1, lam 2.0, cg_steps 5, cg_damping 1.0).
    """

    name = "imaml"
    implicit_refusal = None  # the proximal term makes the inner solution depend on θ

    def __init__(self, model: nn.Module, inner_lr: float = 0.1, inner_steps: int = 16, *,
                 reg: float = 2.0, cg_iters: int = 5, official: bool = False,
                 cg_damping: float = 1.0, vectorize: bool | None = None,
                 estimator: bl.Estimator | None = None, loss: str | Callable = "cross_entropy",
                 eval_inner_steps: int | None = None, eval_inner_lr: float | None = None,
                 randomness: str = "different",
                 compile: bool | dict = False):
        if not isinstance(reg, (int, float)) or not reg > 0:
            raise ValueError(f"reg must be a positive number, got {reg!r}")
        if not isinstance(cg_iters, int) or cg_iters < 0:
            raise ValueError(f"cg_iters must be a non-negative int, got {cg_iters!r}")
        if not isinstance(cg_damping, (int, float)) or cg_damping < 0:
            raise ValueError(f"cg_damping must be >= 0, got {cg_damping!r}")
        if official and isinstance(estimator, bl.Checkpointed):
            raise ValueError("IMAML(official=True) runs the imaml_dev inner loop (PullBackGD), "
                             "whose step counter bl.Checkpointed cannot carry; use bl.Unrolled()")
        self.reg, self.cg_iters, self.official = float(reg), cg_iters, bool(official)
        self.cg_damping = float(cg_damping)
        super().__init__(model, inner_lr, inner_steps, vectorize=vectorize, estimator=estimator,
                         loss=loss, eval_inner_steps=eval_inner_steps, eval_inner_lr=eval_inner_lr,
                         randomness=randomness, compile=compile)

    def default_estimator(self) -> bl.Estimator:
        stationarity = None if self.official else 0.1  # the official φ is not a stationary point
        return bl.Implicit(bl.CG(iters=self.cg_iters, tol=0.0), stationarity_rtol=stationarity)

    def problem(self, train: bool = True) -> bl.BilevelProblem:
        if not train and self.official:  # measure_accuracy.py: lam = 0, plain GD
            return bl.BilevelProblem(self.task_loss, self.task_loss, init=self.inner_init)
        if not self.official:
            inner = bl.proximal(self.task_loss, self.reg)
        else:
            scale, c1 = 1.0 / (self.reg + 10.0), 1.0 + self.cg_damping
            inner = bl.proximal(lambda p, h, b: scale * self.task_loss(p, h, b), c1,
                                center=lambda h: {n: v / c1 for n, v in h.items()})
        return bl.BilevelProblem(inner, self.query_loss, init=self.inner_init,
                                 has_aux=self._aux())

    def solver(self, train: bool = True) -> bl.InnerSolver:
        if self.official and train:
            return PullBackGD(self.inner_lr, self.inner_steps, self.reg, self.task_loss)
        return super().solver(train)
