"""First-batch checks of a :class:`meta.TaskBatch` against the learner's model and loss.

Run once on the first batch a learner sees (and on the first batch of every ``evaluate``),
so that a data or model mistake is reported where it is, with the shapes involved, instead
of surfacing deep inside the inner loop:

- task dimension: inputs ``[tasks, n, *input]`` and targets ``[tasks, n]`` (or
  ``[tasks, n, k]`` for regression) agree on ``tasks`` and ``n``;
- the model output on one task's support inputs (one forward, no gradient, the global RNG
  untouched): one tensor of shape ``[n, ways]`` for cross-entropy, ``[n, k]`` with ``n·k``
  targets for MSE (any tensor for a user loss);
- cross-entropy labels: integer dtype, support and query labels of every task in
  ``[0, ways)`` (``ways`` = the model's outputs), and the support sets of the batch use every
  class (largest support label = ways − 1: a 10-output head on 5-way tasks is refused).

Every LATER batch gets the label checks (:func:`check_labels`: dtype and range, one min/max of
the small label tensors on the host, the task named only on failure) against the ``ways``
found on the first, so a bad label never reaches the inner loop as a raw IndexError.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..tasks import TaskBatch

if TYPE_CHECKING:
    from .base import MetaLearner

__all__ = ["check_batch", "check_labels", "describe"]


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def describe(out) -> str:
    """``Tensor[5, 5]``, ``tuple of 2 (Tensor[5, 5], Tensor[5, 64])``, ``dict with keys ...``."""
    if isinstance(out, torch.Tensor):
        return f"Tensor{_shape(out)}"
    if isinstance(out, (tuple, list)):
        return (f"{type(out).__name__} of {len(out)} ("
                + ", ".join(describe(o) for o in out) + ")")
    if isinstance(out, dict):
        return f"dict with keys {sorted(map(str, out))}"
    return type(out).__name__


def _labels(values: list[int]) -> str:
    if values == list(range(values[0], values[-1] + 1)) and len(values) > 3:
        return f"{values[0]}..{values[-1]}"
    return str(values)


def _no_task_dim(what: str, t: torch.Tensor) -> ValueError:
    return ValueError(f"the {what} have shape {_shape(t)}: a TaskBatch needs a leading task "
                      f"dimension (inputs [tasks, n, ...], labels [tasks, n]); for one task "
                      f"use batch.batched()")


def check_labels(batch: TaskBatch, ways: int) -> None:
    """Cross-entropy labels of every task of both splits: integer, in ``[0, ways)``."""
    for split, (_, y) in (("support", batch.support), ("query", batch.query)):
        if not isinstance(y, torch.Tensor) or y.is_floating_point() or y.is_complex() or \
                y.dtype == torch.bool:
            what = y.dtype if isinstance(y, torch.Tensor) else type(y).__name__
            raise TypeError(f"the {split} labels have dtype {what}: cross-entropy needs "
                            f"integer class labels 0..ways-1 (torch.long)")
        if y.numel() == 0:
            continue
        flat = y.reshape(y.shape[0], -1) if y.dim() else y.reshape(1, 1)
        low, high = flat.amin(-1).tolist(), flat.amax(-1).tolist()  # one transfer each
        for i, (lo, hi) in enumerate(zip(low, high, strict=True)):
            if lo < 0 or hi >= ways:
                present = sorted(int(v) for v in torch.unique(flat[i]).tolist())
                raise ValueError(f"the {split} labels of task {i} are {_labels(present)}: "
                                 f"labels must lie in [0, {ways}) (ways = {ways}, the "
                                 f"model's outputs); relabel each task's classes "
                                 f"0..ways-1")


def check_batch(learner: MetaLearner, batch: TaskBatch, hparams) -> int | None:
    """Raise ``ValueError``/``TypeError`` naming the split, the task and the shapes. Returns
    ``ways`` (the model's outputs) for a cross-entropy learner, for :func:`check_labels` on the
    later batches; else None."""
    from .base import LOSSES

    builtin = LOSSES.get(learner.loss_name) is learner.loss_fn
    classify = builtin and learner.loss_name == "cross_entropy"
    regress = builtin and learner.loss_name == "mse"
    for split, (x, y) in (("support", batch.support), ("query", batch.query)):
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise TypeError(f"the {split} set must be a pair of tensors (inputs, targets), got "
                            f"({type(x).__name__}, {type(y).__name__})")
        if classify:
            if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
                raise TypeError(f"the {split} labels have dtype {y.dtype}: cross-entropy needs "
                                f"integer class labels 0..ways-1 (torch.long)")
            if y.dim() != 2:
                raise _no_task_dim(f"{split} labels", y) if y.dim() == 1 else ValueError(
                    f"the {split} labels have shape {_shape(y)}; cross-entropy needs "
                    f"[tasks, n] integer labels")
        elif regress and y.dim() not in (2, 3):
            raise _no_task_dim(f"{split} targets", y) if y.dim() == 1 else ValueError(
                f"the {split} targets have shape {_shape(y)}; MSE needs [tasks, n] or "
                f"[tasks, n, k]")
        if x.dim() < 2:
            raise _no_task_dim(f"{split} inputs", x)
        if (classify or regress) and tuple(x.shape[:2]) != tuple(y.shape[:2]):
            raise ValueError(f"the {split} inputs {_shape(x)} and "
                             f"{'labels' if classify else 'targets'} {_shape(y)} disagree: "
                             f"inputs must be [tasks, n, ...] with [tasks, n] = "
                             f"{list(y.shape[:2])}; is the task dimension missing?")
        if x.shape[0] != batch.support[0].shape[0] or y.shape[0] != x.shape[0]:
            raise ValueError(f"the {split} set has {x.shape[0]} tasks (inputs) and "
                             f"{y.shape[0]} (targets), the support inputs "
                             f"{batch.support[0].shape[0]}")
    xs, ys0 = batch.support[0][0], batch.support[1][0]
    n = xs.shape[0]
    devices = [learner.device] if learner.device.type == "cuda" else []
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            out = learner.forward({}, hparams, xs)
    except Exception as err:  # the model's own error, with the input it got
        raise ValueError(f"the model failed on the {n} support inputs {_shape(xs)} of task 0 "
                         f"(a task's inputs: [n, ...], the TaskBatch's task dimension removed): "
                         f"{type(err).__name__}: {err}") from err
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"the model output is a {describe(out)}, not a tensor: meta learners "
                        f"need one tensor of {'logits [n, ways]' if classify else 'outputs'}; "
                        f"make the model return only that (e.g. out[0])")
    where = f"for the {n} support inputs {_shape(xs)} of task 0"
    if classify:
        ys = batch.support[1]
        seen = int(ys.max()) + 1  # the classes the support sets use: 0..seen-1
        if out.dim() != 2 or out.shape[0] != n:
            hint = ("flatten it (e.g. torch.flatten(out, 1) or nn.Flatten())"
                    if out.dim() > 2 and out.shape[0] == n else
                    "is the task dimension missing? TaskBatch inputs are [tasks, n, ...]"
                    if out.shape[:1] != (n,) else "return [n, ways] logits")
            ways = out[0].numel() if out.dim() > 2 and out.shape[0] == n else seen
            raise ValueError(f"the model output has shape {_shape(out)} {where}; "
                             f"cross-entropy needs [n, ways] = [{n}, {ways}]: {hint}")
        ways = out.shape[1]
        check_labels(batch, ways)
        if seen < ways:
            raise ValueError(f"the model output has shape {_shape(out)} {where}, but the "
                             f"support labels use {seen} classes (0..{seen - 1}): a {seen}-way "
                             f"task needs [n, ways] = [{n}, {seen}] (one logit per class: give "
                             f"the head {seen} outputs)")
    if regress and (out.dim() != 2 or out.shape[0] != n or out.numel() != ys0.numel()):
        raise ValueError(f"the model output has shape {_shape(out)} {where} and the targets "
                         f"{_shape(ys0)}; MSE needs [n, k] outputs with n·k targets"
                         + ("; is the task dimension missing? TaskBatch inputs are "
                            "[tasks, n, ...]" if out.dim() < 2 or out.shape[0] != n else ""))
    return out.shape[1] if classify else None
