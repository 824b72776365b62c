"""HistoryFree's constructor: README order (iters, damping, warm_start), validated options."""

from __future__ import annotations

import pytest

import bilevel as bl


def test_positional_order_matches_readme():
    e = bl.HistoryFree(5, 0.1, True)
    assert (e.iters, e.damping, e.warm_start) == (5, 0.1, True)
    assert (e.linsolve.iters, e.linsolve.damping, e.linsolve.warm_start, e.linsolve.tol) == \
        (5, 0.1, True, 0.0)
    assert e.stationarity_rtol is None and e.hvp == "auto" and e.system_batch == "last"
    assert bl.HistoryFree(5) == bl.HistoryFree(iters=5)


def test_inherited_options_are_keyword_only():
    with pytest.raises(TypeError):
        bl.HistoryFree(5, 0.1, False, None)
    e = bl.HistoryFree(3, hvp="forward", stationarity_rtol=0.5)
    assert e.hvp == "forward" and e.stationarity_rtol == 0.5
    with pytest.raises(TypeError):
        bl.HistoryFree(linsolve=bl.CG(5))


def test_custom_solver_refused_with_advice():
    with pytest.raises(bl.BilevelError) as e:
        bl.HistoryFree(bl.CG(50))
    assert str(e.value) == ("HistoryFree takes iters=..., it builds its own CG; use "
                            "bl.Implicit(bl.CG(...)) for a custom solver")


@pytest.mark.parametrize("kw, msg", [
    (dict(iters=2.0), "HistoryFree(iters=...) must be a non-negative int, got 2.0"),
    (dict(iters=-1), "HistoryFree(iters=...) must be a non-negative int, got -1"),
    (dict(damping=-0.1), "HistoryFree(damping=...) must be a number >= 0, got -0.1"),
    (dict(damping="x"), "HistoryFree(damping=...) must be a number >= 0, got 'x'"),
    (dict(warm_start=1), "HistoryFree(warm_start=...) must be True or False, got 1"),
    (dict(hvp=0.1), "HistoryFree(hvp=...) must be 'auto', 'forward' or 'reverse', got 0.1"),
    (dict(stationarity_rtol=5j),
     "HistoryFree(stationarity_rtol=...) must be None (no check) or a positive float, got 5j"),
    (dict(stationarity_rtol=0.0),
     "HistoryFree(stationarity_rtol=...) must be None (no check) or a positive float, got 0.0"),
])
def test_historyfree_validation_messages(kw, msg):
    with pytest.raises(bl.BilevelError) as e:
        bl.HistoryFree(**kw)
    assert str(e.value) == msg


@pytest.mark.parametrize("kw, msg", [
    (dict(hvp="fwd"), "Implicit(hvp=...) must be 'auto', 'forward' or 'reverse', got 'fwd'"),
    (dict(stationarity_rtol=-1),
     "Implicit(stationarity_rtol=...) must be None (no check) or a positive float, got -1"),
    (dict(stationarity_rtol=True),
     "Implicit(stationarity_rtol=...) must be None (no check) or a positive float, got True"),
])
def test_implicit_validation_messages(kw, msg):
    with pytest.raises(bl.BilevelError) as e:
        bl.Implicit(**kw)
    assert str(e.value) == msg
    assert bl.Implicit(stationarity_rtol=None).stationarity_rtol is None
