"""pytest-benchmark timings of the benchmarked calls at small sizes, for regression tracking.

    pytest benchmarks/ --benchmark-only                      # time them
    pytest benchmarks/ --benchmark-only --benchmark-autosave # keep a baseline in .benchmarks/
    pytest benchmarks/ --benchmark-only --benchmark-compare  # compare with the last baseline

Not part of the normal test suite (pyproject's ``testpaths = ["tests"]``). Memory and accuracy
are the job of ``python -m benchmarks`` (fresh processes); this file only times one
hypergradient per estimator (and per installed peer) on tiny problems.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks import cases as C

pytest.importorskip("pytest_benchmark")

SMALL = {"mlp": dict(width=16, meta_batch=2), "mlp_hpo": dict(width=16, meta_batch=2),
         "conv4": dict(width=8, meta_batch=1), "conv4_maml": dict(width=8, meta_batch=1)}
K = {"mlp": 5, "mlp_hpo": 5, "conv4": 2, "conv4_maml": 1}
ROUNDS = 5  # fixed rounds (pedantic mode): the whole file runs in a few minutes on 2 cores


def _bench(case: str):
    try:
        return C.build(case, K[case], **SMALL[case])
    except C.Skip as e:
        pytest.skip(str(e))


def _finite(grads: dict) -> bool:
    return all(bool(torch.isfinite(g).all()) for g in grads.values())


OURS = [(case, m) for case in C.CASES for m in C.ESTIMATORS]


@pytest.mark.parametrize("case,method", OURS, ids=[f"{c}-{m}" for c, m in OURS])
def test_ours(benchmark, case, method):
    bench = _bench(case)
    try:
        bench.check_method(method)
    except C.Skip as e:
        pytest.skip(str(e))
    est = C.make_estimator(method, K[case], bench.spec)
    grads, _ = benchmark.pedantic(bench.ours, (est,), rounds=ROUNDS, warmup_rounds=1)
    assert _finite(grads)


PEERS = [(case, p) for case in C.CASES for p in C.CASES[case].peers]


@pytest.mark.parametrize("case,peer", PEERS, ids=[f"{c}-{p}" for c, p in PEERS])
def test_peer(benchmark, case, peer):
    peers = pytest.importorskip("benchmarks.peers.maml")
    ok, why = peers.available_peers().get(C.peer_library(peer), (False, "unknown peer"))
    if not ok:
        pytest.skip(why)
    bench = _bench(case)
    grads = benchmark.pedantic(bench.peer, (peer,), rounds=ROUNDS, warmup_rounds=1)
    assert _finite(grads)
