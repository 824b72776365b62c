"""Problem flags of a hypergradient result, and warnings that do not hide each other.

Every call of :func:`bilevel.hypergrad` adds ``res.info["warnings/<kind>"]``: a boolean tensor,
True where the call met that problem (tensor ops only, so under ``vmap`` it comes back batched
and ``.sum()`` counts the problems that met it). The kinds:

- ``diverging``: the inner loss trace ℓ_0..ℓ_{K−1} grows: a rank trend test (which i.i.d.
  minibatch noise, however heavy-tailed, trips with probability < 3·10⁻⁴) and a margin. With
  m_1..m_n the trace (n = K) or, for K > 64, the means of n = 64 equal bins of its end;
  S = Σ_{i<j} sign(m_j − m_i) (Mann–Kendall), σ_S² = n(n−1)(2n+5)/18; ā, z̄ the means of the
  first and last ⌈K/4⌉ losses:
  diverging ⇔ [S/σ_S > 3.5 and z̄ > ā + ½|ā|] or [ℓ strictly increasing, K ≥ 3 and
  ℓ_{K−1} − ℓ_0 > 10³·|ℓ_0|]. S is distribution-free under i.i.d. noise; S/σ_S can exceed 3.5
  only for n ≥ 9, so shorter traces warn only on an explosive (×10³, monotone) growth.
- ``linsolve_breakdown``: CG met curvature p·Hp ≤ 0 or a residual blow-up (singular or
  indefinite inner Hessian); it returned its least-residual iterate.
- ``linsolve_residual``: CG ended above the usable relative residual ``CG.warn_rtol``
  (default 1e-3, the same in float32 and float64) without a breakdown.
- ``neumann_diverging``: the Neumann series' last term outgrew its first (α > 2/λ_max(H)).
- ``not_stationary``: Implicit's ‖∇_w g(w_K)‖ > rtol·‖∇_w g(w_0)‖ (set by the estimator).

Warnings are rate-limited per (estimator configuration, problem, kind), not per process: the
n-th occurrence is shown when n is 1, 10, 100, ... (with n in the message), so a problem that
keeps happening resurfaces and one kind never uses up another's slot. Estimators with the same
configuration share their counts (equal ``repr``), and a problem is identified by the code of
its loss functions and init (a bound method: its function and instance), so a training loop that
builds a fresh ``bl.Implicit(...)`` or a fresh ``BilevelProblem`` of the same functions at every
step is still rate-limited, while an unrelated problem's first occurrence is shown;
:func:`reset_warnings` re-arms all.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import warnings

import torch

from .linsolve import concrete_bool

_COUNTS: dict[tuple, int] = {}
_PROBLEM: contextvars.ContextVar[tuple | None] = contextvars.ContextVar("bilevel_problem",
                                                                        default=None)

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


def _fn_key(fn: object) -> object:
    """What identifies a loss function across re-creations: its code (closures made by one
    factory share it), for a bound method its function and instance, for a partial its func."""
    if isinstance(fn, functools.partial):
        return ("partial", _fn_key(fn.func))
    self = getattr(fn, "__self__", None)
    func = getattr(fn, "__func__", fn)
    code = getattr(func, "__code__", None)
    if code is None:
        return type(fn).__qualname__ if fn is not None else None
    return (code, id(self)) if self is not None else code


def problem_key(problem: object) -> tuple:
    """The counter key of a problem: ``_fn_key`` of its inner loss, outer loss and init."""
    return tuple(_fn_key(getattr(problem, name, None))
                 for name in ("inner_loss", "outer_loss", "init"))


@contextlib.contextmanager
def problem_scope(problem: object):
    """Warnings raised inside are counted for ``problem`` (see the module docstring)."""
    token = _PROBLEM.set(problem_key(problem))
    try:
        yield
    finally:
        _PROBLEM.reset(token)


def warn(owner: object, kind: str, message: str, category=RuntimeWarning,
         stacklevel: int = 4) -> None:
    """Show occurrence n of (owner, kind) when n ∈ {1, 10, 100, ...}; every time without owner."""
    if owner is None:
        warnings.warn(message, category, stacklevel=stacklevel)
        return
    key = (owner_key(owner), _PROBLEM.get(), kind)
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


_TREND_Z = 3.5
_BINS = 64


def trend_z(trace: torch.Tensor) -> torch.Tensor:
    """Mann–Kendall S/σ_S of the trace (last dim; the means of 64 bins of its end if longer)."""
    k = trace.shape[-1]
    if k > _BINS:
        m = k // _BINS
        trace = trace[..., k - m * _BINS:].reshape(*trace.shape[:-1], _BINS, m).mean(-1)
    n = trace.shape[-1]
    pairs = torch.sign(trace[..., None, :] - trace[..., :, None])  # [i, j] = sign(m_j − m_i)
    s = torch.triu(pairs, diagonal=1).sum((-2, -1))
    return s / (n * (n - 1) * (2 * n + 5) / 18) ** 0.5


def diverging(trace: torch.Tensor) -> torch.Tensor:
    """The ``diverging`` rule of the module docstring (tensor ops only: vmap-safe)."""
    a, _, z = quarter_means(trace)
    trend = (trend_z(trace) > _TREND_Z) & (z > a + 0.5 * a.abs())
    if trace.shape[-1] < 3:
        return trend
    first, last = trace[..., 0], trace[..., -1]
    explosive = (trace.diff(dim=-1) > 0).all(-1) & (last - first > 1e3 * first.abs())
    return trend | explosive


def flags(result) -> dict[str, torch.Tensor]:
    """``{"warnings/<kind>": bool tensor}`` for the kinds this result can show (vmap-safe)."""
    info = result.info
    out = {}
    trace = info.get("inner_loss")
    if trace is not None and trace.shape[-1] >= 2:
        out["warnings/diverging"] = diverging(trace)
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
