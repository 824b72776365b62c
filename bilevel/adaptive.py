"""Adaptive inner solvers with ``torch.optim`` semantics, differentiable to any order.

With g = ∇_w g(w, λ, batch_k), t = k + 1, all operations elementwise:

- :class:`Adam`     (g ← g + wd·w)  m ← β₁m + (1−β₁)g,  v ← β₂v + (1−β₂)g²,
                    w ← w − lr/(1−β₁ᵗ) · m / (√v / √(1−β₂ᵗ) + ε)
- :class:`AdamW`    w ← w − lr·wd·w, then the Adam step without the coupled decay
- :class:`RMSprop`  (g ← g + wd·w)  v ← αv + (1−α)g²,  (centered: a ← αa + (1−α)g, v̄ = v − a²)
                    d = g / (√v̄ + ε);  w ← w − lr·d   (momentum μ: b ← μb + d, w ← w − lr·b)

These are the update rules of ``torch.optim.Adam`` / ``AdamW`` / ``RMSprop`` (bias correction
and amsgrad as there; ``maximize`` and NAdam/RAdam-type variants are not provided) and give
the same iterates in float64 to rounding. Every coefficient (lr, β₁, β₂, ε, wd, α, μ) may be a
number or a hyperparameter: a key of ``hparams``, a callable ``hparams -> tensor`` or a
per-parameter pytree with the structure of ``params`` (see :func:`bilevel.solvers.resolve`). A
tuned β or α must stay in [0, 1): parametrise it, e.g.
``betas=(lambda h: torch.sigmoid(h["b1_logit"]), 0.999)``.

**The square root at 0.** d√v/dv = 1/(2√v) is infinite at v = 0, which is where a gradient
coordinate has been exactly 0 for the whole run (an unused weight, a dead ReLU, a zero input
feature). The chain rule then multiplies ∞ by a zero cotangent and returns NaN (higher#125,
torchopt#26). Here every root is :func:`safe_sqrt`,

    safe_sqrt(x) = where(x > 0, √where(x > 0, x, 1), 0),

the "double where": its value is √x exactly (so the iterates equal torch.optim's), and its
derivative is 1/(2√x) for x > 0 and 0 at x = 0, to every order. Consequence: v = 0 means every
gradient so far was 0 in that coordinate, hence m = 0 too (β₂ > 0), and the step
m/(√v̂ + ε) with ε > 0 is differentiable there (the term ∂/∂√v is multiplied by m = 0): the
safe root gives its EXACT first derivative, both when the gradient coordinate is 0 for every λ
(derivative 0) and when it is 0 only at this λ (derivative m'/ε). The second derivative does not
exist at such a point (√v ~ |δ| along a perturbation δ) and the safe root returns the mean of
its one-sided values, the central-difference limit. (With β₂ = 0 and β₁ > 0, v = g² can be 0
with m ≠ 0; the first derivative is then that mean as well.) Optionally ``eps_root`` > 0
(TorchOpt's convention) puts a constant inside the root, √(v̂ + eps_root) with v̂ = v/(1−β₂ᵗ)
(RMSprop: √(v̄ + eps_root)): smooth everywhere, but it changes the iterates, so it defaults
to 0.

**The state** is a dict of floating tensors: ``{"step", "exp_avg", "exp_avg_sq"}`` for Adam
(plus ``"max_exp_avg_sq"`` with amsgrad), ``{"step", "square_avg"[, "grad_avg"]
[, "momentum_buffer"]}`` for RMSprop, the names of torch.optim's state: a pytree that
reverse mode can build zero cotangents for, ``vmap`` can batch and a warm-started run can pass
back in, continuing exactly where it stopped. ``step`` (the number of steps taken so far) is a
0-d float64 tensor (float32 on MPS) that carries no derivative.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .problem import BilevelError
from .pytree import (
    PyTree,
    tree_detach,
    tree_flatten,
    tree_leaves,
    tree_paths,
    tree_structure,
    tree_unflatten,
)
from .solvers import InnerSolver, Rate, _check_steps, resolve

__all__ = ["Adam", "AdamW", "RMSprop", "safe_sqrt"]


def safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """√x with derivative 0 (not ∞) at x = 0, to every order; 0 for x < 0 instead of NaN.

    The inner ``where`` keeps the square root away from 0, so neither its value nor any of its
    derivatives is infinite; the outer ``where`` puts the exact value 0 back."""
    positive = x > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, x, 1.0)), 0.0)


# --------------------------------------------------------------------------------------------
# validation and resolution of the coefficients


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_coefficient(value: Any, name: str, low: float, high: float = math.inf, *,
                       low_open: bool = False, high_open: bool = True) -> None:
    """A number (or each number of a per-parameter pytree, or a constant tensor) must lie in the
    interval; hyperparameter keys and callables are checked only for their type."""
    if isinstance(value, str) or (callable(value) and not isinstance(value, torch.Tensor)):
        return
    if isinstance(value, (dict, list, tuple)):
        leaves = tree_leaves(value)
        if not leaves:
            raise BilevelError(f"{name} is an empty pytree: give a number, a key of hparams, a "
                               f"callable hparams -> tensor, or one value per parameter")
        for leaf in leaves:
            _check_coefficient(leaf, name, low, high, low_open=low_open, high_open=high_open)
        return
    lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
    interval = f"{lo}{low:g}, {'inf' if high == math.inf else f'{high:g}'}{hi}"
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point():
            raise BilevelError(f"{name} is a {value.dtype} tensor: use a floating tensor")
        if value.requires_grad or _is_wrapped(value):
            return  # a live hyperparameter: its value is not ours to police at construction
        x = value.detach()
        ok = ((x > low) if low_open else (x >= low)) & ((x < high) if high_open else (x <= high))
        try:
            fine = bool(ok.all())
        except RuntimeError:  # not a concrete value (inside a transform)
            return
        if not fine:
            raise BilevelError(f"{name} must lie in {interval}, got {value.tolist()}")
        return
    if not _is_number(value):
        raise BilevelError(f"{name} must be a number, a key of hparams, a callable hparams -> "
                           f"tensor or a per-parameter pytree, got {type(value).__name__}")
    below = value <= low if low_open else value < low
    above = value >= high if high_open else value > high
    if below or above or math.isnan(value):
        raise BilevelError(f"{name} must lie in {interval}, got {value!r}")


def _is_wrapped(x: torch.Tensor) -> bool:
    """True for a tensor seen through a torch.func transform (its value is not concrete)."""
    check = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return bool(check(x)) if check is not None else False


def _is_zero(value: Any) -> bool:
    """True only for the literal number 0 (a hyperparameter that is 0 now may not stay 0)."""
    return _is_number(value) and value == 0


def _per_leaf(value: Any, name: str, hparams: PyTree, params: PyTree) -> list[Any]:
    """The coefficient resolved against ``hparams``, one entry per leaf of ``params``."""
    value = resolve(value, hparams, name)
    n = len(tree_leaves(params))
    if isinstance(value, (dict, list, tuple)):
        if tree_structure(value) != tree_structure(params):
            raise BilevelError(f"{name} is a per-parameter pytree with leaves "
                               f"{[p for p, _ in tree_paths(value)]}, but params has leaves "
                               f"{[p for p, _ in tree_paths(params)]}: give one value per "
                               f"parameter leaf, or one number for all")
        return tree_leaves(value)
    return [value] * n


def _counter_like(params: PyTree) -> torch.Tensor:
    """The step counter: a 0-d float tensor (float64 where the device has it)."""
    ref = tree_leaves(params)[0]
    dtype = torch.float32 if ref.device.type == "mps" else torch.float64
    return torch.zeros((), dtype=dtype, device=ref.device)


def _unpack_state(state: Any, keys: tuple[str, ...], params: PyTree, solver: str
                  ) -> tuple[torch.Tensor, list[list[torch.Tensor]]]:
    """Check a (possibly warm-started) state against ``params``; return (step, leaf lists)."""
    expected = {"step", *keys}
    if not isinstance(state, dict) or set(state) != expected:
        got = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise BilevelError(f"{solver} state must be a dict with keys {sorted(expected)}, got "
                           f"{got}: pass a state made by this solver's init_state (or saved from "
                           f"a run of the same solver configuration)")
    step = state["step"]
    if not isinstance(step, torch.Tensor) or not step.is_floating_point():
        raise BilevelError(f"{solver} state['step'] must be a floating tensor (the step counter), "
                           f"got {type(step).__name__}")
    spec = tree_structure(params)
    out = []
    for key in keys:
        if tree_structure(state[key]) != spec:
            raise BilevelError(f"{solver} state[{key!r}] has leaves "
                               f"{[p for p, _ in tree_paths(state[key])]}, but params has leaves "
                               f"{[p for p, _ in tree_paths(params)]}: the saved state belongs "
                               f"to another model")
        out.append(tree_leaves(state[key]))
    return step, out


def _root(x: torch.Tensor, eps_root: float) -> torch.Tensor:
    return safe_sqrt(x + eps_root if eps_root else x)


def _cast(x: Any, like: torch.Tensor) -> Any:
    """Keep a leaf's dtype: the float64 counter must not promote a 0-d float32 parameter."""
    if isinstance(x, torch.Tensor) and x.dtype != like.dtype:
        return x.to(like.dtype)
    return x


