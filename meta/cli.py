"""``meta-train``: meta-train a MAML-family learner on sinusoid regression, Omniglot,
Mini-ImageNet, tieredImageNet, CIFAR-FS or FC100, in one process or several.

With no arguments it trains MAML on the sinusoid tasks of Finn et al. (2017) for 10 000
iterations (about a minute on a laptop CPU) and prints where the outputs are. Examples::

    meta-train
    meta-train --dataset omniglot --data-root ~/data/omniglot --algorithm fomaml
    meta-train --dataset omniglot --algorithm maml --estimator checkpointed --out runs/o5
    meta-train --out runs/o5 --resume --iterations 60000     # continue (exactly) where it stopped
    meta-train --dataset omniglot --model mypkg.nets:make_net --algorithm anil --head fc
    meta-train --dataset miniimagenet --data-root ~/data/mini-imagenet --model resnet12
    meta-train --nproc 4 --dataset miniimagenet --data-root DIR --meta-batch 32
    torchrun --nproc_per_node 4 $(which meta-train) --dataset miniimagenet --data-root DIR

Bad arguments print one line on stderr and exit with status 2; Ctrl-C stops after the current
iteration, saves the checkpoint and exits with status 130.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import fields

from .distributed import DistributedError
from .train import (
    CHECKPOINT,
    CURVE,
    DATASET_DEFAULTS,
    METRICS,
    MODEL_PRESETS,
    RESULTS,
    ConfigError,
    TrainConfig,
    TrainingInterrupted,
    train,
)

__all__ = ["main", "build_parser"]

PROG = "meta-train"


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr (no usage block), status 2."""

    def error(self, message: str):  # type: ignore[override]
        _fail(f"{message} (see {self.prog} --help)")


def _rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def _fail(message: str, *, every_rank: bool = False):
    """Print one line and exit 2. Several processes: argument errors (the same argv on every
    rank) are printed by rank 0 only; setup errors (``every_rank``: a rank may be alone to hit
    one, e.g. data missing on its machine) by every rank, naming it."""
    rank = _rank()
    if rank == 0 or every_rank:
        where = f" (rank {rank})" if rank else ""
        print(f"{PROG}: error{where}: {' '.join(str(message).split())}", file=sys.stderr)
    raise SystemExit(2)


def _int(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid integer {text!r}") from None
        if value < minimum:
            what = "positive" if minimum == 1 else f">= {minimum}"
            raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
        return value
    parse.__name__ = "integer"
    return parse


def _float(allow_zero: bool):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
        if not (value >= 0 if allow_zero else value > 0) or value == float("inf"):
            what = "non-negative" if allow_zero else "positive"
            raise argparse.ArgumentTypeError(f"must be a finite {what} number, got {text}")
        return value
    parse.__name__ = "number"
    return parse


_positive_float, _nonneg_float = _float(False), _float(True)


def _hidden(text: str) -> list[int]:
    try:
        sizes = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 64 or 40,40, got {text!r}"
                                         ) from None
    if not sizes or any(s < 1 for s in sizes):
        raise argparse.ArgumentTypeError(f"hidden sizes must be positive, got {text!r}")
    return sizes


def _defaults(key: str) -> str:
    def text(name):
        v = DATASET_DEFAULTS[name][key]
        return ",".join(map(str, v)) if isinstance(v, list) else v

    return (f"default: sinusoid {text('sinusoid')}, omniglot {text('omniglot')}, "
            f"miniimagenet/tieredimagenet {text('miniimagenet')}, cifarfs/fc100 "
            f"{text('cifarfs')}")


