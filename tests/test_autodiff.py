"""bl.autodiff: plain-autograd derivatives with torch.func semantics (float64)."""

from __future__ import annotations

import pytest
import torch
import torch.func as tf
from _problems import DT, MAMLQuadratic, rel

import bilevel as bl
from bilevel import autodiff as ad


def f(w, h, batch):
    x, y = batch
    pred = torch.tanh(x @ w["a"]) @ w["b"] + h["c"] * w["b"].sum()
    return ((pred - y) ** 2).mean() + (h["c"] * w["a"]).pow(2).sum()


@pytest.fixture
def args():
    g = torch.Generator().manual_seed(0)
    w = {"a": torch.randn(3, 4, dtype=DT, generator=g), "b": torch.randn(4, dtype=DT, generator=g)}
    h = {"c": torch.randn((), dtype=DT, generator=g)}
    batch = (torch.randn(5, 3, dtype=DT, generator=g), torch.randn(5, dtype=DT, generator=g))
    return w, h, batch


def _close(a, b, tol=1e-13):
    for x, y in zip(bl.pytree.tree_leaves(a), bl.pytree.tree_leaves(b), strict=True):
        torch.testing.assert_close(x, y, rtol=tol, atol=tol)


@pytest.mark.parametrize("argnums", [0, 1, (0, 1)])
def test_grad_and_value_equals_torch_func(args, argnums):
    assert ad.eager()
    ours = ad.grad_and_value(f, argnums=argnums)(*args)
    ref = tf.grad_and_value(f, argnums=argnums)(*args)
    _close(ours, ref)
    assert not ours[1].requires_grad  # nothing required grad: no graph is kept


def test_partial_derivative_when_the_same_tensor_is_in_two_arguments(args):
    """MAML's w_0 = θ: the derivative w.r.t. argument 0 is partial, as with torch.func."""
    a = args[0]["a"].clone().requires_grad_(True)

    def loss(p, q):
        return (p["a"] * q["a"]).sum() + p["a"].pow(3).sum()

    got = ad.grad_and_value(loss)({"a": a}, {"a": a})[0]["a"]
    torch.testing.assert_close(got, a.detach() + 3 * a.detach() ** 2, rtol=1e-14, atol=1e-14)


def test_unused_inputs_get_zeros_and_constant_output(args):
    w, h, _ = args
    g, _ = ad.grad_and_value(lambda w, h: (w["b"] ** 2).sum(), argnums=(0, 1))(w, h)
    assert torch.equal(g[0]["a"], torch.zeros_like(w["a"])) and torch.equal(
        g[1]["c"], torch.zeros_like(h["c"]))
    g, _ = ad.grad_and_value(lambda w: torch.tensor(1.0, dtype=DT))(w)
    assert all(torch.equal(x, torch.zeros_like(x)) for x in g.values())


def test_non_scalar_output_is_an_error(args):
    w, _, _ = args
    with pytest.raises(RuntimeError, match="scalar"):
        ad.grad_and_value(lambda w: w["a"] * 2)(w)


def test_create_graph_when_an_input_requires_grad(args):
    """Higher order: with an input requiring grad the result stays differentiable (the mixed
    second derivative matches torch.func's)."""
    w, h, batch = args
    hc = {"c": h["c"].clone().requires_grad_(True)}
    g, _ = ad.grad_and_value(f)(w, hc, batch)
    assert g["a"].requires_grad
    second = torch.autograd.grad(g["a"].sum(), hc["c"])[0]
    ref = tf.grad(lambda c: tf.grad(f)(w, {"c": c}, batch)["a"].sum())(h["c"])
    torch.testing.assert_close(second, ref, rtol=1e-13, atol=1e-13)


def test_vjp_equals_torch_func_and_can_be_pulled_twice(args):
    w, h, batch = args
    fn = lambda w, h: tf.grad(f)(w, h, batch)  # noqa: E731 (a pytree output)
    out, pull = ad.vjp(fn, w, h)
    ref_out, ref_pull = tf.vjp(fn, w, h)
    _close(out, ref_out)
    for seed in (1, 2):
        v = {k: torch.randn(x.shape, dtype=DT, generator=torch.Generator().manual_seed(seed))
             for k, x in w.items()}
        _close(pull(v), ref_pull(v))


def test_falls_back_to_torch_func_under_a_transform(args):
    """Inside vmap (and any torch.func transform) the torch.func path runs: vmap of our
    grad_and_value equals the loop."""
    w, h, (x, y) = args
    xs, ys = x.expand(3, *x.shape) * torch.arange(1, 4, dtype=DT)[:, None, None], y.expand(3, 5)

    def one(x, y):
        assert not ad.eager()
        return ad.grad_and_value(f)(w, h, (x, y))[0]

    batched = tf.vmap(one)(xs, ys)
    for i in range(3):
        _close({k: v[i] for k, v in batched.items()}, tf.grad(f)(w, h, (xs[i], ys[i])))


def test_set_eager_switches_the_back_end(args):
    previous = ad.set_eager(False)
    try:
        assert not ad.eager()
        _close(ad.grad_and_value(f)(*args), tf.grad_and_value(f)(*args))
    finally:
        ad.set_eager(previous)
    assert ad.eager() == previous


def test_hypergrad_is_differentiable_when_hparams_require_grad():
    """d/dθ of a MAML hypergradient (a third-order quantity) is the same on both back ends."""
    q = MAMLQuadratic.make(d=4, K=3)
    theta = torch.randn(4, dtype=DT, generator=torch.Generator().manual_seed(3))

    def second(eager: bool) -> torch.Tensor:
        previous = ad.set_eager(eager)
        try:
            t = theta.clone().requires_grad_(True)
            res = bl.hypergrad(q.problem(), {"theta": t}, solver=q.solver(),
                               differentiable=True)
            return torch.autograd.grad(res.grad["theta"].pow(2).sum(), t)[0]
        finally:
            ad.set_eager(previous)

    ours, ref = second(True), second(False)
    # closed form: ĝ = Mᵀ Q (w_K − b) is affine in θ with w_K = Pθ + (I − P)a, so
    # d‖ĝ‖²/dθ = 2 (MᵀQP)ᵀ ĝ with M = P = (I − αA)^K.
    P = q.P(q.K)
    g = P.T @ q.Q @ (P @ theta + (torch.eye(4, dtype=DT) - P) @ q.a - q.b)
    exact = 2 * (P.T @ q.Q @ P).T @ g
    assert rel(ours, exact) < 1e-12 and rel(ref, exact) < 1e-12


def test_vjp_pull_to_one_primal(args):
    w, h, batch = args
    fn = lambda w, h: tf.grad(f)(w, h, batch)  # noqa: E731
    _, pull = ad.vjp(fn, w, h)
    v = {k: torch.ones_like(x) for k, x in w.items()}
    both = pull(v)
    only_w, only_h = pull(v, only=0), pull(v, only=1)
    assert only_w[1] is None and only_h[0] is None
    _close(only_w[0], both[0])
    _close(only_h[1], both[1])
