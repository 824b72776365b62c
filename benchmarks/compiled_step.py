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


# extra variants of ours (``--methods``): (compile= of meta.MAML, channels-last weights,
# torch._inductor.config patched around every call)
VARIANTS: dict[str, tuple[Any, bool, dict]] = {
    "compiled": (True, False, {}),
    "eager": (False, False, {}),
    "compiled-cl": (True, True, {}),
    "eager-cl": (False, True, {}),
    "compiled-maxat": ({"mode": "max-autotune-no-cudagraphs"}, False, {}),
    "compiled-cppwrapper": (True, False, {"cpp_wrapper": True}),
    "compiled-aggressive": (True, False, {"aggressive_fusion": True}),
}


def break_even(compile_s: float, other_s: float, compiled_s: float) -> float | None:
    """Iterations after which compiling pays: compile time / time saved per step (None: never)."""
    gain = other_s - compiled_s
    return compile_s / gain if gain > 0 else None


def _grads(method: str, bench, K: int):
    """A zero-argument callable returning the mean meta-gradient as a list of tensors."""
    import meta
    spec, model = bench.spec, bench.extra["model"]
    if method in VARIANTS:
        import contextlib
        import copy

        import torch
        compile_opt, channels_last, patch = VARIANTS[method]
        if channels_last:
            model = copy.deepcopy(model).to(memory_format=torch.channels_last)
        learner = meta.MAML(model, inner_lr=spec.inner_lr, inner_steps=K, vectorize=False,
                            compile=compile_opt)
        names = [n for n, _ in model.named_parameters()]
        batch = bench.extra["batch"]

        def ctx():
            if not patch:
                return contextlib.nullcontext()
            import torch._inductor.config as ic
            return ic.patch(patch)

        def call():
            with ctx():
                grads, _ = learner.meta_gradient(batch, accuracy=True)
            return [grads[n] for n in names]
        return call
    from benchmarks.peers import maml as peers
    if method.endswith("-cl"):  # a peer on the channels-last model (weights NHWC)
        import copy

        import torch
        model = copy.deepcopy(model).to(memory_format=torch.channels_last)
        method = method[:-3]
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
        if m in PEER_FN or m.removesuffix("-cl") in PEER_FN:
            ok, why = peers.get(m.removesuffix("-cl"), (True, ""))
            rec["peer_version"] = why
            if not ok:
                rec.update(status="skipped", reason=why)
                records[m] = rec
                continue
        calls[m] = _grads(m, bench, K)
        records[m] = rec
    return time_interleaved(calls, records, rounds)


