"""Results files: the claims computed from the records, the Markdown report and the plots.

Everything here is a pure function of a list of records (dicts as written by
:mod:`benchmarks.measure`), so it can be re-run on a saved JSON file::

    python -m benchmarks.report benchmarks/results/full.json     # rewrites full.md + plots
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

FLAT_ESTIMATORS = ["Implicit-CG", "Implicit-Neumann", "ForwardMode", "HistoryFree"]
FLAT_TOL = 1.2                 # peak(K_hi)/peak(K_lo) must not exceed this
K_LO, K_HI = 10, 200
UNROLLED_EXPONENT = (0.7, 1.3)   # "roughly linear" in K
CHECKPOINTED_EXPONENT = (0.2, 0.8)  # ~ sqrt(K), between flat and linear
EXACT = ["Unrolled", "Checkpointed", "ForwardMode"]
EXACT_TOL = 1e-8               # float64 relative error of the exact estimators
PEER_MATCH_TOL = 1e-8          # float64 relative error of a peer against our estimator

Record = dict[str, Any]


# ----------------------------------------------------------------------------- selection


def ok(records: Iterable[Record]) -> list[Record]:
    return [r for r in records if r.get("status") == "ok"]


def _in_sweep(r: Record, sweep: str) -> bool:
    sweeps = r.get("sweeps")
    return sweeps is None or sweep in sweeps


def k_series(records: Iterable[Record], case: str, method: str) -> dict[int, Record]:
    """``{K: record}`` of the K sweep of ``method`` on ``case`` (the case's default width and
    meta-batch: records tagged with sweep "K", or untagged records of the most common
    width/meta-batch)."""
    rows = [r for r in ok(records) if r["case"] == case and r["estimator"] == method
            and _in_sweep(r, "K")]
    if not rows:
        return {}
    if any("sweeps" not in r for r in rows):  # untagged: keep the most common (width, batch)
        keys = [(r.get("width"), r.get("meta_batch")) for r in rows]
        common = statistics.mode(keys)
        rows = [r for r in rows if (r.get("width"), r.get("meta_batch")) == common]
    return {int(r["inner_steps"]): r for r in rows}


def growth_exponent(series: dict[int, Record], key: str = "peak_mem_bytes",
                    k_min: int = K_LO) -> float | None:
    """Least-squares slope of log(value) against log(K) over K >= ``k_min``."""
    pts = [(math.log(k), math.log(r[key])) for k, r in sorted(series.items())
           if k >= k_min and r.get(key) and r[key] > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    if sxx == 0:
        return None
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx


def flatness(records: Iterable[Record], case: str, method: str, k_lo: int = K_LO,
             k_hi: int = K_HI, tol: float = FLAT_TOL) -> dict[str, Any] | None:
    """``peak(k_hi)/peak(k_lo)`` of ``method`` on ``case`` and whether it is <= ``tol``;
    None when the two records are not both there."""
    series = k_series(records, case, method)
    lo, hi = series.get(k_lo), series.get(k_hi)
    if lo is None or hi is None or not lo.get("peak_mem_bytes") or hi.get("peak_mem_bytes") is None:
        return None
    ratio = hi["peak_mem_bytes"] / lo["peak_mem_bytes"]
    return {"claim": "flat", "case": case, "estimator": method, "k_lo": k_lo, "k_hi": k_hi,
            "peak_lo": lo["peak_mem_bytes"], "peak_hi": hi["peak_mem_bytes"], "ratio": ratio,
            "tol": tol, "pass": ratio <= tol}


def _growth_claim(records, case, method, bounds, claim) -> dict[str, Any] | None:
    series = k_series(records, case, method)
    exp = growth_exponent(series)
    if exp is None:
        return None
    lo, hi = series.get(K_LO), series.get(K_HI)
    ratio = (hi["peak_mem_bytes"] / lo["peak_mem_bytes"]
             if lo and hi and lo.get("peak_mem_bytes") and hi.get("peak_mem_bytes") else None)
    ks = sorted(k for k in series if k >= K_LO)
    return {"claim": claim, "case": case, "estimator": method, "exponent": exp,
            "bounds": list(bounds), "ratio": ratio, "k_range": [ks[0], ks[-1]],
            "pass": bounds[0] <= exp <= bounds[1]}


def peer_ratios(records: Iterable[Record]) -> list[dict[str, Any]]:
    """ours/theirs time and memory ratios: every ok peer record against our record of the
    matching estimator on the same case, K, width and meta-batch."""
    rows = ok(records)
    index = {(r["case"], r["estimator"], r["inner_steps"], r.get("width"), r.get("meta_batch")): r
             for r in rows if r.get("kind") == "ours"}
    out = []
    for p in rows:
        if p.get("kind") != "peer":
            continue
        match = p.get("match_estimator") or "Unrolled"
        ours = index.get((p["case"], match, p["inner_steps"], p.get("width"),
                          p.get("meta_batch")))
        if ours is None:
            continue
        t = ours["time_s"] / p["time_s"] if ours.get("time_s") and p.get("time_s") else None
        m = (ours["peak_mem_bytes"] / p["peak_mem_bytes"]
             if ours.get("peak_mem_bytes") and p.get("peak_mem_bytes") else None)
        err = p.get("rel_error_vs_ours")
        out.append({"case": p["case"], "peer": p["estimator"], "ours": match,
                    "inner_steps": p["inner_steps"], "width": p.get("width"),
                    "meta_batch": p.get("meta_batch"), "time_ours_s": ours.get("time_s"),
                    "time_peer_s": p.get("time_s"), "time_ratio": t, "mem_ratio": m,
                    "rel_error_vs_ours": err,
                    "match": err is not None and err <= PEER_MATCH_TOL})
    return out


def summarize(records: list[Record]) -> dict[str, Any]:
    """The claims the results must show, computed from the records."""
    cases = sorted({r["case"] for r in records})
    claims: list[dict[str, Any]] = []
    for case in cases:
        for method in FLAT_ESTIMATORS:
            c = flatness(records, case, method)
            if c is not None:
                claims.append(c)
        c = _growth_claim(records, case, "Unrolled", UNROLLED_EXPONENT, "linear")
        if c is not None:
            claims.append(c)
        c = _growth_claim(records, case, "Checkpointed", CHECKPOINTED_EXPONENT, "sqrt")
        if c is not None:
            unrolled = k_series(records, case, "Unrolled").get(c["k_range"][1])
            ckpt = k_series(records, case, "Checkpointed").get(c["k_range"][1])
            if unrolled and ckpt and unrolled.get("peak_mem_bytes"):
                below = ckpt["peak_mem_bytes"] < unrolled["peak_mem_bytes"]
                c["below_unrolled"] = below
                c["pass"] = c["pass"] and below
            claims.append(c)
    exact = []
    for r in ok(records):
        if r.get("kind") == "ours" and r["estimator"] in EXACT and r.get("rel_error_f64") \
                is not None:
            exact.append(r["rel_error_f64"])
    if exact:
        claims.append({"claim": "exact", "estimators": EXACT, "max_rel_error_f64": max(exact),
                       "tol": EXACT_TOL, "n": len(exact), "pass": max(exact) <= EXACT_TOL})
    ratios = peer_ratios(records)
    if ratios:
        worst = max((r["rel_error_vs_ours"] for r in ratios
                     if r["rel_error_vs_ours"] is not None), default=None)
        claims.append({"claim": "peers_match", "n": len(ratios), "max_rel_error_vs_ours": worst,
                       "tol": PEER_MATCH_TOL, "pass": all(r["match"] for r in ratios)})
    status: dict[str, int] = {}
    for r in records:
        status[r.get("status", "?")] = status.get(r.get("status", "?"), 0) + 1
    return {"claims": claims, "peer_ratios": ratios, "status_counts": status,
            "n_records": len(records)}


# ----------------------------------------------------------------------------- text


def _mb(x: Any) -> str:
    return "—" if x is None else f"{x / 2**20:.2f}"


def _ms(x: Any) -> str:
    if x is None:
        return "—"
    return f"{x * 1e3:.1f}" if x < 10 else f"{x * 1e3:.0f}"


def _e(x: Any) -> str:
    return "—" if x is None else f"{x:.1e}"


def _cos(x: Any) -> str:
    return "—" if x is None else f"{x:.6f}"


def claim_lines(summary: dict[str, Any]) -> list[str]:
    """One line per claim: PASS/FAIL and the numbers."""
    lines = []
    for c in summary["claims"]:
        flag = "PASS" if c["pass"] else "FAIL"
        if c["claim"] == "flat":
            lines.append(f"[{flag}] {c['case']}: {c['estimator']} memory flat in K: "
                         f"peak(K={c['k_hi']})/peak(K={c['k_lo']}) = {c['ratio']:.2f} "
                         f"(<= {c['tol']}; {_mb(c['peak_hi'])} vs {_mb(c['peak_lo'])} MiB)")
        elif c["claim"] in ("linear", "sqrt"):
            what = "roughly linear" if c["claim"] == "linear" else "~sqrt(K), below Unrolled"
            ratio = "" if c["ratio"] is None else (f", peak(K={K_HI})/peak(K={K_LO}) = "
                                                   f"{c['ratio']:.2f}")
            lines.append(f"[{flag}] {c['case']}: {c['estimator']} memory {what}: exponent "
                         f"{c['exponent']:.2f} over K={c['k_range'][0]}..{c['k_range'][1]} "
                         f"(expected {c['bounds'][0]}..{c['bounds'][1]}){ratio}")
        elif c["claim"] == "exact":
            lines.append(f"[{flag}] exact estimators ({', '.join(c['estimators'])}) in float64: "
                         f"max rel. error vs Unrolled-f64 {c['max_rel_error_f64']:.1e} "
                         f"(<= {c['tol']:.0e}, {c['n']} records)")
        elif c["claim"] == "peers_match":
            worst = c["max_rel_error_vs_ours"]
            lines.append(f"[{flag}] peers equal ours in float64: max rel. error "
                         f"{_e(worst)} (<= {c['tol']:.0e}, {c['n']} peer records)")
    for r in summary["peer_ratios"]:
        t = "—" if r["time_ratio"] is None else f"{r['time_ratio']:.2f}"
        m = "—" if r["mem_ratio"] is None else f"{r['mem_ratio']:.2f}"
        lines.append(f"  ratio ours/{r['peer']} ({r['case']}, {r['ours']}, K={r['inner_steps']}, "
                     f"width {r['width']}, B={r['meta_batch']}): time {t} "
                     f"({_ms(r['time_ours_s'])} vs {_ms(r['time_peer_s'])} ms), memory {m}")
    if not lines:
        lines.append("(no claim could be computed from these records)")
    return lines


def _table(rows: list[Record], vary: str) -> list[str]:
    head = ("| method | K | width | params | B | peak mem (MiB) | time (ms) | rel. error | "
            "cosine | rel. error f64 | notes |")
    out = [head, "|" + "---|" * 11]
    order = {"ours": 0, "peer": 1}
    rows = sorted(rows, key=lambda r: (order.get(r.get("kind"), 2), r["estimator"],
                                       r.get(vary) or 0))
    for r in rows:
        notes = []
        if r.get("status") != "ok":
            notes.append(f"{r.get('status')}: {r.get('reason', '')[:140]}")
        if r.get("rel_error_vs_ours") is not None:
            notes.append(f"vs ours {r['rel_error_vs_ours']:.0e}")
        if r.get("inner_grad_ratio") is not None:
            notes.append(f"‖∇g(w_K)‖/‖∇g(w_0)‖ {r['inner_grad_ratio']:.0e}")
        if r.get("linsolve_breakdown"):
            notes.append("CG breakdown")
        if r.get("time_note"):
            notes.append("1 timing")
        out.append(f"| {r['estimator']} | {r['inner_steps']} | {r.get('width', '')} | "
                   f"{r.get('params') or ''} | {r.get('meta_batch', '')} | "
                   f"{_mb(r.get('peak_mem_bytes'))} | {_ms(r.get('time_s'))} | "
                   f"{_e(r.get('rel_error'))} | {_cos(r.get('cosine'))} | "
                   f"{_e(r.get('rel_error_f64'))} | {'; '.join(notes)} |")
    return out


SWEEP_TITLES = {"K": "inner steps K", "width": "width (parameter count)",
                "meta_batch": "meta-batch B"}
SWEEP_KEY = {"K": "inner_steps", "width": "width", "meta_batch": "meta_batch"}


def markdown(records: list[Record], summary: dict[str, Any] | None = None,
             title: str = "Benchmark results", plots: list[str] | None = None) -> str:
    summary = summarize(records) if summary is None else summary
    env = next((r for r in records if r.get("torch")), {})
    lines = [f"# {title}", ""]
    lines += [f"torch {env.get('torch', '?')}, python {env.get('python', '?')}, device "
              f"{env.get('device', '?')}{' (' + env['gpu'] + ')' if env.get('gpu') else ''}, "
              f"threads {env.get('threads', '?')} of {env.get('cpu_count', '?')} CPUs, "
              f"{env.get('platform', '')}, {len(records)} records "
              f"({', '.join(f'{v} {k}' for k, v in sorted(summary['status_counts'].items()))}).",
              "", "Peak memory = peak resident memory of a fresh process above its baseline "
              "after imports and data (`mem_method` in the JSON); time = median of repeated "
              "calls after a warm-up; accuracy against the exact float64 derivative of the "
              "K-step objective (`bl.Unrolled` in float64): rel. error of the measured "
              "(benchmark dtype) result, and of the same method run in float64.", "",
              "## Claims", "", "```"]
    lines += claim_lines(summary)
    lines += ["```", ""]
    cases = list(dict.fromkeys(r["case"] for r in records))
    for case in cases:
        lines += [f"## {case}", ""]
        case_rows = [r for r in records if r["case"] == case]
        tagged = any("sweeps" in r for r in case_rows)
        for sweep in ("K", "width", "meta_batch"):
            rows = [r for r in case_rows if sweep in r.get("sweeps", [])] if tagged else (
                case_rows if sweep == "K" else [])
            rows = [r for r in rows if r.get("inner_steps") is not None]  # never-run: below
            if not rows:
                continue
            lines += [f"### {case}: vs {SWEEP_TITLES[sweep]}", ""]
            lines += _table(rows, SWEEP_KEY[sweep])
            lines.append("")
    if plots:
        lines += ["## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots] + [""]
    skipped = [r for r in records if r.get("status") != "ok"]
    if skipped:
        lines += ["## Not run / failed (with reasons)", ""]
        seen = set()
        for r in skipped:
            key = (r["case"], r["estimator"], r.get("status"), r.get("reason"))
            if key in seen:
                continue
            seen.add(key)
            lines.append(f"- {r['case']} / {r['estimator']}: {r.get('status')}: "
                         f"{r.get('reason', '')}")
        lines.append("")
    return "\n".join(lines)


def write_markdown(records: list[Record], path: str | Path, summary: dict | None = None,
                   title: str = "Benchmark results", plots: list[str] | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(markdown(records, summary, title, plots))
    return path


# ----------------------------------------------------------------------------- plots


def write_plots(records: list[Record], out_dir: str | Path, name: str) -> tuple[list[str], str]:
    """PNG plots (log scales) next to the results: memory and time vs K per case, and vs
    parameter count / meta-batch where those sweeps exist. Returns (paths, message)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # optional dependency (the `plot`/`bench` extras)
        return [], f"plots skipped: matplotlib is not importable ({e}); pip install matplotlib"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[str] = []
    rows = ok(records)
    cases = list(dict.fromkeys(r["case"] for r in rows))
    for sweep, xkey, xlabel in (("K", "inner_steps", "inner steps K"),
                                ("width", "params", "inner parameters per task"),
                                ("meta_batch", "meta_batch", "meta-batch (tasks)")):
        for case in cases:
            sel = [r for r in rows if r["case"] == case and (
                sweep in r.get("sweeps", []) if "sweeps" in r else sweep == "K")]
            methods = list(dict.fromkeys(r["estimator"] for r in sel))
            if not sel or len({r[xkey] for r in sel}) < 2:
                continue
            fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
            for ykey, ax, ylabel in (("peak_mem_bytes", axes[0], "peak memory (MiB)"),
                                     ("time_s", axes[1], "time of one hypergradient (s)")):
                for m in methods:
                    pts = sorted((r[xkey], r[ykey]) for r in sel
                                 if r["estimator"] == m and r.get(ykey))
                    if not pts:
                        continue
                    scale = 2**20 if ykey == "peak_mem_bytes" else 1
                    style = "--" if any(r.get("kind") == "peer" for r in sel
                                        if r["estimator"] == m) else "-"
                    ax.plot([p[0] for p in pts], [p[1] / scale for p in pts], style,
                            marker="o", label=m)
                ax.set_xscale("log")
                ax.set_yscale("log")
                ax.set_xlabel(xlabel)
                ax.set_ylabel(ylabel)
                ax.grid(True, which="both", alpha=0.3)
            axes[1].legend(fontsize=7, loc="best")
            fig.suptitle(f"{case}: memory and time vs {xlabel}")
            fig.tight_layout()
            path = out_dir / f"{name}_{case}_{sweep}.png"
            fig.savefig(path, dpi=100)
            plt.close(fig)
            paths.append(str(path))
    return paths, f"{len(paths)} plots written"


# ----------------------------------------------------------------------------- files


def load_records(path: str | Path) -> list[Record]:
    return json.loads(Path(path).read_text())


def write_all(records: list[Record], json_path: str | Path, title: str = "Benchmark results",
              plots: bool = True) -> dict[str, Any]:
    """Write ``<name>.json``, ``<name>.md`` and the plots; return the summary (with messages)."""
    json_path = Path(json_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(records, indent=1))
    summary = summarize(records)
    paths, message = (write_plots(records, json_path.parent, json_path.stem) if plots
                      else ([], "plots skipped (--no-plots)"))
    summary["plots"], summary["plot_message"] = paths, message
    write_markdown(records, json_path.with_suffix(".md"), summary, title, paths)
    return summary


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print("usage: python -m benchmarks.report RESULTS.json [...]", file=sys.stderr)
        return 2
    for p in argv:
        records = load_records(p)
        summary = write_all(records, p, title=f"Benchmark results: {Path(p).stem}")
        print("\n".join(claim_lines(summary)))
        print(summary["plot_message"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
