"""The iteration protocol shared by the task streams (``batch(i)`` deterministic in ``i``)."""

from __future__ import annotations

from collections.abc import Iterator

from ..tasks import TaskBatch


class TaskStream:
    """Mixin: subclasses define ``batch(i)`` and ``num_batches`` (``None`` = infinite)."""

    num_batches: int | None

    def batch(self, i: int) -> TaskBatch:
        raise NotImplementedError

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
