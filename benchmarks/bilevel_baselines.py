"""Baselines of benchopt's benchmark_bilevel against their PyTorch counterparts, in one run.

    python -m benchmarks.bilevel_baselines                  # ~5 min of CPU
    python -m benchmarks.bilevel_baselines --seeds 2 --max-time 5 --problems ijcnn1

1. **Optuna TPE**, the benchmark's black-box baseline: its ``solvers/optuna.py`` run from the
   checkout (``$BENCHMARK_BILEVEL``; TPE over every outer coordinate in [−5, 5], x0 enqueued
   first, the value function by full-batch jaxopt L-BFGS, 5 trials between evaluations), and
   ours: the same study (same sampler, seed, search space, enqueued x0, 5 trials per
   evaluation) where each trial solves the inner problem in torch (``torch.optim.LBFGS``,
   strong Wolfe, full batch, from z0) and returns the outer loss. Metric: the suite's
   (h(x) − h* for ijcnn1/quadratic, test error otherwise) at the best trial so far.
2. **jaxopt's implicit differentiation** against ``bl.Implicit``:
   (a) equality, float64, ijcnn1-sized data, one hypergradient at x0: jaxopt
   ``GradientDescent(implicit_diff=True)`` with a converged inner solve, ``bl.hypergrad`` with
   ``bl.Implicit(bl.CG)`` on the same inner iterations, and the closed form
   ``bilevel.stochastic.problems.logreg_value_and_grad`` (Newton + a dense solve);
   (b) time per hypergradient, same data, same K inner GD steps (fixed step 1/L), same N CG
   iterations (tolerance 0), plus the checkout's own ``jaxopt_gd`` hypergradient (its defaults);
   (c) curves: the checkout's ``solvers/jaxopt_gd.py`` (gd inner solver, 100 steps, outer step
   10) and ours (outer GD with step 10 on ``bl.hypergrad(..., bl.GradientDescent(1/L, 100),
   bl.Implicit(bl.CG(100, tol=1e-5)))``, inner warm-started as the benchmark does).

The compared methods alternate within one run (seed by seed, in alternating order; the timing
repeats rotate the order) so that they see the same load on the shared CPU. Evaluation is
excluded from the clock. Writes ``results.json``, ``table.md`` and ``baselines.png`` to
``--out`` (default benchmarks/results/bilevel_baselines).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from . import bilevel_jax as bj

METRIC_LABEL = {"subopt": "h(x) − h*", "test_error": "test error"}
OPTUNA_IMPLS = ("benchmark (jax)", "ours (torch)")
GD_IMPLS = ("jaxopt_gd (jax)", "ours (torch)")


# ------------------------------------------------------------------------------------------
# pure helpers (tested without jax / optuna)
# ------------------------------------------------------------------------------------------
def trial_vector(params: dict, n: int) -> np.ndarray:
    """The outer variable of a trial: ``params['outer_var_k']`` for k < n, in order."""
    return np.array([params[f"outer_var_{k}"] for k in range(n)], dtype=float)


def rel_diff(a, b) -> float:
    """‖a − b‖ / ‖b‖ (2-norms, float64)."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def schedule(methods, seeds) -> list[tuple[int, str]]:
    """(seed, method) pairs, methods alternating seed by seed and in alternating order
    (A B, B A, A B, ...), so that neither always runs first on a shared machine."""
    out = []
    for i, s in enumerate(seeds):
        order = list(methods) if i % 2 == 0 else list(methods)[::-1]
        out += [(s, m) for m in order]
    return out


def rotations(methods, repeats: int) -> list[str]:
    """The timing order: repeat r runs the methods rotated by r."""
    m = list(methods)
    return [m[(r + j) % len(m)] for r in range(repeats) for j in range(len(m))]


def step_curve(records, grid) -> np.ndarray:
    """Last metric seen at each time of ``grid`` (records are (count, seconds, metric));
    nan before the first record."""
    ts = np.array([r[1] for r in records], float)
    ys = np.array([r[2] for r in records], float)
    idx = np.searchsorted(ts, grid, side="right") - 1
    return np.where(idx >= 0, ys[np.clip(idx, 0, None)], np.nan)


def median_band(runs, grid):
    """Median and 20-80 % band over runs (lists of records) on a time grid."""
    curves = np.array([step_curve(r, grid) for r in runs])
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return (np.nanmedian(curves, 0), np.nanquantile(curves, 0.2, 0),
                np.nanquantile(curves, 0.8, 0))


