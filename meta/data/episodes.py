"""N-way K-shot episodes from a split of labelled ``uint8`` images (Mini-ImageNet, tieredImageNet,
CIFAR-FS, FC100, or any :class:`FewShotArrays` of your own).

Images stay ``uint8 [N, H, W, C]`` in memory (on the CPU, or on the device with
``preload=True``); each episode gathers its ``uint8`` pixels, moves them to ``device`` and only
there converts them to ``dtype``: ``x = (v / 255 - mean) / std`` per channel, laid out
``[C, H, W]``.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..tasks import TaskBatch
from .stream import TaskStream, task_generator

__all__ = ["FewShotArrays", "ImageEpisodes", "NORMALIZATION"]

#: Per-channel (mean, std) of the pixels in [0, 1] (MetaOptNet's constants, SCALE.md 2.5).
NORMALIZATION = {
    "miniimagenet": ((120.39586422 / 255, 115.59361427 / 255, 104.54012653 / 255),
                     (70.68188272 / 255, 68.27635443 / 255, 72.54505529 / 255)),
    "cifar": ((129.37731888 / 255, 124.10583864 / 255, 112.47758569 / 255),
              (68.20947949 / 255, 65.43124043 / 255, 70.45866994 / 255)),
}
NORMALIZATION["tieredimagenet"] = NORMALIZATION["miniimagenet"]
NORMALIZATION["cifarfs"] = NORMALIZATION["fc100"] = NORMALIZATION["cifar"]


@dataclass(frozen=True)
class FewShotArrays:
    """One split of a few-shot dataset, as read from disk.

    ``images``: ``uint8 [N, H, W, C]``; ``labels``: ``int64 [N]`` in ``0 .. len(class_names)-1``
    (class ``c`` is ``class_names[c]``: a WordNet id, or the file's own label as a string);
    ``layout``: the on-disk layout it came from; ``files``: the files read.
    """

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]
    dataset: str
    split: str
    layout: str
    files: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(f"{self.dataset} {self.split!r}: images must be uint8 [N, H, W, C], "
                             f"got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.dtype != torch.int64 or self.labels.shape != self.images.shape[:1]:
            raise ValueError(f"{self.dataset} {self.split!r}: labels must be int64 [N] with "
                             f"N = {len(self.images)}, got {self.labels.dtype} "
                             f"{tuple(self.labels.shape)}")
        n = len(self.class_names)
        if len(self.labels) and (int(self.labels.min()) < 0 or int(self.labels.max()) >= n):
            raise ValueError(f"{self.dataset} {self.split!r}: labels must lie in 0..{n - 1}")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(H, W, C)``."""
        return tuple(self.images.shape[1:])

    def class_counts(self) -> torch.Tensor:
        """Images per class, ``int64 [num_classes]``."""
        return torch.bincount(self.labels, minlength=self.num_classes)


class ImageEpisodes(TaskStream):
    """Seeded, resumable, shardable N-way K-shot episodes from a :class:`FewShotArrays`.

    ``batch(i)`` is a :class:`TaskBatch` with support ``x [meta_batch, ways*shots, C, H, W]``
    (``dtype``, on ``device``) and ``y [meta_batch, ways*shots]`` (int64), query
    ``[meta_batch, ways*queries, ...]``, as the Omniglot stream gives. Task ``t`` draws, from
    the generator ``task_generator(dataset, seed, split, t)`` alone, ``ways`` classes of the
    split and ``shots + queries`` images of each, without replacement; classes get labels
    ``0 .. ways-1`` in a random order; examples are grouped by class. ``normalize``:
    ``"unit"`` (``v / 255``, the MAML convention), ``"meanstd"`` (``(v / 255 - mean) / std``
    with the dataset's constants :data:`NORMALIZATION`), or a ``(mean, std)`` pair of
    per-channel sequences in ``[0, 1]`` units.
    """

    def __init__(
        self,
        arrays: FewShotArrays,
        ways: int = 5,
        shots: int = 1,
        queries: int = 15,
        meta_batch: int = 1,
        seed: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        normalize: str | tuple[Sequence[float], Sequence[float]] = "unit",
        preload: bool = False,
        num_batches: int | None = None,
    ) -> None:
        for name, value in (("ways", ways), ("shots", shots), ("queries", queries),
                            ("meta_batch", meta_batch)):
            if not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if num_batches is not None and num_batches < 0:
            raise ValueError(f"num_batches must be >= 0 or None, got {num_batches!r}")
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating point dtype, got {dtype}")
        self.arrays, self.dataset, self.split = arrays, arrays.dataset, arrays.split
        self.ways, self.shots, self.queries = int(ways), int(shots), int(queries)
        self.meta_batch, self.seed, self.num_batches = int(meta_batch), seed, num_batches
        self.device = torch.device(device if device is not None else "cpu")
        self.dtype = dtype
        if ways > arrays.num_classes:
            raise ValueError(f"ways={ways} exceeds the {arrays.num_classes} classes of the "
                             f"{arrays.dataset} {arrays.split!r} split")
        counts = arrays.class_counts()
        need = self.shots + self.queries
        if int(counts.min()) < need:
            c = int(counts.argmin())
            raise ValueError(f"shots + queries = {need} exceeds the {int(counts[c])} images of "
                             f"class {arrays.class_names[c]!r} of the {arrays.dataset} "
                             f"{arrays.split!r} split")
        order = torch.argsort(arrays.labels, stable=True)
        self._members = list(torch.split(order, counts.tolist()))  # image indices per class
        self.mean, self.std = _normalization(normalize, arrays)
        self._images = arrays.images.to(self.device) if preload else arrays.images
        c = arrays.image_shape[2]
        mean = torch.tensor(self.mean, dtype=torch.float64).view(c, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float64).view(c, 1, 1)
        # (v / 255 - mean) / std = v * scale - shift
        self._scale = (1.0 / (255.0 * std)).to(self.device, dtype)
        unit = normalize == "unit"
        self._shift = None if unit else (mean / std).to(self.device, dtype)

    @property
    def num_classes(self) -> int:
        return self.arrays.num_classes

    def __repr__(self) -> str:
        h, w, c = self.arrays.image_shape
        return (f"ImageEpisodes({self.dataset}, split={self.split!r}, layout="
                f"{self.arrays.layout!r}, ways={self.ways}, shots={self.shots}, "
                f"queries={self.queries}, meta_batch={self.meta_batch}, seed={self.seed}, "
                f"classes={self.num_classes}, images={len(self.arrays.images)}x{h}x{w}x{c})")

    def sample(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Task ``t``'s draw: image indices ``int64 [ways, shots + queries]`` (row ``r`` = the
        class labelled ``labels[r]``) and ``labels int64 [ways]``."""
        g = task_generator(self.dataset, self.seed, self.split, t)
        classes = torch.randperm(self.num_classes, generator=g)[: self.ways]
        n = self.shots + self.queries
        rows = []
        for c in classes.tolist():
            members = self._members[c]
            rows.append(members[torch.randperm(len(members), generator=g)[:n]])
        labels = torch.randperm(self.ways, generator=g)
        return torch.stack(rows), labels

    def _tasks(self, ids: Sequence[int]) -> TaskBatch:
        picks = [self.sample(t) for t in ids]
        index = torch.stack([p[0] for p in picks])  # [B, ways, n]
        labels = torch.stack([p[1] for p in picks]).to(self.device)  # [B, ways]
        s = self.shots
        support = self._pixels(index[:, :, :s]), labels[:, :, None].expand(-1, -1, s)
        query = self._pixels(index[:, :, s:]), labels[:, :, None].expand(-1, -1, self.queries)
        return TaskBatch((support[0], support[1].reshape(len(ids), -1)),
                         (query[0], query[1].reshape(len(ids), -1)))

    def _pixels(self, index: torch.Tensor) -> torch.Tensor:
        """``uint8`` images ``index [B, ways, m]`` -> ``dtype [B, ways*m, C, H, W]`` on the device,
        normalised: one gather, one transfer, one converting copy, one or two in-place passes."""
        b = index.shape[0]
        pixels = self._images[index.reshape(b, -1).to(self._images.device)]  # [B, M, H, W, C]
        pixels = pixels.to(self.device, non_blocking=True)
        h, w, c = pixels.shape[2:]
        x = torch.empty((b, pixels.shape[1], c, h, w), dtype=self.dtype, device=self.device)
        x.copy_(pixels.permute(0, 1, 4, 2, 3))
        if self._shift is None:
            return x.mul_(1.0 / 255.0)
        return x.mul_(self._scale).sub_(self._shift)


def _normalization(normalize, arrays: FewShotArrays) -> tuple[tuple[float, ...], ...]:
    c = arrays.image_shape[2]
    if isinstance(normalize, str):
        if normalize == "unit":
            return (0.0,) * c, (1.0,) * c
        if normalize == "meanstd":
            if arrays.dataset not in NORMALIZATION:
                raise ValueError(f"no mean/std constants for {arrays.dataset!r}: pass "
                                 "normalize=(mean, std)")
            return NORMALIZATION[arrays.dataset]
        raise ValueError(f"normalize must be 'unit', 'meanstd' or a (mean, std) pair, "
                         f"got {normalize!r}")
    mean, std = (tuple(float(v) for v in np.atleast_1d(seq)) for seq in normalize)
    mean = mean * c if len(mean) == 1 else mean
    std = std * c if len(std) == 1 else std
    if len(mean) != c or len(std) != c or min(std) <= 0:
        raise ValueError(f"normalize=(mean, std) needs {c} means and {c} positive stds, got "
                         f"{normalize!r}")
    return mean, std