# --------------------------------------------------------------------------------------------
# the solvers


@dataclass(frozen=True)
class Adam(InnerSolver):
    """``steps`` iterations of Adam (Kingma & Ba 2015) as ``torch.optim.Adam``:

        g ← ∇g + wd·w;  m ← β₁m + (1−β₁)g;  v ← β₂v + (1−β₂)g²;
        w ← w − lr/(1−β₁ᵗ) · m / (safe_sqrt(v)/√(1−β₂ᵗ) + ε)

    ``amsgrad=True``: v is replaced in the denominator by v_max ← max(v_max, v) (Reddi et al.
    2018, as torch; at a tie ``torch.maximum`` splits the derivative in halves).
    With ``eps_root`` > 0 the denominator is √(v/(1−β₂ᵗ) + eps_root) + ε, as TorchOpt.
    ``lr``, each of ``betas``, ``eps`` and ``weight_decay`` may be a number, a key of hparams, a
    callable hparams -> tensor or a per-parameter pytree. See the module docstring for the
    derivative at v = 0."""

    lr: Rate
    steps: int
    betas: tuple[Rate, Rate] = (0.9, 0.999)
    eps: Rate = 1e-8
    weight_decay: Rate = 0.0
    amsgrad: bool = False
    eps_root: float = 0.0

    decoupled: ClassVar[bool] = False

    def __post_init__(self) -> None:
        name = type(self).__name__
        _check_steps(self.steps)
        _check_coefficient(self.lr, "lr", 0.0, low_open=True)
        if not isinstance(self.betas, (tuple, list)) or len(self.betas) != 2:
            raise BilevelError(f"{name}(betas=...) must be a pair (beta1, beta2), got "
                               f"{self.betas!r}")
        _check_coefficient(self.betas[0], "betas[0] (beta1)", 0.0, 1.0)
        _check_coefficient(self.betas[1], "betas[1] (beta2)", 0.0, 1.0)
        _check_eps(self.eps, self.eps_root)
        _check_coefficient(self.weight_decay, "weight_decay", 0.0)
        if not isinstance(self.amsgrad, bool):
            raise BilevelError(f"{name}(amsgrad=...) must be a bool, got {self.amsgrad!r}")

    @property
    def _keys(self) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if self.amsgrad else ())

    def init_state(self, params: PyTree, hparams: PyTree) -> dict[str, Any]:
        zeros = tree_detach(params)
        state = {"step": _counter_like(params)}
        state.update({key: _zeros(zeros) for key in self._keys})
        return state

    def update(self, grads: PyTree, params: PyTree, state: dict[str, Any], hparams: PyTree):
        name = type(self).__name__
        keys = self._keys
        step, buffers = _unpack_state(state, keys, params, name)
        old = dict(zip(keys, buffers, strict=True))
        leaves, spec = tree_flatten(params)
        gs = tree_leaves(grads)
        lrs = _per_leaf(self.lr, "lr", hparams, params)
        b1s = _per_leaf(self.betas[0], "betas[0]", hparams, params)
        b2s = _per_leaf(self.betas[1], "betas[1]", hparams, params)
        epss = _per_leaf(self.eps, "eps", hparams, params)
        wds = _per_leaf(self.weight_decay, "weight_decay", hparams, params)
        t = step.detach() + 1  # a counter: no derivative flows through it
        out: dict[str, list] = {key: [] for key in ("params", *keys)}
        for i, p in enumerate(leaves):
            g, lr, b1, b2, eps, wd = gs[i], lrs[i], b1s[i], b2s[i], epss[i], wds[i]
            if not _is_zero(wd):
                if self.decoupled:
                    p = p * (1 - lr * wd)
                else:
                    g = g + wd * p
            m = b1 * old["exp_avg"][i] + (1 - b1) * g
            v = b2 * old["exp_avg_sq"][i] + (1 - b2) * g * g
            out["exp_avg"].append(m)
            out["exp_avg_sq"].append(v)
            if self.amsgrad:
                v = torch.maximum(old["max_exp_avg_sq"][i], v)
                out["max_exp_avg_sq"].append(v)
            bc1 = _cast(1 - b1 ** t, p)
            bc2 = _cast(1 - b2 ** t, p)
            if self.eps_root:
                denom = _root(v / bc2, self.eps_root) + eps
            else:
                denom = safe_sqrt(v) / torch.sqrt(bc2) + eps
            out["params"].append(p - (lr / bc1) * (m / denom))
        new_state = {"step": t}
        new_state.update({key: tree_unflatten(out[key], spec) for key in keys})
        return tree_unflatten(out["params"], spec), new_state


