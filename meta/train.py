"""The meta-training loop behind ``meta-train``, usable as a library function.

::

    from meta.train import TrainConfig, train
    results = train(TrainConfig(algorithm="maml", dataset="sinusoid", iterations=2000,
                                out="runs/demo"))
    results["test"]       # {"metric": "mse", "mean": ..., "ci95": ..., "tasks": 600}

Every field of :class:`TrainConfig` left ``None`` takes the dataset default
(:data:`DATASET_DEFAULTS`, Finn et al. 2017's MAML settings; see :func:`resolve`).

A run directory holds ``metrics.csv`` (iteration, split, loss, accuracy, ci95, time),
``checkpoint.pt`` (model, optimiser, iteration, RNG states, config and the model's factory;
replaced atomically),
``results.json`` (test metric +/- 95% CI, config, timings, versions) and ``curve.png``.

Exact resumption: batch ``i`` of every task stream is a pure function of ``(seed, split, i)``
(:class:`meta.data.Sinusoid`, :class:`meta.data.Omniglot`), the learners keep no state between
meta-steps, and the checkpoint holds the optimiser state and the RNG states, so a run resumed at
iteration ``k`` (``train(TrainConfig(out=DIR), resume=True)``) reproduces the parameters of an
uninterrupted run bit for bit (same device, dtype and thread count).

Your own model: ``train(config, model=net)`` (an ``nn.Module``, trained in place, or a
factory called as below), or ``TrainConfig(model="package.module:factory")`` /
``meta-train --model package.module:factory``: the factory is called with the keyword
arguments it accepts among ``ways`` (the number of outputs: the classes of a task, 1 for
sinusoid regression) and ``in_channels`` (1: Omniglot's grey images, sinusoid's scalar
input). The checkpoint records the factory (or the class of a given instance), and
``--resume`` rebuilds the model from it. Validation and test run with the model in
``eval()`` mode (dropout off) and training in ``train()`` mode; batch norm uses batch
statistics in both (:mod:`meta.algorithms.base`).
"""

from __future__ import annotations

import csv
import importlib
import inspect
import io
import json
import math
import os
import platform
import random
import signal
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch

import bilevel as bl

__all__ = ["TrainConfig", "ConfigError", "TrainingInterrupted", "DATASET_DEFAULTS", "resolve",
           "train", "parse_estimator", "save_checkpoint", "load_checkpoint", "Progress",
           "load_factory", "factory_spec", "model_kwargs",
           "CHECKPOINT", "METRICS", "RESULTS", "CURVE"]

CHECKPOINT, METRICS, RESULTS, CURVE = "checkpoint.pt", "metrics.csv", "results.json", "curve.png"
CSV_FIELDS = ["iteration", "split", "loss", "accuracy", "ci95", "time"]
OMNIGLOT_DRAWERS = 20
_VAL_SEED_OFFSET, _TEST_SEED_OFFSET = 1_000_000_007, 2_000_000_014  # sinusoid val/test streams
_EVAL_BATCH = {"sinusoid": 100, "omniglot": 32}  # tasks per batch in evaluation
_FORMAT = 1


class ConfigError(ValueError):
    """A bad configuration (the CLI prints the message and exits with status 2)."""


class TrainingInterrupted(KeyboardInterrupt):
    """Raised by :func:`train` after SIGINT: the checkpoint at ``iteration`` has been saved."""

    def __init__(self, iteration: int, out: Path):
        super().__init__(f"interrupted at iteration {iteration}; checkpoint saved in {out}")
        self.iteration, self.out = iteration, out


@dataclass
class TrainConfig:
    """One meta-training run; ``None`` = the dataset's default (see :func:`resolve`)."""

    algorithm: str | None = None      # maml
    dataset: str | None = None        # sinusoid
    data_root: str | None = None      # omniglot: default $OMNIGLOT_ROOT
    download: bool | None = None      # omniglot: fetch the official zips into data_root
    ways: int | None = None
    shots: int | None = None
    queries: int | None = None
    meta_batch: int | None = None
    inner_steps: int | None = None
    inner_lr: float | None = None
    meta_lr: float | None = None
    iterations: int | None = None
    eval_inner_steps: int | None = None
    eval_inner_lr: float | None = None  # None: the learner's (= inner_lr, memoryreduced 0.05)
    val_every: int | None = None      # 0: no periodic validation
    val_tasks: int | None = None
    test_tasks: int | None = None
    hidden: list[int] | None = None   # sinusoid: MLP widths; omniglot: Conv4 channels (one int)
    device: str | None = None         # default cuda when available, else cpu
    dtype: str | None = None          # float32
    seed: int | None = None           # 0
    out: str | None = None            # default runs/<dataset>-<algorithm>-<timestamp>
    checkpoint_every: int | None = None  # 0: only at the end (and on SIGINT)
    log_every: int | None = None      # progress lines when there is no bar
    progress: bool | None = None      # None: a bar when stderr is a TTY, else lines
    threads: int | None = None        # torch.set_num_threads during the run
    vectorize: str | None = None      # "auto" (learner default), "on", "off"
    estimator: str | None = None      # unrolled, truncated:T, checkpointed, implicit:cg:N, ...
    reg: float | None = None          # imaml
    cg_iters: int | None = None       # imaml, memoryreduced
    rho_inner: float | None = None    # sharpmaml
    rho_outer: float | None = None    # sharpmaml
    model: str | None = None          # "package.module:factory"; default MLP / Conv4
    head: str | None = None           # anil, memoryreduced: the head submodule's name
    backbone: str | None = None       # anil, memoryreduced: the backbone submodule's name


DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    # Finn et al. 2017, section 5.1: MLP 40-40, K = 10, 25 tasks, alpha = 0.01, one step, Adam.
    # 10 000 iterations (not 70 000): meta-train with no arguments finishes in about a minute
    # on a CPU (46 s measured on one core of the development machine, test MSE 0.14 after 10
    # steps).
    "sinusoid": dict(shots=10, queries=10, meta_batch=25, inner_steps=1, inner_lr=0.01,
                     meta_lr=1e-3, iterations=10000, val_every=500,
                     val_tasks=100, test_tasks=600, hidden=[40, 40], checkpoint_every=1000,
                     threads=1, vectorize="on"),
    # cbfinn/maml, Omniglot 5-way 1-shot: 32 tasks, alpha = 0.4, one step (10 at test), Adam
    # 1e-3, 40 000 iterations, 64 channels; 15 queries per class.
    "omniglot": dict(ways=5, shots=1, queries=15, meta_batch=32, inner_steps=1, inner_lr=0.4,
                     meta_lr=1e-3, iterations=40000, val_every=500,
                     val_tasks=100, test_tasks=600, hidden=[64], checkpoint_every=500,
                     threads=None, vectorize="auto"),
}

GENERAL_DEFAULTS: dict[str, Any] = dict(algorithm="maml", dataset="sinusoid", download=False,
                                        dtype="float32", seed=0)

# Algorithms whose learner default replaces the dataset's MAML default (a single MAML step is
# no sensible inner loop for them): implicit gradients need a (nearly) converged inner problem,
# Reptile needs several steps to differ from joint training, sign steps have their own scale.
_LEARNER_DEFAULTS = {"imaml": ("inner_steps",), "memoryreduced": ("inner_steps",),
                     "reptile": ("inner_steps",), "signmaml": ("inner_lr", "inner_steps")}
# ... and on Omniglot their inner lr too: 16-20 steps of MAML's 0.4 diverge (measured: iMAML's
# inner loss grew 1.6 -> 2.3 in 16 steps, CG broke down, no meta-learning in 250 iterations).
_LEARNER_LR_ON = {"omniglot": ("imaml", "memoryreduced", "reptile")}
_EXTRAS = ("reg", "cg_iters", "rho_inner", "rho_outer", "head", "backbone")
# Fields a resumed run may change: they do not touch the training trajectory.
RESUME_OVERRIDABLE = {"iterations", "eval_inner_lr", "val_every", "val_tasks", "test_tasks",
                      "checkpoint_every", "log_every", "progress", "out", "data_root",
                      "download", "device"}


# ----------------------------------------------------------------------------- configuration


def _algorithms() -> dict[str, type]:
    from . import ALGORITHMS
    return ALGORITHMS


def _algorithm_key(name: str) -> str:
    key = str(name).lower().replace("-", "").replace("_", "")
    algorithms = _algorithms()
    if key not in algorithms:
        raise ConfigError(f"unknown algorithm {name!r}; choose one of "
                          f"{', '.join(sorted(algorithms))}")
    return key


def _learner_param_defaults(key: str) -> dict[str, Any]:
    params = inspect.signature(_algorithms()[key].__init__).parameters
    return {n: p.default for n, p in params.items() if p.default is not inspect.Parameter.empty}


def parse_estimator(spec: str) -> bl.Estimator:
    """``unrolled``, ``truncated:T``, ``checkpointed[:S]``, ``implicit[:cg[:N]]``,
    ``implicit:neumann[:N]``, ``firstorder``, ``historyfree[:N]``, ``forwardmode`` ->
    the :mod:`bilevel` estimator object."""
    parts = [p.strip() for p in str(spec).lower().split(":")]
    name = parts[0].replace("-", "").replace("_", "")
    args = parts[1:]

    def count(text: str, what: str, minimum: int = 1) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise ConfigError(f"estimator {spec!r}: {what} must be an integer >= {minimum}, "
                              f"got {text!r}")
        return value

    def arity(n: int, form: str) -> None:
        if len(args) > n:
            raise ConfigError(f"estimator {spec!r}: expected {form}")

    if name == "unrolled":
        arity(0, "unrolled")
        return bl.Unrolled()
    if name == "truncated":
        if len(args) != 1:
            raise ConfigError(f"estimator {spec!r}: expected truncated:T (T = steps tracked)")
        return bl.Truncated(count(args[0], "T", 0))
    if name == "checkpointed":
        arity(1, "checkpointed or checkpointed:SEGMENTS")
        return bl.Checkpointed(count(args[0], "SEGMENTS") if args else None)
    if name == "implicit":
        arity(2, "implicit:cg:N or implicit:neumann:N")
        solver = args[0] if args else "cg"
        iters = count(args[1], "N") if len(args) > 1 else 20
        if solver == "cg":
            return bl.Implicit(bl.CG(iters=iters))
        if solver == "neumann":
            return bl.Implicit(bl.Neumann(iters=iters))
        raise ConfigError(f"estimator {spec!r}: linear solver must be cg or neumann")
    if name == "firstorder":
        arity(0, "firstorder")
        return bl.FirstOrder()
    if name == "historyfree":
        arity(1, "historyfree or historyfree:N")
        return bl.HistoryFree(iters=count(args[0], "N")) if args else bl.HistoryFree()
    if name == "forwardmode":
        arity(0, "forwardmode")
        return bl.ForwardMode()
    raise ConfigError(f"unknown estimator {spec!r}; choose one of unrolled, truncated:T, "
                      f"checkpointed, implicit:cg:N, firstorder, historyfree, forwardmode")


