"""Memory of the compiled vs eager Conv4 MAML meta-step (CPU, Linux), one process per method.

    python -m benchmarks.compiled_memory --ks 1 5          # Conv4-64, 16 tasks

After two warm-up meta-gradients (the compiled one compiles), the peak resident set is reset
(``/proc/self/clear_refs``) and three more are taken: ``step_peak_mib`` = VmHWM − VmRSS before
them (the working memory of a step); ``baseline_mib`` = VmRSS after warm-up (the compiled
process also holds the compiler and the generated code). ``compiled-cl``: the model in
channels-last (the fastest compiled layout on CPU).
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import re
import subprocess
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "results"


def _status(key: str) -> float:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{key}:\s+(\d+)", text).group(1)) / 1024


def measure(method: str, K: int, tasks: int, width: int) -> dict:
    import torch

    import meta
    from benchmarks import cases
    from benchmarks.compiled_step import _case_data
    torch.set_num_threads(1)
    bench = cases.build("conv4_maml", K, width, tasks, torch.float32, torch.device("cpu"))
    model = bench.extra["model"]
    xs, ys, xq, yq = _case_data(model, tasks)
    batch = meta.TaskBatch((xs, ys), (xq, yq))
    if method == "compiled-cl":
        model = copy.deepcopy(model).to(memory_format=torch.channels_last)
    learner = meta.MAML(model, inner_lr=bench.spec.inner_lr, inner_steps=K, vectorize=False,
                        compile=method != "eager")
    for _ in range(2):
        learner.meta_gradient(batch)
    base = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    for _ in range(3):
        learner.meta_gradient(batch)
    return {"method": method, "K": K, "tasks": tasks, "width": width,
            "baseline_mib": round(base, 1), "step_peak_mib": round(_status("VmHWM") - base, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 5])
    ap.add_argument("--tasks", type=int, default=16)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--methods", nargs="+", default=["eager", "compiled", "compiled-cl"])
    ap.add_argument("--one", nargs=2)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]), args.tasks, args.width)))
        return 0
    recs = []
    for K in args.ks:
        for m in args.methods:
            run = subprocess.run([sys.executable, "-m", "benchmarks.compiled_memory", "--one", m,
                                  str(K), "--tasks", str(args.tasks), "--width", str(args.width)],
                                 capture_output=True, text=True,
                                 env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
            recs.append(json.loads(run.stdout.strip().splitlines()[-1]))
            print(recs[-1], flush=True)
    date = dt.datetime.now(dt.timezone.utc).isoformat()
    cmd = "python -m benchmarks.compiled_memory " + " ".join(argv or sys.argv[1:])
    lines = [f"# Memory of the Conv4 MAML meta-step (shared 2-core CPU, {date[:10]})", "",
             f"`{cmd}` · Conv4-{args.width}, {args.tasks} tasks, 1 thread, float32", "",
             "| K | method | step working memory (MiB above the post-warm-up RSS) | "
             "process RSS after warm-up (MiB) |", "|---|---|---|---|"]
    lines += [f"| {r['K']} | {r['method']} | {r['step_peak_mib']} | {r['baseline_mib']} |"
              for r in recs]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compiled-step-memory-cpu.json").write_text(json.dumps(
        {"meta": {"date": date, "command": cmd, "device": "shared 2-core CPU"},
         "records": recs}, indent=1))
    (args.out / "compiled-step-memory-cpu.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
