"""The meta-training loop: :func:`train` (setup, resume, the run) and the run itself.

One process or several (:mod:`meta.training.distributed`): with ``W`` > 1 ranks every rank
draws its shard of batch ``i``, :func:`meta.distributed.meta_step` reduces the meta-gradient,
and every rank takes the same optimiser step; validation and test are sharded; rank 0 alone
prints, writes ``metrics.csv``, TensorBoard events, ``checkpoint.pt``, ``curve.png`` and
``results.json``.
"""

from __future__ import annotations

import io
import json
import math
import platform
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

import torch

from .. import distributed as D
from .build import build_learner, build_model, data_shape, datasets, load_factory
from .checkpoints import (
    CHECKPOINT,
    atomic_write,
    merge_resume,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
)
from .config import ConfigError, TrainConfig, TrainingInterrupted, resolve
from .distributed import (
    Ranks,
    any_rank,
    barrier,
    broadcast_object,
    empty_to_none,
    evaluate_sharded,
    gather_objects,
    join,
    leave,
)
from .logging import METRICS, MetricsCSV, Progress, TensorBoard, read_metrics

__all__ = ["train", "RESULTS", "CURVE", "DEFAULT_DIST_TIMEOUT"]

RESULTS, CURVE = "results.json", "curve.png"
#: seconds a rank waits in a collective before giving up (``--dist-timeout``)
DEFAULT_DIST_TIMEOUT = 600.0


def _default_out(c: TrainConfig) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path("runs") / f"{c.dataset}-{c.algorithm}-{stamp}"
    out, k = base, 1
    while out.exists():
        k += 1
        out = base.with_name(f"{base.name}-{k}")
    return out



