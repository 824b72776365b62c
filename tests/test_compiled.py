"""The compiled-hypergradient tests (``tests/_compiled_cases.py``), run in a fresh interpreter.

``torch.compile`` keeps process-wide state (Dynamo caches, inductor config, functorch's
transform stack while tracing). After the rest of the suite, an inductor compile failed in this
process with "RuntimeError when making fake tensor call", and the half-finished trace left the
process unable to run torch.func transforms (hundreds of unrelated failures after it). In their
own interpreter they passed in most runs, but not all (the same failure, intermittent): until
that is understood they are opt-in, ``BILEVEL_TEST_COMPILE=1 python -m pytest
tests/test_compiled.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


@pytest.mark.skipif(os.environ.get("BILEVEL_TEST_COMPILE") != "1",
                    reason="torch.compile cases are opt-in (BILEVEL_TEST_COMPILE=1): on "
                           "2026-12-02 an inductor trace on this CPU failed intermittently "
                           "('RuntimeError when making fake tensor call') and poisoned the "
                           "process; open in issue 12")
def test_compiled_cases_in_a_fresh_interpreter():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE)]))
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          str(HERE / "_compiled_cases.py")], cwd=HERE.parent, env=env,
                         capture_output=True, text=True, timeout=1500)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
