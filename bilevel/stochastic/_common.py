"""Shared pieces of the stochastic bilevel algorithms: oracles, minibatches, step-size schedules.

Notation (as in Dagréou et al., NeurIPS 2022): z inner variable, v linear-system variable
(v ≈ −H⁻¹∇_z f), x outer variable; g inner loss, f outer loss, both ``loss(z, x, batch)``;
H = ∇²_zz g, J = ∇²_xz g (so ``J v = ∇_x ⟨∇_z g, v⟩``).

One VJP of z, x ↦ ∇_z g(z, x; batch) with cotangent v gives (H v, J v) together:
:func:`inner_oracles` returns ``(∇_z g, H v, J v)`` from one forward and two backward passes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .. import autodiff
from ..problem import BilevelError, BilevelProblem, call_loss
from ..pytree import PyTree, tree_leaves, tree_map, tree_paths

__all__ = ["Schedule", "Minibatch", "Sampler", "inner_oracles", "inner_grad", "outer_grads",
           "hvp", "cross_vjp", "StochasticAlgorithm", "as_schedule", "check_finite"]


# ------------------------------------------------------------------------------------------
# step sizes
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Schedule:
    """Step size ``c / (t + 1)^a`` at iteration t = 0, 1, ... (``a = 0``: constant)."""

    c: float
    a: float = 0.0

    def __post_init__(self) -> None:
        if not (isinstance(self.c, (int, float)) and math.isfinite(self.c) and self.c > 0):
            raise BilevelError(f"Schedule: the constant c must be a positive finite number, "
                               f"got {self.c!r}")
        if not (isinstance(self.a, (int, float)) and math.isfinite(self.a) and self.a >= 0):
            raise BilevelError(f"Schedule: the exponent a must be >= 0, got {self.a!r}")

    def __call__(self, t: int) -> float:
        return self.c / (t + 1) ** self.a


StepSize = float | Schedule | Callable[[int], float]


def as_schedule(step: StepSize, exponent: float, name: str) -> Callable[[int], float]:
    """A number c becomes ``Schedule(c, exponent)``; a Schedule or callable t -> step is kept."""
    if isinstance(step, bool):
        raise BilevelError(f"{name} must be a number, a Schedule or a callable t -> step")
    if isinstance(step, (int, float)):
        return Schedule(float(step), exponent)
    if callable(step):
        return step
    raise BilevelError(f"{name} must be a positive number, a bl.stochastic.Schedule(c, a) or a "
                       f"callable t -> step size; got {type(step).__name__}")


# ------------------------------------------------------------------------------------------
# minibatches
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Minibatch:
    """One minibatch: ``data`` is what the loss receives; ``id`` its block number in the fixed
    partition of the dataset (SAGA tables are indexed by it; -1 = full batch); ``weight`` its
    share of the dataset, |B| / n (the SAGA running mean is Σ_B weight_B · φ_B)."""

    data: Any
    id: int = -1
    weight: float = 1.0


def _first_dim(data: Any) -> int:
    leaves = [x for x in tree_leaves(data) if isinstance(x, torch.Tensor)]
    if not leaves:
        raise BilevelError("Sampler: data must be a pytree of tensors sharing a leading (sample) "
                           "dimension; found no tensor")
    n = leaves[0].shape[0] if leaves[0].dim() > 0 else None
    for path, x in tree_paths(data):
        if isinstance(x, torch.Tensor) and (x.dim() == 0 or x.shape[0] != n):
            raise BilevelError(f"Sampler: data{path} has shape {tuple(x.shape)}; every tensor "
                               f"leaf must have the same leading dimension ({n})")
    return int(n)


class Sampler:
    """Minibatches of a dataset, shuffled by epoch and replayable from a seed.

    The n rows are cut once into K = ``ceil(n / batch_size)`` contiguous blocks; epoch e visits
    every block once in the order ``randperm(K)`` drawn from a generator seeded with
    ``(seed, e)``. Draw t (t = 0, 1, ...) is therefore a pure function of (seed, t):
    ``sampler(t)``. Blocks are views (no copy). ``shuffle=False`` visits 0, 1, ...

    When batch_size b does not divide n, ``last`` says what the last block K−1 holds:

    - ``"short"`` (default): rows (K−1)·b ... n−1, the n mod b rows left, weight (n mod b)/n;
    - ``"overlap"``: the LAST b rows n−b ... n−1 (full size, overlapping block K−2), weight
      still (n mod b)/n -- benchopt's bilevel benchmark (its clamped ``dynamic_slice``). Every
      batch then has b rows, so compiled runs (``run(..., compile=True)``) put every
      iteration in a chunk, even algorithms that draw more batches per step than there are
      blocks.

    Either way the weights sum to one (Σ_k w_k = 1, the SAGA mean of :class:`SABA`).
    """

    def __init__(self, data: Any, batch_size: int, seed: int = 0, shuffle: bool = True,
                 last: str = "short") -> None:
        self.n = _first_dim(data)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise BilevelError(f"Sampler: batch_size must be a positive int, got {batch_size!r}")
        if batch_size > self.n:
            raise BilevelError(f"Sampler: batch_size {batch_size} exceeds the {self.n} rows")
        if last not in ("short", "overlap"):
            raise BilevelError(f"Sampler: last must be 'short' (the n mod batch_size rows left) "
                               f"or 'overlap' (the last batch_size rows, as benchopt's bilevel "
                               f"benchmark), got {last!r}")
        self.data, self.batch_size, self.seed, self.shuffle = data, batch_size, int(seed), shuffle
        self.last = last
        self.n_batches = (self.n + batch_size - 1) // batch_size
        self._blocks = [self._make(k) for k in range(self.n_batches)]
        # recent epochs' orders: enough for a compiled call's look-ahead (up to ~40K draws:
        # 1024 iterations of ~20 batches) without redrawing an epoch's permutation
        self._orders: dict[int, list[int]] = {}
        self._keep = max(2, -(-40_960 // self.n_batches) + 1)

    def start(self, k: int) -> int:
        """First row of block k: k·b, or n − b for an ``"overlap"`` last block."""
        return min(k * self.batch_size, self.n - self.batch_size) if self.last == "overlap" \
            else k * self.batch_size

    def size(self, k: int) -> int:
        """Rows in block k: b, or n mod b for a ``"short"`` last block."""
        return min(self.start(k) + self.batch_size, self.n) - self.start(k)

    def weight(self, k: int) -> float:
        """Block k's share of the partition: b/n, or (n mod b)/n for the last block."""
        return (min((k + 1) * self.batch_size, self.n) - k * self.batch_size) / self.n

    def _make(self, k: int) -> Minibatch:
        lo, hi = self.start(k), self.start(k) + self.size(k)
        data = tree_map(lambda a: a[lo:hi] if isinstance(a, torch.Tensor) else a, self.data)
        return Minibatch(data, k, self.weight(k))

    def order(self, epoch: int) -> list[int]:
        """Block order of epoch ``epoch``."""
        if not self.shuffle:
            return list(range(self.n_batches))
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n_batches, generator=gen).tolist()

    def block(self, k: int) -> Minibatch:
        return self._blocks[k]

    def full(self) -> Minibatch:
        """The whole dataset as one batch (id -1, weight 1)."""
        return Minibatch(self.data, -1, 1.0)

    def __call__(self, t: int) -> Minibatch:
        epoch, pos = divmod(int(t), self.n_batches)
        order = self._orders.get(epoch)
        if order is None:
            if len(self._orders) >= self._keep:
                self._orders.pop(min(self._orders))
            order = self._orders[epoch] = self.order(epoch)
        return self._blocks[order[pos]]

    def ids(self, start: int, count: int) -> list[int]:
        """Block numbers of draws ``start, ..., start + count − 1`` (``[self(t).id ...]``,
        sliced from the epoch orders: no Minibatch built)."""
        out: list[int] = []
        while count > 0:
            epoch, pos = divmod(int(start), self.n_batches)
            self(start)  # caches the epoch's order
            take = min(count, self.n_batches - pos)
            out += self._orders[epoch][pos:pos + take]
            start, count = start + take, count - take
        return out

    @property
    def short_block(self) -> int | None:
        """The block number of the short last block (n not a multiple of batch_size and
        ``last="short"``), else None (every block holds batch_size rows)."""
        return self.n_batches - 1 if self.n % self.batch_size and self.last == "short" else None

    def __len__(self) -> int:
        return self.n_batches


