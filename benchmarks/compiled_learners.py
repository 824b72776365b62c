"""Compiled vs eager vs a plain autograd loop: iMAML, ANIL and the memory-reduced learner.

    python -m benchmarks.compiled_learners [--learners anil memoryreduced imaml] [--tasks 16]
        [--width 32] [--rounds 5] [--name compiled-learners-cpu]

Each learner runs in a fresh interpreter (one compiled graph per learner, no state carried),
1 thread, on the ``conv4_maml`` data and model (:func:`benchmarks.cases.build`, the data of
:func:`benchmarks.compiled_step._case_data`: Omniglot-sized random tasks, 5-way 1-shot, 15
queries, 28x28, float32), each learner at its defaults (``meta.make_learner``). Three methods:
``compiled`` (``compile=True``), ``eager``, and ``plain``: the same meta-gradient written by
hand with ``torch.func.functional_call`` + ``torch.autograd.grad`` (below), checked against
ours-eager first (``rel_vs_eager``). Protocol: :func:`benchmarks.compiled_step.time_interleaved`
(every method warmed, then ``--rounds`` interleaved rounds, medians). Compile time = first
call − steady step; break-even = compile / (eager − compiled). Writes ``<name>.json`` and
``<name>.md`` (rewritten after every learner, so a partial run keeps its rows).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .compiled_step import OUT, _case_data, _fmt, break_even, time_interleaved

LEARNERS = ["anil", "memoryreduced", "imaml"]


# ------------------------------------------------------------------ plain autograd loops

def _split(model):
    """(backbone names, head names, params dict, frozen buffers) of a Conv4."""
    params = dict(model.named_parameters())
    head = [n for n in params if n.startswith("head.")]
    body = [n for n in params if not n.startswith("head.")]
    return body, head, params, dict(model.named_buffers())


def _features(model, params, buffers, x):
    from torch.func import functional_call
    sub = {n[len("features."):]: t for n, t in {**params, **buffers}.items()
           if n.startswith("features.")}
    return functional_call(model.features, sub, (x,))


def _cg(matvec, b, iters, growth: float = 1e4):
    """Plain CG from 0, ``iters`` steps, the last iterate (lists of tensors); on a breakdown
    (curvature p·Ap <= 100·eps·max(p·Ap/p·p)·p·p, or the residual grown by ``growth`` over the
    best seen) it stops and, as ``bl.CG`` does, returns the least-residual iterate seen (0
    included); so does it when the last residual exceeds the first."""
    import torch
    eps = 100 * torch.finfo(b[0].dtype).eps
    x = [torch.zeros_like(t) for t in b]
    r = [t.clone() for t in b]
    p = [t.clone() for t in r]
    rs = rs0 = rs_best = sum((t * t).sum() for t in r)
    x_best, broke, curv = x, False, 0.0
    for _ in range(iters):
        Ap = matvec(p)
        pAp, pp = sum((a * q).sum() for a, q in zip(p, Ap)), sum((q * q).sum() for q in p)
        curv = max(curv, float(pAp / pp))
        if pAp <= eps * curv * pp:
            broke = True
            break
        alpha = rs / pAp
        x = [xi + alpha * pi for xi, pi in zip(x, p)]
        r = [ri - alpha * ai for ri, ai in zip(r, Ap)]
        rs_new = sum((t * t).sum() for t in r)
        if not rs_new <= growth ** 2 * rs_best:
            broke = True
            break
        if rs_new < rs_best:
            x_best, rs_best = x, rs_new
        p = [ri + (rs_new / rs) * pi for ri, pi in zip(r, p)]
        rs = rs_new
    return x if not broke and rs <= rs0 else x_best


def plain_anil(model, data, lr: float, steps: int):
    """ANIL: backbone features once per task, ``steps`` second-order GD steps on the linear
    head (create_graph), query loss at the adapted head, gradient w.r.t. every parameter."""
    import torch
    import torch.nn.functional as F
    xs, ys, xq, yq = data
    body, head, params, buffers = _split(model)
    names = body + head
    tasks = xs.shape[0]
    total = [torch.zeros_like(params[n]) for n in names]
    for t in range(tasks):
        fs = _features(model, params, buffers, xs[t])
        fq = _features(model, params, buffers, xq[t])
        w, b = params["head.weight"], params["head.bias"]
        for _ in range(steps):
            gw, gb = torch.autograd.grad(F.cross_entropy(F.linear(fs, w, b), ys[t]), (w, b),
                                         create_graph=True)
            w, b = w - lr * gw, b - lr * gb
        loss = F.cross_entropy(F.linear(fq, w, b), yq[t]) / tasks
        for acc, g in zip(total, torch.autograd.grad(loss, [params[n] for n in names])):
            acc.add_(g)
    return dict(zip(names, total))


def plain_memoryreduced(model, data, lr: float, steps: int, cg_iters: int, damping: float):
    """Memory-reduced (history-free): head from the model's fixed init, ``steps`` GD steps on
    detached support features (no graph), v = CG_N(H + μI, ∇_y f) at y_T (H = the head's
    support-loss Hessian), meta-gradient of the backbone
    ∇_x f(x, y_T) − ∇²_xy g(x, y_T)·v = ∇_x [f(F_q(x), y_T) − ⟨∇_y g(F_s(x), y_T), v⟩]."""
    import torch
    import torch.nn.functional as F
    xs, ys, xq, yq = data
    body, head, params, buffers = _split(model)
    tasks = xs.shape[0]
    total = [torch.zeros_like(params[n]) for n in body]
    for t in range(tasks):
        fs = _features(model, params, buffers, xs[t])
        fq = _features(model, params, buffers, xq[t])
        y = [params["head.weight"].detach(), params["head.bias"].detach()]
        fs0 = fs.detach()
        for _ in range(steps):
            y = [v.requires_grad_() for v in y]
            g = torch.autograd.grad(F.cross_entropy(F.linear(fs0, *y), ys[t]), y)
            y = [(v - lr * gv).detach() for v, gv in zip(y, g)]
        y = [v.requires_grad_() for v in y]
        gy_s = torch.autograd.grad(F.cross_entropy(F.linear(fs0, *y), ys[t]), y,
                                   create_graph=True)

        def hvp(v, gy_s=gy_s, y=y):
            hv = torch.autograd.grad(gy_s, y, v, retain_graph=True)
            return [a + damping * b for a, b in zip(hv, v)]
        fq_loss = F.cross_entropy(F.linear(fq, *y), yq[t])
        gy_f = torch.autograd.grad(fq_loss, y, retain_graph=True)
        v = [a.detach() for a in _cg(hvp, list(gy_f), cg_iters)]
        gy_x = torch.autograd.grad(F.cross_entropy(F.linear(fs, *y), ys[t]), y,
                                   create_graph=True)
        obj = (fq_loss - sum((a * b).sum() for a, b in zip(gy_x, v))) / tasks
        for acc, g in zip(total, torch.autograd.grad(obj, [params[n] for n in body])):
            acc.add_(g)
    return dict(zip(body, total))


def plain_imaml(model, data, lr: float, steps: int, reg: float, cg_iters: int):
    """iMAML (paper form): φ from θ by ``steps`` GD steps on L^s(φ) + reg/2‖φ − θ‖² (no graph),
    v = CG(H + reg·I, ∇L^q(φ_K)) with ``cg_iters`` steps (H = ∇²L^s at φ_K), meta-gradient
    reg·v = (I + H/reg)⁻¹∇L^q (averaged over tasks)."""
    import torch
    import torch.nn.functional as F
    from torch.func import functional_call
    xs, ys, xq, yq = data
    names = [n for n, _ in model.named_parameters()]
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    theta = [params[n].detach() for n in names]
    tasks = xs.shape[0]

    def loss(phi, x, y):
        return F.cross_entropy(functional_call(model, {**buffers, **dict(zip(names, phi))},
                                               (x,)), y)
    total = [torch.zeros_like(t) for t in theta]
    for t in range(tasks):
        phi = list(theta)
        for _ in range(steps):
            phi = [p.requires_grad_() for p in phi]
            g = torch.autograd.grad(loss(phi, xs[t], ys[t]), phi)
            phi = [(p - lr * (gp + reg * (p - th))).detach()
                   for p, gp, th in zip(phi, g, theta)]
        phi = [p.requires_grad_() for p in phi]
        gs = torch.autograd.grad(loss(phi, xs[t], ys[t]), phi, create_graph=True)

        def hvp(v, gs=gs, phi=phi):
            hv = torch.autograd.grad(gs, phi, v, retain_graph=True)
            return [a + reg * b for a, b in zip(hv, v)]
        gq = torch.autograd.grad(loss(phi, xq[t], yq[t]), phi)
        v = _cg(hvp, list(gq), cg_iters)
        for acc, vi in zip(total, v):
            acc.add_(reg * vi.detach() / tasks)
    return dict(zip(names, total))


# ------------------------------------------------------------------ one learner, one process

def run_learner(name: str, tasks: int, width: int, rounds: int) -> list[dict[str, Any]]:
    import torch

    import meta
    from benchmarks import cases
    torch.set_num_threads(1)
    bench = cases.build("conv4_maml", 1, width, tasks, torch.float32, torch.device("cpu"))
    model = bench.extra["model"]
    data = _case_data(model, tasks)
    batch = meta.TaskBatch(data[:2], data[2:])
    learners = {m: meta.make_learner(name, model, vectorize=False, compile=m == "compiled")
                for m in ("compiled", "eager")}
    ref = learners["eager"]
    keys = list(ref.meta_gradient(batch)[0])

    def ours(learner):
        def call():
            grads, _ = learner.meta_gradient(batch, accuracy=True)
            return [grads[k] for k in keys]
        return call
    if name == "anil":
        def plain():
            return plain_anil(model, data, ref.inner_lr, ref.inner_steps)
    elif name == "memoryreduced":
        def plain():
            return plain_memoryreduced(model, data, ref.inner_lr, ref.inner_steps,
                                       ref.cg_iters, ref.damping)
    elif name == "imaml":
        def plain():
            return plain_imaml(model, data, ref.inner_lr, ref.inner_steps, ref.reg,
                               ref.cg_iters)
    else:
        raise SystemExit(f"no plain loop for {name!r}; known: {LEARNERS}")
    calls = {"eager": ours(learners["eager"]), "compiled": ours(learners["compiled"]),
             "plain": lambda: (lambda g: [g[k] for k in keys])(plain())}
    est = ref.estimator
    label = {"learner": name, "tasks": tasks, "width": width, "threads": 1,
             "inner_steps": ref.inner_steps, "inner_lr": ref.inner_lr,
             "estimator": repr(est) if est is not None else None}
    records = {m: {"method": m, **label} for m in calls}
    return time_interleaved(calls, records, rounds)


def summarise(records: list[dict]) -> list[dict]:
    """One row per learner: compiled / eager / plain times, ratios, compile time, break-even
    (``None`` = never), relative differences. Pure."""
    rows = []
    for name in dict.fromkeys(r["learner"] for r in records):
        ok = {r["method"]: r for r in records if r["learner"] == name
              and r.get("status") == "ok"}
        row: dict[str, Any] = {"learner": name}
        for m, r in ok.items():
            row[f"{m}_s"] = r["time_s"]
            row[f"{m}_rel_vs_eager"] = r.get("rel_vs_eager")
        c, e, p = ok.get("compiled"), ok.get("eager"), ok.get("plain")
        if c:
            comp = c["first_call_s"] - c["time_s"]
            row["compile_s"] = comp
            if e:
                row["compiled_vs_eager"] = c["time_s"] / e["time_s"]
                row["break_even_vs_eager"] = break_even(comp, e["time_s"], c["time_s"])
            if p:
                row["compiled_vs_plain"] = c["time_s"] / p["time_s"]
                row["break_even_vs_plain"] = break_even(comp, p["time_s"], c["time_s"])
        if e and p:
            row["eager_vs_plain"] = e["time_s"] / p["time_s"]
        rows.append(row)
    return rows


def markdown(meta: dict, records: list[dict], n_learners: int | None = None) -> str:
    rows = summarise(records)
    lines = [f"# Compiled learners: iMAML, ANIL, memory-reduced ({meta['device']}, "
             f"{meta['date'][:10]})", "",
             f"`{meta['command']}` · torch {meta['torch']} · 1 thread · float32 · Conv4-"
             f"{meta['width']}, {meta['tasks']} tasks 5-way 1-shot, 15 queries, 28x28 · "
             f"{meta['protocol']}", ""]
    if n_learners is not None and len(rows) < n_learners:
        lines += [f"**PARTIAL: {len(rows)} of {n_learners} learners finished.**", ""]
    lines += ["| learner | compiled (s) | eager (s) | plain (s) | compiled / plain | "
              "compiled / eager | eager / plain | compile (s) | break-even vs eager | "
              "break-even vs plain | compiled rel. diff | plain rel. diff |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        def be(key, have, r=r):
            return "never" if have and r.get(key) is None else _fmt(r.get(key), ".0f")
        lines.append(
            f"| {r['learner']} | {_fmt(r.get('compiled_s'), '.3f')} | "
            f"{_fmt(r.get('eager_s'), '.3f')} | {_fmt(r.get('plain_s'), '.3f')} | "
            f"{_fmt(r.get('compiled_vs_plain'))} | {_fmt(r.get('compiled_vs_eager'))} | "
            f"{_fmt(r.get('eager_vs_plain'))} | {_fmt(r.get('compile_s'), '.0f')} | "
            f"{be('break_even_vs_eager', 'compiled_vs_eager' in r)} | "
            f"{be('break_even_vs_plain', 'compiled_vs_plain' in r)} | "
            f"{_fmt(r.get('compiled_rel_vs_eager'), '.1e')} | "
            f"{_fmt(r.get('plain_rel_vs_eager'), '.1e')} |")
    bad = [r for r in records if r.get("status") != "ok"]
    for r in bad:
        lines.append(f"| {r['learner']} | {r.get('status')}: "
                     f"{str(r.get('reason', ''))[-100:]!r} | | | | | | | | | | |")
    lines += ["", "Learners at their defaults (`meta.make_learner`, `vectorize=False`): "
              "estimators " + "; ".join(sorted({f"{r['learner']}: {r.get('estimator')}, K = "
                                                f"{r.get('inner_steps')}" for r in records
                                                if r.get("status") == "ok"})) + "."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.compiled_learners",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--learners", nargs="+", default=LEARNERS)
    ap.add_argument("--tasks", type=int, default=16)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--name", default="compiled-learners-cpu")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        for rec in run_learner(args.one, args.tasks, args.width, args.rounds):
            print(json.dumps(rec), flush=True)
        return 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    meta = {"device": "shared 2-core CPU (other jobs running)",
            "date": dt.datetime.now(dt.timezone.utc).isoformat(),
            "command": "python -m benchmarks.compiled_learners " + " ".join(
                argv if argv is not None else sys.argv[1:]),
            "torch": __import__("torch").__version__, "python": platform.python_version(),
            "tasks": args.tasks, "width": args.width, "threads": 1,
            "protocol": f"interleaved, {args.rounds} rounds, one process per learner"}
    records: list[dict] = []
    for name in args.learners:
        cmd = [sys.executable, "-m", "benchmarks.compiled_learners", "--one", name, "--tasks",
               str(args.tasks), "--width", str(args.width), "--rounds", str(args.rounds)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        got = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if not got:
            got = [{"learner": name, "method": "all", "status": "error",
                    "reason": proc.stderr[-2000:]}]
        for rec in got:
            rec["wall_s"] = round(time.perf_counter() - t0, 1)
            rec["loadavg"] = round(os.getloadavg()[0], 2)
        records.extend(got)
        print(f"# {name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{args.name}.json").write_text(json.dumps(
            {"meta": meta, "summary": summarise(records), "records": records}, indent=1))
        (args.out / f"{args.name}.md").write_text(markdown(meta, records, len(args.learners)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
