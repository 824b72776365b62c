"""examples/tpe_plus_hypergrad.py runs end to end at a tiny size (committed results: defaults)."""

from __future__ import annotations

import importlib.util
import json
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("sklearn")
pytest.importorskip("optuna")


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_tpe_plus_hypergrad_runs(tmp_path):
    out = tmp_path / "t.json"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ex = load("tpe_plus_hypergrad")
        ex.STEPS = 60  # tiny runs: 2 hyper-steps of K = 30 / 2 reports of plain training
        ex.main(["--seeds", "0", "--trials", "3", "--out", str(out)])
    res = json.loads(out.read_text())["results"]
    for method in ("TPE alone", "TPE + refine"):
        rows = res[method]["0"]
        assert len(rows) == 3 and all(r["state"] == "COMPLETE" for r in rows)  # < 5: no pruning
        assert [r["trainings"] for r in rows] == [1.0, 2.0, 3.0]
        assert rows[-1]["best"] == min(r["value"] for r in rows)
    assert set(res["TPE + refine"]["0"][0]["params"]) == {"lr", "wd0"}
    assert "| target val loss |" in out.with_suffix(".md").read_text()
