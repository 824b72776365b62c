"""bl.stochastic.Online: a stochastic algorithm as a stateful loop; equal (float64, bit for bit)
to bl.stochastic.run continued with its draws, checkpointable, usable by bl.hpo.refine."""

from __future__ import annotations

import io

import pytest
import torch
from torch.nn.functional import softplus

import bilevel as bl
from bilevel.stochastic import F2SA, SABA, SOBA, SRBA, AmIGO, Online, Sampler, StocBiO, run

DT = torch.float64


def g_loss(z, x, batch):
    X, y = batch
    return softplus(-y * (X @ z)).mean() + 0.5 * (torch.exp(x) * z * z).sum()


def f_loss(z, x, batch):
    X, y = batch
    return softplus(-y * (X @ z)).mean() + 0.05 * (x * x).sum()


PROBLEM = bl.BilevelProblem(inner_loss=g_loss, outer_loss=f_loss)
gen = torch.Generator().manual_seed(0)
XI, XO = torch.randn(40, 4, dtype=DT, generator=gen), torch.randn(24, 4, dtype=DT, generator=gen)
W = torch.randn(4, dtype=DT, generator=gen)
YI, YO = torch.sign(XI @ W + 0.5 * torch.randn(40, dtype=DT, generator=gen)), torch.sign(XO @ W)
Z0, X0 = torch.randn(4, dtype=DT, generator=gen), torch.randn(4, dtype=DT, generator=gen) - 1.0

ALGS = {
    "SOBA": lambda: SOBA(0.3, 0.2),
    "SABA": lambda: SABA(0.3, 0.2),
    "SRBA": lambda: SRBA(0.3, 0.2, period=3),
    "AmIGO": lambda: AmIGO(0.3, 0.2, n_inner_steps=2, n_v_steps=2),
    "StocBiO": lambda: StocBiO(0.3, 0.2, neumann_step=0.25, n_inner_steps=2, n_neumann_steps=2),
    "F2SA": lambda: F2SA(0.1, 0.2, lam0=2.0, lam_step=0.5, n_inner_steps=2),
}


def samplers():
    return Sampler((XI, YI), 8, seed=1), Sampler((XO, YO), 8, seed=2)


def same(a, b) -> bool:
    la, lb = torch.utils._pytree.tree_leaves(a), torch.utils._pytree.tree_leaves(b)
    return len(la) == len(lb) and all(
        torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in zip(la, lb))


def loop(name: str) -> Online:
    si, so = samplers()
    return Online(ALGS[name](), PROBLEM, Z0, X0, inner=si, outer=so)


@pytest.mark.parametrize("name", list(ALGS))
def test_equals_run_and_resumes_bit_for_bit(name):
    alg = ALGS[name]()
    si, so = samplers()
    init = alg.init(Z0, X0, len(si), len(so)) if name == "SABA" else alg.init(Z0, X0)
    ref, draws = run(alg, PROBLEM, init, si, so, 4)
    ref, draws = run(alg, PROBLEM, ref, si, so, 3, draws=draws)  # run continued with its draws
    lp = loop(name)
    lp.step(2)
    buf = io.BytesIO()
    torch.save(lp.state_dict(), buf)
    info = lp.step(5)
    assert same(lp.state, ref) and lp.t == 7 and info["t"] == 7
    assert lp.oracle_calls == draws.oracle_calls == info["oracle_calls_total"]
    assert not torch.equal(lp.x, X0) and not torch.equal(lp.z, Z0)  # it moved
    resumed = loop(name)
    buf.seek(0)
    resumed.load_state_dict(torch.load(buf, weights_only=False))
    resumed.step(5)
    assert same(resumed.state, lp.state) and resumed.oracle_calls == lp.oracle_calls


def test_saba_full_memory_init_kwargs():
    si, so = samplers()
    alg = SABA(0.3, 0.2)
    init = alg.init(Z0, X0, len(si), len(so), init_memory="full", problem=PROBLEM,
                    inner_blocks=[si.block(k) for k in range(len(si))],
                    outer_blocks=[so.block(k) for k in range(len(so))])
    ref, _ = run(alg, PROBLEM, init, si, so, 5)
    lp = Online(alg, PROBLEM, Z0, X0, inner=si, outer=so, init_kwargs={"init_memory": "full"})
    lp.step(5)
    assert same(lp.state, ref)


def test_refine_drives_a_stochastic_loop():
    optuna = pytest.importorskip("optuna")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    val = lambda lp: float(f_loss(lp.z, lp.x, (XO, YO)))  # noqa: E731
    ref = loop("SOBA")
    expected = {}
    for t in range(1, 7):
        ref.step(1)
        if t % 2 == 0:
            expected[t] = val(ref)
    seen = {}

    def objective(trial):
        seen["loop"] = loop("SOBA")
        return bl.hpo.refine(trial, seen["loop"], 6, validate=val, report_every=2).value

    study = optuna.create_study()
    study.optimize(objective, n_trials=1)
    assert study.trials[0].intermediate_values == expected
    assert same(seen["loop"].state, ref.state)
    with pytest.raises(bl.BilevelError, match="validate"):
        bl.hpo.refine(study.ask(), loop("SOBA"), 2)


def test_refusals():
    si, so = samplers()
    with pytest.raises(bl.BilevelError, match="stochastic algorithm"):
        Online("SOBA", PROBLEM, Z0, X0, inner=si, outer=so)
    with pytest.raises(bl.BilevelError, match="Sampler"):
        Online(SOBA(0.1, 0.1), PROBLEM, Z0, X0, inner=(XI, YI), outer=so)
    with pytest.raises(bl.BilevelError, match="n_iter"):
        loop("SOBA").step(0)
    with pytest.raises(bl.BilevelError, match="SABA loop"):
        loop("SOBA").load_state_dict(loop("SABA").state_dict())
    with pytest.raises(bl.BilevelError, match="state_dict"):
        loop("SOBA").load_state_dict({"state": None})
