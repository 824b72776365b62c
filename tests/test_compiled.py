"""The torch.compile tests, each file run in a fresh interpreter.

``_compiled_quick.py`` always runs (CI: about a minute on 2 cores): inductor on tiny float64
problems (Unrolled, Implicit(CG), MAML + BatchNorm vmapped; equal to eager at 1e-10, one
graph), skipped without a C++ compiler, and the regression tests of the bug that made these
tests flaky: in torch 2.13 a failed trace left a dispatch-key guard alive in a traceback, and
whenever the GC freed it, the thread's dispatch state was corrupted (every later torch.func
call or compile failed: the "RuntimeError when making fake tensor call" and the hundreds of
cascading failures). ``bilevel.compiled.guarded_compiled_call`` works around it.

``_compiled_cases.py`` (every estimator and learner, Dynamo with a counting backend and
aot_eager, ~1 min more) is opt-in: ``BILEVEL_TEST_COMPILE=1 python -m pytest
tests/test_compiled.py``.

A fresh interpreter keeps Dynamo's process-wide caches and counters out of the rest of the
suite (and the suite's state out of the recompile counts); a per-run inductor cache directory
keeps concurrently running test processes from sharing on-disk artifacts.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def run_cases(name: str, tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE)]),
               TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                          str(HERE / name)], cwd=HERE.parent, env=env,
                         capture_output=True, text=True, timeout=1500)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    print(run.stdout[-1500:])  # the child's summary (skips, time) with -s / -rA


def test_quick_compiled_cases_in_a_fresh_interpreter(tmp_path):
    run_cases("_compiled_quick.py", tmp_path)


@pytest.mark.skipif(os.environ.get("BILEVEL_TEST_COMPILE") != "1",
                    reason="the broad torch.compile cases take another minute or two on CPU: "
                           "opt-in with BILEVEL_TEST_COMPILE=1")
def test_all_compiled_cases_in_a_fresh_interpreter(tmp_path):
    run_cases("_compiled_cases.py", tmp_path)
