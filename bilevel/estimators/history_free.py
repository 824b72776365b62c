"""History-free memory-reduced hypergradient (Yang, Ma & Yu, AAAI 2025, arXiv 2412.12030).

As the official code (yangxiaolin9527/RM-MetaL) runs it: the lower loop runs with no graph and
keeps no earlier iterate; at the last iterate y_T only,

.. math:: v = \\mathrm{CG}_N\\big(\\nabla^2_{yy} g(x, y_T) + \\mu I,\\; \\nabla_y f(x, y_T)\\big),
          \\qquad \\hat h = \\nabla_x f(x, y_T) - \\nabla^2_{xy} g(x, y_T)\\, v

with exactly N conjugate-gradient steps (no early stop) from v_0 = 0 or the previous call's v
(warm start). Memory O(p + q) + one support and one query graph: independent of T and N.
It is :class:`Implicit` with the paper's configuration (fixed N, tol 0, optional damping μ,
optional warm start) plus a guard for the singular Hessians of its settings (an unregularised
linear head: rank ∇²_yy g ≤ n_support·(classes − 1) ≪ q): when p·Hp ≈ 0 CG stops on the last good
iterate and ``info["linsolve_breakdown"]`` is set, instead of dividing by ~0 as the official code
does. The paper's algorithm box was not available; the official code was followed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..linsolve import CG
from .implicit import Implicit


@dataclass
class HistoryFree(Implicit):
    """Memory-reduced estimator: N fixed CG steps at y_T, damping μ, optional warm start."""

    iters: int = 20
    damping: float = 0.0
    warm_start: bool = False
    linsolve: CG = field(init=False)
    stationarity_rtol: float | None = None

    def __post_init__(self) -> None:
        self.linsolve = CG(iters=self.iters, tol=0.0, damping=self.damping,
                           warm_start=self.warm_start)
