"""Data hyper-cleaning on digits: learn one weight per training example from a clean val set.

Data: scikit-learn's bundled digits, pixels / 16, split 1000 / 300 / 497 into train /
validation / test with a fixed seed; 45 % of the TRAINING labels are replaced by another class
drawn at random (validation and test stay clean). Franceschi et al. 2017's problem:

    inner:  w*(λ) = argmin_w  (1/n) Σ_i σ(λ_i) CE(x_i W + b, ỹ_i) + (ρ/2) ‖W‖²,   ρ = 1e-3
    outer:  F(λ)  = mean CE on the clean validation split

λ ∈ R^1000 (one logit per training example), Adam on λ (lr 0.1, 100 hyper-steps), λ_0 = 0.
Hypergradient: ``bl.Implicit(bl.CG(iters=30))`` at the inner solution, which the
implicit function theorem handles because the weights are read by the inner loss. Variants:

- from scratch: every hyper-step trains w from 0 for 200 full-batch Momentum steps;
- online (``bl.Online``): every hyper-step continues w for 10 steps from where the last one
  stopped (warm-started solver state, and CG warm-started from the last linear solution);
- online + Truncated(10): the same warm-started loop, reverse mode through the 10 steps.

Each is judged by the test accuracy of a model retrained from scratch (2000 steps) with the
learned weights σ(λ), against unweighted training (all weights 1) and the oracle (weight 1 on
the clean examples, 0 on the corrupted), and by the AUC of σ(λ) for telling clean examples
from corrupted ones (``sklearn.metrics.roc_auc_score``).

    python examples/hyper_cleaning.py [--seeds 0 1 2] [--hyper-steps 100]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import bilevel as bl

RHO, CORRUPT = 1e-3, 0.45
SOLVER_SCRATCH = bl.Momentum(lr=1.0, steps=200, momentum=0.9)
SOLVER_ONLINE = bl.Momentum(lr=1.0, steps=10, momentum=0.9)
SOLVER_FINAL = bl.Momentum(lr=1.0, steps=2000, momentum=0.9)


def load(seed: int):
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover
        raise SystemExit("this example needs scikit-learn: pip install -e '.[examples]'") from e
    X, y = load_digits(return_X_y=True)
    X, y = torch.tensor(X, dtype=torch.float64) / 16, torch.tensor(y)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    X, y = X[perm], y[perm]
    train, val, test = (X[:1000], y[:1000]), (X[1000:1300], y[1000:1300]), (X[1300:], y[1300:])
    g = torch.Generator().manual_seed(seed)
    n = len(train[1])
    corrupted = torch.randperm(n, generator=g)[: int(CORRUPT * n)]
    noisy = train[1].clone()
    shift = torch.randint(1, 10, (len(corrupted),), generator=g)  # never the true class
    noisy[corrupted] = (noisy[corrupted] + shift) % 10
    clean = torch.ones(n, dtype=torch.bool)
    clean[corrupted] = False
    return (train[0], noisy), val, test, clean


def logits(w, X):
    return X @ w["W"] + w["b"]


def inner_loss(w, h, batch):
    X, y = batch
    ce = torch.nn.functional.cross_entropy(logits(w, X), y, reduction="none")
    return (torch.sigmoid(h["logit"]) * ce).mean() + 0.5 * RHO * w["W"].pow(2).sum()


def outer_loss(w, h, batch):
    X, y = batch
    return torch.nn.functional.cross_entropy(logits(w, X), y)


PROBLEM = bl.BilevelProblem(inner_loss, outer_loss)


def zeros():
    return {"W": torch.zeros(64, 10, dtype=torch.float64),
            "b": torch.zeros(10, dtype=torch.float64)}


def accuracy(w, data) -> float:
    return float((logits(w, data[0]).argmax(1) == data[1]).double().mean())


def fit_weighted(weights: torch.Tensor, train, test) -> float:
    """Test accuracy of the model trained from scratch with per-example weights ``weights``."""
    h = {"logit": torch.logit(weights.clamp(1e-6, 1 - 1e-6))}
    return accuracy(bl.solve(PROBLEM, h, train, solver=SOLVER_FINAL, params0=zeros()), test)


def tune(variant: str, train, val, hyper_steps: int, hyper_lr: float):
    logit = torch.zeros(len(train[1]), dtype=torch.float64, requires_grad=True)
    hparams = {"logit": logit}
    opt = torch.optim.Adam([logit], lr=hyper_lr)
    # a relative CG residual of ~1e-2 (rho = 1e-3: an ill-conditioned Hessian) still gives a
    # good descent direction for lambda: warn only above 5e-2
    implicit = bl.Implicit(bl.CG(iters=30, warn_rtol=5e-2), stationarity_rtol=None)
    if variant == "from scratch":
        step = lambda: bl.hypergrad(PROBLEM, {"logit": logit.detach()}, train, val,  # noqa: E731
                                    solver=SOLVER_SCRATCH, estimator=implicit,
                                    params0=zeros())
    else:
        est = implicit if variant == "online" else bl.Truncated(SOLVER_ONLINE.steps)
        tuner = bl.Online(PROBLEM, hparams, zeros(), solver=SOLVER_ONLINE, estimator=est)
        step = lambda: tuner.step(train, val)  # noqa: E731
    inner_steps = 0
    t0 = time.perf_counter()
    for _ in range(hyper_steps):
        opt.zero_grad()
        res = step()
        if variant == "from scratch":
            bl.accumulate_grad(hparams, res.grad)
        opt.step()
        inner_steps += SOLVER_SCRATCH.steps if variant == "from scratch" else SOLVER_ONLINE.steps
    seconds = time.perf_counter() - t0
    return torch.sigmoid(logit.detach()), float(res.outer_loss), inner_steps, seconds


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--hyper-steps", type=int, default=100)
    ap.add_argument("--hyper-lr", type=float, default=0.1)
    ap.add_argument("--out", default="examples/results/hyper_cleaning.json")
    args = ap.parse_args(argv)
    from sklearn.metrics import roc_auc_score

    torch.set_num_threads(1)
    rows = []
    for seed in args.seeds:
        train, val, test, clean = load(seed)
        n = len(clean)

        def record(method, weights, seed=seed, train=train, test=test, clean=clean, **extra):
            row = {"seed": seed, "method": method, "test_acc": fit_weighted(weights, train, test),
                   **extra}
            if extra.get("auc") is None and method not in ("unweighted", "oracle"):
                row["auc"] = float(roc_auc_score(clean.numpy(), weights.numpy()))
            rows.append(row)
            print(f"seed {seed}  {method:<24} test acc {row['test_acc']:.4f}  "
                  f"AUC {row.get('auc', float('nan')):.4f}  {row.get('seconds', 0):6.1f}s",
                  flush=True)

        record("unweighted", torch.ones(n, dtype=torch.float64))
        record("oracle", clean.double())
        for variant in ("from scratch", "online", "online + Truncated(10)"):
            w, val_loss, steps, secs = tune(variant, train, val, args.hyper_steps, args.hyper_lr)
            record(variant, w, val_loss=val_loss, inner_steps=steps, seconds=secs,
                   kept_corrupted=float((w[~clean] > 0.5).double().mean()),
                   kept_clean=float((w[clean] > 0.5).double().mean()))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = " ".join(sys.argv[1:] if argv is None else argv)
    meta = {"command": f"python examples/hyper_cleaning.py {cmd}".strip(),
            "device": "shared 2-core CPU, 1 thread", "date": time.strftime("%Y-%m-%d"),
            "torch": torch.__version__, "corruption": CORRUPT, "hyper_steps": args.hyper_steps}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    summary = summarise(rows)
    out.with_suffix(".md").write_text(summary)
    print("\n" + summary)
    return {"meta": meta, "rows": rows}


def summarise(rows) -> str:
    def ms(vals, fmt="{:.4f}"):
        t = torch.tensor(vals, dtype=torch.float64)
        sd = float(t.std()) if len(vals) > 1 else 0.0
        return (fmt + " ± " + fmt).format(float(t.mean()), sd)

    lines = ["| method | test acc | AUC (clean vs corrupted) | corrupted kept (w > 0.5) | "
             "clean kept | inner steps | time (s) |", "|---|---|---|---|---|---|---|"]
    for method in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == method]
        tuned = "auc" in rs[0]
        lines.append(
            f"| {method} | {ms([r['test_acc'] for r in rs])} | "
            f"{ms([r['auc'] for r in rs]) if tuned else '-'} | "
            f"{ms([r['kept_corrupted'] for r in rs], '{:.3f}') if tuned else '-'} | "
            f"{ms([r['kept_clean'] for r in rs], '{:.3f}') if tuned else '-'} | "
            f"{rs[0].get('inner_steps', '-')} | "
            f"{ms([r['seconds'] for r in rs], '{:.1f}') if tuned else '-'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
