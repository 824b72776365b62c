"""The tuning examples run end to end at a tiny size (the committed results use the defaults)."""

from __future__ import annotations

import importlib.util
import json
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("sklearn")


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_hyper_cleaning_runs(tmp_path):
    out = tmp_path / "hc.json"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        hc = load("hyper_cleaning")
        hc.SOLVER_SCRATCH = hc.bl.Momentum(lr=1.0, steps=20, momentum=0.9)  # tiny run
        hc.SOLVER_FINAL = hc.bl.Momentum(lr=1.0, steps=50, momentum=0.9)
        hc.main(["--seeds", "0", "--hyper-steps", "2", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    methods = {r["method"] for r in rows}
    assert methods == {"unweighted", "oracle", "from scratch", "online", "online + Truncated(10)"}
    assert all(0 <= r["test_acc"] <= 1 for r in rows)
    assert all(0 <= r["auc"] <= 1 for r in rows if "auc" in r)
    assert out.with_suffix(".md").exists()


def test_hpo_digits_mlp_runs(tmp_path):
    pytest.importorskip("optuna")
    out = tmp_path / "a.json"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ex = load("hpo_digits_mlp")
        ex.STEPS = 60  # tiny runs: 2 hyper-steps of K = 30
        ex.main(["--seeds", "0", "--budget", "2", "--space", "small", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    steps = {r["method"]: r["inner_steps"] for r in rows}
    assert steps["hypergradient (online)"] == steps["random search, same steps"] \
        == steps["TPE, same steps"] == 2 * 60
