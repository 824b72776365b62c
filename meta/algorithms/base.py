"""The shared machinery of the MAML-family learners (:class:`MetaLearner`).

A learner turns a :class:`meta.TaskBatch` into one :class:`bilevel.BilevelProblem` per task and
calls :func:`bilevel.hypergrad` on it (in a Python loop, or under ``torch.func.vmap``); it never
differentiates anything itself. The meta-gradient, averaged over the tasks of the batch, is
ADDED to the model parameters' ``.grad`` (like ``loss.backward()``), so any ``torch.optim``
optimiser performs the outer step::

    learner = meta.MAML(model, inner_lr=0.4, inner_steps=1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for batch in tasks:
        opt.zero_grad()
        out = learner.meta_step(batch)      # {"loss": query loss, "accuracy": query accuracy}
        opt.step()

Conventions shared by every learner (the policies for a user's own ``nn.Module``)
-------------------------------------------------------------------------------------
- Functional parameters: the model's parameters are read (detached) at every call, the inner
  loop runs on dicts ``{name: tensor}`` through ``torch.func.functional_call``
  (:class:`~meta.algorithms.functional_model.FunctionalModel`); a learner never changes the
  model: no parameter, buffer or train/eval mode is written, in training or in
  :meth:`MetaLearner.evaluate` (tested on ``state_dict()`` before/after).
- Batch norm: transductive batch statistics EVERYWHERE, as the MAML official code (and most
  learn2learn/higher users) do. Every forward (support, query, accuracy, meta-test)
  normalises with the statistics of its own batch, in ``train()`` and ``eval()`` mode alike.
  ``torch.nn`` batch-norm layers (``BatchNorm1d/2d/3d``, ``SyncBatchNorm``), with or without
  ``track_running_stats``, are detected when the learner is built and called functionally
  with their running buffers replaced by ``None``: ``running_mean``/``running_var``/
  ``num_batches_tracked`` are never read nor updated (they keep their initial values; to use
  the adapted model outside the learner call :meth:`MetaLearner.predict`, not
  ``model.eval()(x)``). Why: a task's support set is the only labelled data the meta-test
  adaptation may use, running statistics mix tasks (and meta-test tasks) that should be
  independent, and they cannot be carried through ``vmap`` (each task would write the same
  buffer) nor through the meta-gradient. Under ``vmap``/``jvp`` the normalisation runs on
  plain ops, exact in every composition (the fused kernel's batching rule is wrong for
  ``grad(vmap(...))``, pytorch/functorch#534). ``InstanceNorm(track_running_stats=True)``
  is refused.
  :class:`meta.Conv4` uses :class:`meta.BatchNorm`, the same function without buffers.
- Other modules follow the model's mode as the user set it: ``model.train()`` = dropout
  active, ``model.eval()`` = dropout off (``meta-train`` evaluates in eval mode). LayerNorm,
  GroupNorm and any module without running state need nothing.
- Randomness (dropout) under ``vectorize=True``: ``randomness=`` is passed to
  ``torch.func.vmap``. ``"different"`` (default): independent draws per task, the
  distribution of the Python loop (where each task draws in turn), so vmap and loop are the
  same estimator; the numbers differ (different RNG consumption order). ``"same"``: one draw
  shared by every task; the loop then replays the RNG state for each task, so loop and vmap
  give the same numbers (tested bit for bit on CPU). ``"error"``: torch's default, random
  ops raise under vmap. Loop == vmap to rounding: with ``"same"``, or with dropout off.
- Frozen parameters (``requires_grad=False``) are constants: neither adapted in the inner
  loop nor meta-learned (no ``.grad``), as ``loss.backward()`` would treat them.
- Head-only learners (:class:`meta.ANIL`, :class:`meta.MemoryReducedMAML`): ``head=`` names
  the adapted submodule, ``backbone=`` how its input is computed (default what the model
  feeds the head); the split is built once, in :class:`MetaLearner.__init__`
  (:class:`~meta.algorithms.head_only.HeadSplit`), and checked on the first batch.
- First batch: labels and the model output are checked against the loss
  (:mod:`meta.algorithms.checks`): integer labels in [0, ways), output ``[n, ways]`` with
  ``ways`` the classes of the support sets, a leading task dimension; the errors name the
  split, the task and the shapes.
- Estimators: those that ignore the inner start point (``bl.Implicit``, ``bl.HistoryFree``)
  are refused where the inner loss depends on θ only through w_0 = θ (MAML, FOMAML, ANIL,
  Sign-/Sharp-MAML): their meta-gradient would be identically zero.
- Meta-test defaults: ``eval_inner_steps=None`` = max(10, inner_steps) (MAML's official
  test uses 10 steps), ``eval_inner_lr=None`` = ``inner_lr``; the memory-reduced learner
  keeps the official 20 x 0.05. ``meta-train`` uses the same rule.
- Device and dtype: those of the model's first parameter; batches are moved/cast to them
  (integer labels keep their dtype). CPU and CUDA, float32 and float64.
- Vectorisation: ``vectorize=True`` computes the per-task hypergradients with
  ``torch.func.vmap(lambda task: bl.hypergrad(...))`` (``vmap(grad(task))``, which is exact; the
  pattern ``grad(vmap(...).mean())`` is the one that goes wrong with ``F.batch_norm`` upstream,
  pytorch/functorch#534) and then averages; after the vmapped call ``bl.check_result(res,
  strict=True)`` reports NaN/inf outside vmap. ``vectorize=False`` loops over the tasks.
  ``None`` (default) = ``True`` on CUDA, ``False`` on CPU. Measured on the shared 2-core CPU of
  the development machine (torch 2.13, float32, Conv4 hidden 64, 16 tasks 5-way 1-shot 15
  queries, 28x28, 1 thread, median of 5 interleaved steps, 2026-11-23, other jobs running):
  MAML ``meta_step`` K=1 0.61 s looped vs 1.99 s vmapped; K=5 1.14 s looped vs 1.32 s
  vmapped. The loop runs on plain autograd with the fused batch norm (see
  :mod:`bilevel.autodiff`) and holds one task's graph at a time, hence ``False`` on CPU. The
  CUDA default is not measured here (no GPU in these sessions): one batched kernel per op
  instead of B small ones is the usual GPU win.
  Vmapped and looped meta-gradients agree to ~1e-13 relative in float64 (tested, with BN).
- Compilation: ``compile=True`` (or a dict of ``torch.compile`` options, e.g.
  ``{"backend": "aot_eager"}``, ``{"mode": "max-autotune"}``) runs each task's hypergradient
  through one :class:`bilevel.CompiledHypergrad` per training problem: the inner loop, the
  second-order backward and the outer gradient in one graph (``torch.func`` inside; batch norm
  as plain ops, which the compiler fuses), reused by every task and meta-iteration (no
  recompiles; a new task shape compiles once more). ``vectorize=True`` compiles the vmap over
  tasks (MAML family, iMAML); the head-only learners' vmapped step and Reptile run eagerly
  with one warning. The first call compiles (Conv4 on CPU: minutes); same meta-gradient as
  eager (float64: 1e-10 relative, tested). Without a C++ compiler: eager with one warning.
  On the CPU put a convolutional model in channels-last layout before compiling
  (``model.to(memory_format=torch.channels_last)``): the compiled Conv4 step was 1.6-1.8x
  faster that way (eager channels-last is slower; ``benchmarks/results/compiled-step-*``).
- Accuracy: the query accuracy comes from the outer loss's own logits (its aux output,
  ``BilevelProblem(..., has_aux=True)``): no second query forward per task.
- Several processes / GPUs: not ``DistributedDataParallel`` -- meta-gradients land in ``.grad``
  like ``backward()`` would put them, but no ``backward()`` runs, so DDP's gradient hooks never
  fire. Give the learner the plain module, give each rank its shard of the global meta-batch and
  use :mod:`meta.distributed`: ``meta.distributed.meta_step(learner, shard)`` (or
  ``learner.meta_step(shard)`` then ``meta.distributed.all_reduce_meta_grad(model, n_local,
  metrics)``) writes the mean over the GLOBAL batch, Σ_r n_r ḡ_r / Σ_r n_r, into ``.grad`` with
  one ``all_reduce``; ranks with unequal or no shards, parameters without ``.grad`` and
  Sharp-MAML's global-norm upper SAM are handled there. (Averaging each ``p.grad`` over the
  world size is wrong for unequal shards and desynchronises the collectives when a ``.grad`` is
  ``None`` on one rank only.) ``meta-train --nproc N`` / ``torchrun`` do all of it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import vmap
from torch.utils._pytree import tree_map

import bilevel as bl
from bilevel.diagnostics import problem_scope

from ..models import params_of
from ..tasks import TaskBatch
from .checks import check_batch, check_labels
from .functional_model import FunctionalModel
from .head_only import FEAT_Q, FEAT_S, HeadSplit

Params = dict[str, torch.Tensor]
Split = tuple[torch.Tensor, torch.Tensor]

__all__ = ["MetaLearner", "cross_entropy", "mse", "default_eval_steps", "RANDOMNESS",
           "DEFAULT_EVAL_STEPS"]

RANDOMNESS = ("different", "same", "error")
#: the estimators that differentiate the inner steps (apply to every MAML-type problem)
APPLICABLE = ("unrolled", "truncated:T", "checkpointed", "firstorder", "forwardmode")
DEFAULT_EVAL_STEPS = 10


def default_eval_steps(inner_steps: int) -> int:
    """Meta-test inner steps when none are given: max(10, inner_steps) (MAML's official
    code tests with 10 steps; never fewer than the training inner loop). ``meta-train``
    uses the same rule."""
    return max(DEFAULT_EVAL_STEPS, inner_steps)


def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y)


def mse(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean squared error; targets ``[n]`` are reshaped to predictions ``[n, 1]``.

    Written out rather than ``F.mse_loss``: on torch 2.13 forward-over-reverse through
    ``F.mse_loss(reduction="mean")`` (``jvp(grad(...))``, the Hessian-vector products of
    ``bl.Implicit``/``bl.HistoryFree``) raises "ZeroTensors are immutable"."""
    if pred.shape != y.shape:
        y = y.reshape(pred.shape)
    diff = pred - y
    return (diff * diff).mean()


LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "cross_entropy": cross_entropy, "mse": mse}


def _check_positive(value: Any, name: str, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
        value >= 0 if allow_zero else value > 0)
    if not ok:
        raise ValueError(f"{name} must be a {'non-negative' if allow_zero else 'positive'} "
                         f"number, got {value!r}")


def _check_steps(value: Any, name: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")


def _stack(results: list[Any]) -> Any:
    """Stack a list of like pytrees (HypergradResults, param dicts) along a new task dim."""
    return tree_map(lambda *xs: None if xs[0] is None else torch.stack(xs), results[0],
                    *results[1:])



class MetaLearner:
    """Base class: a bilevel problem per task, ``bl.hypergrad`` per task, mean into ``.grad``.

    Subclasses set :attr:`name` and override :meth:`default_estimator`, and where needed
    :meth:`meta_names` (which parameters are meta-learned: all trainable ones by default),
    :meth:`inner_init` (the lower variable's start: all meta-parameters by default = MAML),
    :meth:`problem` and :meth:`solver`. Head-only learners set :attr:`head_only`: the base
    then builds their :class:`~meta.algorithms.head_only.HeadSplit` from ``head`` /
    ``backbone`` and runs the backbone once per task (``cache_features``).
    """

    name: str = "base"
    #: the inner loop adapts only the head (ANIL, memory-reduced): ``head=``/``backbone=`` apply
    head_only: bool = False
    #: why estimators that ignore the inner start point (bl.Implicit, bl.HistoryFree) give a
    #: zero meta-gradient here (None: they apply)
    implicit_refusal: str | None = ("inner (support) loss depends on the meta-parameters "
                                    "only through the start point w_0 = θ")

    def __init__(self, model: nn.Module, inner_lr: float, inner_steps: int, *,
                 vectorize: bool | None = None, estimator: bl.Estimator | None = None,
                 loss: str | Callable = "cross_entropy", eval_inner_steps: int | None = None,
                 eval_inner_lr: float | None = None, randomness: str = "different",
                 head: str | None = None, backbone: str | Callable | None = None,
                 cache_features: bool | None = None, compile: bool | dict = False):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not any(True for _ in model.parameters()):
            raise ValueError("model has no parameters")
        _check_positive(inner_lr, "inner_lr")
        _check_steps(inner_steps, "inner_steps")
        if eval_inner_steps is not None:
            _check_steps(eval_inner_steps, "eval_inner_steps")
        if eval_inner_lr is not None:
            _check_positive(eval_inner_lr, "eval_inner_lr")
        if vectorize not in (None, True, False):
            raise ValueError(f"vectorize must be True, False or None, got {vectorize!r}")
        if randomness not in RANDOMNESS:
            raise ValueError(f"randomness must be one of {', '.join(map(repr, RANDOMNESS))} "
                             f"(torch.func.vmap's), got {randomness!r}")
        if estimator is not None and not isinstance(estimator, bl.Estimator):
            raise TypeError(f"estimator must be a bilevel estimator such as bl.Unrolled() or "
                            f"bl.Checkpointed(), got {type(estimator).__name__}")
        if isinstance(loss, str):
            if loss not in LOSSES:
                raise ValueError(f"loss must be one of {sorted(LOSSES)} or a callable "
                                 f"(prediction, target) -> scalar, got {loss!r}")
            self.loss_name, self.loss_fn = loss, LOSSES[loss]
        elif callable(loss):
            self.loss_name, self.loss_fn = getattr(loss, "__name__", "custom"), loss
        else:
            raise TypeError(f"loss must be a string or a callable, got {type(loss).__name__}")
        if cache_features not in (None, True, False):
            raise ValueError(f"cache_features must be True, False or None, got "
                             f"{cache_features!r}")
        self.model = model
        self.fmodel = FunctionalModel(model)
        self.split: HeadSplit | None = None
        if self.head_only:
            self.split = HeadSplit(model, self.fmodel, "head" if head is None else head,
                                   backbone, learner=type(self).__name__)
            self.cache_features = cache_features is not False
        elif head is not None or backbone is not None or cache_features is not None:
            raise TypeError(f"{type(self).__name__} adapts every parameter: head=, backbone= "
                            f"and cache_features= apply to the head-only learners (ANIL, "
                            f"MemoryReducedMAML)")
        else:
            self.cache_features = False
        self.inner_lr = inner_lr
        self.inner_steps = inner_steps
        self.eval_inner_steps = (default_eval_steps(inner_steps) if eval_inner_steps is None
                                 else eval_inner_steps)
        self.eval_inner_lr = inner_lr if eval_inner_lr is None else eval_inner_lr
        self.vectorize = vectorize
        self.randomness = randomness
        self.estimator = self.default_estimator() if estimator is None else estimator
        self.check_estimator(self.estimator)
        if not (isinstance(compile, bool) or isinstance(compile, dict)):
            raise TypeError(f"compile must be True, False or a dict of torch.compile options "
                            f"(backend=, mode=, dynamic=, fullgraph=), got "
                            f"{type(compile).__name__}")
        self.compile = compile
        self._checked = False
        self._consts: Params = self.constants()

    # ------------------------------------------------------------------ configuration hooks
    def default_estimator(self) -> bl.Estimator:
        return bl.Unrolled()

    def check_estimator(self, estimator: bl.Estimator | None) -> None:
        """Refuse an estimator that cannot give this learner's meta-gradient."""
        if isinstance(estimator, bl.Implicit) and self.implicit_refusal is not None:
            raise bl.BilevelError(
                f"{type(estimator).__name__} differentiates at the inner solution and ignores "
                f"the start point w_0, but {self.name}'s {self.implicit_refusal}, so the "
                f"meta-gradient would be identically zero. Estimators that apply to "
                f"{self.name}: {', '.join(APPLICABLE)} (bl.Unrolled(), bl.Truncated(T), "
                f"bl.Checkpointed(), bl.FirstOrder(), bl.ForwardMode()); for implicit "
                f"meta-gradients use imaml (or memoryreduced)")

    def meta_names(self) -> list[str]:
        """Names of the meta-learned parameters (the ones that get ``.grad``): every parameter
        with ``requires_grad=True``; frozen ones are constants (neither adapted nor
        meta-learned)."""
        return [n for n, p in self.model.named_parameters() if p.requires_grad]

    def inner_names(self) -> list[str]:
        """Names of the parameters the inner loop adapts (MAML: all meta-parameters;
        head-only learners: the head's)."""
        if self.split is not None:
            meta = set(self.meta_names())
            return [n for n in self.split.head_names if n in meta]
        return self.meta_names()

    def inner_init(self, hparams: Params) -> Params:
        """w_0(θ): the inner loop starts at the meta-parameters (MAML-type problems)."""
        names = self.inner_names()
        return {n: hparams[n] for n in names}

    def params0(self) -> Params | None:
        """A fixed inner start point (only where :meth:`inner_init` is not used)."""
        return None

    def solver(self, train: bool = True) -> bl.InnerSolver:
        """The inner solver: ``train=False`` gives the meta-test adaptation."""
        if train:
            return bl.GradientDescent(self.inner_lr, self.inner_steps)
        return bl.GradientDescent(self.eval_inner_lr, self.eval_inner_steps)

    def problem(self, train: bool = True) -> bl.BilevelProblem:
        """Inner loss = support loss, outer loss = query loss, w_0 = :meth:`inner_init`; for a
        head-only learner with ``cache_features``, the head problem on cached features
        (:mod:`meta.algorithms.head_only`)."""
        if self.split is not None and self.cache_features:
            return self.head_problem()
        return bl.BilevelProblem(self.task_loss, self.query_loss, init=self._init_or_none(),
                                 has_aux=self._aux())

    def _aux(self) -> bool:
        """The outer (query) loss carries the query accuracy as its aux output (classification):
        the accuracy comes from the logits of the loss's own forward, no second forward."""
        return self.loss_name == "cross_entropy"

    def _with_metric(self, out: torch.Tensor, y: torch.Tensor):
        """``L(out, y)``, plus ``{"accuracy": mean(argmax out == y)}`` when :meth:`_aux`."""
        loss = self.loss_fn(out, y)
        if not self._aux():
            return loss
        return loss, {"accuracy": (out.detach().argmax(-1) == y).to(out.dtype).mean()}

    def query_loss(self, params: Params, hparams: Params, batch: Split):
        """The outer loss of the training problem: :meth:`task_loss` on the query set, with
        the query accuracy as aux (classification; see :meth:`_aux`)."""
        x, y = batch
        return self._with_metric(self.forward(params, hparams, x), y)

    # ------------------------------------------------------------------ functional model
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def hparams(self) -> Params:
        """The current meta-parameters θ, detached (shared storage)."""
        params = params_of(self.model)
        return {n: params[n] for n in self.meta_names()}

    def constants(self) -> Params:
        """Everything the forward needs that is neither θ nor adapted: other parameters
        (detached) and buffers (batch-norm running statistics excluded: module docstring)."""
        meta = set(self.meta_names())
        consts = {n: p for n, p in params_of(self.model).items() if n not in meta}
        consts.update(self.fmodel.buffers())
        return consts

    def forward(self, params: Params, hparams: Params, x: torch.Tensor,
                constants: Params | None = None) -> torch.Tensor:
        """Model output with adapted ``params`` overriding ``hparams`` overriding constants."""
        consts = self._consts if constants is None else constants
        return self.fmodel({**consts, **hparams, **params}, x)

    def predict(self, adapted: Params, x: torch.Tensor) -> torch.Tensor:
        """The model's output on ``x`` with the parameters :meth:`adapt` returned, under the
        learner's batch-norm policy (batch statistics; ``functional_call(model, adapted, (x,))``
        would use the running statistics in eval mode)."""
        x = x.to(device=self.device, dtype=self.dtype)
        return self.fmodel({**self.fmodel.buffers(), **adapted}, x)

    def task_loss(self, params: Params, hparams: Params, batch: Split) -> torch.Tensor:
        x, y = batch
        return self.loss_fn(self.forward(params, hparams, x), y)

    def _init_or_none(self):
        return self.inner_init if self.params0() is None else None

    def use_vmap(self) -> bool:
        if self.vectorize is None:
            return self.device.type == "cuda"
        return self.vectorize

    def _vmap(self, fn):
        return vmap(fn, randomness=self.randomness)

    def _tasks(self, n: int):
        """Task indices of the Python loop; with ``randomness="same"`` every task starts
        from the same RNG state, as under ``vmap(randomness="same")``."""
        if self.randomness != "same":
            yield from range(n)
            return
        devices = [self.device] if self.device.type == "cuda" else []
        state = torch.random.get_rng_state()
        cuda = [torch.cuda.get_rng_state(d) for d in devices]
        for i in range(n):
            torch.random.set_rng_state(state)
            for d, s in zip(devices, cuda):
                torch.cuda.set_rng_state(s, d)
            yield i

    def _prepare(self, batch: TaskBatch, check: bool = False) -> TaskBatch:
        """Type, device and dtype; on the learner's first batch (or ``check=True``) the
        labels and the model output (:func:`meta.algorithms.checks.check_batch`)."""
        if not isinstance(batch, TaskBatch):
            raise TypeError(f"expected a meta.TaskBatch, got {type(batch).__name__}")
        batch = batch.to(device=self.device, dtype=self.dtype)
        if check or not self._checked:
            self._consts = self.constants()
            hparams = self.hparams()
            self._ways = check_batch(self, batch, hparams)
            if self.split is not None and self.cache_features:
                self.split.check({**self._consts, **hparams}, batch.support[0][0],
                                 self.device)
            self._checked = True
        elif getattr(self, "_ways", None) is not None:  # every later batch: labels in range
            check_labels(batch, self._ways)
        return batch

    def _prepare_split(self, split: Split) -> Split:
        x, y = split
        x = x.to(device=self.device, dtype=self.dtype)
        y = y.to(device=self.device, dtype=self.dtype if y.is_floating_point() else None)
        return x, y

    # ------------------------------------------------------------------ head-only halves
    def embed(self, hparams: Params, x: torch.Tensor) -> torch.Tensor:
        """φ_θ(x): the backbone on ``x`` with the meta-parameters ``hparams``."""
        return self.split.embed({**self._consts, **hparams}, x)

    def head_out(self, params: Params, hparams: Params, feats: torch.Tensor) -> torch.Tensor:
        """h_w(F): the head with adapted ``params`` overriding ``hparams``."""
        return self.split.head_out({**self._consts, **hparams, **params}, feats)

    def head_problem(self) -> bl.BilevelProblem:
        """g = L(h_w(F_s), y_s), f = L(h_w(F_q), y_q); F_s, F_q are hyperparameters."""

        def support_loss(w, h, batch):
            return self.loss_fn(self.head_out(w, h, h[FEAT_S]), batch[1])

        def query_loss(w, h, batch):
            return self._with_metric(self.head_out(w, h, h[FEAT_Q]), batch[1])

        return bl.BilevelProblem(support_loss, query_loss, init=self._init_or_none(),
                                 has_aux=self._aux())

    # ------------------------------------------------------------------ meta-gradient
    def train_problem(self, head: bool = False) -> bl.BilevelProblem:
        """:meth:`problem` ``(True)`` (``head=True``: :meth:`head_problem`), built once and
        reused while the learner's settings are unchanged: the same loss functions every task
        and every meta-iteration, so the estimators' once-per-problem checks (the refusals of
        unread hyperparameters: a forward and a backward) run once, not per task, and a
        compiled step sees the same closures (no recompiles)."""
        key = (head, self.loss_fn, tuple(sorted(
            (k, v) for k, v in vars(self).items()
            if not k.startswith("_") and isinstance(v, (bool, int, float, str, type(None))))))
        cache = self.__dict__.setdefault("_problems", {})
        if key not in cache:
            if len(cache) > 8:  # settings changed many times: drop the stale problems
                cache.clear()
            cache[key] = self.head_problem() if head else self.problem(True)
        return cache[key]

    def _hypergrad_fn(self, head: bool = False, batched: bool = False):
        """``bl.hypergrad`` (eager) or the cached :class:`bilevel.CompiledHypergrad` of the
        training problem (``compile=``): one compiled graph per (problem, solver, estimator),
        reused by every task and meta-iteration. ``batched``: the vmapped graph over tasks
        (``in_dims``: support and query batched, θ shared)."""
        problem = self.train_problem(head=head)
        if not self.compile:
            return None
        solver = self.solver(True)
        key = (id(problem), repr(solver), id(self.estimator), batched)
        cache = self.__dict__.setdefault("_compiled", {})
        if key not in cache:
            options = {} if self.compile is True else dict(self.compile)
            cache.clear()  # settings changed: the old graphs no longer apply
            cache[key] = bl.compiled_hypergrad(
                problem, solver=solver, estimator=self.estimator,
                in_dims=(None, 0, 0) if batched else None, randomness=self.randomness,
                **options)
        return cache[key]

    def task_hypergrad(self, hparams: Params, task: TaskBatch, *, check: bool = True
                       ) -> bl.HypergradResult:
        """``bl.hypergrad`` of one task (no task dim): grads for the meta-parameters."""
        if self.split is None or not self.cache_features:
            hg = self._hypergrad_fn()
            if hg is not None and not bl.autodiff._transform_active():
                return hg(hparams, task.support, task.query, params0=self.params0())
            return bl.hypergrad(self.train_problem(), hparams, task.support, task.query,
                                solver=self.solver(True), estimator=self.estimator,
                                params0=self.params0(), check=check)
        (xs, ys), (xq, yq) = task.support, task.query
        body, head_hp = self.split.split(hparams)
        (fs, fq), pull = bl.autodiff.vjp(lambda b: (self.embed(b, xs), self.embed(b, xq)), body)
        hg = self._hypergrad_fn(head=True)
        if hg is not None and not bl.autodiff._transform_active():
            res = hg({**head_hp, FEAT_S: fs, FEAT_Q: fq}, (xs, ys), (xq, yq),
                     params0=self.params0())
        else:
            res = bl.hypergrad(self.train_problem(head=True),
                               {**head_hp, FEAT_S: fs, FEAT_Q: fq}, (xs, ys), (xq, yq),
                               solver=self.solver(True), estimator=self.estimator,
                               params0=self.params0(), check=check)
        (g_body,) = pull((res.grad[FEAT_S], res.grad[FEAT_Q]))
        grad = {n: res.grad[n] for n in head_hp}
        grad.update(g_body)
        return bl.HypergradResult({n: grad[n] for n in hparams}, res.params, res.outer_loss,
                                  res.info, res.state, res.aux)

    def batch_hypergrad(self, batch: TaskBatch, hparams: Params | None = None
                        ) -> bl.HypergradResult:
        """Per-task hypergradients stacked along a leading task dim (loop or vmap)."""
        batch = self._prepare(batch)
        self._consts = self.constants()
        hparams = self.hparams() if hparams is None else hparams
        if self.use_vmap():
            hg = self._hypergrad_fn(batched=True) if self.split is None or \
                not self.cache_features else None
            if hg is not None:  # one compiled graph of vmap(task hypergradient)
                return hg(hparams, batch.support, batch.query, params0=self.params0())
            if self.compile and not self.__dict__.get("_warned_compile"):
                self._warned_compile = True
                bl.compiled.compile_fallback(
                    f"{type(self).__name__}(compile=..., vectorize=True)",
                    "the head-only learners' vmapped step (backbone features, then the head "
                    "problem) is not compiled; use vectorize=False for a compiled per-task "
                    "head problem")
            res = self._vmap(lambda task: self.task_hypergrad(hparams, task, check=False))(batch)
            with problem_scope(self.problem(True)):  # counted as the looped calls are
                bl.check_result(res, strict=True, owner=self.estimator)
            return res
        return _stack([self.task_hypergrad(hparams, batch.task(i))
                       for i in self._tasks(batch.num_tasks)])

    def meta_gradient(self, batch: TaskBatch, hparams: Params | None = None, *,
                      accuracy: bool = False, keep_adapted: bool = False
                      ) -> tuple[Params, bl.HypergradResult]:
        """(mean meta-gradient over the tasks, per-task results); writes nothing.

        The per-task results are stacked along a leading task dim WITHOUT their gradients
        (``res.grad`` is None: the loop keeps a running sum, like ``backward()`` would) and,
        unless ``keep_adapted=True``, without the adapted parameters (``res.params`` is None),
        so the loop holds one task's graph and parameters at a time (:meth:`batch_hypergrad`
        keeps everything). ``accuracy=True`` adds the query accuracy of each adapted model as
        ``res.info["accuracy"]``."""
        batch = self._prepare(batch)
        self._consts = self.constants()
        hparams = self.hparams() if hparams is None else hparams
        metric = (lambda p, q: self._query_metric(p, hparams, q)) if accuracy else None
        if self.use_vmap():
            res = self.batch_hypergrad(batch, hparams)
            grads = {n: g.mean(0) for n, g in res.grad.items()}
            info = dict(res.info)
            if metric is not None:
                info["accuracy"] = self._accuracy(res, metric, res.params, batch.query,
                                                  batched=True)
            return grads, bl.HypergradResult(None, res.params if keep_adapted else None,
                                             res.outer_loss, info)
        total: Params | None = None
        results = []
        for i in self._tasks(batch.num_tasks):
            task = batch.task(i)
            r = self.task_hypergrad(hparams, task)
            if total is None:
                total = dict(r.grad)
            else:
                for n, g in r.grad.items():
                    total[n] = total[n] + g
            info = dict(r.info)
            if metric is not None:
                info["accuracy"] = self._accuracy(r, metric, r.params, task.query)
            results.append(bl.HypergradResult(None, r.params if keep_adapted else None,
                                              r.outer_loss, info))
        assert total is not None
        return {n: g / batch.num_tasks for n, g in total.items()}, _stack(results)

    def _accuracy(self, res: bl.HypergradResult, metric, params, query, batched=False):
        """The query accuracy the outer loss returned as aux (no extra forward); a separate
        forward at the adapted parameters only for a problem without it (a subclass's own
        :meth:`problem`)."""
        if isinstance(res.aux, dict) and "accuracy" in res.aux:
            return res.aux["accuracy"]
        with torch.no_grad():
            return self._per_task(metric, params, query) if batched else metric(params, query)

    def accumulate(self, grads: Params) -> None:
        """Add ``grads`` to the ``.grad`` of the named model parameters (like ``backward``)."""
        named = dict(self.model.named_parameters())
        for n, g in grads.items():
            p = named[n]
            g = g.detach().to(p.dtype)
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.add_(g)

    def meta_step(self, batch: TaskBatch) -> dict[str, float]:
        """Meta-gradient of the batch (mean over tasks) ADDED to the parameters' ``.grad``;
        returns ``{"loss": mean query loss after adaptation, "accuracy": query accuracy}``
        (accuracy is NaN for non-classification losses)."""
        grads, res = self.meta_gradient(batch, accuracy=self.loss_name == "cross_entropy")
        self.accumulate(grads)
        return self._summary(res)

    def _summary(self, res: bl.HypergradResult) -> dict[str, float]:
        acc = res.info.get("accuracy")
        return {"loss": float(res.outer_loss.mean()),
                "accuracy": math.nan if acc is None else float(acc.mean())}

    # ------------------------------------------------------------------ metrics / meta-test
    def _full(self, adapted: Params, hparams: Params) -> Params:
        return {**self._consts, **hparams, **adapted}

    def _query_metric(self, adapted: Params, hparams: Params, query: Split) -> torch.Tensor:
        x, y = query
        out = self.forward(adapted, hparams, x)
        if self.loss_name == "cross_entropy":
            return (out.argmax(-1) == y).to(out.dtype).mean()
        return self.loss_fn(out, y)

    def _metrics(self, adapted: Params, hparams: Params, batch: TaskBatch,
                 outer_loss: torch.Tensor) -> dict[str, float]:
        """Summary from stacked adapted parameters (learners that do not use meta_gradient)."""
        loss = float(outer_loss.mean())
        if self.loss_name != "cross_entropy":
            return {"loss": loss, "accuracy": math.nan}
        with torch.no_grad():
            per_task = self._per_task(lambda p, q: self._query_metric(p, hparams, q),
                                      adapted, batch.query)
        return {"loss": loss, "accuracy": float(per_task.mean())}

    def _per_task(self, fn, *args):
        """``fn`` over the leading task dim of every arg: vmap or loop, stacked."""
        if self.use_vmap():
            return self._vmap(fn)(*args)
        n = next(iter(torch.utils._pytree.tree_leaves(args))).shape[0]
        return _stack([fn(*tree_map(lambda t, i=i: t[i], args)) for i in self._tasks(n)])

    def _adapt_one(self, hparams: Params, support: Split) -> Params:
        """Meta-test adaptation of one task: the adapted inner variable (not the full dict)."""
        if self.split is not None and self.cache_features:
            body, head_hp = self.split.split(hparams)
            with torch.no_grad():
                fs = self.embed(body, support[0])
            return bl.solve(self.head_problem(), {**head_hp, FEAT_S: fs}, support,
                            solver=self.solver(False), params0=self.params0())
        return bl.solve(self.problem(False), hparams, support, solver=self.solver(False),
                        params0=self.params0())

    def adapt(self, support: Split) -> Params:
        """Adapt to one task's support set ``(x, y)`` (no task dim) with the meta-test inner
        loop (``eval_inner_steps``, ``eval_inner_lr``); returns the full functional parameter
        dict ``{name: tensor}`` with the model's parameter names (detached): predictions
        with :meth:`predict` (``torch.func.functional_call(model, adapted, (x,))`` gives the
        same for a model without torch batch-norm layers)."""
        support = self._prepare_split(support)
        self._consts = self.constants()
        hparams = self.hparams()
        full = self._full(self._adapt_one(hparams, support), hparams)
        return {n: full[n].detach() for n, _ in self.model.named_parameters()}

    def evaluate(self, tasks: Iterable[TaskBatch], num_tasks: int = 600
                 ) -> tuple[float, float]:
        """Meta-test: adapt on each task's support set (``eval_inner_steps`` steps of lr
        ``eval_inner_lr``), score its query set. ``tasks`` yields TaskBatches of any size; the
        first ``num_tasks`` tasks are used (fewer if the iterator ends). Returns
        ``(mean, ci95)`` with ci95 = 1.96·std/√n (std with ddof 0, as the MAML official code):
        query accuracy for cross-entropy, query loss (MSE) otherwise."""
        if not isinstance(num_tasks, int) or num_tasks < 1:
            raise ValueError(f"num_tasks must be a positive int, got {num_tasks!r}")
        self._consts = self.constants()
        hparams = self.hparams()
        scores: list[torch.Tensor] = []
        seen = 0
        for batch in tasks:
            batch = self._prepare(batch, check=seen == 0)
            take = min(batch.num_tasks, num_tasks - seen)
            if take < batch.num_tasks:
                batch = TaskBatch(tree_map(lambda t, k=take: t[:k], batch.support),
                                  tree_map(lambda t, k=take: t[:k], batch.query))
            adapted = self._per_task(lambda s: self._adapt_one(hparams, s), batch.support)
            for n, t in adapted.items():
                if not bool(torch.isfinite(t).all()):
                    raise FloatingPointError(f"evaluate: the adapted parameter {n!r} holds "
                                             f"NaN/inf: lower eval_inner_lr or eval_inner_steps")
            with torch.no_grad():
                scores.append(self._per_task(lambda p, q: self._query_metric(p, hparams, q),
                                             adapted, batch.query).detach())
            seen += take
            if seen >= num_tasks:
                break
        if not seen:
            raise ValueError("evaluate got no tasks from the iterator")
        values = torch.cat(scores).double().cpu()
        if not bool(torch.isfinite(values).all()):
            bad = int((~torch.isfinite(values)).sum())
            raise FloatingPointError(f"evaluate: {bad} of {len(values)} tasks scored NaN/inf "
                                     f"after adaptation: lower eval_inner_lr or "
                                     f"eval_inner_steps")
        mean = float(values.mean())
        ci = 1.96 * float(values.std(correction=0)) / math.sqrt(len(values))
        return mean, ci

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(inner_lr={self.inner_lr}, inner_steps={self.inner_steps},"
                f" estimator={self.estimator!r}, vectorize={self.vectorize}, "
                f"loss={self.loss_name!r})")
