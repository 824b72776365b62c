"""Meta-training on several processes with plain ``torch.distributed`` collectives (no DDP).

Why not ``DistributedDataParallel``: DDP all-reduces gradients from hooks that fire while
``loss.backward()`` accumulates ``.grad``. The learners of :mod:`meta` compute meta-gradients
functionally (``torch.func`` / ``torch.autograd.grad`` through the inner loop) and write them
into ``.grad`` themselves, so DDP's hooks never fire (and a model used outside DDP's
``forward``, K times per task, trips its "marked ready twice" check). The meta-gradient is an
explicit pytree, so it is communicated explicitly:

1. every rank draws the SAME global meta-batch of B tasks (seeded by (seed, iteration)) and keeps
   its shard, :func:`shard` (``range(rank, B, world)``: ⌈B/W⌉ or ⌊B/W⌋ tasks, possibly none);
2. ``learner.meta_step(local_batch)`` puts the LOCAL per-task mean ḡ_r into ``.grad``;
3. :func:`all_reduce_meta_grad` sends n_r·ḡ_r, n_r and n_r·(metrics) in ONE flattened
   ``all_reduce(SUM)`` and writes g = Σ_r n_r ḡ_r / Σ_r n_r into ``.grad``: exactly the mean over
   the global batch that one process would compute (up to summation order), also for unequal
   shards (dividing by the world size instead would weight the tasks of small shards more);
4. every rank takes the same optimiser step on the same ``.grad``: the parameters stay
   identical (they are broadcast once at the start, :func:`broadcast_parameters`, and after a
   resume; :func:`check_in_sync` verifies it).

:func:`meta_step` does 2-3 for any learner, including the two reductions of Sharp-MAML's
upper-level SAM (the perturbation ρ·g/‖g‖ needs the GLOBAL g) and ranks without tasks (they
still take part in every collective). Per-task batch norm statistics stay per task: never use
``SyncBatchNorm`` (it would pool the statistics of different tasks).

Every collective is wrapped: a failure (a rank died, or did not reach the collective within the
process group's timeout, :func:`init`) raises :class:`DistributedError` naming the rank and the
step instead of hanging. Every rank must call each function the same number of times in the
same order (a rank with no tasks too).
"""

from __future__ import annotations

import datetime
import os
import zlib
from collections.abc import Iterable, Mapping

import torch
import torch.distributed as dist
from torch import nn

from .tasks import TaskBatch

__all__ = ["DistributedError", "DEFAULT_TIMEOUT", "init", "is_active", "rank_and_world",
           "shard", "shard_batch", "all_reduce_meta_grad", "reduce_mean", "meta_step",
           "broadcast_parameters", "check_in_sync"]

#: default collective timeout: it must exceed the longest time a rank waits for the others
#: (a whole meta-step of the slowest shard, rank 0's evaluation or checkpoint writing).
DEFAULT_TIMEOUT = datetime.timedelta(minutes=10)

Params = dict[str, torch.Tensor]


class DistributedError(RuntimeError):
    """A collective failed: another rank died, or did not reach it within the timeout."""


# ----------------------------------------------------------------------------- process group


def is_active(group=None) -> bool:
    """True when a process group is initialised (then every helper communicates)."""
    return dist.is_available() and dist.is_initialized()


