"""One entry point for every task stream: :func:`open_dataset`."""

from __future__ import annotations

import os

import torch

from .episodes import ImageEpisodes
from .formats import DATASETS, canonical, load_arrays
from .omniglot import Omniglot
from .sinusoid import Sinusoid
from .stream import TaskStream

__all__ = ["open_dataset", "DATASET_NAMES"]

#: Names accepted by :func:`open_dataset` (aliases such as ``"mini-imagenet"`` also work).
DATASET_NAMES = ("sinusoid", "omniglot", *DATASETS)


def open_dataset(
    name: str,
    root: str | os.PathLike | None = None,
    split: str = "train",
    ways: int = 5,
    shots: int = 1,
    queries: int = 15,
    meta_batch: int = 1,
    *,
    seed: int = 0,
    format: str = "auto",
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    num_batches: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    **options,
) -> TaskStream:
    """The task stream of ``name`` (one of :data:`DATASET_NAMES`) for ``split``.

    Every stream yields :class:`~meta.TaskBatch` es (``batch(i)``, ``shard(i, rank, world)``,
    iteration), task ``t`` depending only on ``(seed, split, t)``.

    * ``"omniglot"``: :class:`Omniglot`; ``format`` is its ``source`` (``auto``, ``npz``,
      ``zip``, ``small1``, ``small2``); options ``rotations``, ``download``, ``preprocessing``.
    * ``"miniimagenet"``, ``"tieredimagenet"``, ``"cifarfs"``, ``"fc100"``: :func:`load_arrays`
      ``(name, root, split, format, image_size, check_classes, cache_dir, workers)`` then
      :class:`ImageEpisodes` (options ``normalize``, ``preload``).
    * ``"sinusoid"``: :class:`Sinusoid` (``root`` and ``ways`` unused; options ``amplitude``,
      ``phase``, ``x_range``); ``split`` enters the task seeds, so splits never share tasks.

    Unknown options raise ``TypeError``; a missing root raises ``ValueError``; missing files raise
    ``FileNotFoundError`` listing the layouts accepted.
    """
    key = name.lower()
    if key == "sinusoid":
        return Sinusoid(shots=shots, queries=queries, meta_batch=meta_batch, seed=seed,
                        dtype=dtype, device=device, num_batches=num_batches, split=split,
                        **options)
    if key != "omniglot":
        try:
            key = canonical(key)
        except ValueError:
            raise ValueError(f"unknown dataset {name!r}: expected one of {DATASET_NAMES}"
                             ) from None
    if root is None:
        raise ValueError(f"dataset {name!r} needs root= (the folder holding its files)")
    if key == "omniglot":
        return Omniglot(root, split=split, ways=ways, shots=shots, queries=queries,
                        meta_batch=meta_batch, seed=seed, cache_dir=cache_dir, device=device,
                        dtype=dtype, source=format, num_batches=num_batches, **options)
    load = {k: options.pop(k) for k in ("image_size", "check_classes", "workers")
            if k in options}
    stream = {k: options.pop(k) for k in ("normalize", "preload") if k in options}
    if options:
        raise TypeError(f"open_dataset({name!r}) got unexpected option(s) {sorted(options)}; "
                        "it takes image_size, check_classes, workers, normalize, preload")
    arrays = load_arrays(key, root, split, format, cache_dir=cache_dir, **load)
    return ImageEpisodes(arrays, ways=ways, shots=shots, queries=queries, meta_batch=meta_batch,
                         seed=seed, device=device, dtype=dtype, num_batches=num_batches,
                         **stream)
