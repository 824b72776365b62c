"""Bad input gets an error or a warning that names the problem (and the leaf)."""

from __future__ import annotations

import warnings

import pytest
import torch
from _problems import DT, IMAMLQuadratic, MAMLQuadratic

import bilevel as bl


@pytest.fixture
def maml():
    return MAMLQuadratic.make(d=3, K=3, alpha=0.2)


def theta():
    return {"theta": torch.ones(3, dtype=DT)}


def test_int_hyperparameter_is_rejected_by_name(maml):
    with pytest.raises(bl.BilevelError, match=r"hparams\['theta'\] has dtype torch.int64"):
        bl.hypergrad(maml.problem(), {"theta": torch.ones(3, dtype=torch.long)},
                     solver=maml.solver())


def test_python_number_hyperparameter_is_rejected(maml):
    with pytest.raises(bl.BilevelError, match=r"hparams\['lr'\] is a float"):
        bl.hypergrad(maml.problem(), {"theta": torch.ones(3, dtype=DT), "lr": 0.1},
                     solver=maml.solver())


def test_non_float_params0_is_rejected():
    prob = bl.BilevelProblem(lambda w, h, b: (w * h["x"]).sum() ** 2, lambda w, h, b: w.sum())
    with pytest.raises(bl.BilevelError, match="params0 has dtype torch.int64"):
        bl.hypergrad(prob, {"x": torch.ones(2)}, solver=bl.GradientDescent(0.1, 2),
                     params0=torch.zeros(2, dtype=torch.long))


def test_mismatched_structure_names_the_leaves():
    prob = bl.BilevelProblem(lambda p, h, b: ((p["w"] - h["x"]) ** 2).sum(),
                             lambda p, h, b: p["w"].sum())
    with pytest.raises(bl.BilevelError) as err:
        bl.hypergrad(prob, {"x": torch.ones(2)}, solver=bl.GradientDescent(0.1, 2),
                     params0={"weight": torch.zeros(2)})
    assert str(err.value) == ("inner_loss failed with KeyError: 'w' on params with leaves "
                              "params['weight'] and hparams with leaves hparams['x']. Do "
                              "params0/init(hparams) and hparams have the structure inner_loss "
                              "expects?")
    prob = bl.BilevelProblem(lambda p, h, b: (p * h["y"]).sum() ** 2, lambda p, h, b: p.sum())
    with pytest.raises(bl.BilevelError) as err:  # a single-tensor params: no [''] list
        bl.hypergrad(prob, {"x": torch.ones(2)}, solver=bl.GradientDescent(0.1, 2),
                     params0=torch.zeros(2))
    assert str(err.value) == ("inner_loss failed with KeyError: 'y' on params with leaves "
                              "params (a single tensor) and hparams with leaves hparams['x']. "
                              "Do params0/init(hparams) and hparams have the structure "
                              "inner_loss expects?")


def test_an_index_error_in_the_loss_gets_no_structure_hint():
    """Review defect 6: labels out of range for a 3-class head are the loss's own IndexError,
    not a params structure problem."""
    X, y = torch.randn(6, 4, dtype=DT), torch.tensor([0, 1, 2, 3, 4, 5])
    ce = torch.nn.functional.cross_entropy
    prob = bl.BilevelProblem(lambda w, h, b: ce(b[0] @ w, b[1]) + h["l"] * (w ** 2).sum(),
                             lambda w, h, b: ce(b[0] @ w, b[1]))
    with pytest.raises(bl.BilevelError) as err:
        bl.hypergrad(prob, {"l": torch.tensor(0.1, dtype=DT)}, (X, y), (X, y),
                     solver=bl.GradientDescent(0.1, 2), params0=torch.zeros(4, 3, dtype=DT))
    assert str(err.value) == ("inner_loss(params, hparams, batch) raised IndexError: Target 3 "
                              "is out of bounds.")
    assert isinstance(err.value.__cause__, IndexError)
    # any other error keeps its type (a RuntimeError stays one), with a note naming the loss
    bad = bl.BilevelProblem(lambda w, h, b: (torch.ones(5, dtype=DT) @ w) * h["l"],
                            lambda w, h, b: w.sum())
    with pytest.raises(RuntimeError) as err:
        bl.hypergrad(bad, {"l": torch.tensor(0.1, dtype=DT)}, solver=bl.GradientDescent(0.1, 2),
                     params0=torch.zeros(4, dtype=DT))
    if hasattr(err.value, "__notes__"):
        assert "(raised in inner_loss(params, hparams, batch))" in err.value.__notes__


