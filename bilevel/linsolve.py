"""Matrix-free linear solvers for H v = b, with H given as a function ``matvec(v) = H v``.

Both run a FIXED number of iterations with no data-dependent Python control flow, so they work
under ``torch.func.vmap``; outside vmap, :class:`CG` also leaves the loop early once every
system has stopped. Vectors are pytrees; inner products run over all leaves.

- :class:`CG`       conjugate gradients on (H + μI) v = b; stops on ‖r‖ ≤ tol·‖b‖ (returning the
                    updated iterate) or on curvature breakdown p·(H+μI)p ≤ ε·max seen (flagged).
- :class:`Neumann`  v = α Σ_{j=0}^{n} (I − αH)^j b  (Lorraine et al. 2020), needs ‖I − αH‖ < 1.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .problem import BilevelError
from .pytree import (
    PyTree,
    tree_axpy,
    tree_detach,
    tree_dot,
    tree_map,
    tree_norm,
    tree_scale,
    tree_structure,
    tree_sub,
    tree_where,
    tree_zeros_like,
)

MatVec = Callable[[PyTree], PyTree]


def concrete_bool(t: torch.Tensor) -> bool | None:
    """``bool(t)`` outside vmap; ``None`` where the value is not concrete (inside vmap, or
    traced by ``torch.compile``: the callers then take their masked fixed-iteration path
    instead of a data-dependent branch)."""
    if torch.compiler.is_compiling():
        return None
    try:
        return bool(t)
    except RuntimeError:
        return None


@dataclass
class CG:
    """Conjugate gradients for (H + damping·I) v = b, H symmetric positive (semi-)definite.

    x ← x + α p, r ← r − α Ap, p ← r + β p with α = r·r / p·Ap, β = r⁺·r⁺ / r·r.
    Stops (per system, masked, so vmap-safe) when ‖r‖ ≤ tol·‖b‖ (default tol: 1e-10, or 100·
    machine epsilon for float32 and below) or when the curvature
    p·Ap ≤ breakdown_tol · (largest p·Ap/p·p seen) · p·p (singular/indefinite H: the last good
    iterate is kept and ``breakdown`` is flagged). ``warm_start=True`` starts from the
    previous call's solution (eager only; pass ``x0`` explicitly under vmap).
    Info: ``residual`` ‖r‖ (the recursive residual, = ‖b − (H+μI)x‖ up to rounding),
    ``rel_residual``, ``iterations``, ``converged`` (‖r‖ ≤ tol·‖b‖), ``usable``
    (‖r‖ ≤ max(tol, warn_rtol)·‖b‖: :func:`bilevel.check_result` warns only when this is False,
    so the float64 default tol of 1e-10 does not warn at a usable 1e-6), ``breakdown``.
    """

    iters: int = 20
    tol: float | None = None
    damping: float = 0.0
    warm_start: bool = False
    breakdown_tol: float | None = None
    warn_rtol: float = 1e-3
    _last: PyTree = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.iters, int) or self.iters < 0:
            raise BilevelError(f"CG iters must be a non-negative int, got {self.iters!r}")
        if (self.tol is not None and self.tol < 0) or self.damping < 0:
            raise BilevelError(f"CG tol and damping must be >= 0, got tol={self.tol}, "
                               f"damping={self.damping}")

    def __call__(self, matvec: MatVec, b: PyTree, x0: PyTree | None = None):
        if x0 is None and self.warm_start and self._last is not None:
            if tree_structure(self._last) == tree_structure(b):
                x0 = self._last
        A = matvec if self.damping == 0 else (lambda v: tree_axpy(self.damping, v, matvec(v)))
        ref = next(iter(torch.utils._pytree.tree_leaves(b)))
        eps = self.breakdown_tol
        if eps is None:
            eps = 100 * torch.finfo(ref.dtype).eps
        b_norm = tree_norm(b)
        tol = max(1e-10, 100 * torch.finfo(ref.dtype).eps) if self.tol is None else self.tol
        threshold = tol * b_norm
        if x0 is None:
            x, r = tree_zeros_like(b), b
        else:
            x = x0
            r = tree_sub(b, A(x0))
        p = r
        rs = tree_dot(r, r)
        stopped = torch.sqrt(rs) <= threshold
        breakdown = torch.zeros_like(stopped)
        iterations = torch.zeros((), dtype=torch.long, device=ref.device)
        curv_max = torch.zeros_like(rs)
        for _ in range(self.iters):
            Ap = A(p)
            pAp, pp = tree_dot(p, Ap), tree_dot(p, p)
            curv_max = torch.maximum(curv_max, pAp / torch.where(pp > 0, pp, 1))
            bad = pAp <= eps * curv_max * pp
            breakdown = breakdown | (~stopped & bad)
            active = ~stopped & ~bad
            alpha = torch.where(active, rs / torch.where(active, pAp, 1), 0)
            x = tree_axpy(alpha, p, x)
            r = tree_axpy(-alpha, Ap, r)
            rs_new = tree_dot(r, r)
            beta = torch.where(active, rs_new / torch.where(rs > 0, rs, 1), 0)
            p = tree_where(active, tree_axpy(beta, p, r), p)
            rs = torch.where(active, rs_new, rs)
            iterations = iterations + active.long()
            stopped = stopped | bad | (torch.sqrt(rs) <= threshold)
            if concrete_bool(stopped) is True:  # eager: leave early, nothing left to do
                break
        residual = torch.sqrt(rs)  # recursive residual: no extra matvec
        if self.warm_start and concrete_bool(residual == residual) is not None:
            self._last = tree_detach(x)
        info = {
            "residual": residual,
            "rel_residual": residual / torch.where(b_norm > 0, b_norm, 1),
            "iterations": iterations,
            "converged": residual <= threshold if tol > 0 else torch.ones_like(stopped),
            # tol = 0 is a fixed iteration budget (HistoryFree): no residual is asked for
            "usable": (residual <= max(tol, self.warn_rtol) * b_norm if tol > 0
                       else torch.ones_like(stopped)),
            "breakdown": breakdown,
        }
        return x, info


@dataclass(frozen=True)
class Neumann:
    """Truncated Neumann series H⁻¹b ≈ α Σ_{j=0}^{iters} (I − αH)^j b (Lorraine et al. 2020).

    Iteration: v ← b, p ← b; repeat ``iters`` times {v ← v − α H v; p ← p + v}; return α p.
    Converges when ‖I − αH‖ < 1 (α below 2/λ_max(H)); ``info["diverging"]`` flags a last term
    larger than the first.
    """

    iters: int = 20
    alpha: float = 0.1

    def __post_init__(self) -> None:
        if not isinstance(self.iters, int) or self.iters < 0:
            raise BilevelError(f"Neumann iters must be a non-negative int, got {self.iters!r}")
        if not self.alpha > 0:
            raise BilevelError(f"Neumann alpha must be positive, got {self.alpha}")

    def __call__(self, matvec: MatVec, b: PyTree, x0: PyTree | None = None):
        v = p = b
        for _ in range(self.iters):
            v = tree_axpy(-self.alpha, matvec(v), v)
            p = tree_map(torch.add, p, v)
        first, last = tree_norm(b), tree_norm(v)
        info = {
            "last_term_norm": self.alpha * last,
            "diverging": last > first,
            "iterations": torch.tensor(self.iters),
        }
        return tree_scale(p, self.alpha), info
