"""Memory-reduced meta-learning (Yang, Ma & Yu, AAAI 2025) as its official code runs it
(yangxiaolin9527/RM-MetaL; ALGORITHMS.md §6)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

import bilevel as bl

from .base import MetaLearner, Params


class MemoryReducedMAML(MetaLearner):
    """Backbone = upper variable, linear head = lower variable; history-free hypergradient.

    Upper variable x = the backbone: every trainable parameter outside the head (the only
    parameters that ever get ``.grad``: give the optimiser the backbone, e.g.
    ``Adam(model.features.parameters())``; an optimiser over all parameters also works, as
    Adam/SGD skip parameters whose ``.grad`` is None). Lower variable
    y = the head's parameters (``head``: a submodule name, default ``"head"``; ``backbone``
    as :class:`meta.ANIL`), started every time from the model's head as initialised
    (the official fixed random init: drawn once with the model, stored in it, never updated).

    Per task: the backbone features of support and query, computed ONCE (as the official code's
    detached features; :mod:`meta.algorithms.head_only`, the gradient reaches the backbone by
    one VJP), ``inner_steps`` (T = 20) GD steps of ``inner_lr`` (0.1) on the support
    cross-entropy of the head (no graph), then ``bl.HistoryFree(iters=cg_iters)``
    (N = 20 CG steps, no early stop, v_0 = 0) at y_T: ``.grad`` receives
    (1/B) Σ_i [∇_x f_i(x, y_T) − ∇²_xy g_i(x, y_T) · CG_N(∇²_yy g_i(x, y_T), ∇_y f_i(x, y_T))].
    Damping (``damping``, default ``None`` = μ = 1/(β·T) = 0.5 at the defaults): CG solves
    (H + μI) v = ∇_y f. The head's Hessian is singular by construction (no regulariser, as the
    official code): H = (1/n) Σ_i (diag p_i − p_i p_iᵀ) ⊗ φ̃_i φ̃_iᵀ with φ̃_i = [φ_i; 1] over the
    n support examples, so rank H ≤ n·(classes − 1) < q, and ∇_y f (query features) has a
    component outside range(H): H v = ∇_y f has no solution and undamped CG explodes (measured
    |meta-grad| 1e12). μ = 1/(βT) is the damping the T-step GD inner loop itself implies: on a
    quadratic, ∂y_T/∂(·) carries Σ_{t<T} β(I − βH)^t = (I − (I − βH)^T) H⁻¹, which is βT·I on
    null(H) and ≈ H⁻¹ on eigenvalues λ ≫ 1/(βT); (H + μI)⁻¹ with μ = 1/(βT) matches both
    ends (early stopping ≈ ridge). ``damping=0.0`` runs the official undamped system: CG then
    returns its least-residual iterate and flags ``linsolve_breakdown`` (warned at occurrences
    1, 10, 100, ... and set in every result's info).

    Meta-test (every method in the official code): head-only adaptation from the fixed init,
    ``eval_inner_steps=20`` steps of ``eval_inner_lr=0.05``.

    Defaults: T = 20, β = 0.1 (CIFAR-FS / FC100 folders; miniImageNet and tieredImageNet use
    0.05), N = 20, μ = 1/(βT); official outer optimiser Adam, lr 1e-4 (CIFAR-FS/FC100) or 1e-3.
    """

    name = "memoryreduced"
    head_only = True
    implicit_refusal = None  # the head starts from a fixed point: every estimator applies

    def __init__(self, model: nn.Module, inner_lr: float = 0.1, inner_steps: int = 20, *,
                 cg_iters: int = 20, damping: float | None = None, head: str = "head",
                 backbone: str | Callable | None = None, cache_features: bool | None = None,
                 vectorize: bool | None = None, estimator: bl.Estimator | None = None,
                 loss: str | Callable = "cross_entropy", eval_inner_steps: int | None = 20,
                 eval_inner_lr: float | None = 0.05, randomness: str = "different",
                 compile: bool | dict = False):
        if not isinstance(cg_iters, int) or cg_iters < 0:
            raise ValueError(f"cg_iters must be a non-negative int, got {cg_iters!r}")
        if damping is None:  # the damping of the T-step GD inner loop (see the docstring)
            damping = 1.0 / (inner_lr * inner_steps) if isinstance(inner_lr, (int, float)) \
                and inner_lr > 0 and inner_steps > 0 else 0.0
        if isinstance(damping, bool) or not isinstance(damping, (int, float)) or \
                not damping >= 0:
            raise ValueError(f"damping must be None (1/(inner_lr*inner_steps)) or >= 0, got "
                             f"{damping!r}")
        self.cg_iters, self.damping = cg_iters, float(damping)
        super().__init__(model, inner_lr, inner_steps, vectorize=vectorize, estimator=estimator,
                         loss=loss, eval_inner_steps=eval_inner_steps, eval_inner_lr=eval_inner_lr,
                         randomness=randomness, compile=compile, head=head, backbone=backbone,
                         cache_features=cache_features)

    def default_estimator(self) -> bl.Estimator:
        return bl.HistoryFree(iters=self.cg_iters, damping=self.damping)

    def meta_names(self) -> list[str]:
        head = set(self.split.head_names)
        return [n for n, p in self.model.named_parameters() if n not in head and p.requires_grad]

    def inner_names(self) -> list[str]:
        return list(self.split.head_names)

    def head_init(self) -> Params:
        """The fixed lower-level start y_0: the model's head parameters (detached)."""
        params = dict(self.model.named_parameters())
        return {n: params[n].detach() for n in self.split.head_names}

    def params0(self) -> Params:
        return self.head_init()