def test_non_scalar_loss(maml):
    prob = bl.BilevelProblem(lambda p, h, b: (p["w"] - 1) ** 2, maml.problem().outer_loss,
                             init=lambda h: {"w": h["theta"]})
    with pytest.raises(bl.BilevelError, match=r"inner_loss returned a tensor of shape \(3,\)"):
        bl.hypergrad(prob, theta(), solver=maml.solver())
    prob = bl.BilevelProblem(maml.problem().inner_loss, lambda p, h, b: p["w"],
                             init=lambda h: {"w": h["theta"]})
    with pytest.raises(bl.BilevelError, match="outer_loss returned a tensor of shape"):
        bl.hypergrad(prob, theta(), solver=maml.solver())


def test_nan_in_inner_loop_reports_the_step(maml):
    # step 200 diverges geometrically: overflow to inf after a predictable number of steps
    solver = bl.GradientDescent(lr=200.0, steps=400)
    with pytest.raises(FloatingPointError, match=r"inner step \d+ \(0-based\) of 400"):
        bl.hypergrad(maml.problem(), theta(), solver=solver, estimator=bl.FirstOrder())


def test_nan_step_index_is_the_first_bad_one():
    prob = bl.BilevelProblem(lambda w, h, b: torch.log(w).sum() * 0 + (w ** 2).sum() / h["s"],
                             lambda w, h, b: w.sum())
    # w_k = (1 - 2 lr / s)^k w_0 stays positive for lr small; force log(negative) at step 1
    solver = bl.GradientDescent(lr=1.5, steps=5)
    with pytest.raises(FloatingPointError, match=r"inner step 1 \(0-based\)"):
        bl.hypergrad(prob, {"s": torch.tensor(1.0, dtype=DT)}, solver=solver,
                     params0=torch.ones(2, dtype=DT), estimator=bl.Unrolled())


def test_diverging_inner_solver_warns(maml):
    with pytest.warns(RuntimeWarning, match="inner loss grew from"):
        bl.hypergrad(maml.problem(), theta(), solver=bl.GradientDescent(lr=2.0, steps=10))


def test_unconverged_linear_solve_warns_with_residual():
    pb = IMAMLQuadratic.make(d=5)
    with pytest.warns(RuntimeWarning, match="relative residual"):
        res = bl.hypergrad(pb.problem(), {"theta": torch.ones(5, dtype=DT)},
                           solver=bl.GradientDescent(0.2, 300),
                           estimator=bl.Implicit(bl.CG(iters=1, tol=1e-12)))
    assert float(res.info["linsolve_rel_residual"]) > 1e-12
    assert not bool(res.info["linsolve_converged"])


def test_not_stationary_warns(maml):
    pb = IMAMLQuadratic.make(d=3)
    with pytest.warns(RuntimeWarning, match="did not reach a stationary point"):
        bl.hypergrad(pb.problem(), theta(), solver=bl.GradientDescent(0.01, 2),
                     estimator=bl.Implicit(bl.CG(5)))


def test_truncated_longer_than_solver(maml):
    with pytest.raises(bl.BilevelError, match=r"Truncated\(steps=5\) tracks more steps"):
        bl.hypergrad(maml.problem(), theta(), solver=maml.solver(), estimator=bl.Truncated(5))


def test_init_and_params0_both_or_neither(maml):
    with pytest.raises(bl.BilevelError, match="not both"):
        bl.hypergrad(maml.problem(), theta(), solver=maml.solver(),
                     params0={"w": torch.zeros(3, dtype=DT)})
    prob = bl.BilevelProblem(maml.problem().inner_loss, maml.problem().outer_loss)
    with pytest.raises(bl.BilevelError, match="no start point"):
        bl.hypergrad(prob, theta(), solver=maml.solver())


def test_implicit_on_maml_problem_without_proximal_term_is_refused(maml):
    # θ only enters init: the implicit hypergradient would be exactly 0
    with pytest.raises(bl.BilevelError, match=r"Implicit cannot differentiate hparams\['theta'\]: "
                                              r"neither the inner nor the outer loss reads it"):
        bl.hypergrad(maml.problem(), theta(), solver=bl.GradientDescent(0.2, 200),
                     estimator=bl.Implicit(bl.CG(5)))


