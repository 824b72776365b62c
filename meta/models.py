"""Backbones for the MAML family: ``Conv4`` (Finn et al. 2017) and ``MLP`` (sinusoid).

Every model has two submodules, ``features`` (the backbone) and ``head`` (the last
``nn.Linear``), so parameter names split as ``features.*`` / ``head.*``: ANIL adapts only the
head, the memory-reduced algorithm meta-learns only the backbone.

Batch normalisation is :class:`BatchNorm`, ALWAYS using the statistics of the batch it sees
(support, query or meta-test batch: the transductive setting of the MAML official code). It has
no running statistics, so ``model.train()``/``model.eval()`` never change a result. It runs the
fused ``torch.nn.functional.batch_norm`` except under ``torch.func.vmap``/``jvp``, where it is
written with plain tensor ops: under vmap the batching rule of ``F.batch_norm`` gives wrong
second-order meta-gradients (pytorch/functorch#534; measured |vmap − loop| ≈ 1e-2 relative in
float64 on torch 2.13, see
``tests/test_meta_models.py::test_canary_functional_batch_norm_under_vmap``), while mean/var
written out agree with the Python loop to rounding.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

try:
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
except ImportError:  # private API moved: always use the plain-op form (exact everywhere)
    retrieve_all_functorch_interpreters = None

__all__ = ["BatchNorm", "Conv4", "MLP", "params_of", "split_params", "buffers_of"]


class BatchNorm(nn.Module):
    """Batch normalisation over dim 1 with batch statistics only (no running stats).

    y = (x − mean) / sqrt(var + eps) · weight + bias, mean and (biased) variance over every dim
    except dim 1: ``F.batch_norm(x, None, None, weight, bias, training=True, eps=eps)``.
    Under ``torch.func.vmap`` or ``jvp`` it is built from ``mean``/``sub``/``mul`` instead, so
    that vmapped second-order derivatives are exact (pytorch/functorch#534); elsewhere (the
    task loop, plain autograd, ``torch.func.grad``) the fused kernel is used, 1.2-1.6x faster
    for a whole Conv4 MAML step on CPU. Both forms agree to rounding (tested, float64, up to
    second order).
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _only_grad_transforms():
            return F.batch_norm(x, None, None, self.weight, self.bias, training=True,
                                eps=self.eps)
        return self.forward_plain(x)

    def forward_plain(self, x: torch.Tensor) -> torch.Tensor:
        """The same function from plain ops (exact under vmap of second-order derivatives)."""
        dims = [d for d in range(x.dim()) if d != 1]
        shape = [1] * x.dim()
        shape[1] = self.num_features
        mean = x.mean(dim=dims, keepdim=True)
        centred = x - mean
        var = (centred * centred).mean(dim=dims, keepdim=True)
        return centred / torch.sqrt(var + self.eps) * self.weight.view(shape) \
            + self.bias.view(shape)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, batch statistics only"


def _only_grad_transforms() -> bool:
    """True unless a vmap/jvp/functionalize transform is active (where F.batch_norm is unsafe).
    False while ``torch.compile`` traces (the interpreter stack is not traceable; the plain-op
    batch norm is exact everywhere and the compiler fuses it)."""
    if retrieve_all_functorch_interpreters is None or torch.compiler.is_compiling():
        return False
    return all(i.key() == TransformType.Grad for i in retrieve_all_functorch_interpreters())


