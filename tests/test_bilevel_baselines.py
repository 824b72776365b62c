"""benchmarks/bilevel_baselines.py: its pure parts (schedules, curves, table, figure) on made-up
records; the jaxopt / Optuna parts on tiny data, skipped without jax, jaxopt, benchopt, optuna
or the benchmark_bilevel checkout."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import torch

from benchmarks import bilevel_baselines as bb
from benchmarks import bilevel_jax as bj


def test_trial_vector_and_rel_diff():
    params = {"outer_var_1": 2.0, "outer_var_0": -1.0, "outer_var_2": 0.5}
    assert bb.trial_vector(params, 3).tolist() == [-1.0, 2.0, 0.5]
    assert bb.rel_diff([1.0, 1.0], [1.0, 1.0]) == 0.0
    assert bb.rel_diff([3.0, 4.0], [0.0, 5.0]) == pytest.approx(math.sqrt(9 + 1) / 5)


def test_schedule_alternates_and_rotations_balance():
    s = bb.schedule(("A", "B"), [1, 2, 3])
    assert s == [(1, "A"), (1, "B"), (2, "B"), (2, "A"), (3, "A"), (3, "B")]
    r = bb.rotations(["a", "b", "c"], 3)
    assert r == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert all(r.count(m) == 3 for m in "abc")


def test_step_curve_band_and_final():
    recs = [(0, 0.0, 1.0), (5, 1.0, 0.5), (10, 2.0, 0.25)]
    np.testing.assert_allclose(bb.step_curve(recs, np.array([0.5, 1.0, 3.0])),
                               [1.0, 0.5, 0.25])
    assert math.isnan(bb.step_curve([(5, 1.0, 0.5)], np.array([0.5]))[0])
    other = [(0, 0.0, 1.0), (5, 2.0, 0.1)]
    med, lo, hi = bb.median_band([recs, other], np.array([1.5, 2.5]))
    np.testing.assert_allclose(med, [0.75, 0.175])
    assert np.all(lo <= med) and np.all(med <= hi)
    assert bb.final_at([recs, other], 2.0) == pytest.approx(0.175)


def _made_up():
    run = {"seed": 1, "records": [(0, 0.0, 0.5), (5, 1.0, 0.2), (10, 2.0, 0.1)]}
    meta = {"date": "d", "device": "cpu", "torch": "t", "jax": "j", "jaxopt": "o",
            "optuna": "p", "benchmark_commit": "c", "seeds": 1, "max_time": 2.0,
            "command": "cmd", "load_note": "interleaved"}
    return {"meta": meta,
            "optuna": {"ijcnn1": {"data": "synthetic", "metric": "subopt",
                                  "runs": {bb.OPTUNA_IMPLS[0]: [run], bb.OPTUNA_IMPLS[1]: [run]}}},
            "gd": {"hyper-cleaning": {"metric": "test_error", "max_time": 2.0,
                                      "runs": {bb.GD_IMPLS[1]: [run]}}},
            "equality": {"data": "x", "inner": "y", "linsolve": "z", "grad_norm_jax": 1e-12,
                         "grad_norm_torch": 1e-12, "rel": {"a vs b": 1e-15}},
            "timing": {"data": "x", "dtype": "float64", "note": "n", "repeats": 3,
                       "ms": {"m1": {"median": 2.0, "q20": 1.0, "q80": 3.0},
                              "m2": {"median": 1.0, "q20": 0.5, "q80": 1.5}}, "ratio": 2.0}}


def test_table_and_figure(tmp_path):
    res = _made_up()
    text = bb.write_table(res, tmp_path / "t.md")
    assert "| ijcnn1 | synthetic | h(x) − h* | benchmark (jax) | 10 | 0.2 | 0.5 | 0.1 |" in text
    assert "| hyper-cleaning | test error | ours (torch) | 10 | 200 | 0.5 | 0.1 |" in text
    assert "| a vs b | 1.00e-15 |" in text and "**2.00×** (ours ÷ jaxopt 0.50×)" in text
    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip("no matplotlib")
    bb.plot(res, tmp_path / "f.png")
    assert (tmp_path / "f.png").stat().st_size > 0


OK, WHY = bj.available()


@pytest.fixture(scope="module")
def tiny64():
    from bilevel.stochastic import datasets as ds
    from bilevel.stochastic import problems as pb
    split = ds.synthetic_ijcnn1(n_train=256, n_val=192, seed=0, dtype=torch.float64)
    return pb.logreg_l2(split, seed=0, dtype=torch.float64, h_star=0.0)


@pytest.mark.skipif(not OK, reason=WHY)
def test_jaxopt_implicit_equals_ours_float64(tiny64):
    import jax.numpy as jnp
    bj.set_x64(True)
    try:
        f_in, f_out, n_in, n_out = bb._oracles(tiny64)
        lr = bb.inner_lr(tiny64, bb.lipschitz(tiny64), tiny64.x0)
        vg, _ = bb._jaxopt_hypergrad_fn(f_in, f_out, n_in, n_out, lr, 200, 22)
        (_, zj), gj = vg(jnp.asarray(tiny64.z0.numpy()), jnp.asarray(tiny64.x0.numpy()))
        res = bb._torch_hypergrad(tiny64, tiny64.x0, tiny64.z0, lr, 200, 22)
    finally:
        bj.set_x64(False)
    assert bb.rel_diff(res.params.numpy(), np.asarray(zj)) < 1e-12
    assert bb.rel_diff(res.grad.numpy(), np.asarray(gj)) < 1e-10


@pytest.mark.skipif(not OK or importlib.util.find_spec("optuna") is None,
                    reason=WHY or "optuna is not installed")
def test_torch_optuna_records(tiny64):
    recs = bb.run_torch_optuna(tiny64, seed=1, max_time=1e-3)
    assert recs[0][0] == 0 and recs[1][0] == 5 and recs[1][1] > 0
    assert recs[1][2] <= recs[0][2] + 1e-3  # x0 is the enqueued first trial (inner tol 1e-3)