def _positive(value: Any, name: str, *, allow_zero: bool = False, integer: bool = True) -> None:
    kind = (int,) if integer else (int, float)
    ok = isinstance(value, kind) and not isinstance(value, bool) and math.isfinite(value) and (
        value >= 0 if allow_zero else value > 0)
    if not ok:
        what = "a non-negative" if allow_zero else "a positive"
        raise ConfigError(f"{name} must be {what} {'integer' if integer else 'number'}, "
                          f"got {value!r}")


def resolve(config: TrainConfig) -> TrainConfig:
    """Fill the ``None`` fields with the defaults and validate; raises :class:`ConfigError`."""
    c = replace(config)
    for name, value in GENERAL_DEFAULTS.items():
        if getattr(c, name) is None:
            setattr(c, name, value)
    if c.dataset not in DATASET_DEFAULTS:
        raise ConfigError(f"unknown dataset {c.dataset!r}; choose one of "
                          f"{', '.join(DATASET_DEFAULTS)}")
    c.algorithm = _algorithm_key(c.algorithm)
    if c.dataset == "sinusoid" and c.ways is not None:
        raise ConfigError("ways applies to --dataset omniglot only (sinusoid is regression)")
    learner_defaults = _learner_param_defaults(c.algorithm)
    for name in _EXTRAS:
        if getattr(c, name) is not None and name not in learner_defaults:
            users = [a for a in sorted(_algorithms()) if name in _learner_param_defaults(a)]
            raise ConfigError(f"{name.replace('_', '-')} applies to --algorithm "
                              f"{' / '.join(users)} only, not {c.algorithm}")
    own = _LEARNER_DEFAULTS.get(c.algorithm, ()) + (
        ("inner_lr",) if c.algorithm in _LEARNER_LR_ON.get(c.dataset, ()) else ())
    for name, value in DATASET_DEFAULTS[c.dataset].items():
        if getattr(c, name) is None:
            if name in own and name in learner_defaults:
                value = learner_defaults[name]
            setattr(c, name, list(value) if isinstance(value, list) else value)
    if c.eval_inner_steps is None:  # the learner's own default (the same rule as the API)
        from .algorithms.base import default_eval_steps

        own = learner_defaults.get("eval_inner_steps")
        c.eval_inner_steps = own if own is not None else default_eval_steps(c.inner_steps)
    for name in ("ways", "shots", "queries", "meta_batch", "iterations", "val_tasks",
                 "test_tasks", "threads"):
        if getattr(c, name) is not None:
            _positive(getattr(c, name), name.replace("_", "-"))
    for name in ("inner_steps", "eval_inner_steps", "val_every", "checkpoint_every"):
        _positive(getattr(c, name), name.replace("_", "-"), allow_zero=True)
    for name in ("inner_lr", "meta_lr"):
        _positive(getattr(c, name), name.replace("_", "-"), integer=False)
    if c.log_every is not None:
        _positive(c.log_every, "log-every")
    if not isinstance(c.seed, int) or isinstance(c.seed, bool) or c.seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {c.seed!r}")
    if c.model is not None:
        if config.hidden is not None:
            raise ConfigError("hidden applies to the built-in models (MLP, Conv4), not to "
                              f"--model {c.model}")
        c.hidden = None
        load_factory(c.model)
    else:
        c.hidden = [int(h) for h in c.hidden]
        if not c.hidden or any(h < 1 for h in c.hidden):
            raise ConfigError(f"hidden sizes must be positive integers, got {c.hidden}")
    if c.dataset == "omniglot":
        if c.hidden is not None and len(c.hidden) != 1:
            raise ConfigError(f"omniglot's Conv4 takes one hidden width (channels), got "
                              f"{','.join(map(str, c.hidden))}")
        if c.shots + c.queries > OMNIGLOT_DRAWERS:
            raise ConfigError(f"shots + queries = {c.shots} + {c.queries} = "
                              f"{c.shots + c.queries} exceeds the {OMNIGLOT_DRAWERS} images "
                              f"per Omniglot class")
        if c.data_root is None:
            c.data_root = os.environ.get("OMNIGLOT_ROOT") or None
    if c.dtype not in ("float32", "float64"):
        raise ConfigError(f"dtype must be float32 or float64, got {c.dtype!r}")
    if c.vectorize not in ("auto", "on", "off"):
        raise ConfigError(f"vectorize must be auto, on or off, got {c.vectorize!r}")
    if c.device is None:
        c.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(c.device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"unknown device {c.device!r} (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {c.device!r} requested but CUDA is not available here "
                          f"(torch {torch.__version__}); use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"device {c.device!r}: this machine has "
                          f"{torch.cuda.device_count()} CUDA device(s)")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {c.device!r}: meta-train runs on cpu or cuda")
    if c.estimator is not None:
        parse_estimator(c.estimator)
    for name in ("reg", "rho_inner", "rho_outer"):
        if getattr(c, name) is not None:
            _positive(getattr(c, name), name.replace("_", "-"), integer=False,
                      allow_zero=name != "reg")
    if c.cg_iters is not None:
        _positive(c.cg_iters, "cg-iters", allow_zero=True)
    return c