def test_implicit_with_sign_solver_warns(maml):
    with pytest.warns(RuntimeWarning, match="signSGD"):
        bl.Implicit().validate(maml.problem(), bl.SignGD(0.1, 3), theta())


def test_bad_solver_and_estimator_arguments():
    with pytest.raises(bl.BilevelError, match="lr must be positive"):
        bl.GradientDescent(lr=-0.1, steps=3)
    with pytest.raises(bl.BilevelError, match="steps must be a non-negative int"):
        bl.GradientDescent(lr=0.1, steps=2.5)
    with pytest.raises(bl.BilevelError, match="non-negative int"):
        bl.Truncated(-1)
    with pytest.raises(bl.BilevelError, match="positive int"):
        bl.Checkpointed(0)
    with pytest.raises(bl.BilevelError, match="CG iters"):
        bl.CG(iters=-1)
    with pytest.raises(bl.BilevelError, match="alpha must be positive"):
        bl.Neumann(5, alpha=0.0)
    with pytest.raises(bl.BilevelError, match="plain inner solver"):
        bl.SAM(bl.SAM(bl.GradientDescent(0.1, 1), 0.1), 0.1)


def test_wrong_types_for_problem_solver_estimator(maml):
    with pytest.raises(bl.BilevelError, match="must be callable"):
        bl.BilevelProblem("not a function", lambda p, h, b: 0)
    with pytest.raises(bl.BilevelError, match="solver must be an inner solver"):
        bl.hypergrad(maml.problem(), theta(), solver=torch.optim.SGD)
    with pytest.raises(bl.BilevelError, match="estimator must be"):
        bl.hypergrad(maml.problem(), theta(), solver=maml.solver(), estimator="unrolled")


def test_missing_learning_rate_key(maml):
    with pytest.raises(bl.BilevelError, match="hparams has no key 'lr'"):
        bl.hypergrad(maml.problem(), theta(), solver=bl.GradientDescent("lr", 2))


def test_forward_mode_warns_for_many_hyperparameters():
    prob = bl.BilevelProblem(lambda w, h, b: ((w - h["x"]) ** 2).sum(), lambda w, h, b: w.sum())
    with pytest.warns(RuntimeWarning, match="one tangent per hyperparameter"):
        bl.hypergrad(prob, {"x": torch.zeros(20)}, solver=bl.GradientDescent(0.1, 1),
                     estimator=bl.ForwardMode(max_hparams=10), params0=torch.zeros(20))


def test_warnings_are_not_repeated_every_step():
    pb = IMAMLQuadratic.make(d=3)
    for fresh in (False, True):  # one estimator, or a fresh (equal) one at every step
        bl.reset_warnings()
        est = bl.Implicit(bl.CG(5))
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            for _ in range(9):
                res = bl.hypergrad(pb.problem(), theta(), solver=bl.GradientDescent(0.01, 2),
                                   estimator=bl.Implicit(bl.CG(5)) if fresh else est)
                assert bool(res.info["warnings/not_stationary"])
        assert sum("stationary point" in str(w.message) for w in seen) == 1


def test_mse_loss_zerotensor_falls_back_to_reverse_hvp():
    X, t = torch.randn(10, 3, dtype=DT), torch.randn(10, dtype=DT)
    mse = lambda w, b: torch.nn.functional.mse_loss(X @ w, t)  # noqa: E731
    prob = bl.BilevelProblem(lambda w, h, b: mse(w, b) + 0.5 * h["l"] * (w @ w),
                             lambda w, h, b: (w ** 2).sum())
    args = dict(solver=bl.GradientDescent(0.2, 500), params0=torch.zeros(3, dtype=DT))
    ref = bl.hypergrad(prob, {"l": torch.tensor(0.3, dtype=DT)},
                       estimator=bl.Implicit(bl.CG(3), hvp="reverse"), **args).grad["l"]
    with pytest.warns(RuntimeWarning, match="ZeroTensors"):
        got = bl.hypergrad(prob, {"l": torch.tensor(0.3, dtype=DT)},
                           estimator=bl.Implicit(bl.CG(3), hvp="forward"), **args).grad["l"]
    torch.testing.assert_close(got, ref)
    unrolled = bl.hypergrad(prob, {"l": torch.tensor(0.3, dtype=DT)}, estimator=bl.Unrolled(),
                            **args).grad["l"]
    torch.testing.assert_close(got, unrolled, rtol=1e-9, atol=0)
