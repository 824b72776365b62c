"""Sign-MAML (Fan, Ram, Liu 2021): signSGD lower level, exact first-order meta-gradient (§4)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

import bilevel as bl

from .base import MetaLearner


class SignMAML(MetaLearner):
    """Inner loop φ_{k+1} = φ_k − α·sign(∇L^s(φ_k)) (``bl.SignGD``), meta-gradient
    ``bl.FirstOrder()``.

    ``.grad`` receives (1/B) Σ_i ∇L_i^q(φ_K^i). This is the EXACT gradient almost everywhere of
    F_sign(θ) = mean_i L_i^q(φ_K^i(θ)): d sign(u)/du = 0 for u ≠ 0, so dφ_K/dθ = I (a
    second-order unroll, ``estimator=bl.Unrolled()``, returns the same vector). Meta-test
    adaptation uses the sign steps too.

    Defaults ``inner_lr=0.0035, inner_steps=5``: chenfan95/Sign-MAML jobs.sh (MiniImageNet
    5-way 1-shot; the official test uses 10 adaptation steps).
    """

    name = "signmaml"

    def __init__(self, model: nn.Module, inner_lr: float = 0.0035, inner_steps: int = 5, *,
                 vectorize: bool | None = None, estimator: bl.Estimator | None = None,
                 loss: str | Callable = "cross_entropy", eval_inner_steps: int | None = None,
                 eval_inner_lr: float | None = None,
                 randomness: str = "different",
                 compile: bool | dict = False):
        super().__init__(model, inner_lr, inner_steps, vectorize=vectorize, estimator=estimator,
                         loss=loss, eval_inner_steps=eval_inner_steps, eval_inner_lr=eval_inner_lr,
                         randomness=randomness, compile=compile)

    def default_estimator(self) -> bl.Estimator:
        return bl.FirstOrder()

    def solver(self, train: bool = True) -> bl.InnerSolver:
        if train:
            return bl.SignGD(self.inner_lr, self.inner_steps)
        return bl.SignGD(self.eval_inner_lr, self.eval_inner_steps)
