"""``bl.stochastic.Online``: a stochastic algorithm as a stateful online loop.

The algorithms are pure ``(init, step)`` pairs; this object holds what a training loop carries
between calls (the state, the draw counters of both samplers, the oracle-call count) so that
they can be driven like :class:`bilevel.Online` and checkpointed::

    loop = bl.stochastic.Online(bl.stochastic.SABA(0.1, 0.1), problem, z0, x0,
                                inner=Sampler(train, 64, seed=0), outer=Sampler(val, 64, seed=1))
    for epoch in range(10):
        info = loop.step(100)            # 100 iterations; loop.z, loop.x are the iterates
    torch.save(loop.state_dict(), "ckpt.pt")

``loop.step(n)`` takes exactly the iterations of :func:`bilevel.stochastic.run` continued
with its returned ``draws`` (same batches, same iterates), and a loop restored with
``load_state_dict`` continues as an uninterrupted one. Unlike :class:`bilevel.Online`, the
algorithm updates x itself (there is no outer torch optimiser): x_{t+1} = x_t − γ_t D_x^t.
Inside an Optuna objective, :func:`bilevel.hpo.refine` accepts this object too (Optuna then
samples e.g. the step sizes, and the trial reports ``validate(loop)``).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from ..problem import BilevelError, BilevelProblem
from ..pytree import PyTree
from ._common import Sampler, StochasticAlgorithm
from .loop import Draws, next_batches, run

__all__ = ["Online"]


def _clone(tree: Any) -> Any:
    return torch.utils._pytree.tree_map(
        lambda a: a.detach().clone() if isinstance(a, torch.Tensor) else a, tree)


class Online:
    """Stateful driver of a stochastic algorithm over two :class:`Sampler` streams.

    ``init_kwargs`` go to ``alg.init`` (e.g. ``v0``, SABA's ``init_memory``); SABA's
    ``n_inner_blocks`` / ``n_outer_blocks`` are filled in from the samplers. ``compile=True``
    (or ``torch.compile`` options) runs ``chunk`` iterations per compiled call (``unroll``
    per while_loop trip), as :func:`bilevel.stochastic.run` does (same iterates; ``step``
    then returns only ``t`` and ``oracle_calls_total``).
    """

    def __init__(self, alg: StochasticAlgorithm, problem: BilevelProblem, z0: PyTree,
                 x0: PyTree, *, inner: Sampler, outer: Sampler,
                 init_kwargs: dict[str, Any] | None = None, compile: bool | dict = False,
                 chunk: int | None = None, unroll: int | None = None) -> None:
        if not isinstance(alg, StochasticAlgorithm):
            raise BilevelError(f"alg must be a bl.stochastic algorithm such as SOBA(0.1, 0.1), "
                               f"got {type(alg).__name__}")
        if not isinstance(problem, BilevelProblem):
            raise BilevelError(f"problem must be a bl.BilevelProblem, got "
                               f"{type(problem).__name__}")
        if not isinstance(inner, Sampler) or not isinstance(outer, Sampler):
            raise BilevelError("inner and outer must be bl.stochastic.Sampler objects (epoch-"
                               "shuffled, replayable minibatch streams)")
        kw = dict(init_kwargs or {})
        sig = inspect.signature(alg.init).parameters
        if "n_inner_blocks" in sig:
            kw.setdefault("n_inner_blocks", len(inner))
            kw.setdefault("n_outer_blocks", len(outer))
        if "problem" in sig and kw.get("init_memory", "zero") != "zero":
            kw.setdefault("problem", problem)
            kw.setdefault("inner_blocks", [inner.block(k) for k in range(len(inner))])
            kw.setdefault("outer_blocks", [outer.block(k) for k in range(len(outer))])
        self.alg, self.problem, self.inner, self.outer = alg, problem, inner, outer
        if unroll is not None and not compile:
            raise BilevelError("unroll (iterations per compiled while_loop trip) needs "
                               "compile=True")
        self.compile, self.chunk, self.unroll = compile, chunk, unroll
        self.state = alg.init(z0, x0, **kw)
        self.draws = Draws()

    @property
    def z(self) -> PyTree:
        return self.state.z

    @property
    def x(self) -> PyTree:
        return self.state.x

    @property
    def t(self) -> int:
        """Iterations taken so far."""
        return int(self.state.t)

    @property
    def oracle_calls(self) -> tuple[int, int]:
        """(inner, outer) minibatch oracle calls so far, counted as the benchmark does."""
        return self.draws.oracle_calls

    def step(self, n_iter: int = 1) -> dict:
        """``n_iter`` iterations on the next minibatches; returns the last iteration's info
        (step sizes, ``oracle_calls`` of that iteration) plus ``t`` and ``oracle_calls_total``."""
        if not (isinstance(n_iter, int) and n_iter >= 1):
            raise BilevelError(f"n_iter must be a positive int, got {n_iter!r}")
        info: dict = {}
        if self.compile:  # compiled chunks (bl.stochastic.run(compile=...)): no per-step info
            self.state, _ = run(self.alg, self.problem, self.state, self.inner, self.outer,
                                n_iter, draws=self.draws, compile=self.compile,
                                chunk=self.chunk, unroll=self.unroll)
            return {"t": self.t, "oracle_calls_total": self.draws.oracle_calls}
        for _ in range(n_iter):
            ib, ob = next_batches(self.alg, self.state.t, self.inner, self.outer, self.draws)
            self.state, info = self.alg.step(self.state, self.problem, ib, ob)
            ci, co = info["oracle_calls"]
            self.draws.oracle_calls = (self.draws.oracle_calls[0] + ci,
                                       self.draws.oracle_calls[1] + co)
        return {**info, "t": self.t, "oracle_calls_total": self.draws.oracle_calls}

    def state_dict(self) -> dict[str, Any]:
        """The algorithm state (cloned tensors), the draw counters and the oracle count."""
        return {"algorithm": type(self.alg).__name__, "state": _clone(self.state),
                "draws": (self.draws.inner, self.draws.outer, self.draws.oracle_calls)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` of a loop over the same algorithm and samplers."""
        keys = {"algorithm", "state", "draws"}
        if not isinstance(state_dict, dict) or set(state_dict) != keys:
            got = sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict).__name__
            raise BilevelError(f"not a bl.stochastic.Online state_dict: expected keys "
                               f"{sorted(keys)}, got {got}")
        if state_dict["algorithm"] != type(self.alg).__name__:
            raise BilevelError(f"the checkpoint is of a {state_dict['algorithm']} loop, this one "
                               f"runs {type(self.alg).__name__}")
        if type(state_dict["state"]) is not type(self.state):
            raise BilevelError(f"the saved state is a {type(state_dict['state']).__name__}, this "
                               f"loop's a {type(self.state).__name__}")
        self.state = _clone(state_dict["state"])
        i, o, calls = state_dict["draws"]
        self.draws = Draws(int(i), int(o), (int(calls[0]), int(calls[1])))

    def __repr__(self) -> str:
        return f"bl.stochastic.Online({self.alg!r}, t={self.t}, oracle_calls={self.oracle_calls})"
