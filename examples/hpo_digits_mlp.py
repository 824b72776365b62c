"""Tune the learning rate and the weight decays of an MLP trained by minibatch Adam, online.

Data: scikit-learn's bundled digits (1797 8x8 images, 10 classes, no download), pixels / 16,
split 1000 / 400 / 397 into train / validation / test with a fixed seed.

    inner:  S = 300 steps of Adam(lr = e^{η_lr}), minibatches of 64, on
            mean CE(MLP_w(x), y) + ½ Σ_j e^{η_j} ‖W_(j)‖²        (W_(j): a layer or a column)
    outer:  F(η) = mean CE on the validation split (eval mode)

Two search spaces:
- ``small``: η_lr and one decay per layer (3): 4 hyperparameters;
- ``large``: η_lr, one decay per INPUT PIXEL (the 64 columns of the first layer) and one per
  later layer (2): 67 hyperparameters.

Methods, all judged on the test split and all charged in inner training steps (one step = one
Adam update on one minibatch):
- default: lr 1e-3, no decay, one run (S steps);
- random search and Optuna TPE: N trials of S steps each (selection by validation loss);
- hypergradient (online): N − 1 tuning runs; in each, a fresh MLP is trained for S steps by
  ``bl.Online`` (K = 30 warm-started Adam steps per hyper-step, ``bl.Unrolled`` through them,
  Adam on η with lr 0.05), η carried over from run to run; then one final S-step run with the
  final η (plain torch.optim). N runs in all, like the searches.
The searches are then run again with the wall time the hypergradient took (same wall time).
Baselines use plain ``torch.optim.Adam`` on the same minibatch stream (``bl.Minibatches``).

    python examples/hpo_digits_mlp.py [--seeds 0 1 2] [--budget 16] [--space small large]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

import bilevel as bl

STEPS, BATCH, K = 300, 64, 30
RANGES = {"lr": (math.log(1e-4), math.log(3e-2)), "wd": (math.log(1e-6), math.log(1e-1))}
LAYERS = ["0.weight", "2.weight", "4.weight"]
CE = nn.functional.cross_entropy


def load():
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover
        raise SystemExit("this example needs scikit-learn: pip install -e '.[examples]'") from e
    X, y = load_digits(return_X_y=True)
    X, y = torch.tensor(X, dtype=torch.float32) / 16, torch.tensor(y)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    X, y = X[perm], y[perm]
    return (X[:1000], y[:1000]), (X[1000:1400], y[1000:1400]), (X[1400:], y[1400:])


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(),
                         nn.Linear(64, 10))


def names(space: str) -> dict[str, int]:
    """Hyperparameter name -> size (everything in log space)."""
    return {"lr": 1, "wd": 3} if space == "small" else {"lr": 1, "wd_in": 64, "wd": 2}


def default_hparams(space: str) -> dict[str, torch.Tensor]:
    """The untuned default (lr 1e-3; the decays start at 1e-4 for the hypergradient, whose
    log-space parameters need a finite start: 1e-4 is as good as no decay for this MLP)."""
    return {k: torch.full((n,), math.log(1e-3) if k == "lr" else math.log(1e-4))
            for k, n in names(space).items()}


def penalty(params: dict, h: dict) -> torch.Tensor:
    """½ Σ e^{η} ‖W‖² per layer, or per input-pixel column of the first layer."""
    if "wd_in" in h:  # large space: a decay per column of the first layer, then per layer
        r = (h["wd_in"].exp() * params[LAYERS[0]].pow(2).sum(0)).sum()
        rest = LAYERS[1:]
    else:
        r, rest = params[LAYERS[0]].pow(2).sum() * h["wd"][0].exp(), LAYERS[1:]
        h = {**h, "wd": h["wd"][1:]}
    for i, k in enumerate(rest):
        r = r + h["wd"][i].exp() * params[k].pow(2).sum()
    return 0.5 * r


def accuracy(model: nn.Module, data) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(data[0]).argmax(1) == data[1]).float().mean())


def val_loss(model: nn.Module, data) -> float:
    model.eval()
    with torch.no_grad():
        return float(CE(model(data[0]), data[1]))


def train_plain(h: dict, train, seed: int, no_decay: bool = False) -> nn.Module:
    """S steps of torch.optim.Adam on the regularised loss (the baselines' trainer)."""
    model = mlp(seed)
    opt = torch.optim.Adam(model.parameters(), lr=float(h["lr"].exp()))
    stream = bl.Minibatches(*train, batch_size=BATCH, seed=seed)
    params = dict(model.named_parameters())
    for t in range(STEPS):
        x, y = stream.at(t)
        loss = CE(model(x), y)
        if not no_decay:
            loss = loss + penalty(params, h)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def sample(rng: torch.Generator, space: str) -> dict[str, torch.Tensor]:
    out = {}
    for k, n in names(space).items():
        lo, hi = RANGES["lr" if k == "lr" else "wd"]
        out[k] = lo + (hi - lo) * torch.rand(n, generator=rng)
    return out


def random_search(space, train, val, seed, trials=None, seconds=None):
    rng = torch.Generator().manual_seed(1000 + seed)
    best, t0, n = None, time.perf_counter(), 0
    while (trials is None or n < trials) and (seconds is None or time.perf_counter() - t0
                                              < seconds):
        h = sample(rng, space)
        model = train_plain(h, train, seed)
        score = val_loss(model, val)
        if best is None or score < best[0]:
            best = (score, model)
        n += 1
    return best[1], n, time.perf_counter() - t0


def tpe(space, train, val, seed, trials=None, seconds=None):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    models = {}

    def objective(trial):
        h = {}
        for k, n in names(space).items():
            lo, hi = RANGES["lr" if k == "lr" else "wd"]
            h[k] = torch.tensor([trial.suggest_float(f"{k}{i}", lo, hi) for i in range(n)])
        model = train_plain(h, train, seed)
        models[trial.number] = model
        return val_loss(model, val)

    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed))
    t0 = time.perf_counter()
    study.optimize(objective, n_trials=trials, timeout=seconds)
    return models[study.best_trial.number], len(study.trials), time.perf_counter() - t0


