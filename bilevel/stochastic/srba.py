"""SRBA — Stochastic Recursive Bilevel Algorithm (Dagréou, Moreau, Vaiter, Ablin, 2023,
arXiv 2302.08766: "A lower bound and a near-optimal algorithm for bilevel empirical risk
minimization").

SARAH directions (d_z, d_v, d_x) for the SOBA fields D_z = ∇_z g, D_v = H v + ∇_z f,
D_x = J v + ∇_x f, with a full-batch reset every ``period`` iterations:

    t ≡ 0 (mod q):  d = D(θ_t)                             (full batch)
    otherwise:      d ← d + D_{i,j}(θ_t) − D_{i,j}(θ_{t−1})  (same batches i, j at both points)
    z ← z − ρ d_z ;   v ← v − ρ d_v ;   x ← x − γ d_x

θ = (z, v, x); constant steps by default. The benchmark's period is
q = int(period_frac · (n_inner + n_outer) / batch_size), period_frac ∈ {0.5, 8, 64, 512}:
:func:`srba_period`. On reset iterations (``alg.needs_full(t)``) the batch lists hold the
full datasets (``Sampler.full()``), and no minibatch is drawn.
"""

from __future__ import annotations

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
    single_loop_oracles,
    sub,
    zeros_like,
)


def srba_period(n_inner: int, n_outer: int, batch_size: int, period_frac: float = 0.5) -> int:
    """q = int(period_frac · (n_inner + n_outer) / batch_size) (at least 1)."""
    return max(1, int(period_frac * (n_inner + n_outer) / batch_size))


class SRBAState(NamedTuple):
    z: PyTree
    v: PyTree
    x: PyTree
    t: int
    prev: tuple  # (z, v, x) at t − 1
    d: tuple  # (d_z, d_v, d_x)


class SRBA(StochasticAlgorithm):
    """SRBA with reset period ``period`` (iterations). Batches per step: (1, 1) — on reset
    iterations the full inner and outer datasets."""

    name = "SRBA"
    oracle_calls = (3, 2)

    def __init__(self, inner_step: StepSize, outer_step: StepSize, period: int,
                 v_step: StepSize | None = None, decay: float = 0.0, compile: bool = False,
                 check: bool = True) -> None:
        if not isinstance(period, int) or period < 1:
            raise BilevelError(f"SRBA: period must be a positive int (see srba_period), "
                               f"got {period!r}")
        self.inner_step = as_schedule(inner_step, decay, "SRBA inner_step")
        self.v_step = self.inner_step if v_step is None else as_schedule(v_step, decay,
                                                                        "SRBA v_step")
        self.outer_step = as_schedule(outer_step, decay, "SRBA outer_step")
        self.period, self.check, self.compile = period, check, compile

    @property
    def batches_per_step(self) -> tuple[int, int]:
        return (1, 1)

    def needs_full(self, t: int) -> bool:
        """True when iteration t is a full-batch reset."""
        return t % self.period == 0

    def init(self, z0: PyTree, x0: PyTree, v0: PyTree | None = None) -> SRBAState:
        check_start(z0, x0, self.name)
        z, x = clone(z0), clone(x0)
        v = zeros_like(z0) if v0 is None else clone(v0)
        return SRBAState(z, v, x, 0, (z, v, x), (zeros_like(z), zeros_like(z), zeros_like(x)))

    def _fields(self, problem, z, v, x, ib, ob):
        gz, hv, jv, fz, fx = single_loop_oracles(problem, z, x, v, ib, ob, self.compile)
        return gz, add(hv, fz), add(jv, fx)

    def step(self, state: SRBAState, problem: BilevelProblem, inner_batches: Any,
             outer_batches: Any) -> tuple[SRBAState, dict]:
        check_batches(self.name, "inner", inner_batches, 1)
        check_batches(self.name, "outer", outer_batches, 1)
        z, v, x, t, (zp, vp, xp), d = state
        ib, ob = inner_batches[0], outer_batches[0]
        if not isinstance(t, torch.Tensor) and self.needs_full(t):  # (never in a chunk)
            d = self._fields(problem, z, v, x, ib, ob)
        else:
            new = self._fields(problem, z, v, x, ib, ob)
            old = self._fields(problem, zp, vp, xp, ib, ob)
            d = tuple(add(di, sub(a, b)) for di, a, b in zip(d, new, old))
        rho, eta, gamma = self.inner_step(t), self.v_step(t), self.outer_step(t)
        zn, vn, xn = axpy(-rho, d[0], z), axpy(-eta, d[1], v), axpy(-gamma, d[2], x)
        if self.check:
            check_finite(t, self.name, z=zn, v=vn, x=xn)
        return SRBAState(zn, vn, xn, t + 1, (z, v, x), d), {
            "inner_step": rho, "v_step": eta, "outer_step": gamma,
            "full": not isinstance(t, torch.Tensor) and self.needs_full(t),
            "oracle_calls": self.oracle_calls}
