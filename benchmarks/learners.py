"""Peak memory and time of one meta-step of every MAML-family learner (``meta``), side by side.

    python -m benchmarks.learners                     # CPU, Conv4-64, 4 tasks 5-way 1-shot
    python -m benchmarks.learners --meta-batch 16 --name learners-cpu-b16
    python -m benchmarks.learners --device cuda --name learners-cuda

Same protocol as ``benchmarks.measure`` (one fresh process per learner, peak resident memory
above the baseline after imports, data and a warm-up call; median time of repeated calls), on
the ``conv4_maml`` data (28x28 Omniglot-like images, 15 queries per class). Each learner runs at
its own defaults (``meta.make_learner``), plus MAML at K = 5 and the head-only learners with
``cache_features=False`` (the backbone inside every head step, as the memory-reduced paper's
ANIL baseline). This is where the memory-reduced paper's claim (Yang, Ma & Yu 2025: over 50%
less memory than MAML/ANIL) is set against ours. Writes ``<name>.json`` and ``<name>.md``.
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

# (row name, algorithm, learner options)
CONFIGS: list[tuple[str, str, dict[str, Any]]] = [
    ("MAML K=1", "maml", {}),
    ("MAML K=5", "maml", {"inner_steps": 5}),
    ("FOMAML K=1", "fomaml", {}),
    ("ANIL K=5", "anil", {}),
    ("ANIL K=5 backbone per step", "anil", {"cache_features": False}),
    ("Reptile K=5", "reptile", {}),
    ("iMAML K=16 CG=5", "imaml", {}),
    ("Sign-MAML K=5", "signmaml", {}),
    ("Sharp-MAML K=1", "sharpmaml", {}),
    ("memory-reduced T=20 N=20", "memoryreduced", {}),
    ("memory-reduced backbone per step", "memoryreduced", {"cache_features": False}),
]


def measure_one(row: str, opts: argparse.Namespace) -> dict[str, Any]:
    """In this (fresh) process: one learner's meta-step, memory then time."""
    from . import measure as M

    allocator = M.set_allocator("memory")
    import torch

    import meta

    from . import cases as C

    if opts.threads:
        torch.set_num_threads(opts.threads)
    _, algo, kw = next(c for c in CONFIGS if c[0] == row)
    device = torch.device(opts.device)
    gen = torch.Generator().manual_seed(0)
    xs, ys, xq, yq = (t.to(device) for t in C.omniglot_like(gen, opts.meta_batch))
    torch.manual_seed(0)
    model = meta.models.Conv4(1, 5, hidden=opts.width).to(device)
    learner = meta.make_learner(algo, model, **kw)
    batch = meta.TaskBatch((xs, ys), (xq, yq))

    def call():
        model.zero_grad(set_to_none=True)
        out = learner.meta_step(batch)
        return None, out

    record = {"mem_allocator": allocator}
    M.run_protocol(call, device, record, {"warmup": 1, "mem_calls": 2, "repeats": opts.repeats,
                                          "time_budget": opts.time_budget})
    return {"learner": row, "algorithm": algo, "options": kw,
            "estimator": ("none (bl.solve)" if learner.estimator is None
                          else type(learner.estimator).__name__),
            "inner_steps": learner.inner_steps, "meta_batch": opts.meta_batch,
            "width": opts.width, **record, "threads": torch.get_num_threads(),
            "device": str(device), "torch": torch.__version__, "status": "ok"}


def markdown(records: list[dict[str, Any]], title: str) -> str:
    ok = {r["learner"]: r for r in records if r.get("status") == "ok"}
    ref = ok.get("MAML K=5")
    lines = [f"# {title}", "",
             "One `meta_step` (meta-gradient of the batch into `.grad`), each learner at its "
             "defaults; memory = peak resident memory of a fresh process above its baseline "
             "(CPU) or `max_memory_allocated` (CUDA); time = median of repeated calls.", "",
             "| learner | estimator | peak mem (MiB) | time (ms) | mem / MAML K=5 | "
             "time / MAML K=5 |", "|---|---|---|---|---|---|"]
    for r in records:
        if r.get("status") != "ok":
            lines.append(f"| {r['learner']} | {r.get('status')}: {r.get('reason', '')[:80]} "
                         f"| | | | |")
            continue
        mem, t = r["peak_mem_bytes"], r["time_s"]
        rm = f"{mem / ref['peak_mem_bytes']:.2f}" if ref and mem else "-"
        rt = f"{t / ref['time_s']:.2f}" if ref else "-"
        lines.append(f"| {r['learner']} | `{r['estimator']}` | "
                     f"{'-' if mem is None else f'{mem / 2**20:.1f}'} | {1e3 * t:.0f} | {rm} | "
                     f"{rt} |")
    env = next(iter(ok.values()), {})
    lines += ["", f"Conv4-{env.get('width')}, {env.get('meta_batch')} tasks 5-way 1-shot, "
              f"15 queries per class, 28x28; device {env.get('device')}, torch "
              f"{env.get('torch')}, {env.get('threads')} thread(s), "
              f"{time.strftime('%Y-%m-%d')}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.learners",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--meta-batch", type=int, default=4)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--time-budget", type=float, default=10.0)
    ap.add_argument("--only", default=None, help="comma-separated row names")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--name", default="learners-cpu")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    opts = ap.parse_args(argv)
    if opts.one:
        print(json.dumps(measure_one(opts.one, opts)))
        return 0
    rows = [c[0] for c in CONFIGS]
    if opts.only:
        wanted = [r.strip() for r in opts.only.split(",")]
        unknown = [r for r in wanted if r not in rows]
        if unknown:
            raise SystemExit(f"unknown row(s) {unknown}; known: {rows}")
        rows = wanted
    env = subprocess_env()
    records = []
    for row in rows:
        cmd = [sys.executable, "-m", "benchmarks.learners", "--one", row, "--device",
               opts.device, "--meta-batch", str(opts.meta_batch), "--width", str(opts.width),
               "--threads", str(opts.threads), "--repeats", str(opts.repeats),
               "--time-budget", str(opts.time_budget)]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if lines:
            rec = json.loads(lines[-1])
        else:
            rec = {"learner": row, "status": "error",
                   "reason": (proc.stderr or proc.stdout)[-300:].replace("\n", " ")}
        records.append(rec)
        if rec.get("status") == "ok":
            print(f"{row:36s} mem {rec['peak_mem_bytes'] / 2**20:8.1f} MiB  time "
                  f"{1e3 * rec['time_s']:8.0f} ms", flush=True)
        else:
            print(f"{row:36s} {rec['status']}: {rec['reason']}", flush=True)
    out = Path(opts.out) / f"{opts.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(records, indent=1))
    out.with_suffix(".md").write_text(markdown(records, f"Learners: {opts.name}"))
    print(f"wrote {out}, {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
