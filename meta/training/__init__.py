"""``meta-train``'s machinery, one concern per module:

- :mod:`~meta.training.config`: :class:`TrainConfig`, dataset defaults, :func:`resolve`,
  :func:`parse_estimator`;
- :mod:`~meta.training.build`: task streams (:func:`meta.data.open_dataset`), model presets and
  factories, the learner;
- :mod:`~meta.training.checkpoints`: atomic checkpoints, RNG states, ``--resume`` merging;
- :mod:`~meta.training.logging`: tqdm progress, ``metrics.csv``, TensorBoard;
- :mod:`~meta.training.distributed`: process group, ``--nproc`` launcher, sharded evaluation;
- :mod:`~meta.training.loop`: :func:`train` and the run.

:mod:`meta.train` re-exports the public names (``from meta.train import TrainConfig, train``).
"""

from .build import data_shape, factory_spec, load_factory, model_kwargs
from .checkpoints import CHECKPOINT, load_checkpoint, save_checkpoint
from .config import (
    DATASET_DEFAULTS,
    MODEL_PRESETS,
    RESUME_OVERRIDABLE,
    ConfigError,
    TrainConfig,
    TrainingInterrupted,
    parse_estimator,
    resolve,
)
from .logging import CSV_FIELDS, METRICS, Progress
from .loop import CURVE, RESULTS, train

__all__ = ["TrainConfig", "ConfigError", "TrainingInterrupted", "DATASET_DEFAULTS",
           "MODEL_PRESETS", "RESUME_OVERRIDABLE", "resolve", "train", "parse_estimator",
           "save_checkpoint", "load_checkpoint", "Progress", "load_factory", "factory_spec",
           "model_kwargs", "data_shape", "CHECKPOINT", "METRICS", "RESULTS", "CURVE",
           "CSV_FIELDS"]
