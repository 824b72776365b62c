"""``bl.stochastic.run(..., compile=...)``: compiled chunks of iterations give the eager iterates.

These run Dynamo + AOT autograd with the ``aot_eager`` backend (the same tracing as inductor,
no C++ code generation: seconds, no toolchain). The inductor backend is exercised by
``tests/_compiled_cases.py`` (opt-in) and by ``benchmarks/bilevel_suite.py --compile``.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from test_stochastic import PROBLEM, logistic_data

import bilevel as bl
from bilevel.stochastic import F2SA, SABA, SOBA, SRBA, AmIGO, Sampler, Schedule, StocBiO, fused, run

AOT = {"backend": "aot_eager"}

MAKERS = {
    "SOBA": lambda: SOBA(0.3, 0.2),
    "SOBA-decay": lambda: SOBA(Schedule(0.3, 0.5), Schedule(0.2, 0.4)),
    "SABA": lambda: SABA(0.2, 0.1),
    "SABA-copy": lambda: SABA(0.2, 0.1, inplace=False),
    "SRBA": lambda: SRBA(0.2, 0.1, period=5),
    "AmIGO": lambda: AmIGO(0.2, 0.1, n_inner_steps=2, n_v_steps=2),
    "StocBiO": lambda: StocBiO(0.2, 0.1, n_inner_steps=2, n_neumann_steps=2),
    "F2SA": lambda: F2SA(0.2, 0.1, n_inner_steps=2),
}


def _init(alg, z0, x0, si, so):
    if isinstance(alg, SABA):
        return alg.init(z0, x0, len(si), len(so))
    return alg.init(z0, x0)


def _fields(state):
    return {f: getattr(state, f) for f in state._fields if f != "memory"}


def _same(a, b, tol=1e-12):
    for (name, x), y in zip(_fields(a).items(), _fields(b).values()):
        if isinstance(x, torch.Tensor):
            assert torch.allclose(x, y, rtol=tol, atol=tol), (name, (x - y).abs().max())
        elif isinstance(x, tuple):
            for u, w in zip(x, y):
                if isinstance(u, torch.Tensor):
                    assert torch.allclose(u, w, rtol=tol, atol=tol), name
                else:
                    _same_tree(u, w, tol)
        else:
            assert x == pytest.approx(y, rel=tol), name
            assert type(x) is type(y), name


def _same_tree(a, b, tol):
    for u, w in zip(bl.pytree.tree_leaves(a), bl.pytree.tree_leaves(b)):
        assert torch.allclose(u, w, rtol=tol, atol=tol)


@pytest.mark.parametrize("name", list(MAKERS))
def test_compiled_chunks_equal_eager_iterates(name):
    """44 inner rows / batch 8: a short block (4 rows) every epoch of 6 blocks, so chunks of 4,
    2 and 1 and eager single steps all occur; SRBA adds full-batch resets."""
    inner_data, outer_data, z0, x0 = logistic_data()
    si, so = Sampler(inner_data, 8, seed=3), Sampler(outer_data, 6, seed=4)
    alg = MAKERS[name]()
    n = 23
    ref, d_ref = run(alg, PROBLEM, _init(alg, z0, x0, si, so), si, so, n)
    out, d_out = run(alg, PROBLEM, _init(alg, z0, x0, si, so), si, so, n, compile=AOT, chunk=4)
    assert out.t == ref.t == n and isinstance(out.t, int)
    _same(ref, out)
    assert (d_out.inner, d_out.outer, d_out.oracle_calls) == (d_ref.inner, d_ref.outer,
                                                              d_ref.oracle_calls)
    if isinstance(alg, SABA):
        for k in ref.memory:
            _same_tree(ref.memory[k], out.memory[k], 1e-12)
    # the stream continues: 7 more steps from the returned draws == 30 eager steps
    more, _ = run(alg, PROBLEM, out, si, so, 7, draws=d_out, compile=AOT, chunk=4)
    ref30, _ = run(alg, PROBLEM, _init(alg, z0, x0, si, so), si, so, 30)
    _same(ref30, more)


@pytest.mark.parametrize("name", list(MAKERS))
def test_overlap_sampler_runs_every_iteration_in_a_chunk(name, monkeypatch):
    """With Sampler(last="overlap") every block has batch_size rows: no iteration runs eagerly
    (except SRBA's full-batch resets), even AmIGO/StocBiO/F2SA, which draw more inner batches a
    step than an epoch has blocks; the iterates (and SABA's weighted tables) are the eager
    loop's on the same sampler."""
    eager_at = []
    real = fused.run_compiled

    def spy(*args):  # run_compiled(..., options, eager_step, unroll)
        *rest, eager_step, unroll = args

        def counted(state, draws):
            eager_at.append(state.t)
            return eager_step(state, draws)
        return real(*rest, counted, unroll)

    monkeypatch.setattr(fused, "run_compiled", spy)
    inner_data, outer_data, z0, x0 = logistic_data()  # 44 rows / 8: overlap last block
    si = Sampler(inner_data, 8, seed=3, last="overlap")
    so = Sampler(outer_data, 7, seed=4, last="overlap")
    alg = MAKERS[name]()
    n = 24
    ref, d_ref = run(alg, PROBLEM, _init(alg, z0, x0, si, so), si, so, n)
    out, d_out = run(alg, PROBLEM, _init(alg, z0, x0, si, so), si, so, n, compile=AOT, chunk=4)
    _same(ref, out)
    assert (d_out.inner, d_out.outer) == (d_ref.inner, d_ref.outer)
    if isinstance(alg, SABA):
        for k in ref.memory:
            _same_tree(ref.memory[k], out.memory[k], 1e-12)
    resets = [t for t in range(n) if getattr(alg, "needs_full", None) and alg.needs_full(t)]
    assert eager_at == resets, eager_at


def test_callbacks_fire_at_the_same_iterations():
    inner_data, outer_data, z0, x0 = logistic_data()
    si, so = Sampler(inner_data, 8, seed=3), Sampler(outer_data, 6, seed=4)
    alg = SOBA(0.3, 0.2)
    seen_ref, seen = [], []
    run(alg, PROBLEM, alg.init(z0, x0), si, so, 21,
        callback=lambda s, d: seen_ref.append((s.t, s.x.clone())), every=4)
    run(alg, PROBLEM, alg.init(z0, x0), si, so, 21, compile=AOT, chunk=4,
        callback=lambda s, d: seen.append((s.t, s.x.clone())), every=4)
    assert [t for t, _ in seen] == [t for t, _ in seen_ref] == [4, 8, 12, 16, 20]
    for (_, a), (_, b) in zip(seen_ref, seen):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)


def test_divergence_is_reported_with_the_chunk_iterations():
    inner_data, outer_data, z0, x0 = logistic_data(n_in=48)  # full blocks only: chunks of 4
    si, so = Sampler(inner_data, 8, seed=3), Sampler(outer_data, 6, seed=4)
    alg = SOBA(1e6, 1e6)
    with pytest.raises(bl.BilevelError, match=r"non-finite .* at iteration \d+\.\.\d+"):
        run(alg, PROBLEM, alg.init(z0, x0), si, so, 40, compile=AOT, chunk=4)


def test_untraceable_schedule_falls_back_with_one_warning():
    import math
    inner_data, outer_data, z0, x0 = logistic_data()
    si, so = Sampler(inner_data, 8, seed=3), Sampler(outer_data, 6, seed=4)
    alg = SOBA(lambda t: 0.3 / math.sqrt(t + 1), 0.2)  # math.sqrt of a tensor t: not traceable
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out, d = run(alg, PROBLEM, alg.init(z0, x0), si, so, 12, compile=AOT, chunk=4)
        out, _ = run(alg, PROBLEM, out, si, so, 4, compile=AOT, chunk=4, draws=d)
    msgs = [str(x.message) for x in w if "torch.compile unavailable" in str(x.message)]
    assert len(msgs) == 1 and "SOBA" in msgs[0]
    ref16, _ = run(alg, PROBLEM, alg.init(z0, x0), si, so, 16)
    _same(ref16, out)


def test_no_compiler_falls_back(monkeypatch):
    inner_data, outer_data, z0, x0 = logistic_data()
    si, so = Sampler(inner_data, 8, seed=3), Sampler(outer_data, 6, seed=4)
    alg = SOBA(0.3, 0.2)
    monkeypatch.setattr(fused, "compiler_missing", lambda backend, device=None: "no C++ here")
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ here"):
        out, _ = run(alg, PROBLEM, alg.init(z0, x0), si, so, 9, compile=True, chunk=4)
    ref, _ = run(alg, PROBLEM, alg.init(z0, x0), si, so, 9)
    _same(ref, out, tol=0)


def test_recompiles_bounded():
    """One graph per chunk length (4, 2, 1 here) and one for an iteration on the short last
    inner block, each compiled once, whatever the number of calls, the iteration counter and
    the decreasing step sizes."""
    compiled = []

    def counting_backend(gm, example_inputs):
        compiled.append(len(example_inputs))
        return gm.forward

    inner_data, outer_data, z0, x0 = logistic_data()
    si, so = Sampler(inner_data, 8, seed=3), Sampler(outer_data, 6, seed=4)
    alg = SOBA(Schedule(0.3, 0.5), Schedule(0.2, 0.5))
    state, d = alg.init(z0, x0), None
    for _ in range(4):
        state, d = run(alg, PROBLEM, state, si, so, 12, compile={"backend": counting_backend},
                       chunk=4, draws=d)
    assert state.t == 48
    assert 1 <= len(compiled) <= 4, compiled


@pytest.mark.parametrize("name", ["SOBA", "SABA", "SABA-large", "StocBiO"])
def test_precompile_leaves_nothing_to_compile_in_the_run(name, monkeypatch):
    """precompile compiles every graph a run can ask for (each chunk length, the short inner
    and outer last blocks), leaves state and samplers untouched, and the run then compiles
    nothing; its iterates are still the eager ones."""
    compiled = []

    def counting_backend(gm, example_inputs):
        compiled.append(len(example_inputs))
        return gm.forward

    inner_data, outer_data, z0, x0 = logistic_data()
    si, so = Sampler(inner_data, 8, seed=3), Sampler(outer_data, 7, seed=4)  # short blocks 4, 2
    if name == "SABA-large":  # tables over the loop limit: unrolled chunks
        import bilevel.stochastic.saba as saba_mod
        monkeypatch.setattr(saba_mod, "LOOP_TABLE_BYTES", 0)
    alg = MAKERS[name.removesuffix("-large")]()
    state = _init(alg, z0, x0, si, so)
    before = {f: getattr(state, f).clone() for f in ("z", "v", "x") if f in state._fields}
    opts = {"backend": counting_backend}
    n = bl.stochastic.precompile(alg, PROBLEM, state, si, so, chunk=4, compile=opts)
    # SOBA, StocBiO, SABA (small tables: its copying twin): one while_loop graph; SABA with
    # large in-place tables: unrolled lengths 4, 2, 1; + short inner / outer / both blocks
    # (StocBiO: several inner batches a step, so a short inner block always runs eagerly:
    # short outer only)
    expected = {"SOBA": 4, "SABA": 4, "SABA-large": 6, "StocBiO": 2}[name]
    assert n == len(compiled) == expected, (n, compiled)
    assert all(torch.equal(getattr(state, f), before[f]) for f in before)
    assert bl.stochastic.precompile(alg, PROBLEM, state, si, so, chunk=4, compile=opts) == 0
    out, _ = run(alg, PROBLEM, state, si, so, 40, compile=opts, chunk=4)
    assert len(compiled) == expected  # nothing compiled during the run
    ref, _ = run(alg, PROBLEM, _init(alg, z0, x0, si, so), si, so, 40)
    _same(ref, out)


def test_bad_chunk():
    inner_data, outer_data, z0, x0 = logistic_data()
    si, so = Sampler(inner_data, 8, seed=3), Sampler(outer_data, 6, seed=4)
    alg = SOBA(0.3, 0.2)
    with pytest.raises(bl.BilevelError, match="chunk"):
        run(alg, PROBLEM, alg.init(z0, x0), si, so, 4, compile=AOT, chunk=0)


def test_online_compiled_equals_eager_online():
    inner_data, outer_data, z0, x0 = logistic_data()
    make = lambda c: bl.stochastic.Online(  # noqa: E731
        SABA(0.2, 0.1), PROBLEM, z0, x0, inner=Sampler(inner_data, 8, seed=3),
        outer=Sampler(outer_data, 6, seed=4), compile=c, chunk=4)
    eager, comp = make(False), make(AOT)
    for n in (5, 9, 3):
        eager.step(n)
        info = comp.step(n)
    assert info["t"] == comp.t == eager.t == 17
    assert comp.oracle_calls == eager.oracle_calls
    _same(eager.state, comp.state)


def _counting():
    compiled = []

    def backend(gm, example_inputs):
        compiled.append(len(example_inputs))
        return gm.forward
    return compiled, {"backend": backend}


def _spy_counts(monkeypatch) -> list[tuple[int, int]]:
    """(count, capacity) of every loop-graph call."""
    calls, real = [], fused.guarded_compiled_call

    def spy(fn, *args):
        if len(args) == 6:  # a loop graph: (leaves, data, data, ids, ids, count)
            calls.append((int(args[5]), args[3].shape[0]))
        return real(fn, *args)
    monkeypatch.setattr(fused, "guarded_compiled_call", spy)
    return calls


@pytest.mark.parametrize("name", ["SOBA", "SRBA", "AmIGO", "SABA-copy"])
def test_one_loop_graph_serves_every_count(name, monkeypatch):
    """A while_loop graph runs up to ``chunk`` iterations per call, padded to one shape: 250
    iterations are one call of the default chunk (1024 rows), and with chunk=100 calls of
    100, 100, 50, of ONE graph each, shortened only by SRBA's eager resets; the eager
    iterates either way."""
    inner_data, outer_data, z0, x0 = logistic_data(n_in=45, n_out=31)
    si = Sampler(inner_data, 8, seed=3, last="overlap")  # 6 blocks, none short
    so = Sampler(outer_data, 6, seed=4, last="overlap")
    alg = MAKERS[name]()
    assert fused.uses_loop(alg)
    ref, rdraws = run(alg, PROBLEM, _init(alg, z0, x0, si, so), si, so, 250)
    for chunk, counts in ((None, [250]), (100, [100, 100, 50])):
        compiled, opts = _counting()
        calls = _spy_counts(monkeypatch)
        out, draws = run(alg, PROBLEM, _init(alg, z0, x0, si, so), si, so, 250, compile=opts,
                         chunk=chunk)
        assert len(compiled) == 1
        assert {cap for _, cap in calls} == {fused.LOOP_CHUNK if chunk is None else chunk}
        if name == "SRBA":  # a reset every 5 iterations: 4 iterations per call
            assert {c for c, _ in calls} == {4}
        else:
            assert [c for c, _ in calls] == counts
        _same(ref, out)
        assert draws.oracle_calls == rdraws.oracle_calls and draws.inner == rdraws.inner


def test_chunk_bounds_the_loop_count(monkeypatch):
    inner_data, outer_data, z0, x0 = logistic_data()
    si, so = Sampler(inner_data, 8, seed=3), Sampler(outer_data, 6, seed=4)  # short blocks
    alg = SOBA(0.3, 0.2)
    calls = _spy_counts(monkeypatch)
    out, _ = run(alg, PROBLEM, alg.init(z0, x0), si, so, 40, compile=AOT, chunk=7)
    assert calls and max(c for c, _ in calls) <= 7 and {cap for _, cap in calls} == {7}
    assert sum(c for c, _ in calls) == 40  # short blocks too: their own loop graphs
    ref, _ = run(alg, PROBLEM, alg.init(z0, x0), si, so, 40)
    _same(ref, out)


class MutatingSOBA(SOBA):
    """A step that updates a tensor of its input state in place (as in-place SABA does)."""

    def step(self, state, problem, inner_batches, outer_batches):
        state.v.mul_(1.0)
        return super().step(state, problem, inner_batches, outer_batches)


def test_a_failed_loop_trace_falls_back_to_unrolled_chunks_with_one_warning():
    inner_data, outer_data, z0, x0 = logistic_data()
    si, so = Sampler(inner_data, 8, seed=3), Sampler(outer_data, 6, seed=4)
    alg = MutatingSOBA(0.3, 0.2)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        out, draws = run(alg, PROBLEM, alg.init(z0, x0), si, so, 20, compile=AOT, chunk=4)
        out, _ = run(alg, PROBLEM, out, si, so, 20, draws=draws, compile=AOT, chunk=4)
    msgs = [str(w.message) for w in seen if "while_loop" in str(w.message)]
    assert len(msgs) == 1 and "unrolled chunks" in msgs[0], msgs
    assert not any("running eagerly" in str(w.message) for w in seen)
    assert not fused.uses_loop(alg, PROBLEM) and fused.compiled_lengths(alg, PROBLEM)
    ref, _ = run(alg, PROBLEM, alg.init(z0, x0), si, so, 40)
    _same(ref, out)


def test_saba_loop_form():
    """SABA's own step is a loop body only with copied tables; in-place SABA loops through
    its copying twin (one per object) while the tables hold at most LOOP_TABLE_BYTES, else
    compiles unrolled chunks."""
    assert not SABA(0.1, 0.1).loop_compatible
    assert SABA(0.1, 0.1, inplace=False).loop_compatible
    assert all(m().loop_compatible for n, m in MAKERS.items() if n not in ("SABA",))
    inner_data, outer_data, z0, x0 = logistic_data()
    si, so = Sampler(inner_data, 8, seed=3), Sampler(outer_data, 6, seed=4)
    alg = SABA(0.2, 0.1)
    state = _init(alg, z0, x0, si, so)
    twin = alg.loop_form(state)
    assert twin is not alg and not twin.inplace and alg.inplace and twin is alg.loop_form(state)
    assert (twin.inner_step, twin.outer_step, twin.check) == (alg.inner_step, alg.outer_step,
                                                              alg.check)
    assert fused.loop_alg(alg, PROBLEM, state) is twin
    copying = SABA(0.2, 0.1, inplace=False)
    assert copying.loop_form(state) is copying
    import bilevel.stochastic.saba as saba_mod
    old = saba_mod.LOOP_TABLE_BYTES
    try:
        saba_mod.LOOP_TABLE_BYTES = 0
        assert alg.loop_form(state) is None and fused.loop_alg(alg, PROBLEM, state) is None
        assert copying.loop_form(state) is copying
    finally:
        saba_mod.LOOP_TABLE_BYTES = old


@pytest.fixture
def large_tables(monkeypatch):
    """In-place SABA as with tables over the loop limit: unrolled chunks."""
    import bilevel.stochastic.saba as saba_mod
    monkeypatch.setattr(saba_mod, "LOOP_TABLE_BYTES", 0)


def test_in_place_saba_with_large_tables_compiles_unrolled_chunks(large_tables, monkeypatch):
    inner_data, outer_data, z0, x0 = logistic_data(n_in=45, n_out=31)
    si = Sampler(inner_data, 8, seed=3, last="overlap")
    so = Sampler(outer_data, 6, seed=4, last="overlap")
    alg = SABA(0.2, 0.1)
    calls = _spy_counts(monkeypatch)
    ref, _ = run(alg, PROBLEM, _init(alg, z0, x0, si, so), si, so, 40)
    out, _ = run(alg, PROBLEM, _init(alg, z0, x0, si, so), si, so, 40, compile=AOT, chunk=4)
    assert not calls and fused.compiled_lengths(alg, PROBLEM) == {4}
    _same(ref, out)
    for k in ref.memory:
        _same_tree(ref.memory[k], out.memory[k], 1e-12)


def test_default_chunks():
    """1024 per loop graph; unrolled 16 for one batch a side, 2 for the ~20-batch steps."""
    assert fused._chunk(None, True, MAKERS["AmIGO"]()) == fused.LOOP_CHUNK == 1024
    assert fused._chunk(None, False, MAKERS["SABA"]()) == fused.UNROLLED_CHUNK == 16
    assert all(fused._chunk(None, False, MAKERS[n]()) == 2 for n in ("AmIGO", "StocBiO", "F2SA"))
    assert fused._chunk(5, False, MAKERS["AmIGO"]()) == 5


@pytest.mark.parametrize("name, unroll", [("SOBA", 3), ("SRBA", 3), ("SABA-copy", 2),
                                          ("AmIGO", 2), ("SOBA", 1)])
def test_unrolled_trips_equal_eager(name, unroll, monkeypatch):
    """``unroll`` = U iterations per while_loop trip, then one per trip for the count mod U:
    chunk 7 gives counts 7 (2 trips of 3 + 1) and a last 250 mod 7 = 5 (1 + 2); chunk 2 < U
    only the remainder loop. Two while_loops in the graph when U > 1, one when U = 1; the
    eager iterates either way."""
    inner_data, outer_data, z0, x0 = logistic_data(n_in=45, n_out=31)
    si = Sampler(inner_data, 8, seed=3, last="overlap")
    so = Sampler(outer_data, 6, seed=4, last="overlap")
    alg = MAKERS[name]()
    ref, rdraws = run(alg, PROBLEM, _init(alg, z0, x0, si, so), si, so, 250)
    for chunk in (7, 2):
        loops: list[int] = []

        def backend(gm, example_inputs, loops=loops):
            loops.append(sum(n.target is torch.ops.higher_order.while_loop
                             for n in gm.graph.nodes))
            return gm.forward
        calls = _spy_counts(monkeypatch)
        out, draws = run(alg, PROBLEM, _init(alg, z0, x0, si, so), si, so, 250,
                         compile={"backend": backend}, chunk=chunk, unroll=unroll)
        assert loops == [2 if unroll > 1 else 1]
        resets = sum(alg.needs_full(t) for t in range(250)) if name == "SRBA" else 0
        assert sum(c for c, _ in calls) == 250 - resets  # SRBA's resets run eagerly
        _same(ref, out)
        assert draws.oracle_calls == rdraws.oracle_calls and draws.inner == rdraws.inner


def test_default_unroll_and_bad_unroll():
    assert all(fused.default_unroll(MAKERS[n]()) == fused.LOOP_UNROLL == 4
               for n in ("SOBA", "SRBA", "SABA-copy"))
    assert all(fused.default_unroll(MAKERS[n]()) == 1 for n in ("AmIGO", "StocBiO", "F2SA"))
    inner_data, outer_data, z0, x0 = logistic_data()
    si, so = Sampler(inner_data, 8, seed=3), Sampler(outer_data, 6, seed=4)
    alg = SOBA(0.3, 0.2)
    for bad in (0, 2.0, True):
        with pytest.raises(bl.BilevelError, match="unroll must be a positive int"):
            run(alg, PROBLEM, alg.init(z0, x0), si, so, 4, compile=AOT, unroll=bad)
    with pytest.raises(bl.BilevelError, match="needs compile=True"):
        run(alg, PROBLEM, alg.init(z0, x0), si, so, 4, unroll=2)
    with pytest.raises(bl.BilevelError, match="needs compile=True"):
        bl.stochastic.Online(alg, PROBLEM, z0, x0, inner=si, outer=so, unroll=2)
