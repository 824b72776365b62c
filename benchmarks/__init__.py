"""Benchmarks that prove the library's claims: peak memory, wall time and accuracy of every
hypergradient estimator as the inner steps K, the width and the meta-batch grow, next to the
peer libraries (higher, TorchOpt, learn2learn) on the Conv4 MAML meta-step.

Run on demand, never as part of the test suite::

    python -m benchmarks --quick                  # < 5 min; results in benchmarks/results/
    python -m benchmarks.measure --case mlp --estimator Unrolled --inner-steps 10
    pytest benchmarks/ --benchmark-only           # pytest-benchmark regression timings

Modules: :mod:`.cases` (problems, estimators, peers), :mod:`.measure` (one configuration in a
fresh process -> one JSON record), :mod:`.report` (claims, Markdown, plots), ``__main__``
(the suite), :mod:`.learners` (one meta-step of every learner), :mod:`.profile` (where the time
of a Conv4 MAML step goes). See ``benchmarks/README.md``.
"""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def subprocess_env() -> dict[str, str]:
    """The environment of a measuring subprocess: this one, with the repository first on
    ``PYTHONPATH`` (so ``python -m benchmarks.*`` imports this checkout)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "")
                                                       .split(os.pathsep) if p])
    return env
