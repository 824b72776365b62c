"""Measure ONE configuration in this (fresh) process and print one JSON record.

    python -m benchmarks.measure --case mlp --estimator Unrolled --inner-steps 10 \\
        [--width 64] [--meta-batch 4] [--dtype float32] [--device cpu] [--repeats 5] \\
        [--warmup 1] [--time-budget 20] [--ref-cache DIR] [--no-f64] [--threads N]

``--estimator`` is one of ours (:data:`benchmarks.cases.ESTIMATORS`) or a peer
(:data:`benchmarks.cases.PEERS`). The record is the last line of stdout; diagnostics go to
stderr. A configuration that is not meaningful or whose peer is not installed gives a record
with ``status="skipped"`` and the reason; a failure gives ``status="error"`` and the error.

Protocol (one configuration per process, so that nothing else lives in the heap):

1. CPU: glibc ``mallopt`` serves every block >= 16 KiB by mmap from now on (see
   :func:`set_allocator`: without it heap fragmentation makes the RSS creep up with the number
   of allocations); then imports, problem and data creation (the case's
   :class:`~benchmarks.cases.Bench`);
2. ``--warmup`` untimed calls (at least one: lazy initialisation, first-call overheads);
3. the memory call. CPU/Linux: ``gc.collect()``, glibc ``malloc_trim(0)``, baseline = VmRSS,
   then "5" written to ``/proc/self/clear_refs`` resets the high-water mark VmHWM to the
   current RSS; after the call ``peak_mem_bytes = VmHWM − baseline``
   (``mem_method="proc_clear_refs"``). Without ``clear_refs`` (not Linux, no permission): the
   memory call is the FIRST call (before any warm-up) and ``peak = ru_maxrss_after −
   VmRSS_before`` (``mem_method="ru_maxrss"``: it includes one-time initialisation, and is
   None when the call did not exceed the earlier lifetime peak). CUDA:
   ``reset_peak_memory_stats``, ``peak = max_memory_allocated − memory_allocated`` at the
   start (``"cuda_max_allocated"``). ``--mem-calls`` such calls (default 2; one when a call
   takes longer than ``--time-budget``): ``peak_mem_bytes`` is the smallest (allocator
   fragmentation only adds), all are in ``peak_mem_samples``;
4. timing, with glibc's thresholds put back to the values its dynamic mode reaches (mmap
   32 MiB, trim 64 MiB): one more warm-up, then ``--repeats`` calls, stopping early once
   ``--time-budget`` seconds are spent (at least one; a configuration whose memory call alone
   exceeded the budget gets exactly one timed call and no re-warm), each bracketed by
   ``torch.cuda.synchronize`` on CUDA; ``time_s`` = median, all samples recorded;
5. accuracy: the exact hypergradient = ``bl.Unrolled`` in float64 on the same problem (the data
   rounded to the benchmark dtype, then widened), from ``--ref-cache`` when present.
   ``rel_error = ‖g − g*‖/‖g*‖`` and ``cosine`` for the measured (benchmark-dtype) result;
   ``rel_error_f64``/``cosine_f64`` for the same method run in float64 (the method's own error,
   free of float32 rounding). Peers also get ``rel_error_vs_ours``: their float64 meta-gradient
   against our matching estimator's (Unrolled, FirstOrder or Implicit-CG) in float64.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import hashlib
import json
import os
import platform
import resource
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch

RECORD_VERSION = 1
DTYPES = {"float32": torch.float32, "float64": torch.float64}


# ----------------------------------------------------------------------------- memory


def _proc_status(field: str) -> int | None:
    """``VmRSS``/``VmHWM`` of this process in bytes (Linux), else None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _clear_refs_works() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _proc_status("VmHWM") is not None and _proc_status("VmRSS") is not None
    except OSError:
        return False


def _malloc_trim() -> None:
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
MEM_MMAP_THRESHOLD = 16 * 1024            # memory phase: blocks >= 16 KiB are mmapped
TIME_MMAP_THRESHOLD = 32 * 1024 * 1024    # timing phase: glibc's dynamic maximum


