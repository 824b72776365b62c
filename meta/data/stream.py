"""The protocol shared by the task streams: task ``t`` is a pure function of ``(seed, t)``.

Every stream numbers its tasks ``t = 0, 1, 2, ...``; task ``t`` is drawn from its own generator
:func:`task_generator` ``(name, seed, [split,] t)``, so it depends on nothing else (not on the
meta-batch size, the tasks drawn before it, the process or the rank). Batch ``i`` of a stream
with meta-batch ``B`` is tasks ``i*B .. (i+1)*B - 1`` (:meth:`TaskStream.task_ids`). Hence:

* a run resumes exactly by asking for ``batch(i)``;
* a distributed rank draws its share of iteration ``i`` alone, without the other ranks' tasks:
  ``stream.shard(i, rank, world_size)`` = tasks ``task_ids(i)[rank::world_size]``, and the
  shards of all ranks, concatenated in rank order and re-interleaved, are ``batch(i)``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence

import torch

from ..tasks import TaskBatch

__all__ = ["TaskStream", "task_generator", "task_seed"]


def task_seed(*key) -> int:
    """The 63-bit seed of the generator of one task: ``blake2b("/".join(key))`` (8 bytes) >> 1.

    The streams use ``key = (name, seed, split, t)`` (Omniglot and the image datasets) or
    ``(name, seed, t)`` (sinusoid), ``t`` the global task index.
    """
    digest = hashlib.blake2b("/".join(map(str, key)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def task_generator(*key) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with :func:`task_seed` ``(*key)``."""
    return torch.Generator().manual_seed(task_seed(*key))


class TaskStream:
    """Base of the task streams: subclasses define ``_tasks(ids)``, ``meta_batch`` and
    ``num_batches`` (``None`` = infinite).

    ``_tasks(ids)`` returns the :class:`TaskBatch` of the tasks ``ids`` (a non-empty sequence of
    global task indices), stacked in that order; each task must depend on its index only.
    """

    meta_batch: int
    num_batches: int | None

    def _tasks(self, ids: Sequence[int]) -> TaskBatch:
        raise NotImplementedError

    def task_ids(self, i: int) -> range:
        """Global indices of the tasks of batch ``i``: ``range(i*meta_batch, (i+1)*meta_batch)``."""
        if i < 0:
            raise ValueError(f"batch index must be >= 0, got {i}")
        return range(i * self.meta_batch, (i + 1) * self.meta_batch)

    def tasks(self, ids: Sequence[int]) -> TaskBatch:
        """The tasks ``ids`` stacked in order (``ids`` may be empty: a batch of zero tasks with
        the shapes and dtypes of the others)."""
        ids = [int(t) for t in ids]
        if any(t < 0 for t in ids):
            raise ValueError(f"task indices must be >= 0, got {ids}")
        if not ids:
            one = self._tasks([0])
            (xs, ys), (xq, yq) = one.support, one.query
            return TaskBatch((xs[:0], ys[:0]), (xq[:0], yq[:0]))
        return self._tasks(ids)

    def batch(self, i: int) -> TaskBatch:
        """The ``i``-th batch of ``meta_batch`` tasks (deterministic in the seed and ``i``)."""
        return self.tasks(self.task_ids(i))

    def task(self, t: int) -> TaskBatch:
        """Task ``t`` without the leading dimension (``batch(i).task(j)`` is
        ``task(i * meta_batch + j)``)."""
        if t < 0:
            raise ValueError(f"task index must be >= 0, got {t}")
        return self._tasks([t]).task(0)

    def shard(self, i: int, rank: int, world_size: int) -> TaskBatch:
        """Rank ``rank``'s share of batch ``i``: tasks ``task_ids(i)[rank::world_size]``.

        Ranks hold ``ceil`` or ``floor(meta_batch / world_size)`` tasks, or none (a batch of zero
        tasks) when ``meta_batch < world_size``.
        """
        if not (isinstance(world_size, int) and world_size >= 1 and 0 <= rank < world_size):
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, "
                             f"world_size={world_size}")
        return self.tasks(self.task_ids(i)[rank::world_size])

    def batches(self, start: int = 0) -> Iterator[TaskBatch]:
        """Yield ``batch(start), batch(start + 1), ...`` up to ``num_batches`` (or forever)."""
        i = start
        while self.num_batches is None or i < self.num_batches:
            yield self.batch(i)
            i += 1

    def __iter__(self) -> Iterator[TaskBatch]:
        return self.batches(0)

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError(f"a {type(self).__name__} task stream without num_batches is infinite")
        return self.num_batches
