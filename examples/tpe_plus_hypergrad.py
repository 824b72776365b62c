"""TPE alone vs TPE + online hypergradient refinement (``bl.hpo.refine``), on digits.

Same data, MLP, training run (300 Adam steps of batch 64) and validation loss as
``examples/hpo_digits_mlp.py``. The question: how many full training runs does each method
need before its best validation loss reaches a target?

- **TPE alone**: Optuna's TPE samples the learning rate and one L2 decay per layer (4
  hyperparameters, log space); each trial trains with plain ``torch.optim.Adam`` and reports
  the validation loss every 30 steps (``MedianPruner`` may stop it).
- **TPE + refine**: TPE samples the learning rate and ONE start value for the decays (2
  hyperparameters); inside the trial ``bl.hpo.refine`` trains the model with ``bl.Online``
  (K = 30 Adam steps per hyper-step, ``bl.Unrolled``, Adam(0.05) on the decays) and refines 66
  decays (one per input pixel, one per later layer) during that same training run, reporting
  the validation loss of the current weights after every hyper-step (same ``MedianPruner``).

Cost is counted in training runs: a pruned trial counts as the fraction of its 300 steps it
ran. Wall time is recorded too: one refined run costs several plain runs (the backward through
K Adam steps).

    python examples/tpe_plus_hypergrad.py [--seeds 0 1 2] [--trials 20]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

import bilevel as bl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hpo_digits_mlp import BATCH, CE, RANGES, STEPS, load, mlp, penalty, val_loss  # noqa: E402

K, REPORT = 30, 30  # online steps per hyper-step; plain runs report every 30 steps too
TARGETS = [0.12, 0.11, 0.10, 0.095, 0.09, 0.085, 0.08, 0.075]


def pruner():
    import optuna

    return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=3)


def tpe_alone(trial, train, val, seed):
    """4 hparams by TPE; plain torch.optim.Adam training, reports every REPORT steps."""
    import optuna

    lo, hi = RANGES["wd"]
    h = {"lr": torch.tensor([trial.suggest_float("lr", *RANGES["lr"])]),
         "wd": torch.tensor([trial.suggest_float(f"wd{i}", lo, hi) for i in range(3)])}
    model = mlp(seed + 100 * (trial.number + 1))
    opt = torch.optim.Adam(model.parameters(), lr=float(h["lr"].exp()))
    stream = bl.Minibatches(*train, batch_size=BATCH, seed=seed + 100 * (trial.number + 1))
    params = dict(model.named_parameters())
    for t in range(STEPS):
        model.train()
        x, y = stream.at(t)
        loss = CE(model(x), y) + penalty(params, h)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (t + 1) % REPORT == 0:
            v = val_loss(model, val)
            trial.set_user_attr("steps", t + 1)
            if not math.isfinite(v):
                raise optuna.TrialPruned(f"diverged at step {t + 1}")
            trial.report(v, (t + 1) // REPORT)
            if trial.should_prune():
                raise optuna.TrialPruned()
    return v


def tpe_refine(trial, train, val, seed):
    """2 hparams by TPE (lr, decay start); 66 decays refined online within the run."""
    lr = math.exp(trial.suggest_float("lr", *RANGES["lr"]))
    wd0 = trial.suggest_float("wd0", *RANGES["wd"])
    h = {"wd_in": torch.full((64,), wd0, requires_grad=True),
         "wd": torch.full((2,), wd0, requires_grad=True)}
    model = mlp(seed + 100 * (trial.number + 1))
    mp = bl.module_problem(model, lambda out, y, hp: CE(out, y), lambda out, y, hp: CE(out, y),
                           regularizer=penalty)
    tuner = bl.Online(mp, h, solver=bl.Adam(lr=lr, steps=K), estimator=bl.Unrolled())
    stream = bl.Minibatches(*train, batch_size=BATCH, seed=seed + 100 * (trial.number + 1))

    def validate(tn):
        trial.set_user_attr("steps", tn.inner_steps)
        return val_loss(tn.write_back(model), val)

    out = bl.hpo.refine(trial, tuner, STEPS // K, inner=stream, outer=val,
                        hopt=torch.optim.Adam(h.values(), lr=0.05), validate=validate,
                        on_nonfinite="prune")
    return out.value


def run(method, train, val, seed, trials):
    import optuna

    fn = tpe_alone if method == "TPE alone" else tpe_refine
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed), pruner=pruner())
    log = []

    def objective(trial):
        t0 = time.perf_counter()
        try:
            return fn(trial, train, val, seed)
        finally:
            log.append({"number": trial.number, "seconds": time.perf_counter() - t0,
                        "steps": trial.user_attrs.get("steps", 0)})

    study.optimize(objective, n_trials=trials)
    rows, best, cost, secs = [], math.inf, 0.0, 0.0
    for t, lg in zip(study.trials, log, strict=True):
        done = t.state == optuna.trial.TrialState.COMPLETE
        cost += lg["steps"] / STEPS
        secs += lg["seconds"]
        if done:
            best = min(best, t.value)
        rows.append({"trial": t.number, "state": t.state.name, "value": t.value,
                     "trainings": cost, "seconds": secs, "best": best, "params": t.params})
    return rows


def to_target(rows, target):
    """(training runs, seconds) spent when the best completed value first reaches target."""
    for r in rows:
        if r["best"] <= target:
            return r["trainings"], r["seconds"]
    return None, None


def summarise(results, seeds, trials) -> str:
    lines = [f"Training runs (and seconds) until the best validation loss reaches the target; "
             f"median over {len(seeds)} seeds (seeds that never reach it in {trials} trials: "
             f"'n/r', counted as worse than any that do).", "",
             "| target val loss | TPE alone: runs | TPE alone: s | TPE + refine: runs | "
             "TPE + refine: s | reached (alone / refine) |", "|---|---|---|---|---|---|"]

    def med(xs):
        xs = sorted(math.inf if x is None else x for x in xs)
        m = xs[(len(xs) - 1) // 2] if len(xs) % 2 else 0.5 * (xs[len(xs) // 2 - 1]
                                                                + xs[len(xs) // 2])
        return "n/r" if math.isinf(m) else f"{m:.4f}" if m < 1 else f"{m:.2f}" if m < 100 \
            else f"{m:.0f}"

    for tgt in TARGETS:
        cells, reached = [], []
        for method in ("TPE alone", "TPE + refine"):
            hits = [to_target(results[method][s], tgt) for s in seeds]
            cells += [med([h[0] for h in hits]), med([h[1] for h in hits])]
            reached.append(sum(h[0] is not None for h in hits))
        lines.append(f"| {tgt} | {cells[0]} | {cells[1]} | {cells[2]} | {cells[3]} | "
                     f"{reached[0]}/{len(seeds)} / {reached[1]}/{len(seeds)} |")
    lines += ["", "| method | median best val loss | best val loss (per seed) | trainings used "
              "| pruned trials | seconds |", "|---|---|---|---|---|---|"]
    for method in ("TPE alone", "TPE + refine"):
        rs = [results[method][s] for s in seeds]
        best = ", ".join(f"{r[-1]['best']:.4f}" for r in rs)
        used = ", ".join(f"{r[-1]['trainings']:.1f}" for r in rs)
        pruned = ", ".join(str(sum(x["state"] == "PRUNED" for x in r)) for r in rs)
        secs = ", ".join(f"{r[-1]['seconds']:.0f}" for r in rs)
        lines.append(f"| {method} | {med([r[-1]['best'] for r in rs])[:6]} | {best} | {used} | "
                     f"{pruned} | {secs} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--out", default="examples/results/tpe_plus_hypergrad.json")
    ap.add_argument("--merge", nargs="+", metavar="JSON",
                    help="only summarise these result files together (into --out's .md)")
    args = ap.parse_args(argv)
    if args.merge:
        return merge(args.merge, Path(args.out).with_suffix(".md"))
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    torch.set_num_threads(1)
    train, val, _ = load()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = " ".join(sys.argv[1:] if argv is None else argv)
    meta = {"command": f"python examples/tpe_plus_hypergrad.py {cmd}".strip(),
            "device": "shared 2-core CPU, 1 thread", "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                         time.gmtime()),
            "torch": torch.__version__, "optuna": optuna.__version__, "steps_per_run": STEPS,
            "batch_size": BATCH, "online_K": K, "trials": args.trials, "targets": TARGETS}
    results: dict = {"TPE alone": {}, "TPE + refine": {}}
    done = []
    for seed in args.seeds:
        for method in results:
            results[method][seed] = run(method, train, val, seed, args.trials)
            r = results[method][seed][-1]
            print(f"seed {seed} {method:<13} best {r['best']:.4f}  trainings {r['trainings']:.1f}"
                  f"  {r['seconds']:.0f}s", flush=True)
        done.append(seed)
        out.write_text(json.dumps({"meta": meta, "seeds_done": done, "results": results},
                                  indent=1))
    summary = summarise(results, done, args.trials)
    out.with_suffix(".md").write_text(f"`{meta['command']}` ({meta['device']}, {meta['date']})"
                                      f"\n\n" + summary)
    print("\n" + summary)
    return {"meta": meta, "results": results}


def merge(files, md: Path) -> dict:
    """One summary over the seeds of several result files (same trials, same settings)."""
    results: dict = {"TPE alone": {}, "TPE + refine": {}}
    heads, trials = [], set()
    for f in files:
        d = json.loads(Path(f).read_text())
        heads.append(f"`{d['meta']['command']}` ({d['meta']['date']})")
        trials.add(d["meta"]["trials"])
        for method in results:
            results[method].update(d["results"][method])
    seeds = sorted(results["TPE alone"], key=int)
    summary = summarise(results, seeds, max(trials))
    md.write_text("Merged: " + "; ".join(heads) + ", shared 2-core CPU, 1 thread\n\n" + summary)
    print(summary)
    return {"results": results}


if __name__ == "__main__":
    main()
