"""Run the benchmark suite: one fresh subprocess per configuration, then the results files.

    python -m benchmarks                       # full grid -> benchmarks/results/full.{json,md,png}
    python -m benchmarks --quick               # reduced grid, < 5 min on 2 CPU cores
    python -m benchmarks --quick --out /tmp/benchq --only mlp,mlp_hpo
    python -m benchmarks --device cuda --name h100

Options: ``--out DIR`` (or a ``.json`` path), ``--name`` (file stem; default ``quick``/``full``,
with ``_cuda`` on CUDA), ``--only CASE[,CASE]``, ``--estimators A,B`` (restrict methods),
``--threads N`` (``torch.set_num_threads`` in every subprocess; ``--quick`` defaults to 1,
see README), ``--budget S`` (stop starting configurations after S seconds; the rest are
recorded as skipped), ``--timeout S`` (per configuration), ``--no-plots``, ``--list`` (print
the grid and exit).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import ROOT, report, subprocess_env
from . import cases as C

DEFAULT_OUT = Path(__file__).resolve().parent / "results"

K_FULL = [1, 5, 10, 25, 50, 100, 200]
WIDTHS = {"mlp": [32, 64, 128, 256, 512, 1024], "mlp_hpo": [32, 64, 128, 256, 512, 1024],
          "conv4": [16, 32, 64, 128], "conv4_maml": [16, 32, 64, 128]}
BATCHES = [1, 2, 4, 8, 16, 32]
SWEEP_K = {"mlp": 10, "mlp_hpo": 10, "conv4": 5, "conv4_maml": 5}  # K of the width/batch sweeps


def _methods(case: str) -> list[str]:
    return C.ESTIMATORS + list(C.CASES[case].peers)


def _cfg(case: str, method: str, K: int, width: int | None = None,
         meta_batch: int | None = None, sweep: str = "K") -> dict[str, Any]:
    spec = C.CASES[case]
    return {"case": case, "estimator": method, "inner_steps": K,
            "width": spec.width if width is None else width,
            "meta_batch": spec.meta_batch if meta_batch is None else meta_batch,
            "sweeps": [sweep]}


def full_grid(cases: list[str], ks: list[int] | None = None) -> list[dict[str, Any]]:
    """Every estimator (and the case's peers) vs K (``ks``, default K_FULL), vs width and vs
    meta-batch."""
    grid = []
    for case in cases:
        for method in _methods(case):
            grid += [_cfg(case, method, K) for K in (ks or K_FULL)]
            if method.endswith("_fo"):  # first-order peers: the K sweep only
                continue
            grid += [_cfg(case, method, SWEEP_K[case], width=w, sweep="width")
                     for w in WIDTHS[case]]
            grid += [_cfg(case, method, SWEEP_K[case], meta_batch=b, sweep="meta_batch")
                     for b in BATCHES]
    return grid


def quick_grid(cases: list[str]) -> list[dict[str, Any]]:
    """The claims at small cost, most important first: memory flatness/growth on the MLP
    cases (K = 10 and 200), the Conv4 MAML meta-step vs the peers (K = 1), iMAML vs the
    TorchOpt implicit gradient (K = 5), one more width and one more meta-batch point."""
    grid = []
    if "mlp" in cases:
        for method in ["Unrolled", "Checkpointed", "Implicit-CG", "HistoryFree",
                       "Implicit-Neumann"]:
            grid += [_cfg("mlp", method, K) for K in (10, 200)]
    if "mlp_hpo" in cases:  # ForwardMode's flatness (the other flat ones: on mlp)
        grid += [_cfg("mlp_hpo", "ForwardMode", K) for K in (10, 200)]
    if "conv4_maml" in cases:
        for method in ["Unrolled", "plain", "higher", "torchopt", "torchopt_functional",
                       "learn2learn"]:
            grid.append(_cfg("conv4_maml", method, 1))
    if "conv4" in cases:
        for method in ["Implicit-CG", "imaml_plain", "imaml_torchopt"]:
            grid.append(_cfg("conv4", method, 5))
    if "mlp" in cases:
        grid += [_cfg("mlp", m, 10, width=512, sweep="width") for m in ("Unrolled", "Implicit-CG")]
        grid += [_cfg("mlp", m, 10, meta_batch=16, sweep="meta_batch")
                 for m in ("Unrolled", "Implicit-CG")]
    return grid


def static_skips(grid: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict]]:
    """Split off the configurations that can never run (not defined on the case, ForwardMode
    on a case with thousands of hyperparameters, an unavailable peer library): one skipped
    record per (case, method) with the reason, instead of a process per configuration."""
    try:
        from .peers import maml as peers

        available = peers.available_peers()
    except Exception as e:  # helper B's module missing or broken: every peer is skipped
        available = {lib: (False, f"benchmarks/peers/maml.py is not importable: {e}")
                     for lib in ("plain", "higher", "torchopt", "learn2learn")}
    keep, skipped, seen = [], [], set()
    for cfg in grid:
        case, method = cfg["case"], cfg["estimator"]
        reason = C.static_skip_reason(case, method)
        if reason is None and method in C.PEERS:
            ok, why = available.get(C.peer_library(method), (False, "unknown peer library"))
            reason = None if ok else why
        if reason is None:
            keep.append(cfg)
        elif (case, method) not in seen:
            seen.add((case, method))
            skipped.append({"case": case, "estimator": method,
                            "kind": "peer" if method in C.PEERS else "ours",
                            "inner_steps": None, "width": None, "meta_batch": None,
                            "peak_mem_bytes": None, "time_s": None, "rel_error": None,
                            "cosine": None, "status": "skipped", "reason": reason,
                            "sweeps": sorted({s for g in grid if g["case"] == case
                                              and g["estimator"] == method
                                              for s in g["sweeps"]})})
    return keep, skipped


def merge(grid: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One run per distinct configuration; a run shared by several sweeps lists them all."""
    out: dict[tuple, dict[str, Any]] = {}
    for cfg in grid:
        key = (cfg["case"], cfg["estimator"], cfg["inner_steps"], cfg["width"],
               cfg["meta_batch"])
        if key in out:
            out[key]["sweeps"] = sorted(set(out[key]["sweeps"]) | set(cfg["sweeps"]))
        else:
            out[key] = dict(cfg)
    return list(out.values())


def _add_default_point_tags(grid: list[dict[str, Any]]) -> None:
    """The K-sweep point at the sweep K, default width and batch also belongs to the width and
    meta-batch sweeps of that case (when those sweeps exist)."""
    sweeps_of_case: dict[str, set[str]] = {}
    for cfg in grid:
        sweeps_of_case.setdefault(cfg["case"], set()).update(cfg["sweeps"])
    for cfg in grid:
        spec = C.CASES[cfg["case"]]
        if (cfg["inner_steps"] == SWEEP_K[cfg["case"]] and cfg["width"] == spec.width
                and cfg["meta_batch"] == spec.meta_batch):
            extra = sweeps_of_case[cfg["case"]] & {"width", "meta_batch"}
            cfg["sweeps"] = sorted(set(cfg["sweeps"]) | extra)


def run_one(cfg: dict[str, Any], opts: argparse.Namespace, ref_cache: Path) -> dict[str, Any]:
    """``python -m benchmarks.measure ...`` in a fresh process; its JSON record."""
    cmd = [sys.executable, "-m", "benchmarks.measure", "--case", cfg["case"], "--estimator",
           cfg["estimator"], "--inner-steps", str(cfg["inner_steps"]), "--width",
           str(cfg["width"]), "--meta-batch", str(cfg["meta_batch"]), "--device", opts.device,
           "--dtype", opts.dtype, "--repeats", str(opts.repeats), "--time-budget",
           str(opts.time_budget), "--ref-cache", str(ref_cache)]
    if opts.threads:
        cmd += ["--threads", str(opts.threads)]
    env = subprocess_env()
    base = {k: cfg[k] for k in ("case", "estimator", "inner_steps", "width", "meta_batch")}
    base.update(kind="peer" if cfg["estimator"] in C.PEERS else "ours", device=opts.device,
                peak_mem_bytes=None, time_s=None, rel_error=None, cosine=None)
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=opts.timeout)
    except subprocess.TimeoutExpired:
        return {**base, "status": "timeout",
                "reason": f"did not finish within --timeout {opts.timeout} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        tail = (proc.stderr or proc.stdout)[-1500:]
        return {**base, "status": "error",
                "reason": f"measure exited {proc.returncode} without a record: {tail}"}
    return json.loads(lines[-1])


def _line(r: dict[str, Any]) -> str:
    head = (f"{r['case']:10s} {r['estimator']:20s} K={r['inner_steps']!s:4s} "
            f"w={r.get('width')!s:5s} B={r.get('meta_batch')!s:3s}")
    if r.get("status") != "ok":
        return f"{head} {r.get('status')}: {str(r.get('reason'))[:110]}"
    rel = r.get("rel_error")
    return (f"{head} mem {report._mb(r.get('peak_mem_bytes')):>9s} MiB  time "
            f"{report._ms(r.get('time_s')):>8s} ms  rel.err {report._e(rel)}  "
            f"cos {report._cos(r.get('cosine'))}  [{r.get('wall_s', 0):.1f}s]")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="reduced grid (< 5 min on 2 cores)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="output directory or .json path")
    ap.add_argument("--name", default=None, help="results file stem (default quick/full)")
    ap.add_argument("--only", default=None, help="comma-separated cases")
    ap.add_argument("--estimators", default=None, help="comma-separated methods to keep")
    ap.add_argument("--k", default=None,
                    help="comma-separated inner-step counts of the K sweep (full grid; default "
                         + ",".join(map(str, K_FULL)) + ")")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--time-budget", type=float, default=None,
                    help="seconds of timed repeats per configuration")
    ap.add_argument("--budget", type=float, default=None,
                    help="stop starting configurations after this many seconds")
    ap.add_argument("--timeout", type=float, default=None, help="seconds per configuration")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--list", action="store_true", help="print the grid and exit")
    opts = ap.parse_args(argv)
    q = opts.quick
    opts.threads = opts.threads if opts.threads is not None else (1 if q else None)
    opts.repeats = opts.repeats if opts.repeats is not None else (3 if q else 5)
    opts.time_budget = opts.time_budget if opts.time_budget is not None else (2.0 if q else 20.0)
    opts.budget = opts.budget if opts.budget is not None else (240.0 if q else None)
    opts.timeout = opts.timeout if opts.timeout is not None else (90.0 if q else 1800.0)
    return opts