def train(config: TrainConfig, *, resume: bool = False, stream: TextIO | None = None,
          model: torch.nn.Module | Callable[..., torch.nn.Module] | None = None
          ) -> dict[str, Any]:
    """Meta-train, validate, test; write the run directory; return the results dict.

    ``model``: your own ``nn.Module`` (trained in place; moved to the run's device and dtype)
    or a factory called with ``ways`` / ``in_channels`` / ``image_size`` (those it accepts;
    see :mod:`meta.train`); default ``config.model`` (a preset or ``pkg.module:factory``) or
    the dataset's built-in model (MLP, Conv4, MAML's Conv4).
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
        config, ckpt = merge_resume(config, Path(config.out))
        saved = ckpt.get("model_record") or {}
        if model is None and config.model is None and saved.get("factory"):
            model = load_factory(saved["factory"])  # a factory given as model=...
        elif model is None and config.model is None and saved.get("class") and \
                not str(saved["class"]).startswith(("meta.models.", "meta.backbones.")):
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
    ranks = join(c.device, c.dist_timeout or DEFAULT_DIST_TIMEOUT)
    result = _train(c, ranks, ckpt, resume, stream, model)  # on an error: no collective
    leave(ranks)  # (destroying a group whose peer is lost can hang or abort)
    return result


def _train(c: TrainConfig, ranks: Ranks, ckpt, resume: bool, stream: TextIO, model
           ) -> dict[str, Any]:
    c.device = ranks.device
    out = Path(c.out) if c.out is not None else broadcast_object(
        _default_out(c) if ranks.main else None, ranks, "broadcast of the run directory")
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
        train_data, val_data, test_data = datasets(c)
        seed_everything(c.seed)
        model, record = build_model(c, model, data_shape(train_data))
        learner = build_learner(c, model)
        optimizer = torch.optim.Adam(model.parameters(), lr=c.meta_lr)
        if ckpt is not None:
            try:
                model.load_state_dict(ckpt["model"])
                optimizer.load_state_dict(ckpt["optimizer"])
            except (RuntimeError, ValueError, KeyError) as err:
                raise ConfigError(f"the checkpoint in {out} does not fit this model: "
                                  f"{err}") from None
        if c.tensorboard:  # on every rank: all fail together, before the first collective
            TensorBoard.check()
        _restore_rng(c, ranks, ckpt, start)
        # every rank starts from rank 0's parameters (after a resume too: the same file, but
        # the broadcast makes it so whatever each rank read)
        D.broadcast_parameters(model)
        c.out = str(out)
        if ranks.main:
            out.mkdir(parents=True, exist_ok=True)
        run = _Run(c, out, model, learner, optimizer, (train_data, val_data, test_data),
                   start, ckpt, stream, ranks)
        run.model_record = record
        return run.run()
    finally:
        torch.set_num_threads(old_threads)


def _restore_rng(c: TrainConfig, ranks: Ranks, ckpt, start: int) -> None:
    """Rank r continues its own RNG stream: the checkpoint's ``rng_ranks[r]`` (``rng`` for one
    process); a rank > 0 that has none (a new run, or more ranks than saved) is seeded from
    ``(seed, rank, start)``, so the ranks never draw the same dropout masks."""
    saved = (ckpt or {}).get("rng_ranks") or []
    if ckpt is not None and ranks.rank < len(saved):
        set_rng_state(saved[ranks.rank])
    elif ckpt is not None and ranks.main:
        set_rng_state(ckpt["rng"])
    if ranks.rank > 0 and (ckpt is None or ranks.rank >= len(saved)):
        from ..data import task_seed

        torch.manual_seed(task_seed("rank", c.seed, ranks.rank, start))


class _Quiet:
    """Rank > 0: no progress output, metrics kept in memory only."""

    def __init__(self, rows):
        self.rows = list(rows)

    def add(self, iteration, split, loss, accuracy, ci95, elapsed):
        self.rows.append({"iteration": iteration, "split": split, "loss": loss,
                          "accuracy": accuracy, "ci95": ci95, "time": elapsed})

    def flush(self):
        pass

    def close(self):
        pass

    def series(self, split, key):
        return [(r["iteration"], r[key]) for r in self.rows if r["split"] == split]


def _steps(n: int) -> str:
    return f"{n} step" if n == 1 else f"{n} steps"


class _Run:
    def __init__(self, c, out, model, learner, optimizer, data, start, ckpt, stream,
                 ranks: Ranks):
        self.c, self.out, self.model, self.learner = c, out, model, learner
        self.ranks = ranks
        self.tensorboard = None
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
            return evaluate_sharded(self.learner, data, num_tasks, data.meta_batch, self.ranks)
        finally:
            self.model.train(was)

    def validate(self, iteration: int) -> None:
        mean, ci = self.evaluate(self.val_data, self.c.val_tasks)
        loss, acc = (mean, math.nan) if self.regression else (math.nan, mean)
        self.log(iteration, "val", loss, acc, ci)
        what = "mse" if self.regression else "accuracy"
        self.progress.write(f"val @ {iteration}: {what} {mean:.4f} +/- {ci:.4f} "
                            f"({self.c.val_tasks} tasks)")

    def log(self, iteration: int, split: str, loss: float, acc: float, ci: float) -> None:
        self.metrics.add(iteration, split, loss, acc, ci, self.now())
        if self.tensorboard is not None:
            self.tensorboard.add(iteration, split, loss, acc, ci)

    def checkpoint(self, iteration: int) -> None:
        rngs = gather_objects(rng_state(), self.ranks, "all_gather of the RNG states")
        D.check_in_sync(self.model)  # the ranks hold the same parameters (raises otherwise)
        if not self.ranks.main:
            return
        self.metrics.flush()
        if self.tensorboard is not None:
            self.tensorboard.flush()
        save_checkpoint(self.out / CHECKPOINT, model=self.model, optimizer=self.optimizer,
                        iteration=iteration, config=self.c, elapsed=self.now(),
                        extra={"segments": self._segments(iteration),
                               "model_record": self.model_record,
                               "world_size": self.ranks.world, "backend": self.ranks.backend,
                               "rng_ranks": rngs})

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
        main = self.ranks.main
        # rank 0 alone reads and writes metrics.csv (another rank would race its appends)
        self.metrics = (MetricsCSV(self.out / METRICS, read_metrics(self.out / METRICS,
                                                                    self.start))
                        if main else _Quiet([]))
        if c.tensorboard and main:
            self.tensorboard = TensorBoard(self.out, purge_step=self.start + 1
                                           if self.start else None)
        every = c.log_every or max(1, c.iterations // 20)
        self.progress = Progress(c.iterations, self.start,
                                 bar=False if c.progress is False or not main else None,
                                 every=every, stream=self.stream if main else io.StringIO(),
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
                m = self.meta_step(iteration - 1)
                self.optimizer.step()
                loss, acc = float(m["loss"]), float(m.get("accuracy", math.nan))
                self.log(iteration, "train", loss, acc, math.nan)
                self.progress.update(iteration, loss, acc)
                if not math.isfinite(loss):
                    self.progress.close()
                    raise FloatingPointError(f"the meta-training loss is {loss} at iteration "
                                             f"{iteration}; lower --meta-lr / --inner-lr")
                if c.val_every and iteration % c.val_every == 0:
                    self.validate(iteration)
                if self.ranks.active:  # stop after the same step on every rank
                    self.stop_requested = any_rank(self.stop_requested, self.ranks)
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
            if self.tensorboard is not None:
                self.tensorboard.close()
        barrier(self.ranks, "the barrier at the end of the run")
        return results

    def meta_step(self, i: int) -> dict[str, Any]:
        """One meta-step on batch ``i``: the whole batch in one process; with several, this
        rank's shard and :func:`meta.distributed.meta_step` (the global mean into ``.grad``)."""
        if not self.ranks.active:
            return self.learner.meta_step(self.train_data.batch(i))
        shard = self.train_data.shard(i, self.ranks.rank, self.ranks.world)
        return D.meta_step(self.learner, empty_to_none(shard))

    def describe(self) -> str:
        c = self.c
        names = {"omniglot": "Omniglot", "miniimagenet": "Mini-ImageNet",
                 "tieredimagenet": "tieredImageNet", "cifarfs": "CIFAR-FS", "fc100": "FC100"}
        task = (f"{c.shots}-shot sinusoid regression" if self.regression
                else f"{names[c.dataset]} {c.ways}-way {c.shots}-shot, {c.queries} queries")
        n = sum(p.numel() for p in self.model.parameters())
        preset = self.model_record.get("preset")
        if preset is None:
            model = (f"{self.model_record.get('factory') or self.model_record['class']} "
                     f"({type(self.model).__name__}, {n} parameters)")
        elif preset == "mlp":
            model = f"MLP {'-'.join(map(str, c.hidden))}"
        elif preset == "conv4":
            model = f"Conv4 {c.hidden[0]}"
        else:
            model = (f"{preset}{'' if c.hidden is None else ' ' + str(c.hidden[0])} "
                     f"({n} parameters)")
        head = f"resuming at iteration {self.start}: " if self.start else ""
        procs = (f", {self.ranks.world} processes ({self.ranks.backend})"
                 if self.ranks.active else "")
        return (f"{head}{c.algorithm} on {task}, meta-batch {c.meta_batch}, {model}, "
                f"inner lr {c.inner_lr} x {c.inner_steps} (test {self.learner.eval_inner_lr} x "
                f"{c.eval_inner_steps}), "
                f"{self._estimator()}, Adam {c.meta_lr}, {c.iterations} iterations, "
                f"{c.device} {c.dtype}{procs} -> {self.out}")

    def _estimator(self) -> str:
        est = getattr(self.learner, "estimator", None)
        return "no estimator (not a hypergradient)" if est is None else repr(est)

    def write_curve(self) -> str | None:
        from ..plot import save_curve

        if not self.ranks.main:
            return None
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
        self.log(c.iterations, "test", loss, acc, ci)
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
            "world_size": self.ranks.world, "backend": self.ranks.backend,
            "torch_version": str(torch.__version__), "python_version": platform.python_version(),
            "curve_backend": backend, "finished": datetime.now().isoformat(timespec="seconds"),
            "args": asdict(c),
            "files": {"metrics": METRICS, "checkpoint": CHECKPOINT, "curve": CURVE},
        }
        if not self.ranks.main:
            return results
        atomic_write(self.out / RESULTS,
                      lambda f: f.write(json.dumps(results, indent=2, default=str) + "\n"),
                      binary=False)
        return results

