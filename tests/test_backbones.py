"""meta.backbones: MAML's Mini-ImageNet Conv4 and MetaOptNet's ResNet-12 (parameter counts,
shapes), DropBlock, and every learner on both backbones, looped and vmapped (tiny widths)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

import meta
from meta.backbones import (
    DropBlock,
    ResNet12,
    count_parameters,
    dropblock_rate,
    maml_conv4,
)

sys.path.insert(0, str(Path(__file__).parent))
from _dist_worker import LEARNERS  # noqa: E402  (tiny, quick options for every learner)

DT = torch.float64


# ----------------------------------------------------------------------------- Conv4


def test_maml_conv4_has_maml_miniimagenet_size():
    model = maml_conv4()
    assert count_parameters(model) == 32_901  # Finn et al. 2017, Conv4-32, 5-way head
    assert count_parameters(model.features) == 28_896 and model.feature_dim == 800
    x = torch.rand(3, 3, 84, 84)
    feats = model.features(x)
    assert feats.shape == (3, 800) and model(x).shape == (3, 5)
    shapes = []
    h = x
    for i in range(1, 5):
        h = getattr(model.features, f"block{i}")(h)
        shapes.append(tuple(h.shape[1:]))
    assert shapes == [(32, 42, 42), (32, 21, 21), (32, 10, 10), (32, 5, 5)]
    assert count_parameters(maml_conv4(hidden=64)) == 121_093  # the 64-filter variant
    assert maml_conv4(hidden=64, image_size=32).feature_dim == 256  # CIFAR-FS / FC100


def test_conv4_default_is_unchanged_and_flatten_needs_the_image_size():
    model = meta.Conv4(1, 5, hidden=8)
    assert model.feature_dim == 8 and model(torch.rand(2, 28, 28)).shape == (2, 5)
    assert "features.pool" not in dict(model.named_parameters())
    with pytest.raises(ValueError, match="image_size"):
        meta.Conv4(3, 5, hidden=8, max_pool=True, flatten=True)
    strided = meta.Conv4(1, 5, hidden=4, flatten=True, image_size=28)  # 14, 7, 4, 2
    assert strided.feature_dim == 16 and strided(torch.rand(2, 28, 28)).shape == (2, 5)


# ----------------------------------------------------------------------------- ResNet-12


def _block_params(cin: int, c: int) -> int:
    return 9 * cin * c + 2 * 9 * c * c + cin * c + 4 * 2 * c  # 3 convs + shortcut, 4 BNs


def test_resnet12_has_metaoptnet_size_and_shapes():
    with torch.device("meta"):  # shapes and counts of the real model without computing
        model = ResNet12()
        assert count_parameters(model.features) == 12_424_320  # MetaOptNet's "12.4 M"
        assert count_parameters(model.features) == sum(
            _block_params(a, b) for a, b in [(3, 64), (64, 160), (160, 320), (320, 640)])
        assert count_parameters(model) == 12_424_320 + 16_000 * 5 + 5
        x = torch.empty(2, 3, 84, 84)
        h, shapes = x, []
        for i in range(1, 5):
            h = getattr(model.features, f"block{i}")(h)
            shapes.append(tuple(h.shape[1:]))
        assert shapes == [(64, 42, 42), (160, 21, 21), (320, 10, 10), (640, 5, 5)]
        assert model.features(x).shape == (2, 16_000) and model(x).shape == (2, 5)
        small = ResNet12(image_size=32, dropblock_size=2)
        assert small.feature_dim == 2_560
        assert small.features(torch.empty(2, 3, 32, 32)).shape == (2, 2_560)
        pooled = ResNet12(avg_pool=True)
        assert pooled.feature_dim == 640 and pooled(x).shape == (2, 5)
    model = ResNet12(channels=(64, 160, 320, 640), image_size=32)
    for m in model.modules():  # LeakyReLU(0.1), no conv bias
        if isinstance(m, torch.nn.LeakyReLU):
            assert m.negative_slope == 0.1
        if isinstance(m, torch.nn.Conv2d):
            assert m.bias is None
    out = model(torch.rand(2, 3, 32, 32))  # the real width, computed once on small images
    assert out.shape == (2, 5) and bool(torch.isfinite(out).all())


def test_resnet12_refuses_bad_configurations():
    with pytest.raises(ValueError, match="channels"):
        ResNet12(channels=(8, 8, 8))
    with pytest.raises(ValueError, match="too small"):
        ResNet12(image_size=8)
    with pytest.raises(ValueError, match="drop_rate"):
        ResNet12(drop_rate=1.0)


# ----------------------------------------------------------------------------- DropBlock


def test_dropblock_drops_square_blocks_and_keeps_the_mean():
    torch.manual_seed(0)
    block = DropBlock(3, drop_rate=0.1)
    x = torch.ones(32, 8, 12, 12, dtype=DT)
    y = block(x)
    dropped = (y == 0).to(DT)
    assert 0.07 < float(dropped.mean()) < 0.12  # ≈ drop_rate
    assert float(y.sum()) == pytest.approx(x.numel(), rel=1e-12)  # rescaled by |M| / ΣM
    # the dropped set is a union of whole 3x3 squares: its morphological opening is itself
    eroded = -F.max_pool2d(-dropped, 3, stride=1)  # 1 where a whole 3x3 window is dropped
    opened = F.max_pool2d(F.pad(eroded, (2, 2, 2, 2)), 3, stride=1)
    assert torch.equal(opened, dropped)
    block.eval()
    assert torch.equal(block(x), x)
    assert torch.equal(DropBlock(3, 0.0)(x), x)


def test_dropblock_schedule_and_setter():
    assert dropblock_rate(0) == 0.0 and dropblock_rate(20_000) == pytest.approx(0.05)
    assert dropblock_rate(40_000) == pytest.approx(0.1) and dropblock_rate(10 ** 6) == 0.1
    model = ResNet12(channels=(2, 2, 2, 2), image_size=16, drop_rate=0.1, dropblock_size=2)
    model.set_dropblock_rate(0.03)
    rates = [m.drop_rate for m in model.modules() if isinstance(m, DropBlock)]
    assert rates == [0.03, 0.03]  # blocks 3 and 4 only
    assert model.features.block1.dropblock is None and model.features.block1.drop_rate == 0.1


def test_dropblock_under_vmap_different_and_same_randomness():
    model = ResNet12(2, channels=(2, 3, 3, 3), image_size=16, drop_rate=0.3,
                     dropblock_size=2).double()
    params = dict(model.named_parameters())
    x = torch.rand(1, 6, 3, 16, 16, dtype=DT).expand(4, 6, 3, 16, 16)  # 4 identical tasks

    def loss(p, xt):
        return functional_call(model, p, (xt,)).square().mean()

    def task_grad(xt):
        return grad(loss)(params, xt)["features.block1.conv1.weight"]

    with pytest.raises(RuntimeError, match="randomness"):
        vmap(task_grad)(x)  # the default randomness="error" refuses dropout
    torch.manual_seed(0)
    diff = vmap(task_grad, randomness="different")(x)
    same = vmap(task_grad, randomness="same")(x)
    assert bool(torch.isfinite(diff).all()) and bool(torch.isfinite(same).all())
    assert not torch.allclose(diff[0], diff[1])  # a mask per task
    assert torch.allclose(same[0], same[1], rtol=1e-12, atol=0)  # one mask for all tasks
    model.eval()
    det = vmap(task_grad)(x)  # eval(): no randomness at all
    assert torch.allclose(det[0], det[3], rtol=1e-12, atol=0)


# ----------------------------------------------------------------------------- learners


def tiny(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "conv4":
        return maml_conv4(2, hidden=3, image_size=16).double()
    return ResNet12(2, channels=(3, 4, 4, 4), image_size=16, dropblock_size=2).double()


def episodes(tasks: int = 2, seed: int = 0) -> meta.TaskBatch:
    gen = torch.Generator().manual_seed(seed)
    protos = torch.randn(tasks, 2, 3, 16, 16, generator=gen, dtype=DT)

    def split(n):
        y = torch.arange(2).repeat_interleave(n).expand(tasks, -1).contiguous()
        return protos[:, y[0]] + 0.3 * torch.randn(tasks, 2 * n, 3, 16, 16, generator=gen,
                                                   dtype=DT), y

    return meta.TaskBatch(split(2), split(2))


def meta_grad(algo: str, kind: str, vectorize: bool):
    model = tiny(kind)
    # at these untrained tiny backbones ∇²g has eigenvalues near −70 after 3 inner steps: the
    # iMAML system ∇²g + reg·I is indefinite for reg ≤ 5, CG breaks down and (flagged) returns
    # its least-residual iterate, v = 0, i.e. a zero meta-gradient; reg = 100 keeps it solvable
    opts = {**LEARNERS[algo], **({"reg": 100.0} if algo == "imaml" else {})}
    learner = meta.make_learner(algo, model, vectorize=vectorize, **opts)
    out = learner.meta_step(episodes())
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    return grads, out


@pytest.mark.filterwarnings("ignore:Implicit. the inner solver did not reach")
@pytest.mark.parametrize("kind", ["conv4", "resnet12"])
@pytest.mark.parametrize("algo", sorted(LEARNERS))
def test_every_learner_runs_on_the_backbone_looped_and_vmapped(algo, kind):
    looped, out = meta_grad(algo, kind, vectorize=False)
    vmapped, out_v = meta_grad(algo, kind, vectorize=True)
    head_only_grad = algo == "memoryreduced"
    scale = max(float(g.abs().max()) for g in looped.values() if g is not None)
    assert scale > 0
    for n, g in looped.items():  # (a conv bias before batch norm has a ~1e-17 gradient)
        if head_only_grad and n.startswith("head."):
            assert g is None and vmapped[n] is None
            continue
        assert g is not None and bool(torch.isfinite(g).all()), n
        assert float((vmapped[n] - g).abs().max()) / scale < 1e-10, n
    assert out["loss"] == pytest.approx(out_v["loss"], rel=1e-10)


@pytest.mark.parametrize("kind", ["conv4", "resnet12"])
def test_maml_meta_gradient_equals_a_hand_written_autograd_loop(kind):
    """Second order through conv, batch norm, LeakyReLU, residual and max-pool."""
    model = tiny(kind)
    alpha, steps = LEARNERS["maml"]["inner_lr"], LEARNERS["maml"]["inner_steps"]
    batch = episodes()
    learner = meta.MAML(model, inner_lr=alpha, inner_steps=steps)
    learner.meta_step(batch)
    theta = dict(model.named_parameters())
    total = None
    for i in range(batch.num_tasks):
        (xs, ys), (xq, yq) = batch.task(i).support, batch.task(i).query
        w = dict(theta)
        for _ in range(steps):
            loss = F.cross_entropy(functional_call(model, w, (xs,)), ys)
            gs = torch.autograd.grad(loss, list(w.values()), create_graph=True)
            w = {n: p - alpha * g for (n, p), g in zip(w.items(), gs)}
        q = F.cross_entropy(functional_call(model, w, (xq,)), yq)
        g = torch.autograd.grad(q, list(theta.values()))
        total = g if total is None else [a + b for a, b in zip(total, g)]
    for (n, p), g in zip(theta.items(), total):
        want = g / batch.num_tasks
        assert torch.allclose(p.grad, want, rtol=1e-10, atol=1e-12), n


def test_dropout_backbone_trains_looped():
    """With drop_rate > 0 (train mode) the looped learners run (a fresh mask per forward)."""
    torch.manual_seed(0)
    model = ResNet12(2, channels=(3, 4, 4, 4), image_size=16, drop_rate=0.2,
                     dropblock_size=2).double()
    learner = meta.MAML(model, inner_lr=0.1, inner_steps=1, vectorize=False)
    out = learner.meta_step(episodes())
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all())
               for p in model.parameters())
    assert out["loss"] > 0
    # head-only learners: the once-per-model check head(features(x)) == model(x) sees two
    # different masks, so they need cache_features=False with dropout (see the notes)
    anil = meta.ANIL(model, inner_lr=0.1, inner_steps=1, vectorize=False, cache_features=False)
    model.zero_grad()
    assert math.isfinite(anil.meta_step(episodes())["loss"])
