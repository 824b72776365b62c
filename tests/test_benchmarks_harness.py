"""Fast tests of the benchmark harness (benchmarks/): the measure subprocess, the claims and
the report writer. No timing is asserted anywhere."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import cases as C  # noqa: E402
from benchmarks import measure as M  # noqa: E402
from benchmarks import report as R  # noqa: E402
from benchmarks.__main__ import build_grid, parse_args  # noqa: E402

REQUIRED = ["case", "estimator", "inner_steps", "params", "meta_batch", "peak_mem_bytes",
            "time_s", "rel_error", "cosine", "device", "torch", "threads", "status"]


def _run_measure(*args: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-m", "benchmarks.measure", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert lines, f"no record (exit {proc.returncode}): {proc.stderr[-2000:]}"
    return json.loads(lines[-1])


def test_measure_subprocess_unrolled_tiny():
    rec = _run_measure("--case", "mlp", "--estimator", "Unrolled", "--inner-steps", "3",
                       "--width", "8", "--meta-batch", "2", "--dtype", "float64",
                       "--repeats", "2", "--time-budget", "1", "--threads", "1")
    assert rec["status"] == "ok", rec.get("reason")
    for key in REQUIRED:
        assert key in rec, key
    assert rec["case"] == "mlp" and rec["estimator"] == "Unrolled" and rec["inner_steps"] == 3
    assert rec["meta_batch"] == 2 and rec["width"] == 8
    assert rec["params"] == 8 * 8 + 8 + 8 * 8 + 8 + 8 + 1
    assert rec["peak_mem_bytes"] > 0
    assert rec["time_s"] > 0 and len(rec["time_samples"]) >= 1
    assert rec["rel_error"] < 1e-12 and abs(rec["cosine"] - 1) < 1e-12
    assert rec["threads"] == 1 and rec["device"] == "cpu"
    if sys.platform.startswith("linux"):
        assert rec["mem_method"] in ("proc_clear_refs", "ru_maxrss")


def test_measure_in_process_skips_with_reason():
    rec = M.measure({"case": "mlp", "estimator": "ForwardMode", "inner_steps": 2, "width": 8,
                     "meta_batch": 1})
    assert rec["status"] == "skipped" and "hyperparameter" in rec["reason"]
    rec = M.measure({"case": "conv4_maml", "estimator": "Implicit-CG", "inner_steps": 1,
                     "width": 4, "meta_batch": 1})
    assert rec["status"] == "skipped" and "θ" in rec["reason"]
    rec = M.measure({"case": "mlp", "estimator": "higher", "inner_steps": 1})
    assert rec["status"] == "skipped" and "Conv4" in rec["reason"]
    rec = M.measure({"case": "nope", "estimator": "Unrolled", "inner_steps": 1})
    assert rec["status"] == "skipped"


def test_estimators_are_built_for_every_name():
    spec = C.CASES["mlp"]
    for name in C.ESTIMATORS:
        est = C.make_estimator(name, 3, spec)
        assert est is not None
    assert C.make_estimator("Truncated", 3, spec).steps == 3
    assert C.make_estimator("Truncated", 200, spec).steps == 5


def test_compare():
    import torch

    ref = {"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([0.0])}
    rel, cos = M.compare({"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([0.0])}, ref)
    assert rel == 0 and cos == pytest.approx(1)
    rel, cos = M.compare({"a": torch.tensor([0.0, 1.0]), "b": torch.tensor([0.0])}, ref)
    assert rel == pytest.approx(2 ** 0.5) and cos == pytest.approx(0)


def _rec(case, est, K, mem, time_s=0.1, kind="ours", **kw):
    r = {"case": case, "estimator": est, "kind": kind, "inner_steps": K, "params": 100,
         "width": 64, "meta_batch": 4, "peak_mem_bytes": mem, "time_s": time_s,
         "rel_error": 1e-7, "cosine": 1.0, "rel_error_f64": 0.0, "device": "cpu",
         "torch": "2.x", "threads": 1, "status": "ok", "reason": "", "sweeps": ["K"]}
    r.update(kw)
    return r


def _synthetic():
    mb = 2**20
    recs = []
    for K in (10, 50, 200):
        recs.append(_rec("mlp", "Unrolled", K, K * mb))
        recs.append(_rec("mlp", "Checkpointed", K, int(K ** 0.5 * mb)))
        recs.append(_rec("mlp", "Implicit-CG", K, 2 * mb + K * 100))     # flat
        recs.append(_rec("mlp", "HistoryFree", K, 2 * mb + K * 20_000))  # grows: 4 -> 6 MiB
    recs.append(_rec("conv4_maml", "Unrolled", 1, 70 * mb, 0.2))
    recs.append(_rec("conv4_maml", "plain", 1, 30 * mb, 0.1, kind="peer",
                     match_estimator="Unrolled", rel_error_vs_ours=0.0))
    recs.append(_rec("conv4_maml", "higher", 1, None, None, kind="peer", status="skipped",
                     reason="peer 'higher' is unavailable (ImportError: nope)"))
    return recs


def test_flatness_claim():
    recs = _synthetic()
    flat = R.flatness(recs, "mlp", "Implicit-CG")
    assert flat["pass"] and flat["ratio"] == pytest.approx((2 * 2**20 + 20_000) /
                                                           (2 * 2**20 + 1000))
    grows = R.flatness(recs, "mlp", "HistoryFree")
    assert not grows["pass"] and grows["ratio"] > 1.2
    assert R.flatness(recs, "mlp", "ForwardMode") is None  # no records: no claim
    assert R.growth_exponent(R.k_series(recs, "mlp", "Unrolled")) == pytest.approx(1.0)
    assert R.growth_exponent(R.k_series(recs, "mlp", "Checkpointed")) == pytest.approx(
        0.5, abs=0.01)


def test_summary_and_ratios():
    summary = R.summarize(_synthetic())
    by = {(c["claim"], c.get("estimator")): c for c in summary["claims"]}
    assert by[("flat", "Implicit-CG")]["pass"]
    assert not by[("flat", "HistoryFree")]["pass"]
    assert by[("linear", "Unrolled")]["pass"]
    assert by[("sqrt", "Checkpointed")]["pass"] and by[("sqrt", "Checkpointed")][
        "below_unrolled"]
    assert by[("peers_match", None)]["pass"]
    (ratio,) = summary["peer_ratios"]
    assert ratio["peer"] == "plain" and ratio["time_ratio"] == pytest.approx(2.0)
    assert ratio["mem_ratio"] == pytest.approx(70 / 30)
    lines = R.claim_lines(summary)
    assert any(ln.startswith("[FAIL] mlp: HistoryFree") for ln in lines)
    assert any("ours/plain" in ln for ln in lines)


def test_report_writer(tmp_path):
    recs = _synthetic()
    summary = R.write_all(recs, tmp_path / "syn.json", title="synthetic", plots=False)
    md = (tmp_path / "syn.md").read_text()
    assert md.startswith("# synthetic")
    assert "## Claims" in md and "[PASS] mlp: Implicit-CG memory flat in K" in md
    assert "| Unrolled | 200 |" in md
    assert "higher: skipped: peer 'higher' is unavailable" in md  # never silently dropped
    assert json.loads((tmp_path / "syn.json").read_text()) == recs
    assert summary["plot_message"].startswith("plots skipped")


def test_quick_grid_covers_the_claims():
    grid = build_grid(parse_args(["--quick"]))
    have = {(g["case"], g["estimator"], g["inner_steps"]) for g in grid}
    for est in ("Implicit-CG", "Implicit-Neumann", "HistoryFree", "Unrolled", "Checkpointed"):
        assert ("mlp", est, 10) in have and ("mlp", est, 200) in have
    assert ("mlp_hpo", "ForwardMode", 10) in have and ("mlp_hpo", "ForwardMode", 200) in have
    assert ("conv4_maml", "plain", 1) in have and ("conv4_maml", "Unrolled", 1) in have
    keys = [(g["case"], g["estimator"], g["inner_steps"], g["width"], g["meta_batch"])
            for g in grid]
    assert len(keys) == len(set(keys))  # one run per configuration
    full = build_grid(parse_args(["--only", "mlp"]))
    assert {g["inner_steps"] for g in full} == {1, 5, 10, 25, 50, 100, 200}
    assert {g["width"] for g in full} >= {32, 1024}
    assert {g["meta_batch"] for g in full} >= {1, 32}
    narrowed = build_grid(parse_args(["--only", "conv4_maml", "--k", "1,5"]))
    assert {g["inner_steps"] for g in narrowed} == {1, 5}
    with pytest.raises(SystemExit, match="--k"):
        build_grid(parse_args(["--only", "mlp", "--k", "1,x"]))


def test_learners_benchmark_one_row_and_table(tmp_path):
    """benchmarks.learners end to end on a tiny Conv4 (two rows, fresh processes)."""
    from benchmarks import learners as LB

    rows = "MAML K=1,memory-reduced T=20 N=20"
    assert LB.main(["--only", rows, "--width", "4", "--meta-batch", "1", "--repeats", "1",
                    "--out", str(tmp_path), "--name", "lb"]) == 0
    recs = json.loads((tmp_path / "lb.json").read_text())
    assert [r["status"] for r in recs] == ["ok", "ok"], recs
    assert recs[1]["estimator"] == "HistoryFree" and recs[1]["time_s"] > 0
    assert "| memory-reduced T=20 N=20 | `HistoryFree` |" in (tmp_path / "lb.md").read_text()
    with pytest.raises(SystemExit, match="unknown row"):
        LB.main(["--only", "MAML K=7", "--out", str(tmp_path)])
