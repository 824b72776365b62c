"""Reptile (Nichol, Achiam, Schulman 2018): not a hypergradient (ALGORITHMS.md §1.3, §9.2)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

import bilevel as bl

from ..tasks import TaskBatch
from .base import MetaLearner, Params, _stack


class Reptile(MetaLearner):
    """Per task φ_i = ``bl.solve`` of K gradient steps on the support loss from θ; then
    ``.grad`` receives θ − (1/B) Σ_i φ_i, so ``torch.optim.SGD(lr=ε)`` performs the batched
    Reptile update θ ← θ + ε(mean_i φ_i − θ) (ε is the meta step size; the official code
    anneals it linearly to 0). It is no gradient of any meta-objective, so there is no
    estimator (``estimator`` must stay ``None``).

    The inner loop is full-batch gradient descent on the support set; the official code uses
    Adam(β1 = 0, lr ≈ 1e-3) on minibatches of a larger training set (train-shots 10-15) —
    give the task sampler more shots to follow it. The returned ``loss``/``accuracy`` are the
    query metrics of φ_i.

    Defaults ``inner_lr=0.1, inner_steps=5``: a library choice for the SGD inner loop (5 inner
    iterations as the official Omniglot 5-way 5-shot run; no official SGD step size exists).
    """

    name = "reptile"

    def __init__(self, model: nn.Module, inner_lr: float = 0.1, inner_steps: int = 5, *,
                 vectorize: bool | None = None, estimator: bl.Estimator | None = None,
                 loss: str | Callable = "cross_entropy", eval_inner_steps: int | None = None,
                 eval_inner_lr: float | None = None,
                 randomness: str = "different",
                 compile: bool | dict = False):
        if estimator is not None:
            raise ValueError("Reptile is not a hypergradient method: it takes no estimator "
                             "(its .grad is theta - mean adapted params)")
        super().__init__(model, inner_lr, inner_steps, vectorize=vectorize, estimator=None,
                         loss=loss, eval_inner_steps=eval_inner_steps, eval_inner_lr=eval_inner_lr,
                         randomness=randomness, compile=compile)
        if compile:
            bl.compiled.compile_fallback(
                "Reptile(compile=...)", "Reptile's meta-gradient θ − φ_K needs no hypergradient "
                "(only the inner loop, bl.solve), which is not compiled")

    def default_estimator(self) -> None:  # type: ignore[override]
        return None

    def adapted_params(self, batch: TaskBatch, hparams: Params | None = None) -> Params:
        """φ_i for every task, stacked along a leading task dim (training inner loop)."""
        batch = self._prepare(batch)
        self._consts = self.constants()
        hparams = self.hparams() if hparams is None else hparams
        problem, solver = self.problem(True), self.solver(True)

        def one(support):
            return bl.solve(problem, hparams, support, solver=solver)

        if self.use_vmap():
            phis = self._vmap(one)(batch.support)
        else:
            phis = _stack([one(batch.task(i).support) for i in self._tasks(batch.num_tasks)])
        for n, p in phis.items():
            if not bool(torch.isfinite(p).all()):
                raise FloatingPointError(f"Reptile: the adapted parameter {n!r} holds NaN/inf: "
                                         f"lower inner_lr")
        return phis

    def meta_gradient(self, batch: TaskBatch, hparams: Params | None = None):
        """(θ − mean_i φ_i, stacked φ_i); writes nothing."""
        hparams = self.hparams() if hparams is None else hparams
        phis = self.adapted_params(batch, hparams)
        return {n: hparams[n] - phis[n].mean(0) for n in phis}, phis

    def meta_step(self, batch: TaskBatch) -> dict[str, float]:
        batch = self._prepare(batch)
        hparams = self.hparams()
        grads, phis = self.meta_gradient(batch, hparams)
        self.accumulate(grads)
        with torch.no_grad():
            losses = self._per_task(lambda p, q: self.task_loss(p, hparams, q), phis,
                                    batch.query)
        return self._metrics(phis, hparams, batch, losses)
