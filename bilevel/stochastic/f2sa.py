"""F2SA — Fully First-order Stochastic Approximation (Kwon, Kwon, Wright, Nowak, ICML 2023).

No second derivatives. The penalised inner variable y solves min_y λ g + f, the plain one
z solves min_z g; with λ → ∞, ∇_x f(y) + λ(∇_x g(y) − ∇_x g(z)) → ∇h(x). One iteration:

    repeat T times (inner batches i, i', outer batch j, fresh each time):
        y ← y − ρ_t (λ ∇_y g_i(y, x) + ∇_y f_j(y, x))
        z ← z − η_t ∇_z g_{i'}(z, x)
    x ← x − γ_t (∇_x f_{j'}(y, x) + λ (∇_x g_{i''}(y, x) − ∇_x g_{i'''}(z, x)))
    λ ← λ + δ_t

ρ_t = ρ/(t+1)^{5/7}, η_t = η/(t+1)^{4/7}, γ_t = γ/(t+1)^{4/7}, δ_t = δ/(t+1)^{1/7} (the
benchmark's exponents; λ_0 = 1, δ = 0.1 by default). Note: with these exponents λ_t grows like
t^{6/7} and ρ_t λ_t like t^{1/7}, so the y-iteration eventually becomes unstable on any problem
(the paper keeps ρ_t λ_t decreasing); the benchmark's rule is the default for comparability,
``lam=`` (a callable t -> λ_t, e.g. a constant) replaces it. Inner batches per step, in order:
(i, i') for each of the T steps, then (i'', i'''); outer: j for each step, then j'.
``state.z`` is y (the variable whose outer loss is reported), ``state.z_star`` is z.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from ..problem import BilevelError, BilevelProblem
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
    inner_grad,
    inner_grad_x,
    outer_grad_x,
    outer_grad_z,
    scale,
    sub,
)
from .amigo import _positive_int


class F2SAState(NamedTuple):
    z: PyTree  # y: penalised inner variable
    z_star: PyTree  # z: plain inner variable (≈ argmin g)
    x: PyTree
    lam: float
    t: int


class F2SA(StochasticAlgorithm):
    """F2SA with ``n_inner_steps`` T (10 by default)."""

    name = "F2SA"

    def __init__(self, inner_step: StepSize, outer_step: StepSize,
                 star_step: StepSize | None = None, lam0: float = 1.0,
                 lam_step: StepSize = 0.1, n_inner_steps: int = 10,
                 lam: Callable[[int], float] | None = None, check: bool = True) -> None:
        self.inner_step = as_schedule(inner_step, 5 / 7, "F2SA inner_step")
        self.star_step = as_schedule(inner_step if star_step is None else star_step, 4 / 7,
                                     "F2SA star_step")
        self.outer_step = as_schedule(outer_step, 4 / 7, "F2SA outer_step")
        self.lam_step = as_schedule(lam_step, 1 / 7, "F2SA lam_step")
        if not lam0 > 0:
            raise BilevelError(f"F2SA: lam0 must be > 0, got {lam0!r}")
        self.lam0 = float(lam0)
        if lam is not None and not callable(lam):
            raise BilevelError("F2SA: lam must be a callable t -> λ_t (or None for the "
                               "benchmark's λ_{t+1} = λ_t + δ/(t+1)^{1/7})")
        self.lam = lam
        self.n_inner_steps = _positive_int(n_inner_steps, "n_inner_steps", self.name)
        self.check = check
        self.oracle_calls = (2 * self.n_inner_steps + 2, self.n_inner_steps + 1)

    @property
    def batches_per_step(self) -> tuple[int, int]:
        return (2 * self.n_inner_steps + 2, self.n_inner_steps + 1)

    def init(self, z0: PyTree, x0: PyTree, z_star0: PyTree | None = None) -> F2SAState:
        check_start(z0, x0, self.name)
        lam = self.lam0 if self.lam is None else float(self.lam(0))
        return F2SAState(clone(z0), clone(z0 if z_star0 is None else z_star0), clone(x0), lam, 0)

    def step(self, state: F2SAState, problem: BilevelProblem, inner_batches: Any,
             outer_batches: Any) -> tuple[F2SAState, dict]:
        check_batches(self.name, "inner", inner_batches, self.batches_per_step[0])
        check_batches(self.name, "outer", outer_batches, self.batches_per_step[1])
        y, z, x, lam, t = state
        if self.lam is not None:
            lam = self.lam(t)
            lam = lam if isinstance(lam, torch.Tensor) else float(lam)
        rho, eta = self.inner_step(t), self.star_step(t)
        gamma, dlam = self.outer_step(t), self.lam_step(t)
        for k in range(self.n_inner_steps):
            bi, bs, bo = inner_batches[2 * k], inner_batches[2 * k + 1], outer_batches[k]
            dy = add(scale(lam, inner_grad(problem, y, x, bi)), outer_grad_z(problem, y, x, bo))
            dz = inner_grad(problem, z, x, bs)
            y, z = axpy(-rho, dy, y), axpy(-eta, dz, z)
        dx = add(outer_grad_x(problem, y, x, outer_batches[-1]),
                 scale(lam, sub(inner_grad_x(problem, y, x, inner_batches[-2]),
                                inner_grad_x(problem, z, x, inner_batches[-1]))))
        x = axpy(-gamma, dx, x)
        if self.check:
            check_finite(t, self.name, y=y, z_star=z, x=x)
        return F2SAState(y, z, x, lam + dlam, t + 1), {
            "inner_step": rho, "star_step": eta, "outer_step": gamma, "lam": lam,
            "oracle_calls": self.oracle_calls}