def unwrap(batch: Any) -> Any:
    return batch.data if isinstance(batch, Minibatch) else batch


# ------------------------------------------------------------------------------------------
# oracles
# ------------------------------------------------------------------------------------------
def _loss_grad(problem: BilevelProblem, name: str, argnums, z: PyTree, x: PyTree, batch: Any):
    """∇ of ``problem.<name>`` (``inner_loss`` or ``outer_loss``) at (z, x) on ``batch`` w.r.t.
    ``argnums`` (0: z, 1: x, (0, 1): both in one backward pass); x and z are passed in, never
    captured (``bl.autodiff`` keeps no graph to closure-captured tensors)."""
    data = unwrap(batch)
    loss = getattr(problem, name)
    g, _ = autodiff.grad_and_value(
        lambda zz, xx: call_loss(loss, name, zz, xx, data), argnums=argnums)(z, x)
    return g


def inner_grad(problem: BilevelProblem, z: PyTree, x: PyTree, batch: Any) -> PyTree:
    """∇_z g(z, x; batch)."""
    return _loss_grad(problem, "inner_loss", 0, z, x, batch)


def inner_grad_x(problem: BilevelProblem, z: PyTree, x: PyTree, batch: Any) -> PyTree:
    """∇_x g(z, x; batch)."""
    return _loss_grad(problem, "inner_loss", 1, z, x, batch)


