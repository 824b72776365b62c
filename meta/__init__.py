"""meta: the MAML family on top of bilevel.

Models (:mod:`meta.models`): ``Conv4``, ``MLP``, ``BatchNorm`` (batch statistics, vmap-exact),
``params_of``, ``split_params``; few-shot backbones (:mod:`meta.backbones`): ``maml_conv4``
(MAML's Mini-ImageNet Conv4-32), ``ResNet12`` (MetaOptNet). Several processes:
:mod:`meta.distributed` (torch.distributed, no DDP). Learners (:mod:`meta.algorithms`):
``MAML``, ``FOMAML``, ``ANIL``, ``Reptile``, ``IMAML``, ``SignMAML``, ``SharpMAML``,
``MemoryReducedMAML``; the registry ``ALGORITHMS`` and ``make_learner(name, model,
**kwargs)``. Data: ``TaskBatch``.
"""

from . import backbones, data, distributed, models
from .algorithms import (
    ALGORITHMS,
    ANIL,
    FOMAML,
    IMAML,
    MAML,
    MemoryReducedMAML,
    MetaLearner,
    Reptile,
    SharpMAML,
    SignMAML,
    make_learner,
)
from .backbones import ResNet12, maml_conv4
from .models import MLP, BatchNorm, Conv4, params_of, split_params
from .tasks import TaskBatch

__all__ = [
    "TaskBatch", "Conv4", "MLP", "BatchNorm", "params_of", "split_params", "MetaLearner",
    "MAML", "FOMAML", "ANIL", "Reptile", "IMAML", "SignMAML", "SharpMAML", "MemoryReducedMAML",
    "ALGORITHMS", "make_learner", "data", "models", "backbones", "distributed", "ResNet12",
    "maml_conv4",
]
