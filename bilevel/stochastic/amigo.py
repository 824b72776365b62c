"""AmIGO — Amortized Implicit Gradient Optimization (Arbel & Mairal, ICLR 2022).

Two loops, both warm-started across iterations (v here approximates +H⁻¹∇_z f):

    z ← z − ρ ∇_z g_{i_k}(z, x),                k = 1..T          (T inner batches)
    (∇_z f_j, ∇_x f_j) at the new z                               (1 outer batch)
    v ← v − η (H_{i'_k} v − ∇_z f_j),           k = 1..T'         (SGD on ½vᵀHv − vᵀ∇_z f)
    x ← x − γ (∇_x f_j − J_{i''} v)                               (1 more inner batch)

Inner batches per step: T + T' + 1, in that order; outer: 1. Constant steps by default.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from ..problem import BilevelError, BilevelProblem
from ..pytree import PyTree
from ._common import (
    StepSize,
    StochasticAlgorithm,
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
    sub,
    zeros_like,
)


class AmIGOState(NamedTuple):
    z: PyTree
    v: PyTree
    x: PyTree
    t: int


def _positive_int(value: Any, name: str, algorithm: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise BilevelError(f"{algorithm}: {name} must be a positive int, got {value!r}")
    return value


class AmIGO(StochasticAlgorithm):
    """AmIGO with ``n_inner_steps`` z-steps and ``n_v_steps`` v-steps (both 10 by default)."""

    name = "AmIGO"

    def __init__(self, inner_step: StepSize, outer_step: StepSize, v_step: StepSize | None = None,
                 n_inner_steps: int = 10, n_v_steps: int | None = None, decay: float = 0.0,
                 check: bool = True) -> None:
        self.inner_step = as_schedule(inner_step, decay, "AmIGO inner_step")
        self.v_step = self.inner_step if v_step is None else as_schedule(v_step, decay,
                                                                        "AmIGO v_step")
        self.outer_step = as_schedule(outer_step, decay, "AmIGO outer_step")
        self.n_inner_steps = _positive_int(n_inner_steps, "n_inner_steps", self.name)
        self.n_v_steps = _positive_int(n_inner_steps if n_v_steps is None else n_v_steps,
                                       "n_v_steps", self.name)
        self.check = check
        self.oracle_calls = (self.n_inner_steps + self.n_v_steps + 1, 2)  # benchmark: 21 + 2

    @property
    def batches_per_step(self) -> tuple[int, int]:
        return (self.n_inner_steps + self.n_v_steps + 1, 1)

    def init(self, z0: PyTree, x0: PyTree, v0: PyTree | None = None) -> AmIGOState:
        check_start(z0, x0, self.name)
        return AmIGOState(clone(z0), zeros_like(z0) if v0 is None else clone(v0), clone(x0), 0)

    def step(self, state: AmIGOState, problem: BilevelProblem, inner_batches: Any,
             outer_batches: Any) -> tuple[AmIGOState, dict]:
        check_batches(self.name, "inner", inner_batches, self.batches_per_step[0])
        check_batches(self.name, "outer", outer_batches, 1)
        z, v, x, t = state
        rho, eta, gamma = self.inner_step(t), self.v_step(t), self.outer_step(t)
        T = self.n_inner_steps
        for b in inner_batches[:T]:
            z = axpy(-rho, inner_grad(problem, z, x, b), z)
        fz, fx = outer_grads(problem, z, x, outer_batches[0])
        for b in inner_batches[T:-1]:
            v = axpy(-eta, sub(hvp(problem, z, x, v, b), fz), v)
        jv = cross_vjp(problem, z, x, v, inner_batches[-1])
        x = axpy(-gamma, sub(fx, jv), x)
        if self.check:
            check_finite(t, self.name, z=z, v=v, x=x)
        return AmIGOState(z, v, x, t + 1), {"inner_step": rho, "v_step": eta,
                                           "outer_step": gamma,
                                           "oracle_calls": self.oracle_calls}
