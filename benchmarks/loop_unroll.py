"""Iterations per while_loop trip (``st.run(..., compile=True, unroll=U)``): time per
iteration and compile time, for the suite's problems and the benchmark's best steps.

Each (algorithm, problem, U) runs in a fresh process with its own inductor cache (cold
compile, as a user's first run): 1024 iterations to compile, then the best of 5 calls of
16,384 iterations; the iterates after the run are checked equal across U (float32).

    python -m benchmarks.loop_unroll --runs soba:ijcnn1 srba:ijcnn1 soba:covtype --unroll 1 4 8
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from bilevel import stochastic as st

from . import bilevel_jax as bj
from .bilevel_suite import BEST, build_problems, cpu_model

ITERS, REPEATS = 16_384, 5


def bench(prob: str):
    """The suite's problem ``prob`` (same data and sizes, float32)."""
    args = SimpleNamespace(problems=[prob], quick=False, ijcnn1=None, covtype=None, mnist=None)
    return build_problems(args)[prob]


def measure(alg_name: str, prob: str, unroll: int) -> dict:
    """One configuration, in this process."""
    torch.set_num_threads(1)
    b = bench(prob)
    step, ratio, extra = BEST[prob][alg_name.removesuffix("-inplace")]
    si = st.Sampler(b.inner_data, 64, seed=1, last="overlap")
    so = st.Sampler(b.outer_data, 64, seed=10_001, last="overlap")
    if alg_name.startswith("saba"):  # "saba": copied tables (a loop body); "saba-inplace":
        # the default in-place tables, in unrolled chunks (unroll then plays no part)
        alg = st.SABA(step, step / ratio, inplace=alg_name == "saba-inplace")
    else:
        alg = bj.torch_algorithm(alg_name, step, ratio, si.n, so.n, 64, **extra)
    alg.check = False
    init = ({"n_inner_blocks": len(si), "n_outer_blocks": len(so)}
            if alg_name.startswith("saba") else {})
    state = alg.init(b.z0, b.x0, **init)
    t0 = time.perf_counter()
    state, draws = st.run(alg, b.problem, state, si, so, 1024, compile=True, unroll=unroll)
    compile_s = time.perf_counter() - t0
    best = float("inf")
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        state, draws = st.run(alg, b.problem, state, si, so, ITERS, draws=draws, compile=True,
                              unroll=unroll)
        best = min(best, (time.perf_counter() - t0) / ITERS)
    return {"alg": alg_name, "problem": prob, "unroll": unroll, "compile_s": compile_s,
            "us_per_it": 1e6 * best, "x": torch.as_tensor(state.x).reshape(-1).tolist()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", nargs="+", default=["soba:ijcnn1", "srba:ijcnn1", "soba:covtype"],
                    help="algorithm:problem pairs (saba: copied tables, a loop body; "
                         "saba-inplace: the default in-place tables, unrolled chunks)")
    ap.add_argument("--unroll", nargs="+", type=int, default=[1, 4, 8])
    ap.add_argument("--out", default="benchmarks/results/loop_unroll")
    ap.add_argument("--one", nargs=3, metavar=("ALG", "PROBLEM", "U"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:  # the child process
        print(json.dumps(measure(args.one[0], args.one[1], int(args.one[2]))))
        return
    rows = []
    for run in args.runs:
        alg_name, prob = run.split(":")
        for u in args.unroll:
            with tempfile.TemporaryDirectory() as cache:
                env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
                out = subprocess.run([sys.executable, "-m", "benchmarks.loop_unroll", "--one",
                                      alg_name, prob, str(u)], env=env, capture_output=True,
                                     text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"[unroll] {alg_name} {prob} U={u}: {r['us_per_it']:.2f} µs/it, compile "
                  f"{r['compile_s']:.1f} s", flush=True)
    for r in rows:  # same iterates whatever U (same batches, same steps; float32 rounding)
        ref = next(q for q in rows if (q["alg"], q["problem"]) == (r["alg"], r["problem"]))
        r["max_dx_vs_first_U"] = max(abs(a - b) for a, b in zip(r["x"], ref["x"]))
    meta = {"date": datetime.date.today().isoformat(), "device": cpu_model(),
            "torch": torch.__version__, "threads": 1, "dtype": "float32",
            "command": "python -m benchmarks.loop_unroll " + " ".join(
                sys.argv[1:] if argv is None else argv)}
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "loop_unroll.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# Iterations per while_loop trip ({meta['date']})", "",
             f"Device: {meta['device']}; torch {meta['torch']}; 1 thread, float32, batch 64, "
             f"the benchmark's best steps; cold compile (fresh inductor cache); best of "
             f"{REPEATS} × {ITERS:,} iterations.", "", f"Command: `{meta['command']}`", "",
             "| algorithm | problem | U | µs / iteration | compile (s) | max abs Δx vs first U |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['alg']} | {r['problem']} | {r['unroll']} | {r['us_per_it']:.2f} | "
                     f"{r['compile_s']:.1f} | {r['max_dx_vs_first_U']:.2g} |")
    text = "\n".join(lines) + "\n"
    (out_dir / "loop_unroll.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
