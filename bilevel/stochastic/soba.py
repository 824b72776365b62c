"""SOBA — StOchastic Bilevel Algorithm (Dagréou, Ablin, Vaiter, Moreau, NeurIPS 2022).

One iteration t, inner batch i, outer batch j, all directions taken at (z_t, v_t, x_t):

    z_{t+1} = z_t − ρ_t ∇_z g_i(z_t, x_t)
    v_{t+1} = v_t − ρ_t (H_i v_t + ∇_z f_j(z_t, x_t))          (v → −H⁻¹∇_z f)
    x_{t+1} = x_t − γ_t (J_i v_t + ∇_x f_j(z_t, x_t))          (J v = ∇²_xz g v)

ρ_t = ρ/(t+1)^a, γ_t = γ/(t+1)^a, a = 1/2 by default (the paper's decreasing steps, the
benchmark's exponents). H_i v and J_i v come from one VJP of ∇_z g_i. ``compile=True`` runs
the five directions through ``torch.compile`` (see :func:`fused_oracles`).
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
    single_loop_oracles,
    zeros_like,
)


class SOBAState(NamedTuple):
    z: PyTree
    v: PyTree
    x: PyTree
    t: int


class SOBA(StochasticAlgorithm):
    """SOBA. ``inner_step`` ρ (z and v, unless ``v_step`` is given), ``outer_step`` γ: numbers
    (then c/(t+1)^decay), :class:`Schedule` or callables t -> step. Batches per step: (1, 1)."""

    name = "SOBA"
    oracle_calls = (3, 2)

    def __init__(self, inner_step: StepSize, outer_step: StepSize, v_step: StepSize | None = None,
                 decay: float = 0.5, compile: bool = False, check: bool = True) -> None:
        self.inner_step = as_schedule(inner_step, decay, "SOBA inner_step")
        self.v_step = self.inner_step if v_step is None else as_schedule(v_step, decay,
                                                                        "SOBA v_step")
        self.outer_step = as_schedule(outer_step, decay, "SOBA outer_step")
        self.check, self.compile = check, compile

    @property
    def batches_per_step(self) -> tuple[int, int]:
        return (1, 1)

    def init(self, z0: PyTree, x0: PyTree, v0: PyTree | None = None) -> SOBAState:
        check_start(z0, x0, self.name)
        return SOBAState(clone(z0), zeros_like(z0) if v0 is None else clone(v0), clone(x0), 0)

    def step(self, state: SOBAState, problem: BilevelProblem, inner_batches: Any,
             outer_batches: Any) -> tuple[SOBAState, dict]:
        check_batches(self.name, "inner", inner_batches, 1)
        check_batches(self.name, "outer", outer_batches, 1)
        z, v, x, t = state
        rho, eta, gamma = self.inner_step(t), self.v_step(t), self.outer_step(t)
        gz, hv, jv, fz, fx = single_loop_oracles(problem, z, x, v, inner_batches[0],
                                                 outer_batches[0], self.compile)
        z = axpy(-rho, gz, z)
        v = axpy(-eta, add(hv, fz), v)
        x = axpy(-gamma, add(jv, fx), x)
        if self.check:
            check_finite(t, self.name, z=z, v=v, x=x)
        return SOBAState(z, v, x, t + 1), {"inner_step": rho, "v_step": eta,
                                          "outer_step": gamma, "oracle_calls": self.oracle_calls}