class SpatialMean(nn.Module):
    """Mean over the spatial dims: [N, C, H, W] -> [N, C] (Finn et al.'s Omniglot network)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(-2, -1))


class Conv4(nn.Module):
    """The 4-block convolutional backbone of MAML (Finn, Abbeel, Levine 2017) plus a linear head.

    Block: conv 3x3 (``max_pool=False``: stride 2, padding 1, as Finn's Omniglot network;
    ``max_pool=True``: stride 1, padding 1, then 2x2 max-pool, as the MiniImageNet network) →
    :class:`BatchNorm` (if ``batch_norm``) → ReLU. Then the mean over the spatial dims →
    ``Linear(hidden, out_features)``, or with ``flatten=True`` (MAML's MiniImageNet network,
    needs ``image_size``) the flattened ``hidden·s·s`` map → ``Linear(hidden·s·s, out_features)``
    (:func:`meta.backbones.maml_conv4`: 84x84, 32 filters → 800 features). 28x28 inputs give
    14, 7, 4, 2 (strided); 84x84 with max-pool give 42, 21, 10, 5. Inputs ``[N, C, H, W]``;
    ``[N, H, W]`` is accepted when ``in_channels == 1``. Parameters:
    ``features.block{1..4}.{conv,norm}.*`` and ``head.*``.
    """

    def __init__(self, in_channels: int = 1, out_features: int = 5, hidden: int = 64,
                 max_pool: bool = False, batch_norm: bool = True, flatten: bool = False,
                 image_size: int | tuple[int, int] | None = None):
        super().__init__()
        self.in_channels = in_channels
        if flatten and image_size is None:
            raise ValueError("Conv4(flatten=True) needs image_size (the input height/width) "
                             "to size the head, e.g. image_size=84")
        size = (image_size, image_size) if isinstance(image_size, int) else image_size
        blocks: OrderedDict[str, nn.Module] = OrderedDict()
        channels = in_channels
        for i in range(1, 5):
            layers: OrderedDict[str, nn.Module] = OrderedDict()
            stride = 1 if max_pool else 2
            layers["conv"] = nn.Conv2d(channels, hidden, 3, stride=stride, padding=1)
            if batch_norm:
                layers["norm"] = BatchNorm(hidden)
            layers["relu"] = nn.ReLU()
            if max_pool:
                layers["pool"] = nn.MaxPool2d(2)
            blocks[f"block{i}"] = nn.Sequential(layers)
            channels = hidden
            if size is not None:  # 3x3 conv, padding 1, then the 2x2 pool or stride 2
                size = tuple(s // 2 if max_pool else (s - 1) // 2 + 1 for s in size)
        if flatten:
            if min(size) < 1:
                raise ValueError(f"image_size {image_size} is too small for four blocks")
            blocks["flatten"] = nn.Flatten()
            features = hidden * size[0] * size[1]
        else:
            blocks["pool"] = SpatialMean()
            features = hidden
        self.features = nn.Sequential(blocks)
        self.feature_dim = features
        self.head = nn.Linear(features, out_features)

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        """``[n, H, W]`` grey images get their channel dim (``[n, 1, H, W]``)."""
        if x.dim() == 3 and self.in_channels == 1:
            x = x.unsqueeze(-3)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(self.prepare_input(x)))


class MLP(nn.Module):
    """ReLU MLP ``in_features → hidden... → out_features`` (sinusoid regression: 1 → 40 → 40 → 1).

    ``features`` = the hidden layers with their ReLUs, ``head`` = the last ``nn.Linear``.
    """

    def __init__(self, in_features: int = 1, out_features: int = 1,
                 hidden: tuple[int, ...] = (40, 40)):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(width, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def params_of(model: nn.Module, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """``{name: parameter.detach()}`` (shares storage; use as functional parameters)."""
    return {n: p.detach() for n, p in model.named_parameters()
            if p.requires_grad or not trainable_only}


def buffers_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{name: buffer.detach()}`` (our models have none; user models may)."""
    return {n: b.detach() for n, b in model.named_buffers()}


def split_params(model: nn.Module, head: str = "head") -> tuple[dict[str, torch.Tensor],
                                                                dict[str, torch.Tensor]]:
    """``(backbone, head)``: detached parameter dicts, split by the ``head`` submodule's prefix."""
    if not isinstance(getattr(model, head, None), nn.Module):
        raise ValueError(f"{type(model).__name__} has no submodule {head!r}; ANIL and the "
                         f"memory-reduced algorithm need a model with a separate head "
                         f"(meta.Conv4 and meta.MLP name it 'head')")
    prefix = head + "."
    params = params_of(model)
    body = {n: p for n, p in params.items() if not n.startswith(prefix)}
    tail = {n: p for n, p in params.items() if n.startswith(prefix)}
    if not tail:
        raise ValueError(f"submodule {head!r} of {type(model).__name__} has no parameters")
    return body, tail
