"""Does SRBA's divergence on covtype come from the algorithm or from the minibatch stream?

In the suite (covtype-sized data, the benchmark's best SRBA parameters: step 0.03125, outer
ratio 0.01, ``period_frac`` 8, i.e. one full-batch reset every 58,101 iterations) our SRBA went
to NaN in 5 of 10 seeds, the benchmark's JAX SRBA in none. The benchmark's sampler starts
every seed from ``batch_order = arange(K)``: epoch 0 visits the blocks in order, and only
later epochs are permuted. Its seeds therefore share the first epoch (5,810 inner and 1,453
outer draws here), where the steps move x the most. Ours draws epoch 0 from the seed too.

This script runs the same configuration four ways, S seeds each, for N iterations:

- ``jax``: benchopt's SRBA solver, its sampler as it is;
- ``jax, shuffled epoch 0``: the same solver, epoch 0 permuted from the seed;
- ``ours``: ``bl.stochastic.SRBA`` compiled, ``Sampler`` (every epoch permuted);
- ``ours, ordered epoch 0``: the same with epoch 0 in order, as the benchmark's sampler.

and reports, per setup, the seeds that diverged (first non-finite x, to 1,024 iterations) and
how far apart the seeds' x are at 16K iterations.

    python -m benchmarks.sampler_streams --seeds 10 --iters 65536
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from bilevel import stochastic as st

from . import bilevel_jax as bj
from .bilevel_suite import BEST, build_problems, cpu_model

EVERY = 1024
SETUPS = ["jax", "jax, shuffled epoch 0", "ours", "ours, ordered epoch 0"]


class OrderedFirstEpoch(st.Sampler):
    """``Sampler`` whose epoch 0 visits blocks 0, 1, ..., K−1 (benchopt's sampler)."""

    def order(self, epoch: int) -> list[int]:
        return list(range(self.n_batches)) if epoch == 0 else super().order(epoch)


def run_jax(bench, params, seed: int, n_iter: int, shuffle_first: bool) -> list[list[float]]:
    import jax
    step, ratio, extra = params
    f_in, f_out, n_in, n_out = bj.jax_oracles("covtype", bench.inner_data, bench.outer_data,
                                              n_classes=bench.z0.shape[1])
    solver = bj.make_solver("srba", f_in, f_out, n_in, n_out, bench.z0.reshape(-1).numpy(),
                            bench.x0.numpy(), step_size=step, outer_ratio=ratio, batch_size=64,
                            eval_freq=EVERY, random_state=seed, **extra)
    if shuffle_first:
        k_in, k_out = jax.random.split(jax.random.PRNGKey(1000 + seed))
        for key, state in ((k_in, solver.state_inner_sampler), (k_out, solver.state_outer_sampler)):
            state["batch_order"] = jax.random.permutation(key, state["batch_order"].shape[0])
    xs: list[list[float]] = []
    calls = [0]

    def cb():  # benchopt's callback: called before the first epoch and after each one
        calls[0] += 1
        if calls[0] > 1:
            xs.append(np.asarray(solver.outer_var, dtype=float).tolist())
            if not np.isfinite(xs[-1]).all():
                return False
        return len(xs) < n_iter // EVERY

    solver.run(cb)
    return xs


def run_ours(bench, alg, seed: int, n_iter: int, ordered_first: bool) -> list[list[float]]:
    cls = OrderedFirstEpoch if ordered_first else st.Sampler
    si = cls(bench.inner_data, 64, seed=seed, last="overlap")
    so = cls(bench.outer_data, 64, seed=seed + 10_000, last="overlap")
    state, draws, xs = alg.init(bench.z0, bench.x0), None, []
    for _ in range(n_iter // EVERY):
        state, draws = st.run(alg, bench.problem, state, si, so, EVERY, draws=draws,
                              compile=True)
        xs.append(state.x.double().tolist())
        if not np.isfinite(xs[-1]).all():
            break
    return xs


def summarise(traj: dict[str, list[list[list[float]]]], at: int) -> dict:
    out = {}
    for name, runs in traj.items():
        div = [EVERY * len(r) for r in runs if not np.isfinite(r[-1]).all()]
        k = at // EVERY - 1
        xk = np.array([r[k] for r in runs if len(r) > k and np.isfinite(r[k]).all()])
        spread = float(np.abs(xk - np.median(xk, 0)).max()) if len(xk) > 1 else float("nan")
        out[name] = {"diverged": len(div), "seeds": len(runs), "diverged_at": sorted(div),
                     f"spread_at_{at}": spread}
    return out


def write(out_dir: Path, meta: dict, traj: dict, summary: dict, at: int) -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "sampler_streams.json").write_text(json.dumps(
        {"meta": meta, "summary": summary, "x": traj}))
    lines = [f"# SRBA on covtype-sized data: benchmark's sampler vs a shuffled first epoch "
             f"({meta['date']})", "",
             f"Device: {meta['device']}; torch {meta['torch']}, jax {meta['jax']}; "
             f"benchmark_bilevel {meta['benchmark_commit']}; float32, batch 64, step "
             f"{meta['params'][0]}, outer ratio {meta['params'][1]}, period_frac "
             f"{meta['params'][2]['period_frac']} (reset every {meta['period']} iterations); "
             f"{meta['seeds']} seeds × {meta['iters']} iterations.", "",
             f"Command: `{meta['command']}`", "",
             f"| setup | diverged | iterations at divergence | max abs(x − median x) over seeds "
             f"at {at} iterations |", "|---|---|---|---|"]
    for name in SETUPS:
        s = summary[name]
        at_text = ", ".join(f"{v:,}" for v in s["diverged_at"]) or "—"
        lines.append(f"| {name} | {s['diverged']} / {s['seeds']} | {at_text} | "
                     f"{s[f'spread_at_{at}']:.3g} |")
    text = "\n".join(lines) + "\n"
    (out_dir / "sampler_streams.md").write_text(text)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return text
    fig, axes = plt.subplots(1, len(SETUPS), figsize=(4 * len(SETUPS), 3.4), sharey=True)
    for ax, name in zip(axes, SETUPS):
        for r in traj[name]:
            x0 = np.array([v[0] for v in r])
            ax.plot(EVERY * np.arange(1, len(x0) + 1), x0, lw=1)
            if not np.isfinite(x0[-1]):
                ax.plot(EVERY * (len(x0) - 1), x0[-2] if len(x0) > 1 else np.nan, "kx")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("iteration")
    axes[0].set_ylabel("x[0] (log L2 weight, class 0)")
    fig.suptitle("SRBA, covtype-sized: one line per seed (× = diverged)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out_dir / "sampler_streams.png", dpi=110)
    return text


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--iters", type=int, default=65536)
    ap.add_argument("--at", type=int, default=16384, help="iteration of the seed spread")
    ap.add_argument("--out", default="benchmarks/results/sampler_streams")
    args = ap.parse_args(argv)
    ok, why = bj.available()
    if not ok:
        raise SystemExit(f"sampler_streams needs the benchmark's JAX solvers: {why}")
    torch.set_num_threads(1)
    bj.set_x64(False)
    bench = build_problems(SimpleNamespace(problems=["covtype"], quick=False, ijcnn1=None,
                                           covtype=None, mnist=None))["covtype"]
    params = BEST["covtype"]["srba"]
    n_in, n_out = bench.inner_data[0].shape[0], bench.outer_data[0].shape[0]
    alg = bj.torch_algorithm("srba", params[0], params[1], n_in, n_out, 64, **params[2])
    alg.check = False  # divergence is what is measured: record it, do not raise
    traj: dict[str, list] = {name: [] for name in SETUPS}
    for seed in range(1, args.seeds + 1):
        traj["jax"].append(run_jax(bench, params, seed, args.iters, False))
        traj["jax, shuffled epoch 0"].append(run_jax(bench, params, seed, args.iters, True))
        traj["ours"].append(run_ours(bench, alg, seed, args.iters, False))
        traj["ours, ordered epoch 0"].append(run_ours(bench, alg, seed, args.iters, True))
        print(f"[streams] seed {seed}: " + ", ".join(
            f"{k} {len(v[-1]) * EVERY}{' NaN' if not np.isfinite(v[-1][-1]).all() else ''}"
            for k, v in traj.items()), flush=True)
    import jax
    meta = {"date": datetime.date.today().isoformat(), "device": cpu_model(),
            "python": platform.python_version(), "torch": torch.__version__,
            "jax": jax.__version__, "benchmark_commit": bj.repo_commit(),
            "params": params, "period": alg.period, "seeds": args.seeds, "iters": args.iters,
            "command": "python -m benchmarks.sampler_streams " + " ".join(
                sys.argv[1:] if argv is None else argv)}
    summary = summarise(traj, args.at)
    print(write(Path(args.out), meta, traj, summary, args.at))


if __name__ == "__main__":
    main()
