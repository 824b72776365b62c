"""Problem flags of a hypergradient result, and warnings that do not hide each other.

Every call of :func:`bilevel.hypergrad` adds ``res.info["warnings/<kind>"]``: a boolean tensor,
True where the call met that problem (tensor ops only, so under ``vmap`` it comes back batched
and ``.sum()`` counts the problems that met it). The kinds:

- ``diverging``: the inner loss trace ℓ_0..ℓ_{K−1} grows. With q = ⌈K/4⌉, a = ℓ_{0:q},
  z = ℓ_{K−q:K}: mean(z) > mean(a) + ½|mean(a)| + 3·std(a). Averaging a quarter of the trace
  and the margin keep minibatch noise from tripping it; a real divergence (loss ×10) does.
- ``linsolve_breakdown``: CG met curvature p·Hp ≤ 0 or a residual blow-up (singular or
  indefinite inner Hessian); it returned its least-residual iterate.
- ``linsolve_residual``: CG ended above the usable relative residual ``CG.warn_rtol``
  (default 1e-3, the same in float32 and float64) without a breakdown.
- ``neumann_diverging``: the Neumann series' last term outgrew its first (α > 2/λ_max(H)).
- ``not_stationary``: Implicit's ‖∇_w g(w_K)‖ > rtol·‖∇_w g(w_0)‖ (set by the estimator).

Warnings are rate-limited per estimator and kind, not per process: the n-th occurrence of a
kind for an estimator is shown when n is 1, 10, 100, ... (with n in the message), so a problem
that keeps happening resurfaces and one kind never uses up another's slot. Estimators with the
same configuration share their counts (equal ``repr``), so a training loop that builds a fresh
``bl.Implicit(...)`` at every step is still rate-limited; :func:`reset_warnings` re-arms all.
"""

from __future__ import annotations

import dataclasses
import warnings

import torch

from .linsolve import concrete_bool

_COUNTS: dict[tuple[str, str], int] = {}

KINDS = ("diverging", "linsolve_breakdown", "linsolve_residual", "neumann_diverging",
         "not_stationary")


def owner_key(owner: object) -> str:
    """Estimators with equal configuration share a key (tensor-valued fields by identity)."""
    if dataclasses.is_dataclass(owner):
        parts = []
        for f in dataclasses.fields(owner):
            if not f.repr:
                continue
            v = getattr(owner, f.name)
            simple = isinstance(v, (str, int, float, bool, type(None))) or \
                dataclasses.is_dataclass(v)
            parts.append(f"{f.name}={v!r}" if simple else f"{f.name}=<{type(v).__name__} "
                                                          f"{id(v):x}>")
        return f"{type(owner).__name__}({', '.join(parts)})"
    return f"{type(owner).__name__}@{id(owner):x}"


def warn(owner: object, kind: str, message: str, category=RuntimeWarning,
         stacklevel: int = 4) -> None:
    """Show occurrence n of (owner, kind) when n ∈ {1, 10, 100, ...}; every time without owner."""
    if owner is None:
        warnings.warn(message, category, stacklevel=stacklevel)
        return
    key = (owner_key(owner), kind)
    n = _COUNTS.get(key, 0) + 1
    _COUNTS[key] = n
    if str(n).strip("0") == "1":  # 1, 10, 100, ...
        warnings.warn(f"{message} [{kind}: occurrence {n} for this {type(owner).__name__}; "
                      f"shown at occurrences 1, 10, 100, ...]", category, stacklevel=stacklevel)


def reset_warnings() -> None:
    """Forget every occurrence count: each kind of warning is shown again."""
    _COUNTS.clear()


def quarter_means(trace: torch.Tensor):
    """(mean, std) of the first and mean of the last ⌈K/4⌉ entries, along the last dim."""
    q = -(-trace.shape[-1] // 4)
    first, last = trace[..., :q], trace[..., -q:]
    return first.mean(-1), first.std(-1, correction=0), last.mean(-1)


def flags(result) -> dict[str, torch.Tensor]:
    """``{"warnings/<kind>": bool tensor}`` for the kinds this result can show (vmap-safe)."""
    info = result.info
    out = {}
    trace = info.get("inner_loss")
    if trace is not None and trace.shape[-1] >= 2:
        a, spread, z = quarter_means(trace)
        out["warnings/diverging"] = z > a + 0.5 * a.abs() + 3 * spread
    if "linsolve_breakdown" in info:
        out["warnings/linsolve_breakdown"] = info["linsolve_breakdown"]
    if "linsolve_usable" in info:
        usable = info["linsolve_usable"]
        out["warnings/linsolve_residual"] = ~usable & ~info.get("linsolve_breakdown",
                                                               torch.zeros_like(usable))
    if "linsolve_diverging" in info:
        out["warnings/neumann_diverging"] = info["linsolve_diverging"]
    return out


def message(kind: str, info: dict[str, torch.Tensor]) -> str:
    """The warning text of ``kind``, with the worst value of the (possibly batched) result."""
    if kind == "diverging":
        a, _, z = quarter_means(info["inner_loss"])
        a, z = a.reshape(-1), z.reshape(-1)
        i = int((z - a).argmax())
        k = info["inner_loss"].shape[-1]
        return (f"the inner loss grew from {a[i].item():.4g} to {z[i].item():.4g} (mean of the "
                f"first vs the last quarter of {k} inner steps): the inner solver is diverging; "
                f"lower its learning rate")
    if kind == "linsolve_breakdown":
        its = int(info["linsolve_iterations"].max())
        res = info["linsolve_rel_residual"].max().item()
        return (f"CG broke down after {its} iterations (curvature p·Hp <= 0, or its residual blew "
                f"up): the inner Hessian is singular or indefinite at w_K (not a strict minimum); "
                f"its least-residual iterate is used (relative residual {res:.3g}, v = 0 gives "
                f"1). More iterations will "
                f"not help: add damping (CG(damping=...) / HistoryFree(damping=...)), run the "
                f"inner solver to a minimum, or use Neumann or an unrolled estimator")
    if kind == "linsolve_residual":
        res = info["linsolve_rel_residual"].max().item()
        its = int(info["linsolve_iterations"].max())
        return (f"the linear solve stopped at relative residual {res:.3g} after {its} "
                f"iterations, above the usable level (CG(warn_rtol=...), default 1e-3): raise "
                f"CG(iters=...), or add damping to improve the conditioning")
    if kind == "neumann_diverging":
        last = info["linsolve_last_term_norm"].max().item()
        return (f"the Neumann series diverges (its last term, norm {last:.3g}, outgrew the "
                f"first): alpha is above 2/lambda_max of the inner Hessian; lower "
                f"Neumann(alpha=...), or use CG")
    if kind == "not_stationary":
        gK = info["inner_grad_norm"].max().item()
        g0 = info["inner_grad_norm0"].max().item()
        return (f"Implicit: the inner solver did not reach a stationary point (|grad g(w_K)| = "
                f"{gK:.3g} vs {g0:.3g} at w_0); the implicit hypergradient assumes "
                f"grad g(w_K) = 0. Run more inner steps or a larger step size")
    raise KeyError(kind)


def warn_flags(result, owner: object, stacklevel: int = 5) -> None:
    """Warn once per occurrence rule for every kind flagged (concretely) in ``result``."""
    found = {**flags(result), **{k: v for k, v in result.info.items()
                                 if k.startswith("warnings/")}}
    for name, flag in found.items():
        if concrete_bool(flag.any()):
            kind = name.split("/", 1)[1]
            warn(owner, kind, message(kind, result.info), stacklevel=stacklevel)
