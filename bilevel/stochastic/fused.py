"""Compiled chunks of iterations: ``run(..., compile=True)``.

On the benchmark's small linear models one iteration is a few kernels of microseconds each;
eager PyTorch spends ~0.5 ms per iteration dispatching them (Python, autograd, ``torch.func``
wrappers). The runner here hands ``chunk`` CONSECUTIVE iterations to ``torch.compile`` as one
graph: the algorithm's own ``step`` (unchanged, traced by Dynamo) applied ``chunk`` times, the
minibatches gathered inside the graph from block numbers,

    state_{t+L} = step^L(state_t ; blocks b_t, ..., b_{t+L−1})  (one compiled call),

so the per-call overhead (tens of µs) is paid once per chunk. Same iterates as the eager loop
(tested to 1e-12 in float64): same batches in the same order, same step sizes.

What goes in a chunk: iterations whose every batch is a full block of its sampler (an
iteration on the short last block of an epoch runs alone, through a one-iteration graph of
that block size, or eagerly when it shares the step with full blocks; with
``Sampler(last="overlap")`` every block is full; SRBA's full-batch resets run eagerly) and that
do not cross a
``callback`` point (an iteration t with (t+1) % every == 0 ends a chunk; choose ``every`` as a
multiple of ``chunk``). Where a full chunk does not fit, shorter chunks do (powers of two:
at most 1 + log2(chunk) graphs per algorithm, problem and batch shapes, each compiled once;
:func:`precompile` compiles them, and the short-block graphs, ahead of a run).

Inside the graph the iteration counter ``t`` is a 0-d float64 tensor (step-size schedules must
accept a tensor t: :class:`~bilevel.stochastic.Schedule` does), block numbers are 0-d tensors,
and nothing is checked; after each compiled call the runner checks z, v, x for NaN/inf and names
the iterations of the chunk. A step the compiler cannot trace (a schedule calling ``math``, a
loss with data-dependent Python control flow) falls back to the eager loop with ONE warning.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable
from typing import Any

import torch

from ..compiled import _describe, compile_fallback, compiler_missing, guarded_compiled_call
from ..problem import BilevelError, BilevelProblem
from ..pytree import tree_map
from ._common import Minibatch, Sampler, StochasticAlgorithm, check_finite
from .loop import Draws

__all__ = ["run_compiled", "compiled_lengths", "chunk_lengths", "precompile"]

_GRAPHS: dict = {}  # (alg, problem, length, batch layout) -> compiled chunk function
_FAILED: set = set()  # (alg, problem) pairs that fell back to eager


def _numbers_to_tensors(state: Any) -> tuple[Any, dict]:
    """Python int/float fields of a NamedTuple state -> 0-d float64 tensors (and their types)."""
    kinds = {f: type(getattr(state, f)) for f in state._fields
             if isinstance(getattr(state, f), (int, float)) and
             not isinstance(getattr(state, f), bool)}
    return state._replace(**{f: torch.tensor(float(getattr(state, f)), dtype=torch.float64)
                             for f in kinds}), kinds


def _tensors_to_numbers(state: Any, kinds: dict) -> Any:
    return state._replace(**{f: kinds[f](round(float(getattr(state, f))) if kinds[f] is int
                                         else float(getattr(state, f))) for f in kinds})


def _gather(data: Any, block: torch.Tensor, layout: tuple, arange: torch.Tensor) -> Any:
    stride, clamp, _ = layout
    start = block * stride  # block k holds rows k·batch_size ... (+ its size)
    if clamp is not None:  # an "overlap" last block: the last batch_size rows
        start = torch.clamp(start, max=clamp)
    idx = start + arange
    return tree_map(lambda a: a.index_select(0, idx) if isinstance(a, torch.Tensor) else a, data)


def _weight(block: torch.Tensor, layout: tuple) -> float | torch.Tensor:
    w = layout[2]
    if isinstance(w, float):
        return w
    w_full, w_last, k_last = w  # the overlap last block weighs (n mod b)/n, the others b/n
    f64 = torch.float64
    return torch.where(block == k_last, torch.tensor(w_last, dtype=f64, device=block.device),
                       torch.tensor(w_full, dtype=f64, device=block.device))


def _layout(sampler: Sampler, size: int) -> tuple:
    """How a graph finds a block of ``size`` rows: (stride, clamp, weight): block k starts at
    row min(k·stride, clamp) (clamp None: k·stride) and weighs ``weight``, or (w_full,
    w_last, k_last) when an ``"overlap"`` last block weighs less than the others."""
    last = sampler.n_batches - 1
    if sampler.last == "overlap" and sampler.n % sampler.batch_size:
        return sampler.batch_size, sampler.start(last), (sampler.weight(0),
                                                          sampler.weight(last), last)
    return sampler.batch_size, None, size / sampler.n


def _make_chunk(alg: StochasticAlgorithm, problem: BilevelProblem, length: int,
                sizes: tuple[int, int], layouts: tuple[tuple, tuple]) -> Callable:
    """``fn(state, inner_data, outer_data, inner_ids (L, n_in), outer_ids (L, n_out))``: L steps
    on blocks of ``sizes`` rows, found and weighed as ``layouts`` say (:func:`_layout`)."""
    (b_in, b_out), (lay_in, lay_out) = sizes, layouts

    def chunk(state, inner_data, outer_data, inner_ids, outer_ids):
        ar_in = torch.arange(b_in, device=inner_ids.device)
        ar_out = torch.arange(b_out, device=outer_ids.device)
        for step in range(length):
            ib = [Minibatch(_gather(inner_data, k, lay_in, ar_in), k, _weight(k, lay_in))
                  for k in inner_ids[step]]
            ob = [Minibatch(_gather(outer_data, k, lay_out, ar_out), k, _weight(k, lay_out))
                  for k in outer_ids[step]]
            state, _ = alg.step(state, problem, ib, ob)
        return state

    # Dynamo caches compiled graphs per code object (and limits recompiles per code object):
    # each (algorithm, problem, length) gets its own copy of the code, named after it
    chunk.__code__ = chunk.__code__.replace(co_name=f"{alg.name}_chunk{length}")
    return chunk


def compiled_lengths(alg: StochasticAlgorithm, problem: BilevelProblem) -> set[int]:
    """The chunk lengths already compiled for (alg, problem) (e.g. to warm up before timing)."""
    return {k[2] for k in _GRAPHS if k[0] is alg and k[1] is problem}


def chunk_lengths(chunk: int) -> list[int]:
    """Chunk lengths tried, longest first: ``chunk`` and the powers of two below it."""
    out, p = [chunk], 1
    while p < chunk:
        out.append(p)
        p *= 2
    return sorted(set(out), reverse=True)


def _plan(alg, t: int, inner: Sampler, outer: Sampler, draws: Draws, length: int
          ) -> tuple[list, list, tuple[int, int]] | None:
    """Block ids (inner, outer: one list per iteration) of iterations t .. t+length−1 and the
    block sizes, if every one can go in a chunk (no SRBA reset; full blocks only, except that a
    single iteration may use a short last block when its batches of each side share one
    size), else None (``draws`` untouched)."""
    needs_full = getattr(alg, "needs_full", None)
    if needs_full is not None and any(needs_full(s) for s in range(t, t + length)):
        return None
    n_in, n_out = alg.batches_per_step
    ids_in = inner.ids(draws.inner, length * n_in)
    ids_out = outer.ids(draws.outer, length * n_out)
    sizes = []
    for sampler, ids in ((inner, ids_in), (outer, ids_out)):
        short = sampler.short_block
        n_short = 0 if short is None else ids.count(short)
        if n_short == 0:
            sizes.append(sampler.batch_size)
        elif n_short == len(ids) and length == 1:  # a short block only in a one-iteration graph
            sizes.append(sampler.size(short))
        else:  # full and short blocks mixed
            return None
    return ([ids_in[s * n_in:(s + 1) * n_in] for s in range(length)],
            [ids_out[s * n_out:(s + 1) * n_out] for s in range(length)],
            (sizes[0], sizes[1]))


def run_compiled(alg: StochasticAlgorithm, problem: BilevelProblem, state: Any, inner: Sampler,
                 outer: Sampler, n_steps: int, callback: Callable | None, every: int,
                 draws: Draws, chunk: int, options: dict, eager_step: Callable
                 ) -> tuple[Any, Draws]:
    """The loop of :func:`bilevel.stochastic.run` with compiled chunks (module docstring).
    ``eager_step(state, draws) -> state`` takes one eager iteration (short blocks, resets, and
    everything after a fallback)."""
    if not isinstance(chunk, int) or chunk < 1:
        raise BilevelError(f"run: chunk must be a positive int, got {chunk!r}")
    options = dict(options)
    dev = _device(inner)
    why = compiler_missing(options.get("backend", "inductor"), dev)
    if why is not None:
        if (alg, problem) not in _FAILED:
            _FAILED.add((alg, problem))
            compile_fallback(f"bl.stochastic.run({alg.name})", why)
    n_in, n_out = alg.batches_per_step
    done = 0
    while done < n_steps:
        t = int(state.t)
        until_callback = (every - t % every) if callback is not None else n_steps - done
        room = min(n_steps - done, until_callback)
        plan = None
        for length in [] if (alg, problem) in _FAILED else chunk_lengths(chunk):
            if length <= room:
                plan = _plan(alg, t, inner, outer, draws, length)
                if plan is not None:
                    break
        if plan is None:
            length = 1
            state = eager_step(state, draws)
        else:
            out = _compiled_call(alg, problem, state, inner, outer, plan, options, draws, dev)
            if out is None:  # the trace failed: fall back (warned) and redo this iteration
                continue
            state = out
        done += length
        if callback is not None and state.t % every == 0:
            callback(state, draws)
    return state, draws


def precompile(alg: StochasticAlgorithm, problem: BilevelProblem, state: Any, inner: Sampler,
               outer: Sampler, chunk: int = 16, compile: bool | dict = True) -> int:
    """Compile, before a timed or long run, every graph ``run(alg, problem, state, inner, outer,
    n, compile=compile, chunk=chunk)`` can ask for: each chunk length with full blocks, and the
    one-iteration graphs of the short last blocks (inner, outer, both). Runs them once on a
    copy of ``state`` (``state`` and the samplers are untouched), then collects the compiler's
    garbage (a full GC pass of ~0.5 s that would otherwise land in the run). Returns the number
    of graphs compiled now (0 when all were there already, or after a fallback to eager, which
    warns)."""
    if not isinstance(chunk, int) or chunk < 1:
        raise BilevelError(f"precompile: chunk must be a positive int, got {chunk!r}")
    options = {} if compile is True else dict(compile)
    dev = _device(inner)
    n_in, n_out = alg.batches_per_step
    plans = [([[0] * n_in] * length, [[0] * n_out] * length,
              (inner.batch_size, outer.batch_size)) for length in chunk_lengths(chunk)]
    short_in = [inner.short_block] if n_in == 1 and inner.short_block is not None else []
    short_out = [outer.short_block] if n_out == 1 and outer.short_block is not None else []
    for ki in [None] + short_in:
        for ko in [None] + short_out:
            if ki is not None or ko is not None:
                plans.append(([[ki or 0] * n_in], [[ko or 0] * n_out],
                              (_size(inner, ki), _size(outer, ko))))
    before, copy = len(_GRAPHS), tree_map(
        lambda a: a.clone() if isinstance(a, torch.Tensor) else a, state)
    for plan in plans:
        if (alg, problem) in _FAILED or _compiled_call(
                alg, problem, copy, inner, outer, plan, options, Draws(), dev) is None:
            return 0
    if len(_GRAPHS) > before:  # the compiler's garbage: one full collection now, not in the run
        gc.collect()
    return len(_GRAPHS) - before


def _size(sampler: Sampler, k: int | None) -> int:
    return sampler.batch_size if k is None else sampler.size(k)


def _compiled_call(alg, problem, state, inner, outer, plan, options, draws, dev):
    ids_in, ids_out, sizes = plan
    length = len(ids_in)
    layouts = (_layout(inner, sizes[0]), _layout(outer, sizes[1]))
    key = (alg, problem, length, sizes, layouts, len(ids_in[0]), len(ids_out[0]))
    fn = _GRAPHS.get(key)
    compiling = contextlib.nullcontext()
    if fn is None:
        fn = _GRAPHS[key] = torch.compile(
            _make_chunk(alg, problem, length, sizes, layouts),
            **{"dynamic": False, "fullgraph": True, **options})
        # inductor's reorder_for_locality moves a table read (SABA's M[k]) after the in-place
        # write of the same table; its re-inplacing pass then gives up and every call copies
        # every SAGA table twice (≈ 60 MB per call on covtype). Off while this graph compiles
        # (with any mode=; options={"reorder_for_locality": ...} still wins)
        if options.get("backend", "inductor") == "inductor":
            from torch._inductor import config as inductor_config
            compiling = inductor_config.patch(reorder_for_locality=False)
    t0 = int(state.t)
    tensor_state, kinds = _numbers_to_tensors(state)
    try:
        with compiling:
            out = guarded_compiled_call(fn, tensor_state, inner.data, outer.data,
                                        torch.tensor(ids_in, device=dev),
                                        torch.tensor(ids_out, device=dev))
    except Exception as e:  # noqa: BLE001 - any tracing/codegen failure: eager, one warning
        _FAILED.add((alg, problem))
        _GRAPHS.pop(key, None)
        compile_fallback(f"bl.stochastic.run({alg.name})", _describe(e))
        return None
    out = _tensors_to_numbers(out, kinds)
    fields = {f: getattr(out, f) for f in ("z", "v", "x", "y") if f in out._fields}
    if getattr(alg, "check", True):  # check=False: no checks, as in the eager loop
        check_finite(f"{t0}..{t0 + length - 1} (one compiled chunk; run eagerly to find the "
                     f"first bad iteration)" if length > 1 else t0, alg.name, **fields)
    n_in, n_out = len(ids_in[0]), len(ids_out[0])  # advance the stream as the eager loop does
    ci, co = alg.oracle_calls
    draws.inner += length * n_in
    draws.outer += length * n_out
    draws.oracle_calls = (draws.oracle_calls[0] + length * ci,
                          draws.oracle_calls[1] + length * co)
    return out


def _device(sampler: Sampler) -> torch.device:
    from ..pytree import tree_leaves
    leaf = next(x for x in tree_leaves(sampler.data) if isinstance(x, torch.Tensor))
    return leaf.device
