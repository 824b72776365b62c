"""Fast tests of the compiled-step benchmark writers (benchmarks/compiled_step.py,
compiled_learners.py, profile.py): pure summaries and tables on hand-made records, and the
plain loops of compiled_learners against the learners (float64, tiny Conv4, no compile).
No timing is asserted."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import compiled_learners as CL  # noqa: E402
from benchmarks import compiled_step as CS  # noqa: E402
from benchmarks import profile as P  # noqa: E402


def _rec(method, t, first=None, K=1, tasks=16, width=64, rel=0.0):
    return {"method": method, "K": K, "tasks": tasks, "width": width, "status": "ok",
            "time_s": t, "first_call_s": t if first is None else first, "rel_vs_eager": rel,
            "time_samples": [t]}


RECORDS = [_rec("eager", 2.0), _rec("compiled", 1.0, first=21.0, rel=1e-6),
           _rec("plain", 1.5), _rec("higher", 1.6),
           _rec("eager", 1.0, width=32), _rec("compiled", 1.2, first=11.2, width=32),
           _rec("torchopt", 0.9, width=32),
           {"method": "learn2learn", "K": 1, "tasks": 16, "width": 32, "status": "skipped",
            "reason": "not installed"}]


def test_grid_summary_ratios_and_break_even():
    rows = {(r["width"], r["K"]): r for r in CS.summarise(RECORDS)}
    w64 = rows[(64, 1)]
    assert w64["fastest_peer"] == "plain"
    assert w64["ratio_vs_fastest_peer"] == pytest.approx(1.0 / 1.5)
    assert w64["ratio_vs_eager"] == pytest.approx(0.5)
    assert w64["compile_s"] == pytest.approx(20.0)
    assert w64["break_even_vs_eager"] == pytest.approx(20.0)
    assert w64["break_even_vs_peer"] == pytest.approx(40.0)
    w32 = rows[(32, 1)]
    assert w32["break_even_vs_eager"] is None and w32["break_even_vs_peer"] is None


def test_grid_markdown_and_partial_flag(tmp_path):
    meta = {"device": "test", "date": "2026-12-02T00:00:00", "command": "x", "torch": "t",
            "protocol": "interleaved"}
    md = CS.grid_markdown(meta, RECORDS, n_configs=4)
    assert "PARTIAL: 2 of 4" in md
    assert "| 64 | 16 | 1 | 1.000 | 2.000 | 1.500 (plain) | 0.67 | 0.50 | 20 | 20 | 40 |" in md
    assert "never" in md and "skipped" in md
    CS.write_grid(tmp_path, "g", meta, RECORDS, 2)
    assert (tmp_path / "g.json").exists() and (tmp_path / "g.md").exists()


def test_learners_summary():
    recs = [{"learner": "anil", "method": m, "status": "ok", "time_s": t, "first_call_s": f,
             "rel_vs_eager": 0.0} for m, t, f in [("eager", 2.0, 2.0), ("compiled", 1.0, 11.0),
                                                  ("plain", 4.0, 4.0)]]
    (row,) = CL.summarise(recs)
    assert row["compiled_vs_plain"] == pytest.approx(0.25)
    assert row["break_even_vs_eager"] == pytest.approx(10.0)
    assert row["eager_vs_plain"] == pytest.approx(0.5)
    meta = {"device": "d", "date": "2026-12-02", "command": "c", "torch": "t", "width": 32,
            "tasks": 16, "protocol": "p"}
    assert "| anil | 1.000 | 2.000 | 4.000 | 0.25 |" in CL.markdown(meta, recs, 3)


def test_profile_split():
    ev = [("aten::convolution_backward", 50.0, 60.0, 2), ("Torch-Compiled Region: 0/0", 30.0,
                                                          100.0, 1), ("aten::copy_", 20.0, 20.0, 5)]
    s = P.split_times(ev)
    assert s["kernel_share"] == pytest.approx(0.5)
    assert s["generated_share"] == pytest.approx(0.3)
    assert s["rest_share"] == pytest.approx(0.2)
    assert s["compiled_regions"][0]["inclusive_s"] == pytest.approx(1e-4)


def test_cg_solves_spd_system():
    torch.manual_seed(0)
    a = torch.randn(6, 6, dtype=torch.float64)
    A = a @ a.T + 6 * torch.eye(6, dtype=torch.float64)
    b = torch.randn(6, dtype=torch.float64)
    (x,) = CL._cg(lambda v: [A @ v[0]], [b], 6)
    assert torch.allclose(x, torch.linalg.solve(A, b), atol=1e-10)


@pytest.mark.parametrize("name", CL.LEARNERS)
def test_plain_loops_match_learners(name):
    import meta
    from benchmarks import cases
    bench = cases.build("conv4_maml", 1, 4, 2, torch.float64, torch.device("cpu"))
    model = bench.extra["model"]
    data = CS._case_data(model, 2)
    kw = {"inner_steps": 3} if name != "anil" else {"inner_steps": 2}
    learner = meta.make_learner(name, model, vectorize=False, **kw)
    with warnings.catch_warnings():  # iMAML's CG breakdown / stationarity warnings
        warnings.simplefilter("ignore")
        grads, _ = learner.meta_gradient(meta.TaskBatch(data[:2], data[2:]))
    if name == "anil":
        plain = CL.plain_anil(model, data, learner.inner_lr, learner.inner_steps)
    elif name == "memoryreduced":
        plain = CL.plain_memoryreduced(model, data, learner.inner_lr, learner.inner_steps,
                                       learner.cg_iters, learner.damping)
    else:
        plain = CL.plain_imaml(model, data, learner.inner_lr, learner.inner_steps,
                               learner.reg, learner.cg_iters)
    assert sorted(grads) == sorted(plain)
    a = torch.cat([grads[k].reshape(-1) for k in grads])
    b = torch.cat([plain[k].reshape(-1) for k in grads])
    assert float((a - b).norm() / a.norm()) < 1e-10

