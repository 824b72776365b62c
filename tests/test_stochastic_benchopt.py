"""Our stochastic algorithms give the iterates of benchopt's own JAX solvers
(benchopt/benchmark_bilevel, run from a checkout at test time) in float64, fed the same
minibatch stream. Skips when jax/jaxopt/benchopt or the checkout are absent."""

from __future__ import annotations

import pytest

from benchmarks import bilevel_jax as bj
from bilevel.stochastic import datasets as ds
from bilevel.stochastic import problems as pb

OK, WHY = bj.available()
pytestmark = [pytest.mark.skipif(not OK, reason=WHY), pytest.mark.slow]

ALGS = ["soba", "saba", "srba", "amigo", "stocbio", "f2sa"]


@pytest.fixture(scope="module")
def ijcnn1_small():
    return pb.logreg_l2(ds.synthetic_ijcnn1(n_train=256, n_val=192, seed=0), seed=0,
                        h_star=0.0)


@pytest.mark.parametrize("name", ALGS)
def test_equal_iterates_ijcnn1(name, ijcnn1_small):
    assert bj.compare_iterates(name, ijcnn1_small, "ijcnn1", n_iter=8, step_size=0.1,
                               outer_ratio=0.5) < 1e-12


@pytest.mark.parametrize("name", ALGS)
def test_equal_iterates_partial_last_batch(name):
    """250 / 190 rows, batch 64: the benchmark's last batch of each side is its last 64 rows,
    weighted (n mod 64)/n; ours with Sampler(last="overlap"). 10 iterations visit it."""
    bench = pb.logreg_l2(ds.synthetic_ijcnn1(n_train=250, n_val=190, seed=2), seed=0,
                         h_star=0.0)
    assert bj.compare_iterates(name, bench, "ijcnn1", n_iter=10, step_size=0.1,
                               outer_ratio=0.5) < 1e-12


@pytest.mark.parametrize("name", ["saba"])
def test_equal_iterates_hyper_cleaning(name):
    split = ds.digits_hyper_cleaning(n_train=256, n_val=128)
    bench = pb.hyper_cleaning(split)
    assert bj.compare_iterates(name, bench, "hyper-cleaning", n_iter=6, step_size=0.05,
                               outer_ratio=0.01) < 1e-12


def test_equal_iterates_covtype_quadratic():
    cov = pb.multinomial_l2(ds.synthetic_covtype(n=400, seed=1))
    cov.inner_data = tuple(a[:256] for a in cov.inner_data)
    cov.outer_data = tuple(a[:64] for a in cov.outer_data)
    assert bj.compare_iterates("srba", cov, "covtype", n_iter=6, step_size=0.1,
                               outer_ratio=1.0) < 1e-12
    quad = pb.quadratic_bench(n_inner=128, n_outer=128, d=5, p=3)
    assert bj.compare_iterates("amigo", quad, "quadratic", n_iter=5) < 1e-12
