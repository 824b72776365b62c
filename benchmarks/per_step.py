"""Cost of per-step minibatches and of the solver-only-hyperparameter check, side by side.

    python -m benchmarks.per_step [--steps 50] [--repeats 5]

An MLP 64-32-10 (float32, synthetic data of digits' shape: 1,000 x 64, 10 classes) trained by
K momentum steps; hyperparameters: per-layer log weight decays. For each estimator, the median
time of one hypergradient with ONE fixed batch of 64 vs a ``bl.Minibatches`` stream of batch
64 (same arithmetic, plus the indexing), run alternately; and for Implicit the first call
(which runs the structural check) vs later calls (cached).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import bilevel as bl


def problem():
    def forward(w, x):
        return torch.tanh(x @ w["W1"] + w["b1"]) @ w["W2"] + w["b2"]

    def inner(w, h, b):
        x, y = b
        ce = torch.nn.functional.cross_entropy(forward(w, x), y)
        return ce + 0.5 * (torch.exp(h["d1"]) * (w["W1"] ** 2).sum()
                           + torch.exp(h["d2"]) * (w["W2"] ** 2).sum())

    def outer(w, h, b):
        x, y = b
        return torch.nn.functional.cross_entropy(forward(w, x), y)

    return bl.BilevelProblem(inner, outer)


def timed(fn, repeats: int) -> float:
    return timed_pair(fn, fn, repeats)[0]


def timed_pair(a, b, repeats: int) -> tuple[float, float]:
    """Median times of ``a`` and ``b``, run alternately (a shared machine's load hits both)."""
    a(), b()  # warm-up
    ta, tb = [], []
    for _ in range(repeats):
        for fn, out in ((a, ta), (b, tb)):
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
    return statistics.median(ta), statistics.median(tb)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(1000, 64, generator=g), torch.randint(0, 10, (1000,), generator=g)
    val = (X[:200], y[:200])
    w0 = {"W1": 0.1 * torch.randn(64, 32, generator=g), "b1": torch.zeros(32),
          "W2": 0.1 * torch.randn(32, 10, generator=g), "b2": torch.zeros(10)}
    h = {"d1": torch.tensor(-4.0), "d2": torch.tensor(-4.0)}
    prob, K = problem(), args.steps
    solver = bl.Momentum(lr=0.1, steps=K, momentum=0.9)
    stream = bl.Minibatches(X, y, batch_size=64, seed=0)
    fixed = stream.at(0)
    print(f"torch {torch.__version__}, 1 thread, K={K}, median of {args.repeats}")
    for est in (bl.Unrolled(), bl.Checkpointed(), bl.Truncated(10), bl.ForwardMode()):
        t_fixed, t_stream = timed_pair(
            lambda est=est: bl.hypergrad(prob, h, fixed, val, solver=solver, estimator=est,
                                         params0=w0),
            lambda est=est: bl.hypergrad(prob, h, stream, val, solver=solver, estimator=est,
                                         params0=w0), args.repeats)
        print(f"{type(est).__name__:13s} fixed {1e3 * t_fixed:8.1f} ms  stream "
              f"{1e3 * t_stream:8.1f} ms  ratio {t_stream / t_fixed:.3f}")
    first = []
    for _ in range(args.repeats):
        est = bl.Implicit(bl.CG(10, damping=1.0), stationarity_rtol=None)
        t = time.perf_counter()
        bl.hypergrad(prob, h, stream, val, solver=solver, estimator=est, params0=w0)
        first.append(time.perf_counter() - t)
    est = bl.Implicit(bl.CG(10, damping=1.0), stationarity_rtol=None)
    later = timed(lambda: bl.hypergrad(prob, h, stream, val, solver=solver, estimator=est,
                                       params0=w0), args.repeats)
    t1 = statistics.median(first)
    print(f"Implicit-CG10+damping  first call (check) {1e3 * t1:8.1f} ms  later "
          f"{1e3 * later:8.1f} ms  ratio {t1 / later:.3f}")


if __name__ == "__main__":
    main()