def time_interleaved(calls: dict[str, Any], records: dict[str, dict], rounds: int,
                     ref: str = "eager") -> list[dict[str, Any]]:
    """Warm every zero-argument ``calls[m]`` (returning a list of gradient tensors) once
    (``first_call_s``: for a compiled one, tracing + code generation + the first call), then
    ``rounds`` rounds that call every method once in turn (the same load for all); median
    ``time_s``, the samples, and ``rel_vs_eager`` = ‖g − g_ref‖ / ‖g_ref‖ (float64) against
    ``calls[ref]``'s first result. ``records[m]`` (updated in place, returned in order) holds
    each method's labels; methods in ``records`` but not in ``calls`` pass through."""
    import torch
    flats = {}
    for m, call in calls.items():
        rec = records[m]
        t0 = time.perf_counter()
        g = call()
        rec["first_call_s"] = time.perf_counter() - t0
        flats[m] = torch.cat([x.detach().reshape(-1).double() for x in g])
        rec["samples"] = []
        print(f"# warmed {m}: {rec['first_call_s']:.1f} s", file=sys.stderr, flush=True)
    for _ in range(rounds):
        for m in calls:
            t0 = time.perf_counter()
            calls[m]()
            records[m]["samples"].append(time.perf_counter() - t0)
    refv = flats.get(ref)
    out = []
    for m, rec in records.items():
        if "samples" in rec:
            rec["time_s"] = statistics.median(rec["samples"])
            rec["time_samples"] = [round(x, 4) for x in rec.pop("samples")]
            if refv is not None:
                rec["rel_vs_eager"] = float((flats[m] - refv).norm() / refv.norm())
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
    ap.add_argument("--tasks", type=int, nargs="+", default=[16])
    ap.add_argument("--width", type=int, nargs="+", default=[64])
    ap.add_argument("--name", help="output stem (default: compiled_step_B.._w.. for one "
                    "configuration, compiled-step-grid-cpu for several)")
    ap.add_argument("--grid", action="store_true",
                    help="the grid protocol and combined output even for one (tasks, width)")
    ap.add_argument("--config", nargs=3, type=int, metavar=("K", "TASKS", "WIDTH"),
                    help=argparse.SUPPRESS)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--methods", nargs="+", default=METHODS,
                    help=f"any of {METHODS + [v for v in VARIANTS if v not in METHODS]}")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--one", nargs=2, metavar=("METHOD", "K"))
    ap.add_argument("--ref")
    ap.add_argument("--interleave", type=int, default=0, metavar="ROUNDS",
                    help="one process per K, all methods interleaved for ROUNDS rounds")
    args = ap.parse_args(argv)
    if args.one:
        rec = measure_one(args.one[0], int(args.one[1]), args.tasks[0], args.width[0],
                          args.repeats, args.ref)
        print(json.dumps(rec))
        return 0
    order = ["eager"] + [m for m in args.methods if m != "eager"]
    if args.config:  # one interleaved configuration in this (fresh) process
        K, tasks, width = args.config
        for rec in interleaved(order, K, tasks, width, args.interleave):
            rec["loadavg"] = round(os.getloadavg()[0], 2)
            print(json.dumps(rec), flush=True)
        return 0
    if args.grid or len(args.tasks) > 1 or len(args.width) > 1:
        return grid(args, argv)
    args.tasks, args.width = args.tasks[0], args.width[0]
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.timezone.utc)
    records = []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
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
    name = args.name or f"compiled_step_B{args.tasks}_w{args.width}" + (
        f"_interleaved_K{'-'.join(map(str, args.ks))}" if args.interleave else "")
    (args.out / f"{name}.json").write_text(json.dumps({"meta": meta, "records": records},
                                                      indent=1))
    (args.out / f"{name}.md").write_text(markdown(meta, records))
    return 0


def grid(args, argv) -> int:
    """Every (width, tasks, K) configuration, each in a fresh interpreter (so that no
    compiled graph or dynamo's automatic-dynamic shape marking carries from one to the next),
    all methods interleaved inside it; the combined JSON + Markdown + plot are rewritten after
    every configuration, so a partial run leaves its finished rows behind."""
    rounds = args.interleave or args.repeats
    stamp = dt.datetime.now(dt.timezone.utc)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    name = args.name or "compiled-step-grid-cpu"
    meta = {"device": "shared 2-core CPU (other jobs running)", "date": stamp.isoformat(),
            "command": "python -m benchmarks.compiled_step " + " ".join(argv or sys.argv[1:]),
            "torch": __import__("torch").__version__, "python": platform.python_version(),
            "threads": 1, "protocol": f"interleaved, {rounds} rounds, one process per "
            "configuration", "configs": []}
    records: list[dict] = []
    configs = [(w, b, K) for w in args.width for b in args.tasks for K in args.ks]
    for w, b, K in configs:
        cmd = [sys.executable, "-m", "benchmarks.compiled_step", "--config", str(K), str(b),
               str(w), "--interleave", str(rounds), "--methods", *args.methods]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        got = []
        for line in proc.stdout.splitlines():
            if line.startswith("{"):
                got.append(json.loads(line))
        if not got:
            got = [{"method": "all", "K": K, "tasks": b, "width": w, "status": "error",
                    "reason": proc.stderr[-2000:]}]
        wall = round(time.perf_counter() - t0, 1)
        for rec in got:
            rec["config_wall_s"] = wall
        records.extend(got)
        meta["configs"].append({"K": K, "tasks": b, "width": w, "wall_s": wall,
                                "finished": dt.datetime.now(dt.timezone.utc).isoformat()})
        print(f"# config K={K} tasks={b} width={w}: {wall:.0f} s", file=sys.stderr, flush=True)
        write_grid(args.out, name, meta, records, len(configs))
    return 0