def hypergradient(space, train, val, seed, runs, K=K, hyper_lr=0.05):
    """``runs − 1`` online tuning runs of S steps (η carried over), then one final run."""
    t0 = time.perf_counter()
    h = {k: v.clone().requires_grad_() for k, v in default_hparams(space).items()}
    hopt = torch.optim.Adam(h.values(), lr=hyper_lr)
    solver = bl.Adam(lr=lambda hp: hp["lr"][0].exp(), steps=K)
    trace = []
    for run in range(runs - 1):
        mp = bl.module_problem(mlp(seed + 100 * (run + 1)), lambda out, y, hp: CE(out, y),
                               lambda out, y, hp: CE(out, y), regularizer=penalty)
        tuner = bl.Online(mp, h, solver=solver, estimator=bl.Unrolled())
        stream = bl.Minibatches(*train, batch_size=BATCH, seed=seed + 100 * (run + 1))
        for _ in range(STEPS // K):
            hopt.zero_grad()
            res = tuner.step(stream, val)
            hopt.step()
        trace.append({"run": run, "val_loss": float(res.outer_loss),
                      "lr": float(h["lr"].detach().exp()),
                      "wd_median": float(torch.cat([h[k].detach() for k in h if k != "lr"]).exp()
                                         .median())})
    model = train_plain({k: v.detach() for k, v in h.items()}, train, seed)
    return model, runs, time.perf_counter() - t0, trace, {k: v.detach().tolist()
                                                         for k, v in h.items()}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--budget", type=int, default=16, help="training runs of S steps each")
    ap.add_argument("--space", nargs="+", default=["small", "large"])
    ap.add_argument("--out", default="examples/results/hpo_digits_mlp.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    train, val, test = load()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = " ".join(sys.argv[1:] if argv is None else argv)
    meta = {"command": f"python examples/hpo_digits_mlp.py {cmd}".strip(),
            "device": "shared 2-core CPU, 1 thread", "date": time.strftime("%Y-%m-%d"),
            "torch": torch.__version__, "steps_per_run": STEPS, "batch_size": BATCH,
            "online_K": K, "budget_runs": args.budget}
    rows = []
    for seed in args.seeds:  # seed-major: a cut-short run still has every space
        for space in args.space:
            def record(method, model, runs, seconds, space=space, seed=seed, **extra):
                rows.append({"space": space, "n_hparams": sum(names(space).values()),
                             "seed": seed, "method": method, "test_acc": accuracy(model, test),
                             "val_loss": val_loss(model, val), "inner_steps": runs * STEPS,
                             "seconds": seconds, **extra})
                r = rows[-1]
                out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))  # so far
                print(f"{space:<6}{seed:>3}  {method:<26}test acc {r['test_acc']:.4f}  val loss "
                      f"{r['val_loss']:.4f}  steps {r['inner_steps']:>6}  {seconds:6.1f}s",
                      flush=True)

            t0 = time.perf_counter()
            record("default", train_plain(default_hparams(space), train, seed, no_decay=True),
                   1, time.perf_counter() - t0)
            model, runs, secs, trace, h = hypergradient(space, train, val, seed, args.budget)
            record("hypergradient (online)", model, runs, secs, trace=trace, hparams=h)
            model, runs, s = random_search(space, train, val, seed, trials=args.budget)
            record("random search, same steps", model, runs, s)
            model, runs, s = tpe(space, train, val, seed, trials=args.budget)
            record("TPE, same steps", model, runs, s)
            model, runs, s = random_search(space, train, val, seed, seconds=secs)
            record("random search, same time", model, runs, s)
            model, runs, s = tpe(space, train, val, seed, seconds=secs)
            record("TPE, same time", model, runs, s)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    summary = summarise(rows)
    out.with_suffix(".md").write_text(summary)
    print("\n" + summary)
    return {"meta": meta, "rows": rows}


def summarise(rows) -> str:
    lines = ["| space (# hparams) | method | test acc (mean ± sd over seeds) | inner steps | "
             "time (s) |", "|---|---|---|---|---|"]
    keys = []
    for r in rows:
        if (r["space"], r["method"]) not in keys:
            keys.append((r["space"], r["method"]))
    for space, method in keys:
        rs = [r for r in rows if r["space"] == space and r["method"] == method]
        acc = torch.tensor([r["test_acc"] for r in rs])
        sd = float(acc.std()) if len(rs) > 1 else 0.0
        lines.append(f"| {space} ({rs[0]['n_hparams']}) | {method} | {float(acc.mean()):.4f} ± "
                     f"{sd:.4f} | {sum(r['inner_steps'] for r in rs) // len(rs)} | "
                     f"{sum(r['seconds'] for r in rs) / len(rs):.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
