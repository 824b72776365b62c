"""MAML (Finn, Abbeel, Levine 2017), second order, and FO-MAML (ALGORITHMS.md §1.1-1.2).

Inner: φ_0 = θ, φ_{k+1} = φ_k − α ∇L^s(φ_k) (K steps on the support loss, every parameter
adapted); outer: F(θ) = mean_i L_i^q(φ_K^i(θ)).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

import bilevel as bl

from .base import MetaLearner


class MAML(MetaLearner):
    """Second-order MAML: ``bl.GradientDescent(inner_lr, inner_steps)`` + ``bl.Unrolled()``.

    ``.grad`` receives (1/B) Σ_i dL_i^q(φ_K^i(θ))/dθ, exact through the K inner steps
    (second order: Π_k (I − α H_k) applied to the query gradient). Pass
    ``estimator=bl.Checkpointed()`` for the same value with O(√K) memory, ``bl.Truncated(T)`` to
    back-propagate through the last T steps only, ``bl.FirstOrder()`` for FO-MAML.

    Defaults ``inner_lr=0.4, inner_steps=1``: cbfinn/maml, Omniglot 5-way 1-shot (20-way 1-shot:
    0.1 / 5; MiniImageNet: 0.01 / 5). The official code tests with 10 inner steps
    (``eval_inner_steps=10``); the default here is the training value.
    """

    name = "maml"

    def __init__(self, model: nn.Module, inner_lr: float = 0.4, inner_steps: int = 1, *,
                 vectorize: bool | None = None, estimator: bl.Estimator | None = None,
                 loss: str | Callable = "cross_entropy", eval_inner_steps: int | None = None,
                 eval_inner_lr: float | None = None,
                 randomness: str = "different",
                 compile: bool | dict = False):
        super().__init__(model, inner_lr, inner_steps, vectorize=vectorize, estimator=estimator,
                         loss=loss, eval_inner_steps=eval_inner_steps, eval_inner_lr=eval_inner_lr,
                         randomness=randomness, compile=compile)


class FOMAML(MAML):
    """First-order MAML: the MAML problem with ``bl.FirstOrder()``.

    ``.grad`` receives (1/B) Σ_i ∇L_i^q(φ_K^i): the query gradient AT THE ADAPTED PARAMETERS,
    applied to θ (dφ_K/dθ ≈ I; cbfinn/maml ``stop_grad=True``). Identical to
    ``MAML(model, ..., estimator=bl.FirstOrder())``. Defaults as :class:`MAML`.
    """

    name = "fomaml"

    def default_estimator(self) -> bl.Estimator:
        return bl.FirstOrder()