def set_allocator(phase: str) -> str:
    """glibc malloc settings for the memory phase ("memory") or the timing phase ("time").

    Memory: every block >= 16 KiB is served by mmap and returned to the OS when freed, so the
    RSS follows the live memory. With glibc's default DYNAMIC threshold, large blocks move onto
    the heap after the first frees, where long-lived small objects allocated in between (the
    inner-loss trace, autograd metadata) pin freed pages and the RSS creeps up with the number
    of allocations although live memory does not (measured: Implicit-CG on mlp_hpo, K 10 ->
    200: 3.6 -> 9.2 MiB with the default, 1.95 -> 1.96 MiB with a fixed 64 KiB threshold). Set at
    process start, before anything fragments the heap.
    Time: thresholds as high as the default dynamic ones get (mmap 32 MiB, trim 64 MiB), so
    that the timed calls do not pay an mmap + page faults per large tensor."""
    mmap_bytes = MEM_MMAP_THRESHOLD if phase == "memory" else TIME_MMAP_THRESHOLD
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(M_MMAP_THRESHOLD, mmap_bytes)
        if phase != "memory":
            ok = ok and libc.mallopt(M_TRIM_THRESHOLD, 2 * mmap_bytes)
    except Exception:
        return "default (no glibc mallopt)"
    return f"glibc mmap_threshold={mmap_bytes}" if ok == 1 else "default (mallopt failed)"


def _maxrss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