def outer_grads(problem: BilevelProblem, z: PyTree, x: PyTree, batch: Any
                ) -> tuple[PyTree, PyTree]:
    """(∇_z f, ∇_x f) at (z, x) on ``batch`` (one backward pass)."""
    gz, gx = _loss_grad(problem, "outer_loss", (0, 1), z, x, batch)
    return gz, gx


def outer_grad_z(problem: BilevelProblem, z: PyTree, x: PyTree, batch: Any) -> PyTree:
    """∇_z f(z, x; batch)."""
    return _loss_grad(problem, "outer_loss", 0, z, x, batch)


def outer_grad_x(problem: BilevelProblem, z: PyTree, x: PyTree, batch: Any) -> PyTree:
    """∇_x f(z, x; batch)."""
    return _loss_grad(problem, "outer_loss", 1, z, x, batch)


def _grad_z_fn(problem: BilevelProblem, data: Any) -> Callable:
    def grad_z(zz, xx):  # xx is an argument (not captured) so that the graph to it is kept
        g, _ = autodiff.grad_and_value(
            lambda z3, x3: call_loss(problem.inner_loss, "inner_loss", z3, x3, data))(zz, xx)
        return g
    return grad_z


def inner_oracles(problem: BilevelProblem, z: PyTree, x: PyTree, v: PyTree, batch: Any
                  ) -> tuple[PyTree, PyTree, PyTree]:
    """(∇_z g, H v, J v) on one batch from one VJP of (z, x) ↦ ∇_z g(z, x; batch)."""
    gz, pull = autodiff.vjp(_grad_z_fn(problem, unwrap(batch)), z, x)
    hv, jv = pull(v)
    return gz, hv, jv


def hvp(problem: BilevelProblem, z: PyTree, x: PyTree, v: PyTree, batch: Any) -> PyTree:
    """H v = ∇²_zz g(z, x; batch) v (reverse over reverse)."""
    data = unwrap(batch)
    _, pull = autodiff.vjp(lambda zz: _grad_z_fn(problem, data)(zz, x), z)
    return pull(v)[0]


def cross_vjp(problem: BilevelProblem, z: PyTree, x: PyTree, v: PyTree, batch: Any) -> PyTree:
    """J v = ∇²_xz g(z, x; batch) v = ∇_x ⟨∇_z g(z, x; batch), v⟩."""
    data = unwrap(batch)
    _, pull = autodiff.vjp(lambda xx: _grad_z_fn(problem, data)(z, xx), x)
    return pull(v)[0]


_FUSED: dict = {}


def fused_oracles(problem: BilevelProblem, compile: bool = False) -> Callable:
    """``fn(z, x, v, inner_data, outer_data) -> (∇_z g, H v, J v, ∇_z f, ∇_x f)``: the five
    single-loop directions in one ``torch.func`` function (one VJP of ∇_z g, one grad of f).
    ``compile=True`` wraps it in ``torch.compile`` (cached per problem; the first call of each
    batch shape compiles, tens of seconds on CPU), which removes most of the per-iteration
    Python/autograd overhead on small models."""
    key = (problem, bool(compile))
    if key not in _FUSED:
        g, f = problem.inner_loss, problem.outer_loss

        def fn(z, x, v, bi, bo):
            grad_z = torch.func.grad(lambda zz, xx: g(zz, xx, bi), argnums=0)
            gz, pull = torch.func.vjp(grad_z, z, x)
            hv, jv = pull(v)
            fz, fx = torch.func.grad(lambda zz, xx: f(zz, xx, bo), argnums=(0, 1))(z, x)
            return gz, hv, jv, fz, fx

        if compile:  # a failed trace must not corrupt the thread's dispatch state later
            from functools import partial

            from ..compiled import guarded_compiled_call
            _FUSED[key] = partial(guarded_compiled_call, torch.compile(fn, dynamic=False))
        else:
            _FUSED[key] = fn
    return _FUSED[key]


