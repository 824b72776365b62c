"""What a run is made of: its task streams (:func:`datasets`, through
:func:`meta.data.open_dataset`), its model (a preset of :data:`~meta.training.config.MODEL_PRESETS`,
``package.module:factory`` or an instance) and its learner (:func:`learner`)."""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable
from typing import Any

import torch

import bilevel as bl

from .config import _EXTRAS, IMAGE_DATASETS, ConfigError, TrainConfig, model_preset, parse_estimator

__all__ = ["datasets", "data_shape", "load_factory", "factory_spec", "model_kwargs",
           "build_model", "build_learner", "SINUSOID_SEED_OFFSETS", "EVAL_BATCH"]

#: sinusoid val/test streams: the training seed plus these offsets (the runs before open_dataset)
SINUSOID_SEED_OFFSETS = {"val": 1_000_000_007, "test": 2_000_000_014}
#: tasks per batch in evaluation
EVAL_BATCH = {"sinusoid": 100, "omniglot": 32, "miniimagenet": 8, "tieredimagenet": 8,
              "cifarfs": 16, "fc100": 16}


def datasets(c: TrainConfig):
    """``(train, val, test)`` task streams of the resolved config ``c``; sinusoid keeps its
    seed offsets, the others come from :func:`meta.data.open_dataset` (``format="auto"``)."""
    from ..data import Sinusoid, open_dataset

    dtype = getattr(torch, c.dtype)
    device = torch.device(c.device)
    n_eval = EVAL_BATCH[c.dataset]
    sizes = {"train": c.meta_batch, "val": min(c.val_tasks, n_eval),
             "test": min(c.test_tasks, n_eval)}
    if c.dataset == "sinusoid":
        return tuple(Sinusoid(shots=c.shots, queries=c.queries, meta_batch=sizes[s],
                              seed=c.seed + SINUSOID_SEED_OFFSETS.get(s, 0), dtype=dtype,
                              device=device) for s in ("train", "val", "test"))
    if c.data_root is None:
        if c.dataset == "omniglot":
            raise ConfigError(
                "--dataset omniglot needs the data: pass --data-root DIR (or set "
                "OMNIGLOT_ROOT) where DIR holds images_background.zip and images_evaluation.zip "
                "from https://github.com/brendenlake/omniglot/raw/master/python/ (or "
                "images_background.npz and images_evaluation.npz, in DIR or DIR/npz); "
                "--download fetches the zips into DIR")
        raise ConfigError(f"--dataset {c.dataset} needs --data-root DIR, the folder holding its "
                          f"files as published (see meta.data.open_dataset for the layouts)")
    out = []
    for split, meta_batch in sizes.items():
        options: dict[str, Any] = {}
        if c.dataset == "omniglot":
            options["download"] = bool(c.download) and split == "train"
        elif c.download:
            raise ConfigError(f"--download applies to omniglot only; {c.dataset} is read from "
                              f"the files in --data-root")
        try:
            out.append(open_dataset(c.dataset, os.path.expanduser(c.data_root), split,
                                    ways=c.ways, shots=c.shots, queries=c.queries,
                                    meta_batch=meta_batch, seed=c.seed, format="auto",
                                    device=device, dtype=dtype, **options))
        except FileNotFoundError as err:
            message = str(err).replace("download=True", "--download")
            if c.dataset == "omniglot" and "--download" not in message and not c.download:
                message += " (--download fetches the official zips)"
            raise ConfigError(message) from None
        except ValueError as err:
            raise ConfigError(str(err)) from None
    return tuple(out)


def data_shape(stream) -> tuple[int, int]:
    """``(in_channels, image_size)`` of a task stream's inputs (sinusoid: ``(1, 1)``)."""
    xs = stream.tasks([0]).support[0]            # [1, n, C, H, W] or [1, n, 1]
    if xs.ndim == 5:
        return int(xs.shape[2]), int(xs.shape[-1])
    return 1, 1