def rank_and_world(group=None) -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` without a process group."""
    if not is_active():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def init(backend: str | None = None, *, timeout: datetime.timedelta | float = DEFAULT_TIMEOUT,
         init_method: str | None = None) -> tuple[int, int, torch.device]:
    """Join the process group described by the environment (``torchrun`` sets ``RANK``,
    ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``); returns
    ``(rank, world_size, device)``.

    ``backend``: ``"nccl"`` when CUDA is available, else ``"gloo"`` (``None``); with NCCL each
    process takes ``cuda:LOCAL_RANK``. ``timeout`` (a ``timedelta`` or seconds) bounds every
    collective: a rank that died or hangs makes the others raise :class:`DistributedError`
    after at most this long (NCCL: with ``TORCH_NCCL_ASYNC_ERROR_HANDLING``, the default).
    Without ``WORLD_SIZE`` (or with ``WORLD_SIZE=1``) nothing is initialised and ``(0, 1,
    device)`` is returned, so one script runs both ways."""
    if not isinstance(timeout, datetime.timedelta):
        timeout = datetime.timedelta(seconds=float(timeout))
    if timeout.total_seconds() <= 0:
        raise ValueError(f"timeout must be positive, got {timeout}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("gloo", "nccl", "mpi"):
        raise ValueError(f"backend must be 'gloo' (CPU), 'nccl' (CUDA) or 'mpi', got "
                         f"{backend!r}")
    device = (torch.device("cuda", local_rank) if backend == "nccl"
              else torch.device("cpu"))
    if backend == "nccl":
        torch.cuda.set_device(device)
    if world <= 1 and init_method is None:
        return 0, 1, device
    if not is_active():
        if "RANK" not in os.environ and init_method is None:
            raise DistributedError(f"WORLD_SIZE={world} but RANK is not set: launch with "
                                   f"torchrun --nproc_per_node {world} ... (which sets RANK, "
                                   f"LOCAL_RANK, MASTER_ADDR and MASTER_PORT)")
        try:
            dist.init_process_group(backend, init_method=init_method, timeout=timeout,
                                    rank=int(os.environ.get("RANK", "0")), world_size=world,
                                    **({"device_id": device} if backend == "nccl" else {}))
        except Exception as err:
            raise DistributedError(f"rank {os.environ.get('RANK', '?')}: could not join the "
                                   f"{backend} process group of {world} processes within "
                                   f"{timeout}: {err}") from err
    rank, world = rank_and_world()
    return rank, world, device


def _collective(what: str, fn, *args, **kwargs):
    """Run one collective; a failure becomes a DistributedError naming the rank and the step."""
    try:
        return fn(*args, **kwargs)
    except Exception as err:  # DistBackendError, DistNetworkError, gloo/NCCL RuntimeErrors
        rank, world = rank_and_world()
        raise DistributedError(
            f"rank {rank} of {world}: {what} failed: {type(err).__name__}: "
            f"{str(err).strip().splitlines()[0][:300] if str(err).strip() else ''}. Another rank "
            f"has probably died or did not reach this collective within the process group "
            f"timeout (every rank, also one without tasks, must call it once per step).") \
            from err


# ----------------------------------------------------------------------------- sharding


def shard(n_tasks: int, rank: int, world: int) -> range:
    """The task indices of ``rank`` among ``world`` ranks: ``range(rank, n_tasks, world)``
    (strided: ⌈n/W⌉ or ⌊n/W⌋ tasks, an empty range when ``rank >= n_tasks``)."""
    for name, v in (("n_tasks", n_tasks), ("rank", rank), ("world", world)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"{name} must be a non-negative int, got {v!r}")
    if world < 1 or rank >= world:
        raise ValueError(f"need 0 <= rank < world, got rank={rank}, world={world}")
    return range(rank, n_tasks, world)


def shard_batch(batch: TaskBatch, rank: int | None = None, world: int | None = None
                ) -> TaskBatch | None:
    """This rank's tasks of the global ``batch`` (see :func:`shard`), or ``None`` when it has
    none. ``rank``/``world`` default to the process group's."""
    if not isinstance(batch, TaskBatch):
        raise TypeError(f"expected a meta.TaskBatch, got {type(batch).__name__}")
    r, w = rank_and_world()
    idx = shard(batch.num_tasks, r if rank is None else rank, w if world is None else world)
    if len(idx) == 0:
        return None
    sel = torch.tensor(list(idx), device=batch.support[0].device)
    (xs, ys), (xq, yq) = batch.support, batch.query
    return TaskBatch((xs[sel], ys[sel]), (xq[sel], yq[sel]))


# ----------------------------------------------------------------------------- reduction


def _layout_tag(names: list[str], shapes: list[tuple[int, ...]], metric_keys: list[str]) -> int:
    text = "|".join(f"{n}:{s}" for n, s in zip(names, shapes)) + "#" + ",".join(metric_keys)
    return zlib.crc32(text.encode()) % 4096 + 1


def reduce_mean(grads: Mapping[str, torch.Tensor | None], local_task_count: int,
                metrics: Mapping[str, float] | None = None, *, shapes: Mapping | None = None,
                group=None) -> tuple[dict[str, torch.Tensor | None], dict[str, float]]:
    """The global per-task mean of per-rank MEAN gradients, in one ``all_reduce(SUM)``.

    ``grads[name]``: this rank's mean over its ``local_task_count`` tasks (``None`` = no
    gradient here; a rank with no tasks may pass ``None`` everywhere but then needs ``shapes``
    ``{name: (shape, dtype, device)}`` or tensors of the right shape). One flat buffer carries
    [n_r·ḡ_r for every leaf, a has-gradient flag per leaf, n_r, n_r·m_r for every metric, a
    layout tag]; after the SUM, ``g = Σ n_r ḡ_r / N``, ``m = Σ n_r m_r / N`` with
    ``N = Σ n_r``. A leaf that is ``None`` on every rank stays ``None``. Returns
    ``(grads, metrics)``; ``metrics`` also holds ``"tasks": N``. Without a process group it is
    the identity (N = local_task_count). Every rank must pass the same names and metric keys
    (checked: a mismatch raises on every rank)."""
    if not isinstance(local_task_count, int) or isinstance(local_task_count, bool) \
            or local_task_count < 0:
        raise ValueError(f"local_task_count must be a non-negative int, got "
                         f"{local_task_count!r}")
    names = sorted(grads)
    metrics = dict(metrics or {})
    keys = sorted(metrics)
    ref = {}
    for n in names:
        g = grads[n]
        if g is None:
            if shapes is None or n not in shapes:
                raise ValueError(f"reduce_mean: the gradient of {n!r} is None and its shape is "
                                 f"unknown: pass shapes={{name: (shape, dtype, device)}}")
            ref[n] = shapes[n]
        else:
            ref[n] = (tuple(g.shape), g.dtype, g.device)
    if not names:
        raise ValueError("reduce_mean: no gradients to reduce")
    dtype = torch.float64 if any(r[1] == torch.float64 for r in ref.values()) else torch.float32
    device = ref[names[0]][2]
    n_local = float(local_task_count)
    pieces = []
    for n in names:
        g = grads[n]
        shape = ref[n][0]
        if g is None or local_task_count == 0:
            pieces.append(torch.zeros(shape, dtype=dtype, device=device).reshape(-1))
        else:
            pieces.append((g.detach().to(device, dtype) * n_local).reshape(-1))
    flags = [1.0 if grads[n] is not None and local_task_count > 0 else 0.0 for n in names]
    vals = [0.0 if local_task_count == 0 else n_local * float(metrics[k]) for k in keys]
    tag = float(_layout_tag(names, [ref[n][0] for n in names], keys))
    tail = torch.tensor(flags + [n_local] + vals + [tag], dtype=dtype, device=device)
    buf = torch.cat(pieces + [tail])
    rank, world = rank_and_world(group)
    if is_active():
        _collective("all_reduce of the meta-gradient", dist.all_reduce, buf,
                    op=dist.ReduceOp.SUM, group=group)
    tail = buf[-len(tail):].tolist()
    got_flags, total = tail[:len(names)], tail[len(names)]
    got_vals, got_tag = tail[len(names) + 1:-1], tail[-1]
    if got_tag != tag * world:
        raise DistributedError(f"rank {rank} of {world}: the ranks reduced different gradient "
                               f"layouts or metric keys (this rank: {len(names)} leaves, "
                               f"metrics {keys}); every rank must pass the same names")
    if total == 0:
        raise ValueError("reduce_mean: no rank had any task (the global meta-batch is empty)")
    out: dict[str, torch.Tensor | None] = {}
    offset = 0
    for n, flag in zip(names, got_flags):
        shape, dt, dev = ref[n]
        size = 1
        for s in shape:
            size *= s
        out[n] = None if flag == 0 else (buf[offset:offset + size] / total).reshape(shape).to(
            dev, dt)
        offset += size
    mean_metrics = {k: v / total for k, v in zip(keys, got_vals)}
    mean_metrics["tasks"] = int(round(total))
    return out, mean_metrics


def _named(model_or_params: nn.Module | Iterable[torch.Tensor] | Mapping[str, torch.Tensor]
           ) -> dict[str, torch.Tensor]:
    if isinstance(model_or_params, nn.Module):
        return {n: p for n, p in model_or_params.named_parameters() if p.requires_grad}
    if isinstance(model_or_params, Mapping):
        return dict(model_or_params)
    return {str(i): p for i, p in enumerate(model_or_params)}


def all_reduce_meta_grad(model_or_params: nn.Module | Iterable[torch.Tensor],
                         local_task_count: int, metrics: Mapping[str, float] | None = None, *,
                         group=None) -> dict[str, float]:
    """Replace every parameter's ``.grad`` (this rank's mean meta-gradient over its
    ``local_task_count`` tasks, as ``learner.meta_step`` leaves it after ``zero_grad``) by the
    mean over the GLOBAL meta-batch; returns the global per-task mean of ``metrics`` (e.g. the
    dict ``meta_step`` returned) plus ``"tasks"``. One flattened ``all_reduce(SUM)`` (see
    :func:`reduce_mean`). A rank with no tasks calls it too (with ``local_task_count=0``, the
    same metric keys, any values); a parameter whose ``.grad`` is ``None`` on every rank keeps
    ``None``. Not for Sharp-MAML's upper level (its perturbation needs the global gradient
    first): use :func:`meta_step`. ::

        local = meta.distributed.shard_batch(global_batch)       # None: no task here
        opt.zero_grad()
        out = learner.meta_step(local) if local is not None else {"loss": 0., "accuracy": 0.}
        out = meta.distributed.all_reduce_meta_grad(model, 0 if local is None
                                                    else local.num_tasks, out)
        opt.step()
    """
    params = _named(model_or_params)
    grads = {n: p.grad for n, p in params.items()}
    shapes = {n: (tuple(p.shape), p.dtype, p.device) for n, p in params.items()}
    reduced, mean_metrics = reduce_mean(grads, local_task_count, metrics, shapes=shapes,
                                        group=group)
    for n, p in params.items():
        g = reduced[n]
        p.grad = None if g is None else g.to(p.dtype)
    return mean_metrics


def meta_step(learner, batch: TaskBatch | None, *, group=None) -> dict[str, float]:
    """``learner.meta_step`` over the GLOBAL meta-batch, each rank holding ``batch`` (its shard,
    or ``None``/an empty batch): ADDS the global per-task mean meta-gradient to the model's
    ``.grad`` (like the one-process ``meta_step``) and returns the global metrics
    (``{"loss", "accuracy", "tasks"}``). One ``all_reduce``; two for Sharp-MAML with
    ``rho_outer > 0`` (the first gives the global g at θ, whose norm sets the perturbation
    e = ρ_out·g/‖g‖; the second reduces the meta-gradients at θ + e)."""
    from .algorithms import SharpMAML

    model = learner.model
    n_local = 0 if batch is None else batch.num_tasks
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    previous = {n: p.grad for n, p in params.items()}
    for p in params.values():
        p.grad = None
    try:
        if isinstance(learner, SharpMAML) and learner.rho_outer > 0:
            metrics = _sharp_maml_step(learner, batch, n_local, group)
        else:
            metrics = {"loss": 0.0, "accuracy": 0.0}
            if n_local:
                metrics = dict(learner.meta_step(batch))
            metrics = all_reduce_meta_grad(model, n_local, metrics, group=group)
    finally:
        for n, p in params.items():
            old = previous[n]
            if old is not None:
                p.grad = old if p.grad is None else old.add_(p.grad)
    return metrics


def _sharp_maml_step(learner, batch, n_local: int, group) -> dict[str, float]:
    """Sharp-MAML's upper SAM over the global batch: reduce g(θ), perturb, reduce g(θ + e)."""
    hparams = learner.hparams()
    shapes = {n: (tuple(t.shape), t.dtype, t.device) for n, t in hparams.items()}
    grads: dict[str, torch.Tensor | None] = dict.fromkeys(hparams)
    metrics = {"loss": 0.0, "accuracy": 0.0}
    if n_local:
        local, res = learner.meta_gradient(batch, hparams,
                                           accuracy=learner.loss_name == "cross_entropy")
        grads.update(local)
        acc = res.info.get("accuracy")
        metrics = {"loss": float(res.outer_loss.mean()),
                   "accuracy": float("nan") if acc is None else float(acc.mean())}
    g, metrics = reduce_mean(grads, n_local, metrics, shapes=shapes, group=group)
    if any(v is None for v in g.values()):
        raise RuntimeError("Sharp-MAML: a meta-parameter got no gradient on any rank")
    perturbed: dict[str, torch.Tensor | None] = dict.fromkeys(hparams)
    if n_local:
        perturbed.update(learner.sharp_gradient(batch, hparams, g))  # ‖g‖ = the GLOBAL norm
    g2, _ = reduce_mean(perturbed, n_local, None, shapes=shapes, group=group)
    learner.accumulate({n: t for n, t in g2.items() if t is not None})
    return metrics


# ----------------------------------------------------------------------------- parameters


def _state_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return list(module.named_parameters()) + list(module.named_buffers())


@torch.no_grad()
def broadcast_parameters(module: nn.Module, src: int = 0, *, group=None) -> None:
    """Copy ``src``'s parameters AND buffers into every rank's ``module`` (at the start and
    after a resume), one ``broadcast`` per (dtype, device). No-op without a process group."""
    if not is_active():
        return
    tensors = _state_tensors(module)
    by_kind: dict[tuple, list[torch.Tensor]] = {}
    for _, t in tensors:
        by_kind.setdefault((t.dtype, t.device), []).append(t)
    for (dtype, _), ts in by_kind.items():
        flat = torch.cat([t.detach().reshape(-1) for t in ts])
        _collective(f"broadcast of the parameters ({dtype}) from rank {src}", dist.broadcast,
                    flat, src, group=group)
        offset = 0
        for t in ts:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


@torch.no_grad()
def check_in_sync(module: nn.Module, *, group=None) -> None:
    """Raise :class:`DistributedError` naming the first parameter/buffer that differs between
    ranks (bitwise: elementwise MAX and MIN over the ranks, two ``all_reduce``)."""
    if not is_active():
        return
    tensors = [(n, t) for n, t in _state_tensors(module) if t.is_floating_point()]
    if not tensors:
        return
    flat = torch.cat([t.detach().reshape(-1).double() for _, t in tensors])
    hi, lo = flat.clone(), flat.clone()
    _collective("all_reduce(MAX) of the parameters", dist.all_reduce, hi,
                op=dist.ReduceOp.MAX, group=group)
    _collective("all_reduce(MIN) of the parameters", dist.all_reduce, lo,
                op=dist.ReduceOp.MIN, group=group)
    if torch.equal(hi, lo):
        return
    offset = 0
    rank, world = rank_and_world(group)
    for n, t in tensors:
        size = t.numel()
        diff = (hi[offset:offset + size] - lo[offset:offset + size]).abs()
        if bool((diff > 0).any()):
            raise DistributedError(f"rank {rank} of {world}: {n!r} differs between ranks "
                                   f"(max |difference| {float(diff.max()):.3g}): broadcast the "
                                   f"parameters at start/resume and give every rank the same "
                                   f".grad (meta.distributed.all_reduce_meta_grad)")
        offset += size

