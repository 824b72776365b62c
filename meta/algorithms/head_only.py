"""Head-only inner loops (ANIL, memory-reduced): the backbone runs ONCE per task, not per step.

When the inner loop adapts only the head h of a model f(x) = h(φ_θ(x)), the support and query
features F_s = φ_θ(x_s), F_q = φ_θ(x_q) do not depend on the adapted head, so

    g(w, θ) = L(h_w(F_s(θ)), y_s),    f(w, θ) = L(h_w(F_q(θ)), y_q)

and, for ANY estimator, by the chain rule

    dF/dθ_body = (∂F_s/∂θ_body)ᵀ · dF/dF_s + (∂F_q/∂θ_body)ᵀ · dF/dF_q.

:class:`HeadOnlyMixin` computes the features with one :func:`bilevel.autodiff.vjp` per task,
calls :func:`bilevel.hypergrad` on the head problem whose hyperparameters are the head
initialisation (ANIL; none for the memory-reduced algorithm) AND the two feature tensors, and
pulls the feature gradients back through the backbone: one backbone forward and backward per
task instead of one per inner step (and per CG product). The value is the same as
differentiating through the full model at every step (tested to 1e-9 in float64).

It needs ``model.features`` and ``model.head`` with ``model(x) == head(features(prep(x)))``,
``prep = model.prepare_input`` when the model has one (:class:`meta.Conv4` adds the channel
dim); this is verified once on the first batch. ``cache_features=False`` runs the plain
per-step full-model forward instead (any model with a ``head``).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

import bilevel as bl

from ..tasks import TaskBatch
from .base import Params, Split

FEAT_S, FEAT_Q = "features:support", "features:query"  # never a parameter name (no ':')


def _sub(tree: Params, prefix: str) -> Params:
    return {n[len(prefix):]: t for n, t in tree.items() if n.startswith(prefix)}


class HeadOnlyMixin:
    """Mixin for a :class:`~meta.algorithms.base.MetaLearner` whose ``inner_names`` are the head:
    per-task backbone features computed once and treated as hyperparameters (module docstring).
    """

    cache_features: bool = True
    _checked_model: bool = False

    def _set_cache(self, model: nn.Module, cache_features: bool | None) -> None:
        if cache_features not in (None, True, False):
            raise ValueError(f"cache_features must be True, False or None, got "
                             f"{cache_features!r}")
        has = isinstance(getattr(model, "features", None), nn.Module)
        if cache_features and not has:
            raise ValueError(f"cache_features=True needs a model with a 'features' submodule "
                             f"(the backbone) before its 'head'; {type(model).__name__} has none")
        self.cache_features = has if cache_features is None else cache_features
        self._checked_model = False

    # ---------------------------------------------------------------- the two halves
    def embed(self, hparams: Params, x: torch.Tensor) -> torch.Tensor:
        """φ_θ(x): the backbone on ``x`` with the meta-parameters ``hparams``."""
        prep = getattr(self.model, "prepare_input", None)
        x = prep(x) if callable(prep) else x
        full = {**self._consts, **hparams}
        return functional_call(self.model.features, _sub(full, "features."), (x,))

    def head_out(self, params: Params, hparams: Params, feats: torch.Tensor) -> torch.Tensor:
        """h_w(F): the head with adapted ``params`` overriding ``hparams``."""
        full = {**self._consts, **hparams, **params}
        return functional_call(self.model.head, _sub(full, "head."), (feats,))

    @staticmethod
    def _split(hparams: Params) -> tuple[Params, Params]:
        """(backbone, head) meta-parameters, split by the ``head.`` prefix as
        :func:`meta.models.split_params`."""
        head = {n: t for n, t in hparams.items() if n.startswith("head.")}
        return {n: t for n, t in hparams.items() if n not in head}, head

    def _check_model(self, hparams: Params, x: torch.Tensor) -> None:
        """Once: ``model(x) == head(features(x))``, else the cached path would be wrong."""
        if self._checked_model:
            return
        with torch.no_grad():
            want = self.forward({}, hparams, x)
            got = self.head_out({}, hparams, self.embed(hparams, x))
        if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-4, atol=1e-5):
            raise ValueError(f"{type(self.model).__name__}(x) is not head(features(x)), so the "
                             f"backbone features cannot be computed once per task: pass "
                             f"cache_features=False")
        self._checked_model = True

    def head_problem(self) -> bl.BilevelProblem:
        """g = L(h_w(F_s), y_s), f = L(h_w(F_q), y_q); F_s, F_q are hyperparameters."""

        def support_loss(w, h, batch):
            return self.loss_fn(self.head_out(w, h, h[FEAT_S]), batch[1])

        def query_loss(w, h, batch):
            return self.loss_fn(self.head_out(w, h, h[FEAT_Q]), batch[1])

        return bl.BilevelProblem(support_loss, query_loss, init=self._init_or_none())

    # ---------------------------------------------------------------- MetaLearner hooks
    def _prepare(self, batch: TaskBatch) -> TaskBatch:
        batch = super()._prepare(batch)
        if self.cache_features and not self._checked_model:
            self._consts = self.constants()
            self._check_model(self.hparams(), batch.support[0][0])
        return batch

    def task_hypergrad(self, hparams: Params, task: TaskBatch, *, check: bool = True
                       ) -> bl.HypergradResult:
        if not self.cache_features:
            return super().task_hypergrad(hparams, task, check=check)
        (xs, ys), (xq, yq) = task.support, task.query
        body, head_hp = self._split(hparams)
        (fs, fq), pull = bl.autodiff.vjp(lambda b: (self.embed(b, xs), self.embed(b, xq)), body)
        res = bl.hypergrad(self.head_problem(), {**head_hp, FEAT_S: fs, FEAT_Q: fq},
                           (xs, ys), (xq, yq), solver=self.solver(True),
                           estimator=self.estimator, params0=self.params0(), check=check)
        (g_body,) = pull((res.grad[FEAT_S], res.grad[FEAT_Q]))
        grad = {n: res.grad[n] for n in head_hp}
        grad.update(g_body)
        return bl.HypergradResult({n: grad[n] for n in hparams}, res.params, res.outer_loss,
                                  res.info)

    def _adapt_one(self, hparams: Params, support: Split) -> Params:
        if not self.cache_features:
            return super()._adapt_one(hparams, support)
        body, head_hp = self._split(hparams)
        with torch.no_grad():
            fs = self.embed(body, support[0])
        return bl.solve(self.head_problem(), {**head_hp, FEAT_S: fs}, support,
                        solver=self.solver(False), params0=self.params0())
