"""``meta-train`` on several processes: joining the process group, the ``--nproc`` launcher,
sharded evaluation, and the few collectives the loop needs besides :mod:`meta.distributed`.

Launch with ``torchrun --nproc_per_node N $(which meta-train) ...`` or ``meta-train --nproc N
...`` (:func:`launch`: N local processes with torchrun's environment). gloo on CPU, NCCL on
CUDA (process ``r`` on ``cuda:LOCAL_RANK``). Per iteration every rank draws ONLY its shard of the
global meta-batch, ``stream.shard(i, rank, world)`` (tasks ``task_ids(i)[rank::world]``, which
depend on ``(seed, split, task)`` alone), and :func:`meta.distributed.meta_step` reduces the
meta-gradient, the task count and the metrics in one flattened ``all_reduce(SUM)`` (two for
Sharp-MAML's upper SAM); every rank then takes the same Adam step. Rank 0 alone writes files.
"""

from __future__ import annotations

import datetime
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .. import distributed as D
from ..tasks import TaskBatch

__all__ = ["Ranks", "join", "launch", "evaluate_sharded", "any_rank", "gather_objects",
           "broadcast_object", "barrier", "leave"]


@dataclass
class Ranks:
    """Where this process stands: ``rank`` of ``world``, ``backend`` (``None`` for one
    process), ``device`` and whether :func:`join` created the process group (``owner``)."""

    rank: int = 0
    world: int = 1
    backend: str | None = None
    device: str = "cpu"
    owner: bool = False

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def join(device: str, timeout: float) -> Ranks:
    """Join the process group described by torchrun's environment (``WORLD_SIZE`` > 1), or
    return the one-process :class:`Ranks`. The backend follows ``device``: ``cuda`` -> NCCL on
    ``cuda:LOCAL_RANK``, ``cpu`` -> gloo. ``timeout`` (seconds) bounds every collective."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1 and not D.is_active():
        return Ranks(device=device)
    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")) or 1)
    if backend == "nccl" and not D.is_active() and local > torch.cuda.device_count():
        from .config import ConfigError  # every rank of the machine fails here, together

        raise ConfigError(f"{local} processes on this machine but {torch.cuda.device_count()} "
                          f"CUDA device(s): one GPU per process (or --device cpu, gloo)")
    owner = not D.is_active()
    rank, world, dev = D.init(backend, timeout=datetime.timedelta(seconds=float(timeout)))
    if D.is_active():
        backend = dist.get_backend()
    return Ranks(rank, world, backend, str(dev) if backend == "nccl" else device, owner)


def leave(ranks: Ranks) -> None:
    """Destroy the process group that :func:`join` created (after a last barrier)."""
    if ranks.owner and D.is_active():
        dist.destroy_process_group()


def _tensor(values: Sequence[float], ranks: Ranks) -> torch.Tensor:
    device = ranks.device if ranks.backend == "nccl" else "cpu"
    return torch.tensor(list(values), dtype=torch.float64, device=device)


def any_rank(flag: bool, ranks: Ranks, what: str = "the stop request") -> bool:
    """True on every rank when ``flag`` is True on any (one 1-element ``all_reduce(MAX)``):
    Ctrl-C reaches the ranks at different moments, but they must stop after the same step."""
    if not ranks.active:
        return flag
    t = _tensor([1.0 if flag else 0.0], ranks)
    D._collective(f"all_reduce of {what}", dist.all_reduce, t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def barrier(ranks: Ranks, what: str) -> None:
    """Wait for every rank (an ``all_reduce`` of one number, under the collective timeout)."""
    if ranks.active:
        D._collective(what, dist.all_reduce, _tensor([0.0], ranks))


def gather_objects(obj: Any, ranks: Ranks, what: str) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if not ranks.active:
        return [obj]
    out: list[Any] = [None] * ranks.world
    D._collective(what, dist.all_gather_object, out, obj)
    return out


def broadcast_object(obj: Any, ranks: Ranks, what: str) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not ranks.active:
        return obj
    box = [obj]
    D._collective(what, dist.broadcast_object_list, box, 0)
    return box[0]


def evaluate_sharded(learner, stream, num_tasks: int, batch_size: int, ranks: Ranks
                     ) -> tuple[float, float]:
    """``learner.evaluate`` over tasks ``0 .. num_tasks-1`` of ``stream``, each rank scoring
    tasks ``rank::world`` (in batches of ``batch_size``); returns the mean and the 95% CI of
    all ``num_tasks`` scores, as one process computes them (ci95 = 1.96·σ/√n, σ with ddof 0).

    Each rank turns its ``(mean m_r, ci c_r)`` over ``n_r`` tasks back into the sums
    ``S1 = n_r m_r`` and ``S2 = n_r (σ_r² + m_r²)`` (σ_r = c_r √n_r / 1.96); one
    ``all_reduce(SUM)`` of ``(n, S1, S2)`` gives ``m = S1/N`` and ``σ² = S2/N - m²``."""
    if not ranks.active:
        return learner.evaluate(stream.batches(0), num_tasks=num_tasks)
    ids = list(D.shard(num_tasks, ranks.rank, ranks.world))

    def batches():
        for k in range(0, len(ids), batch_size):
            yield stream.tasks(ids[k:k + batch_size])

    n, s1, s2 = 0.0, 0.0, 0.0
    if ids:
        mean, ci = learner.evaluate(batches(), num_tasks=len(ids))
        n = float(len(ids))
        std = ci * math.sqrt(n) / 1.96
        s1, s2 = n * mean, n * (std * std + mean * mean)
    t = _tensor([n, s1, s2], ranks)
    D._collective("all_reduce of the evaluation scores", dist.all_reduce, t,
                  op=dist.ReduceOp.SUM)
    total, s1, s2 = t.tolist()
    mean = s1 / total
    var = max(s2 / total - mean * mean, 0.0)
    return mean, 1.96 * math.sqrt(var) / math.sqrt(total)


# ----------------------------------------------------------------------------- --nproc N


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(argv: Sequence[str], nproc: int, *, timeout: float = 600.0,
           stream=None) -> int:
    """Run ``python -m meta.cli ARGV`` in ``nproc`` local processes with torchrun's
    environment (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``,
    ``MASTER_ADDR=127.0.0.1``, a free ``MASTER_PORT``; ``OMP_NUM_THREADS`` = cores / nproc
    unless set). Returns 0 when every rank succeeded, else the first failing rank's status.
    When a rank fails, the others leave by themselves (their next collective fails, at the
    latest after ``timeout`` seconds); any still running ``timeout + 30`` s later are killed."""
    stream = sys.stderr if stream is None else stream
    package_root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env.update({"WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc),
                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
                "PYTHONPATH": os.pathsep.join(p for p in (package_root,
                                                          env.get("PYTHONPATH")) if p)})
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    procs = []
    for r in range(nproc):
        procs.append(subprocess.Popen([sys.executable, "-m", "meta.cli", *argv],
                                      env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}))
    first_failure: tuple[int, int] | None = None
    deadline = None
    old = signal.getsignal(signal.SIGINT)
    # Ctrl-C reaches the children too (same process group): they stop after the same step
    signal.signal(signal.SIGINT, lambda *a: None)
    try:
        while True:
            codes = [p.poll() for p in procs]
            for r, code in enumerate(codes):
                if code not in (None, 0) and first_failure is None:
                    first_failure = (r, code)
                    deadline = time.monotonic() + timeout + 30
                    if code != 130:  # 130: stopped by Ctrl-C, like the others
                        stream.write(f"meta-train: rank {r} of {nproc} exited with status "
                                     f"{code}; waiting for the other ranks to stop\n")
            if all(c is not None for c in codes):
                break
            if deadline is not None and time.monotonic() > deadline:
                for r, p in enumerate(procs):
                    if p.poll() is None:
                        stream.write(f"meta-train: killing rank {r} (still running "
                                     f"{timeout + 30:.0f} s after rank {first_failure[0]} "
                                     f"failed)\n")
                        p.kill()
                for p in procs:
                    p.wait()
                break
            time.sleep(0.05)
    finally:
        signal.signal(signal.SIGINT, old)
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    if first_failure is not None:
        return first_failure[1]
    return next((p.returncode for p in procs if p.returncode), 0)


def empty_to_none(batch: TaskBatch) -> TaskBatch | None:
    """``None`` for a shard of zero tasks (what :func:`meta.distributed.meta_step` takes)."""
    return None if batch.num_tasks == 0 else batch
