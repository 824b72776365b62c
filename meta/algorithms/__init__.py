"""The MAML family on :mod:`bilevel`: one module per algorithm, shared API in :mod:`.base`.

``ALGORITHMS`` maps the CLI names to the classes; ``make_learner(name, model, **kwargs)``
builds one. What ``meta_step`` adds to ``.grad`` (B tasks, φ_K^i the adapted parameters):

==============  ==========================================  ==================================
name            .grad (mean over the B tasks)               problem / solver / estimator
==============  ==========================================  ==================================
maml            d L^q(φ_K(θ)) / dθ, exact, second order     GD on all params, Unrolled
fomaml          ∇L^q(φ_K) at the adapted params             GD, FirstOrder
anil            d L^q(θ_body, w_K(θ)) / d(θ_body, θ_head)   GD on the head only, Unrolled
reptile         θ − φ_K (not a gradient)                    bl.solve, GD
imaml           (I + H/λ)⁻¹ ∇L^q(φ_K), N CG steps          proximal GD, Implicit(CG)
imaml official  ((1+c)I + H/(λ+10))⁻¹ ∇L^q(φ_pull-back)     PullBackGD, Implicit(CG)
signmaml        ∇L^q(φ_K) = exact a.e. gradient             SignGD, FirstOrder
sharpmaml       MAML gradient at θ + ρ_out·g/‖g‖            SAM(GD), Unrolled (+ upper SAM)
memoryreduced   backbone only: ∇_x f − ∇²_xy g·CG_N(...)   GD on the fixed-init head,
                (head parameters get no .grad)              HistoryFree(N)
==============  ==========================================  ==================================

Every learner except Reptile takes ``estimator=`` to replace its default.
"""

from __future__ import annotations

from torch import nn

from .anil import ANIL
from .base import MetaLearner
from .imaml import IMAML, PullBackGD
from .maml import FOMAML, MAML
from .memory_reduced import MemoryReducedMAML
from .reptile import Reptile
from .sharp_maml import SharpMAML
from .sign_maml import SignMAML

ALGORITHMS: dict[str, type[MetaLearner]] = {
    "maml": MAML,
    "fomaml": FOMAML,
    "anil": ANIL,
    "reptile": Reptile,
    "imaml": IMAML,
    "signmaml": SignMAML,
    "sharpmaml": SharpMAML,
    "memoryreduced": MemoryReducedMAML,
}


def make_learner(name: str, model: nn.Module, **kwargs) -> MetaLearner:
    """``ALGORITHMS[name](model, **kwargs)`` (name case-insensitive, '-'/'_' ignored)."""
    key = name.lower().replace("-", "").replace("_", "")
    if key not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}; choose one of {sorted(ALGORITHMS)}")
    return ALGORITHMS[key](model, **kwargs)


__all__ = ["ALGORITHMS", "ANIL", "FOMAML", "IMAML", "MAML", "MemoryReducedMAML", "MetaLearner",
           "PullBackGD", "Reptile", "SharpMAML", "SignMAML", "make_learner"]
