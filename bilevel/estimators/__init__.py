"""Hypergradient estimators, one module each."""

from .base import Estimator
from .checkpointed import Checkpointed
from .first_order import FirstOrder
from .forward_mode import ForwardMode
from .history_free import HistoryFree
from .implicit import Implicit
from .truncated import Truncated
from .unrolled import Unrolled

__all__ = ["Estimator", "Checkpointed", "FirstOrder", "ForwardMode", "HistoryFree", "Implicit",
           "Truncated", "Unrolled"]
