"""Where the time of one Conv4 MAML meta-step goes: ours vs the plain autograd loop.

    python -m benchmarks.profile                      # K=1, 16 tasks, Conv4-64, 1 thread
    python -m benchmarks.profile --inner-steps 5 --meta-batch 4 --peers plain,higher
    python -m benchmarks.profile --methods compiled,eager,plain --name profile-compiled-step-cpu

Runs ``torch.profiler`` (CPU activities) around one meta-gradient of the ``conv4_maml`` case
after two warm-up calls, and splits the self time of every aten op into

- *kernels*: convolution forward/backward, batch norm forward/backward (and their
  double-backward), ReLU and its backward, the linear head: the arithmetic every
  implementation of second-order MAML on this network must do;
- *rest*: everything else (elementwise updates of the inner step, copies, reductions,
  allocation, the Python-side dispatch that the profiler attributes to ops).

With ``--methods`` (``compiled`` = ``meta.MAML(..., compile=True)``, ``eager`` = the same
learner uncompiled, or any peer) the learner's own ``meta_gradient`` is profiled, on the data
of :mod:`benchmarks.compiled_step`, and a third class appears:

- *generated*: the self time of the compiled regions themselves (``Torch-Compiled Region``,
  ``CompiledFunction``, ``## Call CompiledFxGraph``): inductor's fused C++ loops run inside
  them and are not itemised by the profiler (unless ``--kernel-profile``, which sets
  ``torch._inductor.config.cpp.enable_kernel_profile`` and so costs a fresh compilation);
  the extern kernels they call (convolutions, mm) still show as aten ops, in *kernels*.

The record also lists the compiled regions (inclusive time and calls).

If the kernels take most of the time in every method, no library can be much faster than
another on this step without changing the arithmetic (a different algorithm, a fused kernel
or another device). Writes ``benchmarks/results/<name>.json`` next to the other results.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from . import cases as C

KERNELS = ("convolution", "conv2d", "mkldnn", "batch_norm", "clamp_min", "threshold_backward",
           "relu", "addmm", "mm", "BatchNorm")


def _is_kernel(key: str) -> bool:
    return any(k in key for k in KERNELS)


GENERATED = ("Torch-Compiled Region", "CompiledFunction", "CompiledFxGraph", "cpp_fused",
             "inductor")


def _is_generated(key: str) -> bool:
    return any(k in key for k in GENERATED)


def split_times(events: list[tuple[str, float, float, int]]) -> dict:
    """Self-time shares of (key, self_us, total_us, count) rows: kernels, generated (compiled
    regions' own time), rest; the compiled regions (inclusive time, calls); the top ops. Pure
    (the profiler's ``key_averages`` reduced to tuples)."""
    total = sum(e[1] for e in events)
    kern = sum(e[1] for e in events if _is_kernel(e[0]) and not _is_generated(e[0]))
    gen = sum(e[1] for e in events if _is_generated(e[0]))
    top = sorted(events, key=lambda e: -e[1])[:10]
    regions = sorted((e for e in events if _is_generated(e[0])), key=lambda e: -e[2])[:8]
    return {"profiled_self_s": total / 1e6,
            "kernel_share": kern / total if total else None,
            "generated_share": gen / total if total else None,
            "rest_share": (total - kern - gen) / total if total else None,
            "ops": int(sum(e[3] for e in events)),
            "top": [{"op": k, "share": s / total, "count": c} for k, s, _, c in top],
            "compiled_regions": [{"region": k, "inclusive_s": t / 1e6, "self_s": s / 1e6,
                                  "calls": c} for k, s, t, c in regions]}


def _learner_call(method: str, K: int, width: int, tasks: int):
    """A zero-argument meta-gradient of ``method`` (compiled, eager or a peer) on the data of
    :mod:`benchmarks.compiled_step`."""
    import meta

    from .compiled_step import _case_data, _grads
    bench = C.build("conv4_maml", K, width, tasks, torch.float32, torch.device("cpu"))
    xs, ys, xq, yq = _case_data(bench.extra["model"], tasks)
    bench.extra["data"] = (xs, ys, xq, yq)
    bench.extra["batch"] = meta.TaskBatch((xs, ys), (xq, yq))
    return _grads(method, bench, K)


def profile_method(bench: C.Bench | None, method: str, call=None) -> dict:
    """Self-time split of one meta-gradient of ``method`` (``"ours"`` or a peer name, on
    ``bench``; or any ``call``)."""
    if call is None:
        est = C.make_estimator("Unrolled", bench.inner_steps, bench.spec)

        def call():
            return bench.ours(est) if method == "ours" else bench.peer(method)

    t0 = time.perf_counter()
    call()
    first = time.perf_counter() - t0
    call()
    t0 = time.perf_counter()
    call()
    wall = time.perf_counter() - t0
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        call()
    events = [(e.key, e.self_cpu_time_total, e.cpu_time_total, e.count)
              for e in prof.key_averages()]
    return {"method": method, "wall_s": wall, "first_call_s": first, **split_times(events)}


def markdown(record: dict) -> str:
    """The record as a Markdown page: the split per method, then each method's top ops and
    compiled regions."""
    lines = [f"# Where the Conv4 MAML meta-step's time goes ({record['device']}, "
             f"{record['date']})", "",
             f"`{record.get('command', '')}` · torch {record['torch']} · {record['threads']} "
             f"thread(s) · K = {record['inner_steps']}, {record['meta_batch']} tasks, Conv4-"
             f"{record['width']} · one profiled meta-gradient after warm-up", "",
             "| method | wall (s) | kernels | generated (compiled regions' own time) | rest | "
             "aten ops |", "|---|---|---|---|---|---|"]
    for r in record["methods"]:
        lines.append(f"| {r['method']} | {r['wall_s']:.3f} | {100 * r['kernel_share']:.1f}% | "
                     f"{100 * (r.get('generated_share') or 0):.1f}% | "
                     f"{100 * (r.get('rest_share') or 0):.1f}% | {r['ops']} |")
    for r in record["methods"]:
        lines += ["", f"## {r['method']}: top ops (self time)", "", "| op | share | calls |",
                  "|---|---|---|"]
        lines += [f"| `{t['op'][:90]}` | {100 * t['share']:.1f}% | {t['count']} |"
                  for t in r["top"]]
        if r.get("compiled_regions"):
            lines += ["", "| compiled region | inclusive (s) | self (s) | calls |",
                      "|---|---|---|---|"]
            lines += [f"| `{c['region'][:90]}` | {c['inclusive_s']:.3f} | {c['self_s']:.3f} | "
                      f"{c['calls']} |" for c in r["compiled_regions"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.profile",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--inner-steps", type=int, default=1)
    ap.add_argument("--meta-batch", type=int, default=16)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--peers", default="plain", help="comma-separated peers (default plain)")
    ap.add_argument("--methods", default=None,
                    help="comma-separated: compiled, eager (meta.MAML) and/or peers; replaces "
                    "ours + --peers")
    ap.add_argument("--kernel-profile", action="store_true",
                    help="itemise inductor's generated kernels (a fresh compilation)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--name", default="profile-conv4-maml-cpu")
    opts = ap.parse_args(argv)
    torch.set_num_threads(opts.threads)
    if opts.methods:
        if opts.kernel_profile:
            import torch._inductor.config as ic
            ic.cpp.enable_kernel_profile = True
        methods = [m.strip() for m in opts.methods.split(",") if m.strip()]
        rows = [profile_method(None, m, _learner_call(m, opts.inner_steps, opts.width,
                                                      opts.meta_batch)) for m in methods]
    else:
        bench = C.build("conv4_maml", opts.inner_steps, width=opts.width,
                        meta_batch=opts.meta_batch)
        methods = ["ours"] + [p.strip() for p in opts.peers.split(",") if p.strip()]
        rows = [profile_method(bench, m) for m in methods]
    record = {"case": "conv4_maml", "inner_steps": opts.inner_steps, "width": opts.width,
              "meta_batch": opts.meta_batch, "threads": opts.threads, "torch": torch.__version__,
              "device": "cpu", "cpu": platform.processor() or platform.machine(),
              "date": time.strftime("%Y-%m-%d"), "methods": rows,
              "command": "python -m benchmarks.profile " + " ".join(
                  argv if argv is not None else sys.argv[1:])}
    for r in rows:
        print(f"{r['method']:12s} wall {1e3 * r['wall_s']:7.0f} ms  kernels "
              f"{100 * r['kernel_share']:5.1f}%, generated {100 * r['generated_share']:5.1f}%"
              f" of profiled self time, {r['ops']} aten ops; "
              f"top: " + ", ".join(f"{t['op']} {100 * t['share']:.0f}%" for t in r["top"][:4]))
    out = Path(opts.out) / f"{opts.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1))
    out.with_suffix(".md").write_text(markdown(record))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
