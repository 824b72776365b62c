"""Few-shot task batches: the one data structure the meta-learning layer consumes."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils._pytree import register_pytree_node

Split = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class TaskBatch:
    """A batch of few-shot tasks; every tensor's leading dimension indexes tasks.

    ``support = (x_s, y_s)`` with ``x_s`` of shape ``[tasks, ways*shots, *input]`` and integer
    labels (classification) or float targets (regression) ``y_s`` of shape ``[tasks, ways*shots]``
    (or ``[tasks, n, 1]``); ``query`` likewise. A single task may drop the leading dimension;
    :meth:`batched` adds it back.
    """

    support: Split
    query: Split

    @property
    def num_tasks(self) -> int:
        return int(self.support[0].shape[0])

    def to(self, device=None, dtype=None) -> TaskBatch:
        """Move every tensor; ``dtype`` applies to the inputs and float targets only."""

        def move(t: torch.Tensor) -> torch.Tensor:
            if dtype is not None and t.is_floating_point():
                return t.to(device=device, dtype=dtype)
            return t.to(device=device)

        (xs, ys), (xq, yq) = self.support, self.query
        return TaskBatch((move(xs), move(ys)), (move(xq), move(yq)))

    def task(self, i: int) -> TaskBatch:
        """The ``i``-th task of the batch, without the leading dimension."""
        (xs, ys), (xq, yq) = self.support, self.query
        return TaskBatch((xs[i], ys[i]), (xq[i], yq[i]))

    def batched(self) -> TaskBatch:
        """Add a leading task dimension of size one."""
        (xs, ys), (xq, yq) = self.support, self.query
        return TaskBatch((xs[None], ys[None]), (xq[None], yq[None]))


register_pytree_node(
    TaskBatch,
    lambda b: ([b.support, b.query], None),
    lambda children, _: TaskBatch(tuple(children[0]), tuple(children[1])),
)
