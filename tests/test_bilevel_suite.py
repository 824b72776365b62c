"""The suite's aggregation (median / 20-80 % band, time to target, table) on made-up records."""

from __future__ import annotations

import math

import numpy as np
import pytest

from benchmarks import bilevel_suite as bs


def _run(alg, impl, seed, scale):
    recs = [(0, 0.0, 1.0)] + [(k * 100, k * scale, 1.0 / (k + 1)) for k in range(1, 11)]
    return {"problem": "p", "alg": alg, "impl": impl, "seed": seed, "params": [0.1, 1.0, {}],
            "records": recs, "calls_per_it": 320}


def test_summary_table_and_band(tmp_path):
    runs = [_run("soba", "torch", s, 0.2) for s in (1, 2, 3)]
    runs += [_run("soba", "jax", s, 0.1) for s in (1, 2, 3)]
    summary = bs.summarise(runs)
    v_t, v_j = summary[("p", "soba", "torch")], summary[("p", "soba", "jax")]
    assert v_t["final"] == pytest.approx(1 / 11)
    assert v_t["us_per_it"] == pytest.approx(1e6 * 2.0 / 1000)
    assert v_t["time_to_target"] == pytest.approx(2 * v_j["time_to_target"])
    med, lo, hi = bs.band(runs[:3], 1, np.array([0.0, 0.25, 5.0]))
    assert med[0] == 1.0 and med[1] == pytest.approx(0.5) and lo[2] <= med[2] <= hi[2]
    meta = {"date": "d", "device": "cpu", "torch": "t", "jax": "j", "benchmark_commit": "c",
            "seeds": 3, "max_time": 2, "command": "cmd", "data": {"p": "synthetic"},
            "metric": {"p": "subopt"}}
    text = bs.write_table(summary, meta, tmp_path / "t.md")
    assert "| SOBA | torch | 2000.0 |" in text and "2.0×" in text
    assert "Fastest to the target: **SOBA (jax)**" in text
    assert not math.isnan(v_t["target"])


def test_diverged_runs_count_as_infinite(tmp_path):
    """A run that ends in NaN is counted, ranks as +inf in the final median and in the band
    from its divergence on, and is never silently dropped."""
    runs = [_run("srba", "torch", s, 0.2) for s in (1, 2, 3)]
    for r in runs[1:]:  # seeds 2, 3 diverge after 500 iterations (1.0 s)
        r["records"] = r["records"][:6] + [(600, 1.2, float("nan"))]
    v = bs.summarise(runs)[("p", "srba", "torch")]
    assert v["diverged"] == 2 and v["final"] == math.inf
    med, lo, hi = bs.band(runs, 1, np.array([0.5, 1.1, 1.3, 3.0]))
    assert np.isfinite(med[:2]).all() and (med[2:] == np.inf).all()
    assert (hi[2:] == np.inf).all() and not np.isnan(np.r_[lo, hi]).any()
    five = runs + [_run("srba", "torch", s, 0.2) for s in (4, 5)]  # 2 of 5 diverged
    med, lo, hi = bs.band(five, 1, np.array([1.3, 3.0]))
    assert med == pytest.approx([1 / 7, 1 / 11]) and lo == pytest.approx([1 / 7, 1 / 11])
    assert (hi == np.inf).all()
    assert bs.summarise(five)[("p", "srba", "torch")]["final"] == pytest.approx(1 / 11)
    meta = {"date": "d", "device": "cpu", "torch": "t", "jax": "j", "benchmark_commit": "c",
            "seeds": 3, "max_time": 2, "command": "cmd", "data": {"p": "synthetic"},
            "metric": {"p": "subopt"}}
    text = bs.write_table(bs.summarise(runs), meta, tmp_path / "t.md")
    assert "| SRBA | torch | 2000.0 | diverged | 2 / 3 |" in text


@pytest.mark.parametrize("r, text", [(2.0, "2.0"), (0.36, "0.36"), (0.0357, "0.036"),
                                     (3.64, "3.6"), (28.4, "28"), (153.0, "153")])
def test_ratio_text_two_significant_digits(r, text):
    assert bs.ratio_text(r) == text


def test_records_name_the_cpu():
    assert isinstance(bs.cpu_model(), str) and bs.cpu_model()


def test_report_rewrites_table_and_plots_from_records(tmp_path):
    pytest.importorskip("matplotlib")
    import json
    runs = [_run("soba", impl, s, 0.2) for impl in ("torch", "jax") for s in (1, 2)]
    meta = {"date": "d", "device": "cpu", "torch": "t", "jax": "j", "benchmark_commit": "c",
            "seeds": 2, "max_time": 2, "command": "cmd", "data": {"p": "synthetic"},
            "metric": {"p": "subopt"}}
    (tmp_path / "records.json").write_text(json.dumps({"meta": meta, "runs": runs}))
    text = bs.report(tmp_path / "records.json")
    assert (tmp_path / "table.md").read_text() == text and "| SOBA | torch |" in text
    assert (tmp_path / "p.png").stat().st_size > 0
    # two runs (problems split over processes) merged into one folder
    other = {"meta": {**meta, "command": "cmd2", "data": {"q": "synthetic"},
                      "metric": {"q": "subopt"}},
             "runs": [{**r, "problem": "q"} for r in runs]}
    (tmp_path / "b.json").write_text(json.dumps(other))
    merged = bs.report([tmp_path / "records.json", tmp_path / "b.json"], tmp_path / "m")
    assert "## p " in merged and "## q " in merged and "cmd ; cmd2" in merged
    assert len(json.loads((tmp_path / "m" / "records.json").read_text())["runs"]) == 8
    with pytest.raises(ValueError, match="--out"):
        bs.report([tmp_path / "records.json", tmp_path / "b.json"])


def test_config_grid_reads_benchmark_yml():
    from benchmarks import bilevel_jax as bj
    if bj.benchmark_repo() is None:
        pytest.skip("no benchmark_bilevel checkout")
    grid = bs.config_grid("ijcnn1", "saba")
    assert (0.125, 1.0, {}) in grid and len(grid) == 25


def test_sampler_streams_summary_counts_divergence_and_spread():
    from benchmarks import sampler_streams as ss
    ok = [[[1.0, 2.0]] * 4, [[1.5, 2.0]] * 4, [[0.5, 2.0]] * 4]
    bad = [[[1.0, 2.0], [float("nan"), 0.0]], [[1.0, 2.0]] * 4, [[1.2, 2.0]] * 4]
    out = ss.summarise({"a": ok, "b": bad}, at=2 * ss.EVERY)
    assert out["a"]["diverged"] == 0 and out["a"][f"spread_at_{2 * ss.EVERY}"] == 0.5
    assert out["b"]["diverged"] == 1 and out["b"]["diverged_at"] == [2 * ss.EVERY]
    assert out["b"][f"spread_at_{2 * ss.EVERY}"] == pytest.approx(0.1)  # the NaN seed left out
