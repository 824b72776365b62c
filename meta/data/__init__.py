"""Few-shot data: Omniglot episodes and Finn et al. sinusoid regression, as :class:`TaskBatch`."""

from ..tasks import TaskBatch
from .omniglot import SPLIT_SEED, Omniglot, split_characters
from .sinusoid import Sinusoid

__all__ = ["Omniglot", "Sinusoid", "TaskBatch", "SPLIT_SEED", "split_characters"]
