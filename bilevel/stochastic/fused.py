"""Compiled chunks of iterations: ``run(..., compile=True)``.

On the benchmark's small linear models one iteration is a few kernels of microseconds each;
eager PyTorch spends ~0.5 ms per iteration dispatching them (Python, autograd, ``torch.func``
wrappers). The runner hands consecutive iterations to ``torch.compile`` as one program, the
algorithm's own ``step`` (unchanged, traced by Dynamo) with the minibatches gathered inside
the graph from block numbers, in one of two forms:

- LOOP (every algorithm that keeps its state functional: all but SABA with in-place tables):
  ``torch._higher_order_ops.while_loop`` whose body is U iterations (``unroll``),

      while i + U ≤ c: state = step^U(state ; blocks ids[i..i+U−1]); i += U
      while i < c:     state = step(state ; blocks ids[i]);          i += 1    c = count ≤ chunk,

  the ids padded to ``chunk`` rows and c a tensor, so one graph serves every count, the graph
  (and its compile time) does not grow with ``chunk`` (default :data:`LOOP_CHUNK`), and on CPU
  inductor's C++ wrapper (``cpp_wrapper``, on by default here) runs the loop without returning
  to Python between iterations. U steps per trip let the compiler reuse buffers and fuse
  across steps (measured faster per iteration); default :func:`default_unroll`.
- UNROLLED (SABA with in-place SAGA tables of more than 1 MiB, which a while_loop body may
  not update: smaller tables loop with copied tables, ``SABA.loop_form``; or an algorithm
  whose loop trace failed: one warning): the step traced L times in a row,

      state_{t+L} = step^L(state_t ; blocks b_t, ..., b_{t+L−1}),

  L = ``chunk`` (default :data:`UNROLLED_CHUNK`) or, where it does not fit, a shorter power of
  two (at most 1 + log2(chunk) graphs per algorithm, problem and batch shapes).

Either way the per-call overhead (tens of µs) is paid once per call, and the iterates are the
eager loop's (tested to 1e-12 in float64): same batches in the same order, same step sizes.

What goes in a call: iterations whose every batch is a full block of its sampler (an
iteration on the short last block of an epoch runs alone, through a one-iteration graph of
that block size, or eagerly when it shares the step with full blocks; with
``Sampler(last="overlap")`` every block is full; SRBA's full-batch resets run eagerly) and that
do not cross a ``callback`` point (an iteration t with (t+1) % every == 0 ends a call).
:func:`precompile` compiles every graph a run can ask for, ahead of it.

Inside the graph the iteration counter ``t`` is a 0-d float64 tensor (step-size schedules must
accept a tensor t: :class:`~bilevel.stochastic.Schedule` does), block numbers are 0-d tensors,
and nothing is checked; after each compiled call the runner checks z, v, x for NaN/inf and names
the iterations of the call. A step the compiler cannot trace (a schedule calling ``math``, a
loss with data-dependent Python control flow) falls back to the eager loop with ONE warning.
"""

from __future__ import annotations

import contextlib
import gc
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ..compiled import _describe, compile_fallback, compiler_missing, guarded_compiled_call
from ..problem import BilevelError, BilevelProblem
from ..pytree import tree_map
from ._common import Sampler, StochasticAlgorithm, check_finite
from .fused_graphs import layout, make_chunk, make_loop, numbers_to_tensors, tensors_to_numbers
from .loop import Draws

__all__ = ["run_compiled", "compiled_lengths", "chunk_lengths", "precompile", "uses_loop",
           "loop_alg",
           "default_unroll", "LOOP_CHUNK", "UNROLLED_CHUNK", "LOOP_UNROLL"]

_GRAPHS: dict = {}  # (alg, problem, length or "loop", batch layout) -> compiled function
_FAILED: set = set()  # (alg, problem) pairs that fell back to eager
_NO_LOOP: set = set()  # (alg, problem) pairs whose while_loop trace failed: unrolled chunks
_TOOLCHAIN_OK: set = set()  # (alg, problem, backend, device type) whose compiler was found
LOOP_CHUNK = 1024  # default iterations per compiled call: loop graphs ...
UNROLLED_CHUNK = 16  # ... and unrolled ones of one batch per side (graph and compile time grow)
LOOP_UNROLL = 4  # iterations per while_loop trip, one batch per side (default_unroll)