def build_parser() -> argparse.ArgumentParser:
    from . import ALGORITHMS

    p = _Parser(prog=PROG, description="Meta-train a MAML-family learner (sinusoid regression "
                "or few-shot classification on Omniglot, Mini-ImageNet, tieredImageNet, CIFAR-FS, "
                "FC100), in one process or several (--nproc, or torchrun); writes metrics.csv, "
                "checkpoint.pt, results.json and curve.png to --out.")
    g = p.add_argument_group("task")
    g.add_argument("--algorithm", metavar="NAME",
                   help=f"one of {', '.join(ALGORITHMS)} (default: maml)")
    g.add_argument("--dataset", choices=list(DATASET_DEFAULTS),
                   help="default: sinusoid")
    g.add_argument("--data-root", metavar="DIR",
                   help="the dataset's folder, files as published (format detected by file "
                        "name; see meta.data.open_dataset). Omniglot (default $OMNIGLOT_ROOT): "
                        "images_background.zip + images_evaluation.zip, or the npz pair in DIR "
                        "or DIR/npz; Mini-ImageNet: mini-imagenet-cache-{train,val,test}.pkl, "
                        "the MetaOptNet pickles, or {train,val,test}.csv + images/; "
                        "tieredImageNet: {split}_images.npz + {split}_labels.pkl; CIFAR-FS / "
                        "FC100: CIFAR_FS_{split}.pickle / FC100_{split}.pickle")
    g.add_argument("--download", action="store_true", default=None,
                   help="fetch the official Omniglot zips into --data-root when missing")
    g.add_argument("--ways", type=_int(1), help="classification only; default 5")
    g.add_argument("--shots", type=_int(1), help=_defaults("shots"))
    g.add_argument("--queries", type=_int(1), help=_defaults("queries") + " (per class)")
    g.add_argument("--meta-batch", type=_int(1), metavar="TASKS", help=_defaults("meta_batch"))

    g = p.add_argument_group("learner")
    g.add_argument("--inner-steps", type=_int(0), metavar="K",
                   help=_defaults("inner_steps") + "; imaml, memoryreduced, reptile and "
                        "signmaml use their learner's default")
    g.add_argument("--inner-lr", type=_positive_float, metavar="LR",
                   help=_defaults("inner_lr") + "; signmaml, and on omniglot imaml, "
                        "memoryreduced and reptile, use their learner's default")
    g.add_argument("--eval-inner-steps", type=_int(0), metavar="K",
                   help="inner steps at validation and test; default max(10, --inner-steps) "
                        "as in the Python API (memoryreduced: its learner's 20)")
    g.add_argument("--eval-inner-lr", type=_positive_float, metavar="LR",
                   help="inner lr at validation and test; default the learner's (the training "
                        "--inner-lr; memoryreduced: 0.05, the official code's); may change on "
                        "--resume (re-test a finished run with another value)")
    g.add_argument("--meta-lr", type=_positive_float, metavar="LR",
                   help="Adam step size; default 0.001")
    g.add_argument("--hidden", type=_hidden, metavar="SIZES",
                   help=_defaults("hidden") + " (MLP widths / Conv4 channels)")
    g.add_argument("--model", metavar="NAME|PKG.MODULE:FACTORY",
                   help=f"a standard model, {', '.join(MODEL_PRESETS)} (channels and image "
                        f"size from the data), or your own: FACTORY(ways=..., in_channels=..., "
                        f"image_size=...) (the keywords it accepts) returns an nn.Module; "
                        f"default mlp (sinusoid), conv4 (omniglot), maml_conv4 (the others)")
    g.add_argument("--head", metavar="NAME",
                   help="anil, memoryreduced: the head submodule adapted in the inner loop "
                        "(default: head)")
    g.add_argument("--backbone", metavar="NAME",
                   help="anil, memoryreduced: the backbone submodule (default: whatever the "
                        "model feeds its head)")
    g.add_argument("--estimator", metavar="SPEC",
                   help="override the learner's hypergradient estimator: unrolled, "
                        "truncated:T, checkpointed, firstorder, forwardmode; implicit:cg:N "
                        "and historyfree[:N] for imaml / memoryreduced only")
    g.add_argument("--reg", type=_positive_float, help="imaml: proximal regularisation lambda")
    g.add_argument("--cg-iters", type=_int(0), metavar="N",
                   help="imaml, memoryreduced: conjugate-gradient iterations")
    g.add_argument("--rho-inner", type=_nonneg_float, metavar="RHO",
                   help="sharpmaml: inner SAM radius")
    g.add_argument("--rho-outer", type=_nonneg_float, metavar="RHO",
                   help="sharpmaml: outer SAM radius")

    g = p.add_argument_group("run")
    g.add_argument("--iterations", type=_int(1), metavar="N", help=_defaults("iterations"))
    g.add_argument("--val-every", type=_int(0), metavar="N",
                   help=_defaults("val_every") + "; 0: no validation")
    g.add_argument("--val-tasks", type=_int(1), metavar="N", help=_defaults("val_tasks"))
    g.add_argument("--test-tasks", type=_int(1), metavar="N", help=_defaults("test_tasks"))
    g.add_argument("--device", help="default: cuda when available, else cpu")
    g.add_argument("--dtype", choices=["float32", "float64"], help="default: float32")
    g.add_argument("--seed", type=_int(0), help="default: 0")
    g.add_argument("--threads", type=_int(1), metavar="N",
                   help="torch CPU threads during the run; default: sinusoid 1 (a tiny model: "
                        "more threads only add overhead), omniglot torch's default")
    g.add_argument("--vectorize", choices=["auto", "on", "off"],
                   help="vmap over the tasks of a batch (auto: the learner's choice, on for "
                        "CUDA); default: sinusoid on, omniglot auto")
    g.add_argument("--out", metavar="DIR",
                   help="run directory; default runs/<dataset>-<algorithm>-<timestamp>")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out exactly where it stopped (only "
                        "--iterations and the logging/evaluation options may change)")
    g.add_argument("--checkpoint-every", type=_int(0), metavar="N",
                   help=_defaults("checkpoint_every") + "; always at the end and on Ctrl-C")
    g.add_argument("--log-every", type=_int(1), metavar="N",
                   help="without a progress bar, print a line every N iterations; "
                        "default iterations/20")
    g.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                   help="no progress bar (one is drawn, with tqdm, only when stderr is a "
                        "terminal)")
    g.add_argument("--compile", action="store_true", default=None,
                   help="torch.compile each task's hypergradient (one graph for every task and "
                        "iteration; the first iteration compiles, minutes for Conv4 on a CPU; "
                        "eager with a warning where the compiler cannot)")
    g.add_argument("--tensorboard", action="store_true", default=None,
                   help="also write TensorBoard scalars to --out/tensorboard (needs the "
                        "tensorboard package: pip install 'bilevel-meta[tensorboard]')")

    g = p.add_argument_group("several processes (torch.distributed, gloo on CPU, nccl on CUDA)")
    g.add_argument("--nproc", type=_int(1), metavar="N",
                   help="run N local processes, each with its shard of the meta-batch (the "
                        "same as torchrun --nproc_per_node N $(which meta-train) ...); "
                        "default 1")
    g.add_argument("--dist-timeout", type=_positive_float, metavar="SECONDS",
                   help="how long a rank waits for the others in a collective before it "
                        "stops with an error (a rank died or hangs); must exceed rank 0's "
                        "longest checkpoint/curve write; default 600")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``meta-train``; returns the exit status: 0, 1 when the training loss
    became NaN/inf, 130 after Ctrl-C; bad arguments raise ``SystemExit(2)``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    if args.nproc is not None and args.nproc > 1:
        if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
            _fail("--nproc starts the processes itself: do not combine it with torchrun")
        import torch

        from .training.distributed import launch

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device.startswith("cuda") and args.nproc > torch.cuda.device_count():
            _fail(f"--nproc {args.nproc} with --device cuda needs one GPU per process; this "
                  f"machine has {torch.cuda.device_count()} (use --device cpu for gloo)")

        return launch(_without_nproc(argv), args.nproc, timeout=args.dist_timeout or 600.0)
    config = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    try:
        results = train(config, resume=args.resume)
    except ConfigError as err:
        _fail(str(err), every_rank=True)
    except DistributedError as err:  # another rank died or hangs
        print(f"{PROG}: error: {err}", file=sys.stderr)
        if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
            # the process group is broken: gloo/NCCL threads still wait on the lost peer and
            # abort the interpreter at shutdown ("terminate called ..."); leave at once
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)
        return 1
    except TrainingInterrupted as err:
        if _rank() == 0:
            print(f"{PROG}: {err}; continue with: {PROG} --out {err.out} --resume",
                  file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # a second Ctrl-C: stopped without saving
        print(f"\n{PROG}: aborted; the last periodic checkpoint (if any) is still in --out",
              file=sys.stderr)
        return 130
    except FloatingPointError as err:  # the meta-training loss diverged (on every rank)
        if _rank() == 0:
            print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1
    if _rank() != 0:
        return 0  # rank 0 prints the summary
    test = results["test"]
    if test["metric"] == "mse":
        score = f"test MSE {test['mean']:.4f} +/- {test['ci95']:.4f}"
    else:
        score = f"test accuracy {100 * test['mean']:.2f}% +/- {100 * test['ci95']:.2f}%"
    out = results["args"]["out"]
    print(f"{score} ({test['tasks']} tasks, {test['inner_steps']} inner steps); "
          f"{results['iterations']} iterations in {results['train_time_s']:.1f} s "
          f"+ test {results['test_time_s']:.1f} s on {results['device']}")
    print(f"outputs in {out}/: {METRICS}, {RESULTS}, {CURVE}, {CHECKPOINT}")
    return 0


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def entry() -> None:
    """The ``meta-train`` console script: :func:`main`, then exit. A rank of several processes
    leaves with ``os._exit`` once its output is flushed: gloo's threads can otherwise abort the
    interpreter at shutdown ("terminate called without an active exception", exit -6) after a
    run that succeeded and wrote everything."""
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code if isinstance(code, int) else 1)
    sys.exit(code)


if __name__ == "__main__":
    entry()
