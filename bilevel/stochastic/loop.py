"""Driving an algorithm with two samplers: draws the batches each iteration needs, in order."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..problem import BilevelError, BilevelProblem
from ._common import Sampler, StochasticAlgorithm


@dataclass
class Draws:
    """Next draw index of each sampler (the whole minibatch stream is a function of these)."""

    inner: int = 0
    outer: int = 0
    oracle_calls: tuple[int, int] = (0, 0)


def next_batches(alg: StochasticAlgorithm, t: int, inner: Sampler, outer: Sampler,
                 draws: Draws) -> tuple[list, list]:
    """The batch lists of iteration t (advances ``draws``); SRBA resets get the full data."""
    needs_full = getattr(alg, "needs_full", None)
    if needs_full is not None and needs_full(t):
        return [inner.full()], [outer.full()]
    n_in, n_out = alg.batches_per_step
    ib = [inner(draws.inner + k) for k in range(n_in)]
    ob = [outer(draws.outer + k) for k in range(n_out)]
    draws.inner += n_in
    draws.outer += n_out
    return ib, ob


def run(alg: StochasticAlgorithm, problem: BilevelProblem, state: Any, inner: Sampler,
        outer: Sampler, n_steps: int, callback: Callable[[Any, Draws], None] | None = None,
        every: int = 1, draws: Draws | None = None, compile: bool | dict = False,
        chunk: int | None = None, unroll: int | None = None) -> tuple[Any, Draws]:
    """``n_steps`` iterations of ``alg`` from ``state``; ``callback(state, draws)`` after every
    ``every`` iterations. Pass back the returned ``draws`` to continue the same stream.

    ``compile=True`` (or a dict of ``torch.compile`` options) runs up to ``chunk`` consecutive
    iterations per compiled call (:mod:`bilevel.stochastic.fused`: same iterates, tens of times
    faster on small models). Default ``chunk``: 1024 for the algorithms compiled as one
    while_loop graph (all but SABA with in-place tables; the graph does not grow with
    ``chunk``), 16 for unrolled graphs (which do; 2 for AmIGO, StocBiO and F2SA). ``unroll``:
    iterations per while_loop trip (default 4 for SOBA, SRBA and SABA with copied tables, 1
    for the others: :func:`bl.stochastic.fused.default_unroll`; larger is faster per
    iteration on small models and slower to compile). The first call of each graph compiles
    (seconds to a minute on CPU: :func:`bl.stochastic.precompile` compiles them all before a
    timed run). A chunk never crosses a callback point."""
    if not isinstance(inner, Sampler) or not isinstance(outer, Sampler):
        raise BilevelError("run: inner and outer must be bl.stochastic.Sampler objects")
    if not isinstance(every, int) or every < 1:
        raise BilevelError(f"run: every must be a positive int, got {every!r}")
    if unroll is not None and not compile:
        raise BilevelError("run: unroll (iterations per compiled while_loop trip) needs "
                           "compile=True")
    draws = Draws() if draws is None else draws

    def eager_step(state: Any, draws: Draws) -> Any:
        ib, ob = next_batches(alg, state.t, inner, outer, draws)
        state, info = alg.step(state, problem, ib, ob)
        ci, co = info["oracle_calls"]
        draws.oracle_calls = (draws.oracle_calls[0] + ci, draws.oracle_calls[1] + co)
        return state

    if compile:
        from .fused import run_compiled
        return run_compiled(alg, problem, state, inner, outer, n_steps, callback, every, draws,
                            chunk, {} if compile is True else dict(compile), eager_step,
                            unroll)
    for _ in range(n_steps):
        state = eager_step(state, draws)
        if callback is not None and state.t % every == 0:
            callback(state, draws)
    return state, draws
