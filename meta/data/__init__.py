"""Few-shot data as :class:`TaskBatch` streams: Omniglot, Mini-ImageNet, tieredImageNet, CIFAR-FS,
FC100 (in their published on-disk layouts) and Finn et al.'s sinusoid regression.

``open_dataset(name, root, split, ways, shots, queries, meta_batch, seed=..., format="auto")``
opens any of them. Task ``t`` of a stream depends only on ``(seed, split, t)``
(:func:`task_seed`), so batches replay exactly and ranks draw their shards alone
(``stream.shard(i, rank, world_size)``).
"""

from ..tasks import TaskBatch
from .episodes import NORMALIZATION, FewShotArrays, ImageEpisodes
from .formats import DATASETS, FORMATS, find_layout, load_arrays, load_pickle
from .omniglot import PREPROCESSING, SPLIT_SEED, Omniglot, split_characters
from .registry import DATASET_NAMES, open_dataset
from .sinusoid import Sinusoid
from .stream import TaskStream, task_generator, task_seed

__all__ = [
    "open_dataset", "DATASET_NAMES", "Omniglot", "Sinusoid", "ImageEpisodes", "FewShotArrays",
    "load_arrays", "find_layout", "load_pickle", "DATASETS", "FORMATS", "NORMALIZATION",
    "TaskBatch", "TaskStream", "task_seed", "task_generator", "SPLIT_SEED", "PREPROCESSING",
    "split_characters",
]
