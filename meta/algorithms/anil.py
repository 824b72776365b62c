"""ANIL (Raghu, Raghu, Bengio, Vinyals 2020): MAML adapting only the head (ALGORITHMS.md §1.4)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

import bilevel as bl

from .base import MetaLearner


class ANIL(MetaLearner):
    """Almost No Inner Loop: the inner loop adapts only the head (``head``: a submodule name,
    default ``"head"``; its parameters); the backbone is used as is, and both the backbone
    and the head initialisation are meta-learned.

    Lower variable w = head, w_0 = θ_head; inner loss L^s(θ_body, w); ``bl.Unrolled()``.
    ``.grad`` receives the exact gradient of (1/B) Σ_i L_i^q(θ_body, w_K^i) w.r.t. θ_body AND
    θ_head through the K head steps (second order: head×head and head×body terms). The
    backbone runs once per task (:mod:`meta.algorithms.head_only`: features F_s, F_q are
    hyperparameters of the head problem, pulled back through the backbone by one VJP;
    ``backbone`` says how they are computed, default what the model feeds its head);
    ``cache_features=False`` recomputes the full model inside every head step instead (same
    value, K backbone graphs, like the memory-reduced paper's ANIL baseline). Meta-test:
    head-only adaptation (``eval_inner_*``) on features computed once.

    Implicit estimators are refused: the head initialisation enters the inner problem only
    as its start point, so its implicit meta-gradient is zero (use ``MemoryReducedMAML`` for
    a fixed-init head with an implicit backbone gradient).

    Defaults ``inner_lr=0.1, inner_steps=5``: the ANIL baseline of the memory-reduced paper's
    official code (RM-MetaL, miniImageNet/tieredImageNet; CIFAR-FS/FC100 use 10 steps).
    """

    name = "anil"
    head_only = True
    implicit_refusal = ("meta-learned head initialisation enters the inner problem only as "
                        "its start point w_0 = θ_head")

    def __init__(self, model: nn.Module, inner_lr: float = 0.1, inner_steps: int = 5, *,
                 head: str = "head", backbone: str | Callable | None = None,
                 cache_features: bool | None = None, vectorize: bool | None = None,
                 estimator: bl.Estimator | None = None, loss: str | Callable = "cross_entropy",
                 eval_inner_steps: int | None = None, eval_inner_lr: float | None = None,
                 randomness: str = "different",
                 compile: bool | dict = False):
        super().__init__(model, inner_lr, inner_steps, vectorize=vectorize, estimator=estimator,
                         loss=loss, eval_inner_steps=eval_inner_steps, eval_inner_lr=eval_inner_lr,
                         randomness=randomness, compile=compile, head=head, backbone=backbone,
                         cache_features=cache_features)
