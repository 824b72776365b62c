"""Where the time of one Conv4 MAML meta-step goes: ours vs the plain autograd loop.

    python -m benchmarks.profile                      # K=1, 16 tasks, Conv4-64, 1 thread
    python -m benchmarks.profile --inner-steps 5 --meta-batch 4 --peers plain,higher

Runs ``torch.profiler`` (CPU activities) around one meta-gradient of the ``conv4_maml`` case
after two warm-up calls, and splits the self time of every aten op into

- *kernels*: convolution forward/backward, batch norm forward/backward (and their
  double-backward), ReLU and its backward, the linear head: the arithmetic every
  implementation of second-order MAML on this network must do;
- *rest*: everything else (elementwise updates of the inner step, copies, reductions,
  allocation, the Python-side dispatch that the profiler attributes to ops).

If the kernels take most of the time in every method, no library can be much faster than
another on this step without changing the arithmetic (a different algorithm, a fused kernel
or another device). Writes ``benchmarks/results/<name>.json`` next to the other results.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from . import cases as C

KERNELS = ("convolution", "conv2d", "mkldnn", "batch_norm", "clamp_min", "threshold_backward",
           "relu", "addmm", "mm", "BatchNorm")


def _is_kernel(key: str) -> bool:
    return any(k in key for k in KERNELS)


def profile_method(bench: C.Bench, method: str) -> dict:
    """Self-time split of one meta-gradient of ``method`` (``"ours"`` or a peer name)."""
    est = C.make_estimator("Unrolled", bench.inner_steps, bench.spec)

    def call():
        return bench.ours(est) if method == "ours" else bench.peer(method)

    for _ in range(2):
        call()
    t0 = time.perf_counter()
    call()
    wall = time.perf_counter() - t0
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        call()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    kern = sum(e.self_cpu_time_total for e in events if _is_kernel(e.key))
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:8]
    return {"method": method, "wall_s": wall, "profiled_self_s": total / 1e6,
            "kernel_share": kern / total if total else None,
            "ops": int(sum(e.count for e in events)),
            "top": [{"op": e.key, "share": e.self_cpu_time_total / total, "count": e.count}
                    for e in top]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.profile",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--inner-steps", type=int, default=1)
    ap.add_argument("--meta-batch", type=int, default=16)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--peers", default="plain", help="comma-separated peers (default plain)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--name", default="profile-conv4-maml-cpu")
    opts = ap.parse_args(argv)
    torch.set_num_threads(opts.threads)
    bench = C.build("conv4_maml", opts.inner_steps, width=opts.width, meta_batch=opts.meta_batch)
    methods = ["ours"] + [p.strip() for p in opts.peers.split(",") if p.strip()]
    rows = [profile_method(bench, m) for m in methods]
    record = {"case": "conv4_maml", "inner_steps": opts.inner_steps, "width": opts.width,
              "meta_batch": opts.meta_batch, "threads": opts.threads, "torch": torch.__version__,
              "device": "cpu", "cpu": platform.processor() or platform.machine(),
              "date": time.strftime("%Y-%m-%d"), "methods": rows}
    for r in rows:
        print(f"{r['method']:12s} wall {1e3 * r['wall_s']:7.0f} ms  kernels "
              f"{100 * r['kernel_share']:5.1f}% of profiled self time, {r['ops']} aten ops; "
              f"top: " + ", ".join(f"{t['op']} {100 * t['share']:.0f}%" for t in r["top"][:4]))
    out = Path(opts.out) / f"{opts.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
