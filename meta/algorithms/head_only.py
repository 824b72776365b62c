"""Head-only inner loops (ANIL, memory-reduced): which parameters are the head, and the
backbone run ONCE per task instead of once per inner step.

A model f(x) = h_w(φ_θ(x)) is split by :class:`HeadSplit`: ``head`` names the head submodule
(its parameters are the inner variable w), ``backbone`` says how the features reaching it are
computed: ``None`` (default) = whatever the model's own forward feeds the head (the model
with its head replaced by the identity: any model whose output is ``head(z)``), a submodule
name (``model.<backbone>(x)``), or a function ``backbone(model, x) -> features`` (called
functionally: it may use any submodule). When the inner loop adapts only the head, the
support and query features F_s = φ_θ(x_s), F_q = φ_θ(x_q) do not depend on the adapted head,
so

    g(w, θ) = L(h_w(F_s(θ)), y_s),    f(w, θ) = L(h_w(F_q(θ)), y_q)

and, for ANY estimator, by the chain rule

    dF/dθ_body = (∂F_s/∂θ_body)ᵀ · dF/dF_s + (∂F_q/∂θ_body)ᵀ · dF/dF_q.

The learner (:meth:`meta.algorithms.base.MetaLearner.task_hypergrad`) computes the features
with one :func:`bilevel.autodiff.vjp` per task, calls :func:`bilevel.hypergrad` on the head
problem whose hyperparameters are the head initialisation (ANIL; none for the memory-reduced
algorithm) AND the two feature tensors, and pulls the feature gradients back through the
backbone: one backbone forward and backward per task instead of one per inner step (and per
CG product). The value is the same as differentiating through the full model at every step
(tested to 1e-10 in float64). With dropout active in the backbone the cached features draw
their masks once per task; ``cache_features=False`` (the full model at every step) draws them
at every step.

``model(x) == head(φ(x))`` is verified on the first batch, deterministically: both sides run
from the same RNG state inside ``torch.random.fork_rng`` (dropout masks agree, the global RNG
is untouched) through the learner's functional call (no buffer is written).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from .functional_model import FunctionalModel

__all__ = ["HeadSplit", "FEAT_S", "FEAT_Q"]

Params = dict[str, torch.Tensor]
FEAT_S, FEAT_Q = "features:support", "features:query"  # never a parameter name (no ':')


def _children(model: nn.Module) -> str:
    names = [n for n, _ in model.named_children()]
    return ", ".join(names) if names else "none"


def _with_identity(module: nn.Module, path: list[str]) -> nn.Module:
    """A structural copy of ``module`` with the submodule at ``path`` replaced by
    ``nn.Identity()``; the modules off the path (and every tensor) are shared, nothing of
    ``module`` is modified."""
    clone = copy.copy(module)
    clone.__dict__["_modules"] = dict(module._modules)
    clone.__dict__["_parameters"] = dict(module._parameters)
    clone.__dict__["_buffers"] = dict(module._buffers)
    child = module._modules[path[0]]
    clone._modules[path[0]] = nn.Identity() if len(path) == 1 else \
        _with_identity(child, path[1:])
    return clone


class HeadSplit:
    """f(x) = head(backbone(x)) for head-only learners; see the module docstring."""

    def __init__(self, model: nn.Module, fmodel: FunctionalModel, head: str = "head",
                 backbone: str | Callable | None = None, learner: str = "ANIL"):
        if not isinstance(head, str) or not head:
            raise TypeError(f"head must be the name of a submodule (e.g. 'fc' or "
                            f"'classifier.2'), got {head!r}")
        try:
            head_module = model.get_submodule(head)
        except AttributeError:
            raise ValueError(f"{type(model).__name__} has no submodule {head!r} (its children: "
                             f"{_children(model)}); {learner} adapts only the head: pass "
                             f"head='<name of the last layer>'") from None
        prefix = head + "."
        self.head_names = [prefix + n for n, _ in head_module.named_parameters()]
        if not self.head_names:
            raise ValueError(f"the head {head!r} of {type(model).__name__} has no parameters")
        self.fmodel, self.head, self.backbone = fmodel, head, backbone
        self.head_module = head_module
        if backbone is None:
            self.body_module: nn.Module | None = _with_identity(model, head.split("."))
            self.body_prefix = ""
        elif isinstance(backbone, str):
            try:
                self.body_module = model.get_submodule(backbone)
            except AttributeError:
                raise ValueError(f"{type(model).__name__} has no submodule {backbone!r} (its "
                                 f"children: {_children(model)}); pass backbone=None to use "
                                 f"what the model feeds its head") from None
            if backbone == head or backbone.startswith(prefix) or head.startswith(backbone + "."):
                raise ValueError(f"backbone {backbone!r} and head {head!r} overlap")
            self.body_prefix = backbone + "."
        elif callable(backbone):
            self.body_module, self.body_prefix = None, ""
        else:
            raise TypeError(f"backbone must be None, a submodule name or a function "
                            f"(model, x) -> features, got {type(backbone).__name__}")

    def describe(self) -> str:
        body = ("the input of the head" if self.backbone is None else
                repr(self.backbone) if isinstance(self.backbone, str) else
                getattr(self.backbone, "__name__", "backbone function"))
        return f"head {self.head!r}, features = {body}"

    def split(self, tree: Params) -> tuple[Params, Params]:
        """(backbone, head) entries of a name -> tensor dict."""
        head = set(self.head_names)
        return ({n: t for n, t in tree.items() if n not in head},
                {n: t for n, t in tree.items() if n in head})

    def embed(self, tensors: Params, x: torch.Tensor) -> torch.Tensor:
        """φ(x) with the model's tensors ``tensors`` (model names)."""
        if self.body_module is None:
            return self.fmodel.call_fn(self.backbone, tensors, x)
        if self.body_prefix:
            return self.fmodel.call(self.body_module, tensors, x, prefix=self.body_prefix)
        body = {n: t for n, t in tensors.items() if not n.startswith(self.head + ".")}
        return self.fmodel.call(self.body_module, body, x)

    def head_out(self, tensors: Params, feats: torch.Tensor) -> torch.Tensor:
        """h(F) with the model's tensors ``tensors`` (model names)."""
        return self.fmodel.call(self.head_module, tensors, feats, prefix=self.head + ".")

    def check(self, tensors: Params, x: torch.Tensor, device: torch.device) -> None:
        """``model(x) == head(φ(x))`` on ``x``, from one RNG state, without side effects."""
        devices = [device] if device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            state = torch.random.get_rng_state()
            cuda = torch.cuda.get_rng_state(device) if devices else None
            want = self.fmodel(tensors, x)
            torch.random.set_rng_state(state)
            if cuda is not None:
                torch.cuda.set_rng_state(cuda, device)
            got = self.head_out(tensors, self.embed(tensors, x))
        if not isinstance(want, torch.Tensor) or not isinstance(got, torch.Tensor) \
                or got.shape != want.shape \
                or not torch.allclose(got, want, rtol=1e-4, atol=1e-5 * (1 + float(
                    want.abs().max()))):
            raise ValueError(f"the model's output is not head(features(x)) with "
                             f"{self.describe()}, so the features cannot be computed once per "
                             f"task: pass backbone=... (a submodule name or a function "
                             f"(model, x) -> features), or cache_features=False")