def uses_loop(alg: StochasticAlgorithm, problem: BilevelProblem | None = None) -> bool:
    """Whether ``run(alg, problem, ..., compile=...)`` runs its chunks as one while_loop graph
    (``alg.loop_compatible``, and no earlier loop trace of (alg, problem) failed)."""
    return bool(getattr(alg, "loop_compatible", True)) and (alg, problem) not in _NO_LOOP


def loop_alg(alg: StochasticAlgorithm, problem: BilevelProblem, state: Any
             ) -> StochasticAlgorithm | None:
    """The algorithm whose step the while_loop graph runs from ``state``
    (``alg.loop_form(state)``: ``alg`` itself, or in-place SABA's copying twin while its tables
    are small), or None: unrolled chunks (also once a loop trace of (alg, problem) failed)."""
    if (alg, problem) in _NO_LOOP:
        return None
    form = alg.loop_form(state)
    return None if form is None or (form, problem) in _NO_LOOP else form


def default_unroll(alg: StochasticAlgorithm) -> int:
    """Iterations per while_loop trip when ``unroll`` is not given: :data:`LOOP_UNROLL` for the
    algorithms of one batch per side and step (SOBA, SABA with copied tables, SRBA), 1 for
    those that draw ~20 (AmIGO, StocBiO, F2SA), whose one-iteration body is already long.
    Measured (float32, 1 thread, 2026-12-03, ``benchmarks/results/loop_unroll/``), µs per
    iteration for U = 1 / 4 / 8: SOBA ijcnn1-sized 7.7 / 5.0 / 4.4 (compile 15 / 25 / 36 s),
    SRBA 22 / 13 / 11, SOBA covtype-sized 34 / 30 / 28; AmIGO 67 (U = 1) / 76 (U = 2) with
    2.5x the compile time. Compile time grows ~linearly with U."""
    return LOOP_UNROLL if sum(alg.batches_per_step) <= 2 else 1


def compiled_lengths(alg: StochasticAlgorithm, problem: BilevelProblem) -> set[int]:
    """The unrolled chunk lengths already compiled for (alg, problem)."""
    return {k[2] for k in _GRAPHS if k[0] is alg and k[1] is problem and isinstance(k[2], int)}


def chunk_lengths(chunk: int) -> list[int]:
    """Chunk lengths tried, longest first: ``chunk`` and the powers of two below it."""
    out, p = [chunk], 1
    while p < chunk:
        out.append(p)
        p *= 2
    return sorted(set(out), reverse=True)


def _plan(alg, t: int, inner: Sampler, outer: Sampler, draws: Draws, length: int
          ) -> tuple[list, list, tuple[int, int]] | None:
    """Block ids (inner, outer: flat, iteration after iteration) of iterations t .. t+length−1
    and the block sizes, if every one can go in a chunk (no SRBA reset; full blocks only,
    except that a single iteration may use a short last block when its batches of each side
    share one size), else None (``draws`` untouched)."""
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
    return ids_in, ids_out, (sizes[0], sizes[1])


