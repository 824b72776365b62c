"""SABA — Stochastic Average Bilevel Algorithm (Dagréou, Ablin, Vaiter, Moreau, NeurIPS 2022).

SOBA's five directions, each variance-reduced by SAGA with one table entry per minibatch
block. For a direction φ drawn on block k (weight w_k = |B_k|/n) with table M and mean M̄:

    d = φ − M[k] + M̄ ;   M̄ ← M̄ + w_k (φ − M[k]) ;   M[k] ← φ

applied to ∇_z g_i, H_i v, J_i v (inner block i) and ∇_z f_j, ∇_x f_j (outer block j). Then

    z ← z − ρ d[∇_z g] ;   v ← v − ρ (d[H v] + d[∇_z f]) ;   x ← x − γ (d[J v] + d[∇_x f])

with constant steps by default (the paper's O(1/T) rate; linear under PL). Tables start at
zero (``init_memory="zero"``, the benchmark's default) or full (every block evaluated at the
start point). Memory: (n_inner_blocks + 1)·(2 dim z + dim x) + (n_outer_blocks + 1)·(dim z +
dim x). With ``inplace=True`` (default) the tables of the state passed in are updated in place
(the state is consumed, like JAX's ``donate_argnums``); ``inplace=False`` copies them.
"""

from __future__ import annotations

import copy
from typing import Any, NamedTuple

import torch

from ..problem import BilevelError, BilevelProblem
from ..pytree import PyTree, tree_leaves, tree_map
from ._common import (
    Minibatch,
    StepSize,
    StochasticAlgorithm,
    add,
    as_schedule,
    axpy,
    check_batches,
    check_finite,
    check_start,
    clone,
    inner_oracles,
    outer_grads,
    single_loop_oracles,
    zeros_like,
)

# in-place SABA compiles as a while_loop (with copied tables) up to this much table memory
LOOP_TABLE_BYTES = 1 << 20

_TERMS = ("grad_inner", "hvp", "cross", "grad_outer_z", "grad_outer_x")


class SagaTable(NamedTuple):
    """``table``: pytree whose leaves have a leading block dimension; ``mean`` = Σ_k w_k M[k]."""

    table: PyTree
    mean: PyTree


def _new_table(like: PyTree, n_blocks: int) -> SagaTable:
    return SagaTable(tree_map(lambda a: a.new_zeros((n_blocks, *a.shape)), like), zeros_like(like))


def saga(mem: SagaTable, phi: PyTree, k: int, w: float, inplace: bool
         ) -> tuple[PyTree, SagaTable]:
    """SAGA direction φ − M[k] + M̄ and the updated table."""
    if isinstance(k, torch.Tensor):  # a compiled chunk: block k is a 0-d tensor
        idx = k.reshape(1)
        diff = tree_map(lambda p, tab: p - tab.index_select(0, idx)[0], phi, mem.table)
        direction = tree_map(torch.add, diff, mem.mean)
        if inplace:
            # index_put_, not index_copy_: inductor re-places index_put on the table (no
            # full-table copy per iteration)
            tree_map(lambda tab, p: tab.index_put_((idx,), p.unsqueeze(0)), mem.table, phi)
            if isinstance(w, torch.Tensor):  # an "overlap" sampler's block weight (0-d)
                tree_map(lambda m, d: m.add_(w * d), mem.mean, diff)
            else:
                tree_map(lambda m, d: m.add_(d, alpha=w), mem.mean, diff)
            return direction, mem
        table = tree_map(lambda tab, p: tab.index_copy(0, idx, p.unsqueeze(0)), mem.table, phi)
        return direction, SagaTable(table, tree_map(lambda m, d: m + w * d, mem.mean, diff))
    diff = tree_map(lambda p, tab: p - tab[k], phi, mem.table)
    direction = tree_map(torch.add, diff, mem.mean)
    if inplace:
        tree_map(lambda tab, p: tab[k].copy_(p), mem.table, phi)
        tree_map(lambda m, d: m.add_(d, alpha=w), mem.mean, diff)
        return direction, mem
    table = tree_map(lambda tab, p: tab.index_copy(0, torch.tensor([k], device=tab.device),
                                                   p.unsqueeze(0)), mem.table, phi)
    mean = tree_map(lambda m, d: m + w * d, mem.mean, diff)
    return direction, SagaTable(table, mean)


