"""Your own nn.Module with meta: torch's BatchNorm2d (running statistics), Dropout and a head
named ``fc``, meta-trained with ANIL on Omniglot 5-way 1-shot (a short CPU run).

    python examples/own_model.py [OMNIGLOT_ROOT]          # default ../shared/data/omniglot
    meta-train --dataset omniglot --data-root DIR --model examples.own_model:Net \\
        --algorithm anil --head fc                         # the same model in the CLI

Batch norm uses the statistics of each batch (support, query, meta-test) in train and eval
mode; its running buffers are never read or written. ``model.eval()`` turns dropout off for
meta-test. See the module docstring of ``meta.algorithms.base`` for the policies.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

import meta


class Net(nn.Module):
    """A small conv net; ``Net(ways, in_channels)`` is also the ``--model`` factory."""

    def __init__(self, ways: int = 5, in_channels: int = 1):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Dropout(0.1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(32, ways)

    def forward(self, x: torch.Tensor) -> torch.Tensor:   # x: [n, 1, 28, 28], one task
        return self.fc(self.body(x))


def main(root: str = "../shared/data/omniglot", iterations: int = 100) -> tuple[float, float]:
    torch.manual_seed(0)
    model = Net()
    learner = meta.ANIL(model, head="fc")        # or meta.MAML(model), meta.IMAML(model), ...
    train = meta.data.Omniglot(root, split="train", ways=5, shots=1, queries=15, meta_batch=8)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _, batch in zip(range(iterations), train):
        opt.zero_grad()
        out = learner.meta_step(batch)           # labels/outputs checked on the first batch
        opt.step()
    print(f"train query accuracy {out['accuracy']:.2f}")
    model.eval()                                 # dropout off at meta-test
    test = meta.data.Omniglot(root, split="test", ways=5, shots=1, queries=15, meta_batch=25)
    acc, ci95 = learner.evaluate(test, num_tasks=100)   # 10 adaptation steps (the default)
    print(f"test accuracy {acc:.3f} +/- {ci95:.3f} (100 tasks)")
    return acc, ci95


if __name__ == "__main__":
    main(*sys.argv[1:2])