@dataclass(frozen=True)
class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter 2019) as ``torch.optim.AdamW``:

        w ← w − lr·wd·w;  then the Adam step with g = ∇g (no decay in the moments)."""

    weight_decay: Rate = 0.01

    decoupled: ClassVar[bool] = True


@dataclass(frozen=True)
class RMSprop(InnerSolver):
    """``steps`` iterations of RMSprop (Hinton 2012) as ``torch.optim.RMSprop``:

        g ← ∇g + wd·w;  v ← αv + (1−α)g²;  centered: a ← αa + (1−α)g, v̄ = v − a² (else v̄ = v);
        d = g / (safe_sqrt(v̄) + ε);  μ = 0: w ← w − lr·d;  μ > 0: b ← μb + d, w ← w − lr·b

    No bias correction (as torch). ``lr``, ``alpha``, ``eps``, ``weight_decay`` and ``momentum``
    may be hyperparameters; the momentum buffer is in the state unless ``momentum`` is the
    number 0. ``centered`` rounding can make v̄ slightly negative, where torch returns NaN and
    :func:`safe_sqrt` returns 0."""

    lr: Rate
    steps: int
    alpha: Rate = 0.99
    eps: Rate = 1e-8
    weight_decay: Rate = 0.0
    momentum: Rate = 0.0
    centered: bool = False
    eps_root: float = 0.0

    def __post_init__(self) -> None:
        _check_steps(self.steps)
        _check_coefficient(self.lr, "lr", 0.0, low_open=True)
        _check_coefficient(self.alpha, "alpha", 0.0, 1.0)
        _check_eps(self.eps, self.eps_root)
        _check_coefficient(self.weight_decay, "weight_decay", 0.0)
        _check_coefficient(self.momentum, "momentum", 0.0)
        if not isinstance(self.centered, bool):
            raise BilevelError(f"RMSprop(centered=...) must be a bool, got {self.centered!r}")

    @property
    def _keys(self) -> tuple[str, ...]:
        keys = ("square_avg",)
        if self.centered:
            keys += ("grad_avg",)
        if not _is_zero(self.momentum):
            keys += ("momentum_buffer",)
        return keys

    def init_state(self, params: PyTree, hparams: PyTree) -> dict[str, Any]:
        zeros = tree_detach(params)
        state = {"step": _counter_like(params)}
        state.update({key: _zeros(zeros) for key in self._keys})
        return state

    def update(self, grads: PyTree, params: PyTree, state: dict[str, Any], hparams: PyTree):
        keys = self._keys
        step, buffers = _unpack_state(state, keys, params, "RMSprop")
        per_key = dict(zip(keys, buffers, strict=True))
        leaves, spec = tree_flatten(params)
        n = len(leaves)
        gs = tree_leaves(grads)
        lrs = _per_leaf(self.lr, "lr", hparams, params)
        alphas = _per_leaf(self.alpha, "alpha", hparams, params)
        epss = _per_leaf(self.eps, "eps", hparams, params)
        wds = _per_leaf(self.weight_decay, "weight_decay", hparams, params)
        mus = _per_leaf(self.momentum, "momentum", hparams, params)
        out: dict[str, list] = {key: [] for key in ("params", *keys)}
        for i in range(n):
            p, g, lr, alpha, eps, wd, mu = (leaves[i], gs[i], lrs[i], alphas[i], epss[i], wds[i],
                                            mus[i])
            if not _is_zero(wd):
                g = g + wd * p
            v = alpha * per_key["square_avg"][i] + (1 - alpha) * g * g
            out["square_avg"].append(v)
            if self.centered:
                a = alpha * per_key["grad_avg"][i] + (1 - alpha) * g
                out["grad_avg"].append(a)
                v = v - a * a
            d = g / (_root(v, self.eps_root) + eps)
            if "momentum_buffer" in per_key:
                d = mu * per_key["momentum_buffer"][i] + d
                out["momentum_buffer"].append(d)
            out["params"].append(p - lr * d)
        new_state = {"step": step.detach() + 1}
        new_state.update({key: tree_unflatten(out[key], spec) for key in keys})
        return tree_unflatten(out["params"], spec), new_state


def _check_eps(eps: Any, eps_root: float) -> None:
    if not _is_number(eps_root) or not eps_root >= 0:
        raise BilevelError(f"eps_root must be a number >= 0, got {eps_root!r}")
    if _is_zero(eps) and not eps_root:
        raise BilevelError("eps must be > 0 (with eps = 0 a coordinate whose gradient is 0 "
                           "divides 0 by 0); use eps > 0, or eps_root > 0 to allow eps = 0")
    _check_coefficient(eps, "eps", 0.0, low_open=not eps_root)


def _zeros(tree: PyTree) -> PyTree:
    leaves, spec = tree_flatten(tree)
    return tree_unflatten([torch.zeros_like(x) for x in leaves], spec)
