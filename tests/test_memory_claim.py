"""benchmarks.memory_claim: every row builds a valid learner; the verdict reads the ratios
right (synthetic records; the measurements themselves run on demand, never in the tests)."""

from __future__ import annotations

import meta
from benchmarks import memory_claim as MC
from meta.backbones import maml_conv4


def test_every_row_is_a_valid_learner_on_the_paper_backbone():
    for _, algo, kw in MC.CONFIGS:
        learner = meta.make_learner(algo, maml_conv4(), **kw)
        assert learner.inner_steps == kw["inner_steps"]
    assert sum(1 for c in MC.CONFIGS if c[0].startswith("memory-reduced")) == 2


def _rec(name: str, mib: float, tasks: int = 4, t: float = 1.0) -> dict:
    return {"learner": name, "meta_batch": tasks, "status": "ok", "vectorized": False,
            "peak_mem_bytes": mib * 2 ** 20, "time_s": t, "device": "cpu"}


def test_verdict_and_markdown_on_synthetic_records():
    records = [_rec("memory-reduced T=20 N=20", 100), _rec("MAML K=20", 1000),
               _rec("ANIL K=20", 150), _rec("memory-reduced T=20 N=20", 999, tasks=32),
               {"learner": "ANIL K=5 (paper's baseline)", "meta_batch": 4, "status": "error",
                "reason": "boom"}]
    lines = MC.verdict(records)
    assert any("vs MAML K=20: memory-reduced T=20 N=20: 0.10x (holds)" in ln for ln in lines)
    assert any("vs ANIL K=20: memory-reduced T=20 N=20: 0.67x (does NOT hold)" in ln
               for ln in lines)
    md = MC.markdown(records, "t")
    assert "| MAML K=20 | 4 | loop | 1000.0 | 10.00 | 1.00 | 8.0* |" in md
    assert "| memory-reduced T=20 N=20 | 32 | loop | 999.0 | 1.00 | 1.00 | 1.0 |" in md
    assert "error: boom" in md
