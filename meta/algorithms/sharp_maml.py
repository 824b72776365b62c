"""Sharp-MAML (Abbas, Xiao, Chen, Chen, Chen 2022): SAM at the lower and/or upper level (§5)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

import bilevel as bl

from ..tasks import TaskBatch
from .base import MetaLearner, Params


class SharpMAML(MetaLearner):
    """MAML with sharpness-aware minimisation at both levels (Sharp-MAML_both; ``rho_outer=0``
    gives Sharp-MAML_low, ``rho_inner=0`` Sharp-MAML_up, both 0 plain MAML).

    Lower level: ``bl.SAM(bl.GradientDescent(inner_lr, inner_steps), rho_inner,
    stop_gradient=not differentiable_perturbation)``: every inner step
    ε_k = ρ_in ∇L^s(φ_k)/‖∇L^s(φ_k)‖, φ_{k+1} = φ_k − α ∇L^s(φ_k + ε_k), differentiated by
    ``bl.Unrolled()``. ``differentiable_perturbation=True`` (default) is the official code's
    convention: ε_k is built from create_graph gradients, so the meta-gradient differentiates
    through ε_k, including the Jacobian of the normalised gradient (ALGORITHMS.md §5, §9.9);
    ``False`` treats ε_k as a constant (the SAM paper's stop-gradient convention). Meta-test
    adaptation uses the SAM inner step too, as the official code does.

    Upper level (``rho_outer > 0``): g = mean_i meta-gradient at θ; e = ρ_out·g/(‖g‖ + 1e-12)
    (global norm over all parameters); ``.grad`` receives the meta-gradient recomputed at θ + e
    (e a constant: the official SAM wrapper's first_step/second_step), to be applied at θ by the
    optimiser. Two meta-gradient passes per step. The reported loss/accuracy are those at θ.

    Defaults ``inner_lr=0.1, inner_steps=5, rho_inner=rho_outer=5e-4``: the official README run
    (MiniImageNet 5-way 1-shot: --step-size 0.1 --num-steps 5 --alpha 0.0005; the both/ code uses
    one alpha for both levels). The argparse default radius is 0.05.
    """

    name = "sharpmaml"

    def __init__(self, model: nn.Module, inner_lr: float = 0.1, inner_steps: int = 5, *,
                 rho_inner: float = 5e-4, rho_outer: float = 5e-4,
                 differentiable_perturbation: bool = True, vectorize: bool | None = None,
                 estimator: bl.Estimator | None = None, loss: str | Callable = "cross_entropy",
                 eval_inner_steps: int | None = None, eval_inner_lr: float | None = None,
                 randomness: str = "different",
                 compile: bool | dict = False):
        for name, rho in (("rho_inner", rho_inner), ("rho_outer", rho_outer)):
            if not isinstance(rho, (int, float)) or isinstance(rho, bool) or rho < 0:
                raise ValueError(f"{name} must be a non-negative number, got {rho!r}")
        self.rho_inner, self.rho_outer = float(rho_inner), float(rho_outer)
        self.differentiable_perturbation = bool(differentiable_perturbation)
        super().__init__(model, inner_lr, inner_steps, vectorize=vectorize, estimator=estimator,
                         loss=loss, eval_inner_steps=eval_inner_steps, eval_inner_lr=eval_inner_lr,
                         randomness=randomness, compile=compile)

    def solver(self, train: bool = True) -> bl.InnerSolver:
        base = super().solver(train)
        if self.rho_inner == 0:  # bl.SAM requires rho > 0; rho = 0 is plain gradient descent
            return base
        return bl.SAM(base, self.rho_inner, stop_gradient=not self.differentiable_perturbation)

    def meta_step(self, batch: TaskBatch) -> dict[str, float]:
        batch = self._prepare(batch)
        hparams = self.hparams()
        grads, res = self.meta_gradient(batch, hparams,
                                        accuracy=self.loss_name == "cross_entropy")
        metrics = self._summary(res)
        if self.rho_outer > 0:
            grads = self.sharp_gradient(batch, hparams, grads)
        self.accumulate(grads)
        return metrics

    def sharp_gradient(self, batch: TaskBatch, hparams: Params, grads: Params) -> Params:
        """The upper SAM step: the mean meta-gradient at θ + ρ_out·g/‖g‖."""
        norm = torch.sqrt(sum((g * g).sum() for g in grads.values()))
        scale = self.rho_outer / (norm + 1e-12)
        perturbed = {n: hparams[n] + scale * grads[n] for n in hparams}
        return self.meta_gradient(batch, perturbed)[0]
