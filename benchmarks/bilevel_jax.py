"""benchopt's own JAX solvers (benchopt/benchmark_bilevel), run from the user's checkout at run
time (their code is not vendored), on the same data as the PyTorch algorithms.

The checkout is found through ``$BENCHMARK_BILEVEL`` (a directory with ``solvers/`` and
``benchmark_utils/``) or exported from a git mirror (``$BENCHMARK_BILEVEL_GIT``, default
``/work/.mirror/benchopt+benchmark_bilevel/repo``) into ``~/.cache/bilevel-bench``. Needs the
``bilevel-bench`` extra (jax, jaxlib, jaxopt, benchopt).

The oracles follow the benchmark's dataset convention: ``f(inner, outer, start, batch_size)``
on ``jax.lax.dynamic_slice`` of the data (written here for our problems' losses).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np

DEFAULT_GIT = "/work/.mirror/benchopt+benchmark_bilevel/repo"


def available() -> tuple[bool, str]:
    for mod in ("jax", "jaxopt", "benchopt"):
        if importlib.util.find_spec(mod) is None:
            return False, f"{mod} is not installed (pip install 'bilevel-meta[bilevel-bench]')"
    if benchmark_repo() is None:
        return False, ("no benchmark_bilevel checkout: set BENCHMARK_BILEVEL to a clone of "
                       "github.com/benchopt/benchmark_bilevel")
    return True, ""


def benchmark_repo() -> Path | None:
    env = os.environ.get("BENCHMARK_BILEVEL")
    if env:
        p = Path(env)
        return p if (p / "solvers").is_dir() else None
    git = Path(os.environ.get("BENCHMARK_BILEVEL_GIT", DEFAULT_GIT))
    if not git.exists():
        return None
    try:
        commit = subprocess.check_output(["git", f"--git-dir={git}", "rev-parse", "HEAD"],
                                         text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    dest = Path.home() / ".cache" / "bilevel-bench" / f"benchmark_bilevel-{commit[:10]}"
    if not (dest / "solvers").is_dir():
        dest.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", f"--git-dir={git}", "archive", "HEAD"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def repo_commit() -> str:
    """The checkout's commit: ``git rev-parse`` in a work tree (``BENCHMARK_BILEVEL``), else
    the suffix of the extracted archive's folder name."""
    p = benchmark_repo()
    if p is None:
        return "?"
    try:
        return subprocess.check_output(["git", "-C", str(p), "rev-parse", "--short=7", "HEAD"],
                                       text=True, stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return p.name.rsplit("-", 1)[-1]


def load_solver_class(name: str):
    """The ``Solver`` class of ``solvers/<name>.py`` in the checkout."""
    repo = benchmark_repo()
    if repo is None:
        raise RuntimeError(available()[1])
    if str(repo) not in sys.path:
        sys.path.insert(0, str(repo))
    spec = importlib.util.spec_from_file_location(f"bb_solver_{name}", repo / "solvers" /
                                                  f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.Solver


def set_x64(enabled: bool) -> None:
    import jax
    jax.config.update("jax_enable_x64", bool(enabled))


# ------------------------------------------------------------------------------------------
# oracles in the benchmark's convention, for our problems
# ------------------------------------------------------------------------------------------
def jax_oracles(kind: str, inner_data, outer_data, **kw):
    """(f_inner, f_outer) ``f(inner, outer, start=0, batch_size=1)`` for a problem kind."""
    import jax
    import jax.numpy as jnp

    Di = [jnp.asarray(np.asarray(a)) for a in inner_data]
    Do = [jnp.asarray(np.asarray(a)) for a in outer_data]

    def sl(arrs, start, b):
        return [jax.lax.dynamic_slice_in_dim(a, start, b, axis=0) for a in arrs]

    if kind == "ijcnn1":
        def g(z, x, X, y):
            return jnp.mean(jax.nn.softplus(-y * (X @ z))) + 0.5 * jnp.dot(jnp.exp(x) * z, z)

        def f(z, x, X, y):
            return jnp.mean(jax.nn.softplus(-y * (X @ z)))
    elif kind in ("covtype", "hyper-cleaning"):
        n_classes, n_feat = kw["n_classes"], Di[0].shape[1]

        def ce(z, X, y):
            logits = X @ z.reshape(n_feat, n_classes)
            return jax.nn.logsumexp(logits, axis=1) - jnp.take_along_axis(
                logits, y[:, None], axis=1)[:, 0]

        if kind == "covtype":
            def g(z, x, X, y):
                zz = z.reshape(n_feat, n_classes)
                return jnp.mean(ce(z, X, y)) + 0.5 * jnp.dot(jnp.exp(x), (zz * zz).sum(0))
        else:
            reg = kw.get("reg", 0.2)

            def g(z, x, X, y, idx):
                return jnp.mean(jax.nn.sigmoid(x[idx]) * ce(z, X, y)) + reg * jnp.sum(z * z)

        def f(z, x, X, y):
            return jnp.mean(ce(z, X, y))
    elif kind == "quadratic":
        mu, rho = kw["mu"], kw.get("rho", 0.1)

        def g(z, x, A, y, B):
            return 0.5 * jnp.mean((A @ z - y - B @ x) ** 2) + 0.5 * mu * jnp.sum(z * z)

        def f(z, x, A, y):
            return 0.5 * jnp.mean((A @ z - y) ** 2) + 0.5 * rho * jnp.sum(x * x)
    else:
        raise ValueError(kind)

    @partial(jax.jit, static_argnames=("batch_size",))
    def f_inner(inner_var, outer_var, start=0, batch_size=1):
        return g(inner_var, outer_var, *sl(Di, start, batch_size))

    @partial(jax.jit, static_argnames=("batch_size",))
    def f_outer(inner_var, outer_var, start=0, batch_size=1):
        return f(inner_var, outer_var, *sl(Do, start, batch_size))

    return f_inner, f_outer, Di[0].shape[0], Do[0].shape[0]


# ------------------------------------------------------------------------------------------
# running a solver
# ------------------------------------------------------------------------------------------
def make_solver(name: str, f_inner, f_outer, n_inner, n_outer, z0, x0, **params):
    """A benchopt Solver instance, objective set (its JIT warm-up run, two callbacks, done
    here without benchopt's runner)."""
    import jax.numpy as jnp

    cls = load_solver_class(name)
    defaults = {k: v[0] for k, v in cls.parameters.items()}
    defaults.update(params)
    solver = cls.__new__(cls)
    for k, v in defaults.items():
        setattr(solver, k, v)

    def run_once(stop_val=1):
        count = [0]

        def cb():
            count[0] += 1
            return count[0] <= stop_val

        solver.run(cb)

    solver.run_once = run_once
    solver.set_objective(f_inner=f_inner, f_outer=f_outer, n_inner_samples=n_inner,
                         n_outer_samples=n_outer, inner_var0=jnp.asarray(np.asarray(z0)),
                         outer_var0=jnp.asarray(np.asarray(x0)))
    return solver


def run_iterations(solver, n_iter: int):
    """(inner_var, outer_var) after exactly ``n_iter`` iterations (eval_freq must be n_iter)."""
    assert solver.eval_freq == n_iter
    count = [0]

    def cb():
        count[0] += 1
        return count[0] <= 1

    solver.run(cb)
    return np.asarray(solver.inner_var), np.asarray(solver.outer_var)


def run_timed(solver, evaluate, max_time: float, max_evals: int = 10_000):
    """Run until ``max_time`` seconds of solver time; evaluate every ``eval_freq`` iterations
    (evaluation excluded from the clock, as benchopt's callback strategy does). Returns a list
    of (iterations, seconds, metrics)."""
    records = []
    state = {"t": 0.0, "it": 0, "t0": None}

    def cb():
        inner = getattr(solver, "inner_var", None)
        if inner is not None and hasattr(inner, "block_until_ready"):
            inner.block_until_ready()  # JAX dispatches asynchronously: wait before the clock
            solver.outer_var.block_until_ready()
        now = time.perf_counter()
        if state["t0"] is not None:
            state["t"] += now - state["t0"]
            state["it"] += solver.eval_freq
        if inner is not None and state["it"] > 0:
            m = evaluate(np.asarray(solver.inner_var), np.asarray(solver.outer_var))
            records.append((state["it"], state["t"], m))
            if not np.all(np.isfinite(np.asarray(solver.outer_var))):
                return False
        go = state["t"] < max_time and len(records) < max_evals
        state["t0"] = time.perf_counter()
        return go

    solver.inner_var = None
    solver.run(cb)
    return records


def sampler_ids(n_samples: tuple[int, int], batch_size: int, random_state: int, n_draws: int
                ) -> tuple[list[int], list[int]]:
    """The inner and outer block ids the benchmark's samplers draw (its key-splitting rule)."""
    import jax
    repo = benchmark_repo()
    if str(repo) not in sys.path:
        sys.path.insert(0, str(repo))
    from benchmark_utils.minibatch_sampler import init_sampler
    keys = jax.random.split(jax.random.PRNGKey(random_state), 2)
    out = []
    for key, n in zip(keys, n_samples):
        sampler, state = init_sampler(n_samples=n, batch_size=batch_size, key=key)
        step = jax.jit(sampler)
        ids = []
        for _ in range(n_draws):
            _, idx, _, state = step(state)
            ids.append(int(idx))
        out.append(ids)
    return out[0], out[1]


# ------------------------------------------------------------------------------------------
# equal iterates: our algorithm fed the benchmark's minibatch stream, float64
# ------------------------------------------------------------------------------------------
OURS = {"soba": "SOBA", "saba": "SABA", "srba": "SRBA", "amigo": "AmIGO", "stocbio": "StocBiO",
        "f2sa": "F2SA"}


def torch_algorithm(name: str, step_size: float, outer_ratio: float, n_inner: int,
                    n_outer: int, batch_size: int, **params):
    """Our algorithm with the benchmark's parametrisation (ρ = step_size, γ = ρ/outer_ratio)."""
    from bilevel import stochastic as st
    rho, gamma = step_size, step_size / outer_ratio
    if name == "soba":
        return st.SOBA(rho, gamma)
    if name == "saba":
        return st.SABA(rho, gamma)
    if name == "srba":
        period = st.srba_period(n_inner, n_outer, batch_size, params.get("period_frac", 0.5))
        return st.SRBA(rho, gamma, period=period)
    if name == "amigo":
        return st.AmIGO(rho, gamma, n_inner_steps=params.get("n_inner_steps", 10))
    if name == "stocbio":
        return st.StocBiO(rho, gamma, n_inner_steps=params.get("n_inner_steps", 10),
                          n_neumann_steps=params.get("n_shia_steps", 10))
    if name == "f2sa":
        return st.F2SA(rho, gamma, lam0=params.get("lmbda0", 1.0),
                       lam_step=params.get("delta_lmbda", 0.1),
                       n_inner_steps=params.get("n_inner_steps", 10))
    raise ValueError(name)


def replay_torch(alg, bench, ids_inner, ids_outer, batch_size, n_iter):
    """Run ``alg`` on ``bench`` for n_iter iterations consuming the given block-id streams."""
    from bilevel import stochastic as st
    si = st.Sampler(bench.inner_data, batch_size, shuffle=False, last="overlap")
    so = st.Sampler(bench.outer_data, batch_size, shuffle=False, last="overlap")
    init = {}
    if isinstance(alg, st.SABA):
        init = {"n_inner_blocks": len(si), "n_outer_blocks": len(so)}
    state = alg.init(bench.z0, bench.x0, **init)
    ki = ko = 0
    for _ in range(n_iter):
        if getattr(alg, "needs_full", None) and alg.needs_full(state.t):
            ib, ob = [si.full()], [so.full()]
        else:
            n_in, n_out = alg.batches_per_step
            ib = [si.block(k) for k in ids_inner[ki:ki + n_in]]
            ob = [so.block(k) for k in ids_outer[ko:ko + n_out]]
            ki, ko = ki + n_in, ko + n_out
        state, _ = alg.step(state, bench.problem, ib, ob)
    return state


def compare_iterates(name: str, bench, kind: str, n_iter: int = 8, batch_size: int = 64,
                     step_size: float = 0.1, outer_ratio: float = 1.0, random_state: int = 1,
                     **params) -> float:
    """max |ours − benchmark| over (z, x) after n_iter iterations, float64, same stream. Any
    sample counts: the benchmark's last partial batch is the last batch_size rows, which our
    ``Sampler(last="overlap")`` gives."""
    set_x64(True)
    n_in = bench.inner_data[0].shape[0]
    n_out = bench.outer_data[0].shape[0]
    kw = {"n_classes": bench.z0.shape[1]} if bench.z0.dim() == 2 else {}
    if kind == "quadratic":
        kw["mu"] = bench.extra["mu"]
    f_in, f_out, _, _ = jax_oracles(kind, bench.inner_data, bench.outer_data, **kw)
    flat = bench.z0.dim() == 2
    z0 = bench.z0.reshape(-1).numpy() if flat else bench.z0.numpy()
    solver = make_solver(name, f_in, f_out, n_in, n_out, z0, bench.x0.numpy(),
                         step_size=step_size, outer_ratio=outer_ratio, batch_size=batch_size,
                         eval_freq=n_iter, random_state=random_state, **params)
    zj, xj = run_iterations(solver, n_iter)
    alg = torch_algorithm(name, step_size, outer_ratio, n_in, n_out, batch_size, **params)
    n_draws = n_iter * max(alg.batches_per_step) + 1
    ids_in, ids_out = sampler_ids((n_in, n_out), batch_size, random_state, n_draws)
    st = replay_torch(alg, bench, ids_in, ids_out, batch_size, n_iter)
    zt = st.z.reshape(-1).numpy() if flat else st.z.numpy()
    moved = float(np.abs(xj - bench.x0.numpy()).max())
    if moved == 0:
        raise RuntimeError(f"{name}: the benchmark's iterate did not move")
    return max(float(np.abs(zt - zj).max()), float(np.abs(st.x.numpy() - xj).max()))
