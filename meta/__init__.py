"""meta: the MAML family on top of bilevel."""

from .tasks import TaskBatch

__all__ = ["TaskBatch"]
