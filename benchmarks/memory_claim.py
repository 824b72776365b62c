"""The memory-reduced paper's claim in its own setting: peak memory and time per meta-iteration.

    python -m benchmarks.memory_claim                          # CPU, 4 tasks per meta-step
    python -m benchmarks.memory_claim --meta-batch 32 --only "memory-reduced T=20 N=20"
    python -m benchmarks.memory_claim --device cuda --meta-batch 32 --name memory-claim-cuda

Yang, Ma & Yu (AAAI 2025) claim over 50 % less memory than MAML and ANIL. Their setting
(ALGORITHMS.md §6.6): Mini-ImageNet 84x84x3, MAML's Conv4 with 32 filters (800 features,
:func:`meta.backbones.maml_conv4`), 5-way 5-shot with 5 queries per class (their
``FusedNWaysKShots(k = 2·shots)``), 32 tasks per meta-iteration, T = 20 lower steps (β = 0.05),
N = 20 CG steps. Random images (memory and time do not depend on the pixels). Compared with
MAML and ANIL at the SAME number of inner steps (20), and at the paper's own baseline settings
(MAML 3 steps, ANIL 5 steps); ANIL both with our cached backbone features and with the backbone
inside every head step (as learn2learn's ANIL in the official code).

Protocol: :func:`benchmarks.measure.run_protocol`, one fresh process per row (peak resident
memory above the baseline after imports, model, data and a warm-up meta-step on CPU;
``max_memory_allocated`` on CUDA; time = median of the timed meta-steps). The learners' CPU
default is the task loop, which holds ONE task's graph at a time: the peak does not grow with
the number of tasks (measured: ``--meta-batch`` 4 vs 32 rows), so on CPU the slow rows are
measured with fewer tasks and their time per 32-task meta-iteration is extrapolated linearly
(``time_32 = time · 32 / tasks``, marked in the table). On CUDA the default is ``vmap`` over the
tasks, whose memory grows with the number of tasks. Writes ``<name>.json`` and ``<name>.md``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from . import ROOT, subprocess_env

PAPER_TASKS = 32

# (row name, algorithm, learner options)
CONFIGS: list[tuple[str, str, dict[str, Any]]] = [
    ("memory-reduced T=20 N=20", "memoryreduced",
     {"inner_steps": 20, "inner_lr": 0.05, "cg_iters": 20}),
    ("memory-reduced T=20 N=20 backbone per step", "memoryreduced",
     {"inner_steps": 20, "inner_lr": 0.05, "cg_iters": 20, "cache_features": False}),
    ("MAML K=20", "maml", {"inner_steps": 20, "inner_lr": 0.01}),
    ("ANIL K=20", "anil", {"inner_steps": 20, "inner_lr": 0.1}),
    ("ANIL K=20 backbone per step", "anil",
     {"inner_steps": 20, "inner_lr": 0.1, "cache_features": False}),
    ("MAML K=3 (paper's baseline)", "maml", {"inner_steps": 3, "inner_lr": 0.5}),
    ("ANIL K=5 (paper's baseline)", "anil", {"inner_steps": 5, "inner_lr": 0.1}),
    ("ANIL K=5 backbone per step (paper's baseline)", "anil",
     {"inner_steps": 5, "inner_lr": 0.1, "cache_features": False}),
]
REFERENCE = "memory-reduced T=20 N=20"


def measure_one(row: str, opts: argparse.Namespace) -> dict[str, Any]:
    """In this (fresh) process: one learner's meta-step on the paper's setting."""
    from . import measure as M

    allocator = M.set_allocator("memory") if opts.device == "cpu" else "default"
    import torch

    import meta
    from meta.backbones import count_parameters, maml_conv4

    if opts.threads:
        torch.set_num_threads(opts.threads)
    _, algo, kw = next(c for c in CONFIGS if c[0] == row)
    device = torch.device(opts.device)
    gen = torch.Generator().manual_seed(0)
    ways, shots, queries, B = 5, opts.shots, opts.queries, opts.meta_batch

    def split(n):
        x = torch.rand(B, ways * n, 3, 84, 84, generator=gen)
        y = torch.arange(ways).repeat_interleave(n).expand(B, -1).contiguous()
        return x.to(device), y.to(device)

    batch = meta.TaskBatch(split(shots), split(queries))
    torch.manual_seed(0)
    model = maml_conv4(ways, hidden=32, image_size=84).to(device)
    kw = dict(kw)
    if opts.vectorize != "default":
        kw["vectorize"] = opts.vectorize == "vmap"
    learner = meta.make_learner(algo, model, **kw)

    def call():
        model.zero_grad(set_to_none=True)
        out = learner.meta_step(batch)
        return None, out

    record: dict[str, Any] = {"mem_allocator": allocator}
    _, out = M.run_protocol(call, device, record, {"warmup": 1, "mem_calls": opts.mem_calls,
                                                   "repeats": opts.repeats,
                                                   "time_budget": opts.time_budget})
    return {"learner": row, "algorithm": algo, "options": kw,
            "estimator": type(learner.estimator).__name__,
            "inner_steps": learner.inner_steps, "meta_batch": B, "ways": ways, "shots": shots,
            "queries": queries, "image": [3, 84, 84], "params": count_parameters(model),
            "vectorized": learner.use_vmap(), "loss": out["loss"], **record,
            "threads": torch.get_num_threads(), "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                                              time.gmtime()),
            "status": "ok"}


def _mib(b: float | None) -> str:
    return "-" if b is None else f"{b / 2**20:.1f}"


def verdict(records: list[dict[str, Any]]) -> list[str]:
    """One line per baseline: peak(memory-reduced) / peak(baseline), for both memory-reduced
    rows (features cached, backbone per step), and whether it is below 0.5 (the claim: "over
    50 % less memory"). Rows of the same task count are compared (the smallest count)."""
    ok = [r for r in records if r.get("status") == "ok" and r.get("peak_mem_bytes")]
    if not ok:
        return ["no successful rows: no verdict"]
    tasks = min(r["meta_batch"] for r in ok)
    rows = {r["learner"]: r for r in ok if r["meta_batch"] == tasks}
    ours = [n for n in rows if n.startswith("memory-reduced")]
    if not ours:
        return ["memory-reduced rows missing: no verdict"]
    lines = [f"Peak memory ratios at {tasks} tasks per meta-step (< 0.50 = the claim holds):", ""]
    for name in [c[0] for c in CONFIGS if not c[0].startswith("memory-reduced")]:
        if name not in rows:
            continue
        parts = []
        for mr in ours:
            ratio = rows[mr]["peak_mem_bytes"] / rows[name]["peak_mem_bytes"]
            parts.append(f"{mr}: {ratio:.2f}x ({'holds' if ratio < 0.5 else 'does NOT hold'})")
        lines.append(f"- vs {name}: " + "; ".join(parts))
    return lines


def markdown(records: list[dict[str, Any]], title: str) -> str:
    ok = {(r["learner"], r["meta_batch"]): r for r in records if r.get("status") == "ok"}
    order = [c[0] for c in CONFIGS]
    records = sorted(records, key=lambda r: (r.get("meta_batch") or 0, order.index(
        r["learner"]) if r.get("learner") in order else len(order)))
    lines = [f"# {title}", "",
             "The memory-reduced paper's setting: 84x84x3 inputs, MAML's Conv4-32 (800 features, "
             "32,901 parameters), 5-way 5-shot, 5 queries per class, T = N = 20. One `meta_step` "
             "(meta-gradient of the batch into `.grad`). Memory = peak resident memory of a fresh "
             "process above its baseline (CPU) or `max_memory_allocated` above the start (CUDA); "
             "time = median of the timed meta-steps. `time / 32-task iteration` is measured when "
             "the row ran 32 tasks, else extrapolated linearly from its task count (marked *; "
             "the task loop's time is linear in the tasks and its peak does not depend on "
             "them).", "",
             "| learner | tasks | batching | peak mem (MiB) | mem / memory-reduced | "
             "time (s) | time / 32-task iteration (s) |", "|---|---|---|---|---|---|---|"]
    for r in records:
        if r.get("status") != "ok":
            lines.append(f"| {r['learner']} | {r.get('status')}: "
                         f"{r.get('reason', '')[:100]} | | | | | |")
            continue
        mem, t, b = r["peak_mem_bytes"], r["time_s"], r["meta_batch"]
        ref = ok.get((REFERENCE, b))
        rm = (f"{mem / ref['peak_mem_bytes']:.2f}" if ref and mem and ref["peak_mem_bytes"]
              else "-")
        t32 = f"{t * PAPER_TASKS / b:.1f}" + ("" if b == PAPER_TASKS else "*")
        lines.append(f"| {r['learner']} | {b} | {'vmap' if r['vectorized'] else 'loop'} | "
                     f"{_mib(mem)} | {rm} | {t:.2f} | {t32} |")
    env = next(iter(ok.values()), {})
    lines += ["", "## Verdict", ""] + verdict(records)
    lines += ["", f"Device {env.get('gpu') or env.get('device')}, torch {env.get('torch')}, "
              f"{env.get('threads')} thread(s), float32, {env.get('date')}. Command: "
              f"`python -m benchmarks.memory_claim` (see the JSON for each row's options)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.memory_claim",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--meta-batch", type=int, default=4,
                    help="tasks per meta-step (the paper: 32)")
    ap.add_argument("--shots", type=int, default=5)
    ap.add_argument("--queries", type=int, default=5)
    ap.add_argument("--vectorize", choices=["default", "vmap", "loop"], default="default")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--mem-calls", type=int, default=2)
    ap.add_argument("--time-budget", type=float, default=30.0)
    ap.add_argument("--only", default=None, help="comma-separated row names")
    ap.add_argument("--timeout", type=float, default=3600.0, help="per row, seconds")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--name", default="memory-claim-cpu")
    ap.add_argument("--append", action="store_true",
                    help="add the rows to an existing <name>.json (replacing same row + tasks)")
    ap.add_argument("--report", action="store_true",
                    help="only rewrite <name>.md from <name>.json")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    opts = ap.parse_args(argv)
    if opts.one:
        print(json.dumps(measure_one(opts.one, opts)))
        return 0
    if opts.report:
        path = Path(opts.out) / f"{opts.name}.json"
        path.with_suffix(".md").write_text(markdown(json.loads(path.read_text()),
                                                    f"Memory-reduced claim: {opts.name}"))
        print(f"wrote {path.with_suffix('.md')}")
        return 0
    rows = [c[0] for c in CONFIGS]
    if opts.only:
        wanted = [r.strip() for r in opts.only.split(",")]
        unknown = [r for r in wanted if r not in rows]
        if unknown:
            raise SystemExit(f"unknown row(s) {unknown}; known: {rows}")
        rows = wanted
    out = Path(opts.out) / f"{opts.name}.json"
    records: list[dict[str, Any]] = []
    if opts.append and out.exists():
        records = json.loads(out.read_text())
    for row in rows:
        cmd = [sys.executable, "-m", "benchmarks.memory_claim", "--one", row, "--device",
               opts.device, "--meta-batch", str(opts.meta_batch), "--shots", str(opts.shots),
               "--queries", str(opts.queries), "--vectorize", opts.vectorize,
               "--threads", str(opts.threads), "--repeats", str(opts.repeats),
               "--mem-calls", str(opts.mem_calls), "--time-budget", str(opts.time_budget)]
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True,
                                  text=True, timeout=opts.timeout)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            rec = json.loads(lines[-1]) if lines else {
                "learner": row, "meta_batch": opts.meta_batch, "status": "error",
                "reason": (proc.stderr or proc.stdout)[-300:].replace("\n", " ")}
        except subprocess.TimeoutExpired:
            rec = {"learner": row, "meta_batch": opts.meta_batch, "status": "timeout",
                   "reason": f"over {opts.timeout:.0f} s"}
        records = [r for r in records if (r.get("learner"), r.get("meta_batch"))
                   != (row, opts.meta_batch)] + [rec]
        if rec.get("status") == "ok":
            print(f"{row:48s} B={opts.meta_batch:3d} mem {_mib(rec['peak_mem_bytes']):>8s} MiB"
                  f"  time {rec['time_s']:8.2f} s", flush=True)
        else:
            print(f"{row:48s} {rec['status']}: {rec['reason']}", flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(records, indent=1))
        out.with_suffix(".md").write_text(markdown(records, f"Memory-reduced claim: "
                                                            f"{opts.name}"))
    print(f"wrote {out}, {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
