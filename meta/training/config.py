"""The configuration of a ``meta-train`` run: :class:`TrainConfig`, the per-dataset defaults
(:data:`DATASET_DEFAULTS`), :func:`resolve` (defaults + validation) and :func:`parse_estimator`.

Every field of :class:`TrainConfig` left ``None`` takes the dataset default, then the general
one (:data:`GENERAL_DEFAULTS`); :func:`resolve` raises :class:`ConfigError` on a bad value before
anything is read or written.
"""

from __future__ import annotations

import inspect
import math
import os
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch

import bilevel as bl

__all__ = ["TrainConfig", "ConfigError", "TrainingInterrupted", "DATASET_DEFAULTS",
           "GENERAL_DEFAULTS", "IMAGE_DATASETS", "MODEL_PRESETS", "RESUME_OVERRIDABLE",
           "resolve", "parse_estimator", "model_preset"]

OMNIGLOT_DRAWERS = 20
#: the few-shot image datasets read through :func:`meta.data.open_dataset` (besides Omniglot)
IMAGE_DATASETS = ("miniimagenet", "tieredimagenet", "cifarfs", "fc100")
#: ``--model NAME``: the standard models (``package.module:factory`` gives your own)
MODEL_PRESETS = {
    "mlp": "meta.models.MLP (sinusoid regression; --hidden widths)",
    "conv4": "meta.models.Conv4 (spatial-mean head; --hidden channels)",
    "maml_conv4": "meta.backbones.maml_conv4 (MAML's Mini-ImageNet Conv4: max-pool, "
                  "flattened features; --hidden channels)",
    "resnet12": "meta.backbones.ResNet12 (MetaOptNet's 64-160-320-640)",
}
_PRESET_ALIASES = {"conv4_maml": "maml_conv4", "mamlconv4": "maml_conv4", "resnet_12": "resnet12"}


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
    dataset: str | None = None        # sinusoid, omniglot, miniimagenet, tieredimagenet, ...
    data_root: str | None = None      # the dataset's folder (omniglot: default $OMNIGLOT_ROOT)
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
    model: str | None = None          # a preset (MODEL_PRESETS) or "package.module:factory"
    head: str | None = None           # anil, memoryreduced: the head submodule's name
    backbone: str | None = None       # anil, memoryreduced: the backbone submodule's name
    tensorboard: bool | None = None   # also log to out/tensorboard (needs the tensorboard package)
    compile: bool | None = None       # torch.compile the per-task hypergradient (learner compile=)
    dist_timeout: float | None = None  # seconds a rank waits in a collective (several processes)


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
    # Finn et al. 2017 on Mini-ImageNet (cbfinn/maml main.py): 5-way, 15 queries, 4 tasks (1-shot;
    # 2 for 5-shot), alpha = 0.01, 5 steps (10 at test), Adam 1e-3, 60 000 iterations, Conv4 with
    # 32 filters, max-pool, 84x84. tieredImageNet: the same protocol, as the MAML-family papers
    # that report it use.
    "miniimagenet": dict(ways=5, shots=1, queries=15, meta_batch=4, inner_steps=5,
                         inner_lr=0.01, meta_lr=1e-3, iterations=60000, val_every=1000,
                         val_tasks=100, test_tasks=600, hidden=[32], checkpoint_every=1000,
                         threads=None, vectorize="auto"),
    # CIFAR-FS / FC100 (32x32): the same protocol with 64 filters (MetaOptNet's Conv4 width).
    "cifarfs": dict(ways=5, shots=1, queries=15, meta_batch=4, inner_steps=5, inner_lr=0.01,
                    meta_lr=1e-3, iterations=60000, val_every=1000, val_tasks=100,
                    test_tasks=600, hidden=[64], checkpoint_every=1000, threads=None,
                    vectorize="auto"),
}
DATASET_DEFAULTS["tieredimagenet"] = dict(DATASET_DEFAULTS["miniimagenet"])
DATASET_DEFAULTS["fc100"] = dict(DATASET_DEFAULTS["cifarfs"])
DATASET_DEFAULTS = {k: DATASET_DEFAULTS[k] for k in ("sinusoid", "omniglot", "miniimagenet",
                                                     "tieredimagenet", "cifarfs", "fc100")}

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
                      "download", "device", "tensorboard", "dist_timeout", "compile"}


# ----------------------------------------------------------------------------- configuration


def _algorithms() -> dict[str, type]:
    from .. import ALGORITHMS
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
    c.dataset = _dataset_key(c.dataset)
    c.algorithm = _algorithm_key(c.algorithm)
    if c.dataset == "sinusoid" and c.ways is not None:
        raise ConfigError("ways applies to the classification datasets only (sinusoid is "
                          "regression)")
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
        from ..algorithms.base import default_eval_steps

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
    preset = model_preset(c.model) if c.model is not None else None
    if preset is not None:
        c.model = preset
        if preset == "mlp" and c.dataset != "sinusoid" or \
                preset != "mlp" and c.dataset == "sinusoid":
            raise ConfigError(f"--model {preset} does not fit --dataset {c.dataset} (mlp is "
                              f"for sinusoid; conv4, maml_conv4, resnet12 for images)")
        if preset == "resnet12":
            if config.hidden is not None:
                raise ConfigError("hidden does not apply to --model resnet12 (64-160-320-640)")
            c.hidden = None
    if c.model is not None and preset is None:
        if config.hidden is not None:
            raise ConfigError("hidden applies to the built-in models (mlp, conv4, maml_conv4), "
                              f"not to --model {c.model}")
        c.hidden = None
        from .build import load_factory

        load_factory(c.model)
    elif c.hidden is not None:
        c.hidden = [int(h) for h in c.hidden]
        if not c.hidden or any(h < 1 for h in c.hidden):
            raise ConfigError(f"hidden sizes must be positive integers, got {c.hidden}")
    if c.dataset != "sinusoid" and c.hidden is not None and len(c.hidden) != 1:
        raise ConfigError(f"{c.dataset}'s Conv4 takes one hidden width (channels), got "
                          f"{','.join(map(str, c.hidden))}")
    if c.dataset == "omniglot":
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
    if c.dist_timeout is not None:
        _positive(c.dist_timeout, "dist-timeout", integer=False)
    return c


def _dataset_key(name: Any) -> str:
    key = str(name).lower().replace("-", "").replace("_", "")
    if key not in DATASET_DEFAULTS:
        raise ConfigError(f"unknown dataset {name!r}; choose one of "
                          f"{', '.join(DATASET_DEFAULTS)}")
    return key


def model_preset(spec: str) -> str | None:
    """The canonical preset name of ``spec`` (``None`` for ``package.module:factory``);
    raises :class:`ConfigError` for a name that is neither."""
    if ":" in str(spec):
        return None
    key = str(spec).lower().replace("-", "_")
    key = _PRESET_ALIASES.get(key, key)
    if key not in MODEL_PRESETS:
        raise ConfigError(f"--model {spec!r}: expected one of {', '.join(MODEL_PRESETS)} or "
                          f"package.module:factory (e.g. mypkg.nets:make_net)")
    return key


def _explicit(config: TrainConfig) -> set[str]:
    """The fields set (not ``None``) in ``config``."""
    return {f.name for f in fields(TrainConfig) if getattr(config, f.name) is not None}