def single_loop_oracles(problem: BilevelProblem, z, x, v, ib, ob, compile: bool):
    """(∇_z g_i, H_i v, J_i v) and (∇_z f_j, ∇_x f_j) at (z, x): eager (plain autograd at the
    top level, validating the losses' outputs) or through the compiled fused function."""
    if compile:
        return fused_oracles(problem, True)(z, x, v, unwrap(ib), unwrap(ob))
    return (*inner_oracles(problem, z, x, v, ib), *outer_grads(problem, z, x, ob))


# ------------------------------------------------------------------------------------------
# pytree arithmetic used by the updates
# ------------------------------------------------------------------------------------------
def axpy(a: float, x: PyTree, y: PyTree) -> PyTree:
    """y + a x."""
    return tree_map(lambda xi, yi: yi + a * xi, x, y)


def add(*trees: PyTree) -> PyTree:
    return tree_map(lambda *xs: sum(xs[1:], xs[0]), *trees)


def sub(a: PyTree, b: PyTree) -> PyTree:
    return tree_map(torch.sub, a, b)


def scale(a: float, x: PyTree) -> PyTree:
    return tree_map(lambda xi: a * xi, x)


def zeros_like(x: PyTree) -> PyTree:
    return tree_map(torch.zeros_like, x)


def clone(x: PyTree) -> PyTree:
    return tree_map(lambda t: t.detach().clone(), x)


def check_finite(t: int | str, algorithm: str, **trees: PyTree) -> None:
    """Raise :class:`BilevelError` naming the first non-finite quantity and leaf (inside a
    compiled chunk of :func:`bilevel.stochastic.run` nothing is checked here: the runner checks
    once per chunk and names the iterations ``t`` of the chunk)."""
    if torch.compiler.is_compiling():
        return
    for name, tree in trees.items():
        for path, leaf in tree_paths(tree):
            if isinstance(leaf, torch.Tensor) and not bool(torch.isfinite(leaf).all()):
                raise BilevelError(
                    f"{algorithm}: {name}{path} became non-finite (NaN/inf) at iteration {t}: "
                    f"the iterates diverged; lower the step sizes (or use a decreasing Schedule)")


def check_batches(algorithm: str, kind: str, batches: Sequence[Any], needed: int) -> None:
    if isinstance(batches, (Minibatch,)) or not isinstance(batches, (list, tuple)):
        raise BilevelError(f"{algorithm}.step: {kind}_batches must be a list/tuple of "
                           f"{needed} batch(es) (see {algorithm}.batches_per_step)")
    if len(batches) != needed:
        raise BilevelError(f"{algorithm}.step: got {len(batches)} {kind} batch(es), one "
                           f"iteration uses exactly {needed} (see {algorithm}.batches_per_step)")


def check_start(z0: PyTree, x0: PyTree, algorithm: str) -> None:
    from ..problem import check_floating
    check_floating(z0, f"{algorithm}.init: z0")
    check_floating(x0, f"{algorithm}.init: x0")


class StochasticAlgorithm:
    """Base class. An algorithm is a pair of pure functions, optax-style:

    ``state = alg.init(z0, x0, ...)`` and
    ``state, info = alg.step(state, problem, inner_batches, outer_batches)``, where the batch
    lists hold exactly ``alg.batches_per_step`` = (n_inner, n_outer) fresh minibatches, used in
    the order the docstring states. ``state.z``, ``state.x`` (and ``state.v`` where there is one)
    are the iterates; ``state.t`` the iteration count. ``info`` has the step sizes used and
    ``oracle_calls`` = (inner, outer) minibatch oracle calls of this iteration, counted as the
    benchmark does (∇_z g, H v, J v: one inner call each; ∇_z f, ∇_x f: one outer call each).
    ``run`` drives it with two :class:`Sampler`s.
    """

    name = "stochastic"
    oracle_calls: tuple[int, int] = (0, 0)
    # run(compile=...) may compile the step as the body of one while_loop (the step keeps its
    # state functional: no in-place update of a tensor it was given)
    loop_compatible: bool = True

    def loop_form(self, state: Any) -> StochasticAlgorithm | None:
        """The algorithm whose ``step`` a compiled while_loop body runs from ``state`` (same
        iterates as ``self``), or None: compiled runs then use unrolled chunks."""
        return self if self.loop_compatible else None

    @property
    def batches_per_step(self) -> tuple[int, int]:  # pragma: no cover - overridden
        raise NotImplementedError

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"
