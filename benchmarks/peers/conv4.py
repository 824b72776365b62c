"""The Conv4 few-shot backbone of Finn et al. (2017) for Omniglot, as a plain ``nn.Module``.

Four blocks of [conv 3x3, ``hidden`` filters, stride 2, padding 1 -> BatchNorm2d -> ReLU],
then the mean over the spatial dimensions and a ``Linear(hidden, ways)`` head.  The strided
convolutions replace max-pooling, as in the original Omniglot model.

BatchNorm is ``torch.nn.BatchNorm2d(track_running_stats=False)``: it always normalises with the
statistics of the current batch and has no buffers, which is how the peer libraries' MAML
examples are run (transductive batch norm) and keeps every peer a pure function of parameters.
"""

from __future__ import annotations

import torch
from torch import nn


def conv4(
    ways: int = 5,
    hidden: int = 64,
    in_channels: int = 1,
    *,
    dtype: torch.dtype | None = None,
    seed: int | None = None,
) -> nn.Sequential:
    """Return a Conv4 classifier mapping ``[batch, in_channels, H, W]`` to ``[batch, ways]``.

    ``seed`` (if given) makes the initialisation reproducible without touching the global RNG.
    """
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return conv4(ways, hidden, in_channels, dtype=dtype)
    layers: list[nn.Module] = []
    channels = in_channels
    for _ in range(4):
        layers += [
            nn.Conv2d(channels, hidden, kernel_size=3, stride=2, padding=1),
            nn.BatchNorm2d(hidden, track_running_stats=False),
            nn.ReLU(),
        ]
        channels = hidden
    model = nn.Sequential(*layers, _SpatialMean(), nn.Linear(hidden, ways))
    if dtype is not None:
        model = model.to(dtype)
    return model


class _SpatialMean(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(-2, -1))


def omniglot_like_batch(
    tasks: int,
    ways: int = 5,
    shots: int = 1,
    queries: int = 15,
    *,
    size: int = 28,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Synthetic episode batch shaped like N-way K-shot Omniglot.

    Returns ``xs [tasks, ways*shots, 1, size, size]``, ``ys [tasks, ways*shots]`` (int64),
    ``xq [tasks, ways*queries, 1, size, size]``, ``yq [tasks, ways*queries]``.  Each class gets a
    random prototype image plus noise, so the losses are non-trivial but no data set is needed.
    """
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(tasks, ways, 1, size, size, generator=g, dtype=torch.float64)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(ways).repeat_interleave(n).expand(tasks, -1).contiguous()
        x = protos[:, y[0]] + 0.5 * torch.randn(tasks, ways * n, 1, size, size, generator=g,
                                                 dtype=torch.float64)
        return x.to(dtype), y

    xs, ys = draw(shots)
    xq, yq = draw(queries)
    return xs, ys, xq, yq
