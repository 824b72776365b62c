"""Stochastic bilevel suite: bilevel.stochastic (PyTorch) against benchopt's own JAX solvers.

    python -m benchmarks.bilevel_suite --quick            # < 5 min: ijcnn1-sized + digits
    python -m benchmarks.bilevel_suite --seeds 5 --max-time 10 --compile
    python -m benchmarks.bilevel_suite --ijcnn1 ijcnn1 ijcnn1.t --covtype covtype.libsvm \\
        --mnist DIR                                        # the real datasets, when present
    python -m benchmarks.bilevel_suite --problems hyper-cleaning --mnist synthetic  # MNIST-sized

Protocol (benchopt benchmark_bilevel's): batch 64, warm-started single-loop/two-loop solvers,
step sizes from its ``config/*_best_params.yml`` (``--grid`` runs the grid of its
``config/<problem>.yml`` and keeps the best median), seeds 1..S, median with a 20-80 % band
against wall-clock time (evaluation excluded) and against oracle calls (minibatch gradient /
HVP / cross-VJP evaluations × batch size). Batches as the benchmark draws them: its last
partial batch of an epoch is the last 64 rows (``Sampler(last="overlap")`` on our side, so
every batch has 64 rows and ``--compile`` runs every iteration in a chunk). Metric:
h(x_t) − h* (quadratic, ijcnn1: exact value function), test error (covtype, hyper-cleaning).
Without the real files the problems use synthetic data of the real sizes
(``bilevel.stochastic.datasets``); digits hyper-cleaning uses scikit-learn's digits. Writes
``records.json``, ``table.md`` and ``<problem>.png`` to ``--out`` (default
benchmarks/results/bilevel_suite[_quick]).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import re
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from bilevel import stochastic as st
from bilevel.stochastic import datasets as ds
from bilevel.stochastic import problems as pb

from . import bilevel_jax as bj

ALGS = ["soba", "saba", "srba", "amigo", "stocbio", "f2sa"]
NAMES = {"soba": "SOBA", "saba": "SABA", "srba": "SRBA", "amigo": "AmIGO", "stocbio": "StocBiO",
         "f2sa": "F2SA"}

# (step_size, outer_ratio, extra) from the benchmark's config/*_best_params.yml; "default" =
# the solver's default (no best-params entry for that problem)
BEST = {
    "ijcnn1": {"soba": (0.03125, 0.01, {}), "saba": (0.125, 1.0, {}),
               "srba": (0.25, 1.0, {"period_frac": 0.5}), "amigo": (0.125, 0.31622776601683794,
                                                                    {}),
               "stocbio": (0.125, 1.0, {}), "f2sa": (0.01, 1.0, {})},
    "hyper-cleaning": {"soba": (1.0, 1e-4, {}), "saba": (0.1, 1e-3, {}),
                       "srba": (0.001, 1e-5, {"period_frac": 512.0}),
                       "amigo": (0.001, 1e-5, {}), "stocbio": (0.01, 1e-5, {}),
                       "f2sa": (0.01, 1.0, {})},
    "covtype": {"soba": (1.0, 0.01, {}), "saba": (0.03125, 0.01, {}),
                "srba": (0.03125, 0.01, {"period_frac": 8.0}), "amigo": (0.03125, 0.1, {}),
                "stocbio": (0.0625, 0.01, {}), "f2sa": (0.01, 1.0, {})},
    "quadratic": {"soba": (0.1, 1.0, {}), "saba": (0.1, 1.0, {}),
                  "srba": (0.1, 1.0, {"period_frac": 0.5}), "amigo": (0.01, 0.1, {}),
                  "stocbio": (0.1, 1.0, {}), "f2sa": (0.1, 1.0, {"delta_lmbda": 0.01})},
}
CONFIG_FILE = {"ijcnn1": "ijcnn1.yml", "hyper-cleaning": "datacleaning0_5.yml",
               "covtype": "covtype.yml", "quadratic": "quadratics.yml"}
EVAL_FREQ = {"ijcnn1": 1024, "hyper-cleaning": 64, "covtype": 256, "quadratic": 256}
KIND = {"ijcnn1": "ijcnn1", "hyper-cleaning": "hyper-cleaning", "covtype": "covtype",
        "quadratic": "quadratic"}


def config_grid(problem: str, alg: str) -> list[tuple[float, float, dict]]:
    """The (step_size, outer_ratio) grid of the benchmark's config/<problem>.yml."""
    repo = bj.benchmark_repo()
    path = None if repo is None else repo / "config" / CONFIG_FILE[problem]
    if path is None or not path.exists():
        return [BEST[problem][alg]]
    text = path.read_text()
    m = re.search(rf"- {NAMES[alg]}\[(.*)\]", text)
    if not m:
        return [BEST[problem][alg]]

    def values(key):
        mm = re.search(rf"{key}=\[([^\]]*)\]", m.group(1)) or re.search(rf"{key}=([^,\]]*)",
                                                                        m.group(1))
        return [float(v) for v in mm.group(1).split(",")] if mm else None

    steps, ratios = values("step_size"), values("outer_ratio")
    extra = BEST[problem][alg][2]
    if not steps or not ratios:
        return [BEST[problem][alg]]
    return [(s, r, extra) for s in steps for r in ratios]


