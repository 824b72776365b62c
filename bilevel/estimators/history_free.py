"""History-free memory-reduced hypergradient (Yang, Ma & Yu, AAAI 2025, arXiv 2412.12030).

As the official code (yangxiaolin9527/RM-MetaL) runs it: the lower loop runs with no graph and
keeps no earlier iterate; at the last iterate y_T only,

.. math:: v = \\mathrm{CG}_N\\big(\\nabla^2_{yy} g(x, y_T) + \\mu I,\\; \\nabla_y f(x, y_T)\\big),
          \\qquad \\hat h = \\nabla_x f(x, y_T) - \\nabla^2_{xy} g(x, y_T)\\, v

with exactly N conjugate-gradient steps (no early stop) from v_0 = 0 or the previous call's v
(warm start). Memory O(p + q) + one support and one query graph: independent of T and N.
It is :class:`Implicit` with the paper's configuration (fixed N, tol 0, optional damping μ,
optional warm start) plus a guard for the singular Hessians of its settings (an unregularised
linear head: rank ∇²_yy g ≤ n_support·(classes − 1) ≪ q): when p·Hp ≈ 0 or the residual blows
up, CG stops, returns its iterate of least residual (never worse than v_0) and sets
``info["linsolve_breakdown"]``, instead of dividing by ~0 as the official code does. The
paper's algorithm box was not available; the official code was followed.
"""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass, field
from typing import Any

from ..linsolve import CG, Neumann
from ..problem import BilevelError
from .implicit import Implicit


@dataclass
class HistoryFree(Implicit):
    """Memory-reduced estimator: N fixed CG steps at y_T, damping μ, optional warm start.

    ``HistoryFree(iters=20, damping=0.0, warm_start=False, *, stationarity_rtol=None,
    hvp="auto", system_batch="last")``: the first three may be positional, the inherited
    :class:`Implicit` options are keyword-only. It builds its own ``bl.CG(iters, tol=0,
    damping, warm_start)``; for another linear solver use ``bl.Implicit(bl.CG(...))``.
    On a singular H (damping 0) CG returns its iterate of least residual (v = 0 at worst) and
    flags ``info["linsolve_breakdown"]``; a sound damping for a T-step GD inner loop of step η
    is μ = 1/(ηT), see :class:`meta.MemoryReducedMAML`.
    """

    iters: int = 20
    damping: float = 0.0
    warm_start: bool = False
    _: KW_ONLY
    linsolve: CG = field(init=False, repr=False)
    stationarity_rtol: float | None = None
    hvp: str = "auto"
    system_batch: Any = "last"

    def __post_init__(self) -> None:
        if isinstance(self.iters, (CG, Neumann)) or callable(self.iters):
            raise BilevelError("HistoryFree takes iters=..., it builds its own CG; use "
                               "bl.Implicit(bl.CG(...)) for a custom solver")
        if not isinstance(self.iters, int) or isinstance(self.iters, bool) or self.iters < 0:
            raise BilevelError(f"HistoryFree(iters=...) must be a non-negative int, got "
                               f"{self.iters!r}")
        if isinstance(self.damping, bool) or not isinstance(self.damping, (int, float)) \
                or not self.damping >= 0:
            raise BilevelError(f"HistoryFree(damping=...) must be a number >= 0, got "
                               f"{self.damping!r}")
        if not isinstance(self.warm_start, bool):
            raise BilevelError(f"HistoryFree(warm_start=...) must be True or False, got "
                               f"{self.warm_start!r}")
        self.linsolve = CG(iters=self.iters, tol=0.0, damping=float(self.damping),
                           warm_start=self.warm_start)
        super().__post_init__()