def _loop_plan(alg, t: int, inner: Sampler, outer: Sampler, draws: Draws, limit: int
               ) -> tuple[list, list, tuple[int, int]] | None:
    """Block ids (inner, outer: flat, iteration after iteration) and sizes of the longest run
    of iterations t, t+1, ... (at most ``limit``) that one loop graph can take: full blocks
    only and no SRBA reset; or, when iteration t itself has a short last block, that one
    iteration (:func:`_plan`'s rule); else None."""
    first = _plan(alg, t, inner, outer, draws, 1)
    if first is None or limit == 1 or first[2] != (inner.batch_size, outer.batch_size):
        return first
    n_in, n_out = alg.batches_per_step
    count = limit
    needs_full = getattr(alg, "needs_full", None)
    if needs_full is not None:  # stop before the next reset
        count = next((s for s in range(1, limit) if needs_full(t + s)), limit)
    ids_in = inner.ids(draws.inner, count * n_in)
    ids_out = outer.ids(draws.outer, count * n_out)
    for sampler, ids, n in ((inner, ids_in, n_in), (outer, ids_out, n_out)):
        if sampler.short_block is not None and sampler.short_block in ids:  # stop before it
            count = min(count, ids.index(sampler.short_block) // n)
    return ids_in[:count * n_in], ids_out[:count * n_out], first[2]


def _id_tensor(ids: list[int], rows: int, per_row: int, dev: torch.device) -> torch.Tensor:
    """``ids`` (flat) padded with block 0 to ``rows`` × ``per_row``, as an int64 tensor
    (through numpy: ~4 µs for 256 ids, against ~30 for ``torch.tensor`` of a list)."""
    flat = np.zeros(rows * per_row, dtype=np.int64)
    flat[:len(ids)] = ids
    return torch.from_numpy(flat).view(rows, per_row).to(dev)


def _chunk(chunk: int | None, loop: bool, alg: StochasticAlgorithm) -> int:
    """The chunk asked for, or the default: :data:`LOOP_CHUNK` iterations per loop graph;
    unrolled, :data:`UNROLLED_CHUNK` for one batch per side and step, 2 for the algorithms
    that draw more (AmIGO, StocBiO, F2SA: ~20 batches per step, so 16 unrolled steps make a
    graph that takes many minutes to compile)."""
    if chunk is not None:
        return chunk
    if loop:
        return LOOP_CHUNK
    return UNROLLED_CHUNK if sum(alg.batches_per_step) <= 2 else 2


def run_compiled(alg: StochasticAlgorithm, problem: BilevelProblem, state: Any, inner: Sampler,
                 outer: Sampler, n_steps: int, callback: Callable | None, every: int,
                 draws: Draws, chunk: int | None, options: dict, eager_step: Callable,
                 unroll: int | None = None) -> tuple[Any, Draws]:
    """The loop of :func:`bilevel.stochastic.run` with compiled chunks (module docstring).
    ``eager_step(state, draws) -> state`` takes one eager iteration (resets, short blocks that
    cannot go in a graph, and everything after a fallback)."""
    _check_chunk("run", chunk, unroll)
    unroll = default_unroll(alg) if unroll is None else unroll
    options = dict(options)
    dev = _device(inner)
    backend = options.get("backend", "inductor")
    if (alg, problem, backend, dev.type) not in _TOOLCHAIN_OK:  # looked up once (~150 µs)
        why = compiler_missing(backend, dev)
        if why is None:
            _TOOLCHAIN_OK.add((alg, problem, backend, dev.type))
        elif (alg, problem) not in _FAILED:
            _FAILED.add((alg, problem))
            compile_fallback(f"bl.stochastic.run({alg.name})", why)
    done = 0
    form = loop_alg(alg, problem, state)  # changes only when a loop trace fails (below)
    while done < n_steps:
        t = int(state.t)
        until_callback = (every - t % every) if callback is not None else n_steps - done
        room = min(n_steps - done, until_callback)
        plan, loop = None, form is not None
        if (alg, problem) in _FAILED:
            pass
        elif loop:
            plan = _loop_plan(alg, t, inner, outer, draws, min(room, _chunk(chunk, True, alg)))
        else:
            for length in chunk_lengths(_chunk(chunk, False, alg)):
                if length <= room:
                    plan = _plan(alg, t, inner, outer, draws, length)
                    if plan is not None:
                        break
        if plan is None:
            length = 1
            state = eager_step(state, draws)
        else:
            length = len(plan[0]) // alg.batches_per_step[0]
            out = _compiled_call(form if loop else alg, problem, state, inner, outer, plan,
                                 options, draws, dev, _chunk(chunk, True, alg) if loop else None,
                                 unroll)
            if out is None:  # the trace failed: fall back (warned) and redo this iteration
                form = loop_alg(alg, problem, state)
                continue
            state = out
        done += length
        if callback is not None and state.t % every == 0:
            callback(state, draws)
    return state, draws


def _check_chunk(owner: str, chunk: Any, unroll: Any = None) -> None:
    def bad(v: Any) -> bool:
        return v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1)

    if bad(chunk):
        raise BilevelError(f"{owner}: chunk must be a positive int (or None for the default: "
                           f"{LOOP_CHUNK} iterations per loop graph, {UNROLLED_CHUNK} per "
                           f"unrolled one), got {chunk!r}")
    if bad(unroll):
        raise BilevelError(f"{owner}: unroll must be a positive int (iterations per while_loop "
                           f"trip; None for the default: {LOOP_UNROLL} for one batch per side, "
                           f"else 1), got {unroll!r}")


