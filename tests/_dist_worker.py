"""One rank of the 2-process gloo tests in tests/test_distributed.py (also importable there).

    RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p python tests/_dist_worker.py \\
        SCENARIO OUT_DIR [TIMEOUT_S]

Scenarios: ``grads`` (every learner, global batches 1, 3, 4: the reduced meta-gradient and
metrics, then an optimiser step and the parameters), ``dies`` (rank 1 exits before the
reduction), ``hangs`` (rank 1 sleeps past the timeout).
"""

from __future__ import annotations

import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import meta  # noqa: E402
from meta import distributed as D  # noqa: E402

BATCH_SIZES = (1, 3, 4)
WAYS, SHOTS, QUERIES, SIZE = 2, 2, 2, 8

#: learner options: tiny and quick, every algorithm in meta.ALGORITHMS
LEARNERS = {
    "maml": {"inner_lr": 0.1, "inner_steps": 2},
    "fomaml": {"inner_lr": 0.1, "inner_steps": 2},
    "anil": {"inner_lr": 0.1, "inner_steps": 2},
    "reptile": {"inner_lr": 0.1, "inner_steps": 2},
    "imaml": {"inner_lr": 0.02, "inner_steps": 3, "cg_iters": 3},
    "signmaml": {"inner_lr": 0.01, "inner_steps": 2},
    "sharpmaml": {"inner_lr": 0.03, "inner_steps": 2, "rho_inner": 0.05, "rho_outer": 0.05},
    "memoryreduced": {"inner_lr": 0.1, "inner_steps": 3, "cg_iters": 3},
}


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return meta.models.Conv4(1, WAYS, hidden=3).double()


def make_learner(algo: str, model: torch.nn.Module):
    return meta.make_learner(algo, model, **LEARNERS[algo])


def global_batch(n_tasks: int, seed: int) -> meta.TaskBatch:
    """The same global meta-batch on every rank (depends only on the seed)."""
    gen = torch.Generator().manual_seed(seed)
    protos = torch.randn(n_tasks, WAYS, SIZE, SIZE, generator=gen, dtype=torch.float64)

    def split(n):
        y = torch.arange(WAYS).repeat_interleave(n).expand(n_tasks, -1).contiguous()
        x = protos[:, y[0]] + 0.3 * torch.randn(n_tasks, WAYS * n, SIZE, SIZE, generator=gen,
                                                dtype=torch.float64)
        return x, y

    return meta.TaskBatch(split(SHOTS), split(QUERIES))


def grads_of(model: torch.nn.Module) -> dict[str, torch.Tensor | None]:
    return {n: None if p.grad is None else p.grad.detach().clone()
            for n, p in model.named_parameters()}


def scenario_grads(rank: int, world: int, out: str) -> None:
    results = {}
    for algo in LEARNERS:
        for b in BATCH_SIZES:
            model = make_model()
            if rank == 1:  # broadcast_parameters must undo this
                with torch.no_grad():
                    for p in model.parameters():
                        p.add_(1.0)
            D.broadcast_parameters(model)
            learner = make_learner(algo, model)
            local = D.shard_batch(global_batch(b, seed=b))
            metrics = D.meta_step(learner, local)
            results[(algo, b)] = {"grads": grads_of(model), "metrics": metrics,
                                  "local": 0 if local is None else local.num_tasks}
    for algo in ("maml", "anil", "sharpmaml"):  # vmapped learners reduce the same way
        model = make_model()
        learner = meta.make_learner(algo, model, vectorize=True, **LEARNERS[algo])
        metrics = D.meta_step(learner, D.shard_batch(global_batch(3, seed=3)))
        results[("vmap", algo)] = {"grads": grads_of(model), "metrics": metrics}
    # the plain API (learner.meta_step + all_reduce_meta_grad), then an optimiser step
    model = make_model()
    learner = make_learner("maml", model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for it in range(3):
        opt.zero_grad()
        local = D.shard_batch(global_batch(3, seed=100 + it))
        m = learner.meta_step(local) if local is not None else {"loss": 0.0, "accuracy": 0.0}
        m = D.all_reduce_meta_grad(model, 0 if local is None else local.num_tasks, m)
        opt.step()
    D.check_in_sync(model)
    results["plain"] = {"grads": grads_of(model), "metrics": m,
                        "params": {n: p.detach().clone() for n, p in model.named_parameters()}}
    # check_in_sync must catch a difference
    if rank == 1:
        with torch.no_grad():
            model.head.bias[0] += 1e-9
    try:
        D.check_in_sync(model)
        results["desync"] = "not detected"
    except D.DistributedError as err:
        results["desync"] = str(err)
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))


def scenario_dies(rank: int, world: int, out: str) -> None:
    model = make_model()
    learner = make_learner("maml", model)
    if rank == 1:
        os._exit(3)  # dies without a word, before the reduction
    time.sleep(0.5)
    D.meta_step(learner, D.shard_batch(global_batch(2, seed=0)))
    print("rank 0 finished the meta-step (the dead rank was not noticed)", flush=True)


def scenario_hangs(rank: int, world: int, out: str) -> None:
    model = make_model()
    learner = make_learner("maml", model)
    if rank == 1:
        time.sleep(120)  # alive but never reaches the collective
        return
    D.meta_step(learner, D.shard_batch(global_batch(2, seed=0)))
    print("rank 0 finished the meta-step (the hanging rank was not noticed)", flush=True)


def main() -> None:
    scenario, out = sys.argv[1], sys.argv[2]
    timeout = float(sys.argv[3]) if len(sys.argv) > 3 else 60.0
    torch.set_num_threads(1)
    rank, world, _ = D.init("gloo", timeout=timeout)
    try:
        {"grads": scenario_grads, "dies": scenario_dies, "hangs": scenario_hangs}[scenario](
            rank, world, out)
    finally:
        if scenario == "grads":
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
