"""Matrix-free linear solvers for H v = b, with H given as a function ``matvec(v) = H v``.

Both run a FIXED number of iterations with no data-dependent Python control flow, so they work
under ``torch.func.vmap``; outside vmap, :class:`CG` also leaves the loop early once every
system has stopped. Vectors are pytrees; inner products run over all leaves.

- :class:`CG`       conjugate gradients on (H + μI) v = b, returning the iterate of least
                    residual; stops on ‖r‖ ≤ tol·‖b‖ or on breakdown (flagged): curvature
                    p·(H+μI)p ≤ ε·max seen, or the residual grown 1e4× over its best.
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
    Returns the last iterate (plain CG: on SPD A the least A-norm error in the Krylov space)
    unless a breakdown occurred or ‖r_last‖ > ‖r_0‖; then the iterate of least recursive
    residual ‖r_k‖ seen, x_0 included. So the result is never worse than the start (v = 0 or
    ``x0``) in residual, and on SPD systems it is unchanged. Stops (per system, masked, so
    vmap-safe):

    - converged: ‖r‖ ≤ tol·‖b‖ (default tol: 1e-10, or 100·machine epsilon for float32 and below);
    - breakdown (flagged): curvature p·Ap ≤ breakdown_tol·(largest p·Ap/p·p seen)·p·p, or the
      residual grew: ‖r_k‖ > ``growth``·min_{j<k} ‖r_j‖. On SPD A the A-norm error ‖e_k‖_A is
      non-increasing and λ_min‖e‖²_A ≤ ‖r‖² ≤ λ_max‖e‖²_A, so ‖r_k‖ ≤ √κ(A)·‖r_j‖ for j < k:
      growth beyond 1e4 (the default) means κ > 1e8 or an indefinite/singular A. On a singular,
      inconsistent system (b ∉ range(H), e.g. an unregularised linear head) α = r·r/p·Ap
      explodes along near-null directions long before p·Ap hits the curvature threshold; the
      growth test stops there and the best iterate is returned instead of the exploded one.

    ``warm_start=True`` starts from the previous call's solution (eager only; pass ``x0``
    explicitly under vmap).
    Info: ``residual`` ‖r‖ of the returned iterate (the recursive residual, = ‖b − (H+μI)x‖ up
    to rounding, no extra matvec), ``rel_residual``, ``iterations``, ``converged``
    (‖r‖ ≤ tol·‖b‖; always True for tol = 0, a fixed budget), ``usable``
    (‖r‖ ≤ max(tol, warn_rtol)·‖b‖, also for tol = 0: :func:`bilevel.check_result` warns when
    this is False, so the float64 default tol of 1e-10 does not warn at a usable 1e-6),
    ``breakdown``.
    """

    iters: int = 20
    tol: float | None = None
    damping: float = 0.0
    warm_start: bool = False
    breakdown_tol: float | None = None
    warn_rtol: float = 1e-3
    growth: float = 1e4
    _last: PyTree = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.iters, int) or isinstance(self.iters, bool) or self.iters < 0:
            raise BilevelError(f"CG iters must be a non-negative int, got {self.iters!r}")
        if (self.tol is not None and self.tol < 0) or self.damping < 0:
            raise BilevelError(f"CG tol and damping must be >= 0, got tol={self.tol}, "
                               f"damping={self.damping}")
        if not self.growth > 1:
            raise BilevelError(f"CG growth must be > 1, got {self.growth!r}")

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
        x_best, rs_best, rs0 = x, rs, rs
        growth2 = self.growth ** 2
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
            # the residual blew up over the best seen: singular/indefinite (see docstring)
            grew = active & ~(rs_new <= growth2 * rs_best)
            breakdown = breakdown | grew
            better = active & (rs_new < rs_best)
            x_best = tree_where(better, x, x_best)
            rs_best = torch.where(better, rs_new, rs_best)
            beta = torch.where(active, rs_new / torch.where(rs > 0, rs, 1), 0)
            p = tree_where(active, tree_axpy(beta, p, r), p)
            rs = torch.where(active, rs_new, rs)
            iterations = iterations + (active & ~grew).long()
            stopped = stopped | bad | grew | (torch.sqrt(rs) <= threshold)
            if concrete_bool(stopped) is True:  # eager: leave early, nothing left to do
                break
        # the last iterate (least A-norm error on SPD: plain CG) unless it broke down or ended
        # worse than the start; then the least-residual iterate seen (x_0 included)
        last = ~breakdown & (rs <= rs0)
        x = tree_where(last, x, x_best)
        residual = torch.sqrt(torch.where(last, rs, rs_best))  # recursive: no extra matvec
        if self.warm_start and concrete_bool(residual == residual) is not None:
            self._last = tree_detach(x)
        info = {
            "residual": residual,
            "rel_residual": residual / torch.where(b_norm > 0, b_norm, 1),
            "iterations": iterations,
            # tol = 0 is a fixed iteration budget (HistoryFree): no convergence is asked for,
            # but a residual above warn_rtol is still reported as not usable
            "converged": residual <= threshold if tol > 0 else torch.ones_like(stopped),
            "usable": residual <= max(tol, self.warn_rtol) * b_norm,
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
