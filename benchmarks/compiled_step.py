"""Compiled vs eager vs peers: the Conv4 MAML meta-gradient, one process per method.

    python -m benchmarks.compiled_step [--ks 1 5] [--tasks 16] [--width 64] [--repeats 5]
        [--methods compiled eager plain higher torchopt learn2learn] [--out DIR]

Each (K, method) runs in a fresh subprocess (``--one``), 1 thread, on the data and model of
the ``conv4_maml`` case (:func:`benchmarks.cases.build`: Omniglot-sized random tasks, 5-way
1-shot, 15 queries, 28x28, float32): ``first_call_s`` (for ``compiled``: tracing + code
generation + the first step), then ``--repeats`` timed meta-gradients (median). Every method's
meta-gradient is compared with ours-eager's on the same data (``rel_vs_eager``; the peers'
equality check, and the measured float32 agreement of the compiled step). Compile time =
first_call_s − time_s; break-even iterations = compile time / (eager − compiled). Methods run
K by K, interleaved; the parent writes JSON + Markdown with device, date and command.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

METHODS = ["compiled", "eager", "plain", "higher", "torchopt", "learn2learn"]
PEER_FN = {"plain": "meta_grad_plain", "higher": "meta_grad_higher",
           "torchopt": "meta_grad_torchopt", "learn2learn": "meta_grad_learn2learn"}
OUT = Path(__file__).resolve().parent / "results"


def _grads(method: str, bench, K: int):
    """A zero-argument callable returning the mean meta-gradient as a list of tensors."""
    import meta
    spec, model = bench.spec, bench.extra["model"]
    if method in ("compiled", "eager"):
        learner = meta.MAML(model, inner_lr=spec.inner_lr, inner_steps=K, vectorize=False,
                            compile=method == "compiled")
        names = [n for n, _ in model.named_parameters()]
        batch = bench.extra["batch"]

        def call():
            grads, _ = learner.meta_gradient(batch, accuracy=True)
            return [grads[n] for n in names]
        return call
    from benchmarks.peers import maml as peers
    fn = getattr(peers, PEER_FN[method])
    xs, ys, xq, yq = bench.extra["data"]

    def call_peer():
        out = fn(model, xs, ys, xq, yq, spec.inner_lr, K, first_order=False)
        return list(out.values()) if isinstance(out, dict) else list(out)
    return call_peer


def measure_one(method: str, K: int, tasks: int, width: int, repeats: int,
                ref: str | None) -> dict[str, Any]:
    import torch

    from benchmarks import cases
    torch.set_num_threads(1)
    record: dict[str, Any] = {"method": method, "K": K, "tasks": tasks, "width": width,
                              "threads": 1}
    bench = cases.build("conv4_maml", K, width, tasks, torch.float32, torch.device("cpu"))
    model = bench.extra["model"]
    import meta
    xs, ys, xq, yq = _case_data(model, tasks)
    bench.extra["data"] = (xs, ys, xq, yq)
    bench.extra["batch"] = meta.TaskBatch((xs, ys), (xq, yq))
    if method in PEER_FN:
        from benchmarks.peers.maml import available_peers
        ok, why = available_peers().get(method, (True, ""))
        record["peer_version"] = why
        if not ok:
            record.update(status="skipped", reason=why)
            return record
    call = _grads(method, bench, K)
    t0 = time.perf_counter()
    g = call()
    record["first_call_s"] = time.perf_counter() - t0
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        g = call()
        samples.append(time.perf_counter() - t0)
    record["time_s"] = statistics.median(samples)
    record["time_samples"] = [round(s, 4) for s in samples]
    flat = torch.cat([x.detach().reshape(-1).double() for x in g])
    path = Path(ref) if ref else None
    if method == "eager" and path is not None:
        torch.save(flat, path)
    if path is not None and path.exists():
        r = torch.load(path)
        record["rel_vs_eager"] = float((flat - r).norm() / r.norm())
    record["params"] = sum(p.numel() for p in model.parameters())
    record["status"] = "ok"
    return record


def interleaved(methods: list[str], K: int, tasks: int, width: int, rounds: int
                ) -> list[dict[str, Any]]:
    """All methods in ONE process: each is warmed (the compiled one compiles), then
    ``rounds`` rounds call every method once in turn (the same load for all), medians."""
    import torch

    from benchmarks import cases
    from benchmarks.peers.maml import available_peers
    torch.set_num_threads(1)
    bench = cases.build("conv4_maml", K, width, tasks, torch.float32, torch.device("cpu"))
    import meta
    xs, ys, xq, yq = _case_data(bench.extra["model"], tasks)
    bench.extra["data"] = (xs, ys, xq, yq)
    bench.extra["batch"] = meta.TaskBatch((xs, ys), (xq, yq))
    peers = available_peers()
    calls, records = {}, {}
    for m in methods:
        rec: dict[str, Any] = {"method": m, "K": K, "tasks": tasks, "width": width,
                               "threads": 1, "protocol": "interleaved"}
        if m in PEER_FN:
            ok, why = peers.get(m, (True, ""))
            rec["peer_version"] = why
            if not ok:
                rec.update(status="skipped", reason=why)
                records[m] = rec
                continue
        calls[m] = _grads(m, bench, K)
        t0 = time.perf_counter()
        g = calls[m]()
        rec["first_call_s"] = time.perf_counter() - t0
        rec["flat"] = torch.cat([x.detach().reshape(-1).double() for x in g])
        rec["samples"] = []
        records[m] = rec
        print(f"# warmed {m}: {rec['first_call_s']:.1f} s", file=sys.stderr, flush=True)
    for _ in range(rounds):
        for m in calls:
            t0 = time.perf_counter()
            calls[m]()
            records[m]["samples"].append(time.perf_counter() - t0)
    ref = records["eager"]["flat"] if "eager" in calls else None
    out = []
    for rec in records.values():
        if "samples" in rec:
            rec["time_s"] = statistics.median(rec["samples"])
            rec["time_samples"] = [round(x, 4) for x in rec.pop("samples")]
            flat = rec.pop("flat")
            if ref is not None:
                rec["rel_vs_eager"] = float((flat - ref).norm() / ref.norm())
            rec["status"] = "ok"
        out.append(rec)
    return out


def _case_data(model, tasks: int):
    """The case's episodes (:func:`benchmarks.cases.omniglot_like`, seed 0) in the model's
    dtype."""
    import torch

    from benchmarks.cases import omniglot_like
    gen = torch.Generator().manual_seed(0)
    data = omniglot_like(gen, tasks)
    p = next(model.parameters())
    return tuple(t.to(p.device, p.dtype) if t.is_floating_point() else t.to(p.device)
                 for t in data)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 5])
    ap.add_argument("--tasks", type=int, default=16)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--one", nargs=2, metavar=("METHOD", "K"))
    ap.add_argument("--ref")
    ap.add_argument("--interleave", type=int, default=0, metavar="ROUNDS",
                    help="one process per K, all methods interleaved for ROUNDS rounds")
    args = ap.parse_args(argv)
    if args.one:
        rec = measure_one(args.one[0], int(args.one[1]), args.tasks, args.width, args.repeats,
                          args.ref)
        print(json.dumps(rec))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.timezone.utc)
    records = []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    order = ["eager"] + [m for m in args.methods if m != "eager"]
    for K in (args.ks if args.interleave else []):
        for rec in interleaved(order, K, args.tasks, args.width, args.interleave):
            rec["loadavg"] = round(os.getloadavg()[0], 2)
            records.append(rec)
            print(json.dumps(rec), flush=True)
    for K in ([] if args.interleave else args.ks):
        ref = args.out / f".ref_compiled_step_K{K}_B{args.tasks}_w{args.width}.pt"
        for method in order:
            cmd = [sys.executable, "-m", "benchmarks.compiled_step", "--one", method, str(K),
                   "--tasks", str(args.tasks), "--width", str(args.width), "--repeats",
                   str(args.repeats), "--ref", str(ref)]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            try:
                rec = json.loads(proc.stdout.strip().splitlines()[-1])
            except (json.JSONDecodeError, IndexError):
                rec = {"method": method, "K": K, "status": "error",
                       "reason": proc.stderr[-2000:]}
            rec["wall_s"] = round(time.perf_counter() - t0, 1)
            rec["loadavg"] = round(os.getloadavg()[0], 2)
            records.append(rec)
            print(json.dumps(rec), flush=True)
    meta = {"device": "shared 2-core CPU (other jobs running)", "date": stamp.isoformat(),
            "command": "python -m benchmarks.compiled_step " + " ".join(argv or sys.argv[1:]),
            "torch": __import__("torch").__version__, "python": platform.python_version(),
            "threads": 1}
    name = f"compiled_step_B{args.tasks}_w{args.width}" + (
        f"_interleaved_K{'-'.join(map(str, args.ks))}" if args.interleave else "")
    (args.out / f"{name}.json").write_text(json.dumps({"meta": meta, "records": records},
                                                      indent=1))
    (args.out / f"{name}.md").write_text(markdown(meta, records))
    return 0


def markdown(meta: dict, records: list[dict]) -> str:
    lines = [f"# Compiled Conv4 MAML meta-gradient ({meta['device']}, {meta['date'][:10]})", "",
             f"`{meta['command']}` · torch {meta['torch']} · 1 thread · float32 · "
             f"5-way 1-shot, 15 queries, 28x28", "",
             "| K | method | time (s) | vs fastest peer | first call (s) | compile (s) | "
             "break-even iters | rel. diff vs ours-eager |",
             "|---|---|---|---|---|---|---|---|"]
    for K in sorted({r["K"] for r in records}):
        rows = [r for r in records if r["K"] == K and r.get("status") == "ok"]
        peers = [r["time_s"] for r in rows if r["method"] in PEER_FN]
        fastest = min(peers) if peers else None
        eager = next((r for r in rows if r["method"] == "eager"), None)
        for r in rows:
            ratio = f"{r['time_s'] / fastest:.2f}" if fastest else "-"
            comp = be = "-"
            if r["method"] == "compiled":
                c = r["first_call_s"] - r["time_s"]
                comp = f"{c:.0f}"
                if eager and eager["time_s"] > r["time_s"]:
                    be = f"{c / (eager['time_s'] - r['time_s']):.0f}"
                else:
                    be = "never"
            rel = r.get("rel_vs_eager")
            lines.append(f"| {K} | {r['method']} | {r['time_s']:.3f} | {ratio} | "
                         f"{r['first_call_s']:.1f} | {comp} | {be} | "
                         f"{'-' if rel is None else f'{rel:.1e}'} |")
        for r in records:
            if r["K"] == K and r.get("status") != "ok":
                lines.append(f"| {K} | {r['method']} | {r.get('status')}: "
                             f"{str(r.get('reason', ''))[:80]} | | | | | |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
