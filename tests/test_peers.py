"""Peer-library MAML meta-gradients (benchmarks/peers) agree with the hand-written reference.

Tiny float64 setting: 2 tasks, 5-way 1-shot, 2 queries per class, Conv4 with 8 filters, K=2
inner SGD steps.  Peers that are not installed are skipped with the reason.  The reference
(``plain``) is itself checked against central finite differences.

Relative errors are measured per parameter tensor against ``max(|ref_k|, |ref|)``: the conv biases
feed straight into BatchNorm, so their true meta-gradient is exactly zero and their computed
value is rounding noise; a per-tensor relative error there would compare noise with noise.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks.peers import maml as peers  # noqa: E402
from benchmarks.peers.conv4 import conv4, omniglot_like_batch  # noqa: E402

DT = torch.float64
TASKS, WAYS, SHOTS, QUERIES, HIDDEN, K, LR = 2, 5, 1, 2, 8, 2, 0.4
RTOL = 1e-9

AVAILABLE = peers.available_peers()
OTHER_PEERS = [name for name in peers.PEERS if name != "plain"]


def _require(peer: str) -> None:
    ok, reason = AVAILABLE[peer]
    if not ok:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def problem():
    model = conv4(WAYS, HIDDEN, dtype=DT, seed=0)
    xs, ys, xq, yq = omniglot_like_batch(TASKS, WAYS, SHOTS, QUERIES, dtype=DT, seed=1)
    return model, (xs, ys, xq, yq)


def _max_rel_err(got: dict, ref: dict) -> float:
    assert got.keys() == ref.keys()
    total = torch.sqrt(sum(r.pow(2).sum() for r in ref.values()))
    assert total > 0
    errs = []
    for name, r in ref.items():
        g = got[name]
        assert g.shape == r.shape and g.dtype == r.dtype, name
        errs.append(((g - r).norm() / torch.maximum(r.norm(), total)).item())
    return max(errs)


@pytest.mark.parametrize("first_order", [False, True], ids=["second_order", "first_order"])
@pytest.mark.parametrize("peer", OTHER_PEERS)
def test_peer_matches_plain(problem, peer, first_order):
    _require(peer)
    model, data = problem
    ref = peers.meta_grad_plain(model, *data, LR, K, first_order=first_order)
    got = peers.PEERS[peer](model, *data, LR, K, first_order=first_order)
    assert _max_rel_err(got, ref) <= RTOL


def test_first_order_differs_from_second_order(problem):
    """Guards against a 'second order' path that silently drops the inner-gradient graph."""
    model, data = problem
    so = peers.meta_grad_plain(model, *data, LR, K)
    fo = peers.meta_grad_plain(model, *data, LR, K, first_order=True)
    assert _max_rel_err(fo, so) > 1e-3


@pytest.mark.parametrize("peer", list(peers.PEERS))
def test_peer_leaves_model_untouched(problem, peer):
    _require(peer)
    model, data = problem
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    sentinel = {n: torch.full_like(p, 7.0) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = sentinel[n].clone()
    model.eval()
    try:
        peers.PEERS[peer](model, *data, LR, K)
        assert not model.training
        for n, p in model.named_parameters():
            assert torch.equal(p.detach(), before[n]), n
            assert torch.equal(p.grad, sentinel[n]), n
    finally:
        model.train()
        for p in model.parameters():
            p.grad = None


def _meta_loss(model, params: dict, xs, ys, xq, yq, lr, steps) -> torch.Tensor:
    """Mean query loss after ``steps`` SGD steps, a plain function of ``params`` (for FD)."""
    total = 0.0
    for t in range(xs.shape[0]):
        fast = dict(params)
        for _ in range(steps):
            fast = {n: w.detach().requires_grad_() for n, w in fast.items()}
            loss = F.cross_entropy(functional_call(model, (fast,), (xs[t],)), ys[t])
            grads = torch.autograd.grad(loss, list(fast.values()))
            fast = {n: w.detach() - lr * g for (n, w), g in zip(fast.items(), grads)}
        total = total + F.cross_entropy(functional_call(model, (fast,), (xq[t],)), yq[t])
    return total / xs.shape[0]


def test_plain_second_order_matches_finite_differences(problem):
    model, data = problem
    ref = peers.meta_grad_plain(model, *data, LR, K)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    name = "3.weight"  # second conv layer: the meta-gradient goes through the whole inner loop
    gen = torch.Generator().manual_seed(3)
    coords = torch.randint(0, params[name].numel(), (4,), generator=gen)
    h = 1e-6
    for i in coords.tolist():
        plus, minus = dict(params), dict(params)
        plus[name] = params[name].flatten().clone()
        minus[name] = params[name].flatten().clone()
        plus[name][i] += h
        minus[name][i] -= h
        plus[name] = plus[name].view_as(params[name])
        minus[name] = minus[name].view_as(params[name])
        with torch.enable_grad():
            fd = (_meta_loss(model, plus, *data, LR, K) - _meta_loss(model, minus, *data, LR, K))
        fd = (fd / (2 * h)).item()
        exact = ref[name].flatten()[i].item()
        assert fd == pytest.approx(exact, rel=1e-6, abs=1e-9), (i, fd, exact)


# ----------------------------------------------------------------------------- iMAML

REG, CG_ITERS, IMAML_STEPS, IMAML_LR = 50.0, 8, 3, 0.05


@pytest.mark.filterwarnings("ignore:We've integrated functorch:FutureWarning")
def test_imaml_torchopt_matches_plain(problem):
    _require("torchopt")
    model, data = problem
    ref = peers.imaml_grad_plain(model, *data, IMAML_LR, IMAML_STEPS, REG, CG_ITERS)
    got = peers.imaml_grad_torchopt(model, *data, IMAML_LR, IMAML_STEPS, REG, CG_ITERS)
    assert _max_rel_err(got, ref) <= RTOL


def test_imaml_plain_matches_dense_solve():
    """With CG run to convergence, the plain iMAML gradient is reg (H + reg I)^-1 grad L_q."""
    model = conv4(WAYS, 4, dtype=DT, seed=0)
    xs, ys, xq, yq = omniglot_like_batch(TASKS, WAYS, SHOTS, QUERIES, dtype=DT, seed=1)
    got = peers.imaml_grad_plain(model, xs, ys, xq, yq, IMAML_LR, IMAML_STEPS, REG, 200)

    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    theta = torch.cat([p.detach().flatten() for p in model.parameters()])

    def unflat(v):
        return dict(zip(names, (c.view(s) for c, s in zip(v.split([s.numel() for s in shapes]),
                                                          shapes))))

    def loss(v, x, y):
        return F.cross_entropy(functional_call(model, (unflat(v),), (x,)), y)

    exact = torch.zeros_like(theta)
    for t in range(TASKS):
        def prox(v, t=t):
            return loss(v, xs[t], ys[t]) + 0.5 * REG * (v - theta).pow(2).sum()

        phi = theta.clone()
        for _ in range(IMAML_STEPS):
            phi = phi - IMAML_LR * torch.func.grad(prox)(phi)
        # jacrev(grad), not torch.func.hessian: see the note in benchmarks/peers/INSTALL.md
        hess = torch.func.jacrev(torch.func.grad(prox))(phi)
        g = torch.func.grad(loss)(phi, xq[t], yq[t])
        exact += REG * torch.linalg.solve(hess, g) / TASKS
    assert _max_rel_err(got, unflat(exact)) <= 1e-8


def test_available_peers_reports_every_peer():
    assert set(AVAILABLE) == set(peers.PEERS)
    assert AVAILABLE["plain"][0]
    for ok, reason in AVAILABLE.values():
        assert isinstance(ok, bool) and reason


def test_unavailable_peer_raises_clear_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "higher", None)  # makes ``import higher`` fail
    x, y = torch.zeros(1, 2, 2), torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(ImportError, match="peer 'higher' is unavailable"):
        peers.meta_grad_higher(torch.nn.Linear(2, 2), x, y, x, y, 0.1, 1)


def test_learn2learn_placeholders_do_not_leak():
    """gym/torchvision placeholders exist only during ``import learn2learn``."""
    _require("learn2learn")
    from benchmarks.peers import _stubs

    for root in _stubs.STUB_ROOTS:
        module = sys.modules.get(root)
        assert module is None or not _stubs.is_stub(module), root
