"""bl.hpo.refine: online hypergradient refinement inside an Optuna trial (float64)."""

from __future__ import annotations

import math

import pytest
import torch

import bilevel as bl

optuna = pytest.importorskip("optuna")
optuna.logging.set_verbosity(optuna.logging.WARNING)

DT = torch.float64
g = torch.Generator().manual_seed(0)
X = torch.randn(30, 5, generator=g, dtype=DT)
Y = X @ torch.randn(5, generator=g, dtype=DT) + 0.3 * torch.randn(30, generator=g, dtype=DT)
XV = torch.randn(12, 5, generator=g, dtype=DT)
YV = XV @ torch.randn(5, generator=g, dtype=DT)
STREAM = bl.Minibatches(X, Y, batch_size=10, seed=3)


def inner(w, h, batch):
    x, y = batch
    return ((x @ w - y) ** 2).mean() + 0.5 * (h["log_wd"].exp() * w ** 2).sum()


def outer(w, h, batch):
    x, y = batch
    return ((x @ w - y) ** 2).mean()


PROBLEM = bl.BilevelProblem(inner, outer)


def tuner(log_wd0: float = -1.0) -> bl.Online:
    h = {"log_wd": torch.full((5,), log_wd0, dtype=DT, requires_grad=True)}
    return bl.Online(PROBLEM, h, torch.zeros(5, dtype=DT), solver=bl.Adam(lr=0.05, steps=4),
                     estimator=bl.Unrolled())


def manual(tn: bl.Online, n: int, lr: float = 0.1):
    """The loop refine() replaces, written out: step, optimiser step, outer loss."""
    hopt = torch.optim.Adam([tn.hparams["log_wd"]], lr=lr)
    values = []
    for _ in range(n):
        hopt.zero_grad()
        res = tn.step(STREAM, (XV, YV))
        hopt.step()
        values.append(float(res.outer_loss))
    return values


class AlwaysPrune(optuna.pruners.BasePruner):
    def prune(self, study, trial) -> bool:
        return True


def test_equals_manual_loop_and_reports_every_step():
    ref = tuner()
    values = manual(ref, 6)
    seen = {}

    def objective(trial):
        tn = tuner()
        out = bl.hpo.refine(trial, tn, 6, inner=STREAM, outer=(XV, YV), hopt=0.1)
        seen["tuner"], seen["out"] = tn, out
        return out.value

    study = optuna.create_study()
    study.optimize(objective, n_trials=1)
    tn, out = seen["tuner"], seen["out"]
    assert torch.equal(tn.hparams["log_wd"], ref.hparams["log_wd"])  # same float64 iterates
    assert torch.equal(tn.params, ref.params)
    assert not torch.equal(tn.hparams["log_wd"], torch.full((5,), -1.0, dtype=DT))  # it moved
    assert study.trials[0].intermediate_values == {s + 1: v for s, v in enumerate(values)}
    assert out.history == [(s + 1, v) for s, v in enumerate(values)]
    assert out.value == values[-1] == study.best_value
    assert out.steps == 6 and tn.hyper_steps == 6


def test_report_every_and_validate():
    calls = []

    def validate(tn):
        calls.append(tn.hyper_steps)
        return float(outer(tn.params, None, (XV, YV)))

    study = optuna.create_study()
    study.optimize(lambda t: bl.hpo.refine(t, tuner(), 7, inner=STREAM, outer=(XV, YV),
                                           validate=validate, report_every=3, hopt=0.1).value,
                   n_trials=1)
    ref = tuner()
    manual(ref, 7)
    assert calls == [3, 6, 7]  # every 3rd step and the last
    iv = study.trials[0].intermediate_values
    assert sorted(iv) == [3, 6, 7]
    assert iv[7] == float(outer(ref.params, None, (XV, YV)))  # validate() at the final weights