def output_path(opts: argparse.Namespace) -> Path:
    out = Path(opts.out)
    if out.suffix == ".json":
        return out
    name = opts.name or (("quick" if opts.quick else "full")
                         + ("" if opts.device == "cpu" else "_" + opts.device.split(":")[0]))
    return out / f"{name}.json"


def build_grid(opts: argparse.Namespace) -> list[dict[str, Any]]:
    cases = list(C.CASES) if not opts.only else [c.strip() for c in opts.only.split(",")]
    unknown = [c for c in cases if c not in C.CASES]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; known: {sorted(C.CASES)}")
    try:
        ks = [int(k) for k in opts.k.split(",")] if opts.k else None
    except ValueError:
        raise SystemExit(f"--k must be comma-separated integers, got {opts.k!r}") from None
    if ks is not None and (opts.quick or min(ks) < 1):
        raise SystemExit("--k takes positive step counts and applies to the full grid only")
    grid = quick_grid(cases) if opts.quick else full_grid(cases, ks)
    if opts.estimators:
        keep = {m.strip() for m in opts.estimators.split(",")}
        grid = [g for g in grid if g["estimator"] in keep]
    grid = merge(grid)
    _add_default_point_tags(grid)
    return grid


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    grid, skipped = static_skips(build_grid(opts))
    json_path = output_path(opts)
    if opts.list:
        for cfg in grid:
            print(cfg)
        for rec in skipped:
            print(f"not run: {rec['case']} / {rec['estimator']}: {rec['reason']}")
        print(f"{len(grid)} configurations (+{len(skipped)} never-run methods) -> {json_path}")
        return 0
    json_path.parent.mkdir(parents=True, exist_ok=True)
    # float64 references shared by the processes of THIS run only (a stale cache could hide a
    # change in the library), deleted at the end
    ref_cache = Path(tempfile.mkdtemp(prefix="bench_refs_"))
    print(f"{len(grid)} configurations -> {json_path} (device {opts.device}, threads "
          f"{opts.threads or 'torch default'}, budget {opts.budget or '-'} s)", flush=True)
    records: list[dict[str, Any]] = list(skipped)
    for rec in skipped:
        print(f"not run: {_line(rec)}", flush=True)
    t0 = time.perf_counter()
    for i, cfg in enumerate(grid):
        elapsed = time.perf_counter() - t0
        if opts.budget is not None and elapsed > opts.budget:
            rec = {**{k: cfg[k] for k in ("case", "estimator", "inner_steps", "width",
                                           "meta_batch")},
                   "kind": "peer" if cfg["estimator"] in C.PEERS else "ours",
                   "status": "skipped", "reason": f"--budget {opts.budget:.0f} s exhausted",
                   "peak_mem_bytes": None, "time_s": None, "rel_error": None, "cosine": None}
        else:
            rec = run_one(cfg, opts, ref_cache)
        rec["sweeps"] = cfg["sweeps"]
        records.append(rec)
        print(f"[{i + 1}/{len(grid)} {time.perf_counter() - t0:5.0f}s] {_line(rec)}", flush=True)
        json_path.write_text(json.dumps(records, indent=1))  # partial results survive
    shutil.rmtree(ref_cache, ignore_errors=True)
    title = (f"Benchmark results: {json_path.stem} ({'quick' if opts.quick else 'full'} grid, "
             f"{opts.device}, {opts.dtype})")
    summary = report.write_all(records, json_path, title=title, plots=not opts.no_plots)
    print(f"\nClaims ({time.perf_counter() - t0:.0f} s in all):")
    print("\n".join(report.claim_lines(summary)))
    print(summary["plot_message"])
    print(f"wrote {json_path}, {json_path.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