def _is_peer(method: str) -> bool:
    """A peer, in the default layout or channels-last (``<peer>-cl``)."""
    return method.removesuffix("-cl") in PEER_FN


def summarise(records: list[dict]) -> list[dict]:
    """One row per (width, tasks, K): compiled and eager time, the fastest peer (name and
    time), compiled / fastest-peer and compiled / eager ratios, compile time (first call −
    steady step) and break-even iterations against eager and against the fastest peer
    (``None`` when compiling never pays). Pure: records in, rows out."""
    rows = []
    keys = sorted({(r.get("width"), r.get("tasks"), r["K"]) for r in records},
                  key=lambda k: tuple(-1 if x is None else x for x in k))
    for w, b, K in keys:
        ok = {r["method"]: r for r in records if (r.get("width"), r.get("tasks"), r["K"])
              == (w, b, K) and r.get("status") == "ok"}
        peers = {m: r["time_s"] for m, r in ok.items() if _is_peer(m)}
        comp, eag = ok.get("compiled"), ok.get("eager")
        row: dict[str, Any] = {"width": w, "tasks": b, "K": K}
        if peers:
            best = min(peers, key=peers.get)
            row.update(fastest_peer=best, fastest_peer_s=peers[best])
        if comp:
            c = comp["first_call_s"] - comp["time_s"]
            row.update(compiled_s=comp["time_s"], compile_s=c,
                       compiled_rel_vs_eager=comp.get("rel_vs_eager"))
            if peers:
                row["ratio_vs_fastest_peer"] = comp["time_s"] / row["fastest_peer_s"]
                row["break_even_vs_peer"] = break_even(c, row["fastest_peer_s"], comp["time_s"])
            if eag:
                row["ratio_vs_eager"] = comp["time_s"] / eag["time_s"]
                row["break_even_vs_eager"] = break_even(c, eag["time_s"], comp["time_s"])
        if eag:
            row["eager_s"] = eag["time_s"]
        variants = {m: r["time_s"] for m, r in ok.items() if m.startswith("compiled")}
        if variants and peers:
            bestc = min(variants, key=variants.get)
            row.update(best_compiled=bestc, best_compiled_s=variants[bestc],
                       best_compiled_vs_fastest_peer=variants[bestc] / row["fastest_peer_s"])
        rels = [r.get("rel_vs_eager") for m, r in ok.items() if _is_peer(m)]
        rels = [x for x in rels if x is not None]
        row["peers_max_rel_vs_eager"] = max(rels) if rels else None
        rows.append(row)
    return rows


def _fmt(x, spec: str = ".2f", none: str = "-") -> str:
    return none if x is None else format(x, spec)