def _explicit(config: TrainConfig) -> set[str]:
    """The fields set (not ``None``) in ``config``."""
    return {f.name for f in fields(TrainConfig) if getattr(config, f.name) is not None}


# ----------------------------------------------------------------------------- building blocks


def _datasets(c: TrainConfig):
    from .data import Omniglot, Sinusoid

    dtype = getattr(torch, c.dtype)
    device = torch.device(c.device)
    n_eval = _EVAL_BATCH[c.dataset]
    if c.dataset == "sinusoid":
        def make(seed, meta_batch):
            return Sinusoid(shots=c.shots, queries=c.queries, meta_batch=meta_batch, seed=seed,
                            dtype=dtype, device=device)
        return (make(c.seed, c.meta_batch),
                make(c.seed + _VAL_SEED_OFFSET, min(c.val_tasks, n_eval)),
                make(c.seed + _TEST_SEED_OFFSET, min(c.test_tasks, n_eval)))
    if c.data_root is None:
        raise ConfigError(
            "--dataset omniglot needs the data: pass --data-root DIR (or set OMNIGLOT_ROOT) "
            "where DIR holds images_background.zip and images_evaluation.zip from "
            "https://github.com/brendenlake/omniglot/raw/master/python/ (or "
            "images_background.npz and images_evaluation.npz, in DIR or DIR/npz); "
            "--download fetches the zips into DIR")
    out = []
    for split, meta_batch in (("train", c.meta_batch), ("val", min(c.val_tasks, n_eval)),
                              ("test", min(c.test_tasks, n_eval))):
        try:
            out.append(Omniglot(c.data_root, split=split, ways=c.ways, shots=c.shots,
                                queries=c.queries, meta_batch=meta_batch, seed=c.seed,
                                download=c.download and split == "train", device=device,
                                dtype=dtype))
        except FileNotFoundError as err:
            message = str(err).replace("download=True", "--download")
            if "--download" not in message and not c.download:
                message += " (--download fetches the official zips)"
            raise ConfigError(message) from None
        except ValueError as err:
            raise ConfigError(str(err)) from None
    return tuple(out)


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


def model_kwargs(c: TrainConfig) -> dict[str, int]:
    """What a model factory is told: ``ways`` (outputs) and ``in_channels``."""
    return {"ways": 1 if c.dataset == "sinusoid" else c.ways, "in_channels": 1}


def _call_factory(factory: Callable, c: TrainConfig, what: str) -> torch.nn.Module:
    kwargs = model_kwargs(c)
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = None
    if params is not None and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        kwargs = {k: v for k, v in kwargs.items() if k in params}
    model = factory(**kwargs)
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"{what} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _model(c: TrainConfig, given: torch.nn.Module | Callable | None = None
           ) -> tuple[torch.nn.Module, dict[str, Any]]:
    """(model on the run's device and dtype, its record for the checkpoint)."""
    from .models import MLP, Conv4

    if isinstance(given, torch.nn.Module):
        model = given
        record = {"factory": None, "class": f"{type(given).__module__}."
                                            f"{type(given).__qualname__}"}
    elif given is not None:
        model = _call_factory(given, c, "model factory")
        record = {"factory": factory_spec(given), "class": f"{type(model).__module__}."
                                                           f"{type(model).__qualname__}"}
    elif c.model is not None:
        model = _call_factory(load_factory(c.model), c, f"--model {c.model}")
        record = {"factory": c.model, "class": f"{type(model).__module__}."
                                               f"{type(model).__qualname__}"}
    elif c.dataset == "sinusoid":
        model = MLP(in_features=1, out_features=1, hidden=tuple(c.hidden))
        record = {"factory": None, "class": "meta.models.MLP"}
    else:
        model = Conv4(in_channels=1, out_features=c.ways, hidden=c.hidden[0])
        record = {"factory": None, "class": "meta.models.Conv4"}
    return model.to(device=torch.device(c.device), dtype=getattr(torch, c.dtype)), record


