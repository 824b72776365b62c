"""Sinusoid regression tasks of Finn et al. (2017), section 5.1."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..tasks import TaskBatch
from .stream import TaskStream, task_generator

__all__ = ["Sinusoid"]


class Sinusoid(TaskStream):
    """Seeded, resumable batches of 1-D regression tasks ``y = A sin(x - phase)``.

    Each task draws ``A ~ U(amplitude)``, ``phase ~ U(phase)`` and ``shots + queries`` inputs
    ``x ~ U(x_range)`` (all in float64, then cast to ``dtype``). ``batch(i)`` is a
    :class:`TaskBatch` whose support is ``(x, y)`` of shape ``[meta_batch, shots, 1]`` each and
    whose query is ``[meta_batch, queries, 1]``. Task ``t`` depends only on ``(seed, split, t)``
    and the constructor arguments (generator ``task_generator("sinusoid", seed, t)`` for
    ``split="train"``, ``("sinusoid", seed, split, t)`` for ``"val"``/``"test"``, so the splits
    never share tasks); ``batch(i)`` stacks tasks ``i*meta_batch .. (i+1)*meta_batch - 1``.
    Iteration yields ``batch(0), batch(1), ...`` forever, or ``num_batches`` batches.
    """

    def __init__(
        self,
        shots: int = 10,
        queries: int = 10,
        meta_batch: int = 25,
        amplitude: tuple[float, float] = (0.1, 5.0),
        phase: tuple[float, float] = (0.0, math.pi),
        x_range: tuple[float, float] = (-5.0, 5.0),
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        num_batches: int | None = None,
        split: str = "train",
    ) -> None:
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be one of ('train', 'val', 'test'), got {split!r}")
        for name, value in (("shots", shots), ("queries", queries), ("meta_batch", meta_batch)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name, (lo, hi) in (("amplitude", amplitude), ("phase", phase), ("x_range", x_range)):
            if not lo <= hi:
                raise ValueError(f"{name} must be a (low, high) pair with low <= high")
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating point dtype, got {dtype}")
        self.shots, self.queries, self.meta_batch = shots, queries, meta_batch
        self.amplitude, self.phase, self.x_range = tuple(amplitude), tuple(phase), tuple(x_range)
        self.seed, self.dtype, self.num_batches = seed, dtype, num_batches
        self.split = split
        self._key = ("sinusoid", seed) if split == "train" else ("sinusoid", seed, split)
        self.device = torch.device(device if device is not None else "cpu")

    def task_params(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Amplitudes and phases (float64, ``[meta_batch]``) of the tasks of ``batch(i)``."""
        u = self._uniforms(self.task_ids(i))
        return _scale(u[:, 0], self.amplitude), _scale(u[:, 1], self.phase)

    def _tasks(self, ids: Sequence[int]) -> TaskBatch:
        u = self._uniforms(ids)
        amp, phase = _scale(u[:, :1], self.amplitude), _scale(u[:, 1:2], self.phase)
        x = _scale(u[:, 2:], self.x_range)
        y = amp * torch.sin(x - phase)
        x, y = (t.to(device=self.device, dtype=self.dtype).unsqueeze(-1) for t in (x, y))
        s = self.shots
        return TaskBatch((x[:, :s], y[:, :s]), (x[:, s:], y[:, s:]))

    def __repr__(self) -> str:
        return (
            f"Sinusoid(shots={self.shots}, queries={self.queries}, meta_batch={self.meta_batch}, "
            f"amplitude={self.amplitude}, phase={self.phase}, x_range={self.x_range}, "
            f"seed={self.seed}, split={self.split!r})"
        )

    def _uniforms(self, ids: Sequence[int]) -> torch.Tensor:
        """``[len(ids), 2 + shots + queries]`` U(0, 1) draws: amplitude, phase, inputs."""
        n = 2 + self.shots + self.queries
        rows = [torch.rand(n, generator=task_generator(*self._key, t),
                           dtype=torch.float64) for t in ids]
        return torch.stack(rows)


def _scale(u: torch.Tensor, bounds: tuple[float, float]) -> torch.Tensor:
    lo, hi = bounds
    return lo + (hi - lo) * u
