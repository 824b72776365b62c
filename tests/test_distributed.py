"""meta.distributed: 2 processes with gloo on localhost reduce the meta-gradient of the global
batch exactly (float64, 1e-12), keep the parameters identical, and fail loudly when a rank dies.

The ranks run tests/_dist_worker.py (one subprocess per rank, a free port, a timeout); the
one-process reference is computed here with the same model, learner and data.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import meta
from meta import distributed as D

sys.path.insert(0, str(Path(__file__).parent))
import _dist_worker as W  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).parent / "_dist_worker.py"
TOL = 1e-12
# Sharp-MAML's upper step normalises by the global gradient norm, which amplifies the rounding of
# the per-rank partial sums (another summation order than one process): 4.4e-12 relative on an
# Intel Xeon (AVX-512) VM, 2026-12-03; local-norm SAM is > 1e-9 away (tested below)
TOL_SHARP = 1e-10

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(scenario: str, out: Path, timeout_s: float = 60.0, world: int = 2
           ) -> list[subprocess.Popen]:
    port = free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        if "GLOO_SOCKET_IFNAME" not in env and os.path.exists("/sys/class/net/lo"):
            env["GLOO_SOCKET_IFNAME"] = "lo"  # gloo on the loopback interface
        procs.append(subprocess.Popen(
            [sys.executable, str(WORKER), scenario, str(out), str(timeout_s)], cwd=ROOT,
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        return -999, out + err
    return proc.returncode, out + err


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Run the ``grads`` scenario once on 2 ranks; return both ranks' results."""
    out = tmp_path_factory.mktemp("dist")
    procs = launch("grads", out)
    logs = [finish(p, 240) for p in procs]
    for rank, (code, log) in enumerate(logs):
        assert code == 0, f"rank {rank} failed (exit {code}):\n{log[-3000:]}"
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def reference(algo: str, n_tasks: int):
    """One process, the whole global batch, with the ranks' single intra-op thread: with more
    threads the reductions sum in another order, and Sign-MAML's sign() turns that rounding
    noise on near-zero gradient coordinates into whole steps."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = W.make_model()
        learner = W.make_learner(algo, model)
        metrics = learner.meta_step(W.global_batch(n_tasks, seed=n_tasks))
    finally:
        torch.set_num_threads(threads)
    return W.grads_of(model), metrics


def max_rel_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    worst = 0.0
    for n in a:
        assert (a[n] is None) == (b[n] is None), f"{n}: .grad None on one side only"
        if a[n] is None:
            continue
        scale = max(1.0, float(b[n].abs().max()))
        worst = max(worst, float((a[n] - b[n]).abs().max()) / scale)
    return worst


@pytest.mark.parametrize("algo", sorted(W.LEARNERS))
def test_two_ranks_equal_one_process(two_ranks, algo):
    for b in W.BATCH_SIZES:
        want_grads, want_metrics = reference(algo, b)
        for rank, res in enumerate(two_ranks):
            got = res[(algo, b)]
            assert got["local"] == len(D.shard(b, rank, 2))  # B = 1: rank 1 holds no task
            tol = TOL_SHARP if algo == "sharpmaml" else TOL
            assert max_rel_diff(got["grads"], want_grads) <= tol, (algo, b, rank)
            assert got["metrics"]["tasks"] == b
            for k in ("loss", "accuracy"):
                assert got["metrics"][k] == pytest.approx(want_metrics[k], rel=TOL, abs=TOL)
        # both ranks hold bitwise the same .grad: the same optimiser step everywhere
        g0, g1 = two_ranks[0][(algo, b)]["grads"], two_ranks[1][(algo, b)]["grads"]
        assert all((g0[n] is None and g1[n] is None) or torch.equal(g0[n], g1[n]) for n in g0)


@pytest.mark.parametrize("algo", ["maml", "anil", "sharpmaml"])
def test_vmapped_learners_on_two_ranks_equal_one_looped_process(two_ranks, algo):
    want_grads, want_metrics = reference(algo, 3)
    for res in two_ranks:
        got = res[("vmap", algo)]
        assert max_rel_diff(got["grads"], want_grads) <= 1e-10  # vmap vs loop: rounding only
        assert got["metrics"]["loss"] == pytest.approx(want_metrics["loss"], rel=1e-10)


def test_memory_reduced_head_gets_no_grad_on_any_rank(two_ranks):
    for rank in range(2):
        grads = two_ranks[rank][("memoryreduced", 1)]["grads"]
        assert grads["head.weight"] is None and grads["features.block1.conv.weight"] is not None


def test_sharp_maml_uses_the_global_gradient_norm(two_ranks):
    """The per-rank (local-norm) upper SAM step would differ: the reduction must be global."""
    want, _ = reference("sharpmaml", 4)
    model = W.make_model()
    learner = W.make_learner("sharpmaml", model)
    batch = W.global_batch(4, seed=4)
    local_norm_mean = {}
    for r in range(2):  # what each rank would get with its own norm, averaged
        model.zero_grad(set_to_none=True)
        learner.meta_step(D.shard_batch(batch, r, 2))
        for n, g in W.grads_of(model).items():
            local_norm_mean[n] = local_norm_mean.get(n, 0) + g / 2
    assert max_rel_diff(local_norm_mean, want) > 1e-9  # the test can tell them apart
    assert max_rel_diff(two_ranks[0][("sharpmaml", 4)]["grads"], want) <= TOL_SHARP


def test_parameters_identical_after_optimiser_steps(two_ranks):
    p0, p1 = two_ranks[0]["plain"]["params"], two_ranks[1]["plain"]["params"]
    assert all(torch.equal(p0[n], p1[n]) for n in p0)
    # and equal to one process taking the same SGD steps on the global batches (not Adam: it
    # normalises the ~1e-17 rounding noise of the zero gradient of a conv bias before BN)
    model = W.make_model()
    learner = W.make_learner("maml", model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for it in range(3):
        opt.zero_grad()
        learner.meta_step(W.global_batch(3, seed=100 + it))
        opt.step()
    for n, p in model.named_parameters():
        assert torch.allclose(p0[n], p.detach(), rtol=0, atol=1e-10), n


def test_check_in_sync_names_the_diverged_parameter(two_ranks):
    for rank in range(2):
        assert "'head.bias' differs between ranks" in two_ranks[rank]["desync"]


def _failing_rank(scenario: str, tmp_path, timeout_s: float) -> tuple[int, str, float]:
    t0 = time.perf_counter()
    procs = launch(scenario, tmp_path, timeout_s=timeout_s)
    code, log = finish(procs[0], timeout_s + 60)
    elapsed = time.perf_counter() - t0
    for p in procs[1:]:
        p.kill()
        p.communicate()
    return code, log, elapsed


def test_a_dead_rank_makes_the_other_exit_with_a_clear_message(tmp_path):
    code, log, elapsed = _failing_rank("dies", tmp_path, timeout_s=10.0)
    assert code not in (0, -999), log[-2000:]
    assert "DistributedError" in log and "rank 0 of 2: all_reduce of the meta-gradient " \
        "failed" in log and "Another rank has probably died" in log, log[-2000:]
    assert elapsed < 10.0 + 45, elapsed  # within the timeout (+ interpreter start-up)


def test_a_hanging_rank_makes_the_other_exit_after_the_timeout(tmp_path):
    code, log, elapsed = _failing_rank("hangs", tmp_path, timeout_s=4.0)
    assert code not in (0, -999), log[-2000:]
    assert "DistributedError" in log and "rank 0 of 2" in log, log[-2000:]
    assert elapsed < 4.0 + 45, elapsed


# ----------------------------------------------------------------------------- one process


def test_shard_covers_every_task_once():
    for n in range(0, 9):
        for world in (1, 2, 3, 5):
            parts = [list(D.shard(n, r, world)) for r in range(world)]
            assert sorted(sum(parts, [])) == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert list(D.shard(1, 1, 2)) == []
    with pytest.raises(ValueError, match="rank"):
        D.shard(4, 2, 2)
    with pytest.raises(ValueError, match="n_tasks"):
        D.shard(-1, 0, 2)


def test_without_a_process_group_everything_is_local():
    model = W.make_model()
    learner = W.make_learner("maml", model)
    batch = W.global_batch(3, seed=3)
    want, want_m = reference("maml", 3)
    out = D.meta_step(learner, batch)
    assert max_rel_diff(W.grads_of(model), want) <= TOL and out["tasks"] == 3
    assert out["loss"] == pytest.approx(want_m["loss"], rel=TOL)
    # meta_step ADDS to .grad, like learner.meta_step
    D.meta_step(learner, batch)
    assert max_rel_diff(W.grads_of(model), {n: 2 * g for n, g in want.items()}) <= TOL
    D.broadcast_parameters(model)  # no-ops
    D.check_in_sync(model)
    assert D.shard_batch(batch, 1, 2).num_tasks == 1 and D.shard_batch(batch).num_tasks == 3


def test_init_without_world_size_is_a_single_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert D.init("gloo") == (0, 1, torch.device("cpu"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(D.DistributedError, match="torchrun"):
        D.init("gloo")
    with pytest.raises(ValueError, match="backend"):
        D.init("tcp")


def test_reduce_mean_refuses_an_empty_global_batch_and_unknown_shapes():
    with pytest.raises(ValueError, match="no rank had any task"):
        D.reduce_mean({"w": torch.zeros(2)}, 0)
    with pytest.raises(ValueError, match="shape is unknown"):
        D.reduce_mean({"w": None}, 1)
    g, m = D.reduce_mean({"w": torch.ones(2), "v": None}, 2, {"loss": 0.5},
                         shapes={"v": ((3,), torch.float32, torch.device("cpu"))})
    assert torch.equal(g["w"], torch.ones(2)) and g["v"] is None
    assert m == {"loss": 0.5, "tasks": 2}


def test_meta_package_exports_distributed():
    assert meta.distributed is D
