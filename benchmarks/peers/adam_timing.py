"""Median wall time of one hypergradient through K differentiable Adam steps, bilevel vs peers.

Setting: an MLP d_in → hidden → classes (tanh) trained by K full-batch Adam steps on a random
batch (cross-entropy + (decay/2)‖W‖², ``decay`` a hyperparameter), outer loss the cross-entropy
on a second batch; hyperparameters: ``decay`` and the Adam learning rate. Each measurement is one
call (inner loop + hypergradient); one untimed warm-up per method, then repeats interleaved
across methods. Also checks that all methods return the same hypergradient.

    python benchmarks/peers/adam_timing.py --threads 1
    python benchmarks/peers/adam_timing.py --steps 50 --hidden 256 --repeats 7
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``bilevel`` importable from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import bilevel as bl  # noqa: E402


def make_case(d_in: int, hidden: int, classes: int, n: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    data = [(torch.randn(n, d_in, dtype=dtype, generator=g),
             torch.randint(0, classes, (n,), generator=g)) for _ in range(2)]
    params = {"W1": torch.randn(d_in, hidden, dtype=dtype, generator=g) / d_in ** 0.5,
              "b1": torch.zeros(hidden, dtype=dtype),
              "W2": torch.randn(hidden, classes, dtype=dtype, generator=g) / hidden ** 0.5,
              "b2": torch.zeros(classes, dtype=dtype)}
    return data, params


def logits(p, x):
    return torch.tanh(x @ p["W1"] + p["b1"]) @ p["W2"] + p["b2"]


def train_loss(p, h, batch):
    x, y = batch
    # h["decay"] * (reg / 2), not 0.5 * h["decay"] * reg: in torch 2.13 torch.func.jvp of
    # (0-d float32 tensor) * (Python float) has a float64 tangent, which breaks ForwardMode's
    # matmuls in float32
    reg = (p["W1"] ** 2).sum() + (p["W2"] ** 2).sum()
    return F.cross_entropy(logits(p, x), y) + h["decay"] * (reg / 2)


def val_loss(p, h, batch):
    x, y = batch
    return F.cross_entropy(logits(p, x), y)


def ours(estimator, solver_cls=bl.Adam):
    def call(data, params, h, steps):
        problem = bl.BilevelProblem(train_loss, val_loss)
        res = bl.hypergrad(problem, h, data[0], data[1], solver=solver_cls("lr", steps),
                           estimator=estimator, params0=params)
        return res.grad["decay"], res.grad["lr"]

    return call


def torchopt_call(data, params, h, steps):
    import torchopt

    lr = h["lr"].clone().requires_grad_()
    decay = h["decay"].clone().requires_grad_()
    keys = list(params)
    opt = torchopt.adam(lr=lr, use_accelerated_op=False)
    ps = tuple(params[k].clone().requires_grad_() for k in keys)
    state = opt.init(ps)
    for _ in range(steps):
        loss = train_loss(dict(zip(keys, ps)), {"decay": decay}, data[0])
        grads = torch.autograd.grad(loss, ps, create_graph=True)
        updates, state = opt.update(grads, state, params=ps, inplace=False)
        ps = torchopt.apply_updates(ps, updates, inplace=False)
    return torch.autograd.grad(val_loss(dict(zip(keys, ps)), None, data[1]), (decay, lr))


class _MLP(torch.nn.Module):
    def __init__(self, params):
        super().__init__()
        for k, v in params.items():
            self.register_parameter(k, torch.nn.Parameter(v.clone()))

    def forward(self, x):
        return logits({k: getattr(self, k) for k in ("W1", "b1", "W2", "b2")}, x)


def higher_call(data, params, h, steps):
    import higher

    lr = h["lr"].clone().requires_grad_()
    decay = h["decay"].clone().requires_grad_()
    model = _MLP(params)
    opt = torch.optim.Adam(model.parameters(), lr=float(lr))
    with higher.innerloop_ctx(model, opt, override={"lr": [lr]}) as (fmodel, diffopt):
        for _ in range(steps):
            x, y = data[0]
            reg = (fmodel.W1 ** 2).sum() + (fmodel.W2 ** 2).sum()
            diffopt.step(F.cross_entropy(fmodel(x), y) + decay * (reg / 2))
        x, y = data[1]
        return torch.autograd.grad(F.cross_entropy(fmodel(x), y), (decay, lr))


METHODS = {
    "bilevel Adam Unrolled": ours(bl.Unrolled()),
    "bilevel Adam Checkpointed": ours(bl.Checkpointed()),
    "bilevel Adam ForwardMode": ours(bl.ForwardMode()),
    "bilevel GD Unrolled (ref.)": ours(bl.Unrolled(), bl.GradientDescent),
    "torchopt.adam (functional)": torchopt_call,
    "higher DifferentiableAdam": higher_call,
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--d-in", type=int, default=64)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--float64", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.float64 if args.float64 else torch.float32
    data, params = make_case(args.d_in, args.hidden, args.classes, args.n, dtype)
    h = {"decay": torch.tensor(1e-3, dtype=dtype), "lr": torch.tensor(1e-2, dtype=dtype)}
    print(f"torch {torch.__version__}, python {platform.python_version()}, threads "
          f"{torch.get_num_threads()}; MLP {args.d_in}-{args.hidden}-{args.classes}, n={args.n}, "
          f"K={args.steps} Adam steps, {dtype}")
    methods = {}
    for name, call in METHODS.items():
        try:
            out = call(data, params, h, args.steps)  # warm-up, and the value check
        except ImportError as e:
            print(f"  {name:30s} N/A ({e})")
            continue
        methods[name] = (call, out)
    ref = methods["bilevel Adam Unrolled"][1]
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(args.repeats):
        for name, (call, _) in methods.items():
            t0 = time.perf_counter()
            call(data, params, h, args.steps)
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["bilevel Adam Unrolled"])
    for name, (_, out) in methods.items():
        err = max(float((a - b).abs() / b.abs().clamp_min(1e-30)) for a, b in zip(out, ref))
        if name.startswith("bilevel GD"):
            err_s = "(other solver)"
        else:
            err_s = f"rel. diff {err:.1e}"
        med = statistics.median(times[name])
        print(f"  {name:30s} {1e3 * med:8.1f} ms  (x{med / base:4.2f})  {err_s}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