def grid_markdown(meta: dict, records: list[dict], n_configs: int | None = None) -> str:
    """The grid's summary table (one row per configuration) followed by every method's time
    per configuration."""
    rows = summarise(records)
    done = len({(r.get("width"), r.get("tasks"), r["K"]) for r in records})
    lines = [f"# Compiled Conv4 MAML meta-step, grid ({meta['device']}, {meta['date'][:10]})",
             "", f"`{meta['command']}` · torch {meta['torch']} · 1 thread · float32 · "
             f"5-way 1-shot, 15 queries, 28x28 · {meta.get('protocol', '')}", ""]
    if n_configs is not None and done < n_configs:
        lines += [f"**PARTIAL: {done} of {n_configs} configurations finished.**", ""]
    lines += ["Target (issue 12): compiled / fastest peer <= 0.67 at Conv4-64, 16 tasks, "
              "K = 1 and 5. Compile = first call − steady step; break-even = compile / "
              "(other − compiled) iterations.", "",
              "| width | tasks | K | compiled (s) | eager (s) | fastest peer (s) | "
              "compiled / fastest peer | compiled / eager | compile (s) | "
              "break-even vs eager | break-even vs peer | compiled rel. diff | "
              "peers max rel. diff | best compiled variant / fastest peer |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        peer = (f"{r['fastest_peer_s']:.3f} ({r['fastest_peer']})" if "fastest_peer" in r
                else "-")
        be_e = ("never" if "compiled_s" in r and "eager_s" in r and
                r.get("break_even_vs_eager") is None else _fmt(r.get("break_even_vs_eager"),
                                                               ".0f"))
        be_p = ("never" if "compiled_s" in r and "fastest_peer" in r and
                r.get("break_even_vs_peer") is None else _fmt(r.get("break_even_vs_peer"),
                                                              ".0f"))
        lines.append(
            f"| {r['width']} | {r['tasks']} | {r['K']} | {_fmt(r.get('compiled_s'), '.3f')} | "
            f"{_fmt(r.get('eager_s'), '.3f')} | {peer} | "
            f"{_fmt(r.get('ratio_vs_fastest_peer'))} | {_fmt(r.get('ratio_vs_eager'))} | "
            f"{_fmt(r.get('compile_s'), '.0f')} | {be_e} | {be_p} | "
            f"{_fmt(r.get('compiled_rel_vs_eager'), '.1e')} | "
            f"{_fmt(r.get('peers_max_rel_vs_eager'), '.1e')} | "
            + (f"{r['best_compiled_vs_fastest_peer']:.2f} ({r['best_compiled']})"
               if "best_compiled" in r else "-") + " |")
    lines += ["", "## Every method", "",
              "| width | tasks | K | method | time (s) | vs fastest peer | first call (s) | "
              "rel. diff vs ours-eager | samples (s) |", "|---|---|---|---|---|---|---|---|---|"]
    by = {(r["width"], r["tasks"], r["K"]): r for r in rows}
    for rec in records:
        key = (rec.get("width"), rec.get("tasks"), rec["K"])
        if rec.get("status") != "ok":
            lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {rec['method']} | "
                         f"{rec.get('status')}: {str(rec.get('reason', ''))[-80:]!r} "
                         "| | | | |")
            continue
        fp = by.get(key, {}).get("fastest_peer_s")
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {rec['method']} | "
                     f"{rec['time_s']:.3f} | {_fmt(rec['time_s'] / fp if fp else None)} | "
                     f"{rec['first_call_s']:.1f} | {_fmt(rec.get('rel_vs_eager'), '.1e')} | "
                     f"{' '.join(f'{x:.2f}' for x in rec.get('time_samples', []))} |")
    return "\n".join(lines) + "\n"


def plot_grid(rows: list[dict], path: Path) -> bool:
    """Bar chart of compiled / fastest-peer per configuration, with the 0.67 target and
    parity lines. Returns False (and writes nothing) without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in rows if "ratio_vs_fastest_peer" in r]
    if not rows:
        return False
    labels = [f"w{r['width']} B{r['tasks']} K{r['K']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(5, 0.8 * len(rows) + 2), 3.6))
    vals = [r["ratio_vs_fastest_peer"] for r in rows]
    ax.bar(range(len(rows)), vals, color=["tab:green" if v <= 0.67 else "tab:blue"
                                         for v in vals])
    for i, v in enumerate(vals):
        ax.text(i, v + 0.01, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
    ax.axhline(1.0, color="grey", lw=1, ls="--", label="parity")
    ax.axhline(0.67, color="tab:red", lw=1, ls=":", label="target 0.67")
    ax.set_xticks(range(len(rows)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("compiled / fastest peer (time)")
    ax.set_title("Conv4 MAML meta-step, CPU 1 thread")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_grid(out: Path, name: str, meta: dict, records: list[dict],
               n_configs: int | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rows = summarise(records)
    (out / f"{name}.json").write_text(json.dumps(
        {"meta": meta, "summary": rows, "records": records}, indent=1))
    (out / f"{name}.md").write_text(grid_markdown(meta, records, n_configs))
    plot_grid(rows, out / f"{name}.png")


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
