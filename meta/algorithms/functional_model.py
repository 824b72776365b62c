"""A user's ``nn.Module`` as the pure function the learners call: ``out = f(tensors, x)``.

The learners never call ``model(x)``; they call :meth:`FunctionalModel.__call__`, i.e.
``torch.func.functional_call(model, tensors, (x,))`` under the library's two policies:

- **Batch norm = batch statistics, always** (transductive, as the MAML official code and
  most learn2learn/higher users). Every ``torch.nn`` batch-norm layer (``BatchNorm1d/2d/3d``,
  ``SyncBatchNorm``; subclasses of ``nn.modules.batchnorm._BatchNorm``) normalises each batch
  it sees (a support set, a query set, a meta-test set) with that batch's own mean and
  variance, in ``train()`` AND ``eval()`` mode: its running buffers are passed as ``None``, so
  they are neither read nor written (``running_mean``, ``running_var`` and
  ``num_batches_tracked`` keep the values they had when the learner was built). Under
  ``torch.func.vmap``/``jvp`` the normalisation is written with plain tensor ops (a
  ``TorchFunctionMode`` reroutes batch-statistics ``F.batch_norm`` calls), as
  :class:`meta.BatchNorm` does: the fused kernel's batching rule gives wrong second-order
  derivatives in the pattern ``grad(vmap(task).mean())`` (pytorch/functorch#534; the
  learners' own ``vmap(grad(task))`` is exact either way), so any composition a user
  builds on the learner's forward stays exact (tested). ``InstanceNorm`` with
  ``track_running_stats=True`` is refused at
  construction (pass ``track_running_stats=False``).
- **Every other module follows the model's mode** as the user set it (``model.train()``:
  dropout active; ``model.eval()``: dropout off). The learners never change the mode, a
  parameter or a buffer of the model.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.overrides import TorchFunctionMode

from ..models import _only_grad_transforms

__all__ = ["FunctionalModel", "batch_norm_layers", "RUNNING_STATS"]

Params = dict[str, torch.Tensor]
RUNNING_STATS = ("running_mean", "running_var", "num_batches_tracked")


def batch_norm_layers(model: nn.Module) -> list[str]:
    """Names of the ``torch.nn`` batch-norm layers of ``model`` (refuses InstanceNorm with
    running statistics, which has no batch-statistics equivalent in eval mode)."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, _InstanceNorm) and module.track_running_stats:
            raise ValueError(f"{type(module).__name__} {name!r} tracks running statistics, "
                             f"which meta learners never update; build it with "
                             f"track_running_stats=False (instance statistics, the same in "
                             f"train and eval mode)")
        if isinstance(module, _BatchNorm):
            names.append(name)
    return names


def _plain_batch_norm(x, weight, bias, eps):
    """F.batch_norm(x, None, None, weight, bias, training=True, eps=eps) from plain ops."""
    dims = [d for d in range(x.dim()) if d != 1]
    shape = [1] * x.dim()
    shape[1] = x.shape[1]
    mean = x.mean(dim=dims, keepdim=True)
    centred = x - mean
    var = (centred * centred).mean(dim=dims, keepdim=True)
    out = centred / torch.sqrt(var + eps)
    if weight is not None:
        out = out * weight.view(shape)
    if bias is not None:
        out = out + bias.view(shape)
    return out


class _ExactBatchNorm(TorchFunctionMode):
    """Under vmap/jvp: batch-statistics ``F.batch_norm`` calls -> :func:`_plain_batch_norm`."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.batch_norm:
            names = ("input", "running_mean", "running_var", "weight", "bias", "training",
                     "momentum", "eps")
            a = dict(zip(names, args))
            a.update(kwargs)
            if a.get("running_mean") is None and a.get("running_var") is None \
                    and a.get("training", False):
                return _plain_batch_norm(a["input"], a.get("weight"), a.get("bias"),
                                         a.get("eps", 1e-5))
        return func(*args, **kwargs)


class FunctionalModel:
    """``model`` as ``f(tensors, x)`` with batch statistics in every batch-norm layer.

    ``tensors`` maps parameter (and buffer) names to tensors, as ``functional_call``; the
    running statistics of the batch-norm layers are always overridden by ``None``.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.batch_norms = batch_norm_layers(model)
        self.none_buffers: Params = {
            f"{name}.{b}" if name else b: None  # type: ignore[misc]
            for name in self.batch_norms for b in RUNNING_STATS
            if getattr(model.get_submodule(name), b, None) is not None}
        self._wrappers: dict[int, nn.Module] = {}

    def buffers(self) -> Params:
        """The model's buffers the forward reads (everything but BN running statistics)."""
        return {n: b.detach() for n, b in self.model.named_buffers()
                if n not in self.none_buffers}

    def call(self, module: nn.Module, tensors: Params, x, prefix: str = "") -> torch.Tensor:
        """``functional_call(module, tensors, (x,))`` under the policy; ``module`` is the model
        or one of its submodules (then ``prefix`` = its name + '.' and ``tensors`` keep the
        model's names)."""
        if prefix:
            tensors = {n[len(prefix):]: t for n, t in tensors.items() if n.startswith(prefix)}
            nones = {n[len(prefix):]: None for n in self.none_buffers if n.startswith(prefix)}
        else:
            nones = self.none_buffers
        return self._run(module, {**tensors, **nones}, x)

    def _run(self, module: nn.Module, full: Params, x) -> torch.Tensor:
        if self.batch_norms and not _only_grad_transforms():
            with _ExactBatchNorm():
                return functional_call(module, full, (x,))
        return functional_call(module, full, (x,))

    def __call__(self, tensors: Params, x) -> torch.Tensor:
        return self.call(self.model, tensors, x)

    def call_fn(self, fn: Callable, tensors: Params, x) -> torch.Tensor:
        """``fn(model, x)`` with the model's tensors replaced by ``tensors`` (a backbone given
        as a function: :class:`meta.algorithms.head_only.HeadSplit`)."""
        wrapper = self._wrappers.get(id(fn))
        if wrapper is None:
            wrapper = self._wrappers[id(fn)] = _Apply(self.model, fn)
        full = {f"m.{n}": t for n, t in {**tensors, **self.none_buffers}.items()}
        return self._run(wrapper, full, x)


class _Apply(nn.Module):
    """A module whose forward is ``fn(model, x)`` (parameters ``m.<model's names>``)."""

    def __init__(self, model: nn.Module, fn: Callable):
        super().__init__()
        self.m = model
        self.fn = fn

    def forward(self, x):
        return self.fn(self.m, x)