def load_factory(spec: str) -> Callable[..., torch.nn.Module]:
    """``"package.module:factory"`` -> the callable (``factory`` may be dotted: a class
    attribute); the module is looked up on ``sys.path``, then in the current directory;
    raises :class:`ConfigError` saying what is missing."""
    module_name, sep, attr = str(spec).partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"--model {spec!r}: expected package.module:factory (e.g. "
                          f"mypkg.nets:make_net)")
    if os.getcwd() not in sys.path and "" not in sys.path:  # local modules, as `python -m`
        sys.path.append(os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"--model {spec!r}: cannot import {module_name!r}: {err}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"--model {spec!r}: module {module_name!r} has no {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"--model {spec!r}: {attr!r} is a {type(obj).__name__}, not a "
                          f"callable returning an nn.Module")
    return obj


def factory_spec(fn: Any) -> str | None:
    """``"module:qualname"`` when ``fn`` can be imported back by :func:`load_factory`."""
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if not module or not qualname or "<" in qualname or module == "__main__":
        return None
    try:
        found = load_factory(f"{module}:{qualname}")
    except ConfigError:
        return None
    return f"{module}:{qualname}" if found is fn else None


def model_kwargs(c: TrainConfig, shape: tuple[int, int] | None = None) -> dict[str, int]:
    """What a model factory is told: ``ways`` (outputs), ``in_channels`` and ``image_size``
    (the data's, ``shape = (in_channels, image_size)`` from :func:`data_shape`; Omniglot 1 x 28,
    Mini-/tieredImageNet 3 x 84, CIFAR-FS/FC100 3 x 32, sinusoid 1 x 1)."""
    channels, size = shape if shape is not None else (
        (3, 84) if c.dataset in ("miniimagenet", "tieredimagenet") else
        (3, 32) if c.dataset in IMAGE_DATASETS else (1, 28 if c.dataset == "omniglot" else 1))
    return {"ways": 1 if c.dataset == "sinusoid" else c.ways, "in_channels": channels,
            "image_size": size}


def _call_factory(factory: Callable, c: TrainConfig, what: str,
                  shape: tuple[int, int] | None = None) -> torch.nn.Module:
    kwargs = model_kwargs(c, shape)
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = None
    if params is not None:  # image_size only to a factory that names it (**kwargs: ways, channels)
        named = {k for k, p in params.items() if p.kind is not p.VAR_KEYWORD}
        if any(p.kind is p.VAR_KEYWORD for p in params.values()):
            named |= {"ways", "in_channels"}
        kwargs = {k: v for k, v in kwargs.items() if k in named}
    else:
        kwargs.pop("image_size")
    model = factory(**kwargs)
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"{what} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _preset(name: str, c: TrainConfig, shape: tuple[int, int] | None) -> torch.nn.Module:
    from ..backbones import ResNet12, maml_conv4
    from ..models import MLP, Conv4

    kw = model_kwargs(c, shape)
    if name == "mlp":
        return MLP(in_features=1, out_features=1, hidden=tuple(c.hidden))
    if name == "conv4":
        return Conv4(in_channels=kw["in_channels"], out_features=kw["ways"], hidden=c.hidden[0])
    if name == "maml_conv4":
        return maml_conv4(kw["ways"], hidden=c.hidden[0], image_size=kw["image_size"],
                          in_channels=kw["in_channels"])
    return ResNet12(kw["ways"], in_channels=kw["in_channels"], image_size=kw["image_size"],
                    dropblock_size=5 if kw["image_size"] >= 64 else 2)


def default_preset(dataset: str) -> str:
    """The built-in model of a dataset: MLP (sinusoid), Conv4 (Omniglot, as before), MAML's
    Conv4 with max-pool and flattened features (the image datasets)."""
    return {"sinusoid": "mlp", "omniglot": "conv4"}.get(dataset, "maml_conv4")


def build_model(c: TrainConfig, given: torch.nn.Module | Callable | None = None,
                shape: tuple[int, int] | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """(model on the run's device and dtype, its record for the checkpoint); ``shape`` =
    :func:`data_shape` of the training stream."""


    if isinstance(given, torch.nn.Module):
        model = given
        record = {"factory": None, "class": f"{type(given).__module__}."
                                            f"{type(given).__qualname__}"}
    elif given is not None:
        model = _call_factory(given, c, "model factory", shape)
        record = {"factory": factory_spec(given), "class": f"{type(model).__module__}."
                                                           f"{type(model).__qualname__}"}
    elif c.model is not None and model_preset(c.model) is None:
        model = _call_factory(load_factory(c.model), c, f"--model {c.model}", shape)
        record = {"factory": c.model, "class": f"{type(model).__module__}."
                                               f"{type(model).__qualname__}"}
    else:
        name = c.model or default_preset(c.dataset)
        model = _preset(name, c, shape)
        record = {"factory": None, "preset": name,
                  "class": f"{type(model).__module__}.{type(model).__qualname__}"}
    return model.to(device=torch.device(c.device), dtype=getattr(torch, c.dtype)), record


def build_learner(c: TrainConfig, model: torch.nn.Module):
    """The learner of ``c.algorithm`` on ``model``; a bad combination -> ConfigError."""
    from .. import make_learner

    kwargs: dict[str, Any] = dict(
        inner_lr=c.inner_lr, inner_steps=c.inner_steps, eval_inner_steps=c.eval_inner_steps,
        loss="mse" if c.dataset == "sinusoid" else "cross_entropy",
        vectorize={"auto": None, "on": True, "off": False}[c.vectorize])
    if c.eval_inner_lr is not None:
        kwargs["eval_inner_lr"] = c.eval_inner_lr
    if c.estimator is not None:
        kwargs["estimator"] = parse_estimator(c.estimator)
    if c.compile:
        kwargs["compile"] = True
    kwargs.update({n: getattr(c, n) for n in _EXTRAS if getattr(c, n) is not None})
    try:
        learner = make_learner(c.algorithm, model, **kwargs)
        # reject estimator/solver combinations now (e.g. truncated:T with T > inner steps), not
        # at the first meta-step
        if kwargs.get("estimator") is not None:
            learner.estimator.validate(learner.problem(True), learner.solver(True),
                                       learner.hparams())
    except (ValueError, TypeError, bl.BilevelError) as err:
        raise ConfigError(f"{c.algorithm}: {err}") from None
    return learner