def test_always_prune_stops_at_first_report():
    seen = {}

    def objective(trial):
        tn = tuner()
        seen["tuner"] = tn
        return bl.hpo.refine(trial, tn, 10, inner=STREAM, outer=(XV, YV), report_every=2).value

    study = optuna.create_study(pruner=AlwaysPrune())
    study.optimize(objective, n_trials=2)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.PRUNED] * 2
    assert list(study.trials[1].intermediate_values) == [2]
    assert seen["tuner"].hyper_steps == 2  # nothing ran after the prune


def test_median_pruner_prunes_the_bad_trial_only():
    def objective(trial):
        wd0 = trial.suggest_float("log_wd0", -5.0, 5.0)
        return bl.hpo.refine(trial, tuner(wd0), 4, inner=STREAM, outer=(XV, YV)).value

    study = optuna.create_study(pruner=optuna.pruners.MedianPruner(n_startup_trials=2,
                                                                   n_warmup_steps=0))
    for wd0 in (-3.0, -2.5, 2.0, -2.8):  # 2.0: a decay of e^2 keeps w ~ 0 -> bad outer loss
        study.enqueue_trial({"log_wd0": wd0})
    study.optimize(objective, n_trials=4)
    S = optuna.trial.TrialState
    assert [t.state for t in study.trials] == [S.COMPLETE, S.COMPLETE, S.PRUNED, S.COMPLETE]
    assert list(study.trials[2].intermediate_values) == [1]  # pruned at its first report
    # the pruned trial's value really was above the median of the others at step 1
    first = [t.intermediate_values[1] for t in study.trials]
    assert first[2] > max(first[0], first[1])


def test_factory_reads_the_trial_and_resumed_tuner_keeps_numbering():
    made = {}

    def factory(trial):
        made["tuner"] = tuner(trial.suggest_float("log_wd0", -2.0, -2.0))
        return made["tuner"]

    trial = optuna.create_study().ask()
    a = bl.hpo.refine(trial, factory, 2, inner=STREAM, outer=(XV, YV))
    b = bl.hpo.refine(trial, made["tuner"], 2, inner=STREAM, outer=(XV, YV))
    assert [s for s, _ in a.history] == [1, 2] and [s for s, _ in b.history] == [3, 4]
    assert made["tuner"].hparams["log_wd"][0].item() != -2.0
    fixed = optuna.trial.FixedTrial({"log_wd0": -2.0})  # FixedTrial works too (no pruning)
    c = bl.hpo.refine(fixed, factory, 2, inner=STREAM, outer=(XV, YV))
    assert c.value == a.value  # same start, same stream, fresh Adam on the hparams


def test_nonfinite_value_raises_or_prunes():
    def validate(tn):
        return math.nan

    trial = optuna.create_study().ask()
    with pytest.raises(bl.BilevelError, match="nan at hyper-step 1"):
        bl.hpo.refine(trial, tuner(), 3, inner=STREAM, outer=(XV, YV), validate=validate)
    with pytest.raises(optuna.TrialPruned, match="nan"):
        bl.hpo.refine(trial, tuner(), 3, inner=STREAM, outer=(XV, YV), validate=validate,
                      on_nonfinite="prune")


@pytest.mark.parametrize("kw, match", [
    ({"n_steps": 0}, "n_steps"), ({"report_every": 0}, "report_every"),
    ({"on_nonfinite": "ignore"}, "on_nonfinite"), ({"hopt": "adam"}, "hopt"),
])
def test_bad_arguments_are_refused(kw, match):
    args = {"n_steps": 2, **kw}
    n = args.pop("n_steps")
    with pytest.raises(bl.BilevelError, match=match):
        bl.hpo.refine(optuna.create_study().ask(), tuner(), n, inner=STREAM, outer=(XV, YV),
                      **args)
    with pytest.raises(bl.BilevelError, match="trial"):
        bl.hpo.refine(object(), tuner(), 2)
    with pytest.raises(bl.BilevelError, match="bl.Online"):
        bl.hpo.refine(optuna.create_study().ask(), lambda t: 3, 2)
