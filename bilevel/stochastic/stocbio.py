"""StocBiO — Stochastic Bilevel Optimizer (Ji, Yang, Liang, ICML 2021).

    z ← z − ρ ∇_z g_{i_k}(z, x),           k = 1..T       (warm-started across iterations)
    b = ∇_z f_j(z, x)                                     (1 outer batch, also gives ∇_x f_j)
    u_0 = b ;  u_q = (I − η H_{i'_q}) u_{q−1} ;  v = η Σ_{q=0}^{Q} u_q   (≈ H⁻¹ b, Neumann,
                                                            a fresh batch per term, q = 1..Q)
    x ← x − γ (∇_x f_j − J_{i''} v)

Inner batches per step: T + Q + 1, in that order; outer: 1. v is rebuilt from b each
iteration (no warm start). Constant steps by default.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from ..problem import BilevelProblem
from ..pytree import PyTree
from ._common import (
    StepSize,
    StochasticAlgorithm,
    add,
    as_schedule,
    axpy,
    check_batches,
    check_finite,
    check_start,
    clone,
    cross_vjp,
    hvp,
    inner_grad,
    outer_grads,
    scale,
    sub,
)
from .amigo import _positive_int


class StocBiOState(NamedTuple):
    z: PyTree
    x: PyTree
    t: int


class StocBiO(StochasticAlgorithm):
    """StocBiO with ``n_inner_steps`` T and ``n_neumann_steps`` Q (10 and 10 by default);
    ``neumann_step`` η defaults to ``inner_step``."""

    name = "StocBiO"

    def __init__(self, inner_step: StepSize, outer_step: StepSize,
                 neumann_step: StepSize | None = None, n_inner_steps: int = 10,
                 n_neumann_steps: int = 10, decay: float = 0.0, check: bool = True) -> None:
        self.inner_step = as_schedule(inner_step, decay, "StocBiO inner_step")
        self.neumann_step = (self.inner_step if neumann_step is None
                             else as_schedule(neumann_step, decay, "StocBiO neumann_step"))
        self.outer_step = as_schedule(outer_step, decay, "StocBiO outer_step")
        self.n_inner_steps = _positive_int(n_inner_steps, "n_inner_steps", self.name)
        self.n_neumann_steps = _positive_int(n_neumann_steps, "n_neumann_steps", self.name)
        self.check = check
        self.oracle_calls = (self.n_inner_steps + self.n_neumann_steps + 1, 2)

    @property
    def batches_per_step(self) -> tuple[int, int]:
        return (self.n_inner_steps + self.n_neumann_steps + 1, 1)

    def init(self, z0: PyTree, x0: PyTree) -> StocBiOState:
        check_start(z0, x0, self.name)
        return StocBiOState(clone(z0), clone(x0), 0)

    def step(self, state: StocBiOState, problem: BilevelProblem, inner_batches: Any,
             outer_batches: Any) -> tuple[StocBiOState, dict]:
        check_batches(self.name, "inner", inner_batches, self.batches_per_step[0])
        check_batches(self.name, "outer", outer_batches, 1)
        z, x, t = state
        rho, eta, gamma = self.inner_step(t), self.neumann_step(t), self.outer_step(t)
        T = self.n_inner_steps
        for b in inner_batches[:T]:
            z = axpy(-rho, inner_grad(problem, z, x, b), z)
        fz, fx = outer_grads(problem, z, x, outer_batches[0])
        u, s = fz, fz
        for b in inner_batches[T:-1]:
            u = axpy(-eta, hvp(problem, z, x, u, b), u)
            s = add(s, u)
        v = scale(eta, s)
        jv = cross_vjp(problem, z, x, v, inner_batches[-1])
        x = axpy(-gamma, sub(fx, jv), x)
        if self.check:
            check_finite(t, self.name, z=z, x=x)
        return StocBiOState(z, x, t + 1), {"inner_step": rho, "neumann_step": eta,
                                          "outer_step": gamma, "v": v,
                                          "oracle_calls": self.oracle_calls}