def precompile(alg: StochasticAlgorithm, problem: BilevelProblem, state: Any, inner: Sampler,
               outer: Sampler, chunk: int | None = None, compile: bool | dict = True,
               unroll: int | None = None) -> int:
    """Compile, before a timed or long run, every graph ``run(alg, problem, state, inner, outer,
    n, compile=compile, chunk=chunk, unroll=unroll)`` can ask for: the loop graph (or,
    unrolled, each chunk length) with full blocks, and the one-iteration graphs of the short
    last blocks (inner, outer, both). Runs them once on a copy of ``state`` (``state`` and the
    samplers are untouched), then collects the compiler's garbage (a full GC pass of ~0.5 s
    that would otherwise land in the run). Returns the number of graphs compiled now (0 when
    all were there already, or after a fallback to eager, which warns)."""
    _check_chunk("precompile", chunk, unroll)
    unroll = default_unroll(alg) if unroll is None else unroll
    options = {} if compile is True else dict(compile)
    dev = _device(inner)
    n_in, n_out = alg.batches_per_step
    before = len(_GRAPHS)
    for _ in range(2):  # a second pass when the loop trace failed (then: unrolled graphs)
        form = loop_alg(alg, problem, state)
        loop = form is not None
        lengths = [1] if loop else chunk_lengths(_chunk(chunk, False, alg))
        plans = [([0] * (n_in * length), [0] * (n_out * length),
                  (inner.batch_size, outer.batch_size)) for length in lengths]
        short_in = [inner.short_block] if n_in == 1 and inner.short_block is not None else []
        short_out = [outer.short_block] if n_out == 1 and outer.short_block is not None else []
        for ki in [None] + short_in:
            for ko in [None] + short_out:
                if ki is not None or ko is not None:
                    plans.append(([ki or 0] * n_in, [ko or 0] * n_out,
                                  (_size(inner, ki), _size(outer, ko))))
        copy = tree_map(lambda a: a.clone() if isinstance(a, torch.Tensor) else a, state)
        for plan in plans:
            if (alg, problem) in _FAILED:
                return 0
            if _compiled_call(form if loop else alg, problem, copy, inner, outer, plan,
                              options, Draws(), dev, _chunk(chunk, True, alg) if loop else None,
                              unroll) is None:
                break
        else:
            break
    if len(_GRAPHS) > before:  # the compiler's garbage: one full collection now, not in the run
        gc.collect()
    return len(_GRAPHS) - before


def _size(sampler: Sampler, k: int | None) -> int:
    return sampler.batch_size if k is None else sampler.size(k)


def _loop_options(options: dict, dev: torch.device) -> dict:
    """inductor's C++ wrapper on CPU for loop graphs (the while_loop then runs in C++, not in
    the Python wrapper: ~12 vs ~20 µs per SOBA iteration on ijcnn1), unless the caller chose a
    ``mode`` or set ``cpp_wrapper`` themselves."""
    if (options.get("backend", "inductor") != "inductor" or "mode" in options
            or dev.type != "cpu"):
        return options
    inductor = dict(options.get("options") or {})
    inductor.setdefault("cpp_wrapper", True)
    return {**options, "options": inductor}