class SABAState(NamedTuple):
    z: PyTree
    v: PyTree
    x: PyTree
    t: int
    memory: dict  # term name -> SagaTable


def _block(batch: Any, n_blocks: int, kind: str) -> tuple[int, float]:
    if isinstance(batch, Minibatch) and isinstance(batch.id, torch.Tensor):
        return batch.id, batch.weight  # a compiled chunk: the runner checked the ids
    if not isinstance(batch, Minibatch) or not 0 <= batch.id < n_blocks:
        got = f"id {batch.id}" if isinstance(batch, Minibatch) else type(batch).__name__
        raise BilevelError(f"SABA.step: each {kind} batch must be a bl.stochastic.Minibatch "
                           f"whose id is its block number in [0, {n_blocks}) (SAGA keeps one "
                           f"table entry per block); got {got}. Draw batches with "
                           f"bl.stochastic.Sampler")
    return batch.id, batch.weight


class SABA(StochasticAlgorithm):
    """SABA. ``inner_step`` ρ (z and v), ``outer_step`` γ (numbers: constant unless ``decay``).
    Batches per step: (1, 1), each a :class:`Minibatch` with its block id and weight."""

    name = "SABA"
    oracle_calls = (3, 2)

    def __init__(self, inner_step: StepSize, outer_step: StepSize, v_step: StepSize | None = None,
                 decay: float = 0.0, inplace: bool = True, compile: bool = False,
                 check: bool = True) -> None:
        self.inner_step = as_schedule(inner_step, decay, "SABA inner_step")
        self.v_step = self.inner_step if v_step is None else as_schedule(v_step, decay,
                                                                        "SABA v_step")
        self.outer_step = as_schedule(outer_step, decay, "SABA outer_step")
        self.inplace, self.check, self.compile = inplace, check, compile

    @property
    def batches_per_step(self) -> tuple[int, int]:
        return (1, 1)

    @property
    def loop_compatible(self) -> bool:
        """Whether SABA's own step can be a while_loop body: only with ``inplace=False`` (a
        loop body may not update its tables in place). See :meth:`loop_form`."""
        return not self.inplace

    def loop_form(self, state: SABAState) -> SABA | None:
        """The step a compiled while_loop body runs: copied tables. For in-place SABA, when
        the SAGA tables hold at most :data:`LOOP_TABLE_BYTES`, its twin with ``inplace=False``
        (the same iterates; each step then copies the tables, cheaper than the unrolled
        chunks' per-call work while they are small); larger tables: None, unrolled chunks
        that update them in place. Measured (2026-12-03, float32, 1 thread), µs per
        iteration, in-place unrolled (the suite) / copied in the loop at U = 4
        (``benchmarks/results/loop_unroll/saba_copied_tables.md``): digits hyper-cleaning
        (0.19 MB) 66 / 31, quadratic (0.44 MB) 35 / 19; covtype-sized (20 MB): in place 72,
        while copying 20 MB a step costs milliseconds (benchopt's JAX SABA, which copies:
        2,869)."""
        if not self.inplace:
            return self
        size = sum(leaf.numel() * leaf.element_size() for leaf in tree_leaves(state.memory)
                   if isinstance(leaf, torch.Tensor))
        if size > LOOP_TABLE_BYTES:
            return None
        twin = getattr(self, "_copying", None)
        if twin is None:  # one twin per algorithm object: its compiled graphs are reused
            twin = copy.copy(self)
            twin.inplace = False
            self._copying = twin
        return twin

    def init(self, z0: PyTree, x0: PyTree, n_inner_blocks: int, n_outer_blocks: int,
             v0: PyTree | None = None, init_memory: str = "zero",
             problem: BilevelProblem | None = None, inner_blocks: list | None = None,
             outer_blocks: list | None = None) -> SABAState:
        """Zero tables, or (``init_memory="full"``, needs ``problem`` and the block lists, e.g.
        ``[sampler.block(k) for k in range(len(sampler))]``) every block evaluated at start."""
        check_start(z0, x0, self.name)
        for name, n in (("n_inner_blocks", n_inner_blocks), ("n_outer_blocks", n_outer_blocks)):
            if not isinstance(n, int) or n < 1:
                raise BilevelError(f"SABA.init: {name} must be a positive int (len(sampler)), "
                                   f"got {n!r}")
        z, x = clone(z0), clone(x0)
        v = zeros_like(z0) if v0 is None else clone(v0)
        memory = {"grad_inner": _new_table(z, n_inner_blocks), "hvp": _new_table(z, n_inner_blocks),
                  "cross": _new_table(x, n_inner_blocks),
                  "grad_outer_z": _new_table(z, n_outer_blocks),
                  "grad_outer_x": _new_table(x, n_outer_blocks)}
        if init_memory == "full":
            if problem is None or inner_blocks is None or outer_blocks is None:
                raise BilevelError("SABA.init(init_memory='full') needs problem=, inner_blocks= "
                                   "and outer_blocks= (all blocks of each sampler)")
            for b in inner_blocks:
                k, w = _block(b, n_inner_blocks, "inner")
                for name, phi in zip(_TERMS[:3], inner_oracles(problem, z, x, v, b)):
                    _, memory[name] = saga(memory[name], phi, k, w, True)
            for b in outer_blocks:
                k, w = _block(b, n_outer_blocks, "outer")
                for name, phi in zip(_TERMS[3:], outer_grads(problem, z, x, b)):
                    _, memory[name] = saga(memory[name], phi, k, w, True)
        elif init_memory != "zero":
            raise BilevelError(f"SABA.init: init_memory must be 'zero' or 'full', got "
                               f"{init_memory!r}")
        return SABAState(z, v, x, 0, memory)

    def step(self, state: SABAState, problem: BilevelProblem, inner_batches: Any,
             outer_batches: Any) -> tuple[SABAState, dict]:
        check_batches(self.name, "inner", inner_batches, 1)
        check_batches(self.name, "outer", outer_batches, 1)
        z, v, x, t, memory = state
        ki, wi = _block(inner_batches[0], _n_blocks(memory["grad_inner"]), "inner")
        ko, wo = _block(outer_batches[0], _n_blocks(memory["grad_outer_z"]), "outer")
        rho, eta, gamma = self.inner_step(t), self.v_step(t), self.outer_step(t)
        phis = single_loop_oracles(problem, z, x, v, inner_batches[0], outer_batches[0],
                                   self.compile)
        memory = dict(memory)
        d = {}
        for name, phi in zip(_TERMS, phis):
            k, w = (ki, wi) if name in _TERMS[:3] else (ko, wo)
            d[name], memory[name] = saga(memory[name], phi, k, w, self.inplace)
        z = axpy(-rho, d["grad_inner"], z)
        v = axpy(-eta, add(d["hvp"], d["grad_outer_z"]), v)
        x = axpy(-gamma, add(d["cross"], d["grad_outer_x"]), x)
        if self.check:
            check_finite(t, self.name, z=z, v=v, x=x)
        return SABAState(z, v, x, t + 1, memory), {
            "inner_step": rho, "v_step": eta, "outer_step": gamma,
            "oracle_calls": self.oracle_calls}


def _n_blocks(mem: SagaTable) -> int:
    from ..pytree import tree_leaves
    return int(tree_leaves(mem.table)[0].shape[0])
