"""The two graph forms of :mod:`bilevel.stochastic.fused`, as plain functions to compile.

``make_loop``: a ``while_loop`` whose body is U iterations (then one for the count mod U
left), run to ``count`` ≤ C iterations;
``make_chunk``: the step traced L times in a row. Both gather the minibatches inside the
graph: block k of a sampler is rows min(k·b, clamp) + 0..b−1 (``layout``), weighing
b/n (or the overlap last block's (n mod b)/n).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..problem import BilevelProblem
from ..pytree import tree_map
from ._common import Minibatch, Sampler, StochasticAlgorithm

__all__ = ["make_loop", "make_chunk", "layout", "numbers_to_tensors", "tensors_to_numbers"]


def numbers_to_tensors(state: Any) -> tuple[Any, dict]:
    """Python int/float fields of a NamedTuple state -> 0-d float64 tensors (and their types)."""
    kinds = {f: type(getattr(state, f)) for f in state._fields
             if isinstance(getattr(state, f), (int, float)) and
             not isinstance(getattr(state, f), bool)}
    return state._replace(**{f: torch.tensor(float(getattr(state, f)), dtype=torch.float64)
                             for f in kinds}), kinds


def tensors_to_numbers(state: Any, kinds: dict) -> Any:
    return state._replace(**{f: kinds[f](round(float(getattr(state, f))) if kinds[f] is int
                                         else float(getattr(state, f))) for f in kinds})


def _gather(data: Any, block: torch.Tensor, layout: tuple, size: int) -> Any:
    """Block ``block``'s ``size`` rows of every tensor leaf: rows s .. s+size−1, s = min(k·stride,
    clamp). On CPU a dynamic slice (``narrow`` at the traced integer s, checked in bounds: the
    graph reads the rows in place, vectorised, as JAX's ``dynamic_slice``; needs Dynamo's
    ``capture_scalar_outputs``, which the runner sets); elsewhere an ``index_select`` (no
    device-to-host read of s per iteration)."""
    stride, clamp, _ = layout
    start = block * stride  # block k holds rows k·batch_size ... (+ its size)
    if clamp is not None:  # an "overlap" last block: the last batch_size rows
        start = torch.clamp(start, max=clamp)
    if block.device.type == "cpu":
        s = start.item()
        torch._check(s >= 0)

        def rows(a: torch.Tensor) -> torch.Tensor:
            torch._check(s + size <= a.shape[0])
            return a.narrow(0, s, size)
    else:
        idx = start + torch.arange(size, device=block.device)

        def rows(a: torch.Tensor) -> torch.Tensor:
            return a.index_select(0, idx)
    return tree_map(lambda a: rows(a) if isinstance(a, torch.Tensor) else a, data)


def _weight(block: torch.Tensor, layout: tuple) -> float | torch.Tensor:
    w = layout[2]
    if isinstance(w, float):
        return w
    w_full, w_last, k_last = w  # the overlap last block weighs (n mod b)/n, the others b/n
    f64 = torch.float64
    return torch.where(block == k_last, torch.tensor(w_last, dtype=f64, device=block.device),
                       torch.tensor(w_full, dtype=f64, device=block.device))


def layout(sampler: Sampler, size: int) -> tuple:
    """How a graph finds a block of ``size`` rows: (stride, clamp, weight): block k starts at
    row min(k·stride, clamp) (clamp None: k·stride) and weighs ``weight``, or (w_full,
    w_last, k_last) when an ``"overlap"`` last block weighs less than the others."""
    last = sampler.n_batches - 1
    if sampler.last == "overlap" and sampler.n % sampler.batch_size:
        return sampler.batch_size, sampler.start(last), (sampler.weight(0),
                                                          sampler.weight(last), last)
    return sampler.batch_size, None, size / sampler.n


def make_chunk(alg: StochasticAlgorithm, problem: BilevelProblem, length: int,
                sizes: tuple[int, int], layouts: tuple[tuple, tuple]) -> Callable:
    """``fn(state, inner_data, outer_data, inner_ids (L, n_in), outer_ids (L, n_out))``: L steps
    on blocks of ``sizes`` rows, found and weighed as ``layouts`` say (:func:`layout`)."""
    (b_in, b_out), (lay_in, lay_out) = sizes, layouts

    def chunk(state, inner_data, outer_data, inner_ids, outer_ids):
        for step in range(length):
            ib = [Minibatch(_gather(inner_data, k, lay_in, b_in), k, _weight(k, lay_in))
                  for k in inner_ids[step]]
            ob = [Minibatch(_gather(outer_data, k, lay_out, b_out), k, _weight(k, lay_out))
                  for k in outer_ids[step]]
            state, _ = alg.step(state, problem, ib, ob)
        return state

    # Dynamo caches compiled graphs per code object (and limits recompiles per code object):
    # each (algorithm, problem, length) gets its own copy of the code, named after it
    chunk.__code__ = chunk.__code__.replace(co_name=f"{alg.name}_chunk{length}")
    return chunk


def _unaliased(outs: list, ins: tuple) -> list:
    """A while_loop body may not return one of its inputs, or one tensor twice (SRBA carries
    the previous iterates): such outputs are copied."""
    fixed: list = []
    for o in outs:
        if isinstance(o, torch.Tensor) and (any(o is a for a in ins) or
                                            any(o is f for f in fixed)):
            o = o.clone()
        fixed.append(o)
    return fixed


def make_loop(alg: StochasticAlgorithm, problem: BilevelProblem, spec: Any,
               sizes: tuple[int, int], layouts: tuple[tuple, tuple], unroll: int = 1
               ) -> Callable:
    """``fn(leaves, inner_data, outer_data, inner_ids (C, n_in), outer_ids (C, n_out), count)``:
    ``count`` (0-d int64, ≤ C) iterations, iteration i on the blocks of row i; ``leaves`` are
    the state's tensors (``spec`` its structure). ``unroll`` = U > 1: a first while_loop takes U
    iterations per trip (i ← i + U while i + U ≤ count; the compiler can reuse buffers and fuse
    across the U steps), a second the count mod U left, one per trip."""
    from torch._higher_order_ops.while_loop import while_loop
    from torch.utils._pytree import tree_flatten, tree_unflatten

    (b_in, b_out), (lay_in, lay_out) = sizes, layouts
    n_in, n_out = alg.batches_per_step

    def loop(leaves, inner_data, outer_data, inner_ids, outer_ids, count):
        def step(i, ls):  # iteration i, on the blocks of row i
            row_in = inner_ids.index_select(0, i.reshape(1)).reshape(n_in)
            row_out = outer_ids.index_select(0, i.reshape(1)).reshape(n_out)
            ib = [Minibatch(_gather(inner_data, k, lay_in, b_in), k, _weight(k, lay_in))
                  for k in row_in.unbind(0)]
            ob = [Minibatch(_gather(outer_data, k, lay_out, b_out), k, _weight(k, lay_out))
                  for k in row_out.unbind(0)]
            state, _ = alg.step(tree_unflatten(list(ls), spec), problem, ib, ob)
            return tree_flatten(state)[0]

        def trips(per_trip: int):  # (cond, body) of a loop taking per_trip iterations a trip
            def cond(i, *ls):
                return i + per_trip <= count

            def body(i, *ls):
                out = list(ls)
                for u in range(per_trip):
                    out = step(i + u, out)
                return (i + per_trip, *_unaliased(out, ls))
            return cond, body

        carry = (torch.zeros((), dtype=torch.int64, device=inner_ids.device), *leaves)
        if unroll > 1:
            carry = while_loop(*trips(unroll), carry)
        return while_loop(*trips(1), carry)[1:]

    loop.__code__ = loop.__code__.replace(co_name=f"{alg.name}_loop")
    return loop
