"""The standard few-shot backbones: MAML's Conv4 for Mini-ImageNet and MetaOptNet's ResNet-12.

Both follow the conventions of :mod:`meta.models`: a ``features`` submodule (the backbone,
ending in the flattened feature vector) and a ``head`` (``nn.Linear``), so that ANIL and the
memory-reduced algorithm can split them; batch norm is :class:`meta.models.BatchNorm` (the
statistics of the batch it sees, no running statistics), so every learner works looped and
under ``torch.func.vmap``.

- :func:`maml_conv4`: Finn, Abbeel & Levine (2017), Mini-ImageNet network: 4 x [conv 3x3
  (32 filters, padding 1, bias) → BN → ReLU → 2x2 max-pool], 84 → 42 → 21 → 10 → 5, flattened
  to 32·5·5 = 800 features → ``Linear(800, ways)``: 28,896 + 4,005 = 32,901 parameters (5-way).
- :class:`ResNet12`: Lee et al. (2019, MetaOptNet): 4 residual blocks of 64, 160, 320, 640
  channels; block = [conv 3x3 (no bias) → BN → LeakyReLU(0.1)] x 2 → conv 3x3 → BN, plus the
  shortcut conv 1x1 → BN, → LeakyReLU(0.1) → 2x2 max-pool → dropout (blocks 1-2) or
  :class:`DropBlock` (blocks 3-4) when ``drop_rate > 0``. 84x84 → 640·5·5 = 16,000 features
  (``avg_pool=True``: 640); 12,424,320 backbone parameters.

Randomness (dropout, DropBlock) is drawn with ``torch.rand_like`` / ``F.dropout`` only in
``train()`` mode, so it runs under ``torch.func.vmap(..., randomness="different")`` (a mask per
task) or ``"same"``; under vmap's default ``randomness="error"`` a model with ``drop_rate > 0``
in train mode raises. ``model.eval()`` switches both off (batch norm is unaffected: it has no
running statistics). Masks are redrawn at every forward (every inner step), as dropout in
MetaOptNet/MAML code; an implicit-gradient learner (iMAML, memory-reduced) assumes a
deterministic inner loss and should be run with ``drop_rate=0``.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from .models import BatchNorm, Conv4, SpatialMean

__all__ = ["maml_conv4", "ResNet12", "ResNetBlock", "DropBlock", "dropblock_rate",
           "count_parameters"]


def count_parameters(module: nn.Module) -> int:
    """Number of scalar parameters of ``module``."""
    return sum(p.numel() for p in module.parameters())


def maml_conv4(out_features: int = 5, *, hidden: int = 32, image_size: int = 84,
               in_channels: int = 3) -> Conv4:
    """MAML's Mini-ImageNet Conv4: ``Conv4(in_channels, out_features, hidden, max_pool=True,
    flatten=True, image_size=image_size)``; the defaults give 800 features and 32,901
    parameters with a 5-way head. ``hidden=64, image_size=32`` is the CIFAR-FS/FC100 variant
    (256 features), ``hidden=64`` at 84x84 the learn2learn ≥ 0.1.6 default (1,600 features)."""
    return Conv4(in_channels, out_features, hidden=hidden, max_pool=True, flatten=True,
                 image_size=image_size)


def dropblock_rate(step: int, drop_rate: float = 0.1, warmup_steps: int = 40_000) -> float:
    """MetaOptNet's DropBlock schedule, made explicit: the drop rate rises linearly from 0 to
    ``drop_rate`` over ``warmup_steps`` forward passes (MetaOptNet: 20 epochs x 2,000 = 40,000),
    ``min(drop_rate, drop_rate · step / warmup_steps)``. Set it with
    :meth:`ResNet12.set_dropblock_rate`."""
    if warmup_steps <= 0:
        return float(drop_rate)
    return float(min(drop_rate, drop_rate * max(step, 0) / warmup_steps))


class DropBlock(nn.Module):
    """DropBlock (Ghiasi, Lin & Le 2018) on ``[N, C, H, W]``, as MetaOptNet's ResNet-12 uses it.

    Seeds ~ Bernoulli(γ) on the ``(H − b + 1) x (W − b + 1)`` positions where a ``b x b`` block
    fits (b = ``min(block_size, H, W)``), γ = p/b² · HW/((H − b + 1)(W − b + 1)) so that a
    fraction ≈ p = ``drop_rate`` of the units is dropped; each seed zeroes its block; the kept
    units are rescaled by (#units)/(#kept): y = x · M · |M| / ΣM. Identity when ``drop_rate``
    is 0 or in ``eval()`` mode. The mask is drawn with ``torch.rand_like`` (one per call; per
    task under ``vmap(randomness="different")``).
    """

    def __init__(self, block_size: int, drop_rate: float = 0.0):
        super().__init__()
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        self.block_size = block_size
        self.drop_rate = _check_rate(drop_rate, "drop_rate")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_rate == 0:
            return x
        if x.dim() != 4:
            raise ValueError(f"DropBlock needs [N, C, H, W], got {list(x.shape)}")
        h, w = x.shape[-2:]
        b = min(self.block_size, h, w)
        gamma = self.drop_rate / b ** 2 * (h * w) / ((h - b + 1) * (w - b + 1))
        seeds = (torch.rand_like(x[..., : h - b + 1, : w - b + 1]) < gamma).to(x.dtype)
        # every seed covers the b x b block to its lower right: max-pool of the zero-padded seeds
        blocks = F.max_pool2d(F.pad(seeds, (b - 1, b - 1, b - 1, b - 1)), b, stride=1)
        keep = 1.0 - blocks
        return x * keep * (keep.numel() / keep.sum().clamp_min(1.0))

    def extra_repr(self) -> str:
        return f"block_size={self.block_size}, drop_rate={self.drop_rate}"


def _check_rate(rate, name: str) -> float:
    if not isinstance(rate, (int, float)) or isinstance(rate, bool) or not 0 <= rate < 1:
        raise ValueError(f"{name} must be a number in [0, 1), got {rate!r}")
    return float(rate)


class ResNetBlock(nn.Module):
    """One ResNet-12 block (module docstring); ``dropblock_size=None`` uses plain dropout."""

    def __init__(self, in_channels: int, channels: int, *, negative_slope: float = 0.1,
                 drop_rate: float = 0.0, dropblock_size: int | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, padding=1, bias=False)
        self.norm1 = BatchNorm(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm2 = BatchNorm(channels)
        self.conv3 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm3 = BatchNorm(channels)
        self.shortcut = nn.Sequential(OrderedDict(
            conv=nn.Conv2d(in_channels, channels, 1, bias=False), norm=BatchNorm(channels)))
        self.act = nn.LeakyReLU(negative_slope)
        self.pool = nn.MaxPool2d(2)
        self.drop_rate = _check_rate(drop_rate, "drop_rate")
        self.dropblock = None if dropblock_size is None else DropBlock(dropblock_size, drop_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.norm1(self.conv1(x)))
        out = self.act(self.norm2(self.conv2(out)))
        out = self.norm3(self.conv3(out))
        out = self.pool(self.act(out + self.shortcut(x)))
        if self.dropblock is not None:
            return self.dropblock(out)
        if self.drop_rate > 0 and self.training:
            out = F.dropout(out, self.drop_rate, training=True)
        return out


class ResNet12(nn.Module):
    """ResNet-12 of MetaOptNet (Lee, Maji, Ravichandran & Soatto 2019) plus a linear head.

    ``features`` = ``block1..block4`` (``channels``, default 64-160-320-640; block = module
    docstring) → flatten (``avg_pool=False``, MetaOptNet's choice: 640·5·5 = 16,000 features at
    84x84, 640·2·2 = 2,560 at 32x32) or the spatial mean (``avg_pool=True``: 640);
    ``head`` = ``Linear(feature_dim, out_features)``. ``drop_rate`` (MetaOptNet: 0.1) is the
    dropout of blocks 1-2 and the DropBlock rate of blocks 3-4 (``dropblock_size`` 5 for
    Mini-/tiered-ImageNet, 2 for CIFAR-FS/FC100); the DropBlock rate can be annealed with
    :meth:`set_dropblock_rate` and :func:`dropblock_rate` (MetaOptNet's hidden per-forward
    counter made an explicit argument). Convolutions: Kaiming normal (fan_out, leaky_relu) as
    MetaOptNet; batch norm: :class:`meta.models.BatchNorm` (weight 1, bias 0). ``channels``
    smaller than the default (e.g. ``(8, 16, 16, 16)``) gives a cheap model for tests.
    """

    def __init__(self, out_features: int = 5, *, in_channels: int = 3,
                 channels: tuple[int, int, int, int] = (64, 160, 320, 640),
                 image_size: int | tuple[int, int] = 84, avg_pool: bool = False,
                 drop_rate: float = 0.0, dropblock_size: int = 5,
                 negative_slope: float = 0.1):
        super().__init__()
        channels = tuple(channels)
        if len(channels) != 4 or not all(isinstance(c, int) and c > 0 for c in channels):
            raise ValueError(f"channels must be 4 positive ints, got {channels!r}")
        _check_rate(drop_rate, "drop_rate")
        self.in_channels = in_channels
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
        blocks: OrderedDict[str, nn.Module] = OrderedDict()
        width = in_channels
        for i, c in enumerate(channels, 1):
            blocks[f"block{i}"] = ResNetBlock(
                width, c, negative_slope=negative_slope, drop_rate=drop_rate,
                dropblock_size=dropblock_size if i >= 3 else None)
            width, h, w = c, h // 2, w // 2
        if min(h, w) < 1:
            raise ValueError(f"image_size {image_size} is too small for four 2x2 max-pools")
        if avg_pool:
            blocks["pool"] = SpatialMean()
            self.feature_dim = width
        else:
            blocks["flatten"] = nn.Flatten()
            self.feature_dim = width * h * w
        self.features = nn.Sequential(blocks)
        self.head = nn.Linear(self.feature_dim, out_features)
        for m in self.features.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")

    def set_dropblock_rate(self, rate: float) -> None:
        """Set the DropBlock rate of blocks 3-4 (e.g. ``dropblock_rate(step)``)."""
        rate = _check_rate(rate, "rate")
        for m in self.modules():
            if isinstance(m, DropBlock):
                m.drop_rate = rate

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        """``[n, H, W]`` grey images get their channel dim (``[n, 1, H, W]``)."""
        if x.dim() == 3 and self.in_channels == 1:
            x = x.unsqueeze(-3)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(self.prepare_input(x)))