# ------------------------------------------------------------------------------------------
# problems
# ------------------------------------------------------------------------------------------
def build_problems(args) -> dict[str, pb.Bench]:
    dt = torch.float32
    out = {}
    if "quadratic" in args.problems:
        out["quadratic"] = pb.quadratic_bench(n_inner=1024 if args.quick else 32768,
                                              n_outer=1024, d=100, p=10, mu=0.1, dtype=dt)
    if "ijcnn1" in args.problems:
        split = (ds.ijcnn1(*args.ijcnn1, dtype=dt) if args.ijcnn1 else
                 ds.synthetic_ijcnn1(seed=0, dtype=dt))
        out["ijcnn1"] = pb.logreg_l2(split, seed=0, dtype=dt)
        out["ijcnn1"].extra["data"] = "real" if args.ijcnn1 else "synthetic (real sizes)"
    if "covtype" in args.problems:
        split = (ds.covtype(args.covtype, dtype=dt) if args.covtype else
                 ds.synthetic_covtype(seed=0, dtype=dt))
        out["covtype"] = pb.multinomial_l2(split, dtype=dt)
        out["covtype"].extra["data"] = "real" if args.covtype else "synthetic (real sizes)"
    if "hyper-cleaning" in args.problems:
        if args.mnist == "synthetic":
            split = ds.synthetic_mnist_hyper_cleaning(ratio=0.5, dtype=dt)
            name = "synthetic MNIST-sized"
        elif args.mnist:
            split = ds.mnist_hyper_cleaning(args.mnist, ratio=0.5, dtype=dt)
            name = "MNIST"
        else:
            split = ds.digits_hyper_cleaning(ratio=0.5, dtype=dt)
            name = "digits"
        out["hyper-cleaning"] = pb.hyper_cleaning(split, dtype=dt)
        out["hyper-cleaning"].extra["data"] = name + " (50 % corrupted)"
    return out


def metric_of(bench: pb.Bench, z, x) -> float:
    z = torch.tensor(np.asarray(z)).to(bench.z0.dtype).reshape(bench.z0.shape)
    x = torch.tensor(np.asarray(x)).to(bench.x0.dtype)
    return float(bench.evaluate(z, x)[bench.metric])


