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

Datasets: ``sinusoid``, ``omniglot``, ``miniimagenet``, ``tieredimagenet``, ``cifarfs``,
``fc100`` (read by :func:`meta.data.open_dataset` from ``data_root``); models: the presets
``mlp``, ``conv4``, ``maml_conv4``, ``resnet12`` (``TrainConfig(model=...)``) or your own.
Several processes: ``torchrun --nproc_per_node N $(which meta-train) ...`` or ``meta-train
--nproc N`` (:mod:`meta.training.distributed`).

The code lives in :mod:`meta.training` (config, build, checkpoints, logging, distributed,
loop); this module re-exports its public names.

Exact resumption: batch ``i`` of every task stream is a pure function of ``(seed, split, i)``
(:class:`meta.data.Sinusoid`, :class:`meta.data.Omniglot`, the image streams), the learners
keep no state between meta-steps, and the checkpoint holds the optimiser state and the RNG
states, so a run resumed at iteration ``k`` (``train(TrainConfig(out=DIR), resume=True)``)
reproduces the parameters of an uninterrupted run bit for bit (same device, dtype, thread count
and number of processes).

Your own model: ``train(config, model=net)`` (an ``nn.Module``, trained in place, or a
factory called as below), or ``TrainConfig(model="package.module:factory")`` /
``meta-train --model package.module:factory``: the factory is called with the keyword
arguments it accepts among ``ways`` (the number of outputs: the classes of a task, 1 for
sinusoid regression) and ``in_channels`` (1: Omniglot's grey images, sinusoid's scalar
input; 3 for the RGB datasets), and ``image_size`` (28, 84 or 32) when its signature names it.
The checkpoint records the factory (or the class of a given instance), and
``--resume`` rebuilds the model from it. Validation and test run with the model in
``eval()`` mode (dropout off) and training in ``train()`` mode; batch norm uses batch
statistics in both (:mod:`meta.algorithms.base`).
"""

from __future__ import annotations

from .training import *  # noqa: F403
from .training import __all__  # noqa: F401
from .training.config import GENERAL_DEFAULTS, IMAGE_DATASETS  # noqa: F401
from .training.logging import CSV_FIELDS  # noqa: F401
