"""meta.models: Conv4/MLP shapes and names, the plain-ops BatchNorm, and the vmap canary."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

import bilevel as bl
import meta
from meta.models import BatchNorm

DT = torch.float64


def test_conv4_shapes_and_names():
    strided = meta.Conv4(1, 5, hidden=8)
    assert strided(torch.randn(4, 1, 28, 28)).shape == (4, 5)
    assert strided(torch.randn(4, 28, 28)).shape == (4, 5)  # channel dim added for 1 channel
    pooled = meta.Conv4(3, 5, hidden=8, max_pool=True)
    assert pooled(torch.randn(2, 3, 84, 84)).shape == (2, 5)
    names = [n for n, _ in strided.named_parameters()]
    assert all(n.startswith(("features.", "head.")) for n in names)
    assert names[-2:] == ["head.weight", "head.bias"] and strided.head.in_features == 8
    assert "features.block1.norm.weight" in names
    assert not list(strided.buffers())  # no running statistics
    no_bn = meta.Conv4(1, 5, hidden=8, batch_norm=False)
    assert not any("norm" in n for n, _ in no_bn.named_parameters())


def test_mlp_and_param_helpers():
    mlp = meta.MLP()
    assert mlp(torch.randn(7, 1)).shape == (7, 1)
    body, head = meta.split_params(mlp)
    assert set(head) == {"head.weight", "head.bias"} and len(body) == 4
    assert all(not t.requires_grad for t in {**body, **head}.values())
    assert set(meta.params_of(mlp)) == {n for n, _ in mlp.named_parameters()}
    with pytest.raises(ValueError, match="head"):
        meta.split_params(torch.nn.Linear(2, 2))


def test_batch_norm_matches_functional_and_ignores_mode():
    bn = BatchNorm(3).to(DT)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
    x = torch.randn(5, 3, 4, 4, dtype=DT)
    ref = F.batch_norm(x, None, None, bn.weight, bn.bias, training=True, eps=bn.eps)
    torch.testing.assert_close(bn(x), ref, rtol=1e-12, atol=1e-12)
    model = meta.Conv4(1, 3, hidden=4).to(DT)
    x = torch.randn(6, 1, 8, 8, dtype=DT)
    out_train = model.train()(x)
    torch.testing.assert_close(model.eval()(x), out_train, rtol=0, atol=0)


class _FunctionalBN(BatchNorm):
    """The same layer through ``F.batch_norm`` (what the canonical torch.func recipe uses)."""

    def forward(self, x):
        return F.batch_norm(x, None, None, self.weight, self.bias, training=True, eps=self.eps)


def _maml_mean_grad_vmapped(model, theta, data, lr=0.3, steps=2):
    """grad of the vmapped mean MAML query loss: the pattern of the functorch MAML example."""

    def loss(p, x, y):
        return F.cross_entropy(functional_call(model, p, (x,)), y)

    def task(th, xs, ys, xq, yq):
        phi = th
        for _ in range(steps):
            g = grad(loss)(phi, xs, ys)
            phi = {n: phi[n] - lr * g[n] for n in phi}
        return loss(phi, xq, yq)

    return grad(lambda th: vmap(task, in_dims=(None, 0, 0, 0, 0))(th, *data).mean())(theta), task


def _rel(a: dict, b: dict) -> float:
    num = sum(float(((a[n] - b[n]) ** 2).sum()) for n in b) ** 0.5
    return num / sum(float((b[n] ** 2).sum()) for n in b) ** 0.5


def test_canary_functional_batch_norm_under_vmap():
    """The test that would catch pytorch/functorch#534: with F.batch_norm, the meta-gradient of a
    vmapped MAML loss differs from the Python loop (≈1e-2 relative on torch 2.13); our
    plain-ops BatchNorm agrees to rounding. Skips (after checking ours) if torch fixed it."""
    gen = torch.Generator().manual_seed(0)
    data = (torch.randn(3, 3, 1, 8, 8, dtype=DT, generator=gen), torch.randint(0, 3, (3, 3)),
            torch.randn(3, 6, 1, 8, 8, dtype=DT, generator=gen), torch.randint(0, 3, (3, 6)))
    errors = {}
    for kind in ("ours", "functional"):
        torch.manual_seed(1)
        model = meta.Conv4(1, 3, hidden=4).to(DT)
        if kind == "functional":
            for block in list(model.features)[:4]:
                block.norm = _FunctionalBN(4).to(DT)
        theta = meta.params_of(model)
        batched, task = _maml_mean_grad_vmapped(model, theta, data)
        looped = [grad(task)(theta, *(t[i] for t in data)) for i in range(3)]
        mean = {n: sum(g[n] for g in looped) / 3 for n in theta}
        errors[kind] = _rel(batched, mean)
    assert errors["ours"] < 1e-9, errors
    if errors["functional"] < 1e-9:
        pytest.skip(f"F.batch_norm under vmap agrees with the loop on torch {torch.__version__} "
                    f"(rel. err {errors['functional']:.1e}): functorch#534 looks fixed")
    assert errors["functional"] > 1e-6, errors


@pytest.mark.parametrize("eager", [True, False], ids=["autograd", "torch.func"])
def test_fused_and_plain_batch_norm_agree_to_second_order(eager, monkeypatch):
    """BatchNorm runs F.batch_norm outside vmap and plain ops under it: the MAML meta-gradient
    (K=2, second order, float64) is the same with either form, on plain autograd and under
    torch.func.grad."""
    torch.manual_seed(0)
    model = meta.Conv4(1, 3, hidden=4).to(DT)
    gen = torch.Generator().manual_seed(1)
    batch = meta.TaskBatch((torch.randn(2, 3, 1, 8, 8, dtype=DT, generator=gen),
                            torch.randint(0, 3, (2, 3), generator=gen)),
                           (torch.randn(2, 6, 1, 8, 8, dtype=DT, generator=gen),
                            torch.randint(0, 3, (2, 6), generator=gen)))
    learner = meta.MAML(model, inner_lr=0.1, inner_steps=2, vectorize=False)
    previous = bl.autodiff.set_eager(eager)
    try:
        fused, _ = learner.meta_gradient(batch)
        monkeypatch.setattr(BatchNorm, "forward", BatchNorm.forward_plain)
        plain, _ = learner.meta_gradient(batch)
    finally:
        bl.autodiff.set_eager(previous)
    assert _rel(fused, plain) < 1e-12
    assert max(float(g.abs().max()) for g in plain.values()) > 1e-3