@contextlib.contextmanager
def frozen_heap():
    """Timed runs see no full GC pass over what came before (compiled graphs, other runs'
    objects): collect, then freeze the heap for the run (both implementations alike). Without
    it, late configurations of a long suite paid seconds of gen-2 passes inside their clock
    (compiled F2SA on covtype: 5.2 ms per iteration in the suite, 1.1 ms alone)."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


class TimeGate:
    """Evaluate at solver times 0, then ×1.25 steps (bounded number of evaluations)."""

    def __init__(self, first: float = 0.02, factor: float = 1.25):
        self.next, self.factor = first, factor

    def due(self, t: float) -> bool:
        if t >= self.next:
            while self.next <= t:
                self.next *= self.factor
            return True
        return False


# ------------------------------------------------------------------------------------------
# runners
# ------------------------------------------------------------------------------------------
_ALGS: dict = {}  # (problem, algorithm, params, compile) -> algorithm object (stateless)


def run_torch(bench, alg_name, params, seed, max_time, eval_freq, compile=False):
    step, ratio, extra = params
    # the benchmark's batches: its last partial batch is the last 64 rows (clamped slice)
    si = st.Sampler(bench.inner_data, 64, seed=seed, last="overlap")
    so = st.Sampler(bench.outer_data, 64, seed=seed + 10_000, last="overlap")
    key = (bench.name, alg_name, step, ratio, tuple(sorted(extra.items())), compile)
    if key not in _ALGS:  # one object per configuration: its compiled graphs serve every seed
        _ALGS[key] = bj.torch_algorithm(alg_name, step, ratio, si.n, so.n, 64, **extra)
        _ALGS[key].check = False
    alg = _ALGS[key]
    run_opts = {"compile": True} if compile else {}  # the library's chunk (loop graphs: 1024)
    init = {"n_inner_blocks": len(si), "n_outer_blocks": len(so)} if alg_name == "saba" else {}
    state = alg.init(bench.z0, bench.x0, **init)
    if compile:  # compile outside the clock: every graph the run can ask for
        t0 = time.perf_counter()
        n = st.precompile(alg, bench.problem, state, si, so)
        print(f"[suite] {bench.name} {alg_name} precompiled {n} graphs: "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
    recs, solver_t, it, draws = [(0, 0.0, metric_of(bench, bench.z0, bench.x0))], 0.0, 0, None
    gate = TimeGate()
    with frozen_heap():
        while solver_t < max_time:
            t0 = time.perf_counter()
            state, draws = st.run(alg, bench.problem, state, si, so, eval_freq, draws=draws,
                                  **run_opts)
            solver_t += time.perf_counter() - t0
            it += eval_freq
            x = state.x
            if not bool(torch.isfinite(x).all()):
                recs.append((it, solver_t, float("nan")))
                break
            if gate.due(solver_t) or solver_t >= max_time:
                recs.append((it, solver_t, metric_of(bench, state.z, x)))
    return recs, sum(alg.oracle_calls) * 64


def run_jax(bench, alg_name, params, seed, max_time, eval_freq):
    step, ratio, extra = params
    kw = {"n_classes": bench.z0.shape[1]} if bench.z0.dim() == 2 else {}
    if bench.name == "quadratic":
        kw["mu"] = bench.extra["mu"]
    f_in, f_out, n_in, n_out = bj.jax_oracles(KIND[bench.name], bench.inner_data,
                                              bench.outer_data, **kw)
    solver = bj.make_solver(alg_name, f_in, f_out, n_in, n_out,
                            bench.z0.reshape(-1).numpy(), bench.x0.numpy(), step_size=step,
                            outer_ratio=ratio, batch_size=64, eval_freq=eval_freq,
                            random_state=seed, **extra)
    gate = TimeGate()
    recs = [(0, 0.0, metric_of(bench, bench.z0, bench.x0))]
    state = {"t": 0.0, "it": 0, "t0": None}

    def cb():
        inner = getattr(solver, "inner_var", None)
        if inner is not None and hasattr(inner, "block_until_ready"):
            inner.block_until_ready()
            solver.outer_var.block_until_ready()
        now = time.perf_counter()
        if state["t0"] is not None:
            state["t"] += now - state["t0"]
            state["it"] += eval_freq
            x = np.asarray(solver.outer_var)
            if not np.all(np.isfinite(x)):
                recs.append((state["it"], state["t"], float("nan")))
                return False
            if gate.due(state["t"]) or state["t"] >= max_time:
                recs.append((state["it"], state["t"], metric_of(bench, solver.inner_var, x)))
        go = state["t"] < max_time
        state["t0"] = time.perf_counter()
        return go

    solver.inner_var = None
    with frozen_heap():
        solver.run(cb)
    alg = bj.torch_algorithm(alg_name, step, ratio, n_in, n_out, 64, **extra)
    return recs, sum(alg.oracle_calls) * 64


# ------------------------------------------------------------------------------------------
# aggregation, table, plots
# ------------------------------------------------------------------------------------------
def _ranked(finals) -> list[float]:
    """Final metrics with a diverged run's NaN as +inf: it reached nothing, and a median over
    the finite runs alone would hide it."""
    return [f if math.isfinite(f) else math.inf for f in finals]


def _curve(recs, grid, axis):
    """Last metric seen at each grid point (step interpolation); nan before the first, +inf
    from a divergence (a NaN record) on."""
    xs = np.array([r[axis] for r in recs], float)
    ys = np.array([r[2] for r in recs], float)
    ys[np.isnan(ys)] = np.inf
    idx = np.searchsorted(xs, grid, side="right") - 1
    out = np.where(idx >= 0, ys[np.clip(idx, 0, None)], np.nan)
    return out


def band(runs, axis, grid):
    curves = np.array([_curve(r["records"] if axis == 1 else
                              [(a, b * 0 + a * r["calls_per_it"], c) for a, b, c in r["records"]],
                              grid, 1) for r in runs])
    with np.errstate(all="ignore"):
        med, lo, hi = (np.nanmedian(curves, 0), np.nanquantile(curves, 0.2, 0),
                       np.nanquantile(curves, 0.8, 0))
    # a quantile between two diverged runs interpolates inf − inf: it is +inf
    diverged = np.isinf(curves).any(0)
    return med, np.where(np.isnan(lo) & diverged, np.inf, lo), \
        np.where(np.isnan(hi) & diverged, np.inf, hi)


def summarise(results: list[dict]) -> dict:
    groups: dict = {}
    for r in results:
        groups.setdefault((r["problem"], r["alg"], r["impl"]), []).append(r)
    summary = {}
    for (prob, alg, impl), runs in groups.items():
        finals = _ranked(r["records"][-1][2] for r in runs)
        us = [1e6 * r["records"][-1][1] / max(r["records"][-1][0], 1) for r in runs]
        summary[(prob, alg, impl)] = {
            "final": float(np.median(finals)), "diverged": finals.count(math.inf),
            "us_per_it": float(np.median(us)), "runs": runs}
    for prob in {k[0] for k in summary}:
        finals = [v["final"] for k, v in summary.items() if k[0] == prob
                  and math.isfinite(v["final"])]
        target = float(np.quantile(finals, 0.5)) if finals else float("nan")
        for k, v in summary.items():
            if k[0] != prob:
                continue
            hits = []
            for r in v["runs"]:
                t = [b for a, b, c in r["records"][1:] if math.isfinite(c) and c <= target]
                hits.append(t[0] if t else math.inf)
            v["target"], v["time_to_target"] = target, float(np.median(hits))
    return summary


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def ratio_text(r: float) -> str:
    """Two significant digits, trailing zero kept below 10: 2.0, 0.36, 0.036, 28, 150."""
    return f"{r:.0f}" if r >= 10 else f"{r:#.2g}"


def write_table(summary, meta, path: Path) -> str:
    lines = [f"# Stochastic bilevel suite ({meta['date']})", "",
             f"Device: {meta['device']}; torch {meta['torch']}, jax {meta['jax']}; "
             f"benchmark_bilevel {meta['benchmark_commit']}; seeds {meta['seeds']}, "
             f"{meta['max_time']} s per run, batch 64, float32.", "",
             f"Command: `{meta['command']}`", ""]
    for prob in sorted({k[0] for k in summary}):
        rows = {k: v for k, v in summary.items() if k[0] == prob}
        any_v = next(iter(rows.values()))
        lines += [f"## {prob} — {meta['data'][prob]}; metric {meta['metric'][prob]}; target "
                  f"{any_v['target']:.4g} (median of the final medians)", "",
                  "| algorithm | impl | µs / iteration | final (median) | diverged "
                  "| time to target (s) | this ÷ JAX, per iteration |",
                  "|---|---|---|---|---|---|---|"]
        for (p, alg, impl), v in sorted(rows.items(), key=lambda kv: (ALGS.index(kv[0][1]),
                                                                      kv[0][2])):
            jax_v = rows.get((p, alg, "jax"))
            ratio = (f"{ratio_text(v['us_per_it'] / jax_v['us_per_it'])}×"
                     if jax_v and impl != "jax" else "")
            ttt = v["time_to_target"]
            final = f"{v['final']:.4g}" if math.isfinite(v["final"]) else "diverged"
            lines.append(f"| {NAMES[alg]} | {impl} | {v['us_per_it']:.1f} | {final} | "
                         f"{v['diverged']} / {len(v['runs'])} | "
                         f"{'—' if not math.isfinite(ttt) else f'{ttt:.3g}'} | {ratio} |")
        fin = {k: v for k, v in rows.items() if math.isfinite(v["time_to_target"])}
        if fin:
            best = min(fin, key=lambda k: fin[k]["time_to_target"])
            lines += ["", f"Fastest to the target: **{NAMES[best[1]]} ({best[2]})**, "
                      f"{fin[best]['time_to_target']:.3g} s."]
        lines.append("")
    text = "\n".join(lines)
    path.write_text(text)
    return text


def plot(summary, meta, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for prob in sorted({k[0] for k in summary}):
        rows = {k: v for k, v in summary.items() if k[0] == prob}
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        tmax = max(r["records"][-1][1] for v in rows.values() for r in v["runs"])
        cmax = max(r["records"][-1][0] * r["calls_per_it"] for v in rows.values()
                   for r in v["runs"])
        grids = (np.geomspace(1e-3, max(tmax, 2e-3), 200),
                 np.geomspace(64, max(cmax, 128), 200))
        colors = dict(zip(ALGS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
        for ax, axis, grid, label in ((axes[0], 1, grids[0], "wall-clock time (s)"),
                                      (axes[1], 0, grids[1], "oracle calls (samples)")):
            for (_p, alg, impl), v in sorted(rows.items()):
                med, lo, hi = band(v["runs"], axis, grid)
                style = {"torch": "-", "torch-compile": "-.", "jax": ":"}[impl]
                ax.plot(grid, med, style, color=colors[alg], label=f"{NAMES[alg]} ({impl})")
                ax.fill_between(grid, lo, hi, color=colors[alg], alpha=0.12)
            ax.set_xscale("log")
            if meta["metric"][prob] == "subopt":
                ax.set_yscale("log")
            ax.set_xlabel(label)
            ax.set_ylabel(meta["metric"][prob])
        axes[0].legend(fontsize=7, ncol=2)
        fig.suptitle(f"{prob}: median and 20-80 % band over {meta['seeds']} seeds "
                     f"({meta['data'][prob]})")
        fig.tight_layout()
        fig.savefig(out / f"{prob}.png", dpi=110)
        plt.close(fig)


def report(records: Path | list[Path], out: Path | None = None) -> str:
    """Table and plots again from a run's records.json (written beside it), or from several
    runs' records (e.g. problems split over cores) merged into ``out``/records.json."""
    paths = [records] if isinstance(records, Path) else list(records)
    datas = [json.loads(p.read_text()) for p in paths]
    if out is None:
        if len(paths) > 1:
            raise ValueError("report: several records need an output folder (--out)")
        out = paths[0].parent
    meta, runs = dict(datas[0]["meta"]), [r for d in datas for r in d["runs"]]
    if len(datas) > 1 or out != paths[0].parent:  # the table's records go beside it
        for key in ("data", "metric"):
            meta[key] = {k: v for d in datas for k, v in d["meta"][key].items()}
        meta["command"] = " ; ".join(d["meta"]["command"] for d in datas)
        meta["date"] = " / ".join(sorted({d["meta"]["date"] for d in datas}))
        out.mkdir(parents=True, exist_ok=True)
        (out / "records.json").write_text(json.dumps({"meta": meta, "runs": runs}, indent=1,
                                                     default=float))
    summary = summarise(runs)
    text = write_table(summary, meta, out / "table.md")
    plot(summary, meta, out)
    return text


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="< 5 minutes")
    ap.add_argument("--problems", nargs="+", default=None,
                    choices=["quadratic", "ijcnn1", "covtype", "hyper-cleaning"])
    ap.add_argument("--algs", nargs="+", default=ALGS, choices=ALGS)
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--max-time", type=float, default=None, help="seconds per run")
    ap.add_argument("--no-jax", action="store_true")
    ap.add_argument("--compile", action="store_true",
                    help="also bl.stochastic.run(compile=True): compiled chunks of iterations "
                         "(compile time excluded, reported in the log)")
    ap.add_argument("--grid", action="store_true", help="the benchmark's step-size grids")
    ap.add_argument("--ijcnn1", nargs=2, metavar=("TRAIN", "TEST"))
    ap.add_argument("--covtype", metavar="LIBSVM")
    ap.add_argument("--mnist", metavar="DIR",
                    help="MNIST's IDX files, or 'synthetic' for same-size synthetic data")
    ap.add_argument("--out", default=None)
    ap.add_argument("--report", metavar="RECORDS_JSON", nargs="+",
                    help="run nothing: rewrite table.md and the plots beside a records.json "
                         "(several: merged into --out)")
    args = ap.parse_args(argv)
    if args.report:
        print(report([Path(p) for p in args.report], Path(args.out) if args.out else None))
        return
    if args.problems is None:
        args.problems = (["ijcnn1", "hyper-cleaning"] if args.quick else
                         ["quadratic", "ijcnn1", "covtype", "hyper-cleaning"])
    seeds = args.seeds or (2 if args.quick else 5)
    max_time = args.max_time or (1.5 if args.quick else 10.0)
    out = Path(args.out or f"benchmarks/results/bilevel_suite{'_quick' if args.quick else ''}")
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    use_jax, why = (False, "--no-jax") if args.no_jax else bj.available()
    if use_jax:
        bj.set_x64(False)
    else:
        print(f"[suite] JAX side skipped: {why}")
    benches = build_problems(args)
    impls = ["torch"] + (["torch-compile"] if args.compile else []) + (["jax"] if use_jax
                                                                       else [])
    results = []
    for prob, bench in benches.items():
        for alg in args.algs:
            grid = config_grid(prob, alg) if args.grid else [BEST[prob][alg]]
            for impl in impls:
                best = None
                for params in grid:
                    runs = []
                    for seed in range(1, seeds + 1):
                        t0 = time.perf_counter()
                        if impl == "jax":
                            recs, cpi = run_jax(bench, alg, params, seed, max_time,
                                                EVAL_FREQ[prob])
                        else:
                            recs, cpi = run_torch(bench, alg, params, seed, max_time,
                                                  EVAL_FREQ[prob], impl == "torch-compile")
                        runs.append({"problem": prob, "alg": alg, "impl": impl, "seed": seed,
                                     "params": list(params[:2]) + [params[2]],
                                     "records": recs, "calls_per_it": cpi})
                        print(f"[suite] {prob:15s} {NAMES[alg]:8s} {impl:13s} seed {seed} "
                              f"{params[:2]} its {recs[-1][0]:>9d} final {recs[-1][2]:.4g} "
                              f"({time.perf_counter() - t0:.1f} s wall)", flush=True)
                    med = float(np.median(_ranked(r["records"][-1][2] for r in runs)))
                    if best is None or (math.isfinite(med) and not med >= best[0]):
                        best = (med, runs)
                results.extend(best[1])
    import jax as _jax  # noqa: F401  (version string only)
    meta = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": f"{os.cpu_count()}-core CPU ({cpu_model()}), "
                  f"{torch.get_num_threads()} torch thread(s)",
        "torch": torch.__version__, "jax": _jax.__version__ if use_jax else "-",
        "benchmark_commit": bj.repo_commit() if use_jax else "-", "seeds": seeds,
        "max_time": max_time,
        "command": "python -m benchmarks.bilevel_suite " + " ".join(argv or []),
        "data": {p: b.extra.get("data", "synthetic") for p, b in benches.items()},
        "metric": {p: b.metric for p, b in benches.items()},
    }
    if meta["command"].endswith(" "):
        meta["command"] = meta["command"].rstrip()
    summary = summarise(results)
    (out / "records.json").write_text(json.dumps({"meta": meta, "runs": results}, indent=1,
                                                 default=float))
    text = write_table(summary, meta, out / "table.md")
    plot(summary, meta, out)
    print(text)


if __name__ == "__main__":
    import sys
    main(sys.argv[1:])