def _compiled_call(alg, problem, state, inner, outer, plan, options, draws, dev,
                   capacity: int | None = None, unroll: int = 1):
    """Run ``plan`` (flat block ids, block sizes) through its graph, compiling it on first
    use: the loop graph of ``capacity`` rows (``unroll`` iterations per trip) when ``capacity``
    is given, else the unrolled graph of the plan's iterations. None after a failed trace
    (warned)."""
    from torch.utils._pytree import tree_flatten, tree_unflatten

    ids_in, ids_out, sizes = plan
    layouts = (layout(inner, sizes[0]), layout(outer, sizes[1]))
    t0 = int(state.t)
    tensor_state, kinds = numbers_to_tensors(state)
    n_in, n_out = alg.batches_per_step
    length = len(ids_in) // n_in
    rows = length if capacity is None else capacity  # the id arrays: (rows, n_in), (rows, n_out)
    ids = (_id_tensor(ids_in, rows, n_in, dev), _id_tensor(ids_out, rows, n_out, dev))
    if capacity is not None:
        leaves, spec = tree_flatten(tensor_state)
        unroll = min(unroll, capacity)  # a trip never holds more than a call's iterations
        if sizes != (inner.batch_size, outer.batch_size):
            unroll = 1  # a short block's graph only ever runs one iteration: nothing to unroll
        key = (alg, problem, "loop", capacity, unroll, sizes, layouts, n_in, n_out, str(spec))
        args = (leaves, inner.data, outer.data, *ids,
                torch.tensor(length, dtype=torch.int64, device=dev))
    else:
        key = (alg, problem, length, sizes, layouts, n_in, n_out)
        args = (tensor_state, inner.data, outer.data, *ids)
    fn = _GRAPHS.get(key)
    compiling = contextlib.nullcontext()
    if fn is None:
        if capacity is not None:
            fn = torch.compile(make_loop(alg, problem, spec, sizes, layouts, unroll),
                               **{"dynamic": False, "fullgraph": True,
                                  **_loop_options(options, dev)})
        else:
            fn = torch.compile(make_chunk(alg, problem, length, sizes, layouts),
                               **{"dynamic": False, "fullgraph": True, **options})
        _GRAPHS[key] = fn
        # inductor's reorder_for_locality moves a table read (SABA's M[k]) after the in-place
        # write of the same table; its re-inplacing pass then gives up and every call copies
        # every SAGA table twice (≈ 60 MB per call on covtype). Off while this graph compiles
        # (with any mode=; options={"reorder_for_locality": ...} still wins)
        if options.get("backend", "inductor") == "inductor":
            from torch._inductor import config as inductor_config
            compiling = inductor_config.patch(reorder_for_locality=False)
    try:  # the rows' start is a traced integer (fused_graphs._gather)
        with compiling, torch._dynamo.config.patch(capture_scalar_outputs=True):
            out = guarded_compiled_call(fn, *args)
    except Exception as e:  # noqa: BLE001 - any tracing/codegen failure: one warning
        _GRAPHS.pop(key, None)
        if capacity is not None:  # the loop form failed: unrolled chunks from now on
            _NO_LOOP.add((alg, problem))
            warnings.warn(f"bl.stochastic.run({alg.name}): the while_loop graph failed "
                          f"({_describe(e)}); running unrolled chunks instead (same numbers, "
                          f"longer compiles)", RuntimeWarning, stacklevel=4)
        else:
            _FAILED.add((alg, problem))
            compile_fallback(f"bl.stochastic.run({alg.name})", _describe(e))
        return None
    if capacity is not None:
        out = tree_unflatten(list(out), spec)
    out = tensors_to_numbers(out, kinds)
    fields = {f: getattr(out, f) for f in ("z", "v", "x", "y") if f in out._fields}
    if getattr(alg, "check", True):  # check=False: no checks, as in the eager loop
        check_finite(f"{t0}..{t0 + length - 1} (one compiled chunk; run eagerly to find the "
                     f"first bad iteration)" if length > 1 else t0, alg.name, **fields)
    ci, co = alg.oracle_calls  # advance the stream as the eager loop does
    draws.inner += length * n_in
    draws.outer += length * n_out
    draws.oracle_calls = (draws.oracle_calls[0] + length * ci,
                          draws.oracle_calls[1] + length * co)
    return out


def _device(sampler: Sampler) -> torch.device:
    from ..pytree import tree_leaves
    leaf = next(x for x in tree_leaves(sampler.data) if isinstance(x, torch.Tensor))
    return leaf.device