def final_at(runs, t: float) -> float:
    """Median over runs of the metric reached by solver time t."""
    vals = [float(step_curve(r, np.array([t]))[0]) for r in runs]
    vals = [v for v in vals if math.isfinite(v)]
    return float(np.median(vals)) if vals else float("nan")


def _fmt(v, spec=".4g") -> str:
    return "—" if v is None or not math.isfinite(v) else format(v, spec)


def write_table(res: dict, path: Path) -> str:
    meta = res["meta"]
    lines = [f"# benchmark_bilevel baselines against bilevel (PyTorch) ({meta['date']})", "",
             f"Device: {meta['device']}; torch {meta['torch']}, jax {meta['jax']}, jaxopt "
             f"{meta['jaxopt']}, optuna {meta['optuna']}; benchmark_bilevel "
             f"{meta['benchmark_commit']}.", "",
             f"Command: `{meta['command']}`", "", meta["load_note"], ""]
    if res.get("optuna"):
        lines += ["## Optuna TPE (the benchmark's black-box baseline)", "",
                  f"{meta['seeds']} seeds, {meta['max_time']} s of solver time each; metric at "
                  f"the best trial so far (by outer loss); median over seeds.", "",
                  "| problem | data | metric | impl | trials (median) | s / trial | metric at "
                  "t/4 | metric at t |", "|---|---|---|---|---|---|---|---|"]
        for prob, d in res["optuna"].items():
            T = meta["max_time"]
            for impl in OPTUNA_IMPLS:
                runs = d["runs"].get(impl, [])
                if not runs:
                    continue
                recs = [r["records"] for r in runs]
                trials = float(np.median([r["records"][-1][0] for r in runs]))
                spt = float(np.median([r["records"][-1][1] / max(r["records"][-1][0], 1)
                                       for r in runs]))
                lines.append(f"| {prob} | {d['data']} | {METRIC_LABEL[d['metric']]} | {impl} | "
                             f"{trials:.0f} | {spt:.3g} | {_fmt(final_at(recs, T / 4))} | "
                             f"{_fmt(final_at(recs, T))} |")
        lines.append("")
    if res.get("equality"):
        e = res["equality"]
        lines += ["## Hypergradient equality (float64, one hypergradient at x0)", "",
                  f"{e['data']}; inner: {e['inner']}; linear system: {e['linsolve']}. "
                  f"‖∇_z g(z_K)‖: jax {e['grad_norm_jax']:.2e}, torch "
                  f"{e['grad_norm_torch']:.2e}.", "",
                  "| pair | ‖a − b‖ / ‖b‖ |", "|---|---|"]
        for k, v in e["rel"].items():
            lines.append(f"| {k} | {v:.2e} |")
        lines.append("")
    if res.get("timing"):
        t = res["timing"]
        lines += ["## Time per hypergradient", "",
                  f"{t['data']}, {t['dtype']}; {t['note']}; median of {t['repeats']} repeats "
                  f"(interleaved).", "", "| method | ms / hypergradient (median) | 20-80 % |",
                  "|---|---|---|"]
        for k, v in t["ms"].items():
            lines.append(f"| {k} | {v['median']:.2f} | {v['q20']:.2f}-{v['q80']:.2f} |")
        if "ratio" in t:
            lines += ["", f"Time of jaxopt ÷ time of ours (same K and N): **{t['ratio']:.2f}×** "
                      f"(ours ÷ jaxopt {1 / t['ratio']:.2f}×)."]
        lines.append("")
    if res.get("gd"):
        lines += ["## Full-batch gradient descent on x with implicit hypergradients", "",
                  "| problem | metric | impl | outer steps (median) | ms / step | metric at "
                  "t/4 | metric at t |", "|---|---|---|---|---|---|---|"]
        for prob, d in res["gd"].items():
            T = d["max_time"]
            for impl in GD_IMPLS:
                runs = d["runs"].get(impl, [])
                if not runs:
                    continue
                recs = [r["records"] for r in runs]
                its = float(np.median([r["records"][-1][0] for r in runs]))
                ms = float(np.median([1e3 * r["records"][-1][1] / max(r["records"][-1][0], 1)
                                      for r in runs]))
                lines.append(f"| {prob} | {METRIC_LABEL[d['metric']]} | {impl} | {its:.0f} | "
                             f"{ms:.3g} | {_fmt(final_at(recs, T / 4))} | "
                             f"{_fmt(final_at(recs, T))} |")
        lines.append("")
    text = "\n".join(lines)
    path.write_text(text)
    return text


def plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("optuna", p, d) for p, d in res.get("optuna", {}).items()]
    panels += [("gd", p, d) for p, d in res.get("gd", {}).items()]
    n = len(panels) + (1 if res.get("timing") else 0)
    if n == 0:
        return
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.8 * rows), squeeze=False)
    axes = axes.ravel()
    for ax, (kind, prob, d) in zip(axes, panels):
        tmax = max(r["records"][-1][1] for rr in d["runs"].values() for r in rr)
        grid = np.geomspace(1e-2, max(tmax, 2e-2), 200)
        for impl, runs in d["runs"].items():
            med, lo, hi = median_band([r["records"] for r in runs], grid)
            line, = ax.plot(grid, med, label=impl)
            ax.fill_between(grid, lo, hi, color=line.get_color(), alpha=0.15)
        ax.set_xscale("log")
        if d["metric"] == "subopt":
            ax.set_yscale("log")
        ax.set_xlabel("wall-clock time (s)")
        ax.set_ylabel(METRIC_LABEL[d["metric"]])
        ax.set_title(f"{'Optuna TPE' if kind == 'optuna' else 'GD + implicit'}: {prob}",
                     fontsize=10)
        ax.legend(fontsize=8)
    if res.get("timing"):
        ax = axes[len(panels)]
        t = res["timing"]["ms"]
        names = list(t)
        ax.barh(names, [t[k]["median"] for k in names],
                xerr=[[t[k]["median"] - t[k]["q20"] for k in names],
                      [t[k]["q80"] - t[k]["median"] for k in names]])
        ax.set_xlabel("ms per hypergradient (median, 20-80 %)")
        ax.set_title("time per hypergradient (ijcnn1-sized, float64)", fontsize=10)
        ax.tick_params(axis="y", labelsize=7)
    for ax in axes[n:]:
        ax.axis("off")
    fig.suptitle(f"benchmark_bilevel baselines vs bilevel — {res['meta']['device']}, "
                 f"{res['meta']['date']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------
# problems and oracles
# ------------------------------------------------------------------------------------------
def _oracles(bench):
    kw = {"n_classes": bench.z0.shape[1]} if bench.z0.dim() == 2 else {}
    if bench.name == "quadratic":
        kw["mu"] = bench.extra["mu"]
    return bj.jax_oracles(bench.name, bench.inner_data, bench.outer_data, **kw)


def lipschitz(bench) -> float:
    """An upper bound on the inner Hessian's norm at x (x-independent part + the largest
    regularisation, evaluated by the caller), per problem kind: returns the data part."""
    X = bench.inner_data[0].double()
    lam = float(torch.linalg.eigvalsh(X.T @ X / X.shape[0]).max())
    if bench.name == "ijcnn1":
        return lam / 4           # + max e^x
    if bench.name == "hyper-cleaning":
        return lam / 2 + 0.4     # σ ≤ 1, softmax Hessian ≤ ½, + 2·0.2
    if bench.name == "covtype":
        return lam / 2           # + max e^x
    if bench.name == "quadratic":
        return lam + bench.extra["mu"]
    raise ValueError(bench.name)


def inner_lr(bench, L_data: float, x: torch.Tensor) -> float:
    if bench.name in ("ijcnn1", "covtype"):
        return 1.0 / (L_data + float(torch.exp(x).max()))
    return 1.0 / L_data


def checkout_commit() -> str:
    """The benchmark checkout's git commit (short), else its directory name."""
    import subprocess
    repo = bj.benchmark_repo()
    try:
        return subprocess.check_output(["git", "-C", str(repo), "rev-parse", "--short=10",
                                        "HEAD"], text=True, stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return bj.repo_commit()


def _metric(bench, z, x) -> float:
    from .bilevel_suite import metric_of
    return metric_of(bench, z, x)


# ------------------------------------------------------------------------------------------
# 1. Optuna TPE
# ------------------------------------------------------------------------------------------
def run_bench_optuna(bench, seed: int, max_time: float):
    """The checkout's solvers/optuna.py; records (trials, solver seconds, metric)."""
    f_in, f_out, n_in, n_out = _oracles(bench)
    solver = bj.make_solver("optuna", f_in, f_out, n_in, n_out, bench.z0.reshape(-1).numpy(),
                            bench.x0.numpy(), random_state=seed)
    recs = [(0, 0.0, _metric(bench, bench.z0, bench.x0))]
    st = {"t": 0.0, "n": 0, "t0": None}

    def cb():
        now = time.perf_counter()
        if st["t0"] is not None:
            st["t"] += now - st["t0"]
            st["n"] += 5
            recs.append((st["n"], st["t"], _metric(bench, solver.inner_var, solver.outer_var)))
        go = st["t"] < max_time
        st["t0"] = time.perf_counter()
        return go

    solver.run(cb)
    return recs


def run_torch_optuna(bench, seed: int, max_time: float, max_iter: int = 500,
                     tol: float = 1e-3):
    """Ours: the same TPE study; each trial solves the inner problem with torch.optim.LBFGS
    (full batch, from z0, strong Wolfe, ≤ max_iter iterations, stop at ‖∇g‖_∞ ≤ tol) and
    returns f(z*, x) on the full outer set."""
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    g, f = bench.problem.inner_loss, bench.problem.outer_loss
    n = bench.x0.numel()
    dt = bench.x0.dtype
    zs = {}

    def objective(trial):
        x = torch.tensor([trial.suggest_float(f"outer_var_{k}", -5, 5) for k in range(n)],
                         dtype=dt).reshape(bench.x0.shape)
        z = bench.z0.clone().requires_grad_(True)
        opt = torch.optim.LBFGS([z], lr=1, max_iter=max_iter, tolerance_grad=tol,
                                tolerance_change=1e-9, history_size=10,
                                line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = g(z, x, bench.inner_data)
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            val = float(f(z, x, bench.outer_data))
        zs[trial.number] = z.detach()
        return val if math.isfinite(val) else float("inf")

    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed))
    study.enqueue_trial({f"outer_var_{k}": float(v)
                         for k, v in enumerate(bench.x0.reshape(-1).tolist())})
    recs = [(0, 0.0, _metric(bench, bench.z0, bench.x0))]
    t, n_trials = 0.0, 0
    while t < max_time:
        t0 = time.perf_counter()
        study.optimize(objective, n_trials=5)
        t += time.perf_counter() - t0
        n_trials += 5
        best = study.best_trial
        x = torch.tensor(trial_vector(best.params, n), dtype=dt).reshape(bench.x0.shape)
        recs.append((n_trials, t, _metric(bench, zs[best.number], x)))
    return recs


# ------------------------------------------------------------------------------------------
# 2. implicit differentiation: jaxopt against bl.Implicit
# ------------------------------------------------------------------------------------------
def _jaxopt_hypergrad_fn(f_in, f_out, n_in, n_out, lr, K, N, tol=0.0):
    """jax.jit(value_and_grad) of x ↦ f(z_K(x), x), z_K by jaxopt GradientDescent (fixed
    step, K steps, implicit_diff=True, the linear system by N CG iterations)."""
    from functools import partial

    import jax
    import jaxopt
    from jaxopt import linear_solve

    fi = partial(f_in, start=0, batch_size=n_in)
    fo = partial(f_out, start=0, batch_size=n_out)
    solver = jaxopt.GradientDescent(fun=fi, stepsize=lr, maxiter=K, tol=0.0, acceleration=False,
                                    implicit_diff=True,
                                    implicit_diff_solve=partial(linear_solve.solve_cg,
                                                                maxiter=N, tol=tol))

    def value_fun(z0, x):
        z = solver.run(z0, x).params
        return fo(z, x), z

    return jax.jit(jax.value_and_grad(value_fun, argnums=1, has_aux=True)), fi


def _torch_hypergrad(bench, x, z0, lr, K, N, tol=0.0):
    import bilevel as bl
    return bl.hypergrad(bench.problem, x, bench.inner_data, bench.outer_data,
                        solver=bl.GradientDescent(lr, K), params0=z0, check=False,
                        estimator=bl.Implicit(bl.CG(iters=N, tol=tol), stationarity_rtol=None))


def equality(bench64, K: int = 3000, N: int = 100) -> dict:
    """One hypergradient at x0 in float64: jaxopt (GD + implicit_diff, CG), bl.Implicit(CG),
    closed form (Newton, dense solve)."""
    import jax
    import jax.numpy as jnp

    from bilevel.stochastic import problems as pb
    bj.set_x64(True)
    f_in, f_out, n_in, n_out = _oracles(bench64)
    x, z0 = bench64.x0, bench64.z0
    lr = inner_lr(bench64, lipschitz(bench64), x)
    vg, fi = _jaxopt_hypergrad_fn(f_in, f_out, n_in, n_out, lr, K, N, tol=1e-14)
    (_, zj), gj = vg(jnp.asarray(z0.numpy()), jnp.asarray(x.numpy()))
    gj = np.asarray(gj)
    gnj = float(jnp.linalg.norm(jax.grad(fi)(zj, jnp.asarray(x.numpy()))))
    res = _torch_hypergrad(bench64, x, z0, lr, K, N, tol=1e-14)
    gt = res.grad.numpy()
    zz = res.params.clone().requires_grad_(True)
    gnt = float(torch.autograd.grad(bench64.problem.inner_loss(zz, x, bench64.inner_data),
                                    zz)[0].norm())
    split = {"train": bench64.inner_data, "val": bench64.outer_data}
    _, gc = pb.logreg_value_and_grad(split, x)
    gc = gc.numpy()
    return {"data": "ijcnn1-sized synthetic (49,990 / 91,701 × 22), x = x0",
            "inner": f"{K} GD steps, step 1/L = {lr:.3g}, from z0 (both)",
            "linsolve": f"CG ≤ {N} iterations, tol 1e-14 (jaxopt solve_cg; bl.CG)",
            "grad_norm_jax": gnj, "grad_norm_torch": gnt, "hypergrad_norm": float(
                np.linalg.norm(gc)),
            "rel": {"jaxopt vs closed form": rel_diff(gj, gc),
                    "bl.Implicit(CG) vs closed form": rel_diff(gt, gc),
                    "bl.Implicit(CG) vs jaxopt": rel_diff(gt, gj),
                    "z_K torch vs jax": rel_diff(res.params.numpy(), np.asarray(zj))}}


def timing(bench64, K: int = 100, N: int = 20, repeats: int = 15) -> dict:
    """ms per hypergradient, float64, interleaved: jaxopt (K fixed-step GD steps, N CG
    iterations, tol 0), ours (same), the checkout's jaxopt_gd value_grad (its defaults: gd with
    line search, 100 steps, normal-equation CG), the closed form (Newton + dense solve)."""
    import jax.numpy as jnp

    from bilevel.stochastic import problems as pb
    bj.set_x64(True)
    f_in, f_out, n_in, n_out = _oracles(bench64)
    x, z0 = bench64.x0, bench64.z0
    lr = inner_lr(bench64, lipschitz(bench64), x)
    vg, _ = _jaxopt_hypergrad_fn(f_in, f_out, n_in, n_out, lr, K, N)
    xj, zj0 = jnp.asarray(x.numpy()), jnp.asarray(z0.numpy())
    bsolver = bj.make_solver("jaxopt_gd", f_in, f_out, n_in, n_out, z0.numpy(), x.numpy(),
                             inner_solver="gd", n_inner_steps=100)
    split = {"train": bench64.inner_data, "val": bench64.outer_data}

    def block(out):
        (_, z), gr = out
        gr.block_until_ready()
        return np.asarray(gr)

    fns = {f"jaxopt GD({K}) + CG({N}), jit": lambda: block(vg(zj0, xj)),
           f"bl.hypergrad GD({K}) + Implicit(CG({N}))":
               lambda: _torch_hypergrad(bench64, x, z0, lr, K, N).grad.numpy(),
           "checkout jaxopt_gd value_grad (gd+linesearch 100, normal CG)":
               lambda: block(bsolver.value_grad(zj0, xj)),
           "closed form (Newton + dense solve)":
               lambda: pb.logreg_value_and_grad(split, x)[1].numpy()}
    for fn in fns.values():  # warm-up (jit compile) outside the clock
        fn()
    times = {k: [] for k in fns}
    for name in rotations(fns, repeats):
        t0 = time.perf_counter()
        fns[name]()
        times[name].append(1e3 * (time.perf_counter() - t0))
    ms = {k: {"median": float(np.median(v)), "q20": float(np.quantile(v, 0.2)),
              "q80": float(np.quantile(v, 0.8))} for k, v in times.items()}
    keys = list(fns)
    return {"data": "ijcnn1-sized synthetic", "dtype": "float64", "repeats": repeats,
            "note": f"K = {K} inner GD steps (step 1/L), N = {N} CG iterations (tol 0) for the "
                    "first two", "ms": ms, "ratio": ms[keys[0]]["median"] / ms[keys[1]]["median"]}


def run_bench_jaxopt_gd(bench, max_time: float, step_size_outer: float = 10.0,
                        n_inner_steps: int = 100):
    """The checkout's solvers/jaxopt_gd.py (inner 'gd', implicit_diff=True); records
    (outer steps, solver seconds, metric)."""
    from .bilevel_suite import TimeGate
    f_in, f_out, n_in, n_out = _oracles(bench)
    solver = bj.make_solver("jaxopt_gd", f_in, f_out, n_in, n_out,
                            bench.z0.reshape(-1).numpy(), bench.x0.numpy(), inner_solver="gd",
                            step_size_outer=step_size_outer, n_inner_steps=n_inner_steps)
    recs = [(0, 0.0, _metric(bench, bench.z0, bench.x0))]
    st = {"t": 0.0, "n": 0, "t0": None}
    gate = TimeGate()

    def cb():
        if st["t0"] is not None:
            solver.outer_var.block_until_ready()
            st["t"] += time.perf_counter() - st["t0"]
            st["n"] += 1
            x = np.asarray(solver.outer_var)
            if not np.all(np.isfinite(x)):
                recs.append((st["n"], st["t"], float("nan")))
                return False
            if gate.due(st["t"]) or st["t"] >= max_time:
                recs.append((st["n"], st["t"], _metric(bench, solver.inner_var, x)))
        go = st["t"] < max_time
        st["t0"] = time.perf_counter()
        return go

    solver.run(cb)
    return recs


def run_torch_implicit_gd(bench, max_time: float, step_size_outer: float = 10.0,
                          n_inner_steps: int = 100, cg_iters: int = 100):
    """Ours: x ← x − 10·ĝ, ĝ = bl.hypergrad(GradientDescent(1/L(x), 100), Implicit(CG)),
    the inner start warm (the previous z_K), as jaxopt_gd warm-starts its inner_var."""
    from .bilevel_suite import TimeGate
    L = lipschitz(bench)
    x, z = bench.x0.clone(), bench.z0.clone()
    recs = [(0, 0.0, _metric(bench, z, x))]
    gate = TimeGate()
    t, n = 0.0, 0
    while t < max_time:
        t0 = time.perf_counter()
        res = _torch_hypergrad(bench, x, z, inner_lr(bench, L, x), n_inner_steps, cg_iters,
                               tol=1e-5)
        z = res.params
        x = x - step_size_outer * res.grad
        t += time.perf_counter() - t0
        n += 1
        if not bool(torch.isfinite(x).all()):
            recs.append((n, t, float("nan")))
            break
        if gate.due(t) or t >= max_time:
            recs.append((n, t, _metric(bench, z, x)))
    return recs


# ------------------------------------------------------------------------------------------
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", nargs="+", default=["ijcnn1", "hyper-cleaning"],
                    choices=["quadratic", "ijcnn1", "covtype", "hyper-cleaning"])
    ap.add_argument("--gd-problems", nargs="+", default=["ijcnn1", "hyper-cleaning"],
                    choices=["quadratic", "ijcnn1", "covtype", "hyper-cleaning"])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--max-time", type=float, default=10.0, help="seconds per Optuna run")
    ap.add_argument("--gd-time", type=float, default=8.0, help="seconds per GD run")
    ap.add_argument("--gd-repeats", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15, help="timing repeats")
    ap.add_argument("--skip", nargs="*", default=[], choices=["optuna", "equality", "timing",
                                                              "gd"])
    ap.add_argument("--out", default="benchmarks/results/bilevel_baselines")
    ap.add_argument("--render", action="store_true",
                    help="only rewrite table.md and baselines.png from --out/results.json")
    args = ap.parse_args(argv)
    if args.render:
        res = json.loads((Path(args.out) / "results.json").read_text())
        print(write_table(res, Path(args.out) / "table.md"))
        plot(res, Path(args.out) / "baselines.png")
        return
    ok, why = bj.available()
    if not ok:
        raise SystemExit(f"[baselines] {why}")
    from importlib.metadata import version

    import jax
    import jaxopt  # noqa: F401
    import optuna

    from bilevel.stochastic import datasets as ds
    from bilevel.stochastic import problems as pb

    from .bilevel_suite import build_problems

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message=".*out of the range.*")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    res = {"meta": {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": f"shared 2-core CPU ({platform.processor() or platform.machine()}), "
                  f"{torch.get_num_threads()} thread",
        "torch": torch.__version__, "jax": jax.__version__, "jaxopt": version("jaxopt"),
        "optuna": optuna.__version__, "benchmark_commit": checkout_commit(),
        "seeds": args.seeds, "max_time": args.max_time,
        "command": ("OMP_NUM_THREADS=1 BENCHMARK_BILEVEL=... python -m "
                    "benchmarks.bilevel_baselines " + " ".join(argv or [])).rstrip(),
        "load_note": ("The CPU is shared with other heavy jobs: the compared methods alternate "
                      "within this one run (seed by seed in alternating order A B / B A; the "
                      "timing repeats rotate the order), so that both see the same load. "
                      "Evaluation is excluded from the clock; JAX's JIT compilation happens in "
                      "the solvers' set_objective / a warm-up call, outside the clock."),
    }}
    need = sorted(set(args.problems if "optuna" not in args.skip else []) |
                  set(args.gd_problems if "gd" not in args.skip else []))
    bj.set_x64(False)
    benches = build_problems(argparse.Namespace(problems=need, quick=False, ijcnn1=None,
                                                covtype=None, mnist=None)) if need else {}
    if "optuna" not in args.skip:
        res["optuna"] = {}
        for prob in args.problems:
            b = benches[prob]
            d = res["optuna"][prob] = {"data": b.extra.get("data", "synthetic"),
                                       "metric": b.metric, "runs": {}}
            for seed, impl in schedule(OPTUNA_IMPLS, range(1, args.seeds + 1)):
                t0 = time.perf_counter()
                recs = (run_bench_optuna(b, seed, args.max_time) if impl == OPTUNA_IMPLS[0]
                        else run_torch_optuna(b, seed, args.max_time))
                d["runs"].setdefault(impl, []).append({"seed": seed, "records": recs})
                print(f"[baselines] optuna {prob:14s} {impl:16s} seed {seed} trials "
                      f"{recs[-1][0]:4d} final {recs[-1][2]:.4g} "
                      f"({time.perf_counter() - t0:.1f} s wall)", flush=True)
    if "gd" not in args.skip:
        res["gd"] = {}
        for prob in args.gd_problems:
            b = benches[prob]
            d = res["gd"][prob] = {"metric": b.metric, "max_time": args.gd_time, "runs": {}}
            for rep, impl in schedule(GD_IMPLS, range(1, args.gd_repeats + 1)):
                t0 = time.perf_counter()
                recs = (run_bench_jaxopt_gd(b, args.gd_time) if impl == GD_IMPLS[0]
                        else run_torch_implicit_gd(b, args.gd_time))
                d["runs"].setdefault(impl, []).append({"seed": rep, "records": recs})
                print(f"[baselines] gd {prob:14s} {impl:16s} rep {rep} steps {recs[-1][0]:5d} "
                      f"final {recs[-1][2]:.4g} ({time.perf_counter() - t0:.1f} s wall)",
                      flush=True)
    if "equality" not in args.skip or "timing" not in args.skip:
        split = ds.synthetic_ijcnn1(seed=0, dtype=torch.float64)
        b64 = pb.logreg_l2(split, seed=0, dtype=torch.float64, h_star=0.0)
        if "equality" not in args.skip:
            res["equality"] = equality(b64)
            print(f"[baselines] equality {res['equality']['rel']}", flush=True)
        if "timing" not in args.skip:
            res["timing"] = timing(b64, repeats=args.repeats)
            print(f"[baselines] timing {res['timing']['ms']}", flush=True)
        bj.set_x64(False)
    res["meta"]["total_wall_s"] = round(time.perf_counter() - t_start, 1)
    (out / "results.json").write_text(json.dumps(res, indent=1, default=float))
    text = write_table(res, out / "table.md")
    plot(res, out / "baselines.png")
    print(text)


if __name__ == "__main__":
    import sys
    main(sys.argv[1:])
