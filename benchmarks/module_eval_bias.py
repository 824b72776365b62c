"""Bias of module_problem(outer_mode="eval") vs central finite differences of the true
eval-mode validation loss (BatchNorm running statistics updated by torch itself, in place).

    OMP_NUM_THREADS=1 python benchmarks/module_eval_bias.py 5 20 50

outer_mode="eval" drops the path λ → w_k → running statistics → f; outer_mode="train" is the
exact derivative of a different F (batch statistics), shown against the same reference.
"""

from __future__ import annotations

import copy
import sys

import torch
from torch import nn
from torch.func import functional_call

import bilevel as bl

torch.manual_seed(0)
torch.set_default_dtype(torch.float64)
CE = nn.functional.cross_entropy


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3)
        self.pool, self.out = nn.AdaptiveAvgPool2d(2), nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.pool(torch.relu(self.bn(self.conv(x)))).flatten(1))


def reg(p, h):
    return 0.5 * h["ld"].exp() * (p["conv.weight"] ** 2).sum()


def loss(o, t, h):
    return CE(o, t)


def true_f(model, stream, val, h, steps):
    """Momentum(lr=h['lr'], 0.5) for ``steps`` steps in model.train(), then the eval-mode loss."""
    m = copy.deepcopy(model).train()
    p = {k: v.detach().clone() for k, v in m.named_parameters()}
    vel = {k: torch.zeros_like(v) for k, v in p.items()}
    bufs = {k: v.detach().clone() for k, v in m.named_buffers()}
    for k in range(steps):
        xb, yb = stream.at(k)
        p = {n: v.requires_grad_() for n, v in p.items()}
        g = torch.autograd.grad(CE(functional_call(m, {**p, **bufs}, (xb,)), yb) + reg(p, h),
                                list(p.values()))
        for (n, v), gn in zip(list(p.items()), g):
            vel[n] = 0.5 * vel[n] + gn
            p[n] = (v - h["lr"] * vel[n]).detach()
    m.eval()
    return float(CE(functional_call(m, {**p, **bufs}, (val[0],)), val[1]))


def main(horizons: list[int]) -> None:
    model = Net()
    x, y = torch.randn(20, 1, 5, 5), torch.randint(0, 3, (20,))
    val = (torch.randn(9, 1, 5, 5), torch.randint(0, 3, (9,)))
    stream = bl.Minibatches(x, y, batch_size=6, seed=0)
    h0 = {"ld": torch.tensor(-1.0), "lr": torch.tensor(0.2)}
    for steps in horizons:
        eps, fd = 1e-6, []
        for key in ("ld", "lr"):
            hp, hm = dict(h0), dict(h0)
            hp[key], hm[key] = h0[key] + eps, h0[key] - eps
            fd.append((true_f(model, stream, val, hp, steps)
                       - true_f(model, stream, val, hm, steps)) / (2 * eps))
        fd = torch.tensor(fd)
        for mode in ("eval", "train"):
            mp = bl.module_problem(model, loss, loss, regularizer=reg, outer_mode=mode)
            g = mp.hypergrad(h0, stream, val, solver=bl.Momentum(lr="lr", steps=steps,
                                                                 momentum=0.5)).grad
            v = torch.stack([g["ld"], g["lr"]])
            rel = ((v - fd).abs() / fd.abs()).tolist()
            cos = float(v @ fd / v.norm() / fd.norm())
            print(f"K={steps} outer_mode={mode}: estimate {v.tolist()} FD {fd.tolist()} "
                  f"rel err ld {rel[0]:.1%} lr {rel[1]:.1%} cosine {cos:.5f}")


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [5, 20])