class PeakMemory:
    """Peak memory of one call above the baseline at :meth:`start` (see the module doc)."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            self.method = "cuda_max_allocated"
        elif _clear_refs_works():
            self.method = "proc_clear_refs"
        else:
            self.method = "ru_maxrss"
        self.baseline = 0
        self._maxrss0 = 0

    @property
    def needs_cold_call(self) -> bool:
        """ru_maxrss cannot be reset: measure on the first call, before any warm-up."""
        return self.method == "ru_maxrss"

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
            return
        _malloc_trim()
        self.baseline = _proc_status("VmRSS") or 0
        if self.method == "proc_clear_refs":
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        else:
            self._maxrss0 = _maxrss_bytes()

    def stop(self) -> int | None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self.baseline
        if self.method == "proc_clear_refs":
            return (_proc_status("VmHWM") or 0) - self.baseline
        after = _maxrss_bytes()
        if after <= self._maxrss0:  # the call never exceeded the earlier lifetime peak
            return None
        return after - self.baseline


# ----------------------------------------------------------------------------- helpers


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(call, device: torch.device) -> tuple[float, Any]:
    _sync(device)
    t0 = time.perf_counter()
    out = call()
    _sync(device)
    return time.perf_counter() - t0, out


def _flat(grads: dict[str, torch.Tensor], keys: list[str]) -> torch.Tensor:
    missing = [k for k in keys if k not in grads]
    if missing:
        raise KeyError(f"meta-gradient lacks {missing[:3]}... (has {sorted(grads)[:3]}...)")
    return torch.cat([grads[k].detach().reshape(-1).to("cpu", torch.float64) for k in keys])


def compare(grads: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> tuple[float, float]:
    """``(rel_error, cosine)`` of ``grads`` against ``ref`` (all leaves concatenated)."""
    keys = list(ref)
    g, r = _flat(grads, keys), _flat(ref, keys)
    rn, gn = float(r.norm()), float(g.norm())
    rel = float((g - r).norm()) / rn if rn > 0 else float("nan")
    cos = float(g @ r) / (gn * rn) if gn > 0 and rn > 0 else float("nan")
    return rel, cos


def _float(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if v == v and abs(v) != float("inf") else None


def _result_info(res: Any) -> dict[str, Any]:
    """Convergence context from a (stacked) HypergradResult: inner loss first/last, linear-solve
    residual, ‖∇g(w_K)‖/‖∇g(w_0)‖ (worst task)."""
    out: dict[str, Any] = {}
    info = getattr(res, "info", None) or {}
    trace = info.get("inner_loss")
    if trace is not None and trace.numel() and trace.shape[-1] > 0:
        rows = trace.detach().reshape(-1, trace.shape[-1]).double()
        out["inner_loss_first"] = _float(rows[:, 0].mean())
        out["inner_loss_last"] = _float(rows[:, -1].mean())
    if "linsolve_rel_residual" in info:
        out["linsolve_rel_residual"] = _float(info["linsolve_rel_residual"].detach().max())
    if "linsolve_breakdown" in info:
        out["linsolve_breakdown"] = bool(info["linsolve_breakdown"].detach().any())
    if "inner_grad_norm" in info and "inner_grad_norm0" in info:
        ratio = info["inner_grad_norm"].detach().double() / info["inner_grad_norm0"].detach(
        ).double().clamp_min(1e-300)
        out["inner_grad_ratio"] = _float(ratio.max())
    return out


def _environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
    }
    with contextlib.suppress(OSError, AttributeError):
        env["loadavg_start"] = round(os.getloadavg()[0], 2)
    if device.type == "cuda" and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def _ref_key(cfg: dict[str, Any]) -> str:
    from . import cases

    spec = cases.CASES[cfg["case"]]
    parts = [cfg["case"], f"K{cfg['inner_steps']}", f"w{cfg['width']}", f"B{cfg['meta_batch']}",
             f"s{cfg['seed']}", f"r{cfg['dtype']}", cfg["device"], repr(spec)]
    digest = hashlib.sha1("|".join(parts).encode()).hexdigest()[:16]
    return f"{cfg['case']}-K{cfg['inner_steps']}-w{cfg['width']}-B{cfg['meta_batch']}-{digest}"


# ----------------------------------------------------------------------------- measure


def measure(cfg: dict[str, Any]) -> dict[str, Any]:
    """Measure one configuration in this process; always returns a record (never raises).

    ``cfg`` keys: case, estimator, inner_steps, and optionally width, meta_batch, dtype
    ("float32"), device ("cpu"), seed (0), batching (None: the case's), warmup (1),
    repeats (5), time_budget (20.0 s), ref_cache (None), f64_check (True), tune_allocator
    (False: leave malloc alone; the CLI sets it, see :func:`set_allocator` — it changes the
    whole process's malloc settings, so only for a process that measures one configuration).
    """
    from . import cases

    t_start = time.perf_counter()
    cfg = dict(cfg)
    case, method, K = cfg["case"], cfg["estimator"], int(cfg["inner_steps"])
    spec = cases.CASES.get(case)
    cfg.setdefault("width", spec.width if spec else None)
    cfg.setdefault("meta_batch", spec.meta_batch if spec else None)
    cfg.setdefault("dtype", "float32")
    cfg.setdefault("device", "cpu")
    cfg.setdefault("seed", 0)
    cfg.setdefault("batching", None)
    cfg.setdefault("warmup", 1)
    cfg.setdefault("repeats", 5)
    cfg.setdefault("time_budget", 20.0)
    cfg.setdefault("ref_cache", None)
    cfg.setdefault("f64_check", True)
    cfg.setdefault("tune_allocator", False)
    cfg.setdefault("mem_calls", 2)
    kind = "peer" if method in cases.PEERS else "ours"
    record: dict[str, Any] = {
        "case": case, "estimator": method, "kind": kind, "inner_steps": K,
        "params": None, "hparams": None, "width": cfg["width"], "meta_batch": cfg["meta_batch"],
        "batching": None, "dtype": cfg["dtype"], "peak_mem_bytes": None, "mem_method": None,
        "time_s": None, "rel_error": None, "cosine": None, "rel_error_f64": None,
        "cosine_f64": None, "reference": "Unrolled float64", "status": "ok", "reason": "",
        "seed": cfg["seed"], "record_version": RECORD_VERSION,
    }
    caught: list[str] = []
    try:
        device = torch.device(cfg["device"])
        record.update(_environment(device))
        if device.type == "cuda" and not torch.cuda.is_available():
            raise cases.Skip("--device cuda but torch.cuda.is_available() is False")
        if spec is None:
            raise cases.Skip(f"unknown case {case!r}; known: {sorted(cases.CASES)}")
        if method not in cases.ESTIMATORS and method not in cases.PEERS:
            raise cases.Skip(f"unknown estimator/peer {method!r}; estimators: "
                             f"{cases.ESTIMATORS}, peers: {sorted(cases.PEERS)}")
        dtype = DTYPES[cfg["dtype"]]
        # "default": each warning once per code location, so that a peer warning at every
        # call (TorchOpt's FutureWarning) costs nothing in the timed calls
        with warnings.catch_warnings(record=True) as wlist:
            warnings.simplefilter("default")
            try:
                _measure_into(record, cfg, cases, spec, method, K, device, dtype)
            finally:
                caught = [f"{w.category.__name__}: {w.message}" for w in wlist
                          if not issubclass(w.category, (DeprecationWarning, FutureWarning))]
    except cases.Skip as e:
        record["status"], record["reason"] = "skipped", str(e)
    except Exception as e:  # recorded, never silently dropped
        record["status"] = "error"
        record["reason"] = f"{type(e).__name__}: {e}"[:2000]
        record["traceback"] = traceback.format_exc()[-4000:]
    record["warnings"] = sorted({w[:300] for w in caught})
    with contextlib.suppress(OSError, AttributeError):
        record["loadavg_end"] = round(os.getloadavg()[0], 2)
    record["wall_s"] = round(time.perf_counter() - t_start, 3)
    return record


def _measure_into(record, cfg, cases, spec, method, K, device, dtype) -> None:
    kind = record["kind"]
    if kind == "peer":
        if method not in spec.peers:
            raise cases.Skip(f"peer {method!r} is not run on case {record['case']!r} (peers "
                             f"here: {list(spec.peers) or 'none'}; the peers implement Conv4 "
                             f"few-shot classification only)")
        lib = cases.peer_library(method)
        try:
            from .peers import maml as peers
        except ImportError as e:
            raise cases.Skip(f"benchmarks/peers/maml.py is not importable: {e}") from e
        status = peers.available_peers()
        ok, why = status.get(lib, (False, f"peer library {lib!r} unknown to available_peers()"))
        if not ok:
            raise cases.Skip(why)
        record["peer_version"] = why
    if device.type == "cpu" and cfg["tune_allocator"]:  # the CLI's fresh process only
        record["mem_allocator"] = set_allocator("memory")
    else:
        record["mem_allocator"] = "default"
    bench = cases.build(record["case"], K, cfg["width"], cfg["meta_batch"], dtype, device,
                        cfg["seed"], cfg["batching"])
    record.update(params=bench.params, hparams=bench.hparams, width=bench.width,
                  meta_batch=bench.meta_batch, batching=bench.batching)
    bench.check_method(method)

    def runner(b):
        if kind == "peer":
            return lambda: (b.peer(method), None)
        est = cases.make_estimator(method, K, spec)
        record["estimator_repr"] = repr(est)
        return lambda: b.ours(est)

    call = runner(bench)
    grads, res = run_protocol(call, device, record, cfg)

    # diagnostics outside the timed region (vmapped results are checked here, see bl.check_result)
    if res is not None:
        if bench.vmapped:
            import bilevel as bl

            bl.check_result(res, strict=True)
        record.update(_result_info(res))

    # accuracy against the exact float64 hypergradient of the K-step objective
    ref = _reference(cfg, cases, K, device)
    record["rel_error"], record["cosine"] = compare(grads, ref)
    if not cfg["f64_check"] and kind == "ours":
        return
    if cfg["dtype"] == "float64":
        g64 = grads
    elif method == "Unrolled":
        g64 = ref
    else:
        b64 = cases.build(record["case"], K, cfg["width"], cfg["meta_batch"], torch.float64,
                          device, cfg["seed"], cfg["batching"], round_to=dtype)
        g64 = runner(b64)()[0]
    record["rel_error_f64"], record["cosine_f64"] = compare(g64, ref)
    if kind == "peer":
        match = cases.PEERS[method][2]
        record["match_estimator"] = match
        if match == "Unrolled":
            ours64 = ref
        else:
            b64 = cases.build(record["case"], K, cfg["width"], cfg["meta_batch"], torch.float64,
                              device, cfg["seed"], cfg["batching"], round_to=dtype)
            ours64 = b64.ours(cases.make_estimator(match, K, spec))[0]
        record["rel_error_vs_ours"] = compare(g64, ours64)[0]


def run_protocol(call, device: torch.device, record: dict[str, Any], cfg: dict[str, Any]
                 ) -> tuple[Any, Any]:
    """Steps 2-4 of the module protocol on ``call`` (returns ``(grads, result)``): warm-up,
    memory calls (the smallest peak kept), allocator switch, timed repeats within
    ``cfg["time_budget"]``; fills the memory and time fields of ``record`` (which must already
    hold ``mem_allocator``) and returns the last memory call's output."""
    mem = PeakMemory(device)
    record["mem_method"] = mem.method
    budget = float(cfg["time_budget"])
    warm_times: list[float] = []
    if not mem.needs_cold_call:  # ru_maxrss cannot be reset: then the memory call comes first
        for _ in range(max(1, int(cfg["warmup"]))):
            t, out = _timed(call, device)
            warm_times.append(t)
            del out
    grads, res, t_mem = _memory_call(mem, call, device, record)
    peaks = [record["peak_mem_bytes"]]
    for _ in range(int(cfg["mem_calls"]) - 1):  # fragmentation only adds: keep the smallest
        if t_mem > budget or mem.needs_cold_call:
            break
        del grads, res
        grads, res, _ = _memory_call(mem, call, device, record)
        peaks.append(record["peak_mem_bytes"])
    if None not in peaks:
        record["peak_mem_bytes"] = min(peaks)
    record["peak_mem_samples"] = peaks
    if device.type == "cpu" and record.get("mem_allocator", "").startswith("glibc"):
        record["time_allocator"] = set_allocator("time")
        if t_mem <= budget:  # re-warm under the new settings (skipped for slow configurations)
            t, out = _timed(call, device)
            warm_times.append(t)
            del out
    samples: list[float] = []
    spent = 0.0
    for i in range(max(1, int(cfg["repeats"]))):
        if i > 0 and spent + t_mem > budget:
            break
        t, out = _timed(call, device)
        samples.append(t)
        spent += t
        del out
    record["time_s"] = statistics.median(samples)
    record["time_min_s"] = min(samples)
    record["time_samples"] = [round(s, 6) for s in samples]
    record["time_warmup_s"] = [round(s, 6) for s in warm_times]
    record["time_mem_call_s"] = round(t_mem, 6)
    return grads, res


def _memory_call(mem: PeakMemory, call, device: torch.device, record: dict) -> tuple:
    mem.start()
    t_mem, (grads, res) = _timed(call, device)
    peak = mem.stop()
    record["peak_mem_bytes"] = peak
    record["mem_baseline_bytes"] = mem.baseline
    if peak is None:
        record["mem_note"] = "ru_maxrss did not grow during the call: peak unknown"
    return grads, res, t_mem


def _reference(cfg, cases, K, device) -> dict[str, torch.Tensor]:
    """bl.Unrolled in float64 on the same (rounded) data; cached in ``ref_cache`` if given."""
    path = None
    if cfg.get("ref_cache"):
        path = Path(cfg["ref_cache"]) / f"{_ref_key(cfg)}.pt"
        if path.exists():
            with contextlib.suppress(Exception):
                return torch.load(path, map_location=device)
    b64 = cases.build(cfg["case"], K, cfg["width"], cfg["meta_batch"], torch.float64, device,
                      cfg["seed"], cfg["batching"], round_to=DTYPES[cfg["dtype"]])
    import bilevel as bl

    ref = {k: v.detach() for k, v in b64.ours(bl.Unrolled())[0].items()}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        torch.save({k: v.cpu() for k, v in ref.items()}, tmp)
        os.replace(tmp, path)
    return ref


# ----------------------------------------------------------------------------- CLI


def sanitize(obj: Any) -> Any:
    """NaN/inf -> None (strict JSON), recursively."""
    if isinstance(obj, float) and (obj != obj or abs(obj) == float("inf")):
        return None
    if isinstance(obj, dict):
        return {k: sanitize(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [sanitize(v) for v in obj]
    return obj


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.measure",
                                 description="Measure one configuration; print one JSON record.")
    ap.add_argument("--case", required=True)
    ap.add_argument("--estimator", required=True, help="one of ours or a peer name")
    ap.add_argument("--inner-steps", type=int, required=True, help="K")
    ap.add_argument("--width", type=int, default=None, help="MLP hidden units / Conv4 filters")
    ap.add_argument("--meta-batch", type=int, default=None, help="number of tasks")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batching", choices=["default", "vmap", "loop"], default="default")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--time-budget", type=float, default=20.0,
                    help="stop repeating once this many seconds of timed calls are spent")
    ap.add_argument("--mem-calls", type=int, default=2,
                    help="memory calls (peak = the smallest; 1 when a call exceeds the budget)")
    ap.add_argument("--ref-cache", default=None, help="directory caching float64 references")
    ap.add_argument("--no-f64", action="store_true",
                    help="skip the float64 re-run of our estimator (peers always get it)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    return ap.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> dict[str, Any]:
    return {"case": args.case, "estimator": args.estimator, "inner_steps": args.inner_steps,
            "width": args.width, "meta_batch": args.meta_batch, "dtype": args.dtype,
            "device": args.device, "seed": args.seed,
            "batching": None if args.batching == "default" else args.batching,
            "warmup": args.warmup, "repeats": args.repeats, "time_budget": args.time_budget,
            "ref_cache": args.ref_cache, "f64_check": not args.no_f64,
            "tune_allocator": True, "mem_calls": args.mem_calls}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = config_from_args(args)
    if cfg["width"] is None:
        cfg.pop("width")
    if cfg["meta_batch"] is None:
        cfg.pop("meta_batch")
    record = sanitize(measure(cfg))
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()
    return 0 if record["status"] in ("ok", "skipped") else 1


if __name__ == "__main__":
    raise SystemExit(main())