def _learner(c: TrainConfig, model: torch.nn.Module):
    from . import make_learner

    kwargs: dict[str, Any] = dict(
        inner_lr=c.inner_lr, inner_steps=c.inner_steps, eval_inner_steps=c.eval_inner_steps,
        loss="mse" if c.dataset == "sinusoid" else "cross_entropy",
        vectorize={"auto": None, "on": True, "off": False}[c.vectorize])
    if c.eval_inner_lr is not None:
        kwargs["eval_inner_lr"] = c.eval_inner_lr
    if c.estimator is not None:
        kwargs["estimator"] = parse_estimator(c.estimator)
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


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "key": torch.from_numpy(key.astype(np.int64)),
                       "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)},
             "python": _to_lists(random.getstate())}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _to_lists(x):
    return [_to_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuples(x):
    return tuple(_to_tuples(v) for v in x) if isinstance(x, (tuple, list)) else x


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["key"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["gauss"]))
    random.setstate(_to_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_write(path: Path, write, binary: bool = True) -> None:
    """Write through a temporary file in the same directory, fsync, then ``os.replace``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the usual permissions
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"newline": ""})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_checkpoint(path: str | os.PathLike, *, model, optimizer, iteration: int,
                    config: TrainConfig, elapsed: float, extra: dict | None = None) -> None:
    """Atomically write model, optimiser, iteration, RNG states and config to ``path``."""
    state = {"format": _FORMAT, "iteration": int(iteration), "model": model.state_dict(),
             "optimizer": optimizer.state_dict(), "rng": _rng_state(), "config": asdict(config),
             "elapsed": float(elapsed), "torch_version": str(torch.__version__), **(extra or {})}
    _atomic_write(Path(path), lambda f: torch.save(state, f))


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` (tensors and plain Python only)."""
    return torch.load(path, map_location=map_location, weights_only=True)


# ----------------------------------------------------------------------------- progress


def _clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
    return f"{s // 60}:{s % 60:02d}"


class Progress:
    """A one-line progress bar on ``stream`` (a TTY), or a plain line every ``every``
    iterations: iteration, running loss and accuracy (mean of the last ``window``), it/s, ETA.
    """

    def __init__(self, total: int, initial: int = 0, *, bar: bool | None = None,
                 every: int = 100, stream: TextIO | None = None, window: int = 100,
                 loss_name: str = "loss"):
        self.stream = sys.stderr if stream is None else stream
        if bar is None:
            bar = bool(getattr(self.stream, "isatty", lambda: False)())
        self.bar, self.every, self.total, self.initial = bar, max(1, every), total, initial
        self.loss_name = loss_name
        self.losses: deque[float] = deque(maxlen=window)
        self.accs: deque[float] = deque(maxlen=window)
        self.t0 = time.perf_counter()
        self._last_draw = 0.0
        self._drawn = False

    def rate(self, iteration: int) -> float:
        dt = time.perf_counter() - self.t0
        return (iteration - self.initial) / dt if dt > 0 else math.nan

    def _status(self, iteration: int) -> str:
        loss = sum(self.losses) / len(self.losses) if self.losses else math.nan
        accs = [a for a in self.accs if math.isfinite(a)]
        rate = self.rate(iteration)
        eta = (self.total - iteration) / rate if rate > 0 else math.nan
        text = f"{iteration}/{self.total} | {self.loss_name} {loss:.4f}"
        if accs:
            text += f" | acc {sum(accs) / len(accs):.3f}"
        return text + f" | {rate:.1f} it/s | eta {_clock(eta)}"

    def extend(self, history: list[tuple[float, float]]) -> None:
        """Prefill the running window with earlier (loss, accuracy) pairs (a resumed run)."""
        for loss, acc in history[-(self.losses.maxlen or len(history)):]:
            self.losses.append(loss)
            self.accs.append(acc)

    def update(self, iteration: int, loss: float, accuracy: float) -> None:
        self.losses.append(loss)
        self.accs.append(accuracy)
        if self.bar:
            now = time.perf_counter()
            if now - self._last_draw >= 0.1 or iteration == self.total:
                self._last_draw = now
                frac = iteration / self.total if self.total else 1.0
                filled = int(24 * frac)
                bar = "#" * filled + "-" * (24 - filled)
                self.stream.write(f"\r[{bar}] {100 * frac:3.0f}% {self._status(iteration)}\033[K")
                self.stream.flush()
                self._drawn = True
        elif iteration % self.every == 0 or iteration == self.total:
            self.stream.write(f"iter {self._status(iteration)}\n")
            self.stream.flush()

    def write(self, message: str) -> None:
        if self.bar and self._drawn:
            self.stream.write("\r\033[K")
        self.stream.write(message + "\n")
        self.stream.flush()
        self._last_draw = 0.0  # redraw the bar at the next update

    def close(self) -> None:
        if self.bar and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False


# ----------------------------------------------------------------------------- metrics file


def _fmt(v: float | None) -> str:
    return "" if v is None or not math.isfinite(v) else repr(float(v))


def _parse(v: str) -> float:
    return float(v) if v not in ("", None) else math.nan


def _read_metrics(path: Path, upto: int) -> list[dict[str, Any]]:
    """Rows of an existing metrics.csv for iterations <= ``upto`` (train and val only)."""
    if not path.is_file():
        return []
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            if r.get("split") in ("train", "val") and int(r["iteration"]) <= upto:
                rows.append({"iteration": int(r["iteration"]), "split": r["split"],
                             "loss": _parse(r["loss"]), "accuracy": _parse(r["accuracy"]),
                             "ci95": _parse(r.get("ci95", "")), "time": _parse(r["time"])})
    return rows


class _Metrics:
    def __init__(self, path: Path, rows: list[dict[str, Any]]):
        self.path, self.rows = path, list(rows)
        buf = io.StringIO(newline="")
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(CSV_FIELDS)
        for r in self.rows:
            w.writerow(self._cells(r))
        _atomic_write(path, lambda f: f.write(buf.getvalue()), binary=False)
        self.file = open(path, "a", newline="")
        self.writer = csv.writer(self.file, lineterminator="\n")

    @staticmethod
    def _cells(r):
        return [r["iteration"], r["split"], _fmt(r["loss"]), _fmt(r["accuracy"]),
                _fmt(r["ci95"]), f"{r['time']:.3f}"]

    def add(self, iteration: int, split: str, loss: float, accuracy: float, ci95: float,
            elapsed: float) -> None:
        row = {"iteration": iteration, "split": split, "loss": loss, "accuracy": accuracy,
               "ci95": ci95, "time": elapsed}
        self.rows.append(row)
        self.writer.writerow(self._cells(row))

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:
        self.file.close()

    def series(self, split: str, key: str) -> list[tuple[float, float]]:
        return [(r["iteration"], r[key]) for r in self.rows if r["split"] == split]


# ----------------------------------------------------------------------------- the run


def _default_out(c: TrainConfig) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path("runs") / f"{c.dataset}-{c.algorithm}-{stamp}"
    out, k = base, 1
    while out.exists():
        k += 1
        out = base.with_name(f"{base.name}-{k}")
    return out


def _merge_resume(config: TrainConfig, out: Path) -> tuple[TrainConfig, dict]:
    path = out / CHECKPOINT
    if not path.is_file():
        raise ConfigError(f"nothing to resume: {path} does not exist")
    try:
        ckpt = load_checkpoint(path)
    except Exception as err:  # a foreign or corrupt file
        raise ConfigError(f"cannot read the checkpoint {path}: {err}") from None
    known = {f.name for f in fields(TrainConfig)}
    saved = TrainConfig(**{k: v for k, v in ckpt["config"].items() if k in known})
    given = {n for n in _explicit(config) if n not in ("out",)}
    changes = {}
    for name in sorted(given):
        new, old = getattr(config, name), getattr(saved, name)
        if name == "algorithm":
            new = _algorithm_key(new)
        if new == old:
            continue
        if name not in RESUME_OVERRIDABLE:
            raise ConfigError(f"--resume: {name.replace('_', '-')} {new!r} differs from the "
                              f"run's {old!r}; only {', '.join(sorted(RESUME_OVERRIDABLE))} may "
                              f"change when resuming")
        changes[name] = new
    merged = replace(saved, **changes, out=str(out))
    return merged, ckpt


def train(config: TrainConfig, *, resume: bool = False, stream: TextIO | None = None,
          model: torch.nn.Module | Callable[..., torch.nn.Module] | None = None
          ) -> dict[str, Any]:
    """Meta-train, validate, test; write the run directory; return the results dict.

    ``model``: your own ``nn.Module`` (trained in place; moved to the run's device and dtype)
    or a factory called with ``ways`` / ``in_channels`` (those it accepts; see the module
    docstring); default ``config.model`` or the built-in MLP (sinusoid) / Conv4 (Omniglot).
    A run trained with a model instance is resumed by passing the model again; one trained
    with an importable factory is rebuilt from the factory the checkpoint records.

    ``resume=True`` continues the run in ``config.out`` from its checkpoint (fields set in
    ``config`` must match the saved ones except :data:`RESUME_OVERRIDABLE`). Setup problems
    (bad values, missing data) raise :class:`ConfigError` before anything is written; SIGINT
    (Ctrl-C) stops after the current iteration, saves the checkpoint and raises
    :class:`TrainingInterrupted`.
    """
    stream = sys.stderr if stream is None else stream
    ckpt = None
    if resume:
        if config.out is None:
            raise ConfigError("--resume needs --out DIR (the run directory to continue)")
        config, ckpt = _merge_resume(config, Path(config.out))
        saved = ckpt.get("model_record") or {}
        if model is None and config.model is None and saved.get("factory"):
            model = load_factory(saved["factory"])  # a factory given as model=...
        elif model is None and config.model is None and saved.get("class") and \
                not str(saved["class"]).startswith("meta.models."):
            raise ConfigError(f"the run in {config.out} was trained with a model instance "
                              f"({saved['class']}) that the checkpoint cannot rebuild: pass "
                              f"model=... again to resume it")
    if model is not None and config.model is not None:
        raise ConfigError(f"give either model=... or config.model ({config.model!r}), not "
                          f"both")
    if model is not None and not isinstance(model, torch.nn.Module) and not callable(model):
        raise ConfigError(f"model must be an nn.Module or a factory returning one, got "
                          f"{type(model).__name__}")
    if model is not None and config.hidden is not None:
        raise ConfigError("hidden applies to the built-in models (MLP, Conv4), not to model=")
    c = resolve(config)
    if model is not None:
        c.hidden = None
    out = Path(c.out) if c.out is not None else _default_out(c)
    if not resume and (out / CHECKPOINT).exists():
        raise ConfigError(f"{out} already holds a run ({CHECKPOINT}); pass --resume to "
                          f"continue it, or choose another --out")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a directory")
    start = int(ckpt["iteration"]) if ckpt is not None else 0
    if start > c.iterations:
        raise ConfigError(f"the checkpoint in {out} is at iteration {start}, past "
                          f"--iterations {c.iterations}")
    old_threads = torch.get_num_threads()
    try:
        if c.threads is not None:
            torch.set_num_threads(c.threads)
        train_data, val_data, test_data = _datasets(c)
        _seed_everything(c.seed)
        model, record = _model(c, model)
        learner = _learner(c, model)
        optimizer = torch.optim.Adam(model.parameters(), lr=c.meta_lr)
        if ckpt is not None:
            try:
                model.load_state_dict(ckpt["model"])
                optimizer.load_state_dict(ckpt["optimizer"])
            except (RuntimeError, ValueError, KeyError) as err:
                raise ConfigError(f"the checkpoint in {out} does not fit this model: "
                                  f"{err}") from None
            _set_rng_state(ckpt["rng"])
        out.mkdir(parents=True, exist_ok=True)
        c.out = str(out)
        run = _Run(c, out, model, learner, optimizer, (train_data, val_data, test_data),
                   start, ckpt, stream)
        run.model_record = record
        return run.run()
    finally:
        torch.set_num_threads(old_threads)


def _steps(n: int) -> str:
    return f"{n} step" if n == 1 else f"{n} steps"


class _Run:
    def __init__(self, c, out, model, learner, optimizer, data, start, ckpt, stream):
        self.c, self.out, self.model, self.learner = c, out, model, learner
        self.optimizer = optimizer
        self.train_data, self.val_data, self.test_data = data
        self.start, self.stream = start, stream
        self.elapsed0 = float(ckpt["elapsed"]) if ckpt is not None else 0.0
        self.segments = list(ckpt.get("segments", [])) if ckpt is not None else []
        self.regression = c.dataset == "sinusoid"
        self.stop_requested = False

    def now(self) -> float:
        return self.elapsed0 + (time.perf_counter() - self.t0)

    def evaluate(self, data, num_tasks: int) -> tuple[float, float]:
        """``learner.evaluate`` with the model in eval mode (dropout off), mode restored."""
        was = self.model.training
        self.model.eval()
        try:
            return self.learner.evaluate(data.batches(0), num_tasks=num_tasks)
        finally:
            self.model.train(was)

    def validate(self, iteration: int) -> None:
        mean, ci = self.evaluate(self.val_data, self.c.val_tasks)
        loss, acc = (mean, math.nan) if self.regression else (math.nan, mean)
        self.metrics.add(iteration, "val", loss, acc, ci, self.now())
        what = "mse" if self.regression else "accuracy"
        self.progress.write(f"val @ {iteration}: {what} {mean:.4f} +/- {ci:.4f} "
                            f"({self.c.val_tasks} tasks)")

    def checkpoint(self, iteration: int) -> None:
        self.metrics.flush()
        save_checkpoint(self.out / CHECKPOINT, model=self.model, optimizer=self.optimizer,
                        iteration=iteration, config=self.c, elapsed=self.now(),
                        extra={"segments": self._segments(iteration),
                               "model_record": self.model_record})

    def _segments(self, iteration: int) -> list[list[int]]:
        """The [first, last] iterations run by each process (resumes start new ones)."""
        return self.segments + ([[self.start, iteration]] if iteration > self.start else [])

    def _on_sigint(self, signum, frame) -> None:
        if self.stop_requested:
            raise KeyboardInterrupt
        self.stop_requested = True
        self.progress.write("stopping after this iteration (Ctrl-C again to abort without "
                            "saving)")

    def run(self) -> dict[str, Any]:
        c = self.c
        self.t0 = time.perf_counter()
        self.metrics = _Metrics(self.out / METRICS, _read_metrics(self.out / METRICS,
                                                                  self.start))
        every = c.log_every or max(1, c.iterations // 20)
        self.progress = Progress(c.iterations, self.start,
                                 bar=False if c.progress is False else None, every=every,
                                 stream=self.stream,
                                 loss_name="mse" if self.regression else "loss")
        # a resumed run continues the running train loss/accuracy of the last iterations
        self.progress.extend([(r["loss"], r["accuracy"]) for r in self.metrics.rows
                              if r["split"] == "train"])
        self.progress.write(self.describe())
        handler = None
        if threading.current_thread() is threading.main_thread():
            handler = signal.signal(signal.SIGINT, self._on_sigint)
        try:
            if self.start == 0 and c.val_every:
                self.validate(0)
            iteration = self.start
            for iteration in range(self.start + 1, c.iterations + 1):
                self.optimizer.zero_grad(set_to_none=True)
                m = self.learner.meta_step(self.train_data.batch(iteration - 1))
                self.optimizer.step()
                loss, acc = float(m["loss"]), float(m.get("accuracy", math.nan))
                self.metrics.add(iteration, "train", loss, acc, math.nan, self.now())
                self.progress.update(iteration, loss, acc)
                if not math.isfinite(loss):
                    self.progress.close()
                    raise FloatingPointError(f"the meta-training loss is {loss} at iteration "
                                             f"{iteration}; lower --meta-lr / --inner-lr")
                if c.val_every and iteration % c.val_every == 0:
                    self.validate(iteration)
                if (c.checkpoint_every and iteration % c.checkpoint_every == 0) \
                        or iteration == c.iterations or self.stop_requested:
                    self.checkpoint(iteration)
                if self.stop_requested and iteration < c.iterations:
                    self.progress.close()
                    self.write_curve()
                    raise TrainingInterrupted(iteration, self.out)
            if self.start == c.iterations:
                self.progress.write(f"the run in {self.out} is complete at iteration "
                                    f"{self.start}; evaluating it again")
            self.progress.close()
            train_time = self.now()
            results = self.test(train_time)
        finally:
            if handler is not None:
                signal.signal(signal.SIGINT, handler)
            self.metrics.close()
        return results

    def describe(self) -> str:
        c = self.c
        task = (f"{c.shots}-shot sinusoid regression" if self.regression
                else f"Omniglot {c.ways}-way {c.shots}-shot, {c.queries} queries")
        if c.hidden is None:
            n = sum(p.numel() for p in self.model.parameters())
            model = (f"{self.model_record.get('factory') or self.model_record['class']} "
                     f"({type(self.model).__name__}, {n} parameters)")
        else:
            model = (f"MLP {'-'.join(map(str, c.hidden))}" if self.regression
                     else f"Conv4 {c.hidden[0]}")
        head = f"resuming at iteration {self.start}: " if self.start else ""
        return (f"{head}{c.algorithm} on {task}, meta-batch {c.meta_batch}, {model}, "
                f"inner lr {c.inner_lr} x {c.inner_steps} (test {self.learner.eval_inner_lr} x "
                f"{c.eval_inner_steps}), "
                f"{self._estimator()}, Adam {c.meta_lr}, {c.iterations} iterations, "
                f"{c.device} {c.dtype} -> {self.out}")

    def _estimator(self) -> str:
        est = getattr(self.learner, "estimator", None)
        return "no estimator (not a hypergradient)" if est is None else repr(est)

    def write_curve(self) -> str | None:
        from .plot import save_curve

        loss_key = "mse" if self.regression else "loss"
        try:
            return save_curve(
                self.out / CURVE, self.metrics.series("train", "loss"),
                self.metrics.series("val", "loss"), self.metrics.series("train", "accuracy"),
                self.metrics.series("val", "accuracy"), loss_label=f"query {loss_key}",
                train_label=f"train ({_steps(self.c.inner_steps)})",
                val_label=f"val ({_steps(self.c.eval_inner_steps)})",
                title=f"{self.c.algorithm} on {self.c.dataset}")
        except Exception as err:  # a plotting problem must not lose the results
            self.progress.write(f"warning: could not draw {CURVE}: {err}")
            return None

    def test(self, train_time: float) -> dict[str, Any]:
        c = self.c
        t = time.perf_counter()
        mean, ci = self.evaluate(self.test_data, c.test_tasks)
        test_time = time.perf_counter() - t
        loss, acc = (mean, math.nan) if self.regression else (math.nan, mean)
        self.metrics.add(c.iterations, "test", loss, acc, ci, self.now())
        self.metrics.flush()
        backend = self.write_curve()
        vals = [r for r in self.metrics.rows if r["split"] == "val"]
        results = {
            "algorithm": c.algorithm, "dataset": c.dataset,
            "test": {"metric": "mse" if self.regression else "accuracy", "mean": mean,
                     "ci95": ci, "tasks": c.test_tasks, "inner_steps": c.eval_inner_steps,
                     "inner_lr": self.learner.eval_inner_lr},
            "final_val": ({"iteration": vals[-1]["iteration"],
                           "mean": vals[-1]["loss" if self.regression else "accuracy"],
                           "ci95": vals[-1]["ci95"]} if vals else None),
            "iterations": c.iterations,
            "train_time_s": round(train_time, 3), "test_time_s": round(test_time, 3),
            "segments": self._segments(c.iterations),
            "estimator": self._estimator(), "model": self.model_record, "device": c.device,
            "device_name": (torch.cuda.get_device_name(torch.device(c.device))
                            if c.device.startswith("cuda") else platform.processor() or
                            platform.machine()),
            "dtype": c.dtype, "threads": torch.get_num_threads(),
            "torch_version": str(torch.__version__), "python_version": platform.python_version(),
            "curve_backend": backend, "finished": datetime.now().isoformat(timespec="seconds"),
            "args": asdict(c),
            "files": {"metrics": METRICS, "checkpoint": CHECKPOINT, "curve": CURVE},
        }
        _atomic_write(self.out / RESULTS,
                      lambda f: f.write(json.dumps(results, indent=2, default=str) + "\n"),
                      binary=False)
        return results
