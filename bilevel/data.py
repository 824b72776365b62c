"""Per-step data: a different batch at every inner step, replayable by step index.

``inner_batch`` (and ``outer_batch``) of :func:`bilevel.hypergrad` may be a :class:`PerStep`:
inner step k (0-based, within one call) uses ``batch.at(k)``. Every estimator asks for the batch
of step k by its index, so a replay (Checkpointed's recomputation, Truncated's prefix,
ForwardMode's tangents) sees exactly the batch the forward pass saw:

    ĝ = d/dλ f(w_K, λ; b^out),   w_{k+1} = Φ(w_k, s_k, λ; b_k),   b_k = batch.at(k).

``fn(k)`` must therefore be a pure function of k (no global RNG). :class:`Minibatches` is the
common case: shuffled epochs drawn from generators seeded by (seed, epoch), so any step's batch
can be recomputed without replaying the stream.

An ``outer_batch`` that is a :class:`PerStep` is evaluated at k = 0 (``outer_batch.at(0)``): one
hypergradient call uses one outer batch. An online tuner advances it per hyper-step with
``outer_batch.shifted(1)`` (and the inner stream with ``inner_batch.shifted(solver.steps)``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

from .problem import BilevelError


class PerStep:
    """The batch of inner step k is ``fn(offset + k)``; ``fn`` must be deterministic in k.

    Estimators call ``fn`` outside their own transforms (ForwardMode draws all K batches
    before its vmap over tangents), but under a user's ``vmap`` over problems ``fn`` runs
    inside it: index precomputed tensors there, or use :class:`Minibatches`, rather than call
    a random op (vmap refuses those)."""

    def __init__(self, fn: Callable[[int], Any], offset: int = 0) -> None:
        if not callable(fn):
            raise BilevelError(f"PerStep(fn) needs a callable k -> batch, got {type(fn).__name__}")
        _check_offset(offset)
        self.fn, self.offset = fn, offset

    def at(self, k: int) -> Any:
        """The batch of step ``k`` of this stream (global step ``offset + k``)."""
        return self.fn(self.offset + k)

    def shifted(self, n: int) -> PerStep:
        """The same stream advanced by ``n`` steps: ``shifted(n).at(k) == at(n + k)``."""
        return PerStep(self.fn, self.offset + n)

    def __repr__(self) -> str:
        return f"PerStep({getattr(self.fn, '__name__', self.fn)!r}, offset={self.offset})"


class Minibatches(PerStep):
    """Shuffled minibatches of ``tensors`` (all indexed along dim 0), epoch after epoch.

    Global step t = offset + k lies in epoch e = t // n and is its batch j = t mod n, with
    n = :attr:`batches_per_epoch`; the batch is ``tuple(x[perm_e[j·B : (j+1)·B]] for x in
    tensors)`` (a single tensor if one was given), perm_e = ``torch.randperm(N)`` from a
    ``torch.Generator`` seeded by (seed, e). ``drop_last`` drops the short last batch of an
    epoch. The permutation is computed outside any ``torch.func`` transform (it does not depend
    on the data), so the stream works under ``vmap`` and ``jvp``.
    """

    def __init__(self, *tensors: torch.Tensor, batch_size: int, seed: int = 0,
                 drop_last: bool = False, offset: int = 0) -> None:
        if not tensors:
            raise BilevelError("Minibatches(*tensors, batch_size=...) needs at least one tensor")
        for i, x in enumerate(tensors):
            if not isinstance(x, torch.Tensor) or x.dim() == 0:
                raise BilevelError(f"Minibatches: tensors[{i}] must be a tensor with a leading "
                                   f"example dimension, got {type(x).__name__}")
        n = tensors[0].shape[0]
        for i, x in enumerate(tensors):
            if x.shape[0] != n:
                raise BilevelError(f"Minibatches: tensors[{i}] has {x.shape[0]} examples, "
                                   f"tensors[0] has {n}")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise BilevelError(f"Minibatches: batch_size must be a positive int, got "
                               f"{batch_size!r}")
        if drop_last and batch_size > n:
            raise BilevelError(f"Minibatches: batch_size={batch_size} > {n} examples with "
                               f"drop_last=True leaves no batch")
        _check_offset(offset)
        self.tensors, self.batch_size, self.seed, self.drop_last = tensors, batch_size, seed, \
            drop_last
        self.num_examples = n
        self.offset = offset
        self._perms: dict[int, torch.Tensor] = {}
        super().__init__(self._batch, offset)

    @property
    def batches_per_epoch(self) -> int:
        n, b = self.num_examples, self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def __len__(self) -> int:
        """Batches per epoch."""
        return self.batches_per_epoch

    def epoch_of(self, k: int = 0) -> tuple[int, int]:
        """(epoch, batch index within the epoch) of step ``k`` of this stream."""
        return divmod(self.offset + k, self.batches_per_epoch)

    def permutation(self, epoch: int) -> torch.Tensor:
        """The example order of ``epoch`` (a pure function of (seed, epoch))."""
        perm = self._perms.get(epoch)
        if perm is None:
            with _no_functorch():  # no data dependence: not a transformed op
                gen = torch.Generator().manual_seed(_mix(self.seed, epoch))
                perm = torch.randperm(self.num_examples, generator=gen)
            if len(self._perms) > 8:
                self._perms.clear()
            self._perms[epoch] = perm
        return perm

    def _batch(self, t: int) -> Any:
        epoch, j = divmod(t, self.batches_per_epoch)
        idx = self.permutation(epoch)[j * self.batch_size:(j + 1) * self.batch_size]
        out = tuple(x[idx.to(x.device)] for x in self.tensors)
        return out[0] if len(out) == 1 else out

    def shifted(self, n: int) -> Minibatches:
        out = Minibatches(*self.tensors, batch_size=self.batch_size, seed=self.seed,
                          drop_last=self.drop_last, offset=self.offset + n)
        out._perms = self._perms  # same (seed, epoch) -> same permutation
        return out

    def __repr__(self) -> str:
        return (f"Minibatches({self.num_examples} examples, batch_size={self.batch_size}, "
                f"seed={self.seed}, drop_last={self.drop_last}, offset={self.offset})")


def batch_at(batch: Any, k: int) -> Any:
    """The batch of inner step ``k``: ``batch.at(k)`` for a :class:`PerStep`, else ``batch``."""
    return batch.at(k) if isinstance(batch, PerStep) else batch


def _no_functorch():
    """A context where random ops are not seen by vmap (private torch API; plain otherwise)."""
    return getattr(torch._C, "_DisableFuncTorch", contextlib.nullcontext)()


def _check_offset(offset: int) -> None:
    if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
        raise BilevelError(f"offset must be a non-negative int, got {offset!r}")


def _mix(seed: int, epoch: int) -> int:
    """A 63-bit generator seed from (seed, epoch): distinct epochs get unrelated seeds."""
    x = (int(seed) * 0x9E3779B97F4A7C15 + int(epoch) * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB)
    x &= (1 << 64) - 1
    x ^= x >> 31
    return x & ((1 << 63) - 1)
