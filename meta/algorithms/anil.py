"""ANIL (Raghu, Raghu, Bengio, Vinyals 2020): MAML adapting only the head (ALGORITHMS.md §1.4)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

import bilevel as bl

from ..models import split_params
from .base import MetaLearner
from .head_only import HeadOnlyMixin


class ANIL(HeadOnlyMixin, MetaLearner):
    """Almost No Inner Loop: the inner loop adapts only ``model.head`` (``head.*`` parameters);
    the backbone ``features.*`` is used as is, and both the backbone and the head
    initialisation are meta-learned.

    Lower variable w = head, w_0 = θ_head; inner loss L^s(θ_body, w); ``bl.Unrolled()``.
    ``.grad`` receives the exact gradient of (1/B) Σ_i L_i^q(θ_body, w_K^i) w.r.t. θ_body AND
    θ_head through the K head steps (second order: head×head and head×body terms). The
    backbone runs once per task (:mod:`meta.algorithms.head_only`: features F_s, F_q are
    hyperparameters of the head problem, pulled back through the backbone by one VJP);
    ``cache_features=False`` recomputes it inside every head step instead (same value, K
    backbone graphs, like the memory-reduced paper's ANIL baseline). Meta-test: head-only
    adaptation (``eval_inner_*``) on features computed once.

    Defaults ``inner_lr=0.1, inner_steps=5``: the ANIL baseline of the memory-reduced paper's
    official code (RM-MetaL, miniImageNet/tieredImageNet; CIFAR-FS/FC100 use 10 steps).
    The model must have a ``head`` submodule (:class:`meta.Conv4`, :class:`meta.MLP`).
    """

    name = "anil"

    def __init__(self, model: nn.Module, inner_lr: float = 0.1, inner_steps: int = 5, *,
                 vectorize: bool | None = None, estimator: bl.Estimator | None = None,
                 loss: str | Callable = "cross_entropy", eval_inner_steps: int | None = None,
                 eval_inner_lr: float | None = None, cache_features: bool | None = None):
        split_params(model)  # fail early without a head
        self._set_cache(model, cache_features)
        super().__init__(model, inner_lr, inner_steps, vectorize=vectorize, estimator=estimator,
                         loss=loss, eval_inner_steps=eval_inner_steps, eval_inner_lr=eval_inner_lr)

    def inner_names(self) -> list[str]:
        head = split_params(self.model)[1]
        meta = set(self.meta_names())
        return [n for n in head if n in meta]
